//! A worker for Steward's queue. Register an async handler per job kind and the queues to
//! work, with their concurrency; the worker claims jobs of those kinds in batches, runs each as
//! its own task under its run timeout, and writes each outcome before the next job takes its
//! slot.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use steward_worker::{Done, Worker};
//! let target = steward_connection::Target::new("postgres://app@db/app", Default::default())?;
//! let worker = Worker::builder(target)
//!     .queue("default", 20)
//!     .handler("email.send", |job, _ctx| async move {
//!         println!("sending {}", job.args);
//!         Ok(Done::Complete)
//!     })
//!     .start()
//!     .await?;
//! tokio::signal::ctrl_c().await?;
//! worker.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! Three rules shape it (see `adr/0002-worker-heartbeats.md`):
//! - **Heartbeats never wait behind ownership writes.** Claims and the writes that finish a run
//!   share a small pool; heartbeats go out on a session of their own, one statement for every
//!   live run per interval, written behind the jobs' backs ([`heartbeat`](crate)).
//! - **Ownership writes stay synchronous.** A run's slot is freed only once its outcome is
//!   durably written; concurrent outcomes share one statement per flush.
//! - **Nothing stops silently.** Every task of the worker runs under a supervisor that logs,
//!   counts and restarts it; a watchdog stops claims and then cancels running jobs when
//!   heartbeats stop succeeding, before the leader would rescue their runs.

mod handler;
mod heartbeat;
pub mod names;
mod writer;

pub use handler::{Done, JobContext, JobError};
pub use steward_queue::ClaimedJob as Job;
pub use steward_queue::Lease;

use chrono::Utc;
use futures_util::FutureExt;
use handler::Handler;
use heartbeat::{Heartbeats, Leases, Timing};
use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use steward_connection::Target;
use steward_queue::{available_channel, Failure, Queue, RetryPolicy};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use writer::{Writer, Written};

/// A worker's settings. Defaults suit the leader's defaults (a 30 s staleness).
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerSettings {
    /// Every live run's heartbeat is renewed this often. At most a third of the leader's
    /// staleness, so that two missed flushes still leave the run alive.
    pub heartbeat_interval: Duration,
    /// The staleness to assume when no leader has published one yet.
    pub assumed_staleness: Duration,
    /// Jobs claimed per statement, at most (never more than the free slots).
    pub claim_batch: i64,
    /// A queue is polled this often when no NOTIFY says jobs became available.
    pub poll_interval: Duration,
    /// On shutdown, running jobs may finish for this long; then they are cancelled and their
    /// runs handed back.
    pub shutdown_grace: Duration,
    /// Sessions for claims and for the writes that finish runs. Heartbeats and NOTIFYs each
    /// have a session of their own besides.
    pub pool_size: usize,
    /// How rescued jobs back off, as the client's `fail` does.
    pub retry: RetryPolicy,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(10),
            assumed_staleness: Duration::from_secs(30),
            claim_batch: 100,
            poll_interval: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(10),
            pool_size: 2,
            retry: RetryPolicy::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("invalid worker settings: {0}")]
    Invalid(String),
    #[error(
        "heartbeat_interval {interval:?} is more than a third of the staleness {staleness:?} \
         ({origin}): a run would be rescued after two missed heartbeats; use at most {max:?}"
    )]
    HeartbeatTooSlow {
        interval: Duration,
        staleness: Duration,
        max: Duration,
        /// Where the staleness comes from.
        origin: &'static str,
    },
    #[error(transparent)]
    Connect(#[from] steward_connection::ConnectError),
    #[error(transparent)]
    Queue(#[from] steward_queue::QueueError),
}

/// Whether the worker can vouch for its runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Health {
    Healthy,
    /// Heartbeats have failed for this long (at least half the staleness): claims are paused.
    HeartbeatsFailing {
        for_: Duration,
    },
}

/// What shutdown did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Runs still going when the grace period ended, cancelled and handed back.
    pub released: usize,
}

