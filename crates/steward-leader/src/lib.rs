//! The maintenance leader. Instances are candidates in an election held with a session-level
//! advisory lock on a dedicated leader connection; the winner opens a term (a new epoch, the
//! fencing token every branch transaction checks) and runs the branches on its loops until the
//! term ends, then returns to standby. Embeddable: a worker process can run a [`Candidate`].

mod backlog;
mod drift;
pub mod fleet;
mod health;
mod instance;
mod observe;
pub mod pinning;
mod plan;
mod runner;
mod session;
mod settings;
pub mod share;
pub mod status;
mod term;
mod tracker;
mod work;

pub use health::{BranchHealth, HealthRegistry, HealthSnapshot, PassRecord};
pub use observe::{
    BacklogReport, BranchHeld, BranchRun, CandidateSeen, LeadershipEvent, Observer, Observers,
    RunResult,
};
pub use plan::{LoopPlan, PlannedLoop, MONOLITHIC};
pub use runner::ContactMonitor;
pub use session::{lock_name, LEADER_PROGRESS, START_TERM};
pub use settings::{FleetSettings, LeaderSettings, LoopMode};
pub use term::{TermEnd, BACKLOG_TASK};
pub use tracker::{OverrunState, OverrunTracker, Transition};

use instance::Instance;
use std::sync::Arc;
use std::time::Duration;
use steward_branches::{Branch, InvalidConfig};
use steward_connection::{describe_pg_error, Target};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("invalid leader settings:\n  {}", .0.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n  "))]
    InvalidSettings(Vec<InvalidConfig>),
    #[error(transparent)]
    Schema(#[from] steward_schema::SchemaError),
    #[error(transparent)]
    Connect(#[from] steward_connection::ConnectError),
    #[error(transparent)]
    Pinning(#[from] pinning::PinningError),
    #[error("a fleet database task died: {0}")]
    FleetTaskDied(String),
    #[error("{what} ({target}), for {for_:?}; giving up: {error}")]
    Refused {
        what: &'static str,
        target: String,
        for_: std::time::Duration,
        error: steward_connection::ConnectError,
    },
}

/// A participant in the election for one schema.
pub struct Candidate {
    settings: LeaderSettings,
    target: Target,
    instance: Instance,
    plan: LoopPlan,
    observers: Observers,
    health: HealthRegistry,
}

impl Candidate {
    /// A candidate for the schema of `target`, which will run `branches` on the loops that
    /// `settings.loop_mode` plans for them. Refuses settings that cannot work.
    pub fn new(
        target: Target,
        settings: LeaderSettings,
        branches: Vec<Arc<dyn Branch>>,
    ) -> Result<Self, LeaderError> {
        let problems = settings.validate();
        if !problems.is_empty() {
            return Err(LeaderError::InvalidSettings(problems));
        }
        let health = HealthRegistry::default();
        Ok(Self {
            instance: Instance::new(&target, &settings),
            plan: LoopPlan::new(settings.loop_mode, &branches),
            settings,
            target,
            observers: Observers::new(vec![Arc::new(health.clone())]),
            health,
        })
    }

    /// A digest of the configuration this candidate runs with (see `candidates`): candidates
    /// whose digests differ would run the queue differently after a failover.
    pub fn with_config_digest(mut self, digest: impl Into<String>) -> Self {
        self.instance.set_config_digest(digest.into());
        self
    }

    pub fn with_observer(mut self, observer: Arc<dyn Observer>) -> Self {
        self.observers.push(observer);
        self
    }

    /// This candidate's instance name (host-pid-random), unique per process and candidate.
    pub fn instance(&self) -> &str {
        self.instance.name()
    }

    /// The loops this candidate runs when it leads.
    pub fn plan(&self) -> &LoopPlan {
        &self.plan
    }

    pub fn health(&self) -> HealthRegistry {
        self.health.clone()
    }

    /// Validates once, with errors an operator can act on: the URL's server, the schema
    /// version, and that sessions keep their server backend (no transaction pooler between).
    pub async fn check(&self) -> Result<(), LeaderError> {
        let target = self.instance.session("check");
        let client = target.connect().await?;
        steward_schema::check_schema(&client, self.target.schema()).await?;
        pinning::check(&target).await?;
        Ok(())
    }

    /// Stands aside (logged once, `/readyz` says why) while the schema is newer than this
    /// steward, rechecking every 10 s on `session`; true when `shutdown` came first, false
    /// when the schema check no longer finds it newer (or the session failed: the caller
    /// starts over).
    async fn stand_aside_while_schema_is_newer(
        &self,
        session: &session::LeaderSession,
        error: &steward_schema::SchemaError,
        shutdown: &CancellationToken,
    ) -> bool {
        const RECHECK: Duration = Duration::from_secs(10);
        let why = format!("{error}; not standing for election");
        tracing::warn!(target = %self.target, %error, "this steward is older than the schema: not standing for election until it is upgraded");
        self.observers.standing_aside(Some(&why));
        let ended = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break true,
                _ = tokio::time::sleep(RECHECK) => {}
            }
            match steward_schema::check_schema(session.client(), self.target.schema()).await {
                Err(steward_schema::SchemaError::Ahead { .. }) => continue,
                _ => break false,
            }
        };
        self.observers.standing_aside(None);
        if !ended {
            tracing::info!(target = %self.target, "the schema is no longer newer than this steward: checking it again");
        }
        ended
    }

    /// Waits on `session` until its server accepts writes; false when `shutdown` came first.
    /// A hot standby or a read-only primary is checked again at a growing interval (250 ms
    /// doubling to 2 s) on the same session, so that a promotion is noticed within seconds
    /// and waiting costs one idle session rather than a reconnect loop. Each change is logged
    /// once and exported (`read_only` carries the last state across reconnects).
    async fn wait_until_writable(
        &self,
        session: &session::LeaderSession,
        read_only: &mut bool,
        shutdown: &CancellationToken,
    ) -> Result<bool, tokio_postgres::Error> {
        const FIRST_RECHECK: Duration = Duration::from_millis(250);
        const LONGEST_RECHECK: Duration = Duration::from_secs(2);
        let mut recheck = FIRST_RECHECK;
        loop {
            let now_read_only = session.read_only().await?;
            if now_read_only != *read_only {
                *read_only = now_read_only;
                self.observers.server_read_only(now_read_only);
                self.observers
                    .standing_aside(now_read_only.then_some(term::READ_ONLY_SERVER));
                if now_read_only {
                    tracing::warn!(target = %self.target, "the server refuses writes (a hot standby, or default_transaction_read_only is on): not standing for election here until it accepts them");
                } else {
                    tracing::info!(target = %self.target, "the server accepts writes again: standing for election");
                }
            }
            if !now_read_only {
                return Ok(true);
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(false),
                _ = tokio::time::sleep(recheck) => {}
            }
            recheck = (recheck * 2).min(LONGEST_RECHECK);
        }
    }

    /// Stands for election until `shutdown`; leads whenever elected. Returns Ok after a clean
    /// step-down. Errors only for problems retrying cannot fix (schema missing or mismatched).
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), LeaderError> {
        let lock_name = lock_name(self.target.schema());
        let mut backoff = self.settings.reconnect_min;
        // Since when the server has refused us for a reason retrying cannot fix.
        let mut refused_since: Option<std::time::Instant> = None;
        // Whether the server was last seen refusing writes (logged once per change).
        let mut read_only = false;
        let mut pinning_checked = false;
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            let session = match session::LeaderSession::open(&self.instance.session("leader")).await
            {
                Ok(session) => session,
                Err(error) => {
                    match error.permanent() {
                        Some(what) => {
                            let since = *refused_since.get_or_insert_with(std::time::Instant::now);
                            let for_ = since.elapsed();
                            if for_ >= self.settings.give_up_after {
                                return Err(LeaderError::Refused {
                                    what,
                                    target: self.target.to_string(),
                                    for_,
                                    error,
                                });
                            }
                            tracing::error!(%error, target = %self.target, problem = what, retry_in = ?backoff, give_up_in = ?(self.settings.give_up_after - for_), "the database refuses this candidate");
                        }
                        None if error.no_connection_slot() => {
                            refused_since = None;
                            tracing::warn!(%error, target = %self.target, retry_in = ?backoff, "no connection slot for this candidate (max_connections, or the role's or database's connection limit); retrying");
                        }
                        None => {
                            refused_since = None;
                            tracing::warn!(%error, target = %self.target, retry_in = ?backoff, "cannot reach the database");
                        }
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(self.settings.reconnect_max);
                    continue;
                }
            };
            refused_since = None;
            // Once per process: a target that moves sessions between backends (a transaction
            // pooler) can never carry the lock, so that is refused rather than retried.
            if !pinning_checked {
                match pinning::check(&self.instance.session("check")).await {
                    Ok(()) => pinning_checked = true,
                    Err(error @ pinning::PinningError::Pooled { .. }) => return Err(error.into()),
                    Err(error) => {
                        tracing::warn!(%error, retry_in = ?backoff, "retrying");
                        tokio::select! {
                            _ = shutdown.cancelled() => return Ok(()),
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(self.settings.reconnect_max);
                        continue;
                    }
                }
            }
            match steward_schema::check_schema(session.client(), self.target.schema()).await {
                Ok(_) => {}
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
                // Older than the schema: leading would run old SQL on a new schema, but a warm
                // standby harms nothing while a rolling upgrade replaces this process.
                Err(error @ steward_schema::SchemaError::Ahead { .. }) => {
                    if self
                        .stand_aside_while_schema_is_newer(&session, &error, &shutdown)
                        .await
                    {
                        return Ok(());
                    }
                    continue;
                }
                Err(error) => return Err(error.into()),
            }
            match self
                .wait_until_writable(&session, &mut read_only, &shutdown)
                .await
            {
                Ok(true) => backoff = self.settings.reconnect_min,
                Ok(false) => return Ok(()),
                Err(error) => {
                    tracing::warn!(error = %describe_pg_error(&error), retry_in = ?backoff, "could not check whether the server accepts writes; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(self.settings.reconnect_max);
                    continue;
                }
            }

            tracing::info!(instance = %self.instance(), "standing by for leadership");
            let watcher_stop = CancellationToken::new();
            let watcher = tokio::spawn(session::watch_for_wedged_leader(
                self.instance.session("watch"),
                self.instance.registration().clone(),
                self.settings.wedge_timeout,
                self.settings.wedge_check_interval,
                watcher_stop.clone(),
            ));
            let acquired = tokio::select! {
                result = session.acquire(&lock_name) => result.map_err(|e| describe_pg_error(&e)),
                _ = session.ended() => Err("the leader connection closed while waiting".to_owned()),
                _ = shutdown.cancelled() => {
                    watcher_stop.cancel();
                    // The leader session is waiting on the lock; a session of its own withdraws.
                    if let Ok(client) = self.instance.session("withdraw").connect().await {
                        let _ = self.instance.registration().withdraw(&client).await;
                    }
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
                .start_term(
                    self.instance(),
                    self.instance.host(),
                    std::process::id() as i32,
                    self.plan
                        .branches()
                        .find_map(|(_, branch)| branch.heartbeat_staleness()),
                )
                .await
            {
                Ok(epoch) => epoch,
                Err(error) => {
                    tracing::warn!(error = %describe_pg_error(&error), "could not start a leadership term; retrying");
                    continue;
                }
            };
            tracing::info!(instance = %self.instance(), epoch, mode = self.settings.loop_mode.as_str(), "leadership acquired");
            self.observers
                .leadership(&LeadershipEvent::Acquired { epoch });

            let term = term::Term {
                epoch,
                registration: self.instance.registration(),
                plan: &self.plan,
                settings: &self.settings,
                sessions: term::TermSessions::Own(&self.instance),
                holder: term::Holder::Session(&session),
                contact: ContactMonitor::new(),
                observer: Arc::new(self.observers.clone()),
                health: self.health.clone(),
            };
            match term::run_term(term, &shutdown).await {
                TermEnd::SteppedDown => {
                    session
                        .step_down(
                            epoch,
                            &lock_name,
                            "stepped_down",
                            self.settings.shutdown_grace,
                        )
                        .await;
                    if let Err(error) = self
                        .instance
                        .registration()
                        .withdraw(session.client())
                        .await
                    {
                        tracing::debug!(error = %describe_pg_error(&error), "could not withdraw the candidate");
                    }
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
