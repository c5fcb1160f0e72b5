mod common;

use common::*;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use steward_branches::promote_scheduled::{self, PromoteScheduled};
use steward_branches::rescue_expired_callbacks::{
    Config, RescueExpiredCallbacks, RetryConfig, RESCUE,
};
use steward_branches::{Branch, BranchError, Class, Observation, RescueReason};
use steward_queue::{NewJob, Queue, QueueError, Resolution};
use tokio_postgres::Client;

fn branch(config: Config) -> RescueExpiredCallbacks {
    RescueExpiredCallbacks::new(config)
}

/// Inserts `count` jobs in `state`, waiting jobs with a callback that timed out `seconds_ago`;
/// returns their ids.
async fn seed(
    client: &Client,
    state: &str,
    count: i64,
    seconds_ago: f64,
    attempt: i32,
    max_attempts: i32,
) -> Vec<i64> {
    client
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
            &[&state, &count, &attempt, &max_attempts, &seconds_ago],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[derive(Debug)]
struct After {
    state: String,
    errors: Vec<serde_json::Value>,
    /// run_at minus the time of the last error entry, in seconds: the backoff applied.
    backoff: Option<f64>,
    finalized: bool,
    run_at_in_future: bool,
    waiting_until: Option<chrono::DateTime<chrono::Utc>>,
    has_callback_id: bool,
}

async fn after(client: &Client, id: i64) -> After {
    let row = client
        .query_one(
            "SELECT state::text, errors,
                    extract(epoch FROM run_at - (errors -> -1 ->> 'at')::timestamptz)::float8,
                    finalized_at IS NOT NULL, run_at > now(), callback_timeout_at,
                    callback_id IS NOT NULL
             FROM jobs WHERE id = $1",
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
        has_callback_id: row.get(6),
    }
}

#[tokio::test]
async fn rescues_exactly_the_waiting_jobs_whose_callback_timed_out() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    let expired = seed(&client, "waiting_external", 5, 2.0, 1, 5).await;
    let pending = seed(&client, "waiting_external", 3, -60.0, 1, 5).await;
    // Other states keep their callback_id (and have no timeout, by constraint).
    let mut others = seed(&client, "running", 2, 0.0, 1, 5).await;
    others.extend(seed(&client, "completed", 2, 0.0, 1, 5).await);

    let rescue = branch(Config::default());
    let outcome = run(&rescue, &mut client).await;
    assert_eq!(outcome.rows, 5);
    assert_eq!(outcome.run_again_in, None);
    assert_eq!(
        outcome.observations,
        vec![Observation::Rescued {
            reason: RescueReason::Callback,
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
            "the timeout is cleared with the state: {job:?}"
        );
        assert!(
            job.has_callback_id,
            "a late resolve still finds the job: {job:?}"
        );
        // The default policy: 1 s for a first attempt, +/- 10 %.
        let backoff = job.backoff.unwrap();
        assert!((0.9..=1.1).contains(&backoff), "{job:?}");
        assert_eq!(job.errors.len(), 1, "{job:?}");
        let entry = &job.errors[0];
        assert_eq!(entry["reason"], "callback_timeout");
        assert_eq!(entry["attempt"], 1);
        let message = entry["error"].as_str().unwrap();
        assert!(
            message.starts_with("callback ") && message.contains("was not resolved by its timeout"),
            "{message}"
        );
    }
    for id in &pending {
        let job = after(&client, *id).await;
        assert_eq!(
            (job.state.as_str(), job.errors.len()),
            ("waiting_external", 0),
            "{job:?}"
        );
        assert!(job.waiting_until.is_some());
    }
    for (id, state) in others
        .iter()
        .zip(["running", "running", "completed", "completed"])
    {
        let job = after(&client, *id).await;
        assert_eq!(
            (job.state.as_str(), job.errors.len()),
            (state, 0),
            "{job:?}"
        );
    }

    let again = run(&rescue, &mut client).await;
    assert_eq!(again.rows, 0, "re-running touches nothing");
    assert!(again.observations.is_empty());
}

#[tokio::test]
async fn applies_the_backoff_and_fails_jobs_whose_attempts_are_used_up() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    let retried = seed(&client, "waiting_external", 1, 1.0, 2, 2).await[0];
    client
        .execute(
            "UPDATE jobs SET max_attempts = 3 WHERE id = $1",
            &[&retried],
        )
        .await
        .unwrap();
    let last = seed(&client, "waiting_external", 1, 1.0, 2, 2).await[0];
    let rescue = branch(Config {
        retry: RetryConfig {
            base: Duration::from_secs(3),
            max: Duration::from_secs(3600),
            jitter: 0.0,
        },
        ..Config::default()
    });
    let outcome = run(&rescue, &mut client).await;
    assert_eq!(
        outcome.observations,
        vec![Observation::Rescued {
            reason: RescueReason::Callback,
            retried: 1,
            failed: 1
        }]
    );
    let job = after(&client, retried).await;
    assert_eq!(job.state, "retryable", "{job:?}");
    assert!(
        (job.backoff.unwrap() - 6.0).abs() < 1e-3,
        "3 s doubled for a second attempt: {job:?}"
    );
    let job = after(&client, last).await;
    assert_eq!(job.state, "failed", "{job:?}");
    assert!(job.finalized && job.waiting_until.is_none(), "{job:?}");
    assert_eq!(job.errors.len(), 1);
    assert_eq!(job.errors[0]["reason"], "callback_timeout");
    assert_eq!(job.errors[0]["attempt"], 2);
}

