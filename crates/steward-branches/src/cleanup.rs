//! `cleanup`: finished jobs past their retention leave `jobs` for `job_archive` (or are deleted
//! when `archive` is off), oldest first, in batches that are each one short fenced transaction.
//!
//! Retention is per final state, with optional per-queue overrides. Each (state, retention)
//! pair is one group with its own statements: the state literal picks the state's partial index
//! (range-scanned up to the group's cutoff), and the queue filter (`queue = ANY` for an
//! override group, `queue <> ALL` of the overridden queues for the default group) is a filter
//! on that scan. No index leads with the queue for finished jobs, so a short override scans
//! past the rows of other queues that are older than it but not yet expired; with many such
//! rows an index on (queue, finalized_at) per state would make override groups exact.
//!
//! An archiving batch is one statement that deletes its candidates and moves them to the
//! archive. It waits for a candidate another transaction holds (another cleaner's batch, a
//! short update) rather than locking every row first; after a wait that hits the lock timeout
//! (a row held by an idle transaction), batches lock their candidates with `SKIP LOCKED` for
//! ten minutes (see the `held_rows!` macro), so that one held row never stalls cleanup. The next
//! batch follows when a batch picked a whole batch of candidates, whatever it moved, and it
//! starts after the last of them. When a UTC day among them has no archive partition the
//! insert fails (23514) and the transaction rolls back; the branch then creates the days the
//! batch needs in a transaction of its own (under [`crate::rotate_archive::LOCK_PARTITIONS`])
//! and runs the batch again.
//! Partitions are created ahead by `rotate_archive`, so the second try is the exception (old
//! backlogs, a first run), and the common path checks nothing: checking each batch's days
//! inside the statement would slow every batch.
//!
//! The statements are built by the macros below; the SQL that runs, one file per constant, is in
//! `tests/sql/cleanup__*.snap` (`cleanup__archive_completed.snap` is [`ARCHIVE_COMPLETED`]).
//!
//! Batch commits do not wait for their WAL flush ([`Durability::Relaxed`]): a batch lost in a
//! server crash leaves its jobs in `jobs`, past retention, and the next pass moves them again.

use crate::config::branch_settings;
use crate::in_one_round_trip;
use crate::rotate_archive::LOCK_PARTITIONS;
use crate::{Branch, BranchContext, BranchError, Class, Durability, InvalidConfig, Outcome};
use async_trait::async_trait;
use chrono::NaiveDate;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};

// The candidate statements. Parameters: $1 retention in seconds, $2 queues, $3 true to take
// only the queues in $2 (an override group) or false to take every queue but them (the
// default group), $4 batch size, $5 and $6 the key (finalized_at as text, id) the candidates
// come after. `(queue = ANY('{}')) = false` holds for every queue.

/// The rest of a candidate query after `FROM jobs`: up to $4 jobs of one final state past
/// retention, oldest first, after the key ($5, $6). The state literal picks the state's partial
/// index, range-scanned from that key up to the cutoff. A pass's batches each start where the
/// one before ended ([`After`]), because a batch that started from the head of the index would
/// step again over the entries of every row the pass had already moved (dead until vacuum
/// removes them), and so take longer than the batch before it.
macro_rules! expired {
    ($state:literal) => {
        concat!(
            "
    WHERE state = '",
            $state,
            "' AND finalized_at < now() - $1::float8 * interval '1 second'
      AND (queue = ANY($2::text[])) = $3::bool
      AND (finalized_at, id) > ($5::timestamptz, $6::int8)
    ORDER BY finalized_at, id
    LIMIT $4"
        )
    };
}

/// What a candidate another transaction holds (a row lock or an uncommitted change) does to a
/// batch ([`Mode`]), as the end of the `picked` query of [`batch_statement!`]:
/// - `wait`: nothing at first; the delete then waits for the holder. One heap write per row:
///   the common path.
/// - `skip`: it is left out, because the candidates are locked first (`FOR UPDATE SKIP
///   LOCKED`). Never waits, but writes a row lock (a heap write and a WAL record) per row
///   before deleting it, which makes a batch noticeably slower: the branch falls back to it
///   for a while after a `wait` batch found a row held for longer than the lock timeout (see
///   [`Cleanup`]).
macro_rules! held_rows {
    (wait) => {
        ""
    };
    (skip) => {
        "
    FOR UPDATE SKIP LOCKED"
    };
}

