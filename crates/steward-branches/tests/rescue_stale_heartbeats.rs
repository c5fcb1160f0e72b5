mod common;

use common::*;
use std::time::Duration;
use steward_branches::promote_scheduled::{self, PromoteScheduled};
use steward_branches::rescue_stale_heartbeats::{
    Config, RescueStaleHeartbeats, RetryConfig, RESCUE,
};
use steward_branches::{Branch, BranchError, Class, Observation, RescueReason};
use steward_queue::{NewJob, Queue, QueueError};
use tokio_postgres::Client;

fn branch(config: Config) -> RescueStaleHeartbeats {
    RescueStaleHeartbeats::new(config)
}

/// Inserts `count` jobs in `state` whose last heartbeat was `seconds_ago`; returns their ids.
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
                    now() - $5::float8 * interval '1 second',
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
async fn rescues_exactly_the_running_jobs_with_stale_heartbeats() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    let stale = seed(&client, "running", 5, 60.0, 1, 5).await;
    let fresh = seed(&client, "running", 3, 5.0, 1, 5).await;
    let almost = seed(&client, "running", 2, 25.0, 1, 5).await;
    // Old heartbeats in other states (snoozed, parked, finished runs keep theirs): not running.
    let mut others = seed(&client, "scheduled", 2, 600.0, 1, 5).await;
    others.extend(seed(&client, "waiting_external", 2, 600.0, 1, 5).await);
    others.extend(seed(&client, "completed", 2, 600.0, 1, 5).await);

    let rescue = branch(Config::default());
    let outcome = run(&rescue, &mut client).await;
    assert_eq!(outcome.rows, 5);
    assert_eq!(outcome.run_again_in, None);
    assert_eq!(
        outcome.observations,
        vec![Observation::Rescued {
            reason: RescueReason::Heartbeat,
            retried: 5,
            failed: 0
        }]
    );
    for id in &stale {
        let job = after(&client, *id).await;
        assert_eq!(job.state, "retryable", "{job:?}");
        assert!(job.run_at_in_future && !job.finalized, "{job:?}");
        // The default policy: 1 s for a first attempt, +/- 10 %.
        let backoff = job.backoff.unwrap();
        assert!((0.9..=1.1).contains(&backoff), "{job:?}");
        assert_eq!(job.errors.len(), 1, "{job:?}");
        let entry = &job.errors[0];
        assert_eq!(entry["reason"], "heartbeat_stale");
        assert_eq!(entry["attempt"], 1);
        let message = entry["error"].as_str().unwrap();
        assert!(message.starts_with("no heartbeat since "), "{message}");
    }
    for id in fresh.iter().chain(&almost) {
        let job = after(&client, *id).await;
        assert_eq!(
            (job.state.as_str(), job.errors.len()),
            ("running", 0),
            "{job:?}"
        );
    }
    for (id, state) in others.iter().zip([
        "scheduled",
        "scheduled",
        "waiting_external",
        "waiting_external",
        "completed",
        "completed",
    ]) {
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
    let first = seed(&client, "running", 1, 60.0, 1, 5).await[0];
    let third = seed(&client, "running", 1, 60.0, 3, 5).await[0];
    let capped = seed(&client, "running", 1, 60.0, 4, 5).await[0];
    let last = seed(&client, "running", 1, 60.0, 5, 5).await[0];
    let beyond = seed(&client, "running", 1, 60.0, 7, 5).await[0]; // max_attempts lowered since
    let run_at_before: Vec<chrono::DateTime<chrono::Utc>> = client
        .query(
            "SELECT run_at FROM jobs WHERE id = ANY($1) ORDER BY id",
            &[&vec![last, beyond]],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();

    let rescue = branch(Config {
        retry: RetryConfig {
            base: Duration::from_secs(2),
            max: Duration::from_secs(10),
            jitter: 0.0,
        },
        ..Config::default()
    });
    let outcome = run(&rescue, &mut client).await;
    assert_eq!(
        outcome.observations,
        vec![Observation::Rescued {
            reason: RescueReason::Heartbeat,
            retried: 3,
            failed: 2
        }]
    );
    // base * 2^(attempt-1), capped at max.
    for (id, expected) in [(first, 2.0), (third, 8.0), (capped, 10.0)] {
        let job = after(&client, id).await;
        assert_eq!(job.state, "retryable", "{job:?}");
        assert!((job.backoff.unwrap() - expected).abs() < 1e-3, "{job:?}");
        assert!(!job.finalized);
    }
    for (id, attempt) in [(last, 5), (beyond, 7)] {
        let job = after(&client, id).await;
        assert_eq!(job.state, "failed", "{job:?}");
        assert!(job.finalized, "{job:?}");
        assert_eq!(job.errors.len(), 1);
        assert_eq!(job.errors[0]["reason"], "heartbeat_stale");
        assert_eq!(job.errors[0]["attempt"], attempt);
    }
    let run_at_after: Vec<chrono::DateTime<chrono::Utc>> = client
        .query(
            "SELECT run_at FROM jobs WHERE id = ANY($1) ORDER BY id",
            &[&vec![last, beyond]],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(run_at_before, run_at_after, "a failed job keeps its run_at");
}

#[tokio::test]
async fn honours_the_configured_staleness() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    let old = seed(&client, "running", 2, 100.0, 1, 5).await;
    seed(&client, "running", 3, 60.0, 1, 5).await;
    let rescue = branch(Config {
        staleness: Duration::from_secs(90),
        ..Config::default()
    });
    let outcome = run(&rescue, &mut client).await;
    assert_eq!(outcome.rows, 2);
    for id in old {
        assert_eq!(after(&client, id).await.state, "retryable");
    }
    assert_eq!(count_where(&client, "state = 'running'").await, 3);
}

#[tokio::test]
async fn works_in_batches_and_asks_to_continue_when_work_is_left() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    seed(&client, "running", 25, 60.0, 1, 5).await;
    let rescue = branch(Config {
        batch_size: 10,
        max_batches_per_run: 2,
        ..Config::default()
    });
    let first = run(&rescue, &mut client).await;
    assert_eq!(first.rows, 20);
    assert_eq!(first.run_again_in, Some(Duration::ZERO));
    let second = run(&rescue, &mut client).await;
    assert_eq!(second.rows, 5);
    assert_eq!(second.run_again_in, None);
    assert_eq!(count_where(&client, "state = 'retryable'").await, 25);
    assert_eq!(run(&rescue, &mut client).await.rows, 0);
}

