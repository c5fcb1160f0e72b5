//! Scenario 1, isolation: the same workload and the same slow hygiene, first under a split-mode
//! leader, then under a monolithic one. Hygiene is slow for real (a backlog of expired
//! terminal jobs for `cleanup`, kept topped up; a large table that `refresh_admin_metadata`
//! counts in full) plus, for repeatability, a bench-only hygiene branch that holds a
//! transaction in `pg_sleep`. What is measured is what the SLO branches feel: start delay,
//! overrun episodes and promotion lag.

use crate::db::{settle, BenchDb, Pg};
use crate::hist::{ratio, Hist, Quantiles};
use crate::injected::InjectedDelay;
use crate::leader::Leader;
use crate::recorder::{BranchStats, Recorder, Snapshot};
use crate::report::{opt, ratio_cell, table, Target};
use anyhow::Context;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use steward_branches::cleanup::RetentionOverride;
use steward_branches::{Branch, BranchesConfig};
use steward_leader::{LeaderSettings, LoopMode};
use steward_worker::WorkerSettings;
use steward_workload::{Behaviour, Stats as WorkloadStats, Timings, Workload, WorkloadConfig};
use tokio_util::sync::CancellationToken;

pub const QUEUE: &str = "bench";
const BACKLOG_QUEUE: &str = "backlog";
const SEED_CHUNK: i64 = 100_000;
const REFILL_EVERY: Duration = Duration::from_millis(500);
const REFILL_CHUNK: i64 = 20_000;

