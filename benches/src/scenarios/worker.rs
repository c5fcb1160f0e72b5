//! Scenario 6, worker: no-op jobs through one `steward-worker` process at a fixed rate, with a
//! real `steward run` leader (shipped defaults) promoting them.
//!
//! Jobs are enqueued scheduled, their run_at spaced evenly at the rate a little ahead of now,
//! so each one is promoted by the leader and its worker woken by the NOTIFY the promotion
//! sends. The worker is this executable re-run as `steward-bench worker-process`: a
//! `steward_worker::Worker` with default `WorkerSettings` whose handler prints, per run, the
//! job id, its run_at and the time the handler was called (one line on stdout through a
//! buffered writer thread, so the handler never waits for the pipe). Pickup lag is handler
//! start − run_at; a job id printed twice is a duplicate run; a job not completed after the
//! drain is lost.

use crate::db::{BenchDb, Pg};
use crate::hist::{round2, Hist, Quantiles};
use crate::procs::{clock_ticks, proc_stat, StewardProcess, ACQUIRED, FIRST_PASS};
use crate::report::{num, opt, table, Target};
use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, BufWriter, Write as _};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use steward_connection::{SchemaName, Target as DbTarget};
use steward_queue::{NewJob, Queue};
use steward_worker::{Done, Worker};
use tokio::io::AsyncReadExt;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

const QUEUE: &str = "bench";
const KIND: &str = "bench.noop";
/// Producers enqueue this often, as many jobs as the elapsed time calls for.
const PRODUCE_EVERY: Duration = Duration::from_millis(10);

pub struct Settings {
    /// Offered jobs per second, one measurement each.
    pub rates: Vec<f64>,
    pub window: Duration,
    pub warmup: Duration,
    /// How far ahead of its enqueue each job is due.
    pub lead: Duration,
    /// The worker's concurrency on the queue.
    pub concurrency: usize,
    /// The longest wait, after the producer stops, for every job to complete.
    pub drain: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct WorkerResult {
    pub steward_bin: String,
    pub concurrency: usize,
    pub lead_ms: f64,
    pub window_s: f64,
    pub warmup_s: f64,
    pub rates: Vec<RateResult>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RateResult {
    /// Offered jobs per second.
    pub rate: f64,
    pub enqueued: u64,
    /// Jobs per second enqueued over warm-up and window, as achieved.
    pub achieved_enqueue_rate: f64,
    pub window_s: f64,
    pub completed_in_window: u64,
    /// Completions in the window ÷ its length.
    pub sustained_jobs_per_s: f64,
    /// The fewest completions in one whole second of the window.
    pub slowest_second: u64,
    /// Handler start − run_at, for jobs due in the window.
    pub pickup_lag_ms: Quantiles,
    /// The claim's transaction time (attempted_at) − run_at, for the same jobs: the part of
    /// pickup lag before the claim (promotion, the NOTIFY, the claim loop waking). The rest is
    /// the claim statement and the handler's start.
    pub claim_lag_ms: Quantiles,
    pub handler_starts: u64,
    /// Job ids whose handler started more than once.
    pub duplicate_runs: u64,
    /// Enqueued jobs not completed after the drain.
    pub lost_jobs: u64,
    pub drain_s: f64,
    /// CPU of the worker process and of the leader over the window, % of one core.
    pub worker_cpu_percent: Option<f64>,
    pub leader_cpu_percent: Option<f64>,
}

pub async fn run(pg: &Pg, bin: &Path, s: &Settings) -> anyhow::Result<(WorkerResult, Vec<Target>)> {
    let mut rates = Vec::new();
    for &rate in &s.rates {
        let db = pg.create("worker").await?;
        let result = run_rate(&db, bin, s, rate).await;
        pg.drop_db(db).await;
        rates.push(result.with_context(|| format!("worker scenario at {rate} jobs/s"))?);
    }
    let mut targets = Vec::new();
    if let Some(r) = rates.iter().find(|r| r.rate >= 5000.0) {
        // The window's two edges can each move a job in or out of it: 1% allowance.
        targets.push(Target::at_least(
            format!("sustained at {} jobs/s offered", r.rate),
            Some(r.sustained_jobs_per_s),
            (r.rate * 0.99).round(),
            "jobs/s",
        ));
    }
    if let Some(r) = rates.iter().find(|r| r.rate == 2000.0) {
        targets.push(Target::below(
            "pickup lag p99 at 2000 jobs/s",
            r.pickup_lag_ms.p99,
            25.0,
            "ms",
        ));
    }
    targets.push(Target::equals(
        "duplicate runs (all rates)",
        Some(rates.iter().map(|r| r.duplicate_runs).sum::<u64>() as f64),
        0.0,
        "",
    ));
    let result = WorkerResult {
        steward_bin: bin.display().to_string(),
        concurrency: s.concurrency,
        lead_ms: s.lead.as_secs_f64() * 1000.0,
        window_s: s.window.as_secs_f64(),
        warmup_s: s.warmup.as_secs_f64(),
        rates,
    };
    Ok((result, targets))
}

/// One handler start, as the worker process printed it (microseconds since the epoch).
struct Start {
    job_id: i64,
    run_at_us: i64,
    started_us: i64,
}

async fn run_rate(db: &BenchDb, bin: &Path, s: &Settings, rate: f64) -> anyhow::Result<RateResult> {
    let mut leader = StewardProcess::spawn(bin, &db.url, &[])?;
    leader
        .wait_message(ACQUIRED, Duration::from_secs(30))
        .await?;
    leader
        .wait_message(FIRST_PASS, Duration::from_secs(30))
        .await?;
    let mut worker = WorkerChild::spawn(db, QUEUE, s.concurrency)?;
    worker.wait_ready(Duration::from_secs(30)).await?;
    crate::progress(format!(
        "worker: {rate} jobs/s for {:.0} s warm-up + {:.0} s window, one worker process (concurrency {})",
        s.warmup.as_secs_f64(),
        s.window.as_secs_f64(),
        s.concurrency
    ));

    let queue = db.queue(4, "steward-bench:producer")?;
    let stop = CancellationToken::new();
    let enqueued = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let producer = tokio::spawn(produce_spread(
        queue,
        rate,
        s.lead,
        |run_at| NewJob::new(KIND).queue(QUEUE).run_at(run_at),
        enqueued.clone(),
        stop.clone(),
    ));
    tokio::time::sleep(s.warmup).await;
    let hz = clock_ticks();
    let cpu_of = |pid: u32| proc_stat(pid).map(|p| p.cpu_ticks);
    let (worker_cpu0, leader_cpu0) = (cpu_of(worker.pid()), cpu_of(leader.pid()));
    let window_start = Utc::now();
    let window_started = Instant::now();
    tokio::time::sleep(s.window).await;
    let window_end = Utc::now();
    let window_s = window_started.elapsed().as_secs_f64();
    let cpu_percent = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) => Some(round2(b.saturating_sub(a) as f64 / hz / window_s * 100.0)),
        _ => None,
    };
    let worker_cpu = cpu_percent(worker_cpu0, cpu_of(worker.pid()));
    let leader_cpu = cpu_percent(leader_cpu0, cpu_of(leader.pid()));
    stop.cancel();
    producer.await.context("the producer task")??;
    let enqueued = enqueued.load(Ordering::Relaxed);
    let achieved = enqueued as f64 / started.elapsed().as_secs_f64();

