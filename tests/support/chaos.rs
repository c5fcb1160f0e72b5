//! Helpers of the chaos suite (`tests/chaos.rs`): a mixed workload that keeps its own books, the
//! database audits and checks that prove what happened to every job, a TCP proxy that can
//! black-hole a connection, and log, metric and process probes.
//!
//! Included by `tests/chaos.rs` only (`#[path]`), so the other suites do not compile it.
#![allow(dead_code)]

use crate::support::{LogLine, Steward};
use serde_json::json;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};
use steward_queue::{
    ClaimedJob, FailOutcome, Lease, NewJob, Queue, QueueError, Resolution, RetryPolicy,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

pub const QUEUE: &str = "chaos";
pub const KIND: &str = "chaos.work";
pub const CRON_KIND: &str = "chaos.cron";
pub const CRON_SCHEDULE: &str = "chaos-every-second";
/// Small, so that a job that keeps misbehaving ends up `failed` within seconds.
pub const MAX_ATTEMPTS: i32 = 3;
/// The workers' backoff; the rescues get the same through [`steward_args`].
pub const RETRY: RetryPolicy = RetryPolicy {
    base: Duration::from_millis(200),
    max: Duration::from_secs(1),
    jitter: 0.1,
};
/// Workers heartbeat every second; a run silent for this long is presumed dead.
pub const STALENESS: Duration = Duration::from_secs(3);

pub const ACQUIRED: &str = "leadership acquired";
pub const STANDING_BY: &str = "standing by for leadership";
pub const FIRST_PASS: &str = "first branch pass of the term";
pub const LOST: &str = "leadership lost; back to standby";
pub const WEDGE_TAKEOVER: &str =
    "the leader has made no progress; ending its sessions to take over";
pub const BRANCH_RUNS: &str = "steward_maintenance_branch_runs_total";

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

// ---------------------------------------------------------------------------------------------
// The workload
// ---------------------------------------------------------------------------------------------

/// What a job does when a worker runs it; written in its args (`{"b": name, "t": token}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Behaviour {
    /// Works 10-60 ms and completes.
    Normal,
    /// Attempt 1 fails; then normal.
    Flaky,
    /// Every attempt fails: `failed` after [`MAX_ATTEMPTS`].
    Doomed,
    /// Attempt 1: the worker running it crashes, abandoning every run it holds (no heartbeat,
    /// no finish), and a new worker takes its place. Then normal.
    Crash,
    /// Run timeout 300 ms. Attempt 1 works 1.2 s while heartbeating, so the deadline rescue
    /// takes it back and the late completion is refused. Then normal.
    Overrun,
    /// Attempt 1 parks on a callback (600 ms timeout) that nobody answers. Then normal.
    Unanswered,
    /// Parks on a callback ([`WorkloadConfig::answer_timeout`]) that a remote party completes
    /// after 100 ms.
    Answered,
    /// Attempt 1 parks; the remote party answers with a failure. Then normal.
    Rejected,
    /// Attempt 1 is cancelled (by an operator) while it runs; the completion is refused.
    SelfCancel,
    /// Due in 2 s and cancelled by the producer after 300 ms (normal if it ran anyway).
    Cancelled,
    /// Attempt 1 works [`WorkloadConfig::long_for`] while heartbeating, then completes: a run
    /// that spans an outage.
    Long,
}

impl Behaviour {
    pub const ALL: [Behaviour; 11] = [
        Behaviour::Normal,
        Behaviour::Flaky,
        Behaviour::Doomed,
        Behaviour::Crash,
        Behaviour::Overrun,
        Behaviour::Unanswered,
        Behaviour::Answered,
        Behaviour::Rejected,
        Behaviour::SelfCancel,
        Behaviour::Cancelled,
        Behaviour::Long,
    ];

    /// Shares in percent.
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

    pub fn name(self) -> &'static str {
        match self {
            Behaviour::Normal => "normal",
            Behaviour::Flaky => "flaky",
            Behaviour::Doomed => "doomed",
            Behaviour::Crash => "crash",
            Behaviour::Overrun => "overrun",
            Behaviour::Unanswered => "unanswered",
            Behaviour::Answered => "answered",
            Behaviour::Rejected => "rejected",
            Behaviour::SelfCancel => "self_cancel",
            Behaviour::Cancelled => "cancelled",
            Behaviour::Long => "long",
        }
    }

    pub fn parse(name: &str) -> Option<Behaviour> {
        Self::ALL.into_iter().find(|b| b.name() == name)
    }

    fn of(job: &ClaimedJob) -> Behaviour {
        job.args
            .get("b")
            .and_then(|v| v.as_str())
            .and_then(Behaviour::parse)
            .unwrap_or(Behaviour::Normal)
    }

    /// Whether a run of this behaviour may be taken away from a live worker.
    fn may_lose(self, attempt: i32) -> bool {
        matches!(
            (self, attempt),
            (Behaviour::Overrun, 1) | (Behaviour::SelfCancel, 1) | (Behaviour::Cancelled, _)
        )
    }
}

#[derive(Clone, Debug)]
pub struct WorkloadConfig {
    /// Jobs enqueued per second.
    pub rate: u32,
    pub workers: usize,
    /// Runs one worker executes at once.
    pub capacity: usize,
    pub heartbeat_every: Duration,
    pub mix: Vec<(Behaviour, u32)>,
    /// Share of jobs (percent) due 0.1-1.5 s after their enqueue, for the promoter.
    pub scheduled_percent: u64,
    pub long_for: Duration,
    /// Callback timeout of the jobs a remote party answers: longer than any outage of the
    /// scenario, or the answer could legitimately lose to the timeout.
    pub answer_timeout: Duration,
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        Self {
            rate: 40,
            workers: 3,
            capacity: 40,
            heartbeat_every: Duration::from_secs(1),
            mix: Behaviour::STANDARD_MIX.to_vec(),
            scheduled_percent: 30,
            long_for: Duration::from_secs(10),
            answer_timeout: Duration::from_secs(8),
        }
    }
}

/// (job id, attempt): one run of a job.
pub type Run = (i64, i32);

/// What the workload knows happened, to be compared with what the database says.
#[derive(Default, Debug)]
pub struct Books {
    /// Tokens of jobs whose enqueue was acknowledged.
    pub acked: HashSet<u64>,
    /// Tokens of jobs whose enqueue failed: they may or may not exist.
    pub unacked: HashSet<u64>,
    /// Every run a worker received from `claim`.
    pub claimed: HashSet<Run>,
    /// Runs held by a worker when it crashed.
    pub abandoned: HashSet<Run>,
    /// Runs that worked past their deadline on purpose.
    pub overran: HashSet<Run>,
    /// Runs parked on a callback that will not be answered (on purpose, or because the park's
    /// outcome was unknown).
    pub unanswered: HashSet<Run>,
    /// Acknowledged completions (complete() or a resolved callback) per job.
    pub completions: HashMap<i64, u32>,
    /// Jobs whose fail() answered `Failed`.
    pub final_failures: HashSet<i64>,
    /// A live worker lost a run it had no reason to lose: a false rescue or a lost update.
    pub unexpected: Vec<String>,
    pub counts: BTreeMap<&'static str, u64>,
    pub last_error: Option<String>,
}

