//! `steward status`: who leads, every candidate, and how each branch is doing, from any host
//! with database access ([`steward_leader::status`]); or, where the database holds several
//! queues and no schema was named, one line per queue. The exit code is for scripts: 0 healthy;
//! 1 the database cannot be reached or the schema is not migrated; 2 no leader, a leader
//! making no progress, or an SLO branch delayed (in any queue).

use std::fmt::Write as _;
use std::future::Future;
use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;
use steward_leader::status::{BranchStatus, Status, TermStatus};

/// A leader whose progress mark is older than this is reported as making no progress (the
/// standbys take over at `leader.wedge_timeout`, 30 s by default).
const NO_PROGRESS_AFTER: f64 = 10.0;

/// How often `--watch` reads again.
const WATCH_EVERY: Duration = Duration::from_secs(2);

/// What is wrong, if anything, with the queue's maintenance as `status` shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Verdict {
    pub healthy: bool,
    pub problems: Vec<String>,
}

impl Verdict {
    pub fn of(status: &Status) -> Self {
        let mut problems = Vec::new();
        if status.server_read_only {
            problems.push(
                "this server refuses writes (a hot standby, or default_transaction_read_only is on): no steward leads through it; point the URL at the primary (a multi-host URL with target_session_attrs=read-write finds it)"
                    .to_owned(),
            );
        }
        match &status.leader {
            None => problems.push(format!(
                "no leader: nobody holds the leadership lock for schema {}",
                status.schema
            )),
            Some(leader) => {
                if let Some(age) = leader
                    .seconds_since_progress
                    .filter(|age| *age > NO_PROGRESS_AFTER)
                {
                    problems.push(format!(
                        "the leader {} has made no progress for {age:.0}s: wedged or stalled",
                        leader.instance
                    ));
                }
                for branch in status
                    .branches
                    .iter()
                    .filter(|b| b.epoch == leader.epoch && b.overrun_state == "delayed")
                {
                    problems.push(format!("branch {} is delayed", branch.branch));
                }
            }
        }
        Self {
            healthy: problems.is_empty(),
            problems,
        }
    }

    fn exit_code(&self) -> ExitCode {
        if self.healthy {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(2)
        }
    }
}

/// What one reading found: one queue in detail, or every queue of the database (its schema,
/// and its status or why it could not be read).
pub enum Reading {
    Queue(Box<Status>),
    Queues(Vec<(String, Result<Status, String>)>),
}

impl Reading {
    fn render(&self, json: bool) -> (String, ExitCode) {
        match self {
            Reading::Queue(status) => {
                let verdict = Verdict::of(status);
                let text = if json {
                    json_text(status, &verdict)
                } else {
                    table(status, &verdict)
                };
                (text, verdict.exit_code())
            }
            Reading::Queues(queues) => {
                let verdicts: Vec<Verdict> = queues
                    .iter()
                    .map(|(_, status)| match status {
                        Ok(status) => Verdict::of(status),
                        Err(error) => Verdict {
                            healthy: false,
                            problems: vec![error.clone()],
                        },
                    })
                    .collect();
                let healthy = verdicts.iter().all(|v| v.healthy);
                let text = if json {
                    summary_json(queues, &verdicts, healthy)
                } else {
                    summary_table(queues, &verdicts)
                };
                let code = if healthy {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(2)
                };
                (text, code)
            }
        }
    }
}

