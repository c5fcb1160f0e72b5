//! The demo's `steward run` processes: children of this very binary, each in its own process
//! group (a Ctrl-C at the terminal reaches only the demo, which then stops them in order),
//! with JSON logs on stderr written to one file per process.

use anyhow::Context;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::process::{Child, Command};

/// How long a process may take to step down and exit after SIGTERM (its shutdown grace is 5 s).
const EXIT_WITHIN: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    Running,
    /// The demo killed it with SIGKILL, on purpose.
    Killed,
    /// Exited after the demo's SIGTERM.
    Stopped(ExitStatus),
    /// Exited before the demo asked it to.
    ExitedEarly(ExitStatus),
    /// Did not exit within [`EXIT_WITHIN`] of SIGTERM; killed.
    Hung,
}

pub struct Proc {
    pub label: String,
    pub pid: u32,
    pub log: PathBuf,
    pub fate: Fate,
    child: Child,
}

impl Proc {
    /// A fate that means something is wrong.
    pub fn problem(&self) -> Option<String> {
        let what = match self.fate {
            Fate::Running | Fate::Killed => return None,
            Fate::Stopped(status) if status.success() => return None,
            Fate::Stopped(status) => format!("{} after SIGTERM", describe(status)),
            Fate::ExitedEarly(status) => format!("{} before the demo stopped it", describe(status)),
            Fate::Hung => format!("did not exit within {EXIT_WITHIN:?} of SIGTERM"),
        };
        Some(format!(
            "{} (pid {}) {what}; log: {}",
            self.label,
            self.pid,
            self.log.display()
        ))
    }

    pub fn fate_text(&self) -> String {
        match self.fate {
            Fate::Running => "running".to_owned(),
            Fate::Killed => "killed with SIGKILL by the demo".to_owned(),
            Fate::Stopped(status) => format!("{} after SIGTERM", describe(status)),
            Fate::ExitedEarly(status) => format!("{} early", describe(status)),
            Fate::Hung => "hung after SIGTERM; killed".to_owned(),
        }
    }
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited {code}"),
        (None, Some(signal)) => format!("died of signal {signal}"),
        (None, None) => format!("ended ({status})"),
    }
}

pub struct Fleet {
    exe: PathBuf,
    database_url: String,
    schema: String,
    settings: Vec<String>,
    dir: PathBuf,
    procs: Vec<Proc>,
}

impl Fleet {
    pub fn new(
        database_url: &str,
        schema: &str,
        settings: &[&str],
        dir: &Path,
    ) -> anyhow::Result<Fleet> {
        let exe = std::env::current_exe().context("locating the steward binary")?;
        Ok(Fleet {
            exe,
            database_url: database_url.to_owned(),
            schema: schema.to_owned(),
            settings: settings.iter().map(|s| (*s).to_owned()).collect(),
            dir: dir.to_owned(),
            procs: Vec::new(),
        })
    }

