//! Write-behind heartbeats. Starting a run registers its lease here; one loop renews every live
//! lease with one statement per interval on a session of its own, which claims and completions
//! never use, so liveness never waits behind an ownership write. The job's own path never
//! waits for a heartbeat.
//!
//! The rules that keep it from stopping silently:
//! - the next flush is armed before the current one runs, so a flush that fails, hangs (it is
//!   bounded by a timeout) or panics cannot leave the loop without a next tick;
//! - a wake request for an earlier time replaces a later pending one and is never dropped;
//! - the loop runs under a supervisor that restarts it if it ever exits, and each run of it
//!   owns a generation: only the current generation records a flush, so an abandoned run
//!   cannot speak for the live one;
//! - a watchdog, separate from the loop, stops claims when no flush has succeeded for half the
//!   staleness and cancels the running jobs at the staleness (they are about to be rescued).

use crate::names;
use futures_util::FutureExt;
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use steward_connection::{describe_pg_error, Target};
use steward_queue::{heartbeat_leases, Lease};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means a holder panicked; the data is still consistent (each
    // critical section is a single insert, remove or assignment).
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// A run this worker holds: the token that cancels its job, and whether a test crashed it.
pub(crate) struct Held {
    cancel: CancellationToken,
    #[cfg_attr(not(feature = "fault-injection"), allow(dead_code))]
    crashed: Arc<std::sync::atomic::AtomicBool>,
}

/// The runs this worker holds.
pub(crate) struct Leases {
    held: Mutex<HashMap<Lease, Held>>,
    /// The worker's schema, the `schema` label of the lease metrics.
    schema: String,
}

impl Leases {
    pub fn new(schema: String) -> Self {
        Self {
            held: Mutex::default(),
            schema,
        }
    }

    /// Registers a run; it is renewed until the returned guard is dropped.
    pub fn register(
        self: &Arc<Self>,
        lease: Lease,
        cancel: CancellationToken,
        crashed: Arc<std::sync::atomic::AtomicBool>,
    ) -> LeaseGuard {
        let count = {
            let mut leases = lock(&self.held);
            leases.insert(lease, Held { cancel, crashed });
            leases.len()
        };
        metrics::gauge!(names::LEASES, names::SCHEMA => self.schema.clone()).set(count as f64);
        LeaseGuard {
            leases: self.clone(),
            lease,
        }
    }

    pub fn snapshot(&self) -> Vec<Lease> {
        lock(&self.held).keys().copied().collect()
    }

    /// The database refused `lease`: cancel its job, which stops renewing it.
    fn lose(&self, lease: Lease) {
        if let Some(Held { cancel, .. }) = lock(&self.held).remove(&lease) {
            tracing::warn!(
                job_id = lease.job_id,
                run_lease = lease.run_lease,
                "the run's lease was lost (rescued, cancelled or claimed again); cancelling the job"
            );
            metrics::counter!(names::LEASES_LOST, names::SCHEMA => self.schema.clone())
                .increment(1);
            cancel.cancel();
        }
    }

    /// Cancels every job (the worker can no longer vouch for them).
    pub fn cancel_all(&self) -> usize {
        let leases = lock(&self.held);
        leases.values().for_each(|held| held.cancel.cancel());
        leases.len()
    }

    /// Crashes every run held now (fault injection): see `JobContext::crash`.
    #[cfg(feature = "fault-injection")]
    pub fn crash_all(&self) -> Vec<Lease> {
        let leases = lock(&self.held);
        for held in leases.values() {
            held.crashed
                .store(true, std::sync::atomic::Ordering::SeqCst);
            held.cancel.cancel();
        }
        leases.keys().copied().collect()
    }

    fn len(&self) -> usize {
        lock(&self.held).len()
    }
}

/// Keeps a lease registered while it lives.
pub(crate) struct LeaseGuard {
    leases: Arc<Leases>,
    lease: Lease,
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        let count = {
            let mut leases = lock(&self.leases.held);
            leases.remove(&self.lease);
            leases.len()
        };
        metrics::gauge!(names::LEASES, names::SCHEMA => self.leases.schema.clone())
            .set(count as f64);
    }
}

/// When the next flush is due. Arming sets it; a wake request can only bring it forward.
pub(crate) struct Schedule {
    times: Mutex<Times>,
    changed: Notify,
    /// Flushes never follow each other closer than this, however many wake requests come.
    min_gap: Duration,
}