/// Builds the batch statement that moves one final state's [`expired!`] candidates to the
/// archive (`archive`) or deletes them (`delete`), `$how` saying what a held candidate does
/// ([`held_rows!`]). Its parts:
/// - `picked`: the candidates' `ctid`s and keys.
/// - `gone`: deletes the picked row versions by `ctid` (a TID scan). The re-check of state and
///   cutoff keeps out a row that changed meanwhile: PostgreSQL evaluates it again on the newest
///   version of a row it waited for (the TID condition alone is not re-checked), and a row that
///   another cleaner deleted is skipped once that cleaner commits.
/// - `archived` (archiving only): inserts the deleted jobs into the archive, keeping the
///   priority the producer asked for (aging only changed claim order). It fails with
///   check_violation when a job's UTC day has no archive partition yet.
/// - the result, one row: how many candidates were picked, how many jobs left `jobs`, and the
///   key (finalized_at as text, id) of the last candidate, NULL when none was picked. A batch is
///   full when it picked a whole batch, whatever it moved: a batch that waited for rows another
///   cleaner took moves fewer while more are due.
macro_rules! batch_statement {
    (archive, $how:ident, $state:literal) => {
        batch_statement!(
            $how,
            $state,
            "id, queue, kind, state, original_priority, attempt, max_attempts, run_at,
              created_at, attempted_at, finalized_at, unique_key, args, errors",
            ",
archived AS (
    INSERT INTO job_archive (id, queue, kind, state, priority, attempt, max_attempts, run_at,
                             created_at, attempted_at, finalized_at, unique_key, args, errors)
    SELECT id, queue, kind, state, original_priority, attempt, max_attempts, run_at,
           created_at, attempted_at, finalized_at, unique_key, args, errors
    FROM gone)"
        )
    };
    (delete, $how:ident, $state:literal) => {
        batch_statement!($how, $state, "1", "")
    };
    ($how:ident, $state:literal, $returning:literal, $archived:literal) => {
        concat!(
            "
WITH picked AS MATERIALIZED (
    SELECT ctid, finalized_at, id FROM jobs",
            expired!($state),
            held_rows!($how),
            "),
gone AS (
    DELETE FROM jobs
    WHERE ctid = ANY(ARRAY(SELECT ctid FROM picked))
      AND state = '",
            $state,
            "' AND finalized_at < now() - $1::float8 * interval '1 second'
    RETURNING ",
            $returning,
            ")",
            $archived,
            "
SELECT counted.picked, (SELECT count(*) FROM gone), last.finalized_at::text, last.id
FROM (SELECT count(*) AS picked FROM picked) counted
LEFT JOIN LATERAL (
    SELECT finalized_at, id FROM picked ORDER BY finalized_at DESC, id DESC LIMIT 1
) last ON true"
        )
    };
}

/// Builds the statement that lists the UTC days of one final state's next batch, for creating
/// their archive partitions after an archiving batch found one missing. It locks the
/// [`expired!`] candidates, skipping held rows, so it names the days of rows that the batch
/// can take now, not of rows another cleaner holds.
macro_rules! batch_days_statement {
    ($state:literal) => {
        concat!(
            "
SELECT coalesce(array_agg(DISTINCT (finalized_at AT TIME ZONE 'UTC')::date), '{}')
FROM (SELECT finalized_at FROM jobs",
            expired!($state),
            "
      FOR UPDATE SKIP LOCKED) batch"
        )
    };
}

/// Archives completed jobs past retention. Index: jobs_completed_idx.
pub const ARCHIVE_COMPLETED: &str = batch_statement!(archive, wait, "completed");
/// Archives failed jobs past retention. Index: jobs_failed_idx.
pub const ARCHIVE_FAILED: &str = batch_statement!(archive, wait, "failed");
/// Archives cancelled jobs past retention. Index: jobs_cancelled_idx.
pub const ARCHIVE_CANCELLED: &str = batch_statement!(archive, wait, "cancelled");
/// [`ARCHIVE_COMPLETED`], skipping held rows. Index: jobs_completed_idx.
pub const ARCHIVE_COMPLETED_SKIPPING: &str = batch_statement!(archive, skip, "completed");
/// [`ARCHIVE_FAILED`], skipping held rows. Index: jobs_failed_idx.
pub const ARCHIVE_FAILED_SKIPPING: &str = batch_statement!(archive, skip, "failed");
/// [`ARCHIVE_CANCELLED`], skipping held rows. Index: jobs_cancelled_idx.
pub const ARCHIVE_CANCELLED_SKIPPING: &str = batch_statement!(archive, skip, "cancelled");

/// Days of the next batch of completed jobs. Index: jobs_completed_idx.
pub const BATCH_DAYS_COMPLETED: &str = batch_days_statement!("completed");
/// Days of the next batch of failed jobs. Index: jobs_failed_idx.
pub const BATCH_DAYS_FAILED: &str = batch_days_statement!("failed");
/// Days of the next batch of cancelled jobs. Index: jobs_cancelled_idx.
pub const BATCH_DAYS_CANCELLED: &str = batch_days_statement!("cancelled");

/// Creates the archive partitions of the days in $1 that have none (run under
/// [`LOCK_PARTITIONS`]); returns how many it created. Catalog only.
pub const CREATE_PARTITIONS: &str = "
SELECT count(*) FILTER (WHERE create_archive_partition(day)) FROM unnest($1::date[]) AS day";

/// With `archive = false`: deletes completed jobs past retention. Index: jobs_completed_idx.
pub const DELETE_COMPLETED: &str = batch_statement!(delete, wait, "completed");
/// With `archive = false`: deletes failed jobs past retention. Index: jobs_failed_idx.
pub const DELETE_FAILED: &str = batch_statement!(delete, wait, "failed");
/// With `archive = false`: deletes cancelled jobs past retention. Index: jobs_cancelled_idx.
pub const DELETE_CANCELLED: &str = batch_statement!(delete, wait, "cancelled");
/// [`DELETE_COMPLETED`], skipping held rows. Index: jobs_completed_idx.
pub const DELETE_COMPLETED_SKIPPING: &str = batch_statement!(delete, skip, "completed");
/// [`DELETE_FAILED`], skipping held rows. Index: jobs_failed_idx.
pub const DELETE_FAILED_SKIPPING: &str = batch_statement!(delete, skip, "failed");
/// [`DELETE_CANCELLED`], skipping held rows. Index: jobs_cancelled_idx.
pub const DELETE_CANCELLED_SKIPPING: &str = batch_statement!(delete, skip, "cancelled");

/// How long finished jobs stay in `jobs`, by final state.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Retention {
    #[serde(with = "humantime_serde")]
    pub completed: Duration,
    #[serde(with = "humantime_serde")]
    pub failed: Duration,
    #[serde(with = "humantime_serde")]
    pub cancelled: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            completed: Duration::from_secs(24 * 3600),
            failed: Duration::from_secs(72 * 3600),
            cancelled: Duration::from_secs(72 * 3600),
        }
    }
}

