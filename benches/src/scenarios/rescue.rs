//! Scenario: rescue latency after expiry. A real `steward run` leads with the three rescues'
//! interval at 5 s and no quiet period. Dead runs are created throughout the window, one per
//! reason per tick: a claimed run whose worker never heartbeats again (stale after the
//! staleness), a claimed run whose deadline passes (run timeout: the interval), and a run parked
//! for a callback that never comes (timeout: the staleness). Every timeout is at least the
//! interval, so a pass always sees a new run before it expires; a run with a shorter timeout
//! that starts on an idle queue waits up to the interval minus its timeout. Each run's expiry is read back from
//! its row; its rescue time is the `at` of the error entry the rescue appended. The latency is
//! the difference: a rescue that sleeps until the next expiry takes milliseconds, one that only
//! sweeps every interval takes up to the interval. After the window, the queue idles and the
//! passes each rescue makes are counted, which must stay at one per interval.

use crate::db::{BenchDb, Pg};
use crate::hist::{Hist, Quantiles};
use crate::procs::{StewardProcess, ACQUIRED, FIRST_PASS};
use crate::report::{opt, table, Target};
use anyhow::Context;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};
use steward_queue::{NewJob, Queue};
use tokio_postgres::Client;

const WAIT: Duration = Duration::from_secs(30);
/// The rescues' interval: the upper bound of their sleep.
const INTERVAL: Duration = Duration::from_secs(5);
const REASONS: [(&str, &str); 3] = [
    ("heartbeat", "rescue_stale_heartbeats"),
    ("deadline", "rescue_expired_deadlines"),
    ("callback", "rescue_expired_callbacks"),
];