struct Times {
    next: Instant,
    last_start: Option<Instant>,
}

impl Schedule {
    pub fn new(first: Instant, min_gap: Duration) -> Self {
        Self {
            times: Mutex::new(Times {
                next: first,
                last_start: None,
            }),
            changed: Notify::new(),
            min_gap,
        }
    }

    /// Asks for a flush at `at` or sooner: replaces a later pending time, never a sooner one.
    pub fn wake_at(&self, at: Instant) {
        let mut times = lock(&self.times);
        let at = match times.last_start {
            Some(last) => at.max(last + self.min_gap),
            None => at,
        };
        if at < times.next {
            times.next = at;
            // notify_one keeps a permit when the loop is not waiting: the request is not lost.
            self.changed.notify_one();
        }
    }

    /// Waits until the next flush is due, then arms the one after it (`interval` later)
    /// before returning, so that whatever happens to this flush the loop has a next tick.
    async fn next_flush(&self, interval: Duration) {
        loop {
            let at = lock(&self.times).next;
            tokio::select! {
                _ = tokio::time::sleep_until(at) => {}
                _ = self.changed.notified() => continue,
            }
            let now = Instant::now();
            let mut times = lock(&self.times);
            if times.next <= now {
                times.next = now + interval;
                times.last_start = Some(now);
                return;
            }
        }
    }
}

/// How the heartbeat loop behaves; derived from the worker's settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    pub interval: Duration,
    /// A flush without an answer this long is abandoned: its statement is cancelled and the
    /// session replaced.
    pub flush_timeout: Duration,
    /// After a failed flush the next one comes this soon, doubling up to `interval`.
    pub retry_min: Duration,
    pub staleness: Duration,
}

/// What the heartbeat loop, its supervisor and the watchdog share.
pub(crate) struct Heartbeats {
    pub leases: Arc<Leases>,
    pub schedule: Schedule,
    pub timing: Timing,
    target: Target,
    /// The generation of the loop run that may record flushes.
    generation: AtomicU64,
    last_success: Mutex<Instant>,
    /// True while claims are paused because heartbeats are failing.
    paused: watch::Sender<bool>,
    #[cfg(feature = "fault-injection")]
    pub faults: crate::Faults,
}

impl Heartbeats {
    pub fn new(target: Target, leases: Arc<Leases>, timing: Timing) -> Self {
        let now = Instant::now();
        Self {
            leases,
            schedule: Schedule::new(now + timing.interval, timing.interval / 4),
            timing,
            target,
            generation: AtomicU64::new(0),
            last_success: Mutex::new(now),
            paused: watch::channel(false).0,
            #[cfg(feature = "fault-injection")]
            faults: crate::Faults::default(),
        }
    }

    /// Time since the last successful flush.
    pub fn age(&self) -> Duration {
        lock(&self.last_success).elapsed()
    }

    pub fn paused(&self) -> watch::Receiver<bool> {
        self.paused.subscribe()
    }

    /// The `schema` label of the heartbeat metrics: the schema of the worker's target.
    fn schema(&self) -> String {
        self.target.schema().to_string()
    }

    fn is_current(&self, generation: u64) -> bool {
        self.generation.load(Ordering::SeqCst) == generation
    }

    fn succeeded(&self, generation: u64) {
        if !self.is_current(generation) {
            return;
        }
        *lock(&self.last_success) = Instant::now();
        if self
            .paused
            .send_if_modified(|paused| std::mem::replace(paused, false))
        {
            tracing::info!("heartbeats succeed again: claims resume");
            metrics::gauge!(names::CLAIMS_PAUSED, names::SCHEMA => self.schema()).set(0.0);
        }
    }
}

/// Runs the heartbeat loop until `stop`, restarting it (with a new generation) whenever it
/// exits or panics: a heartbeat must never stop while the worker runs.
pub(crate) async fn supervise(heartbeats: Arc<Heartbeats>, stop: CancellationToken) {
    let mut restart_in = heartbeats.timing.retry_min;
    loop {
        let generation = heartbeats.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let run = tokio::spawn(run(heartbeats.clone(), generation, stop.clone()));
        let ended = run.await;
        if stop.is_cancelled() {
            return;
        }
        let reason = match ended {
            Ok(()) => "it returned".to_owned(),
            Err(e) if e.is_panic() => "it panicked".to_owned(),
            Err(e) => e.to_string(),
        };
        tracing::error!(%reason, generation, "the heartbeat loop stopped; restarting it");
        metrics::counter!(names::TASK_RESTARTS, names::SCHEMA => heartbeats.schema(), "task" => "heartbeat")
            .increment(1);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(restart_in) => {}
        }
        restart_in = (restart_in * 2).min(heartbeats.timing.interval);
    }
}