#[derive(Debug, Clone, Serialize)]
pub struct Params {
    pub window_s: f64,
    pub warmup_s: f64,
    /// Workload: scheduled jobs per second, due uniformly over `horizon_s`.
    pub rate: f64,
    pub horizon_s: f64,
    pub workers: usize,
    /// Completed jobs past retention waiting for cleanup at the start.
    pub backlog_rows: i64,
    /// Whether the backlog is topped up to `backlog_rows` while the window runs.
    pub backlog_refill: bool,
    /// Completed jobs within retention: the table `refresh_admin_metadata` counts in full.
    pub table_rows: i64,
    /// The bench-only hygiene branch's pg_sleep per pass (0: not installed).
    pub inject_hygiene_delay_ms: u64,
    pub inject_interval_ms: u64,
    /// Branch settings that differ from the defaults, as `key = value`.
    pub config_changes: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BranchNumbers {
    pub branch: String,
    #[serde(rename = "loop")]
    pub class: String,
    pub runs: u64,
    pub rows: u64,
    pub start_delay_ms: Quantiles,
    /// Start delay minus the time the loop was still busy with its previous pass.
    pub wake_delay_ms: Quantiles,
    pub duration_ms: Quantiles,
    pub overruns: u64,
    pub delayed_runs: u64,
    pub timeouts: u64,
    pub errors: u64,
    pub last_error: Option<String>,
}

impl BranchNumbers {
    fn of(name: &str, stats: &BranchStats) -> Self {
        BranchNumbers {
            branch: name.to_owned(),
            class: if stats.slo { "slo" } else { "hygiene" }.to_owned(),
            runs: stats.runs,
            rows: stats.rows,
            start_delay_ms: stats.start_delay.summary(),
            wake_delay_ms: stats.wake_delay.summary(),
            duration_ms: stats.duration.summary(),
            overruns: stats.overruns,
            delayed_runs: stats.delayed_runs,
            timeouts: stats.timeouts,
            errors: stats.errors,
            last_error: stats.last_error.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ModeResult {
    pub mode: String,
    pub window_s: f64,
    pub branches: Vec<BranchNumbers>,
    /// All SLO branches together.
    pub slo_start_delay_ms: Quantiles,
    pub slo_wake_delay_ms: Quantiles,
    pub slo_overruns: u64,
    pub promotion_lag_ms: Quantiles,
    /// The longest hygiene pass in the window (any hygiene branch).
    pub hygiene_max_pass_ms: Option<f64>,
    /// Rows inserted into the cleanup backlog during the run to keep it topped up.
    pub backlog_refilled_rows: u64,
    pub workload: WorkloadStats,
}

#[derive(Debug, Clone, Serialize)]
pub struct Ratios {
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    pub max: Option<f64>,
}

impl Ratios {
    fn of(mono: &Quantiles, split: &Quantiles) -> Self {
        Ratios {
            p50: ratio(mono.p50, split.p50),
            p99: ratio(mono.p99, split.p99),
            max: ratio(mono.max, split.max),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SloRow {
    pub branch: String,
    pub split_start_delay_ms: Quantiles,
    pub monolithic_start_delay_ms: Quantiles,
    pub split_overruns: u64,
    pub monolithic_overruns: u64,
    pub split_delayed_runs: u64,
    pub monolithic_delayed_runs: u64,
    /// monolithic / split.
    pub start_delay_ratio: Ratios,
    /// Only promote_scheduled reports lags; null quantiles for the rescues.
    pub split_promotion_lag_ms: Quantiles,
    pub monolithic_promotion_lag_ms: Quantiles,
    pub promotion_lag_ratio: Ratios,
}

#[derive(Debug, Clone, Serialize)]
pub struct IsolationResult {
    pub params: Params,
    pub seed_s: f64,
    pub split: ModeResult,
    pub monolithic: ModeResult,
    pub slo_branches: Vec<SloRow>,
    pub slo_all_start_delay_ratio: Ratios,
}

/// Distributions for the plot.
pub struct IsolationCurves {
    pub split_start_delay: Hist,
    pub monolithic_start_delay: Hist,
    pub split_lag: Hist,
    pub monolithic_lag: Hist,
}

pub struct Settings {
    pub window: Duration,
    pub warmup: Duration,
    pub rate: f64,
    pub horizon: Duration,
    pub backlog_rows: i64,
    pub table_rows: i64,
    pub refill: bool,
    pub inject_delay: Duration,
}

fn branch_config() -> (BranchesConfig, Vec<String>) {
    let mut b = BranchesConfig::default();
    let second = Duration::from_secs(1);
    b.rescue_stale_heartbeats.staleness = Duration::from_secs(3);
    // 1 s like the other rescues: at the default 5 s a window holds 36 passes, and their p99
    // is just the worst one.
    b.rescue_stale_heartbeats.interval = second;
    b.rescue_stale_heartbeats.quiet_period = Some(second);
    b.rescue_expired_deadlines.quiet_period = second;
    b.rescue_expired_callbacks.quiet_period = second;
    b.cleanup.interval = Duration::from_secs(2);
    let short = Some(Duration::from_secs(30));
    b.cleanup.queues.insert(
        QUEUE.to_owned(),
        RetentionOverride {
            completed: short,
            failed: short,
            cancelled: short,
        },
    );
    b.refresh_admin_metadata.interval = Duration::from_secs(2);
    let changes = vec![
        "rescue_stale_heartbeats.staleness = 3s".to_owned(),
        "rescue_stale_heartbeats.interval = 1s (180 passes per 3-minute window, not 36)".to_owned(),
        "rescue_stale_heartbeats.quiet_period = 1s".to_owned(),
        "rescue_expired_deadlines.quiet_period = 1s".to_owned(),
        "rescue_expired_callbacks.quiet_period = 1s".to_owned(),
        "cleanup.interval = 2s".to_owned(),
        format!("cleanup.queues.{QUEUE} = 30s for every final state (the workload's own jobs expire during the run)"),
        "refresh_admin_metadata.interval = 2s".to_owned(),
    ];
    (b, changes)
}

fn inject_interval(delay: Duration) -> Duration {
    (delay * 2).max(Duration::from_secs(1))
}

pub async fn run(
    pg: &Pg,
    s: &Settings,
) -> anyhow::Result<(IsolationResult, IsolationCurves, Vec<Target>)> {
    let (config, config_changes) = branch_config();
    let problems = config.validate();
    anyhow::ensure!(problems.is_empty(), "bench branch config: {problems:?}");
    let params = Params {
        window_s: s.window.as_secs_f64(),
        warmup_s: s.warmup.as_secs_f64(),
        rate: s.rate,
        horizon_s: s.horizon.as_secs_f64(),
        workers: 4,
        backlog_rows: s.backlog_rows,
        backlog_refill: s.refill,
        table_rows: s.table_rows,
        inject_hygiene_delay_ms: s.inject_delay.as_millis() as u64,
        inject_interval_ms: if s.inject_delay.is_zero() {
            0
        } else {
            inject_interval(s.inject_delay).as_millis() as u64
        },
        config_changes,
    };

    crate::progress(format!(
        "isolation: seeding {} table rows and {} backlog rows",
        s.table_rows, s.backlog_rows
    ));
    let seed_started = Instant::now();
    let template = pg.create("iso_tmpl").await?;
    let seeded = seed(&template, s).await;
    if let Err(error) = seeded {
        pg.drop_db(template).await;
        return Err(error);
    }
    let seed_s = seed_started.elapsed().as_secs_f64();

    let mut results = Vec::new();
    for mode in [LoopMode::Split, LoopMode::Monolithic] {
        crate::progress(format!(
            "isolation: {} mode, {:.0} s warm-up + {:.0} s window",
            mode.as_str(),
            s.warmup.as_secs_f64(),
            s.window.as_secs_f64()
        ));
        let db = match pg
            .clone_of(&template, &format!("iso_{}", mode.as_str()))
            .await
        {
            Ok(db) => db,
            Err(error) => {
                pg.drop_db(template).await;
                return Err(error);
            }
        };
        let result = run_mode(&db, s, &params, &config, mode).await;
        pg.drop_db(db).await;
        match result {
            Ok(r) => results.push(r),
            Err(error) => {
                pg.drop_db(template).await;
                return Err(error.context(format!("isolation, {} mode", mode.as_str())));
            }
        }
    }
    pg.drop_db(template).await;
    let (mono_result, mono_snap) = results.pop().context("monolithic result")?;
    let (split_result, split_snap) = results.pop().context("split result")?;

    let mut slo_names: Vec<&'static str> = split_snap
        .branches
        .iter()
        .chain(mono_snap.branches.iter())
        .filter(|(_, s)| s.slo)
        .map(|(n, _)| *n)
        .collect();
    slo_names.sort();
    slo_names.dedup();
    let empty = BranchStats::default();
    let slo_branches: Vec<SloRow> = slo_names
        .iter()
        .map(|name| {
            let split = split_snap.branches.get(name).unwrap_or(&empty);
            let mono = mono_snap.branches.get(name).unwrap_or(&empty);
            let (split_lag, mono_lag) = if *name == "promote_scheduled" {
                (
                    split_snap.promotion_lags.summary(),
                    mono_snap.promotion_lags.summary(),
                )
            } else {
                (Quantiles::default(), Quantiles::default())
            };
            SloRow {
                branch: name.to_string(),
                split_start_delay_ms: split.start_delay.summary(),
                monolithic_start_delay_ms: mono.start_delay.summary(),
                split_overruns: split.overruns,
                monolithic_overruns: mono.overruns,
                split_delayed_runs: split.delayed_runs,
                monolithic_delayed_runs: mono.delayed_runs,
                start_delay_ratio: Ratios::of(
                    &mono.start_delay.summary(),
                    &split.start_delay.summary(),
                ),
                promotion_lag_ratio: Ratios::of(&mono_lag, &split_lag),
                split_promotion_lag_ms: split_lag,
                monolithic_promotion_lag_ms: mono_lag,
            }
        })
        .collect();

    let mut targets = Vec::new();
    for row in &slo_branches {
        targets.push(Target::below(
            format!("split: {} start delay p99", row.branch),
            row.split_start_delay_ms.p99,
            10.0,
            "ms",
        ));
    }
    targets.push(Target::below(
        "split: all SLO branches start delay p99",
        split_result.slo_start_delay_ms.p99,
        10.0,
        "ms",
    ));
    targets.push(Target::below(
        "split: all SLO branches wake delay p99 (supplementary: start delay after the loop was free)",
        split_result.slo_wake_delay_ms.p99,
        10.0,
        "ms",
    ));
    targets.push(Target::equals(
        "split: SLO overruns",
        Some(split_result.slo_overruns as f64),
        0.0,
        "",
    ));
    targets.push(Target::at_least(
        "precondition: split hygiene passes take seconds (longest pass)",
        split_result.hygiene_max_pass_ms.map(|ms| ms / 1000.0),
        1.0,
        "s",
    ));

    let curves = IsolationCurves {
        split_start_delay: split_snap.slo_start_delays(),
        monolithic_start_delay: mono_snap.slo_start_delays(),
        split_lag: split_snap.promotion_lags.clone(),
        monolithic_lag: mono_snap.promotion_lags.clone(),
    };
    let result = IsolationResult {
        slo_all_start_delay_ratio: Ratios::of(
            &mono_result.slo_start_delay_ms,
            &split_result.slo_start_delay_ms,
        ),
        params,
        seed_s,
        split: split_result,
        monolithic: mono_result,
        slo_branches,
    };
    Ok((result, curves, targets))
}

/// The large table (completed within retention, in ten queues) and the expired backlog.
async fn seed(db: &BenchDb, s: &Settings) -> anyhow::Result<()> {
    let client = db.client().await?;
    let mut done = 0;
    while done < s.table_rows {
        let n = (s.table_rows - done).min(SEED_CHUNK);
        client
            .execute(
                "INSERT INTO jobs (queue, kind, state, priority, original_priority, attempt,
                                   max_attempts, run_at, created_at, attempted_at, finalized_at)
                 SELECT 'bulk_' || (g % 10), 'bench.bulk', 'completed', 2, 2, 1, 25,
                        now() - interval '3 hours', now() - interval '3 hours',
                        now() - interval '2 hours',
                        now() - interval '1 hour' - (g % 3600) * interval '1 second'
                 FROM generate_series($1::int8, $2::int8) g",
                &[&done, &(done + n - 1)],
            )
            .await
            .context("seeding the large table")?;
        done += n;
    }
    insert_backlog(&client, s.backlog_rows).await?;
    settle(&client).await
}

/// Completed jobs finalized 2-3 days ago: past the default 24 h retention.
async fn insert_backlog(client: &tokio_postgres::Client, rows: i64) -> anyhow::Result<u64> {
    let mut done = 0;
    while done < rows {
        let n = (rows - done).min(SEED_CHUNK);
        client
            .execute(
                "INSERT INTO jobs (queue, kind, state, priority, original_priority, attempt,
                                   max_attempts, run_at, created_at, attempted_at, finalized_at)
                 SELECT $1, 'bench.old', 'completed', 2, 2, 1, 25,
                        now() - interval '4 days', now() - interval '4 days',
                        now() - interval '3 days',
                        now() - interval '2 days' - (g % 86400) * interval '1 second'
                 FROM generate_series(1, $2::int8) g",
                &[&BACKLOG_QUEUE, &n],
            )
            .await
            .context("seeding the cleanup backlog")?;
        done += n;
    }
    Ok(done as u64)
}

/// Keeps the cleanup backlog near `target` rows: what cleanup archives is put back.
async fn refill(
    db_client: tokio_postgres::Client,
    target: i64,
    added: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(REFILL_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let count: i64 = match db_client
            .query_one(
                "SELECT count(*) FROM jobs WHERE queue = $1 AND state = 'completed'",
                &[&BACKLOG_QUEUE],
            )
            .await
        {
            Ok(row) => row.get(0),
            Err(_) => continue,
        };
        let missing = (target - count).min(REFILL_CHUNK);
        if missing > 0 {
            if let Ok(n) = insert_backlog(&db_client, missing).await {
                added.fetch_add(n, Ordering::Relaxed);
            }
        }
    }
}

async fn run_mode(
    db: &BenchDb,
    s: &Settings,
    params: &Params,
    config: &BranchesConfig,
    mode: LoopMode,
) -> anyhow::Result<(ModeResult, Snapshot)> {
    // Due uniformly over the horizon; a few first attempts misbehave so that every rescue
    // branch has work: 2% slow (held 1 s), 1% crash, 1% overrun a 200 ms run timeout (blocked
    // 1 s), 1% parked on a callback nobody answers (300 ms). Normal jobs complete when claimed.
    let workload_config = WorkloadConfig {
        queue: QUEUE.to_owned(),
        kind: "bench.work".to_owned(),
        rate: s.rate,
        producers: 1,
        mix: vec![
            (Behaviour::Slow, 2),
            (Behaviour::Crash, 1),
            (Behaviour::Overrun, 1),
            (Behaviour::Unanswered, 1),
        ],
        scheduled_percent: 100,
        due_in: (Duration::ZERO, s.horizon),
        max_attempts: 5,
        workers: params.workers,
        concurrency: 50,
        worker: WorkerSettings {
            heartbeat_interval: Duration::from_millis(500),
            claim_batch: 50,
            poll_interval: Duration::from_millis(50),
            shutdown_grace: Duration::from_secs(1),
            ..WorkerSettings::default()
        },
        timings: Timings {
            work: (Duration::ZERO, Duration::ZERO),
            slow_for: Duration::from_secs(1),
            overrun_timeout: Duration::from_millis(200),
            overrun_by: Duration::from_millis(800),
            unanswered_timeout: Duration::from_millis(300),
            ..Timings::default()
        },
        ..WorkloadConfig::default()
    };
    let queue = db.queue(params.workers + 4, "steward-bench:workload")?;
    Workload::prefill(&queue, &workload_config).await?;

    let mut branches: Vec<Arc<dyn Branch>> = config.build();
    if !s.inject_delay.is_zero() {
        branches.push(Arc::new(InjectedDelay {
            delay: s.inject_delay,
            interval: inject_interval(s.inject_delay),
        }));
    }
    let settings = LeaderSettings {
        loop_mode: mode,
        shutdown_grace: Duration::from_secs(1),
        ..LeaderSettings::default()
    };
    let recorder = Arc::new(Recorder::default());
    let leader = Leader::start(&db.url, &db.schema, settings, branches, recorder.clone()).await?;
    let workload = Workload::start(queue, &db.target()?, workload_config).await?;
    let refill_stop = CancellationToken::new();
    let refilled = Arc::new(AtomicU64::new(0));
    let refill_task = if s.refill && s.backlog_rows > 0 {
        Some(tokio::spawn(refill(
            db.client().await?,
            s.backlog_rows,
            refilled.clone(),
            refill_stop.clone(),
        )))
    } else {
        None
    };

    tokio::time::sleep(s.warmup).await;
    recorder.start();
    let window_started = Instant::now();
    tokio::time::sleep(s.window).await;
    let snapshot = recorder.stop();
    let window_s = window_started.elapsed().as_secs_f64();

    refill_stop.cancel();
    if let Some(task) = refill_task {
        let _ = task.await;
    }
    let workload = workload.stop().await.stats();
    leader.stop().await?;

    let branches: Vec<BranchNumbers> = snapshot
        .branches
        .iter()
        .map(|(name, stats)| BranchNumbers::of(name, stats))
        .collect();
    let hygiene_max_pass_ms = snapshot
        .branches
        .values()
        .filter(|b| !b.slo)
        .filter_map(|b| b.duration.summary().max)
        .reduce(f64::max);
    let result = ModeResult {
        mode: mode.as_str().to_owned(),
        window_s,
        slo_start_delay_ms: snapshot.slo_start_delays().summary(),
        slo_wake_delay_ms: snapshot.slo_wake_delays().summary(),
        slo_overruns: snapshot
            .branches
            .values()
            .filter(|b| b.slo)
            .map(|b| b.overruns)
            .sum(),
        promotion_lag_ms: snapshot.promotion_lags.summary(),
        hygiene_max_pass_ms,
        backlog_refilled_rows: refilled.load(Ordering::Relaxed),
        branches,
        workload,
    };
    Ok((result, snapshot))
}

pub fn render(r: &IsolationResult) -> String {
    let mut out = String::new();
    let p = &r.params;
    let _ = writeln!(
        out,
        "isolation: split vs monolithic, {:.0} s window each after {:.0} s warm-up; workload {} jobs/s due over {:.0} s, {} workers",
        p.window_s, p.warmup_s, p.rate, p.horizon_s, p.workers
    );
    let _ = writeln!(
        out,
        "  hygiene made slow: cleanup backlog {} rows{}, table {} rows, injected pg_sleep {} ms every {} ms",
        p.backlog_rows,
        if p.backlog_refill { " (kept topped up)" } else { "" },
        p.table_rows,
        p.inject_hygiene_delay_ms,
        p.inject_interval_ms
    );
    let mut rows = vec![vec![
        "SLO branch".to_owned(),
        "mode".to_owned(),
        "runs".to_owned(),
        "delay p50 ms".to_owned(),
        "p99 ms".to_owned(),
        "max ms".to_owned(),
        "overruns".to_owned(),
        "delayed runs".to_owned(),
        "lag p50 ms".to_owned(),
        "lag p99 ms".to_owned(),
        "lag max ms".to_owned(),
    ]];
    let runs = |m: &ModeResult, name: &str| {
        m.branches
            .iter()
            .find(|b| b.branch == name)
            .map(|b| b.runs.to_string())
            .unwrap_or_else(|| "0".into())
    };
    for row in &r.slo_branches {
        rows.push(vec![
            row.branch.clone(),
            "split".into(),
            runs(&r.split, &row.branch),
            opt(row.split_start_delay_ms.p50),
            opt(row.split_start_delay_ms.p99),
            opt(row.split_start_delay_ms.max),
            row.split_overruns.to_string(),
            row.split_delayed_runs.to_string(),
            opt(row.split_promotion_lag_ms.p50),
            opt(row.split_promotion_lag_ms.p99),
            opt(row.split_promotion_lag_ms.max),
        ]);
        rows.push(vec![
            "".into(),
            "monolithic".into(),
            runs(&r.monolithic, &row.branch),
            opt(row.monolithic_start_delay_ms.p50),
            opt(row.monolithic_start_delay_ms.p99),
            opt(row.monolithic_start_delay_ms.max),
            row.monolithic_overruns.to_string(),
            row.monolithic_delayed_runs.to_string(),
            opt(row.monolithic_promotion_lag_ms.p50),
            opt(row.monolithic_promotion_lag_ms.p99),
            opt(row.monolithic_promotion_lag_ms.max),
        ]);
        rows.push(vec![
            "".into(),
            "mono/split".into(),
            "".into(),
            ratio_cell(row.start_delay_ratio.p50),
            ratio_cell(row.start_delay_ratio.p99),
            ratio_cell(row.start_delay_ratio.max),
            "".into(),
            "".into(),
            ratio_cell(row.promotion_lag_ratio.p50),
            ratio_cell(row.promotion_lag_ratio.p99),
            ratio_cell(row.promotion_lag_ratio.max),
        ]);
    }
    out.push_str(&table(&rows));

    let mut rows = vec![vec![
        "hygiene branch".to_owned(),
        "mode".to_owned(),
        "runs".to_owned(),
        "rows".to_owned(),
        "pass p50 ms".to_owned(),
        "pass max ms".to_owned(),
        "timeouts".to_owned(),
        "errors".to_owned(),
    ]];
    let mut hygiene: BTreeMap<&str, Vec<(&str, &BranchNumbers)>> = BTreeMap::new();
    for m in [&r.split, &r.monolithic] {
        for b in m.branches.iter().filter(|b| b.class == "hygiene") {
            hygiene.entry(&b.branch).or_default().push((&m.mode, b));
        }
    }
    for (name, modes) in hygiene {
        for (i, (mode, b)) in modes.iter().enumerate() {
            rows.push(vec![
                if i == 0 {
                    name.to_owned()
                } else {
                    String::new()
                },
                mode.to_string(),
                b.runs.to_string(),
                b.rows.to_string(),
                opt(b.duration_ms.p50),
                opt(b.duration_ms.max),
                b.timeouts.to_string(),
                b.errors.to_string(),
            ]);
        }
    }
    out.push_str(&table(&rows));
    for m in [&r.split, &r.monolithic] {
        let _ = writeln!(
            out,
            "  {}: all SLO branches start delay p50/p99/max {}/{}/{} ms, of which after the loop's previous pass had ended (wake delay) {}/{}/{} ms",
            m.mode,
            opt(m.slo_start_delay_ms.p50),
            opt(m.slo_start_delay_ms.p99),
            opt(m.slo_start_delay_ms.max),
            opt(m.slo_wake_delay_ms.p50),
            opt(m.slo_wake_delay_ms.p99),
            opt(m.slo_wake_delay_ms.max),
        );
    }
    for m in [&r.split, &r.monolithic] {
        let _ = writeln!(
            out,
            "  {}: workload enqueued {} claimed {} completed {} (crashed {}, overran {}, parked {}), backlog refilled {} rows, workload errors {}",
            m.mode,
            m.workload.enqueued,
            m.workload.claimed,
            m.workload.completed,
            m.workload.crashed,
            m.workload.overran,
            m.workload.parked,
            m.backlog_refilled_rows,
            m.workload.errors
        );
    }
    out
}