/// How one run ended for the worker, once its outcome was written (or could not be). The
/// label of [`names::JOBS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Completed: the database accepted the completion.
    Completed,
    /// The attempt failed and the job will run again.
    Retried,
    /// The job failed for good.
    Failed,
    Snoozed,
    /// Parked on a callback; the run is no longer this worker's.
    Parked,
    /// The database refused the outcome (or the heartbeat): the lease was lost to a rescue, a
    /// cancellation or another claim.
    Refused,
    /// Handed back at shutdown, after the grace period.
    Released,
    /// Given up without a word to the database: heartbeats failed for the staleness (the
    /// watchdog), or a test crashed the run. The leader rescues it.
    Abandoned,
    /// The outcome could not be written (the database was unreachable); the leader rescues
    /// the run.
    Unwritten,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Retried => "retried",
            Outcome::Failed => "failed",
            Outcome::Snoozed => "snoozed",
            Outcome::Parked => "parked",
            Outcome::Refused => "refused",
            Outcome::Released => "released",
            Outcome::Abandoned => "abandoned",
            Outcome::Unwritten => "unwritten",
        }
    }
}

/// Told each run's outcome, after it is written: for an application's own books or logs.
type OnOutcome = Arc<dyn Fn(Lease, Outcome) + Send + Sync>;

pub struct WorkerBuilder {
    target: Target,
    queues: Vec<(String, usize)>,
    handlers: HashMap<String, Arc<dyn Handler>>,
    settings: WorkerSettings,
    on_outcome: Option<OnOutcome>,
}

impl WorkerBuilder {
    /// Work `queue` with at most `concurrency` jobs at a time.
    pub fn queue(mut self, queue: impl Into<String>, concurrency: usize) -> Self {
        self.queues.push((queue.into(), concurrency));
        self
    }