/// One generation of the loop: wait for the next flush (already armed), flush, repeat.
async fn run(heartbeats: Arc<Heartbeats>, generation: u64, stop: CancellationToken) {
    let mut session: Option<tokio_postgres::Client> = None;
    let mut retry_in = heartbeats.timing.retry_min;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = heartbeats.schedule.next_flush(heartbeats.timing.interval) => {}
        }
        if !heartbeats.is_current(generation) {
            return;
        }
        // The whole flush (connecting included) is bounded, so a hung one cannot hold the loop.
        let timeout = heartbeats.timing.flush_timeout;
        let flushed = tokio::time::timeout(
            timeout,
            AssertUnwindSafe(flush(&heartbeats, &mut session, generation)).catch_unwind(),
        )
        .await;
        let failure = match flushed {
            Ok(Ok(Ok(()))) => None,
            Ok(Ok(Err(failure))) => Some(failure),
            Ok(Err(panic)) => {
                // The session may be mid-statement: start afresh.
                session = None;
                Some(Failure::Panic(panic_message(&panic)))
            }
            Err(_) => {
                // Cancel what the session runs, and open another next time.
                if let Some(client) = session.take() {
                    let cancel = client.cancel_token();
                    let target = heartbeats.target.clone();
                    tokio::spawn(async move { target.cancel(&cancel).await });
                }
                Some(Failure::Timeout(timeout))
            }
        };
        match failure {
            None => retry_in = heartbeats.timing.retry_min,
            Some(failure) => {
                metrics::counter!(names::HEARTBEAT_ERRORS, names::SCHEMA => heartbeats.schema(), "kind" => failure.kind())
                    .increment(1);
                tracing::warn!(error = %failure, retry_in = ?retry_in, leases = heartbeats.leases.len(), "heartbeat flush failed; retrying");
                heartbeats.schedule.wake_at(Instant::now() + retry_in);
                retry_in = (retry_in * 2).min(heartbeats.timing.interval);
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("cannot reach the database: {0}")]
    Connect(String),
    #[error("{0}")]
    Statement(String),
    #[error("no answer within {0:?}; cancelled the statement")]
    Timeout(Duration),
    #[error("panicked: {0}")]
    Panic(String),
}

impl Failure {
    fn kind(&self) -> &'static str {
        match self {
            Failure::Connect(_) | Failure::Statement(_) => "error",
            Failure::Timeout(_) => "timeout",
            Failure::Panic(_) => "panic",
        }
    }
}

/// Renews every live lease in one statement and cancels the jobs whose lease was refused.
async fn flush(
    heartbeats: &Heartbeats,
    session: &mut Option<tokio_postgres::Client>,
    generation: u64,
) -> Result<(), Failure> {
    #[cfg(feature = "fault-injection")]
    heartbeats.faults.before_flush().await;
    let leases = heartbeats.leases.snapshot();
    let started = std::time::Instant::now();
    if session.as_ref().is_none_or(|c| c.is_closed()) {
        *session = None;
        let client = heartbeats
            .target
            .connect()
            .await
            .map_err(|e| Failure::Connect(e.to_string()))?;
        *session = Some(client);
    }
    let Some(client) = session.as_ref() else {
        return Err(Failure::Connect("no session".to_owned()));
    };
    let report = match heartbeat_leases(client, &leases).await {
        Ok(report) => report,
        Err(e) => {
            let message = match &e {
                steward_queue::QueueError::Db(db) => describe_pg_error(db),
                other => other.to_string(),
            };
            if client.is_closed() {
                *session = None;
            }
            return Err(Failure::Statement(message));
        }
    };
    metrics::histogram!(names::HEARTBEAT_FLUSH_DURATION, names::SCHEMA => heartbeats.schema())
        .record(started.elapsed().as_secs_f64());
    heartbeats.succeeded(generation);
    for lease in report.lost {
        heartbeats.leases.lose(lease);
    }
    if !report.busy.is_empty() {
        // Held by another transaction this time (its own completion, most likely): try those
        // again soon rather than a whole interval later.
        heartbeats
            .schedule
            .wake_at(Instant::now() + heartbeats.timing.interval / 4);
    }
    Ok(())
}

