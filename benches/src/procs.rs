//! Real `steward run` processes: spawned with JSON logs, their log lines collected with the
//! time each was written, and their CPU and memory read from /proc.

use anyhow::{bail, Context};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

pub const FIRST_PASS: &str = "first branch pass of the term";
pub const STANDING_BY: &str = "standing by for leadership";
pub const ACQUIRED: &str = "leadership acquired";

#[derive(Debug, Clone)]
pub struct LogLine {
    /// The line's own timestamp (written by the process), else when we read it.
    pub at: SystemTime,
    pub json: serde_json::Value,
}

impl LogLine {
    pub fn message(&self) -> &str {
        self.json["fields"]["message"].as_str().unwrap_or_default()
    }

    pub fn field_str(&self, name: &str) -> Option<&str> {
        self.json["fields"].get(name).and_then(|v| v.as_str())
    }
}

#[derive(Default)]
struct Output {
    lines: Vec<LogLine>,
    tail: VecDeque<String>,
}

pub struct StewardProcess {
    child: Child,
    output: Arc<Mutex<Output>>,
}

fn lock(output: &Mutex<Output>) -> MutexGuard<'_, Output> {
    output.lock().unwrap_or_else(|p| p.into_inner())
}

impl StewardProcess {
    /// `steward run` against `url` with JSON logs on stderr and an ephemeral metrics port.
    /// Other STEWARD_* variables of our environment are not passed on.
    pub fn spawn(bin: &Path, url: &str, args: &[&str]) -> anyhow::Result<StewardProcess> {
        let mut command = Command::new(bin);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("STEWARD_") {
                command.env_remove(key);
            }
        }
        let mut child = command
            .arg("run")
            .args(args)
            .env("DATABASE_URL", url)
            .env("STEWARD_LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .env("STEWARD_METRICS_ADDR", "127.0.0.1:0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let stderr = child.stderr.take().context("steward's stderr")?;
        let output = Arc::new(Mutex::new(Output::default()));
        let sink = output.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let parsed = serde_json::from_str::<serde_json::Value>(&line).ok();
                let mut out = lock(&sink);
                if out.tail.len() >= 40 {
                    out.tail.pop_front();
                }
                out.tail.push_back(line);
                if let Some(json) = parsed {
                    let at = json["timestamp"]
                        .as_str()
                        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                        .map(SystemTime::from)
                        .unwrap_or_else(SystemTime::now);
                    out.lines.push(LogLine { at, json });
                }
            }
        });
        Ok(StewardProcess { child, output })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn find(&self, matches: impl Fn(&LogLine) -> bool) -> Option<LogLine> {
        lock(&self.output)
            .lines
            .iter()
            .find(|l| matches(l))
            .cloned()
    }

    fn tail(&self) -> String {
        lock(&self.output)
            .tail
            .iter()
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits for a line that `matches`, polling every millisecond.
    pub async fn wait_for(
        &mut self,
        what: &str,
        within: Duration,
        matches: impl Fn(&LogLine) -> bool,
    ) -> anyhow::Result<LogLine> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(line) = self.find(&matches) {
                return Ok(line);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!(
                    "steward exited ({status}) before {what:?}; its last output:\n{}",
                    self.tail()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "no {what:?} from steward within {within:?}; its last output:\n{}",
                    self.tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    pub async fn wait_message(
        &mut self,
        message: &str,
        within: Duration,
    ) -> anyhow::Result<LogLine> {
        self.wait_for(message, within, |l| l.message() == message)
            .await
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill().context("SIGKILL to steward")?;
        self.child.wait().context("reaping steward")?;
        Ok(())
    }

    /// SIGTERM (a clean step-down), then SIGKILL if it has not exited within `within`.
    pub async fn terminate(&mut self, within: Duration) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = self.kill();
    }
}

impl Drop for StewardProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// CPU time (user + system) and thread count of a process, from /proc/<pid>/stat.
pub struct ProcStat {
    pub cpu_ticks: u64,
    pub threads: u64,
}

pub fn proc_stat(pid: u32) -> Option<ProcStat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start with the state (field 3).
    let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let field = |n: usize| rest.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    Some(ProcStat {
        cpu_ticks: field(14)? + field(15)?,
        threads: field(20)?,
    })
}

/// Resident set size in KiB, from /proc/<pid>/status.
pub fn rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux when that is unavailable).
pub fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// The `steward` binary: `explicit` if given; otherwise built with cargo (same profile as this
/// harness, into this harness's target directory) and taken from beside this executable.
pub fn steward_binary(explicit: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(path) = explicit {
        if !path.is_file() {
            bail!("--steward-bin {} does not exist", path.display());
        }
        return Ok(path);
    }
    let exe = std::env::current_exe().context("locating this executable")?;
    let profile_dir = exe
        .parent()
        .context("this executable has no directory")?
        .to_path_buf();
    let target_dir = profile_dir
        .parent()
        .context("this executable is not in a cargo target directory")?;
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the workspace directory")?;
    let release = !cfg!(debug_assertions);
    if workspace.join("Cargo.toml").is_file() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let mut command = Command::new(cargo);
        command
            .args(["build", "--quiet", "-p", "steward", "--target-dir"])
            .arg(target_dir)
            .current_dir(workspace);
        if release {
            command.arg("--release");
        }
        crate::progress(format!(
            "building steward: cargo build{} -p steward",
            if release { " --release" } else { "" }
        ));
        match command.status() {
            Ok(status) if status.success() => {}
            Ok(status) => crate::progress(format!(
                "cargo build -p steward failed ({status}); using an existing binary if there is one"
            )),
            Err(error) => crate::progress(format!(
                "cannot run cargo ({error}); using an existing binary if there is one"
            )),
        }
    }
    let bin = profile_dir.join("steward");
    if !bin.is_file() {
        bail!(
            "no steward binary at {}: build it (cargo build --release -p steward) or pass --steward-bin",
            bin.display()
        );
    }
    Ok(bin)
}
