//! The leader's settings: how branches are spread over loops, and how leadership is kept,
//! checked and handed over.

use serde::Deserialize;
use std::time::Duration;
use steward_branches::InvalidConfig;
use steward_connection::Liveness;

/// How the branches are spread over tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoopMode {
    /// Each class of branches on a loop of its own, and a loop for each branch that needs
    /// one, so that no hygiene pass delays an SLO branch (see [`crate::LoopPlan`]).
    #[default]
    Split,
    /// Every branch on one loop, the classic single maintenance loop.
    Monolithic,
}

impl LoopMode {
    pub fn as_str(self) -> &'static str {
        match self {
            LoopMode::Split => "split",
            LoopMode::Monolithic => "monolithic",
        }
    }
}

impl std::str::FromStr for LoopMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "split" => Ok(LoopMode::Split),
            "monolithic" => Ok(LoopMode::Monolithic),
            other => Err(format!(
                "unknown loop mode {other:?}: use split or monolithic"
            )),
        }
    }
}

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
    /// How often the leader measures the SLO branches' backlogs (what users wait for).
    #[serde(with = "humantime_serde")]
    pub backlog_interval: Duration,
    /// On shutdown, how long a running statement may finish before it is cancelled.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// A candidate that the server keeps refusing for a reason retrying cannot fix (the
    /// database or role does not exist, the password is wrong) stops with an error after this
    /// long; an unreachable server is retried for ever.
    #[serde(with = "humantime_serde")]
    pub give_up_after: Duration,
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
            backlog_interval: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(5),
            give_up_after: Duration::from_secs(60),
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
    /// Keepalives and checks for every session of this instance.
    pub fn liveness(&self) -> Liveness {
        Liveness {
            keepalive_idle: self.keepalive_idle,
            keepalive_interval: self.keepalive_interval,
            keepalive_retries: self.keepalive_retries,
            connection_check_interval: self.connection_check_interval,
        }
    }

    pub fn validate(&self) -> Vec<InvalidConfig> {
        let mut problems = Vec::new();
        let positive = [
            ("probe_interval", self.probe_interval),
            ("probe_timeout", self.probe_timeout),
            ("stall_threshold", self.stall_threshold),
            ("wedge_timeout", self.wedge_timeout),
            ("wedge_check_interval", self.wedge_check_interval),
            ("progress_interval", self.progress_interval),
            ("backlog_interval", self.backlog_interval),
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

/// How a process that maintains many queues shares them with the rest of its fleet and runs
/// them (ADR 0003). The `[fleet]` section of the configuration file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FleetSettings {
    /// How often each fleet session reads who leads what and tries the locks the share rule
    /// names. Bounds the takeover after a crash.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Sessions per database shared by the promoter and rescues of every queue led there.
    pub slo_sessions: usize,
    /// Sessions per database shared by the hygiene of every queue led there.
    pub hygiene_sessions: usize,
    /// Maintain every schema of the database that holds Steward's tables, checked again every
    /// `discover_interval`.
    pub discover: bool,
    #[serde(with = "humantime_serde")]
    pub discover_interval: Duration,
}

impl Default for FleetSettings {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_millis(250),
            slo_sessions: 4,
            hygiene_sessions: 2,
            discover: false,
            discover_interval: Duration::from_secs(60),
        }
    }
}

impl FleetSettings {
    pub fn validate(&self) -> Vec<InvalidConfig> {
        let mut problems = Vec::new();
        for (key, value) in [
            ("poll_interval", self.poll_interval),
            ("discover_interval", self.discover_interval),
        ] {
            if value.is_zero() {
                problems.push(InvalidConfig::new(
                    format!("fleet.{key}"),
                    value,
                    "must be positive",
                ));
            }
        }
        for (key, value) in [
            ("slo_sessions", self.slo_sessions),
            ("hygiene_sessions", self.hygiene_sessions),
        ] {
            if value == 0 {
                problems.push(InvalidConfig::new(
                    format!("fleet.{key}"),
                    value,
                    "must be at least 1",
                ));
            }
        }
        problems
    }
}
