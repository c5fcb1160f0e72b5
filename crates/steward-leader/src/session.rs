//! The leader connection: a dedicated (never pooled) session that holds the advisory lock, and
//! the statements that open and close a leadership term.
//!
//! The session stays idle while the branches run (they use their own work connections): a
//! statement running here would delay the lock's release if this process died. The only
//! statements it runs during a term are the probe (the read-only check, bounded by a timeout)
//! and the term's start and end.

use crate::instance::Registration;
use std::time::{Duration, Instant};
use steward_connection::{
    describe_pg_error, ConnectError, Ended, Reconnecting, SchemaName, Target,
};
use tokio_postgres::Client;

/// The name of a schema's leadership lock; its advisory lock key is `hashtextextended` of it.
pub fn lock_name(schema: &SchemaName) -> String {
    format!("steward.leader.{schema}")
}

/// Blocks until this session holds the leadership lock of a schema (a waiter is woken within
/// milliseconds of the holder's session ending).
pub const ACQUIRE: &str = "SELECT pg_advisory_lock(hashtextextended($1, 0))";

/// Releases the leadership lock on a clean step-down (held in session memory: no table).
pub const RELEASE: &str = "SELECT pg_advisory_unlock(hashtextextended($1, 0))";

/// Opens a term in one statement: takes the `leader` row FOR UPDATE (which waits for every
/// in-flight fenced transaction of the old term, since those hold KEY SHARE), increments the
/// epoch, records who leads, and closes any term left open. Primary keys only.
pub const START_TERM: &str = "
WITH previous AS (
    SELECT epoch FROM leader WHERE id = 1 FOR UPDATE
), closed AS (
    UPDATE leader_terms SET ended_at = now(), end_reason = 'superseded'
    WHERE ended_at IS NULL AND epoch = (SELECT epoch FROM previous)
), opened AS (
    UPDATE leader SET epoch = previous.epoch + 1, instance = $1, host = $2, pid = $3,
        backend_pid = pg_backend_pid(), since = now(), last_progress_at = clock_timestamp(),
        resigned_at = NULL, promote_wakeup_at = NULL,
        heartbeat_staleness = $4::float8 * interval '1 second'
    FROM previous
    WHERE leader.id = 1
    RETURNING leader.epoch
)
INSERT INTO leader_terms (epoch, instance, host, pid)
SELECT epoch, $1, $2, $3 FROM opened
RETURNING epoch";

/// Closes our term on a clean step-down, so `steward status` shows no leader until the next.
/// Primary keys of leader_terms (epoch) and leader (id).
pub const END_TERM: &str = "
WITH ended AS (
    UPDATE leader_terms SET ended_at = now(), end_reason = $2
    WHERE epoch = $1 AND ended_at IS NULL
)
UPDATE leader SET resigned_at = now(), promote_wakeup_at = NULL WHERE id = 1 AND epoch = $1";

/// Whether the server refuses writes: a hot standby (in recovery), or a primary set read-only
/// (`default_transaction_read_only`, as a demoted or fenced primary is). A candidate must not
/// lead there: every term statement and branch pass would fail.
pub const READ_ONLY: &str =
    "SELECT pg_is_in_recovery() OR current_setting('default_transaction_read_only')::bool";

/// The term's probe: [`READ_ONLY`], and whether this session's backend still holds the
/// leadership lock `$1` (matched in `pg_locks` as `status::LOCK_HELD` does). Reads the lock
/// table, no user table.
pub const PROBE: &str = "
SELECT pg_is_in_recovery() OR current_setting('default_transaction_read_only')::bool,
    EXISTS (
        SELECT 1 FROM pg_locks l, (SELECT hashtextextended($1, 0) AS k) h
        WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
          AND l.pid = pg_backend_pid()
          AND l.classid = ((h.k >> 32) & 4294967295)::oid
          AND l.objid = (h.k & 4294967295)::oid)";

