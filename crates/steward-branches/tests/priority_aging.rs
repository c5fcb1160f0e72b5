mod common;

use common::*;
use std::time::Duration;
use steward_branches::priority_aging::{Config, PriorityAging};
use steward_branches::BranchError;
use tokio_postgres::Client;

const MINUTE: f64 = 60.0;

/// `count` jobs in `state` at `priority` (originally `original`), due `waited` seconds ago;
/// returns their ids.
async fn jobs(
    client: &Client,
    state: &str,
    original: i16,
    priority: i16,
    waited: f64,
    count: i64,
) -> Vec<i64> {
    client
        .query(
            "INSERT INTO jobs (queue, kind, state, priority, original_priority, max_attempts, run_at)
             SELECT 'q', 'k', $1::text::job_state, $3, $2, 5, now() - $4::float8 * interval '1 second'
             FROM generate_series(1, $5::int8)
             RETURNING id",
            &[&state, &original, &priority, &waited, &count],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn priority_of(client: &Client, id: i64) -> i16 {
    client
        .query_one("SELECT priority FROM jobs WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0)
}

async fn priorities(client: &Client) -> Vec<(i64, i16)> {
    client
        .query("SELECT id, priority FROM jobs ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test]
async fn available_jobs_gain_a_level_per_age_step_down_to_one() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    // Waits are mid-step (2.5, 7.5, ... minutes) so that a step boundary never falls inside
    // the test. Default step: 5 minutes.
    let cases = [
        // (original, current, waited minutes, expected)
        (4, 4, 2.5, 4),  // not a step yet
        (4, 4, 7.5, 3),  // one step
        (4, 4, 12.5, 2), // two steps
        (4, 4, 17.5, 1), // three steps: the top
        (4, 4, 90.0, 1), // never above the top
        (2, 2, 7.5, 1),
        (4, 3, 12.5, 2), // aged once already: one more level
        (4, 2, 12.5, 2), // already at its target
        (3, 1, 2.5, 1),  // raised by other means: never lowered
        (1, 1, 90.0, 1), // top priority: not even in the index
    ];
    let mut ids = Vec::new();
    for (original, current, waited, expected) in cases {
        let id = jobs(&client, "available", original, current, waited * MINUTE, 1).await[0];
        ids.push((id, expected));
    }
    // Only available jobs age.
    let scheduled = jobs(&client, "scheduled", 4, 4, 90.0 * MINUTE, 1).await[0];
    let running = jobs(&client, "running", 4, 4, 90.0 * MINUTE, 1).await[0];

    let aging = PriorityAging::new(Config::default());
    let outcome = run(&aging, &mut client).await;
    assert_eq!(outcome.rows, 6);
    assert_eq!(outcome.run_again_in, None);
    for (id, expected) in &ids {
        assert_eq!(priority_of(&client, *id).await, *expected, "job {id}");
    }
    assert_eq!(priority_of(&client, scheduled).await, 4);
    assert_eq!(priority_of(&client, running).await, 4);

    let again = run(&aging, &mut client).await;
    assert_eq!(again.rows, 0, "re-running touches nothing");
}

#[tokio::test]
async fn later_passes_keep_aging_as_jobs_wait_longer() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    let id = jobs(&client, "available", 4, 4, 7.5 * MINUTE, 1).await[0];
    let aging = PriorityAging::new(Config::default());
    for expected in [3, 2, 1] {
        assert_eq!(run(&aging, &mut client).await.rows, 1);
        assert_eq!(priority_of(&client, id).await, expected);
        // Five more minutes of waiting.
        client
            .execute(
                "UPDATE jobs SET run_at = run_at - interval '5 minutes' WHERE id = $1",
                &[&id],
            )
            .await
            .unwrap();
    }
    assert_eq!(run(&aging, &mut client).await.rows, 0, "at the top");
}

#[tokio::test]
async fn the_step_is_configurable() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    let id = jobs(&client, "available", 4, 4, 90.0, 1).await[0];
    let aging = PriorityAging::new(Config {
        age_step: Duration::from_secs(40),
        ..Config::default()
    });
    assert_eq!(run(&aging, &mut client).await.rows, 1);
    assert_eq!(priority_of(&client, id).await, 2);
}

#[tokio::test]
async fn works_in_batches_and_asks_to_continue_when_work_is_left() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    jobs(&client, "available", 4, 4, 7.5 * MINUTE, 250).await;
    let aging = PriorityAging::new(Config {
        batch_size: 100,
        max_batches_per_run: 2,
        ..Config::default()
    });
    let first = run(&aging, &mut client).await;
    assert_eq!(
        (first.rows, first.run_again_in),
        (200, Some(Duration::ZERO))
    );
    let second = run(&aging, &mut client).await;
    assert_eq!((second.rows, second.run_again_in), (50, None));
    assert_eq!(run(&aging, &mut client).await.rows, 0);
    assert!(priorities(&client).await.iter().all(|(_, p)| *p == 3));
}

#[tokio::test]
async fn a_stale_term_commits_nothing() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    jobs(&client, "available", 4, 4, 30.0 * MINUTE, 5).await;
    let err = run_as(
        &PriorityAging::new(Config::default()),
        &mut client,
        EPOCH - 1,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, BranchError::Fenced { epoch, current } if epoch == EPOCH - 1 && current == EPOCH)
    );
    assert!(priorities(&client).await.iter().all(|(_, p)| *p == 4));
}

#[tokio::test]
async fn concurrent_agers_raise_each_job_once() {
    let db = db_with_leader().await;
    let client = db.client().await;
    jobs(&client, "available", 4, 4, 12.5 * MINUTE, 6000).await;
    let aging = PriorityAging::new(Config {
        batch_size: 200,
        max_batches_per_run: 3,
        ..Config::default()
    });
    let rows = run_concurrently(&db, &aging, 4, 3).await;
    assert_eq!(rows.iter().sum::<u64>(), 6000, "{rows:?}");
    assert!(
        rows.iter().filter(|r| **r > 0).count() > 1,
        "passes overlapped: {rows:?}"
    );
    assert!(priorities(&client).await.iter().all(|(_, p)| *p == 2));
}

#[test]
fn config_rejects_unknown_keys_and_bad_values() {
    let err = toml::from_str::<Config>("age_stepp = \"5m\"").unwrap_err();
    assert!(err.to_string().contains("age_stepp"), "{err}");
    let config: Config = toml::from_str("age_step = \"10m\"\nbatch_size = 50").unwrap();
    assert_eq!(
        (config.age_step, config.batch_size),
        (Duration::from_secs(600), 50)
    );
    assert_eq!(config.validate(), vec![]);
    let err = toml::from_str::<Config>("age_step = \"soon\"").unwrap_err();
    assert!(err.to_string().contains("age_step"), "{err}");
    let config: Config = toml::from_str("age_step = \"0s\"\nmax_batches_per_run = 0").unwrap();
    let keys: Vec<String> = config.validate().into_iter().map(|p| p.key).collect();
    assert_eq!(keys, vec!["max_batches_per_run", "age_step"]);
}