    /// Run jobs of `kind` with `handler`. Its `Err` fails the attempt: the job retries with
    /// backoff while attempts remain. A panic does the same and never stops the worker.
    pub fn handler<F, Fut>(mut self, kind: impl Into<String>, handler: F) -> Self
    where
        F: Fn(Job, JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Done, JobError>> + Send + 'static,
    {
        self.handlers.insert(kind.into(), Arc::new(handler));
        self
    }

    pub fn settings(mut self, settings: WorkerSettings) -> Self {
        self.settings = settings;
        self
    }

    /// Calls `observe` with every run's [`Outcome`] once it is known (after the write), from
    /// the run's own task: keep it quick.
    pub fn on_outcome<F>(mut self, observe: F) -> Self
    where
        F: Fn(Lease, Outcome) + Send + Sync + 'static,
    {
        self.on_outcome = Some(Arc::new(observe));
        self
    }

    /// Checks the settings against the leader's published staleness and starts working.
    pub async fn start(self) -> Result<Worker, WorkerError> {
        let s = &self.settings;
        let problems: Vec<&str> = [
            (self.queues.is_empty(), "no queue to work"),
            (self.handlers.is_empty(), "no handler"),
            (
                self.queues.iter().any(|(_, c)| *c == 0),
                "a queue's concurrency is 0",
            ),
            (s.heartbeat_interval.is_zero(), "heartbeat_interval is 0"),
            (s.poll_interval.is_zero(), "poll_interval is 0"),
            (s.claim_batch < 1, "claim_batch is below 1"),
            (s.pool_size == 0, "pool_size is 0"),
        ]
        .into_iter()
        .filter_map(|(bad, what)| bad.then_some(what))
        .collect();
        if !problems.is_empty() {
            return Err(WorkerError::Invalid(problems.join("; ")));
        }
        let name = instance_name();
        let queue = Queue::new(
            self.target
                .named(&format!("steward-worker:{name}:claim"))
                .pool(s.pool_size)?,
        )
        .with_retry_policy(s.retry);
        let (staleness, source) = match queue.published_staleness().await? {
            Some(published) => (published, "published by the leader"),
            None => (s.assumed_staleness, "assumed: no leader has published one"),
        };
        let max = staleness / 3;
        if s.heartbeat_interval > max {
            return Err(WorkerError::HeartbeatTooSlow {
                interval: s.heartbeat_interval,
                staleness,
                max,
                origin: source,
            });
        }
        let timing = Timing {
            interval: s.heartbeat_interval,
            flush_timeout: s.heartbeat_interval / 2,
            retry_min: (s.heartbeat_interval / 10).min(Duration::from_millis(100)),
            staleness,
        };
        // Liveness writes need no durability: a lost heartbeat is renewed by the next flush.
        let heartbeat_target = self
            .target
            .named(&format!("steward-worker:{name}:heartbeat"))
            .with_setting("synchronous_commit", "off")
            .with_setting(
                "statement_timeout",
                format!("{}ms", timing.flush_timeout.as_millis().max(1)),
            );
        let schema = self.target.schema().to_string();
        let leases = Arc::new(Leases::new(schema.clone()));
        let heartbeats = Arc::new(Heartbeats::new(heartbeat_target, leases.clone(), timing));
        let stop = CancellationToken::new();
        let stop_claiming = CancellationToken::new();
        let (writer, writer_task) = Writer::start(queue.clone(), schema.clone(), stop.clone());
        // Claims take only the kinds this worker has a handler for.
        let mut kinds: Vec<String> = self.handlers.keys().cloned().collect();
        kinds.sort();
        let shared = Arc::new(Shared {
            queue: queue.clone(),
            handlers: self.handlers,
            kinds,
            leases,
            heartbeats: heartbeats.clone(),
            writer,
            jobs: TaskTracker::new(),
            hard_stop: AtomicBool::new(false),
            claims: std::sync::atomic::AtomicU64::new(0),
            on_outcome: self.on_outcome,
            schema: schema.clone(),
        });
        let mut tasks = vec![writer_task];
        tasks.push(tokio::spawn(heartbeat::supervise(
            heartbeats.clone(),
            stop.clone(),
        )));
        tasks.push(tokio::spawn(keep_running(
            "watchdog",
            schema.clone(),
            stop.clone(),
            {
                let (heartbeats, stop) = (heartbeats.clone(), stop.clone());
                move || heartbeat::watchdog(heartbeats.clone(), stop.clone())
            },
        )));
        let wakes: HashMap<String, Arc<Notify>> = self
            .queues
            .iter()
            .map(|(q, _)| (q.clone(), Arc::new(Notify::new())))
            .collect();
        tasks.push(tokio::spawn(keep_running(
            "listener",
            schema.clone(),
            stop.clone(),
            {
                let target = self.target.named(&format!("steward-worker:{name}:listen"));
                let (wakes, stop) = (wakes.clone(), stop.clone());
                move || listen(target.clone(), wakes.clone(), stop.clone())
            },
        )));
        for (queue_name, concurrency) in &self.queues {
            let claimer = Claimer {
                shared: shared.clone(),
                queue: queue_name.clone(),
                slots: Arc::new(Semaphore::new(*concurrency)),
                wake: wakes[queue_name].clone(),
                batch: s.claim_batch,
                poll: s.poll_interval,
                stop: stop_claiming.clone(),
            };
            let claimer = Arc::new(claimer);
            tasks.push(tokio::spawn(keep_running(
                "claimer",
                schema.clone(),
                stop_claiming.clone(),
                move || claimer.clone().run(),
            )));
        }
        tracing::info!(worker = %name, queues = ?self.queues.iter().map(|(q, _)| q).collect::<Vec<_>>(), kinds = ?shared.kinds, heartbeat_interval = ?s.heartbeat_interval, staleness = ?staleness, staleness_source = source, "worker started");
        Ok(Worker {
            name,
            shared,
            stop,
            stop_claiming,
            tasks,
            grace: s.shutdown_grace,
        })
    }
}

/// A running worker. Dropping it stops nothing; call [`Worker::shutdown`].
pub struct Worker {
    name: String,
    shared: Arc<Shared>,
    stop: CancellationToken,
    stop_claiming: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    grace: Duration,
}

struct Shared {
    queue: Queue,
    handlers: HashMap<String, Arc<dyn Handler>>,
    kinds: Vec<String>,
    leases: Arc<Leases>,
    heartbeats: Arc<Heartbeats>,
    writer: Writer,
    jobs: TaskTracker,
    /// Set when shutdown's grace period is over: cancelled jobs are handed back, not failed.
    hard_stop: AtomicBool,
    /// Claim statements that have returned, over all queues.
    claims: std::sync::atomic::AtomicU64,
    on_outcome: Option<OnOutcome>,
    /// The schema of the worker's target, the `schema` label of every metric.
    schema: String,
}

impl Worker {
    pub fn builder(target: Target) -> WorkerBuilder {
        WorkerBuilder {
            target,
            queues: Vec::new(),
            handlers: HashMap::new(),
            settings: WorkerSettings::default(),
            on_outcome: None,
        }
    }

