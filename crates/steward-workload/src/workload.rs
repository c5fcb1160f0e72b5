//! The running workload: producers enqueuing a mix of [`Behaviour`]s at a steady rate, workers
//! on [`steward_worker::Worker`] acting them out, and remote parties answering callbacks. What
//! the workload is told happened goes into its [`Ledger`].

use crate::behaviour::Behaviour;
use crate::rng::Rng;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use steward_connection::Target;
use steward_queue::{Lease, NewJob, Queue, QueueError, Resolution};
use steward_worker::{Done, Job, JobContext, JobError, Outcome, Worker, WorkerSettings};
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The producers enqueue once per tick, as many jobs as the rate calls for by then.
const PRODUCE_EVERY: Duration = Duration::from_millis(10);
/// The most jobs one enqueue statement carries; a producer that fell behind catches up over
/// several ticks.
const MAX_BATCH: u64 = 5_000;
/// Calls a worker or a remote party must get through (cancel, resolve) are retried through
/// database errors (an outage) for this long.
const PERSIST_FOR: Duration = Duration::from_secs(60);

/// How long the behaviours take. The defaults are the chaos suite's: everything within
/// seconds.
#[derive(Debug, Clone)]
pub struct Timings {
    /// A normal run works for a time uniform in this range.
    pub work: (Duration, Duration),
    pub slow_for: Duration,
    pub long_for: Duration,
    /// An overrunning job's run timeout; it blocks for this long and `overrun_by` more.
    pub overrun_timeout: Duration,
    pub overrun_by: Duration,
    /// The callback timeout of a run parked on a callback nobody answers.
    pub unanswered_timeout: Duration,
    /// The callback timeout of runs a remote party answers: longer than any outage of a chaos
    /// scenario, or the answer could legitimately lose to the timeout.
    pub answer_timeout: Duration,
    /// The remote party answers this long after the run parked.
    pub answer_after: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Self {
            work: (Duration::from_millis(10), Duration::from_millis(60)),
            slow_for: Duration::from_secs(1),
            long_for: Duration::from_secs(10),
            overrun_timeout: Duration::from_millis(300),
            overrun_by: Duration::from_millis(900),
            unanswered_timeout: Duration::from_millis(600),
            answer_timeout: Duration::from_secs(8),
            answer_after: Duration::from_millis(100),
        }
    }
}

