mod common;

use common::*;
use std::time::Duration;
use steward_branches::cleanup::{Cleanup, Config};
use steward_branches::rotate_archive::{self, RotateArchive};
use steward_branches::BranchError;
use tokio_postgres::Client;

const HOUR: f64 = 3600.0;
const DAY: f64 = 24.0 * HOUR;

/// `count` finished jobs of `queue` in `state`, finalized `age` seconds ago. Their priority was
/// aged from 3 to 2, so that the archive's priority shows which one it keeps.
async fn finished(client: &Client, queue: &str, state: &str, count: i64, age: f64) {
    client
        .execute(
            "INSERT INTO jobs (queue, kind, state, priority, original_priority, max_attempts, attempt,
                               attempted_at, finalized_at, args)
             SELECT $1, 'k', $2::text::job_state, 2, 3, 5, 1, now() - $4::float8 * interval '1 second',
                    now() - $4::float8 * interval '1 second', jsonb_build_object('n', g)
             FROM generate_series(1, $3::int8) g",
            &[&queue, &state, &count, &age],
        )
        .await
        .unwrap();
}

async fn in_jobs(client: &Client, queue: &str, state: &str) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM jobs WHERE queue = $1 AND state = $2::text::job_state",
            &[&queue, &state],
        )
        .await
        .unwrap()
        .get(0)
}

async fn archived(client: &Client, queue: &str, state: &str) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM job_archive WHERE queue = $1 AND state = $2::text::job_state",
            &[&queue, &state],
        )
        .await
        .unwrap()
        .get(0)
}

