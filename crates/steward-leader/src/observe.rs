//! The one interface through which the leader reports what it does. Telemetry (metrics,
//! traces), the health registry behind `/healthz` and `steward status`, and tests implement
//! [`Observer`]; the leader itself knows nothing of how reports are exported.

use crate::settings::LoopMode;
use crate::tracker::{OverrunState, Transition};
use std::time::{Duration, SystemTime};
use steward_branches::{BacklogKind, Class, Observation};

#[derive(Debug, Clone, PartialEq)]
pub enum RunResult {
    Ok,
    /// The statement or lock timeout fired.
    Timeout(String),
    Error(String),
    /// The branch panicked; the loop caught it and goes on.
    Panicked(String),
    /// The term ended during the pass; nothing after the fence was committed.
    Fenced,
}

impl RunResult {
    /// The `outcome` label: ok, error or timeout.
    pub fn outcome(&self) -> &'static str {
        match self {
            RunResult::Ok => "ok",
            RunResult::Timeout(_) => "timeout",
            RunResult::Error(_) | RunResult::Panicked(_) | RunResult::Fenced => "error",
        }
    }

    pub fn error_message(&self) -> Option<String> {
        match self {
            RunResult::Ok => None,
            RunResult::Timeout(e) => Some(format!("timeout: {e}")),
            RunResult::Error(e) => Some(e.clone()),
            RunResult::Panicked(e) => Some(format!("panicked: {e}")),
            RunResult::Fenced => Some("fenced: the leadership term ended".to_owned()),
        }
    }
}

/// One branch pass, as the loop saw it.
#[derive(Debug, Clone)]
pub struct BranchRun<'a> {
    pub branch: &'static str,
    pub class: Class,
    /// The loop that ran the pass (see [`crate::LoopPlan`]).
    pub loop_name: &'static str,
    pub mode: LoopMode,
    pub epoch: i64,
    pub interval: Duration,
    pub started_at: SystemTime,
    /// Actual start minus the time the pass was due.
    pub start_delay: Duration,
    pub duration: Duration,
    pub rows: u64,
    pub result: RunResult,
    pub observations: &'a [Observation],
    pub overrun: OverrunState,
    pub transition: Transition,
    pub overrun_episodes: u64,
    /// Passes of the branch in a row that failed, this one included.
    pub consecutive_failures: u32,
}

/// A branch with a quiet period (a rescue) is held until `until`: after a term starts, and
/// again after contact with the database was regained.
#[derive(Debug, Clone, PartialEq)]
pub struct BranchHeld {
    pub branch: &'static str,
    pub class: Class,
    pub loop_name: &'static str,
    pub epoch: i64,
    pub until: SystemTime,
}

/// The age of an SLO branch's backlog, as the leader measured it (see `backlog.rs`).
#[derive(Debug, Clone, PartialEq)]
pub struct BacklogReport {
    pub branch: &'static str,
    pub kind: BacklogKind,
    pub epoch: i64,
    /// How long the oldest item has waited for the branch; zero when none is overdue.
    pub age: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeadershipEvent {
    Acquired {
        epoch: i64,
    },
    /// The term ended without our choosing (connection lost, probe failed, superseded).
    Lost {
        epoch: i64,
        reason: String,
    },
    /// We gave leadership up (shutdown).
    SteppedDown {
        epoch: i64,
    },
}

pub trait Observer: Send + Sync + 'static {
    fn branch_run(&self, _run: &BranchRun<'_>) {}
    fn leadership(&self, _event: &LeadershipEvent) {}
    /// A loop task died outside any branch (a bug) and was restarted.
    fn loop_restarted(&self, _loop_name: &str, _reason: &str) {}
    /// A loop finished an iteration (used for liveness).
    fn loop_progress(&self, _loop_name: &str, _epoch: i64) {}
    /// The leader measured an SLO branch's backlog.
    fn backlog(&self, _report: &BacklogReport) {}
    /// A branch waits out its quiet period.
    fn branch_held(&self, _held: &BranchHeld) {}
    /// The server refuses writes (a hot standby, or `default_transaction_read_only`), so this
    /// candidate does not stand for election there; `false` once it accepts writes again.
    fn server_read_only(&self, _read_only: bool) {}
    /// Why this candidate does not stand for election (its server refuses writes, or the
    /// schema is newer than this steward), or `None` once it stands again.
    fn standing_aside(&self, _why: Option<&str>) {}
    /// The leader read the candidates seen recently (itself included).
    fn candidates(&self, _seen: &[CandidateSeen]) {}
}

/// A candidate as the leader sees it in the `candidates` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CandidateSeen {
    pub instance: String,
    pub version: String,
    pub loop_mode: String,
    pub config_digest: String,
}

/// Fan-out to several observers.
#[derive(Clone, Default)]
pub struct Observers(Vec<std::sync::Arc<dyn Observer>>);

impl Observers {
    pub fn new(observers: Vec<std::sync::Arc<dyn Observer>>) -> Self {
        Self(observers)
    }

    pub fn push(&mut self, observer: std::sync::Arc<dyn Observer>) {
        self.0.push(observer);
    }
}

impl Observer for Observers {
    fn branch_run(&self, run: &BranchRun<'_>) {
        self.0.iter().for_each(|o| o.branch_run(run));
    }
    fn leadership(&self, event: &LeadershipEvent) {
        self.0.iter().for_each(|o| o.leadership(event));
    }
    fn loop_restarted(&self, loop_name: &str, reason: &str) {
        self.0
            .iter()
            .for_each(|o| o.loop_restarted(loop_name, reason));
    }
    fn loop_progress(&self, loop_name: &str, epoch: i64) {
        self.0
            .iter()
            .for_each(|o| o.loop_progress(loop_name, epoch));
    }
    fn backlog(&self, report: &BacklogReport) {
        self.0.iter().for_each(|o| o.backlog(report));
    }
    fn branch_held(&self, held: &BranchHeld) {
        self.0.iter().for_each(|o| o.branch_held(held));
    }
    fn server_read_only(&self, read_only: bool) {
        self.0.iter().for_each(|o| o.server_read_only(read_only));
    }
    fn candidates(&self, seen: &[CandidateSeen]) {
        self.0.iter().for_each(|o| o.candidates(seen));
    }
    fn standing_aside(&self, why: Option<&str>) {
        self.0.iter().for_each(|o| o.standing_aside(why));
    }
}