#[derive(Debug, Clone)]
pub struct WorkloadConfig {
    pub queue: String,
    /// The kind the producers enqueue.
    pub kind: String,
    /// Kinds the workers also run, by the behaviour in their args (normal without one): the
    /// jobs of a cron schedule, say.
    pub other_kinds: Vec<String>,
    /// Jobs enqueued per second, all producers together.
    pub rate: f64,
    pub producers: usize,
    /// Behaviours with their shares in percent; the rest of the jobs are normal.
    pub mix: Vec<(Behaviour, u32)>,
    /// At least one job of each misbehaviour of the mix every second, so that even a low rate
    /// gives every rescue work.
    pub every_misbehaviour_each_second: bool,
    /// Share of the jobs (percent) due later than their enqueue, uniformly within `due_in`.
    pub scheduled_percent: u64,
    pub due_in: (Duration, Duration),
    /// A run timeout that a healthy run never reaches, carried by every fourth job.
    pub healthy_timeout: Option<Duration>,
    pub max_attempts: i32,
    pub workers: usize,
    /// Runs one worker executes at once.
    pub concurrency: usize,
    /// The workers' settings (heartbeat interval, claim batch, backoff, ...).
    pub worker: WorkerSettings,
    /// A crash drops every run its worker holds, not only its own.
    pub crash_worker: bool,
    /// Keep the books of every enqueue and run (see [`Books`]) besides the counts: what the
    /// chaos audit needs, and more memory than a benchmark wants.
    pub keep_books: bool,
    pub timings: Timings,
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        Self {
            queue: "default".to_owned(),
            kind: "workload.job".to_owned(),
            other_kinds: Vec::new(),
            rate: 40.0,
            producers: 1,
            mix: Vec::new(),
            every_misbehaviour_each_second: false,
            scheduled_percent: 0,
            due_in: (Duration::ZERO, Duration::ZERO),
            healthy_timeout: None,
            max_attempts: 3,
            workers: 3,
            concurrency: 40,
            worker: WorkerSettings::default(),
            crash_worker: false,
            keep_books: false,
            timings: Timings::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("invalid workload: {0}")]
    Invalid(String),
    #[error(transparent)]
    Worker(#[from] steward_worker::WorkerError),
    #[error(transparent)]
    Queue(#[from] QueueError),
}

/// (job id, attempt): one run of a job.
pub type Run = (i64, i32);

/// What the workload knows happened, to be compared with what the database says. The sets
/// are kept only with [`WorkloadConfig::keep_books`]; the counts always.
#[derive(Default, Debug)]
pub struct Books {
    /// Tokens of jobs whose enqueue was acknowledged.
    pub acked: HashSet<u64>,
    /// Tokens of jobs whose enqueue failed: they may or may not exist.
    pub unacked: HashSet<u64>,
    /// Every run a worker started.
    pub claimed: HashSet<Run>,
    /// Runs their worker gave up without a word to the database (a crash, its watchdog, an
    /// outcome it could not write): the leader may rescue them.
    pub abandoned: HashSet<Run>,
    /// Runs that worked past their deadline on purpose.
    pub overran: HashSet<Run>,
    /// Runs parked on a callback that will not be answered (on purpose, or because the park's
    /// outcome was unknown).
    pub unanswered: HashSet<Run>,
    /// Acknowledged completions (by the worker or a resolved callback) per job.
    pub completions: HashMap<i64, u32>,
    /// Jobs the worker was told failed for good.
    pub final_failures: HashSet<i64>,
    /// A live worker lost a run it had no reason to lose: a false rescue or a lost update.
    pub unexpected: Vec<String>,
    /// Events by name: enqueued, claimed, each worker outcome (completed, retried, refused,
    /// ...), crashed, overran, parked, answered, ..., db_errors.
    pub counts: BTreeMap<&'static str, u64>,
    pub last_error: Option<String>,
}

/// The workload's books, shared by its tasks.
#[derive(Default)]
pub struct Ledger {
    books: Mutex<Books>,
    keep_books: bool,
}

/// A poisoned lock only means a task panicked mid-update; the data is still usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Ledger {
    pub fn books(&self) -> MutexGuard<'_, Books> {
        lock(&self.books)
    }

    fn add(&self, what: &'static str, n: u64) {
        *self.books().counts.entry(what).or_default() += n;
    }

    fn count(&self, what: &'static str) {
        self.add(what, 1);
    }

    fn error(&self, what: &'static str, error: impl std::fmt::Display) {
        let mut books = self.books();
        *books.counts.entry("db_errors").or_default() += 1;
        books.last_error = Some(format!("{what}: {error}"));
    }

    fn unexpected(&self, what: String) {
        self.books().unexpected.push(what);
    }

    /// Records into one of the books' sets, when books are kept.
    fn note(&self, record: impl FnOnce(&mut Books)) {
        if self.keep_books {
            record(&mut self.books());
        }
    }

    pub fn counts(&self) -> BTreeMap<&'static str, u64> {
        self.books().counts.clone()
    }

    pub fn stats(&self) -> Stats {
        let books = self.books();
        let n = |what: &str| books.counts.get(what).copied().unwrap_or(0);
        Stats {
            enqueued: n("enqueued"),
            claimed: n("claimed"),
            completed: n(Outcome::Completed.as_str()),
            retried: n(Outcome::Retried.as_str()),
            failed: n(Outcome::Failed.as_str()),
            crashed: n("crashed"),
            overran: n("overran"),
            parked: n(Outcome::Parked.as_str()),
            unanswered: n("unanswered"),
            answered: n("answered"),
            answered_too_late: n("answered_too_late"),
            refused: n(Outcome::Refused.as_str()),
            abandoned: n(Outcome::Abandoned.as_str()),
            unwritten: n(Outcome::Unwritten.as_str()),
            errors: n("db_errors"),
            last_error: books.last_error.clone(),
        }
    }
}

