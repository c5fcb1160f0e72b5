//! One leadership term: start the loops, watch the leader connection, restart a loop that
//! dies, flush health, and stop everything when the term ends.

use crate::health::HealthRegistry;
use crate::observe::LoopMode;
use crate::runner::{ContactMonitor, LoopExit, LoopSettings, LoopTask, StopSignal};
use crate::session::LeaderSession;
use crate::Candidate;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use steward_branches::Branch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TermEnd {
    /// Shutdown was requested: step down cleanly.
    SteppedDown,
    /// Leadership ended without our choosing.
    Lost(String),
}

/// Upserts per-branch health from a batch of parallel arrays; a writer of an older term never
/// overwrites a newer term's rows. Primary key of branch_health.
pub const UPSERT_BRANCH_HEALTH: &str = "
INSERT INTO branch_health (branch, loop_name, epoch, last_run_at, last_duration_ms, last_start_delay_ms,
    last_rows, last_success_at, last_error, last_error_at, overrun_state, overrun_episodes, runs, errors, updated_at)
SELECT b, l, $3, to_timestamp(r), d, s, n, to_timestamp(ok), e, to_timestamp(ea), o, ep, runs, errs, now()
FROM unnest($1::text[], $2::text[], $4::float8[], $5::float8[], $6::float8[], $7::int8[], $8::float8[],
            $9::text[], $10::float8[], $11::text[], $12::int8[], $13::int8[], $14::int8[])
     AS u(b, l, r, d, s, n, ok, e, ea, o, ep, runs, errs)
ON CONFLICT (branch) DO UPDATE SET
    loop_name = excluded.loop_name, epoch = excluded.epoch, last_run_at = excluded.last_run_at,
    last_duration_ms = excluded.last_duration_ms, last_start_delay_ms = excluded.last_start_delay_ms,
    last_rows = excluded.last_rows,
    last_success_at = coalesce(excluded.last_success_at, branch_health.last_success_at),
    last_error = coalesce(excluded.last_error, branch_health.last_error),
    last_error_at = coalesce(excluded.last_error_at, branch_health.last_error_at),
    overrun_state = excluded.overrun_state, overrun_episodes = excluded.overrun_episodes,
    runs = excluded.runs, errors = excluded.errors, updated_at = now()
WHERE branch_health.epoch <= excluded.epoch";

/// The leader's progress mark, which standbys watch. Zero rows: a newer term has started.
/// Primary key of the one-row leader table; `FOR NO KEY UPDATE`, so it never waits for fences.
pub const MARK_PROGRESS: &str = "
UPDATE leader SET last_progress_at = clock_timestamp() WHERE id = 1 AND epoch = $1";

struct LoopPlan {
    name: &'static str,
    branches: Vec<Arc<dyn Branch>>,
}

/// Split mode: one loop per loop kind, and one for each branch that asks for its own
/// ([`Branch::own_loop`]); loops left without branches are not started. Monolithic mode: one
/// loop with every branch.
fn plan_loops(mode: LoopMode, branches: &[Arc<dyn Branch>]) -> Vec<LoopPlan> {
    match mode {
        LoopMode::Split => {
            let mut plans: Vec<LoopPlan> = Vec::new();
            for branch in branches {
                let name = branch
                    .own_loop()
                    .unwrap_or_else(|| branch.loop_kind().as_str());
                match plans.iter_mut().find(|p| p.name == name) {
                    Some(plan) => plan.branches.push(branch.clone()),
                    None => plans.push(LoopPlan {
                        name,
                        branches: vec![branch.clone()],
                    }),
                }
            }
            plans
        }
        LoopMode::Monolithic => vec![LoopPlan {
            name: "monolithic",
            branches: branches.to_vec(),
        }],
    }
}

