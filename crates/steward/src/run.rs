//! `steward run`: the maintenance process.

use crate::{DbArgs, LogFormat};
use anyhow::Context;
use std::sync::Arc;
use steward_leader::{Candidate, LoopMode};
use steward_telemetry::{HttpState, MetricsObserver, QueueLabels, ServedQueues, Telemetry};
use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub(crate) db: DbArgs,
    /// split: SLO and hygiene branches (and the promoter) on loops and connections of their own;
    /// monolithic: every branch on one loop.
    #[arg(long, env = "STEWARD_LOOP_MODE", hide_env_values = true)]
    loop_mode: Option<LoopMode>,
    /// Override any setting, e.g. --set branches.cleanup.batch_size=500 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    #[arg(long, env = "STEWARD_LOG_FORMAT", hide_env_values = true, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    /// Address of the HTTP endpoint (/metrics, /healthz, /readyz, /leader). Loopback by default;
    /// use 0.0.0.0:9464 to expose it (e.g. in a container).
    #[arg(
        long,
        env = "STEWARD_METRICS_ADDR",
        hide_env_values = true,
        default_value = "127.0.0.1:9464"
    )]
    pub(crate) metrics_addr: std::net::SocketAddr,
    /// Maintain every schema of the database that holds Steward's tables, found again every
    /// minute (as `discover = true` in the config file's `[fleet]` section).
    #[arg(long, env = "STEWARD_DISCOVER", hide_env_values = true)]
    discover: bool,
    /// /healthz fails when a maintenance loop finished no iteration for this long.
    #[arg(long, env = "STEWARD_LOOP_STALL_LIMIT", hide_env_values = true, default_value = "2m", value_parser = humantime::parse_duration)]
    pub(crate) loop_stall_limit: std::time::Duration,
}

/// An error `run` has logged already (its logs may be JSON for a collector): `main` does not
/// print it a second time.
#[derive(Debug, thiserror::Error)]
#[error("steward run stopped with an error (logged above)")]
pub struct Logged;

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let telemetry = Telemetry::init(args.log_format.into())?;
    let result = run_with_telemetry(args, &telemetry).await;
    if let Err(error) = &result {
        tracing::error!("{error:#}");
    }
    telemetry.shutdown();
    result.map_err(|_| Logged.into())
}

async fn run_with_telemetry(args: RunArgs, telemetry: &Telemetry) -> anyhow::Result<()> {
    // Idle loops report progress every second; a shorter limit would fail /healthz between
    // those reports and get a healthy process restarted.
    anyhow::ensure!(
        args.loop_stall_limit >= std::time::Duration::from_secs(5),
        "invalid value {:?} for --loop-stall-limit (STEWARD_LOOP_STALL_LIMIT): must be at least 5s",
        humantime::format_duration(args.loop_stall_limit).to_string()
    );
    let mut config = args.db.load_config(&args.overrides)?;
    if let Some(mode) = args.loop_mode {
        config.leader.loop_mode = mode;
    }
    if args.discover {
        config.fleet.discover = true;
    }
    if !config.queues.is_empty() || config.fleet.discover {
        return crate::fleet::run(&args, config, telemetry).await;
    }
    let target = args.db.target(&config)?;
    let candidate = Candidate::new(
        target.clone(),
        config.leader.clone(),
        config.branches.build(),
    )?
    .with_config_digest(config.digest());
    // One queue, in one database: its series carry `schema` only, and it is served as `<schema>`.
    let queue = QueueLabels {
        schema: target.schema().to_string(),
        database: None,
    };
    let metrics = Arc::new(MetricsObserver::new(candidate.instance(), queue.clone()));
    metrics.register_initial(candidate.plan());
    let candidate = candidate.with_observer(metrics);
    let queues = ServedQueues::default();
    queues.insert(queue.name(), candidate.health(), target);
    steward_telemetry::serve(
        args.metrics_addr,
        HttpState::new(
            telemetry.prometheus(),
            candidate.instance().to_owned(),
            args.loop_stall_limit,
            queues,
        ),
    )
    .await
    .with_context(|| format!("cannot serve metrics on {}", args.metrics_addr))?;
    tracing::info!(
        instance = candidate.instance(),
        mode = config.leader.loop_mode.as_str(),
        otlp = telemetry.otlp_enabled(),
        "steward starting"
    );

    let shutdown = CancellationToken::new();
    tokio::spawn(forward_signals(shutdown.clone()));
    candidate.run(shutdown).await?;
    tracing::info!("steward stopped");
    Ok(())
}

/// First SIGTERM/SIGINT: step down cleanly. A second one: exit at once.
pub(crate) async fn forward_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop steward with SIGKILL");
        return;
    };
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::info!("shutdown requested: finishing the running statement and releasing leadership");
    shutdown.cancel();
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::warn!("second signal: exiting now");
    std::process::exit(1);
}
