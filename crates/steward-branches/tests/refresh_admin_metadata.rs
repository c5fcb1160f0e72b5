mod common;

use common::*;
use std::time::Duration;
use steward_branches::recompute_dirty_admin_metadata::{self, RecomputeDirtyAdminMetadata};
use steward_branches::refresh_admin_metadata::{Config, RefreshAdminMetadata, WRITE_COUNTS};
use steward_branches::BranchError;
use steward_queue::{NewJob, Queue};
use tokio_postgres::Client;

type Counts = Vec<(String, String, i64)>;

/// Jobs in every state, through the queue client: enqueue, claim, complete, fail (retryable
/// and failed), wait for a callback, snooze, cancel; two claimed runs stay running.
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

#[tokio::test]
async fn counts_every_state_of_every_queue_exactly() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    let queue = Queue::new(db.pool(4), db.schema());
    for name in ["emails", "reports", "billing"] {
        mixed_transitions(&queue, name).await;
    }
    let refresh = RefreshAdminMetadata::new(Config::default());
    let outcome = run(&refresh, &mut client).await;
    let want = actual(&client).await;
    assert_eq!(stored(&client).await, want);
    assert_eq!(want.len(), 3 * 8, "every state is represented: {want:?}");
    assert_eq!(outcome.rows, want.len() as u64);

    let again = run(&refresh, &mut client).await;
    assert_eq!(again.rows, 0, "no count changed");

    // More transitions, including states that empty out and a queue that disappears.
    client
        .batch_execute(
            "DELETE FROM jobs WHERE queue = 'billing';
             DELETE FROM jobs WHERE state = 'completed';
             UPDATE jobs SET state = 'cancelled', finalized_at = now(), callback_timeout_at = NULL
             WHERE state = 'waiting_external'",
        )
        .await
        .unwrap();
    mixed_transitions(&queue, "search").await;
    let outcome = run(&refresh, &mut client).await;
    assert_eq!(stored(&client).await, actual(&client).await);
    // billing: 8 rows gone; emails, reports: completed and waiting_external gone, cancelled
    // changed; search: 8 new rows.
    assert_eq!(outcome.rows, 8 + 2 * 3 + 8);
}

#[tokio::test]
async fn repairs_counts_the_dirty_recompute_missed() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    let queue = Queue::new(db.pool(4), db.schema());
    mixed_transitions(&queue, "emails").await;
    let refresh = RefreshAdminMetadata::new(Config::default());
    run(&refresh, &mut client).await;
    // As if changes had gone unmarked: a wrong count and a queue that no longer exists.
    client
        .batch_execute(
            "UPDATE queue_counts SET count = 999, updated_at = now() - interval '1 minute' WHERE state = 'running';
             INSERT INTO queue_counts (queue, state, count, updated_at)
             VALUES ('ghost', 'available', 3, now() - interval '1 minute')",
        )
        .await
        .unwrap();
    let outcome = run(&refresh, &mut client).await;
    assert_eq!(outcome.rows, 2);
    assert_eq!(stored(&client).await, actual(&client).await);
}

