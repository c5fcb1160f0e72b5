//! Turns the leader's reports into the exported instruments. Handles are registered once per
//! label set and kept (the OTLP bridge builds a new instrument on every registration, and keeps
//! the description and unit of the first).

use crate::names::*;
use metrics::{Counter, Gauge, Histogram, Label};
use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::sync::Mutex;
use std::time::SystemTime;
use steward_branches::{table_health, BacklogKind, Observation, RescueReason};
use steward_leader::{
    BacklogReport, BranchRun, CandidateSeen, LeadershipEvent, LoopPlan, Observer, OverrunState,
    Transition, BACKLOG_TASK,
};

struct Cache<K, V>(Mutex<HashMap<K, V>>);

impl<K: Eq + Hash, V: Clone> Cache<K, V> {
    fn new() -> Self {
        Self(Mutex::new(HashMap::new()))
    }

    fn get(&self, key: K, make: impl FnOnce() -> V) -> V {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(key).or_insert_with(make).clone()
    }

    fn values_where(&self, mut keep: impl FnMut(&K) -> bool) -> Vec<V> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .filter(|(k, _)| keep(k))
            .map(|(_, v)| v.clone())
            .collect()
    }
}

/// The labels of a series: the queue's first, then the metric's own.
fn labels(queue: &[(&'static str, String)], pairs: &[(&'static str, String)]) -> Vec<Label> {
    queue
        .iter()
        .chain(pairs)
        .map(|(k, v)| Label::new(*k, v.clone()))
        .collect()
}

/// The queue a [`MetricsObserver`] reports for, as labels. Every series it emits carries them
/// first, so that the series of the queues one process serves never share a label set.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueLabels {
    /// The queue's schema, the `schema` label (always present).
    pub schema: String,
    /// The queue's database, the `database` label: set only when the process serves queues of
    /// more than one database, and then for every queue, so that one database's schemas do not
    /// collide with another's.
    pub database: Option<String>,
}

impl QueueLabels {
    /// The queue's name, as the HTTP endpoints and the logs show it: `<database>/<schema>`, or
    /// just `<schema>` without a database (ADR 0003, "Queues").
    pub fn name(&self) -> String {
        match &self.database {
            Some(database) => format!("{database}/{}", self.schema),
            None => self.schema.clone(),
        }
    }

    /// The label pairs, `schema` first, then `database` when given.
    fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut pairs = vec![(SCHEMA_LABEL, self.schema.clone())];
        if let Some(database) = &self.database {
            pairs.push((DATABASE_LABEL, database.clone()));
        }
        pairs
    }
}

