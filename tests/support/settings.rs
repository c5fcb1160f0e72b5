//! What chaos instances and the workload agree on: the queue, the backoff and staleness, the
//! workload ([`workload_config`]) and the `--set` flags every `steward run` of the chaos suite
//! gets.

use std::time::Duration;
use steward_queue::RetryPolicy;
use steward_worker::WorkerSettings;
use steward_workload::{Behaviour, WorkloadConfig};

pub const QUEUE: &str = "chaos";
pub const KIND: &str = "chaos.work";
/// Small, so that a job that keeps misbehaving ends up `failed` within seconds.
pub const MAX_ATTEMPTS: i32 = 3;

/// The standard mix, shares in percent.
pub const STANDARD_MIX: [(Behaviour, u32); 10] = [
    (Behaviour::Normal, 57),
    (Behaviour::Flaky, 8),
    (Behaviour::Doomed, 4),
    (Behaviour::Crash, 2),
    (Behaviour::Overrun, 4),
    (Behaviour::Unanswered, 4),
    (Behaviour::Answered, 8),
    (Behaviour::Rejected, 4),
    (Behaviour::SelfCancel, 4),
    (Behaviour::Cancelled, 5),
];

/// The chaos workload: 40 jobs/s of the standard mix, 30% of them due 0.1-1.5 s after their
/// enqueue and every fourth with a run timeout (30 s) no healthy run reaches; three
/// steward-worker workers of 40 runs each, heartbeating every second (a third of the
/// staleness); a crash takes every run of its worker with it. Books are kept for `verify`.
pub fn workload_config() -> WorkloadConfig {
    WorkloadConfig {
        queue: QUEUE.to_owned(),
        kind: KIND.to_owned(),
        other_kinds: vec![crate::audit::CRON_KIND.to_owned()],
        rate: 40.0,
        producers: 1,
        mix: STANDARD_MIX.to_vec(),
        every_misbehaviour_each_second: false,
        scheduled_percent: 30,
        due_in: (Duration::from_millis(100), Duration::from_millis(1500)),
        healthy_timeout: Some(Duration::from_secs(30)),
        max_attempts: MAX_ATTEMPTS,
        workers: 3,
        concurrency: 40,
        worker: WorkerSettings {
            heartbeat_interval: STALENESS / 3,
            assumed_staleness: STALENESS,
            claim_batch: 10,
            poll_interval: Duration::from_millis(25),
            shutdown_grace: Duration::from_secs(1),
            retry: RETRY,
            ..WorkerSettings::default()
        },
        crash_worker: true,
        keep_books: true,
        timings: steward_workload::Timings::default(),
    }
}

/// The workers' backoff; the rescues get the same through [`steward_args`].
pub const RETRY: RetryPolicy = RetryPolicy {
    base: Duration::from_millis(200),
    max: Duration::from_secs(1),
    jitter: 0.1,
};
/// Workers heartbeat every second; a run silent for this long is presumed dead.
pub const STALENESS: Duration = Duration::from_secs(3);

/// `--set` flags every chaos instance runs with (plus `extra`, more `KEY=VALUE` pairs):
/// a 3 s heartbeat staleness, rescues that retry after 200 ms-1 s, one-second quiet periods for
/// the deadline and callback rescues (30 s by default, longer than a scenario), cron fires
/// enqueued 1 s ahead, and reconnects at least every second.
pub fn steward_args(extra: &[&str]) -> Vec<String> {
    let mut settings = vec![
        "branches.rescue_stale_heartbeats.staleness=3s".to_owned(),
        "branches.rescue_stale_heartbeats.interval=500ms".to_owned(),
        "branches.rescue_expired_deadlines.interval=250ms".to_owned(),
        "branches.rescue_expired_callbacks.interval=250ms".to_owned(),
        "branches.rescue_expired_deadlines.quiet_period=1s".to_owned(),
        "branches.rescue_expired_callbacks.quiet_period=1s".to_owned(),
        "branches.cron_sync.interval=500ms".to_owned(),
        "branches.cron_sync.lookahead=1s".to_owned(),
        "leader.reconnect_max=1s".to_owned(),
    ];
    for rescue in [
        "rescue_stale_heartbeats",
        "rescue_expired_deadlines",
        "rescue_expired_callbacks",
    ] {
        settings.push(format!("branches.{rescue}.retry.base=200ms"));
        settings.push(format!("branches.{rescue}.retry.max=1s"));
    }
    settings.extend(extra.iter().map(|s| s.to_string()));
    settings
        .into_iter()
        .flat_map(|s| ["--set".to_owned(), s])
        .collect()
}

pub fn as_strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}
