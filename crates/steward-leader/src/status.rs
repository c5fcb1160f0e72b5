//! What anyone with database access can know about a schema's leadership: who leads (read from
//! the advisory lock itself; the `leader` row only says who), the last term when nobody does,
//! and each branch's health as the leader last flushed it. `steward status`, the demo and the
//! tests all read it here.

use crate::session::lock_name;
use chrono::{DateTime, Utc};
use serde::Serialize;
use steward_connection::{describe_pg_error, SchemaName};
use tokio_postgres::{Client, Row};

/// Whether anyone holds the schema's leadership lock in this database. The lock key is a
/// bigint, which pg_locks splits into classid (high 32 bits) and objid (low 32 bits).
pub const LOCK_HELD: &str = "
SELECT EXISTS (
    SELECT 1 FROM pg_locks l, (SELECT hashtextextended($1, 0) AS k) h
    WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND l.classid = ((h.k >> 32) & 4294967295)::oid
      AND l.objid = (h.k & 4294967295)::oid)";

/// The current (or last) term. Primary key of `leader`.
pub const TERM: &str = "
SELECT epoch, instance, host, pid, since, resigned_at,
       extract(epoch FROM clock_timestamp() - last_progress_at)::float8
FROM leader WHERE id = 1";

/// Per-branch health as the leader last flushed it, with the instance that led the term that
/// wrote it. Primary keys of two small tables.
pub const BRANCHES: &str = "
SELECT b.branch, b.loop_name, b.epoch, t.instance, b.last_run_at,
       extract(epoch FROM clock_timestamp() - b.last_run_at)::float8,
       b.last_duration_ms, b.last_start_delay_ms, b.last_rows, b.last_success_at, b.last_error,
       b.last_error_at, b.overrun_state, b.overrun_episodes, b.runs, b.errors,
       b.class, b.held_until, b.last_error_epoch,
       extract(epoch FROM clock_timestamp() - b.last_error_at)::float8
FROM branch_health b LEFT JOIN leader_terms t ON t.epoch = b.epoch
ORDER BY b.class DESC NULLS LAST, b.loop_name DESC, b.branch";

/// Every candidate that recorded itself, the one named `$1` (the leader) first, then by age.
/// A small table, scanned.
pub const CANDIDATES: &str = "
SELECT instance, host, pid, version, loop_mode, config_digest, since,
       extract(epoch FROM clock_timestamp() - last_seen)::float8
FROM candidates
ORDER BY instance = $1 DESC NULLS LAST, since";

#[derive(Debug, thiserror::Error)]
#[error("reading {what}: {}", describe_pg_error(.cause))]
pub struct StatusError {
    what: &'static str,
    cause: tokio_postgres::Error,
}