async fn scalar(client: &Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

/// Archive partitions as day offsets from today (UTC), ascending.
async fn partition_days(client: &Client) -> Vec<i32> {
    client
        .query(
            "SELECT to_date(substring(c.relname from 14), 'YYYYMMDD') - (now() AT TIME ZONE 'UTC')::date
             FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'job_archive'::regclass ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn moves_finished_jobs_past_retention_to_the_archive() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    finished(&client, "q", "completed", 5, 25.0 * HOUR).await;
    finished(&client, "q", "completed", 3, 23.0 * HOUR).await;
    finished(&client, "q", "failed", 4, 73.0 * HOUR).await;
    finished(&client, "q", "failed", 2, 71.0 * HOUR).await;
    finished(&client, "q", "cancelled", 2, 73.0 * HOUR).await;
    finished(&client, "q", "cancelled", 1, HOUR).await;
    // Unfinished jobs are never cleanup's, however old.
    client
        .execute(
            "INSERT INTO jobs (queue, kind, state, priority, original_priority, max_attempts, run_at, created_at)
             SELECT 'q', 'k', 'running', 2, 2, 5, now() - interval '30 days', now() - interval '30 days'
             FROM generate_series(1, 3)",
            &[],
        )
        .await
        .unwrap();
    let expected_days: Vec<i32> = client
        .query(
            "SELECT DISTINCT (finalized_at AT TIME ZONE 'UTC')::date - (now() AT TIME ZONE 'UTC')::date
             FROM jobs
             WHERE (state = 'completed' AND finalized_at < now() - interval '24 hours')
                OR (state IN ('failed', 'cancelled') AND finalized_at < now() - interval '72 hours')
             ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let original: (i64, serde_json::Value) = {
        let row = client
            .query_one(
                "SELECT id, args FROM jobs WHERE state = 'failed' AND finalized_at < now() - interval '72 hours' LIMIT 1",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };

    let cleanup = Cleanup::new(Config::default());
    let outcome = run(&cleanup, &mut client).await;
    assert_eq!(outcome.rows, 5 + 4 + 2);
    assert_eq!(outcome.run_again_in, None);
    assert_eq!(
        (
            archived(&client, "q", "completed").await,
            in_jobs(&client, "q", "completed").await
        ),
        (5, 3)
    );
    assert_eq!(
        (
            archived(&client, "q", "failed").await,
            in_jobs(&client, "q", "failed").await
        ),
        (4, 2)
    );
    assert_eq!(
        (
            archived(&client, "q", "cancelled").await,
            in_jobs(&client, "q", "cancelled").await
        ),
        (2, 1)
    );
    assert_eq!(in_jobs(&client, "q", "running").await, 3);
    // The partitions the moved jobs needed were created on the way.
    assert_eq!(partition_days(&client).await, expected_days);
    // The archived row is the job as it was, with the priority the producer asked for.
    let row = client
        .query_one(
            "SELECT state::text, priority, attempt, args, attempted_at IS NOT NULL FROM job_archive WHERE id = $1",
            &[&original.0],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "failed");
    assert_eq!(row.get::<_, i16>(1), 3);
    assert_eq!(row.get::<_, i32>(2), 1);
    assert_eq!(row.get::<_, serde_json::Value>(3), original.1);
    assert!(row.get::<_, bool>(4));

    let again = run(&cleanup, &mut client).await;
    assert_eq!(again.rows, 0, "re-running touches nothing");
    assert_eq!(
        scalar(&client, "SELECT count(*) FROM job_archive").await,
        11
    );
}

#[tokio::test]
async fn per_queue_retention_overrides_the_default_for_the_states_it_names() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    let config: Config = toml::from_str(
        r#"
        [queues.emails]
        completed = "1h"
        [queues.audit]
        completed = "30d"
        failed = "30d"
        "#,
    )
    .unwrap();
    // emails: completed after 1h; failed and cancelled use the defaults.
    finished(&client, "emails", "completed", 2, 2.0 * HOUR).await;
    finished(&client, "emails", "completed", 1, 0.5 * HOUR).await;
    finished(&client, "emails", "failed", 3, 73.0 * HOUR).await;
    finished(&client, "emails", "failed", 1, 2.0 * HOUR).await;
    // audit: completed and failed kept 30 days; cancelled uses the default.
    finished(&client, "audit", "completed", 4, 25.0 * HOUR).await;
    finished(&client, "audit", "completed", 1, 31.0 * DAY).await;
    finished(&client, "audit", "failed", 2, 73.0 * HOUR).await;
    finished(&client, "audit", "cancelled", 2, 73.0 * HOUR).await;
    // Every other queue: the defaults.
    finished(&client, "other", "completed", 5, 2.0 * HOUR).await;
    finished(&client, "other", "completed", 6, 25.0 * HOUR).await;

    let outcome = run(&Cleanup::new(config), &mut client).await;
    assert_eq!(outcome.rows, 2 + 3 + 1 + 2 + 6);
    let expected = [
        ("emails", "completed", 2, 1),
        ("emails", "failed", 3, 1),
        ("audit", "completed", 1, 4),
        ("audit", "failed", 0, 2),
        ("audit", "cancelled", 2, 0),
        ("other", "completed", 6, 5),
    ];
    for (queue, state, gone, kept) in expected {
        assert_eq!(
            (
                archived(&client, queue, state).await,
                in_jobs(&client, queue, state).await
            ),
            (gone, kept),
            "{queue} {state}"
        );
    }
}

#[tokio::test]
async fn without_archiving_jobs_are_only_deleted() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    finished(&client, "q", "completed", 5, 25.0 * HOUR).await;
    finished(&client, "q", "cancelled", 2, 80.0 * HOUR).await;
    finished(&client, "q", "completed", 1, HOUR).await;
    let cleanup = Cleanup::new(Config {
        archive: false,
        ..Config::default()
    });
    let outcome = run(&cleanup, &mut client).await;
    assert_eq!(outcome.rows, 7);
    assert_eq!(in_jobs(&client, "q", "completed").await, 1);
    assert_eq!(in_jobs(&client, "q", "cancelled").await, 0);
    assert_eq!(scalar(&client, "SELECT count(*) FROM job_archive").await, 0);
    assert_eq!(partition_days(&client).await, Vec::<i32>::new());
    assert_eq!(run(&cleanup, &mut client).await.rows, 0);
}

#[tokio::test]
async fn works_in_batches_and_asks_to_continue_when_work_is_left() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    finished(&client, "q", "completed", 250, 25.0 * HOUR).await;
    finished(&client, "q", "failed", 30, 73.0 * HOUR).await;
    for archive in [true, false] {
        let cleanup = Cleanup::new(Config {
            batch_size: 100,
            max_batches_per_run: 2,
            archive,
            ..Config::default()
        });
        let first = run(&cleanup, &mut client).await;
        assert_eq!(first.rows, 200 + 30, "archive = {archive}");
        assert_eq!(first.run_again_in, Some(Duration::ZERO));
        let second = run(&cleanup, &mut client).await;
        assert_eq!((second.rows, second.run_again_in), (50, None));
        let third = run(&cleanup, &mut client).await;
        assert_eq!(third.rows, 0, "re-running touches nothing");
        // The same again without archiving.
        finished(&client, "q", "completed", 250, 25.0 * HOUR).await;
        finished(&client, "q", "failed", 30, 73.0 * HOUR).await;
    }
}

#[tokio::test]
async fn a_full_last_batch_asks_to_continue_even_when_nothing_is_left() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    finished(&client, "q", "completed", 100, 25.0 * HOUR).await;
    let cleanup = Cleanup::new(Config {
        batch_size: 50,
        max_batches_per_run: 2,
        ..Config::default()
    });
    let first = run(&cleanup, &mut client).await;
    assert_eq!(
        (first.rows, first.run_again_in),
        (100, Some(Duration::ZERO))
    );
    let second = run(&cleanup, &mut client).await;
    assert_eq!((second.rows, second.run_again_in), (0, None));
}

