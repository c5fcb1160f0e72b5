//! Producers and workers in other languages use the schema from sessions whose search_path does
//! not name it: every function and trigger must still find Steward's tables.

use steward_testkit::TestDb;

/// Runs `sql` in a plain `psql` session on the test database, failing on the first error.
fn psql(db: &TestDb, sql: &str) -> String {
    let psql = steward_devdb::pg_binary("psql").expect("psql is installed with PostgreSQL");
    let out = std::process::Command::new(psql)
        .args(["--no-psqlrc", "-v", "ON_ERROR_STOP=1", "-qtAX", "-d"])
        .arg(db.url())
        .args(["-c", sql])
        .output()
        .expect("psql runs");
    assert!(
        out.status.success(),
        "{sql}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test]
async fn a_plain_psql_session_enqueues_and_wakes_without_the_schema_on_its_path() {
    let db = TestDb::new().await;
    let out = psql(
        &db,
        "SET search_path = public;
         INSERT INTO steward.jobs (queue, kind, state, priority, original_priority, max_attempts)
         VALUES ('from_psql', 'k', 'available', 2, 2, 1);
         SELECT steward.wake_workers(ARRAY['from_psql']);
         UPDATE steward.leader SET promote_wakeup_at = now() + interval '1 hour';
         SELECT steward.wake_promoter(now());",
    );
    assert_eq!(out.lines().collect::<Vec<_>>(), ["1", "t"], "{out}");
    // The trigger marked the queue for the admin recount in Steward's schema.
    let dirty: bool = db
        .client()
        .await
        .query_one(
            "SELECT EXISTS (SELECT FROM dirty_queues WHERE queue = 'from_psql')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(dirty);
}