#[derive(Default)]
pub struct Ledger(Mutex<Books>);

impl Ledger {
    pub fn books(&self) -> MutexGuard<'_, Books> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn count(&self, what: &'static str) {
        *self.books().counts.entry(what).or_default() += 1;
    }

    fn error(&self, what: &'static str, error: impl std::fmt::Display) {
        let mut books = self.books();
        *books.counts.entry("db_errors").or_default() += 1;
        books.last_error = Some(format!("{what}: {error}"));
    }

    fn unexpected(&self, what: String) {
        self.books().unexpected.push(what);
    }

    pub fn counts(&self) -> BTreeMap<&'static str, u64> {
        self.books().counts.clone()
    }
}

/// xorshift64*: deterministic enough, no dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1)
    }
}

struct HeldRun {
    attempt: i32,
    behaviour: Behaviour,
    /// A finishing call is under way: its answer, not the heartbeat, says what happened.
    finishing: bool,
}

struct WorkerShared {
    id: usize,
    queue: Queue,
    ledger: Arc<Ledger>,
    config: Arc<WorkloadConfig>,
    held: Mutex<HashMap<Lease, HeldRun>>,
    crash: CancellationToken,
    /// Remote parties answering callbacks: they outlive the worker that parked the job.
    remotes: CancellationToken,
}

impl WorkerShared {
    fn held(&self) -> MutexGuard<'_, HashMap<Lease, HeldRun>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Producer, workers (which crash and are replaced) and remote callback parties.
pub struct Workload {
    ledger: Arc<Ledger>,
    produce: CancellationToken,
    stop: CancellationToken,
    tasks: JoinSet<()>,
    workers: Arc<Mutex<Vec<Arc<WorkerShared>>>>,
}

impl Workload {
    /// Starts on the current runtime.
    pub fn start(queue: Queue, config: WorkloadConfig) -> Workload {
        let ledger = Arc::new(Ledger::default());
        let produce = CancellationToken::new();
        let stop = CancellationToken::new();
        let config = Arc::new(config);
        let workers = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = JoinSet::new();
        tasks.spawn(producer(
            queue.clone(),
            ledger.clone(),
            config.clone(),
            produce.clone(),
            stop.clone(),
        ));
        tasks.spawn(supervisor(
            queue,
            ledger.clone(),
            config,
            workers.clone(),
            stop.clone(),
        ));
        Workload {
            ledger,
            produce,
            stop,
            tasks,
            workers,
        }
    }

    pub fn ledger(&self) -> Arc<Ledger> {
        self.ledger.clone()
    }

    pub fn stop_producing(&self) {
        self.produce.cancel();
    }

    /// Runs live workers hold right now, with their behaviour.
    pub fn held_runs(&self) -> Vec<(Run, Behaviour)> {
        let workers = self.workers.lock().unwrap();
        workers
            .iter()
            .filter(|w| !w.crash.is_cancelled())
            .flat_map(|w| {
                w.held()
                    .iter()
                    .map(|(lease, run)| ((lease.job_id, run.attempt), run.behaviour))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Crashes the live worker holding the most runs; returns the runs it held.
    pub fn crash_a_worker(&self) -> Vec<Run> {
        let workers = self.workers.lock().unwrap();
        let Some(victim) = workers
            .iter()
            .filter(|w| !w.crash.is_cancelled())
            .max_by_key(|w| w.held().len())
        else {
            return Vec::new();
        };
        let runs = victim
            .held()
            .iter()
            .map(|(lease, run)| (lease.job_id, run.attempt))
            .collect();
        victim.crash.cancel();
        runs
    }

    /// Stops everything (runs in flight are left where they are).
    pub async fn stop(mut self) -> Arc<Ledger> {
        self.produce.cancel();
        self.stop.cancel();
        let stopped = tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(done) = self.tasks.join_next().await {
                if let Err(e) = done {
                    if e.is_panic() {
                        panic!("a workload task panicked: {e}");
                    }
                }
            }
        })
        .await;
        assert!(stopped.is_ok(), "the workload did not stop within 20 s");
        self.ledger
    }
}

async fn producer(
    queue: Queue,
    ledger: Arc<Ledger>,
    config: Arc<WorkloadConfig>,
    produce: CancellationToken,
    stop: CancellationToken,
) {
    let mut rng = Rng::new(7);
    let mut token: u64 = 0;
    let per_tick = (config.rate / 10).max(1);
    let total: u64 = config.mix.iter().map(|(_, share)| u64::from(*share)).sum();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut cancellers = JoinSet::new();
    loop {
        tokio::select! {
            _ = produce.cancelled() => break,
            _ = tick.tick() => {}
        }
        let mut batch = Vec::new();
        let mut tokens = Vec::new();
        for _ in 0..per_tick {
            token += 1;
            let mut roll = rng.below(total);
            let behaviour = config
                .mix
                .iter()
                .find(|(_, share)| {
                    let hit = roll < u64::from(*share);
                    roll = roll.saturating_sub(u64::from(*share));
                    hit
                })
                .map(|(b, _)| *b)
                .unwrap_or(Behaviour::Normal);
            let mut job = NewJob::new(KIND)
                .queue(QUEUE)
                .args(json!({ "b": behaviour.name(), "t": token }))
                .max_attempts(MAX_ATTEMPTS);
            if behaviour == Behaviour::Overrun {
                job = job.run_timeout(Duration::from_millis(300));
            } else if token.is_multiple_of(4) {
                // Some jobs carry a generous run timeout that a healthy run never reaches.
                job = job.run_timeout(Duration::from_secs(30));
            }
            if behaviour == Behaviour::Cancelled {
                // Enqueued alone, so that its id is known for the cancellation.
                let job = job.run_in(Duration::from_secs(2));
                match queue.enqueue(&job).await {
                    Ok(enqueued) => {
                        ledger.books().acked.insert(token);
                        let (queue, ledger) = (queue.clone(), ledger.clone());
                        cancellers.spawn(async move {
                            tokio::time::sleep(Duration::from_millis(300)).await;
                            let deadline = Instant::now() + Duration::from_secs(60);
                            loop {
                                match queue.cancel(enqueued.id()).await {
                                    Ok(true) => ledger.count("cancelled_by_producer"),
                                    Ok(false) => ledger.count("cancel_too_late"),
                                    Err(e) if Instant::now() < deadline => {
                                        ledger.error("cancel", e);
                                        tokio::time::sleep(Duration::from_millis(200)).await;
                                        continue;
                                    }
                                    Err(e) => ledger.unexpected(format!(
                                        "could not cancel job {} within 60 s: {e}",
                                        enqueued.id()
                                    )),
                                }
                                break;
                            }
                        });
                    }
                    Err(e) => {
                        ledger.books().unacked.insert(token);
                        ledger.error("enqueue", e);
                    }
                }
                continue;
            }
            if rng.below(100) < config.scheduled_percent {
                job = job.run_in(Duration::from_millis(100 + rng.below(1400)));
            }
            batch.push(job);
            tokens.push(token);
        }
        match queue.enqueue_batch(&batch).await {
            Ok(ids) => {
                assert_eq!(ids.len(), batch.len(), "enqueue_batch skipped jobs");
                ledger.books().acked.extend(tokens);
                for _ in &ids {
                    ledger.count("enqueued");
                }
            }
            Err(e) => {
                ledger.books().unacked.extend(tokens);
                ledger.error("enqueue", e);
            }
        }
    }
    // Pending cancellations still happen after production stops (until the workload stops).
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = async { while cancellers.join_next().await.is_some() {} } => {}
    }
}

async fn supervisor(
    queue: Queue,
    ledger: Arc<Ledger>,
    config: Arc<WorkloadConfig>,
    workers: Arc<Mutex<Vec<Arc<WorkerShared>>>>,
    stop: CancellationToken,
) {
    let remotes = CancellationToken::new();
    let next_id = AtomicUsize::new(0);
    let spawn = |set: &mut JoinSet<()>| {
        let worker = Arc::new(WorkerShared {
            id: next_id.fetch_add(1, Ordering::Relaxed),
            queue: queue.clone(),
            ledger: ledger.clone(),
            config: config.clone(),
            held: Mutex::new(HashMap::new()),
            crash: CancellationToken::new(),
            remotes: remotes.clone(),
        });
        let mut list = workers.lock().unwrap();
        list.retain(|w| !w.crash.is_cancelled());
        list.push(worker.clone());
        set.spawn(work(worker, stop.clone()));
    };
    let mut running = JoinSet::new();
    for _ in 0..config.workers {
        spawn(&mut running);
    }
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            joined = running.join_next() => match joined {
                // A worker crashed: another one takes its place.
                Some(Ok(())) => spawn(&mut running),
                Some(Err(e)) => panic!("a worker task failed: {e}"),
                None => break,
            }
        }
    }
    remotes.cancel();
    while running.join_next().await.is_some() {}
}