/// Reads with `read` and prints it, once or (with `watch`) every two seconds in place; returns
/// the exit code of the last reading. Writing to a closed pipe ends quietly.
pub async fn command<F, Fut>(read: F, json: bool, watch: bool) -> ExitCode
where
    F: Fn() -> Fut,
    Fut: Future<Output = anyhow::Result<Reading>>,
{
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stdout());
    loop {
        let (text, code, to_stderr) = match read().await {
            Ok(reading) => {
                let (text, code) = reading.render(json);
                (text, code, false)
            }
            Err(error) if json => (
                format!("{}\n", serde_json::json!({ "error": format!("{error:#}") })),
                ExitCode::FAILURE,
                false,
            ),
            Err(error) => (format!("Error: {error:#}\n"), ExitCode::FAILURE, true),
        };
        let mut text = text;
        if watch && terminal {
            // Home and clear: the next reading replaces this one.
            text.insert_str(0, "\x1b[H\x1b[2J");
        }
        let written = if to_stderr {
            std::io::stderr().lock().write_all(text.as_bytes())
        } else {
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes()).and_then(|()| out.flush())
        };
        match written {
            Ok(()) => {}
            // The reader went away (`steward status | head`): nothing more to say.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return code,
            Err(_) => return ExitCode::FAILURE,
        }
        if !watch {
            return code;
        }
        tokio::select! {
            _ = tokio::time::sleep(WATCH_EVERY) => {}
            _ = tokio::signal::ctrl_c() => return code,
        }
    }
}

fn json_text(status: &Status, verdict: &Verdict) -> String {
    let mut value = serde_json::to_value(status).unwrap_or_default();
    if let Some(object) = value.as_object_mut() {
        object.insert(
            "verdict".into(),
            serde_json::to_value(verdict).unwrap_or_default(),
        );
    }
    format!(
        "{}\n",
        serde_json::to_string_pretty(&value).unwrap_or_default()
    )
}

fn summary_json(
    queues: &[(String, Result<Status, String>)],
    verdicts: &[Verdict],
    healthy: bool,
) -> String {
    let queues: Vec<serde_json::Value> = queues
        .iter()
        .zip(verdicts)
        .map(|((schema, status), verdict)| {
            let mut value = match status {
                Ok(status) => serde_json::to_value(status).unwrap_or_default(),
                Err(_) => serde_json::json!({ "schema": schema }),
            };
            if let Some(object) = value.as_object_mut() {
                object.insert(
                    "verdict".into(),
                    serde_json::to_value(verdict).unwrap_or_default(),
                );
            }
            value
        })
        .collect();
    format!(
        "{}\n",
        serde_json::to_string_pretty(&serde_json::json!({ "queues": queues, "healthy": healthy }))
            .unwrap_or_default()
    )
}

/// One line per queue: who leads it (or NO LEADER) and its problems.
fn summary_table(queues: &[(String, Result<Status, String>)], verdicts: &[Verdict]) -> String {
    let mut out = String::new();
    let w = &mut out;
    let width = queues
        .iter()
        .map(|(s, _)| s.len())
        .max()
        .unwrap_or(5)
        .max(5);
    let _ = writeln!(
        w,
        "{:<width$}  {:<32} {:>6}  {:<13} problems",
        "queue", "leader", "epoch", "progress"
    );
    for ((schema, status), verdict) in queues.iter().zip(verdicts) {
        let (leader, epoch, progress) = match status.as_ref().ok().and_then(|s| s.leader.as_ref()) {
            Some(l) => (
                l.instance.clone(),
                l.epoch.to_string(),
                ago(l.seconds_since_progress),
            ),
            None => ("NO LEADER".to_owned(), "-".to_owned(), "-".to_owned()),
        };
        let problems = if verdict.problems.is_empty() {
            "-".to_owned()
        } else {
            verdict.problems.join("; ")
        };
        let _ = writeln!(
            w,
            "{schema:<width$}  {leader:<32} {epoch:>6}  {progress:<13} {problems}"
        );
    }
    let unhealthy = verdicts.iter().filter(|v| !v.healthy).count();
    let leaderless = queues
        .iter()
        .filter(|(_, s)| s.as_ref().map_or(true, |s| s.leader.is_none()))
        .count();
    let _ = writeln!(
        w,
        "\n{} queues: {unhealthy} with problems, {leaderless} without a leader",
        queues.len()
    );
    out
}

