//! `steward-demo`: Steward's whole job on one machine, with real processes.
//!
//! PostgreSQL is found or started ([`steward_devdb::ensure_server`]); a fresh database gets the
//! schema and a cron schedule; two `steward run` processes stand for election (a leader and a
//! standby); the shared synthetic workload ([`steward_workload`]) with misbehaving jobs runs
//! against the queue on `steward-worker` workers; halfway through the leader is SIGKILLed and
//! the takeover is timed; a live table shows the branches at work; a summary closes, and the
//! exit code says whether all of it happened.
//!
//! Modules: [`fleet`] (the steward processes), [`monitor`] (what is read back from the
//! database), [`display`] (the live view) and [`summary`] (the final report and its checks).

mod display;
mod fleet;
mod monitor;
mod summary;

use anyhow::Context;
use clap::Parser;
use display::{Display, Frame};
use fleet::Fleet;
use monitor::{LeaderRow, Monitor};
use std::path::PathBuf;
use std::time::Duration;
use steward_connection::{SchemaName, Target};
use steward_queue::Queue;
use steward_worker::WorkerSettings;
use steward_workload::fleet::STANDING_BY;
use steward_workload::{Behaviour, Stats, Timings, Workload, WorkloadConfig};
use summary::Takeover;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::time::{sleep_until, Instant, MissedTickBehavior};

const DATABASE: &str = "steward_demo";
const DEFAULT_DURATION: Duration = Duration::from_secs(40);
const QUICK_DURATION: Duration = Duration::from_secs(15);
/// Rescues hold off 3 s after a term starts: shorter runs would show little.
const MIN_DURATION: Duration = Duration::from_secs(8);
/// The killed leader comes back as a new standby this long after the takeover.
const RESTART_AFTER: Duration = Duration::from_secs(3);
const CRON_SCHEDULE: &str = "demo-every-2s";
/// Six fields, seconds first (see `steward_branches::cron_sync::parse_schedule`).
const CRON_EXPRESSION: &str = "*/2 * * * * *";
const CRON_KIND: &str = "demo.cron";
const QUEUE: &str = "default";
const KIND: &str = "demo.work";
/// Small, so that jobs that keep misbehaving end up `failed`.
const MAX_ATTEMPTS: i32 = 3;
const WORKERS: usize = 4;
/// Every misbehaviour of the demo with its share of the jobs in percent.
const MISBEHAVING: [(Behaviour, u32); 6] = [
    (Behaviour::Crash, 3),
    (Behaviour::Overrun, 3),
    (Behaviour::Unanswered, 3),
    (Behaviour::Answered, 3),
    (Behaviour::Flaky, 5),
    (Behaviour::Doomed, 1),
];

/// `--set` overrides for the demo's steward processes: everything happens within seconds
/// instead of minutes. Checked against the configuration before anything starts.
const SETTINGS: &[&str] = &[
    // A worker that heartbeats every second is taken for dead after 3 s of silence.
    "branches.rescue_stale_heartbeats.staleness=3s",
    "branches.rescue_stale_heartbeats.interval=1s",
    "branches.rescue_stale_heartbeats.quiet_period=3s",
    "branches.rescue_expired_deadlines.interval=500ms",
    "branches.rescue_expired_deadlines.quiet_period=3s",
    "branches.rescue_expired_callbacks.interval=500ms",
    "branches.rescue_expired_callbacks.quiet_period=3s",
    // Finished jobs move to job_archive after 10 s.
    "branches.cleanup.interval=2s",
    "branches.cleanup.retention.completed=10s",
    "branches.cleanup.retention.failed=10s",
    "branches.cleanup.retention.cancelled=10s",
    "branches.cron_sync.interval=2s",
    "branches.cron_sync.lookahead=4s",
    "branches.queue_stats.interval=1s",
    "branches.recompute_dirty_admin_metadata.interval=1s",
    "branches.refresh_admin_metadata.interval=5s",
    "branches.priority_aging.interval=2s",
    "branches.priority_aging.age_step=2s",
    "branches.rotate_archive.interval=30s",
];

