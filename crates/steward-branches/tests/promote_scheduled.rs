mod common;

use common::*;
use std::time::Duration;
use steward_branches::promote_scheduled::{Config, PromoteScheduled};
use steward_branches::{BranchError, Observation};
use steward_queue::{NewJob, Queue};

fn branch(config: Config) -> PromoteScheduled {
    PromoteScheduled::new(config)
}

async fn make_due(client: &tokio_postgres::Client, state: &str, count: i64, seconds_ago: f64) {
    client
        .execute(
            "INSERT INTO jobs (queue, kind, state, priority, original_priority, max_attempts, run_at)
             SELECT 'q', 'k', $1::text::job_state, 2, 2, 5, now() - $3::float8 * interval '1 second'
             FROM generate_series(1, $2::int8)",
            &[&state, &count, &seconds_ago],
        )
        .await
        .unwrap();
}

async fn count_in(client: &tokio_postgres::Client, state: &str) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM jobs WHERE state = $1::text::job_state",
            &[&state],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn promotes_due_scheduled_and_retryable_jobs_and_reports_lag() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    make_due(&client, "scheduled", 5, 2.0).await;
    make_due(&client, "retryable", 3, 2.0).await;
    make_due(&client, "scheduled", 4, -3600.0).await; // due in an hour
    let outcome = run(&branch(Config::default()), &mut client).await;
    assert_eq!(outcome.rows, 8);
    assert_eq!(count_in(&client, "available").await, 8);
    assert_eq!(count_in(&client, "scheduled").await, 4);
    let Some(Observation::PromotionLags(lags)) = outcome.observations.first() else {
        panic!("no lags in {outcome:?}");
    };
    assert_eq!(lags.len(), 8);
    assert!(lags.iter().all(|lag| (2.0..60.0).contains(lag)), "{lags:?}");
    // Nothing due within the interval: no early wake.
    assert_eq!(outcome.run_again_in, None);
}

#[tokio::test]
async fn works_in_batches_and_asks_to_continue_when_work_is_left() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    make_due(&client, "scheduled", 50, 1.0).await;
    let promote = branch(Config {
        batch_size: 10,
        max_batches_per_run: 3,
        ..Config::default()
    });
    let first = run(&promote, &mut client).await;
    assert_eq!(first.rows, 30);
    assert_eq!(first.run_again_in, Some(Duration::ZERO));
    let second = run(&promote, &mut client).await;
    assert_eq!(second.rows, 20);
    assert_eq!(count_in(&client, "scheduled").await, 0);
    let third = run(&promote, &mut client).await;
    assert_eq!(third.rows, 0, "re-running touches nothing");
}

#[tokio::test]
async fn wakes_at_the_earliest_due_job_and_publishes_it_for_producers() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    make_due(&client, "scheduled", 1, -0.15).await; // due in 150 ms
    let outcome = run(&branch(Config::default()), &mut client).await;
    let wake = outcome
        .run_again_in
        .expect("a job due within the interval wakes the promoter early");
    assert!(
        wake <= Duration::from_millis(150) && wake >= Duration::from_millis(50),
        "{wake:?}"
    );
    let published: bool = client
        .query_one(
            "SELECT promote_wakeup_at BETWEEN now() AND now() + interval '200 milliseconds' FROM leader",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(published);
}

/// When the promoter goes again at once (work is left), a published wake-up would keep
/// producers from sending the NOTIFY that matters: it is withdrawn. With nothing scheduled the
/// promoter sleeps its interval and publishes that.
#[tokio::test]
async fn publishes_the_wakeup_only_when_it_is_far_enough_away_to_matter() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    client
        .batch_execute("UPDATE leader SET promote_wakeup_at = now() + interval '10 seconds'")
        .await
        .unwrap();
    make_due(&client, "scheduled", 2, 1.0).await;
    let one_batch = Config {
        batch_size: 1,
        max_batches_per_run: 1,
        ..Config::default()
    };
    let outcome = run(&branch(one_batch), &mut client).await;
    assert_eq!(outcome.run_again_in, Some(Duration::ZERO));
    assert_eq!(wakeup_in(&client).await, None, "withdrawn");

    let outcome = run(&branch(Config::default()), &mut client).await;
    assert_eq!(outcome.rows, 1);
    assert_eq!(
        outcome.run_again_in, None,
        "nothing scheduled: the interval"
    );
    // At most the interval ahead (less by however long this check took to run).
    let secs = wakeup_in(&client).await.expect("published");
    assert!((-60.0..=0.25).contains(&secs), "{secs}");
}

