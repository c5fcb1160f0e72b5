//! What a handler is given and what it returns.

use futures_util::future::BoxFuture;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use steward_queue::{ClaimedJob, Lease, Queue, QueueError};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A handler's error: the attempt failed and the job retries with backoff (or fails once its
/// attempts are used up). `?` converts most errors into it.
pub type JobError = Box<dyn std::error::Error + Send + Sync>;

/// How a run ended, when the handler did not fail it with an error.
#[derive(Debug, Clone, PartialEq)]
pub enum Done {
    /// The job is completed.
    Complete,
    /// The job failed in a way retrying cannot fix: failed at once, whatever attempts remain.
    Fail(String),
    /// Run again after this long, without using up an attempt.
    Snooze(Duration),
    /// The handler parked the run with [`JobContext::await_callback`]; a callback resolves it.
    Parked,
}

/// What a running job can do besides its work.
#[derive(Clone)]
pub struct JobContext {
    pub(crate) lease: Lease,
    pub(crate) cancel: CancellationToken,
    pub(crate) queue: Queue,
    pub(crate) parked: Arc<std::sync::atomic::AtomicBool>,
    /// Set when a test crashes the run (fault injection): nothing is written for it.
    pub(crate) crashed: Arc<std::sync::atomic::AtomicBool>,
}

impl JobContext {
    pub fn lease(&self) -> Lease {
        self.lease
    }

    /// Cancelled when the run must stop: its lease was lost (rescued, cancelled, claimed
    /// again), its deadline passed, the worker lost contact with the database for longer than
    /// the staleness, or shutdown's grace period ran out. The worker then drops the handler's
    /// future; a handler that blocks outside `.await` points can check this token.
    pub fn cancellation(&self) -> &CancellationToken {
        &self.cancel
    }

    /// The queue, for enqueueing follow-up jobs.
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// Parks the run until an external callback resolves it or `timeout` passes; returns the
    /// callback id to hand to the party that will answer. Return [`Done::Parked`] afterwards:
    /// the run is no longer this worker's, so its heartbeats stop.
    pub async fn await_callback(&self, timeout: Duration) -> Result<Uuid, QueueError> {
        let id = self.queue.wait_for_callback(self.lease, timeout).await?;
        self.parked.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(id)
    }
}

#[cfg(feature = "fault-injection")]
impl JobContext {
    /// Fault injection for tests: the run is dropped as a crashed process would drop it. Its
    /// heartbeats stop, nothing is written whatever the handler returns, and the handler is
    /// cancelled; the leader rescues the run after the staleness.
    pub fn crash(&self) {
        self.crashed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.cancel.cancel();
    }
}

/// A registered handler: an async function of the job and its context.
pub(crate) trait Handler: Send + Sync + 'static {
    fn call(&self, job: ClaimedJob, ctx: JobContext) -> BoxFuture<'static, Result<Done, JobError>>;
}

impl<F, Fut> Handler for F
where
    F: Fn(ClaimedJob, JobContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Done, JobError>> + Send + 'static,
{
    fn call(&self, job: ClaimedJob, ctx: JobContext) -> BoxFuture<'static, Result<Done, JobError>> {
        Box::pin(self(job, ctx))
    }
}