    /// This worker's name (host-pid-random), in its sessions' application_name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The queue client the worker claims and writes with.
    pub fn queue(&self) -> &Queue {
        &self.shared.queue
    }

    pub fn health(&self) -> Health {
        let age = self.shared.heartbeats.age();
        if *self.shared.heartbeats.paused().borrow() {
            Health::HeartbeatsFailing { for_: age }
        } else {
            Health::Healthy
        }
    }

    /// Claim statements that have returned so far, over all queues.
    pub fn claims(&self) -> u64 {
        self.shared.claims.load(Ordering::SeqCst)
    }

    /// Runs this worker holds right now.
    pub fn running(&self) -> usize {
        self.shared.leases.snapshot().len()
    }

    /// Asks for a heartbeat flush now (it still keeps its minimum gap from the last one).
    pub fn heartbeat_now(&self) {
        self.shared
            .heartbeats
            .schedule
            .wake_at(tokio::time::Instant::now());
    }

    /// Fault injection for tests: the next heartbeat flush hangs or panics.
    #[cfg(feature = "fault-injection")]
    pub fn faults(&self) -> &Faults {
        &self.shared.heartbeats.faults
    }

    /// Fault injection for tests: every run this worker holds is dropped as a crashed
    /// process would drop it (no more heartbeats, no outcome written; [`Outcome::Abandoned`]),
    /// and the worker goes on claiming, as the process that replaces it would. Returns the
    /// runs crashed.
    #[cfg(feature = "fault-injection")]
    pub fn crash_runs(&self) -> Vec<Lease> {
        self.shared.leases.crash_all()
    }

    /// Stops claiming, lets running jobs finish within the grace period (their heartbeats go
    /// on), then cancels the rest and hands their runs back at once, rather than leaving them
    /// for the rescue.
    pub async fn shutdown(self) -> ShutdownReport {
        tracing::info!(worker = %self.name, grace = ?self.grace, running = self.running(), "worker shutting down: no new claims");
        self.stop_claiming.cancel();
        let jobs = &self.shared.jobs;
        jobs.close();
        let mut report = ShutdownReport::default();
        if tokio::time::timeout(self.grace, jobs.wait()).await.is_err() {
            self.shared.hard_stop.store(true, Ordering::SeqCst);
            let leases = self.shared.leases.snapshot();
            self.shared.leases.cancel_all();
            jobs.wait().await;
            match self
                .shared
                .queue
                .release_many(&leases, "the worker shut down before the run finished")
                .await
            {
                Ok(released) => {
                    report.released = released.len();
                    tracing::info!(
                        released = released.len(),
                        "handed back the runs still going after the grace period"
                    );
                }
                Err(error) => {
                    tracing::error!(%error, runs = leases.len(), "could not hand the runs back; they will be rescued after the staleness")
                }
            }
        }
        self.stop.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
        tracing::info!(worker = %self.name, "worker stopped");
        report
    }
}

/// Runs `make()` until `stop`; a task that ends or panics while the worker runs is logged,
/// counted (under the worker's `schema`) and started again.
async fn keep_running<F, Fut>(task: &'static str, schema: String, stop: CancellationToken, make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut restart_in = Duration::from_millis(100);
    loop {
        let ended = tokio::spawn(make()).await;
        if stop.is_cancelled() {
            return;
        }
        let reason = match ended {
            Ok(()) => "it returned".to_owned(),
            Err(e) if e.is_panic() => "it panicked".to_owned(),
            Err(e) => e.to_string(),
        };
        tracing::error!(task, %reason, "a worker task stopped; restarting it");
        metrics::counter!(names::TASK_RESTARTS, names::SCHEMA => schema.clone(), "task" => task)
            .increment(1);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(restart_in) => {}
        }
        restart_in = (restart_in * 2).min(Duration::from_secs(5));
    }
}

