//! The synthetic workload: a producer enqueuing scheduled jobs at a steady rate, and four
//! workers that claim, heartbeat and finish them, some of them badly, so that every rescue
//! branch has something to do.
//!
//! A job's behaviour is written in its args (`{"behave": "..."}`); see [`Behaviour`].

use serde_json::json;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use steward_queue::{ClaimedJob, FailOutcome, Lease, NewJob, Queue, QueueError, Resolution};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

pub const QUEUE: &str = "default";
pub const KIND: &str = "demo.work";
/// Small, so that jobs that keep misbehaving end up `failed`.
pub const MAX_ATTEMPTS: i32 = 3;
const WORKERS: u64 = 4;
/// Jobs one worker runs at once (claimed and not yet finished, parked or dropped).
const MAX_IN_FLIGHT: usize = 200;
const CLAIM_BATCH: i64 = 50;
/// How long a worker waits before claiming again when the queue was empty.
const CLAIM_POLL: Duration = Duration::from_millis(10);
const PRODUCE_EVERY: Duration = Duration::from_millis(100);
/// Jobs are due up to this far ahead of their enqueue.
const MAX_DELAY_MS: u64 = 3_000;
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
const OVERRUN_TIMEOUT: Duration = Duration::from_millis(500);
const OVERRUN_TAKES: Duration = Duration::from_secs(2);
const CALLBACK_TIMEOUT: Duration = Duration::from_secs(1);
const REMOTE_ANSWERS_AFTER: Duration = Duration::from_millis(200);

/// What a job does when a worker runs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Behaviour {
    /// Works 20-200 ms and completes.
    Normal,
    /// First attempt: the worker "crashes" (drops the job: no heartbeat, no finish), so
    /// `rescue_stale_heartbeats` must take it back. Later attempts are normal.
    Crash,
    /// Every attempt: enqueued with a 500 ms run timeout, works 2 s while heartbeating, so
    /// `rescue_expired_deadlines` takes it back and the late completion is refused. After
    /// [`MAX_ATTEMPTS`] it is `failed`.
    Overrun,
    /// First attempt: parks for a callback (1 s timeout) that never comes, so
    /// `rescue_expired_callbacks` takes it back. Later attempts are normal.
    Unanswered,
    /// Parks for a callback that a remote party answers after 200 ms.
    Answered,
    /// First attempt: fails with an error, so the job retries with backoff.
    Flaky,
}

impl Behaviour {
    /// Every behaviour but `Normal`, with its share of the jobs in percent.
    pub const MISBEHAVING: [(Behaviour, u64); 5] = [
        (Behaviour::Crash, 3),
        (Behaviour::Overrun, 3),
        (Behaviour::Unanswered, 3),
        (Behaviour::Answered, 3),
        (Behaviour::Flaky, 5),
    ];

    pub fn name(self) -> &'static str {
        match self {
            Behaviour::Normal => "normal",
            Behaviour::Crash => "crash",
            Behaviour::Overrun => "overrun",
            Behaviour::Unanswered => "unanswered_callback",
            Behaviour::Answered => "answered_callback",
            Behaviour::Flaky => "flaky",
        }
    }

    fn of(job: &ClaimedJob) -> Behaviour {
        let name = job.args.get("behave").and_then(|v| v.as_str());
        Self::MISBEHAVING
            .iter()
            .map(|(b, _)| *b)
            .find(|b| Some(b.name()) == name)
            .unwrap_or(Behaviour::Normal)
    }

    fn pick(rng: &mut Rng) -> Behaviour {
        let mut roll = rng.below(100);
        for (behaviour, share) in Self::MISBEHAVING {
            if roll < share {
                return behaviour;
            }
            roll -= share;
        }
        Behaviour::Normal
    }
}

/// A job of the given behaviour, due 0-3 s from now.
pub fn new_job(behaviour: Behaviour, rng: &mut Rng) -> NewJob {
    let job = NewJob::new(KIND)
        .args(json!({ "behave": behaviour.name() }))
        .max_attempts(MAX_ATTEMPTS)
        .run_in(Duration::from_millis(rng.below(MAX_DELAY_MS + 1)));
    if behaviour == Behaviour::Overrun {
        job.run_timeout(OVERRUN_TIMEOUT)
    } else {
        job
    }
}