/// One worker: claims while it has room, heartbeats everything it holds, runs each job in its
/// own task. Returns when it crashes (after recording what it abandoned) or is stopped.
async fn work(w: Arc<WorkerShared>, stop: CancellationToken) {
    let mut jobs = JoinSet::new();
    let heartbeat = tokio::spawn(heartbeats(w.clone()));
    loop {
        if w.crash.is_cancelled() || stop.is_cancelled() {
            break;
        }
        let room = w.config.capacity.saturating_sub(w.held().len());
        let mut claimed_any = false;
        if room > 0 {
            match w.queue.claim(QUEUE, room.min(10) as i64).await {
                Ok(claimed) => {
                    for job in claimed {
                        let run = (job.lease.job_id, job.attempt);
                        w.held().insert(
                            job.lease,
                            HeldRun {
                                attempt: job.attempt,
                                behaviour: Behaviour::of(&job),
                                finishing: false,
                            },
                        );
                        {
                            let mut books = w.ledger.books();
                            books.claimed.insert(run);
                            *books.counts.entry("claimed").or_default() += 1;
                        }
                        claimed_any = true;
                        jobs.spawn(run_job(w.clone(), job));
                    }
                }
                Err(e) => w.ledger.error("claim", e),
            }
        }
        while let Some(done) = jobs.try_join_next() {
            if let Err(e) = done {
                if e.is_panic() {
                    panic!("a job task panicked: {e}");
                }
            }
        }
        let pause = if claimed_any { 5 } else { 25 };
        tokio::select! {
            _ = w.crash.cancelled() => {}
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(Duration::from_millis(pause)) => {}
        }
    }
    // Crash or stop: nothing this worker runs goes any further.
    jobs.abort_all();
    while jobs.join_next().await.is_some() {}
    heartbeat.abort();
    let _ = heartbeat.await;
    if w.crash.is_cancelled() && !stop.is_cancelled() {
        let held: Vec<Run> = w
            .held()
            .drain()
            .map(|(lease, run)| (lease.job_id, run.attempt))
            .collect();
        let mut books = w.ledger.books();
        *books.counts.entry("worker_crashes").or_default() += 1;
        *books.counts.entry("runs_abandoned").or_default() += held.len() as u64;
        books.abandoned.extend(held);
    }
}

async fn heartbeats(w: Arc<WorkerShared>) {
    let mut tick = tokio::time::interval(w.config.heartbeat_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let leases: Vec<Lease> = w.held().keys().copied().collect();
        if leases.is_empty() {
            continue;
        }
        match w.queue.heartbeat_many(&leases).await {
            Ok(lost) => {
                for lease in lost {
                    let mut held = w.held();
                    let Some(run) = held.get(&lease) else {
                        continue; // finished meanwhile
                    };
                    if run.finishing {
                        continue; // the finishing call will tell
                    }
                    let (attempt, behaviour) = (run.attempt, run.behaviour);
                    held.remove(&lease);
                    drop(held);
                    w.ledger.count("heartbeat_lost");
                    if !behaviour.may_lose(attempt) {
                        w.ledger.unexpected(format!(
                            "worker {} lost run {:?} ({}) on heartbeat while running it",
                            w.id,
                            (lease.job_id, attempt),
                            behaviour.name()
                        ));
                    }
                }
            }
            Err(e) => w.ledger.error("heartbeat", e),
        }
    }
}