/// A queue's own retention; states left out use [`Config::retention`].
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionOverride {
    #[serde(with = "humantime_serde")]
    pub completed: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub failed: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub cancelled: Option<Duration>,
}

branch_settings! {
    /// Settings of `cleanup`. Batching is per (state, retention) group.
    pub struct Config {
        interval: Duration::from_secs(30),
        batches: 1000, per_pass: 20,
        checks: Config::own_problems,
        /// Move finished jobs to `job_archive`; when false they are only deleted.
        pub archive: bool = true,
        pub retention: Retention = Retention::default(),
        /// Per-queue retention, e.g. `[branches.cleanup.queues.emails] completed = "1h"`.
        pub queues: BTreeMap<String, RetentionOverride> = BTreeMap::new(),
    }
}

impl Config {
    /// The longest retention of any state and queue.
    pub fn longest_retention(&self) -> Duration {
        let r = &self.retention;
        self.queues
            .values()
            .flat_map(|q| [q.completed, q.failed, q.cancelled])
            .flatten()
            .chain([r.completed, r.failed, r.cancelled])
            .max()
            .unwrap_or_default()
    }
}

/// Longest retention accepted: ten years keeps the interval arithmetic far from any limit.
const MAX_RETENTION: Duration = Duration::from_secs(3650 * 86_400);

