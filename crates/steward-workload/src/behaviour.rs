//! The one table of job behaviours. A job's behaviour is written in its args
//! (`{"behaviour": name, "token": n}`); the workers of [`crate::Workload`] act it out on
//! `steward-worker`. Only the first attempt misbehaves, except where a row says otherwise, so
//! that every misbehaving job still ends.

use serde_json::json;
use std::time::Duration;
use steward_queue::{ClaimedJob, NewJob};

/// What a job does when a worker runs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Behaviour {
    Normal,
    Slow,
    Flaky,
    Doomed,
    Crash,
    Overrun,
    Unanswered,
    Answered,
    Rejected,
    SelfCancel,
    Cancelled,
    Long,
}

/// How a job of a behaviour must end, whatever broke meanwhile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ends {
    Completed,
    Failed,
    /// Cancelled, or completed when it ran before the cancellation reached it.
    CancelledOrCompleted,
}

/// One row of the table.
pub struct Row {
    pub behaviour: Behaviour,
    /// Its name in the job's args and in reports.
    pub name: &'static str,
    /// What the worker's handler does.
    pub does: &'static str,
    /// The rescue branch it gives work to, if any (the error entry's `reason`).
    pub rescued_by: Option<&'static str>,
    pub ends: Ends,
}

/// Every behaviour, in the order of [`Behaviour`].
pub const TABLE: [Row; 12] = [
    Row {
        behaviour: Behaviour::Normal,
        name: "normal",
        does: "works briefly (Timings::work) and completes",
        rescued_by: None,
        ends: Ends::Completed,
    },
    Row {
        behaviour: Behaviour::Slow,
        name: "slow",
        does: "attempt 1 works Timings::slow_for while the worker heartbeats it, then completes",
        rescued_by: None,
        ends: Ends::Completed,
    },
    Row {
        behaviour: Behaviour::Flaky,
        name: "flaky",
        does: "attempt 1 returns an error, so the job retries with backoff",
        rescued_by: None,
        ends: Ends::Completed,
    },
    Row {
        behaviour: Behaviour::Doomed,
        name: "doomed",
        does: "every attempt returns an error: failed after max_attempts",
        rescued_by: None,
        ends: Ends::Failed,
    },
    Row {
        behaviour: Behaviour::Crash,
        name: "crash",
        does: "attempt 1 crashes: the run, or with WorkloadConfig::crash_worker every run of its \
               worker, is dropped as by a dead process (no heartbeat, no outcome)",
        rescued_by: Some("heartbeat_stale"),
        ends: Ends::Completed,
    },
    Row {
        behaviour: Behaviour::Overrun,
        name: "overrun",
        does: "attempt 1 has a short run timeout and blocks its thread past it (a handler the \
               worker cannot cancel); heartbeats go on, so only the deadline rescue takes the \
               run back, and the late completion is refused",
        rescued_by: Some("deadline_expired"),
        ends: Ends::Completed,
    },
    Row {
        behaviour: Behaviour::Unanswered,
        name: "unanswered",
        does: "attempt 1 parks on a callback (Timings::unanswered_timeout) that nobody answers",
        rescued_by: Some("callback_timeout"),
        ends: Ends::Completed,
    },
    Row {
        behaviour: Behaviour::Answered,
        name: "answered",
        does: "every attempt parks on a callback (Timings::answer_timeout) that a remote party \
               completes after Timings::answer_after",
        rescued_by: None,
        ends: Ends::Completed,
    },
    Row {
        behaviour: Behaviour::Rejected,
        name: "rejected",
        does: "attempt 1 parks on a callback that the remote party answers with a failure",
        rescued_by: None,
        ends: Ends::Completed,
    },
    Row {
        behaviour: Behaviour::SelfCancel,
        name: "self_cancel",
        does: "attempt 1 cancels its own job (as an operator would) while it runs; the \
               completion is refused",
        rescued_by: None,
        ends: Ends::CancelledOrCompleted,
    },
    Row {
        behaviour: Behaviour::Cancelled,
        name: "cancelled",
        does: "enqueued due in 2 s and cancelled by the producer after 300 ms (normal if it \
               runs anyway)",
        rescued_by: None,
        ends: Ends::CancelledOrCompleted,
    },
    Row {
        behaviour: Behaviour::Long,
        name: "long",
        does: "attempt 1 works Timings::long_for while the worker heartbeats it, then \
               completes: a run that spans an outage",
        rescued_by: None,
        ends: Ends::Completed,
    },
];

/// The key of the behaviour in a job's args.
pub const ARG: &str = "behaviour";
/// The key of the producer's token in a job's args: which enqueue made the job.
pub const TOKEN: &str = "token";

impl Behaviour {
    pub fn row(self) -> &'static Row {
        // TABLE lists every behaviour in declaration order (checked by a test).
        &TABLE[self as usize]
    }

    pub fn name(self) -> &'static str {
        self.row().name
    }

    pub fn parse(name: &str) -> Option<Behaviour> {
        TABLE.iter().find(|r| r.name == name).map(|r| r.behaviour)
    }

    /// The behaviour written in a claimed job's args; `Normal` for a job without one (a cron
    /// fire, say).
    pub fn of(job: &ClaimedJob) -> Behaviour {
        job.args
            .get(ARG)
            .and_then(|v| v.as_str())
            .and_then(Behaviour::parse)
            .unwrap_or(Behaviour::Normal)
    }

    /// Whether `attempt` of a job of this behaviour misbehaves.
    pub fn misbehaves(self, attempt: i32) -> bool {
        match self {
            Behaviour::Normal | Behaviour::Cancelled => false,
            Behaviour::Doomed | Behaviour::Answered => true,
            _ => attempt == 1,
        }
    }

    /// Whether a live worker may lose this run (its lease taken, its outcome refused) with no
    /// fault of Steward's: the deadline rescue, or a cancellation.
    pub fn may_lose(self, attempt: i32) -> bool {
        matches!(
            (self, attempt),
            (Behaviour::Overrun, 1) | (Behaviour::SelfCancel, 1) | (Behaviour::Cancelled, _)
        )
    }

    /// The job to enqueue: this behaviour and `token` in its args, and the run timeout an
    /// overrun needs.
    pub fn job(self, kind: &str, queue: &str, token: u64, timings: &crate::Timings) -> NewJob {
        let job = NewJob::new(kind)
            .queue(queue)
            .args(json!({ ARG: self.name(), TOKEN: token }));
        if self == Behaviour::Overrun {
            job.run_timeout(timings.overrun_timeout)
        } else {
            job
        }
    }

    /// How long an overrun blocks past its timeout before it tries to complete.
    pub(crate) fn overrun_blocks(timings: &crate::Timings) -> Duration {
        timings.overrun_timeout + timings.overrun_by
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_lists_every_behaviour_in_order_with_a_unique_name() {
        for (i, row) in TABLE.iter().enumerate() {
            assert_eq!(row.behaviour as usize, i, "{}", row.name);
            assert_eq!(Behaviour::parse(row.name), Some(row.behaviour));
        }
        let mut names: Vec<&str> = TABLE.iter().map(|r| r.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), TABLE.len());
    }

    #[test]
    fn only_overruns_carry_the_short_run_timeout() {
        let timings = crate::Timings::default();
        for row in &TABLE {
            let job = row.behaviour.job("k", "q", 7, &timings);
            assert_eq!(job.args[ARG], row.name);
            assert_eq!(job.args[TOKEN], 7);
            assert_eq!(
                job.run_timeout.is_some(),
                row.behaviour == Behaviour::Overrun
            );
        }
    }
}