/// The counts most reports want.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    pub enqueued: u64,
    /// Runs the workers started.
    pub claimed: u64,
    /// Completions the database accepted from the workers.
    pub completed: u64,
    /// Attempts that failed and will run again.
    pub retried: u64,
    /// Jobs failed for good.
    pub failed: u64,
    pub crashed: u64,
    pub overran: u64,
    /// Runs parked on a callback.
    pub parked: u64,
    /// Of those, parked on a callback nobody will answer.
    pub unanswered: u64,
    /// Callbacks a remote party resolved.
    pub answered: u64,
    /// Callbacks no longer pending when the remote party answered.
    pub answered_too_late: u64,
    /// Outcomes refused because the run's lease was lost (rescued, cancelled).
    pub refused: u64,
    /// Runs given up without a word to the database (crashes, the watchdog).
    pub abandoned: u64,
    /// Outcomes that could not be written.
    pub unwritten: u64,
    /// Database errors of the producers and remote parties.
    pub errors: u64,
    pub last_error: Option<String>,
}

/// A run a worker holds.
struct HeldRun {
    attempt: i32,
    behaviour: Behaviour,
    worker: usize,
    /// A call's outcome was unknown (a database error): a refusal may be its doing.
    unsure: bool,
}

struct Shared {
    queue: Queue,
    config: WorkloadConfig,
    ledger: Arc<Ledger>,
    held: Mutex<HashMap<Lease, HeldRun>>,
    workers: Mutex<Vec<Worker>>,
    /// Remote parties answering callbacks: they outlive the run that parked.
    remotes: TaskTracker,
    stop_remotes: CancellationToken,
}

impl Shared {
    fn held(&self) -> MutexGuard<'_, HashMap<Lease, HeldRun>> {
        lock(&self.held)
    }

    fn mark_unsure(&self, lease: Lease) {
        if let Some(run) = self.held().get_mut(&lease) {
            run.unsure = true;
        }
    }

    /// Books a run's outcome, told by its worker.
    fn outcome(&self, lease: Lease, outcome: Outcome) {
        let ledger = &self.ledger;
        ledger.count(outcome.as_str());
        let Some(held) = self.held().remove(&lease) else {
            return;
        };
        let run = (lease.job_id, held.attempt);
        match outcome {
            Outcome::Completed => ledger.note(|b| {
                *b.completions.entry(lease.job_id).or_default() += 1;
            }),
            Outcome::Failed => ledger.note(|b| {
                b.final_failures.insert(lease.job_id);
            }),
            Outcome::Abandoned | Outcome::Unwritten => ledger.note(|b| {
                b.abandoned.insert(run);
            }),
            // The earlier call may have gone through, its answer lost.
            Outcome::Refused if held.unsure => ledger.count("ambiguous_refusal"),
            Outcome::Refused if held.behaviour.may_lose(held.attempt) => {}
            Outcome::Refused if ledger.keep_books => ledger.unexpected(format!(
                "worker {} lost run {run:?} ({}) while running it",
                held.worker,
                held.behaviour.name()
            )),
            _ => {}
        }
    }
}

/// Producers, workers and remote parties, until [`Workload::stop`].
pub struct Workload {
    shared: Arc<Shared>,
    produce: CancellationToken,
    producers: JoinSet<()>,
}

impl Workload {
    /// Enqueues rate × the longest due delay jobs due uniformly over it, so that jobs come due
    /// at the steady-state rate from the start. Returns how many were enqueued.
    pub async fn prefill(queue: &Queue, config: &WorkloadConfig) -> Result<u64, WorkloadError> {
        let horizon = config.due_in.1;
        let total = (config.rate * horizon.as_secs_f64()).round() as u64;
        let mut rng = Rng::new(u64::MAX - 1);
        let mut done = 0;
        while done < total {
            let n = (total - done).min(MAX_BATCH);
            let jobs: Vec<NewJob> = (0..n)
                .map(|i| {
                    let behaviour = pick(&config.mix, &mut rng);
                    behaviour
                        .job(
                            &config.kind,
                            &config.queue,
                            u64::MAX - done - i,
                            &config.timings,
                        )
                        .max_attempts(config.max_attempts)
                        .run_in(horizon.mul_f64(rng.unit()))
                })
                .collect();
            queue.enqueue_batch(&jobs).await?;
            done += n;
        }
        Ok(total)
    }