enum Finish {
    Complete,
    Fail(&'static str),
}

async fn run_job(w: Arc<WorkerShared>, job: ClaimedJob) {
    let lease = job.lease;
    let attempt = job.attempt;
    let behaviour = Behaviour::of(&job);
    let run = (lease.job_id, attempt);
    let busy = Duration::from_millis(10 + (lease.job_id as u64 * 7919) % 50);
    match (behaviour, attempt) {
        (Behaviour::Crash, 1) => {
            // The worker dies with everything it holds, this run included.
            w.crash.cancel();
        }
        (Behaviour::Flaky, 1) | (Behaviour::Doomed, _) => {
            tokio::time::sleep(busy).await;
            finish(&w, lease, attempt, behaviour, Finish::Fail("it went wrong")).await;
        }
        (Behaviour::Overrun, 1) => {
            w.ledger.books().overran.insert(run);
            tokio::time::sleep(Duration::from_millis(1200)).await;
            finish(&w, lease, attempt, behaviour, Finish::Complete).await;
        }
        (Behaviour::Unanswered, 1) => {
            if park(&w, lease, Duration::from_millis(600)).await.is_some() {
                w.ledger.books().unanswered.insert(run);
            }
        }
        (Behaviour::Answered, _) | (Behaviour::Rejected, 1) => {
            if let Some(callback) = park(&w, lease, w.config.answer_timeout).await {
                let resolution = if behaviour == Behaviour::Answered {
                    Resolution::Complete
                } else {
                    Resolution::Fail("the remote party said no".to_owned())
                };
                tokio::spawn(remote_party(
                    w.clone(),
                    lease.job_id,
                    run,
                    callback,
                    resolution,
                ));
            }
        }
        (Behaviour::SelfCancel, 1) => {
            tokio::time::sleep(busy).await;
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                match w.queue.cancel(lease.job_id).await {
                    Ok(_) => break,
                    Err(e) if Instant::now() < deadline => {
                        w.ledger.error("cancel", e);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(e) => {
                        w.ledger
                            .unexpected(format!("could not cancel {run:?} within 60 s: {e}"));
                        break;
                    }
                }
            }
            finish(&w, lease, attempt, behaviour, Finish::Complete).await;
        }
        (Behaviour::Long, 1) => {
            tokio::time::sleep(w.config.long_for).await;
            finish(&w, lease, attempt, behaviour, Finish::Complete).await;
        }
        _ => {
            tokio::time::sleep(busy).await;
            finish(&w, lease, attempt, behaviour, Finish::Complete).await;
        }
    }
}

/// Parks the run on a callback. None when the park was refused or its outcome is unknown; an
/// unknown outcome is booked as unanswered (nobody can answer a callback id never received).
async fn park(w: &WorkerShared, lease: Lease, timeout: Duration) -> Option<uuid::Uuid> {
    let run = (lease.job_id, w.held().get(&lease).map_or(0, |r| r.attempt));
    if let Some(held) = w.held().get_mut(&lease) {
        held.finishing = true;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut unsure = false;
    let parked = loop {
        match w.queue.wait_for_callback(lease, timeout).await {
            Ok(callback) => {
                w.ledger.count("parked");
                break Some(callback);
            }
            Err(QueueError::LeaseLost { .. }) if unsure => {
                w.ledger.count("ambiguous_park");
                w.ledger.books().unanswered.insert(run);
                break None;
            }
            Err(QueueError::LeaseLost { .. }) => {
                w.ledger
                    .unexpected(format!("park of {run:?} refused: lease lost"));
                break None;
            }
            Err(e) if Instant::now() < deadline => {
                unsure = true;
                w.ledger.error("park", e);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => {
                w.ledger
                    .unexpected(format!("could not park {run:?} within 60 s: {e}"));
                break None;
            }
        }
    };
    w.held().remove(&lease);
    parked
}

async fn remote_party(
    w: Arc<WorkerShared>,
    job_id: i64,
    run: Run,
    callback: uuid::Uuid,
    resolution: Resolution,
) {
    tokio::select! {
        _ = w.remotes.cancelled() => return,
        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
    }
    let completes = resolution == Resolution::Complete;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut unsure = false;
    loop {
        match w.queue.resolve_callback(callback, resolution.clone()).await {
            Ok(_) => {
                if completes {
                    *w.ledger.books().completions.entry(job_id).or_default() += 1;
                }
                w.ledger.count("callbacks_resolved");
            }
            Err(QueueError::CallbackNotPending(_)) if unsure => w.ledger.count("ambiguous_resolve"),
            Err(QueueError::CallbackNotPending(_)) => w
                .ledger
                .unexpected(format!("callback of {run:?} was no longer pending")),
            Err(e) if Instant::now() < deadline => {
                unsure = true;
                w.ledger.error("resolve", e);
                tokio::select! {
                    _ = w.remotes.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
                continue;
            }
            Err(e) => w
                .ledger
                .unexpected(format!("could not resolve {run:?} within 60 s: {e}")),
        }
        break;
    }
}

/// Completes or fails the run, retrying through database errors (an outage) for up to 60 s.
async fn finish(w: &WorkerShared, lease: Lease, attempt: i32, behaviour: Behaviour, how: Finish) {
    if let Some(held) = w.held().get_mut(&lease) {
        held.finishing = true;
    }
    let run = (lease.job_id, attempt);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut unsure = false;
    loop {
        let result = match how {
            Finish::Complete => w.queue.complete(lease).await.map(|()| None),
            Finish::Fail(error) => w.queue.fail(lease, error).await.map(Some),
        };
        match result {
            Ok(None) => {
                *w.ledger
                    .books()
                    .completions
                    .entry(lease.job_id)
                    .or_default() += 1;
                w.ledger.count("completed");
            }
            Ok(Some(FailOutcome::Failed)) => {
                w.ledger.books().final_failures.insert(lease.job_id);
                w.ledger.count("failed_final");
            }
            Ok(Some(FailOutcome::Retrying { .. })) => w.ledger.count("failed_retrying"),
            // The earlier attempt may have gone through, its answer lost.
            Err(QueueError::LeaseLost { .. }) if unsure => w.ledger.count("ambiguous_finish"),
            Err(QueueError::LeaseLost { .. }) if behaviour.may_lose(attempt) => {
                w.ledger.count("late_finish_refused")
            }
            Err(QueueError::LeaseLost { .. }) => w.ledger.unexpected(format!(
                "worker {} could not finish run {run:?} ({}): lease lost",
                w.id,
                behaviour.name()
            )),
            Err(e) if Instant::now() < deadline => {
                unsure = true;
                w.ledger.error("finish", e);
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(e) => w
                .ledger
                .unexpected(format!("could not finish {run:?} within 60 s: {e}")),
        }
        break;
    }
    w.held().remove(&lease);
}

// ---------------------------------------------------------------------------------------------
// Database setup, audits and checks
// ---------------------------------------------------------------------------------------------

/// Records every transition of every job (insert, state change, new run, new error entry, and
/// any other write to a job that is not running, such as a second promotion of an available
/// job) with the session's application_name. Rolled back with the transaction that made it,
/// so it shows exactly the committed history; `seq` orders the writes of one job, which its row
/// lock serializes.
pub const TRANSITIONS_AUDIT: &str = "
CREATE TABLE chaos_transitions (
    seq        bigserial   PRIMARY KEY,
    job_id     bigint      NOT NULL,
    old_state  text,
    new_state  text        NOT NULL,
    attempt    integer     NOT NULL,
    run_lease  bigint      NOT NULL,
    run_at     timestamptz NOT NULL,
    app        text        NOT NULL,
    at         timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX ON chaos_transitions (job_id, seq);
CREATE FUNCTION chaos_log_transition() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO chaos_transitions (job_id, old_state, new_state, attempt, run_lease, run_at, app)
        VALUES (NEW.id, NULL, NEW.state::text, NEW.attempt, NEW.run_lease, NEW.run_at,
                current_setting('application_name'));
    ELSIF OLD.state IS DISTINCT FROM NEW.state
       OR OLD.run_lease IS DISTINCT FROM NEW.run_lease
       OR OLD.errors IS DISTINCT FROM NEW.errors
       OR (NEW.state <> 'running' AND OLD.priority = NEW.priority) THEN
        INSERT INTO chaos_transitions (job_id, old_state, new_state, attempt, run_lease, run_at, app)
        VALUES (NEW.id, OLD.state::text, NEW.state::text, NEW.attempt, NEW.run_lease, NEW.run_at,
                current_setting('application_name'));
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER chaos_transitions AFTER INSERT OR UPDATE ON jobs
    FOR EACH ROW EXECUTE FUNCTION chaos_log_transition();";

/// Commit-time records (deferred constraint triggers run inside COMMIT, and vanish with a
/// transaction that does not commit): `chaos_commits` gets one row per committed transaction of
/// a Steward session (application_name `steward:<instance>:<role>`) that wrote any of Steward's
/// tables, and `chaos_terms` one row per new epoch with a snapshot taken inside the committing
/// START_TERM transaction. A transaction of the old term absent from that snapshot's committed
/// set committed after the new term was already committing.
pub const COMMITS_AUDIT: &str = "
CREATE TABLE chaos_commits (
    xid  xid8        PRIMARY KEY,
    app  text        NOT NULL,
    tbl  text        NOT NULL,
    at   timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE FUNCTION chaos_note_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('application_name') LIKE 'steward:%' THEN
        INSERT INTO chaos_commits (xid, app, tbl)
        VALUES (pg_current_xact_id(), current_setting('application_name'), TG_TABLE_NAME)
        ON CONFLICT (xid) DO NOTHING;
    END IF;
    RETURN NULL;
END $$;
CREATE TABLE chaos_terms (
    epoch    bigint      PRIMARY KEY,
    app      text        NOT NULL,
    snap     pg_snapshot NOT NULL,
    at       timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE FUNCTION chaos_note_term() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.epoch IS DISTINCT FROM OLD.epoch THEN
        INSERT INTO chaos_terms (epoch, app, snap)
        VALUES (NEW.epoch, current_setting('application_name'), pg_current_snapshot());
    END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER chaos_term AFTER UPDATE ON leader
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION chaos_note_term();";

/// The tables Steward writes, each watched by `chaos_note_commit`.
pub const STEWARD_TABLES: [&str; 10] = [
    "jobs",
    "leader",
    "leader_terms",
    "branch_health",
    "cron_fires",
    "cron_schedules",
    "queue_counts",
    "dirty_queues",
    "queue_stats",
    "job_archive",
];

pub async fn install_transitions_audit(client: &Client) {
    client
        .batch_execute(TRANSITIONS_AUDIT)
        .await
        .expect("installing the transitions audit");
}

pub async fn install_commits_audit(client: &Client) {
    client
        .batch_execute(COMMITS_AUDIT)
        .await
        .expect("installing the commits audit");
    for table in STEWARD_TABLES {
        // job_archive is partitioned: row triggers there are inherited by the partitions.
        client
            .batch_execute(&format!(
                "CREATE CONSTRAINT TRIGGER chaos_commit AFTER INSERT OR UPDATE OR DELETE ON {table}
                 DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION chaos_note_commit()"
            ))
            .await
            .unwrap_or_else(|e| panic!("commit trigger on {table}: {e}"));
    }
}

/// A table-managed cron schedule firing every second into the chaos queue.
pub async fn add_cron_schedule(client: &Client) {
    client
        .execute(
            "INSERT INTO cron_schedules (name, expression, queue, kind, max_attempts, source)
             VALUES ($1, '* * * * * *', $2, $3, $4, 'table')",
            &[&CRON_SCHEDULE, &QUEUE, &CRON_KIND, &MAX_ATTEMPTS],
        )
        .await
        .expect("adding the cron schedule");
}

pub async fn disable_cron(client: &Client) {
    client
        .execute(
            "UPDATE cron_schedules SET enabled = false WHERE name = $1",
            &[&CRON_SCHEDULE],
        )
        .await
        .expect("disabling the cron schedule");
}

/// Waits until every job of the chaos queue is finished and stays so for 2 s (cron fires
/// enqueued ahead, pending cancellations), or panics after `within` with the states left.
pub async fn drain(client: &Client, within: Duration) -> Duration {
    let started = Instant::now();
    let mut quiet_since: Option<Instant> = None;
    loop {
        let rows = client
            .query(
                "SELECT state::text, count(*) FROM jobs
                 WHERE queue = $1 AND state NOT IN ('completed', 'failed', 'cancelled')
                 GROUP BY 1 ORDER BY 1",
                &[&QUEUE],
            )
            .await
            .expect("counting unfinished jobs");
        if rows.is_empty() {
            let since = *quiet_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= Duration::from_secs(2) {
                return started.elapsed();
            }
        } else {
            quiet_since = None;
            if started.elapsed() > within {
                let left: Vec<String> = rows
                    .iter()
                    .map(|r| format!("{} {}", r.get::<_, i64>(1), r.get::<_, String>(0)))
                    .collect();
                let detail = client
                    .query(
                        "SELECT id, state::text, attempt, args::text, errors::text, run_at::text
                         FROM jobs WHERE queue = $1
                           AND state NOT IN ('completed', 'failed', 'cancelled')
                         ORDER BY id LIMIT 10",
                        &[&QUEUE],
                    )
                    .await
                    .map(|rows| {
                        rows.iter()
                            .map(|r| {
                                format!(
                                    "  job {} {} attempt {} args {} errors {} run_at {}",
                                    r.get::<_, i64>(0),
                                    r.get::<_, String>(1),
                                    r.get::<_, i32>(2),
                                    r.get::<_, String>(3),
                                    r.get::<_, String>(4),
                                    r.get::<_, String>(5)
                                )
                            })
                            .collect::<Vec<_>>()
                            .join("\n")
                    })
                    .unwrap_or_default();
                panic!(
                    "jobs did not drain within {within:?}: {} left unfinished\n{detail}",
                    left.join(", ")
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// What [`verify`] found, for the scenario's report.
#[derive(Debug, Default)]
pub struct Verified {
    pub jobs: usize,
    pub states: BTreeMap<String, usize>,
    /// Error entries per reason (`error`, `heartbeat_stale`, `deadline_expired`, ...).
    pub entries: BTreeMap<String, usize>,
    /// Rescues of runs no worker ever received (claimed as the connection died).
    pub orphan_rescues: usize,
    pub promotions: usize,
    pub transitions: usize,
    pub cron_fires: usize,
    pub archived: usize,
}

impl Verified {
    pub fn rescues(&self) -> BTreeMap<String, usize> {
        self.entries
            .iter()
            .filter(|(reason, _)| {
                ["heartbeat_stale", "deadline_expired", "callback_timeout"]
                    .contains(&reason.as_str())
            })
            .map(|(r, n)| (r.clone(), *n))
            .collect()
    }
}

impl std::fmt::Display for Verified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} jobs checked ({} archived) {:?}; {} audited transitions, {} promotions; rescues {:?} ({} of runs no worker received); other error entries {:?}; {} cron fires",
            self.jobs,
            self.archived,
            self.states,
            self.transitions,
            self.promotions,
            self.rescues(),
            self.orphan_rescues,
            self.entries
                .iter()
                .filter(|(r, _)| !self.rescues().contains_key(*r))
                .collect::<BTreeMap<_, _>>(),
            self.cron_fires
        )
    }
}

struct JobRow {
    id: i64,
    kind: String,
    state: String,
    attempt: i32,
    max_attempts: i32,
    args: serde_json::Value,
    errors: serde_json::Value,
}

/// One audited transition: (old state, new state, attempt, run lease).
type Step = (Option<String>, String, i32, i64);

/// Allowed state changes of one job (`None`: the insert).
fn allowed(old: Option<&str>, new: &str) -> bool {
    matches!(
        (old, new),
        (None, "scheduled" | "available")
            | (Some("scheduled" | "retryable"), "available" | "cancelled")
            | (Some("available"), "running" | "cancelled")
            | (
                Some("running"),
                "completed" | "retryable" | "failed" | "waiting_external" | "cancelled"
            )
            | (
                Some("waiting_external"),
                "completed" | "retryable" | "failed" | "cancelled"
            )
    )
}

fn terminal(state: &str) -> bool {
    matches!(state, "completed" | "failed" | "cancelled")
}

/// Every job of the chaos queue (in `jobs` or archived) against the audit and the workload's
/// books. Panics listing the first problems. Checks:
/// - every job is finished; no job id appears twice (jobs and archive together);
/// - every acknowledged enqueue exists exactly once, and every job was enqueued (or is a fire);
/// - its audited history is a valid path (insert, promotions, claims, finishes) ending in its
///   one and only terminal transition: no double promotion, claim, rescue or retry;
/// - its error entries are one per failed attempt: completed = attempts 1..n-1,
///   failed = 1..n with n = max_attempts, cancelled = a subset of 1..n;
/// - each rescue is justified: `heartbeat_stale` only for a run whose worker crashed (or that
///   no worker received), `deadline_expired` for a run that overran its timeout (or whose
///   worker crashed), `callback_timeout` for a callback left unanswered (or whose worker
///   crashed while parking it);
/// - an acknowledged completion is never lost or doubled, an acknowledged final failure holds;
/// - no live worker lost a run it had no reason to lose;
/// - each cron fire made exactly one job, due at the fire time, and fires are one second apart.
pub async fn verify(client: &Client, ledger: &Ledger) -> Verified {
    let mut problems: Vec<String> = Vec::new();
    let mut out = Verified::default();
    let rows = client
        .query(
            "SELECT id, kind, state::text, attempt, max_attempts, args, errors, false
             FROM jobs WHERE queue = $1
             UNION ALL
             SELECT id, kind, state::text, attempt, max_attempts, args, errors, true
             FROM job_archive WHERE queue = $1",
            &[&QUEUE],
        )
        .await
        .expect("reading the jobs");
    let mut jobs: BTreeMap<i64, JobRow> = BTreeMap::new();
    for row in &rows {
        let job = JobRow {
            id: row.get(0),
            kind: row.get(1),
            state: row.get(2),
            attempt: row.get(3),
            max_attempts: row.get(4),
            args: row.get(5),
            errors: row.get(6),
        };
        if row.get::<_, bool>(7) {
            out.archived += 1;
        }
        if jobs.insert(job.id, job).is_some() {
            problems.push(format!(
                "job {} appears twice (jobs and archive, or archived twice)",
                row.get::<_, i64>(0)
            ));
        }
    }
    out.jobs = jobs.len();

    let transitions = client
        .query(
            "SELECT job_id, old_state, new_state, attempt, run_lease, run_at
             FROM chaos_transitions ORDER BY job_id, seq",
            &[],
        )
        .await
        .expect("reading the transitions audit");
    let fires = client
        .query(
            "SELECT fire_at, job_id FROM cron_fires WHERE schedule_name = $1 ORDER BY fire_at",
            &[&CRON_SCHEDULE],
        )
        .await
        .expect("reading cron fires");
    // Read after the queries: the lock is not held across an await.
    let books = ledger.books();
    // Enqueues: nothing lost, nothing made up, nothing doubled.
    let mut tokens: HashMap<u64, i64> = HashMap::new();
    for job in jobs.values().filter(|j| j.kind == KIND) {
        match job.args.get("t").and_then(|t| t.as_u64()) {
            Some(token) => {
                if let Some(other) = tokens.insert(token, job.id) {
                    problems.push(format!(
                        "enqueue token {token} became two jobs: {other} and {}",
                        job.id
                    ));
                }
                if !books.acked.contains(&token) && !books.unacked.contains(&token) {
                    problems.push(format!("job {} has token {token} nobody enqueued", job.id));
                }
            }
            None => problems.push(format!("job {} has no token", job.id)),
        }
    }
    let missing: Vec<&u64> = books
        .acked
        .iter()
        .filter(|t| !tokens.contains_key(t))
        .collect();
    if !missing.is_empty() {
        problems.push(format!(
            "{} acknowledged enqueues have no job, e.g. tokens {:?}",
            missing.len(),
            missing.iter().take(5).collect::<Vec<_>>()
        ));
    }

    // Audited histories.
    out.transitions = transitions.len();
    let mut history: BTreeMap<i64, Vec<Step>> = BTreeMap::new();
    // Each job's due time as enqueued (retries move run_at).
    let mut enqueued_due: HashMap<i64, chrono::DateTime<chrono::Utc>> = HashMap::new();
    for t in &transitions {
        if t.get::<_, Option<String>>(1).is_none() {
            enqueued_due.insert(t.get(0), t.get(5));
        }
        history
            .entry(t.get(0))
            .or_default()
            .push((t.get(1), t.get(2), t.get(3), t.get(4)));
    }

    for job in jobs.values() {
        let id = job.id;
        *out.states.entry(job.state.clone()).or_default() += 1;
        if !terminal(&job.state) {
            problems.push(format!("job {id} is still {}", job.state));
        }
        // History.
        let steps = history.get(&id).map(Vec::as_slice).unwrap_or_default();
        if steps.is_empty() {
            problems.push(format!("job {id} has no audited history"));
        }
        let mut previous: Option<&Step> = None;
        let mut terminals = 0;
        for step in steps {
            let (old, new, attempt, lease) = step;
            if !allowed(old.as_deref(), new) {
                problems.push(format!(
                    "job {id}: forbidden transition {old:?} -> {new} (attempt {attempt}); history {steps:?}"
                ));
            }
            if let Some(prev) = previous {
                if old.as_deref() != Some(prev.1.as_str()) {
                    problems.push(format!(
                        "job {id}: transition from {old:?} after reaching {}; history {steps:?}",
                        prev.1
                    ));
                }
                if new == "running" && (*attempt != prev.2 + 1 || *lease <= prev.3) {
                    problems.push(format!(
                        "job {id}: claim to attempt {attempt} lease {lease} after attempt {} lease {}",
                        prev.2, prev.3
                    ));
                }
            }
            if matches!(old.as_deref(), Some("scheduled" | "retryable")) && new == "available" {
                out.promotions += 1;
            }
            if terminal(new) {
                terminals += 1;
            }
            previous = Some(step);
        }
        if terminals != 1 || previous.is_some_and(|p| p.1 != job.state) {
            problems.push(format!(
                "job {id} ({}): {terminals} terminal transitions; history {steps:?}",
                job.state
            ));
        }

        // Error entries: one per failed attempt.
        let entries = job.errors.as_array().cloned().unwrap_or_default();
        let mut attempts: Vec<i32> = Vec::new();
        for entry in &entries {
            let attempt = entry["attempt"].as_i64().unwrap_or(-1) as i32;
            let reason = entry["reason"].as_str().unwrap_or("?").to_owned();
            attempts.push(attempt);
            let run = (id, attempt);
            let justified = match reason.as_str() {
                "heartbeat_stale" => {
                    books.abandoned.contains(&run) || !books.claimed.contains(&run)
                }
                "deadline_expired" => {
                    books.overran.contains(&run)
                        || books.abandoned.contains(&run)
                        || !books.claimed.contains(&run)
                }
                // A worker that crashed while parking never passed the callback on.
                "callback_timeout" => {
                    books.unanswered.contains(&run)
                        || books.abandoned.contains(&run)
                        || !books.claimed.contains(&run)
                }
                _ => true,
            };
            if !justified {
                problems.push(format!(
                    "job {id}: {reason} rescue of run {run:?}, which a live worker held ({})",
                    job.args
                ));
            }
            if reason != "error"
                && reason != "callback_failed"
                && job.kind == KIND
                && !books.claimed.contains(&run)
            {
                out.orphan_rescues += 1;
            }
            *out.entries.entry(reason).or_default() += 1;
        }
        let mut distinct = attempts.clone();
        distinct.sort_unstable();
        distinct.dedup();
        if distinct.len() != attempts.len() {
            problems.push(format!(
                "job {id}: two error entries for one attempt: {attempts:?}"
            ));
        }
        let upto = |n: i32| (1..=n).collect::<Vec<i32>>();
        let consistent = match job.state.as_str() {
            "completed" => distinct == upto(job.attempt - 1),
            "failed" => distinct == upto(job.attempt) && job.attempt == job.max_attempts,
            "cancelled" => distinct.iter().all(|a| (1..=job.attempt).contains(a)),
            _ => true,
        };
        if !consistent {
            problems.push(format!(
                "job {id} {} at attempt {} of {} has error entries for attempts {attempts:?}",
                job.state, job.attempt, job.max_attempts
            ));
        }
    }

    // The workers' acknowledgements.
    for (id, n) in &books.completions {
        let state = jobs.get(id).map(|j| j.state.as_str());
        if *n != 1 || state != Some("completed") {
            problems.push(format!(
                "job {id}: {n} acknowledged completions, state {state:?}"
            ));
        }
    }
    for id in &books.final_failures {
        let state = jobs.get(id).map(|j| j.state.as_str());
        if state != Some("failed") {
            problems.push(format!("job {id}: acknowledged as failed, state {state:?}"));
        }
    }
    for what in &books.unexpected {
        problems.push(what.clone());
    }

    // Cron: one job per fire, due at the fire, fires one second apart.
    out.cron_fires = fires.len();
    let cron_jobs: HashMap<i64, &JobRow> = jobs
        .values()
        .filter(|j| j.kind == CRON_KIND)
        .map(|j| (j.id, j))
        .collect();
    if cron_jobs.len() != fires.len() {
        problems.push(format!(
            "{} cron fires but {} cron jobs",
            fires.len(),
            cron_jobs.len()
        ));
    }
    let mut last: Option<chrono::DateTime<chrono::Utc>> = None;
    for fire in &fires {
        let (at, job_id): (chrono::DateTime<chrono::Utc>, i64) = (fire.get(0), fire.get(1));
        match cron_jobs.get(&job_id) {
            Some(_) if enqueued_due.get(&job_id) == Some(&at) => {}
            Some(_) => problems.push(format!(
                "cron fire {at} made job {job_id} due at {:?}",
                enqueued_due.get(&job_id)
            )),
            None => problems.push(format!("cron fire {at}: job {job_id} is missing")),
        }
        if let Some(last) = last {
            if at - last != chrono::Duration::seconds(1) {
                problems.push(format!(
                    "cron fires {last} and {at} are not one second apart"
                ));
            }
        }
        last = Some(at);
    }

    if !problems.is_empty() {
        let total = problems.len();
        problems.truncate(25);
        panic!(
            "{total} problems found ({out}); workload counts {:?}:\n  {}",
            books.counts,
            problems.join("\n  ")
        );
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Logs, metrics, processes
// ---------------------------------------------------------------------------------------------

pub fn epoch(line: &LogLine) -> Option<i64> {
    line.field("epoch").and_then(|v| v.as_i64())
}

/// The first line with this message written at or after `after` that `matches`.
pub fn find_after(
    s: &Steward,
    message: &str,
    after: SystemTime,
    matches: impl Fn(&LogLine) -> bool,
) -> Option<LogLine> {
    s.logs()
        .into_iter()
        .find(|l| l.message() == message && l.at >= after && matches(l))
}

/// Polls `probe` until it returns something, or panics after `within` with `what` and `context`.
pub fn wait_until<T>(
    what: &str,
    within: Duration,
    mut probe: impl FnMut() -> Option<T>,
    context: impl Fn() -> String,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(found) = probe() {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {within:?}\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn outputs(stewards: &[(&str, &Steward)]) -> String {
    stewards
        .iter()
        .map(|(name, s)| format!("--- {name} ---\n{}", tail(&s.raw_output(), 60)))
        .collect::<Vec<_>>()
        .join("\n")
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The first SLO branch pass of a term (the end of a takeover).
pub fn slo_first_pass(s: &Steward, epoch_: i64) -> Option<LogLine> {
    s.logs().into_iter().find(|l| {
        l.message() == FIRST_PASS
            && l.field("loop_kind").and_then(|v| v.as_str()) == Some("slo")
            && epoch(l) == Some(epoch_)
    })
}

pub fn millis(from: SystemTime, to: SystemTime) -> u128 {
    to.duration_since(from).unwrap_or_default().as_millis()
}

/// Sum of every sample of a counter in the process's /metrics.
pub fn metric_sum(s: &Steward, name: &str) -> f64 {
    let (status, body) = s.get("/metrics");
    assert_eq!(status, 200, "/metrics answered {status}");
    body.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// This process's /leader view: (is leader, instance).
pub fn leader_view(s: &Steward) -> (bool, String) {
    let (status, body) = s.get("/leader");
    assert_eq!(status, 200, "/leader answered {status}: {body}");
    let json: serde_json::Value = serde_json::from_str(&body).expect("/leader JSON");
    (
        json["leader"].as_bool().unwrap_or(false),
        json["instance"].as_str().unwrap_or_default().to_owned(),
    )
}

/// Resident set size of a process, KiB (VmRSS).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Steward sessions connected to the current database.
pub async fn steward_sessions(client: &Client) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name LIKE 'steward:%'",
            &[],
        )
        .await
        .expect("counting sessions")
        .get(0)
}

pub fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

// ---------------------------------------------------------------------------------------------
// Network faults
// ---------------------------------------------------------------------------------------------

/// The server address of a `postgres://user@host:port/db` URL.
pub fn server_addr(url: &str) -> SocketAddr {
    let config: tokio_postgres::Config = url.parse().expect("a database URL");
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        other => panic!("the chaos proxy needs a TCP server address, not {other:?}"),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    use std::net::ToSocketAddrs;
    (host.as_str(), port)
        .to_socket_addrs()
        .expect("resolving the server")
        .find(|a| a.is_ipv4())
        .expect("an IPv4 server address")
}

/// The URL with its host and port replaced by `addr`.
pub fn url_via(url: &str, addr: SocketAddr) -> String {
    let scheme_end = url.find("://").map(|i| i + 3).expect("a postgres:// URL");
    let rest = &url[scheme_end..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let userinfo = authority.rsplit_once('@').map(|(u, _)| format!("{u}@"));
    format!(
        "{}{}{}{}",
        &url[..scheme_end],
        userinfo.unwrap_or_default(),
        addr,
        &rest[authority_end..]
    )
}

/// A TCP proxy that forwards until [`BlackHoleProxy::black_hole`], then forwards nothing in
/// either direction and closes nothing, like a network path that silently drops every
/// packet. New connections are accepted and then ignored. Everything closes when dropped.
pub struct BlackHoleProxy {
    addr: SocketAddr,
    cut: CancellationToken,
    shutdown: CancellationToken,
    upstream: Arc<Mutex<Vec<SocketAddr>>>,
    connections: Arc<AtomicU64>,
}

impl BlackHoleProxy {
    pub async fn start(server: SocketAddr) -> BlackHoleProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the proxy");
        let addr = listener.local_addr().unwrap();
        let cut = CancellationToken::new();
        let shutdown = CancellationToken::new();
        let upstream = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicU64::new(0));
        tokio::spawn({
            let (cut, shutdown, upstream, connections) = (
                cut.clone(),
                shutdown.clone(),
                upstream.clone(),
                connections.clone(),
            );
            async move {
                loop {
                    let accepted = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        accepted = listener.accept() => accepted,
                    };
                    let Ok((down, _)) = accepted else { continue };
                    let (cut, shutdown, upstream) =
                        (cut.clone(), shutdown.clone(), upstream.clone());
                    connections.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(async move {
                        if cut.is_cancelled() {
                            // Accepted, never answered.
                            shutdown.cancelled().await;
                            drop(down);
                            return;
                        }
                        let Ok(up) = tokio::net::TcpStream::connect(server).await else {
                            return;
                        };
                        let _ = up.set_nodelay(true);
                        let _ = down.set_nodelay(true);
                        if let Ok(local) = up.local_addr() {
                            upstream.lock().unwrap().push(local);
                        }
                        let (down_read, down_write) = down.into_split();
                        let (up_read, up_write) = up.into_split();
                        tokio::join!(
                            pump(down_read, up_write, cut.clone(), shutdown.clone()),
                            pump(up_read, down_write, cut, shutdown),
                        );
                    });
                }
            }
        });
        BlackHoleProxy {
            addr,
            cut,
            shutdown,
            upstream,
            connections,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn black_hole(&self) {
        self.cut.cancel();
    }

    /// Local addresses of the proxy's connections to the server.
    pub fn upstream_addrs(&self) -> Vec<SocketAddr> {
        self.upstream.lock().unwrap().clone()
    }

    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }
}

impl Drop for BlackHoleProxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    cut: CancellationToken,
    shutdown: CancellationToken,
) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let read = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = cut.cancelled() => break,
            read = from.read(&mut buf) => read,
        };
        match read {
            Ok(n) if n > 0 && !cut.is_cancelled() => {
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            Ok(0) if !cut.is_cancelled() => {
                // An orderly close before the cut goes through.
                let _ = to.shutdown().await;
                return;
            }
            _ => break,
        }
    }
    // Black-holed: keep both sockets open and silent until the proxy goes.
    shutdown.cancelled().await;
    drop((from, to));
}

/// Firewall rules (iptables) that drop every packet of some connections between this host and
/// the server, so that the server's TCP keepalive probes go unanswered as on a real network
/// partition. A user-space proxy alone cannot do that: its kernel still acknowledges them.
/// Rules are tagged with this process's id and removed on drop; stale ones of dead processes
/// are removed by [`KernelBlackHole::available`].
pub struct KernelBlackHole {
    rules: Vec<Vec<String>>,
}

impl KernelBlackHole {
    fn tag() -> String {
        format!("steward-chaos-{}", std::process::id())
    }

    /// True when iptables can be used (root with CAP_NET_ADMIN).
    pub fn available() -> bool {
        let works = |chain: &str| {
            std::process::Command::new("iptables")
                .args(["-w", "-S", chain])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        };
        let (Some(output), Some(input)) = (works("OUTPUT"), works("INPUT")) else {
            return false;
        };
        // Rules left behind by a chaos run that was killed.
        for line in output.lines().chain(input.lines()) {
            let Some(pid) = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("steward-chaos-"))
            else {
                continue;
            };
            if std::path::Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            if let Some(spec) = line.strip_prefix("-A ") {
                let mut args = vec!["-w".to_owned(), "-D".to_owned()];
                args.extend(spec.split_whitespace().map(str::to_owned));
                let _ = std::process::Command::new("iptables").args(&args).status();
            }
        }
        // Can rules actually be added here?
        let probe = [
            "-w",
            "-I",
            "OUTPUT",
            "-p",
            "tcp",
            "--dport",
            "9",
            "-m",
            "comment",
            "--comment",
        ];
        let added = std::process::Command::new("iptables")
            .args(probe)
            .args([Self::tag().as_str(), "-j", "DROP"])
            .status()
            .is_ok_and(|s| s.success());
        if added {
            let _ = std::process::Command::new("iptables")
                .args([
                    "-w",
                    "-D",
                    "OUTPUT",
                    "-p",
                    "tcp",
                    "--dport",
                    "9",
                    "-m",
                    "comment",
                    "--comment",
                ])
                .args([Self::tag().as_str(), "-j", "DROP"])
                .status();
        }
        added
    }

    /// Drops both directions of each connection between a local address in `locals` and the
    /// server.
    pub fn drop_connections(server: SocketAddr, locals: &[SocketAddr]) -> KernelBlackHole {
        let tag = Self::tag();
        let mut rules = Vec::new();
        for local in locals {
            let (lip, lport) = (local.ip().to_string(), local.port().to_string());
            let (sip, sport) = (server.ip().to_string(), server.port().to_string());
            let spec = |chain: &str, src: (&str, &str), dst: (&str, &str)| -> Vec<String> {
                [
                    chain,
                    "-p",
                    "tcp",
                    "-s",
                    src.0,
                    "--sport",
                    src.1,
                    "-d",
                    dst.0,
                    "--dport",
                    dst.1,
                    "-m",
                    "comment",
                    "--comment",
                    &tag,
                    "-j",
                    "DROP",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect()
            };
            // Packets this host sends to the server (data, ACKs, keepalive answers) ...
            rules.push(spec("OUTPUT", (&lip, &lport), (&sip, &sport)));
            // ... and packets the server sends to this host (its keepalive probes).
            rules.push(spec("INPUT", (&sip, &sport), (&lip, &lport)));
        }
        for rule in &rules {
            let status = std::process::Command::new("iptables")
                .args(["-w", "-I"])
                .args(rule)
                .status()
                .expect("running iptables");
            assert!(status.success(), "iptables -I {rule:?} failed");
        }
        KernelBlackHole { rules }
    }
}

impl Drop for KernelBlackHole {
    fn drop(&mut self) {
        for rule in &self.rules {
            let _ = std::process::Command::new("iptables")
                .args(["-w", "-D"])
                .args(rule)
                .status();
        }
    }
}
