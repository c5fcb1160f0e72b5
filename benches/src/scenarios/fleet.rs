//! Scenario 10, fleet: many queues (schemas) of one database maintained by a few
//! `steward run --discover` processes that share them out (ADR 0003). On a fresh database:
//!
//! - **settle:** `--fleet-queues` schemas migrated with `steward migrate`, then the processes
//!   start together; the time until every queue has a leader and no process leads more than
//!   the share rule's cap, each process's share, and Steward's sessions in the database;
//! - **idle:** each process's CPU (`/proc/<pid>/stat`) and RSS over a window, and the CPU of
//!   Steward's PostgreSQL backends, also per queue led;
//! - **busy queue among idle ones:** the promotion flow on one queue, the others idle;
//! - **takeover:** the process leading the most queues gets SIGKILL; per queue, the time until
//!   another process holds its lock (the lock table read every 10 ms); a new process replaces
//!   it and the fleet settles again before the next trial;
//! - **busy queue among busy ones:** the fleet stops, every other queue gets a cleanup backlog
//!   (rows past retention, the scale scenario's), the fleet starts again and the flow runs on
//!   the one queue while the others' cleanup passes queue up for the shared hygiene pools.
//!
//! Promotion lag is recorded in the busy queue's schema by a trigger the bench adds: for every
//! row the promoter turns available, `clock_timestamp() − run_at` at the end of the promoting
//! statement, which is how the promoter itself computes it; the leader's `/metrics` histogram
//! is read too, as a check. The SLO start delay is estimated from the buckets of the `/metrics`
//! of the process leading the busy queue: every SLO pass of every queue it leads, since a
//! fleet process's series carry no schema label yet.

use super::footprint::backend_pids;
use super::scale::{create_backlog_partitions, insert_backlog, BACKLOG_QUEUE};
use crate::db::{BenchDb, Pg};
use crate::hist::{ratio, round2, round3, Hist, Quantiles};
use crate::procs::{clock_ticks, machine_cpu, proc_stat, rss_kib, MachineCpu, StewardProcess};
use crate::report::{num, opt, ratio_cell, table, Target};
use anyhow::Context;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};
use steward_connection::SchemaName;
use steward_leader::share::ShareRule;
use steward_leader::FleetSettings;
use steward_workload::fleet::FLEET_STARTING;
use steward_workload::{metrics, queues, Stats as WorkloadStats};
use tokio_postgres::Client;

/// How long the fleet may take to lead every queue within the cap, after a start or a join.
const SETTLE_WITHIN: Duration = Duration::from_secs(120);
/// How long a process may take to say who it is.
const START_WITHIN: Duration = Duration::from_secs(30);
/// How often the lock table is read while queues are being taken over.
const TAKEOVER_POLL: Duration = Duration::from_millis(10);
/// A takeover that takes longer than this is a failed run, not a slow result.
const TAKEOVER_WITHIN: Duration = Duration::from_secs(30);
/// A scrape of `/metrics` that takes longer is given up.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
/// The histograms read from `/metrics` (crates/steward-telemetry/src/names.rs).
const START_DELAY: &str = "steward_maintenance_branch_start_delay_seconds";
const DURATION: &str = "steward_maintenance_branch_duration_seconds";
const PROMOTION_LAG: &str = "steward_promotion_lag_seconds";
/// The flow's producers and workers, as in the promotion and scale scenarios.
const PRODUCERS: usize = 2;
const WORKERS: usize = 4;