/// Listens on the available channel and wakes the claimer of the queue each NOTIFY names.
async fn listen(target: Target, wakes: HashMap<String, Arc<Notify>>, stop: CancellationToken) {
    let channel = available_channel(target.schema());
    let mut retry_in = Duration::from_millis(100);
    loop {
        let listening = async {
            let (client, notifications) = target.listen().await.map_err(|e| e.to_string())?;
            client
                .batch_execute(&format!("LISTEN {channel}"))
                .await
                .map_err(|e| steward_connection::describe_pg_error(&e))?;
            Ok::<_, String>((client, notifications))
        };
        let (_client, mut notifications) = tokio::select! {
            _ = stop.cancelled() => return,
            listening = listening => match listening {
                Ok(listening) => listening,
                Err(error) => {
                    tracing::warn!(%error, retry_in = ?retry_in, "cannot listen for available jobs; claims poll meanwhile");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(retry_in) => {}
                    }
                    retry_in = (retry_in * 2).min(Duration::from_secs(5));
                    continue;
                }
            },
        };
        retry_in = Duration::from_millis(100);
        // Notifications may have been missed while not listening.
        wakes.values().for_each(|w| w.notify_one());
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                notification = notifications.recv() => match notification {
                    // The payload is the queue (see wake_workers).
                    Some(notification) => {
                        if let Some(wake) = wakes.get(&notification.payload) {
                            wake.notify_one();
                        }
                    }
                    None => break,
                },
            }
        }
        tracing::warn!("the session listening for available jobs ended; listening again");
    }
}

struct Claimer {
    shared: Arc<Shared>,
    queue: String,
    /// One permit per job this queue may run at once.
    slots: Arc<Semaphore>,
    wake: Arc<Notify>,
    batch: i64,
    poll: Duration,
    stop: CancellationToken,
}