fn check_retention(key: String, value: Duration) -> Result<(), InvalidConfig> {
    // Zero would delete jobs the moment they finish: almost certainly a typo.
    if value.is_zero() || value > MAX_RETENTION {
        return Err(InvalidConfig::new(
            key,
            value,
            "must be between 1ms and 3650 days",
        ));
    }
    Ok(())
}

impl Config {
    fn own_problems(&self) -> Vec<InvalidConfig> {
        let mut checks = Vec::new();
        for state in Terminal::ALL {
            checks.push(check_retention(
                format!("retention.{}", state.as_str()),
                state.default_retention(&self.retention),
            ));
        }
        for (queue, retention) in &self.queues {
            if queue.is_empty() {
                checks.push(Err(InvalidConfig::new(
                    "queues",
                    queue,
                    "queue names must not be empty",
                )));
            }
            for state in Terminal::ALL {
                if let Some(value) = state.overridden(retention) {
                    checks.push(check_retention(
                        format!("queues.{queue}.{}", state.as_str()),
                        value,
                    ));
                }
            }
        }
        checks.into_iter().filter_map(Result::err).collect()
    }
}

/// The final states. The discriminants index the columns of the statement tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Terminal {
    Completed = 0,
    Failed = 1,
    Cancelled = 2,
}

impl Terminal {
    const ALL: [Terminal; 3] = [Terminal::Completed, Terminal::Failed, Terminal::Cancelled];

    fn as_str(self) -> &'static str {
        match self {
            Terminal::Completed => "completed",
            Terminal::Failed => "failed",
            Terminal::Cancelled => "cancelled",
        }
    }

    fn default_retention(self, retention: &Retention) -> Duration {
        match self {
            Terminal::Completed => retention.completed,
            Terminal::Failed => retention.failed,
            Terminal::Cancelled => retention.cancelled,
        }
    }

    fn overridden(self, retention: &RetentionOverride) -> Option<Duration> {
        match self {
            Terminal::Completed => retention.completed,
            Terminal::Failed => retention.failed,
            Terminal::Cancelled => retention.cancelled,
        }
    }

    fn archive_sql(self, mode: Mode) -> &'static str {
        ARCHIVE[mode as usize][self as usize]
    }

    fn batch_days_sql(self) -> &'static str {
        BATCH_DAYS[self as usize]
    }

    fn delete_sql(self, mode: Mode) -> &'static str {
        DELETE[mode as usize][self as usize]
    }
}

/// Which statements a batch uses (see [`held_rows!`]). The discriminants index the rows of the
/// statement tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Wait = 0,
    Skip = 1,
}

// The statement tables: a row per `Mode`, a column per final state (`Terminal`).
#[rustfmt::skip]
const ARCHIVE: [[&str; 3]; 2] = [
    // completed                 failed                   cancelled
    [ARCHIVE_COMPLETED,          ARCHIVE_FAILED,          ARCHIVE_CANCELLED],          // wait
    [ARCHIVE_COMPLETED_SKIPPING, ARCHIVE_FAILED_SKIPPING, ARCHIVE_CANCELLED_SKIPPING], // skip
];
#[rustfmt::skip]
const DELETE: [[&str; 3]; 2] = [
    [DELETE_COMPLETED,           DELETE_FAILED,           DELETE_CANCELLED],           // wait
    [DELETE_COMPLETED_SKIPPING,  DELETE_FAILED_SKIPPING,  DELETE_CANCELLED_SKIPPING],  // skip
];
#[rustfmt::skip]
const BATCH_DAYS: [&str; 3] =
    [BATCH_DAYS_COMPLETED,       BATCH_DAYS_FAILED,       BATCH_DAYS_CANCELLED];