pub struct Settings {
    pub quick: bool,
    pub queues: usize,
    pub processes: usize,
    /// The idle window and each busy window.
    pub window: Duration,
    pub warmup: Duration,
    /// The flow's jobs are due uniformly over this horizon (at most the warm-up).
    pub horizon: Duration,
    pub rate: f64,
    /// Cleanup backlog rows per queue other than the busy one.
    pub backlog_rows: i64,
    pub trials: u32,
    /// Quiet time after the fleet settled, before the idle window.
    pub settle: Duration,
    /// `[fleet] slo_sessions` for the processes (`--set`), instead of the shipped default.
    pub slo_sessions: Option<usize>,
    /// Further `KEY=VALUE` settings for the processes (`--set`).
    pub extra: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Params {
    pub queues: usize,
    pub processes: usize,
    pub window_s: f64,
    pub warmup_s: f64,
    pub horizon_s: f64,
    pub rate: f64,
    pub producers: usize,
    pub workers: usize,
    pub backlog_rows_per_queue: i64,
    pub trials: u32,
    /// The fleet's settings the processes run with: the shipped ones, but `slo_sessions` when
    /// the bench was told otherwise.
    pub poll_interval_ms: f64,
    pub slo_sessions: usize,
    pub hygiene_sessions: usize,
    /// Settings given to the processes besides the shipped ones (`--fleet-set`).
    pub extra_settings: Vec<String>,
    pub steward_bin: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Share {
    pub instance: String,
    pub pid: u32,
    pub queues: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Settle {
    /// From the processes' start until every queue had a leader.
    pub all_led_s: f64,
    /// Until, moreover, no process led more than the cap.
    pub settled_s: f64,
    pub fair_share: usize,
    pub cap: usize,
    pub shares: Vec<Share>,
    /// Steward's sessions in the database once settled.
    pub sessions: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct IdleProcess {
    pub instance: String,
    pub pid: u32,
    pub queues: usize,
    /// Of one core.
    pub cpu_percent: f64,
    pub cpu_percent_per_queue: Option<f64>,
    pub rss_mib_mean: f64,
    pub rss_mib_max: f64,
    pub rss_mib_per_queue: Option<f64>,
    pub threads: u64,
    /// Its SLO passes over the window, from its `/metrics`.
    pub slo: Option<SloLoad>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Idle {
    pub window_s: f64,
    pub processes: Vec<IdleProcess>,
    /// All processes together, of one core.
    pub cpu_percent: f64,
    pub cpu_percent_per_queue: f64,
    pub rss_mib_total: f64,
    /// Steward's PostgreSQL backends at the window's end.
    pub db_backends: usize,
    /// Their CPU over the window, of one core (null when /proc does not show them).
    pub db_backend_cpu_percent: Option<f64>,
    pub db_backend_cpu_percent_per_queue: Option<f64>,
    pub sessions_max: i64,
    /// The whole machine's CPU (every core) busy over the window, in percent: the fleet, its
    /// backends, the bench and anything else running.
    pub machine_cpu_busy_percent: Option<f64>,
}

/// Quantiles estimated from `/metrics` buckets (as `histogram_quantile` does), milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Estimated {
    pub count: u64,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
}

/// A process's SLO passes (every queue it leads) over a window, from two scrapes of its
/// `/metrics`.
#[derive(Debug, Clone, Serialize)]
pub struct SloLoad {
    pub passes_per_s: f64,
    pub start_delay_ms: Option<Estimated>,
    pub pass_ms: Option<Estimated>,
    /// Pass time per second of window: how many SLO sessions its passes kept busy on average
    /// (pass bodies only: the checkout and the `search_path` round trip are not counted).
    pub sessions_busy: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Busy {
    /// What the other queues were doing: "idle" or "hygiene" (cleanup backlogs).
    pub neighbours: String,
    pub schema: String,
    /// The instance leading the busy queue when the window opened.
    pub leader: String,
    /// Queues that instance led.
    pub leader_queues: usize,
    /// Whether the busy queue changed hands during the window (then the `/metrics` figures
    /// and the overruns are null).
    pub leader_changed: bool,
    pub window_s: f64,
    pub achieved_rate: f64,
    /// From the bench's trigger: every promotion in the window.
    pub promotion_lag_ms: Quantiles,
    /// From the leader's `/metrics` over the window: a check on the trigger's figures.
    pub metrics_promotion_lag_ms: Option<Estimated>,
    /// Every SLO pass of every queue the busy queue's leader led, from its `/metrics`.
    pub leader_slo: Option<SloLoad>,
    /// New overrun episodes of the busy queue's SLO branches (`branch_health`).
    pub slo_overruns: Option<i64>,
    /// Cleanup backlog rows in the other queues when the window opened and closed.
    pub backlog_rows_at_start: i64,
    pub backlog_rows_left: i64,
    pub cleanup_rows_per_s: f64,
    /// Fewest other queues with backlog left among those one process leads, at the close.
    pub backlog_queues_left_min_per_process: Option<usize>,
    pub sessions_max: i64,
    /// As in [`Idle`].
    pub machine_cpu_busy_percent: Option<f64>,
    pub workload: WorkloadStats,
}

#[derive(Debug, Clone, Serialize)]
pub struct Trial {
    pub victim: String,
    pub queues: usize,
    /// From the kill until the victim held none of its locks (its backend had exited).
    pub released_ms: Option<f64>,
    pub takeover_ms: Quantiles,
    /// How long the fleet took to settle again after the replacement joined (null after the
    /// last trial).
    pub resettled_s: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TakeoverResult {
    pub trials: Vec<Trial>,
    /// Every queue of every trial.
    pub takeover_ms: Quantiles,
}

#[derive(Debug, Clone, Serialize)]
pub struct FleetResult {
    pub params: Params,
    pub settle: Settle,
    pub idle: Idle,
    /// With idle neighbours, then with hygiene-busy ones.
    pub busy: Vec<Busy>,
    pub backlog_seed_s: f64,
    pub takeover: TakeoverResult,
    /// The most Steward sessions seen at once in the database, sampled every second of every
    /// window and after every settle.
    pub sessions_max: i64,
}

pub async fn run(pg: &Pg, bin: &Path, s: &Settings) -> anyhow::Result<(FleetResult, Vec<Target>)> {
    anyhow::ensure!(s.queues >= 2, "fleet: at least 2 queues");
    anyhow::ensure!(s.processes >= 2, "fleet: at least 2 processes");
    let db = pg.create_empty("fleet").await?;
    let result = run_on(&db, bin, s).await;
    pg.drop_db(db).await;
    let result = result?;
    let targets = targets(s, &result);
    Ok((result, targets))
}

/// One `steward run --discover` of the fleet.
struct Member {
    process: StewardProcess,
    instance: String,
    metrics: Option<String>,
}

impl Member {
    async fn start(bin: &Path, url: &str, args: &[String]) -> anyhow::Result<Member> {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut process = StewardProcess::spawn(bin, url, &args)?;
        let line = process.wait_message(FLEET_STARTING, START_WITHIN).await?;
        let instance = line
            .field_str("instance")
            .context("the fleet process logged no instance")?
            .to_owned();
        Ok(Member {
            metrics: process.metrics_addr(),
            process,
            instance,
        })
    }

    async fn scrape(&self) -> Option<String> {
        metrics::scrape(self.metrics.as_deref()?, SCRAPE_TIMEOUT).await
    }
}

/// Everything the phases share.
struct Fleet<'a> {
    db: &'a BenchDb,
    bin: &'a Path,
    /// `steward run`'s arguments.
    args: Vec<String>,
    client: Client,
    schemas: Vec<String>,
    members: Vec<Member>,
    sessions_max: i64,
}

impl Fleet<'_> {
    async fn spawn(&mut self, n: usize) -> anyhow::Result<()> {
        for _ in 0..n {
            self.members
                .push(Member::start(self.bin, &self.db.url, &self.args).await?);
        }
        Ok(())
    }

    async fn leaders(&self) -> anyhow::Result<BTreeMap<String, String>> {
        Ok(queues::leaders(&self.client, &self.schemas).await?)
    }

    async fn sample_sessions(&mut self) -> anyhow::Result<i64> {
        let n = queues::sessions(&self.client).await?;
        self.sessions_max = self.sessions_max.max(n);
        Ok(n)
    }

    fn member(&self, instance: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.instance == instance)
    }

    /// Waits until every queue is led and no member leads more than the cap; returns the time
    /// to the first and to the whole, from `since`. A member may lead nothing: the share rule
    /// moves queues only off a process over the cap, so one that joins a fleet whose members
    /// are all at the cap stays empty (10 queues on 3: 5, 5 and 0).
    async fn settled(&mut self, since: Instant) -> anyhow::Result<(f64, f64)> {
        let cap = ShareRule::cap(self.schemas.len(), self.members.len());
        let mut all_led = None;
        loop {
            for member in &mut self.members {
                if let Some(status) = member.process.try_wait() {
                    anyhow::bail!(
                        "fleet process {} exited ({status}); its last output:\n{}",
                        member.instance,
                        member.process.tail(40).join("\n")
                    );
                }
            }
            let leaders = self.leaders().await?;
            let counts = queues::counts(&leaders);
            if leaders.len() == self.schemas.len() {
                all_led.get_or_insert_with(|| since.elapsed().as_secs_f64());
                if counts.values().all(|n| *n <= cap) {
                    let settled = since.elapsed().as_secs_f64();
                    self.sample_sessions().await?;
                    return Ok((all_led.unwrap_or(settled), settled));
                }
            }
            anyhow::ensure!(
                since.elapsed() < SETTLE_WITHIN,
                "the fleet did not settle within {SETTLE_WITHIN:?}: {} of {} queues led, {counts:?} (cap {cap})",
                leaders.len(),
                self.schemas.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sleeps `window`, sampling each member's RSS (by pid) and Steward's sessions (the most
    /// seen) every second.
    async fn window(&mut self, window: Duration) -> anyhow::Result<(HashMap<u32, Vec<f64>>, i64)> {
        let started = Instant::now();
        let mut rss: HashMap<u32, Vec<f64>> = HashMap::new();
        let mut sessions = 0;
        loop {
            for member in &self.members {
                if let Some(kib) = rss_kib(member.process.pid()) {
                    rss.entry(member.process.pid())
                        .or_default()
                        .push(kib as f64 / 1024.0);
                }
            }
            sessions = sessions.max(self.sample_sessions().await?);
            let left = window.saturating_sub(started.elapsed());
            if left.is_zero() {
                return Ok((rss, sessions));
            }
            tokio::time::sleep(left.min(Duration::from_secs(1))).await;
        }
    }

    /// SIGTERM to every member at once, then waits for each (SIGKILL after 30 s).
    async fn stop(&mut self) {
        for member in &self.members {
            let _ = member.process.signal("TERM");
        }
        for mut member in self.members.drain(..) {
            if member
                .process
                .wait_exit(Duration::from_secs(30))
                .await
                .is_none()
            {
                let _ = member.process.kill();
            }
        }
    }
}

fn tenant(i: usize) -> String {
    format!("tenant_{i:03}")
}

async fn run_on(db: &BenchDb, bin: &Path, s: &Settings) -> anyhow::Result<FleetResult> {
    let fleet_settings = FleetSettings::default();
    let params = Params {
        queues: s.queues,
        processes: s.processes,
        window_s: s.window.as_secs_f64(),
        warmup_s: s.warmup.as_secs_f64(),
        horizon_s: s.horizon.as_secs_f64(),
        rate: s.rate,
        producers: PRODUCERS,
        workers: WORKERS,
        backlog_rows_per_queue: s.backlog_rows,
        trials: s.trials,
        poll_interval_ms: fleet_settings.poll_interval.as_secs_f64() * 1000.0,
        slo_sessions: s.slo_sessions.unwrap_or(fleet_settings.slo_sessions),
        hygiene_sessions: fleet_settings.hygiene_sessions,
        extra_settings: s.extra.clone(),
        steward_bin: bin.display().to_string(),
    };
    let schemas: Vec<String> = (1..=s.queues).map(tenant).collect();
    crate::progress(format!("fleet: migrating {} schemas", schemas.len()));
    let started = Instant::now();
    let migrate_bin = bin.to_owned();
    let (url, to_migrate) = (db.url.clone(), schemas.clone());
    tokio::task::spawn_blocking(move || queues::migrate(&migrate_bin, &url, &to_migrate))
        .await
        .context("migrating the schemas")?
        .map_err(|e| anyhow::anyhow!(e))?;
    crate::progress(format!(
        "fleet: {} schemas migrated in {:.1} s",
        schemas.len(),
        started.elapsed().as_secs_f64()
    ));
    let busy_schema = schemas[0].clone();
    let client = db.client().await?;
    client
        .batch_execute(&lag_probe(&busy_schema))
        .await
        .context("adding the promotion-lag trigger")?;
    let mut args = vec!["--discover".to_owned()];
    if let Some(n) = s.slo_sessions {
        args.extend(["--set".to_owned(), format!("fleet.slo_sessions={n}")]);
    }
    for setting in &s.extra {
        args.extend(["--set".to_owned(), setting.clone()]);
    }
    let mut fleet = Fleet {
        db,
        bin,
        args,
        client,
        schemas,
        members: Vec::new(),
        sessions_max: 0,
    };

    crate::progress(format!(
        "fleet: {} processes start on {} queues",
        s.processes, s.queues
    ));
    let started = Instant::now();
    fleet.spawn(s.processes).await?;
    let (all_led_s, settled_s) = fleet.settled(started).await?;
    let settle = settle_result(&mut fleet, all_led_s, settled_s).await?;
    crate::progress(format!(
        "fleet: settled in {settled_s:.2} s ({} sessions); idle for {:.0} s",
        settle.sessions,
        s.window.as_secs_f64()
    ));
    tokio::time::sleep(s.settle).await;
    let idle = idle(&mut fleet, s.window).await?;

    let mut busy = vec![busy_window(&mut fleet, s, &busy_schema, "idle").await?];

    let takeover = takeover(&mut fleet, s).await?;

    // The backlog goes in while no process runs, so that no cleanup starts on it before the
    // fleet does: each queue then has its whole backlog when the window's warm-up begins.
    fleet.stop().await;
    let neighbours: Vec<String> = fleet.schemas[1..].to_vec();
    crate::progress(format!(
        "fleet: seeding a cleanup backlog of {} rows in each of {} queues",
        s.backlog_rows,
        neighbours.len()
    ));
    let started = Instant::now();
    seed_backlogs(db, &neighbours, s.backlog_rows).await?;
    let backlog_seed_s = round2(started.elapsed().as_secs_f64());
    crate::progress(format!(
        "fleet: backlogs seeded in {backlog_seed_s:.1} s; the fleet starts again"
    ));
    let started = Instant::now();
    fleet.spawn(s.processes).await?;
    fleet.settled(started).await?;
    busy.push(busy_window(&mut fleet, s, &busy_schema, "hygiene").await?);
    fleet.stop().await;

    Ok(FleetResult {
        params,
        settle,
        idle,
        busy,
        backlog_seed_s,
        takeover,
        sessions_max: fleet.sessions_max,
    })
}

async fn settle_result(
    fleet: &mut Fleet<'_>,
    all_led_s: f64,
    settled_s: f64,
) -> anyhow::Result<Settle> {
    let counts = queues::counts(&fleet.leaders().await?);
    let shares = fleet
        .members
        .iter()
        .map(|m| Share {
            instance: m.instance.clone(),
            pid: m.process.pid(),
            queues: counts.get(&m.instance).copied().unwrap_or(0),
        })
        .collect();
    Ok(Settle {
        all_led_s: round3(all_led_s),
        settled_s: round3(settled_s),
        fair_share: ShareRule::fair_share(fleet.schemas.len(), fleet.members.len()),
        cap: ShareRule::cap(fleet.schemas.len(), fleet.members.len()),
        shares,
        sessions: fleet.sample_sessions().await?,
    })
}

/// CPU ticks of each pid that /proc shows.
fn ticks(pids: &[u32]) -> HashMap<u32, u64> {
    pids.iter()
        .filter_map(|pid| proc_stat(*pid).map(|s| (*pid, s.cpu_ticks)))
        .collect()
}

async fn idle(fleet: &mut Fleet<'_>, window: Duration) -> anyhow::Result<Idle> {
    let counts = queues::counts(&fleet.leaders().await?);
    let pids: Vec<u32> = fleet.members.iter().map(|m| m.process.pid()).collect();
    let backends = backend_pids(fleet.db).await?;
    let db_start = ticks(&backends);
    let mut scrapes = Vec::new();
    for member in &fleet.members {
        scrapes.push(member.scrape().await);
    }
    let start: Vec<_> = pids.iter().map(|pid| proc_stat(*pid)).collect();
    let machine_start = machine_cpu();
    let started = Instant::now();
    let (rss, sessions_max) = fleet.window(window).await?;
    let end: Vec<_> = pids.iter().map(|pid| proc_stat(*pid)).collect();
    let machine_end = machine_cpu();
    let window_s = started.elapsed().as_secs_f64();
    let mut slo = Vec::new();
    for (member, before) in fleet.members.iter().zip(&scrapes) {
        let after = member.scrape().await;
        slo.push(match (before, after) {
            (Some(before), Some(after)) => Some(slo_load(before, &after, window_s)),
            _ => None,
        });
    }
    // Pool sessions may open during the window: a backend that is new counts from its start.
    let backends_end = backend_pids(fleet.db).await?;
    let db_end = ticks(&backends_end);

    let hz = clock_ticks();
    let percent = |ticks: u64| round2(ticks as f64 / hz / window_s * 100.0);
    let mut processes = Vec::new();
    for (i, member) in fleet.members.iter().enumerate() {
        let (Some(a), Some(b)) = (&start[i], &end[i]) else {
            anyhow::bail!("fleet process {} is gone from /proc", member.instance);
        };
        let queues = counts.get(&member.instance).copied().unwrap_or(0);
        let samples = rss.get(&member.process.pid()).cloned().unwrap_or_default();
        let mean = samples.iter().sum::<f64>() / samples.len().max(1) as f64;
        let max = samples.iter().copied().fold(0.0, f64::max);
        let cpu = percent(b.cpu_ticks.saturating_sub(a.cpu_ticks));
        let per_queue = |v: f64| (queues > 0).then(|| round3(v / queues as f64));
        processes.push(IdleProcess {
            instance: member.instance.clone(),
            pid: member.process.pid(),
            queues,
            cpu_percent: cpu,
            cpu_percent_per_queue: per_queue(cpu),
            rss_mib_mean: round2(mean),
            rss_mib_max: round2(max),
            rss_mib_per_queue: per_queue(mean),
            threads: a.threads.max(b.threads),
            slo: slo[i].clone(),
        });
    }
    let cpu_percent = round2(processes.iter().map(|p| p.cpu_percent).sum());
    let queues_led: usize = processes.iter().map(|p| p.queues).sum();
    let db_cpu = (!db_end.is_empty()).then(|| {
        percent(
            db_end
                .iter()
                .map(|(pid, end)| end.saturating_sub(db_start.get(pid).copied().unwrap_or(0)))
                .sum(),
        )
    });
    Ok(Idle {
        window_s: round2(window_s),
        cpu_percent,
        cpu_percent_per_queue: round3(cpu_percent / queues_led.max(1) as f64),
        rss_mib_total: round2(processes.iter().map(|p| p.rss_mib_mean).sum()),
        processes,
        db_backends: backends_end.len(),
        db_backend_cpu_percent: db_cpu,
        db_backend_cpu_percent_per_queue: db_cpu.map(|c| round3(c / queues_led.max(1) as f64)),
        sessions_max,
        machine_cpu_busy_percent: busy_percent(machine_start, machine_end),
    })
}

/// The bench's probe of the busy queue's promotions: a trigger that records, for every row
/// turned available from scheduled or retryable, `clock_timestamp() − run_at` at the end of the
/// promoting statement (how the promoter computes the lag it reports), in an unlogged table.
fn lag_probe(schema: &str) -> String {
    format!(
        r#"
CREATE UNLOGGED TABLE "{schema}".bench_promotion_lags (
    at timestamptz NOT NULL DEFAULT clock_timestamp(),
    lag_s float8 NOT NULL);
CREATE FUNCTION "{schema}".bench_record_promotion_lag() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    INSERT INTO "{schema}".bench_promotion_lags (lag_s)
    VALUES (extract(epoch FROM clock_timestamp() - NEW.run_at));
    RETURN NULL;
END $fn$;
CREATE TRIGGER bench_promotion_lag AFTER UPDATE OF state ON "{schema}".jobs FOR EACH ROW
    WHEN (OLD.state IN ('scheduled', 'retryable') AND NEW.state = 'available')
    EXECUTE FUNCTION "{schema}".bench_record_promotion_lag();"#
    )
}

/// The server's clock, in seconds since the epoch.
async fn server_now(client: &Client) -> anyhow::Result<f64> {
    Ok(client
        .query_one("SELECT extract(epoch FROM clock_timestamp())::float8", &[])
        .await?
        .get(0))
}

/// The busy queue's SLO overrun episodes in its current term, and that term.
async fn slo_overruns(client: &Client, schema: &str) -> anyhow::Result<(i64, Option<i64>)> {
    let row = client
        .query_one(
            &format!(
                r#"SELECT coalesce(sum(overrun_episodes), 0)::int8, max(epoch)
                   FROM "{schema}".branch_health WHERE class = 'slo'"#
            ),
            &[],
        )
        .await
        .context("reading branch_health")?;
    Ok((row.get(0), row.get(1)))
}

/// Cleanup backlog rows left per schema (one statement over all of them).
async fn backlogs(client: &Client, schemas: &[String]) -> anyhow::Result<BTreeMap<String, i64>> {
    let parts: Vec<String> = schemas
        .iter()
        .map(|s| format!(r#"SELECT '{s}'::text, count(*) FROM "{s}".jobs WHERE queue = $1"#))
        .collect();
    Ok(client
        .query(&parts.join(" UNION ALL "), &[&BACKLOG_QUEUE])
        .await
        .context("counting the cleanup backlogs")?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

fn busy_percent(start: Option<MachineCpu>, end: Option<MachineCpu>) -> Option<f64> {
    end?.busy_percent_since(&start?).map(round2)
}

fn is_slo(labels: &str) -> bool {
    labels.contains("class=\"slo\"")
}

/// The quantiles of what histogram `name` (the series `keep` accepts) recorded between two
/// scrapes.
fn estimate(
    before: &str,
    after: &str,
    name: &str,
    keep: impl Fn(&str) -> bool + Copy,
) -> Option<Estimated> {
    let earlier = metrics::buckets(before, name, keep).unwrap_or_default();
    let later = metrics::buckets(after, name, keep).unwrap_or_default();
    let delta = metrics::delta(&later, &earlier)?;
    let ms = |q: f64| metrics::quantile(q, &delta).map(|s| round3(s * 1000.0));
    Some(Estimated {
        count: metrics::count(&delta) as u64,
        p50: ms(0.5),
        p99: ms(0.99),
    })
}

/// A process's SLO passes between two scrapes `window_s` apart.
fn slo_load(before: &str, after: &str, window_s: f64) -> SloLoad {
    let pass_ms = estimate(before, after, DURATION, is_slo);
    let busy_s = match (
        metrics::sum(before, DURATION, is_slo),
        metrics::sum(after, DURATION, is_slo),
    ) {
        (before, Some(after)) if after >= before.unwrap_or(0.0) => {
            Some(after - before.unwrap_or(0.0))
        }
        _ => None,
    };
    SloLoad {
        passes_per_s: round2(pass_ms.as_ref().map_or(0, |e| e.count) as f64 / window_s),
        start_delay_ms: estimate(before, after, START_DELAY, is_slo),
        pass_ms,
        sessions_busy: busy_s.map(|s| round2(s / window_s)),
    }
}

async fn busy_window(
    fleet: &mut Fleet<'_>,
    s: &Settings,
    schema: &str,
    neighbours: &str,
) -> anyhow::Result<Busy> {
    let others: Vec<String> = fleet
        .schemas
        .iter()
        .filter(|q| *q != schema)
        .cloned()
        .collect();
    crate::progress(format!(
        "fleet: {} jobs/s on {schema}, {neighbours} neighbours, {:.0} s warm-up + {:.0} s window",
        s.rate,
        s.warmup.as_secs_f64(),
        s.window.as_secs_f64()
    ));
    let target = fleet
        .db
        .target()?
        .with_schema(schema.parse::<SchemaName>()?);
    let started = Instant::now();
    let flow = super::promotion::start_flow(&target, s.rate, PRODUCERS, WORKERS, s.horizon).await?;
    tokio::time::sleep(s.warmup).await;

    let backlog_start: i64 = backlogs(&fleet.client, &others).await?.values().sum();
    let leader = fleet
        .leaders()
        .await?
        .get(schema)
        .cloned()
        .with_context(|| format!("nobody leads {schema}"))?;
    let leader_queues = queues::counts(&fleet.leaders().await?)
        .get(&leader)
        .copied()
        .unwrap_or(0);
    let scrape_before = match fleet.member(&leader) {
        Some(member) => member.scrape().await,
        None => None,
    };
    let overruns_before = slo_overruns(&fleet.client, schema).await?;
    let from = server_now(&fleet.client).await?;
    let machine_start = machine_cpu();
    let window_started = Instant::now();
    let (_, sessions_max) = fleet.window(s.window).await?;
    let to = server_now(&fleet.client).await?;
    let machine_end = machine_cpu();
    let window_s = window_started.elapsed().as_secs_f64();
    let scrape_after = match fleet.member(&leader) {
        Some(member) => member.scrape().await,
        None => None,
    };
    let overruns_after = slo_overruns(&fleet.client, schema).await?;
    let leaders = fleet.leaders().await?;
    let left = backlogs(&fleet.client, &others).await?;
    let counted_s = window_started.elapsed().as_secs_f64();
    let achieved = flow.enqueued() as f64 / started.elapsed().as_secs_f64();
    let workload = flow.stop().await.stats();

    let mut lags = Hist::new();
    for row in fleet
        .client
        .query(
            &format!(
                r#"SELECT lag_s FROM "{schema}".bench_promotion_lags
                   WHERE at >= to_timestamp($1) AND at < to_timestamp($2)"#
            ),
            &[&from, &to],
        )
        .await
        .context("reading the promotion lags")?
    {
        lags.record_secs(row.get(0));
    }
    let leader_changed =
        leaders.get(schema) != Some(&leader) || overruns_before.1 != overruns_after.1;
    let (leader_slo, metrics_promotion_lag_ms) = match (&scrape_before, &scrape_after) {
        (Some(before), Some(after)) if !leader_changed => (
            Some(slo_load(before, after, window_s)),
            estimate(before, after, PROMOTION_LAG, |_| true),
        ),
        _ => (None, None),
    };
    let backlog_left: i64 = left.values().sum();
    // Whether every process's hygiene pool still had a queue with work per session.
    let mut with_backlog: BTreeMap<&str, usize> = fleet
        .members
        .iter()
        .map(|m| (m.instance.as_str(), 0))
        .collect();
    for (queue, rows) in &left {
        if *rows > 0 {
            if let Some(n) = leaders
                .get(queue)
                .and_then(|l| with_backlog.get_mut(l.as_str()))
            {
                *n += 1;
            }
        }
    }
    Ok(Busy {
        neighbours: neighbours.to_owned(),
        schema: schema.to_owned(),
        leader,
        leader_queues,
        leader_changed,
        window_s: round2(window_s),
        achieved_rate: (achieved * 10.0).round() / 10.0,
        promotion_lag_ms: lags.summary(),
        metrics_promotion_lag_ms,
        leader_slo,
        slo_overruns: (!leader_changed).then_some(overruns_after.0 - overruns_before.0),
        backlog_rows_at_start: backlog_start,
        backlog_rows_left: backlog_left,
        cleanup_rows_per_s: ((backlog_start - backlog_left) as f64 / counted_s).round(),
        backlog_queues_left_min_per_process: with_backlog.values().copied().min(),
        sessions_max,
        machine_cpu_busy_percent: busy_percent(machine_start, machine_end),
        workload,
    })
}

/// Each queue of `schemas` gets `rows` completed jobs past retention (the scale scenario's
/// backlog, with its archive partitions), then the tables are vacuumed and analyzed and a
/// checkpoint taken, as the scale scenario does before a timed window.
async fn seed_backlogs(db: &BenchDb, schemas: &[String], rows: i64) -> anyhow::Result<()> {
    let client = db.client().await?;
    for schema in schemas {
        client
            .batch_execute(&format!(r#"SET search_path = "{schema}""#))
            .await?;
        create_backlog_partitions(&client).await?;
        insert_backlog(&client, rows)
            .await
            .with_context(|| format!("seeding {schema}"))?;
        client
            .batch_execute("VACUUM ANALYZE jobs")
            .await
            .with_context(|| format!("VACUUM ANALYZE {schema}.jobs"))?;
    }
    // Without the privilege the checkpoint is skipped, as db::settle does.
    let _ = client.batch_execute("CHECKPOINT").await;
    Ok(())
}

async fn takeover(fleet: &mut Fleet<'_>, s: &Settings) -> anyhow::Result<TakeoverResult> {
    let mut all = Hist::new();
    let mut trials = Vec::new();
    for trial in 1..=s.trials {
        let before = fleet.leaders().await?;
        let (victim, _) = queues::counts(&before)
            .into_iter()
            .max_by_key(|(_, n)| *n)
            .context("nobody leads")?;
        let orphans: Vec<String> = before
            .iter()
            .filter(|(_, leader)| **leader == victim)
            .map(|(schema, _)| schema.clone())
            .collect();
        let index = fleet
            .members
            .iter()
            .position(|m| m.instance == victim)
            .with_context(|| format!("{victim} leads but is not one of the fleet"))?;
        crate::progress(format!(
            "fleet: trial {trial}: SIGKILL of {victim}, leading {} queues",
            orphans.len()
        ));
        let mut member = fleet.members.remove(index);
        let killed = Instant::now();
        member.process.kill()?;
        let taken = queues::await_takeover(
            &fleet.client,
            &orphans,
            &victim,
            killed,
            TAKEOVER_POLL,
            TAKEOVER_WITHIN,
        )
        .await?;
        let mut hist = Hist::new();
        for time in taken.taken.values() {
            hist.record(*time);
        }
        all.add(&hist);
        fleet.sample_sessions().await?;
        // A replacement joins and the fleet settles again before the next trial, so that
        // every trial starts from the same shares.
        let resettled_s = if trial < s.trials {
            let joined = Instant::now();
            fleet.spawn(1).await?;
            Some(round2(fleet.settled(joined).await?.1))
        } else {
            None
        };
        trials.push(Trial {
            victim,
            queues: orphans.len(),
            released_ms: taken.released.map(|d| round3(d.as_secs_f64() * 1000.0)),
            takeover_ms: hist.summary(),
            resettled_s,
        });
    }
    // The fleet is back to its size for what follows.
    if fleet.members.len() < s.processes {
        let joined = Instant::now();
        fleet.spawn(s.processes - fleet.members.len()).await?;
        fleet.settled(joined).await?;
    }
    Ok(TakeoverResult {
        trials,
        takeover_ms: all.summary(),
    })
}

fn targets(s: &Settings, r: &FleetResult) -> Vec<Target> {
    let p = &r.params;
    let mut targets = vec![Target::at_most(
        format!(
            "connections in use ({} queues on {} processes, most seen)",
            p.queues, p.processes
        ),
        Some(r.sessions_max as f64),
        40.0,
        "sessions",
    )];
    let idle = r.busy.iter().find(|b| b.neighbours == "idle");
    let hygiene = r.busy.iter().find(|b| b.neighbours == "hygiene");
    if let Some(b) = idle {
        targets.push(Target::at_most(
            format!(
                "busy queue, idle neighbours: promotion lag p99 at {} jobs/s",
                p.rate
            ),
            b.promotion_lag_ms.p99,
            50.0,
            "ms",
        ));
    }
    if let Some(b) = hygiene {
        targets.push(Target::at_most(
            format!(
                "busy queue, cleanup backlogs in the other {}: promotion lag p99",
                p.queues - 1
            ),
            b.promotion_lag_ms.p99,
            50.0,
            "ms",
        ));
        targets.push(Target::at_most(
            "busy queue: lag p99 with busy ÷ with idle neighbours",
            ratio(
                b.promotion_lag_ms.p99,
                idle.and_then(|i| i.promotion_lag_ms.p99),
            ),
            2.0,
            "x",
        ));
        // A quick run's backlogs (seeded in seconds) are gone within seconds: the precondition
        // is set for the full size, which the name says.
        targets.push(Target::at_least(
            format!(
                "precondition: cleanup still at work on every process at the window's close (fewest queues with backlog left on one process){}",
                if s.quick {
                    format!(" [quick: {} rows per queue; set for 100,000]", p.backlog_rows_per_queue)
                } else {
                    String::new()
                }
            ),
            b.backlog_queues_left_min_per_process.map(|n| n as f64),
            p.hygiene_sessions as f64,
            "queues",
        ));
    }
    targets.push(Target::at_most(
        format!(
            "takeover after SIGKILL, every queue ({} trial{})",
            r.takeover.trials.len(),
            if r.takeover.trials.len() == 1 {
                ""
            } else {
                "s"
            }
        ),
        r.takeover.takeover_ms.max,
        1000.0,
        "ms",
    ));
    targets
}

fn est(e: Option<&Estimated>, pick: fn(&Estimated) -> Option<f64>) -> String {
    e.and_then(pick).map(num).unwrap_or_else(|| "-".into())
}

/// SLO passes/s, start delay p50/p99, pass p50/p99, sessions busy: the cells of a process's
/// SLO load.
fn slo_cells(slo: Option<&SloLoad>) -> Vec<String> {
    let delay = slo.and_then(|s| s.start_delay_ms.as_ref());
    let pass = slo.and_then(|s| s.pass_ms.as_ref());
    vec![
        slo.map(|s| num(s.passes_per_s))
            .unwrap_or_else(|| "-".into()),
        est(delay, |e| e.p50),
        est(delay, |e| e.p99),
        est(pass, |e| e.p50),
        est(pass, |e| e.p99),
        opt(slo.and_then(|s| s.sessions_busy)),
    ]
}

pub fn render(r: &FleetResult) -> String {
    let mut out = String::new();
    let p = &r.params;
    let _ = writeln!(
        out,
        "fleet: {} queues (schemas) on {} `steward run --discover` processes ({}); poll {} ms, {} SLO and {} hygiene sessions per process",
        p.queues,
        p.processes,
        p.steward_bin,
        num(p.poll_interval_ms),
        p.slo_sessions,
        p.hygiene_sessions
    );
    if !p.extra_settings.is_empty() {
        let _ = writeln!(out, "settings: {}", p.extra_settings.join(", "));
    }
    let st = &r.settle;
    let _ = writeln!(
        out,
        "settle: every queue led after {} s, shared within the cap (fair share {}, cap {}) after {} s; {} sessions then, {} at most during the run",
        num(st.all_led_s),
        st.fair_share,
        st.cap,
        num(st.settled_s),
        st.sessions,
        r.sessions_max
    );
    let i = &r.idle;
    let _ = writeln!(
        out,
        "idle: {:.0} s window; the machine's CPU {}% busy (all cores); SLO figures from each process's /metrics (ms, estimated from buckets)",
        i.window_s,
        opt(i.machine_cpu_busy_percent)
    );
    let mut rows = vec![[
        "idle process",
        "queues",
        "CPU % of a core",
        "per queue",
        "RSS mean MiB",
        "per queue",
        "SLO passes/s",
        "start delay p50",
        "p99",
        "pass p50",
        "p99",
        "SLO sessions busy",
    ]
    .map(str::to_owned)
    .to_vec()];
    for proc in &i.processes {
        let mut row = vec![
            format!("{} (pid {})", proc.instance, proc.pid),
            proc.queues.to_string(),
            num(proc.cpu_percent),
            opt(proc.cpu_percent_per_queue),
            num(proc.rss_mib_mean),
            opt(proc.rss_mib_per_queue),
        ];
        row.extend(slo_cells(proc.slo.as_ref()));
        rows.push(row);
    }
    let mut all = vec![
        "all processes".to_owned(),
        i.processes
            .iter()
            .map(|p| p.queues)
            .sum::<usize>()
            .to_string(),
        num(i.cpu_percent),
        num(i.cpu_percent_per_queue),
        num(i.rss_mib_total),
    ];
    all.resize(12, String::new());
    rows.push(all);
    let mut backends = vec![
        format!("their {} PostgreSQL backends", i.db_backends),
        String::new(),
        opt(i.db_backend_cpu_percent),
        opt(i.db_backend_cpu_percent_per_queue),
    ];
    backends.resize(12, String::new());
    rows.push(backends);
    out.push_str(&table(&rows));

    let _ = writeln!(
        out,
        "busy queue: {} jobs/s (2 producers, 4 workers) on one queue, {:.0} s window after {:.0} s; lag from the bench's trigger, /metrics figures estimated from buckets",
        p.rate, p.window_s, p.warmup_s
    );
    let mut rows = vec![[
        "neighbours",
        "achieved",
        "lag p50 ms",
        "p99",
        "max",
        "count",
        "/metrics lag p99",
        "overruns",
        "cleanup rows/s",
        "backlog left",
        "machine CPU %",
    ]
    .map(str::to_owned)
    .to_vec()];
    for b in &r.busy {
        rows.push(vec![
            b.neighbours.clone(),
            num(b.achieved_rate),
            opt(b.promotion_lag_ms.p50),
            opt(b.promotion_lag_ms.p99),
            opt(b.promotion_lag_ms.max),
            b.promotion_lag_ms.count.to_string(),
            est(b.metrics_promotion_lag_ms.as_ref(), |e| e.p99),
            b.slo_overruns
                .map(|n| n.to_string())
                .unwrap_or_else(|| "-".into()),
            num(b.cleanup_rows_per_s),
            b.backlog_rows_left.to_string(),
            opt(b.machine_cpu_busy_percent),
        ]);
    }
    out.push_str(&table(&rows));
    let mut rows = vec![[
        "busy queue's leader",
        "queues",
        "SLO passes/s",
        "start delay p50 ms",
        "p99",
        "pass p50 ms",
        "p99",
        "SLO sessions busy",
    ]
    .map(str::to_owned)
    .to_vec()];
    for b in &r.busy {
        let mut row = vec![
            format!(
                "{} neighbours: {}{}",
                b.neighbours,
                b.leader,
                if b.leader_changed {
                    " (changed in the window)"
                } else {
                    ""
                }
            ),
            b.leader_queues.to_string(),
        ];
        row.extend(slo_cells(b.leader_slo.as_ref()));
        rows.push(row);
    }
    out.push_str(&table(&rows));
    if let (Some(idle), Some(busy)) = (
        r.busy.iter().find(|b| b.neighbours == "idle"),
        r.busy.iter().find(|b| b.neighbours == "hygiene"),
    ) {
        let _ = writeln!(
            out,
            "  lag p99 busy ÷ idle neighbours {}; backlog of {} rows per queue seeded in {} s; fewest queues with backlog left on one process at the close: {}",
            ratio_cell(ratio(busy.promotion_lag_ms.p99, idle.promotion_lag_ms.p99)),
            p.backlog_rows_per_queue,
            num(r.backlog_seed_s),
            busy.backlog_queues_left_min_per_process
                .map(|n| n.to_string())
                .unwrap_or_else(|| "-".into())
        );
    }

    let mut rows = vec![[
        "takeover trial",
        "queues",
        "released ms",
        "taken p50 ms",
        "p99",
        "max",
        "resettled s",
    ]
    .map(str::to_owned)
    .to_vec()];
    for (n, t) in r.takeover.trials.iter().enumerate() {
        rows.push(vec![
            format!("{} ({})", n + 1, t.victim),
            t.queues.to_string(),
            opt(t.released_ms),
            opt(t.takeover_ms.p50),
            opt(t.takeover_ms.p99),
            opt(t.takeover_ms.max),
            opt(t.resettled_s),
        ]);
    }
    let all = &r.takeover.takeover_ms;
    rows.push(vec![
        "all".to_owned(),
        all.count.to_string(),
        String::new(),
        opt(all.p50),
        opt(all.p99),
        opt(all.max),
        String::new(),
    ]);
    let _ = writeln!(
        out,
        "takeover: SIGKILL of the process leading the most queues; per queue, kill to another process holding its lock (lock table read every {} ms)",
        TAKEOVER_POLL.as_millis()
    );
    out.push_str(&table(&rows));
    out
}
