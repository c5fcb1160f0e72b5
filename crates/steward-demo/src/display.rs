//! The live view, drawn once a second: redrawn in place (ANSI) when stdout is a terminal,
//! appended as plain text otherwise (CI logs).
//!
//! Tables are lists of [`Column`]s over a row type. To show another per-branch figure from
//! `branch_health`, add the field to [`BranchStatus`] and to `steward_leader::status::BRANCHES`, then one entry
//! to [`BRANCH_COLUMNS`]. The promotion lag, which `branch_health` does not hold, is read from
//! the leader's `/metrics` (`monitor::PromotionLag`) and shown on a line of its own.

use super::monitor::{PromotionLag, Snapshot};
use std::io::{IsTerminal, Write};
use std::str::FromStr;
use std::time::Duration;
use steward_leader::status::BranchStatus;
use steward_queue::JobState;
use steward_workload::Stats;

/// One column of a table: its header, its minimum width and how to render a row's cell.
pub struct Column<T> {
    pub header: &'static str,
    pub min_width: usize,
    /// Text is left-aligned, numbers right-aligned.
    pub left: bool,
    pub cell: fn(&T) -> String,
}

/// The live per-branch table.
pub const BRANCH_COLUMNS: &[Column<BranchStatus>] = &[
    Column {
        header: "branch",
        min_width: 30,
        left: true,
        cell: |r| r.branch.clone(),
    },
    Column {
        header: "loop",
        min_width: 7,
        left: true,
        cell: |r| r.loop_name.clone(),
    },
    Column {
        header: "runs",
        min_width: 5,
        left: false,
        cell: |r| r.runs.to_string(),
    },
    Column {
        header: "last rows",
        min_width: 9,
        left: false,
        cell: |r| {
            r.last_rows
                .map_or_else(|| "-".to_owned(), |n| n.to_string())
        },
    },
    Column {
        header: "last ms",
        min_width: 7,
        left: false,
        cell: |r| ms(r.last_duration_ms),
    },
    Column {
        header: "start delay ms",
        min_width: 14,
        left: false,
        cell: |r| ms(r.last_start_delay_ms),
    },
    Column {
        header: "overrun/episodes",
        min_width: 16,
        left: true,
        cell: |r| format!("{}/{}", r.overrun_state, r.overrun_episodes),
    },
    Column {
        header: "errors",
        min_width: 6,
        left: false,
        cell: |r| r.errors.to_string(),
    },
];

fn ms(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"))
}

/// `lag      promotion p50 … · p99 …`: the leader's promotion lag over the recent window.
fn promotion_lag_line(lag: Option<&PromotionLag>) -> String {
    let text = match lag {
        None => "promotion - (the leader's /metrics not read)".to_owned(),
        Some(lag) if lag.over.is_zero() => "promotion - (measuring)".to_owned(),
        Some(lag) => {
            let secs = lag.over.as_secs_f64().round();
            match (lag.p50, lag.p99) {
                (Some(p50), Some(p99)) if lag.jobs > 0 => format!(
                    "promotion p50 {:.1} ms · p99 {:.1} ms ({} jobs promoted in the last {secs:.0} s)",
                    p50 * 1000.0,
                    p99 * 1000.0,
                    lag.jobs
                ),
                _ => format!("promotion - (no job promoted in the last {secs:.0} s)"),
            }
        }
    };
    format!("lag      {text}")
}

/// Renders rows under a header line; columns are as wide as their widest cell.
pub fn table<T>(columns: &[Column<T>], rows: &[T]) -> Vec<String> {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|row| columns.iter().map(|c| (c.cell)(row)).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            cells
                .iter()
                .map(|r| r[i].chars().count())
                .chain([c.header.len(), c.min_width])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |values: Vec<&str>| {
        values
            .iter()
            .zip(columns.iter().zip(&widths))
            .map(|(v, (c, w))| {
                if c.left {
                    format!("{v:<w$}")
                } else {
                    format!("{v:>w$}")
                }
            })
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut lines = vec![line(columns.iter().map(|c| c.header).collect())];
    lines.extend(
        cells
            .iter()
            .map(|r| line(r.iter().map(String::as_str).collect())),
    );
    lines
}

/// `a 1 · b 2 · ...`
pub fn counts<'a>(items: impl IntoIterator<Item = (&'a str, String)>) -> String {
    items
        .into_iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(" · ")
}