#[tokio::test]
async fn a_stale_term_commits_nothing() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    seed(&client, "running", 5, 60.0, 1, 5).await;
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
async fn skips_a_job_whose_heartbeat_is_in_flight() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    let id = seed(&client, "running", 1, 60.0, 1, 5).await[0];
    // A worker's heartbeat holds the row lock: the rescue passes it by rather than waiting...
    let mut worker = db.client().await;
    let beat = worker.transaction().await.unwrap();
    beat.execute("UPDATE jobs SET heartbeat_at = now() WHERE id = $1", &[&id])
        .await
        .unwrap();
    let rescue = branch(Config::default());
    assert_eq!(run(&rescue, &mut client).await.rows, 0);
    // ...and once it commits, the job is fresh and stays with its worker.
    beat.commit().await.unwrap();
    assert_eq!(run(&rescue, &mut client).await.rows, 0);
    assert_eq!(after(&client, id).await.state, "running");
}

#[tokio::test]
async fn concurrent_rescuers_never_rescue_a_job_twice() {
    let db = db_with_leader().await;
    let client = db.client().await;
    seed(&client, "running", 3000, 60.0, 1, 5).await;
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
async fn a_stale_worker_cannot_touch_a_rescued_and_reclaimed_job() {
    let db = db_with_leader().await;
    let queue = Queue::new(db.pool(4), db.schema());
    let mut client = db.client().await;
    let id = queue
        .enqueue(&NewJob::new("k").queue("q"))
        .await
        .unwrap()
        .id();
    let old = queue.claim("q", 1).await.unwrap().remove(0).lease;
    // The worker goes silent.
    client
        .execute(
            "UPDATE jobs SET heartbeat_at = now() - interval '1 minute' WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(run(&branch(Config::default()), &mut client).await.rows, 1);
    assert!(matches!(
        queue.heartbeat(old).await,
        Err(QueueError::LeaseLost { .. })
    ));

    // Due again at once, promoted and claimed by another worker.
    client
        .execute("UPDATE jobs SET run_at = now() WHERE id = $1", &[&id])
        .await
        .unwrap();
    let promote = PromoteScheduled::new(promote_scheduled::Config::default());
    assert_eq!(run(&promote, &mut client).await.rows, 1);
    let new = queue.claim("q", 1).await.unwrap().remove(0);
    assert_eq!(new.lease.job_id, id);
    assert_ne!(new.lease.run_lease, old.run_lease);
    assert_eq!(new.attempt, 2);

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
    let plan = explain(
        &client,
        "EXPLAIN EXECUTE rescue(1000, 1000, 3600000, 0.1, 30)",
    )
    .await;
    assert!(plan.contains("jobs_running_heartbeat_idx"), "{plan}");
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
fn an_slo_branch_whose_quiet_period_follows_the_staleness() {
    let rescue = branch(Config::default());
    assert_eq!(rescue.class(), Class::Slo);
    assert_eq!(rescue.interval(), Duration::from_secs(5));
    assert_eq!(rescue.quiet_period(), Some(Duration::from_secs(30)));
    let config: Config = toml::from_str("staleness = \"90s\"").unwrap();
    assert_eq!(branch(config).quiet_period(), Some(Duration::from_secs(90)));
    let config: Config = toml::from_str("staleness = \"90s\"\nquiet_period = \"2m\"").unwrap();
    assert_eq!(
        branch(config).quiet_period(),
        Some(Duration::from_secs(120))
    );
}

#[test]
fn config_rejects_unknown_keys_and_bad_values() {
    let err = toml::from_str::<Config>("stalenes = \"1s\"").unwrap_err();
    assert!(err.to_string().contains("stalenes"), "{err}");
    let err = toml::from_str::<Config>("[retry]\nbsae = \"1s\"").unwrap_err();
    assert!(err.to_string().contains("bsae"), "{err}");
    assert_eq!(Config::default().validate(), vec![]);
    let config: Config = toml::from_str(
        "staleness = \"0s\"\nbatch_size = 0\nmax_batches_per_run = 0\n[retry]\nbase = \"10s\"\nmax = \"1s\"\njitter = 2.0",
    )
    .unwrap();
    let keys: Vec<String> = config.validate().into_iter().map(|p| p.key).collect();
    assert_eq!(
        keys,
        [
            "batch_size",
            "staleness",
            "max_batches_per_run",
            "retry.max",
            "retry.jitter"
        ]
    );
}
