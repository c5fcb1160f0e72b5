//! Reading what Steward processes and the database show: log lines, metrics, /leader, RSS,
//! sessions, and waiting for them (or for the chaos queue to drain).

use crate::settings::QUEUE;
use crate::support::{LogLine, Steward};
use std::time::{Duration, Instant, SystemTime};
use tokio_postgres::Client;

pub use steward_workload::fleet::{
    rss_kib, ACQUIRED, FIRST_PASS, LOST, STANDING_BY, WEDGE_TAKEOVER,
};
pub const BRANCH_RUNS: &str = "steward_maintenance_branch_runs_total";

/// Waits until every job of the chaos queue is finished and stays so for 2 s (cron fires
/// enqueued ahead, pending cancellations), or panics after `within` with the states left.
pub async fn drain(client: &Client, within: Duration) -> Duration {
    let started = Instant::now();
    let mut quiet_since: Option<Instant> = None;
    loop {
        let rows = client
            .query(
                "SELECT state::text, count(*) FROM jobs
                 WHERE queue = $1 AND state NOT IN ('completed', 'failed', 'cancelled')
                 GROUP BY 1 ORDER BY 1",
                &[&QUEUE],
            )
            .await
            .expect("counting unfinished jobs");
        if rows.is_empty() {
            let since = *quiet_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= Duration::from_secs(2) {
                return started.elapsed();
            }
        } else {
            quiet_since = None;
            if started.elapsed() > within {
                let left: Vec<String> = rows
                    .iter()
                    .map(|r| format!("{} {}", r.get::<_, i64>(1), r.get::<_, String>(0)))
                    .collect();
                let detail = client
                    .query(
                        "SELECT id, state::text, attempt, args::text, errors::text, run_at::text
                         FROM jobs WHERE queue = $1
                           AND state NOT IN ('completed', 'failed', 'cancelled')
                         ORDER BY id LIMIT 10",
                        &[&QUEUE],
                    )
                    .await
                    .map(|rows| {
                        rows.iter()
                            .map(|r| {
                                format!(
                                    "  job {} {} attempt {} args {} errors {} run_at {}",
                                    r.get::<_, i64>(0),
                                    r.get::<_, String>(1),
                                    r.get::<_, i32>(2),
                                    r.get::<_, String>(3),
                                    r.get::<_, String>(4),
                                    r.get::<_, String>(5)
                                )
                            })
                            .collect::<Vec<_>>()
                            .join("\n")
                    })
                    .unwrap_or_default();
                panic!(
                    "jobs did not drain within {within:?}: {} left unfinished\n{detail}",
                    left.join(", ")
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub fn epoch(line: &LogLine) -> Option<i64> {
    line.field("epoch").and_then(|v| v.as_i64())
}

/// The first line with this message written at or after `after` that `matches`.
pub fn find_after(
    s: &Steward,
    message: &str,
    after: SystemTime,
    matches: impl Fn(&LogLine) -> bool,
) -> Option<LogLine> {
    s.logs()
        .into_iter()
        .find(|l| l.message() == message && l.at >= after && matches(l))
}

/// Polls `probe` until it returns something, or panics after `within` with `what` and `context`.
pub fn wait_until<T>(
    what: &str,
    within: Duration,
    mut probe: impl FnMut() -> Option<T>,
    context: impl Fn() -> String,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(found) = probe() {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {within:?}\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn outputs(stewards: &[(&str, &Steward)]) -> String {
    stewards
        .iter()
        .map(|(name, s)| format!("--- {name} ---\n{}", tail(&s.raw_output(), 60)))
        .collect::<Vec<_>>()
        .join("\n")
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The first SLO branch pass of a term (the end of a takeover).
pub fn slo_first_pass(s: &Steward, epoch_: i64) -> Option<LogLine> {
    s.logs().into_iter().find(|l| {
        l.message() == FIRST_PASS
            && l.field("class").and_then(|v| v.as_str()) == Some("slo")
            && epoch(l) == Some(epoch_)
    })
}

pub fn millis(from: SystemTime, to: SystemTime) -> u128 {
    to.duration_since(from).unwrap_or_default().as_millis()
}

/// Sum of every sample of a counter in the process's /metrics.
pub fn metric_sum(s: &Steward, name: &str) -> f64 {
    let (status, body) = s.get("/metrics");
    assert_eq!(status, 200, "/metrics answered {status}");
    body.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// This process's /leader view: (is leader, instance).
pub fn leader_view(s: &Steward) -> (bool, String) {
    let (status, body) = s.get("/leader");
    assert_eq!(status, 200, "/leader answered {status}: {body}");
    let json: serde_json::Value = serde_json::from_str(&body).expect("/leader JSON");
    (
        json["leader"].as_bool().unwrap_or(false),
        json["instance"].as_str().unwrap_or_default().to_owned(),
    )
}

/// Steward sessions connected to the current database.
pub async fn steward_sessions(client: &Client) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name LIKE 'steward:%'",
            &[],
        )
        .await
        .expect("counting sessions")
        .get(0)
}

pub fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}
