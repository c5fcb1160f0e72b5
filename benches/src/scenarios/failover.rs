//! Scenario 4, failover: real `steward run` processes. A leader runs and a standby waits in
//! `pg_advisory_lock`; the leader gets SIGKILL; the time is from the kill to the standby's
//! "first branch pass of the term" log line with class=slo (the line's own timestamp).
//! The standby then leads, a new standby joins, and the next trial starts.

use crate::db::Pg;
use crate::hist::{Hist, Quantiles};
use crate::procs::{StewardProcess, ACQUIRED, FIRST_PASS, STANDING_BY};
use crate::report::{num, opt, table, Target};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, SystemTime};

const WAIT: Duration = Duration::from_secs(30);

pub struct Settings {
    pub trials: u32,
    /// How long the leader and the new standby run side by side before the kill.
    pub settle: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct FailoverResult {
    pub trials: u32,
    pub settle_ms: u64,
    pub steward_bin: String,
    /// SIGKILL to the standby's first SLO branch pass.
    pub failover_ms: Quantiles,
    /// SIGKILL to the standby's "leadership acquired" (lock taken, term started).
    pub acquired_ms: Quantiles,
    pub samples_ms: Vec<f64>,
}

pub async fn run(
    pg: &Pg,
    bin: &Path,
    s: &Settings,
) -> anyhow::Result<(FailoverResult, Vec<Target>)> {
    let db = pg.create("failover").await?;
    let result = run_on(&db.url, bin, s).await;
    pg.drop_db(db).await;
    result
}

fn ms_since(from: SystemTime, to: SystemTime) -> Duration {
    to.duration_since(from).unwrap_or_default()
}

async fn run_on(
    url: &str,
    bin: &Path,
    s: &Settings,
) -> anyhow::Result<(FailoverResult, Vec<Target>)> {
    let mut leader = StewardProcess::spawn(bin, url, &[])?;
    leader.wait_message(ACQUIRED, WAIT).await?;
    let (mut failover, mut acquired) = (Hist::new(), Hist::new());
    let mut samples = Vec::new();
    for trial in 1..=s.trials {
        let mut standby = StewardProcess::spawn(bin, url, &[])?;
        standby.wait_message(STANDING_BY, WAIT).await?;
        tokio::time::sleep(s.settle).await;
        let killed_at = SystemTime::now();
        leader.kill()?;
        let first = standby
            .wait_for("the standby's first SLO branch pass", WAIT, |l| {
                l.message() == FIRST_PASS && l.field_str("class") == Some("slo")
            })
            .await?;
        let took = ms_since(killed_at, first.at);
        failover.record(took);
        samples.push((took.as_secs_f64() * 1e6).round() / 1e3);
        if let Some(line) = standby.find(|l| l.message() == ACQUIRED) {
            acquired.record(ms_since(killed_at, line.at));
        }
        crate::progress(format!(
            "failover: trial {trial}/{}: {:.1} ms",
            s.trials,
            took.as_secs_f64() * 1000.0
        ));
        leader = standby;
    }
    leader.terminate(Duration::from_secs(10)).await;
    let result = FailoverResult {
        trials: s.trials,
        settle_ms: s.settle.as_millis() as u64,
        steward_bin: bin.display().to_string(),
        failover_ms: failover.summary(),
        acquired_ms: acquired.summary(),
        samples_ms: samples,
    };
    let targets = vec![Target::below(
        "failover p99 (SIGKILL to the standby's first SLO pass)",
        result.failover_ms.p99,
        100.0,
        "ms",
    )];
    Ok((result, targets))
}

pub fn render(r: &FailoverResult) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "failover: {} trials of SIGKILL to the leader while a standby waits ({})",
        r.trials, r.steward_bin
    );
    let q = |name: &str, q: &Quantiles| {
        vec![
            name.to_owned(),
            q.count.to_string(),
            opt(q.p50),
            opt(q.p99),
            opt(q.max),
            opt(q.mean),
        ]
    };
    out.push_str(&table(&[
        vec![
            "SIGKILL to".to_owned(),
            "trials".to_owned(),
            "p50 ms".to_owned(),
            "p99 ms".to_owned(),
            "max ms".to_owned(),
            "mean ms".to_owned(),
        ],
        q("standby leadership acquired", &r.acquired_ms),
        q("standby first SLO pass", &r.failover_ms),
    ]));
    let samples: Vec<String> = r.samples_ms.iter().map(|v| num(*v)).collect();
    let _ = writeln!(out, "  samples (ms): {}", samples.join(", "));
    out
}
