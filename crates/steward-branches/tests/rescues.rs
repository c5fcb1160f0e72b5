//! The three rescues (stale heartbeats, expired deadlines, expired callbacks) as one
//! conformance suite. Each rescue is described once ([`Rescue`]: how to make a run expire for
//! it, its reason, its index, its settings); every shared case is written once and stamped out
//! for each rescue as `conformance::<rescue>::<case>`, so a failure names the rescue. Cases that
//! only one rescue has live in the module named after it (`stale_heartbeats::...`).

#[macro_use]
mod common;

use common::*;
use std::collections::BTreeMap;
use std::time::Duration;
use steward_branches::{
    rescue_expired_callbacks, rescue_expired_deadlines, rescue_stale_heartbeats, Branch,
    Observation, RescueReason,
};
use steward_queue::{NewJob, QueueError, Resolution};
use tokio_postgres::Client;

// ---------------------------------------------------------------------------------------------
// The rescues
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    StaleHeartbeats,
    ExpiredDeadlines,
    ExpiredCallbacks,
}

/// What the shared cases need to know about one rescue.
struct Rescue {
    kind: Kind,
    /// The branch's name, also its settings table (`[branches.<name>]`).
    name: &'static str,
    reason: RescueReason,
    /// The `reason` of the error entry it appends.
    entry: &'static str,
    /// What the entry's message starts with, and something else it contains.
    message: (&'static str, &'static str),
    /// The state of the runs it rescues.
    state: &'static str,
    /// Runs in that state it must leave alone: (what they are, expiry as [`Rescue::seed`]
    /// takes it, how many).
    spared: &'static [(&'static str, Option<f64>, i64)],
    statement: &'static str,
    /// The EXECUTE arguments of its prepared statement, and the partial index it must use.
    plan: (&'static str, &'static str),
    interval: Duration,
    quiet_period: Duration,
    /// Settings its configuration refuses (and the key the refusal names), besides
    /// [`UNKNOWN_KEYS`].
    unknown: &'static [(&'static str, &'static str)],
    /// Settings with the problems validation reports, in order, besides [`INVALID`].
    invalid: &'static [(&'static str, &'static [&'static str])],
}

const HEARTBEATS: Rescue = Rescue {
    kind: Kind::StaleHeartbeats,
    name: "rescue_stale_heartbeats",
    reason: RescueReason::Heartbeat,
    entry: "heartbeat_stale",
    message: ("no heartbeat since ", "the worker is presumed dead"),
    state: "running",
    spared: &[("fresh", Some(-25.0), 3), ("almost stale", Some(-5.0), 2)],
    statement: rescue_stale_heartbeats::RESCUE,
    plan: (
        "(1000, 1000, 3600000, 0.1, 30)",
        "jobs_running_heartbeat_idx",
    ),
    interval: Duration::from_secs(5),
    quiet_period: Duration::from_secs(30),
    unknown: &[("stalenes = \"1s\"", "stalenes")],
    invalid: &[(
        "staleness = \"0s\"\nbatch_size = 0\nmax_batches_per_run = 0\n\
         [retry]\nbase = \"10s\"\nmax = \"1s\"\njitter = 2.0",
        &[
            "batch_size",
            "max_batches_per_run",
            "staleness",
            "retry.max",
            "retry.jitter",
        ],
    )],
};

const DEADLINES: Rescue = Rescue {
    kind: Kind::ExpiredDeadlines,
    name: "rescue_expired_deadlines",
    reason: RescueReason::Deadline,
    entry: "deadline_expired",
    message: ("the run did not finish by its deadline", "deadline ("),
    state: "running",
    spared: &[
        ("ahead of their deadline", Some(-60.0), 3),
        ("without a deadline", None, 2),
    ],
    statement: rescue_expired_deadlines::RESCUE,
    plan: ("(1000, 1000, 3600000, 0.1)", "jobs_running_deadline_idx"),
    interval: Duration::from_secs(1),
    quiet_period: Duration::from_secs(30),
    unknown: &[("staleness = \"1s\"", "staleness")],
    invalid: &[],
};

const CALLBACKS: Rescue = Rescue {
    kind: Kind::ExpiredCallbacks,
    name: "rescue_expired_callbacks",
    reason: RescueReason::Callback,
    entry: "callback_timeout",
    message: ("callback ", "was not resolved by its timeout"),
    state: "waiting_external",
    spared: &[("not timed out yet", Some(-60.0), 3)],
    statement: rescue_expired_callbacks::RESCUE,
    plan: ("(1000, 1000, 3600000, 0.1)", "jobs_callback_timeout_idx"),
    interval: Duration::from_secs(1),
    quiet_period: Duration::from_secs(30),
    unknown: &[("staleness = \"1s\"", "staleness")],
    invalid: &[],
};

/// Settings every rescue refuses, with the key the refusal names.
const UNKNOWN_KEYS: [(&str, &str); 2] = [
    ("timeout = \"1s\"", "timeout"),
    ("[retry]\nbsae = \"1s\"", "bsae"),
];

/// Settings every rescue parses, with the problems its validation reports, in order.
const INVALID: [(&str, &[&str]); 2] = [
    (
        "interval = \"0s\"\nquiet_period = \"2d\"\n[retry]\nbase = \"0s\"",
        &["interval", "quiet_period", "retry.base"],
    ),
    (
        "batch_size = 200000\nmax_batches_per_run = 0\n[retry]\njitter = -0.5",
        &["batch_size", "max_batches_per_run", "retry.jitter"],
    ),
];

