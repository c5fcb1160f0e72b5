//! `steward status`: who leads and how each branch is doing, from any host with database
//! access. Leadership is read from the advisory lock itself (pg_locks), the row only says who.

use anyhow::Context;
use serde::Serialize;
use steward_schema::SchemaName;

/// Whether anyone holds the schema's leadership lock in this database. The lock key is a
/// bigint, which pg_locks splits into classid (high 32 bits) and objid (low 32 bits).
pub const LOCK_HELD: &str = "
SELECT EXISTS (
    SELECT 1 FROM pg_locks l, (SELECT hashtextextended($1, 0) AS k) h
    WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND l.classid = ((h.k >> 32) & 4294967295)::oid
      AND l.objid = (h.k & 4294967295)::oid)";

/// The current (or last) term. Primary key of `leader`.
pub const LEADER: &str = "
SELECT epoch, instance, host, pid, since, resigned_at,
       extract(epoch FROM clock_timestamp() - last_progress_at)::float8 AS progress_age,
       extract(epoch FROM clock_timestamp() - since)::float8 AS term_age
FROM leader WHERE id = 1";

/// Per-branch health as the leader last flushed it. Primary key scan of a small table.
pub const BRANCHES: &str = "
SELECT branch, loop_name, epoch, last_run_at, last_duration_ms, last_start_delay_ms, last_rows,
       last_success_at, last_error, last_error_at, overrun_state, overrun_episodes, runs, errors,
       extract(epoch FROM clock_timestamp() - last_run_at)::float8 AS run_age
FROM branch_health ORDER BY loop_name DESC, branch";

#[derive(Serialize)]
struct Leader {
    epoch: i64,
    instance: String,
    host: String,
    pid: i32,
    since: chrono::DateTime<chrono::Utc>,
    seconds_since_progress: Option<f64>,
}

#[derive(Serialize)]
struct Branch {
    branch: String,
    #[serde(rename = "loop")]
    loop_name: String,
    epoch: i64,
    last_run_at: Option<chrono::DateTime<chrono::Utc>>,
    seconds_since_run: Option<f64>,
    last_duration_ms: Option<f64>,
    last_start_delay_ms: Option<f64>,
    last_rows: Option<i64>,
    last_success_at: Option<chrono::DateTime<chrono::Utc>>,
    last_error: Option<String>,
    last_error_at: Option<chrono::DateTime<chrono::Utc>>,
    overrun_state: String,
    overrun_episodes: i64,
    runs: i64,
    errors: i64,
}

#[derive(Serialize)]
struct Status {
    schema: String,
    /// Someone holds the leadership lock right now.
    lock_held: bool,
    /// The leader, when the lock is held.
    leader: Option<Leader>,
    /// The last term, when nobody leads.
    last_term: Option<Leader>,
    branches: Vec<Branch>,
}

pub async fn run(
    client: &tokio_postgres::Client,
    schema: &SchemaName,
    json: bool,
) -> anyhow::Result<()> {
    let lock_name = format!("steward.leader.{schema}");
    let lock_held: bool = client
        .query_one(LOCK_HELD, &[&lock_name])
        .await
        .context("reading the leadership lock")?
        .get(0);
    let row = client
        .query_one(LEADER, &[])
        .await
        .context("reading the leader")?;
    let term = row
        .get::<_, Option<String>>("instance")
        .map(|instance| Leader {
            epoch: row.get("epoch"),
            instance,
            host: row.get::<_, Option<String>>("host").unwrap_or_default(),
            pid: row.get::<_, Option<i32>>("pid").unwrap_or_default(),
            since: row
                .get::<_, Option<chrono::DateTime<chrono::Utc>>>("since")
                .unwrap_or_default(),
            seconds_since_progress: row.get("progress_age"),
        });
    let (leader, last_term) = if lock_held {
        (term, None)
    } else {
        (None, term)
    };
    let branches = client
        .query(BRANCHES, &[])
        .await
        .context("reading branch health")?
        .iter()
        .map(|r| Branch {
            branch: r.get("branch"),
            loop_name: r.get("loop_name"),
            epoch: r.get("epoch"),
            last_run_at: r.get("last_run_at"),
            seconds_since_run: r.get("run_age"),
            last_duration_ms: r.get("last_duration_ms"),
            last_start_delay_ms: r.get("last_start_delay_ms"),
            last_rows: r.get("last_rows"),
            last_success_at: r.get("last_success_at"),
            last_error: r.get("last_error"),
            last_error_at: r.get("last_error_at"),
            overrun_state: r.get("overrun_state"),
            overrun_episodes: r.get("overrun_episodes"),
            runs: r.get("runs"),
            errors: r.get("errors"),
        })
        .collect();
    let status = Status {
        schema: schema.to_string(),
        lock_held,
        leader,
        last_term,
        branches,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print_table(&status);
    }
    Ok(())
}

fn ms(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into())
}

fn print_table(status: &Status) {
    match (&status.leader, &status.last_term) {
        (Some(l), _) => {
            println!(
                "leader: {} on {} (pid {}), epoch {}, since {}",
                l.instance,
                l.host,
                l.pid,
                l.epoch,
                l.since.format("%Y-%m-%d %H:%M:%S UTC")
            );
            if let Some(age) = l.seconds_since_progress {
                let warn = if age > 10.0 { "  <- no progress: wedged or stalled?" } else { "" };
                println!("last progress: {age:.1}s ago{warn}");
            }
        }
        (None, Some(t)) => println!(
            "no leader: nobody holds the leadership lock for schema {}. Last term: epoch {} by {} on {}, since {}",
            status.schema,
            t.epoch,
            t.instance,
            t.host,
            t.since.format("%Y-%m-%d %H:%M:%S UTC")
        ),
        (None, None) => println!(
            "no leader: nobody holds the leadership lock for schema {} and no term has ever started; start `steward run`",
            status.schema
        ),
    }
    if status.branches.is_empty() {
        return;
    }
    println!();
    println!(
        "{:<31} {:<8} {:>9} {:>11} {:>11} {:>8} {:>9} {:>8} {:>7}  last error",
        "branch",
        "loop",
        "last run",
        "duration ms",
        "delay ms",
        "rows",
        "overrun",
        "runs",
        "errors"
    );
    for b in &status.branches {
        let ago = b
            .seconds_since_run
            .map(|s| format!("{s:.0}s ago"))
            .unwrap_or_else(|| "-".into());
        let overrun = if b.overrun_state == "delayed" {
            format!("DELAYED/{}", b.overrun_episodes)
        } else {
            format!("ok/{}", b.overrun_episodes)
        };
        let error = b.last_error.as_deref().unwrap_or("");
        let error: String = error.chars().take(60).collect();
        println!(
            "{:<31} {:<8} {:>9} {:>11} {:>11} {:>8} {:>9} {:>8} {:>7}  {}",
            b.branch,
            b.loop_name,
            ago,
            ms(b.last_duration_ms),
            ms(b.last_start_delay_ms),
            b.last_rows
                .map(|r| r.to_string())
                .unwrap_or_else(|| "-".into()),
            overrun,
            b.runs,
            b.errors,
            error
        );
    }
}
