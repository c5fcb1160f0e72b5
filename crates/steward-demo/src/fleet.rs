//! The demo's `steward run` processes ([`steward_workload::fleet::StewardProcess`]), each
//! with a label, a log file and a fate, in a process group of its own: a Ctrl-C at the
//! terminal reaches only the demo, which then stops them in order.

use anyhow::Context;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;
use steward_workload::fleet::{readable, Options, StewardProcess};

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
    pub process: StewardProcess,
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

    /// The last `n` lines of its log, JSON lines made readable.
    pub fn tail(&self, n: usize) -> Vec<String> {
        self.process
            .tail(n)
            .iter()
            .map(|line| readable(line))
            .collect()
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
    bin: PathBuf,
    database_url: String,
    schema: String,
    settings: Vec<String>,
    dir: PathBuf,
    procs: Vec<Proc>,
}

impl Fleet {
    pub fn new(
        bin: &Path,
        database_url: &str,
        schema: &str,
        settings: &[&str],
        dir: &Path,
    ) -> Fleet {
        Fleet {
            bin: bin.to_owned(),
            database_url: database_url.to_owned(),
            schema: schema.to_owned(),
            settings: settings.iter().map(|s| (*s).to_owned()).collect(),
            dir: dir.to_owned(),
            procs: Vec::new(),
        }
    }

    /// Starts `steward run` as `label`; returns its pid.
    pub fn spawn(&mut self, label: &str) -> anyhow::Result<u32> {
        let log = self.dir.join(format!("{label}.log"));
        let args: Vec<&str> = self
            .settings
            .iter()
            .flat_map(|s| ["--set", s.as_str()])
            .collect();
        let options = Options {
            env: vec![("STEWARD_SCHEMA".to_owned(), self.schema.clone())],
            log_file: Some(log.clone()),
            own_process_group: true,
        };
        let process = StewardProcess::spawn_with(&self.bin, &self.database_url, &args, &options)
            .with_context(|| format!("starting {label}"))?;
        let pid = process.pid();
        self.procs.push(Proc {
            label: label.to_owned(),
            pid,
            log,
            fate: Fate::Running,
            process,
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

    fn by_label_mut(&mut self, label: &str) -> Option<&mut Proc> {
        self.procs.iter_mut().find(|p| p.label == label)
    }

    /// `label (pid N)` for a pid, or `pid N (not started by the demo)`.
    pub fn name(&self, pid: u32) -> String {
        match self.by_pid(pid) {
            Some(p) => format!("{} (pid {pid})", p.label),
            None => format!("pid {pid} (not started by the demo)"),
        }
    }

    /// SIGKILL, as a crash or an OOM kill would. Waits for the process to be gone.
    pub fn kill(&mut self, pid: u32) -> anyhow::Result<()> {
        let proc = self
            .procs
            .iter_mut()
            .find(|p| p.pid == pid && p.fate == Fate::Running)
            .with_context(|| format!("pid {pid} is not a running demo process"))?;
        proc.process
            .kill()
            .with_context(|| format!("killing {}", proc.label))?;
        proc.fate = Fate::Killed;
        Ok(())
    }

    /// Waits until process `label` logs `message`; false if it did not within `within`.
    pub async fn wait_for_message(&mut self, label: &str, message: &str, within: Duration) -> bool {
        match self.by_label_mut(label) {
            Some(proc) => proc.process.wait_message(message, within).await.is_ok(),
            None => false,
        }
    }

    /// Processes that exited on their own since the last call, as problems.
    pub fn exited_early(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        for proc in &mut self.procs {
            if proc.fate != Fate::Running {
                continue;
            }
            if let Some(status) = proc.process.try_wait() {
                proc.fate = Fate::ExitedEarly(status);
                problems.extend(proc.problem());
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
            if let Some(status) = proc.process.try_wait() {
                proc.fate = Fate::ExitedEarly(status);
                continue;
            }
            proc.fate = match proc.process.terminate(EXIT_WITHIN).await {
                Some(status) => Fate::Stopped(status),
                None => Fate::Hung,
            };
        }
    }
}