const STATES: [&str; 8] = [
    "scheduled",
    "available",
    "running",
    "waiting_external",
    "retryable",
    "completed",
    "failed",
    "cancelled",
];

/// The default staleness of [`HEARTBEATS`], from which [`Rescue::seed`] counts.
const STALENESS: f64 = 30.0;

impl Rescue {
    /// The rescue with `settings` (TOML of its table; empty for the defaults).
    fn branch(&self, settings: &str) -> std::sync::Arc<dyn Branch> {
        branch(self.name, settings)
    }

    /// Inserts `count` jobs in `state` whose expiry for this rescue passed `past` seconds ago
    /// (negative: it is that far ahead; None: there is none, a run without a time limit);
    /// returns their ids. Jobs not in this rescue's state get the same timestamps.
    async fn seed(
        &self,
        client: &Client,
        state: &str,
        count: i64,
        past: Option<f64>,
        attempt: i32,
        max_attempts: i32,
    ) -> Vec<i64> {
        match self.kind {
            Kind::StaleHeartbeats => {
                let past = past.expect("every run heartbeats");
                let age = STALENESS + past;
                seed_heartbeats(client, state, count, age, attempt, max_attempts).await
            }
            Kind::ExpiredDeadlines => {
                seed_deadlines(client, state, count, past, attempt, max_attempts).await
            }
            Kind::ExpiredCallbacks => {
                let past = past.expect("every waiting run has a callback timeout");
                seed_callbacks(client, state, count, past, attempt, max_attempts).await
            }
        }
    }

    /// Whether its runs park on a callback before they can expire.
    fn parks(&self) -> bool {
        self.kind == Kind::ExpiredCallbacks
    }

    /// Makes the run of job `id` expire for this rescue: its worker went silent, it overstayed
    /// its deadline, or nobody answered its callback.
    async fn expire(&self, client: &Client, id: i64) {
        let update = match self.kind {
            Kind::StaleHeartbeats => {
                "UPDATE jobs SET heartbeat_at = now() - interval '1 minute' WHERE id = $1"
            }
            Kind::ExpiredDeadlines => {
                "UPDATE jobs SET deadline_at = now() - interval '1 second' WHERE id = $1"
            }
            Kind::ExpiredCallbacks => {
                "UPDATE jobs SET callback_timeout_at = now() - interval '1 second' WHERE id = $1"
            }
        };
        assert_eq!(client.execute(update, &[&id]).await.unwrap(), 1);
    }
}

/// Jobs in `state` whose last heartbeat was `age` seconds ago; waiting jobs have a callback
/// due in an hour.
async fn seed_heartbeats(
    client: &Client,
    state: &str,
    count: i64,
    age: f64,
    attempt: i32,
    max_attempts: i32,
) -> Vec<i64> {
    ids(client
        .query(
            "INSERT INTO jobs (queue, kind, state, priority, original_priority, attempt, max_attempts,
                               run_lease, attempted_at, heartbeat_at, finalized_at, callback_id,
                               callback_timeout_at)
             SELECT 'q', 'k', $1::text::job_state, 2, 2, $3, $4, 1, now() - interval '1 hour',
                    now() - $5::float8 * interval '1 second',
                    CASE WHEN $1 IN ('completed', 'failed', 'cancelled') THEN now() END,
                    CASE WHEN $1 = 'waiting_external' THEN gen_random_uuid() END,
                    CASE WHEN $1 = 'waiting_external' THEN now() + interval '1 hour' END
             FROM generate_series(1, $2::int8)
             RETURNING id",
            &[&state, &count, &attempt, &max_attempts, &age],
        )
        .await
        .unwrap())
}

/// Jobs in `state` whose deadline passed `past` seconds ago (None: no deadline), heartbeating
/// just now; waiting jobs have a callback due in an hour.
async fn seed_deadlines(
    client: &Client,
    state: &str,
    count: i64,
    past: Option<f64>,
    attempt: i32,
    max_attempts: i32,
) -> Vec<i64> {
    ids(client
        .query(
            "INSERT INTO jobs (queue, kind, state, priority, original_priority, attempt, max_attempts,
                               run_lease, attempted_at, heartbeat_at, run_timeout, deadline_at,
                               finalized_at, callback_id, callback_timeout_at)
             SELECT 'q', 'k', $1::text::job_state, 2, 2, $3, $4, 1, now() - interval '1 hour', now(),
                    interval '1 minute', now() - $5::float8 * interval '1 second',
                    CASE WHEN $1 IN ('completed', 'failed', 'cancelled') THEN now() END,
                    CASE WHEN $1 = 'waiting_external' THEN gen_random_uuid() END,
                    CASE WHEN $1 = 'waiting_external' THEN now() + interval '1 hour' END
             FROM generate_series(1, $2::int8)
             RETURNING id",
            &[&state, &count, &attempt, &max_attempts, &past],
        )
        .await
        .unwrap())
}