/// Why the leader connection's probe failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeError {
    /// The server answered but refuses writes now (see [`READ_ONLY`]).
    ReadOnly,
    /// The session's backend does not hold the lock (see [`PROBE`]).
    LockLost,
    Failed(String),
}

pub struct LeaderSession {
    client: Client,
    ended: Ended,
    lock_name: String,
}

impl LeaderSession {
    pub async fn open(target: &Target) -> Result<Self, ConnectError> {
        let (client, ended) = target.connect_watched().await?;
        Ok(Self {
            client,
            ended,
            lock_name: lock_name(target.schema()),
        })
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Resolves as soon as the connection is gone (its driver future ended).
    pub async fn ended(&self) {
        self.ended.wait().await
    }

    /// See [`READ_ONLY`].
    pub async fn read_only(&self) -> Result<bool, tokio_postgres::Error> {
        Ok(self.client.query_one(READ_ONLY, &[]).await?.get(0))
    }

    pub async fn acquire(&self, lock_name: &str) -> Result<(), tokio_postgres::Error> {
        self.client
            .execute(ACQUIRE, &[&lock_name])
            .await
            .map(|_| ())
    }

    /// Opens a term; `heartbeat_staleness` is published for workers (see
    /// [`steward_branches::Branch::heartbeat_staleness`]).
    pub async fn start_term(
        &self,
        instance: &str,
        host: &str,
        pid: i32,
        heartbeat_staleness: Option<Duration>,
    ) -> Result<i64, tokio_postgres::Error> {
        let staleness = heartbeat_staleness.map(|s| s.as_secs_f64());
        Ok(self
            .client
            .query_one(START_TERM, &[&instance, &host, &pid, &staleness])
            .await?
            .get(0))
    }

    /// Round-trip time of the [`PROBE`], or why it failed: no answer within `timeout`, a
    /// server that no longer accepts writes, or a lock this session's backend does not hold.
    pub async fn probe(&self, timeout: Duration) -> Result<Duration, ProbeError> {
        let started = Instant::now();
        let lock_name: &(dyn tokio_postgres::types::ToSql + Sync) = &self.lock_name;
        match tokio::time::timeout(timeout, self.client.query_one(PROBE, &[lock_name])).await {
            Ok(Ok(row)) if row.get::<_, bool>(0) => Err(ProbeError::ReadOnly),
            Ok(Ok(row)) if !row.get::<_, bool>(1) => Err(ProbeError::LockLost),
            Ok(Ok(_)) => Ok(started.elapsed()),
            Ok(Err(e)) => Err(ProbeError::Failed(e.to_string())),
            Err(_) => Err(ProbeError::Failed(format!("no answer within {timeout:?}"))),
        }
    }

    /// Records the end of our term and releases the lock, within `timeout`.
    pub async fn step_down(&self, epoch: i64, lock_name: &str, reason: &str, timeout: Duration) {
        let work = async {
            self.client.execute(END_TERM, &[&epoch, &reason]).await?;
            self.client.execute(RELEASE, &[&lock_name]).await
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                tracing::warn!(error = %describe_pg_error(&error), "could not record the end of the term; closing the session releases the lock")
            }
            Err(_) => tracing::warn!(
                "recording the end of the term timed out; closing the session releases the lock"
            ),
        }
    }
}

/// Reads the current leader's progress and who it is. DB clock on both sides, so no skew.
/// Primary key of the one-row leader table.
pub const LEADER_PROGRESS: &str = "
SELECT epoch, instance, extract(epoch FROM clock_timestamp() - last_progress_at)::float8
FROM leader WHERE id = 1 AND instance IS NOT NULL AND resigned_at IS NULL";

/// Ends every session of a wedged instance (its lock session releases the lock; its work
/// sessions can no longer commit). Matches the application_name every Steward connection
/// carries: `steward:<instance>:<role>`. Reads pg_stat_activity (one row per backend).
pub const TERMINATE_INSTANCE: &str = "
SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))
FROM pg_stat_activity
WHERE application_name LIKE $1 AND pid <> pg_backend_pid()";

