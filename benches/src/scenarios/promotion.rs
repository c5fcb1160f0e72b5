//! Scenario 2, promotion lag: producers enqueue jobs due at uniform random times over the next
//! `horizon` at a fixed rate; a default-configured split-mode leader promotes them; workers
//! claim and complete them. The lag of each job is now − run_at computed by the promoting
//! UPDATE itself (clock_timestamp(), `Observation::PromotionLags`).

use crate::db::Pg;
use crate::hist::{Hist, Quantiles};
use crate::leader::Leader;
use crate::recorder::Recorder;
use crate::report::{num, opt, table, Target};
use serde::Serialize;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};
use steward_branches::BranchesConfig;
use steward_leader::LeaderSettings;
use steward_queue::Queue;
use steward_worker::WorkerSettings;
use steward_workload::{Stats as WorkloadStats, Timings, Workload, WorkloadConfig};

const QUEUE: &str = "bench";

pub struct Settings {
    pub rate: f64,
    pub horizon: Duration,
    pub window: Duration,
    pub warmup: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct PromotionResult {
    pub rate: f64,
    pub horizon_s: f64,
    pub window_s: f64,
    pub warmup_s: f64,
    pub producers: usize,
    pub workers: usize,
    pub prefilled: u64,
    /// Jobs enqueued per second over the run, as achieved.
    pub achieved_rate: f64,
    pub lag_ms: Quantiles,
    pub promote_runs: u64,
    pub promoted_rows: u64,
    pub promote_start_delay_ms: Quantiles,
    /// Start delay minus the time the SLO loop was still busy with its previous pass.
    pub promote_wake_delay_ms: Quantiles,
    pub promote_duration_ms: Quantiles,
    pub workload: WorkloadStats,
}

pub async fn run(pg: &Pg, s: &Settings) -> anyhow::Result<(PromotionResult, Hist, Vec<Target>)> {
    let db = pg.create("promo").await?;
    let result = run_on(&db, s).await;
    pg.drop_db(db).await;
    result
}

/// The promotion flow, shared with the scale scenario: well-behaved jobs of queue `bench`, due
/// uniformly over `horizon` and completed as soon as they are claimed; workers heartbeat every
/// 500 ms and claim up to 100 at a time.
pub fn flow(rate: f64, producers: usize, workers: usize, horizon: Duration) -> WorkloadConfig {
    WorkloadConfig {
        queue: QUEUE.to_owned(),
        kind: "bench.work".to_owned(),
        rate,
        producers,
        scheduled_percent: 100,
        due_in: (Duration::ZERO, horizon),
        max_attempts: 5,
        workers,
        concurrency: 100,
        worker: WorkerSettings {
            heartbeat_interval: Duration::from_millis(500),
            claim_batch: 100,
            poll_interval: Duration::from_millis(50),
            shutdown_grace: Duration::from_secs(1),
            ..WorkerSettings::default()
        },
        timings: Timings {
            work: (Duration::ZERO, Duration::ZERO),
            ..Timings::default()
        },
        ..WorkloadConfig::default()
    }
}

/// Starts [`flow`] at `rate` on `target`'s schema, its producers on a queue client of their
/// own, with no prefill: jobs come due at the steady rate once `horizon` has passed, so the
/// caller warms up for at least that long. Shared by the scale and fleet scenarios.
pub async fn start_flow(
    target: &steward_connection::Target,
    rate: f64,
    producers: usize,
    workers: usize,
    horizon: Duration,
) -> anyhow::Result<Workload> {
    let queue = Queue::new(
        target
            .named("steward-bench:workload")
            .pool(producers + workers + 2)?,
    );
    let config = flow(rate, producers, workers, horizon);
    Ok(Workload::start(queue, target, config).await?)
}

async fn run_on(
    db: &crate::db::BenchDb,
    s: &Settings,
) -> anyhow::Result<(PromotionResult, Hist, Vec<Target>)> {
    let (producers, workers) = (2, 4);
    let config = flow(s.rate, producers, workers, s.horizon);
    let recorder = Arc::new(Recorder::default());
    let leader = Leader::start(
        &db.url,
        &db.schema,
        LeaderSettings {
            shutdown_grace: Duration::from_secs(1),
            ..LeaderSettings::default()
        },
        BranchesConfig::default().build(),
        recorder.clone(),
    )
    .await?;
    let queue = db.queue(producers + workers + 2, "steward-bench:workload")?;
    crate::progress(format!(
        "promotion: prefilling {:.0} jobs due over the next {:.0} s",
        s.rate * s.horizon.as_secs_f64(),
        s.horizon.as_secs_f64()
    ));
    let prefilled = Workload::prefill(&queue, &config).await?;
    crate::progress(format!(
        "promotion: {} jobs/s for {:.0} s warm-up + {:.0} s window",
        s.rate,
        s.warmup.as_secs_f64(),
        s.window.as_secs_f64()
    ));
    let started = Instant::now();
    let workload = Workload::start(queue, &db.target()?, config).await?;
    tokio::time::sleep(s.warmup).await;
    recorder.start();
    let window_started = Instant::now();
    tokio::time::sleep(s.window).await;
    let snapshot = recorder.stop();
    let window_s = window_started.elapsed().as_secs_f64();
    let achieved_rate = workload.enqueued() as f64 / started.elapsed().as_secs_f64();
    let workload = workload.stop().await.stats();
    leader.stop().await?;

    let promote = snapshot
        .branches
        .get("promote_scheduled")
        .cloned()
        .unwrap_or_default();
    let lag = snapshot.promotion_lags.clone();
    let result = PromotionResult {
        rate: s.rate,
        horizon_s: s.horizon.as_secs_f64(),
        window_s,
        warmup_s: s.warmup.as_secs_f64(),
        producers,
        workers,
        prefilled,
        achieved_rate: (achieved_rate * 10.0).round() / 10.0,
        lag_ms: lag.summary(),
        promote_runs: promote.runs,
        promoted_rows: promote.rows,
        promote_start_delay_ms: promote.start_delay.summary(),
        promote_wake_delay_ms: promote.wake_delay.summary(),
        promote_duration_ms: promote.duration.summary(),
        workload,
    };
    let targets = vec![Target::below(
        "promotion lag p99",
        result.lag_ms.p99,
        25.0,
        "ms",
    )];
    Ok((result, lag, targets))
}

pub fn render(r: &PromotionResult) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "promotion lag: {} jobs/s (achieved {}) due uniformly over the next {:.0} s, {} producers, {} workers, {:.0} s window after {:.0} s warm-up",
        r.rate,
        num(r.achieved_rate),
        r.horizon_s,
        r.producers,
        r.workers,
        r.window_s,
        r.warmup_s
    );
    let q = |name: &str, q: &Quantiles| {
        vec![
            name.to_owned(),
            q.count.to_string(),
            opt(q.p50),
            opt(q.p90),
            opt(q.p99),
            opt(q.p999),
            opt(q.max),
        ]
    };
    let rows = vec![
        vec![
            "measure".to_owned(),
            "count".to_owned(),
            "p50 ms".to_owned(),
            "p90 ms".to_owned(),
            "p99 ms".to_owned(),
            "p99.9 ms".to_owned(),
            "max ms".to_owned(),
        ],
        q("promotion lag (now - run_at)", &r.lag_ms),
        q("promote pass start delay", &r.promote_start_delay_ms),
        q("  of it after the loop was free", &r.promote_wake_delay_ms),
        q("promote pass duration", &r.promote_duration_ms),
    ];
    out.push_str(&table(&rows));
    let _ = writeln!(
        out,
        "  promote passes {}, rows promoted {}; workload enqueued {} (prefilled {}), completed {}, errors {}",
        r.promote_runs,
        r.promoted_rows,
        r.workload.enqueued,
        r.prefilled,
        r.workload.completed,
        r.workload.errors
    );
    out
}