/// Turns one queue's reports into instruments. A process serving several queues creates one
/// per queue, all recording into the same global recorder: the queue's labels keep them apart.
pub struct MetricsObserver {
    /// This candidate's instance name (host-pid-random), the `instance` label of
    /// `steward_leader` and `steward_leader_epoch`.
    instance: String,
    /// The queue's labels, put before the others on every series.
    queue: Vec<(&'static str, String)>,
    /// Handles by metric name and the values of the metric's own labels: the queue's labels are
    /// the same for every handle of one observer, so they are not part of the key.
    histograms: Cache<(&'static str, Vec<String>), Histogram>,
    counters: Cache<(&'static str, Vec<String>), Counter>,
    gauges: Cache<(&'static str, Vec<String>), Gauge>,
    /// The epoch of the term this instance leads, while it leads. The overrun trackers live as
    /// long as the term's loops: `steward_maintenance_branch_delayed` follows only this term's
    /// reports and drops to 0 when the term ends.
    term: Mutex<Option<i64>>,
}

impl MetricsObserver {
    pub fn new(instance: impl Into<String>, queue: QueueLabels) -> Self {
        Self {
            instance: instance.into(),
            queue: queue.pairs(),
            histograms: Cache::new(),
            counters: Cache::new(),
            gauges: Cache::new(),
            term: Mutex::new(None),
        }
    }

    fn term(&self) -> std::sync::MutexGuard<'_, Option<i64>> {
        self.term.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn leader_labels(&self) -> [(&'static str, String); 1] {
        [("instance", self.instance.clone())]
    }

    fn histogram(&self, name: &'static str, pairs: &[(&'static str, String)]) -> Histogram {
        let key = (name, pairs.iter().map(|(_, v)| v.clone()).collect());
        self.histograms.get(key, || {
            metrics::histogram!(name, labels(&self.queue, pairs))
        })
    }

    fn counter(&self, name: &'static str, pairs: &[(&'static str, String)]) -> Counter {
        let key = (name, pairs.iter().map(|(_, v)| v.clone()).collect());
        self.counters
            .get(key, || metrics::counter!(name, labels(&self.queue, pairs)))
    }

    fn gauge(&self, name: &'static str, pairs: &[(&'static str, String)]) -> Gauge {
        let key = (name, pairs.iter().map(|(_, v)| v.clone()).collect());
        self.gauges
            .get(key, || metrics::gauge!(name, labels(&self.queue, pairs)))
    }

    /// Creates the series an operator expects to see before anything happened (leader state,
    /// per-branch counters at zero, every loop of `plan`), so dashboards and `absent()`-style
    /// alerts have data.
    pub fn register_initial(&self, plan: &LoopPlan) {
        self.gauge(LEADER, &self.leader_labels()).set(0.0);
        self.gauge(LEADER_EPOCH, &self.leader_labels()).set(0.0);
        for event in ["acquired", "lost", "stepped_down"] {
            self.counter(LEADER_TRANSITIONS, &[("event", event.into())])
                .increment(0);
        }
        self.gauge(PROMOTION_BACKLOG_AGE, &[]).set(0.0);
        self.gauge(SERVER_READ_ONLY, &[]).set(0.0);
        for reason in [
            RescueReason::Heartbeat,
            RescueReason::Deadline,
            RescueReason::Callback,
        ] {
            self.counter(RESCUED_JOBS, &[("reason", reason.as_str().into())])
                .increment(0);
            self.gauge(RESCUE_BACKLOG_AGE, &[("reason", reason.as_str().into())])
                .set(0.0);
        }
        for loop_name in plan.loops().iter().map(|l| l.name).chain([BACKLOG_TASK]) {
            self.counter(LOOP_RESTARTS, &[("loop", loop_name.into())])
                .increment(0);
        }
        for (loop_name, branch) in plan.branches() {
            let labels = branch_labels(branch.name(), branch.class().as_str(), loop_name);
            self.counter(BRANCH_OVERRUN, &labels).increment(0);
            self.gauge(BRANCH_DELAYED, &labels).set(0.0);
            self.gauge(BRANCH_CONSECUTIVE_FAILURES, &labels).set(0.0);
            for outcome in ["ok", "error", "timeout"] {
                self.counter(BRANCH_RUNS, &with(&labels, ("outcome", outcome.into())))
                    .increment(0);
            }
            self.counter(BRANCH_ROWS, &labels).increment(0);
            self.counter(BRANCH_SKIPPED, &labels).increment(0);
            self.gauge(BRANCH_INTERVAL, &labels)
                .set(branch.interval().as_secs_f64());
        }
    }
}

/// The series table_health sets, per table and per index.
const TABLE_METRICS: &[&str] = &[
    TABLE_LIVE_TUPLES,
    TABLE_DEAD_TUPLES,
    TABLE_BYTES,
    TABLE_BLOAT_BYTES,
    TABLE_LAST_VACUUM,
    TABLE_LAST_ANALYZE,
];
const INDEX_METRICS: &[&str] = &[INDEX_BYTES, INDEX_BLOAT_BYTES, INDEX_INVALID];