    /// Starts the workers (each a [`Worker`] on `target`, claiming from the queue of the
    /// config) and the producers (enqueuing through `queue`). Needs a multi-thread runtime: an
    /// overrunning job blocks its thread.
    pub async fn start(
        queue: Queue,
        target: &Target,
        config: WorkloadConfig,
    ) -> Result<Workload, WorkloadError> {
        if tokio::runtime::Handle::current().runtime_flavor()
            != tokio::runtime::RuntimeFlavor::MultiThread
        {
            return Err(WorkloadError::Invalid(
                "the workload needs a multi-thread runtime (an overrun blocks its thread)"
                    .to_owned(),
            ));
        }
        let shares: u32 = config.mix.iter().map(|(_, share)| share).sum();
        if shares > 100 || config.workers == 0 || !config.rate.is_finite() || config.rate < 0.0 {
            return Err(WorkloadError::Invalid(format!(
                "shares add up to {shares}% (at most 100), {} workers (at least 1), rate {}",
                config.workers, config.rate
            )));
        }
        let shared = Arc::new(Shared {
            queue,
            ledger: Arc::new(Ledger {
                books: Mutex::default(),
                keep_books: config.keep_books,
            }),
            config,
            held: Mutex::default(),
            workers: Mutex::default(),
            remotes: TaskTracker::new(),
            stop_remotes: CancellationToken::new(),
        });
        for index in 0..shared.config.workers {
            let worker = start_worker(&shared, target, index).await?;
            lock(&shared.workers).push(worker);
        }
        let produce = CancellationToken::new();
        let mut producers = JoinSet::new();
        let count = shared.config.producers.max(1);
        for n in 0..count {
            producers.spawn(producer(
                shared.clone(),
                n as u64,
                shared.config.rate / count as f64,
                produce.clone(),
            ));
        }
        Ok(Workload {
            shared,
            produce,
            producers,
        })
    }

    pub fn ledger(&self) -> &Arc<Ledger> {
        &self.shared.ledger
    }

    pub fn stats(&self) -> Stats {
        self.shared.ledger.stats()
    }

    /// Jobs whose enqueue was acknowledged so far.
    pub fn enqueued(&self) -> u64 {
        self.shared
            .ledger
            .books()
            .counts
            .get("enqueued")
            .copied()
            .unwrap_or(0)
    }

    /// No more jobs; pending cancellations still happen, and the workers go on.
    pub fn stop_producing(&self) {
        self.produce.cancel();
    }

    /// Runs the workers hold right now, with their behaviour.
    pub fn held_runs(&self) -> Vec<(Run, Behaviour)> {
        self.shared
            .held()
            .iter()
            .map(|(lease, run)| ((lease.job_id, run.attempt), run.behaviour))
            .collect()
    }

    /// Crashes the first worker's runs, as its process dying would (the worker goes on, as
    /// its replacement would); returns the runs it held.
    pub fn crash_a_worker(&self) -> Vec<Run> {
        crash_worker(&self.shared, 0)
    }

    /// Stops producing, shuts the workers down (runs still going after their grace period
    /// are handed back) and the remote parties; returns the books.
    pub async fn stop(mut self) -> Arc<Ledger> {
        self.produce.cancel();
        while let Some(done) = self.producers.join_next().await {
            if let Err(e) = done {
                self.shared.ledger.error("producer task", e);
            }
        }
        let workers: Vec<Worker> = std::mem::take(&mut *lock(&self.shared.workers));
        for worker in workers {
            worker.shutdown().await;
        }
        self.shared.stop_remotes.cancel();
        self.shared.remotes.close();
        self.shared.remotes.wait().await;
        self.shared.ledger.clone()
    }
}

async fn start_worker(
    shared: &Arc<Shared>,
    target: &Target,
    index: usize,
) -> Result<Worker, WorkloadError> {
    let config = &shared.config;
    let mut builder = Worker::builder(target.clone())
        .queue(config.queue.clone(), config.concurrency)
        .settings(config.worker.clone());
    for kind in std::iter::once(&config.kind).chain(&config.other_kinds) {
        let shared = shared.clone();
        builder = builder.handler(kind.clone(), move |job, ctx| {
            act(shared.clone(), index, job, ctx)
        });
    }
    let observer = Arc::downgrade(shared);
    let worker = builder
        .on_outcome(move |lease, outcome| {
            if let Some(shared) = observer.upgrade() {
                shared.outcome(lease, outcome);
            }
        })
        .start()
        .await?;
    Ok(worker)
}