impl StatusError {
    fn reading(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> Self {
        move |cause| Self { what, cause }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Status {
    pub schema: String,
    /// The server refuses writes (a hot standby, or read-only): nobody can lead through it.
    pub server_read_only: bool,
    /// Someone holds the leadership lock right now.
    pub lock_held: bool,
    /// The leader's term, while the lock is held.
    pub leader: Option<TermStatus>,
    /// The last term, when nobody holds the lock.
    pub last_term: Option<TermStatus>,
    /// Every recorded candidate, the leader first.
    pub candidates: Vec<CandidateStatus>,
    pub branches: Vec<BranchStatus>,
}

/// A `steward run` process standing for election (or leading).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CandidateStatus {
    pub instance: String,
    pub host: String,
    pub pid: i32,
    pub version: String,
    pub loop_mode: String,
    pub config_digest: String,
    pub since: DateTime<Utc>,
    pub seconds_since_seen: Option<f64>,
    /// It leads the current term.
    pub leading: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TermStatus {
    pub epoch: i64,
    pub instance: String,
    pub host: String,
    pub pid: i32,
    pub since: Option<DateTime<Utc>>,
    /// When the term was closed by a clean step-down.
    pub resigned_at: Option<DateTime<Utc>>,
    pub seconds_since_progress: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct BranchStatus {
    pub branch: String,
    /// slo or hygiene.
    pub class: Option<String>,
    /// The loop that ran the branch (see [`crate::LoopPlan`]).
    #[serde(rename = "loop")]
    pub loop_name: String,
    /// A rescue held in its quiet period: when it may run.
    pub held_until: Option<DateTime<Utc>>,
    pub epoch: i64,
    /// The instance that led `epoch` (counters are per process: each counts from zero).
    pub instance: Option<String>,
    pub last_run_at: Option<DateTime<Utc>>,
    pub seconds_since_run: Option<f64>,
    pub last_duration_ms: Option<f64>,
    pub last_start_delay_ms: Option<f64>,
    pub last_rows: Option<i64>,
    pub last_success_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    pub seconds_since_error: Option<f64>,
    /// The term the last error came from.
    pub last_error_epoch: Option<i64>,
    pub overrun_state: String,
    pub overrun_episodes: i64,
    /// Passes and failed passes in the term of `epoch`.
    pub runs: i64,
    pub errors: i64,
}

/// Reads the status of `schema` over `client` (a session of that schema's target).
pub async fn read(client: &Client, schema: &SchemaName) -> Result<Status, StatusError> {
    let server_read_only: bool = client
        .query_one(crate::session::READ_ONLY, &[])
        .await
        .map_err(StatusError::reading("whether the server accepts writes"))?
        .get(0);
    let lock_held: bool = client
        .query_one(LOCK_HELD, &[&lock_name(schema)])
        .await
        .map_err(StatusError::reading("the leadership lock"))?
        .get(0);
    let term = client
        .query_one(TERM, &[])
        .await
        .map_err(StatusError::reading("the leader"))?;
    let term = term_status(&term);
    let (leader, last_term) = if lock_held {
        (term, None)
    } else {
        (None, term)
    };
    let branches = client
        .query(BRANCHES, &[])
        .await
        .map_err(StatusError::reading("branch health"))?
        .iter()
        .map(branch_status)
        .collect();
    let leading = leader.as_ref().map(|l| l.instance.clone());
    let candidates = client
        .query(CANDIDATES, &[&leading])
        .await
        .map_err(StatusError::reading("the candidates"))?
        .iter()
        .map(|row| {
            let instance: String = row.get(0);
            CandidateStatus {
                leading: leading.as_deref() == Some(instance.as_str()),
                instance,
                host: row.get(1),
                pid: row.get(2),
                version: row.get(3),
                loop_mode: row.get(4),
                config_digest: row.get(5),
                since: row.get(6),
                seconds_since_seen: row.get(7),
            }
        })
        .collect();
    Ok(Status {
        schema: schema.to_string(),
        server_read_only,
        lock_held,
        leader,
        last_term,
        candidates,
        branches,
    })
}

/// `None` before the first term.
fn term_status(row: &Row) -> Option<TermStatus> {
    let instance: Option<String> = row.get(1);
    Some(TermStatus {
        epoch: row.get(0),
        instance: instance?,
        host: row.get::<_, Option<String>>(2).unwrap_or_default(),
        pid: row.get::<_, Option<i32>>(3).unwrap_or_default(),
        since: row.get(4),
        resigned_at: row.get(5),
        seconds_since_progress: row.get(6),
    })
}

fn branch_status(row: &Row) -> BranchStatus {
    BranchStatus {
        branch: row.get(0),
        loop_name: row.get(1),
        epoch: row.get(2),
        instance: row.get(3),
        last_run_at: row.get(4),
        seconds_since_run: row.get(5),
        last_duration_ms: row.get(6),
        last_start_delay_ms: row.get(7),
        last_rows: row.get(8),
        last_success_at: row.get(9),
        last_error: row.get(10),
        last_error_at: row.get(11),
        overrun_state: row.get(12),
        overrun_episodes: row.get(13),
        runs: row.get(14),
        errors: row.get(15),
        class: row.get(16),
        held_until: row.get(17),
        last_error_epoch: row.get(18),
        seconds_since_error: row.get(19),
    }
}