#[tokio::test]
async fn works_in_batches_and_asks_to_continue_when_work_is_left() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    seed(&client, "waiting_external", 12, 1.0, 1, 5).await;
    let rescue = branch(Config {
        batch_size: 5,
        max_batches_per_run: 2,
        ..Config::default()
    });
    let first = run(&rescue, &mut client).await;
    assert_eq!((first.rows, first.run_again_in), (10, Some(Duration::ZERO)));
    let second = run(&rescue, &mut client).await;
    assert_eq!((second.rows, second.run_again_in), (2, None));
    assert_eq!(count_where(&client, "state = 'waiting_external'").await, 0);
}

#[tokio::test]
async fn a_stale_term_commits_nothing() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    seed(&client, "waiting_external", 5, 1.0, 1, 5).await;
    let err = run_as(&branch(Config::default()), &mut client, EPOCH - 1)
        .await
        .unwrap_err();
    assert!(
        matches!(err, BranchError::Fenced { epoch, current } if epoch == EPOCH - 1 && current == EPOCH)
    );
    assert_eq!(
        count_where(&client, "state = 'waiting_external' AND errors = '[]'").await,
        5
    );
}

#[tokio::test]
async fn concurrent_rescuers_never_rescue_a_job_twice() {
    let db = db_with_leader().await;
    let client = db.client().await;
    seed(&client, "waiting_external", 3000, 1.0, 1, 5).await;
    let rescue = branch(Config {
        batch_size: 100,
        max_batches_per_run: 5,
        ..Config::default()
    });
    let rows = run_concurrently(&db, &rescue, 4, 3).await;
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

#[tokio::test]
async fn a_late_callback_and_a_stale_worker_cannot_touch_the_rescued_and_reclaimed_job() {
    let db = db_with_leader().await;
    let queue = Queue::new(db.pool(4), db.schema());
    let mut client = db.client().await;
    let id = queue
        .enqueue(&NewJob::new("k").queue("q"))
        .await
        .unwrap()
        .id();
    let old = queue.claim("q", 1).await.unwrap().remove(0).lease;
    let old_callback = queue
        .wait_for_callback(old, Duration::from_secs(3600))
        .await
        .unwrap();
    client
        .execute(
            "UPDATE jobs SET callback_timeout_at = now() - interval '1 second' WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(run(&branch(Config::default()), &mut client).await.rows, 1);
    let late = queue
        .resolve_callback(old_callback, Resolution::Complete)
        .await;
    assert!(
        matches!(late, Err(QueueError::CallbackNotPending(c)) if c == old_callback),
        "{late:?}"
    );

    // Due again at once, promoted and claimed by another worker, which parks it again.
    client
        .execute("UPDATE jobs SET run_at = now() WHERE id = $1", &[&id])
        .await
        .unwrap();
    let promote = PromoteScheduled::new(promote_scheduled::Config::default());
    assert_eq!(run(&promote, &mut client).await.rows, 1);
    let new = queue.claim("q", 1).await.unwrap().remove(0);
    assert_eq!(new.lease.job_id, id);
    assert_ne!(new.lease.run_lease, old.run_lease);
    assert!(matches!(
        queue.complete(old).await,
        Err(QueueError::LeaseLost { .. })
    ));
    assert!(matches!(
        queue.wait_for_callback(old, Duration::from_secs(60)).await,
        Err(QueueError::LeaseLost { .. })
    ));
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
    assert_eq!(
        queue
            .resolve_callback(new_callback, Resolution::Complete)
            .await
            .unwrap(),
        id
    );
    let job = queue.get(id).await.unwrap().unwrap();
    assert_eq!(job.state.as_str(), "completed");
    assert_eq!(
        job.error_entries().len(),
        1,
        "only the rescue's entry: {:?}",
        job.errors
    );
}

/// Callback resolve racing its timeout: every job ends in exactly one outcome, and a resolve
/// reports success exactly when it took effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn callback_resolve_racing_its_timeout_has_exactly_one_winner() {
    const JOBS: usize = 300;
    const RESOLVERS: usize = 4;
    let db = db_with_leader().await;
    let queue = Queue::new(db.pool(8), db.schema());
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
    // The rescue takes the oldest first; resolvers start from the newest, so the two meet (and
    // collide on the same rows) somewhere in the middle.
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
                        Err(QueueError::CallbackNotPending(c)) if c == callback => lost.push(id),
                        Err(e) => panic!("resolving job {id}: {e}"),
                    }
                }
                (won, lost)
            })
        })
        .collect();

    let rescue = branch(Config {
        batch_size: 10,
        max_batches_per_run: 1,
        ..Config::default()
    });
    let mut rescue_client = db.client().await;
    let rescued = tokio::time::timeout(Duration::from_secs(60), async {
        start.wait().await;
        let mut rescued = 0;
        // Until no job is left waiting: a pass may find nothing while resolves hold the rows.
        while count_where(&rescue_client, "state = 'waiting_external'").await > 0 {
            rescued += run(&rescue, &mut rescue_client).await.rows;
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
    let ids =
        |rows: Vec<tokio_postgres::Row>| rows.iter().map(|r| r.get(0)).collect::<HashSet<i64>>();
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

#[tokio::test]
async fn uses_its_partial_index() {
    let db = db_with_leader().await;
    let client = db.client().await;
    client
        .batch_execute(&format!(
            "SET enable_seqscan = off; PREPARE rescue AS {RESCUE}"
        ))
        .await
        .unwrap();
    let plan = explain(&client, "EXPLAIN EXECUTE rescue(1000, 1000, 3600000, 0.1)").await;
    assert!(plan.contains("jobs_callback_timeout_idx"), "{plan}");
}

async fn explain(client: &Client, query: &str) -> String {
    client
        .simple_query(query)
        .await
        .unwrap()
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn an_slo_branch_with_a_quiet_period() {
    let rescue = branch(Config::default());
    assert_eq!(rescue.class(), Class::Slo);
    assert_eq!(rescue.interval(), Duration::from_secs(1));
    assert_eq!(rescue.quiet_period(), Some(Duration::from_secs(30)));
}

#[test]
fn config_rejects_unknown_keys_and_bad_values() {
    let err = toml::from_str::<Config>("timeout = \"1s\"").unwrap_err();
    assert!(err.to_string().contains("timeout"), "{err}");
    assert_eq!(Config::default().validate(), vec![]);
    let config: Config =
        toml::from_str("batch_size = 200000\nmax_batches_per_run = 0\n[retry]\njitter = -0.5")
            .unwrap();
    let keys: Vec<String> = config.validate().into_iter().map(|p| p.key).collect();
    assert_eq!(keys, ["batch_size", "max_batches_per_run", "retry.jitter"]);
}