impl Claimer {
    /// Claims whenever a slot is free and jobs may be waiting: at a NOTIFY, at the poll, or at
    /// once after a claim that filled every free slot.
    async fn run(self: Arc<Self>) {
        let mut paused = self.shared.heartbeats.paused();
        let mut retry_in = Duration::from_millis(100);
        loop {
            if *paused.borrow_and_update() {
                tokio::select! {
                    _ = self.stop.cancelled() => return,
                    _ = paused.changed() => continue,
                }
            }
            let first = tokio::select! {
                _ = self.stop.cancelled() => return,
                permit = self.slots.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
            };
            let mut permits = vec![first];
            while (permits.len() as i64) < self.batch {
                match self.slots.clone().try_acquire_owned() {
                    Ok(permit) => permits.push(permit),
                    Err(_) => break,
                }
            }
            let asked = permits.len();
            let claimed = self
                .shared
                .queue
                .claim_kinds(&self.queue, Some(&self.shared.kinds), asked as i64)
                .await;
            self.shared.claims.fetch_add(1, Ordering::SeqCst);
            let full = match claimed {
                Ok(jobs) => {
                    retry_in = Duration::from_millis(100);
                    let full = jobs.len() == asked;
                    let now = Utc::now();
                    for job in jobs {
                        let lag = (now - job.run_at).to_std().unwrap_or_default();
                        metrics::histogram!(
                            names::PICKUP_LAG,
                            names::SCHEMA => self.shared.schema.clone(),
                            "queue" => self.queue.clone()
                        )
                        .record(lag.as_secs_f64());
                        // One permit per claimed job; the claim never returns more than asked.
                        if let Some(permit) = permits.pop() {
                            self.spawn(job, permit);
                        }
                    }
                    full
                }
                Err(error) => {
                    tracing::warn!(queue = %self.queue, %error, retry_in = ?retry_in, "claiming failed; retrying");
                    drop(permits);
                    tokio::select! {
                        _ = self.stop.cancelled() => return,
                        _ = tokio::time::sleep(retry_in) => {}
                    }
                    retry_in = (retry_in * 2).min(self.poll.max(Duration::from_secs(1)));
                    continue;
                }
            };
            drop(permits);
            if full {
                continue;
            }
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(self.poll) => {}
            }
        }
    }

    fn spawn(&self, job: Job, permit: OwnedSemaphorePermit) {
        let shared = self.shared.clone();
        let queue = self.queue.clone();
        self.shared.jobs.spawn(async move {
            let lease = job.lease;
            let outcome = run_job(&shared, job).await;
            metrics::counter!(
                names::JOBS,
                names::SCHEMA => shared.schema.clone(),
                "queue" => queue,
                "outcome" => outcome.as_str()
            )
            .increment(1);
            if let Some(observe) = &shared.on_outcome {
                observe(lease, outcome);
            }
            drop(permit);
        });
    }
}

/// How a handler's run ended.
enum Ran {
    Done(Done),
    Error(String),
    Panic(String),
    Timeout,
    Cancelled,
}

/// Runs one job to its written outcome.
async fn run_job(shared: &Shared, job: Job) -> Outcome {
    let lease = job.lease;
    let cancel = CancellationToken::new();
    let crashed = Arc::new(AtomicBool::new(false));
    let _registered = shared
        .leases
        .register(lease, cancel.clone(), crashed.clone());
    let Some(handler) = shared.handlers.get(&job.kind).cloned() else {
        // Claims filter by kind, so this is a bug; fail the attempt rather than hold the run.
        return finish_failed(shared, lease, "no handler for this kind", "error").await;
    };
    let ctx = JobContext {
        lease,
        cancel: cancel.clone(),
        queue: shared.queue.clone(),
        parked: Arc::new(AtomicBool::new(false)),
        crashed: crashed.clone(),
    };
    let parked = ctx.parked.clone();
    let time_left = job
        .deadline_at
        .and_then(|deadline| (deadline - Utc::now()).to_std().ok());
    let started = std::time::Instant::now();
    let queue = job.queue.clone();
    let run = AssertUnwindSafe(handler.call(job, ctx)).catch_unwind();
    let ran = tokio::select! {
        result = run => match result {
            Ok(Ok(done)) => Ran::Done(done),
            Ok(Err(error)) => Ran::Error(error.to_string()),
            Err(panic) => Ran::Panic(heartbeat::panic_message(&panic)),
        },
        _ = cancel.cancelled() => Ran::Cancelled,
        _ = sleep_or_forever(time_left) => Ran::Timeout,
    };
    metrics::histogram!(names::JOB_DURATION, names::SCHEMA => shared.schema.clone(), "queue" => queue)
        .record(started.elapsed().as_secs_f64());
    // A crashed run (fault injection) writes nothing, whatever its handler got to.
    if crashed.load(Ordering::SeqCst) {
        return Outcome::Abandoned;
    }
    match ran {
        Ran::Done(Done::Complete) => match shared.writer.complete(lease).await {
            Ok(Written::Completed) => Outcome::Completed,
            Ok(_) => refused(lease),
            Err(error) => write_failed(lease, &error),
        },
        Ran::Done(Done::Fail(error)) => finish(shared, lease, error, "error", true).await,
        Ran::Done(Done::Snooze(delay)) => match shared.queue.snooze(lease, delay).await {
            Ok(_) => Outcome::Snoozed,
            Err(steward_queue::QueueError::LeaseLost { .. }) => refused(lease),
            Err(error) => write_failed(lease, &error.to_string()),
        },
        Ran::Done(Done::Parked) if parked.load(Ordering::SeqCst) => Outcome::Parked,
        Ran::Done(Done::Parked) => {
            finish_failed(
                shared,
                lease,
                "the handler returned Parked without parking the run (JobContext::await_callback)",
                "error",
            )
            .await
        }
        Ran::Error(error) => finish(shared, lease, error, "error", false).await,
        Ran::Panic(message) => {
            tracing::error!(job_id = lease.job_id, panic = %message, "a handler panicked; failing the attempt");
            finish(
                shared,
                lease,
                format!("panicked: {message}"),
                "panic",
                false,
            )
            .await
        }
        Ran::Timeout => {
            finish_failed(
                shared,
                lease,
                "the run did not finish by its deadline",
                "timeout",
            )
            .await
        }
        Ran::Cancelled if shared.hard_stop.load(Ordering::SeqCst) => Outcome::Released,
        Ran::Cancelled if parked.load(Ordering::SeqCst) => Outcome::Parked,
        Ran::Cancelled if shared.heartbeats.age() >= shared.heartbeats.timing.staleness => {
            Outcome::Abandoned
        }
        Ran::Cancelled => Outcome::Refused,
    }
}

