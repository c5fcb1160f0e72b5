//! The maintenance leader. Instances are candidates in an election held with a session-level
//! advisory lock on a dedicated leader connection; the winner opens a term (a new epoch, the
//! fencing token every branch transaction checks) and runs the branches on its loops until the
//! term ends, then returns to standby. Embeddable: a worker process can run a [`Candidate`].

mod health;
mod observe;
mod runner;
mod session;
mod term;
mod tracker;

pub use health::{BranchHealth, HealthRegistry, HealthSnapshot};
pub use observe::{BranchRun, LeadershipEvent, LoopMode, Observer, Observers, RunResult};
pub use runner::ContactMonitor;
pub use session::{LEADER_PROGRESS, START_TERM};
pub use term::TermEnd;
pub use tracker::{OverrunState, OverrunTracker, Transition};

use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;
use steward_branches::{Branch, InvalidConfig};
use steward_schema::SchemaName;
use tokio_util::sync::CancellationToken;

/// Leadership and loop settings. Defaults suit a queue on a LAN-latency database.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LeaderSettings {
    pub loop_mode: LoopMode,
    /// How often the leader checks its connection with a trivial statement.
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
    /// A probe without an answer this long ends the term.
    #[serde(with = "humantime_serde")]
    pub probe_timeout: Duration,
    /// A probe slower than this counts as a database stall: rescues wait a quiet period again.
    #[serde(with = "humantime_serde")]
    pub stall_threshold: Duration,
    /// Standbys take over from a leader whose progress mark is older than this.
    #[serde(with = "humantime_serde")]
    pub wedge_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub wedge_check_interval: Duration,
    /// How often the leader marks progress and flushes branch health.
    #[serde(with = "humantime_serde")]
    pub progress_interval: Duration,
    /// On shutdown, how long a running statement may finish before it is cancelled.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// TCP keepalive on Steward's connections, both client side and (via session settings)
    /// server side, so a black-holed leader's session is dropped and its lock released.
    #[serde(with = "humantime_serde")]
    pub keepalive_idle: Duration,
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    pub keepalive_retries: u32,
    /// `client_connection_check_interval` for Steward's sessions (PostgreSQL 14+): the server
    /// notices a vanished client even mid-statement, so a dead leader's lock goes promptly.
    #[serde(with = "humantime_serde")]
    pub connection_check_interval: Duration,
    /// `idle_in_transaction_session_timeout` for work sessions: a paused leader cannot hold a
    /// transaction (and with it the next term's start) open for longer than this.
    #[serde(with = "humantime_serde")]
    pub idle_in_transaction_timeout: Duration,
}

impl Default for LeaderSettings {
    fn default() -> Self {
        Self {
            loop_mode: LoopMode::Split,
            probe_interval: Duration::from_secs(1),
            probe_timeout: Duration::from_secs(3),
            stall_threshold: Duration::from_secs(1),
            wedge_timeout: Duration::from_secs(30),
            wedge_check_interval: Duration::from_secs(1),
            progress_interval: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(5),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            keepalive_idle: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(2),
            keepalive_retries: 3,
            connection_check_interval: Duration::from_millis(100),
            idle_in_transaction_timeout: Duration::from_secs(60),
        }
    }
}