/// After a batch waited out its lock timeout on a held row, batches skip held rows for this
/// long: a row held that long is likely held again on the next pass (an idle transaction), and
/// each wait would hold up the hygiene loop for a lock timeout.
const SKIP_HELD_ROWS_FOR: Duration = Duration::from_secs(600);

/// A `wait` batch that ran into a held row: a lock wait past the lock timeout, or a deadlock
/// with whoever holds it.
fn ran_into_a_held_row(e: &BranchError) -> bool {
    let code = match e {
        BranchError::Timeout(e) | BranchError::Db(e) => e.code(),
        BranchError::Fenced { .. } => None,
    };
    code == Some(&SqlState::LOCK_NOT_AVAILABLE) || code == Some(&SqlState::T_R_DEADLOCK_DETECTED)
}

/// Jobs of one final state that share a retention: either the listed queues (`only`) or every
/// queue but them.
#[derive(Debug, Clone, PartialEq)]
struct Group {
    state: Terminal,
    retention_secs: f64,
    queues: Vec<String>,
    only: bool,
}

impl Group {
    /// The candidate statements' parameters, typed so that each statement takes one round
    /// trip (parse, bind and execute together).
    fn params<'a>(
        &'a self,
        batch_size: &'a i64,
        after: &'a After,
    ) -> [(&'a (dyn ToSql + Sync), Type); 6] {
        [
            (&self.retention_secs, Type::FLOAT8),
            (&self.queues, Type::TEXT_ARRAY),
            (&self.only, Type::BOOL),
            (batch_size, Type::INT8),
            (&after.key, Type::TEXT),
            (&after.id, Type::INT8),
        ]
    }
}

/// Where a pass has got to in one group's candidates: the key (finalized_at, id) of the last
/// candidate its previous batch picked, where the next batch starts (see [`expired!`]).
/// Every pass starts from the beginning, so a candidate that a batch passed over (a row another
/// transaction held, or one that became due meanwhile with an earlier key) waits at most for
/// the next pass.
#[derive(Debug, Clone, PartialEq)]
struct After {
    /// finalized_at as PostgreSQL prints it: exact, and `-infinity` included.
    key: String,
    id: i64,
}

impl After {
    /// Before every candidate.
    fn start() -> Self {
        Self {
            key: "-infinity".to_owned(),
            id: i64::MIN,
        }
    }

    /// From the last two columns of a [`batch_statement!`] row; `None` when the batch picked
    /// nothing.
    fn from_batch_result(row: &tokio_postgres::Row) -> Option<Self> {
        match (
            row.get::<_, Option<String>>(2),
            row.get::<_, Option<i64>>(3),
        ) {
            (Some(key), Some(id)) => Some(Self { key, id }),
            _ => None,
        }
    }
}

/// What one batch did.
#[derive(Debug)]
struct Batch {
    moved: u64,
    /// A whole batch of candidates was picked: the next batch follows.
    full: bool,
    /// The key of the last candidate picked; `None` when none was.
    last: Option<After>,
}

/// One batch, `sql` (an archiving or deleting statement), as one round trip.
async fn move_batch(
    ctx: &mut BranchContext<'_>,
    sql: &str,
    params: &[(&(dyn ToSql + Sync), Type)],
    batch_size: i64,
) -> Result<Batch, BranchError> {
    let trip = ctx.one_trip(Durability::Relaxed);
    let (row,) = in_one_round_trip!(trip, async {
        Ok::<_, BranchError>(trip.client().query_typed_one(sql, params).await?)
    })?;
    let (picked, moved): (i64, i64) = (row.get(0), row.get(1));
    let last = After::from_batch_result(&row);
    Ok(Batch {
        moved: moved.max(0) as u64,
        full: picked >= batch_size,
        last,
    })
}

