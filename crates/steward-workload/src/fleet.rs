//! Real `steward run` processes: spawned with JSON logs on stderr, each line collected with the
//! time it was written (and copied to a log file, if asked), signalled, and read from /proc.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

/// Log messages of `steward run` that drivers wait for.
pub const ACQUIRED: &str = "leadership acquired";
pub const STANDING_BY: &str = "standing by for leadership";
pub const FIRST_PASS: &str = "first branch pass of the term";
pub const LOST: &str = "leadership lost; back to standby";
pub const WEDGE_TAKEOVER: &str =
    "the leader has made no progress; ending its sessions to take over";
/// The line saying where a process serves /metrics (field `addr`).
pub const SERVING_METRICS: &str = "serving /metrics";
/// The first line of a fleet process (`steward run` with a list of queues), with its instance
/// name (field `instance`).
pub const FLEET_STARTING: &str = "steward starting as a fleet process";

/// Raw lines kept per process for error messages.
const TAIL: usize = 200;

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("starting {bin}: {source}")]
    Spawn {
        bin: PathBuf,
        source: std::io::Error,
    },
    #[error("creating the log file {path}: {source}")]
    LogFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("signalling steward (pid {pid}): {detail}")]
    Signal { pid: u32, detail: String },
    #[error("steward (pid {pid}) exited ({status}) before {what}; its last output:\n{tail}")]
    Exited {
        pid: u32,
        status: ExitStatus,
        what: String,
        tail: String,
    },
    #[error("no {what} from steward (pid {pid}) within {within:?}; its last output:\n{tail}")]
    Timeout {
        pid: u32,
        what: String,
        within: Duration,
        tail: String,
    },
    #[error("{0}")]
    Binary(String),
}

/// One JSON log line of a steward process, with the time it was written.
#[derive(Debug, Clone)]
pub struct LogLine {
    /// The line's own timestamp (written by the process), else when it was read.
    pub at: SystemTime,
    pub json: serde_json::Value,
}

impl LogLine {
    pub fn message(&self) -> &str {
        self.json["fields"]["message"].as_str().unwrap_or_default()
    }

    pub fn field(&self, name: &str) -> Option<&serde_json::Value> {
        self.json["fields"].get(name)
    }

    pub fn field_str(&self, name: &str) -> Option<&str> {
        self.field(name).and_then(|v| v.as_str())
    }
}

/// How to start a process besides its binary, database and arguments.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// More environment variables, set after the defaults.
    pub env: Vec<(String, String)>,
    /// Every line of stderr is copied here as it comes.
    pub log_file: Option<PathBuf>,
    /// A process group of its own, so that a Ctrl-C at the terminal reaches only the driver,
    /// which then stops the process in order.
    pub own_process_group: bool,
}

#[derive(Default)]
struct Output {
    lines: Vec<LogLine>,
    tail: VecDeque<String>,
}

fn lock(output: &Mutex<Output>) -> MutexGuard<'_, Output> {
    output.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running `steward run`. Dropping it kills the process.
pub struct StewardProcess {
    child: Child,
    output: Arc<Mutex<Output>>,
    /// Set once the exit was seen (the process reaped): its pid may then belong to another.
    reaped: std::sync::atomic::AtomicBool,
}

impl StewardProcess {
    /// `steward run` against `url` with JSON logs on stderr and an ephemeral metrics port.
    pub fn spawn(bin: &Path, url: &str, args: &[&str]) -> Result<StewardProcess, FleetError> {
        Self::spawn_with(bin, url, args, &Options::default())
    }

