//! What chaos instances and the workload agree on: the backoff and staleness, and the
//! `--set` flags every `steward run` of the chaos suite gets.

use std::time::Duration;
use steward_queue::RetryPolicy;

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