/// Crashes every run worker `index` holds; returns them.
fn crash_worker(shared: &Shared, index: usize) -> Vec<Run> {
    // The attempts are read before the crash: the outcomes it causes remove the runs.
    let attempts: HashMap<Lease, i32> = shared
        .held()
        .iter()
        .filter(|(_, run)| run.worker == index)
        .map(|(lease, run)| (*lease, run.attempt))
        .collect();
    let crashed = match lock(&shared.workers).get(index) {
        Some(worker) => worker.crash_runs(),
        None => return Vec::new(),
    };
    shared.ledger.count("worker_crashes");
    crashed
        .into_iter()
        .filter_map(|lease| attempts.get(&lease).map(|a| (lease.job_id, *a)))
        .collect()
}

/// Picks a behaviour by the shares of `mix`; normal for the rest.
fn pick(mix: &[(Behaviour, u32)], rng: &mut Rng) -> Behaviour {
    let mut roll = rng.below(100);
    for (behaviour, share) in mix {
        let share = u64::from(*share);
        if roll < share {
            return *behaviour;
        }
        roll -= share;
    }
    Behaviour::Normal
}

/// Enqueues at `rate` jobs/s: every tick, as many as the elapsed time calls for, so that a
/// slow enqueue is caught up on later ticks. The rate is kept even when a batch fails: the
/// failure is booked, not retried.
async fn producer(shared: Arc<Shared>, stream: u64, rate: f64, stop: CancellationToken) {
    let config = &shared.config;
    let ledger = &shared.ledger;
    let mut rng = Rng::new(stream);
    let started = Instant::now();
    let mut tick = tokio::time::interval(PRODUCE_EVERY);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut sent: u64 = 0;
    // Tokens tell the producers' jobs apart: the producer's number in the top bits.
    let mut token = stream << 48;
    let misbehaving: Vec<Behaviour> = config
        .mix
        .iter()
        .map(|(b, _)| *b)
        .filter(|b| *b != Behaviour::Normal)
        .collect();
    let mut seen: HashSet<Behaviour> = HashSet::new();
    let mut second = Instant::now();
    let mut cancellers = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let due = (rate * started.elapsed().as_secs_f64()) as u64;
        let n = due.saturating_sub(sent).min(MAX_BATCH);
        sent += n;
        let mut behaviours: Vec<Behaviour> = (0..n).map(|_| pick(&config.mix, &mut rng)).collect();
        if config.every_misbehaviour_each_second && stream == 0 {
            seen.extend(behaviours.iter().copied());
            if second.elapsed() >= Duration::from_secs(1) {
                second = Instant::now();
                behaviours.extend(misbehaving.iter().filter(|b| !seen.contains(b)));
                seen.clear();
            }
        }
        let mut batch = Vec::with_capacity(behaviours.len());
        let mut tokens = Vec::with_capacity(behaviours.len());
        for behaviour in behaviours {
            token += 1;
            let mut job = behaviour
                .job(&config.kind, &config.queue, token, &config.timings)
                .max_attempts(config.max_attempts);
            if let Some(timeout) = config.healthy_timeout {
                if behaviour != Behaviour::Overrun && token.is_multiple_of(4) {
                    job = job.run_timeout(timeout);
                }
            }
            if behaviour == Behaviour::Cancelled {
                cancellers.spawn(enqueue_and_cancel(shared.clone(), job, token));
                continue;
            }
            if rng.below(100) < config.scheduled_percent {
                let (from, to) = config.due_in;
                job = job.run_in(from + (to.saturating_sub(from)).mul_f64(rng.unit()));
            }
            batch.push(job);
            tokens.push(token);
        }
        if batch.is_empty() {
            continue;
        }
        match shared.queue.enqueue_batch(&batch).await {
            Ok(ids) => {
                ledger.add("enqueued", ids.len() as u64);
                if ids.len() != batch.len() {
                    ledger.unexpected(format!(
                        "enqueue_batch of {} jobs made {}",
                        batch.len(),
                        ids.len()
                    ));
                }
                ledger.note(|b| b.acked.extend(tokens));
            }
            Err(e) => {
                ledger.note(|b| b.unacked.extend(tokens));
                ledger.error("enqueue", e);
            }
        }
        while cancellers.try_join_next().is_some() {}
    }
    // Pending cancellations still happen after production stops.
    while cancellers.join_next().await.is_some() {}
}