    /// As [`StewardProcess::spawn`], with `options`. The STEWARD_* variables of this process's
    /// environment are not passed on: each process gets exactly what its driver says.
    pub fn spawn_with(
        bin: &Path,
        url: &str,
        args: &[&str],
        options: &Options,
    ) -> Result<StewardProcess, FleetError> {
        let mut log_file = match &options.log_file {
            Some(path) => {
                Some(
                    std::fs::File::create(path).map_err(|source| FleetError::LogFile {
                        path: path.clone(),
                        source,
                    })?,
                )
            }
            None => None,
        };
        let mut command = Command::new(bin);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("STEWARD_") {
                command.env_remove(key);
            }
        }
        command
            .arg("run")
            .args(args)
            .env("DATABASE_URL", url)
            .env("STEWARD_LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            // An error then ends the log in its message, not a backtrace.
            .env("RUST_BACKTRACE", "0")
            // Several processes on one host: each serves /metrics on a port of its own.
            .env("STEWARD_METRICS_ADDR", "127.0.0.1:0")
            .envs(options.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if options.own_process_group {
            std::os::unix::process::CommandExt::process_group(&mut command, 0);
        }
        let mut child = command.spawn().map_err(|source| FleetError::Spawn {
            bin: bin.to_owned(),
            source,
        })?;
        let output = Arc::new(Mutex::new(Output::default()));
        if let Some(stderr) = child.stderr.take() {
            let sink = output.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if let Some(file) = &mut log_file {
                        // A log file that cannot be written loses lines, not the process.
                        let _ = writeln!(file, "{line}");
                    }
                    let parsed = serde_json::from_str::<serde_json::Value>(&line).ok();
                    let mut out = lock(&sink);
                    if out.tail.len() >= TAIL {
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
        }
        Ok(StewardProcess {
            child,
            output,
            reaped: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every JSON line so far.
    pub fn lines(&self) -> Vec<LogLine> {
        lock(&self.output).lines.clone()
    }

    pub fn find(&self, matches: impl Fn(&LogLine) -> bool) -> Option<LogLine> {
        lock(&self.output)
            .lines
            .iter()
            .find(|l| matches(l))
            .cloned()
    }

    pub fn find_message(&self, message: &str) -> Option<LogLine> {
        self.find(|l| l.message() == message)
    }

    /// The last `n` lines of stderr as written (JSON or not).
    pub fn tail(&self, n: usize) -> Vec<String> {
        let out = lock(&self.output);
        out.tail
            .iter()
            .skip(out.tail.len().saturating_sub(n))
            .cloned()
            .collect()
    }

    /// The last lines of stderr, one string.
    pub fn raw_output(&self) -> String {
        self.tail(TAIL).join("\n")
    }

    /// Where the process serves /metrics, once it has said so.
    pub fn metrics_addr(&self) -> Option<String> {
        self.find(|l| l.message().starts_with(SERVING_METRICS))
            .and_then(|l| l.field_str("addr").map(str::to_owned))
    }

    /// A fleet process's instance name (the `<instance>` of its sessions'
    /// `steward:<instance>:<role>`), once it has said so.
    pub fn fleet_instance(&self) -> Option<String> {
        self.find_message(FLEET_STARTING)
            .and_then(|l| l.field_str("instance").map(str::to_owned))
    }

    /// The exit status, if the process has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        let status = self.child.try_wait().ok().flatten();
        if status.is_some() {
            self.reaped.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        status
    }

    /// Waits for a line that `matches`, checking every millisecond; fails if the process
    /// exits first.
    pub async fn wait_for(
        &mut self,
        what: &str,
        within: Duration,
        matches: impl Fn(&LogLine) -> bool,
    ) -> Result<LogLine, FleetError> {
        let deadline = Instant::now() + within;
        loop {
            match self.check(what, within, deadline, &matches) {
                Ok(Some(line)) => return Ok(line),
                Ok(None) => tokio::time::sleep(Duration::from_millis(1)).await,
                Err(e) => return Err(e),
            }
        }
    }

    pub async fn wait_message(
        &mut self,
        message: &str,
        within: Duration,
    ) -> Result<LogLine, FleetError> {
        self.wait_for(message, within, |l| l.message() == message)
            .await
    }

    /// [`StewardProcess::wait_for`] for a thread outside any runtime (a test's).
    pub fn wait_for_blocking(
        &mut self,
        what: &str,
        within: Duration,
        matches: impl Fn(&LogLine) -> bool,
    ) -> Result<LogLine, FleetError> {
        let deadline = Instant::now() + within;
        loop {
            match self.check(what, within, deadline, &matches) {
                Ok(Some(line)) => return Ok(line),
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => return Err(e),
            }
        }
    }

    fn check(
        &mut self,
        what: &str,
        within: Duration,
        deadline: Instant,
        matches: &impl Fn(&LogLine) -> bool,
    ) -> Result<Option<LogLine>, FleetError> {
        if let Some(line) = self.find(matches) {
            return Ok(Some(line));
        }
        if let Some(status) = self.try_wait() {
            // Lines written just before the exit may still be on their way.
            std::thread::sleep(Duration::from_millis(50));
            if let Some(line) = self.find(matches) {
                return Ok(Some(line));
            }
            return Err(FleetError::Exited {
                pid: self.pid(),
                status,
                what: format!("{what:?}"),
                tail: self.tail(40).join("\n"),
            });
        }
        if Instant::now() > deadline {
            return Err(FleetError::Timeout {
                pid: self.pid(),
                what: format!("{what:?}"),
                within,
                tail: self.tail(40).join("\n"),
            });
        }
        Ok(None)
    }

    /// Sends a signal by name (`KILL`, `TERM`, `STOP`, `CONT`, ...) through the `kill`
    /// command: this crate has no binding to kill(2).
    pub fn signal(&self, signal: &str) -> Result<(), FleetError> {
        let pid = self.pid();
        // Not reaped yet, so the pid cannot have been reused: signalling it is safe.
        if self.reaped.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(FleetError::Signal {
                pid,
                detail: "it has exited".to_owned(),
            });
        }
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .stdin(Stdio::null())
            .status()
            .map_err(|e| FleetError::Signal {
                pid,
                detail: format!("running kill: {e}"),
            })?;
        if !status.success() {
            return Err(FleetError::Signal {
                pid,
                detail: format!("kill -{signal}: {status}"),
            });
        }
        Ok(())
    }

    /// SIGKILL (as a crash or an OOM kill would), then reap.
    pub fn kill(&mut self) -> Result<ExitStatus, FleetError> {
        let pid = self.pid();
        let signal_error = |e: std::io::Error| FleetError::Signal {
            pid,
            detail: e.to_string(),
        };
        self.child.kill().map_err(signal_error)?;
        let status = self.child.wait().map_err(signal_error)?;
        self.reaped.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(status)
    }

    /// SIGSTOP: the process freezes with its sockets open, as a hung host would.
    pub fn pause(&self) -> Result<(), FleetError> {
        self.signal("STOP")
    }

    /// SIGCONT after [`StewardProcess::pause`].
    pub fn resume(&self) -> Result<(), FleetError> {
        self.signal("CONT")
    }

    /// Waits up to `within` for the process to exit on its own.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// [`StewardProcess::wait_exit`] for a thread outside any runtime.
    pub fn wait_exit_blocking(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM (a clean step-down), then SIGKILL if it has not exited within `within`.
    /// Returns the exit status after SIGTERM, or None when it had to be killed.
    pub async fn terminate(&mut self, within: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.try_wait() {
            return Some(status);
        }
        let _ = self.signal("TERM");
        match self.wait_exit(within).await {
            Some(status) => Some(status),
            None => {
                let _ = self.kill();
                None
            }
        }
    }
}

impl Drop for StewardProcess {
    fn drop(&mut self) {
        if self.try_wait().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `HH:MM:SS.mmm LEVEL message key=value ...` from a tracing JSON line; anything else as it is.
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

/// The whole machine's CPU time in clock ticks, from the first line of /proc/stat: busy (all
/// but idle and iowait) and total, over every core.
#[derive(Debug, Clone, Copy)]
pub struct MachineCpu {
    pub busy: u64,
    pub total: u64,
}

impl MachineCpu {
    /// The share of the machine's CPU (every core) that was busy since `earlier`, in percent.
    pub fn busy_percent_since(&self, earlier: &MachineCpu) -> Option<f64> {
        let total = self.total.checked_sub(earlier.total)?;
        let busy = self.busy.checked_sub(earlier.busy)?;
        (total > 0).then(|| busy as f64 / total as f64 * 100.0)
    }
}

pub fn machine_cpu() -> Option<MachineCpu> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice, already counted in
    // user and nice].
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3)? + fields.get(4).copied().unwrap_or(0);
    Some(MachineCpu {
        busy: total.saturating_sub(idle),
        total,
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

/// The `steward` binary: `explicit` if given; otherwise built with cargo (the profile of the
/// calling executable, into its target directory) and taken from beside that executable.
/// `progress` hears what is going on.
pub fn steward_binary(
    explicit: Option<PathBuf>,
    progress: impl Fn(String),
) -> Result<PathBuf, FleetError> {
    if let Some(path) = explicit {
        if !path.is_file() {
            return Err(FleetError::Binary(format!(
                "the steward binary {} does not exist",
                path.display()
            )));
        }
        return Ok(path);
    }
    let exe = std::env::current_exe()
        .map_err(|e| FleetError::Binary(format!("locating this executable: {e}")))?;
    let profile_dir = exe
        .parent()
        .ok_or_else(|| FleetError::Binary("this executable has no directory".to_owned()))?
        .to_path_buf();
    let target_dir = profile_dir.parent().ok_or_else(|| {
        FleetError::Binary("this executable is not in a cargo target directory".to_owned())
    })?;
    // This crate sits at crates/steward-workload of the workspace.
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    if workspace.join("Cargo.toml").is_file() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let mut command = Command::new(cargo);
        command
            .args(["build", "--quiet", "-p", "steward", "--target-dir"])
            .arg(target_dir)
            .current_dir(&workspace);
        if release {
            command.arg("--release");
        }
        progress(format!(
            "building steward: cargo build{} -p steward",
            if release { " --release" } else { "" }
        ));
        match command.status() {
            Ok(status) if status.success() => {}
            Ok(status) => progress(format!(
                "cargo build -p steward failed ({status}); using an existing binary if there is one"
            )),
            Err(error) => progress(format!(
                "cannot run cargo ({error}); using an existing binary if there is one"
            )),
        }
    }
    let bin = profile_dir.join("steward");
    if !bin.is_file() {
        return Err(FleetError::Binary(format!(
            "no steward binary at {}: build it (cargo build --release -p steward) or name one",
            bin.display()
        )));
    }
    Ok(bin)
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

    #[test]
    fn this_process_has_a_stat_and_a_resident_set() {
        let stat = proc_stat(std::process::id()).expect("/proc/self/stat");
        assert!(stat.threads >= 1);
        assert!(rss_kib(std::process::id()).is_some_and(|kib| kib > 0));
        let cpu = machine_cpu().expect("/proc/stat");
        assert!(cpu.total >= cpu.busy && cpu.total > 0);
        assert_eq!(cpu.busy_percent_since(&cpu), None);
    }
}