    /// Starts `steward run` as `label`; returns its pid.
    pub fn spawn(&mut self, label: &str) -> anyhow::Result<u32> {
        let log = self.dir.join(format!("{label}.log"));
        let file = std::fs::File::create(&log)
            .with_context(|| format!("creating the log file {}", log.display()))?;
        let mut command = Command::new(&self.exe);
        command.arg("run");
        for setting in &self.settings {
            command.arg("--set").arg(setting);
        }
        command
            .env("DATABASE_URL", &self.database_url)
            .env("STEWARD_SCHEMA", &self.schema)
            .env("STEWARD_LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            // An error then ends the log in its message, which the demo shows, not a backtrace.
            .env("RUST_BACKTRACE", "0")
            // Several processes on one host: each serves /metrics on a port of its own.
            .env("STEWARD_METRICS_ADDR", "127.0.0.1:0")
            .env_remove("STEWARD_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(file))
            // A backstop: should the demo fail in between, dropping the child kills it.
            .kill_on_drop(true)
            .process_group(0);
        let child = command
            .spawn()
            .with_context(|| format!("starting {} run", self.exe.display()))?;
        let pid = child
            .id()
            .context("the new steward process has no pid (it exited at once?)")?;
        self.procs.push(Proc {
            label: label.to_owned(),
            pid,
            log,
            fate: Fate::Running,
            child,
        });
        Ok(pid)
    }

    pub fn procs(&self) -> &[Proc] {
        &self.procs
    }

    pub fn by_pid(&self, pid: u32) -> Option<&Proc> {
        self.procs.iter().find(|p| p.pid == pid)
    }

    pub fn by_label(&self, label: &str) -> Option<&Proc> {
        self.procs.iter().find(|p| p.label == label)
    }

    /// `label (pid N)` for a pid, or `pid N (not started by the demo)`.
    pub fn name(&self, pid: u32) -> String {
        match self.by_pid(pid) {
            Some(p) => format!("{} (pid {pid})", p.label),
            None => format!("pid {pid} (not started by the demo)"),
        }
    }

    /// SIGKILL, as a crash or an OOM kill would. Waits for the process to be gone.
    pub async fn kill(&mut self, pid: u32) -> anyhow::Result<()> {
        let proc = self
            .procs
            .iter_mut()
            .find(|p| p.pid == pid && p.fate == Fate::Running)
            .with_context(|| format!("pid {pid} is not a running demo process"))?;
        proc.child
            .start_kill()
            .with_context(|| format!("killing {}", proc.label))?;
        proc.fate = Fate::Killed;
        proc.child
            .wait()
            .await
            .with_context(|| format!("waiting for {} to die", proc.label))?;
        Ok(())
    }

    /// Processes that exited on their own since the last call, as problems.
    pub fn exited_early(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        for proc in &mut self.procs {
            if proc.fate != Fate::Running {
                continue;
            }
            match proc.child.try_wait() {
                Ok(Some(status)) => {
                    proc.fate = Fate::ExitedEarly(status);
                    problems.extend(proc.problem());
                }
                Ok(None) => {}
                Err(e) => problems.push(format!("cannot check on {}: {e}", proc.label)),
            }
        }
        problems
    }

    /// Stops every running process with SIGTERM, standbys first and `leader` last (so that no
    /// standby takes over from a leader stepping down), each waited for.
    pub async fn shutdown(&mut self, leader: Option<u32>) {
        let mut order: Vec<usize> = (0..self.procs.len()).collect();
        order.sort_by_key(|&i| Some(self.procs[i].pid) == leader);
        for i in order {
            let proc = &mut self.procs[i];
            if proc.fate != Fate::Running {
                continue;
            }
            // Not reaped yet, so the pid cannot have been reused: signalling it is safe.
            if let Ok(Some(status)) = proc.child.try_wait() {
                proc.fate = Fate::ExitedEarly(status);
                continue;
            }
            if let Err(e) = sigterm(proc.pid).await {
                tracing::warn!(process = %proc.label, error = %e, "SIGTERM failed; killing");
            }
            proc.fate = match tokio::time::timeout(EXIT_WITHIN, proc.child.wait()).await {
                Ok(Ok(status)) => Fate::Stopped(status),
                Ok(Err(_)) | Err(_) => {
                    let _ = proc.child.start_kill();
                    let _ = proc.child.wait().await;
                    Fate::Hung
                }
            };
        }
    }
}

/// SIGTERM through the shell's `kill` builtin: this crate has no binding to kill(2), and `sh`
/// is on every Unix.
async fn sigterm(pid: u32) -> anyhow::Result<()> {
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!("kill -TERM {pid}"))
        .stdin(Stdio::null())
        .status()
        .await
        .context("running sh -c kill")?;
    anyhow::ensure!(status.success(), "kill -TERM {pid}: {status}");
    Ok(())
}

/// The last `n` lines of a steward log, JSON lines made readable.
pub fn tail(path: &Path, n: usize) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return vec![format!("(cannot read {})", path.display())];
    };
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|line| readable(line))
        .collect()
}

/// `LEVEL message key=value ...` from a tracing JSON line; anything else as it is.
pub fn readable(line: &str) -> String {
    let Ok(json) = serde_json::from_str::<serde_json::Value>(line) else {
        return line.to_owned();
    };
    let level = json["level"].as_str().unwrap_or("?");
    let time = json["timestamp"]
        .as_str()
        .and_then(|t| t.get(11..23))
        .unwrap_or("");
    let mut text = format!("{time} {level:>5}");
    if let Some(fields) = json["fields"].as_object() {
        if let Some(message) = fields.get("message").and_then(|m| m.as_str()) {
            text.push(' ');
            text.push_str(message);
        }
        for (key, value) in fields.iter().filter(|(k, _)| *k != "message") {
            match value.as_str() {
                Some(s) => text.push_str(&format!(" {key}={s}")),
                None => text.push_str(&format!(" {key}={value}")),
            }
        }
    }
    text
}

/// Where a process serves `/metrics`, from its "serving /metrics, ..." log line.
pub fn metrics_addr(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find_map(|json| {
            let fields = &json["fields"];
            let serving = fields["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("serving /metrics"));
            fields["addr"]
                .as_str()
                .filter(|_| serving)
                .map(str::to_owned)
        })
}

/// Waits until `path` holds a line containing `needle`.
pub async fn wait_for_log(path: &Path, needle: &str, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if std::fs::read_to_string(path).is_ok_and(|t| t.contains(needle)) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_log_lines_become_readable() {
        let line = r#"{"timestamp":"2025-01-02T03:04:05.678901Z","level":"INFO","fields":{"message":"leadership acquired","epoch":2,"instance":"h-1-ab"},"target":"steward_leader"}"#;
        assert_eq!(
            readable(line),
            "03:04:05.678  INFO leadership acquired epoch=2 instance=h-1-ab"
        );
        assert_eq!(readable("Error: bad"), "Error: bad");
    }
}
