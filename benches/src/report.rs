//! The report: one JSON document (stable schema, see benches/README.md) and the same content as
//! human tables.

use crate::db::ServerInfo;
use serde::Serialize;
use std::fmt::Write as _;

pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub name: String,
    /// The target as text, e.g. "< 10 ms".
    pub target: String,
    pub value: Option<f64>,
    pub unit: String,
    pub pass: bool,
}

impl Target {
    pub fn below(name: impl Into<String>, value: Option<f64>, limit: f64, unit: &str) -> Self {
        Target {
            name: name.into(),
            target: format!("< {limit} {unit}"),
            value,
            unit: unit.to_owned(),
            pass: value.is_some_and(|v| v < limit),
        }
    }

    pub fn at_most(name: impl Into<String>, value: Option<f64>, limit: f64, unit: &str) -> Self {
        Target {
            name: name.into(),
            target: format!("<= {limit} {unit}"),
            value,
            unit: unit.to_owned(),
            pass: value.is_some_and(|v| v <= limit),
        }
    }

    pub fn at_least(name: impl Into<String>, value: Option<f64>, floor: f64, unit: &str) -> Self {
        Target {
            name: name.into(),
            target: format!(">= {floor} {unit}"),
            value,
            unit: unit.to_owned(),
            pass: value.is_some_and(|v| v >= floor),
        }
    }

    pub fn equals(name: impl Into<String>, value: Option<f64>, expected: f64, unit: &str) -> Self {
        Target {
            name: name.into(),
            target: format!("= {expected}{}", if unit.is_empty() { "" } else { " " }) + unit,
            value,
            unit: unit.to_owned(),
            pass: value.is_some_and(|v| v == expected),
        }
    }

    pub fn verdict(&self) -> &'static str {
        if self.pass {
            "PASS"
        } else {
            "MISS"
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub memory_gib: f64,
    pub cpu_model: String,
    pub kernel: String,
    pub loadavg_at_start: String,
    pub postgres: Option<ServerInfo>,
    /// Build profile of the harness (and of the steward binary it builds).
    pub profile: String,
}

impl Machine {
    pub fn read(postgres: Option<ServerInfo>) -> Machine {
        let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
        let memory_kib: f64 = read("/proc/meminfo")
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        let cpu_model = read("/proc/cpuinfo")
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_default();
        Machine {
            nproc: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            memory_gib: (memory_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
            cpu_model,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            loadavg_at_start: read("/proc/loadavg").trim().to_owned(),
            postgres,
            profile: if cfg!(debug_assertions) {
                "debug".into()
            } else {
                "release".into()
            },
        }
    }
}

/// One scenario's entry: always the same keys; `result` is null unless status is "ok".
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioEntry<T: Serialize> {
    /// "ok", "error" or "skipped".
    pub status: String,
    pub error: Option<String>,
    pub elapsed_s: f64,
    pub targets: Vec<Target>,
    pub result: Option<T>,
}

impl<T: Serialize> ScenarioEntry<T> {
    pub fn skipped() -> Self {
        ScenarioEntry {
            status: "skipped".into(),
            error: None,
            elapsed_s: 0.0,
            targets: Vec::new(),
            result: None,
        }
    }

    pub fn from_result(result: anyhow::Result<(T, Vec<Target>)>, elapsed_s: f64) -> Self {
        match result {
            Ok((result, targets)) => ScenarioEntry {
                status: "ok".into(),
                error: None,
                elapsed_s,
                targets,
                result: Some(result),
            },
            Err(error) => ScenarioEntry {
                status: "error".into(),
                error: Some(format!("{error:#}")),
                elapsed_s,
                targets: Vec::new(),
                result: None,
            },
        }
    }

    pub fn is_error(&self) -> bool {
        self.status == "error"
    }
}

/// Renders a table: the first row is the header; columns are padded to their widest cell.
pub fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for (i, row) in rows.iter().enumerate() {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, cell)| {
                if c == 0 {
                    format!("{cell:<w$}", w = widths[c])
                } else {
                    format!("{cell:>w$}", w = widths[c])
                }
            })
            .collect();
        let _ = writeln!(out, "  {}", line.join("  ").trim_end());
        if i == 0 {
            let total: usize = widths.iter().sum::<usize>() + 2 * columns.saturating_sub(1);
            let _ = writeln!(out, "  {}", "-".repeat(total));
        }
    }
    out
}

pub fn render_targets(targets: &[Target]) -> String {
    if targets.is_empty() {
        return String::new();
    }
    let mut rows = vec![vec![
        "target".to_owned(),
        "goal".to_owned(),
        "measured".to_owned(),
        "".to_owned(),
    ]];
    for t in targets {
        rows.push(vec![
            t.name.clone(),
            t.target.clone(),
            t.value
                .map(|v| format!("{} {}", num(v), t.unit))
                .unwrap_or_else(|| "n/a".into()),
            t.verdict().to_owned(),
        ]);
    }
    table(&rows)
}

/// A number for tables: 3 significant-ish decimals, no noise.
pub fn num(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

pub fn opt(v: Option<f64>) -> String {
    v.map(num).unwrap_or_else(|| "-".into())
}

pub fn ratio_cell(v: Option<f64>) -> String {
    v.map(|r| format!("{}x", num(r)))
        .unwrap_or_else(|| "-".into())
}