/// Seconds from now to the published wake-up, if one is published.
async fn wakeup_in(client: &tokio_postgres::Client) -> Option<f64> {
    client
        .query_one(
            "SELECT extract(epoch FROM promote_wakeup_at - now())::float8 FROM leader",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn producers_notify_only_for_jobs_due_before_the_published_wakeup() {
    let db = db_with_leader().await;
    let queue = Queue::new(db.pool(2));
    let (listener, mut notifications, channel) = listen_for_promoter_wakeups(&db).await;
    let client = db.client().await;
    client
        .batch_execute("UPDATE leader SET promote_wakeup_at = now() + interval '10 seconds'")
        .await
        .unwrap();

    queue
        .enqueue(&NewJob::new("k").run_in(Duration::from_secs(60)))
        .await
        .unwrap();
    queue.enqueue(&NewJob::new("k")).await.unwrap(); // available at once: no wake needed
    queue
        .enqueue(&NewJob::new("k").run_in(Duration::from_secs(2)))
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), notifications.recv())
        .await
        .expect("the early job notifies")
        .unwrap();
    assert_eq!(got.channel, channel);
    // Exactly one: the later and the immediate job sent nothing. A sentinel NOTIFY committed
    // after them, then a round trip on the listening connection (the server delivers pending
    // notifications before it reports ready): everything sent so far has arrived, and only
    // the sentinel may be queued.
    client
        .batch_execute(&format!("NOTIFY {channel}, 'sentinel'"))
        .await
        .unwrap();
    listener.batch_execute("SELECT 1").await.unwrap();
    let mut queued = 0;
    while notifications.try_recv().is_ok() {
        queued += 1;
    }
    assert_eq!(queued, 1, "notifications besides the sentinel were sent");

    // Batch enqueue follows the same rule.
    let batch = [
        NewJob::new("k").run_in(Duration::from_secs(120)),
        NewJob::new("k").run_in(Duration::from_secs(1)),
    ];
    queue.enqueue_batch(&batch).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), notifications.recv())
        .await
        .unwrap();
    assert_eq!(got.map(|n| n.channel), Some(channel.clone()));
}

#[tokio::test]
async fn a_stale_term_commits_nothing() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    make_due(&client, "scheduled", 5, 1.0).await;
    let err = run_as(&branch(Config::default()), &mut client, EPOCH - 1)
        .await
        .unwrap_err();
    assert!(
        matches!(err, BranchError::Fenced { epoch, current } if epoch == EPOCH - 1 && current == EPOCH)
    );
    assert_eq!(count_in(&client, "scheduled").await, 5);

    // The failed transaction went out whole, its COMMIT included: the connection is left
    // outside any transaction, so the current term's pass on it commits for everyone to see.
    let mut promoter = db.client().await;
    run_as(&branch(Config::default()), &mut promoter, EPOCH - 1)
        .await
        .unwrap_err();
    let outcome = run_as(&branch(Config::default()), &mut promoter, EPOCH)
        .await
        .unwrap();
    assert_eq!(outcome.rows, 5);
    assert_eq!(count_in(&client, "available").await, 5);
}

#[tokio::test]
async fn concurrent_promoters_never_promote_a_job_twice() {
    let db = db_with_leader().await;
    let client = db.client().await;
    make_due(&client, "scheduled", 6000, 1.0).await;
    let promote = branch(Config {
        batch_size: 100,
        max_batches_per_run: 5,
        ..Config::default()
    });
    let rows = run_concurrently(&db, &promote, 4, 5).await;
    let total: u64 = rows.iter().sum();
    assert_eq!(total, 6000, "each job promoted exactly once: {rows:?}");
    assert!(
        rows.iter().filter(|r| **r > 0).count() > 1,
        "passes overlapped: {rows:?}"
    );
    assert_eq!(count_in(&client, "available").await, 6000);
}

#[test]
fn config_rejects_unknown_keys_and_bad_values() {
    let err = toml::from_str::<Config>("batch_sise = 5").unwrap_err();
    assert!(err.to_string().contains("batch_sise"), "{err}");
    let config: Config = toml::from_str("interval = \"100ms\"\nbatch_size = 0").unwrap();
    let problems = config.validate();
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].key, "batch_size");
}