#[tokio::test]
async fn a_stale_term_commits_nothing() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    finished(&client, "q", "completed", 5, 25.0 * HOUR).await;
    for archive in [true, false] {
        let cleanup = Cleanup::new(Config {
            archive,
            ..Config::default()
        });
        let err = run_as(&cleanup, &mut client, EPOCH - 1).await.unwrap_err();
        assert!(
            matches!(err, BranchError::Fenced { epoch, current } if epoch == EPOCH - 1 && current == EPOCH)
        );
        assert_eq!(in_jobs(&client, "q", "completed").await, 5);
    }
    assert_eq!(partition_days(&client).await, Vec::<i32>::new());
}

#[tokio::test]
async fn concurrent_cleaners_archive_each_job_exactly_once() {
    let db = db_with_leader().await;
    let client = db.client().await;
    // Spread over several days, so that the instances race to create the same partitions.
    client
        .execute(
            "INSERT INTO jobs (queue, kind, state, priority, original_priority, max_attempts, finalized_at)
             SELECT 'q' || (g % 3), 'k', 'completed', 2, 2, 5, now() - interval '25 hours' - (g % 6) * interval '1 day'
             FROM generate_series(1, $1::int8) g",
            &[&6000_i64],
        )
        .await
        .unwrap();
    finished(&client, "q0", "failed", 600, 80.0 * HOUR).await;
    let cleanup = Cleanup::new(Config {
        batch_size: 200,
        max_batches_per_run: 3,
        ..Config::default()
    });
    // Concurrent cleaners pick the same oldest candidates and wait for each other, so how many
    // rounds they need is not the point: that every job leaves exactly once is.
    let mut rounds = Vec::new();
    for _ in 0..40 {
        rounds.push(run_concurrently(&db, &cleanup, 4, 1).await);
        if scalar(&client, "SELECT count(*) FROM jobs").await == 0 {
            break;
        }
    }
    let moved: u64 = rounds.iter().flatten().sum();
    assert_eq!(moved, 6600, "{rounds:?}");
    assert!(
        rounds
            .iter()
            .any(|round| round.iter().filter(|r| **r > 0).count() > 1),
        "passes overlapped: {rounds:?}"
    );
    assert_eq!(
        scalar(&client, "SELECT count(*) FROM job_archive").await,
        6600
    );
    assert_eq!(
        scalar(
            &client,
            "SELECT count(*) FROM (SELECT id FROM job_archive GROUP BY id HAVING count(*) > 1) d"
        )
        .await,
        0,
        "no job archived twice"
    );
    assert_eq!(scalar(&client, "SELECT count(*) FROM jobs").await, 0);
}

