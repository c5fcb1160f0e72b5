//! Every metric the worker records through the `metrics` facade; the embedding application
//! chooses the exporter.
//!
//! Every series carries [`SCHEMA`] first: an application may run a worker per schema (per
//! Steward queue) in one process, and their series must not share a label set.

/// The label naming the schema of the worker's target, on every series below.
pub const SCHEMA: &str = "schema";

/// Seconds per heartbeat flush (histogram).
pub const HEARTBEAT_FLUSH_DURATION: &str = "steward_worker_heartbeat_flush_duration_seconds";
/// Seconds since the last successful heartbeat flush (gauge).
pub const HEARTBEAT_AGE: &str = "steward_worker_heartbeat_age_seconds";
/// Failed heartbeat flushes, label `kind`: error, timeout or panic (counter).
pub const HEARTBEAT_ERRORS: &str = "steward_worker_heartbeat_errors_total";
/// Runs this worker holds (gauge).
pub const LEASES: &str = "steward_worker_leases";
/// Runs whose lease the database refused: rescued, cancelled or claimed again (counter).
pub const LEASES_LOST: &str = "steward_worker_leases_lost_total";
/// 1 while claims are paused because heartbeats fail (gauge).
pub const CLAIMS_PAUSED: &str = "steward_worker_claims_paused";
/// Finished runs, labels `queue` and `outcome`: completed, retried, failed, snoozed, parked,
/// refused (the lease was lost), released (handed back at shutdown), abandoned, unwritten
/// (see `Outcome`) (counter).
pub const JOBS: &str = "steward_worker_jobs_total";
/// Seconds a handler ran, label `queue` (histogram).
pub const JOB_DURATION: &str = "steward_worker_job_duration_seconds";
/// Seconds from a job's due time to its claim, label `queue` (histogram).
pub const PICKUP_LAG: &str = "steward_worker_pickup_lag_seconds";
/// Seconds per flush of finishing writes (histogram).
pub const WRITE_FLUSH_DURATION: &str = "steward_worker_write_flush_duration_seconds";
/// Runs per flush of finishing writes (histogram).
pub const WRITE_FLUSH_RUNS: &str = "steward_worker_write_flush_runs";
/// Restarts of a worker task that stopped, label `task` (counter).
pub const TASK_RESTARTS: &str = "steward_worker_task_restarts_total";