/// Whether this session's role may end the sessions of the leader's role, as the wedge
/// takeover must: a superuser may end any; otherwise only non-superuser sessions of a role whose
/// privileges it has, or any with `pg_signal_backend`. Returns the leader's role, the answer and
/// this session's role, or no row when the leader's backend is gone. Reads pg_stat_activity and
/// pg_roles.
pub const CAN_END_LEADER: &str = "
SELECT a.usename::text, current_user::text,
    me.rolsuper OR (NOT them.rolsuper AND (pg_has_role(current_user, a.usesysid, 'USAGE')
        OR pg_has_role(current_user, 'pg_signal_backend', 'USAGE')))
FROM pg_stat_activity a
JOIN pg_roles them ON them.oid = a.usesysid
JOIN pg_roles me ON me.rolname = current_user
WHERE a.pid = (SELECT backend_pid FROM leader WHERE id = 1)";

/// Says once per term, as a warning, when this standby could not take over from the leader if
/// it wedged: the wedge takeover ends the leader's sessions, which its role may not do.
async fn warn_if_takeover_cannot_work(client: &tokio_postgres::Client, epoch: i64, leader: &str) {
    match client.query_opt(CAN_END_LEADER, &[]).await {
        Ok(Some(row)) if !row.get::<_, bool>(2) => {
            let (leader_role, own_role): (String, String) = (row.get(0), row.get(1));
            tracing::warn!(epoch, %leader, %leader_role, role = %own_role, "this standby cannot take over if the leader wedges: its role may not end the leader's sessions (that needs the leader role's privileges or pg_signal_backend, and a superuser's sessions need a superuser); run every steward as the same role, or grant pg_signal_backend to this one");
        }
        Ok(_) => {}
        Err(error) => {
            tracing::debug!(error = %describe_pg_error(&error), "could not check whether a wedge takeover could end the leader's sessions")
        }
    }
}

/// Standby side: while waiting for the lock, take over from a leader that holds it but has made
/// no progress for `wedge_timeout` (runtime stuck, process paused) by ending its sessions.
pub(crate) async fn watch_for_wedged_leader(
    target: Target,
    registration: Registration,
    wedge_timeout: Duration,
    check_every: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut session = Reconnecting::new(target);
    let mut leading: Option<(i64, String)> = None;
    let mut tick = tokio::time::interval(check_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Ok(c) = session.get().await else { continue };
        if let Err(error) = registration.refresh(c).await {
            tracing::debug!(error = %describe_pg_error(&error), "could not refresh the candidate's record");
        }
        let own_instance = &registration.instance;
        let row = match c.query_opt(LEADER_PROGRESS, &[]).await {
            Ok(row) => row,
            Err(error) => {
                tracing::debug!(error = %describe_pg_error(&error), "wedge check failed");
                continue;
            }
        };
        let Some(row) = row else { continue };
        let (epoch, instance, age): (i64, String, Option<f64>) =
            (row.get(0), row.get(1), row.get(2));
        // Once per term: who this standby waits behind.
        if leading.as_ref() != Some(&(epoch, instance.clone())) && instance != *own_instance {
            tracing::info!(leader = %instance, epoch, "standing by: another instance leads");
            warn_if_takeover_cannot_work(c, epoch, &instance).await;
            leading = Some((epoch, instance.clone()));
        }
        let Some(age) = age else { continue };
        if instance == *own_instance || age < wedge_timeout.as_secs_f64() {
            continue;
        }
        tracing::warn!(epoch, %instance, stalled_secs = age, "the leader has made no progress; ending its sessions to take over");
        let pattern = format!("steward:{}:%", like_escape(&instance));
        match c.query_one(TERMINATE_INSTANCE, &[&pattern]).await {
            Ok(row) => {
                tracing::warn!(epoch, %instance, sessions = row.get::<_, i64>(0), "ended the wedged leader's sessions")
            }
            Err(error) => {
                tracing::error!(error = %describe_pg_error(&error), %instance, "could not end the wedged leader's sessions")
            }
        }
    }
}

pub(crate) fn like_escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_")
}
