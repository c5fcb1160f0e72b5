//! The chaos suite's workload: a producer of jobs of every behaviour, workers that run them
//! (and crash, and are replaced) and remote parties answering callbacks, keeping their own
//! books ([`Ledger`]) of what they were told happened, for `audit::verify` to compare with the
//! database.

use serde_json::json;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use steward_queue::{ClaimedJob, FailOutcome, Lease, NewJob, Queue, QueueError, Resolution};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub const QUEUE: &str = "chaos";
pub const KIND: &str = "chaos.work";
/// Small, so that a job that keeps misbehaving ends up `failed` within seconds.
pub const MAX_ATTEMPTS: i32 = 3;

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