/// One group per final state for the default retention, plus one per distinct overriding
/// retention. Overrides equal to the default stay in the default group.
fn groups(config: &Config) -> Vec<Group> {
    let mut groups = Vec::new();
    for state in Terminal::ALL {
        let default = state.default_retention(&config.retention);
        let mut by_retention: BTreeMap<Duration, Vec<String>> = BTreeMap::new();
        for (queue, retention) in &config.queues {
            match state.overridden(retention) {
                Some(value) if value != default => {
                    by_retention.entry(value).or_default().push(queue.clone())
                }
                _ => {}
            }
        }
        groups.push(Group {
            state,
            retention_secs: default.as_secs_f64(),
            queues: by_retention.values().flatten().cloned().collect(),
            only: false,
        });
        groups.extend(by_retention.into_iter().map(|(value, queues)| Group {
            state,
            retention_secs: value.as_secs_f64(),
            queues,
            only: true,
        }));
    }
    groups
}

/// Batches delete their candidates directly (`wait`, see the `held_rows!` macro) unless a recent
/// batch ran into a held row: then they skip held rows for ten minutes.
pub struct Cleanup {
    config: Config,
    groups: Vec<Group>,
    skip_held_rows_until: Mutex<Option<Instant>>,
}

impl Cleanup {
    pub fn new(config: Config) -> Self {
        let groups = groups(&config);
        Self {
            config,
            groups,
            skip_held_rows_until: Mutex::new(None),
        }
    }

    fn skip_held_rows_until(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        // A poisoned lock only means a holder panicked; the instant is still meaningful.
        self.skip_held_rows_until
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn mode(&self) -> Mode {
        match *self.skip_held_rows_until() {
            Some(until) if Instant::now() < until => Mode::Skip,
            _ => Mode::Wait,
        }
    }

    /// One batch of `group`, starting after `after`, in the current mode. When a `wait` batch
    /// ran into a held row, it switches to skipping held rows and runs the batch again.
    async fn batch(
        &self,
        ctx: &mut BranchContext<'_>,
        group: &Group,
        after: &After,
    ) -> Result<Batch, BranchError> {
        let mode = self.mode();
        match self.batch_in(ctx, group, after, mode).await {
            Err(e) if mode == Mode::Wait && ran_into_a_held_row(&e) => {
                tracing::info!(error = %e, skip_for = ?SKIP_HELD_ROWS_FOR, "cleanup ran into a row another transaction holds; skipping held rows for a while");
                *self.skip_held_rows_until() = Some(Instant::now() + SKIP_HELD_ROWS_FOR);
                self.batch_in(ctx, group, after, Mode::Skip).await
            }
            result => result,
        }
    }

    async fn batch_in(
        &self,
        ctx: &mut BranchContext<'_>,
        group: &Group,
        after: &After,
        mode: Mode,
    ) -> Result<Batch, BranchError> {
        let params = group.params(&self.config.batch_size, after);
        if self.config.archive {
            self.archive_batch(ctx, group, &params, mode).await
        } else {
            move_batch(
                ctx,
                group.state.delete_sql(mode),
                &params,
                self.config.batch_size,
            )
            .await
        }
    }
}

#[async_trait]
impl Branch for Cleanup {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn class(&self) -> Class {
        Class::Hygiene
    }

    fn interval(&self) -> Duration {
        self.config.interval
    }

