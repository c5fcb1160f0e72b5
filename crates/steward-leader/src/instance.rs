//! This process as a candidate: its instance name and host, and the sessions it opens. Every
//! session is named `steward:<instance>:<role>` (its `application_name`), which is how a
//! standby finds and ends the sessions of a wedged leader.

use crate::settings::LeaderSettings;
use steward_connection::Target;
use tokio_postgres::Client;

/// Records (or refreshes) a candidate. Primary key of `candidates`.
pub const REGISTER: &str = "
INSERT INTO candidates (instance, host, pid, version, loop_mode, config_digest)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (instance) DO UPDATE SET last_seen = now()";

/// Forgets candidates not seen for an hour (a process that died). A small table, scanned.
pub const FORGET_GONE: &str = "
DELETE FROM candidates WHERE last_seen < now() - interval '1 hour'";

/// A candidate that stops cleanly withdraws. Primary key.
pub const WITHDRAW: &str = "DELETE FROM candidates WHERE instance = $1";

/// How a candidate appears in `candidates`.
#[derive(Debug, Clone)]
pub(crate) struct Registration {
    pub instance: String,
    pub host: String,
    pub version: String,
    pub loop_mode: &'static str,
    pub config_digest: String,
}

impl Registration {
    /// Records the candidate, or refreshes its last_seen.
    pub async fn refresh(
        &self,
        client: &impl tokio_postgres::GenericClient,
    ) -> Result<(), tokio_postgres::Error> {
        let pid = std::process::id() as i32;
        client
            .execute(
                REGISTER,
                &[
                    &self.instance,
                    &self.host,
                    &pid,
                    &self.version,
                    &self.loop_mode,
                    &self.config_digest,
                ],
            )
            .await
            .map(|_| ())
    }

    pub async fn withdraw(&self, client: &Client) -> Result<(), tokio_postgres::Error> {
        client
            .execute(WITHDRAW, &[&self.instance])
            .await
            .map(|_| ())
    }
}

pub(crate) struct Instance {
    name: String,
    host: String,
    registration: Registration,
    /// The queue's target with this instance's liveness settings.
    sessions: Target,
    /// The same, for sessions that run branch transactions.
    work_sessions: Target,
}

impl Instance {
    pub fn new(target: &Target, settings: &LeaderSettings) -> Self {
        Self::named(new_name(), target, settings)
    }

    /// This process as a candidate in the database of `target`, under a name it already has
    /// (a fleet process is one instance in every database it serves).
    pub fn named(name: String, target: &Target, settings: &LeaderSettings) -> Self {
        let host = hostname();
        // A DBA's role- or database-level timeouts must not end Steward's sessions: the lock
        // session is idle for most of a term and waits for the lock without limit, and every
        // pass is bounded by Steward's own timeouts.
        let sessions = target
            .with_liveness(&settings.liveness())
            .with_setting("idle_session_timeout", 0)
            .with_setting("idle_in_transaction_session_timeout", 0)
            .with_setting("statement_timeout", 0)
            .with_setting("lock_timeout", 0);
        // A paused leader cannot hold a transaction (and with it the next term's start) open
        // for longer than this.
        let work_sessions = sessions.with_setting(
            "idle_in_transaction_session_timeout",
            format!("{}ms", settings.idle_in_transaction_timeout.as_millis()),
        );
        Self {
            registration: Registration {
                instance: name.clone(),
                host: host.clone(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                loop_mode: settings.loop_mode.as_str(),
                config_digest: String::new(),
            },
            name,
            host,
            sessions,
            work_sessions,
        }
    }

    pub fn registration(&self) -> &Registration {
        &self.registration
    }

    /// The digest of the configuration this candidate runs with, as `candidates` shows it.
    pub fn set_config_digest(&mut self, digest: String) {
        self.registration.config_digest = digest;
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    /// A session for `role` that runs no branch transactions (the leader session, the wedge
    /// watch).
    pub fn session(&self, role: &str) -> Target {
        self.sessions.named(&self.application_name(role))
    }

    /// A session for `role` that runs branch transactions (a loop, the health writer).
    pub fn work_session(&self, role: &str) -> Target {
        self.work_sessions.named(&self.application_name(role))
    }

    fn application_name(&self, role: &str) -> String {
        format!("steward:{}:{role}", self.name)
    }
}

/// A new instance name: host, pid and a random suffix.
pub(crate) fn new_name() -> String {
    format!(
        "{}-{}-{:04x}",
        hostname().chars().take(24).collect::<String>(),
        std::process::id(),
        rand::random::<u16>()
    )
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".to_owned())
}
