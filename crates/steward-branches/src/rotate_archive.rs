//! `rotate_archive`: keeps `job_archive`'s daily partitions ahead of time and drops expired ones.
//!
//! Creates the partitions for today .. today + `days_ahead` (UTC days) so that `cleanup` rarely
//! has to create one itself, and drops every partition older than `retention_days`: expiring
//! history is a DROP of whole days, never a DELETE. Both run in one fenced transaction.
//!
//! Partitions of days older than `retention_days` that `cleanup` archives into (a per-queue
//! retention longer than the archive's) are created again by `cleanup` and dropped again here:
//! keep `retention_days` above every cleanup retention.

use crate::config::branch_settings;
use crate::{Branch, BranchContext, BranchError, Class, InvalidConfig, Outcome};
use async_trait::async_trait;
use std::time::Duration;

/// Serializes everyone who creates or drops archive partitions (this branch and `cleanup`):
/// `create_archive_partition` checks for the partition and then creates it, so two callers that
/// both see it missing would both create it and the second would fail. Held until commit, so
/// the second caller finds the first one's partition. The key is scoped to this schema's
/// `job_archive`, since one database can hold several Steward schemas.
pub const LOCK_PARTITIONS: &str = "
SELECT pg_advisory_xact_lock(hashtext('steward.job_archive_partitions'),
                             'job_archive'::regclass::oid::int4)";

/// Creates the partitions for today .. today + $1 UTC days; returns how many were new.
/// Catalog lookups only (the function skips existing partitions).
pub const CREATE_AHEAD: &str = "
SELECT count(*) FILTER (WHERE create_archive_partition((now() AT TIME ZONE 'UTC')::date + g))
FROM generate_series(0, $1::int4) AS g";

/// Drops the partitions of days before today − $1 (UTC); returns how many were dropped.
/// Catalog lookups only (pg_inherits of job_archive).
pub const DROP_EXPIRED: &str = "
SELECT drop_archive_partitions_before((now() AT TIME ZONE 'UTC')::date - $1::int4)::int8";

branch_settings! {
    /// Settings of `rotate_archive`.
    pub struct Config {
        interval: Duration::from_secs(3600),
        checks: Config::own_problems,
        /// Partitions are created for today and this many days after it.
        pub days_ahead: i32 = 3,
        /// Archived jobs are kept for this many whole days, then their partitions are dropped.
        pub retention_days: i32 = 14,
    }
}

impl Config {
    fn own_problems(&self) -> Vec<InvalidConfig> {
        let mut problems = Vec::new();
        if !(0..=90).contains(&self.days_ahead) {
            problems.push(InvalidConfig::new(
                "days_ahead",
                self.days_ahead,
                "must be between 0 and 90",
            ));
        }
        // At least a day: today's partition is being written to.
        if !(1..=3650).contains(&self.retention_days) {
            problems.push(InvalidConfig::new(
                "retention_days",
                self.retention_days,
                "must be between 1 and 3650",
            ));
        }
        problems
    }
}

pub struct RotateArchive {
    config: Config,
}

impl RotateArchive {
    pub fn new(config: Config) -> Self {
        Self { config }
    }
}

#[async_trait]
impl Branch for RotateArchive {
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
        tx.execute(LOCK_PARTITIONS, &[]).await?;
        let created: i64 = tx
            .query_one(CREATE_AHEAD, &[&self.config.days_ahead])
            .await?
            .get(0);
        let dropped: i64 = tx
            .query_one(DROP_EXPIRED, &[&self.config.retention_days])
            .await?
            .get(0);
        tx.commit().await?;
        Ok(Outcome {
            rows: (created + dropped).max(0) as u64,
            ..Outcome::default()
        })
    }
}