#[tokio::test]
async fn cleanup_and_rotation_racing_for_one_partition_both_succeed() {
    let db = db_with_leader().await;
    let mut cleaner = db.client().await;
    let mut rotator = db.client().await;
    let admin = db.client().await;
    // A retention this short archives jobs finished moments ago: into today's partition, the
    // one rotation creates too.
    let cleanup = Cleanup::new(Config {
        retention: steward_branches::cleanup::Retention {
            completed: Duration::from_millis(1),
            ..Default::default()
        },
        ..Config::default()
    });
    let rotate = RotateArchive::new(rotate_archive::Config {
        days_ahead: 0,
        ..rotate_archive::Config::default()
    });
    for round in 0..5_i64 {
        admin
            .batch_execute(
                "SELECT drop_archive_partitions_before((now() AT TIME ZONE 'UTC')::date + 1)",
            )
            .await
            .unwrap();
        finished(&admin, "q", "completed", 300, 1.0).await;
        let barrier = tokio::sync::Barrier::new(2);
        let (cleaned, rotated) = tokio::join!(
            async {
                barrier.wait().await;
                run(&cleanup, &mut cleaner).await
            },
            async {
                barrier.wait().await;
                run(&rotate, &mut rotator).await
            }
        );
        assert_eq!(cleaned.rows, 300, "round {round}");
        // Whichever came second found the partition there.
        assert!(rotated.rows <= 1, "round {round}: {rotated:?}");
        assert_eq!(partition_days(&admin).await, vec![0]);
        assert_eq!(archived(&admin, "q", "completed").await, 300);
    }
}

#[test]
fn config_parses_overrides_and_rejects_unknown_keys_and_bad_values() {
    let config: Config = toml::from_str(
        r#"
        batch_size = 500
        archive = false
        [retention]
        completed = "12h"
        [queues.emails]
        completed = "1h"
        "#,
    )
    .unwrap();
    assert_eq!(config.batch_size, 500);
    assert!(!config.archive);
    assert_eq!(config.retention.completed, Duration::from_secs(12 * 3600));
    assert_eq!(
        config.retention.failed,
        Duration::from_secs(72 * 3600),
        "unnamed states keep the default"
    );
    assert_eq!(
        config.queues["emails"].completed,
        Some(Duration::from_secs(3600))
    );
    assert_eq!(config.queues["emails"].failed, None);
    assert_eq!(config.validate(), vec![]);

    for unknown in [
        "batch_sise = 5",
        "[retention]\ncomplete = \"1h\"",
        "[queues.emails]\ncomplete = \"1h\"",
    ] {
        let err = toml::from_str::<Config>(unknown).unwrap_err();
        assert!(
            err.to_string().contains("complete") || err.to_string().contains("batch_sise"),
            "{err}"
        );
    }
    let err = toml::from_str::<Config>("[retention]\ncompleted = \"one day\"").unwrap_err();
    assert!(err.to_string().contains("completed"), "{err}");

    let config: Config = toml::from_str(
        r#"
        batch_size = 0
        max_batches_per_run = 0
        [retention]
        cancelled = "0s"
        [queues.emails]
        failed = "0s"
        "#,
    )
    .unwrap();
    let keys: Vec<String> = config.validate().into_iter().map(|p| p.key).collect();
    assert_eq!(
        keys,
        vec![
            "batch_size",
            "max_batches_per_run",
            "retention.cancelled",
            "queues.emails.failed",
        ]
    );
}

