//! Every metric Steward exports: its Prometheus name, its kind and its label names. [`ALL`] is
//! the one list the dashboards, the alert rules (tests/assets.rs) and a live leader's scrape
//! (tests/e2e_telemetry.rs) are checked against, so a metric or label added or renamed here
//! must be added or renamed there too.
//!
//! Every metric is per queue (a database and a schema): its series carry [`SCHEMA_LABEL`] and,
//! when the process serves queues of more than one database, [`DATABASE_LABEL`], before the
//! labels listed for it. One process can serve many queues (ADR 0003), and these labels keep
//! their series apart.

/// The queue's schema; on every series of a per-queue metric.
pub const SCHEMA_LABEL: &str = "schema";
/// The queue's database; on every series of a per-queue metric when the process serves queues
/// of more than one database, absent otherwise.
pub const DATABASE_LABEL: &str = "database";

pub const BRANCH_DURATION: &str = "steward_maintenance_branch_duration_seconds";
pub const BRANCH_START_DELAY: &str = "steward_maintenance_branch_start_delay_seconds";
pub const BRANCH_OVERRUN: &str = "steward_maintenance_branch_overrun_total";
pub const BRANCH_DELAYED: &str = "steward_maintenance_branch_delayed";
pub const BRANCH_RUNS: &str = "steward_maintenance_branch_runs_total";
pub const BRANCH_ROWS: &str = "steward_maintenance_branch_rows_total";
pub const BRANCH_LAST_SUCCESS: &str = "steward_maintenance_branch_last_success_timestamp_seconds";
pub const BRANCH_INTERVAL: &str = "steward_maintenance_branch_interval_seconds";
pub const BRANCH_SKIPPED: &str = "steward_maintenance_branch_skipped_total";
pub const LOOP_RESTARTS: &str = "steward_maintenance_loop_restarts_total";
pub const LEADER: &str = "steward_leader";
pub const LEADER_EPOCH: &str = "steward_leader_epoch";
pub const LEADER_TRANSITIONS: &str = "steward_leader_transitions_total";
pub const PROMOTION_LAG: &str = "steward_promotion_lag_seconds";
pub const RESCUED_JOBS: &str = "steward_rescued_jobs_total";
pub const QUEUE_JOBS: &str = "steward_queue_jobs";
pub const QUEUE_OLDEST_AVAILABLE_AGE: &str = "steward_queue_oldest_available_age_seconds";
/// Passes of a branch in a row that failed (timed out, errored or panicked).
pub const BRANCH_CONSECUTIVE_FAILURES: &str = "steward_maintenance_branch_consecutive_failures";
/// Age of the oldest job that is due and not yet available, as the leader measured it.
pub const PROMOTION_BACKLOG_AGE: &str = "steward_promotion_backlog_age_seconds";
/// Age of the oldest run that should have been rescued for `reason` and was not.
pub const RESCUE_BACKLOG_AGE: &str = "steward_rescue_backlog_age_seconds";
/// 1 while this instance's server refuses writes (a hot standby, or a read-only primary), so
/// that it does not stand for election.
pub const SERVER_READ_ONLY: &str = "steward_server_read_only";
/// Candidates seen recently, by version, loop mode and configuration digest, as the leader reads
/// them: more than one series means a failover would change how the queue is maintained.
pub const CANDIDATES: &str = "steward_candidates";
/// Queues this process leads in a database (a fleet process, ADR 0003; per process, not per
/// queue).
pub const FLEET_QUEUES_LED: &str = "steward_fleet_queues_led";
/// This process's fair share (`kind="fair"`, ceil(queues / processes)) and cap (`kind="cap"`,
/// fair + 1) of a database's queues.
pub const FLEET_SHARE: &str = "steward_fleet_share";
/// The fleet's live processes in a database, as this process last read them.
pub const FLEET_PROCESSES: &str = "steward_fleet_processes";

/// Live rows of one of Steward's tables (table_health; a partitioned table's partitions summed).
pub const TABLE_LIVE_TUPLES: &str = "steward_table_live_tuples";
/// Dead rows not yet vacuumed away, per table.
pub const TABLE_DEAD_TUPLES: &str = "steward_table_dead_tuples";
/// A table's size on disk without its indexes (heap, TOAST, free space and visibility maps).
pub const TABLE_BYTES: &str = "steward_table_bytes";
/// A table's estimated bloat, from the statistics of its last VACUUM or ANALYZE (0 without).
pub const TABLE_BLOAT_BYTES: &str = "steward_table_bloat_bytes";
/// When a table was last vacuumed (manual or auto), Unix time; 0: never.
pub const TABLE_LAST_VACUUM: &str = "steward_table_last_vacuum_timestamp_seconds";
/// When a table was last analyzed (manual or auto), Unix time; 0: never.
pub const TABLE_LAST_ANALYZE: &str = "steward_table_last_analyze_timestamp_seconds";
/// An index's size on disk.
pub const INDEX_BYTES: &str = "steward_index_bytes";
/// An index's estimated bloat (b-trees on plain columns with statistics; 0 otherwise).
pub const INDEX_BLOAT_BYTES: &str = "steward_index_bloat_bytes";
/// 1 while an index is invalid (`pg_index.indisvalid = false`: the leftover of a failed
/// `CREATE INDEX CONCURRENTLY` or `REINDEX CONCURRENTLY`, or one being built), else 0.
pub const INDEX_INVALID: &str = "steward_index_invalid";

/// What a metric is in the Prometheus exposition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    /// Exposed as `_bucket` (with `le`), `_sum` and `_count` series.
    Histogram,
}