/// What one frame shows.
pub struct Frame<'a> {
    pub elapsed: Duration,
    pub duration: Duration,
    /// Who leads, already described (the view does not know the demo's processes).
    pub leader: String,
    pub snapshot: &'a Snapshot,
    pub workload: &'a Stats,
}

/// Events shown under the table on a terminal.
const EVENTS_SHOWN: usize = 10;

pub struct Display {
    tty: bool,
    /// Rows and columns of the terminal, when known: a frame must fit, or redrawing from the
    /// top would leave scrolled-off copies behind.
    size: Option<(usize, usize)>,
    /// Lines at the top of every terminal frame (clearing the screen would hide them).
    header: Vec<String>,
    events: Vec<String>,
    drawn: bool,
}

impl Display {
    pub fn new(header: Vec<String>) -> Display {
        let tty = std::io::stdout().is_terminal();
        Display {
            tty,
            size: if tty { terminal_size() } else { None },
            header,
            events: Vec::new(),
            drawn: false,
        }
    }

    /// Something happened: printed at once, and on a terminal kept under the table.
    pub fn event(&mut self, elapsed: Duration, message: impl AsRef<str>) {
        let line = format!("[{:>5.1}s] {}", elapsed.as_secs_f64(), message.as_ref());
        // Before the first frame (and always without a terminal) nothing redraws over it.
        if !self.tty || !self.drawn {
            println!("{line}");
        }
        self.events.push(line);
    }

    pub fn draw(&mut self, frame: &Frame<'_>) {
        let body = frame_lines(frame);
        let mut out = std::io::stdout().lock();
        // Write errors (a closed pipe) only cost the view, never the demo.
        if self.tty {
            let mut text = String::new();
            // Home, then each line cleared to its end, then the rest of the screen cleared:
            // no flicker, and nothing left over from a longer previous frame.
            text.push_str(if self.drawn {
                "\x1b[H"
            } else {
                "\x1b[2J\x1b[H"
            });
            let start = self.events.len().saturating_sub(EVENTS_SHOWN);
            let lines = fit(&self.header, &body, &self.events[start..], self.size);
            for line in &lines {
                text.push_str(line);
                text.push_str("\x1b[K\n");
            }
            text.push_str("\x1b[J");
            let _ = out.write_all(text.as_bytes());
        } else {
            let _ = writeln!(out);
            for line in &body {
                let _ = writeln!(out, "{line}");
            }
        }
        let _ = out.flush();
        self.drawn = true;
    }
}

/// The terminal's rows and columns, from `stty size` on the controlling terminal.
fn terminal_size() -> Option<(usize, usize)> {
    let tty = std::fs::File::open("/dev/tty").ok()?;
    let output = std::process::Command::new("stty")
        .arg("size")
        .stdin(tty)
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8(output.stdout).ok()?;
    let mut parts = text.split_whitespace().map(str::parse::<usize>);
    match (parts.next(), parts.next()) {
        (Some(Ok(rows)), Some(Ok(cols))) if rows > 0 && cols > 0 => Some((rows, cols)),
        _ => None,
    }
}

/// A terminal frame: header, body and events, cut to fit `size` (rows, columns). Lines are
/// cut rather than wrapped; when rows run short, events go first (down to the last three),
/// then the header, then the bottom of the body.
fn fit(
    header: &[String],
    body: &[String],
    events: &[String],
    size: Option<(usize, usize)>,
) -> Vec<String> {
    let compose = |header: &[String], events: &[String]| -> Vec<String> {
        let mut lines: Vec<String> = header.to_vec();
        if !header.is_empty() {
            lines.push(String::new());
        }
        lines.extend(body.iter().cloned());
        if !events.is_empty() {
            lines.push(String::new());
            lines.extend(events.iter().cloned());
        }
        lines
    };
    let Some((rows, cols)) = size else {
        return compose(header, events);
    };
    // The last row stays free for the cursor.
    let room = rows.saturating_sub(1).max(1);
    let recent = &events[events.len().saturating_sub(3)..];
    let mut lines = compose(header, events);
    if lines.len() > room {
        lines = compose(header, recent);
    }
    if lines.len() > room {
        lines = compose(&[], recent);
    }
    lines.truncate(room);
    lines
        .into_iter()
        .map(
            |line| match line.char_indices().nth(cols.saturating_sub(1)) {
                Some((at, _)) => line[..at].to_owned(),
                None => line,
            },
        )
        .collect()
}