impl LeaderSettings {
    pub fn validate(&self) -> Vec<InvalidConfig> {
        let mut problems = Vec::new();
        let positive = [
            ("probe_interval", self.probe_interval),
            ("probe_timeout", self.probe_timeout),
            ("stall_threshold", self.stall_threshold),
            ("wedge_timeout", self.wedge_timeout),
            ("wedge_check_interval", self.wedge_check_interval),
            ("progress_interval", self.progress_interval),
            ("reconnect_min", self.reconnect_min),
            ("reconnect_max", self.reconnect_max),
            ("keepalive_idle", self.keepalive_idle),
            ("keepalive_interval", self.keepalive_interval),
            ("connection_check_interval", self.connection_check_interval),
            (
                "idle_in_transaction_timeout",
                self.idle_in_transaction_timeout,
            ),
        ];
        for (key, value) in positive {
            if value.is_zero() {
                problems.push(InvalidConfig::new(
                    format!("leader.{key}"),
                    value,
                    "must be positive",
                ));
            }
        }
        if self.wedge_timeout <= self.progress_interval * 3 {
            problems.push(InvalidConfig::new(
                "leader.wedge_timeout",
                self.wedge_timeout,
                "must exceed 3x leader.progress_interval, or a healthy leader could be taken for wedged",
            ));
        }
        if self.reconnect_max < self.reconnect_min {
            problems.push(InvalidConfig::new(
                "leader.reconnect_max",
                self.reconnect_max,
                "must not be below leader.reconnect_min",
            ));
        }
        if self.keepalive_retries == 0 {
            problems.push(InvalidConfig::new(
                "leader.keepalive_retries",
                0,
                "must be at least 1",
            ));
        }
        problems
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("{0}")]
    InvalidUrl(String),
    #[error(transparent)]
    Schema(#[from] steward_schema::SchemaError),
    #[error(transparent)]
    Connect(#[from] steward_schema::ConnectError),
}

/// A participant in the election for one schema.
pub struct Candidate {
    settings: LeaderSettings,
    db_url: String,
    /// The parsed URL with the schema pinned, or why it does not parse (reported by `run`).
    base_config: Result<tokio_postgres::Config, String>,
    tls: steward_schema::Tls,
    schema: SchemaName,
    instance: String,
    host: String,
    branches: Vec<Arc<dyn Branch>>,
    observers: Observers,
    health: HealthRegistry,
}

impl Candidate {
    pub fn new(
        db_url: impl Into<String>,
        schema: SchemaName,
        settings: LeaderSettings,
        branches: Vec<Arc<dyn Branch>>,
    ) -> Self {
        let host = hostname();
        let instance = format!(
            "{}-{}-{:04x}",
            host.chars().take(24).collect::<String>(),
            std::process::id(),
            rand::random::<u16>()
        );
        let health = HealthRegistry::default();
        let db_url = db_url.into();
        let tls_setup = steward_schema::Tls::from_url(&db_url);
        let base_config = tls_setup.as_ref().map_err(|e| e.to_string()).and_then(|_| {
            steward_schema::pg_config(&db_url, &schema, "steward").map_err(|e| e.to_string())
        });
        let tls = tls_setup.unwrap_or_else(|_| steward_schema::Tls::none());
        Self {
            settings,
            db_url,
            base_config,
            tls,
            schema,
            instance,
            host,
            branches,
            observers: Observers::new(vec![Arc::new(health.clone())]),
            health,
        }
    }

    pub fn with_observer(mut self, observer: Arc<dyn Observer>) -> Self {
        self.observers.push(observer);
        self
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    pub fn health(&self) -> HealthRegistry {
        self.health.clone()
    }

    fn observer(&self) -> Arc<dyn Observer> {
        Arc::new(self.observers.clone())
    }

    fn lock_name(&self) -> String {
        format!("steward.leader.{}", self.schema)
    }

    /// Connection settings for one of this instance's sessions; `role` ends up in
    /// application_name (`steward:<instance>:<role>`), which the wedge takeover matches.
    fn session_config(&self, role: &str, extra_options: &str) -> tokio_postgres::Config {
        let application_name = format!("steward:{}:{role}", self.instance);
        // `run` refuses to start with an invalid URL, so only a valid one reaches here.
        let mut config = self.base_config.clone().unwrap_or_default();
        config.application_name(&application_name);
        let s = &self.settings;
        // Keepalives only probe an idle connection. When data is in flight as the path goes
        // dark (a reply the peer never acknowledges), TCP retransmits for many minutes
        // instead; the user timeout bounds that to the same time the keepalives take.
        let user_timeout = s.keepalive_idle + s.keepalive_interval * s.keepalive_retries;
        let options = format!(
            "{} -c tcp_keepalives_idle={} -c tcp_keepalives_interval={} -c tcp_keepalives_count={} -c tcp_user_timeout={} -c client_connection_check_interval={}ms {extra_options}",
            config.get_options().unwrap_or_default(),
            s.keepalive_idle.as_secs().max(1),
            s.keepalive_interval.as_secs().max(1),
            s.keepalive_retries,
            user_timeout.as_millis(),
            s.connection_check_interval.as_millis(),
        );
        config
            .options(options.trim())
            .keepalives(true)
            .keepalives_idle(s.keepalive_idle)
            .keepalives_interval(s.keepalive_interval)
            .keepalives_retries(s.keepalive_retries)
            .tcp_user_timeout(user_timeout)
            .connect_timeout(Duration::from_secs(10));
        config
    }

    fn work_config(&self, role: &str) -> tokio_postgres::Config {
        let extra = format!(
            "-c idle_in_transaction_session_timeout={}ms",
            self.settings.idle_in_transaction_timeout.as_millis()
        );
        self.session_config(role, &extra)
    }

    /// Validates the URL and the schema version once, with errors an operator can act on.
    pub async fn check(&self) -> Result<(), LeaderError> {
        let config = steward_schema::pg_config(&self.db_url, &self.schema, "steward:check")?;
        let client = steward_schema::connect_with(&config, &self.tls).await?;
        steward_schema::check_schema(&client, &self.schema).await?;
        Ok(())
    }

    /// Stands for election until `shutdown`; leads whenever elected. Returns Ok after a clean
    /// step-down. Errors only for problems retrying cannot fix (schema missing or mismatched).
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), LeaderError> {
        if let Err(reason) = &self.base_config {
            return Err(LeaderError::InvalidUrl(reason.clone()));
        }
        let lock_name = self.lock_name();
        let mut backoff = self.settings.reconnect_min;
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            let session = match session::LeaderSession::open(
                &self.session_config("leader", ""),
                &self.tls,
            )
            .await
            {
                Ok(session) => session,
                Err(error) => {
                    tracing::warn!(%error, url = %steward_schema::redact_url(&self.db_url), retry_in = ?backoff, "cannot reach the database");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(self.settings.reconnect_max);
                    continue;
                }
            };
            match steward_schema::check_schema(session.client(), &self.schema).await {
                Ok(_) => backoff = self.settings.reconnect_min,
                // A database error here (a restart, a dropped connection) is retried like any
                // other; only a schema that is missing or at another version stops the process.
                Err(steward_schema::SchemaError::Db(error)) => {
                    tracing::warn!(%error, retry_in = ?backoff, "could not check the schema version; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(self.settings.reconnect_max);
                    continue;
                }
                Err(error) => return Err(error.into()),
            }

            tracing::info!(instance = %self.instance, "standing by for leadership");
            let watcher_stop = CancellationToken::new();
            let watcher = tokio::spawn(session::watch_for_wedged_leader(
                self.session_config("watch", ""),
                self.tls.clone(),
                self.instance.clone(),
                self.settings.wedge_timeout,
                self.settings.wedge_check_interval,
                watcher_stop.clone(),
            ));
            let acquired = tokio::select! {
                result = session.acquire(&lock_name) => result.map_err(|e| steward_schema::describe_pg_error(&e)),
                _ = session.ended() => Err("the leader connection closed while waiting".to_owned()),
                _ = shutdown.cancelled() => {
                    watcher_stop.cancel();
                    return Ok(());
                }
            };
            watcher_stop.cancel();
            let _ = watcher.await;
            if let Err(error) = acquired {
                tracing::warn!(%error, "waiting for leadership failed; retrying");
                continue;
            }
            let epoch = match session
                .start_term(&self.instance, &self.host, std::process::id() as i32)
                .await
            {
                Ok(epoch) => epoch,
                Err(error) => {
                    tracing::warn!(error = %steward_schema::describe_pg_error(&error), "could not start a leadership term; retrying");
                    continue;
                }
            };
            tracing::info!(instance = %self.instance, epoch, mode = self.settings.loop_mode.as_str(), "leadership acquired");
            self.observers
                .leadership(&LeadershipEvent::Acquired { epoch });

            match term::run_term(self, &session, epoch, &shutdown).await {
                TermEnd::SteppedDown => {
                    session
                        .step_down(
                            epoch,
                            &lock_name,
                            "stepped_down",
                            self.settings.shutdown_grace,
                        )
                        .await;
                    tracing::info!(epoch, "stepped down");
                    self.observers
                        .leadership(&LeadershipEvent::SteppedDown { epoch });
                    return Ok(());
                }
                TermEnd::Lost(reason) => {
                    tracing::warn!(epoch, %reason, "leadership lost; back to standby");
                    self.observers
                        .leadership(&LeadershipEvent::Lost { epoch, reason });
                }
            }
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".to_owned())
}