fn ms(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into())
}

fn ago(seconds: Option<f64>) -> String {
    match seconds {
        None => "-".into(),
        Some(s) if s < 90.0 => format!("{s:.0}s ago"),
        Some(s) if s < 5400.0 => format!("{:.0}m ago", s / 60.0),
        Some(s) => format!("{:.1}h ago", s / 3600.0),
    }
}

fn since(t: &TermStatus) -> String {
    t.since
        .map(|s| s.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| "-".into())
}

/// A branch's state: held in its quiet period, delayed, or on time.
fn state(b: &BranchStatus) -> String {
    match b.held_until {
        Some(until) => format!("held until {}", until.format("%H:%M:%S")),
        None if b.overrun_state == "delayed" => format!("DELAYED/{}", b.overrun_episodes),
        None => "ok".into(),
    }
}

fn table(status: &Status, verdict: &Verdict) -> String {
    let mut out = String::new();
    let w = &mut out;
    // Writing to a String cannot fail.
    let _ = match (&status.leader, &status.last_term) {
        (Some(l), _) => {
            let _ = writeln!(
                w,
                "leader: {} on {} (pid {}), epoch {}, since {}",
                l.instance,
                l.host,
                l.pid,
                l.epoch,
                since(l)
            );
            writeln!(w, "last progress: {}", ago(l.seconds_since_progress))
        }
        (None, Some(t)) => writeln!(
            w,
            "no leader: nobody holds the leadership lock for schema {}. Last term: epoch {} by {} on {}, since {}",
            status.schema,
            t.epoch,
            t.instance,
            t.host,
            since(t)
        ),
        (None, None) => writeln!(
            w,
            "no leader: nobody holds the leadership lock for schema {} and no term has ever started; start `steward run`",
            status.schema
        ),
    };
    for problem in &verdict.problems {
        let _ = writeln!(w, "PROBLEM: {problem}");
    }
    if !status.candidates.is_empty() {
        let _ = writeln!(w, "\ncandidates ({}):", status.candidates.len());
        for c in &status.candidates {
            let _ = writeln!(
                w,
                "  {:<8} {:<32} host {:<16} pid {:<7} v{:<8} {:<10} seen {:<9} config {}",
                if c.leading { "leader" } else { "standby" },
                c.instance,
                c.host,
                c.pid,
                c.version,
                c.loop_mode,
                ago(c.seconds_since_seen),
                if c.config_digest.is_empty() {
                    "-"
                } else {
                    &c.config_digest
                }
            );
        }
    }
    if status.branches.is_empty() {
        return out;
    }
    let _ = writeln!(
        w,
        "\n{:<31} {:<8} {:<17} {:<20} {:>9} {:>11} {:>11} {:>8} {:>6} {:>6}  last error",
        "branch",
        "class",
        "loop",
        "state",
        "last run",
        "duration ms",
        "delay ms",
        "rows",
        "runs",
        "errors"
    );
    for b in &status.branches {
        let error = match &b.last_error {
            Some(error) => format!(
                "{} ({}, epoch {})",
                error.chars().take(60).collect::<String>(),
                ago(b.seconds_since_error),
                b.last_error_epoch
                    .map_or_else(|| "?".to_owned(), |e| e.to_string())
            ),
            None => String::new(),
        };
        let _ = writeln!(
            w,
            "{:<31} {:<8} {:<17} {:<20} {:>9} {:>11} {:>11} {:>8} {:>6} {:>6}  {}",
            b.branch,
            b.class.as_deref().unwrap_or("-"),
            b.loop_name,
            state(b),
            ago(b.seconds_since_run),
            ms(b.last_duration_ms),
            ms(b.last_start_delay_ms),
            b.last_rows
                .map(|r| r.to_string())
                .unwrap_or_else(|| "-".into()),
            b.runs,
            b.errors,
            error
        );
    }
    out
}
