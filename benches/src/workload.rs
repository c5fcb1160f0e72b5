//! The synthetic workload: producers enqueuing scheduled jobs at a fixed rate (due at uniform
//! random times over a horizon), and workers that claim, heartbeat and complete them. With
//! `misbehave`, a few first attempts go wrong on purpose so that every rescue branch has work:
//! the worker "crashes" (drops the job), overruns a 200 ms run timeout, or parks the job for a
//! callback that never comes.

use chrono::Utc;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::json;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use steward_queue::{ClaimedJob, Lease, NewJob, Queue, QueueError};
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

pub const KIND: &str = "bench.work";
const PRODUCE_EVERY: Duration = Duration::from_millis(10);
const MAX_BATCH: u64 = 5_000;
const IDLE_POLL: Duration = Duration::from_millis(5);
const HEARTBEAT_EVERY: Duration = Duration::from_millis(500);
/// Slow and overrunning jobs are held (and heartbeated) this long before completing.
const HOLD: Duration = Duration::from_secs(1);
const OVERRUN_TIMEOUT: Duration = Duration::from_millis(200);
const CALLBACK_TIMEOUT: Duration = Duration::from_millis(300);

#[derive(Debug, Clone)]
pub struct WorkloadConfig {
    pub queue: String,
    /// Jobs per second, all producers together.
    pub rate: f64,
    /// run_at is uniform in [now, now + horizon].
    pub horizon: Duration,
    pub producers: usize,
    pub workers: usize,
    pub claim_batch: i64,
    /// Misbehaving first attempts (see the module doc): 2% slow, 1% crash, 1% overrun, 1%
    /// unanswered callback.
    pub misbehave: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    Normal,
    Slow,
    Crash,
    Overrun,
    Callback,
}

impl Behaviour {
    fn name(self) -> &'static str {
        match self {
            Behaviour::Normal => "normal",
            Behaviour::Slow => "slow",
            Behaviour::Crash => "crash",
            Behaviour::Overrun => "overrun",
            Behaviour::Callback => "callback",
        }
    }

    fn pick(rng: &mut StdRng, misbehave: bool) -> Behaviour {
        if !misbehave {
            return Behaviour::Normal;
        }
        match rng.random_range(0..100) {
            0 | 1 => Behaviour::Slow,
            2 => Behaviour::Crash,
            3 => Behaviour::Overrun,
            4 => Behaviour::Callback,
            _ => Behaviour::Normal,
        }
    }

    /// Only the first attempt misbehaves; retries run normally.
    fn of(job: &ClaimedJob) -> Behaviour {
        if job.attempt > 1 {
            return Behaviour::Normal;
        }
        match job.args.get("b").and_then(|v| v.as_str()) {
            Some("slow") => Behaviour::Slow,
            Some("crash") => Behaviour::Crash,
            Some("overrun") => Behaviour::Overrun,
            Some("callback") => Behaviour::Callback,
            _ => Behaviour::Normal,
        }
    }
}

fn new_job(config: &WorkloadConfig, rng: &mut StdRng, offset: Duration) -> NewJob {
    let behaviour = Behaviour::pick(rng, config.misbehave);
    let run_at = Utc::now()
        + chrono::Duration::microseconds(i64::try_from(offset.as_micros()).unwrap_or(i64::MAX));
    let job = NewJob::new(KIND)
        .queue(config.queue.clone())
        .args(json!({ "b": behaviour.name() }))
        .max_attempts(5)
        .run_at(run_at);
    if behaviour == Behaviour::Overrun {
        job.run_timeout(OVERRUN_TIMEOUT)
    } else {
        job
    }
}

fn random_offset(rng: &mut StdRng, horizon: Duration) -> Duration {
    horizon.mul_f64(rng.random::<f64>())
}

#[derive(Default)]
struct Counters {
    enqueued: AtomicU64,
    claimed: AtomicU64,
    completed: AtomicU64,
    crashed: AtomicU64,
    overran: AtomicU64,
    parked: AtomicU64,
    heartbeats: AtomicU64,
    lease_lost: AtomicU64,
    errors: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl Counters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn error(&self, what: &str, error: impl std::fmt::Display) {
        Self::add(&self.errors, 1);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(format!("{what}: {error}"));
    }
}

/// What the workload did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WorkloadStats {
    pub enqueued: u64,
    pub claimed: u64,
    pub completed: u64,
    pub crashed: u64,
    pub overran: u64,
    pub parked_for_callback: u64,
    pub heartbeats: u64,
    pub lease_lost: u64,
    pub errors: u64,
    pub last_error: Option<String>,
}

pub struct Workload {
    stop: CancellationToken,
    tasks: JoinSet<()>,
    counters: Arc<Counters>,
}

impl Workload {
    /// Enqueues rate × horizon jobs due uniformly over the horizon, so that jobs come due at
    /// the steady-state rate from the start. Returns how many were enqueued.
    pub async fn prefill(queue: &Queue, config: &WorkloadConfig) -> anyhow::Result<u64> {
        let total = (config.rate * config.horizon.as_secs_f64()).round() as u64;
        let mut rng = StdRng::from_rng(&mut rand::rng());
        let mut done = 0;
        while done < total {
            let n = (total - done).min(MAX_BATCH);
            let jobs: Vec<NewJob> = (0..n)
                .map(|_| {
                    let offset = random_offset(&mut rng, config.horizon);
                    new_job(config, &mut rng, offset)
                })
                .collect();
            queue.enqueue_batch(&jobs).await?;
            done += n;
        }
        Ok(total)
    }

