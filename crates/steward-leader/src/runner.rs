//! One maintenance loop: a task that runs a set of branches, each when it is due, on a work
//! connection of its own or, in a fleet process, on a session of its class's shared pool. A term runs one per loop of its [`crate::LoopPlan`]; the branches cannot
//! tell which loop runs them.
//!
//! The loop waits (one `select!`) for the earliest due branch, a NOTIFY that makes a branch
//! due at once, or the end of the term. It checks the term before every branch start, so once
//! the term ends no further branch starts. A branch error or panic is logged, reported and
//! retried on its next tick; it never stops the loop.

use crate::observe::{BranchHeld, BranchRun, Observer, RunResult};
use crate::settings::LoopMode;
use crate::tracker::{OverrunTracker, Transition};
use crate::work::{Pooled, SharedPool};
use futures_util::FutureExt;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use steward_branches::{Branch, BranchContext, BranchError, Outcome};
use steward_connection::{describe_pg_error, Notification, Notifications, Target};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// How often an idle loop reports that it is alive while it waits for its next due branch.
const IDLE_PROGRESS: Duration = Duration::from_secs(1);

/// When the database was last (re)gained: the start of the term, a reconnect, or the end of a
/// stall. Rescue branches hold off for their quiet period after it.
#[derive(Clone)]
pub struct ContactMonitor(Arc<Mutex<Instant>>);

impl ContactMonitor {
    pub fn new() -> Self {
        Self(Arc::new(Mutex::new(Instant::now())))
    }