fn frame_lines(frame: &Frame<'_>) -> Vec<String> {
    let s = frame.snapshot;
    let w = frame.workload;
    let finished = |state: &str| JobState::from_str(state).is_ok_and(JobState::is_terminal);
    let by_state = |want_finished: bool| {
        s.states
            .iter()
            .filter(move |(state, _)| finished(state) == want_finished)
            .map(|(state, n)| (*state, n.to_string()))
    };
    let mut lines = vec![
        format!(
            "── {:.0} s of {:.0} s ──",
            frame.elapsed.as_secs_f64(),
            frame.duration.as_secs_f64()
        ),
        format!("leader   {}", frame.leader),
        format!("jobs     {}", counts(by_state(false))),
        format!(
            "         {}",
            counts(by_state(true).chain([("archived", s.archived.to_string())]))
        ),
        format!(
            "workers  {}",
            counts([
                ("enqueued", w.enqueued.to_string()),
                ("claimed", w.claimed.to_string()),
                ("completed", w.completed.to_string()),
                ("retried/failed", format!("{}/{}", w.retried, w.failed)),
                ("errors", w.errors.to_string()),
            ])
        ),
        format!(
            "         {}",
            counts([
                ("crashed", w.crashed.to_string()),
                ("overran", w.overran.to_string()),
                (
                    "callbacks unanswered/answered",
                    format!("{}/{}", w.unanswered, w.answered)
                ),
                ("outcomes refused", w.refused.to_string()),
            ])
        ),
        promotion_lag_line(s.promotion_lag.as_ref()),
        String::new(),
    ];
    if s.branches.is_empty() {
        lines.push("(no branch has reported to branch_health yet)".to_owned());
    } else {
        lines.extend(table(BRANCH_COLUMNS, &s.branches));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_fit_the_terminal() {
        let lines = |n: usize, tag: &str| -> Vec<String> {
            (0..n)
                .map(|i| format!("{tag}{i} and some more text"))
                .collect()
        };
        let (header, body, events) = (lines(3, "h"), lines(10, "b"), lines(6, "e"));
        // Unknown size: everything, blank lines between the parts.
        assert_eq!(fit(&header, &body, &events, None).len(), 3 + 1 + 10 + 1 + 6);
        // Room for all but some events: the last three events stay.
        let fitted = fit(&header, &body, &events, Some((19, 80)));
        assert_eq!(fitted.len(), 3 + 1 + 10 + 1 + 3);
        assert_eq!(fitted.last().unwrap(), "e5 and some more text");
        // Less room: the header goes, then the bottom is cut; lines are cut to the width.
        let fitted = fit(&header, &body, &events, Some((12, 6)));
        assert_eq!(fitted.len(), 11);
        assert_eq!(fitted[0], "b0 an");
    }

    #[test]
    fn the_promotion_lag_line_says_what_it_knows() {
        let lag = |jobs, p50, p99, secs| PromotionLag {
            jobs,
            p50,
            p99,
            over: Duration::from_secs(secs),
        };
        assert_eq!(
            promotion_lag_line(Some(&lag(412, Some(0.00084), Some(0.0031), 10))),
            "lag      promotion p50 0.8 ms · p99 3.1 ms (412 jobs promoted in the last 10 s)"
        );
        assert_eq!(
            promotion_lag_line(Some(&lag(0, None, None, 9))),
            "lag      promotion - (no job promoted in the last 9 s)"
        );
        assert_eq!(
            promotion_lag_line(Some(&lag(0, None, None, 0))),
            "lag      promotion - (measuring)"
        );
        assert!(promotion_lag_line(None).contains("not read"));
    }

    #[test]
    fn tables_align_and_grow_with_content() {
        let rows = vec![
            BranchStatus {
                branch: "promote_scheduled".into(),
                loop_name: "slo".into(),
                runs: 12,
                last_rows: Some(40),
                last_duration_ms: Some(1.26),
                overrun_state: "on_time".into(),
                ..BranchStatus::default()
            },
            BranchStatus {
                branch: "a_branch_name_longer_than_thirty_chars".into(),
                runs: 123_456,
                ..BranchStatus::default()
            },
        ];
        let lines = table(BRANCH_COLUMNS, &rows);
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("branch "));
        assert!(lines[1].contains("promote_scheduled"));
        assert!(lines[1].contains(" 1.3 "), "{}", lines[1]);
        // Every line puts the runs column at the same place.
        let at = lines[0].find("runs").unwrap() + "runs".len();
        assert_eq!(&lines[1][at - 2..at], "12");
        assert_eq!(&lines[2][at - 6..at], "123456");
    }
}
