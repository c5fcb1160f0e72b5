//! Drives real `steward` processes for the end-to-end suites, through the driver the demo and
//! the benchmarks use too ([`steward_workload::fleet`]). Compiled into every suite; the few
//! items some suites do not use carry their own `allow(dead_code)`. What only some suites need
//! lives in modules of its own that those suites include by `#[path]`: `http.rs` (the HTTP
//! endpoint), and the chaos suite's `audit.rs`, `network.rs`, `probes.rs` and `settings.rs`.

use std::path::Path;
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};
use steward_workload::fleet::{Options, StewardProcess};

pub use steward_workload::fleet::LogLine;

pub const STEWARD: &str = env!("CARGO_BIN_EXE_steward");

/// A running `steward run` whose JSON log lines are collected; a test's failure to drive it
/// panics, with its output.
pub struct Steward {
    process: StewardProcess,
}

impl Steward {
    pub fn spawn(database_url: &str, args: &[&str]) -> Steward {
        Self::spawn_with_env(database_url, args, &[])
    }

    pub fn spawn_with_env(database_url: &str, args: &[&str], env: &[(&str, &str)]) -> Steward {
        let options = Options {
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..Options::default()
        };
        let process = StewardProcess::spawn_with(Path::new(STEWARD), database_url, args, &options)
            .unwrap_or_else(|e| panic!("spawning steward: {e}"));
        Steward { process }
    }

    #[allow(dead_code)] // not used by e2e_tls
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    #[allow(dead_code)] // not used by every suite
    pub fn logs(&self) -> Vec<LogLine> {
        self.process.lines()
    }

    pub fn raw_output(&self) -> String {
        self.process.raw_output()
    }

    pub fn find(&self, message: &str) -> Option<LogLine> {
        self.process.find_message(message)
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
        self.process
            .signal(signal)
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// The exit status, if the process has exited.
    #[allow(dead_code)] // not used by every suite
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.process.try_wait()
    }

    /// Waits for the process to exit and returns its exit code.
    #[allow(dead_code)] // not used by e2e_tls
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        match self.process.wait_exit_blocking(within) {
            Some(status) => status.code(),
            None => panic!("steward did not exit within {within:?}"),
        }
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

/// Polls `check` every 50 ms until it holds; fails naming `what` after `within`.
#[allow(dead_code)] // not used by every suite
pub fn wait_until(what: &str, within: Duration, check: impl FnMut() -> bool) {
    wait_until_explained(what, within, check, String::new)
}

/// [`wait_until`], with `explain` adding what was seen to the failure.
#[allow(dead_code)] // not used by every suite
pub fn wait_until_explained(
    what: &str,
    within: Duration,
    mut check: impl FnMut() -> bool,
    explain: impl Fn() -> String,
) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {}",
            explain()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The first of `names` found on PATH.
#[allow(dead_code)] // not used by every suite
pub fn find_on_path(names: &[&str]) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    names.iter().find_map(|name| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}