    pub fn restored_now(&self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    pub fn anchor(&self) -> Instant {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Default for ContactMonitor {
    fn default() -> Self {
        Self::new()
    }
}

/// How a term tells its loops to stop: at once when leadership is lost, after a grace period
/// for the running statement on shutdown.
#[derive(Clone, Default)]
pub struct StopSignal {
    token: CancellationToken,
    grace_ms: Arc<AtomicU64>,
}

impl StopSignal {
    pub fn stop(&self, grace: Duration) {
        self.grace_ms
            .store(grace.as_millis() as u64, Ordering::SeqCst);
        self.token.cancel();
    }

    pub fn is_stopped(&self) -> bool {
        self.token.is_cancelled()
    }

    pub async fn stopped(&self) {
        self.token.cancelled().await
    }

    fn grace(&self) -> Duration {
        Duration::from_millis(self.grace_ms.load(Ordering::SeqCst))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoopExit {
    /// The term told the loop to stop.
    Stopped,
    /// A branch found a newer term in the database: this term is over.
    Superseded,
    /// A branch's write was refused because the server is read-only: this term is over, since
    /// retrying cannot succeed on this server.
    ReadOnly,
}

#[derive(Debug, Clone)]
pub struct LoopSettings {
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
}

pub struct LoopTask {
    pub name: &'static str,
    pub branches: Vec<Arc<dyn Branch>>,
    pub mode: LoopMode,
    pub epoch: i64,
    /// Where the loop's work sessions come from.
    pub sessions: LoopSessions,
    pub stop: StopSignal,
    pub observer: Arc<dyn Observer>,
    pub contact: ContactMonitor,
    pub settings: LoopSettings,
}

struct Slot {
    branch: Arc<dyn Branch>,
    failures: FailureLog,
    due: Instant,
    /// How far into its interval the branch leaves its quiet period (see [`phases`]).
    phase: Duration,
    tracker: OverrunTracker,
    wake_channel: Option<String>,
}

/// Where a loop's work sessions come from.
pub enum LoopSessions {
    /// A session of its own (named after the loop), which also listens for its wake channels.
    Own(Target),
    /// A fleet's pool of the loop's class; the fleet session listens and forwards.
    Shared { pool: SharedPool, wakes: WakeRouter },
}

impl LoopSessions {
    fn schema(&self) -> &steward_connection::SchemaName {
        match self {
            LoopSessions::Own(target) => target.schema(),
            LoopSessions::Shared { pool, .. } => &pool.schema,
        }
    }
}

/// Hands the notifications a fleet session receives to the loops that wait for their channel.
#[derive(Clone, Default)]
pub struct WakeRouter(
    Arc<
        Mutex<
            std::collections::HashMap<
                String,
                Vec<tokio::sync::mpsc::UnboundedSender<Notification>>,
            >,
        >,
    >,
);

impl WakeRouter {
    /// A receiver of every notification on `channels` from now on.
    pub fn subscribe(&self, channels: &[&str]) -> Notifications {
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        let mut routes = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for channel in channels {
            routes
                .entry((*channel).to_owned())
                .or_default()
                .push(sender.clone());
        }
        receiver
    }

    /// Forwards `notification` to its channel's loops, forgetting loops that are gone.
    pub fn route(&self, notification: Notification) {
        let mut routes = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(senders) = routes.get_mut(&notification.channel) {
            senders.retain(|sender| sender.send(notification.clone()).is_ok());
        }
    }
}

enum LoopClient {
    Own { client: Client, target: Target },
    Shared(SharedPool),
}

struct Connection {
    client: LoopClient,
    notifications: Notifications,
    /// False once a shared loop's notifications have closed, which only means it has no wake
    /// channels (an own session's closing means the connection is gone).
    listening: bool,
}

/// What the loop waited for.
enum Waited {
    /// A branch is due: run it.
    Due { index: usize, due: Instant },
    /// Nothing is due yet (a notification came in, or it is time to report being idle).
    Again,
    /// The work connection closed.
    Lost,
    /// The term is over.
    Stopped,
}

/// One pass as the loop saw it.
struct Pass {
    started_at: SystemTime,
    start_delay: Duration,
    duration: Duration,
    result: RunResult,
    outcome: Outcome,
    fate: ConnectionFate,
}

impl LoopTask {
    /// Runs the loop's branches until the term ends: connect (again) when needed, wait for the
    /// earliest due branch, run its pass, report it.
    pub async fn run(self) -> LoopExit {
        let start = Instant::now();
        let mut slots: Vec<Slot> = self
            .branches
            .iter()
            .zip(phases(&self.branches))
            .map(|(branch, phase)| Slot {
                branch: branch.clone(),
                failures: FailureLog::default(),
                due: start + phase,
                phase,
                tracker: OverrunTracker::default(),
                wake_channel: branch.wake_channel(self.sessions.schema()),
            })
            .collect();
        let mut connection: Option<Connection> = None;
        let mut backoff = self.settings.reconnect_min;
        let mut first_pass = true;
        // Set when the database stopped answering: the reconnect then restarts the rescues'
        // quiet period, counted from the moment contact is back.
        let mut contact_lost = false;
        // Registers the loop with /healthz from the term's start, so that one stuck before its
        // first pass (connecting, a first statement that hangs) shows as stalled.
        self.observer.loop_progress(self.name, self.epoch);
        // The contact anchor the quiet periods were last reported from.
        let mut held_from: Option<Instant> = None;
        loop {
            if self.stop.is_stopped() {
                return LoopExit::Stopped;
            }
            let Some(conn) = connection.as_mut() else {
                match self.connect(&slots).await {
                    Ok(c) => {
                        connection = Some(c);
                        backoff = self.settings.reconnect_min;
                        if std::mem::take(&mut contact_lost) {
                            self.contact.restored_now();
                        }
                    }
                    Err(error) => {
                        contact_lost = true;
                        tracing::warn!(loop_name = self.name, %error, retry_in = ?backoff, "maintenance loop cannot reach the database");
                        if !self.back_off(&mut backoff).await {
                            return LoopExit::Stopped;
                        }
                    }
                }
                continue;
            };
            let anchor = self.contact.anchor();
            if held_from != Some(anchor) {
                held_from = Some(anchor);
                self.report_holds(&slots, anchor);
            }
            let (index, due) = match self.wait(&mut slots, conn).await {
                Waited::Due { index, due } => (index, due),
                Waited::Again => continue,
                Waited::Lost => {
                    tracing::warn!(
                        loop_name = self.name,
                        "work connection closed; reconnecting"
                    );
                    connection = None;
                    contact_lost = true;
                    continue;
                }
                Waited::Stopped => return LoopExit::Stopped,
            };
            let slot = &mut slots[index];
            let pass = match &mut conn.client {
                LoopClient::Own { client, target } => self.pass(slot, due, client, target).await,
                // Waiting for a pooled session counts in the pass's start delay. A loop still
                // waiting when its term ends stops at once: no pass of it has begun, and on a
                // dead path the wait would last until the term gives up on it.
                LoopClient::Shared(pool) => match tokio::select! {
                    got = pool.get() => got,
                    _ = self.stop.stopped() => return LoopExit::Stopped,
                } {
                    Ok(mut pooled) => {
                        let pass = self.pass(slot, due, &mut pooled, &pool.target).await;
                        if pass.is_none() {
                            // Its statement was cancelled mid-flight: not for the next user.
                            drop(Pooled::take(pooled));
                        }
                        pass
                    }
                    Err(error) => {
                        contact_lost = true;
                        tracing::warn!(loop_name = self.name, %error, retry_in = ?backoff, "maintenance loop cannot get a session of its pool");
                        if !self.back_off(&mut backoff).await {
                            return LoopExit::Stopped;
                        }
                        continue;
                    }
                },
            };
            let Some(pass) = pass else {
                return LoopExit::Stopped;
            };
            // A shared loop regains contact when its pool gives it a session again.
            if std::mem::take(&mut contact_lost) {
                backoff = self.settings.reconnect_min;
                self.contact.restored_now();
            }
            self.report(slot, &pass);
            if first_pass {
                first_pass = false;
                // Failover is measured from the old leader's death to this line on the new one.
                tracing::info!(
                    loop_name = self.name,
                    class = slot.branch.class().as_str(),
                    branch = slot.branch.name(),
                    epoch = self.epoch,
                    "first branch pass of the term"
                );
            }
            if pass.result == RunResult::Fenced {
                return LoopExit::Superseded;
            }
            match pass.fate {
                ConnectionFate::Keep => {}
                ConnectionFate::ReadOnly => return LoopExit::ReadOnly,
                ConnectionFate::Replace => connection = None,
                ConnectionFate::Lost => {
                    connection = None;
                    contact_lost = true;
                }
            }
        }
    }

    /// Waits out `backoff` and doubles it, up to `reconnect_max`; false when the term ended
    /// first.
    async fn back_off(&self, backoff: &mut Duration) -> bool {
        let waited = tokio::select! {
            _ = self.stop.stopped() => false,
            _ = tokio::time::sleep(*backoff) => true,
        };
        *backoff = (*backoff * 2).min(self.settings.reconnect_max);
        waited
    }

    /// Tells the observers until when each branch with a quiet period is held, counted from
    /// `anchor` (the start of the term, or the last regained contact).
    fn report_holds(&self, slots: &[Slot], anchor: Instant) {
        let now = Instant::now();
        for slot in slots {
            let until = effective_due(slot, anchor);
            if slot.branch.quiet_period().is_none() || until <= now {
                continue;
            }
            self.observer.branch_held(&BranchHeld {
                branch: slot.branch.name(),
                class: slot.branch.class(),
                loop_name: self.name,
                epoch: self.epoch,
                until: SystemTime::now() + (until - now),
            });
        }
    }

    /// Waits (one `select!`) for the earliest due branch, a NOTIFY that makes a branch due at
    /// once, the end of the term, or, while idle, the next report of being alive.
    async fn wait(&self, slots: &mut [Slot], conn: &mut Connection) -> Waited {
        let anchor = self.contact.anchor();
        let Some((index, due)) = slots
            .iter()
            .enumerate()
            .map(|(i, s)| (i, effective_due(s, anchor)))
            .min_by_key(|(_, due)| *due)
        else {
            // No branches: just wait for the end of the term.
            self.stop.stopped().await;
            return Waited::Stopped;
        };
        if due <= Instant::now() {
            // Due already (a branch going again at once under load): no timer, whose tick
            // rounding would add up to a millisecond to every back-to-back pass. What was
            // notified meanwhile is taken in without waiting, so nothing piles up.
            while let Ok(notification) = conn.notifications.try_recv() {
                wake(slots, &notification.channel);
            }
            return Waited::Due { index, due };
        }
        tokio::select! {
            biased;
            _ = self.stop.stopped() => return Waited::Stopped,
            notification = conn.notifications.recv(), if conn.listening => {
                return match notification {
                    Some(notification) => {
                        wake(slots, &notification.channel);
                        Waited::Again
                    }
                    None if matches!(conn.client, LoopClient::Shared(_)) => {
                        conn.listening = false;
                        Waited::Again
                    }
                    None => Waited::Lost,
                };
            }
            _ = tokio::time::sleep_until(due.min(Instant::now() + IDLE_PROGRESS).into()) => {}
        }
        // The term may have ended while we slept: no branch starts after that.
        if self.stop.is_stopped() {
            return Waited::Stopped;
        }
        if Instant::now() < due {
            // Idle, not stuck: a loop whose branches all run rarely (hourly) must not look
            // stalled to /healthz between its passes.
            self.observer.loop_progress(self.name, self.epoch);
            return Waited::Again;
        }
        Waited::Due { index, due }
    }

    /// Runs one pass of `slot`'s branch, which was due at `due`, and schedules its next.
    /// `None` when the term ended and the pass did not finish within the grace period (its
    /// statement is then cancelled).
    async fn pass(
        &self,
        slot: &mut Slot,
        due: Instant,
        client: &mut Client,
        target: &Target,
    ) -> Option<Pass> {
        let started = Instant::now();
        let started_at = SystemTime::now();
        let start_delay = started.saturating_duration_since(due);
        let branch = slot.branch.clone();
        // One span per pass (exported over OTLP when configured).
        let span = tracing::info_span!(
            "maintenance_branch",
            otel.name = branch.name(),
            branch = branch.name(),
            class = branch.class().as_str(),
            "loop" = self.name,
            mode = self.mode.as_str(),
            epoch = self.epoch,
            rows = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        let cancel_db = client.cancel_token();
        let mut ctx = BranchContext {
            client,
            epoch: self.epoch,
            timeouts: branch.timeouts(),
        };
        let pass = AssertUnwindSafe(branch.run(&mut ctx).instrument(span.clone())).catch_unwind();
        tokio::pin!(pass);
        let result = tokio::select! {
            result = &mut pass => result,
            _ = self.stop.stopped() => match tokio::time::timeout(self.stop.grace(), &mut pass).await {
                Ok(result) => result,
                Err(_) => {
                    // Cancel the statement server-side; the fence keeps a late commit out anyway.
                    let target = target.clone();
                    tokio::spawn(async move { let _ = target.cancel(&cancel_db).await; });
                    tracing::info!(loop_name = self.name, branch = branch.name(), "cancelled the running statement: the term ended");
                    return None;
                }
            },
        };
        let duration = started.elapsed();
        let (result, outcome, fate) = classify(result);
        span.record("rows", outcome.rows);
        span.record("outcome", result.outcome());

        let interval = branch.interval();
        let wait = outcome.run_again_in.map_or(interval, |d| d.min(interval));
        // A branch cannot be due before its own pass has ended: one that asks to go again
        // sooner than its pass lasts is due when the pass ends, so that its start delay
        // measures waiting for the loop (a sibling), not its own previous pass.
        slot.due = started + wait.max(duration);
        Some(Pass {
            started_at,
            start_delay,
            duration,
            result,
            outcome,
            fate,
        })
    }

    /// Tracks the pass against its interval, logs what needs an operator's eye, and tells the
    /// observers.
    fn report(&self, slot: &mut Slot, pass: &Pass) {
        let branch = &*slot.branch;
        let failed = !matches!(pass.result, RunResult::Ok | RunResult::Fenced);
        let transition =
            slot.tracker
                .observe(pass.duration, pass.start_delay, branch.interval(), failed);
        self.log_pass(
            branch,
            &mut slot.failures,
            &pass.result,
            transition,
            pass.duration,
            pass.start_delay,
        );
        self.observer.branch_run(&BranchRun {
            branch: branch.name(),
            class: branch.class(),
            loop_name: self.name,
            mode: self.mode,
            epoch: self.epoch,
            interval: branch.interval(),
            started_at: pass.started_at,
            start_delay: pass.start_delay,
            duration: pass.duration,
            rows: pass.outcome.rows,
            result: pass.result.clone(),
            observations: &pass.outcome.observations,
            overrun: slot.tracker.state(),
            transition,
            overrun_episodes: slot.tracker.episodes(),
            consecutive_failures: slot.tracker.failures_in_a_row(),
        });
        self.observer.loop_progress(self.name, self.epoch);
    }

    async fn connect(&self, slots: &[Slot]) -> Result<Connection, String> {
        let mut channels: Vec<&str> = slots
            .iter()
            .filter_map(|s| s.wake_channel.as_deref())
            .collect();
        channels.sort();
        channels.dedup();
        let target = match &self.sessions {
            LoopSessions::Own(target) => target,
            LoopSessions::Shared { pool, wakes } => {
                return Ok(Connection {
                    client: LoopClient::Shared(pool.clone()),
                    notifications: wakes.subscribe(&channels),
                    listening: true,
                })
            }
        };
        let (client, notifications) = target.listen().await.map_err(|e| e.to_string())?;
        for channel in channels {
            // Channel names derive from the validated schema name: plain identifiers.
            client
                .batch_execute(&format!("LISTEN {channel}"))
                .await
                .map_err(|e| describe_pg_error(&e))?;
        }
        Ok(Connection {
            client: LoopClient::Own {
                client,
                target: target.clone(),
            },
            notifications,
            listening: true,
        })
    }

    fn log_pass(
        &self,
        branch: &dyn Branch,
        failures: &mut FailureLog,
        result: &RunResult,
        transition: Transition,
        duration: Duration,
        start_delay: Duration,
    ) {
        let name = branch.name();
        let now = Instant::now();
        match result {
            RunResult::Ok | RunResult::Fenced => {
                if let Some(failed) = failures.succeeded() {
                    tracing::info!(
                        branch = name,
                        loop_name = self.name,
                        failed_passes = failed,
                        "branch succeeded again"
                    );
                }
            }
            RunResult::Timeout(e) => {
                if let Some(unlogged) = failures.failed(now) {
                    tracing::warn!(branch = name, loop_name = self.name, error = %e, unlogged_failures = unlogged, "branch timed out; retrying on its next tick")
                }
            }
            RunResult::Error(e) => {
                if let Some(unlogged) = failures.failed(now) {
                    tracing::error!(branch = name, loop_name = self.name, error = %e, unlogged_failures = unlogged, "branch failed; retrying on its next tick")
                }
            }
            RunResult::Panicked(e) => {
                if let Some(unlogged) = failures.failed(now) {
                    tracing::error!(branch = name, loop_name = self.name, panic = %e, unlogged_failures = unlogged, "branch panicked; retrying on its next tick")
                }
            }
        }
        match transition {
            Transition::BecameDelayed => tracing::warn!(
                branch = name,
                loop_name = self.name,
                duration_ms = duration.as_secs_f64() * 1000.0,
                start_delay_ms = start_delay.as_secs_f64() * 1000.0,
                interval_ms = branch.interval().as_secs_f64() * 1000.0,
                "maintenance branch is overrunning its interval"
            ),
            Transition::Recovered => {
                tracing::info!(
                    branch = name,
                    loop_name = self.name,
                    "maintenance branch is back on time"
                )
            }
            Transition::None => {}
        }
    }
}

/// A branch's failures are logged at most once per this long: a table locked for a minute
/// gives a few lines, each saying how many failures it stands for, rather than hundreds.
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(10);

/// Which of a branch's failed passes are logged.
#[derive(Debug, Default)]
struct FailureLog {
    last_logged: Option<Instant>,
    /// Failures since the last logged one.
    unlogged: u32,
    in_a_row: u32,
}

impl FailureLog {
    /// A failed pass: `Some(failures not logged before it)` when it is to be logged.
    fn failed(&mut self, now: Instant) -> Option<u32> {
        self.in_a_row += 1;
        match self.last_logged {
            Some(last) if now.duration_since(last) < FAILURE_LOG_EVERY => {
                self.unlogged += 1;
                None
            }
            _ => {
                self.last_logged = Some(now);
                Some(std::mem::take(&mut self.unlogged))
            }
        }
    }

    /// A pass that succeeded: `Some(failed passes before it)` when it ends a run of failures.
    fn succeeded(&mut self) -> Option<u32> {
        self.last_logged = None;
        self.unlogged = 0;
        (self.in_a_row > 0).then(|| std::mem::take(&mut self.in_a_row))
    }
}

/// A notification on `channel` makes the branches woken by it due now.
fn wake(slots: &mut [Slot], channel: &str) {
    let now = Instant::now();
    for slot in slots
        .iter_mut()
        .filter(|s| s.wake_channel.as_deref() == Some(channel))
    {
        slot.due = slot.due.min(now);
    }
}

/// A rescue branch waits out its quiet period after the last (re)gain of the database, and
/// then its phase.
fn effective_due(slot: &Slot, contact_anchor: Instant) -> Instant {
    match slot.branch.quiet_period() {
        Some(quiet) => slot.due.max(contact_anchor + quiet + slot.phase),
        None => slot.due,
    }
}

/// Spreads the rescues of one loop over their interval: the k-th of m branches with a quiet
/// period gets k/m of its interval as its phase; other branches get none. Rescues leave their
/// quiet period at the same moment and each is next due one interval after it started, so
/// without phases they would stay in step, come due together every interval and queue behind
/// one another.
fn phases(branches: &[Arc<dyn Branch>]) -> Vec<Duration> {
    let rescues = branches
        .iter()
        .filter(|b| b.quiet_period().is_some())
        .count() as u32;
    let mut k = 0;
    branches
        .iter()
        .map(|branch| match branch.quiet_period() {
            Some(_) => {
                let phase = branch.interval() * k / rescues;
                k += 1;
                phase
            }
            None => Duration::ZERO,
        })
        .collect()
}

type PassResult = Result<Result<Outcome, BranchError>, Box<dyn std::any::Any + Send>>;

/// What becomes of the work connection after a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnectionFate {
    Keep,
    /// Its state is unknown (a panic mid-transaction): open a new one. The database itself
    /// answered throughout, so the rescues' quiet period does not start again.
    Replace,
    /// The database stopped answering.
    Lost,
    /// The server refuses writes: the term must end.
    ReadOnly,
}

/// The pass's result for reporting, its outcome (empty on failure), and what becomes of the
/// work connection.
fn classify(result: PassResult) -> (RunResult, Outcome, ConnectionFate) {
    match result {
        Ok(Ok(outcome)) => (RunResult::Ok, outcome, ConnectionFate::Keep),
        Ok(Err(BranchError::Fenced { .. })) => {
            (RunResult::Fenced, Outcome::default(), ConnectionFate::Keep)
        }
        Ok(Err(e @ BranchError::Timeout(_))) => (
            RunResult::Timeout(e.to_string()),
            Outcome::default(),
            ConnectionFate::Keep,
        ),
        Ok(Err(e)) => {
            let fate = if e.is_connection_lost() {
                ConnectionFate::Lost
            } else if e.is_read_only() {
                ConnectionFate::ReadOnly
            } else {
                ConnectionFate::Keep
            };
            (RunResult::Error(e.to_string()), Outcome::default(), fate)
        }
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_owned());
            // The connection may be mid-transaction in an unknown state: start afresh.
            (
                RunResult::Panicked(message),
                Outcome::default(),
                ConnectionFate::Replace,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use steward_branches::Class;

    struct Periodic {
        interval: Duration,
        quiet: Option<Duration>,
    }

    #[async_trait]
    impl Branch for Periodic {
        fn name(&self) -> &'static str {
            "periodic"
        }
        fn class(&self) -> Class {
            Class::Slo
        }
        fn interval(&self) -> Duration {
            self.interval
        }
        fn quiet_period(&self) -> Option<Duration> {
            self.quiet
        }
        async fn run(&self, _: &mut BranchContext<'_>) -> Result<Outcome, BranchError> {
            Ok(Outcome::default())
        }
    }

    fn branch(interval_ms: u64, quiet: bool) -> Arc<dyn Branch> {
        Arc::new(Periodic {
            interval: Duration::from_millis(interval_ms),
            quiet: quiet.then_some(Duration::from_secs(30)),
        })
    }

    #[test]
    fn a_run_of_failures_is_logged_once_per_period_with_what_it_left_out() {
        let mut log = FailureLog::default();
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        assert_eq!(log.failed(at(0)), Some(0));
        for ms in (250..10_000).step_by(250) {
            assert_eq!(log.failed(at(ms)), None);
        }
        assert_eq!(log.failed(at(10_000)), Some(39));
        assert_eq!(log.succeeded(), Some(41));
        assert_eq!(log.succeeded(), None);
        // A new run of failures is logged at once.
        assert_eq!(log.failed(at(10_250)), Some(0));
    }

    #[test]
    fn rescues_sharing_a_loop_are_spread_over_their_interval() {
        let ms = Duration::from_millis;
        let branches = [
            branch(5000, true),
            branch(1000, false),
            branch(900, true),
            branch(900, true),
        ];
        assert_eq!(phases(&branches), [ms(0), ms(0), ms(300), ms(600)]);
        assert_eq!(phases(&[branch(1000, false)]), [ms(0)]);
        assert_eq!(phases(&[]), Vec::<Duration>::new());
    }
}
