//! Scenario 7, heartbeat: the lease-expiry cascade, side by side in one run.
//!
//! Two modes run at the same time, each on its own database with its own `steward run` leader
//! (heartbeat rescue at `staleness`) and its own delay proxy putting a round trip of `rtt`
//! between its worker and PostgreSQL. Both workers get the same load: short jobs, due now, at
//! `short_rate` (claim and complete pressure), and long jobs of `long_job` each.
//!
//! - **baseline**: a hand-written worker on the plain `steward_queue` client, pool of
//!   `pool_size` sessions. One claim loop per queue claims up to its free slots, each job runs in
//!   a task of its own and completes with `Queue::complete`; a long job heartbeats with
//!   `Queue::heartbeat` every `interval`, waiting for it before working on (the naive pattern:
//!   heartbeats, claims and completions all share the pool).
//! - **steward**: the `steward-worker` runtime, `pool_size` sessions, heartbeat interval
//!   `interval`, the same concurrency per queue.
//!
//! Every run's handler start and end (end also when the runtime drops a cancelled handler) is
//! logged by job id and attempt. A rescue is read from the job's `errors` (reason
//! `heartbeat_stale`, its attempt and time): it is a **live run rescued** when the handler of
//! that attempt was still running at the rescue's time, and a **completion refused** when the
//! handler had already returned (its completion then changed nothing). The runtime's flush
//! durations, flush age and outcomes come from a `metrics` recorder installed in this process;
//! the baseline's heartbeat calls are timed around the call, pool wait included. The oldest
//! heartbeat among running jobs is sampled from each database every 250 ms.

use crate::db::{BenchDb, Pg};
use crate::hist::{round2, Hist, Quantiles};
use crate::procs::{StewardProcess, ACQUIRED, FIRST_PASS};
use crate::proxy::{upstream_of, url_via, DelayProxy};
use crate::report::{num, opt, table, Target};
use crate::scenarios::worker::produce_spread;
use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};
use steward_queue::{ClaimedJob, NewJob, Queue, QueueError};
use steward_worker::{Done, Worker, WorkerSettings};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

const SHORT: &str = "short";
const LONG: &str = "long";
/// What a short job's handler does: a few milliseconds of work.
const SHORT_WORK: Duration = Duration::from_millis(5);
/// The baseline polls an empty queue this often (it does not LISTEN).
const BASELINE_POLL: Duration = Duration::from_millis(100);

