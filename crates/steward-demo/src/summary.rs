//! The report printed when the demo ends, read from the database after the steward processes
//! have stopped, and the checks that make a broken demo exit non-zero.

use super::display::{counts, table, Column};
use super::fleet::Fleet;
use super::monitor::BranchTotal;
use anyhow::Context;
use std::time::Duration;
use steward_workload::Stats;
use tokio_postgres::Client;

/// Jobs by state, in `jobs` and in `job_archive` (where cleanup moves finished jobs).
pub const JOBS_BY_STATE: &str = "
SELECT state::text,
       count(*) FILTER (WHERE NOT archived),
       count(*) FILTER (WHERE archived)
FROM (SELECT state, false AS archived FROM jobs
      UNION ALL
      SELECT state, true FROM job_archive) j
GROUP BY state ORDER BY state";

/// Every `errors` entry by reason: one per failed attempt or rescue.
pub const ERRORS_BY_REASON: &str = "
SELECT e.entry->>'reason', count(*)
FROM (SELECT errors FROM jobs UNION ALL SELECT errors FROM job_archive) j,
     jsonb_array_elements(j.errors) AS e(entry)
GROUP BY 1 ORDER BY 1";

/// run_at → attempted_at of each job's latest attempt (promotion, then a worker's claim), over
/// the states where run_at is still the due time that attempt was claimed for (a retryable
/// job's run_at has moved on to its next try).
pub const PICKUP_LAG: &str = "
WITH ran AS (
    SELECT attempted_at, run_at FROM jobs
    WHERE attempted_at IS NOT NULL AND state IN ('running', 'waiting_external', 'completed', 'failed')
    UNION ALL
    SELECT attempted_at, run_at FROM job_archive
    WHERE attempted_at IS NOT NULL AND state IN ('completed', 'failed')
), lag AS (
    SELECT greatest(extract(epoch FROM attempted_at - run_at)::float8 * 1000.0, 0) AS ms FROM ran
)
SELECT count(*),
       percentile_cont(0.5) WITHIN GROUP (ORDER BY ms),
       percentile_cont(0.99) WITHIN GROUP (ORDER BY ms),
       max(ms)
FROM lag";

pub const CRON_FIRES: &str = "SELECT count(*) FROM cron_fires WHERE schedule_name = $1";

/// The `reason` each rescue branch writes into `errors` (see steward-branches' rescue_* modules).
pub const RESCUES: [(&str, &str); 3] = [
    (
        "heartbeat_stale",
        "rescue_stale_heartbeats: the worker crashed",
    ),
    (
        "deadline_expired",
        "rescue_expired_deadlines: ran past its run_timeout",
    ),
    (
        "callback_timeout",
        "rescue_expired_callbacks: the callback never came",
    ),
];

/// The measured failover.
#[derive(Debug, Clone)]
pub struct Takeover {
    pub killed: String,
    pub old_epoch: i64,
    pub new_leader: String,
    pub new_epoch: i64,
    /// From SIGKILL to the new epoch being visible in the leader row.
    pub took: Duration,
}

impl Takeover {
    pub fn line(&self) -> String {
        format!(
            "leader killed; standby took over as epoch {} after {:.1} ms",
            self.new_epoch,
            self.took.as_secs_f64() * 1000.0
        )
    }
}

/// What the run itself knows, for the report.
pub struct Run<'a> {
    pub elapsed: Duration,
    pub rate: f64,
    pub interrupted: bool,
    pub takeover: Option<&'a Takeover>,
    pub workload: &'a Stats,
    pub totals: &'a [BranchTotal],
    pub fleet: &'a Fleet,
    pub cron_schedule: &'a str,
    pub log_dir: &'a std::path::Path,
}

const TOTAL_COLUMNS: &[Column<BranchTotal>] = &[
    Column {
        header: "branch",
        min_width: 30,
        left: true,
        cell: |t| t.branch.clone(),
    },
    Column {
        header: "loop",
        min_width: 7,
        left: true,
        cell: |t| t.loop_name.clone(),
    },
    Column {
        header: "runs",
        min_width: 5,
        left: false,
        cell: |t| t.runs.to_string(),
    },
    Column {
        header: "errors",
        min_width: 6,
        left: false,
        cell: |t| t.errors.to_string(),
    },
    Column {
        header: "overrun episodes",
        min_width: 16,
        left: false,
        cell: |t| t.overrun_episodes.to_string(),
    },
    Column {
        header: "leaders",
        min_width: 7,
        left: false,
        cell: |t| t.instances.to_string(),
    },
];

