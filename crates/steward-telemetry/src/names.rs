//! Every metric Steward exports, by its Prometheus name. Dashboards and alert rules are
//! checked against these (dashboards/check.py, with the names scraped from a live leader).

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
