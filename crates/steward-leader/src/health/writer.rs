//! Persists what the registry knows: the leader's progress mark, which standbys watch for a
//! wedged leader, and per-branch health, which `steward status` reads from any host.

use crate::health::{BranchHealth, HealthRegistry};
use crate::instance::{Registration, FORGET_GONE};
use crate::observe::Observer;
use crate::work::Sessions;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use steward_connection::describe_pg_error;
use tokio_util::sync::CancellationToken;

/// Upserts per-branch health from a batch of parallel arrays; a writer of an older term never
/// overwrites a newer term's rows. Primary key of branch_health.
pub const UPSERT_BRANCH_HEALTH: &str = "
INSERT INTO branch_health (branch, loop_name, class, epoch, last_run_at, held_until,
    last_duration_ms, last_start_delay_ms, last_rows, last_success_at, last_error, last_error_at,
    last_error_epoch, overrun_state, overrun_episodes, runs, errors, updated_at)
SELECT b, l, c, $4, to_timestamp(r), to_timestamp(h), d, s, n, to_timestamp(ok), e,
       to_timestamp(ea), ee, o, ep, runs, errs, now()
FROM unnest($1::text[], $2::text[], $3::text[], $5::float8[], $6::float8[], $7::float8[],
            $8::float8[], $9::int8[], $10::float8[], $11::text[], $12::float8[], $13::int8[],
            $14::text[], $15::int8[], $16::int8[], $17::int8[])
     AS u(b, l, c, r, h, d, s, n, ok, e, ea, ee, o, ep, runs, errs)
ON CONFLICT (branch) DO UPDATE SET
    loop_name = excluded.loop_name, class = excluded.class, epoch = excluded.epoch,
    last_run_at = coalesce(excluded.last_run_at, branch_health.last_run_at),
    held_until = excluded.held_until,
    last_duration_ms = excluded.last_duration_ms, last_start_delay_ms = excluded.last_start_delay_ms,
    last_rows = excluded.last_rows,
    last_success_at = coalesce(excluded.last_success_at, branch_health.last_success_at),
    last_error = coalesce(excluded.last_error, branch_health.last_error),
    last_error_at = coalesce(excluded.last_error_at, branch_health.last_error_at),
    last_error_epoch = coalesce(excluded.last_error_epoch, branch_health.last_error_epoch),
    overrun_state = excluded.overrun_state, overrun_episodes = excluded.overrun_episodes,
    runs = excluded.runs, errors = excluded.errors, updated_at = now()
WHERE branch_health.epoch <= excluded.epoch";

/// The leader's progress mark, which standbys watch. Zero rows: a newer term has started.
/// Primary key of the one-row leader table; `FOR NO KEY UPDATE`, so it never waits for fences.
pub const MARK_PROGRESS: &str = "
UPDATE leader SET last_progress_at = clock_timestamp() WHERE id = 1 AND epoch = $1";

/// How often the leader refreshes its candidate record and compares the candidates' versions
/// and configurations with its own.
const DRIFT_CHECK_EVERY: Duration = Duration::from_secs(15);

/// Marks progress for standbys and flushes branch health every `every`, on `sessions`; keeps
/// the candidates table fresh and checks it for drift every [`DRIFT_CHECK_EVERY`]. Returns when the progress mark shows that a newer term has started.
pub(crate) async fn health_writer(
    mut session: Sessions,
    registration: Registration,
    epoch: i64,
    health: HealthRegistry,
    observer: Arc<dyn Observer>,
    every: Duration,
    stop: CancellationToken,
) {
    let mut warned = HashSet::new();
    let mut drift_checked: Option<Instant> = None;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let c = match session.get().await {
            Ok(c) => c,
            Err(error) => {
                tracing::warn!(%error, "health writer cannot reach the database");
                continue;
            }
        };
        match c.execute(MARK_PROGRESS, &[&epoch]).await {
            Ok(0) => return,
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(error = %describe_pg_error(&error), "could not mark leader progress");
                continue;
            }
        }
        // At the drift check's cadence, not every tick: a fleet process leads many queues, and
        // candidates count as current for two minutes. The leader keeps its own candidate
        // record fresh, and forgets candidates long gone.
        if drift_checked.is_none_or(|at| at.elapsed() >= DRIFT_CHECK_EVERY) {
            drift_checked = Some(Instant::now());
            let registered = async {
                registration.refresh(&*c).await?;
                c.execute(FORGET_GONE, &[]).await
            };
            if let Err(error) = registered.await {
                tracing::debug!(error = %describe_pg_error(&error), "could not refresh the candidates");
            }
            if let Err(error) =
                crate::drift::check(&c, &registration, &mut warned, observer.as_ref()).await
            {
                tracing::debug!(error = %describe_pg_error(&error), "could not read the candidates");
            }
        }
        let dirty = health.take_dirty();
        if dirty.is_empty() {
            continue;
        }
        if let Err(error) = write_health(&c, epoch, &dirty).await {
            tracing::warn!(error = %describe_pg_error(&error), "could not write branch health");
        }
    }
}

async fn write_health(
    client: &tokio_postgres::Client,
    epoch: i64,
    rows: &[BranchHealth],
) -> Result<u64, tokio_postgres::Error> {
    let secs = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .ok()
    };
    let branch: Vec<&str> = rows.iter().map(|r| r.branch.as_str()).collect();
    let loop_name: Vec<&str> = rows.iter().map(|r| r.loop_name.as_str()).collect();
    let class: Vec<&str> = rows.iter().map(|r| r.class.as_str()).collect();
    let run_at: Vec<Option<f64>> = rows.iter().map(|r| r.last_run_at.and_then(secs)).collect();
    let held: Vec<Option<f64>> = rows.iter().map(|r| r.held_until.and_then(secs)).collect();
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
    let error_epoch: Vec<Option<i64>> = rows.iter().map(|r| r.last_error_epoch).collect();
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
                &class,
                &epoch,
                &run_at,
                &held,
                &duration_ms,
                &delay_ms,
                &row_count,
                &success,
                &error,
                &error_at,
                &error_epoch,
                &overrun,
                &episodes,
                &runs,
                &errors,
            ],
        )
        .await
}