/// Prints the summary; returns what went wrong (empty: the demo did its job).
pub async fn print(client: &Client, run: &Run<'_>) -> anyhow::Result<Vec<String>> {
    let mut problems = Vec::new();
    let w = run.workload;
    println!();
    println!("══ summary ══");
    println!(
        "ran the workload for {:.1} s at {} jobs/s{}",
        run.elapsed.as_secs_f64(),
        run.rate,
        if run.interrupted {
            " (interrupted)"
        } else {
            ""
        }
    );

    println!("jobs by state (in jobs / moved to job_archive by cleanup):");
    let mut any = false;
    for row in client
        .query(JOBS_BY_STATE, &[])
        .await
        .context("counting jobs by state")?
    {
        let state: String = row.try_get(0)?;
        let live: i64 = row.try_get(1)?;
        let archived: i64 = row.try_get(2)?;
        println!("  {state:<18} {live:>7} / {archived}");
        any = true;
    }
    if !any {
        println!("  (none)");
    }

    let mut reasons: Vec<(String, i64)> = Vec::new();
    for row in client
        .query(ERRORS_BY_REASON, &[])
        .await
        .context("counting rescues")?
    {
        reasons.push((
            row.try_get::<_, Option<String>>(0)?
                .unwrap_or_else(|| "(none)".to_owned()),
            row.try_get(1)?,
        ));
    }
    let count_of = |reason: &str| {
        reasons
            .iter()
            .find(|(r, _)| r == reason)
            .map_or(0, |(_, n)| *n)
    };
    println!("rescues by reason (errors entries in jobs and job_archive):");
    for (reason, what) in RESCUES {
        let n = count_of(reason);
        println!("  {reason:<18} {n:>7}   {what}");
        if n == 0 && !run.interrupted {
            problems.push(format!("no job was rescued for {reason} ({what})"));
        }
    }
    for (reason, n) in reasons
        .iter()
        .filter(|(r, _)| !RESCUES.iter().any(|(known, _)| known == r))
    {
        let note = if reason == "error" {
            "   not a rescue: a worker's fail(), retried with backoff"
        } else {
            ""
        };
        println!("  {reason:<18} {n:>7}{note}");
    }

    println!(
        "outcomes refused for a lost lease: {} (overrunning jobs finishing after their rescue); \
         runs abandoned: {} (crashed, no outcome written)",
        w.refused, w.abandoned
    );
    println!(
        "workers: {}",
        counts([
            ("enqueued", w.enqueued.to_string()),
            ("claimed", w.claimed.to_string()),
            ("completed", w.completed.to_string()),
            (
                "failed (retrying/final)",
                format!("{}/{}", w.retried, w.failed)
            ),
            ("crashed", w.crashed.to_string()),
            ("overran", w.overran.to_string()),
            ("callbacks unanswered", w.unanswered.to_string()),
            (
                "answered (in time/too late)",
                format!("{}/{}", w.answered, w.answered_too_late)
            ),
            ("outcomes unwritten", w.unwritten.to_string()),
        ])
    );
    if w.errors > 0 {
        let last = w.last_error.as_deref().unwrap_or("?");
        problems.push(format!(
            "the workload hit {} queue error(s); last: {last}",
            w.errors
        ));
    }

    let lag = client
        .query_one(PICKUP_LAG, &[])
        .await
        .context("measuring pickup lag")?;
    let ran: i64 = lag.try_get(0)?;
    let ms = |i| -> anyhow::Result<String> {
        Ok(lag
            .try_get::<_, Option<f64>>(i)?
            .map_or_else(|| "-".to_owned(), |v| format!("{v:.1} ms")))
    };
    println!(
        "pickup lag, run_at → claim (promotion + claim, each job's latest attempt, {ran} jobs): \
         p50 {} · p99 {} · max {}",
        ms(1)?,
        ms(2)?,
        ms(3)?
    );

    match run.takeover {
        Some(t) => println!(
            "takeover: {} killed in epoch {}; {} leads epoch {} after {:.1} ms \
             (SIGKILL → new epoch in the leader row, polled every 5 ms)",
            t.killed,
            t.old_epoch,
            t.new_leader,
            t.new_epoch,
            t.took.as_secs_f64() * 1000.0
        ),
        None => {
            println!("takeover: none");
            if !run.interrupted {
                problems.push("no takeover was measured".to_owned());
            }
        }
    }

    let fires: i64 = client
        .query_one(CRON_FIRES, &[&run.cron_schedule])
        .await
        .context("counting cron fires")?
        .try_get(0)?;
    println!(
        "cron: schedule {} enqueued {fires} job(s)",
        run.cron_schedule
    );

    println!("branch totals (branch_health counters of each leader, summed):");
    if run.totals.is_empty() {
        println!("  (no branch reported)");
    } else {
        for line in table(TOTAL_COLUMNS, run.totals) {
            println!("  {line}");
        }
        for t in run.totals.iter().filter(|t| t.errors > 0) {
            println!(
                "  last error of {}: {}",
                t.branch,
                t.last_error.as_deref().unwrap_or("?")
            );
        }
    }

    println!("steward processes:");
    for proc in run.fleet.procs() {
        println!(
            "  {:<10} pid {:<8} {}",
            proc.label,
            proc.pid,
            proc.fate_text()
        );
        problems.extend(proc.problem());
    }
    println!("logs: {}", run.log_dir.display());
    Ok(problems)
}
