//! `steward-bench`: drives real Steward leaders against a real PostgreSQL and reports quantiles
//! from hdrhistogram. See benches/README.md for the scenarios, the options and the JSON schema.
//!
//! ```sh
//! cargo run --release -p steward-bench -- [--quick] [--json] [--duration 10m] \
//!     [--scenarios isolation,promotion,throughput,failover,footprint,rescue,worker,heartbeat,scale,fleet] \
//!     [--out benches/out]
//! ```

mod db;
mod hist;
mod injected;
mod leader;
mod plot;
mod procs;
mod proxy;
mod recorder;
mod report;
mod scenarios;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use report::{Machine, ScenarioEntry, Target};
use scenarios::{
    failover, fleet, footprint, heartbeat, isolation, promotion, rescue, scale, throughput, worker,
};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
enum Scenario {
    Isolation,
    Promotion,
    Throughput,
    Failover,
    Footprint,
    Rescue,
    Worker,
    Heartbeat,
    Scale,
    Fleet,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The worker scenario's worker process (started by the harness itself).
    #[command(hide = true)]
    WorkerProcess(worker::ProcessArgs),
}

#[derive(Parser, Debug)]
#[command(
    name = "steward-bench",
    about = "Benchmarks real Steward leaders against a real PostgreSQL (see benches/README.md)"
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Small sizes and short windows: the whole run takes about a minute and a half (same report
    /// shape).
    #[arg(long)]
    quick: bool,
    /// Print the report as JSON on stdout (the human tables go to <out>/report.txt).
    #[arg(long)]
    json: bool,
    /// Measurement window of each timed phase (isolation split, isolation monolithic,
    /// promotion). Default 10m, or 5s with --quick.
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Warm-up before each timed window. Default 15s, or 2s with --quick.
    #[arg(long, value_parser = parse_duration)]
    warmup: Option<Duration>,
    /// Scenarios to run, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "isolation,promotion,throughput,failover,footprint,rescue,worker,heartbeat,scale,fleet"
    )]
    scenarios: Vec<Scenario>,
    /// Where report.json, report.txt and distributions.svg go.
    #[arg(long, default_value = "benches/out")]
    out: PathBuf,
    /// The steward binary for failover and footprint. Default: built with
    /// `cargo build [--release] -p steward` (the harness's own profile) and taken from beside
    /// this executable.
    #[arg(long)]
    steward_bin: Option<PathBuf>,
    /// Isolation: a bench-only hygiene branch holds a transaction in pg_sleep this long on
    /// every pass (interval: twice the delay). 0s disables it.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    inject_hygiene_delay: Duration,
    /// Isolation: terminal jobs past retention for cleanup. Default 200000, quick 30000.
    #[arg(long)]
    backlog_rows: Option<i64>,
    /// Isolation: completed jobs within retention that refresh_admin_metadata counts.
    /// Default 1000000, quick 100000.
    #[arg(long)]
    table_rows: Option<i64>,
    /// Isolation: do not top the cleanup backlog up while the window runs.
    #[arg(long)]
    no_backlog_refill: bool,
    /// Isolation: workload jobs per second. Default 500, quick 300.
    #[arg(long)]
    isolation_rate: Option<f64>,
    /// Promotion and fleet (its busy queue): jobs per second enqueued. Default 2000.
    #[arg(long)]
    rate: Option<f64>,
    /// Promotion: jobs are due uniformly over this horizon. Default 60s, quick 10s.
    #[arg(long, value_parser = parse_duration)]
    horizon: Option<Duration>,
    /// Throughput: rows per backlog. Default 100000, quick 20000.
    #[arg(long)]
    rows: Option<i64>,
    /// Throughput: batch_size of the "large" configuration of every branch (the "default"
    /// configuration uses each branch's shipped batch size).
    #[arg(long, default_value_t = 10_000)]
    batch_size: i64,
    /// Throughput: repetitions per measurement (medians are reported). Default 5, quick 1.
    #[arg(long)]
    repeats: Option<u32>,
    /// Failover: trials, default 20, quick 5. Fleet: SIGKILL trials, default 5, quick 1.
    #[arg(long)]
    trials: Option<u32>,
    /// Footprint: the measurement window. Default 60s, quick 5s.
    #[arg(long, value_parser = parse_duration)]
    footprint_window: Option<Duration>,
    /// Rescue: how long dead runs keep being created. Default 60s, quick 8s.
    #[arg(long, value_parser = parse_duration)]
    rescue_window: Option<Duration>,
    /// Worker: offered jobs per second, one measurement each.
    #[arg(long, value_delimiter = ',', default_value = "2000,5000")]
    worker_rates: Vec<f64>,
    /// Worker: the window of each rate (after --warmup). Default 60s, quick 5s.
    #[arg(long, value_parser = parse_duration)]
    worker_window: Option<Duration>,
    /// Worker: the worker's concurrency on its queue.
    #[arg(long, default_value_t = 200)]
    worker_concurrency: usize,
    /// Heartbeat: the window. Default 120s; quick 20s, with every time scaled by 1/5
    /// (staleness 6s, heartbeat every 2s, long jobs of 4s).
    #[arg(long, value_parser = parse_duration)]
    heartbeat_window: Option<Duration>,
    /// Heartbeat: short jobs per second offered to each mode.
    #[arg(long, default_value_t = 200.0)]
    heartbeat_short_rate: f64,
    /// Heartbeat: each worker's concurrency on the short queue (the claim and completion
    /// pressure on the baseline's pool).
    #[arg(long, default_value_t = 400)]
    heartbeat_short_slots: usize,
    /// Scale: table sizes in rows, each seeded into a fresh database. Default
    /// 1000000,3000000,10000000; quick 100000,300000.
    #[arg(long, value_delimiter = ',')]
    scale_sizes: Option<Vec<i64>>,
    /// Scale: jobs per second; the first at every size, the others at the largest only.
    #[arg(long, value_delimiter = ',', default_value = "2000,5000")]
    scale_rates: Vec<f64>,
    /// Scale: the window of each measurement. Default 60s, quick 2s.
    #[arg(long, value_parser = parse_duration)]
    scale_window: Option<Duration>,
    /// Scale: warm-up before each window (and the workload's due horizon, at most 10s).
    /// Default 15s, quick 1s.
    #[arg(long, value_parser = parse_duration)]
    scale_warmup: Option<Duration>,
    /// Scale: finished jobs past retention for cleanup at the largest size, enough to outlast
    /// the warm-up and the window. Default 6000000, quick 400000.
    #[arg(long)]
    scale_backlog_rows: Option<i64>,
    /// Scale: running jobs of the fleet that dies at the largest size. Default 100000, quick
    /// 10000.
    #[arg(long)]
    scale_dead_runs: Option<i64>,
    /// Scale: the dead fleet's runs are on their last attempt, so that rescued they fail and no
    /// retries come due for the promoter.
    #[arg(long)]
    scale_dead_last_attempt: bool,
    /// Fleet: queues (schemas) in the database. Default 100, quick 20.
    #[arg(long)]
    fleet_queues: Option<usize>,
    /// Fleet: `steward run --discover` processes.
    #[arg(long, default_value_t = 3)]
    fleet_processes: usize,
    /// Fleet: the idle window and each busy window (after --warmup). Default 60s, quick 3s.
    #[arg(long, value_parser = parse_duration)]
    fleet_window: Option<Duration>,
    /// Fleet: cleanup backlog rows in each queue but the busy one. Default 100000, quick 20000.
    #[arg(long)]
    fleet_backlog_rows: Option<i64>,
    /// Fleet: the processes' SLO pool size (`[fleet] slo_sessions`); default: the shipped one.
    #[arg(long)]
    fleet_slo_sessions: Option<usize>,
    /// Fleet: a further `KEY=VALUE` setting for the processes (`steward run --set`), e.g.
    /// `branches.promote_scheduled.interval=5s`; repeatable.
    #[arg(long = "fleet-set", value_name = "KEY=VALUE")]
    fleet_set: Vec<String>,
}