pub struct Settings {
    /// How long dead runs keep being created.
    pub window: Duration,
    /// One dead run per reason every `every`.
    pub every: Duration,
    pub staleness: Duration,
    /// The idle window in which passes are counted.
    pub idle: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReasonResult {
    pub reason: String,
    pub branch: String,
    pub runs: u64,
    /// Rescued before their expiry (must be 0).
    pub early: u64,
    /// Not rescued by the end.
    pub missed: u64,
    /// Rescue time minus expiry.
    pub latency_ms: Quantiles,
    /// Passes of the branch while the queue idled.
    pub idle_passes: i64,
    /// Passes one per interval allows in that window (plus one for the window's edges).
    pub idle_budget: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RescueResult {
    pub steward_bin: String,
    pub window_s: f64,
    pub every_ms: u64,
    pub staleness_s: f64,
    pub interval_s: f64,
    pub idle_s: f64,
    pub reasons: Vec<ReasonResult>,
}

pub async fn run(pg: &Pg, bin: &Path, s: &Settings) -> anyhow::Result<(RescueResult, Vec<Target>)> {
    let db = pg.create("rescue").await?;
    let result = run_on(&db, bin, s).await;
    pg.drop_db(db).await;
    result
}

/// One dead run of each reason; returns (reason, job id).
async fn dead_runs(queue: &Queue, s: &Settings) -> anyhow::Result<Vec<(&'static str, i64)>> {
    let mut made = Vec::new();
    for (reason, _) in REASONS {
        let mut job = NewJob::new(format!("rescue.{reason}")).queue(format!("rescue_{reason}"));
        if reason == "deadline" {
            job = job.run_timeout(INTERVAL);
        }
        queue.enqueue(&job).await?;
        let claimed = queue
            .claim(&format!("rescue_{reason}"), 1)
            .await?
            .pop()
            .context("claiming the job just enqueued")?;
        if reason == "callback" {
            queue.wait_for_callback(claimed.lease, s.staleness).await?;
        }
        made.push((reason, claimed.lease.job_id));
    }
    Ok(made)
}

/// Each run's expiry as read from its row (epoch seconds): its heartbeat plus the staleness,
/// its deadline, or its callback timeout.
async fn expiries(
    client: &Client,
    runs: &[(&'static str, i64)],
    staleness: Duration,
) -> anyhow::Result<BTreeMap<i64, f64>> {
    let ids: Vec<i64> = runs.iter().map(|(_, id)| *id).collect();
    let rows = client
        .query(
            "SELECT id, extract(epoch FROM CASE
                 WHEN state = 'waiting_external' THEN callback_timeout_at
                 WHEN kind = 'rescue.deadline' THEN deadline_at
                 ELSE heartbeat_at + make_interval(secs => $2) END)::float8
             FROM jobs WHERE id = ANY($1)",
            &[&ids, &staleness.as_secs_f64()],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get::<_, i64>(0), r.get::<_, f64>(1)))
        .collect())
}

/// Each branch's pass count in the current term, as the leader records it.
async fn passes(client: &Client) -> anyhow::Result<BTreeMap<String, i64>> {
    let rows = client
        .query("SELECT branch, runs FROM branch_health", &[])
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

async fn run_on(
    db: &BenchDb,
    bin: &Path,
    s: &Settings,
) -> anyhow::Result<(RescueResult, Vec<Target>)> {
    let staleness = format!("{}ms", s.staleness.as_millis());
    let interval = format!("{}ms", INTERVAL.as_millis());
    let mut args: Vec<String> = vec![
        "--set".into(),
        format!("branches.rescue_stale_heartbeats.staleness={staleness}"),
    ];
    for (_, branch) in REASONS {
        args.push("--set".into());
        args.push(format!("branches.{branch}.interval={interval}"));
        args.push("--set".into());
        args.push(format!("branches.{branch}.quiet_period=0s"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut leader = StewardProcess::spawn(bin, &db.url, &args)?;
    leader.wait_message(ACQUIRED, WAIT).await?;
    leader
        .wait_for("the first SLO pass", WAIT, |l| {
            l.message() == FIRST_PASS && l.field_str("class") == Some("slo")
        })
        .await?;

    let queue = db.queue(2, "steward-bench:rescue")?;
    let client = db.client().await?;
    let mut runs = Vec::new();
    let mut expiry = BTreeMap::new();
    let started = Instant::now();
    let mut tick = tokio::time::interval(s.every);
    while started.elapsed() < s.window {
        tick.tick().await;
        let made = dead_runs(&queue, s).await?;
        expiry.extend(expiries(&client, &made, s.staleness).await?);
        runs.extend(made);
    }
    crate::progress(format!(
        "rescue: {} dead runs made; waiting for their rescue",
        runs.len()
    ));
    let ids: Vec<i64> = runs.iter().map(|(_, id)| *id).collect();
    let deadline = Instant::now() + s.staleness + INTERVAL * 2;
    loop {
        let left: i64 = client
            .query_one(
                "SELECT count(*) FROM jobs WHERE id = ANY($1) AND state IN ('running', 'waiting_external')",
                &[&ids],
            )
            .await?
            .get(0);
        if left == 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The idle window: nothing left to rescue, so passes come once per interval.
    let before = passes(&client).await?;
    tokio::time::sleep(s.idle).await;
    let after = passes(&client).await?;
    leader.terminate(Duration::from_secs(10)).await;

    let rows = client
        .query(
            "SELECT id, extract(epoch FROM (errors->-1->>'at')::timestamptz)::float8,
                    errors->-1->>'reason'
             FROM jobs WHERE id = ANY($1) AND jsonb_array_length(errors) > 0",
            &[&ids],
        )
        .await?;
    let rescued: BTreeMap<i64, f64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let budget = (s.idle.as_secs_f64() / INTERVAL.as_secs_f64()).ceil() as i64 + 1;
    let mut reasons = Vec::new();
    for (reason, branch) in REASONS {
        let (mut hist, mut early, mut missed, mut count) = (Hist::new(), 0, 0, 0);
        for (_, id) in runs.iter().filter(|(r, _)| *r == reason) {
            count += 1;
            match (rescued.get(id), expiry.get(id)) {
                (Some(at), Some(due)) if at >= due => hist.record_secs(at - due),
                (Some(_), Some(_)) => early += 1,
                _ => missed += 1,
            }
        }
        let passes_in = |m: &BTreeMap<String, i64>| m.get(branch).copied().unwrap_or(0);
        reasons.push(ReasonResult {
            reason: reason.into(),
            branch: branch.into(),
            runs: count,
            early,
            missed,
            latency_ms: hist.summary(),
            idle_passes: passes_in(&after) - passes_in(&before),
            idle_budget: budget,
        });
    }
    let mut targets = Vec::new();
    for r in &reasons {
        targets.push(Target::below(
            format!("{}: rescue latency after expiry, max", r.reason),
            r.latency_ms.max,
            100.0,
            "ms",
        ));
        targets.push(Target::equals(
            format!("{}: runs rescued early or never", r.reason),
            Some((r.early + r.missed) as f64),
            0.0,
            "runs",
        ));
        targets.push(Target::below(
            format!(
                "{}: passes in {:.0} s idle (one per {} s interval)",
                r.reason,
                s.idle.as_secs_f64(),
                INTERVAL.as_secs()
            ),
            Some(r.idle_passes as f64),
            (r.idle_budget + 1) as f64,
            "passes",
        ));
    }
    let result = RescueResult {
        steward_bin: bin.display().to_string(),
        window_s: s.window.as_secs_f64(),
        every_ms: s.every.as_millis() as u64,
        staleness_s: s.staleness.as_secs_f64(),
        interval_s: INTERVAL.as_secs_f64(),
        idle_s: s.idle.as_secs_f64(),
        reasons,
    };
    Ok((result, targets))
}

pub fn render(r: &RescueResult) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "rescue: one dead run per reason every {} ms for {:.0} s; staleness {:.1} s, rescue interval {:.0} s, no quiet period; then {:.0} s idle",
        r.every_ms, r.window_s, r.staleness_s, r.interval_s, r.idle_s
    );
    let mut rows = vec![[
        "reason",
        "runs",
        "early",
        "missed",
        "p50 ms",
        "p99 ms",
        "max ms",
        "idle passes",
        "budget",
    ]
    .map(str::to_owned)
    .to_vec()];
    for x in &r.reasons {
        rows.push(vec![
            x.reason.clone(),
            x.runs.to_string(),
            x.early.to_string(),
            x.missed.to_string(),
            opt(x.latency_ms.p50),
            opt(x.latency_ms.p99),
            opt(x.latency_ms.max),
            x.idle_passes.to_string(),
            x.idle_budget.to_string(),
        ]);
    }
    out.push_str(&table(&rows));
    out
}
