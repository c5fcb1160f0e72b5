//! Steward's maintenance branches. Each module is one branch: its SQL (one statement per
//! purpose, naming the index it relies on), its configuration, and its [`Branch`] impl.
//!
//! A branch does not know which loop runs it. It gets a [`BranchContext`] holding the loop's
//! work connection and the leadership epoch, and does its writes in fenced transactions
//! ([`BranchContext::fenced`], or [`BranchContext::one_trip`] for a batch sent whole), which
//! refuse to proceed once a newer leadership term has started. Every
//! branch must also be safe when two instances run it at the same instant (row locks with
//! `SKIP LOCKED`, state re-checks, unique keys), not only because of the election.

pub mod cleanup;
pub mod cron_sync;
pub mod priority_aging;
pub mod promote_scheduled;
pub mod queue_stats;
pub mod recompute_dirty_admin_metadata;
pub mod refresh_admin_metadata;
mod rescue;
pub use rescue::{ExpiryRescueConfig, RetryConfig};
pub mod rescue_expired_callbacks;
pub mod rescue_expired_deadlines;
pub mod rescue_stale_heartbeats;
pub mod rotate_archive;

use async_trait::async_trait;
use serde::Deserialize;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use steward_connection::{describe_pg_error, SchemaName};
use steward_queue::JobState;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, Transaction};

/// What a branch is for. In split mode the leader never lets a hygiene pass delay an SLO
/// branch: the two classes run on different loops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    /// Branches users feel directly: promotion and rescues.
    Slo,
    /// Branches that keep the database healthy.
    Hygiene,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Slo => "slo",
            Class::Hygiene => "hygiene",
        }
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[async_trait]
pub trait Branch: Send + Sync {
    /// Stable name, used in metrics, logs and `branch_health`.
    fn name(&self) -> &'static str;
    fn class(&self) -> Class;
    /// How often the branch runs when it asks for nothing sooner.
    fn interval(&self) -> Duration;
    /// Per-statement limits; by default derived from the interval.
    fn timeouts(&self) -> Timeouts {
        Timeouts::for_interval(self.interval())
    }
    /// In split mode, run on a loop (task and connection) of the branch's own rather than on
    /// its class's shared loop: for a branch that runs back to back under load, whose passes
    /// would otherwise hold back every sibling that comes due meanwhile.
    fn needs_own_loop(&self) -> bool {
        false
    }
    /// A NOTIFY channel whose notifications make the branch due at once.
    fn wake_channel(&self, _schema: &SchemaName) -> Option<String> {
        None
    }
    /// Rescue branches return the time they must hold off after a leadership term starts or
    /// after contact with the database was lost, so that workers that could not heartbeat or
    /// finish during an outage are not taken for dead.
    fn quiet_period(&self) -> Option<Duration> {
        None
    }
    /// One pass. Writes go through [`BranchContext::fenced`].
    async fn run(&self, ctx: &mut BranchContext<'_>) -> Result<Outcome, BranchError>;
}

/// What a branch pass is given.
pub struct BranchContext<'a> {
    pub client: &'a mut Client,
    /// The leadership term this pass belongs to.
    pub epoch: i64,
    pub timeouts: Timeouts,
}

/// The fence every branch transaction opens with: the `fence` function (migration V7) raises
/// SQLSTATE [`FENCED`] unless this term's epoch is still current. It takes `FOR KEY SHARE` on
/// the one-row `leader` table, which conflicts with the `FOR UPDATE` that a new term's start
/// takes, so a new term waits for in-flight passes of the old one, and no old-term pass gets
/// past this line afterwards. It also sets the transaction's timeouts and durability. Raising
/// on the server (rather than returning the epoch to compare) is what lets a whole
/// transaction, COMMIT included, go out in one round trip ([`OneTrip`]).
pub const FENCE: &str = "SELECT fence($1, $2, $3, $4)";

/// The SQLSTATE the `fence` function raises when the caller's term is over; its DETAIL holds
/// the current epoch.
pub const FENCED: &str = "ST001";

/// How a fenced transaction's commit is made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// The session's setting (by default the commit waits for its WAL flush).
    Default,
    /// The commit returns before its WAL flush. Safe where a lost commit (a server crash in
    /// the next few hundred milliseconds) only means the same rows are found and changed again
    /// by the next pass, and where any later commit that depends on this one (a worker's
    /// claim of a promoted job) flushes it anyway, since WAL is flushed in order.
    Relaxed,
}