async fn sleep_or_forever(time: Option<Duration>) {
    match time {
        Some(time) => tokio::time::sleep(time).await,
        None => std::future::pending().await,
    }
}

async fn finish_failed(
    shared: &Shared,
    lease: Lease,
    error: &str,
    reason: &'static str,
) -> Outcome {
    finish(shared, lease, error.to_owned(), reason, false).await
}

async fn finish(
    shared: &Shared,
    lease: Lease,
    error: String,
    reason: &'static str,
    permanent: bool,
) -> Outcome {
    let failure = Failure {
        lease,
        error,
        reason,
        permanent,
    };
    match shared.writer.fail(failure).await {
        Ok(Written::Failed(steward_queue::FailOutcome::Failed)) => Outcome::Failed,
        Ok(Written::Failed(_)) => Outcome::Retried,
        Ok(_) => refused(lease),
        Err(error) => write_failed(lease, &error),
    }
}

fn refused(lease: Lease) -> Outcome {
    tracing::warn!(
        job_id = lease.job_id,
        run_lease = lease.run_lease,
        "the run's outcome was refused: its lease was lost (rescued, cancelled or claimed again)"
    );
    Outcome::Refused
}

fn write_failed(lease: Lease, error: &str) -> Outcome {
    tracing::error!(job_id = lease.job_id, %error, "could not write the run's outcome; it will be rescued");
    Outcome::Unwritten
}

fn instance_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().chars().take(24).collect::<String>())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".to_owned());
    format!("{host}-{}-{:04x}", std::process::id(), rand_u16())
}

fn rand_u16() -> u16 {
    uuid::Uuid::new_v4().as_u128() as u16
}

/// Faults a test can inject into the next heartbeat flush.
#[cfg(feature = "fault-injection")]
#[derive(Default)]
pub struct Faults {
    hang: std::sync::Mutex<Option<Duration>>,
    panic: AtomicBool,
}

#[cfg(feature = "fault-injection")]
impl Faults {
    /// The next flush hangs for `how_long` before it starts.
    pub fn hang_next_flush(&self, how_long: Duration) {
        *self.hang.lock().unwrap_or_else(|p| p.into_inner()) = Some(how_long);
    }

    /// The next flush panics.
    pub fn panic_next_flush(&self) {
        self.panic.store(true, Ordering::SeqCst);
    }

    pub(crate) async fn before_flush(&self) {
        let hang = self.hang.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(how_long) = hang {
            tokio::time::sleep(how_long).await;
        }
        if self.panic.swap(false, Ordering::SeqCst) {
            panic!("injected heartbeat panic");
        }
    }
}
