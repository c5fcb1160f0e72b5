//! Ownership writes that finish a run. Each `complete` or `fail` returns only once its own row
//! is durably written (or was refused because the lease was lost), but the completions and
//! failures that arrive while a flush is in flight share the next flush: one statement for all
//! completions and one for all failures, at most one flush in flight.

use crate::names;
use std::time::Duration;
use steward_queue::{FailOutcome, Failure, Lease, Queue, QueueError};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// The most runs one flush writes; the rest ride the next one.
const MAX_BATCH: usize = 1000;

/// How a write came out for one run.
#[derive(Debug)]
pub(crate) enum Written {
    Completed,
    Failed(FailOutcome),
    /// The lease was lost: the run was rescued, cancelled or claimed again, and nothing was
    /// changed.
    Refused,
}

enum Request {
    Complete(Lease, oneshot::Sender<Result<Written, String>>),
    Fail(Failure, oneshot::Sender<Result<Written, String>>),
}

/// Sends finishing writes to the writer task.
#[derive(Clone)]
pub(crate) struct Writer(mpsc::UnboundedSender<Request>);

impl Writer {
    /// Starts the writer task; it ends at `stop`, after writing what was asked before.
    /// `schema` is the worker's, the `schema` label of the flush metrics.
    pub fn start(
        queue: Queue,
        schema: String,
        stop: CancellationToken,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (sender, receiver) = mpsc::unbounded_channel();
        (
            Self(sender),
            tokio::spawn(run(queue, schema, receiver, stop)),
        )
    }

    pub async fn complete(&self, lease: Lease) -> Result<Written, String> {
        self.send(|reply| Request::Complete(lease, reply)).await
    }

    pub async fn fail(&self, failure: Failure) -> Result<Written, String> {
        self.send(|reply| Request::Fail(failure, reply)).await
    }

    async fn send(
        &self,
        request: impl FnOnce(oneshot::Sender<Result<Written, String>>) -> Request,
    ) -> Result<Written, String> {
        let (reply, answer) = oneshot::channel();
        self.0
            .send(request(reply))
            .map_err(|_| "the worker's writer has stopped".to_owned())?;
        answer
            .await
            .map_err(|_| "the worker's writer stopped before answering".to_owned())?
    }
}

async fn run(
    queue: Queue,
    schema: String,
    mut requests: mpsc::UnboundedReceiver<Request>,
    stop: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            biased;
            request = requests.recv() => match request {
                Some(request) => request,
                None => return,
            },
            _ = stop.cancelled() => match requests.try_recv() {
                Ok(request) => request,
                Err(_) => return,
            },
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match requests.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        let mut completes = Vec::new();
        let mut fails = Vec::new();
        for request in batch {
            match request {
                Request::Complete(lease, reply) => completes.push((lease, reply)),
                Request::Fail(failure, reply) => fails.push((failure, reply)),
            }
        }
        let started = std::time::Instant::now();
        let batch = completes.len() + fails.len();
        tokio::join!(complete(&queue, completes), fail(&queue, fails));
        metrics::histogram!(names::WRITE_FLUSH_DURATION, names::SCHEMA => schema.clone())
            .record(started.elapsed().as_secs_f64());
        metrics::histogram!(names::WRITE_FLUSH_RUNS, names::SCHEMA => schema.clone())
            .record(batch as f64);
    }
}

async fn complete(queue: &Queue, requests: Vec<(Lease, oneshot::Sender<Result<Written, String>>)>) {
    if requests.is_empty() {
        return;
    }
    let leases: Vec<Lease> = requests.iter().map(|(lease, _)| *lease).collect();
    match retrying(|| queue.complete_many(&leases)).await {
        Ok(done) => {
            for (lease, reply) in requests {
                let written = if done.contains(&lease) {
                    Written::Completed
                } else {
                    Written::Refused
                };
                let _ = reply.send(Ok(written));
            }
        }
        Err(error) => {
            for (_, reply) in requests {
                let _ = reply.send(Err(error.clone()));
            }
        }
    }
}

async fn fail(queue: &Queue, requests: Vec<(Failure, oneshot::Sender<Result<Written, String>>)>) {
    if requests.is_empty() {
        return;
    }
    let failures: Vec<Failure> = requests.iter().map(|(f, _)| f.clone()).collect();
    match retrying(|| queue.fail_many(&failures)).await {
        Ok(done) => {
            for (failure, reply) in requests {
                let written = done
                    .iter()
                    .find(|(lease, _)| *lease == failure.lease)
                    .map_or(Written::Refused, |(_, outcome)| Written::Failed(*outcome));
                let _ = reply.send(Ok(written));
            }
        }
        Err(error) => {
            for (_, reply) in requests {
                let _ = reply.send(Err(error.clone()));
            }
        }
    }
}

/// A write that failed for want of a connection is tried again a few times: the rows are still
/// the worker's, and giving up leaves them to the rescue.
async fn retrying<T, F, Fut>(write: F) -> Result<T, String>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, QueueError>>,
{
    let mut wait = Duration::from_millis(50);
    let mut tries = 0;
    loop {
        tries += 1;
        match write().await {
            Ok(done) => return Ok(done),
            Err(error) if tries < 5 => {
                tracing::warn!(%error, retry_in = ?wait, "finishing runs failed; retrying");
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
            Err(error) => return Err(error.to_string()),
        }
    }
}
