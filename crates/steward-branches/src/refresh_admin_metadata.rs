//! `refresh_admin_metadata`: exact job counts per queue and state (every state) into
//! `queue_counts`, in one fenced transaction. It repairs whatever the dirty-queue recompute
//! missed (see `recompute_dirty_admin_metadata`).
//!
//! Counting reads the whole table, so it happens before the write lock is taken: the dirty
//! recompute, which writes the same table every few seconds, then waits only for the short
//! write. Each row records the time its count was taken (`updated_at`), and a count only
//! replaces or deletes one taken earlier, so a slow full count never overwrites a newer
//! recount of a queue. `rows` counts `queue_counts` rows whose count changed (inserted,
//! updated or deleted).

use crate::config::branch_settings;
use crate::{Branch, BranchContext, BranchError, Class, Outcome};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use std::time::Duration;
use tokio_postgres::Transaction;

/// Exact counts of every queue and state, with the time they were taken. No index: exact
/// counts of every state need every row (a sequential scan), which is why this runs rarely.
pub const COUNT_ALL: &str = "
SELECT statement_timestamp(),
       coalesce(array_agg(queue), '{}'),
       coalesce(array_agg(state::text), '{}'),
       coalesce(array_agg(n), '{}')
FROM (SELECT queue, state, count(*) AS n FROM jobs GROUP BY queue, state) counted";

/// Serializes the writers of `queue_counts` (this branch, the dirty recompute, and second
/// instances of either) so that their upserts and deletes, which lock rows in no particular
/// order, cannot deadlock. SHARE ROW EXCLUSIVE conflicts with writers only: readers never wait.
pub const LOCK_COUNTS: &str = "LOCK TABLE queue_counts IN SHARE ROW EXCLUSIVE MODE";

/// Writes counts taken at $5: $1 queues, $2 states, $3 counts. Rows of the queues in $4 (every
/// queue when NULL) that the count did not see are deleted. A row counted after $5 is left
/// alone. Returns how many rows' counts changed. Index: queue_counts_pkey. The outer query
/// reads queue_counts as it was before this statement's writes.
pub const WRITE_COUNTS: &str = "
WITH counted AS MATERIALIZED (
    SELECT c.queue, c.state::job_state AS state, c.count
    FROM unnest($1::text[], $2::text[], $3::int8[]) AS c(queue, state, count)
),
removed AS (
    DELETE FROM queue_counts q
    WHERE ($4::text[] IS NULL OR q.queue = ANY($4::text[]))
      AND q.updated_at < $5::timestamptz
      AND NOT EXISTS (SELECT 1 FROM counted c WHERE c.queue = q.queue AND c.state = q.state)
    RETURNING 1
),
written AS (
    INSERT INTO queue_counts AS q (queue, state, count, updated_at)
    SELECT queue, state, count, $5::timestamptz FROM counted
    ON CONFLICT (queue, state) DO UPDATE
        SET count = EXCLUDED.count, updated_at = EXCLUDED.updated_at
        WHERE q.updated_at < EXCLUDED.updated_at
)
SELECT (SELECT count(*) FROM removed)
     + (SELECT count(*) FROM counted c
        WHERE NOT EXISTS (SELECT 1 FROM queue_counts q
                          WHERE q.queue = c.queue AND q.state = c.state
                            AND (q.count = c.count OR q.updated_at >= $5::timestamptz)))";

/// Counts as a statement returns them: when, then parallel arrays of queue, state, count.
pub(crate) struct Counts {
    pub taken_at: DateTime<Utc>,
    pub queues: Vec<String>,
    pub states: Vec<String>,
    pub counts: Vec<i64>,
}

impl Counts {
    pub(crate) fn from_row(row: &tokio_postgres::Row) -> Self {
        Self {
            taken_at: row.get(0),
            queues: row.get(1),
            states: row.get(2),
            counts: row.get(3),
        }
    }

    /// Writes these counts under [`LOCK_COUNTS`]; `scope` is the queues they cover (None: all).
    /// Returns the rows whose count changed.
    pub(crate) async fn write(
        &self,
        tx: &Transaction<'_>,
        scope: Option<&[String]>,
    ) -> Result<u64, BranchError> {
        tx.execute(LOCK_COUNTS, &[]).await?;
        let changed: i64 = tx
            .query_one(
                WRITE_COUNTS,
                &[
                    &self.queues,
                    &self.states,
                    &self.counts,
                    &scope,
                    &self.taken_at,
                ],
            )
            .await?
            .get(0);
        Ok(changed.max(0) as u64)
    }
}

branch_settings! {
    /// Settings of `refresh_admin_metadata`.
    pub struct Config {
        interval: Duration::from_secs(60),
    }
}

pub struct RefreshAdminMetadata {
    config: Config,
}

impl RefreshAdminMetadata {
    pub fn new(config: Config) -> Self {
        Self { config }
    }
}

#[async_trait]
impl Branch for RefreshAdminMetadata {
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
        let tx = ctx.fenced().await?;
        let counts = Counts::from_row(&tx.query_one(COUNT_ALL, &[]).await?);
        let rows = counts.write(&tx, None).await?;
        tx.commit().await?;
        Ok(Outcome {
            rows,
            ..Outcome::default()
        })
    }
}
