mod common;

use common::*;
use std::time::Duration;
use steward_branches::promote_scheduled::{self, PromoteScheduled};
use steward_branches::rescue_expired_deadlines::{
    Config, RescueExpiredDeadlines, RetryConfig, RESCUE,
};
use steward_branches::rescue_stale_heartbeats::{self, RescueStaleHeartbeats};
use steward_branches::{Branch, BranchError, Class, Observation, RescueReason};
use steward_queue::{NewJob, Queue, QueueError};
use tokio_postgres::Client;

fn branch(config: Config) -> RescueExpiredDeadlines {
    RescueExpiredDeadlines::new(config)
}

/// Inserts `count` jobs in `state` whose deadline passed `seconds_ago` (None: no deadline),
/// heartbeating just now; returns their ids.
async fn seed(
    client: &Client,
    state: &str,
    count: i64,
    seconds_ago: Option<f64>,
    attempt: i32,
    max_attempts: i32,
) -> Vec<i64> {
    client
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
            &[&state, &count, &attempt, &max_attempts, &seconds_ago],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn rescues_exactly_the_running_jobs_past_their_deadline() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    let expired = seed(&client, "running", 5, Some(2.0), 1, 5).await;
    let ahead = seed(&client, "running", 3, Some(-60.0), 1, 5).await;
    let unlimited = seed(&client, "running", 2, None, 1, 5).await;
    // Past deadlines in other states (a run that was snoozed, parked or finished keeps its
    // deadline_at until the next claim): not running.
    let mut others = seed(&client, "retryable", 2, Some(600.0), 1, 5).await;
    others.extend(seed(&client, "waiting_external", 2, Some(600.0), 1, 5).await);
    others.extend(seed(&client, "failed", 2, Some(600.0), 1, 5).await);

    let rescue = branch(Config::default());
    let outcome = run(&rescue, &mut client).await;
    assert_eq!(outcome.rows, 5);
    assert_eq!(outcome.run_again_in, None);
    assert_eq!(
        outcome.observations,
        vec![Observation::Rescued {
            reason: RescueReason::Deadline,
            retried: 5,
            failed: 0
        }]
    );
    for id in &expired {
        let job = after(&client, *id).await;
        assert_eq!(job.state, "retryable", "{job:?}");
        assert!(job.run_at_in_future && !job.finalized, "{job:?}");
        // The default policy: 1 s for a first attempt, +/- 10 %.
        let backoff = job.backoff.unwrap();
        assert!((0.9..=1.1).contains(&backoff), "{job:?}");
        assert_eq!(job.errors.len(), 1, "{job:?}");
        let entry = &job.errors[0];
        assert_eq!(entry["reason"], "deadline_expired");
        assert_eq!(entry["attempt"], 1);
        let message = entry["error"].as_str().unwrap();
        assert!(
            message.starts_with("the run did not finish by its deadline"),
            "{message}"
        );
    }
    for id in ahead.iter().chain(&unlimited) {
        let job = after(&client, *id).await;
        assert_eq!(
            (job.state.as_str(), job.errors.len()),
            ("running", 0),
            "{job:?}"
        );
    }
    let other_states = [
        "retryable",
        "retryable",
        "waiting_external",
        "waiting_external",
        "failed",
        "failed",
    ];
    for (id, state) in others.iter().zip(other_states) {
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
    let first = seed(&client, "running", 1, Some(1.0), 1, 3).await[0];
    let second = seed(&client, "running", 1, Some(1.0), 2, 3).await[0];
    let last = seed(&client, "running", 1, Some(1.0), 3, 3).await[0];
    let rescue = branch(Config {
        retry: RetryConfig {
            base: Duration::from_millis(500),
            max: Duration::from_secs(60),
            jitter: 0.0,
        },
        ..Config::default()
    });
    let outcome = run(&rescue, &mut client).await;
    assert_eq!(
        outcome.observations,
        vec![Observation::Rescued {
            reason: RescueReason::Deadline,
            retried: 2,
            failed: 1
        }]
    );
    for (id, expected) in [(first, 0.5), (second, 1.0)] {
        let job = after(&client, id).await;
        assert_eq!(job.state, "retryable", "{job:?}");
        assert!((job.backoff.unwrap() - expected).abs() < 1e-3, "{job:?}");
    }
    let job = after(&client, last).await;
    assert_eq!(job.state, "failed", "{job:?}");
    assert!(job.finalized && !job.run_at_in_future, "{job:?}");
    assert_eq!(job.errors.len(), 1);
    assert_eq!(job.errors[0]["reason"], "deadline_expired");
    assert_eq!(job.errors[0]["attempt"], 3);
}

#[tokio::test]
async fn works_in_batches_and_asks_to_continue_when_work_is_left() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    seed(&client, "running", 30, Some(1.0), 1, 5).await;
    let rescue = branch(Config {
        batch_size: 10,
        max_batches_per_run: 3,
        ..Config::default()
    });
    let first = run(&rescue, &mut client).await;
    assert_eq!(first.rows, 30);
    // The last batch was full: there may be more.
    assert_eq!(first.run_again_in, Some(Duration::ZERO));
    let second = run(&rescue, &mut client).await;
    assert_eq!(second.rows, 0);
    assert_eq!(second.run_again_in, None);
    assert_eq!(count_where(&client, "state = 'retryable'").await, 30);
}