impl<'a> BranchContext<'a> {
    /// Begins a transaction with this branch's statement and lock timeouts, after checking
    /// (under a KEY SHARE lock on the `leader` row, which a new term's epoch increment must
    /// wait for) that this pass's term is still the current one. One round trip after BEGIN.
    pub async fn fenced(&mut self) -> Result<Transaction<'_>, BranchError> {
        self.fenced_with(Durability::Default).await
    }

    /// [`Self::fenced`] with a choice of commit durability.
    pub async fn fenced_with(
        &mut self,
        durability: Durability,
    ) -> Result<Transaction<'_>, BranchError> {
        let fence = self.fence(durability);
        let tx = self.client.transaction().await?;
        fence.run(tx.client()).await?;
        Ok(tx)
    }

    fn fence(&self, durability: Durability) -> Fence {
        Fence {
            epoch: self.epoch,
            timeouts: self.timeouts,
            durability,
        }
    }

    /// A fenced transaction to send in one round trip (`in_one_round_trip!`).
    pub fn one_trip(&self, durability: Durability) -> OneTrip<'_> {
        OneTrip {
            client: self.client,
            fence: self.fence(durability),
        }
    }
}

/// A transaction's fence ([`FENCE`]), not yet run.
#[derive(Debug, Clone, Copy)]
struct Fence {
    epoch: i64,
    timeouts: Timeouts,
    durability: Durability,
}

impl Fence {
    /// Raises [`BranchError::Fenced`] when a newer term has started.
    async fn run(self, client: &Client) -> Result<(), BranchError> {
        let statement_ms = format!("{}ms", self.timeouts.statement.as_millis().max(1));
        let lock_ms = format!("{}ms", self.timeouts.lock.as_millis().max(1));
        let relaxed = self.durability == Durability::Relaxed;
        // Typed parameters: parse, bind and execute in one round trip instead of two.
        client
            .query_typed(
                FENCE,
                &[
                    (&self.epoch, Type::INT8),
                    (&statement_ms, Type::TEXT),
                    (&lock_ms, Type::TEXT),
                    (&relaxed, Type::BOOL),
                ],
            )
            .await
            .map_err(|e| self.fenced_or(e))?;
        Ok(())
    }

    fn fenced_or(self, e: tokio_postgres::Error) -> BranchError {
        match e.as_db_error() {
            Some(db) if db.code().code() == FENCED => BranchError::Fenced {
                epoch: self.epoch,
                current: db.detail().and_then(|d| d.parse().ok()).unwrap_or(-1),
            },
            _ => e.into(),
        }
    }
}

/// A whole fenced transaction sent in one round trip: BEGIN and the fence, the caller's
/// statements, and COMMIT go out together, and the server runs them in order. Nothing the
/// statements return is needed to decide whether to commit, since the fence aborts the
/// transaction on the server and an aborted transaction's COMMIT rolls back. For the hot path
/// whose latency users feel (a promote batch: three round trips otherwise). Use it through
/// `in_one_round_trip!`, which keeps the order right.
pub struct OneTrip<'a> {
    client: &'a Client,
    fence: Fence,
}

impl OneTrip<'_> {
    /// The connection, for the statements that go between [`Self::open`] and [`Self::commit`].
    pub fn client(&self) -> &Client {
        self.client
    }

    /// BEGIN and the fence.
    pub async fn open(&self) -> Result<(), BranchError> {
        let (begun, fenced) = tokio::join!(
            biased;
            self.client.batch_execute("BEGIN"),
            self.fence.run(self.client)
        );
        begun?;
        fenced
    }

    /// COMMIT: a rollback when anything before it failed.
    pub async fn commit(&self) -> Result<(), BranchError> {
        Ok(self.client.batch_execute("COMMIT").await?)
    }
}

/// Runs the given statement futures (on `$trip.client()`) as one [`OneTrip`] transaction and
/// returns their outputs as a tuple; the first error wins. Each future must send its request
/// when first polled, before it awaits anything (tokio-postgres's `query*` methods do), so that
/// they all go out between BEGIN and COMMIT.
macro_rules! in_one_round_trip {
    ($trip:expr, $($statement:expr),+ $(,)?) => {{
        let trip = &$trip;
        tokio::try_join!(
            biased;
            trip.open(),
            async { tokio::try_join!(biased; $($statement),+) },
            trip.commit()
        )
            .map(|((), outputs, ())| outputs)
    }};
}
pub(crate) use in_one_round_trip;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub statement: Duration,
    pub lock: Duration,
}

