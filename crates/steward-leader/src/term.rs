//! One leadership term: start the loops, watch what holds the lock (the candidate's leader
//! session, or the fleet session of a process that leads many queues), restart a loop that
//! dies, flush health, and stop everything when the term ends.

use crate::health::writer::health_writer;
use crate::health::HealthRegistry;
use crate::instance::{Instance, Registration};
use crate::observe::Observer;
use crate::plan::{LoopPlan, PlannedLoop};
use crate::runner::{ContactMonitor, LoopExit, LoopSessions, LoopSettings, LoopTask, StopSignal};
use crate::session::{LeaderSession, ProbeError};
use crate::settings::LeaderSettings;
use crate::work::{QueuePools, Sessions};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TermEnd {
    /// Shutdown was requested: step down cleanly.
    SteppedDown,
    /// Leadership ended without our choosing.
    Lost(String),
}

/// Why a term ends when its server stops accepting writes (demoted, fenced, or a standby).
pub const READ_ONLY_SERVER: &str =
    "the server refuses writes (a hot standby, or default_transaction_read_only is on)";

/// The name the backlog measurement's restarts are reported under.
pub const BACKLOG_TASK: &str = "backlog";

/// What holds the queue's lock for the term.
pub(crate) enum Holder<'a> {
    /// The candidate's own leader session, which the term probes.
    Session(&'a LeaderSession),
    /// A fleet session, which probes for every queue it holds and says when this one is lost.
    Fleet(&'a crate::fleet::Lease),
}

/// Where the term's tasks get their sessions.
#[derive(Clone, Copy)]
pub(crate) enum TermSessions<'a> {
    /// Each task opens its own, named after it.
    Own(&'a Instance),
    /// The fleet process's pools in the queue's database.
    Shared(&'a QueuePools),
}

/// What a term needs from its candidate.
pub(crate) struct Term<'a> {
    pub epoch: i64,
    pub registration: &'a Registration,
    pub plan: &'a LoopPlan,
    pub settings: &'a LeaderSettings,
    pub sessions: TermSessions<'a>,
    pub holder: Holder<'a>,
    /// When contact with the database was last regained; a fleet session's probe restores it.
    pub contact: ContactMonitor,
    pub observer: Arc<dyn Observer>,
    pub health: HealthRegistry,
}

pub(crate) async fn run_term(term: Term<'_>, shutdown: &CancellationToken) -> TermEnd {
    let Term {
        epoch,
        registration,
        plan,
        settings,
        sessions,
        holder,
        contact,
        observer,
        health,
    } = term;
    let stop = StopSignal::default();
    let own_session = match holder {
        Holder::Session(session) => Some(session),
        Holder::Fleet(_) => None,
    };
    let spawn_loop = |tasks: &mut JoinSet<LoopExit>, planned: &PlannedLoop, delay: Duration| {
        let task = LoopTask {
            name: planned.name,
            branches: planned.branches.clone(),
            mode: plan.mode(),
            epoch,
            sessions: match sessions {
                TermSessions::Own(instance) => {
                    LoopSessions::Own(instance.work_session(planned.name))
                }
                TermSessions::Shared(pools) => pools.for_loop(planned),
            },
            stop: stop.clone(),
            observer: observer.clone(),
            contact: contact.clone(),
            settings: LoopSettings {
                reconnect_min: settings.reconnect_min,
                reconnect_max: settings.reconnect_max,
            },
        };
        // The restart delay runs inside the new task, so the term keeps watching its
        // leadership meanwhile.
        tasks
            .spawn(async move {
                tokio::time::sleep(delay).await;
                task.run().await
            })
            .id()
    };
    let mut tasks = JoinSet::new();
    let mut task_plan: HashMap<tokio::task::Id, usize> = HashMap::new();
    for (i, planned) in plan.loops().iter().enumerate() {
        task_plan.insert(spawn_loop(&mut tasks, planned, Duration::ZERO), i);
    }
    let writer_stop = CancellationToken::new();
    let spawn_measure = |delay: Duration| {
        let backlog_sessions = match sessions {
            TermSessions::Own(instance) => Sessions::own(instance.session("backlog").with_setting(
                "statement_timeout",
                crate::backlog::statement_timeout(settings.backlog_interval),
            )),
            TermSessions::Shared(pools) => Sessions::Shared(Box::new(pools.backlog.clone())),
        };
        let measure = crate::backlog::measure(
            backlog_sessions,
            plan.branches().map(|(_, branch)| branch.clone()).collect(),
            epoch,
            observer.clone(),
            settings.backlog_interval,
            writer_stop.clone(),
        );
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            measure.await
        })
    };
    let mut measure = spawn_measure(Duration::ZERO);
    let mut writer = tokio::spawn(health_writer(
        match sessions {
            TermSessions::Own(instance) => Sessions::own(instance.work_session("health")),
            TermSessions::Shared(pools) => Sessions::Shared(Box::new(pools.health.clone())),
        },
        registration.clone(),
        epoch,
        health,
        observer.clone(),
        settings.progress_interval,
        writer_stop.clone(),
    ));

    let mut probe = tokio::time::interval(settings.probe_interval);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let end = loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                stop.stop(settings.shutdown_grace);
                break TermEnd::SteppedDown;
            }
            why = lost(&holder) => {
                stop.stop(Duration::ZERO);
                break TermEnd::Lost(why);
            }
            _ = probe.tick(), if own_session.is_some() => match probe_once(own_session, settings.probe_timeout).await {
                Ok(rtt) if rtt > settings.stall_threshold => {
                    tracing::warn!(rtt_ms = rtt.as_millis() as u64, "database stall: rescues wait a quiet period again");
                    contact.restored_now();
                }
                Ok(_) => {}
                Err(ProbeError::ReadOnly) => {
                    stop.stop(Duration::ZERO);
                    break TermEnd::Lost(READ_ONLY_SERVER.to_owned());
                }
                Err(ProbeError::LockLost) => {
                    stop.stop(Duration::ZERO);
                    break TermEnd::Lost("the leader session no longer holds the leadership lock".to_owned());
                }
                Err(ProbeError::Failed(reason)) => {
                    stop.stop(Duration::ZERO);
                    break TermEnd::Lost(format!("leader connection probe failed: {reason}"));
                }
            },
            ended = &mut measure => {
                // It only returns when told to stop, which happens after this loop.
                let reason = match ended {
                    Ok(()) => "it returned".to_owned(),
                    Err(e) => e.to_string(),
                };
                tracing::error!(%reason, "the backlog measurement stopped; restarting it");
                observer.loop_restarted(BACKLOG_TASK, &reason);
                measure = spawn_measure(settings.reconnect_min);
            }
            superseded = &mut writer => {
                stop.stop(Duration::ZERO);
                break TermEnd::Lost(match superseded {
                    Ok(()) => "a newer term started (seen by the progress mark)".to_owned(),
                    Err(e) => format!("health writer died: {e}"),
                });
            }
            Some(joined) = tasks.join_next_with_id() => {
                let (id, reason) = match joined {
                    Ok((_, LoopExit::Superseded)) => {
                        stop.stop(Duration::ZERO);
                        break TermEnd::Lost("a newer term started (seen by a branch fence)".to_owned());
                    }
                    Ok((_, LoopExit::ReadOnly)) => {
                        stop.stop(Duration::ZERO);
                        break TermEnd::Lost(READ_ONLY_SERVER.to_owned());
                    }
                    Ok((id, LoopExit::Stopped)) => (id, "the loop returned while the term was active".to_owned()),
                    Err(e) => (e.id(), if e.is_panic() { "the loop task panicked".to_owned() } else { e.to_string() }),
                };
                let Some(index) = task_plan.remove(&id) else { continue };
                let planned = &plan.loops()[index];
                tracing::error!(loop_name = planned.name, %reason, "maintenance loop died; restarting it");
                observer.loop_restarted(planned.name, &reason);
                task_plan.insert(spawn_loop(&mut tasks, planned, settings.reconnect_min), index);
            }
        }
    };

    // Loops finish or cancel their running statement within the grace period; anything still
    // running after that (plus a margin) is aborted so it cannot outlive the term.
    let bound = stop_bound(&end, settings.shutdown_grace);
    if tokio::time::timeout(bound, async { while tasks.join_next().await.is_some() {} })
        .await
        .is_err()
    {
        tracing::warn!("maintenance loops did not stop in time; aborting them");
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
    writer_stop.cancel();
    writer.abort();
    measure.abort();
    end
}

/// Resolves, with the reason, when the holder has lost the lock.
async fn lost(holder: &Holder<'_>) -> String {
    match holder {
        Holder::Session(session) => {
            session.ended().await;
            "the leader connection closed".to_owned()
        }
        Holder::Fleet(lease) => lease.lost().await,
    }
}

async fn probe_once(
    session: Option<&LeaderSession>,
    timeout: Duration,
) -> Result<Duration, ProbeError> {
    match session {
        Some(session) => session.probe(timeout).await,
        None => Ok(Duration::ZERO),
    }
}

fn stop_bound(end: &TermEnd, grace: Duration) -> Duration {
    match end {
        TermEnd::SteppedDown => grace + Duration::from_secs(1),
        TermEnd::Lost(_) => Duration::from_secs(1),
    }
}