/// Steward's job end to end on this machine: PostgreSQL (found or started), a leader and a
/// standby, a misbehaving workload, a SIGKILL of the leader, and a summary.
#[derive(Parser, Debug)]
#[command(name = "steward-demo", version)]
pub struct DemoArgs {
    /// How long the workload runs, e.g. 40s, 2m or 90 (seconds) [default: 40s].
    #[arg(long, value_parser = parse_duration, conflicts_with = "quick")]
    duration: Option<Duration>,
    /// Jobs enqueued per second.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// A short run (15 s), as CI does.
    #[arg(long)]
    quick: bool,
    /// Keep the steward_demo database afterwards (it is dropped otherwise).
    #[arg(long)]
    keep: bool,
    /// The steward binary to run [default: built with cargo beside this one].
    #[arg(long, env = "STEWARD_BIN")]
    steward_bin: Option<PathBuf>,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{text:?}: expected e.g. 40s, 1500ms, 2m or 90"))?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "s" => value,
        "m" | "min" => value * 60.0,
        other => return Err(format!("{text:?}: unknown unit {other:?} (ms, s or m)")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"))
}

/// Ctrl-C (SIGINT) or SIGTERM, installed before anything starts so that either one leads to
/// an orderly stop rather than orphaned steward processes.
struct Interrupt {
    int: Signal,
    term: Signal,
}

impl Interrupt {
    fn install() -> anyhow::Result<Interrupt> {
        Ok(Interrupt {
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
    }
}

/// The demo's workload: 4 workers of 200 runs each, heartbeating every second (a third of the
/// 3 s staleness), jobs due 0-3 s after their enqueue.
fn workload_config(rate: f64) -> WorkloadConfig {
    WorkloadConfig {
        queue: QUEUE.to_owned(),
        kind: KIND.to_owned(),
        other_kinds: vec![CRON_KIND.to_owned()],
        rate,
        producers: 1,
        mix: MISBEHAVING.to_vec(),
        every_misbehaviour_each_second: true,
        scheduled_percent: 100,
        due_in: (Duration::ZERO, Duration::from_secs(3)),
        healthy_timeout: None,
        max_attempts: MAX_ATTEMPTS,
        workers: WORKERS,
        concurrency: 200,
        worker: WorkerSettings {
            heartbeat_interval: Duration::from_secs(1),
            assumed_staleness: Duration::from_secs(3),
            claim_batch: 50,
            poll_interval: Duration::from_millis(100),
            shutdown_grace: Duration::from_secs(1),
            ..WorkerSettings::default()
        },
        crash_worker: false,
        keep_books: false,
        timings: Timings {
            work: (Duration::from_millis(20), Duration::from_millis(200)),
            overrun_timeout: Duration::from_millis(500),
            overrun_by: Duration::from_millis(1500),
            unanswered_timeout: Duration::from_secs(1),
            answer_timeout: Duration::from_secs(1),
            answer_after: Duration::from_millis(200),
            ..Timings::default()
        },
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // The demo prints its own report; library logs would interleave with it. The workers'
    // warnings (outcomes refused after a rescue) are the demo working as meant.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "warn,steward_worker=error".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match run(DemoArgs::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("Error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let duration = args.duration.unwrap_or(if args.quick {
        QUICK_DURATION
    } else {
        DEFAULT_DURATION
    });
    anyhow::ensure!(
        duration >= MIN_DURATION,
        "--duration must be at least {MIN_DURATION:?}"
    );
    anyhow::ensure!(
        args.rate.is_finite() && args.rate > 0.0,
        "--rate must be a positive number of jobs per second"
    );
    // The settings themselves are checked by the first `steward run`: one that refuses them
    // exits at once, and the demo shows its log.
    steward_branches::cron_sync::parse_schedule(CRON_EXPRESSION, "UTC")
        .map_err(|bad| anyhow::anyhow!("the demo's cron schedule: {bad}"))?;
    let mut interrupt = Interrupt::install()?;
    let bin = steward_workload::fleet::steward_binary(args.steward_bin.clone(), |line| {
        println!("{line}")
    })?;

    let server = steward_devdb::ensure_server()
        .await
        .context("finding or starting PostgreSQL")?;
    let schema = SchemaName::default();
    let url = fresh_database(server.url(), DATABASE).await?;
    let target = Target::new(&url, schema.clone())?.named("steward-demo");
    let version = {
        let mut client = target.connect().await?;
        let report = steward_schema::migrate(&mut client, &schema).await?;
        add_cron_schedule(&client).await?;
        report.version
    };
    let log_dir = log_dir()?;
    let mut header = Vec::new();
    let mut say = |line: String| {
        println!("{line}");
        header.push(line);
    };
    say(format!(
        "postgres: {}; database {DATABASE}, schema {schema} at version {version}",
        server.describe()
    ));
    say(format!(
        "steward logs (JSON, one file per process): {}",
        log_dir.display()
    ));
    say(format!(
        "workload: {} jobs/s for {:.0} s, {WORKERS} steward-worker workers; misbehaving: {}",
        args.rate,
        duration.as_secs_f64(),
        MISBEHAVING
            .iter()
            .map(|(b, share)| format!("{share}% {}", b.name()))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let command = log_dir.join("command.txt");
    say(format!(
        "steward run: heartbeat staleness and rescue quiet periods 3 s, finished jobs archived \
         after 10 s, cron {CRON_EXPRESSION:?}; full command in {}",
        command.display()
    ));
    write_command(&command, &bin, &url, &schema)?;

    let mut monitor = Monitor::connect(&target).await?;
    let mut fleet = Fleet::new(&bin, &url, schema.as_str(), SETTINGS, &log_dir);
    let driven = drive(
        duration,
        args.rate,
        &mut fleet,
        &mut monitor,
        &target,
        header,
        &mut interrupt,
    )
    .await;

    // Whatever happened, the processes stop before anything is reported: standbys first,
    // then the leader, each with SIGTERM.
    let leader = monitor
        .leader()
        .await
        .ok()
        .filter(LeaderRow::leading)
        .and_then(|l| l.pid());
    fleet.shutdown(leader).await;
    let driven = match driven {
        Ok(driven) => driven,
        Err(e) => {
            print_logs(&fleet, true);
            return Err(e.context("the demo could not run"));
        }
    };

    // After the step-down, branch_health holds the last leader's final counters.
    monitor.sample().await?;
    let totals = monitor.totals();
    let mut problems = summary::print(
        monitor.client(),
        &summary::Run {
            elapsed: driven.elapsed,
            rate: args.rate,
            interrupted: driven.interrupted,
            takeover: driven.takeover.as_ref(),
            workload: &driven.workload,
            totals: &totals,
            fleet: &fleet,
            cron_schedule: CRON_SCHEDULE,
            log_dir: &log_dir,
        },
    )
    .await?;
    problems.extend(driven.problems);
    drop(monitor);

    if server.is_throwaway() {
        if args.keep {
            println!("--keep: the throwaway cluster is deleted on exit all the same");
        }
    } else if args.keep {
        println!(
            "kept database {DATABASE}: psql '{}'",
            steward_connection::redact_url(&url)
        );
    } else if let Err(e) = drop_database(server.url(), DATABASE).await {
        println!("could not drop database {DATABASE}: {e:#}");
    }

    if problems.is_empty() {
        if driven.interrupted {
            println!("demo interrupted: everything stopped cleanly (the takeover and rescue checks need a full run)");
        } else {
            println!("demo OK");
        }
        return Ok(());
    }
    println!("demo FAILED:");
    for problem in &problems {
        println!("  - {problem}");
    }
    print_logs(&fleet, false);
    anyhow::bail!(
        "the demo failed ({} problem(s), listed above)",
        problems.len()
    )
}

/// What happened while the demo ran.
struct Driven {
    elapsed: Duration,
    interrupted: bool,
    takeover: Option<Takeover>,
    problems: Vec<String>,
    workload: Stats,
}

/// Elects the first leader, starts the standby and the workload, kills the leader halfway,
/// restarts it as a standby, and draws the live view until the time is up.
async fn drive(
    duration: Duration,
    rate: f64,
    fleet: &mut Fleet,
    monitor: &mut Monitor,
    target: &Target,
    mut header: Vec<String>,
    interrupt: &mut Interrupt,
) -> anyhow::Result<Driven> {
    let mut say = |line: String| {
        println!("{line}");
        header.push(line);
    };
    let stopped_early = |problems| Driven {
        elapsed: Duration::ZERO,
        interrupted: true,
        takeover: None,
        problems,
        workload: Stats::default(),
    };

    let first = fleet.spawn("steward-1")?;
    let elected = tokio::select! {
        elected = wait_for_leader(monitor, fleet, Duration::from_secs(30)) => elected?,
        _ = interrupt.recv() => return Ok(stopped_early(Vec::new())),
    };
    anyhow::ensure!(
        elected.pid() == Some(first),
        "the leader is {}: is another steward running against {DATABASE}?",
        elected
            .pid()
            .map_or_else(|| "unknown".to_owned(), |p| fleet.name(p))
    );
    say(format!(
        "{} leads epoch {}{}",
        fleet.name(first),
        elected.epoch,
        metrics_of(fleet, "steward-1")
    ));
    let second = fleet.spawn("steward-2")?;
    let standing_by = tokio::select! {
        seen = fleet.wait_for_message("steward-2", STANDING_BY, Duration::from_secs(15)) => seen,
        _ = interrupt.recv() => return Ok(stopped_early(Vec::new())),
    };
    say(if standing_by {
        format!(
            "{} stands by{}",
            fleet.name(second),
            metrics_of(fleet, "steward-2")
        )
    } else {
        format!(
            "{} started (no \"standing by\" log line yet)",
            fleet.name(second)
        )
    });

    let mut display = Display::new(header);
    let queue = Queue::new(target.pool(16).context("creating the workload's pool")?);
    let workload = Workload::start(queue, target, workload_config(rate))
        .await
        .context("starting the workload")?;
    let started = Instant::now();
    let end = started + duration;
    let kill_at = started + duration / 2;
    let mut killed = false;
    let mut restart_at: Option<Instant> = None;
    let mut takeover = None;
    let mut problems = Vec::new();
    let mut interrupted = false;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = interrupt.recv() => {
                display.event(started.elapsed(), "interrupted: stopping the workload and the steward processes");
                interrupted = true;
                break;
            }
            _ = sleep_until(end) => break,
            _ = sleep_until(kill_at), if !killed => {
                killed = true;
                match kill_leader(monitor, fleet, &mut display, started).await {
                    Ok(t) => {
                        display.event(started.elapsed(), t.line());
                        if Instant::now() + RESTART_AFTER + Duration::from_secs(2) < end {
                            restart_at = Some(Instant::now() + RESTART_AFTER);
                        }
                        takeover = Some(t);
                    }
                    Err(e) => {
                        display.event(started.elapsed(), format!("takeover failed: {e:#}"));
                        problems.push(format!("takeover: {e:#}"));
                    }
                }
            }
            _ = sleep_until(restart_at.unwrap_or(end)), if restart_at.is_some() => {
                restart_at = None;
                match fleet.spawn("steward-3") {
                    Ok(pid) => {
                        display.event(
                        started.elapsed(),
                        format!("restarted the killed instance as steward-3 (pid {pid}), a new standby"),
                        );
                    }
                    Err(e) => problems.push(format!("restarting the killed instance: {e:#}")),
                }
            }
            _ = tick.tick() => {
                let exited = fleet.exited_early();
                if !exited.is_empty() {
                    // Reported as problems by the summary, from the processes' fates.
                    for line in exited {
                        display.event(started.elapsed(), line);
                    }
                    break;
                }
                for proc in fleet.procs() {
                    if let Some(addr) = proc.process.metrics_addr() {
                        monitor.metrics_addr(proc.pid, addr);
                    }
                }
                let snapshot = monitor.sample().await?;
                let stats = workload.stats();
                display.draw(&Frame {
                    elapsed: started.elapsed(),
                    duration,
                    leader: describe_leader(&snapshot.leader, fleet),
                    snapshot: &snapshot,
                    workload: &stats,
                });
            }
        }
    }
    let elapsed = started.elapsed();
    let workload = workload.stop().await.stats();
    display.event(elapsed, "workload stopped; stopping the steward processes");
    Ok(Driven {
        elapsed,
        interrupted,
        takeover,
        problems,
        workload,
    })
}

/// Polls the leader row until a term is open, failing if a process exits meanwhile.
async fn wait_for_leader(
    monitor: &Monitor,
    fleet: &mut Fleet,
    within: Duration,
) -> anyhow::Result<LeaderRow> {
    let deadline = Instant::now() + within;
    loop {
        let exited = fleet.exited_early();
        anyhow::ensure!(exited.is_empty(), "{}", exited.join("; "));
        let leader = monitor.leader().await?;
        if leader.leading() {
            return Ok(leader);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no steward process became leader within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGKILLs the leader and times the takeover: from the signal until the leader row shows a
/// new open term, polled every 5 ms.
async fn kill_leader(
    monitor: &Monitor,
    fleet: &mut Fleet,
    display: &mut Display,
    started: Instant,
) -> anyhow::Result<Takeover> {
    const POLL: Duration = Duration::from_millis(5);
    const WITHIN: Duration = Duration::from_secs(15);
    let before = monitor.leader().await?;
    anyhow::ensure!(before.leading(), "there was no leader to kill");
    let pid = before.pid().context("the leader row names no pid")?;
    anyhow::ensure!(
        fleet.by_pid(pid).is_some(),
        "the leader is {}, which the demo cannot kill",
        fleet.name(pid)
    );
    let killed = fleet.name(pid);
    display.event(
        started.elapsed(),
        format!(
            "killing the leader, {killed} in epoch {}, with SIGKILL",
            before.epoch
        ),
    );
    let sent = Instant::now();
    fleet.kill(pid)?;
    let after = loop {
        let now = monitor.leader().await?;
        if now.epoch != before.epoch && now.leading() {
            break now;
        }
        anyhow::ensure!(
            sent.elapsed() < WITHIN,
            "no standby took over within {WITHIN:?} of killing the leader"
        );
        tokio::time::sleep(POLL).await;
    };
    let took = sent.elapsed();
    Ok(Takeover {
        killed,
        old_epoch: before.epoch,
        new_leader: after
            .pid()
            .map_or_else(|| "unknown".to_owned(), |p| fleet.name(p)),
        new_epoch: after.epoch,
        took,
    })
}

/// `; metrics on http://.../metrics` when the process has said where it serves them.
fn metrics_of(fleet: &Fleet, label: &str) -> String {
    fleet
        .by_label(label)
        .and_then(|p| p.process.metrics_addr())
        .map(|addr| format!("; metrics on http://{addr}/metrics"))
        .unwrap_or_default()
}

fn describe_leader(leader: &LeaderRow, fleet: &Fleet) -> String {
    if !leader.leading() {
        return if leader.epoch == 0 {
            "none yet".to_owned()
        } else {
            format!("none (epoch {} ended)", leader.epoch)
        };
    }
    format!(
        "epoch {} · {} · instance {}",
        leader.epoch,
        leader
            .pid()
            .map_or_else(|| "pid unknown".to_owned(), |p| fleet.name(p)),
        leader.instance.as_deref().unwrap_or("?")
    )
}

/// The last lines of the logs of processes that went wrong (or of all of them).
fn print_logs(fleet: &Fleet, all: bool) {
    for proc in fleet.procs() {
        if !all && proc.problem().is_none() {
            continue;
        }
        println!(
            "── {} (pid {}): {}; last lines of {}",
            proc.label,
            proc.pid,
            proc.fate_text(),
            proc.log.display()
        );
        for line in proc.tail(15) {
            println!("   {line}");
        }
    }
}

/// A table-managed cron schedule firing every two seconds.
async fn add_cron_schedule(client: &tokio_postgres::Client) -> anyhow::Result<()> {
    client
        .execute(
            "INSERT INTO cron_schedules (name, expression, kind, args, max_attempts)
             VALUES ($1, $2, $3, $4, $5)",
            &[
                &CRON_SCHEDULE,
                &CRON_EXPRESSION,
                &CRON_KIND,
                &serde_json::json!({ steward_workload::behaviour::ARG: Behaviour::Normal.name() }),
                &MAX_ATTEMPTS,
            ],
        )
        .await
        .context("adding the demo's cron schedule")?;
    Ok(())
}

/// Writes how the demo starts `steward run`, to repeat or vary it by hand.
fn write_command(
    path: &std::path::Path,
    exe: &std::path::Path,
    url: &str,
    schema: &SchemaName,
) -> anyhow::Result<()> {
    let mut text = format!(
        "DATABASE_URL='{}' STEWARD_SCHEMA={schema} STEWARD_LOG_FORMAT=json \\\n  \
         STEWARD_METRICS_ADDR=127.0.0.1:0 {} run",
        steward_connection::redact_url(url),
        exe.display()
    );
    for setting in SETTINGS {
        text.push_str(&format!(" \\\n  --set {setting}"));
    }
    text.push('\n');
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// A directory for the processes' logs, kept after the demo.
fn log_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("steward-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("creating the log directory {}", dir.display()))?;
    Ok(dir)
}

async fn admin(server_url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let config: tokio_postgres::Config = server_url
        .parse()
        .with_context(|| format!("parsing {}", steward_connection::redact_url(server_url)))?;
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .context("connecting to the server")?;
    tokio::spawn(connection);
    Ok(client)
}

/// Creates (or re-creates) a database for the demo and returns its URL.
async fn fresh_database(server_url: &str, name: &str) -> anyhow::Result<String> {
    let admin = admin(server_url).await?;
    // Checked first, so that a first run shows no "does not exist, skipping" notice.
    let exists = admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await
        .context("looking for a previous demo database")?
        .is_some();
    if exists {
        admin
            .batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)"))
            .await
            .with_context(|| format!("dropping the previous {name} database"))?;
    }
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .with_context(|| format!("creating database {name}"))?;
    Ok(with_database(server_url, name))
}

async fn drop_database(server_url: &str, name: &str) -> anyhow::Result<()> {
    admin(server_url)
        .await?
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await
        .with_context(|| format!("dropping database {name}"))
}

/// The server's URL (or key=value string) pointing at database `name` instead.
fn with_database(server_url: &str, name: &str) -> String {
    let Some(scheme_end) = server_url.find("://").map(|i| i + 3) else {
        // key=value form: a later dbname wins.
        return format!("{server_url} dbname={name}");
    };
    let (base, query) = match server_url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (server_url, String::new()),
    };
    let authority_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    format!("{}/{name}{query}", &base[..authority_end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_point_at_the_demo_database() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/postgres", "d"),
            "postgres://postgres@127.0.0.1:5432/d"
        );
        assert_eq!(
            with_database("postgresql://u:p@h/app?sslmode=disable", "d"),
            "postgresql://u:p@h/d?sslmode=disable"
        );
        assert_eq!(
            with_database("postgres://h:5433", "d"),
            "postgres://h:5433/d"
        );
        assert_eq!(
            with_database("host=/tmp user=me", "d"),
            "host=/tmp user=me dbname=d"
        );
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("40s"), Ok(Duration::from_secs(40)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("3h").is_err());
    }

    #[test]
    fn the_cron_schedule_parses_and_the_mix_leaves_room_for_normal_jobs() {
        steward_branches::cron_sync::parse_schedule(CRON_EXPRESSION, "UTC").unwrap();
        let shares: u32 = MISBEHAVING.iter().map(|(_, share)| share).sum();
        assert!(shares < 100);
    }

    #[test]
    fn the_workers_heartbeat_within_a_third_of_the_staleness() {
        let staleness = Duration::from_secs(3);
        assert!(SETTINGS.contains(&"branches.rescue_stale_heartbeats.staleness=3s"));
        assert!(workload_config(1.0).worker.heartbeat_interval <= staleness / 3);
    }
}
