//! What this instance knows about its own state: leadership, loops, and per-branch health.
//! It is an [`Observer`]; `/healthz` reads it, and the leader flushes it into `branch_health`
//! for `steward status` on any host ([`writer`]).

pub(crate) mod writer;

use crate::observe::{BranchHeld, BranchRun, LeadershipEvent, Observer};
use crate::tracker::OverrunState;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};
use steward_branches::Class;

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BranchHealth {
    pub branch: String,
    pub class: Class,
    /// The loop that runs the branch (see [`crate::LoopPlan`]).
    #[serde(rename = "loop")]
    pub loop_name: String,
    pub epoch: i64,
    /// `None` until the branch runs in this term (a rescue held in its quiet period).
    #[serde(with = "opt_system_time_secs")]
    pub last_run_at: Option<SystemTime>,
    /// A rescue held in its quiet period: when it may run.
    #[serde(with = "opt_system_time_secs")]
    pub held_until: Option<SystemTime>,
    #[serde(rename = "last_duration_seconds", with = "duration_secs")]
    pub last_duration: Duration,
    #[serde(rename = "last_start_delay_seconds", with = "duration_secs")]
    pub last_start_delay: Duration,
    pub last_rows: u64,
    #[serde(with = "opt_system_time_secs")]
    pub last_success_at: Option<SystemTime>,
    pub last_error: Option<String>,
    #[serde(with = "opt_system_time_secs")]
    pub last_error_at: Option<SystemTime>,
    /// The term the last error came from.
    pub last_error_epoch: Option<i64>,
    pub overrun: OverrunState,
    pub overrun_episodes: u64,
    /// Passes and failed passes within the current term.
    pub runs: u64,
    pub errors: u64,
    /// Changed since the last flush to the database.
    #[serde(skip)]
    pub dirty: bool,
}

#[derive(Debug, Clone, Default)]
pub struct HealthSnapshot {
    pub is_leader: bool,
    pub epoch: Option<i64>,
    pub branches: Vec<BranchHealth>,
    /// Time since each loop last finished an iteration in the current term.
    pub loops: BTreeMap<String, Duration>,
    /// Why this candidate does not stand for election, while it does not.
    pub standing_aside: Option<String>,
}

/// One pass, as the live page's timeline draws it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PassRecord {
    pub branch: &'static str,
    pub class: Class,
    #[serde(rename = "loop")]
    pub loop_name: &'static str,
    pub epoch: i64,
    /// Unix seconds.
    #[serde(with = "system_time_secs")]
    pub started_at: SystemTime,
    #[serde(rename = "duration_seconds", with = "duration_secs")]
    pub duration: Duration,
    /// ok, error or timeout.
    pub outcome: &'static str,
    pub rows: u64,
}

/// Passes are kept this long for the live page, and at most [`PASSES_KEPT`] of them.
pub const PASSES_WINDOW: Duration = Duration::from_secs(300);
pub const PASSES_KEPT: usize = 20_000;

#[derive(Default)]
struct State {
    is_leader: bool,
    epoch: Option<i64>,
    branches: BTreeMap<&'static str, BranchHealth>,
    loops: BTreeMap<String, Instant>,
    passes: std::collections::VecDeque<PassRecord>,
    standing_aside: Option<String>,
}

/// Shared, cheap to clone.
#[derive(Clone, Default)]
pub struct HealthRegistry(Arc<Mutex<State>>);