/// Counters the workload keeps; read at any time with [`Stats::snapshot`].
#[derive(Default)]
pub struct Stats {
    enqueued: AtomicU64,
    claimed: AtomicU64,
    completed: AtomicU64,
    failed_retrying: AtomicU64,
    failed_final: AtomicU64,
    crashed: AtomicU64,
    overran: AtomicU64,
    parked_unanswered: AtomicU64,
    answered: AtomicU64,
    answered_too_late: AtomicU64,
    late_completions_refused: AtomicU64,
    other_lease_lost: AtomicU64,
    heartbeats_refused: AtomicU64,
    errors: AtomicU64,
    last_error: Mutex<Option<String>>,
}

#[derive(Debug, Clone, Default)]
pub struct StatsSnapshot {
    pub enqueued: u64,
    pub claimed: u64,
    pub completed: u64,
    /// `fail()` calls that left the job retryable.
    pub failed_retrying: u64,
    /// `fail()` calls that failed the job for good.
    pub failed_final: u64,
    pub crashed: u64,
    pub overran: u64,
    pub parked_unanswered: u64,
    pub answered: u64,
    pub answered_too_late: u64,
    /// Completions refused with `LeaseLost`: the run had been rescued meanwhile.
    pub late_completions_refused: u64,
    /// Fails and parks refused with `LeaseLost`.
    pub other_lease_lost: u64,
    pub heartbeats_refused: u64,
    /// Unexpected queue errors (database, pool, ...).
    pub errors: u64,
    pub last_error: Option<String>,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

fn read(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// A poisoned lock only means a task panicked mid-update; the data is still usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Stats {
    fn error(&self, what: &str, error: impl std::fmt::Display) {
        bump(&self.errors);
        *lock(&self.last_error) = Some(format!("{what}: {error}"));
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            enqueued: read(&self.enqueued),
            claimed: read(&self.claimed),
            completed: read(&self.completed),
            failed_retrying: read(&self.failed_retrying),
            failed_final: read(&self.failed_final),
            crashed: read(&self.crashed),
            overran: read(&self.overran),
            parked_unanswered: read(&self.parked_unanswered),
            answered: read(&self.answered),
            answered_too_late: read(&self.answered_too_late),
            late_completions_refused: read(&self.late_completions_refused),
            other_lease_lost: read(&self.other_lease_lost),
            heartbeats_refused: read(&self.heartbeats_refused),
            errors: read(&self.errors),
            last_error: lock(&self.last_error).clone(),
        }
    }
}

/// The running workload.
pub struct Workload {
    stop: CancellationToken,
    tasks: JoinSet<()>,
    stats: Arc<Stats>,
}

impl Workload {
    /// Starts the producer (`rate` jobs per second) and the workers.
    pub fn start(queue: &Queue, rate: f64) -> Workload {
        let stop = CancellationToken::new();
        let stats = Arc::new(Stats::default());
        let mut tasks = JoinSet::new();
        tasks.spawn(produce(queue.clone(), rate, stats.clone(), stop.clone()));
        for n in 0..WORKERS {
            tasks.spawn(work(n, queue.clone(), stats.clone(), stop.clone()));
        }
        Workload { stop, tasks, stats }
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// Stops producing and claiming. Jobs in flight are abandoned where they are (they stay
    /// `running` or `waiting_external` in the table), as when workers are shut down hard.
    pub async fn stop(mut self) -> StatsSnapshot {
        self.stop.cancel();
        let drained = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(done) = self.tasks.join_next().await {
                if let Err(e) = done {
                    self.stats.error("workload task", e);
                }
            }
        })
        .await;
        if drained.is_err() {
            self.stats
                .error("workload", "tasks did not stop within 10 s; aborted");
            self.tasks.shutdown().await;
        }
        self.stats.snapshot()
    }
}