#[tokio::test]
async fn a_stale_term_commits_nothing() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    seed(&client, "running", 5, Some(1.0), 1, 5).await;
    let err = run_as(&branch(Config::default()), &mut client, EPOCH - 1)
        .await
        .unwrap_err();
    assert!(
        matches!(err, BranchError::Fenced { epoch, current } if epoch == EPOCH - 1 && current == EPOCH)
    );
    assert_eq!(
        count_where(&client, "state = 'running' AND errors = '[]'").await,
        5
    );
}

#[tokio::test]
async fn concurrent_rescuers_never_rescue_a_job_twice() {
    let db = db_with_leader().await;
    let client = db.client().await;
    seed(&client, "running", 3000, Some(1.0), 1, 5).await;
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
    assert_eq!(count_where(&client, "state = 'retryable'").await, 3000);
    assert_eq!(
        count_where(&client, "jsonb_array_length(errors) <> 1").await,
        0
    );
}

#[tokio::test]
async fn heartbeat_and_deadline_rescues_never_both_take_a_job() {
    let db = db_with_leader().await;
    let client = db.client().await;
    seed(&client, "running", 2000, Some(1.0), 1, 5).await;
    client
        .execute(
            "UPDATE jobs SET heartbeat_at = now() - interval '1 minute'",
            &[],
        )
        .await
        .unwrap();
    let deadlines = branch(Config {
        batch_size: 50,
        max_batches_per_run: 1,
        ..Config::default()
    });
    let heartbeats = RescueStaleHeartbeats::new(rescue_stale_heartbeats::Config {
        batch_size: 50,
        max_batches_per_run: 1,
        ..rescue_stale_heartbeats::Config::default()
    });
    let (by_deadline, by_heartbeat) = tokio::join!(sweep(&db, &deadlines), sweep(&db, &heartbeats));
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

/// Runs `branch` on its own connection until a pass finds nothing; returns the rows rescued.
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

#[tokio::test]
async fn a_stale_worker_cannot_touch_a_rescued_and_reclaimed_job() {
    let db = db_with_leader().await;
    let queue = Queue::new(db.pool(4), db.schema());
    let mut client = db.client().await;
    let job = NewJob::new("k")
        .queue("q")
        .run_timeout(Duration::from_secs(3600));
    let id = queue.enqueue(&job).await.unwrap().id();
    let old = queue.claim("q", 1).await.unwrap().remove(0).lease;
    // The run overstays its time limit.
    client
        .execute(
            "UPDATE jobs SET deadline_at = now() - interval '1 second' WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(run(&branch(Config::default()), &mut client).await.rows, 1);
    assert!(matches!(
        queue.heartbeat(old).await,
        Err(QueueError::LeaseLost { .. })
    ));

    // Due again at once, promoted and claimed by another worker, with a fresh deadline.
    client
        .execute("UPDATE jobs SET run_at = now() WHERE id = $1", &[&id])
        .await
        .unwrap();
    let promote = PromoteScheduled::new(promote_scheduled::Config::default());
    assert_eq!(run(&promote, &mut client).await.rows, 1);
    let new = queue.claim("q", 1).await.unwrap().remove(0);
    assert_eq!(new.lease.job_id, id);
    assert_ne!(new.lease.run_lease, old.run_lease);
    assert!(new.deadline_at.unwrap() > chrono::Utc::now());
    assert_eq!(run(&branch(Config::default()), &mut client).await.rows, 0);

    assert!(matches!(
        queue.heartbeat(old).await,
        Err(QueueError::LeaseLost { .. })
    ));
    assert!(matches!(
        queue.complete(old).await,
        Err(QueueError::LeaseLost { .. })
    ));
    assert!(matches!(
        queue.fail(old, "late").await,
        Err(QueueError::LeaseLost { .. })
    ));
    queue.complete(new.lease).await.unwrap();
    let job = queue.get(id).await.unwrap().unwrap();
    assert_eq!(job.state.as_str(), "completed");
    assert_eq!(
        job.error_entries().len(),
        1,
        "only the rescue's entry: {:?}",
        job.errors
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
    assert!(plan.contains("jobs_running_deadline_idx"), "{plan}");
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
    let config: Config = toml::from_str("quiet_period = \"1m\"").unwrap();
    assert_eq!(branch(config).quiet_period(), Some(Duration::from_secs(60)));
}

#[test]
fn config_rejects_unknown_keys_and_bad_values() {
    let err = toml::from_str::<Config>("staleness = \"1s\"").unwrap_err();
    assert!(err.to_string().contains("staleness"), "{err}");
    assert_eq!(Config::default().validate(), vec![]);
    let config: Config =
        toml::from_str("interval = \"0s\"\nquiet_period = \"2d\"\n[retry]\nbase = \"0s\"").unwrap();
    let keys: Vec<String> = config.validate().into_iter().map(|p| p.key).collect();
    assert_eq!(keys, ["interval", "quiet_period", "retry.base"]);
}