impl MetricsObserver {
    /// Sets the gauges of every table and index in `report`, and drops to 0 those of tables
    /// and indexes it no longer lists (a dropped leftover index must not stay invalid).
    fn table_health(&self, report: &table_health::Report) {
        let mut seen: HashSet<(&'static str, Vec<String>)> = HashSet::new();
        let mut set = |name: &'static str, pairs: &[(&'static str, String)], value: f64| {
            self.gauge(name, pairs).set(value);
            seen.insert((name, pairs.iter().map(|(_, v)| v.clone()).collect()));
        };
        for t in &report.tables {
            let labels = [("table", t.table.clone())];
            set(TABLE_LIVE_TUPLES, &labels, t.live_tuples as f64);
            set(TABLE_DEAD_TUPLES, &labels, t.dead_tuples as f64);
            set(TABLE_BYTES, &labels, t.bytes as f64);
            set(
                TABLE_BLOAT_BYTES,
                &labels,
                t.bloat_bytes.unwrap_or(0) as f64,
            );
            set(TABLE_LAST_VACUUM, &labels, t.last_vacuum.unwrap_or(0.0));
            set(TABLE_LAST_ANALYZE, &labels, t.last_analyze.unwrap_or(0.0));
        }
        for i in &report.indexes {
            let labels = [("table", i.table.clone()), ("index", i.index.clone())];
            set(INDEX_BYTES, &labels, i.bytes as f64);
            set(
                INDEX_BLOAT_BYTES,
                &labels,
                i.bloat_bytes.unwrap_or(0) as f64,
            );
            set(INDEX_INVALID, &labels, if i.valid { 0.0 } else { 1.0 });
        }
        for gauge in self.gauges.values_where(|(name, values)| {
            (TABLE_METRICS.contains(name) || INDEX_METRICS.contains(name))
                && !seen.contains(&(*name, values.clone()))
        }) {
            gauge.set(0.0);
        }
    }
}

