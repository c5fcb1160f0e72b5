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
mod config;
pub use config::{check_batch, check_interval, Batching, BranchSettings, InvalidConfig};
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
pub mod table_health;

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
    /// For the branch that rescues runs whose heartbeat stopped: its staleness, which the leader
    /// publishes for workers (`leader.heartbeat_staleness`), so that a worker can check that it
    /// heartbeats often enough.
    fn heartbeat_staleness(&self) -> Option<Duration> {
        None
    }
    /// For an SLO branch: what users wait for, read from the head of the branch's own partial
    /// index (cheap, and read by the leader on a cadence of its own, so that a stuck branch
    /// cannot stop its own measurement). `None` for branches users do not wait on.
    async fn backlog(&self, _client: &Client) -> Result<Option<Backlog>, BranchError> {
        Ok(None)
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
    /// Steward's tables and indexes as `table_health` read them: every one of them each pass,
    /// so that what is missing is gone.
    TableHealth(table_health::Report),
    /// Input the branch could not use (a cron expression that does not parse...): skipped
    /// and reported, never fatal to the branch.
    Skipped {
        what: String,
        reason: String,
    },
}

/// What an SLO branch's backlog is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BacklogKind {
    /// Jobs due but not yet available.
    Promotion,
    /// Runs that should have been rescued for this reason.
    Rescue(RescueReason),
}

/// The head of an SLO branch's backlog.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backlog {
    pub kind: BacklogKind,
    /// Seconds until the oldest item becomes the branch's to handle: negative when it is
    /// already overdue (its age is the backlog's age), `None` when there is no item at all.
    pub head_in: Option<f64>,
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
    /// A write refused because the server is read-only (a hot standby, or a primary demoted
    /// or fenced with `default_transaction_read_only`): no retry on this server can succeed.
    pub fn is_read_only(&self) -> bool {
        match self {
            BranchError::Db(e) => e.code() == Some(&SqlState::READ_ONLY_SQL_TRANSACTION),
            _ => false,
        }
    }

    /// Errors meaning the connection itself is gone (as opposed to one failed statement).
    pub fn is_connection_lost(&self) -> bool {
        match self {
            BranchError::Db(e) => e.is_closed() || e.code().is_none(),
            _ => false,
        }
    }
}

/// The branches, each as `module => Type`: the module's name is the branch's name (in
/// configuration, metrics, logs and `branch_health`), and the module holds its `Config` (see
/// [`branch_settings!`](config)) and its [`Branch`] impl, built with `Type::new(Config)`.
/// Adding a branch is its module plus one line here.
macro_rules! registry {
    ($($module:ident => $branch:ident),+ $(,)?) => {
        /// Every branch's settings, under `branches.<name>`. Unknown keys are rejected, so a
        /// typo is an error, not a default.
        #[derive(Debug, Clone, Default, Deserialize, PartialEq)]
        #[serde(default, deny_unknown_fields)]
        pub struct BranchesConfig {
            $(pub $module: $module::Config,)+
        }

        /// Every branch's name, in the order they are built.
        pub const NAMES: &[&str] = &[$(stringify!($module)),+];

        $(impl $module::$branch {
            pub const NAME: &'static str = stringify!($module);
        })+

        impl BranchesConfig {
            /// Every problem at once, each naming its key (e.g. `branches.cleanup.batch_size`).
            pub fn validate(&self) -> Vec<InvalidConfig> {
                let mut problems = Vec::new();
                $(problems.extend(
                    self.$module
                        .problems()
                        .into_iter()
                        .map(|p| p.under(concat!("branches.", stringify!($module)))),
                );)+
                problems.extend(self.across_branches());
                problems
            }

            /// Every enabled branch.
            pub fn build(&self) -> Vec<Arc<dyn Branch>> {
                let mut branches: Vec<Arc<dyn Branch>> = Vec::new();
                $(if self.$module.enabled() {
                    branches.push(Arc::new($module::$branch::new(self.$module.clone())));
                })+
                branches
            }
        }
    };
}

registry! {
    promote_scheduled => PromoteScheduled,
    rescue_stale_heartbeats => RescueStaleHeartbeats,
    rescue_expired_deadlines => RescueExpiredDeadlines,
    rescue_expired_callbacks => RescueExpiredCallbacks,
    cleanup => Cleanup,
    cron_sync => CronSync,
    queue_stats => QueueStats,
    refresh_admin_metadata => RefreshAdminMetadata,
    recompute_dirty_admin_metadata => RecomputeDirtyAdminMetadata,
    priority_aging => PriorityAging,
    rotate_archive => RotateArchive,
    table_health => TableHealth,
}

impl BranchesConfig {
    /// Rules between branches' settings.
    fn across_branches(&self) -> Vec<InvalidConfig> {
        let mut problems = Vec::new();
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
    fn defaults_are_valid_and_every_branch_is_built_under_its_name() {
        let config = BranchesConfig::default();
        assert_eq!(config.validate(), vec![]);
        let names: Vec<&str> = config.build().iter().map(|b| b.name()).collect();
        assert_eq!(names, NAMES);
    }

    #[test]
    fn common_settings_are_checked_under_the_branch_key() {
        let mut config = BranchesConfig::default();
        config.queue_stats.interval = Duration::ZERO;
        config.priority_aging.max_batches_per_run = 0;
        config.rescue_expired_callbacks.retry.jitter = 2.0;
        let keys: Vec<String> = config.validate().into_iter().map(|p| p.key).collect();
        assert_eq!(
            keys,
            [
                "branches.rescue_expired_callbacks.retry.jitter",
                "branches.queue_stats.interval",
                "branches.priority_aging.max_batches_per_run",
            ]
        );
    }
}
