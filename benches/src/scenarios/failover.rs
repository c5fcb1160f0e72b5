//! Scenario 4, failover: real `steward run` processes. A leader runs and a standby waits in
//! `pg_advisory_lock`; the leader gets SIGKILL; the time is from the kill to the standby's
//! "first branch pass of the term" log line with class=slo (the line's own timestamp).
//! The standby then leads, a new standby joins, and the next trial starts. The same trials run
//! again through a PgBouncer in session mode (its default configuration) in front of the server,
//! where one is installed.

use crate::db::{BenchDb, Pg};
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
    /// Connected directly (its keys at the top level of the JSON).
    #[serde(flatten)]
    pub direct: Trials,
    /// The same through PgBouncer (session mode); `None` where PgBouncer is not installed.
    pub pgbouncer: Option<Trials>,
    /// Why the PgBouncer trials did not run.
    pub pgbouncer_skipped: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Trials {
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
    let direct = run_on(&db.url, bin, s, "").await;
    let pooled = match direct {
        Ok(_) => through_pgbouncer(&db, bin, s).await,
        Err(_) => Ok(Err("the direct trials failed".to_owned())),
    };
    pg.drop_db(db).await;
    let direct = direct?;
    let (pgbouncer, pgbouncer_skipped) = match pooled? {
        Ok(trials) => (Some(trials), None),
        Err(why) => (None, Some(why)),
    };
    let result = FailoverResult {
        trials: s.trials,
        settle_ms: s.settle.as_millis() as u64,
        steward_bin: bin.display().to_string(),
        direct,
        pgbouncer,
        pgbouncer_skipped,
    };
    let mut targets = vec![Target::below(
        "failover p99 (SIGKILL to the standby's first SLO pass)",
        result.direct.failover_ms.p99,
        100.0,
        "ms",
    )];
    if let Some(pooled) = &result.pgbouncer {
        targets.push(Target::below(
            "failover p99 through PgBouncer (session mode)",
            pooled.failover_ms.p99,
            100.0,
            "ms",
        ));
    }
    Ok((result, targets))
}

/// The trials through a PgBouncer started in front of `db`'s server; Ok(Err(why)) when none
/// is installed.
async fn through_pgbouncer(
    db: &BenchDb,
    bin: &Path,
    s: &Settings,
) -> anyhow::Result<Result<Trials, String>> {
    let pgbouncer = match steward_devdb::PgBouncer::in_front_of(
        &db.url,
        steward_devdb::PoolMode::Session,
    )
    .await
    {
        Ok(pgbouncer) => pgbouncer,
        Err(error @ steward_devdb::DevDbError::NoPgBouncer) => return Ok(Err(error.to_string())),
        Err(error) => return Err(error.into()),
    };
    let pooled_url = pgbouncer.url_of(&db.name);
    Ok(Ok(run_on(&pooled_url, bin, s, " through PgBouncer").await?))
}

fn ms_since(from: SystemTime, to: SystemTime) -> Duration {
    to.duration_since(from).unwrap_or_default()
}

async fn run_on(url: &str, bin: &Path, s: &Settings, via: &str) -> anyhow::Result<Trials> {
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
            "failover{via}: trial {trial}/{}: {:.1} ms",
            s.trials,
            took.as_secs_f64() * 1000.0
        ));
        leader = standby;
    }
    leader.terminate(Duration::from_secs(10)).await;
    Ok(Trials {
        failover_ms: failover.summary(),
        acquired_ms: acquired.summary(),
        samples_ms: samples,
    })
}

pub fn render(r: &FailoverResult) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "failover: {} trials of SIGKILL to the leader while a standby waits ({})",
        r.trials, r.steward_bin
    );
    render_trials(&mut out, "SIGKILL to", &r.direct);
    match (&r.pgbouncer, &r.pgbouncer_skipped) {
        (Some(pooled), _) => render_trials(
            &mut out,
            "through PgBouncer (session mode), SIGKILL to",
            pooled,
        ),
        (None, Some(why)) => {
            let _ = writeln!(out, "  through PgBouncer: not run ({why})");
        }
        (None, None) => {}
    }
    out
}

fn render_trials(out: &mut String, heading: &str, t: &Trials) {
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
            heading.to_owned(),
            "trials".to_owned(),
            "p50 ms".to_owned(),
            "p99 ms".to_owned(),
            "max ms".to_owned(),
            "mean ms".to_owned(),
        ],
        q("standby leadership acquired", &t.acquired_ms),
        q("standby first SLO pass", &t.failover_ms),
    ]));
    let samples: Vec<String> = t.samples_ms.iter().map(|v| num(*v)).collect();
    let _ = writeln!(out, "  samples (ms): {}", samples.join(", "));
}
