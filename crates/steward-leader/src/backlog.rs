//! What users wait for, measured by the leader on a cadence and a session of its own: the age
//! of each SLO branch's backlog (the oldest job due and not promoted, the oldest run that should
//! have been rescued and was not), read from the head of the branch's partial index. A branch
//! whose passes all time out, or a table locked against every statement, cannot stop it: when a
//! reading fails, the age goes on growing from the last head read.

use crate::observe::{BacklogReport, Observer};
use crate::work::Sessions;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use steward_branches::{BacklogKind, Branch};
use tokio_util::sync::CancellationToken;

/// The server-side limit of a backlog reading at cadence `every`, so that a reading that gave
/// way does not go on occupying its session.
pub(crate) fn statement_timeout(every: Duration) -> String {
    format!("{}ms", (every / 2).as_millis().max(1))
}

/// The last head read of one branch.
struct Head {
    kind: BacklogKind,
    /// When the oldest item is (or was) due for the branch; `None`: there was none.
    due_at: Option<Instant>,
}

impl Head {
    fn age(&self, now: Instant) -> Duration {
        self.due_at
            .map_or(Duration::ZERO, |due| now.saturating_duration_since(due))
    }
}

/// Reads every branch's backlog head every `every` until `stop`, and reports its age.
/// `sessions` carry a statement timeout of at most half of `every` (see [`statement_timeout`]).
pub(crate) async fn measure(
    mut session: Sessions,
    branches: Vec<Arc<dyn Branch>>,
    epoch: i64,
    observer: Arc<dyn Observer>,
    every: Duration,
    stop: CancellationToken,
) {
    // A reading that cannot finish within half the cadence (a lock on the jobs table) gives
    // way; the age is then extrapolated from the last head.
    let timeout = every / 2;
    let mut heads: HashMap<&'static str, Head> = HashMap::new();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        for branch in &branches {
            let read = tokio::time::timeout(timeout, async {
                let client = session.get().await?;
                branch.backlog(&client).await.map_err(|e| e.to_string())
            })
            .await;
            let now = Instant::now();
            match read {
                Ok(Ok(Some(backlog))) => {
                    let due_at = backlog.head_in.map(|secs| {
                        let offset = Duration::from_secs_f64(secs.abs().min(1e9));
                        if secs >= 0.0 {
                            now + offset
                        } else {
                            now.checked_sub(offset).unwrap_or(now)
                        }
                    });
                    heads.insert(
                        branch.name(),
                        Head {
                            kind: backlog.kind,
                            due_at,
                        },
                    );
                }
                // Not an SLO branch: nothing to measure.
                Ok(Ok(None)) => continue,
                Ok(Err(error)) => {
                    tracing::debug!(branch = branch.name(), %error, "could not read the backlog; extrapolating")
                }
                Err(_) => {
                    tracing::debug!(
                        branch = branch.name(),
                        "reading the backlog timed out; extrapolating"
                    )
                }
            }
            if let Some(head) = heads.get(branch.name()) {
                observer.backlog(&BacklogReport {
                    branch: branch.name(),
                    kind: head.kind,
                    epoch,
                    age: head.age(now),
                });
            }
        }
    }
}