static STARTED: OnceLock<Instant> = OnceLock::new();

/// The quick-mode value or the full-mode one.
fn pick<T>(quick: bool, quick_value: T, full_value: T) -> T {
    if quick {
        quick_value
    } else {
        full_value
    }
}

/// A progress line on stderr.
pub fn progress(message: impl AsRef<str>) {
    let elapsed = STARTED
        .get()
        .map(|s| s.elapsed().as_secs_f64())
        .unwrap_or(0.0);
    eprintln!("[{elapsed:7.1}s] {}", message.as_ref());
}

#[derive(Debug, Clone, Serialize)]
struct Settings {
    quick: bool,
    scenarios: Vec<Scenario>,
    duration_s: f64,
    warmup_s: f64,
    out: String,
}

#[derive(Serialize)]
struct Scenarios {
    isolation: ScenarioEntry<isolation::IsolationResult>,
    promotion: ScenarioEntry<promotion::PromotionResult>,
    throughput: ScenarioEntry<throughput::ThroughputResult>,
    failover: ScenarioEntry<failover::FailoverResult>,
    footprint: ScenarioEntry<footprint::FootprintResult>,
    rescue: ScenarioEntry<rescue::RescueResult>,
    worker: ScenarioEntry<worker::WorkerResult>,
    heartbeat: ScenarioEntry<heartbeat::HeartbeatResult>,
    scale: ScenarioEntry<scale::ScaleResult>,
    fleet: ScenarioEntry<fleet::FleetResult>,
}