async fn produce(queue: Queue, rate: f64, stats: Arc<Stats>, stop: CancellationToken) {
    let mut rng = Rng::new(u64::MAX);
    let started = Instant::now();
    let mut tick = tokio::time::interval(PRODUCE_EVERY);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut made: u64 = 0;
    // Ticks and misbehaving jobs made since the last check, per kind of misbehaviour.
    let mut ticks: u64 = 0;
    let mut seen = [0u64; Behaviour::MISBEHAVING.len()];
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        ticks += 1;
        // As many as the rate asks for by now: a slow enqueue is caught up on the next tick.
        let target = (rate * started.elapsed().as_secs_f64()) as u64;
        let count = target.saturating_sub(made).min(20_000);
        made = made.max(target);
        let mut batch: Vec<NewJob> = Vec::with_capacity(count as usize + seen.len());
        for _ in 0..count {
            let behaviour = Behaviour::pick(&mut rng);
            if let Some(i) = misbehaviour_index(behaviour) {
                seen[i] += 1;
            }
            batch.push(new_job(behaviour, &mut rng));
        }
        // At least one of each misbehaviour per second, so that even a low --rate exercises
        // every rescue.
        if ticks == 10 {
            ticks = 0;
            for (i, (behaviour, _)) in Behaviour::MISBEHAVING.iter().enumerate() {
                if seen[i] == 0 {
                    batch.push(new_job(*behaviour, &mut rng));
                }
            }
            seen = [0; Behaviour::MISBEHAVING.len()];
        }
        if batch.is_empty() {
            continue;
        }
        match queue.enqueue_batch(&batch).await {
            Ok(ids) => {
                stats
                    .enqueued
                    .fetch_add(ids.len() as u64, Ordering::Relaxed);
            }
            Err(e) => stats.error("enqueue", e),
        }
    }
}

fn misbehaviour_index(behaviour: Behaviour) -> Option<usize> {
    Behaviour::MISBEHAVING
        .iter()
        .position(|(b, _)| *b == behaviour)
}

/// Leases this worker heartbeats: its running jobs.
type Live = Arc<Mutex<HashSet<Lease>>>;

async fn work(n: u64, queue: Queue, stats: Arc<Stats>, stop: CancellationToken) {
    let live: Live = Arc::default();
    let beats = tokio::spawn(heartbeat(
        queue.clone(),
        live.clone(),
        stats.clone(),
        stop.clone(),
    ));
    let mut rng = Rng::new(n);
    let mut jobs = JoinSet::new();
    while !stop.is_cancelled() {
        while let Some(done) = jobs.try_join_next() {
            if let Err(e) = done {
                stats.error("job task", e);
            }
        }
        let room = MAX_IN_FLIGHT.saturating_sub(jobs.len());
        if room > 0 {
            match queue.claim(QUEUE, CLAIM_BATCH.min(room as i64)).await {
                Ok(claimed) => {
                    let full = claimed.len() as i64 == CLAIM_BATCH;
                    for job in claimed {
                        bump(&stats.claimed);
                        lock(&live).insert(job.lease);
                        jobs.spawn(run_job(
                            queue.clone(),
                            job,
                            live.clone(),
                            stats.clone(),
                            rng.next_u64(),
                        ));
                    }
                    if full {
                        continue;
                    }
                }
                Err(e) => stats.error("claim", e),
            }
        }
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(CLAIM_POLL) => {}
        }
    }
    jobs.shutdown().await;
    let _ = beats.await;
}

/// Heartbeats every live lease of one worker once a second, in one statement.
async fn heartbeat(queue: Queue, live: Live, stats: Arc<Stats>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let leases: Vec<Lease> = lock(&live).iter().copied().collect();
        if leases.is_empty() {
            continue;
        }
        match queue.heartbeat_many(&leases).await {
            Ok(lost) => {
                let mut live = lock(&live);
                for lease in lost {
                    // A job that finished between the read and the beat is not a refusal.
                    if live.remove(&lease) {
                        bump(&stats.heartbeats_refused);
                    }
                }
            }
            Err(e) => stats.error("heartbeat", e),
        }
    }
}