/// Polls (up to a minute) until some backend waits for a lock.
async fn until_someone_waits_for_a_lock(client: &Client) {
    for _ in 0..600 {
        if scalar(client, "SELECT count(*) FROM pg_locks WHERE NOT granted").await > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no backend started waiting for a lock within a minute");
}

#[tokio::test]
async fn a_row_held_by_another_transaction_is_skipped_and_cleaned_once_released() {
    let db = db_with_leader().await;
    let client = db.client().await;
    for archive in [true, false] {
        finished(&client, "q", "completed", 10, 25.0 * HOUR).await;
        let mut holder = db.client().await;
        let hold = holder.transaction().await.unwrap();
        hold.execute(
            "SELECT id FROM jobs ORDER BY finalized_at, id LIMIT 1 FOR UPDATE",
            &[],
        )
        .await
        .unwrap();
        // A 1 s interval gives a 250 ms lock timeout: the first batch waits that long for the
        // held row, then the branch skips held rows.
        let cleanup = Cleanup::new(Config {
            archive,
            interval: Duration::from_secs(1),
            ..Config::default()
        });
        let mut cleaner = db.client().await;
        let outcome = run_as(&cleanup, &mut cleaner, EPOCH).await.unwrap();
        assert_eq!(outcome.rows, 9, "archive = {archive}");
        assert_eq!(in_jobs(&client, "q", "completed").await, 1);

        hold.rollback().await.unwrap();
        let outcome = run_as(&cleanup, &mut cleaner, EPOCH).await.unwrap();
        assert_eq!(outcome.rows, 1, "archive = {archive}");
        assert_eq!(in_jobs(&client, "q", "completed").await, 0);
    }
    assert_eq!(archived(&client, "q", "completed").await, 10);
}

#[tokio::test]
async fn a_job_retried_while_cleanup_waits_for_it_stays() {
    let db = db_with_leader().await;
    let client = db.client().await;
    finished(&client, "q", "completed", 5, 25.0 * HOUR).await;
    let oldest: i64 = client
        .query_one("SELECT id FROM jobs ORDER BY finalized_at, id LIMIT 1", &[])
        .await
        .unwrap()
        .get(0);
    // An operator retries the oldest job; cleanup's batch (which already chose it) waits for
    // the retry to commit, then must see that the job is no longer finished.
    let mut operator = db.client().await;
    let retry = operator.transaction().await.unwrap();
    retry
        .execute(
            "UPDATE jobs SET state = 'available', finalized_at = NULL WHERE id = $1",
            &[&oldest],
        )
        .await
        .unwrap();
    let cleaning = tokio::spawn({
        let db_client = db.client().await;
        async move {
            let mut cleaner = db_client;
            run_as(&Cleanup::new(Config::default()), &mut cleaner, EPOCH).await
        }
    });
    until_someone_waits_for_a_lock(&client).await;
    retry.commit().await.unwrap();
    let outcome = cleaning.await.unwrap().unwrap();
    assert_eq!(outcome.rows, 4);
    assert_eq!(state_of(&client, oldest).await, "available");
    assert_eq!(archived(&client, "q", "completed").await, 4);
    assert_eq!(
        scalar(
            &client,
            "SELECT count(*) FROM job_archive WHERE state <> 'completed'"
        )
        .await,
        0
    );
}

#[tokio::test]
async fn a_batch_whose_rows_another_cleaner_took_still_counts_as_full() {
    let db = db_with_leader().await;
    let client = db.client().await;
    finished(&client, "q", "completed", 6, 25.0 * HOUR).await;
    // Another cleaner (here a plain transaction) deletes the three oldest jobs and has not
    // committed yet; our batch of three picks the same three and waits for it.
    let mut other = db.client().await;
    let other_cleaner = other.transaction().await.unwrap();
    other_cleaner
        .execute(
            "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs ORDER BY finalized_at, id LIMIT 3)",
            &[],
        )
        .await
        .unwrap();
    let cleaning = tokio::spawn({
        let mut cleaner = db.client().await;
        async move {
            let cleanup = Cleanup::new(Config {
                batch_size: 3,
                max_batches_per_run: 5,
                ..Config::default()
            });
            run_as(&cleanup, &mut cleaner, EPOCH).await
        }
    });
    until_someone_waits_for_a_lock(&client).await;
    other_cleaner.commit().await.unwrap();
    // The first batch moved nothing, yet it had found a whole batch of candidates: the pass
    // goes on to the next three instead of taking the short batch for the end of the work.
    let outcome = cleaning.await.unwrap().unwrap();
    assert_eq!(outcome.rows, 3);
    assert_eq!(archived(&client, "q", "completed").await, 3);
    assert_eq!(scalar(&client, "SELECT count(*) FROM jobs").await, 0);
}
