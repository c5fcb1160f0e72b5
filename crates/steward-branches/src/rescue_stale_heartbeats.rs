//! `rescue_stale_heartbeats`: running jobs whose worker stopped heartbeating are presumed dead.
//!
//! Such a job becomes `retryable` with the usual backoff, or `failed` once its attempts are used
//! up (a job that keeps killing its worker must not cycle forever), with a `heartbeat_stale`
//! entry in its errors. The worker, should it still be alive, loses its lease: the run is no
//! longer `running`, and a new claim changes `run_lease`.
//!
//! The statement, as it runs, is in `tests/sql/rescue_stale_heartbeats__rescue.snap`.

use crate::rescue::{self, rescue_statement};
use crate::{
    check_batch, check_interval, Branch, BranchContext, BranchError, Class, InvalidConfig, Outcome,
    RescueReason,
};
use async_trait::async_trait;
use serde::Deserialize;
use std::time::Duration;
use tokio_postgres::types::Type;

pub use crate::rescue::RetryConfig;

/// Running jobs whose last heartbeat is older than $5 seconds, stalest first. Index:
/// jobs_running_heartbeat_idx. $1 batch size; $2, $3, $4 the retry_backoff base (ms), max (ms)
/// and jitter; $5 the staleness in seconds.
pub const RESCUE: &str = rescue_statement!(
    pick: "state = 'running' AND heartbeat_at < now() - make_interval(secs => $5)
    ORDER BY heartbeat_at, id",
    reason: "heartbeat_stale",
    error: "format('no heartbeat since %s (staleness limit %s): the worker is presumed dead',
        j.heartbeat_at, make_interval(secs => $5))",
    set: "",
);

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub enabled: bool,
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    pub batch_size: i64,
    /// Batches per run before yielding to the loop (the run then asks to go again at once).
    pub max_batches_per_run: u32,
    /// A running job whose heartbeat is older than this is rescued: three missed beats of a
    /// worker heartbeating every 10 s.
    #[serde(with = "humantime_serde")]
    pub staleness: Duration,
    /// How long the leader holds this branch back after a term starts or the database comes
    /// back. Unset: the staleness, so that every live worker has had a full window to
    /// heartbeat again before anyone is taken for dead.
    #[serde(with = "humantime_serde")]
    pub quiet_period: Option<Duration>,
    pub retry: RetryConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: Duration::from_secs(5),
            batch_size: 1000,
            max_batches_per_run: 10,
            staleness: Duration::from_secs(30),
            quiet_period: None,
            retry: RetryConfig::default(),
        }
    }
}

impl Config {
    pub fn validate(&self) -> Vec<InvalidConfig> {
        let mut problems: Vec<InvalidConfig> = [
            check_interval("interval", self.interval),
            check_batch("batch_size", self.batch_size),
            check_interval("staleness", self.staleness),
        ]
        .into_iter()
        .filter_map(Result::err)
        .collect();
        problems.extend(rescue::check_common(
            self.max_batches_per_run,
            self.effective_quiet_period(),
            &self.retry,
        ));
        problems
    }

    /// The quiet period in force: the configured one, else the staleness.
    pub fn effective_quiet_period(&self) -> Duration {
        self.quiet_period.unwrap_or(self.staleness)
    }
}

pub struct RescueStaleHeartbeats {
    config: Config,
}

impl RescueStaleHeartbeats {
    pub fn new(config: Config) -> Self {
        Self { config }
    }
}

#[async_trait]
impl Branch for RescueStaleHeartbeats {
    fn name(&self) -> &'static str {
        "rescue_stale_heartbeats"
    }

    fn class(&self) -> Class {
        Class::Slo
    }

    fn interval(&self) -> Duration {
        self.config.interval
    }

    fn quiet_period(&self) -> Option<Duration> {
        Some(self.config.effective_quiet_period())
    }

    async fn run(&self, ctx: &mut BranchContext<'_>) -> Result<Outcome, BranchError> {
        let staleness = self.config.staleness.as_secs_f64();
        rescue::run_batches(
            ctx,
            RESCUE,
            RescueReason::Heartbeat,
            self.config.batch_size,
            self.config.max_batches_per_run,
            &self.config.retry,
            &[(&staleness, Type::FLOAT8)],
        )
        .await
    }
}