/// Jobs in `state`, each with a callback id; waiting ones with a callback timeout that passed
/// `past` seconds ago. Their last heartbeat was an hour ago.
async fn seed_callbacks(
    client: &Client,
    state: &str,
    count: i64,
    past: f64,
    attempt: i32,
    max_attempts: i32,
) -> Vec<i64> {
    ids(client
        .query(
            "INSERT INTO jobs (queue, kind, state, priority, original_priority, attempt, max_attempts,
                               run_lease, attempted_at, heartbeat_at, finalized_at, callback_id,
                               callback_timeout_at)
             SELECT 'q', 'k', $1::text::job_state, 2, 2, $3, $4, 1, now() - interval '1 hour',
                    now() - interval '1 hour',
                    CASE WHEN $1 IN ('completed', 'failed', 'cancelled') THEN now() END,
                    gen_random_uuid(),
                    CASE WHEN $1 = 'waiting_external' THEN now() - $5::float8 * interval '1 second' END
             FROM generate_series(1, $2::int8)
             RETURNING id",
            &[&state, &count, &attempt, &max_attempts, &past],
        )
        .await
        .unwrap())
}

fn ids(rows: Vec<tokio_postgres::Row>) -> Vec<i64> {
    rows.iter().map(|r| r.get(0)).collect()
}

/// A job as the rescue cases look at it.
#[derive(Debug)]
struct After {
    state: String,
    errors: Vec<serde_json::Value>,
    /// run_at minus the time of the last error entry, in seconds: the backoff applied.
    backoff: Option<f64>,
    finalized: bool,
    run_at_in_future: bool,
    waiting_until: Option<chrono::DateTime<chrono::Utc>>,
    /// The whole row.
    row: serde_json::Value,
}