pub struct Settings {
    pub window: Duration,
    /// Round trip added between the workers and PostgreSQL (half each way).
    pub rtt: Duration,
    /// The leader's heartbeat rescue staleness.
    pub staleness: Duration,
    /// The leader's heartbeat rescue interval.
    pub rescue_interval: Duration,
    /// The workers' heartbeat interval.
    pub interval: Duration,
    pub long_job: Duration,
    /// Concurrency of each worker on the long queue.
    pub long_slots: usize,
    /// Short jobs per second offered to each mode.
    pub short_rate: f64,
    /// Concurrency of each worker on the short queue.
    pub short_slots: usize,
    /// Pooled sessions of each worker for claims and completions.
    pub pool_size: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct HeartbeatResult {
    pub window_s: f64,
    pub rtt_ms: f64,
    pub staleness_s: f64,
    pub rescue_interval_s: f64,
    pub heartbeat_interval_s: f64,
    pub long_job_s: f64,
    pub long_slots: usize,
    pub short_rate: f64,
    pub short_slots: usize,
    pub pool_size: usize,
    pub steward_bin: String,
    pub baseline: ModeResult,
    pub steward: ModeResult,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModeResult {
    pub mode: String,
    pub short_enqueued: u64,
    pub long_enqueued: u64,
    /// Long-job handlers started in the window.
    pub long_runs: u64,
    /// Runs rescued for a stale heartbeat during the window.
    pub rescued: u64,
    /// Of them, long runs whose handler was still running: false rescues.
    pub live_runs_rescued: u64,
    /// Of them, runs whose handler had returned: their completion was refused.
    pub completions_refused: u64,
    /// Baseline: each heartbeat call, pool wait included. Steward: each heartbeat flush.
    pub heartbeat_ms: Quantiles,
    pub heartbeat_errors: u64,
    /// Steward: the largest age of the last successful flush the worker reported (its
    /// watchdog samples it every second). Baseline: null.
    pub flush_age_max_s: Option<f64>,
    /// The oldest heartbeat_at among running jobs, sampled from the database, at its largest.
    pub oldest_running_heartbeat_max_s: Option<f64>,
    pub completed_in_window: u64,
    pub jobs_per_s: f64,
}

pub async fn run(
    pg: &Pg,
    bin: &Path,
    s: &Settings,
) -> anyhow::Result<(HeartbeatResult, Vec<Target>)> {
    let baseline_db = pg.create("hb_baseline").await?;
    let steward_db = match pg.create("hb_steward").await {
        Ok(db) => db,
        Err(error) => {
            pg.drop_db(baseline_db).await;
            return Err(error);
        }
    };
    let result = run_on(&baseline_db, &steward_db, bin, s).await;
    pg.drop_db(baseline_db).await;
    pg.drop_db(steward_db).await;
    let (baseline, steward) = result?;
    let targets = vec![
        Target::at_least(
            "baseline loses live runs (precondition)",
            Some(baseline.live_runs_rescued as f64),
            1.0,
            "runs",
        ),
        Target::equals(
            "steward: live runs rescued",
            Some(steward.live_runs_rescued as f64),
            0.0,
            "runs",
        ),
        Target::below(
            "steward: heartbeat flush p99 < staleness/3",
            steward.heartbeat_ms.p99,
            s.staleness.as_secs_f64() * 1000.0 / 3.0,
            "ms",
        ),
    ];
    let result = HeartbeatResult {
        window_s: s.window.as_secs_f64(),
        rtt_ms: s.rtt.as_secs_f64() * 1000.0,
        staleness_s: s.staleness.as_secs_f64(),
        rescue_interval_s: s.rescue_interval.as_secs_f64(),
        heartbeat_interval_s: s.interval.as_secs_f64(),
        long_job_s: s.long_job.as_secs_f64(),
        long_slots: s.long_slots,
        short_rate: s.short_rate,
        short_slots: s.short_slots,
        pool_size: s.pool_size,
        steward_bin: bin.display().to_string(),
        baseline,
        steward,
    };
    Ok((result, targets))
}

/// `steward run` with the heartbeat rescue at the scenario's staleness and interval.
async fn start_leader(bin: &Path, db: &BenchDb, s: &Settings) -> anyhow::Result<StewardProcess> {
    let staleness = format!(
        "branches.rescue_stale_heartbeats.staleness={}ms",
        s.staleness.as_millis()
    );
    let interval = format!(
        "branches.rescue_stale_heartbeats.interval={}ms",
        s.rescue_interval.as_millis()
    );
    let mut leader =
        StewardProcess::spawn(bin, &db.url, &["--set", &staleness, "--set", &interval])?;
    leader
        .wait_message(ACQUIRED, Duration::from_secs(30))
        .await?;
    leader
        .wait_message(FIRST_PASS, Duration::from_secs(30))
        .await?;
    Ok(leader)
}

async fn run_on(
    baseline_db: &BenchDb,
    steward_db: &BenchDb,
    bin: &Path,
    s: &Settings,
) -> anyhow::Result<(ModeResult, ModeResult)> {
    let mut baseline_leader = start_leader(bin, baseline_db, s).await?;
    let mut steward_leader = start_leader(bin, steward_db, s).await?;
    let upstream = upstream_of(&baseline_db.url)?;
    let baseline_proxy = DelayProxy::start(upstream.clone(), s.rtt / 2).await?;
    let steward_proxy = DelayProxy::start(upstream, s.rtt / 2).await?;
    let metrics = WorkerMetrics::install();
    metrics.reset();

    let baseline_runs = Arc::new(RunLog::default());
    let steward_runs = Arc::new(RunLog::default());
    let stop = CancellationToken::new();

    // The runtime, through its proxy.
    let steward_target = steward_connection::Target::new(
        &url_via(&steward_db.url, steward_proxy.addr())?,
        steward_db.schema.clone(),
    )?;
    let worker = Worker::builder(steward_target)
        .settings(WorkerSettings {
            heartbeat_interval: s.interval,
            assumed_staleness: s.staleness,
            pool_size: s.pool_size,
            shutdown_grace: Duration::from_secs(1),
            ..WorkerSettings::default()
        })
        .queue(SHORT, s.short_slots)
        .queue(LONG, s.long_slots)
        .handler(SHORT, {
            let runs = steward_runs.clone();
            move |job, _ctx| {
                let run = runs.start(&job);
                async move {
                    tokio::time::sleep(SHORT_WORK).await;
                    run.returned();
                    Ok(Done::Complete)
                }
            }
        })
        .handler(LONG, {
            let runs = steward_runs.clone();
            let long_job = s.long_job;
            move |job, _ctx| {
                let run = runs.start(&job);
                async move {
                    tokio::time::sleep(long_job).await;
                    run.returned();
                    Ok(Done::Complete)
                }
            }
        })
        .start()
        .await
        .context("starting the steward worker")?;

    // The baseline, through its proxy.
    let baseline_queue = Queue::new(
        steward_connection::Target::new(
            &url_via(&baseline_db.url, baseline_proxy.addr())?,
            baseline_db.schema.clone(),
        )?
        .named("steward-bench:baseline")
        .pool(s.pool_size)?,
    );
    let baseline_stats = Arc::new(BaselineStats::default());
    let mut tasks = JoinSet::new();
    for (queue, slots) in [(SHORT, s.short_slots), (LONG, s.long_slots)] {
        tasks.spawn(baseline_claims(
            baseline_queue.clone(),
            queue,
            slots,
            s.interval,
            s.long_job,
            baseline_runs.clone(),
            baseline_stats.clone(),
            stop.clone(),
        ));
    }

    // Producers (directly, not through the proxies) and samplers.
    let long_rate = s.long_slots as f64 / s.long_job.as_secs_f64();
    let mut counts = Vec::new();
    let mut producers = JoinSet::new();
    let mut samplers = Vec::new();
    for db in [baseline_db, steward_db] {
        let queue = db.queue(2, "steward-bench:producer")?;
        let initial: Vec<NewJob> = (0..s.long_slots)
            .map(|_| NewJob::new(LONG).queue(LONG))
            .collect();
        let long = Arc::new(AtomicU64::new(
            queue.enqueue_batch(&initial).await?.len() as u64
        ));
        let short = Arc::new(AtomicU64::new(0));
        producers.spawn(produce_spread(
            queue.clone(),
            s.short_rate,
            Duration::ZERO,
            |_| NewJob::new(SHORT).queue(SHORT),
            short.clone(),
            stop.clone(),
        ));
        producers.spawn(produce_spread(
            queue,
            long_rate,
            Duration::ZERO,
            |_| NewJob::new(LONG).queue(LONG),
            long.clone(),
            stop.clone(),
        ));
        samplers.push(tokio::spawn(sample_oldest_heartbeat(
            db.client().await?,
            stop.clone(),
        )));
        counts.push((short, long));
    }
    crate::progress(format!(
        "heartbeat: baseline and steward side by side for {:.0} s ({:.0} ms round trip, pool {}, staleness {:.0} s, heartbeat every {:.0} s, {} long jobs of {:.0} s at a time, {} short jobs/s)",
        s.window.as_secs_f64(),
        s.rtt.as_secs_f64() * 1000.0,
        s.pool_size,
        s.staleness.as_secs_f64(),
        s.interval.as_secs_f64(),
        s.long_slots,
        s.long_job.as_secs_f64(),
        s.short_rate
    ));
    let window_start = Utc::now();
    let started = Instant::now();
    tokio::time::sleep(s.window).await;
    let window_end = Utc::now();
    let window_s = started.elapsed().as_secs_f64();
    stop.cancel();
    while let Some(produced) = producers.join_next().await {
        produced.context("a producer task")??;
    }
    // In the order of the modes: baseline, then steward.
    let mut oldest = Vec::new();
    for sampler in samplers {
        oldest.push(sampler.await.context("a sampler task")?);
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    worker.shutdown().await;
    baseline_leader.terminate(Duration::from_secs(10)).await;
    steward_leader.terminate(Duration::from_secs(10)).await;
    baseline_proxy.stop();
    steward_proxy.stop();

    let window = Window {
        start: window_start,
        end: window_end,
        seconds: window_s,
    };
    let mut baseline = analyse("baseline", baseline_db, &baseline_runs, &window).await?;
    baseline.heartbeat_ms = lock(&baseline_stats.heartbeat).summary();
    baseline.heartbeat_errors = baseline_stats.heartbeat_errors.load(Ordering::Relaxed);
    let mut steward = analyse("steward", steward_db, &steward_runs, &window).await?;
    steward.heartbeat_ms = lock(&metrics.flush).summary();
    steward.heartbeat_errors = metrics.counter_total(steward_worker::names::HEARTBEAT_ERRORS);
    steward.flush_age_max_s = Some(round2(*lock(&metrics.age_max)));
    for (mode, (short, long)) in [&mut baseline, &mut steward].into_iter().zip(&counts) {
        mode.short_enqueued = short.load(Ordering::Relaxed);
        mode.long_enqueued = long.load(Ordering::Relaxed);
    }
    baseline.oldest_running_heartbeat_max_s = oldest.first().copied().flatten().map(round2);
    steward.oldest_running_heartbeat_max_s = oldest.get(1).copied().flatten().map(round2);
    Ok((baseline, steward))
}

struct Window {
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    seconds: f64,
}

/// Rescues and completions of one mode, from its database and its run log.
async fn analyse(
    mode: &str,
    db: &BenchDb,
    runs: &RunLog,
    window: &Window,
) -> anyhow::Result<ModeResult> {
    let client = db.client().await?;
    let rescues = client
        .query(
            "SELECT j.id, (e->>'attempt')::int, (e->>'at')::timestamptz
             FROM jobs j, jsonb_array_elements(j.errors) e
             WHERE e->>'reason' = 'heartbeat_stale'
               AND (e->>'at')::timestamptz BETWEEN $1 AND $2",
            &[&window.start, &window.end],
        )
        .await
        .context("reading rescues")?;
    let completed: i64 = client
        .query_one(
            "SELECT count(*) FROM jobs WHERE state = 'completed'
             AND finalized_at >= $1 AND finalized_at < $2",
            &[&window.start, &window.end],
        )
        .await?
        .get(0);
    let log = lock(&runs.0);
    let (mut live, mut refused) = (0u64, 0u64);
    for row in &rescues {
        let key = (row.get::<_, i64>(0), row.get::<_, i32>(1));
        let at: DateTime<Utc> = row.get(2);
        let Some(run) = log.get(&key) else { continue };
        match run.ended {
            Some(ended) if ended <= at && run.returned => refused += 1,
            Some(ended) if ended <= at => {}
            _ if run.long && run.started <= at => live += 1,
            _ => {}
        }
    }
    let long_runs = log
        .values()
        .filter(|r| r.long && r.started >= window.start && r.started < window.end)
        .count() as u64;
    drop(log);
    Ok(ModeResult {
        mode: mode.to_owned(),
        short_enqueued: 0,
        long_enqueued: 0,
        long_runs,
        rescued: rescues.len() as u64,
        live_runs_rescued: live,
        completions_refused: refused,
        heartbeat_ms: Quantiles::default(),
        heartbeat_errors: 0,
        flush_age_max_s: None,
        oldest_running_heartbeat_max_s: None,
        completed_in_window: completed as u64,
        jobs_per_s: round2(completed as f64 / window.seconds),
    })
}

/// The largest age of the oldest heartbeat among running jobs, sampled every 250 ms until
/// `stop`; None when no sample saw a running job.
async fn sample_oldest_heartbeat(
    client: tokio_postgres::Client,
    stop: CancellationToken,
) -> Option<f64> {
    let mut max: Option<f64> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return max,
            _ = tick.tick() => {}
        }
        let age = client
            .query_one(
                "SELECT extract(epoch FROM now() - min(heartbeat_at))::float8
                 FROM jobs WHERE state = 'running'",
                &[],
            )
            .await
            .ok()
            .and_then(|row| row.get::<_, Option<f64>>(0));
        if let Some(age) = age {
            max = Some(max.map_or(age, |m: f64| m.max(age)));
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One run's handler: when it started and ended, and whether it returned (rather than being
/// dropped or stopped by a lost lease).
struct Run {
    long: bool,
    started: DateTime<Utc>,
    ended: Option<DateTime<Utc>>,
    returned: bool,
}

/// Every run's handler, by (job id, attempt).
#[derive(Default)]
struct RunLog(Mutex<HashMap<(i64, i32), Run>>);

impl RunLog {
    fn start(self: &Arc<Self>, job: &ClaimedJob) -> RunGuard {
        let key = (job.lease.job_id, job.attempt);
        lock(&self.0).insert(
            key,
            Run {
                long: job.queue == LONG,
                started: Utc::now(),
                ended: None,
                returned: false,
            },
        );
        RunGuard {
            log: self.clone(),
            key,
            returned: false,
        }
    }
}

/// Records the end of its run when dropped: when the handler returns, or when its future is
/// dropped (the runtime cancels a run whose lease was lost).
struct RunGuard {
    log: Arc<RunLog>,
    key: (i64, i32),
    returned: bool,
}

impl RunGuard {
    fn returned(mut self) {
        self.returned = true;
    }
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        if let Some(run) = lock(&self.log.0).get_mut(&self.key) {
            run.ended = Some(Utc::now());
            run.returned = self.returned;
        }
    }
}

#[derive(Default)]
struct BaselineStats {
    heartbeat: Mutex<Hist>,
    heartbeat_errors: AtomicU64,
}

/// The baseline's claim loop for one queue: claims up to its free slots, runs each job in a
/// task of its own, polls when the queue is empty.
#[allow(clippy::too_many_arguments)]
async fn baseline_claims(
    queue: Queue,
    name: &'static str,
    slots: usize,
    interval: Duration,
    long_job: Duration,
    runs: Arc<RunLog>,
    stats: Arc<BaselineStats>,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(slots));
    let mut jobs = JoinSet::new();
    loop {
        let first = tokio::select! {
            _ = stop.cancelled() => break,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let mut permits = vec![first];
        while let Ok(permit) = slots.clone().try_acquire_owned() {
            permits.push(permit);
        }
        let claimed = tokio::select! {
            _ = stop.cancelled() => break,
            claimed = queue.claim(name, permits.len() as i64) => claimed,
        };
        // A failed claim is tried again at the next poll, as a simple worker would.
        let claimed = claimed.unwrap_or_default();
        let idle = claimed.is_empty();
        for job in claimed {
            // The claim never returns more jobs than asked, so a permit is left for each.
            let Some(permit) = permits.pop() else { break };
            let (queue, runs, stats) = (queue.clone(), runs.clone(), stats.clone());
            jobs.spawn(async move {
                baseline_job(&queue, job, interval, long_job, &runs, &stats).await;
                drop(permit);
            });
        }
        drop(permits);
        while jobs.try_join_next().is_some() {}
        if idle {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(BASELINE_POLL) => {}
            }
        }
    }
    jobs.abort_all();
    while jobs.join_next().await.is_some() {}
}

/// One baseline job: short ones work briefly; long ones work `long_job` in steps of
/// `interval`, heartbeating between steps and waiting for the heartbeat. Then the completion.
async fn baseline_job(
    queue: &Queue,
    job: ClaimedJob,
    interval: Duration,
    long_job: Duration,
    runs: &Arc<RunLog>,
    stats: &BaselineStats,
) {
    let lease = job.lease;
    let run = runs.start(&job);
    if job.queue == LONG {
        let mut worked = Duration::ZERO;
        while worked < long_job {
            let step = interval.min(long_job - worked);
            tokio::time::sleep(step).await;
            worked += step;
            if worked >= long_job {
                break;
            }
            let called = Instant::now();
            let beat = queue.heartbeat(lease).await;
            lock(&stats.heartbeat).record(called.elapsed());
            match beat {
                Ok(()) => {}
                // The run was rescued: the job stops, and nothing is written for it.
                Err(QueueError::LeaseLost { .. }) => return,
                Err(_) => {
                    stats.heartbeat_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    } else {
        tokio::time::sleep(SHORT_WORK).await;
    }
    run.returned();
    // A refused completion (LeaseLost) is counted from the database's rescues.
    let _ = queue.complete(lease).await;
}

/// The runtime's metrics, from a recorder this process installs once: heartbeat flush
/// durations, the largest flush age, and counters by name and labels.
#[derive(Default)]
struct WorkerMetrics {
    flush: Mutex<Hist>,
    age_max: Mutex<f64>,
    counters: Mutex<HashMap<String, u64>>,
}

static METRICS: OnceLock<Arc<WorkerMetrics>> = OnceLock::new();

impl WorkerMetrics {
    /// The process's recorder (installed on first use; the harness installs no other).
    fn install() -> Arc<WorkerMetrics> {
        METRICS
            .get_or_init(|| {
                let metrics = Arc::new(WorkerMetrics::default());
                if metrics::set_global_recorder(Recorder(metrics.clone())).is_err() {
                    crate::progress("heartbeat: a metrics recorder was already installed; the runtime's flush figures will be missing");
                }
                metrics
            })
            .clone()
    }

    fn reset(&self) {
        *lock(&self.flush) = Hist::new();
        *lock(&self.age_max) = 0.0;
        lock(&self.counters).clear();
    }

    /// The sum of a counter over all its labels.
    fn counter_total(&self, name: &str) -> u64 {
        lock(&self.counters)
            .iter()
            .filter(|(key, _)| key.split('{').next() == Some(name))
            .map(|(_, v)| *v)
            .sum()
    }
}

struct Recorder(Arc<WorkerMetrics>);

struct Handle {
    metrics: Arc<WorkerMetrics>,
    key: String,
}

impl metrics::CounterFn for Handle {
    fn increment(&self, value: u64) {
        *lock(&self.metrics.counters)
            .entry(self.key.clone())
            .or_default() += value;
    }

    fn absolute(&self, value: u64) {
        lock(&self.metrics.counters).insert(self.key.clone(), value);
    }
}

impl metrics::GaugeFn for Handle {
    fn increment(&self, _: f64) {}

    fn decrement(&self, _: f64) {}

    fn set(&self, value: f64) {
        let mut max = lock(&self.metrics.age_max);
        *max = max.max(value);
    }
}

impl metrics::HistogramFn for Handle {
    fn record(&self, value: f64) {
        lock(&self.metrics.flush).record_secs(value);
    }
}

impl metrics::Recorder for Recorder {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }

    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }

    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }

    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        let labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        metrics::Counter::from_arc(Arc::new(Handle {
            metrics: self.0.clone(),
            key: format!("{}{{{}}}", key.name(), labels.join(",")),
        }))
    }

    fn register_gauge(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        if key.name() != steward_worker::names::HEARTBEAT_AGE {
            return metrics::Gauge::noop();
        }
        metrics::Gauge::from_arc(Arc::new(Handle {
            metrics: self.0.clone(),
            key: key.name().to_owned(),
        }))
    }

    fn register_histogram(
        &self,
        key: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        if key.name() != steward_worker::names::HEARTBEAT_FLUSH_DURATION {
            return metrics::Histogram::noop();
        }
        metrics::Histogram::from_arc(Arc::new(Handle {
            metrics: self.0.clone(),
            key: key.name().to_owned(),
        }))
    }
}

pub fn render(r: &HeartbeatResult) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "heartbeat: baseline (plain client, synchronous heartbeats through the pool) and steward (steward-worker) side by side for {:.0} s; {:.0} ms round trip, pool {}, staleness {:.0} s (rescue every {:.0} s), heartbeat every {:.0} s; {} long jobs of {:.0} s at a time, {} short jobs/s over {} slots ({})",
        r.window_s,
        r.rtt_ms,
        r.pool_size,
        r.staleness_s,
        r.rescue_interval_s,
        r.heartbeat_interval_s,
        r.long_slots,
        r.long_job_s,
        num(r.short_rate),
        r.short_slots,
        r.steward_bin
    );
    let mut rows = vec![vec![
        "mode".to_owned(),
        "long runs".to_owned(),
        "rescued".to_owned(),
        "live rescued".to_owned(),
        "refused".to_owned(),
        "hb p50 ms".to_owned(),
        "hb p99 ms".to_owned(),
        "hb max ms".to_owned(),
        "hb errors".to_owned(),
        "flush age max s".to_owned(),
        "oldest hb max s".to_owned(),
        "jobs/s".to_owned(),
    ]];
    for m in [&r.baseline, &r.steward] {
        rows.push(vec![
            m.mode.clone(),
            m.long_runs.to_string(),
            m.rescued.to_string(),
            m.live_runs_rescued.to_string(),
            m.completions_refused.to_string(),
            opt(m.heartbeat_ms.p50),
            opt(m.heartbeat_ms.p99),
            opt(m.heartbeat_ms.max),
            m.heartbeat_errors.to_string(),
            opt(m.flush_age_max_s),
            opt(m.oldest_running_heartbeat_max_s),
            num(m.jobs_per_s),
        ]);
    }
    out.push_str(&table(&rows));
    let _ = writeln!(
        out,
        "  hb: baseline = one heartbeat call, pool wait included; steward = one flush of every live run. Enqueued short/long: baseline {}/{}, steward {}/{}",
        r.baseline.short_enqueued,
        r.baseline.long_enqueued,
        r.steward.short_enqueued,
        r.steward.long_enqueued
    );
    out
}