impl HealthRegistry {
    fn state(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means an observer panicked mid-update; the data is still usable.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn snapshot(&self) -> HealthSnapshot {
        let state = self.state();
        HealthSnapshot {
            is_leader: state.is_leader,
            epoch: state.epoch,
            branches: state.branches.values().cloned().collect(),
            loops: state
                .loops
                .iter()
                .map(|(k, v)| (k.clone(), v.elapsed()))
                .collect(),
            standing_aside: state.standing_aside.clone(),
        }
    }

    /// Branches changed since the last call, marking them clean.
    pub fn take_dirty(&self) -> Vec<BranchHealth> {
        let mut state = self.state();
        state
            .branches
            .values_mut()
            .filter(|b| b.dirty)
            .map(|b| {
                b.dirty = false;
                b.clone()
            })
            .collect()
    }

    /// The passes of the last few minutes ([`PASSES_WINDOW`]) that started after `since`.
    pub fn passes_since(&self, since: SystemTime) -> Vec<PassRecord> {
        let state = self.state();
        state
            .passes
            .iter()
            .filter(|p| p.started_at > since)
            .cloned()
            .collect()
    }

    /// True when every loop of the current term finished an iteration within `limit`
    /// (trivially true for a standby).
    pub fn loops_progressing(&self, limit: Duration) -> bool {
        let state = self.state();
        !state.is_leader || state.loops.values().all(|at| at.elapsed() <= limit)
    }
}

impl State {
    /// The branch's entry, new (not yet run in this term) if it has none.
    fn entry(
        &mut self,
        branch: &'static str,
        class: Class,
        loop_name: &str,
        epoch: i64,
    ) -> &mut BranchHealth {
        self.branches.entry(branch).or_insert_with(|| BranchHealth {
            branch: branch.to_owned(),
            class,
            loop_name: loop_name.to_owned(),
            epoch,
            last_run_at: None,
            held_until: None,
            last_duration: Duration::ZERO,
            last_start_delay: Duration::ZERO,
            last_rows: 0,
            last_success_at: None,
            last_error: None,
            last_error_at: None,
            last_error_epoch: None,
            overrun: OverrunState::OnTime,
            overrun_episodes: 0,
            runs: 0,
            errors: 0,
            dirty: true,
        })
    }
}

impl Observer for HealthRegistry {
    fn branch_run(&self, run: &BranchRun<'_>) {
        let mut state = self.state();
        // Reports from a task of an older term must not overwrite a newer term's state.
        if state.epoch.is_some_and(|e| e > run.epoch) {
            return;
        }
        let ok = run.result.error_message().is_none();
        let horizon = SystemTime::now() - PASSES_WINDOW;
        while state.passes.front().is_some_and(|p| p.started_at < horizon)
            || state.passes.len() >= PASSES_KEPT
        {
            state.passes.pop_front();
        }
        state.passes.push_back(PassRecord {
            branch: run.branch,
            class: run.class,
            loop_name: run.loop_name,
            epoch: run.epoch,
            started_at: run.started_at,
            duration: run.duration,
            outcome: run.result.outcome(),
            rows: run.rows,
        });
        let entry = state.entry(run.branch, run.class, run.loop_name, run.epoch);
        entry.epoch = run.epoch;
        entry.loop_name.replace_range(.., run.loop_name);
        entry.last_run_at = Some(run.started_at);
        entry.held_until = None;
        entry.last_duration = run.duration;
        entry.last_start_delay = run.start_delay;
        entry.last_rows = run.rows;
        entry.overrun = run.overrun;
        entry.overrun_episodes = run.overrun_episodes;
        entry.runs += 1;
        if ok {
            entry.last_success_at = Some(run.started_at + run.duration);
        } else {
            entry.errors += 1;
            entry.last_error = run.result.error_message();
            entry.last_error_at = Some(run.started_at + run.duration);
            entry.last_error_epoch = Some(run.epoch);
        }
        entry.dirty = true;
    }

    fn branch_held(&self, held: &BranchHeld) {
        let mut state = self.state();
        if state.epoch != Some(held.epoch) {
            return;
        }
        let entry = state.entry(held.branch, held.class, held.loop_name, held.epoch);
        entry.epoch = held.epoch;
        entry.held_until = Some(held.until);
        entry.dirty = true;
    }

    fn standing_aside(&self, why: Option<&str>) {
        self.state().standing_aside = why.map(str::to_owned);
    }

    fn leadership(&self, event: &LeadershipEvent) {
        let mut state = self.state();
        match event {
            LeadershipEvent::Acquired { epoch } => {
                state.is_leader = true;
                state.epoch = Some(*epoch);
                state.loops.clear();
                // Counts are per term; the last error stays, with its epoch.
                for branch in state.branches.values_mut() {
                    branch.runs = 0;
                    branch.errors = 0;
                    branch.held_until = None;
                    branch.dirty = true;
                }
            }
            LeadershipEvent::Lost { epoch, .. } | LeadershipEvent::SteppedDown { epoch } => {
                if state.epoch == Some(*epoch) {
                    state.is_leader = false;
                    state.loops.clear();
                }
            }
        }
    }

    fn loop_progress(&self, loop_name: &str, epoch: i64) {
        let mut state = self.state();
        if state.epoch == Some(epoch) {
            state.loops.insert(loop_name.to_owned(), Instant::now());
        }
    }
}

/// Durations as seconds (a number), as JSON readers expect.
mod duration_secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

mod system_time_secs {
    pub fn serialize<S: serde::Serializer>(
        t: &std::time::SystemTime,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let secs = t
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        s.serialize_f64(secs)
    }
}

mod opt_system_time_secs {
    pub fn serialize<S: serde::Serializer>(
        t: &Option<std::time::SystemTime>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => super::system_time_secs::serialize(t, s),
            None => s.serialize_none(),
        }
    }
}
