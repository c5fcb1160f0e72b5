//! Client for Steward's Postgres job queue, used by producers, workers, tests and benchmarks.
//!
//! Every call that moves a claimed run forward ([`Queue::heartbeat`], [`Queue::complete`],
//! [`Queue::fail`], [`Queue::snooze`], [`Queue::wait_for_callback`]) is guarded by the run's
//! [`Lease`]: once a run has been rescued, cancelled or claimed again, the old worker gets
//! [`QueueError::LeaseLost`] and changes nothing.

pub mod admin;
mod job;
pub mod sql;

pub use job::{ClaimedJob, Job, JobState, Lease, NewJob, ParseStateError};

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use std::time::Duration;
use steward_connection::SchemaName;
use tokio_postgres::types::Type;
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("job {job_id} (run {run_lease}) no longer holds its lease: it was rescued, cancelled or finished elsewhere")]
    LeaseLost { job_id: i64, run_lease: i64 },
    #[error("callback {0} is not pending: it was already resolved, timed out or cancelled")]
    CallbackNotPending(Uuid),
    #[error("invalid job: {0}")]
    Invalid(String),
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
}

pub type Result<T, E = QueueError> = std::result::Result<T, E>;

/// Exponential retry backoff: `base * 2^(attempt-1)`, capped at `max`, then spread by
/// `+/- jitter` (a fraction). Computed in the database (`retry_backoff`) so that the client
/// and the rescue branches share one definition.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetryPolicy {
    pub base: Duration,
    pub max: Duration,
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            base: Duration::from_secs(1),
            max: Duration::from_secs(3600),
            jitter: 0.1,
        }
    }
}

impl RetryPolicy {
    /// The parameters as `retry_backoff(attempt, base_ms, max_ms, jitter)` takes them.
    pub fn sql_params(&self) -> (f64, f64, f64) {
        (
            self.base.as_secs_f64() * 1000.0,
            self.max.as_secs_f64() * 1000.0,
            self.jitter.clamp(0.0, 1.0),
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// A new job with this id.
    New(i64),
    /// A job with the same unique key was already pending; this is its id.
    Duplicate(i64),
}

impl Enqueued {
    pub fn id(self) -> i64 {
        match self {
            Enqueued::New(id) | Enqueued::Duplicate(id) => id,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FailOutcome {
    /// The job will run again at this time.
    Retrying { run_at: DateTime<Utc> },
    /// Attempts are exhausted (or the error was permanent): the job is failed.
    Failed,
}

/// One failed attempt for [`Queue::fail_many`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub lease: Lease,
    pub error: String,
    /// Recorded in the errors entry: `error`, `panic`, `timeout`...
    pub reason: &'static str,
    /// Fail at once instead of retrying.
    pub permanent: bool,
}

/// What one heartbeat statement found, lease by lease.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeartbeatReport {
    pub renewed: Vec<Lease>,
    /// Still held, but another transaction held the row (its completion, a rescuer deciding):
    /// not renewed this time, to be tried again.
    pub busy: Vec<Lease>,
    /// Parked on a callback under this lease by its own handler, whose park committed before
    /// the worker heard back: no longer heartbeated, and not lost either.
    pub parked: Vec<Lease>,
    /// Rescued, cancelled, finished or claimed again: the run is no longer this lease's.
    pub lost: Vec<Lease>,
}

/// Renews the heartbeats of `leases` in one statement ([`sql::HEARTBEAT_MANY`]) on `client`,
/// which may be a dedicated session (a worker's heartbeats never wait for its pool). It never
/// waits for a row lock.
pub async fn heartbeat_leases(
    client: &tokio_postgres::Client,
    leases: &[Lease],
) -> Result<HeartbeatReport> {
    let (ids, runs) = split(leases);
    let mut report = HeartbeatReport::default();
    // Typed parameters: parse, bind and execute in one round trip, on any session.
    let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 2] =
        [(&ids, Type::INT8_ARRAY), (&runs, Type::INT8_ARRAY)];
    for row in client.query_typed(sql::HEARTBEAT_MANY, &params).await? {
        let lease = Lease::from_row(&row);
        let held = row
            .get::<_, Option<&str>>(3)
            .and_then(|state| state.parse::<JobState>().ok());
        match (row.get::<_, bool>(2), held) {
            (true, _) => report.renewed.push(lease),
            (false, Some(JobState::Running)) => report.busy.push(lease),
            (false, Some(JobState::WaitingExternal)) => report.parked.push(lease),
            (false, _) => report.lost.push(lease),
        }
    }
    Ok(report)
}

/// Job ids and run leases as the parallel arrays the batch statements take.
fn split<'a>(leases: impl IntoIterator<Item = &'a Lease>) -> (Vec<i64>, Vec<i64>) {
    leases.into_iter().map(|l| (l.job_id, l.run_lease)).unzip()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    Complete,
    Fail(String),
}

/// The queue, over a pool whose connections are pinned to the Steward schema
/// (see [`steward_connection::Target::pool`]).
#[derive(Clone)]
pub struct Queue {
    pool: Pool,
    retry: RetryPolicy,
}

/// The NOTIFY channel on which `wake_workers` tells workers that jobs of a queue (the payload)
/// became available.
pub fn available_channel(schema: &SchemaName) -> String {
    format!("{schema}_available")
}

/// The NOTIFY channel that wakes the promoter of `schema`, where the promoter LISTENs. Producers
/// do not name it: the schema's `wake_promoter` function sends on it (migration V8), and a test
/// holds the two spellings together.
pub fn due_channel(schema: &SchemaName) -> String {
    format!("{schema}_due")
}

impl Queue {
    /// A queue over `pool`, whose sessions must be pinned to the queue's schema
    /// ([`steward_connection::Target::pool`]).
    pub fn new(pool: Pool) -> Self {
        Self {
            pool,
            retry: RetryPolicy::default(),
        }
    }

