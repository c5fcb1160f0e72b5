mod common;

use common::*;
use steward_branches::rotate_archive::{Config, RotateArchive};
use steward_branches::BranchError;
use tokio_postgres::Client;

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

async fn create_partition(client: &Client, days_from_today: i32) {
    client
        .execute(
            "SELECT create_archive_partition((now() AT TIME ZONE 'UTC')::date + $1::int4)",
            &[&days_from_today],
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn creates_partitions_ahead_and_drops_expired_ones() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    for day in [-20, -15, -14, -13, 0] {
        create_partition(&client, day).await;
    }
    let rotate = RotateArchive::new(Config::default());
    let outcome = run(&rotate, &mut client).await;
    // Created today+1 .. today+3 (today existed); dropped the days before today-14.
    assert_eq!(outcome.rows, 3 + 2);
    assert_eq!(partition_days(&client).await, vec![-14, -13, 0, 1, 2, 3]);

    let again = run(&rotate, &mut client).await;
    assert_eq!(again.rows, 0, "re-running touches nothing");
    assert_eq!(partition_days(&client).await, vec![-14, -13, 0, 1, 2, 3]);
}

#[tokio::test]
async fn dropping_a_partition_drops_its_archived_jobs() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    create_partition(&client, -3).await;
    create_partition(&client, -1).await;
    client
        .execute(
            "INSERT INTO job_archive (id, queue, kind, state, priority, attempt, max_attempts, run_at,
                                      created_at, finalized_at, args, errors)
             SELECT g, 'q', 'k', 'completed', 2, 1, 5, now(), now(),
                    ((now() AT TIME ZONE 'UTC')::date + CASE WHEN g % 2 = 0 THEN -3 ELSE -1 END)::timestamp
                        AT TIME ZONE 'UTC' + interval '1 hour',
                    '{}', '[]'
             FROM generate_series(1, 10) g",
            &[],
        )
        .await
        .unwrap();
    let rotate = RotateArchive::new(Config {
        days_ahead: 0,
        retention_days: 2,
        ..Config::default()
    });
    let outcome = run(&rotate, &mut client).await;
    assert_eq!(outcome.rows, 1 + 1, "today created, today-3 dropped");
    assert_eq!(partition_days(&client).await, vec![-1, 0]);
    let left: i64 = client
        .query_one("SELECT count(*) FROM job_archive", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 5);
}

#[tokio::test]
async fn a_stale_term_commits_nothing() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    create_partition(&client, -30).await;
    let err = run_as(
        &RotateArchive::new(Config::default()),
        &mut client,
        EPOCH - 1,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, BranchError::Fenced { epoch, current } if epoch == EPOCH - 1 && current == EPOCH)
    );
    assert_eq!(partition_days(&client).await, vec![-30]);
}

#[tokio::test]
async fn concurrent_rotations_create_and_drop_each_partition_once() {
    let db = db_with_leader().await;
    let client = db.client().await;
    for day in [-40, -30, -20] {
        create_partition(&client, day).await;
    }
    let rotate = RotateArchive::new(Config {
        days_ahead: 10,
        ..Config::default()
    });
    let rows = run_concurrently(&db, &rotate, 4, 3).await;
    assert_eq!(rows.iter().sum::<u64>(), 11 + 3, "{rows:?}");
    assert_eq!(
        partition_days(&client).await,
        (0..=10).collect::<Vec<i32>>()
    );
}

#[test]
fn config_rejects_unknown_keys_and_bad_values() {
    // batch_size means nothing here.
    let err = toml::from_str::<Config>("batch_size = 5").unwrap_err();
    assert!(err.to_string().contains("batch_size"), "{err}");
    let config: Config =
        toml::from_str("interval = \"30m\"\ndays_ahead = 7\nretention_days = 30").unwrap();
    assert_eq!((config.days_ahead, config.retention_days), (7, 30));
    assert_eq!(config.validate(), vec![]);
    let config: Config = toml::from_str("retention_days = 0\ndays_ahead = -1").unwrap();
    let keys: Vec<String> = config.validate().into_iter().map(|p| p.key).collect();
    assert_eq!(keys, vec!["days_ahead", "retention_days"]);
}
