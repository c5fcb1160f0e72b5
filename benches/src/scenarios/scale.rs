//! Scenario: cost against table size. For each table size a fresh database is seeded
//! server-side (`INSERT ... SELECT generate_series`, one statement per part) with a realistic
//! mix: finished jobs inside retention, a horizon of scheduled jobs due hours from now, a running
//! set and a few runs parked on callbacks. Then, at each size:
//!
//! - the shared workload flows scheduled jobs through promote, claim and complete at each rate
//!   (the first rate at every size, the others at the largest only), under an in-process
//!   split-mode leader whose observer records promotion lag and every SLO branch's passes;
//! - a real `steward run` leads the same table and flow for a short window, for its RSS;
//! - table and index sizes, dead tuples and vacuum counts are read from the statistics views.
//!
//! At the largest size two more phases run with the flow going on: a mass rescue (a fleet's
//! worth of running jobs whose heartbeats stop at once; the time until the last is rescued and
//! the promotion lag meanwhile), and real hygiene load (a cleanup backlog of finished jobs past
//! retention that outlasts the window), split then monolithic, the backlog topped back up in
//! between; then a plain SQL statement, batched like cleanup, moves the same kind of rows with
//! no leader and no flow running, for cleanup's rows/s against plain SQL.

use crate::db::{settle, BenchDb, Pg};
use crate::hist::{ratio, round2, round3, Quantiles};
use crate::leader::Leader;
use crate::procs::{rss_kib, StewardProcess, ACQUIRED, FIRST_PASS};
use crate::recorder::{Recorder, Snapshot};
use crate::report::{num, opt, ratio_cell, table, Target};
use anyhow::Context;
use serde::Serialize;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use steward_branches::BranchesConfig;
use steward_leader::{LeaderSettings, LoopMode};
use steward_workload::{Stats as WorkloadStats, Workload};
use tokio_postgres::Client;

/// The job queue (inside the schema) of the cleanup backlog.
pub(crate) const BACKLOG_QUEUE: &str = "backlog";
const DEAD_QUEUE: &str = "dead_fleet";
/// The SLO branches whose pass duration is compared across sizes.
pub const SLO_BRANCHES: [&str; 4] = [
    "promote_scheduled",
    "rescue_stale_heartbeats",
    "rescue_expired_deadlines",
    "rescue_expired_callbacks",
];
/// How long a `steward run` process may take to lead or to make its first pass.
const WAIT: Duration = Duration::from_secs(60);
/// The batch size of cleanup's shipped settings, which the plain statement copies.
const CLEANUP_BATCH: i64 = 1000;