    pub fn with_retry_policy(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub async fn enqueue(&self, job: &NewJob) -> Result<Enqueued> {
        job.validate()?;
        let client = self.pool.get().await?;
        let insert = client.prepare_cached(sql::ENQUEUE).await?;
        let run_at = job.run_at.unwrap_or_else(Utc::now);
        let timeout_ms = job.run_timeout.map(|d| d.as_millis() as i64);
        // A unique job may finish and release its key between our conflict and our lookup:
        // try again a few times before calling it a conflict we cannot place.
        for _ in 0..3 {
            let inserted = client
                .query_opt(
                    &insert,
                    &[
                        &job.queue,
                        &job.kind,
                        &job.args,
                        &job.priority,
                        &job.max_attempts,
                        &run_at,
                        &timeout_ms,
                        &job.unique_key,
                    ],
                )
                .await?;
            if let Some(row) = inserted {
                return Ok(Enqueued::New(row.get(0)));
            }
            let existing = client
                .query_opt(sql::FIND_UNIQUE, &[&job.unique_key])
                .await?;
            if let Some(row) = existing {
                return Ok(Enqueued::Duplicate(row.get(0)));
            }
        }
        Err(QueueError::Invalid(format!(
            "unique key {:?} kept changing hands while enqueuing",
            job.unique_key
        )))
    }

    /// Enqueues many jobs in one statement; jobs whose unique key is taken are skipped.
    /// Returns the ids of the new jobs, ascending.
    pub async fn enqueue_batch(&self, jobs: &[NewJob]) -> Result<Vec<i64>> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let now = Utc::now();
        let mut queues = Vec::with_capacity(jobs.len());
        let mut kinds = Vec::with_capacity(jobs.len());
        let mut args = Vec::with_capacity(jobs.len());
        let mut priorities = Vec::with_capacity(jobs.len());
        let mut max_attempts = Vec::with_capacity(jobs.len());
        let mut run_ats = Vec::with_capacity(jobs.len());
        let mut timeouts = Vec::with_capacity(jobs.len());
        let mut unique_keys = Vec::with_capacity(jobs.len());
        for job in jobs {
            job.validate()?;
            queues.push(job.queue.as_str());
            kinds.push(job.kind.as_str());
            args.push(&job.args);
            priorities.push(job.priority);
            max_attempts.push(job.max_attempts);
            run_ats.push(job.run_at.unwrap_or(now));
            timeouts.push(job.run_timeout.map(|d| d.as_millis() as i64));
            unique_keys.push(job.unique_key.as_deref());
        }
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(sql::ENQUEUE_BATCH).await?;
        let rows = client
            .query(
                &statement,
                &[
                    &queues,
                    &kinds,
                    &args,
                    &priorities,
                    &max_attempts,
                    &run_ats,
                    &timeouts,
                    &unique_keys,
                ],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Claims up to `limit` available jobs of `queue`: each becomes running with a new lease.
    pub async fn claim(&self, queue: &str, limit: i64) -> Result<Vec<ClaimedJob>> {
        self.claim_kinds(queue, None, limit).await
    }

    /// [`Self::claim`], only jobs of `kinds` when given.
    pub async fn claim_kinds(
        &self,
        queue: &str,
        kinds: Option<&[String]>,
        limit: i64,
    ) -> Result<Vec<ClaimedJob>> {
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(sql::CLAIM).await?;
        let rows = client.query(&statement, &[&queue, &limit, &kinds]).await?;
        Ok(rows.iter().map(ClaimedJob::from_row).collect())
    }

    pub async fn heartbeat(&self, lease: Lease) -> Result<()> {
        self.guarded(sql::HEARTBEAT, lease).await
    }

    /// Heartbeats many runs in one statement (see [`heartbeat_leases`]); returns the leases
    /// that were lost.
    pub async fn heartbeat_many(&self, leases: &[Lease]) -> Result<Vec<Lease>> {
        let client = self.pool.get().await?;
        Ok(heartbeat_leases(&client, leases).await?.lost)
    }

    /// Completes many runs in one statement, each guarded by its lease; returns the leases
    /// completed (the others had been lost).
    pub async fn complete_many(&self, leases: &[Lease]) -> Result<Vec<Lease>> {
        let (ids, runs) = split(leases);
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(sql::COMPLETE_MANY).await?;
        let rows = client.query(&statement, &[&ids, &runs]).await?;
        Ok(rows.iter().map(Lease::from_row).collect())
    }

    /// Records many failed attempts in one statement (each as [`Self::fail`] or
    /// [`Self::fail_permanently`] would); returns the outcome of each run still held.
    pub async fn fail_many(&self, failures: &[Failure]) -> Result<Vec<(Lease, FailOutcome)>> {
        let (ids, runs) = split(failures.iter().map(|f| &f.lease));
        let errors: Vec<&str> = failures.iter().map(|f| f.error.as_str()).collect();
        let reasons: Vec<&str> = failures.iter().map(|f| f.reason).collect();
        let permanent: Vec<bool> = failures.iter().map(|f| f.permanent).collect();
        let (base, max, jitter) = self.retry.sql_params();
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(sql::FAIL_MANY).await?;
        let rows = client
            .query(
                &statement,
                &[
                    &ids, &runs, &errors, &reasons, &permanent, &base, &max, &jitter,
                ],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| {
                let outcome = if row.get::<_, &str>(2) == "failed" {
                    FailOutcome::Failed
                } else {
                    FailOutcome::Retrying { run_at: row.get(3) }
                };
                (Lease::from_row(row), outcome)
            })
            .collect())
    }

    /// Hands runs back without using up an attempt (a worker shutting down): they are
    /// available again at once. Returns the leases released (the others had been lost).
    pub async fn release_many(&self, leases: &[Lease], why: &str) -> Result<Vec<Lease>> {
        let (ids, runs) = split(leases);
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(sql::RELEASE_MANY).await?;
        let rows = client.query(&statement, &[&ids, &runs, &why]).await?;
        Ok(rows.iter().map(Lease::from_row).collect())
    }

    /// The staleness at which the leader rescues a run whose heartbeat stopped, as published
    /// when its term started; `None` before any term, or when that rescue is disabled.
    pub async fn published_staleness(&self) -> Result<Option<Duration>> {
        let client = self.pool.get().await?;
        let secs: Option<f64> = client
            .query_one(sql::PUBLISHED_STALENESS, &[])
            .await?
            .get(0);
        Ok(secs.and_then(|s| Duration::try_from_secs_f64(s).ok()))
    }

    pub async fn complete(&self, lease: Lease) -> Result<()> {
        self.guarded(sql::COMPLETE, lease).await
    }

    /// Records a failed attempt: the job retries with backoff while attempts remain.
    pub async fn fail(&self, lease: Lease, error: &str) -> Result<FailOutcome> {
        self.fail_inner(lease, error, false).await
    }

    /// Records a failure that retrying cannot fix: the job is failed at once.
    pub async fn fail_permanently(&self, lease: Lease, error: &str) -> Result<FailOutcome> {
        self.fail_inner(lease, error, true).await
    }

    async fn fail_inner(&self, lease: Lease, error: &str, permanent: bool) -> Result<FailOutcome> {
        let (base, max, jitter) = self.retry.sql_params();
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(sql::FAIL).await?;
        let row = client
            .query_opt(
                &statement,
                &[
                    &lease.job_id,
                    &lease.run_lease,
                    &base,
                    &max,
                    &jitter,
                    &error,
                    &permanent,
                ],
            )
            .await?
            .ok_or(lease.lost())?;
        let state: String = row.get(0);
        Ok(if state == "failed" {
            FailOutcome::Failed
        } else {
            FailOutcome::Retrying { run_at: row.get(1) }
        })
    }

    /// Puts the run back to scheduled, due after `delay`, without using up an attempt.
    pub async fn snooze(&self, lease: Lease, delay: Duration) -> Result<DateTime<Utc>> {
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(sql::SNOOZE).await?;
        let delay_ms = delay.as_secs_f64() * 1000.0;
        let row = client
            .query_opt(&statement, &[&lease.job_id, &lease.run_lease, &delay_ms])
            .await?
            .ok_or(lease.lost())?;
        Ok(row.get(0))
    }

    /// Parks the run until [`Queue::resolve_callback`] is called with the returned id, or
    /// `timeout` passes (then `rescue_expired_callbacks` retries or fails it).
    pub async fn wait_for_callback(&self, lease: Lease, timeout: Duration) -> Result<Uuid> {
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(sql::WAIT_FOR_CALLBACK).await?;
        let timeout_ms = timeout.as_secs_f64() * 1000.0;
        let row = client
            .query_opt(&statement, &[&lease.job_id, &lease.run_lease, &timeout_ms])
            .await?
            .ok_or(lease.lost())?;
        Ok(row.get(0))
    }

    /// Resolves a pending callback. Exactly one of this and the timeout rescue takes effect;
    /// the loser sees [`QueueError::CallbackNotPending`] (or changes nothing).
    pub async fn resolve_callback(&self, callback_id: Uuid, resolution: Resolution) -> Result<i64> {
        let client = self.pool.get().await?;
        let row = match resolution {
            Resolution::Complete => {
                let statement = client
                    .prepare_cached(sql::RESOLVE_CALLBACK_COMPLETE)
                    .await?;
                client.query_opt(&statement, &[&callback_id]).await?
            }
            Resolution::Fail(error) => {
                let (base, max, jitter) = self.retry.sql_params();
                let statement = client.prepare_cached(sql::RESOLVE_CALLBACK_FAIL).await?;
                client
                    .query_opt(&statement, &[&callback_id, &base, &max, &jitter, &error])
                    .await?
            }
        };
        row.map(|r| r.get(0))
            .ok_or(QueueError::CallbackNotPending(callback_id))
    }

    /// Cancels a job that has not finished; returns false when it had already finished.
    /// A running job's worker then loses its lease.
    pub async fn cancel(&self, job_id: i64) -> Result<bool> {
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(sql::CANCEL).await?;
        Ok(client.execute(&statement, &[&job_id]).await? == 1)
    }

    pub async fn get(&self, job_id: i64) -> Result<Option<Job>> {
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(sql::GET).await?;
        client
            .query_opt(&statement, &[&job_id])
            .await?
            .map(|row| Job::from_row(&row))
            .transpose()
    }

    async fn guarded(&self, statement: &str, lease: Lease) -> Result<()> {
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(statement).await?;
        match client
            .execute(&statement, &[&lease.job_id, &lease.run_lease])
            .await?
        {
            1 => Ok(()),
            _ => Err(lease.lost()),
        }
    }
}
