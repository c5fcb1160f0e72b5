use steward_connection::{SchemaName, Target};
use steward_schema::{check_schema, latest_version, migrate, SchemaError};
use steward_testkit::TestDb;

#[tokio::test]
async fn migrating_twice_is_a_no_op() {
    let db = TestDb::empty().await;
    let mut client = db.client().await;
    let first = migrate(&mut client, db.schema()).await.unwrap();
    assert_eq!(first.version, latest_version());
    assert_eq!(first.applied.len(), latest_version() as usize, "{first:?}");
    let second = migrate(&mut client, db.schema()).await.unwrap();
    assert!(second.applied.is_empty(), "{second:?}");
    assert_eq!(second.version, latest_version());
    check_schema(&client, db.schema()).await.unwrap();
}

#[tokio::test]
async fn concurrent_migrations_apply_each_migration_once() {
    let db = TestDb::empty().await;
    let runs = (0..6).map(|_| async {
        let mut client = db.client().await;
        migrate(&mut client, db.schema()).await
    });
    let reports = futures_util::future::join_all(runs).await;
    let mut applied = Vec::new();
    for report in reports {
        let report = report.expect("every concurrent migrate succeeds");
        assert_eq!(report.version, latest_version());
        applied.extend(report.applied);
    }
    applied.sort();
    let mut unique = applied.clone();
    unique.dedup();
    assert_eq!(applied, unique, "a migration was applied twice");
    assert_eq!(applied.len(), latest_version() as usize);
}

#[tokio::test]
async fn missing_or_old_schema_names_steward_migrate() {
    let db = TestDb::empty().await;
    let client = db.client().await;
    let err = check_schema(&client, db.schema()).await.unwrap_err();
    assert!(matches!(err, SchemaError::Missing { .. }), "{err:?}");
    assert!(err.to_string().contains("steward migrate"), "{err}");

    let mut client = db.client().await;
    migrate(&mut client, db.schema()).await.unwrap();
    client
        .batch_execute(
            "DELETE FROM schema_history WHERE version = (SELECT max(version) FROM schema_history)",
        )
        .await
        .unwrap();
    let err = check_schema(&client, db.schema()).await.unwrap_err();
    assert!(matches!(err, SchemaError::Behind { .. }), "{err:?}");
    assert!(err.to_string().contains("steward migrate"), "{err}");
}

#[tokio::test]
async fn schema_name_is_configurable_and_isolated() {
    let db = TestDb::empty().await;
    let other = SchemaName::new("queue_two").unwrap();
    let mut client = Target::new(&db.url(), other.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    migrate(&mut client, &other).await.unwrap();
    let tables: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'queue_two' AND tablename = 'jobs'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 1);
    // The default schema was not touched.
    let default_client = db.client().await;
    assert!(check_schema(&default_client, db.schema()).await.is_err());
}

#[tokio::test]
async fn archive_partitions_are_created_and_dropped_by_day() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let created: bool = client
        .query_one("SELECT create_archive_partition(DATE '2026-01-10')", &[])
        .await
        .unwrap()
        .get(0);
    assert!(created);
    let again: bool = client
        .query_one("SELECT create_archive_partition(DATE '2026-01-10')", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!again, "creating an existing partition reports false");
    client
        .query_one("SELECT create_archive_partition(DATE '2026-01-11')", &[])
        .await
        .unwrap();
    let dropped: i32 = client
        .query_one(
            "SELECT drop_archive_partitions_before(DATE '2026-01-11')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(dropped, 1);
    let left: Vec<String> = client
        .query(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'job_archive'::regclass",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, vec!["job_archive_p20260111".to_owned()]);
}

#[tokio::test]
async fn maintenance_role_reaches_the_queue_and_nothing_else() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let role = format!("steward_maint_{}", &db.name()[db.name().len() - 12..]);
    steward_schema::create_maintenance_role(&client, db.schema(), &role)
        .await
        .unwrap();
    // Idempotent.
    steward_schema::create_maintenance_role(&client, db.schema(), &role)
        .await
        .unwrap();
    client
        .batch_execute("CREATE SCHEMA other; CREATE TABLE other.secrets (x int)")
        .await
        .unwrap();
    client
        .batch_execute(&format!("SET ROLE {role}"))
        .await
        .unwrap();
    let allowed = [
        "SELECT count(*) FROM jobs",
        "UPDATE jobs SET priority = priority WHERE false",
        "DELETE FROM jobs WHERE false",
        "SELECT create_archive_partition(current_date)",
        "SELECT retry_backoff(1, 1000, 2000, 0)",
        "UPDATE leader SET last_progress_at = now()",
    ];
    for statement in allowed {
        client
            .batch_execute(statement)
            .await
            .unwrap_or_else(|e| panic!("{statement}: {e}"));
    }
    let denied = [
        "SELECT * FROM other.secrets",
        "CREATE TABLE jobs2 (x int)",
        "DROP TABLE cron_fires",
        "DELETE FROM leader",
        "TRUNCATE jobs",
    ];
    for statement in denied {
        let err = client.batch_execute(statement).await.unwrap_err();
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
            "{statement}: {err}"
        );
    }
    client.batch_execute("RESET ROLE").await.unwrap();
    client
        .batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}"))
        .await
        .unwrap();
}

#[tokio::test]
async fn migrating_a_schema_newer_than_this_steward_says_to_upgrade() {
    let db = TestDb::new().await;
    let mut client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO schema_history (version, name, applied_on, checksum)
             VALUES (99, 'from_the_future', now()::text, '0')",
        )
        .await
        .unwrap();
    let err = migrate(&mut client, db.schema()).await.unwrap_err();
    assert!(
        matches!(err, SchemaError::Ahead { found: 99, .. }),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains("older than the schema") && message.contains("upgraded"),
        "{message}"
    );
}