/// Enqueues a job of the `Cancelled` behaviour alone (so that its id is known), due in 2 s,
/// and cancels it 300 ms later.
async fn enqueue_and_cancel(shared: Arc<Shared>, job: NewJob, token: u64) {
    let ledger = &shared.ledger;
    let enqueued = match shared
        .queue
        .enqueue(&job.run_in(Duration::from_secs(2)))
        .await
    {
        Ok(enqueued) => {
            ledger.count("enqueued");
            ledger.note(|b| {
                b.acked.insert(token);
            });
            enqueued
        }
        Err(e) => {
            ledger.note(|b| {
                b.unacked.insert(token);
            });
            ledger.error("enqueue", e);
            return;
        }
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let deadline = Instant::now() + PERSIST_FOR;
    loop {
        match shared.queue.cancel(enqueued.id()).await {
            Ok(true) => ledger.count("cancelled_by_producer"),
            Ok(false) => ledger.count("cancel_too_late"),
            Err(e) if Instant::now() < deadline => {
                ledger.error("cancel", e);
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(e) => ledger.unexpected(format!(
                "could not cancel job {} within {PERSIST_FOR:?}: {e}",
                enqueued.id()
            )),
        }
        break;
    }
}

/// One run, acted out by the behaviour in its args.
async fn act(
    shared: Arc<Shared>,
    worker: usize,
    job: Job,
    ctx: JobContext,
) -> Result<Done, JobError> {
    let behaviour = Behaviour::of(&job);
    let (lease, attempt) = (job.lease, job.attempt);
    let run = (lease.job_id, attempt);
    shared.held().insert(
        lease,
        HeldRun {
            attempt,
            behaviour,
            worker,
            unsure: false,
        },
    );
    shared.ledger.count("claimed");
    shared.ledger.note(|b| {
        b.claimed.insert(run);
    });
    let t = &shared.config.timings;
    let work = || {
        let (from, to) = t.work;
        let spread = to.saturating_sub(from).as_micros() as u64;
        from + Duration::from_micros(Rng::new(lease.run_lease as u64).below(spread + 1))
    };
    if !behaviour.misbehaves(attempt) {
        tokio::time::sleep(work()).await;
        return Ok(Done::Complete);
    }
    match behaviour {
        Behaviour::Slow => {
            tokio::time::sleep(t.slow_for).await;
            Ok(Done::Complete)
        }
        Behaviour::Long => {
            tokio::time::sleep(t.long_for).await;
            Ok(Done::Complete)
        }
        Behaviour::Flaky | Behaviour::Doomed => {
            tokio::time::sleep(work()).await;
            Err(format!("{}: it went wrong", behaviour.name()).into())
        }
        Behaviour::Crash => {
            shared.ledger.count("crashed");
            if shared.config.crash_worker {
                crash_worker(&shared, worker);
            } else {
                ctx.crash();
            }
            // The crash has cancelled this run: nothing more happens here.
            std::future::pending().await
        }
        Behaviour::Overrun => {
            shared.ledger.count("overran");
            shared.ledger.note(|b| {
                b.overran.insert(run);
            });
            // Blocking, not sleeping: the worker cannot cancel the run at its deadline, so
            // the leader's deadline rescue has to.
            tokio::task::block_in_place(|| {
                std::thread::sleep(Behaviour::overrun_blocks(t));
            });
            Ok(Done::Complete)
        }
        Behaviour::Unanswered => {
            park(&shared, &ctx, run, t.unanswered_timeout).await?;
            shared.ledger.count("unanswered");
            shared.ledger.note(|b| {
                b.unanswered.insert(run);
            });
            Ok(Done::Parked)
        }
        Behaviour::Answered | Behaviour::Rejected => {
            let callback = park(&shared, &ctx, run, t.answer_timeout).await?;
            let resolution = if behaviour == Behaviour::Answered {
                Resolution::Complete
            } else {
                Resolution::Fail("the remote party said no".to_owned())
            };
            shared
                .remotes
                .spawn(remote_party(shared.clone(), run, callback, resolution));
            Ok(Done::Parked)
        }
        Behaviour::SelfCancel => {
            tokio::time::sleep(work()).await;
            let deadline = Instant::now() + PERSIST_FOR;
            loop {
                match shared.queue.cancel(lease.job_id).await {
                    Ok(_) => break,
                    Err(e) if Instant::now() < deadline => {
                        shared.ledger.error("cancel", e);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(e) => {
                        shared.ledger.unexpected(format!(
                            "could not cancel {run:?} within {PERSIST_FOR:?}: {e}"
                        ));
                        break;
                    }
                }
            }
            Ok(Done::Complete)
        }
        Behaviour::Normal | Behaviour::Cancelled => {
            tokio::time::sleep(work()).await;
            Ok(Done::Complete)
        }
    }
}

/// Parks the run on a callback. A park whose outcome is unknown (a database error) is booked
/// as unanswered: nobody can answer a callback id never received.
async fn park(
    shared: &Shared,
    ctx: &JobContext,
    run: Run,
    timeout: Duration,
) -> Result<uuid::Uuid, JobError> {
    match ctx.await_callback(timeout).await {
        Ok(callback) => Ok(callback),
        Err(e @ QueueError::LeaseLost { .. }) => Err(e.into()),
        Err(e) => {
            shared.mark_unsure(ctx.lease());
            shared.ledger.count("ambiguous_park");
            shared.ledger.note(|b| {
                b.unanswered.insert(run);
            });
            shared.ledger.error("park", &e);
            Err(e.into())
        }
    }
}

/// Resolves a callback a little after the run parked, from elsewhere, by its id; retried
/// through database errors.
async fn remote_party(shared: Arc<Shared>, run: Run, callback: uuid::Uuid, resolution: Resolution) {
    let ledger = &shared.ledger;
    tokio::select! {
        _ = shared.stop_remotes.cancelled() => return,
        _ = tokio::time::sleep(shared.config.timings.answer_after) => {}
    }
    let completes = resolution == Resolution::Complete;
    let deadline = Instant::now() + PERSIST_FOR;
    let mut unsure = false;
    loop {
        match shared
            .queue
            .resolve_callback(callback, resolution.clone())
            .await
        {
            Ok(_) => {
                if completes {
                    ledger.note(|b| *b.completions.entry(run.0).or_default() += 1);
                }
                ledger.count("answered");
            }
            Err(QueueError::CallbackNotPending(_)) if unsure => ledger.count("ambiguous_answer"),
            Err(QueueError::CallbackNotPending(_)) => {
                ledger.count("answered_too_late");
                if ledger.keep_books {
                    ledger.unexpected(format!("the callback of {run:?} was no longer pending"));
                }
            }
            Err(e) if Instant::now() < deadline => {
                unsure = true;
                ledger.error("resolve", e);
                tokio::select! {
                    _ = shared.stop_remotes.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
                continue;
            }
            Err(e) => ledger.unexpected(format!(
                "could not resolve {run:?} within {PERSIST_FOR:?}: {e}"
            )),
        }
        break;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_follow_the_shares() {
        let mix = [(Behaviour::Crash, 3), (Behaviour::Flaky, 5)];
        let mut rng = Rng::new(7);
        let mut counts: HashMap<Behaviour, u64> = HashMap::new();
        for _ in 0..100_000 {
            *counts.entry(pick(&mix, &mut rng)).or_default() += 1;
        }
        let share = |b| counts.get(&b).copied().unwrap_or(0) as f64 / 100_000.0;
        assert!((0.02..0.04).contains(&share(Behaviour::Crash)));
        assert!((0.04..0.06).contains(&share(Behaviour::Flaky)));
        assert!((0.90..0.94).contains(&share(Behaviour::Normal)));
    }
}