/// The labels of every per-branch series: the branch, its class and the loop that runs it.
fn branch_labels(branch: &str, class: &str, loop_name: &str) -> [(&'static str, String); 3] {
    [
        ("branch", branch.to_owned()),
        ("class", class.to_owned()),
        ("loop", loop_name.to_owned()),
    ]
}

fn with(
    labels: &[(&'static str, String)],
    extra: (&'static str, String),
) -> Vec<(&'static str, String)> {
    let mut all = labels.to_vec();
    all.push(extra);
    all
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl Observer for MetricsObserver {
    fn branch_run(&self, run: &BranchRun<'_>) {
        let labels = branch_labels(run.branch, run.class.as_str(), run.loop_name);
        let with_mode = with(&labels, ("mode", run.mode.as_str().to_owned()));
        self.histogram(BRANCH_DURATION, &with_mode)
            .record(run.duration.as_secs_f64());
        self.histogram(BRANCH_START_DELAY, &with_mode)
            .record(run.start_delay.as_secs_f64());
        if run.transition == Transition::BecameDelayed {
            self.counter(BRANCH_OVERRUN, &labels).increment(1);
        }
        {
            // Held while setting, so that a report racing the term's end cannot set it again.
            let term = self.term();
            if *term == Some(run.epoch) {
                let delayed = match run.overrun {
                    OverrunState::Delayed => 1.0,
                    OverrunState::OnTime => 0.0,
                };
                self.gauge(BRANCH_DELAYED, &labels).set(delayed);
                self.gauge(BRANCH_CONSECUTIVE_FAILURES, &labels)
                    .set(f64::from(run.consecutive_failures));
            }
        }
        self.counter(
            BRANCH_RUNS,
            &with(&labels, ("outcome", run.result.outcome().into())),
        )
        .increment(1);
        self.counter(BRANCH_ROWS, &labels).increment(run.rows);
        self.gauge(BRANCH_INTERVAL, &labels)
            .set(run.interval.as_secs_f64());
        if run.result.error_message().is_none() {
            self.gauge(BRANCH_LAST_SUCCESS, &labels).set(unix_now());
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
                Observation::TableHealth(report) => self.table_health(report),
                Observation::Skipped { .. } => self.counter(BRANCH_SKIPPED, &labels).increment(1),
            }
        }
    }

    fn leadership(&self, event: &LeadershipEvent) {
        let (leading, label, epoch) = match event {
            LeadershipEvent::Acquired { epoch } => (1.0, "acquired", *epoch),
            LeadershipEvent::Lost { epoch, .. } => (0.0, "lost", *epoch),
            LeadershipEvent::SteppedDown { epoch } => (0.0, "stepped_down", *epoch),
        };
        {
            let mut term = self.term();
            match event {
                LeadershipEvent::Acquired { epoch } => *term = Some(*epoch),
                LeadershipEvent::Lost { epoch, .. } | LeadershipEvent::SteppedDown { epoch } => {
                    if *term == Some(*epoch) {
                        *term = None;
                        // The term's trackers and measurements are gone; a standby has no
                        // delayed branch and measures no backlog.
                        for gauge in self.gauges.values_where(|(name, _)| {
                            [
                                BRANCH_DELAYED,
                                BRANCH_CONSECUTIVE_FAILURES,
                                PROMOTION_BACKLOG_AGE,
                                RESCUE_BACKLOG_AGE,
                                CANDIDATES,
                            ]
                            .contains(name)
                        }) {
                            gauge.set(0.0);
                        }
                    }
                }
            }
        }
        self.gauge(LEADER, &self.leader_labels()).set(leading);
        self.gauge(LEADER_EPOCH, &self.leader_labels())
            .set(epoch as f64);
        self.counter(LEADER_TRANSITIONS, &[("event", label.into())])
            .increment(1);
    }

    fn backlog(&self, report: &BacklogReport) {
        // Held while setting, so that a report racing the term's end cannot set it again.
        let term = self.term();
        if *term != Some(report.epoch) {
            return;
        }
        let gauge = match report.kind {
            BacklogKind::Promotion => self.gauge(PROMOTION_BACKLOG_AGE, &[]),
            BacklogKind::Rescue(reason) => {
                self.gauge(RESCUE_BACKLOG_AGE, &[("reason", reason.as_str().into())])
            }
        };
        gauge.set(report.age.as_secs_f64());
    }

    fn candidates(&self, seen: &[CandidateSeen]) {
        let mut counts: std::collections::BTreeMap<Vec<String>, f64> = Default::default();
        for c in seen {
            let key = vec![
                c.version.clone(),
                c.loop_mode.clone(),
                c.config_digest.clone(),
            ];
            *counts.entry(key).or_default() += 1.0;
        }
        // Combinations no longer seen drop to 0 rather than keep their last count.
        for gauge in self
            .gauges
            .values_where(|(name, values)| *name == CANDIDATES && !counts.contains_key(values))
        {
            gauge.set(0.0);
        }
        for (values, count) in counts {
            let [version, loop_mode, config_digest] = [&values[0], &values[1], &values[2]];
            self.gauge(
                CANDIDATES,
                &[
                    ("version", version.clone()),
                    ("loop_mode", loop_mode.clone()),
                    ("config_digest", config_digest.clone()),
                ],
            )
            .set(count);
        }
    }

    fn server_read_only(&self, read_only: bool) {
        self.gauge(SERVER_READ_ONLY, &[])
            .set(if read_only { 1.0 } else { 0.0 });
    }

    fn loop_restarted(&self, loop_name: &str, _reason: &str) {
        self.counter(LOOP_RESTARTS, &[("loop", loop_name.to_string())])
            .increment(1);
    }
}

/// A fleet process's part of one database's queues after a round of the share rule
/// (ADR 0003): per process, so without the queue's labels.
pub fn fleet_share(database: &str, share: &steward_leader::fleet::Share) {
    let database = || vec![Label::new(DATABASE_LABEL, database.to_owned())];
    metrics::gauge!(FLEET_QUEUES_LED, database()).set(share.led as f64);
    metrics::gauge!(FLEET_PROCESSES, database()).set(share.processes as f64);
    for (kind, value) in [("fair", share.fair), ("cap", share.cap)] {
        let mut labels = database();
        labels.push(Label::new("kind", kind));
        metrics::gauge!(FLEET_SHARE, labels).set(value as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics_exporter_prometheus::PrometheusBuilder;
    use std::time::Duration;
    use steward_branches::Class;
    use steward_leader::{LoopMode, RunResult};

    fn run(epoch: i64, overrun: OverrunState, transition: Transition) -> BranchRun<'static> {
        BranchRun {
            branch: "promote_scheduled",
            class: Class::Slo,
            loop_name: "promote_scheduled",
            mode: LoopMode::Split,
            epoch,
            interval: Duration::from_millis(250),
            started_at: SystemTime::now(),
            start_delay: Duration::from_millis(1),
            duration: Duration::from_millis(2),
            rows: 0,
            result: RunResult::Ok,
            observations: &[],
            overrun,
            transition,
            overrun_episodes: 0,
            consecutive_failures: 0,
        }
    }

    /// The labels of the default queue: schema `steward`, no database.
    fn steward() -> QueueLabels {
        QueueLabels {
            schema: "steward".into(),
            database: None,
        }
    }

    /// The value of the sample `series` (name and labels as rendered) in an exposition.
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    }

    fn health_run(observations: &[Observation]) -> BranchRun<'_> {
        BranchRun {
            branch: "table_health",
            class: Class::Hygiene,
            loop_name: "hygiene",
            observations,
            ..run(1, OverrunState::OnTime, Transition::None)
        }
    }

    fn health_report(indexes: &[(&str, bool)]) -> table_health::Report {
        table_health::Report {
            tables: vec![table_health::TableStats {
                table: "jobs".into(),
                live_tuples: 10,
                dead_tuples: 4,
                bytes: 81920,
                bloat_bytes: None,
                last_vacuum: Some(1_700_000_000.5),
                last_analyze: None,
            }],
            indexes: indexes
                .iter()
                .map(|(index, valid)| table_health::IndexStats {
                    table: "jobs".into(),
                    index: (*index).into(),
                    bytes: 16384,
                    bloat_bytes: Some(8192),
                    valid: *valid,
                })
                .collect(),
        }
    }

    #[test]
    fn table_health_sets_a_gauge_per_table_and_index_and_zeroes_what_is_gone() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let observer = MetricsObserver::new("host-1-00aa", steward());
            let first = [Observation::TableHealth(health_report(&[
                ("jobs_pkey", true),
                ("jobs_pkey_ccnew", false),
            ]))];
            observer.branch_run(&health_run(&first));
            let text = handle.render();
            for (series, value) in [
                (
                    r#"steward_table_live_tuples{schema="steward",table="jobs"}"#,
                    10.0,
                ),
                (
                    r#"steward_table_dead_tuples{schema="steward",table="jobs"}"#,
                    4.0,
                ),
                (
                    r#"steward_table_bytes{schema="steward",table="jobs"}"#,
                    81920.0,
                ),
                (
                    r#"steward_table_bloat_bytes{schema="steward",table="jobs"}"#,
                    0.0,
                ),
                (
                    r#"steward_table_last_vacuum_timestamp_seconds{schema="steward",table="jobs"}"#,
                    1_700_000_000.5,
                ),
                (
                    r#"steward_table_last_analyze_timestamp_seconds{schema="steward",table="jobs"}"#,
                    0.0,
                ),
                (
                    r#"steward_index_bytes{schema="steward",table="jobs",index="jobs_pkey"}"#,
                    16384.0,
                ),
                (
                    r#"steward_index_bloat_bytes{schema="steward",table="jobs",index="jobs_pkey"}"#,
                    8192.0,
                ),
                (
                    r#"steward_index_invalid{schema="steward",table="jobs",index="jobs_pkey"}"#,
                    0.0,
                ),
                (
                    r#"steward_index_invalid{schema="steward",table="jobs",index="jobs_pkey_ccnew"}"#,
                    1.0,
                ),
            ] {
                assert_eq!(sample(&text, series), Some(value), "{series} in {text}");
            }

            // The leftover was dropped: its series fall to 0, the others keep their values.
            let second = [Observation::TableHealth(health_report(&[(
                "jobs_pkey",
                true,
            )]))];
            observer.branch_run(&health_run(&second));
            let text = handle.render();
            for (series, value) in [
                (
                    r#"steward_index_invalid{schema="steward",table="jobs",index="jobs_pkey_ccnew"}"#,
                    0.0,
                ),
                (
                    r#"steward_index_bytes{schema="steward",table="jobs",index="jobs_pkey_ccnew"}"#,
                    0.0,
                ),
                (
                    r#"steward_index_bytes{schema="steward",table="jobs",index="jobs_pkey"}"#,
                    16384.0,
                ),
                (
                    r#"steward_table_dead_tuples{schema="steward",table="jobs"}"#,
                    4.0,
                ),
            ] {
                assert_eq!(sample(&text, series), Some(value), "{series} in {text}");
            }
        });
    }

    const DELAYED: &str = r#"steward_maintenance_branch_delayed{schema="steward",branch="promote_scheduled",class="slo",loop="promote_scheduled"}"#;
    const OVERRUNS: &str = r#"steward_maintenance_branch_overrun_total{schema="steward",branch="promote_scheduled",class="slo",loop="promote_scheduled"}"#;

    #[test]
    fn delayed_follows_the_trackers_state_while_the_term_lasts() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let observer = MetricsObserver::new("host-1-00aa", steward());
            let promoter =
                steward_branches::promote_scheduled::PromoteScheduled::new(Default::default());
            observer.register_initial(&LoopPlan::new(
                LoopMode::Split,
                &[std::sync::Arc::new(promoter)],
            ));
            let text = handle.render();
            assert_eq!(sample(&text, DELAYED), Some(0.0), "{text}");
            assert_eq!(
                sample(
                    &text,
                    r#"steward_leader{schema="steward",instance="host-1-00aa"}"#
                ),
                Some(0.0),
                "{text}"
            );

            observer.leadership(&LeadershipEvent::Acquired { epoch: 3 });
            observer.branch_run(&run(3, OverrunState::Delayed, Transition::BecameDelayed));
            let text = handle.render();
            assert_eq!(sample(&text, DELAYED), Some(1.0), "{text}");
            assert_eq!(sample(&text, OVERRUNS), Some(1.0), "{text}");
            assert_eq!(
                sample(
                    &text,
                    r#"steward_leader{schema="steward",instance="host-1-00aa"}"#
                ),
                Some(1.0),
                "{text}"
            );
            assert_eq!(
                sample(
                    &text,
                    r#"steward_leader_epoch{schema="steward",instance="host-1-00aa"}"#
                ),
                Some(3.0),
                "{text}"
            );

            // Still delayed: the gauge stays up though the episode counter does not move.
            for _ in 0..5 {
                observer.branch_run(&run(3, OverrunState::Delayed, Transition::None));
            }
            let text = handle.render();
            assert_eq!(sample(&text, DELAYED), Some(1.0), "{text}");
            assert_eq!(sample(&text, OVERRUNS), Some(1.0), "{text}");

            observer.branch_run(&run(3, OverrunState::OnTime, Transition::Recovered));
            assert_eq!(sample(&handle.render(), DELAYED), Some(0.0));

            // Delayed again, then the term ends: the trackers are gone, so is the delay, and
            // a late report of the old term does not bring it back.
            observer.branch_run(&run(3, OverrunState::Delayed, Transition::BecameDelayed));
            assert_eq!(sample(&handle.render(), DELAYED), Some(1.0));
            observer.leadership(&LeadershipEvent::Lost {
                epoch: 3,
                reason: "test".into(),
            });
            observer.branch_run(&run(3, OverrunState::Delayed, Transition::None));
            let text = handle.render();
            assert_eq!(sample(&text, DELAYED), Some(0.0), "{text}");
            assert_eq!(sample(&text, OVERRUNS), Some(2.0), "{text}");
            assert_eq!(
                sample(
                    &text,
                    r#"steward_leader{schema="steward",instance="host-1-00aa"}"#
                ),
                Some(0.0),
                "{text}"
            );
        });
    }

    /// One process serving several queues creates an observer per queue, all into one recorder:
    /// each queue gets series of its own, and `database` appears only where it was given.
    #[test]
    fn observers_of_different_queues_keep_their_series_apart() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let queue = |schema: &str, database: Option<&str>| QueueLabels {
                schema: schema.into(),
                database: database.map(str::to_owned),
            };
            let a = MetricsObserver::new("host-1-00aa", queue("tenant_a", None));
            let b = MetricsObserver::new("host-1-00aa", queue("tenant_b", None));
            // The same schema in another database.
            let c = MetricsObserver::new("host-1-00aa", queue("tenant_a", Some("other")));
            let promoter =
                steward_branches::promote_scheduled::PromoteScheduled::new(Default::default());
            let plan = LoopPlan::new(LoopMode::Split, &[std::sync::Arc::new(promoter)]);
            for observer in [&a, &b, &c] {
                observer.register_initial(&plan);
            }
            a.leadership(&LeadershipEvent::Acquired { epoch: 3 });
            a.branch_run(&run(3, OverrunState::Delayed, Transition::BecameDelayed));
            b.leadership(&LeadershipEvent::Acquired { epoch: 5 });

            let text = handle.render();
            let leader =
                |queue: &str| format!(r#"steward_leader{{{queue},instance="host-1-00aa"}}"#);
            let epoch =
                |queue: &str| format!(r#"steward_leader_epoch{{{queue},instance="host-1-00aa"}}"#);
            let delayed = |queue: &str| {
                format!(
                    r#"steward_maintenance_branch_delayed{{{queue},branch="promote_scheduled",class="slo",loop="promote_scheduled"}}"#
                )
            };
            const A: &str = r#"schema="tenant_a""#;
            const B: &str = r#"schema="tenant_b""#;
            const C: &str = r#"schema="tenant_a",database="other""#;
            for (series, value) in [
                (leader(A), 1.0),
                (leader(B), 1.0),
                (leader(C), 0.0),
                (epoch(A), 3.0),
                (epoch(B), 5.0),
                (epoch(C), 0.0),
                (delayed(A), 1.0),
                (delayed(B), 0.0),
                (delayed(C), 0.0),
            ] {
                assert_eq!(sample(&text, &series), Some(value), "{series} in {text}");
            }
            // Every sample carries the queue's labels first; only c's name a database.
            for line in text.lines().filter(|l| l.starts_with("steward_")) {
                let labels = line.split_once('{').map_or("", |(_, rest)| rest);
                assert!(
                    labels.starts_with(A) || labels.starts_with(B),
                    "{line} does not start with the queue's labels"
                );
                assert_eq!(
                    labels.contains("database="),
                    labels.starts_with(C),
                    "{line}"
                );
            }

            // a's term ends: only a's gauges drop.
            a.leadership(&LeadershipEvent::Lost {
                epoch: 3,
                reason: "test".into(),
            });
            b.branch_run(&run(5, OverrunState::Delayed, Transition::BecameDelayed));
            let text = handle.render();
            for (series, value) in [
                (leader(A), 0.0),
                (leader(B), 1.0),
                (delayed(A), 0.0),
                (delayed(B), 1.0),
            ] {
                assert_eq!(sample(&text, &series), Some(value), "{series} in {text}");
            }
        });
    }
}