pub struct Settings {
    pub quick: bool,
    /// Table sizes in rows, each seeded into a fresh database.
    pub sizes: Vec<i64>,
    /// Jobs per second; the first at every size, the others at the largest only.
    pub rates: Vec<f64>,
    pub window: Duration,
    pub warmup: Duration,
    /// Workload jobs are due uniformly over this horizon (at most the warm-up, so that the
    /// window sees the steady state of each rate).
    pub horizon: Duration,
    /// Finished jobs past retention waiting for cleanup in the hygiene phase.
    pub backlog_rows: i64,
    /// Running jobs whose worker dies in the mass-rescue phase.
    pub dead_runs: i64,
    /// The dead fleet's runs are on their last attempt: rescued, they fail rather than retry, so
    /// that no retries come due for the promoter (to tell the rescue's own cost from theirs).
    pub dead_last_attempt: bool,
    pub staleness: Duration,
    /// The window in which a `steward run` leader's RSS is sampled at each size.
    pub rss_window: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct Params {
    pub sizes: Vec<i64>,
    pub rates: Vec<f64>,
    pub window_s: f64,
    pub warmup_s: f64,
    pub horizon_s: f64,
    pub backlog_rows: i64,
    pub dead_runs: i64,
    pub dead_last_attempt: bool,
    pub staleness_s: f64,
    pub rss_window_s: f64,
    pub producers: usize,
    pub workers: usize,
    /// Branch settings that differ from the defaults, as `key = value`.
    pub config_changes: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SeedPart {
    pub part: String,
    pub rows: i64,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PassNumbers {
    pub branch: String,
    pub runs: u64,
    pub rows: u64,
    pub duration_ms: Quantiles,
    pub start_delay_ms: Quantiles,
}

#[derive(Debug, Clone, Serialize)]
pub struct FlowResult {
    pub rate: f64,
    pub achieved_rate: f64,
    pub window_s: f64,
    pub promotion_lag_ms: Quantiles,
    /// The SLO branches, in [`SLO_BRANCHES`] order.
    pub slo: Vec<PassNumbers>,
    pub workload: WorkloadStats,
}

#[derive(Debug, Clone, Serialize)]
pub struct IndexSize {
    pub index: String,
    pub bytes: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Growth {
    pub table_bytes: i64,
    pub indexes_bytes: i64,
    pub live_tuples: i64,
    pub dead_tuples: i64,
    pub autovacuum_count: i64,
    pub autoanalyze_count: i64,
    pub indexes: Vec<IndexSize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SizeResult {
    pub rows: i64,
    pub seed_s: f64,
    pub seed_parts: Vec<SeedPart>,
    pub vacuum_analyze_s: f64,
    pub flows: Vec<FlowResult>,
    /// After seeding and VACUUM ANALYZE.
    pub before: Growth,
    /// After the flows and the RSS window (the same phases at every size).
    pub after_flow: Growth,
    /// The largest size only: after mass rescue, hygiene and the plain cleanup too.
    pub after_all: Option<Growth>,
    pub leader_rss_mib_max: Option<f64>,
    pub leader_rss_mib_mean: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HygieneMode {
    pub mode: String,
    pub window_s: f64,
    pub slo_start_delay_ms: Quantiles,
    pub slo_overruns: u64,
    pub promotion_lag_ms: Quantiles,
    /// The SLO branches, in [`SLO_BRANCHES`] order.
    pub slo: Vec<PassNumbers>,
    pub cleanup_runs: u64,
    pub cleanup_rows: u64,
    /// Cleanup's rows over the window.
    pub cleanup_rows_per_s: f64,
    /// Cleanup's rows over the time its passes took (pass mean × passes).
    pub cleanup_busy_rows_per_s: Option<f64>,
    /// Backlog rows still in `jobs` when the window closed (> 0: cleanup was still working).
    pub backlog_left: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlainCleanup {
    pub rows: i64,
    pub batch_size: i64,
    pub seconds: f64,
    pub rows_per_s: f64,
    pub sql: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct HygieneResult {
    pub table_rows: i64,
    pub backlog_rows: i64,
    pub seed_s: f64,
    pub modes: Vec<HygieneMode>,
    pub plain: PlainCleanup,
    /// Split cleanup's busy rows/s ÷ the plain statement's rows/s.
    pub split_busy_vs_plain: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MassRescueResult {
    pub table_rows: i64,
    pub dead_runs: i64,
    /// Whether the runs were on their last attempt (rescued to failed, no retries).
    pub last_attempt: bool,
    pub staleness_s: f64,
    pub rescued: i64,
    /// The last rescue's time (the `at` of its error entry) minus the runs' expiry.
    pub all_rescued_after_s: Option<f64>,
    pub first_rescued_after_s: Option<f64>,
    /// From the runs' expiry until the last was rescued.
    pub promotion_lag_ms: Quantiles,
    pub heartbeat_rescue_passes: u64,
    pub heartbeat_rescue_pass_ms: Quantiles,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScaleResult {
    pub params: Params,
    pub sizes: Vec<SizeResult>,
    pub mass_rescue: MassRescueResult,
    pub hygiene: HygieneResult,
}

/// Distributions and points for the plots.
pub struct ScaleCurves {
    /// (table rows, branch, pass duration p99 ms) at the first rate.
    pub pass_p99: Vec<(i64, String, f64)>,
    /// (table rows, rate, lag p50 ms, lag p99 ms).
    pub lag_by_rate: Vec<(i64, f64, f64, f64)>,
}

fn branch_config(s: &Settings) -> (BranchesConfig, Vec<String>) {
    let mut b = BranchesConfig::default();
    let second = Duration::from_secs(1);
    b.rescue_stale_heartbeats.staleness = s.staleness;
    // Every rescue passes once a second, as in isolation: a window then holds enough passes
    // for a pass-duration p99 that is not just the single worst pass.
    b.rescue_stale_heartbeats.interval = second;
    b.rescue_expired_deadlines.interval = second;
    b.rescue_expired_callbacks.interval = second;
    b.rescue_stale_heartbeats.quiet_period = Some(second);
    b.rescue_expired_deadlines.quiet_period = second;
    b.rescue_expired_callbacks.quiet_period = second;
    let changes = vec![
        format!(
            "rescue_stale_heartbeats.staleness = {}ms",
            s.staleness.as_millis()
        ),
        "rescue_*.interval = 1s (every rescue)".to_owned(),
        "rescue_*.quiet_period = 1s (every rescue)".to_owned(),
    ];
    (b, changes)
}

pub async fn run(
    pg: &Pg,
    bin: &Path,
    s: &Settings,
) -> anyhow::Result<(ScaleResult, ScaleCurves, Vec<Target>)> {
    anyhow::ensure!(!s.sizes.is_empty(), "scale: no table sizes");
    anyhow::ensure!(!s.rates.is_empty(), "scale: no rates");
    let (config, config_changes) = branch_config(s);
    let problems = config.validate();
    anyhow::ensure!(problems.is_empty(), "scale branch config: {problems:?}");
    let mut sizes: Vec<i64> = s.sizes.clone();
    sizes.sort_unstable();
    sizes.dedup();
    let largest = *sizes.last().context("scale: no table sizes")?;
    let params = Params {
        sizes: sizes.clone(),
        rates: s.rates.clone(),
        window_s: s.window.as_secs_f64(),
        warmup_s: s.warmup.as_secs_f64(),
        horizon_s: s.horizon.as_secs_f64(),
        backlog_rows: s.backlog_rows,
        dead_runs: s.dead_runs,
        dead_last_attempt: s.dead_last_attempt,
        staleness_s: s.staleness.as_secs_f64(),
        rss_window_s: s.rss_window.as_secs_f64(),
        producers: 2,
        workers: 4,
        config_changes,
    };
    let mut results = Vec::new();
    let mut extra = None;
    for &rows in &sizes {
        let db = pg.create(&format!("scale_{rows}")).await?;
        let result = run_size(&db, bin, s, &params, &config, rows, rows == largest).await;
        pg.drop_db(db).await;
        let (size, phases) = result.with_context(|| format!("scale at {rows} rows"))?;
        results.push(size);
        if phases.is_some() {
            extra = phases;
        }
    }
    let (mass_rescue, hygiene) = extra.context("scale: the largest size ran no extra phases")?;
    let targets = targets(s, &results, &mass_rescue, &hygiene);
    let curves = curves(&results);
    Ok((
        ScaleResult {
            params,
            sizes: results,
            mass_rescue,
            hygiene,
        },
        curves,
        targets,
    ))
}

fn curves(sizes: &[SizeResult]) -> ScaleCurves {
    let mut pass_p99 = Vec::new();
    let mut lag_by_rate = Vec::new();
    for size in sizes {
        if let Some(first) = size.flows.first() {
            for b in &first.slo {
                if let Some(p99) = b.duration_ms.p99 {
                    pass_p99.push((size.rows, b.branch.clone(), p99));
                }
            }
        }
        for flow in &size.flows {
            if let (Some(p50), Some(p99)) = (flow.promotion_lag_ms.p50, flow.promotion_lag_ms.p99) {
                lag_by_rate.push((size.rows, flow.rate, p50, p99));
            }
        }
    }
    ScaleCurves {
        pass_p99,
        lag_by_rate,
    }
}

fn targets(
    s: &Settings,
    sizes: &[SizeResult],
    rescue: &MassRescueResult,
    hygiene: &HygieneResult,
) -> Vec<Target> {
    // The targets are set for 10M rows, 100,000 dead runs and a backlog of millions; a quick
    // run measures them on tables a hundred times smaller, which every target's name says.
    let at = |rows: i64| {
        if s.quick {
            format!(" [quick: {rows} rows; the target is set for 10M]")
        } else {
            format!(" at {rows} rows")
        }
    };
    let mut targets = Vec::new();
    let (Some(smallest), Some(largest)) = (sizes.first(), sizes.last()) else {
        return targets;
    };
    targets.push(Target::below(
        format!("seeding{}", at(largest.rows)),
        Some(largest.seed_s),
        180.0,
        "s",
    ));
    for (i, flow) in largest.flows.iter().enumerate() {
        let limit = if i == 0 { 25.0 } else { 50.0 };
        targets.push(Target::at_most(
            format!(
                "promotion lag p99, {} jobs/s{}",
                flow.rate,
                at(largest.rows)
            ),
            flow.promotion_lag_ms.p99,
            limit,
            "ms",
        ));
    }
    if sizes.len() > 1 {
        if let (Some(small), Some(large)) = (smallest.flows.first(), largest.flows.first()) {
            for name in SLO_BRANCHES {
                let p99 = |f: &FlowResult| {
                    f.slo
                        .iter()
                        .find(|b| b.branch == name)
                        .and_then(|b| b.duration_ms.p99)
                };
                targets.push(Target::at_most(
                    format!(
                        "{name} pass duration p99, {} ÷ {} rows{}",
                        largest.rows,
                        smallest.rows,
                        if s.quick { " [quick sizes]" } else { "" }
                    ),
                    ratio(p99(large), p99(small)),
                    2.0,
                    "x",
                ));
            }
        }
    }
    if let Some(split) = hygiene.modes.iter().find(|m| m.mode == "split") {
        targets.push(Target::at_most(
            format!(
                "split: SLO start delay p99 during the cleanup backlog{}",
                at(hygiene.table_rows)
            ),
            split.slo_start_delay_ms.p99,
            10.0,
            "ms",
        ));
        targets.push(Target::at_least(
            "precondition: cleanup backlog left when the split window closed",
            Some(split.backlog_left as f64),
            1.0,
            "rows",
        ));
    }
    let runs = if s.quick {
        format!(
            " [quick: {} runs; the target is set for 100,000]",
            rescue.dead_runs
        )
    } else {
        format!(" ({} runs)", rescue.dead_runs)
    };
    targets.push(Target::at_most(
        format!("mass rescue: all rescued after expiry{runs}"),
        rescue.all_rescued_after_s,
        5.0,
        "s",
    ));
    targets.push(Target::at_most(
        format!("mass rescue: promotion lag p99 meanwhile{runs}"),
        rescue.promotion_lag_ms.p99,
        50.0,
        "ms",
    ));
    for size in sizes {
        targets.push(Target::below(
            format!("leader RSS (steward run), {} rows", size.rows),
            size.leader_rss_mib_max,
            30.0,
            "MiB",
        ));
    }
    targets
}

/// Starts the flow at `rate`: the promotion scenario's workload, on a queue client of its own.
async fn start_flow(
    db: &BenchDb,
    s: &Settings,
    params: &Params,
    rate: f64,
) -> anyhow::Result<Workload> {
    super::promotion::start_flow(
        &db.target()?,
        rate,
        params.producers,
        params.workers,
        s.horizon,
    )
    .await
}

async fn start_leader(
    db: &BenchDb,
    config: &BranchesConfig,
    mode: LoopMode,
) -> anyhow::Result<(Leader, Arc<Recorder>)> {
    let recorder = Arc::new(Recorder::default());
    let leader = Leader::start(
        &db.url,
        &db.schema,
        LeaderSettings {
            loop_mode: mode,
            shutdown_grace: Duration::from_secs(1),
            ..LeaderSettings::default()
        },
        config.build(),
        recorder.clone(),
    )
    .await?;
    Ok((leader, recorder))
}

fn slo_numbers(snapshot: &Snapshot) -> Vec<PassNumbers> {
    SLO_BRANCHES
        .iter()
        .map(|name| {
            let stats = snapshot.branches.get(name).cloned().unwrap_or_default();
            PassNumbers {
                branch: (*name).to_owned(),
                runs: stats.runs,
                rows: stats.rows,
                duration_ms: stats.duration.summary(),
                start_delay_ms: stats.start_delay.summary(),
            }
        })
        .collect()
}

type Extra = Option<(MassRescueResult, HygieneResult)>;

async fn run_size(
    db: &BenchDb,
    bin: &Path,
    s: &Settings,
    params: &Params,
    config: &BranchesConfig,
    rows: i64,
    largest: bool,
) -> anyhow::Result<(SizeResult, Extra)> {
    let client = db.client().await?;
    crate::progress(format!("scale: seeding {rows} rows"));
    let started = Instant::now();
    let seed_parts = seed(&client, rows).await?;
    let seed_s = started.elapsed().as_secs_f64();
    // The seeding session's insert counts reach pg_stat_user_tables when it next goes idle, at
    // most once a second; flushed after VACUUM's exact count, they would count the rows twice.
    // PostgreSQL 15 can flush them now; older servers lack the function, hence no error check.
    let _ = client
        .batch_execute("SELECT pg_stat_force_next_flush()")
        .await;
    let started = Instant::now();
    settle(&client).await?;
    let vacuum_analyze_s = started.elapsed().as_secs_f64();
    let before = growth(&client).await?;
    crate::progress(format!(
        "scale: {rows} rows seeded in {seed_s:.1} s, VACUUM ANALYZE {vacuum_analyze_s:.1} s"
    ));

    let (leader, recorder) = start_leader(db, config, LoopMode::Split).await?;
    let mut flows = Vec::new();
    let rates: Vec<f64> = if largest {
        s.rates.clone()
    } else {
        s.rates.iter().take(1).copied().collect()
    };
    let mut workload = None;
    for &rate in &rates {
        if let Some(running) = workload.take() {
            let _ = Workload::stop(running).await;
        }
        crate::progress(format!(
            "scale: {rows} rows, {rate} jobs/s, {:.0} s warm-up + {:.0} s window",
            s.warmup.as_secs_f64(),
            s.window.as_secs_f64()
        ));
        let started = Instant::now();
        let running = start_flow(db, s, params, rate).await?;
        tokio::time::sleep(s.warmup).await;
        recorder.start();
        let window_started = Instant::now();
        tokio::time::sleep(s.window).await;
        let snapshot = recorder.stop();
        let window_s = window_started.elapsed().as_secs_f64();
        let achieved = running.enqueued() as f64 / started.elapsed().as_secs_f64();
        flows.push(FlowResult {
            rate,
            achieved_rate: (achieved * 10.0).round() / 10.0,
            window_s: round2(window_s),
            promotion_lag_ms: snapshot.promotion_lags.summary(),
            slo: slo_numbers(&snapshot),
            workload: running.stats(),
        });
        workload = Some(running);
    }
    // The rest runs at the first rate.
    if rates.len() > 1 {
        if let Some(running) = workload.take() {
            let _ = Workload::stop(running).await;
        }
        workload = Some(start_flow(db, s, params, s.rates[0]).await?);
    }

    let mass_rescue = if largest {
        Some(mass_rescue(&client, s, &recorder, rows).await?)
    } else {
        None
    };
    leader.stop().await?;

    let (rss_max, rss_mean) = leader_rss(db, bin, s, rows).await?;
    if let Some(running) = workload.take() {
        let _ = Workload::stop(running).await;
    }
    let after_flow = growth(&client).await?;

    let mut extra = None;
    let mut after_all = None;
    if let Some(mass_rescue) = mass_rescue {
        let hygiene = hygiene(db, &client, s, params, config, rows).await?;
        after_all = Some(growth(&client).await?);
        extra = Some((mass_rescue, hygiene));
    }
    Ok((
        SizeResult {
            rows,
            seed_s: round2(seed_s),
            seed_parts,
            vacuum_analyze_s: round2(vacuum_analyze_s),
            flows,
            before,
            after_flow,
            after_all,
            leader_rss_mib_max: rss_max,
            leader_rss_mib_mean: rss_mean,
        },
        extra,
    ))
}

/// The table's parts: (name, share in per mille, the SELECT list of one row of `g`). Finished
/// jobs are inside the default retention (finalized within the last 20 hours); scheduled jobs
/// are due one to 25 hours from now, past every window, so that they load the due index
/// without being promoted; the running set's heartbeats and deadlines are set an hour ahead,
/// so that they load the running indexes without becoming rescue work, since no worker
/// heartbeats them.
const PARTS: [(&str, i64, &str); 6] = [
    (
        "completed",
        850,
        "'q_' || (g % 20), 'bench.seed', 'completed', 2, 2, 1, 25,
         now() - interval '21 hours', now() - interval '21 hours', now() - interval '20 hours',
         NULL, NULL, NULL, NULL, now() - (g % 72000) * interval '1 second'",
    ),
    (
        "failed",
        30,
        "'q_' || (g % 20), 'bench.seed', 'failed', 2, 2, 25, 25,
         now() - interval '21 hours', now() - interval '21 hours', now() - interval '20 hours',
         NULL, NULL, NULL, NULL, now() - (g % 72000) * interval '1 second'",
    ),
    (
        "cancelled",
        10,
        "'q_' || (g % 20), 'bench.seed', 'cancelled', 2, 2, 0, 25,
         now() - interval '21 hours', now() - interval '21 hours', NULL,
         NULL, NULL, NULL, NULL, now() - (g % 72000) * interval '1 second'",
    ),
    (
        "scheduled",
        80,
        "'q_' || (g % 20), 'bench.seed', 'scheduled', 2, 2, 0, 25,
         now() + interval '1 hour' + (g % 86400) * interval '1 second', now(), NULL,
         NULL, NULL, NULL, NULL, NULL",
    ),
    (
        "running",
        25,
        "'q_' || (g % 20), 'bench.seed', 'running', 2, 2, 1, 25,
         now(), now(), now(), now() + interval '1 hour',
         CASE WHEN g % 4 = 0 THEN now() + interval '1 hour' END, NULL, NULL, NULL",
    ),
    (
        "waiting_external",
        5,
        "'q_' || (g % 20), 'bench.seed', 'waiting_external', 2, 2, 1, 25,
         now(), now(), now(), now(), NULL, gen_random_uuid(),
         now() + interval '1 hour' + (g % 3600) * interval '1 second', NULL",
    ),
];

const COLUMNS: &str = "queue, kind, state, priority, original_priority, attempt, max_attempts,
    run_at, created_at, attempted_at, heartbeat_at, deadline_at, callback_id,
    callback_timeout_at, finalized_at";

async fn seed(client: &Client, rows: i64) -> anyhow::Result<Vec<SeedPart>> {
    let mut parts = Vec::new();
    let mut left = rows;
    for (i, (name, per_mille, select)) in PARTS.iter().enumerate() {
        // The last part takes the rounding remainder, so that the parts add up to `rows`.
        let n = if i + 1 == PARTS.len() {
            left
        } else {
            rows * per_mille / 1000
        };
        left -= n;
        let started = Instant::now();
        client
            .execute(
                &format!("INSERT INTO jobs ({COLUMNS}) SELECT {select} FROM generate_series(1, $1::int8) g"),
                &[&n],
            )
            .await
            .with_context(|| format!("seeding the {name} part"))?;
        parts.push(SeedPart {
            part: (*name).to_owned(),
            rows: n,
            seconds: round2(started.elapsed().as_secs_f64()),
        });
    }
    Ok(parts)
}

async fn growth(client: &Client) -> anyhow::Result<Growth> {
    // The statistics collector's counters of other sessions are flushed at most once a second;
    // a fresh snapshot reads what has been flushed by now.
    let _ = client
        .batch_execute("SELECT pg_stat_clear_snapshot()")
        .await;
    let row = client
        .query_one(
            "SELECT pg_relation_size('jobs'), pg_indexes_size('jobs'), n_live_tup, n_dead_tup,
                    autovacuum_count, autoanalyze_count
             FROM pg_stat_user_tables WHERE relid = 'jobs'::regclass",
            &[],
        )
        .await
        .context("reading pg_stat_user_tables")?;
    let indexes = client
        .query(
            "SELECT indexrelname::text, pg_relation_size(indexrelid)
             FROM pg_stat_user_indexes WHERE relid = 'jobs'::regclass ORDER BY indexrelname",
            &[],
        )
        .await
        .context("reading pg_stat_user_indexes")?
        .iter()
        .map(|r| IndexSize {
            index: r.get(0),
            bytes: r.get(1),
        })
        .collect();
    Ok(Growth {
        table_bytes: row.get(0),
        indexes_bytes: row.get(1),
        live_tuples: row.get(2),
        dead_tuples: row.get(3),
        autovacuum_count: row.get(4),
        autoanalyze_count: row.get(5),
        indexes,
    })
}

/// A `steward run` leader on the same table and flow (the in-process leader has stepped
/// down): its VmRSS, sampled every 100 ms over the window after its first pass.
async fn leader_rss(
    db: &BenchDb,
    bin: &Path,
    s: &Settings,
    rows: i64,
) -> anyhow::Result<(Option<f64>, Option<f64>)> {
    crate::progress(format!(
        "scale: {rows} rows, steward run leading for {:.1} s (RSS)",
        s.rss_window.as_secs_f64()
    ));
    let mut leader = StewardProcess::spawn(bin, &db.url, &[])?;
    leader.wait_message(ACQUIRED, WAIT).await?;
    leader.wait_message(FIRST_PASS, WAIT).await?;
    let pid = leader.pid();
    let started = Instant::now();
    let mut samples = Vec::new();
    while started.elapsed() < s.rss_window {
        if let Some(kib) = rss_kib(pid) {
            samples.push(kib as f64 / 1024.0);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    leader.terminate(Duration::from_secs(10)).await;
    if samples.is_empty() {
        return Ok((None, None));
    }
    let max = samples.iter().copied().fold(0.0, f64::max);
    let mean = samples.iter().sum::<f64>() / samples.len() as f64;
    Ok((Some(round2(max)), Some(round2(mean))))
}

/// A fleet dies holding `dead_runs` runs: they are inserted running with one heartbeat, now,
/// and no worker ever heartbeats them again, so they all expire together one staleness later.
async fn mass_rescue(
    client: &Client,
    s: &Settings,
    recorder: &Recorder,
    rows: i64,
) -> anyhow::Result<MassRescueResult> {
    crate::progress(format!(
        "scale: {rows} rows, {} runs of a dead fleet (staleness {:.1} s)",
        s.dead_runs,
        s.staleness.as_secs_f64()
    ));
    let expiry: f64 = client
        .query_one(
            &format!(
                "WITH dead AS (
                     INSERT INTO jobs ({COLUMNS})
                     SELECT $1, 'bench.dead', 'running', 2, 2, $4::int4, 25, now(), now(), now(),
                            now(), NULL, NULL, NULL, NULL
                     FROM generate_series(1, $2::int8) g
                     RETURNING heartbeat_at)
                 SELECT extract(epoch FROM max(heartbeat_at) + make_interval(secs => $3))::float8
                 FROM dead"
            ),
            &[
                &DEAD_QUEUE,
                &s.dead_runs,
                &s.staleness.as_secs_f64(),
                &if s.dead_last_attempt { 25i32 } else { 1i32 },
            ],
        )
        .await
        .context("inserting the dead fleet's runs")?
        .get(0);
    // The window opens at the runs' expiry, observed on the server's clock.
    loop {
        let now: f64 = client
            .query_one("SELECT extract(epoch FROM clock_timestamp())::float8", &[])
            .await?
            .get(0);
        if now >= expiry {
            break;
        }
        tokio::time::sleep(Duration::from_secs_f64((expiry - now).min(0.05))).await;
    }
    recorder.start();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let left: i64 = client
            .query_one(
                "SELECT count(*) FROM jobs WHERE queue = $1 AND state = 'running'",
                &[&DEAD_QUEUE],
            )
            .await?
            .get(0);
        if left == 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let snapshot = recorder.stop();
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE state <> 'running'),
                    extract(epoch FROM max((errors->-1->>'at')::timestamptz))::float8,
                    extract(epoch FROM min((errors->-1->>'at')::timestamptz))::float8
             FROM jobs WHERE queue = $1",
            &[&DEAD_QUEUE],
        )
        .await
        .context("reading the rescues")?;
    let rescued: i64 = row.get(0);
    let last: Option<f64> = row.get(1);
    let first: Option<f64> = row.get(2);
    let heartbeat = snapshot
        .branches
        .get("rescue_stale_heartbeats")
        .cloned()
        .unwrap_or_default();
    Ok(MassRescueResult {
        table_rows: rows,
        dead_runs: s.dead_runs,
        last_attempt: s.dead_last_attempt,
        staleness_s: s.staleness.as_secs_f64(),
        rescued,
        all_rescued_after_s: if rescued == s.dead_runs {
            last.map(|t| round3(t - expiry))
        } else {
            None
        },
        first_rescued_after_s: first.map(|t| round3(t - expiry)),
        promotion_lag_ms: snapshot.promotion_lags.summary(),
        heartbeat_rescue_passes: heartbeat.runs,
        heartbeat_rescue_pass_ms: heartbeat.duration.summary(),
    })
}

/// Completed jobs of the backlog queue finalized two to three days ago: past the default
/// 24-hour retention. Into the `jobs` of `client`'s `search_path` (the fleet scenario seeds
/// many schemas this way).
pub(crate) async fn insert_backlog(client: &Client, rows: i64) -> anyhow::Result<()> {
    if rows <= 0 {
        return Ok(());
    }
    client
        .execute(
            &format!(
                "INSERT INTO jobs ({COLUMNS})
                 SELECT $1, 'bench.old', 'completed', 2, 2, 1, 25,
                        now() - interval '4 days', now() - interval '4 days',
                        now() - interval '3 days', NULL, NULL, NULL, NULL,
                        now() - interval '2 days' - (g % 86400) * interval '1 second'
                 FROM generate_series(1, $2::int8) g"
            ),
            &[&BACKLOG_QUEUE, &rows],
        )
        .await
        .context("seeding the cleanup backlog")?;
    Ok(())
}

/// Creates the archive partitions of the backlog's days, in `client`'s `search_path` (catalog
/// only), so that cleanup never stops to create one during a timed window.
pub(crate) async fn create_backlog_partitions(client: &Client) -> anyhow::Result<()> {
    client
        .execute(
            "SELECT create_archive_partition(d::date)
             FROM generate_series(current_date - 5, current_date, interval '1 day') d",
            &[],
        )
        .await
        .context("creating archive partitions")?;
    Ok(())
}

async fn backlog_left(client: &Client) -> anyhow::Result<i64> {
    Ok(client
        .query_one(
            "SELECT count(*) FROM jobs WHERE queue = $1",
            &[&BACKLOG_QUEUE],
        )
        .await?
        .get(0))
}

/// Cleanup's work as one plain statement per batch: the same candidates (completed past the
/// default retention, oldest first, after the previous batch's last key), deleted and moved
/// to the archive, each batch its own transaction; no fence, no lock timeout handling.
const PLAIN_CLEANUP: &str = "
WITH picked AS MATERIALIZED (
    SELECT ctid, finalized_at, id FROM jobs
    WHERE state = 'completed' AND finalized_at < now() - interval '24 hours'
      AND (finalized_at, id) > ($2::text::timestamptz, $3::int8)
    ORDER BY finalized_at, id
    LIMIT $1),
gone AS (
    DELETE FROM jobs WHERE ctid = ANY(ARRAY(SELECT ctid FROM picked))
    RETURNING id, queue, kind, state, original_priority, attempt, max_attempts, run_at,
              created_at, attempted_at, finalized_at, unique_key, args, errors),
archived AS (
    INSERT INTO job_archive (id, queue, kind, state, priority, attempt, max_attempts, run_at,
                             created_at, attempted_at, finalized_at, unique_key, args, errors)
    SELECT id, queue, kind, state, original_priority, attempt, max_attempts, run_at,
           created_at, attempted_at, finalized_at, unique_key, args, errors
    FROM gone)
SELECT (SELECT count(*) FROM gone),
       (SELECT finalized_at::text FROM picked ORDER BY finalized_at DESC, id DESC LIMIT 1),
       (SELECT id FROM picked ORDER BY finalized_at DESC, id DESC LIMIT 1)";

async fn hygiene(
    db: &BenchDb,
    client: &Client,
    s: &Settings,
    params: &Params,
    config: &BranchesConfig,
    rows: i64,
) -> anyhow::Result<HygieneResult> {
    crate::progress(format!(
        "scale: {rows} rows, seeding a cleanup backlog of {} rows",
        s.backlog_rows
    ));
    // The archive partitions of the backlog's days exist before any timed work (catalog only),
    // so that cleanup and the plain statement move rows into the same tables.
    create_backlog_partitions(client).await?;
    let started = Instant::now();
    insert_backlog(client, s.backlog_rows).await?;
    let seed_s = started.elapsed().as_secs_f64();
    let mut modes = Vec::new();
    for mode in [LoopMode::Split, LoopMode::Monolithic] {
        // Each mode starts from the full backlog and a vacuumed table.
        let left = backlog_left(client).await?;
        insert_backlog(client, s.backlog_rows - left).await?;
        settle(client).await?;
        crate::progress(format!(
            "scale: {rows} rows, cleanup backlog, {} mode, {:.0} s warm-up + {:.0} s window",
            mode.as_str(),
            s.warmup.as_secs_f64(),
            s.window.as_secs_f64()
        ));
        let workload = start_flow(db, s, params, s.rates[0]).await?;
        let (leader, recorder) = start_leader(db, config, mode).await?;
        tokio::time::sleep(s.warmup).await;
        recorder.start();
        let window_started = Instant::now();
        tokio::time::sleep(s.window).await;
        let snapshot = recorder.stop();
        let window_s = window_started.elapsed().as_secs_f64();
        leader.stop().await?;
        let backlog_left = backlog_left(client).await?;
        let _ = workload.stop().await;
        let cleanup = snapshot
            .branches
            .get("cleanup")
            .cloned()
            .unwrap_or_default();
        let busy_s = cleanup
            .duration
            .summary()
            .mean
            .map(|ms| ms * cleanup.runs as f64 / 1000.0);
        modes.push(HygieneMode {
            mode: mode.as_str().to_owned(),
            window_s: round2(window_s),
            slo_start_delay_ms: snapshot.slo_start_delays().summary(),
            slo_overruns: snapshot
                .branches
                .values()
                .filter(|b| b.slo)
                .map(|b| b.overruns)
                .sum(),
            promotion_lag_ms: snapshot.promotion_lags.summary(),
            slo: slo_numbers(&snapshot),
            cleanup_runs: cleanup.runs,
            cleanup_rows: cleanup.rows,
            cleanup_rows_per_s: (cleanup.rows as f64 / window_s).round(),
            cleanup_busy_rows_per_s: busy_s
                .filter(|s| *s > 0.0)
                .map(|s| (cleanup.rows as f64 / s).round()),
            backlog_left,
        });
    }

    // The plain statement moves as many rows as split cleanup did in its window (at least one
    // batch), from a full backlog and a vacuumed table, with nothing else running.
    let left = backlog_left(client).await?;
    insert_backlog(client, s.backlog_rows - left).await?;
    settle(client).await?;
    let split_rows = modes.first().map(|m| m.cleanup_rows as i64).unwrap_or(0);
    // At least one batch, at most the backlog (which may be empty: `--scale-backlog-rows 0`).
    let target = split_rows.max(CLEANUP_BATCH).min(s.backlog_rows);
    crate::progress(format!(
        "scale: {rows} rows, plain SQL cleanup of {target} rows in batches of {CLEANUP_BATCH}"
    ));
    let statement = client.prepare(PLAIN_CLEANUP).await?;
    let (mut moved, mut key) = (0i64, ("-infinity".to_owned(), 0i64));
    let started = Instant::now();
    while moved < target {
        let row = client
            .query_one(&statement, &[&CLEANUP_BATCH, &key.0, &key.1])
            .await
            .context("the plain cleanup batch")?;
        let n: i64 = row.get(0);
        let (Some(at), Some(id)) = (
            row.get::<_, Option<String>>(1),
            row.get::<_, Option<i64>>(2),
        ) else {
            break;
        };
        moved += n;
        key = (at, id);
    }
    let seconds = started.elapsed().as_secs_f64();
    let plain = PlainCleanup {
        rows: moved,
        batch_size: CLEANUP_BATCH,
        seconds: round3(seconds),
        rows_per_s: (moved as f64 / seconds.max(1e-9)).round(),
        sql: PLAIN_CLEANUP.trim().to_owned(),
    };
    let split_busy_vs_plain = ratio(
        modes.first().and_then(|m| m.cleanup_busy_rows_per_s),
        Some(plain.rows_per_s),
    );
    Ok(HygieneResult {
        table_rows: rows,
        backlog_rows: s.backlog_rows,
        seed_s: round2(seed_s),
        modes,
        plain,
        split_busy_vs_plain,
    })
}

fn mib(bytes: i64) -> String {
    num(bytes as f64 / 1024.0 / 1024.0)
}

pub fn render(r: &ScaleResult) -> String {
    let mut out = String::new();
    let p = &r.params;
    let _ = writeln!(
        out,
        "scale: sizes {:?} rows, rates {:?} jobs/s (the first at every size, the rest at the largest), {:.0} s window after {:.0} s warm-up, due over {:.0} s, {} producers, {} workers",
        p.sizes, p.rates, p.window_s, p.warmup_s, p.horizon_s, p.producers, p.workers
    );
    let _ = writeln!(out, "  branch settings: {}", p.config_changes.join("; "));
    let mut rows = vec![[
        "rows",
        "completed",
        "failed",
        "cancelled",
        "scheduled",
        "running",
        "waiting",
        "seed s",
        "rows/s",
        "VACUUM ANALYZE s",
    ]
    .map(str::to_owned)
    .to_vec()];
    for size in &r.sizes {
        let mut row = vec![size.rows.to_string()];
        for part in [
            "completed",
            "failed",
            "cancelled",
            "scheduled",
            "running",
            "waiting_external",
        ] {
            row.push(
                size.seed_parts
                    .iter()
                    .find(|p| p.part == part)
                    .map(|p| p.rows.to_string())
                    .unwrap_or_default(),
            );
        }
        row.push(num(size.seed_s));
        row.push(num(size.rows as f64 / size.seed_s.max(1e-9)));
        row.push(num(size.vacuum_analyze_s));
        rows.push(row);
    }
    out.push_str(&table(&rows));

    let mut rows = vec![[
        "rows",
        "jobs/s",
        "achieved",
        "lag p50 ms",
        "p99 ms",
        "max ms",
        "promote pass p99 ms",
        "heartbeats p99",
        "deadlines p99",
        "callbacks p99",
        "completed",
    ]
    .map(str::to_owned)
    .to_vec()];
    for size in &r.sizes {
        for flow in &size.flows {
            let mut row = vec![
                size.rows.to_string(),
                num(flow.rate),
                num(flow.achieved_rate),
                opt(flow.promotion_lag_ms.p50),
                opt(flow.promotion_lag_ms.p99),
                opt(flow.promotion_lag_ms.max),
            ];
            for b in &flow.slo {
                row.push(format!("{} ({})", opt(b.duration_ms.p99), b.runs));
            }
            row.push(flow.workload.completed.to_string());
            rows.push(row);
        }
    }
    out.push_str(&table(&rows));
    let _ = writeln!(
        out,
        "  pass duration p99 in ms, passes in the window in brackets"
    );

    let mut rows = vec![[
        "rows",
        "when",
        "table MiB",
        "indexes MiB",
        "live",
        "dead",
        "autovacuums",
        "autoanalyzes",
        "leader RSS max MiB",
    ]
    .map(str::to_owned)
    .to_vec()];
    for size in &r.sizes {
        let mut phases = vec![("seeded", &size.before), ("after flow", &size.after_flow)];
        if let Some(all) = &size.after_all {
            phases.push(("after all", all));
        }
        for (i, (when, g)) in phases.into_iter().enumerate() {
            rows.push(vec![
                if i == 0 {
                    size.rows.to_string()
                } else {
                    String::new()
                },
                when.to_owned(),
                mib(g.table_bytes),
                mib(g.indexes_bytes),
                g.live_tuples.to_string(),
                g.dead_tuples.to_string(),
                g.autovacuum_count.to_string(),
                g.autoanalyze_count.to_string(),
                if i == 1 {
                    opt(size.leader_rss_mib_max)
                } else {
                    String::new()
                },
            ]);
        }
    }
    out.push_str(&table(&rows));
    if let Some(size) = r.sizes.last() {
        let g = size.after_all.as_ref().unwrap_or(&size.after_flow);
        let mut rows = vec![vec![
            format!("index at {} rows", size.rows),
            "seeded MiB".to_owned(),
            "at the end MiB".to_owned(),
        ]];
        for index in &g.indexes {
            let before = size
                .before
                .indexes
                .iter()
                .find(|i| i.index == index.index)
                .map(|i| mib(i.bytes))
                .unwrap_or_default();
            rows.push(vec![index.index.clone(), before, mib(index.bytes)]);
        }
        out.push_str(&table(&rows));
    }

    let m = &r.mass_rescue;
    let _ = writeln!(
        out,
        "mass rescue at {} rows: {} running runs{} stop heartbeating at once (staleness {:.1} s); {} rescued, first {} s and last {} s after expiry; promotion lag meanwhile p50/p99/max {}/{}/{} ms; {} heartbeat rescue passes, p99 {} ms",
        m.table_rows,
        m.dead_runs,
        if m.last_attempt {
            " on their last attempt (rescued to failed, no retries)"
        } else {
            ""
        },
        m.staleness_s,
        m.rescued,
        opt(m.first_rescued_after_s),
        opt(m.all_rescued_after_s),
        opt(m.promotion_lag_ms.p50),
        opt(m.promotion_lag_ms.p99),
        opt(m.promotion_lag_ms.max),
        m.heartbeat_rescue_passes,
        opt(m.heartbeat_rescue_pass_ms.p99),
    );

    let h = &r.hygiene;
    let _ = writeln!(
        out,
        "hygiene at {} rows: a cleanup backlog of {} rows past retention (seeded in {} s), topped up before each mode",
        h.table_rows,
        h.backlog_rows,
        num(h.seed_s)
    );
    let mut rows = vec![[
        "mode",
        "SLO delay p50 ms",
        "p99 ms",
        "max ms",
        "overruns",
        "lag p50 ms",
        "lag p99 ms",
        "lag max ms",
        "cleanup rows",
        "rows/s",
        "busy rows/s",
        "backlog left",
    ]
    .map(str::to_owned)
    .to_vec()];
    for mode in &h.modes {
        rows.push(vec![
            mode.mode.clone(),
            opt(mode.slo_start_delay_ms.p50),
            opt(mode.slo_start_delay_ms.p99),
            opt(mode.slo_start_delay_ms.max),
            mode.slo_overruns.to_string(),
            opt(mode.promotion_lag_ms.p50),
            opt(mode.promotion_lag_ms.p99),
            opt(mode.promotion_lag_ms.max),
            mode.cleanup_rows.to_string(),
            num(mode.cleanup_rows_per_s),
            opt(mode.cleanup_busy_rows_per_s),
            mode.backlog_left.to_string(),
        ]);
    }
    out.push_str(&table(&rows));
    let _ = writeln!(
        out,
        "  plain SQL, batches of {} with nothing else running: {} rows in {} s, {} rows/s; split cleanup's busy rows/s ÷ plain {}",
        h.plain.batch_size,
        h.plain.rows,
        num(h.plain.seconds),
        num(h.plain.rows_per_s),
        ratio_cell(h.split_busy_vs_plain)
    );
    out
}