impl Kind {
    /// The type as written on the exposition's `# TYPE` line.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One exported metric and the label names every one of its series carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    /// The metric's own labels, after the queue's labels when it is [`per_queue`](Self::per_queue).
    pub labels: &'static [&'static str],
    /// Whether its series carry the queue's labels: `schema`, and `database` when the process
    /// serves several databases.
    pub per_queue: bool,
}

impl Metric {
    /// The label names of a series of this metric, in order: the queue's (`database` only when
    /// `with_database`), then its own.
    pub fn series_labels(&self, with_database: bool) -> Vec<&'static str> {
        let queue: &[&'static str] = match (self.per_queue, with_database) {
            (false, _) => &[],
            (true, false) => &[SCHEMA_LABEL],
            (true, true) => &[SCHEMA_LABEL, DATABASE_LABEL],
        };
        queue.iter().chain(self.labels).copied().collect()
    }
}

/// A per-process metric: its series carry only its own labels.
const fn process_metric(name: &'static str, kind: Kind, labels: &'static [&'static str]) -> Metric {
    Metric {
        name,
        kind,
        labels,
        per_queue: false,
    }
}

/// A per-queue metric (all but a fleet process's own).
const fn metric(name: &'static str, kind: Kind, labels: &'static [&'static str]) -> Metric {
    Metric {
        name,
        kind,
        labels,
        per_queue: true,
    }
}

/// The labels of every per-branch metric. `class` is the branch's class (`slo` or `hygiene`)
/// and is what "the SLO branches" select on; `loop` is the name of the loop task that runs the
/// branch (`slo`, `hygiene`, a branch's own loop, or `monolithic`), which differs from the
/// class for a branch with a loop of its own.
const BRANCH_LABELS: &[&str] = &["branch", "class", "loop"];

/// Every metric Steward exports. The Prometheus endpoint and OTLP carry the same names.
pub const ALL: &[Metric] = &[
    metric(
        BRANCH_DURATION,
        Kind::Histogram,
        &["branch", "class", "loop", "mode"],
    ),
    metric(
        BRANCH_START_DELAY,
        Kind::Histogram,
        &["branch", "class", "loop", "mode"],
    ),
    metric(BRANCH_OVERRUN, Kind::Counter, BRANCH_LABELS),
    metric(BRANCH_DELAYED, Kind::Gauge, BRANCH_LABELS),
    metric(
        BRANCH_RUNS,
        Kind::Counter,
        &["branch", "class", "loop", "outcome"],
    ),
    metric(BRANCH_ROWS, Kind::Counter, BRANCH_LABELS),
    metric(BRANCH_LAST_SUCCESS, Kind::Gauge, BRANCH_LABELS),
    metric(BRANCH_INTERVAL, Kind::Gauge, BRANCH_LABELS),
    metric(BRANCH_SKIPPED, Kind::Counter, BRANCH_LABELS),
    metric(LOOP_RESTARTS, Kind::Counter, &["loop"]),
    // `instance` is the Steward instance name; Prometheus stores it as `exported_instance`.
    metric(LEADER, Kind::Gauge, &["instance"]),
    metric(LEADER_EPOCH, Kind::Gauge, &["instance"]),
    metric(LEADER_TRANSITIONS, Kind::Counter, &["event"]),
    metric(PROMOTION_LAG, Kind::Histogram, &[]),
    metric(RESCUED_JOBS, Kind::Counter, &["reason"]),
    metric(QUEUE_JOBS, Kind::Gauge, &["queue", "state"]),
    metric(QUEUE_OLDEST_AVAILABLE_AGE, Kind::Gauge, &["queue"]),
    metric(BRANCH_CONSECUTIVE_FAILURES, Kind::Gauge, BRANCH_LABELS),
    metric(PROMOTION_BACKLOG_AGE, Kind::Gauge, &[]),
    metric(RESCUE_BACKLOG_AGE, Kind::Gauge, &["reason"]),
    metric(SERVER_READ_ONLY, Kind::Gauge, &[]),
    metric(
        CANDIDATES,
        Kind::Gauge,
        &["version", "loop_mode", "config_digest"],
    ),
    metric(TABLE_LIVE_TUPLES, Kind::Gauge, &["table"]),
    metric(TABLE_DEAD_TUPLES, Kind::Gauge, &["table"]),
    metric(TABLE_BYTES, Kind::Gauge, &["table"]),
    metric(TABLE_BLOAT_BYTES, Kind::Gauge, &["table"]),
    metric(TABLE_LAST_VACUUM, Kind::Gauge, &["table"]),
    metric(TABLE_LAST_ANALYZE, Kind::Gauge, &["table"]),
    metric(INDEX_BYTES, Kind::Gauge, &["table", "index"]),
    metric(INDEX_BLOAT_BYTES, Kind::Gauge, &["table", "index"]),
    metric(INDEX_INVALID, Kind::Gauge, &["table", "index"]),
    process_metric(FLEET_QUEUES_LED, Kind::Gauge, &[DATABASE_LABEL]),
    process_metric(FLEET_SHARE, Kind::Gauge, &[DATABASE_LABEL, "kind"]),
    process_metric(FLEET_PROCESSES, Kind::Gauge, &[DATABASE_LABEL]),
];

/// The metric of this name, if Steward exports it.
pub fn find(name: &str) -> Option<&'static Metric> {
    ALL.iter().find(|m| m.name == name)
}

/// Durations of branch bodies: from sub-millisecond promotions to minute-long cleanups.
pub const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0,
];

/// Start delay and promotion lag, where single milliseconds matter.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0,
];
