use crate::{QueueError, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;
use tokio_postgres::Row;
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Scheduled,
    Available,
    Running,
    WaitingExternal,
    Retryable,
    Completed,
    Failed,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 8] = [
        JobState::Scheduled,
        JobState::Available,
        JobState::Running,
        JobState::WaitingExternal,
        JobState::Retryable,
        JobState::Completed,
        JobState::Failed,
        JobState::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Scheduled => "scheduled",
            JobState::Available => "available",
            JobState::Running => "running",
            JobState::WaitingExternal => "waiting_external",
            JobState::Retryable => "retryable",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Completed | JobState::Failed | JobState::Cancelled
        )
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown job state {0:?}")]
pub struct ParseStateError(pub String);

impl FromStr for JobState {
    type Err = ParseStateError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| ParseStateError(s.to_owned()))
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A job to enqueue. Defaults: queue `default`, priority 2, 25 attempts, due now, no deadline.
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    pub queue: String,
    pub kind: String,
    pub args: serde_json::Value,
    /// 1 (highest) to 4.
    pub priority: i16,
    pub max_attempts: i32,
    /// Due time; `None` (or a time in the past) makes the job available at once.
    pub run_at: Option<DateTime<Utc>>,
    /// Time limit for each run: deadline_at = claim time + run_timeout.
    pub run_timeout: Option<Duration>,
    pub unique_key: Option<String>,
}

impl NewJob {
    pub fn new(kind: impl Into<String>) -> Self {
        Self {
            queue: "default".to_owned(),
            kind: kind.into(),
            args: serde_json::Value::Object(Default::default()),
            priority: 2,
            max_attempts: 25,
            run_at: None,
            run_timeout: None,
            unique_key: None,
        }
    }

    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = queue.into();
        self
    }

    pub fn args(mut self, args: serde_json::Value) -> Self {
        self.args = args;
        self
    }

    pub fn priority(mut self, priority: i16) -> Self {
        self.priority = priority;
        self
    }

    pub fn max_attempts(mut self, max_attempts: i32) -> Self {
        self.max_attempts = max_attempts;
        self
    }

    pub fn run_at(mut self, run_at: DateTime<Utc>) -> Self {
        self.run_at = Some(run_at);
        self
    }

    pub fn run_in(self, delay: Duration) -> Self {
        let delay = chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX);
        self.run_at(Utc::now() + delay)
    }

    pub fn run_timeout(mut self, timeout: Duration) -> Self {
        self.run_timeout = Some(timeout);
        self
    }

    pub fn unique_key(mut self, key: impl Into<String>) -> Self {
        self.unique_key = Some(key.into());
        self
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let invalid = |msg: String| Err(QueueError::Invalid(msg));
        if self.queue.is_empty() {
            return invalid("queue must not be empty".into());
        }
        if self.kind.is_empty() {
            return invalid("kind must not be empty".into());
        }
        if !(1..=4).contains(&self.priority) {
            return invalid(format!("priority {} is outside 1..=4", self.priority));
        }
        if self.max_attempts < 1 {
            return invalid(format!(
                "max_attempts {} must be at least 1",
                self.max_attempts
            ));
        }
        if self.run_timeout.is_some_and(|t| t.is_zero()) {
            return invalid("run_timeout must be positive".into());
        }
        Ok(())
    }
}

/// The right to move one run of a job forward. `run_lease` changes on every claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Lease {
    pub job_id: i64,
    pub run_lease: i64,
}

impl Lease {
    /// From the first two columns (job id, run lease) of a row.
    pub(crate) fn from_row(row: &Row) -> Self {
        Self {
            job_id: row.get(0),
            run_lease: row.get(1),
        }
    }

    pub(crate) fn lost(self) -> QueueError {
        QueueError::LeaseLost {
            job_id: self.job_id,
            run_lease: self.run_lease,
        }
    }
}

/// A job as a worker receives it from [`crate::Queue::claim`].
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimedJob {
    pub lease: Lease,
    pub queue: String,
    pub kind: String,
    pub args: serde_json::Value,
    pub priority: i16,
    pub attempt: i32,
    pub max_attempts: i32,
    pub run_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub deadline_at: Option<DateTime<Utc>>,
    pub errors: serde_json::Value,
}

impl ClaimedJob {
    pub(crate) fn from_row(row: &Row) -> Self {
        Self {
            lease: Lease {
                job_id: row.get("id"),
                run_lease: row.get("run_lease"),
            },
            queue: row.get("queue"),
            kind: row.get("kind"),
            args: row.get("args"),
            priority: row.get("priority"),
            attempt: row.get("attempt"),
            max_attempts: row.get("max_attempts"),
            run_at: row.get("run_at"),
            created_at: row.get("created_at"),
            deadline_at: row.get("deadline_at"),
            errors: row.get("errors"),
        }
    }
}

/// A job row as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Job {
    pub id: i64,
    pub queue: String,
    pub kind: String,
    pub args: serde_json::Value,
    pub state: JobState,
    pub priority: i16,
    pub original_priority: i16,
    pub attempt: i32,
    pub max_attempts: i32,
    pub run_lease: i64,
    pub run_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub attempted_at: Option<DateTime<Utc>>,
    pub heartbeat_at: Option<DateTime<Utc>>,
    pub deadline_at: Option<DateTime<Utc>>,
    pub callback_id: Option<Uuid>,
    pub callback_timeout_at: Option<DateTime<Utc>>,
    pub finalized_at: Option<DateTime<Utc>>,
    pub unique_key: Option<String>,
    pub errors: serde_json::Value,
}

impl Job {
    pub(crate) fn from_row(row: &Row) -> Result<Self> {
        let state: String = row.get("state");
        Ok(Self {
            id: row.get("id"),
            queue: row.get("queue"),
            kind: row.get("kind"),
            args: row.get("args"),
            state: state
                .parse()
                .map_err(|e: ParseStateError| QueueError::Invalid(e.to_string()))?,
            priority: row.get("priority"),
            original_priority: row.get("original_priority"),
            attempt: row.get("attempt"),
            max_attempts: row.get("max_attempts"),
            run_lease: row.get("run_lease"),
            run_at: row.get("run_at"),
            created_at: row.get("created_at"),
            attempted_at: row.get("attempted_at"),
            heartbeat_at: row.get("heartbeat_at"),
            deadline_at: row.get("deadline_at"),
            callback_id: row.get("callback_id"),
            callback_timeout_at: row.get("callback_timeout_at"),
            finalized_at: row.get("finalized_at"),
            unique_key: row.get("unique_key"),
            errors: row.get("errors"),
        })
    }

    /// The error entries appended per failed attempt or rescue.
    pub fn error_entries(&self) -> &[serde_json::Value] {
        self.errors
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
    }
}
