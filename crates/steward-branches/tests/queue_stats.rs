mod common;

use common::*;
use std::time::Duration;
use steward_branches::queue_stats::{Config, QueueStats};
use steward_branches::{BranchError, Observation, Outcome};
use steward_queue::{JobState, NewJob, Queue};
use tokio_postgres::Client;

/// `count` jobs of `queue` in `state`, due `age` seconds ago.
async fn jobs(client: &Client, queue: &str, state: &str, count: i64, age: f64) {
    client
        .execute(
            "INSERT INTO jobs (queue, kind, state, priority, original_priority, max_attempts, run_at,
                               callback_timeout_at, finalized_at)
             SELECT $1, 'k', $2::text::job_state, 2, 2, 5, now() - $4::float8 * interval '1 second',
                    CASE WHEN $2 = 'waiting_external' THEN now() + interval '1 hour' END,
                    CASE WHEN $2 IN ('completed', 'failed', 'cancelled') THEN now() END
             FROM generate_series(1, $3::int8)",
            &[&queue, &state, &count, &age],
        )
        .await
        .unwrap();
}

/// The stored snapshot, as (queue, state, depth).
async fn snapshot(client: &Client) -> Vec<(String, String, i64)> {
    client
        .query(
            "SELECT queue, state::text, depth FROM queue_stats ORDER BY 1, 2",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// What the snapshot should hold: unfinished jobs per queue and state.
async fn expected(client: &Client) -> Vec<(String, String, i64)> {
    client
        .query(
            "SELECT queue, state::text, count(*) FROM jobs
             WHERE state NOT IN ('completed', 'failed', 'cancelled') GROUP BY 1, 2 ORDER BY 1, 2",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

fn depths(outcome: &Outcome) -> Vec<(String, JobState, i64)> {
    let mut depths: Vec<(String, JobState, i64)> = outcome
        .observations
        .iter()
        .filter_map(|o| match o {
            Observation::QueueDepth {
                queue,
                state,
                depth,
            } => Some((queue.clone(), *state, *depth)),
            _ => None,
        })
        .collect();
    depths.sort_by(|a, b| (&a.0, a.1.as_str()).cmp(&(&b.0, b.1.as_str())));
    depths
}

fn ages(outcome: &Outcome) -> Vec<(String, f64)> {
    let mut ages: Vec<(String, f64)> = outcome
        .observations
        .iter()
        .filter_map(|o| match o {
            Observation::OldestAvailableAge { queue, seconds } => Some((queue.clone(), *seconds)),
            _ => None,
        })
        .collect();
    ages.sort_by(|a, b| a.0.cmp(&b.0));
    ages
}

fn row(queue: &str, state: &str, depth: i64) -> (String, String, i64) {
    (queue.to_owned(), state.to_owned(), depth)
}

#[tokio::test]
async fn writes_a_depth_snapshot_of_unfinished_jobs_and_reports_it() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    jobs(&client, "a", "available", 3, 60.0).await;
    jobs(&client, "a", "available", 2, 10.0).await;
    jobs(&client, "a", "scheduled", 2, -60.0).await;
    jobs(&client, "a", "running", 1, 5.0).await;
    jobs(&client, "a", "waiting_external", 1, 5.0).await;
    jobs(&client, "b", "retryable", 4, -5.0).await;
    jobs(&client, "b", "completed", 5, 5.0).await;
    jobs(&client, "b", "failed", 1, 5.0).await;

    let stats = QueueStats::new(Config::default());
    let outcome = run(&stats, &mut client).await;
    let want = vec![
        row("a", "available", 5),
        row("a", "running", 1),
        row("a", "scheduled", 2),
        row("a", "waiting_external", 1),
        row("b", "retryable", 4),
    ];
    assert_eq!(
        snapshot(&client).await,
        want,
        "finished jobs are not counted"
    );
    assert_eq!(outcome.rows, 5);
    assert_eq!(
        depths(&outcome),
        want.iter()
            .map(|(q, s, d)| (q.clone(), s.parse().unwrap(), *d))
            .collect::<Vec<_>>()
    );
    let ages = ages(&outcome);
    assert_eq!(ages.len(), 1, "{ages:?}");
    assert_eq!(ages[0].0, "a");
    assert!(
        (60.0..120.0).contains(&ages[0].1),
        "the oldest available job waited 60 s: {ages:?}"
    );
    let stored_age: Option<f64> = client
        .query_one(
            "SELECT oldest_available_age_secs FROM queue_stats WHERE queue = 'a' AND state = 'available'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored_age, Some(ages[0].1));
    let other_ages: i64 = client
        .query_one(
            "SELECT count(*) FROM queue_stats WHERE state <> 'available' AND oldest_available_age_secs IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(other_ages, 0);

    let again = run(&stats, &mut client).await;
    assert_eq!(again.rows, 0, "no depth changed");
    assert_eq!(
        depths(&again),
        depths(&outcome),
        "every pass reports the whole snapshot"
    );
    assert_eq!(snapshot(&client).await, want);
}

#[tokio::test]
async fn emptied_states_are_deleted_and_reported_as_zero() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    jobs(&client, "a", "available", 3, 30.0).await;
    jobs(&client, "a", "running", 2, 30.0).await;
    let stats = QueueStats::new(Config::default());
    run(&stats, &mut client).await;
    client
        .batch_execute(
            "UPDATE jobs SET state = 'completed', finalized_at = now() WHERE state = 'available'",
        )
        .await
        .unwrap();
    jobs(&client, "c", "scheduled", 1, -30.0).await;

    let outcome = run(&stats, &mut client).await;
    assert_eq!(
        snapshot(&client).await,
        vec![row("a", "running", 2), row("c", "scheduled", 1)]
    );
    assert_eq!(
        outcome.rows, 2,
        "(a, available) deleted, (c, scheduled) inserted"
    );
    assert_eq!(
        depths(&outcome),
        vec![
            ("a".to_owned(), JobState::Available, 0),
            ("a".to_owned(), JobState::Running, 2),
            ("c".to_owned(), JobState::Scheduled, 1),
        ]
    );
    assert_eq!(
        ages(&outcome),
        vec![("a".to_owned(), 0.0)],
        "no job waits in a any more"
    );
    let third = run(&stats, &mut client).await;
    assert_eq!(third.rows, 0);
    assert_eq!(depths(&third).len(), 2, "an emptied state is reported once");
}

#[tokio::test]
async fn the_snapshot_follows_queue_transitions() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    let queue = Queue::new(db.pool(4));
    for name in ["emails", "reports"] {
        let batch: Vec<NewJob> = (0..10).map(|_| NewJob::new("k").queue(name)).collect();
        queue.enqueue_batch(&batch).await.unwrap();
        queue
            .enqueue(
                &NewJob::new("k")
                    .queue(name)
                    .run_in(Duration::from_secs(3600)),
            )
            .await
            .unwrap();
        let claimed = queue.claim(name, 6).await.unwrap();
        queue.complete(claimed[0].lease).await.unwrap();
        queue.fail(claimed[1].lease, "boom").await.unwrap();
        queue
            .wait_for_callback(claimed[2].lease, Duration::from_secs(3600))
            .await
            .unwrap();
        queue
            .snooze(claimed[3].lease, Duration::from_secs(60))
            .await
            .unwrap();
    }
    let stats = QueueStats::new(Config::default());
    run(&stats, &mut client).await;
    assert_eq!(snapshot(&client).await, expected(&client).await);
}

#[tokio::test]
async fn a_stale_term_commits_nothing() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    jobs(&client, "a", "available", 3, 30.0).await;
    let err = run_as(&QueueStats::new(Config::default()), &mut client, EPOCH - 1)
        .await
        .unwrap_err();
    assert!(
        matches!(err, BranchError::Fenced { epoch, current } if epoch == EPOCH - 1 && current == EPOCH)
    );
    assert_eq!(snapshot(&client).await, vec![]);
}

#[tokio::test]
async fn concurrent_samplers_write_one_consistent_snapshot() {
    let db = db_with_leader().await;
    let client = db.client().await;
    for (queue, state, count) in [
        ("a", "available", 500),
        ("a", "running", 20),
        ("b", "scheduled", 300),
        ("b", "available", 40),
        ("c", "retryable", 7),
    ] {
        jobs(&client, queue, state, count, 10.0).await;
    }
    let stats = QueueStats::new(Config::default());
    let rows = run_concurrently(&db, &stats, 4, 3).await;
    assert_eq!(
        rows.iter().sum::<u64>(),
        5,
        "only the first pass changed anything: {rows:?}"
    );
    assert_eq!(snapshot(&client).await, expected(&client).await);
}

#[test]
fn config_rejects_unknown_keys_and_bad_values() {
    // batch_size means nothing here.
    let err = toml::from_str::<Config>("batch_size = 5").unwrap_err();
    assert!(err.to_string().contains("batch_size"), "{err}");
    let config: Config = toml::from_str("interval = \"5s\"").unwrap();
    assert_eq!(config.interval, Duration::from_secs(5));
    let config: Config = toml::from_str("interval = \"0s\"").unwrap();
    let problems = config.validate();
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].key, "interval");
}
