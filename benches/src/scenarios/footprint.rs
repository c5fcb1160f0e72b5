//! Scenario 5, footprint: one idle `steward run` leader with default intervals on an empty
//! queue. CPU from /proc/<pid>/stat (utime + stime) at both ends of the window, RSS from
//! /proc/<pid>/status (VmRSS) every second; the same CPU reading for its PostgreSQL backends
//! (when /proc shows them, i.e. the server runs on this machine).

use crate::db::Pg;
use crate::hist::round2;
use crate::procs::{clock_ticks, proc_stat, rss_kib, StewardProcess, ACQUIRED, FIRST_PASS};
use crate::report::{num, table};
use anyhow::Context;
use serde::Serialize;
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

pub struct Settings {
    pub window: Duration,
    /// Time after the first branch pass before the window opens (start-up excluded).
    pub settle: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct FootprintResult {
    pub window_s: f64,
    pub steward_bin: String,
    pub cpu_seconds: f64,
    /// Of one core.
    pub cpu_percent: f64,
    pub rss_mib_mean: f64,
    pub rss_mib_max: f64,
    pub threads: u64,
    /// PostgreSQL backends of the leader's sessions (application_name steward:...).
    pub db_backends: u64,
    /// Their CPU over the window, of one core (null when /proc does not show them).
    pub db_backend_cpu_percent: Option<f64>,
}

pub async fn run(pg: &Pg, bin: &Path, s: &Settings) -> anyhow::Result<FootprintResult> {
    let db = pg.create("footprint").await?;
    let result = run_on(&db, bin, s).await;
    pg.drop_db(db).await;
    result
}

/// The PostgreSQL backends of Steward's sessions in `db` (application_name `steward:...`).
pub(crate) async fn backend_pids(db: &crate::db::BenchDb) -> anyhow::Result<Vec<u32>> {
    let client = db.client().await?;
    let rows = client
        .query(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()
             AND application_name LIKE 'steward:%'",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| r.get::<_, i32>(0))
        .filter_map(|p| u32::try_from(p).ok())
        .collect())
}

fn ticks_of(pids: &[u32]) -> Option<u64> {
    let mut total = 0;
    for pid in pids {
        total += proc_stat(*pid)?.cpu_ticks;
    }
    Some(total)
}

async fn run_on(
    db: &crate::db::BenchDb,
    bin: &Path,
    s: &Settings,
) -> anyhow::Result<FootprintResult> {
    let mut leader = StewardProcess::spawn(bin, &db.url, &[])?;
    leader
        .wait_message(ACQUIRED, Duration::from_secs(30))
        .await?;
    leader
        .wait_message(FIRST_PASS, Duration::from_secs(30))
        .await?;
    tokio::time::sleep(s.settle).await;
    crate::progress(format!(
        "footprint: idle leader for {:.0} s",
        s.window.as_secs_f64()
    ));
    let pid = leader.pid();
    let backends = backend_pids(db).await?;
    let db_start = ticks_of(&backends);
    let start = proc_stat(pid).context("reading /proc/<pid>/stat of steward")?;
    let started = Instant::now();
    let mut rss = Vec::new();
    let mut threads = start.threads;
    while started.elapsed() < s.window {
        if let Some(kib) = rss_kib(pid) {
            rss.push(kib as f64 / 1024.0);
        }
        let left = s.window.saturating_sub(started.elapsed());
        tokio::time::sleep(left.min(Duration::from_secs(1))).await;
    }
    let end = proc_stat(pid).context("reading /proc/<pid>/stat of steward")?;
    let window_s = started.elapsed().as_secs_f64();
    let db_end = ticks_of(&backends);
    threads = threads.max(end.threads);
    if let Some(kib) = rss_kib(pid) {
        rss.push(kib as f64 / 1024.0);
    }
    leader.terminate(Duration::from_secs(10)).await;

    let hz = clock_ticks();
    let cpu_seconds = end.cpu_ticks.saturating_sub(start.cpu_ticks) as f64 / hz;
    let db_cpu = match (db_start, db_end) {
        (Some(a), Some(b)) if !backends.is_empty() => {
            Some(round2(b.saturating_sub(a) as f64 / hz / window_s * 100.0))
        }
        _ => None,
    };
    let mean = rss.iter().sum::<f64>() / rss.len().max(1) as f64;
    let max = rss.iter().copied().fold(0.0, f64::max);
    Ok(FootprintResult {
        window_s: round2(window_s),
        steward_bin: bin.display().to_string(),
        cpu_seconds: round2(cpu_seconds),
        cpu_percent: round2(cpu_seconds / window_s * 100.0),
        rss_mib_mean: round2(mean),
        rss_mib_max: round2(max),
        threads,
        db_backends: backends.len() as u64,
        db_backend_cpu_percent: db_cpu,
    })
}

pub fn render(r: &FootprintResult) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "footprint: idle leader, default intervals, empty queue, {:.0} s window ({})",
        r.window_s, r.steward_bin
    );
    out.push_str(&table(&[
        vec![
            "process".to_owned(),
            "CPU s".to_owned(),
            "CPU % of a core".to_owned(),
            "RSS mean MiB".to_owned(),
            "RSS max MiB".to_owned(),
            "threads".to_owned(),
        ],
        vec![
            "steward run".to_owned(),
            num(r.cpu_seconds),
            num(r.cpu_percent),
            num(r.rss_mib_mean),
            num(r.rss_mib_max),
            r.threads.to_string(),
        ],
        vec![
            format!("its {} PostgreSQL backends", r.db_backends),
            "".to_owned(),
            r.db_backend_cpu_percent
                .map(num)
                .unwrap_or_else(|| "n/a".into()),
            "".to_owned(),
            "".to_owned(),
            "".to_owned(),
        ],
    ]));
    out
}
