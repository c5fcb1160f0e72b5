//! This process as a candidate: its instance name and host, and the sessions it opens. Every
//! session is named `steward:<instance>:<role>` (its `application_name`), which is how a
//! standby finds and ends the sessions of a wedged leader.

use crate::settings::LeaderSettings;
use steward_connection::Target;

pub(crate) struct Instance {
    name: String,
    host: String,
    /// The queue's target with this instance's liveness settings.
    sessions: Target,
    /// The same, for sessions that run branch transactions.
    work_sessions: Target,
}

impl Instance {
    pub fn new(target: &Target, settings: &LeaderSettings) -> Self {
        let host = hostname();
        let name = format!(
            "{}-{}-{:04x}",
            host.chars().take(24).collect::<String>(),
            std::process::id(),
            rand::random::<u16>()
        );
        let sessions = target.with_liveness(&settings.liveness());
        // A paused leader cannot hold a transaction (and with it the next term's start) open
        // for longer than this.
        let work_sessions = sessions.with_setting(
            "idle_in_transaction_session_timeout",
            format!("{}ms", settings.idle_in_transaction_timeout.as_millis()),
        );
        Self {
            name,
            host,
            sessions,
            work_sessions,
        }
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

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".to_owned())
}