pub async fn run_term(
    candidate: &Candidate,
    session: &LeaderSession,
    epoch: i64,
    shutdown: &CancellationToken,
) -> TermEnd {
    let settings = &candidate.settings;
    let stop = StopSignal::default();
    let contact = ContactMonitor::new();
    let plans = plan_loops(settings.loop_mode, &candidate.branches);
    let spawn_loop = |tasks: &mut JoinSet<LoopExit>, plan: &LoopPlan, delay: Duration| {
        let task = LoopTask {
            name: plan.name,
            branches: plan.branches.clone(),
            mode: settings.loop_mode,
            epoch,
            db: candidate.work_config(plan.name),
            tls: candidate.tls.clone(),
            schema: candidate.schema.clone(),
            stop: stop.clone(),
            observer: candidate.observer(),
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
    for (i, plan) in plans.iter().enumerate() {
        task_plan.insert(spawn_loop(&mut tasks, plan, Duration::ZERO), i);
    }
    let writer_stop = CancellationToken::new();
    let mut writer = tokio::spawn(health_writer(
        candidate.work_config("health"),
        candidate.tls.clone(),
        epoch,
        candidate.health.clone(),
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
            _ = session.ended() => {
                stop.stop(Duration::ZERO);
                break TermEnd::Lost("the leader connection closed".to_owned());
            }
            _ = probe.tick() => match session.probe(settings.probe_timeout).await {
                Ok(rtt) if rtt > settings.stall_threshold => {
                    tracing::warn!(rtt_ms = rtt.as_millis() as u64, "database stall: rescues wait a quiet period again");
                    contact.restored_now();
                }
                Ok(_) => {}
                Err(reason) => {
                    stop.stop(Duration::ZERO);
                    break TermEnd::Lost(format!("leader connection probe failed: {reason}"));
                }
            },
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
                    Ok((id, LoopExit::Stopped)) => (id, "the loop returned while the term was active".to_owned()),
                    Err(e) => (e.id(), if e.is_panic() { "the loop task panicked".to_owned() } else { e.to_string() }),
                };
                let Some(index) = task_plan.remove(&id) else { continue };
                let plan = &plans[index];
                tracing::error!(loop_name = plan.name, %reason, "maintenance loop died; restarting it");
                candidate.observer().loop_restarted(plan.name, &reason);
                task_plan.insert(spawn_loop(&mut tasks, plan, settings.reconnect_min), index);
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
    end
}

fn stop_bound(end: &TermEnd, grace: Duration) -> Duration {
    match end {
        TermEnd::SteppedDown => grace + Duration::from_secs(1),
        TermEnd::Lost(_) => Duration::from_secs(1),
    }
}

/// Marks progress for standbys and flushes branch health, every `every`, on its own
/// connection. Returns when the progress mark shows that a newer term has started.
async fn health_writer(
    config: tokio_postgres::Config,
    tls: steward_schema::Tls,
    epoch: i64,
    health: HealthRegistry,
    every: Duration,
    stop: CancellationToken,
) {
    let mut client: Option<tokio_postgres::Client> = None;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = match steward_schema::connect_with(&config, &tls).await {
                Ok(c) => Some(c),
                Err(error) => {
                    tracing::warn!(%error, "health writer cannot reach the database");
                    continue;
                }
            };
        }
        let Some(c) = client.as_ref() else { continue };
        match c.execute(MARK_PROGRESS, &[&epoch]).await {
            Ok(0) => return,
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(error = %steward_schema::describe_pg_error(&error), "could not mark leader progress");
                continue;
            }
        }
        let dirty = health.take_dirty();
        if dirty.is_empty() {
            continue;
        }
        if let Err(error) = write_health(c, epoch, &dirty).await {
            tracing::warn!(error = %steward_schema::describe_pg_error(&error), "could not write branch health");
        }
    }
}

async fn write_health(
    client: &tokio_postgres::Client,
    epoch: i64,
    rows: &[crate::health::BranchHealth],
) -> Result<u64, tokio_postgres::Error> {
    let secs = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .ok()
    };
    let branch: Vec<&str> = rows.iter().map(|r| r.branch.as_str()).collect();
    let loop_name: Vec<&str> = rows.iter().map(|r| r.loop_kind.as_str()).collect();
    let run_at: Vec<Option<f64>> = rows.iter().map(|r| secs(r.last_run_at)).collect();
    let duration_ms: Vec<f64> = rows
        .iter()
        .map(|r| r.last_duration.as_secs_f64() * 1000.0)
        .collect();
    let delay_ms: Vec<f64> = rows
        .iter()
        .map(|r| r.last_start_delay.as_secs_f64() * 1000.0)
        .collect();
    let row_count: Vec<i64> = rows.iter().map(|r| r.last_rows as i64).collect();
    let success: Vec<Option<f64>> = rows
        .iter()
        .map(|r| r.last_success_at.and_then(secs))
        .collect();
    let error: Vec<Option<&str>> = rows.iter().map(|r| r.last_error.as_deref()).collect();
    let error_at: Vec<Option<f64>> = rows
        .iter()
        .map(|r| r.last_error_at.and_then(secs))
        .collect();
    let overrun: Vec<&str> = rows.iter().map(|r| r.overrun.as_str()).collect();
    let episodes: Vec<i64> = rows.iter().map(|r| r.overrun_episodes as i64).collect();
    let runs: Vec<i64> = rows.iter().map(|r| r.runs as i64).collect();
    let errors: Vec<i64> = rows.iter().map(|r| r.errors as i64).collect();
    client
        .execute(
            UPSERT_BRANCH_HEALTH,
            &[
                &branch,
                &loop_name,
                &epoch,
                &run_at,
                &duration_ms,
                &delay_ms,
                &row_count,
                &success,
                &error,
                &error_at,
                &overrun,
                &episodes,
                &runs,
                &errors,
            ],
        )
        .await
}