impl Timeouts {
    /// A statement may take up to its interval (at least 1 s, at most 60 s); a lock wait up to
    /// a quarter of that (at least 100 ms, at most 5 s). Short enough that a stuck pass shows
    /// as a timeout on its next run rather than a silent stall.
    pub fn for_interval(interval: Duration) -> Self {
        let statement = interval.clamp(Duration::from_secs(1), Duration::from_secs(60));
        let lock = (statement / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
        Self { statement, lock }
    }
}

/// The result of one pass.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Outcome {
    /// Rows changed (promoted, rescued, deleted, counted...).
    pub rows: u64,
    /// Run again after this long rather than after the interval (never later than it):
    /// work is left over, or something becomes due sooner.
    pub run_again_in: Option<Duration>,
    pub observations: Vec<Observation>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Observation {
    /// now − run_at of each job promoted, in seconds.
    PromotionLags(Vec<f64>),
    Rescued {
        reason: RescueReason,
        retried: u64,
        failed: u64,
    },
    QueueDepth {
        queue: String,
        state: JobState,
        depth: i64,
    },
    OldestAvailableAge {
        queue: String,
        seconds: f64,
    },
    /// Input the branch could not use (a cron expression that does not parse...): skipped
    /// and reported, never fatal to the branch.
    Skipped {
        what: String,
        reason: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RescueReason {
    Heartbeat,
    Deadline,
    Callback,
}

impl RescueReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RescueReason::Heartbeat => "heartbeat",
            RescueReason::Deadline => "deadline",
            RescueReason::Callback => "callback",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BranchError {
    #[error(
        "leadership term {epoch} is over (the current term is {current}); nothing was committed"
    )]
    Fenced { epoch: i64, current: i64 },
    #[error("statement timed out: {}", describe_pg_error(.0))]
    Timeout(tokio_postgres::Error),
    #[error("database: {}", describe_pg_error(.0))]
    Db(tokio_postgres::Error),
}

impl From<tokio_postgres::Error> for BranchError {
    fn from(e: tokio_postgres::Error) -> Self {
        match e.code() {
            Some(code)
                if *code == SqlState::QUERY_CANCELED || *code == SqlState::LOCK_NOT_AVAILABLE =>
            {
                BranchError::Timeout(e)
            }
            _ => BranchError::Db(e),
        }
    }
}

impl BranchError {
    /// Errors meaning the connection itself is gone (as opposed to one failed statement).
    pub fn is_connection_lost(&self) -> bool {
        match self {
            BranchError::Db(e) => e.is_closed() || e.code().is_none(),
            _ => false,
        }
    }
}

/// Every branch's settings. Unknown keys are rejected, so a typo is an error, not a default.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BranchesConfig {
    pub promote_scheduled: promote_scheduled::Config,
    pub rescue_stale_heartbeats: rescue_stale_heartbeats::Config,
    pub rescue_expired_deadlines: rescue_expired_deadlines::Config,
    pub rescue_expired_callbacks: rescue_expired_callbacks::Config,
    pub cleanup: cleanup::Config,
    pub cron_sync: cron_sync::Config,
    pub queue_stats: queue_stats::Config,
    pub refresh_admin_metadata: refresh_admin_metadata::Config,
    pub recompute_dirty_admin_metadata: recompute_dirty_admin_metadata::Config,
    pub priority_aging: priority_aging::Config,
    pub rotate_archive: rotate_archive::Config,
}

/// A configuration value that cannot work, named by its key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid value {value} for {key}: {reason}")]
pub struct InvalidConfig {
    pub key: String,
    pub value: String,
    pub reason: String,
}

impl InvalidConfig {
    pub fn new(key: impl Into<String>, value: impl fmt::Debug, reason: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            value: format!("{value:?}"),
            reason: reason.into(),
        }
    }
}

/// Checks an interval: positive and at most a day.
pub fn check_interval(key: &str, value: Duration) -> Result<(), InvalidConfig> {
    if value.is_zero() || value > Duration::from_secs(86_400) {
        return Err(InvalidConfig::new(
            key,
            value,
            "must be between 1ms and 24h",
        ));
    }
    Ok(())
}

/// Checks a batch size: 1 to 100,000 rows.
pub fn check_batch(key: &str, value: i64) -> Result<(), InvalidConfig> {
    if !(1..=100_000).contains(&value) {
        return Err(InvalidConfig::new(
            key,
            value,
            "must be between 1 and 100000",
        ));
    }
    Ok(())
}