#[tokio::test]
async fn a_count_never_replaces_one_taken_later() {
    let db = db_with_leader().await;
    let client = db.client().await;
    let write = |queues: Vec<&'static str>,
                 states: Vec<&'static str>,
                 counts: Vec<i64>,
                 scope: Option<Vec<&'static str>>,
                 secs_ago: f64| {
        let client = &client;
        async move {
            let taken_at: chrono::DateTime<chrono::Utc> = client
                .query_one(
                    "SELECT now() - $1::float8 * interval '1 second'",
                    &[&secs_ago],
                )
                .await
                .unwrap()
                .get(0);
            client
                .query_one(
                    WRITE_COUNTS,
                    &[&queues, &states, &counts, &scope, &taken_at],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    assert_eq!(
        write(
            vec!["q", "q"],
            vec!["available", "running"],
            vec![5, 2],
            None,
            10.0
        )
        .await,
        2
    );
    // An older count (taken 20 s ago) neither updates nor deletes.
    assert_eq!(
        write(vec!["q"], vec!["available"], vec![3], Some(vec!["q"]), 20.0).await,
        0
    );
    assert_eq!(
        stored(&client).await,
        vec![
            ("q".into(), "available".into(), 5),
            ("q".into(), "running".into(), 2)
        ]
    );
    // A newer one does both; a new (queue, state) is inserted whatever its time.
    assert_eq!(
        write(
            vec!["q", "r"],
            vec!["available", "scheduled"],
            vec![4, 1],
            Some(vec!["q", "r"]),
            5.0
        )
        .await,
        3
    );
    assert_eq!(
        stored(&client).await,
        vec![
            ("q".into(), "available".into(), 4),
            ("r".into(), "scheduled".into(), 1)
        ]
    );
    // Out of scope rows are left alone.
    assert_eq!(
        write(vec![], vec![], vec![], Some(vec!["other"]), 0.0).await,
        0
    );
    assert_eq!(stored(&client).await.len(), 2);
}

#[tokio::test]
async fn a_stale_term_commits_nothing() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    let queue = Queue::new(db.pool(2), db.schema());
    mixed_transitions(&queue, "emails").await;
    let err = run_as(
        &RefreshAdminMetadata::new(Config::default()),
        &mut client,
        EPOCH - 1,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, BranchError::Fenced { epoch, current } if epoch == EPOCH - 1 && current == EPOCH)
    );
    assert_eq!(stored(&client).await, vec![]);
}

#[tokio::test]
async fn concurrent_refreshes_keep_counts_exact() {
    let db = db_with_leader().await;
    let client = db.client().await;
    client
        .execute(
            "INSERT INTO jobs (queue, kind, state, priority, original_priority, max_attempts, finalized_at)
             SELECT 'q' || (g % 50), 'k', CASE WHEN g % 3 = 0 THEN 'completed' ELSE 'available' END::job_state,
                    2, 2, 5, CASE WHEN g % 3 = 0 THEN now() END
             FROM generate_series(1, $1::int8) g",
            &[&20_000_i64],
        )
        .await
        .unwrap();
    let refresh = RefreshAdminMetadata::new(Config::default());
    let rows = run_concurrently(&db, &refresh, 4, 3).await;
    assert_eq!(
        rows.iter().sum::<u64>(),
        100,
        "each row written as changed once: {rows:?}"
    );
    assert_eq!(stored(&client).await, actual(&client).await);
}

#[tokio::test]
async fn refresh_and_dirty_recompute_at_the_same_instant_agree() {
    let db = db_with_leader().await;
    let admin = db.client().await;
    let mut refresher = db.client().await;
    let mut recomputer = db.client().await;
    let queue = Queue::new(db.pool(4), db.schema());
    let refresh = RefreshAdminMetadata::new(Config::default());
    let recompute = RecomputeDirtyAdminMetadata::new(recompute_dirty_admin_metadata::Config {
        batch_size: 2,
        ..Default::default()
    });
    for round in 0..6 {
        for name in ["a", "b", "c", "d"] {
            mixed_transitions(&queue, &format!("{name}{}", round % 3)).await;
        }
        admin
            .batch_execute("DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE state = 'completed' LIMIT 3)")
            .await
            .unwrap();
        let barrier = tokio::sync::Barrier::new(2);
        tokio::join!(
            async {
                barrier.wait().await;
                run(&refresh, &mut refresher).await
            },
            async {
                barrier.wait().await;
                // Until every dirty queue is recounted.
                while run(&recompute, &mut recomputer)
                    .await
                    .run_again_in
                    .is_some()
                {}
            }
        );
        assert_eq!(stored(&admin).await, actual(&admin).await, "round {round}");
    }
}

#[test]
fn config_rejects_unknown_keys_and_bad_values() {
    // batch_size means nothing here: the refresh is one statement.
    let err = toml::from_str::<Config>("batch_size = 5").unwrap_err();
    assert!(err.to_string().contains("batch_size"), "{err}");
    let config: Config = toml::from_str("interval = \"2m\"").unwrap();
    assert_eq!(config.interval, Duration::from_secs(120));
    let config: Config = toml::from_str("interval = \"2d\"").unwrap();
    let problems = config.validate();
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].key, "interval");
}