/// Watches the age of the last successful flush: past half the staleness claims stop and the
/// worker reports itself unhealthy; past the staleness every running job is cancelled, since
/// the leader is about to rescue its run and finishing it would run it twice.
pub(crate) async fn watchdog(heartbeats: Arc<Heartbeats>, stop: CancellationToken) {
    let every = (heartbeats.timing.interval / 4).min(Duration::from_secs(1));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut abandoned = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let age = heartbeats.age();
        metrics::gauge!(names::HEARTBEAT_AGE, names::SCHEMA => heartbeats.schema())
            .set(age.as_secs_f64());
        let staleness = heartbeats.timing.staleness;
        if age >= staleness / 2 {
            if heartbeats
                .paused
                .send_if_modified(|paused| !std::mem::replace(paused, true))
            {
                tracing::error!(age = ?age, staleness = ?staleness, "no heartbeat has succeeded for half the staleness: claims stop until one does");
                metrics::gauge!(names::CLAIMS_PAUSED, names::SCHEMA => heartbeats.schema())
                    .set(1.0);
            }
            heartbeats.schedule.wake_at(Instant::now());
        }
        if age >= staleness && !abandoned {
            let cancelled = heartbeats.leases.cancel_all();
            tracing::error!(age = ?age, staleness = ?staleness, jobs = cancelled, "no heartbeat has succeeded for the staleness: the runs are about to be rescued; cancelled their jobs");
            abandoned = true;
        } else if age < staleness {
            abandoned = false;
        }
    }
}

pub(crate) fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Workers of two schemas in one process (one recorder) count their leases apart.
    #[test]
    fn lease_gauges_of_workers_of_different_schemas_are_apart() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let a = Arc::new(Leases::new("tenant_a".into()));
            let b = Arc::new(Leases::new("tenant_b".into()));
            let lease = |job_id| Lease {
                job_id,
                run_lease: 1,
            };
            let register = |leases: &Arc<Leases>, job_id| {
                leases.register(lease(job_id), CancellationToken::new(), Arc::default())
            };
            let _a1 = register(&a, 1);
            let _b1 = register(&b, 2);
            let b2 = register(&b, 3);
            let text = handle.render();
            for series in [
                r#"steward_worker_leases{schema="tenant_a"} 1"#,
                r#"steward_worker_leases{schema="tenant_b"} 2"#,
            ] {
                assert!(text.lines().any(|l| l == series), "{series} in {text}");
            }
            drop(b2);
            let text = handle.render();
            assert!(
                text.lines()
                    .any(|l| l == r#"steward_worker_leases{schema="tenant_b"} 1"#),
                "{text}"
            );
        });
    }

    #[tokio::test(start_paused = true)]
    async fn a_sooner_wake_replaces_a_later_timer_and_a_later_one_changes_nothing() {
        let start = Instant::now();
        let interval = Duration::from_secs(10);
        let schedule = Schedule::new(start + interval, Duration::ZERO);
        schedule.wake_at(start + Duration::from_secs(20));
        schedule.wake_at(start + Duration::from_secs(2));
        schedule.next_flush(interval).await;
        assert_eq!(Instant::now() - start, Duration::from_secs(2));
        // Armed before returning: the next flush is an interval later, whatever happens now.
        schedule.next_flush(interval).await;
        assert_eq!(Instant::now() - start, Duration::from_secs(12));
    }

    #[tokio::test(start_paused = true)]
    async fn a_wake_while_nobody_waits_is_kept() {
        let start = Instant::now();
        let schedule = Schedule::new(start + Duration::from_secs(10), Duration::ZERO);
        schedule.wake_at(start);
        schedule.next_flush(Duration::from_secs(10)).await;
        assert_eq!(Instant::now(), start);
    }

    #[tokio::test(start_paused = true)]
    async fn wake_requests_cannot_bring_flushes_closer_than_the_minimum_gap() {
        let start = Instant::now();
        let schedule = Schedule::new(start, Duration::from_millis(500));
        schedule.next_flush(Duration::from_secs(10)).await;
        for _ in 0..1000 {
            schedule.wake_at(Instant::now());
        }
        schedule.next_flush(Duration::from_secs(10)).await;
        assert_eq!(Instant::now() - start, Duration::from_millis(500));
    }
}
