//! Drives real `steward` processes for the end-to-end suites. Compiled into every suite; the
//! few items some suites do not use carry their own `allow(dead_code)`. What only some suites
//! need lives in modules of its own that those suites include by `#[path]`: `http.rs` (the
//! HTTP endpoint), and the chaos suite's `audit.rs`, `network.rs`, `probes.rs`, `settings.rs`
//! and `workload.rs`.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

pub const STEWARD: &str = env!("CARGO_BIN_EXE_steward");

/// One JSON log line of a steward process, with the time it was written.
#[derive(Debug, Clone)]
pub struct LogLine {
    #[allow(dead_code)] // not read by e2e_telemetry and e2e_tls
    pub at: SystemTime,
    pub json: serde_json::Value,
}

impl LogLine {
    pub fn message(&self) -> &str {
        self.json["fields"]["message"].as_str().unwrap_or_default()
    }
    #[allow(dead_code)] // not used by e2e_tls
    pub fn field(&self, name: &str) -> Option<&serde_json::Value> {
        self.json["fields"].get(name)
    }
}

/// A running `steward` process whose stderr (JSON logs) is collected.
pub struct Steward {
    pub child: Child,
    logs: Arc<Mutex<Vec<LogLine>>>,
    raw: Arc<Mutex<Vec<String>>>,
}

impl Steward {
    pub fn spawn(database_url: &str, args: &[&str]) -> Steward {
        Self::spawn_with_env(database_url, args, &[])
    }

    pub fn spawn_with_env(database_url: &str, args: &[&str], env: &[(&str, &str)]) -> Steward {
        let mut child = Command::new(STEWARD)
            .arg("run")
            .args(args)
            .env("DATABASE_URL", database_url)
            .env("STEWARD_LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            // Several instances share this machine: each takes a free port (logged).
            .env("STEWARD_METRICS_ADDR", "127.0.0.1:0")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning steward");
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let raw = Arc::new(Mutex::new(Vec::new()));
        std::thread::spawn({
            let logs = logs.clone();
            let raw = raw.clone();
            move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    raw.lock().unwrap().push(line.clone());
                    if let Ok(json) = serde_json::from_str::<serde_json::Value>(&line) {
                        let at = json["timestamp"]
                            .as_str()
                            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                            .map(SystemTime::from)
                            .unwrap_or_else(SystemTime::now);
                        logs.lock().unwrap().push(LogLine { at, json });
                    }
                }
            }
        });
        Steward { child, logs, raw }
    }

    pub fn logs(&self) -> Vec<LogLine> {
        self.logs.lock().unwrap().clone()
    }

    pub fn raw_output(&self) -> String {
        self.raw.lock().unwrap().join("\n")
    }

    pub fn find(&self, message: &str) -> Option<LogLine> {
        self.logs().into_iter().find(|l| l.message() == message)
    }

    /// Waits (generously) for a log line with this message.
    pub fn wait_for(&self, message: &str, within: Duration) -> LogLine {
        let deadline = Instant::now() + within;
        loop {
            if let Some(line) = self.find(message) {
                return line;
            }
            assert!(
                Instant::now() < deadline,
                "no {message:?} log within {within:?}; output:\n{}",
                self.raw_output()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[allow(dead_code)] // not used by e2e_tls
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit and returns its exit code.
    #[allow(dead_code)] // not used by e2e_tls
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "steward did not exit within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Steward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `steward` with arguments to completion; returns (exit code, stdout, stderr).
#[allow(dead_code)] // not used by chaos
pub fn steward(database_url: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let output = Command::new(STEWARD)
        .args(args)
        .env("DATABASE_URL", database_url)
        .env_remove("STEWARD_LOG_FORMAT")
        .output()
        .expect("running steward");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}
