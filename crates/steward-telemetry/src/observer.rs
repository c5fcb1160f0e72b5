//! Turns the leader's reports into the exported instruments. Handles are registered once per
//! label set and kept (the OTLP bridge builds a new instrument on every registration).

use crate::names::*;
use metrics::{Counter, Gauge, Histogram, Label};
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::SystemTime;
use steward_branches::{LoopKind, Observation, RescueReason};
use steward_leader::{BranchRun, LeadershipEvent, Observer, Transition};

struct Cache<K, V>(Mutex<HashMap<K, V>>);

impl<K: Eq + Hash, V: Clone> Cache<K, V> {
    fn new() -> Self {
        Self(Mutex::new(HashMap::new()))
    }

    fn get(&self, key: K, make: impl FnOnce() -> V) -> V {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(key).or_insert_with(make).clone()
    }
}

fn labels(pairs: &[(&'static str, String)]) -> Vec<Label> {
    pairs
        .iter()
        .map(|(k, v)| Label::new(*k, v.clone()))
        .collect()
}

pub struct MetricsObserver {
    histograms: Cache<(&'static str, Vec<String>), Histogram>,
    counters: Cache<(&'static str, Vec<String>), Counter>,
    gauges: Cache<(&'static str, Vec<String>), Gauge>,
}

impl Default for MetricsObserver {
    fn default() -> Self {
        Self::new()
    }
}

impl MetricsObserver {
    pub fn new() -> Self {
        Self {
            histograms: Cache::new(),
            counters: Cache::new(),
            gauges: Cache::new(),
        }
    }

    fn histogram(&self, name: &'static str, pairs: &[(&'static str, String)]) -> Histogram {
        let key = (name, pairs.iter().map(|(_, v)| v.clone()).collect());
        self.histograms
            .get(key, || metrics::histogram!(name, labels(pairs)))
    }

    fn counter(&self, name: &'static str, pairs: &[(&'static str, String)]) -> Counter {
        let key = (name, pairs.iter().map(|(_, v)| v.clone()).collect());
        self.counters
            .get(key, || metrics::counter!(name, labels(pairs)))
    }

    fn gauge(&self, name: &'static str, pairs: &[(&'static str, String)]) -> Gauge {
        let key = (name, pairs.iter().map(|(_, v)| v.clone()).collect());
        self.gauges
            .get(key, || metrics::gauge!(name, labels(pairs)))
    }

    /// Creates the series an operator expects to see before anything happened (leader state,
    /// per-branch counters at zero), so dashboards and `absent()`-style alerts have data.
    pub fn register_initial(&self, branches: &[(&'static str, LoopKind, std::time::Duration)]) {
        self.gauge(LEADER, &[]).set(0.0);
        self.gauge(LEADER_EPOCH, &[]).set(0.0);
        for event in ["acquired", "lost", "stepped_down"] {
            self.counter(LEADER_TRANSITIONS, &[("event", event.into())])
                .increment(0);
        }
        for reason in [
            RescueReason::Heartbeat,
            RescueReason::Deadline,
            RescueReason::Callback,
        ] {
            self.counter(RESCUED_JOBS, &[("reason", reason.as_str().into())])
                .increment(0);
        }
        for loop_name in ["slo", "hygiene", "monolithic"] {
            self.counter(LOOP_RESTARTS, &[("loop", loop_name.into())])
                .increment(0);
        }
        for (branch, kind, interval) in branches {
            let (b, l) = (branch.to_string(), kind.as_str().to_string());
            self.counter(
                BRANCH_OVERRUN,
                &[("branch", b.clone()), ("loop", l.clone())],
            )
            .increment(0);
            for outcome in ["ok", "error", "timeout"] {
                self.counter(
                    BRANCH_RUNS,
                    &[("branch", b.clone()), ("outcome", outcome.into())],
                )
                .increment(0);
            }
            self.counter(BRANCH_ROWS, &[("branch", b.clone())])
                .increment(0);
            self.gauge(BRANCH_INTERVAL, &[("branch", b), ("loop", l)])
                .set(interval.as_secs_f64());
        }
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl Observer for MetricsObserver {
    fn branch_run(&self, run: &BranchRun<'_>) {
        let branch = run.branch.to_string();
        let loop_kind = run.loop_kind.as_str().to_string();
        let with_mode = [
            ("branch", branch.clone()),
            ("loop", loop_kind.clone()),
            ("mode", run.mode.as_str().to_string()),
        ];
        self.histogram(BRANCH_DURATION, &with_mode)
            .record(run.duration.as_secs_f64());
        self.histogram(BRANCH_START_DELAY, &with_mode)
            .record(run.start_delay.as_secs_f64());
        if run.transition == Transition::BecameDelayed {
            self.counter(
                BRANCH_OVERRUN,
                &[("branch", branch.clone()), ("loop", loop_kind.clone())],
            )
            .increment(1);
        }
        self.counter(
            BRANCH_RUNS,
            &[
                ("branch", branch.clone()),
                ("outcome", run.result.outcome().into()),
            ],
        )
        .increment(1);
        self.counter(BRANCH_ROWS, &[("branch", branch.clone())])
            .increment(run.rows);
        self.gauge(
            BRANCH_INTERVAL,
            &[("branch", branch.clone()), ("loop", loop_kind)],
        )
        .set(run.interval.as_secs_f64());
        if run.result.error_message().is_none() {
            self.gauge(BRANCH_LAST_SUCCESS, &[("branch", branch.clone())])
                .set(unix_now());
        }
        for observation in run.observations {
            match observation {
                Observation::PromotionLags(lags) => {
                    let histogram = self.histogram(PROMOTION_LAG, &[]);
                    for lag in lags {
                        histogram.record(lag.max(0.0));
                    }
                }
                Observation::Rescued {
                    reason,
                    retried,
                    failed,
                } => self
                    .counter(RESCUED_JOBS, &[("reason", reason.as_str().into())])
                    .increment(retried + failed),
                Observation::QueueDepth {
                    queue,
                    state,
                    depth,
                } => self
                    .gauge(
                        QUEUE_JOBS,
                        &[("queue", queue.clone()), ("state", state.as_str().into())],
                    )
                    .set(*depth as f64),
                Observation::OldestAvailableAge { queue, seconds } => self
                    .gauge(QUEUE_OLDEST_AVAILABLE_AGE, &[("queue", queue.clone())])
                    .set(*seconds),
                Observation::Skipped { .. } => self
                    .counter(BRANCH_SKIPPED, &[("branch", branch.clone())])
                    .increment(1),
            }
        }
    }

    fn leadership(&self, event: &LeadershipEvent) {
        let (leading, label, epoch) = match event {
            LeadershipEvent::Acquired { epoch } => (1.0, "acquired", *epoch),
            LeadershipEvent::Lost { epoch, .. } => (0.0, "lost", *epoch),
            LeadershipEvent::SteppedDown { epoch } => (0.0, "stepped_down", *epoch),
        };
        self.gauge(LEADER, &[]).set(leading);
        self.gauge(LEADER_EPOCH, &[]).set(epoch as f64);
        self.counter(LEADER_TRANSITIONS, &[("event", label.into())])
            .increment(1);
    }

    fn loop_restarted(&self, loop_name: &str, _reason: &str) {
        self.counter(LOOP_RESTARTS, &[("loop", loop_name.to_string())])
            .increment(1);
    }
}
