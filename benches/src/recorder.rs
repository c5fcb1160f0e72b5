//! The bench's [`Observer`]: what the in-process leader reports, recorded into histograms
//! while a measurement window is open.

use crate::hist::Hist;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};
use steward_branches::{Class, Observation};
use steward_leader::{BranchRun, LeadershipEvent, Observer, OverrunState, RunResult, Transition};

/// Per branch, over the window.
#[derive(Clone, Default)]
pub struct BranchStats {
    pub slo: bool,
    pub runs: u64,
    pub rows: u64,
    pub start_delay: Hist,
    /// The part of the start delay after the loop's previous pass had ended: how late the
    /// loop woke up, as opposed to how long it was busy with another pass (or this branch's
    /// own previous one) when the pass came due.
    pub wake_delay: Hist,
    pub duration: Hist,
    /// Overrun episodes in the window: transitions to delayed (BranchRun.transition ==
    /// BecameDelayed), plus one when the branch was already delayed when the window opened
    /// (an episode that began during the warm-up).
    pub overruns: u64,
    /// Runs reported while the branch was in the delayed state.
    pub delayed_runs: u64,
    pub timeouts: u64,
    pub errors: u64,
    pub last_error: Option<String>,
}

#[derive(Clone, Default)]
pub struct Snapshot {
    pub branches: BTreeMap<&'static str, BranchStats>,
    /// When each loop's last pass ended, by loop name.
    loop_free_at: BTreeMap<&'static str, SystemTime>,
    /// now − run_at of each job promoted (Observation::PromotionLags).
    pub promotion_lags: Hist,
}

impl Snapshot {
    /// Start delays of every SLO branch together.
    pub fn slo_start_delays(&self) -> Hist {
        let mut all = Hist::new();
        for stats in self.branches.values().filter(|s| s.slo) {
            all.add(&stats.start_delay);
        }
        all
    }

    /// Wake delays of every SLO branch together.
    pub fn slo_wake_delays(&self) -> Hist {
        let mut all = Hist::new();
        for stats in self.branches.values().filter(|s| s.slo) {
            all.add(&stats.wake_delay);
        }
        all
    }
}

#[derive(Default)]
pub struct Recorder {
    recording: AtomicBool,
    epoch: AtomicI64,
    data: Mutex<Snapshot>,
}

impl Recorder {
    fn data(&self) -> MutexGuard<'_, Snapshot> {
        // A poisoned lock only means a recording call panicked; the data is still usable.
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens the window: everything recorded so far is discarded.
    pub fn start(&self) {
        *self.data() = Snapshot::default();
        self.recording.store(true, Ordering::SeqCst);
    }

    pub fn stop(&self) -> Snapshot {
        self.recording.store(false, Ordering::SeqCst);
        self.data().clone()
    }

    /// The epoch of the term the leader holds now (0: not leading).
    pub fn leading_epoch(&self) -> i64 {
        self.epoch.load(Ordering::SeqCst)
    }
}

impl Observer for Recorder {
    fn branch_run(&self, run: &BranchRun<'_>) {
        if !self.recording.load(Ordering::SeqCst) {
            return;
        }
        let mut data = self.data();
        let loop_name = run.loop_name;
        // Passes of one loop run one after another, and each is reported when it ends.
        let due = run.started_at - run.start_delay;
        let free_at = data.loop_free_at.get(loop_name).copied().unwrap_or(due);
        let wake_delay = run
            .started_at
            .duration_since(due.max(free_at))
            .unwrap_or(Duration::ZERO);
        data.loop_free_at
            .insert(loop_name, run.started_at + run.duration);
        for observation in run.observations {
            if let Observation::PromotionLags(lags) = observation {
                for lag in lags {
                    data.promotion_lags.record_secs(*lag);
                }
            }
        }
        let stats = data.branches.entry(run.branch).or_default();
        stats.slo = run.class == Class::Slo;
        if stats.runs == 0
            && run.overrun == OverrunState::Delayed
            && run.transition != Transition::BecameDelayed
        {
            stats.overruns += 1;
        }
        if run.overrun == OverrunState::Delayed {
            stats.delayed_runs += 1;
        }
        stats.runs += 1;
        stats.rows += run.rows;
        stats.start_delay.record(run.start_delay);
        stats.wake_delay.record(wake_delay);
        stats.duration.record(run.duration);
        if run.transition == Transition::BecameDelayed {
            stats.overruns += 1;
        }
        match &run.result {
            RunResult::Ok => {}
            RunResult::Timeout(_) => {
                stats.timeouts += 1;
                stats.last_error = run.result.error_message();
            }
            _ => {
                stats.errors += 1;
                stats.last_error = run.result.error_message();
            }
        }
    }

    fn leadership(&self, event: &LeadershipEvent) {
        match event {
            LeadershipEvent::Acquired { epoch } => self.epoch.store(*epoch, Ordering::SeqCst),
            LeadershipEvent::Lost { .. } | LeadershipEvent::SteppedDown { .. } => {
                self.epoch.store(0, Ordering::SeqCst)
            }
        }
    }
}