async fn after(client: &Client, id: i64) -> After {
    let row = client
        .query_one(
            "SELECT state::text, errors,
                    extract(epoch FROM run_at - (errors -> -1 ->> 'at')::timestamptz)::float8,
                    finalized_at IS NOT NULL, run_at > now(), callback_timeout_at, to_jsonb(j)
             FROM jobs j WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    let errors: serde_json::Value = row.get(1);
    After {
        state: row.get(0),
        errors: errors.as_array().cloned().unwrap_or_default(),
        backoff: row.get(2),
        finalized: row.get(3),
        run_at_in_future: row.get(4),
        waiting_until: row.get(5),
        row: row.get(6),
    }
}

/// The rows of `ids`, whole, by id.
async fn rows(client: &Client, ids: &[i64]) -> BTreeMap<i64, serde_json::Value> {
    client
        .query(
            "SELECT id, to_jsonb(j) FROM jobs j WHERE id = ANY($1)",
            &[&ids],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// A row without the columns a rescue changes.
fn untouched_by_a_rescue(row: &serde_json::Value) -> serde_json::Value {
    let mut row = row.clone();
    for column in [
        "state",
        "run_at",
        "finalized_at",
        "errors",
        "callback_timeout_at",
    ] {
        row.as_object_mut().unwrap().remove(column);
    }
    row
}

// ---------------------------------------------------------------------------------------------
// The shared cases, stamped out for each rescue
// ---------------------------------------------------------------------------------------------

mod conformance {
    /// Every shared case, in a module per rescue.
    macro_rules! conformance {
        ($($module:ident: $rescue:expr),+ $(,)?) => {
            $(
                mod $module {
                    cases!($rescue;
                        async:
                            rescues_exactly_the_expired_runs,
                            applies_the_backoff_and_fails_runs_whose_attempts_are_used_up,
                            works_in_batches_and_asks_to_continue_when_work_is_left,
                            a_full_last_batch_asks_to_continue_and_the_next_pass_finds_nothing,
                            sleeps_until_the_next_run_expires_and_rescues_it_then,
                            a_stale_term_commits_nothing,
                            skips_a_run_another_transaction_holds_instead_of_waiting,
                            concurrent_rescuers_never_rescue_a_job_twice,
                            a_stale_worker_cannot_touch_a_rescued_and_reclaimed_job,
                            uses_its_partial_index,
                            a_retry_wakes_a_promoter_sleeping_past_it;
                        sync:
                            an_slo_branch_with_a_quiet_period,
                            config_rejects_unknown_keys_and_bad_values,
                    );
                }
            )+
        };
    }

    conformance!(
        stale_heartbeats: crate::HEARTBEATS,
        expired_deadlines: crate::DEADLINES,
        expired_callbacks: crate::CALLBACKS,
    );
}

/// A pass that finds nothing expired sleeps until the next run expires (when that is within its
/// interval), not until the next sweep, and then rescues it; with nothing expiring within the
/// interval it sleeps the interval.
async fn sleeps_until_the_next_run_expires_and_rescues_it_then(r: &Rescue) {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    r.seed(&client, r.state, 1, Some(-0.5), 1, 5).await;
    r.seed(&client, r.state, 1, Some(-600.0), 1, 5).await;
    let rescue = r.branch("");
    let outcome = run(&*rescue, &mut client).await;
    assert_eq!(outcome.rows, 0);
    let sleep = outcome
        .run_again_in
        .expect("it wakes when the next run expires, within its interval");
    assert!(sleep <= Duration::from_millis(500), "{sleep:?}");
    // Sleeping as the loop would: the run has expired by then.
    tokio::time::sleep(sleep).await;
    let outcome = run(&*rescue, &mut client).await;
    assert_eq!(outcome.rows, 1);
    assert_eq!(
        outcome.run_again_in, None,
        "the next run expires after the interval"
    );
}

/// Runs past their expiry in the rescue's state become retryable with one error entry; runs
/// not yet expired, and expired-looking jobs in every other state, are left exactly as they
/// were; a second pass finds nothing.
async fn rescues_exactly_the_expired_runs(r: &Rescue) {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    let expired = r.seed(&client, r.state, 5, Some(2.0), 1, 5).await;
    let mut spared = Vec::new();
    for (what, past, count) in r.spared {
        let ids = r.seed(&client, r.state, *count, *past, 1, 5).await;
        spared.extend(ids.into_iter().map(|id| (id, *what, r.state)));
    }
    // Past expiry in other states (a run that was snoozed, parked or finished keeps its
    // timestamps until the next claim): not this rescue's.
    for state in STATES.into_iter().filter(|s| *s != r.state) {
        let ids = r.seed(&client, state, 2, Some(600.0), 1, 5).await;
        spared.extend(ids.into_iter().map(|id| (id, "in another state", state)));
    }
    let all: Vec<i64> = expired
        .iter()
        .chain(spared.iter().map(|s| &s.0))
        .copied()
        .collect();
    let before = rows(&client, &all).await;

    let rescue = r.branch("");
    let outcome = run(&*rescue, &mut client).await;
    assert_eq!(outcome.rows, 5);
    // No work left over (the spared runs that expire within the interval set when it wakes).
    assert_ne!(outcome.run_again_in, Some(Duration::ZERO));
    assert_eq!(
        outcome.observations,
        vec![Observation::Rescued {
            reason: r.reason,
            retried: 5,
            failed: 0
        }]
    );
    for id in &expired {
        let job = after(&client, *id).await;
        assert_eq!(job.state, "retryable", "{job:?}");
        assert!(job.run_at_in_future && !job.finalized, "{job:?}");
        assert_eq!(
            job.waiting_until, None,
            "no callback timeout outside waiting_external: {job:?}"
        );
        // The default policy: 1 s for a first attempt, +/- 10 %.
        let backoff = job.backoff.unwrap();
        assert!((0.9..=1.1).contains(&backoff), "{job:?}");
        assert_eq!(job.errors.len(), 1, "{job:?}");
        let entry = &job.errors[0];
        assert_eq!(entry["reason"], r.entry);
        assert_eq!(entry["attempt"], 1);
        let message = entry["error"].as_str().unwrap();
        assert!(
            message.starts_with(r.message.0) && message.contains(r.message.1),
            "{message}"
        );
        // Run lease, heartbeat, deadline, callback id (a late resolve still finds the job):
        // everything but the state change and its entry stays.
        assert_eq!(
            untouched_by_a_rescue(&job.row),
            untouched_by_a_rescue(&before[id]),
        );
    }
    for (id, what, state) in &spared {
        let job = after(&client, *id).await;
        assert_eq!(
            (job.state.as_str(), job.errors.len()),
            (*state, 0),
            "{what}: {job:?}"
        );
        assert_eq!(job.row, before[id], "{what}: the row changed");
    }

    let again = run(&*rescue, &mut client).await;
    assert_eq!(again.rows, 0, "re-running touches nothing");
    assert!(again.observations.is_empty());
}

/// A rescued run's retry wakes the promoter when it is due before the promoter's published
/// wake-up (`wake_promoter`), once per pass; nothing is sent when the retry is due later.
async fn a_retry_wakes_a_promoter_sleeping_past_it(r: &Rescue) {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    let (_listener, mut notifications, channel) = listen_for_promoter_wakeups(&db).await;
    r.seed(&client, r.state, 3, Some(1.0), 1, 5).await;
    client
        .batch_execute("UPDATE leader SET promote_wakeup_at = now() + interval '1 hour'")
        .await
        .unwrap();
    let rescue = r.branch("[retry]\nbase = \"500ms\"\nmax = \"500ms\"\njitter = 0.0");
    assert_eq!(run(&*rescue, &mut client).await.rows, 3);
    let woken = tokio::time::timeout(Duration::from_secs(10), notifications.recv())
        .await
        .expect("a notification within 10 s")
        .expect("the listening connection is open");
    assert_eq!(woken.channel, channel);
    // The promoter wakes before the retries are due: nothing more to send.
    r.seed(&client, r.state, 1, Some(1.0), 1, 5).await;
    client
        .batch_execute("UPDATE leader SET promote_wakeup_at = now() + interval '100 ms'")
        .await
        .unwrap();
    assert_eq!(run(&*rescue, &mut client).await.rows, 1);
    client
        .batch_execute(&format!("NOTIFY {channel}, 'sentinel'"))
        .await
        .unwrap();
    let next = tokio::time::timeout(Duration::from_secs(10), notifications.recv())
        .await
        .expect("the sentinel within 10 s")
        .expect("the listening connection is open");
    assert_eq!(
        next.payload, "sentinel",
        "a NOTIFY for a retry due after the wake-up"
    );
}

/// base * 2^(attempt - 1), capped at max; a run on its last attempt (or beyond it, when
/// max_attempts was lowered since) fails for good and keeps its run_at.
async fn applies_the_backoff_and_fails_runs_whose_attempts_are_used_up(r: &Rescue) {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    let mut retried = Vec::new();
    for (attempt, backoff) in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 3.0)] {
        let id = r.seed(&client, r.state, 1, Some(1.0), attempt, 5).await[0];
        retried.push((id, backoff));
    }
    let mut failed = Vec::new();
    for attempt in [5, 7] {
        failed.push((
            r.seed(&client, r.state, 1, Some(1.0), attempt, 5).await[0],
            attempt,
        ));
    }
    let failed_ids: Vec<i64> = failed.iter().map(|f| f.0).collect();
    let before = rows(&client, &failed_ids).await;

    let rescue = r.branch("[retry]\nbase = \"500ms\"\nmax = \"3s\"\njitter = 0.0");
    let outcome = run(&*rescue, &mut client).await;
    assert_eq!(
        outcome.observations,
        vec![Observation::Rescued {
            reason: r.reason,
            retried: 4,
            failed: 2
        }]
    );
    for (id, expected) in retried {
        let job = after(&client, id).await;
        assert_eq!(job.state, "retryable", "{job:?}");
        assert!((job.backoff.unwrap() - expected).abs() < 1e-3, "{job:?}");
        assert!(!job.finalized && job.waiting_until.is_none(), "{job:?}");
    }
    for (id, attempt) in failed {
        let job = after(&client, id).await;
        assert_eq!(job.state, "failed", "{job:?}");
        assert!(
            job.finalized && !job.run_at_in_future && job.waiting_until.is_none(),
            "{job:?}"
        );
        assert_eq!(job.errors.len(), 1);
        assert_eq!(job.errors[0]["reason"], r.entry);
        assert_eq!(job.errors[0]["attempt"], attempt);
        assert_eq!(
            job.row["run_at"], before[&id]["run_at"],
            "a failed job keeps its run_at"
        );
    }
}

async fn works_in_batches_and_asks_to_continue_when_work_is_left(r: &Rescue) {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    r.seed(&client, r.state, 25, Some(1.0), 1, 5).await;
    let rescue = r.branch("batch_size = 10\nmax_batches_per_run = 2");
    let first = run(&*rescue, &mut client).await;
    assert_eq!((first.rows, first.run_again_in), (20, Some(Duration::ZERO)));
    let second = run(&*rescue, &mut client).await;
    assert_eq!((second.rows, second.run_again_in), (5, None));
    assert_eq!(count_where(&client, "state = 'retryable'").await, 25);
    assert_eq!(
        count_where(&client, &format!("state = '{}'", r.state)).await,
        0
    );
    let third = run(&*rescue, &mut client).await;
    assert_eq!((third.rows, third.run_again_in), (0, None));
}

/// A pass whose last batch was full cannot know whether more is left: it asks to go again.
async fn a_full_last_batch_asks_to_continue_and_the_next_pass_finds_nothing(r: &Rescue) {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    r.seed(&client, r.state, 30, Some(1.0), 1, 5).await;
    let rescue = r.branch("batch_size = 10\nmax_batches_per_run = 3");
    let first = run(&*rescue, &mut client).await;
    assert_eq!((first.rows, first.run_again_in), (30, Some(Duration::ZERO)));
    let second = run(&*rescue, &mut client).await;
    assert_eq!((second.rows, second.run_again_in), (0, None));
    assert_eq!(count_where(&client, "state = 'retryable'").await, 30);
}

async fn a_stale_term_commits_nothing(r: &Rescue) {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    r.seed(&client, r.state, 5, Some(1.0), 1, 5).await;
    let err = run_as(&*r.branch(""), &mut client, EPOCH - 1)
        .await
        .unwrap_err();
    assert_fenced(err);
    assert_eq!(
        count_where(&client, &format!("state = '{}' AND errors = '[]'", r.state)).await,
        5
    );
}

/// A row another transaction holds (a worker finishing it, a resolve, another rescuer) is
/// passed by at once rather than waited for, and taken by a later pass once released.
async fn skips_a_run_another_transaction_holds_instead_of_waiting(r: &Rescue) {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    let seeded = r.seed(&client, r.state, 3, Some(1.0), 1, 5).await;
    let held = seeded[0];
    let before = rows(&client, &[held]).await;
    let mut holder = db.client().await;
    let hold = holder.transaction().await.unwrap();
    hold.execute("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE", &[&held])
        .await
        .unwrap();
    // A branch that waited would wait out its lock timeout and fail the pass.
    let rescue = r.branch("");
    let outcome = tokio::time::timeout(Duration::from_secs(30), run(&*rescue, &mut client))
        .await
        .expect("the pass waited for the held row");
    assert_eq!(outcome.rows, 2);
    assert_eq!(rows(&client, &[held]).await, before, "the held row changed");
    hold.rollback().await.unwrap();
    assert_eq!(run(&*rescue, &mut client).await.rows, 1);
    assert_eq!(after(&client, held).await.state, "retryable");
}

async fn concurrent_rescuers_never_rescue_a_job_twice(r: &Rescue) {
    let db = db_with_leader().await;
    let client = db.client().await;
    r.seed(&client, r.state, 3000, Some(1.0), 1, 5).await;
    let rescue = r.branch("batch_size = 100\nmax_batches_per_run = 5");
    let rows = run_concurrently(&db, &*rescue, 4, 3).await;
    assert_eq!(
        rows.iter().sum::<u64>(),
        3000,
        "each job rescued exactly once: {rows:?}"
    );
    assert!(
        rows.iter().filter(|r| **r > 0).count() > 1,
        "passes overlapped: {rows:?}"
    );
    assert_eq!(
        count_where(
            &client,
            "state = 'retryable' AND callback_timeout_at IS NULL"
        )
        .await,
        3000
    );
    assert_eq!(
        count_where(&client, "jsonb_array_length(errors) <> 1").await,
        0
    );
}

/// Once rescued, the old run's worker (and the caller holding its callback) can change nothing,
/// neither before the job is claimed again nor after; the new run finishes normally.
async fn a_stale_worker_cannot_touch_a_rescued_and_reclaimed_job(r: &Rescue) {
    let lost = |result: Result<(), QueueError>| matches!(result, Err(QueueError::LeaseLost { .. }));
    let db = db_with_leader().await;
    let queue = queue(&db, 4);
    let mut client = db.client().await;
    let job = NewJob::new("k")
        .queue("q")
        .run_timeout(Duration::from_secs(3600));
    let id = queue.enqueue(&job).await.unwrap().id();
    let old = queue.claim("q", 1).await.unwrap().remove(0).lease;
    let old_callback = if r.parks() {
        let callback = queue.wait_for_callback(old, Duration::from_secs(3600));
        Some(callback.await.unwrap())
    } else {
        None
    };
    r.expire(&client, id).await;
    let rescue = r.branch("");
    assert_eq!(run(&*rescue, &mut client).await.rows, 1);
    assert!(lost(queue.heartbeat(old).await));
    if let Some(old_callback) = old_callback {
        let late = queue
            .resolve_callback(old_callback, Resolution::Complete)
            .await;
        assert!(
            matches!(late, Err(QueueError::CallbackNotPending(c)) if c == old_callback),
            "{late:?}"
        );
    }

    // Due again at once, promoted and claimed by another worker: a fresh run, not expired.
    client
        .execute("UPDATE jobs SET run_at = now() WHERE id = $1", &[&id])
        .await
        .unwrap();
    assert_eq!(run(&promoter(), &mut client).await.rows, 1);
    let new = queue.claim("q", 1).await.unwrap().remove(0);
    assert_eq!(new.lease.job_id, id);
    assert_ne!(new.lease.run_lease, old.run_lease);
    assert_eq!(new.attempt, 2);
    assert!(new.deadline_at.unwrap() > chrono::Utc::now());
    assert_eq!(run(&*rescue, &mut client).await.rows, 0);

    assert!(lost(queue.heartbeat(old).await));
    assert!(lost(queue.complete(old).await));
    assert!(lost(queue.fail(old, "late").await.map(|_| ())));
    assert!(lost(
        queue
            .wait_for_callback(old, Duration::from_secs(60))
            .await
            .map(|_| ())
    ));
    match old_callback {
        // The new run parks too; the old callback still cannot resolve it.
        Some(old_callback) => {
            let new_callback = queue
                .wait_for_callback(new.lease, Duration::from_secs(3600))
                .await
                .unwrap();
            assert_ne!(new_callback, old_callback);
            let late = queue
                .resolve_callback(old_callback, Resolution::Fail("late".into()))
                .await;
            assert!(
                matches!(late, Err(QueueError::CallbackNotPending(_))),
                "{late:?}"
            );
            assert_eq!(state_of(&client, id).await, "waiting_external");
            let resolved = queue
                .resolve_callback(new_callback, Resolution::Complete)
                .await
                .unwrap();
            assert_eq!(resolved, id);
        }
        None => queue.complete(new.lease).await.unwrap(),
    }
    let job = queue.get(id).await.unwrap().unwrap();
    assert_eq!(job.state.as_str(), "completed");
    assert_eq!(
        job.error_entries().len(),
        1,
        "only the rescue's entry: {:?}",
        job.errors
    );
    assert_eq!(job.errors[0]["reason"], r.entry);
}

async fn uses_its_partial_index(r: &Rescue) {
    let db = db_with_leader().await;
    let client = db.client().await;
    client
        .batch_execute(&format!(
            "SET enable_seqscan = off; PREPARE rescue AS {}",
            r.statement
        ))
        .await
        .unwrap();
    let (args, index) = r.plan;
    let plan = explain(&client, &format!("EXPLAIN EXECUTE rescue{args}")).await;
    assert!(plan.contains(index), "{plan}");
}

fn an_slo_branch_with_a_quiet_period(r: &Rescue) {
    let rescue = r.branch("");
    assert_eq!(rescue.name(), r.name);
    assert_eq!(rescue.class(), steward_branches::Class::Slo);
    assert_eq!(rescue.interval(), r.interval);
    assert_eq!(rescue.quiet_period(), Some(r.quiet_period));
    let rescue = r.branch("quiet_period = \"2m\"");
    assert_eq!(rescue.quiet_period(), Some(Duration::from_secs(120)));
}

fn config_rejects_unknown_keys_and_bad_values(r: &Rescue) {
    for (settings, key) in UNKNOWN_KEYS.iter().chain(r.unknown) {
        let err = config_problems(r.name, settings).unwrap_err();
        assert!(err.contains(key), "{settings:?}: {err}");
    }
    assert_eq!(config_problems(r.name, ""), Ok(vec![]));
    for (settings, keys) in INVALID.iter().chain(r.invalid) {
        let found = config_problems(r.name, settings).unwrap();
        assert_eq!(found, *keys, "{settings:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Cases of one rescue
// ---------------------------------------------------------------------------------------------

mod stale_heartbeats {
    use super::*;

    #[tokio::test]
    async fn honours_the_configured_staleness() {
        let db = db_with_leader().await;
        let mut client = db.client().await;
        let old = seed_heartbeats(&client, "running", 2, 100.0, 1, 5).await;
        seed_heartbeats(&client, "running", 3, 60.0, 1, 5).await;
        let rescue = HEARTBEATS.branch("staleness = \"90s\"");
        let outcome = run(&*rescue, &mut client).await;
        assert_eq!(outcome.rows, 2);
        for id in old {
            assert_eq!(after(&client, id).await.state, "retryable");
        }
        assert_eq!(count_where(&client, "state = 'running'").await, 3);
    }

    #[tokio::test]
    async fn skips_a_job_whose_heartbeat_is_in_flight() {
        let db = db_with_leader().await;
        let mut client = db.client().await;
        let id = seed_heartbeats(&client, "running", 1, 60.0, 1, 5).await[0];
        // A worker's heartbeat holds the row lock: the rescue passes it by rather than
        // waiting...
        let mut worker = db.client().await;
        let beat = worker.transaction().await.unwrap();
        beat.execute("UPDATE jobs SET heartbeat_at = now() WHERE id = $1", &[&id])
            .await
            .unwrap();
        let rescue = HEARTBEATS.branch("");
        assert_eq!(run(&*rescue, &mut client).await.rows, 0);
        // ...and once it commits, the job is fresh and stays with its worker.
        beat.commit().await.unwrap();
        assert_eq!(run(&*rescue, &mut client).await.rows, 0);
        assert_eq!(after(&client, id).await.state, "running");
    }

    #[test]
    fn the_quiet_period_follows_the_staleness_unless_set() {
        let quiet = |settings| HEARTBEATS.branch(settings).quiet_period();
        assert_eq!(quiet("staleness = \"90s\""), Some(Duration::from_secs(90)));
        assert_eq!(
            quiet("staleness = \"90s\"\nquiet_period = \"2m\""),
            Some(Duration::from_secs(120))
        );
    }
}

/// Both take running jobs.
mod heartbeats_and_deadlines {
    use super::*;

    /// The heartbeat and deadline rescues both take running jobs: one that is both stale and
    /// past its deadline is rescued by exactly one of them, once.
    #[tokio::test]
    async fn heartbeat_and_deadline_rescues_never_both_take_a_job() {
        let db = db_with_leader().await;
        let client = db.client().await;
        seed_deadlines(&client, "running", 2000, Some(1.0), 1, 5).await;
        client
            .execute(
                "UPDATE jobs SET heartbeat_at = now() - interval '1 minute'",
                &[],
            )
            .await
            .unwrap();
        let settings = "batch_size = 50\nmax_batches_per_run = 1";
        let deadlines = DEADLINES.branch(settings);
        let heartbeats = HEARTBEATS.branch(settings);
        let (by_deadline, by_heartbeat) =
            tokio::join!(sweep(&db, &*deadlines), sweep(&db, &*heartbeats));
        assert_eq!(
            by_deadline + by_heartbeat,
            2000,
            "{by_deadline} + {by_heartbeat}"
        );
        assert_eq!(
            count_where(&client, "jsonb_array_length(errors) <> 1").await,
            0
        );
        let deadline_entries =
            count_where(&client, "errors -> 0 ->> 'reason' = 'deadline_expired'").await;
        let heartbeat_entries =
            count_where(&client, "errors -> 0 ->> 'reason' = 'heartbeat_stale'").await;
        assert_eq!(
            (deadline_entries as u64, heartbeat_entries as u64),
            (by_deadline, by_heartbeat)
        );
    }

    /// Runs `branch` on its own connection until a pass finds nothing; returns the rows
    /// rescued.
    async fn sweep(db: &steward_testkit::TestDb, branch: &dyn Branch) -> u64 {
        let mut client = db.client().await;
        let mut total = 0;
        loop {
            match run(branch, &mut client).await.rows {
                0 => return total,
                rows => total += rows,
            }
        }
    }
}

mod expired_callbacks {
    use super::*;
    use std::collections::HashSet;
    use std::sync::Arc;

    /// Callback resolve racing its timeout: every job ends in exactly one outcome, and a
    /// resolve reports success exactly when it took effect.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn callback_resolve_racing_its_timeout_has_exactly_one_winner() {
        const JOBS: usize = 300;
        const RESOLVERS: usize = 4;
        let db = db_with_leader().await;
        let queue = queue(&db, 8);
        let client = db.client().await;
        let jobs: Vec<NewJob> = (0..JOBS).map(|_| NewJob::new("k").queue("cb")).collect();
        queue.enqueue_batch(&jobs).await.unwrap();
        let claimed = queue.claim("cb", JOBS as i64).await.unwrap();
        assert_eq!(claimed.len(), JOBS);
        let mut waiting = Vec::new();
        for job in &claimed {
            let callback = queue
                .wait_for_callback(job.lease, Duration::from_secs(3600))
                .await
                .unwrap();
            waiting.push((job.lease.job_id, callback));
        }
        client
            .execute(
                "UPDATE jobs SET callback_timeout_at = now() - interval '1 second'",
                &[],
            )
            .await
            .unwrap();
        // The rescue takes the oldest first; resolvers start from the newest, so the two meet
        // (and collide on the same rows) somewhere in the middle.
        waiting.sort();
        waiting.reverse();

        let start = Arc::new(tokio::sync::Barrier::new(RESOLVERS + 1));
        let resolvers: Vec<_> = (0..RESOLVERS)
            .map(|i| {
                let (queue, start) = (queue.clone(), start.clone());
                let mine: Vec<_> = waiting.iter().skip(i).step_by(RESOLVERS).copied().collect();
                tokio::spawn(async move {
                    start.wait().await;
                    let (mut won, mut lost) = (Vec::new(), Vec::new());
                    for (id, callback) in mine {
                        match queue.resolve_callback(callback, Resolution::Complete).await {
                            Ok(resolved) => {
                                assert_eq!(resolved, id);
                                won.push(id);
                            }
                            Err(QueueError::CallbackNotPending(c)) if c == callback => {
                                lost.push(id)
                            }
                            Err(e) => panic!("resolving job {id}: {e}"),
                        }
                    }
                    (won, lost)
                })
            })
            .collect();

        let rescue = CALLBACKS.branch("batch_size = 10\nmax_batches_per_run = 1");
        let mut rescue_client = db.client().await;
        let rescued = tokio::time::timeout(Duration::from_secs(60), async {
            start.wait().await;
            let mut rescued = 0;
            // Until no job is left waiting: a pass may find nothing while resolves hold the
            // rows.
            while count_where(&rescue_client, "state = 'waiting_external'").await > 0 {
                rescued += run(&*rescue, &mut rescue_client).await.rows;
            }
            rescued
        })
        .await
        .expect("every job leaves waiting_external");

        let (mut won, mut lost) = (HashSet::new(), HashSet::new());
        for resolver in resolvers {
            let (w, l) = resolver.await.unwrap();
            won.extend(w);
            lost.extend(l);
        }
        let ids = |rows: Vec<tokio_postgres::Row>| {
            rows.iter().map(|r| r.get(0)).collect::<HashSet<i64>>()
        };
        let completed = ids(client
            .query(
                "SELECT id FROM jobs WHERE state = 'completed' AND errors = '[]'",
                &[],
            )
            .await
            .unwrap());
        let timed_out = ids(client
            .query(
                "SELECT id FROM jobs WHERE state IN ('retryable', 'failed') AND callback_timeout_at IS NULL
                   AND jsonb_array_length(errors) = 1 AND errors -> 0 ->> 'reason' = 'callback_timeout'",
                &[],
            )
            .await
            .unwrap());
        assert_eq!(
            completed.len() + timed_out.len(),
            JOBS,
            "every job in exactly one outcome"
        );
        assert_eq!(
            won, completed,
            "a resolve succeeded exactly when its job completed"
        );
        assert_eq!(
            lost, timed_out,
            "a resolve was refused exactly when the timeout won"
        );
        assert_eq!(rescued as usize, timed_out.len());
        assert!(
            !won.is_empty() && !lost.is_empty(),
            "both sides won some: {} resolved, {} timed out",
            won.len(),
            lost.len()
        );
    }
}

thread_local! {
    /// The log lines this thread's code wrote, as JSON.
    static CAPTURED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Writes into this thread's [`CAPTURED`]: a test on a current-thread runtime reads back exactly
/// what its own code logged, whatever other tests log meanwhile.
struct ThreadCapture;

impl std::io::Write for ThreadCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        CAPTURED.with(|c| c.borrow_mut().extend_from_slice(buf));
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Captures this thread's log lines from now on. The subscriber is global (set once for this
/// test binary): a thread-scoped one (`set_default`) races the callsite interest cache with the
/// other tests' threads and can miss events.
fn capture_logs() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_writer(|| ThreadCapture)
            .finish();
        tracing::subscriber::set_global_default(subscriber)
            .expect("no other global subscriber in this test binary");
    });
    tracing::callsite::rebuild_interest_cache();
    CAPTURED.with(|c| c.borrow_mut().clear());
}

/// An operator can follow each rescued job: one log line per job, with its id, kind, queue,
/// the reason, the attempt and what happens next.
#[tokio::test]
async fn every_rescued_job_gets_a_log_line_saying_what_happens_next() {
    capture_logs();
    let r = &HEARTBEATS;
    let db = db_with_leader().await;
    let mut client = db.client().await;
    let retried = r.seed(&client, r.state, 2, Some(1.0), 1, 5).await;
    let failed = r.seed(&client, r.state, 1, Some(1.0), 5, 5).await;
    let outcome = run(&*r.branch(""), &mut client).await;
    assert_eq!(outcome.rows, 3);
    let text = CAPTURED
        .with(|c| String::from_utf8(c.borrow().clone()))
        .unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["fields"]["message"] == "rescued a job")
        .collect();
    assert_eq!(lines.len(), 3, "{text}");
    for line in &lines {
        let fields = &line["fields"];
        let id = fields["job_id"].as_i64().unwrap();
        assert_eq!(fields["reason"], "heartbeat");
        assert_eq!(fields["kind"], "k");
        assert_eq!(fields["queue"], "q");
        if failed.contains(&id) {
            assert_eq!(fields["next"], "failed: no attempt left", "{line}");
            assert_eq!(fields["attempt"], 5);
        } else {
            assert!(retried.contains(&id), "{line}");
            assert_eq!(fields["next"], "retry", "{line}");
            assert!(fields["retry_at"].is_string(), "{line}");
        }
    }
}
