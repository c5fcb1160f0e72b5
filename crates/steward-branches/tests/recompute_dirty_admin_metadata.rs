mod common;

use common::*;
use std::time::Duration;
use steward_branches::recompute_dirty_admin_metadata::{Config, RecomputeDirtyAdminMetadata};
use steward_branches::BranchError;
use steward_queue::{NewJob, Queue};
use tokio_postgres::Client;

type Counts = Vec<(String, String, i64)>;

/// Jobs in every state, through the queue client (whose statements fire the dirty-marking
/// trigger): enqueue, claim, complete, fail (retryable and failed), wait for a callback,
/// snooze, cancel; two claimed runs stay running.
async fn mixed_transitions(queue: &Queue, name: &str) {
    let batch: Vec<NewJob> = (0..12)
        .map(|_| NewJob::new("k").queue(name).max_attempts(3))
        .collect();
    let ids = queue.enqueue_batch(&batch).await.unwrap();
    queue
        .enqueue(
            &NewJob::new("k")
                .queue(name)
                .run_in(Duration::from_secs(3600)),
        )
        .await
        .unwrap();
    let claimed = queue.claim(name, 8).await.unwrap();
    queue.complete(claimed[0].lease).await.unwrap();
    queue.complete(claimed[1].lease).await.unwrap();
    queue.fail(claimed[2].lease, "boom").await.unwrap();
    queue
        .fail_permanently(claimed[3].lease, "bad input")
        .await
        .unwrap();
    queue
        .wait_for_callback(claimed[4].lease, Duration::from_secs(3600))
        .await
        .unwrap();
    queue
        .snooze(claimed[5].lease, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(queue.cancel(ids[11]).await.unwrap());
}

async fn stored(client: &Client) -> Counts {
    client
        .query(
            "SELECT queue, state::text, count FROM queue_counts ORDER BY 1, 2",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

async fn actual(client: &Client) -> Counts {
    client
        .query(
            "SELECT queue, state::text, count(*) FROM jobs GROUP BY 1, 2 ORDER BY 1, 2",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

async fn dirty(client: &Client) -> Vec<String> {
    client
        .query("SELECT queue FROM dirty_queues ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Jobs in `queues` queues (q1, q2, ...), in three states each, in one statement.
async fn seed_queues(client: &Client, queues: i64) {
    client
        .execute(
            "INSERT INTO jobs (queue, kind, state, priority, original_priority, max_attempts, finalized_at)
             SELECT 'q' || q, 'k', s::job_state, 2, 2, 5, CASE WHEN s = 'completed' THEN now() END
             FROM generate_series(1, $1::int8) q, unnest(ARRAY['available', 'scheduled', 'completed']) s,
                  generate_series(1, 2)",
            &[&queues],
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn recounts_the_queues_that_changed_and_only_those() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    let queue = Queue::new(db.pool(4), db.schema());
    mixed_transitions(&queue, "emails").await;
    mixed_transitions(&queue, "reports").await;
    assert_eq!(
        dirty(&client).await,
        vec!["emails", "reports"],
        "the trigger marked them"
    );

    let recompute = RecomputeDirtyAdminMetadata::new(Config::default());
    let outcome = run(&recompute, &mut client).await;
    let want = actual(&client).await;
    assert_eq!(stored(&client).await, want);
    assert_eq!(outcome.rows, want.len() as u64);
    assert_eq!(outcome.run_again_in, None);
    assert_eq!(dirty(&client).await, Vec::<String>::new());
    let again = run(&recompute, &mut client).await;
    assert_eq!(again.rows, 0, "nothing is dirty");

    // A count that is wrong but not dirty stays wrong (only the full refresh repairs it)...
    client
        .batch_execute(
            "UPDATE queue_counts SET count = 999 WHERE queue = 'emails' AND state = 'running'",
        )
        .await
        .unwrap();
    // ...while a changed queue is recounted.
    let claimed = queue.claim("reports", 1).await.unwrap();
    queue.complete(claimed[0].lease).await.unwrap();
    assert_eq!(dirty(&client).await, vec!["reports"]);
    let outcome = run(&recompute, &mut client).await;
    assert_eq!(
        outcome.rows, 2,
        "reports: one fewer available, one more completed"
    );
    let emails_running = ("emails".to_owned(), "running".to_owned(), 999);
    let mut want = actual(&client).await;
    for row in want.iter_mut() {
        if (row.0.as_str(), row.1.as_str()) == ("emails", "running") {
            *row = emails_running.clone();
        }
    }
    assert_eq!(stored(&client).await, want);
}

#[tokio::test]
async fn a_queue_that_emptied_loses_its_counts() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    let queue = Queue::new(db.pool(4), db.schema());
    mixed_transitions(&queue, "emails").await;
    mixed_transitions(&queue, "reports").await;
    let recompute = RecomputeDirtyAdminMetadata::new(Config::default());
    run(&recompute, &mut client).await;
    client
        .batch_execute("DELETE FROM jobs WHERE queue = 'emails'")
        .await
        .unwrap();
    let outcome = run(&recompute, &mut client).await;
    assert_eq!(outcome.rows, 8, "every state of emails removed");
    assert_eq!(stored(&client).await, actual(&client).await);
    assert!(stored(&client).await.iter().all(|(q, _, _)| q == "reports"));
}

#[tokio::test]
async fn works_in_batches_of_queues_and_asks_to_continue_when_work_is_left() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    seed_queues(&client, 250).await;
    assert_eq!(dirty(&client).await.len(), 250);
    let recompute = RecomputeDirtyAdminMetadata::new(Config::default());
    let first = run(&recompute, &mut client).await;
    assert_eq!(
        (first.rows, first.run_again_in),
        (300, Some(Duration::ZERO))
    );
    assert_eq!(dirty(&client).await.len(), 150);
    let second = run(&recompute, &mut client).await;
    assert_eq!(
        (second.rows, second.run_again_in),
        (300, Some(Duration::ZERO))
    );
    let third = run(&recompute, &mut client).await;
    assert_eq!((third.rows, third.run_again_in), (150, None));
    assert_eq!(dirty(&client).await.len(), 0);
    assert_eq!(stored(&client).await, actual(&client).await);
    assert_eq!(run(&recompute, &mut client).await.rows, 0);
}

#[tokio::test]
async fn a_stale_term_commits_nothing() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    let queue = Queue::new(db.pool(2), db.schema());
    mixed_transitions(&queue, "emails").await;
    let err = run_as(
        &RecomputeDirtyAdminMetadata::new(Config::default()),
        &mut client,
        EPOCH - 1,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, BranchError::Fenced { epoch, current } if epoch == EPOCH - 1 && current == EPOCH)
    );
    assert_eq!(
        dirty(&client).await,
        vec!["emails"],
        "the dirty mark is kept"
    );
    assert_eq!(stored(&client).await, vec![]);
}

#[tokio::test]
async fn concurrent_recomputes_take_each_queue_once_and_keep_counts_exact() {
    let db = db_with_leader().await;
    let client = db.client().await;
    seed_queues(&client, 400).await;
    let recompute = RecomputeDirtyAdminMetadata::new(Config {
        batch_size: 25,
        ..Config::default()
    });
    let rows = run_concurrently(&db, &recompute, 4, 5).await;
    assert_eq!(
        rows.iter().sum::<u64>(),
        400 * 3,
        "each queue recounted once: {rows:?}"
    );
    assert!(
        rows.iter().filter(|r| **r > 0).count() > 1,
        "passes overlapped: {rows:?}"
    );
    assert_eq!(dirty(&client).await.len(), 0);
    assert_eq!(stored(&client).await, actual(&client).await);
}

#[test]
fn config_rejects_unknown_keys_and_bad_values() {
    let err = toml::from_str::<Config>("batch_sise = 5").unwrap_err();
    assert!(err.to_string().contains("batch_sise"), "{err}");
    let config: Config = toml::from_str("interval = \"1s\"\nbatch_size = 500").unwrap();
    assert_eq!(
        (config.interval, config.batch_size),
        (Duration::from_secs(1), 500)
    );
    let config: Config = toml::from_str("batch_size = 0").unwrap();
    let problems = config.validate();
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].key, "batch_size");
}
