//! An in-process leader: a real [`Candidate`] (the library is the product, embedded) on its own
//! Tokio runtime and OS threads, so that the bench's producers and workers cannot delay its
//! timers, as if it were a separate process.

use crate::recorder::Recorder;
use anyhow::{anyhow, bail, Context};
use std::sync::Arc;
use std::time::{Duration, Instant};
use steward_branches::Branch;
use steward_connection::{SchemaName, Target};
use steward_leader::{Candidate, LeaderSettings};
use tokio_util::sync::CancellationToken;

pub struct Leader {
    shutdown: CancellationToken,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
    recorder: Arc<Recorder>,
}

impl Leader {
    /// Starts the candidate and waits until it leads.
    pub async fn start(
        url: &str,
        schema: &SchemaName,
        settings: LeaderSettings,
        branches: Vec<Arc<dyn Branch>>,
        recorder: Arc<Recorder>,
    ) -> anyhow::Result<Leader> {
        let target = Target::new(url, schema.clone())?;
        let candidate = Candidate::new(target, settings, branches)?.with_observer(recorder.clone());
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let thread = std::thread::Builder::new()
            .name("bench-leader".into())
            .spawn(move || -> anyhow::Result<()> {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("leader-rt")
                    .enable_all()
                    .build()
                    .context("building the leader's runtime")?;
                runtime.block_on(async move {
                    candidate.check().await?;
                    candidate.run(token).await?;
                    anyhow::Ok(())
                })
            })
            .context("spawning the leader thread")?;
        let mut leader = Leader {
            shutdown,
            thread: Some(thread),
            recorder,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while leader.recorder.leading_epoch() == 0 {
            if leader.thread.as_ref().is_some_and(|t| t.is_finished()) {
                return Err(leader
                    .join()
                    .err()
                    .unwrap_or_else(|| anyhow!("the leader stopped before it was elected")));
            }
            if Instant::now() > deadline {
                leader.stop().await.ok();
                bail!("the in-process leader was not elected within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(leader)
    }

    /// Steps down and waits for the candidate to return.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        let thread = self.thread.take();
        tokio::task::spawn_blocking(move || match thread {
            Some(t) => t
                .join()
                .map_err(|_| anyhow!("the leader thread panicked"))?,
            None => Ok(()),
        })
        .await
        .context("joining the leader thread")?
    }

    fn join(&mut self) -> Result<(), anyhow::Error> {
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| anyhow!("the leader thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        // A leader dropped without stop() (an error path): make its runtime wind down.
        self.shutdown.cancel();
    }
}