    async fn run(&self, ctx: &mut BranchContext<'_>) -> Result<Outcome, BranchError> {
        let mut rows = 0;
        let mut more_left = false;
        for group in &self.groups {
            let mut after = After::start();
            for batch in 0..self.config.max_batches_per_run {
                let done = self.batch(ctx, group, &after).await?;
                rows += done.moved;
                if !done.full {
                    break;
                }
                after = done.last.unwrap_or(after);
                more_left |= batch + 1 == self.config.max_batches_per_run;
            }
        }
        Ok(Outcome {
            rows,
            run_again_in: more_left.then_some(Duration::ZERO),
            observations: Vec::new(),
        })
    }
}

impl Cleanup {
    /// One batch moved to the archive.
    async fn archive_batch(
        &self,
        ctx: &mut BranchContext<'_>,
        group: &Group,
        params: &[(&(dyn ToSql + Sync), Type)],
        mode: Mode,
    ) -> Result<Batch, BranchError> {
        // A second try is the rule when days were missing; a third covers rows of yet another
        // new day that another cleaner released meanwhile.
        let mut tries = 0;
        loop {
            tries += 1;
            let batch = move_batch(
                ctx,
                group.state.archive_sql(mode),
                params,
                self.config.batch_size,
            )
            .await;
            match batch {
                Ok(judged) => return Ok(judged),
                Err(BranchError::Db(e))
                    if e.code() == Some(&SqlState::CHECK_VIOLATION) && tries < 3 =>
                {
                    // A day without a partition (or, should some other check ever fail, the
                    // third try reports it). The statement had opened job_archive, and creating
                    // a partition locks it exclusively under LOCK_PARTITIONS: the failed
                    // transaction has already ended (its COMMIT rolled back), which keeps the
                    // order every creator uses (advisory lock, then the table), so creators
                    // cannot deadlock.
                    self.create_batch_partitions(ctx, group, params).await?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Creates the missing archive partitions of the days the group's next batch needs.
    async fn create_batch_partitions(
        &self,
        ctx: &mut BranchContext<'_>,
        group: &Group,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<(), BranchError> {
        let tx = ctx.fenced().await?;
        let days: Vec<NaiveDate> = tx
            .query_typed_one(group.state.batch_days_sql(), params)
            .await?
            .get(0);
        tx.execute(LOCK_PARTITIONS, &[]).await?;
        tx.execute(CREATE_PARTITIONS, &[&days]).await?;
        tx.commit().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_statement_tables_pick_each_state_and_mode() {
        for state in Terminal::ALL {
            let state_literal = format!("state = '{}'", state.as_str());
            for (mode, locks) in [(Mode::Wait, 0), (Mode::Skip, 1)] {
                for (sql, archives) in [(state.archive_sql(mode), 1), (state.delete_sql(mode), 0)] {
                    assert_eq!(sql.matches(&state_literal).count(), 2, "{sql}");
                    assert_eq!(
                        sql.matches("FOR UPDATE SKIP LOCKED").count(),
                        locks,
                        "{sql}"
                    );
                    assert_eq!(
                        sql.matches("INSERT INTO job_archive").count(),
                        archives,
                        "{sql}"
                    );
                }
            }
            let days = state.batch_days_sql();
            assert!(
                days.contains(&state_literal) && days.contains("SKIP LOCKED"),
                "{days}"
            );
        }
    }

    #[test]
    fn overrides_form_groups_and_leave_the_default_group_the_rest() {
        let mut config = Config::default();
        let hour = Duration::from_secs(3600);
        config.queues.insert(
            "emails".into(),
            RetentionOverride {
                completed: Some(hour),
                failed: Some(Duration::from_secs(72 * 3600)), // same as the default
                cancelled: None,
            },
        );
        config.queues.insert(
            "sms".into(),
            RetentionOverride {
                completed: Some(hour),
                ..RetentionOverride::default()
            },
        );
        let groups = groups(&config);
        let completed: Vec<&Group> = groups
            .iter()
            .filter(|g| g.state == Terminal::Completed)
            .collect();
        assert_eq!(completed.len(), 2);
        assert_eq!(
            (completed[0].only, completed[0].queues.clone()),
            (false, vec!["emails".into(), "sms".into()])
        );
        assert_eq!(
            (completed[1].only, completed[1].retention_secs),
            (true, 3600.0)
        );
        assert_eq!(
            completed[1].queues,
            vec!["emails".to_owned(), "sms".to_owned()]
        );
        // failed: the override equals the default, so one group covering every queue.
        let failed: Vec<&Group> = groups
            .iter()
            .filter(|g| g.state == Terminal::Failed)
            .collect();
        assert_eq!(failed.len(), 1);
        assert!(!failed[0].only && failed[0].queues.is_empty());
    }
}
