//! `recompute_dirty_admin_metadata`: recounts only the queues whose jobs changed since their
//! last recount, so that `queue_counts` stays exact between the full refreshes.
//!
//! A pass takes a batch of dirty queues in a short transaction of its own, committed before
//! the recount: a job change committed after that marks the queue dirty again, to be recounted
//! by a later pass. The recount is a second transaction and writes like the full refresh does
//! (a count only replaces one taken earlier).
//!
//! Dirtiness can still be missed, rarely: the trigger skips queues it finds in `dirty_queues`
//! (or whose row another transaction is deleting, not yet committed), so a writer whose trigger
//! saw the queue as dirty but who commits only after a pass took the queue and took its count
//! snapshot has its change neither counted nor marked. Queue writes are mostly single-statement
//! transactions, so the window is about one commit long. A pass that fails between its two
//! transactions loses its batch the same way. The periodic `refresh_admin_metadata` repairs
//! both; the trigger's NOT EXISTS shortcut is worth it because it keeps writers to one queue
//! from contending on its `dirty_queues` row. `rows` counts `queue_counts` rows whose count
//! changed.

use crate::config::branch_settings;
use crate::refresh_admin_metadata::Counts;
use crate::{check_batch, Branch, BranchContext, BranchError, Class, InvalidConfig, Outcome};
use async_trait::async_trait;
use std::time::Duration;

/// Takes up to $1 dirty queues, longest dirty first, skipping rows another recompute holds.
/// `dirty_queues` has at most one row per queue: a sequential scan, then dirty_queues_pkey.
pub const TAKE_DIRTY: &str = "
DELETE FROM dirty_queues WHERE queue IN (
    SELECT queue FROM dirty_queues
    ORDER BY dirtied_at, queue
    LIMIT $1
    FOR UPDATE SKIP LOCKED)
RETURNING queue";

/// Exact counts per state of the queues in $1, with the time they were taken. Index:
/// jobs_queue_state_idx (queue, state), read for the dirty queues only.
pub const COUNT_QUEUES: &str = "
SELECT statement_timestamp(),
       coalesce(array_agg(queue), '{}'),
       coalesce(array_agg(state::text), '{}'),
       coalesce(array_agg(n), '{}')
FROM (SELECT queue, state, count(*) AS n FROM jobs WHERE queue = ANY($1::text[])
      GROUP BY queue, state) counted";

branch_settings! {
    /// Settings of `recompute_dirty_admin_metadata`.
    pub struct Config {
        interval: Duration::from_secs(2),
        checks: Config::own_problems,
        /// Queues recounted per pass; a full batch makes the pass ask to run again at once.
        pub batch_size: i64 = 100,
    }
}

impl Config {
    fn own_problems(&self) -> Vec<InvalidConfig> {
        check_batch("batch_size", self.batch_size)
            .err()
            .into_iter()
            .collect()
    }
}

pub struct RecomputeDirtyAdminMetadata {
    config: Config,
}

impl RecomputeDirtyAdminMetadata {
    pub fn new(config: Config) -> Self {
        Self { config }
    }
}

#[async_trait]
impl Branch for RecomputeDirtyAdminMetadata {
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
        let queues: Vec<String> = tx
            .query(TAKE_DIRTY, &[&self.config.batch_size])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        tx.commit().await?;
        if queues.is_empty() {
            return Ok(Outcome::default());
        }

        let tx = ctx.fenced().await?;
        let counts = Counts::from_row(&tx.query_one(COUNT_QUEUES, &[&queues]).await?);
        let rows = counts.write(&tx, Some(&queues)).await?;
        tx.commit().await?;
        let full = queues.len() as i64 >= self.config.batch_size;
        Ok(Outcome {
            rows,
            run_again_in: full.then_some(Duration::ZERO),
            observations: Vec::new(),
        })
    }
}