#[derive(Serialize)]
struct FlatTarget {
    scenario: String,
    #[serde(flatten)]
    target: Target,
}

#[derive(Serialize)]
struct Report {
    schema_version: u32,
    harness: String,
    mode: String,
    command: String,
    started_at: String,
    finished_at: String,
    wall_s: f64,
    machine: Machine,
    settings: Settings,
    scenarios: Scenarios,
    targets: Vec<FlatTarget>,
    plots: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    STARTED.get_or_init(Instant::now);
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the runtime")?;
    if let Some(Command::WorkerProcess(process)) = args.command.take() {
        return runtime.block_on(worker::process(process));
    }
    let failed = runtime.block_on(run(args))?;
    if failed {
        std::process::exit(1);
    }
    Ok(())
}

/// Runs the selected scenarios and writes the report; true when a scenario failed.
async fn run(args: Args) -> anyhow::Result<bool> {
    let quick = args.quick;
    let duration = args.duration.unwrap_or(pick(
        quick,
        Duration::from_secs(5),
        Duration::from_secs(600),
    ));
    let warmup =
        args.warmup
            .unwrap_or(pick(quick, Duration::from_secs(2), Duration::from_secs(15)));
    let selected = |s: Scenario| args.scenarios.contains(&s);
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let steward_bin = if [
        Scenario::Failover,
        Scenario::Footprint,
        Scenario::Rescue,
        Scenario::Worker,
        Scenario::Heartbeat,
        Scenario::Scale,
        Scenario::Fleet,
    ]
    .into_iter()
    .any(selected)
    {
        Some(procs::steward_binary(args.steward_bin.clone()))
    } else {
        None
    };
    // The clock starts after the (possible) build of steward.
    let started_at = chrono::Utc::now();
    let started = Instant::now();

    let pg = db::Pg::start().await?;
    let server = pg.info().await.ok();
    let machine = Machine::read(server.clone());
    progress(format!(
        "PostgreSQL {} at {}",
        server.as_ref().map(|s| s.version.as_str()).unwrap_or("?"),
        server.as_ref().map(|s| s.source.as_str()).unwrap_or("?")
    ));

    let mut isolation_entry = ScenarioEntry::skipped();
    let mut isolation_curves = None;
    if selected(Scenario::Isolation) {
        let t = Instant::now();
        let settings = isolation::Settings {
            window: duration,
            warmup,
            rate: args.isolation_rate.unwrap_or(pick(quick, 300.0, 500.0)),
            horizon: Duration::from_secs(10),
            backlog_rows: args.backlog_rows.unwrap_or(pick(quick, 30_000, 200_000)),
            table_rows: args.table_rows.unwrap_or(pick(quick, 100_000, 1_000_000)),
            refill: !args.no_backlog_refill,
            inject_delay: args.inject_hygiene_delay,
        };
        let result = isolation::run(&pg, &settings)
            .await
            .map(|(r, curves, targets)| {
                isolation_curves = Some(curves);
                (r, targets)
            });
        isolation_entry = ScenarioEntry::from_result(result, t.elapsed().as_secs_f64());
    }

    let mut promotion_entry = ScenarioEntry::skipped();
    let mut promotion_lags = None;
    if selected(Scenario::Promotion) {
        let t = Instant::now();
        let settings = promotion::Settings {
            rate: args.rate.unwrap_or(2000.0),
            horizon: args.horizon.unwrap_or(pick(
                quick,
                Duration::from_secs(10),
                Duration::from_secs(60),
            )),
            window: duration,
            warmup,
        };
        let result = promotion::run(&pg, &settings)
            .await
            .map(|(r, lags, targets)| {
                promotion_lags = Some(lags);
                (r, targets)
            });
        promotion_entry = ScenarioEntry::from_result(result, t.elapsed().as_secs_f64());
    }

    let mut throughput_entry = ScenarioEntry::skipped();
    if selected(Scenario::Throughput) {
        let t = Instant::now();
        let settings = throughput::Settings {
            rows: args.rows.unwrap_or(pick(quick, 20_000, 100_000)),
            large_batch: args.batch_size,
            repeats: args.repeats.unwrap_or(pick(quick, 1, 5)),
        };
        throughput_entry = ScenarioEntry::from_result(
            throughput::run(&pg, &settings).await,
            t.elapsed().as_secs_f64(),
        );
    }

    let mut failover_entry = ScenarioEntry::skipped();
    if selected(Scenario::Failover) {
        let t = Instant::now();
        let settings = failover::Settings {
            trials: args.trials.unwrap_or(pick(quick, 5, 20)),
            settle: Duration::from_millis(300),
        };
        let result = match &steward_bin {
            Some(Ok(bin)) => failover::run(&pg, bin, &settings).await,
            Some(Err(e)) => Err(anyhow::anyhow!("{e:#}")),
            None => Err(anyhow::anyhow!("no steward binary")),
        };
        failover_entry = ScenarioEntry::from_result(result, t.elapsed().as_secs_f64());
    }

    let mut footprint_entry = ScenarioEntry::skipped();
    if selected(Scenario::Footprint) {
        let t = Instant::now();
        let settings = footprint::Settings {
            window: args.footprint_window.unwrap_or(pick(
                quick,
                Duration::from_secs(5),
                Duration::from_secs(60),
            )),
            settle: pick(quick, Duration::from_secs(1), Duration::from_secs(5)),
        };
        let result = match &steward_bin {
            Some(Ok(bin)) => footprint::run(&pg, bin, &settings)
                .await
                .map(|r| (r, Vec::new())),
            Some(Err(e)) => Err(anyhow::anyhow!("{e:#}")),
            None => Err(anyhow::anyhow!("no steward binary")),
        };
        footprint_entry = ScenarioEntry::from_result(result, t.elapsed().as_secs_f64());
    }

    let mut rescue_entry = ScenarioEntry::skipped();
    if selected(Scenario::Rescue) {
        let t = Instant::now();
        let settings = rescue::Settings {
            window: args.rescue_window.unwrap_or(pick(
                quick,
                Duration::from_secs(8),
                Duration::from_secs(60),
            )),
            every: Duration::from_millis(250),
            staleness: Duration::from_secs(6),
            idle: pick(quick, Duration::from_secs(11), Duration::from_secs(31)),
        };
        let result = match &steward_bin {
            Some(Ok(bin)) => rescue::run(&pg, bin, &settings).await,
            Some(Err(e)) => Err(anyhow::anyhow!("{e:#}")),
            None => Err(anyhow::anyhow!("no steward binary")),
        };
        rescue_entry = ScenarioEntry::from_result(result, t.elapsed().as_secs_f64());
    }

    let mut worker_entry = ScenarioEntry::skipped();
    if selected(Scenario::Worker) {
        let t = Instant::now();
        let settings = worker::Settings {
            rates: args.worker_rates.clone(),
            window: args.worker_window.unwrap_or(pick(
                quick,
                Duration::from_secs(5),
                Duration::from_secs(60),
            )),
            warmup,
            lead: Duration::from_millis(100),
            concurrency: args.worker_concurrency,
            drain: Duration::from_secs(30),
        };
        let result = match &steward_bin {
            Some(Ok(bin)) => worker::run(&pg, bin, &settings).await,
            Some(Err(e)) => Err(anyhow::anyhow!("{e:#}")),
            None => Err(anyhow::anyhow!("no steward binary")),
        };
        worker_entry = ScenarioEntry::from_result(result, t.elapsed().as_secs_f64());
    }

    let mut heartbeat_entry = ScenarioEntry::skipped();
    if selected(Scenario::Heartbeat) {
        let t = Instant::now();
        // Quick mode scales every time of the scenario by 1/5.
        let scale = pick(quick, 5, 1);
        let settings = heartbeat::Settings {
            window: args.heartbeat_window.unwrap_or(pick(
                quick,
                Duration::from_secs(20),
                Duration::from_secs(120),
            )),
            rtt: Duration::from_millis(150),
            staleness: Duration::from_secs(30) / scale,
            rescue_interval: Duration::from_secs(5) / scale,
            interval: Duration::from_secs(10) / scale,
            long_job: Duration::from_secs(20) / scale,
            long_slots: 4,
            short_rate: args.heartbeat_short_rate,
            short_slots: args.heartbeat_short_slots,
            pool_size: 2,
        };
        let result = match &steward_bin {
            Some(Ok(bin)) => heartbeat::run(&pg, bin, &settings).await,
            Some(Err(e)) => Err(anyhow::anyhow!("{e:#}")),
            None => Err(anyhow::anyhow!("no steward binary")),
        };
        heartbeat_entry = ScenarioEntry::from_result(result, t.elapsed().as_secs_f64());
    }

    let mut scale_entry = ScenarioEntry::skipped();
    let mut scale_curves = None;
    if selected(Scenario::Scale) {
        let t = Instant::now();
        let warmup = args.scale_warmup.unwrap_or(pick(
            quick,
            Duration::from_secs(1),
            Duration::from_secs(15),
        ));
        let settings = scale::Settings {
            quick,
            sizes: args.scale_sizes.clone().unwrap_or(pick(
                quick,
                vec![100_000, 300_000],
                vec![1_000_000, 3_000_000, 10_000_000],
            )),
            rates: args.scale_rates.clone(),
            window: args.scale_window.unwrap_or(pick(
                quick,
                Duration::from_secs(2),
                Duration::from_secs(60),
            )),
            warmup,
            horizon: warmup.min(Duration::from_secs(10)),
            backlog_rows: args
                .scale_backlog_rows
                .unwrap_or(pick(quick, 400_000, 6_000_000)),
            dead_runs: args.scale_dead_runs.unwrap_or(pick(quick, 10_000, 100_000)),
            dead_last_attempt: args.scale_dead_last_attempt,
            // The workers heartbeat every 500 ms, and a worker refuses a staleness under three
            // heartbeat intervals.
            staleness: pick(quick, Duration::from_secs(2), Duration::from_secs(5)),
            rss_window: pick(quick, Duration::from_millis(500), Duration::from_secs(20)),
        };
        let result = match &steward_bin {
            Some(Ok(bin)) => scale::run(&pg, bin, &settings)
                .await
                .map(|(r, curves, targets)| {
                    scale_curves = Some(curves);
                    (r, targets)
                }),
            Some(Err(e)) => Err(anyhow::anyhow!("{e:#}")),
            None => Err(anyhow::anyhow!("no steward binary")),
        };
        scale_entry = ScenarioEntry::from_result(result, t.elapsed().as_secs_f64());
    }

    let mut fleet_entry = ScenarioEntry::skipped();
    if selected(Scenario::Fleet) {
        let t = Instant::now();
        let settings = fleet::Settings {
            quick,
            queues: args.fleet_queues.unwrap_or(pick(quick, 20, 100)),
            processes: args.fleet_processes,
            window: args.fleet_window.unwrap_or(pick(
                quick,
                Duration::from_secs(3),
                Duration::from_secs(60),
            )),
            warmup,
            horizon: warmup.min(Duration::from_secs(10)),
            rate: args.rate.unwrap_or(2000.0),
            backlog_rows: args
                .fleet_backlog_rows
                .unwrap_or(pick(quick, 20_000, 100_000)),
            trials: args.trials.unwrap_or(pick(quick, 1, 5)),
            settle: pick(quick, Duration::from_secs(1), Duration::from_secs(5)),
            slo_sessions: args.fleet_slo_sessions,
            extra: args.fleet_set.clone(),
        };
        let result = match &steward_bin {
            Some(Ok(bin)) => fleet::run(&pg, bin, &settings).await,
            Some(Err(e)) => Err(anyhow::anyhow!("{e:#}")),
            None => Err(anyhow::anyhow!("no steward binary")),
        };
        fleet_entry = ScenarioEntry::from_result(result, t.elapsed().as_secs_f64());
    }

    // The plot.
    let mut plots = Vec::new();
    let mut panels = Vec::new();
    if let Some(c) = &isolation_curves {
        panels.push(plot::Panel {
            title: "SLO branch start delay (isolation)".into(),
            series: vec![
                plot::Series {
                    label: "split".into(),
                    hist: &c.split_start_delay,
                    color: plot::SPLIT,
                },
                plot::Series {
                    label: "monolithic".into(),
                    hist: &c.monolithic_start_delay,
                    color: plot::MONOLITHIC,
                },
            ],
        });
    }
    let mut lag_series = Vec::new();
    if let Some(c) = &isolation_curves {
        lag_series.push(plot::Series {
            label: "isolation, split".into(),
            hist: &c.split_lag,
            color: plot::SPLIT,
        });
        lag_series.push(plot::Series {
            label: "isolation, monolithic".into(),
            hist: &c.monolithic_lag,
            color: plot::MONOLITHIC,
        });
    }
    if let Some(lags) = &promotion_lags {
        lag_series.push(plot::Series {
            label: "promotion scenario, split".into(),
            hist: lags,
            color: plot::PROMOTION,
        });
    }
    if !lag_series.is_empty() {
        panels.push(plot::Panel {
            title: "Promotion lag (now - run_at)".into(),
            series: lag_series,
        });
    }
    if !panels.is_empty() {
        let path = args.out.join("distributions.svg");
        match plot::draw(&path, &panels) {
            Ok(()) => plots.push(path.display().to_string()),
            Err(error) => progress(format!("plot failed: {error:#}")),
        }
    }

    if let Some(curves) = &scale_curves {
        let path = args.out.join("scale.svg");
        match plot::draw_lines(&path, &scale_panels(curves)) {
            Ok(()) => plots.push(path.display().to_string()),
            Err(error) => progress(format!("plot failed: {error:#}")),
        }
    }

    let mut targets = Vec::new();
    let mut flatten = |scenario: &str, ts: &[Target]| {
        targets.extend(ts.iter().map(|t| FlatTarget {
            scenario: scenario.to_owned(),
            target: t.clone(),
        }))
    };
    flatten("isolation", &isolation_entry.targets);
    flatten("promotion", &promotion_entry.targets);
    flatten("throughput", &throughput_entry.targets);
    flatten("failover", &failover_entry.targets);
    flatten("footprint", &footprint_entry.targets);
    flatten("rescue", &rescue_entry.targets);
    flatten("worker", &worker_entry.targets);
    flatten("heartbeat", &heartbeat_entry.targets);
    flatten("scale", &scale_entry.targets);
    flatten("fleet", &fleet_entry.targets);

    let failed = isolation_entry.is_error()
        || promotion_entry.is_error()
        || throughput_entry.is_error()
        || failover_entry.is_error()
        || footprint_entry.is_error()
        || rescue_entry.is_error()
        || worker_entry.is_error()
        || heartbeat_entry.is_error()
        || scale_entry.is_error()
        || fleet_entry.is_error();
    let report = Report {
        schema_version: report::SCHEMA_VERSION,
        harness: "steward-bench".into(),
        mode: if quick { "quick" } else { "full" }.into(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        started_at: started_at.to_rfc3339(),
        finished_at: chrono::Utc::now().to_rfc3339(),
        wall_s: (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        machine,
        settings: Settings {
            quick,
            scenarios: args.scenarios.clone(),
            duration_s: duration.as_secs_f64(),
            warmup_s: warmup.as_secs_f64(),
            out: args.out.display().to_string(),
        },
        scenarios: Scenarios {
            isolation: isolation_entry,
            promotion: promotion_entry,
            throughput: throughput_entry,
            failover: failover_entry,
            footprint: footprint_entry,
            rescue: rescue_entry,
            worker: worker_entry,
            heartbeat: heartbeat_entry,
            scale: scale_entry,
            fleet: fleet_entry,
        },
        targets,
        plots,
    };
    let json = serde_json::to_string_pretty(&report).context("serializing the report")?;
    let text = render(&report);
    std::fs::write(args.out.join("report.json"), &json).context("writing report.json")?;
    std::fs::write(args.out.join("report.txt"), &text).context("writing report.txt")?;
    if args.json {
        println!("{json}");
    } else {
        print!("{text}");
    }
    progress(format!(
        "done in {:.1} s; report in {}",
        report.wall_s,
        args.out.display()
    ));
    Ok(failed)
}

/// The scale scenario's charts: each SLO branch's pass duration p99 against table size (at the
/// first rate), and promotion lag p50 and p99 against rate at each size.
fn scale_panels(curves: &scale::ScaleCurves) -> Vec<plot::LinePanel> {
    let cost = scale::SLO_BRANCHES
        .iter()
        .zip(plot::PALETTE)
        .map(|(branch, color)| plot::Line {
            label: (*branch).to_owned(),
            points: curves
                .pass_p99
                .iter()
                .filter(|(_, b, _)| b == branch)
                .map(|(rows, _, ms)| (*rows as f64, *ms))
                .collect(),
            color,
        })
        .collect();
    let mut sizes: Vec<i64> = curves.lag_by_rate.iter().map(|(rows, ..)| *rows).collect();
    sizes.dedup();
    let mut lag = Vec::new();
    for (i, rows) in sizes.iter().enumerate() {
        let color = plot::PALETTE[i % plot::PALETTE.len()];
        let at = |pick: fn(&(i64, f64, f64, f64)) -> f64| {
            curves
                .lag_by_rate
                .iter()
                .filter(|p| p.0 == *rows)
                .map(|p| (p.1, pick(p)))
                .collect::<Vec<_>>()
        };
        lag.push(plot::Line {
            label: format!("{rows} rows, p99"),
            points: at(|p| p.3),
            color,
        });
        lag.push(plot::Line {
            label: format!("{rows} rows, p50"),
            points: at(|p| p.2),
            color: plot::lighter(color),
        });
    }
    vec![
        plot::LinePanel {
            title: "SLO branch pass duration p99 against table size".into(),
            x_desc: "rows in jobs".into(),
            y_desc: "pass duration p99".into(),
            lines: cost,
        },
        plot::LinePanel {
            title: "Promotion lag against rate".into(),
            x_desc: "jobs per second".into(),
            y_desc: "promotion lag".into(),
            lines: lag,
        },
    ]
}

fn section<T: Serialize>(
    out: &mut String,
    name: &str,
    entry: &ScenarioEntry<T>,
    body: impl Fn(&T) -> String,
) {
    match (&entry.status[..], &entry.result) {
        ("skipped", _) => {}
        (_, Some(result)) => {
            let _ = writeln!(out, "\n== {name} ({:.1} s)", entry.elapsed_s);
            out.push_str(&body(result));
            out.push_str(&report::render_targets(&entry.targets));
        }
        _ => {
            let _ = writeln!(
                out,
                "\n== {name}: ERROR after {:.1} s\n  {}",
                entry.elapsed_s,
                entry.error.as_deref().unwrap_or("unknown error")
            );
        }
    }
}

fn render(r: &Report) -> String {
    let mut out = String::new();
    let m = &r.machine;
    let _ = writeln!(
        out,
        "steward-bench ({} mode, {} build) {} — {:.0} s",
        r.mode, m.profile, r.started_at, r.wall_s
    );
    let _ = writeln!(
        out,
        "machine: {} cores ({}), {} GiB, kernel {}, load at start {}",
        m.nproc, m.cpu_model, m.memory_gib, m.kernel, m.loadavg_at_start
    );
    if let Some(pg) = &m.postgres {
        let _ =
            writeln!(
            out,
            "postgres: {} (fsync={}, synchronous_commit={}, shared_buffers={}, autovacuum={}); {}",
            pg.version, pg.fsync, pg.synchronous_commit, pg.shared_buffers, pg.autovacuum, pg.source
        );
        if pg.autovacuum != "on" {
            let _ = writeln!(
                out,
                "warning: autovacuum is off on this server, unlike any production one: dead index entries of promoted and finished jobs pile up for the whole run, and every sweep slows down as it goes"
            );
        }
    }
    let s = &r.scenarios;
    section(&mut out, "isolation", &s.isolation, isolation::render);
    section(&mut out, "promotion", &s.promotion, promotion::render);
    section(&mut out, "throughput", &s.throughput, throughput::render);
    section(&mut out, "failover", &s.failover, failover::render);
    section(&mut out, "footprint", &s.footprint, footprint::render);
    section(&mut out, "rescue", &s.rescue, rescue::render);
    section(&mut out, "worker", &s.worker, worker::render);
    section(&mut out, "heartbeat", &s.heartbeat, heartbeat::render);
    section(&mut out, "scale", &s.scale, scale::render);
    section(&mut out, "fleet", &s.fleet, fleet::render);
    if !r.targets.is_empty() {
        let passed = r.targets.iter().filter(|t| t.target.pass).count();
        let _ = writeln!(
            out,
            "\ntargets: {passed} of {} met{}",
            r.targets.len(),
            if r.plots.is_empty() {
                String::new()
            } else {
                format!("; plot: {}", r.plots.join(", "))
            }
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_scenario_parses() {
        let args = Args::parse_from([
            "steward-bench",
            "--scenarios",
            "isolation,promotion,throughput,failover,footprint,rescue,worker,heartbeat,scale,fleet",
        ]);
        assert_eq!(
            args.scenarios,
            vec![
                Scenario::Isolation,
                Scenario::Promotion,
                Scenario::Throughput,
                Scenario::Failover,
                Scenario::Footprint,
                Scenario::Rescue,
                Scenario::Worker,
                Scenario::Heartbeat,
                Scenario::Scale,
                Scenario::Fleet,
            ]
        );
        let args = Args::parse_from(["steward-bench", "--scale-sizes", "1000000,3000000"]);
        assert_eq!(args.scale_sizes, Some(vec![1_000_000, 3_000_000]));
        let args = Args::parse_from([
            "steward-bench",
            "worker-process",
            "--database-url",
            "postgres://u@h/db",
            "--queue",
            "q",
        ]);
        assert!(matches!(args.command, Some(Command::WorkerProcess(_))));
        let args = Args::parse_from(["steward-bench", "--duration", "3m", "--quick"]);
        assert_eq!(args.duration, Some(Duration::from_secs(180)));
    }
}