    let client = db.client().await?;
    let drain_started = Instant::now();
    loop {
        let pending: i64 = client
            .query_one(
                "SELECT count(*) FROM jobs WHERE queue = $1 AND state <> 'completed'",
                &[&QUEUE],
            )
            .await?
            .get(0);
        if pending == 0 || drain_started.elapsed() > s.drain {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let drain_s = drain_started.elapsed().as_secs_f64();
    let starts = worker.finish(Duration::from_secs(30)).await?;
    leader.terminate(Duration::from_secs(10)).await;

    let rows = client
        .query(
            "SELECT state = 'completed', finalized_at, run_at, attempted_at
             FROM jobs WHERE queue = $1",
            &[&QUEUE],
        )
        .await?;
    let seconds = window_s.floor() as usize;
    let mut per_second = vec![0u64; seconds.max(1)];
    let (mut completed_in_window, mut lost) = (0u64, 0u64);
    let mut claim_lag = Hist::new();
    for row in &rows {
        let completed: bool = row.get(0);
        let finalized: Option<DateTime<Utc>> = row.get(1);
        let run_at: DateTime<Utc> = row.get(2);
        let attempted: Option<DateTime<Utc>> = row.get(3);
        if let Some(attempted) = attempted.filter(|_| run_at >= window_start && run_at < window_end)
        {
            claim_lag.record((attempted - run_at).to_std().unwrap_or_default());
        }
        if !completed {
            lost += 1;
            continue;
        }
        let Some(at) = finalized else { continue };
        if at >= window_start && at < window_end {
            completed_in_window += 1;
            let second = (at - window_start).num_milliseconds() / 1000;
            if let Some(count) = usize::try_from(second)
                .ok()
                .and_then(|i| per_second.get_mut(i))
            {
                *count += 1;
            }
        }
    }
    let mut runs: HashMap<i64, u32> = HashMap::with_capacity(starts.len());
    let mut lag = Hist::new();
    let (from_us, to_us) = (
        window_start.timestamp_micros(),
        window_end.timestamp_micros(),
    );
    for start in &starts {
        *runs.entry(start.job_id).or_default() += 1;
        if start.run_at_us >= from_us && start.run_at_us < to_us {
            let us = start.started_us.saturating_sub(start.run_at_us).max(0);
            lag.record(Duration::from_micros(us.unsigned_abs()));
        }
    }
    if rows.len() as u64 != enqueued {
        bail!(
            "the producer counted {enqueued} jobs enqueued but the queue holds {}",
            rows.len()
        );
    }
    Ok(RateResult {
        rate,
        enqueued,
        achieved_enqueue_rate: round2(achieved),
        window_s: round2(window_s),
        completed_in_window,
        sustained_jobs_per_s: round2(completed_in_window as f64 / window_s),
        slowest_second: per_second.iter().copied().min().unwrap_or(0),
        pickup_lag_ms: lag.summary(),
        claim_lag_ms: claim_lag.summary(),
        handler_starts: starts.len() as u64,
        duplicate_runs: runs.values().filter(|&&n| n > 1).count() as u64,
        lost_jobs: lost,
        drain_s: round2(drain_s),
        worker_cpu_percent: worker_cpu,
        leader_cpu_percent: leader_cpu,
    })
}

/// Enqueues `rate` jobs per second until `stop`: job i is due at t0 + lead + i / rate, where
/// t0 is when this starts, so due times are evenly spaced whatever the enqueue batches look
/// like. A late tick enqueues what it missed. Counts what was enqueued into `enqueued`.
pub async fn produce_spread(
    queue: Queue,
    rate: f64,
    lead: Duration,
    job: impl Fn(DateTime<Utc>) -> NewJob,
    enqueued: Arc<AtomicU64>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let t0 = Utc::now() + chrono::Duration::from_std(lead).context("lead time")?;
    let started = Instant::now();
    let mut sent: u64 = 0;
    let mut tick = tokio::time::interval(PRODUCE_EVERY);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        let due = (rate * started.elapsed().as_secs_f64()) as u64;
        if due <= sent {
            continue;
        }
        let jobs: Vec<NewJob> = (sent..due)
            .map(|i| job(t0 + chrono::Duration::microseconds((i as f64 / rate * 1e6) as i64)))
            .collect();
        let ids = queue.enqueue_batch(&jobs).await.context("enqueueing")?;
        enqueued.fetch_add(ids.len() as u64, Ordering::Relaxed);
        sent = due;
    }
}

/// The worker process: this executable as `worker-process`.
struct WorkerChild {
    child: Child,
    stdin: Option<ChildStdin>,
    ready: Arc<AtomicBool>,
    starts: Arc<Mutex<Vec<Start>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl WorkerChild {
    fn spawn(db: &BenchDb, queue: &str, concurrency: usize) -> anyhow::Result<WorkerChild> {
        let exe = std::env::current_exe().context("locating this executable")?;
        let mut child = Command::new(exe)
            .arg("worker-process")
            .args(["--database-url", &db.url])
            .args(["--schema", db.schema.as_str()])
            .args(["--queue", queue])
            .args(["--concurrency", &concurrency.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawning the worker process")?;
        let stdout = child.stdout.take().context("the worker's stdout")?;
        let ready = Arc::new(AtomicBool::new(false));
        let starts = Arc::new(Mutex::new(Vec::new()));
        let reader = std::thread::spawn({
            let (ready, starts) = (ready.clone(), starts.clone());
            move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    let mut fields = line.split(' ');
                    match fields.next() {
                        Some("ready") => ready.store(true, Ordering::SeqCst),
                        Some("start") => {
                            let mut next = || fields.next().and_then(|f| f.parse::<i64>().ok());
                            if let (Some(job_id), Some(run_at_us), Some(started_us)) =
                                (next(), next(), next())
                            {
                                lock(&starts).push(Start {
                                    job_id,
                                    run_at_us,
                                    started_us,
                                });
                            }
                        }
                        _ => {}
                    }
                }
            }
        });
        let stdin = child.stdin.take();
        Ok(WorkerChild {
            child,
            stdin,
            ready,
            starts,
            reader: Some(reader),
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    async fn wait_ready(&mut self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        while !self.ready.load(Ordering::SeqCst) {
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!("the worker process exited ({status}) before it was ready");
            }
            if Instant::now() > deadline {
                bail!("the worker process was not ready within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// Closes the worker's stdin (it then shuts down), waits for it to exit and returns every
    /// handler start it printed.
    async fn finish(mut self, within: Duration) -> anyhow::Result<Vec<Start>> {
        drop(self.stdin.take());
        let deadline = Instant::now() + within;
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    bail!("the worker process did not exit within {within:?} of its shutdown");
                }
            }
        }
        if let Some(reader) = self.reader.take() {
            let _ = tokio::task::spawn_blocking(move || reader.join()).await;
        }
        Ok(std::mem::take(&mut *lock(&self.starts)))
    }
}

impl Drop for WorkerChild {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What `steward-bench worker-process` is given.
#[derive(Debug, clap::Args)]
pub struct ProcessArgs {
    #[arg(long)]
    pub database_url: String,
    #[arg(long, default_value = "steward")]
    pub schema: String,
    #[arg(long)]
    pub queue: String,
    #[arg(long, default_value_t = 200)]
    pub concurrency: usize,
}

enum Line {
    Ready,
    Start(i64, i64, i64),
}

/// The worker process: a `Worker` with default settings and a no-op handler that prints each
/// start, until its stdin closes; then a clean shutdown.
pub async fn process(args: ProcessArgs) -> anyhow::Result<()> {
    let target = DbTarget::new(&args.database_url, SchemaName::new(args.schema)?)?;
    let (lines, received) = std::sync::mpsc::channel::<Line>();
    // Printing happens on a thread of its own, buffered, so handlers never wait for the pipe.
    let printer = std::thread::spawn(move || -> std::io::Result<()> {
        let mut out = BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
        for line in received {
            match line {
                Line::Ready => {
                    writeln!(out, "ready")?;
                    out.flush()?;
                }
                Line::Start(id, run_at, started) => writeln!(out, "start {id} {run_at} {started}")?,
            }
        }
        out.flush()
    });
    let handler_lines = lines.clone();
    let worker = Worker::builder(target)
        .queue(args.queue, args.concurrency)
        .handler(KIND, move |job, _ctx| {
            // Called when the handler starts: the time of the call is the pickup.
            let started = Utc::now().timestamp_micros();
            let _ = handler_lines.send(Line::Start(
                job.lease.job_id,
                job.run_at.timestamp_micros(),
                started,
            ));
            async { Ok(Done::Complete) }
        })
        .start()
        .await
        .context("starting the worker")?;
    let _ = lines.send(Line::Ready);
    drop(lines);
    let mut stdin = tokio::io::stdin();
    let mut buffer = [0u8; 64];
    while matches!(stdin.read(&mut buffer).await, Ok(n) if n > 0) {}
    worker.shutdown().await;
    match tokio::task::spawn_blocking(move || printer.join()).await {
        Ok(Ok(written)) => written.context("printing handler starts")?,
        _ => bail!("the printing thread panicked"),
    }
    Ok(())
}

pub fn render(r: &WorkerResult) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "worker: no-op jobs promoted by a default `steward run` ({}), one worker process (default WorkerSettings, concurrency {}), due {:.0} ms after enqueue, {:.0} s window after {:.0} s warm-up",
        r.steward_bin, r.concurrency, r.lead_ms, r.window_s, r.warmup_s
    );
    let mut rows = vec![vec![
        "offered/s".to_owned(),
        "enqueued/s".to_owned(),
        "sustained/s".to_owned(),
        "slowest s".to_owned(),
        "pickup p50 ms".to_owned(),
        "p99 ms".to_owned(),
        "max ms".to_owned(),
        "claimed p50 ms".to_owned(),
        "p99 ms".to_owned(),
        "dup runs".to_owned(),
        "lost".to_owned(),
        "worker CPU %".to_owned(),
        "leader CPU %".to_owned(),
    ]];
    for x in &r.rates {
        rows.push(vec![
            num(x.rate),
            num(x.achieved_enqueue_rate),
            num(x.sustained_jobs_per_s),
            x.slowest_second.to_string(),
            opt(x.pickup_lag_ms.p50),
            opt(x.pickup_lag_ms.p99),
            opt(x.pickup_lag_ms.max),
            opt(x.claim_lag_ms.p50),
            opt(x.claim_lag_ms.p99),
            x.duplicate_runs.to_string(),
            x.lost_jobs.to_string(),
            opt(x.worker_cpu_percent),
            opt(x.leader_cpu_percent),
        ]);
    }
    out.push_str(&table(&rows));
    let _ = writeln!(
        out,
        "  pickup: handler start - run_at; claimed: the claim's transaction time - run_at (jobs due in the window)"
    );
    out
}