    pub fn start(queue: Queue, config: WorkloadConfig) -> Workload {
        let stop = CancellationToken::new();
        let counters = Arc::new(Counters::default());
        let mut tasks = JoinSet::new();
        let producers = config.producers.max(1);
        for _ in 0..producers {
            tasks.spawn(produce(
                queue.clone(),
                config.clone(),
                config.rate / producers as f64,
                counters.clone(),
                stop.clone(),
            ));
        }
        for _ in 0..config.workers {
            tasks.spawn(work(
                queue.clone(),
                config.clone(),
                counters.clone(),
                stop.clone(),
            ));
        }
        Workload {
            stop,
            tasks,
            counters,
        }
    }

    pub fn enqueued(&self) -> u64 {
        self.counters.enqueued.load(Ordering::Relaxed)
    }

    pub async fn stop(mut self) -> WorkloadStats {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
        let c = &self.counters;
        let read = |a: &AtomicU64| a.load(Ordering::Relaxed);
        WorkloadStats {
            enqueued: read(&c.enqueued),
            claimed: read(&c.claimed),
            completed: read(&c.completed),
            crashed: read(&c.crashed),
            overran: read(&c.overran),
            parked_for_callback: read(&c.parked),
            heartbeats: read(&c.heartbeats),
            lease_lost: read(&c.lease_lost),
            errors: read(&c.errors),
            last_error: c
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }
}

/// Enqueues at `rate` jobs/s: every tick, as many as the elapsed time calls for, so a late
/// tick does not lower the rate.
async fn produce(
    queue: Queue,
    config: WorkloadConfig,
    rate: f64,
    counters: Arc<Counters>,
    stop: CancellationToken,
) {
    let mut rng = StdRng::from_rng(&mut rand::rng());
    let start = Instant::now();
    let mut sent: u64 = 0;
    let mut tick = tokio::time::interval(PRODUCE_EVERY);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let due = (rate * start.elapsed().as_secs_f64()) as u64;
        let n = due.saturating_sub(sent).min(MAX_BATCH);
        if n == 0 {
            continue;
        }
        let jobs: Vec<NewJob> = (0..n)
            .map(|_| {
                let offset = random_offset(&mut rng, config.horizon);
                new_job(&config, &mut rng, offset)
            })
            .collect();
        // The rate is kept even when a batch fails: the failure is counted, not retried.
        sent += n;
        match queue.enqueue_batch(&jobs).await {
            Ok(ids) => Counters::add(&counters.enqueued, ids.len() as u64),
            Err(error) => counters.error("enqueue", error),
        }
    }
}

/// Claims and finishes jobs until stopped.
async fn work(
    queue: Queue,
    config: WorkloadConfig,
    counters: Arc<Counters>,
    stop: CancellationToken,
) {
    // Runs held with their finish time; overrunning ones expect to lose their lease.
    let mut held: Vec<(Lease, Instant)> = Vec::new();
    let mut last_heartbeat = Instant::now();
    while !stop.is_cancelled() {
        let jobs = match queue.claim(&config.queue, config.claim_batch).await {
            Ok(jobs) => jobs,
            Err(error) => {
                counters.error("claim", error);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        Counters::add(&counters.claimed, jobs.len() as u64);
        for job in &jobs {
            match Behaviour::of(job) {
                Behaviour::Normal => finish(&queue, job.lease, &counters).await,
                Behaviour::Slow => held.push((job.lease, Instant::now() + HOLD)),
                Behaviour::Overrun => {
                    Counters::add(&counters.overran, 1);
                    held.push((job.lease, Instant::now() + HOLD));
                }
                Behaviour::Crash => Counters::add(&counters.crashed, 1),
                Behaviour::Callback => {
                    match queue.wait_for_callback(job.lease, CALLBACK_TIMEOUT).await {
                        Ok(_) => Counters::add(&counters.parked, 1),
                        Err(QueueError::LeaseLost { .. }) => Counters::add(&counters.lease_lost, 1),
                        Err(error) => counters.error("wait_for_callback", error),
                    }
                }
            }
        }
        if !held.is_empty() && last_heartbeat.elapsed() >= HEARTBEAT_EVERY {
            last_heartbeat = Instant::now();
            let leases: Vec<Lease> = held.iter().map(|(l, _)| *l).collect();
            match queue.heartbeat_many(&leases).await {
                Ok(lost) => {
                    Counters::add(&counters.heartbeats, (leases.len() - lost.len()) as u64);
                    Counters::add(&counters.lease_lost, lost.len() as u64);
                    held.retain(|(l, _)| !lost.contains(l));
                }
                Err(error) => counters.error("heartbeat_many", error),
            }
        }
        let now = Instant::now();
        let (ready, waiting): (Vec<_>, Vec<_>) = held.into_iter().partition(|(_, at)| *at <= now);
        held = waiting;
        for (lease, _) in ready {
            finish(&queue, lease, &counters).await;
        }
        if jobs.is_empty() {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(IDLE_POLL) => {}
            }
        }
    }
}

async fn finish(queue: &Queue, lease: Lease, counters: &Counters) {
    match queue.complete(lease).await {
        Ok(()) => Counters::add(&counters.completed, 1),
        Err(QueueError::LeaseLost { .. }) => Counters::add(&counters.lease_lost, 1),
        Err(error) => counters.error("complete", error),
    }
}