impl BranchesConfig {
    /// Every problem at once, each naming its key (e.g. `branches.cleanup.batch_size`).
    pub fn validate(&self) -> Vec<InvalidConfig> {
        let mut problems = Vec::new();
        let mut check = |prefix: &str, result: Vec<InvalidConfig>| {
            problems.extend(result.into_iter().map(|mut p| {
                p.key = format!("branches.{prefix}.{}", p.key);
                p
            }))
        };
        check("promote_scheduled", self.promote_scheduled.validate());
        check(
            "rescue_stale_heartbeats",
            self.rescue_stale_heartbeats.validate(),
        );
        check(
            "rescue_expired_deadlines",
            self.rescue_expired_deadlines.validate(),
        );
        check(
            "rescue_expired_callbacks",
            self.rescue_expired_callbacks.validate(),
        );
        check("cleanup", self.cleanup.validate());
        check("cron_sync", self.cron_sync.validate());
        check("queue_stats", self.queue_stats.validate());
        check(
            "refresh_admin_metadata",
            self.refresh_admin_metadata.validate(),
        );
        check(
            "recompute_dirty_admin_metadata",
            self.recompute_dirty_admin_metadata.validate(),
        );
        check("priority_aging", self.priority_aging.validate());
        check("rotate_archive", self.rotate_archive.validate());
        // Archived jobs live in day partitions that rotate_archive drops after retention_days:
        // a longer cleanup retention would archive into partitions that are already expired.
        if self.cleanup.enabled && self.cleanup.archive && self.rotate_archive.enabled {
            let longest = self.cleanup.longest_retention();
            let archive_keeps =
                Duration::from_secs(self.rotate_archive.retention_days.max(0) as u64 * 86_400);
            if longest >= archive_keeps {
                problems.push(InvalidConfig::new(
                    "branches.rotate_archive.retention_days",
                    self.rotate_archive.retention_days,
                    format!(
                        "must exceed the longest cleanup retention ({}), or cleanup archives into expired partitions",
                        humantime_serde::re::humantime::format_duration(longest)
                    ),
                ));
            }
        }
        problems
    }

    /// Every enabled branch.
    pub fn build(&self) -> Vec<Arc<dyn Branch>> {
        let all: Vec<(bool, Arc<dyn Branch>)> = vec![
            (
                self.promote_scheduled.enabled,
                Arc::new(promote_scheduled::PromoteScheduled::new(
                    self.promote_scheduled.clone(),
                )),
            ),
            (
                self.rescue_stale_heartbeats.enabled,
                Arc::new(rescue_stale_heartbeats::RescueStaleHeartbeats::new(
                    self.rescue_stale_heartbeats.clone(),
                )),
            ),
            (
                self.rescue_expired_deadlines.enabled,
                Arc::new(rescue_expired_deadlines::RescueExpiredDeadlines::new(
                    self.rescue_expired_deadlines.clone(),
                )),
            ),
            (
                self.rescue_expired_callbacks.enabled,
                Arc::new(rescue_expired_callbacks::RescueExpiredCallbacks::new(
                    self.rescue_expired_callbacks.clone(),
                )),
            ),
            (
                self.cleanup.enabled,
                Arc::new(cleanup::Cleanup::new(self.cleanup.clone())),
            ),
            (
                self.cron_sync.enabled,
                Arc::new(cron_sync::CronSync::new(self.cron_sync.clone())),
            ),
            (
                self.queue_stats.enabled,
                Arc::new(queue_stats::QueueStats::new(self.queue_stats.clone())),
            ),
            (
                self.refresh_admin_metadata.enabled,
                Arc::new(refresh_admin_metadata::RefreshAdminMetadata::new(
                    self.refresh_admin_metadata.clone(),
                )),
            ),
            (
                self.recompute_dirty_admin_metadata.enabled,
                Arc::new(
                    recompute_dirty_admin_metadata::RecomputeDirtyAdminMetadata::new(
                        self.recompute_dirty_admin_metadata.clone(),
                    ),
                ),
            ),
            (
                self.priority_aging.enabled,
                Arc::new(priority_aging::PriorityAging::new(
                    self.priority_aging.clone(),
                )),
            ),
            (
                self.rotate_archive.enabled,
                Arc::new(rotate_archive::RotateArchive::new(
                    self.rotate_archive.clone(),
                )),
            ),
        ];
        all.into_iter()
            .filter(|(enabled, _)| *enabled)
            .map(|(_, b)| b)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_follow_the_interval_within_bounds() {
        let t = Timeouts::for_interval(Duration::from_millis(250));
        assert_eq!(
            (t.statement, t.lock),
            (Duration::from_secs(1), Duration::from_millis(250))
        );
        let t = Timeouts::for_interval(Duration::from_secs(600));
        assert_eq!(
            (t.statement, t.lock),
            (Duration::from_secs(60), Duration::from_secs(5))
        );
    }

    #[test]
    fn archive_retention_must_outlast_cleanup_retention() {
        let mut config = BranchesConfig::default();
        config.cleanup.retention.failed = Duration::from_secs(30 * 86_400);
        let problems = config.validate();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].key, "branches.rotate_archive.retention_days");
        config.rotate_archive.retention_days = 31;
        assert_eq!(config.validate(), vec![]);
        config.cleanup.archive = false;
        config.rotate_archive.retention_days = 1;
        assert_eq!(config.validate(), vec![]);
    }

    #[test]
    fn defaults_are_valid_and_every_branch_is_built() {
        let config = BranchesConfig::default();
        assert_eq!(config.validate(), vec![]);
        let names: Vec<&str> = config.build().iter().map(|b| b.name()).collect();
        assert_eq!(names.len(), 11, "{names:?}");
    }
}
