//! The fleet session's statements against a real PostgreSQL: what they take and what they read.

use steward_leader::fleet::{FLEET_PROBE, FLEET_VIEW, RELEASE_QUEUE, TRY_LOCKS};
use steward_testkit::TestDb;

/// A lock taken and not returned would keep a queue from every process without a term, so the
/// statement must stop trying once it has won `$2`, and must skip a lock another session holds.
#[tokio::test]
async fn try_locks_takes_exactly_the_locks_it_returns() {
    let db = TestDb::new().await;
    let fleet = db.client().await;
    let other = db.client().await;
    let queues: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
    other
        .execute(TRY_LOCKS, &[&vec!["b".to_owned()], &1i64])
        .await
        .unwrap();
    let won: Vec<String> = fleet
        .query(TRY_LOCKS, &[&queues, &2i64])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(won, ["a", "c"], "b is held by the other session");
    let held: Vec<String> = fleet
        .query_one(FLEET_PROBE, &[&queues])
        .await
        .unwrap()
        .get(1);
    assert_eq!(held, ["a", "c"], "d was not tried");
    // The view sees both sessions' locks.
    let rows = fleet.query(FLEET_VIEW, &[&queues]).await.unwrap();
    let holders: Vec<(String, Option<String>)> =
        rows.iter().map(|row| (row.get(0), row.get(1))).collect();
    assert_eq!(holders.iter().filter(|(_, h)| h.is_some()).count(), 3);
    assert!(holders.contains(&("d".to_owned(), None)));
    fleet.execute(RELEASE_QUEUE, &[&"a"]).await.unwrap();
    let held: Vec<String> = fleet
        .query_one(FLEET_PROBE, &[&queues])
        .await
        .unwrap()
        .get(1);
    assert_eq!(held, ["c"]);
}