async fn run_job(queue: Queue, job: ClaimedJob, live: Live, stats: Arc<Stats>, seed: u64) {
    let lease = job.lease;
    let first_attempt = job.attempt == 1;
    let mut rng = Rng::new(seed);
    let work_time = Duration::from_millis(20 + rng.below(181));
    // The job stops being heartbeated once it is finished, parked or dropped.
    let release = || {
        lock(&live).remove(&lease);
    };
    match Behaviour::of(&job) {
        Behaviour::Crash if first_attempt => {
            release();
            bump(&stats.crashed);
        }
        Behaviour::Overrun => {
            bump(&stats.overran);
            tokio::time::sleep(OVERRUN_TAKES).await;
            release();
            complete(&queue, lease, &stats).await;
        }
        Behaviour::Flaky if first_attempt => {
            tokio::time::sleep(work_time).await;
            release();
            match queue
                .fail(lease, "flaky: simulated error on the first attempt")
                .await
            {
                Ok(FailOutcome::Retrying { .. }) => bump(&stats.failed_retrying),
                Ok(FailOutcome::Failed) => bump(&stats.failed_final),
                Err(QueueError::LeaseLost { .. }) => bump(&stats.other_lease_lost),
                Err(e) => stats.error("fail", e),
            }
        }
        Behaviour::Unanswered if first_attempt => {
            release();
            match queue.wait_for_callback(lease, CALLBACK_TIMEOUT).await {
                Ok(_) => bump(&stats.parked_unanswered),
                Err(QueueError::LeaseLost { .. }) => bump(&stats.other_lease_lost),
                Err(e) => stats.error("wait_for_callback", e),
            }
        }
        Behaviour::Answered => {
            release();
            let callback = match queue.wait_for_callback(lease, CALLBACK_TIMEOUT).await {
                Ok(callback) => callback,
                Err(QueueError::LeaseLost { .. }) => {
                    bump(&stats.other_lease_lost);
                    return;
                }
                Err(e) => {
                    stats.error("wait_for_callback", e);
                    return;
                }
            };
            // The remote party: it answers a little later, from elsewhere, by callback id.
            tokio::time::sleep(REMOTE_ANSWERS_AFTER).await;
            match queue.resolve_callback(callback, Resolution::Complete).await {
                Ok(_) => bump(&stats.answered),
                Err(QueueError::CallbackNotPending(_)) => bump(&stats.answered_too_late),
                Err(e) => stats.error("resolve_callback", e),
            }
        }
        _ => {
            tokio::time::sleep(work_time).await;
            release();
            complete(&queue, lease, &stats).await;
        }
    }
}

async fn complete(queue: &Queue, lease: Lease, stats: &Stats) {
    match queue.complete(lease).await {
        Ok(()) => bump(&stats.completed),
        Err(QueueError::LeaseLost { .. }) => bump(&stats.late_completions_refused),
        Err(e) => stats.error("complete", e),
    }
}

/// SplitMix64: plenty for picking behaviours and delays, and no dependency.
pub struct Rng(u64);

impl Rng {
    /// Seeded from the clock, `stream` telling apart generators made at the same instant.
    pub fn new(stream: u64) -> Rng {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Rng(nanos ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform enough in 0..n (the modulo bias is below 1e-15 for the n used here).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up_and_names_round_trip() {
        let bad: u64 = Behaviour::MISBEHAVING.iter().map(|(_, s)| s).sum();
        assert!(bad < 100);
        let mut rng = Rng::new(7);
        let mut counts = std::collections::HashMap::new();
        for _ in 0..100_000 {
            *counts.entry(Behaviour::pick(&mut rng)).or_insert(0u64) += 1;
        }
        let crash = counts[&Behaviour::Crash] as f64 / 100_000.0;
        assert!((0.02..0.04).contains(&crash), "{crash}");
        for (behaviour, _) in Behaviour::MISBEHAVING {
            let job = new_job(behaviour, &mut rng);
            assert_eq!(job.args["behave"], behaviour.name());
            assert_eq!(
                job.run_timeout.is_some(),
                behaviour == Behaviour::Overrun,
                "{behaviour:?}"
            );
        }
    }
}
