mod common;

use chrono::{Duration as Span, Timelike, Utc};
use common::*;
use std::time::{Duration, Instant};
use steward_branches::table_health::{Config, IndexStats, Report, TableHealth};
use steward_branches::{Branch, Observation, Outcome};
use steward_testkit::TestDb;
use tokio_postgres::Client;

/// The report of a pass.
fn report(outcome: &Outcome) -> &Report {
    outcome
        .observations
        .iter()
        .find_map(|o| match o {
            Observation::TableHealth(report) => Some(report),
            _ => None,
        })
        .expect("every pass reports")
}

fn index<'a>(report: &'a Report, name: &str) -> Option<&'a IndexStats> {
    report.indexes.iter().find(|i| i.index == name)
}

/// `count` completed jobs, then their statistics.
async fn jobs(client: &Client, count: i64) {
    client
        .execute(
            "INSERT INTO jobs (queue, kind, state, priority, original_priority, max_attempts, run_at,
                               finalized_at)
             SELECT 'q' || (g % 7), 'k', 'completed', 2, 2, 5, now(), now()
             FROM generate_series(1, $1::int8) AS g",
            &[&count],
        )
        .await
        .unwrap();
    client.batch_execute("ANALYZE jobs").await.unwrap();
}

/// Deletes nine jobs in ten, spread over every index page, and vacuums: the pages stay, with a
/// tenth of their entries. Returns how many were deleted.
async fn bloat_jobs(client: &Client) -> u64 {
    let deleted = client
        .execute("DELETE FROM jobs WHERE id % 10 <> 0", &[])
        .await
        .unwrap();
    client.batch_execute("VACUUM ANALYZE jobs").await.unwrap();
    deleted
}

/// The index's identity on disk: a rebuild gives it a new file.
async fn filenode(client: &Client, index: &str) -> Option<i64> {
    client
        .query_one(
            "SELECT pg_relation_filenode(to_regclass($1))::int8",
            &[&index],
        )
        .await
        .unwrap()
        .get(0)
}

async fn invalid_indexes(client: &Client) -> Vec<String> {
    client
        .query(
            "SELECT c.relname::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
             WHERE NOT i.indisvalid AND c.relnamespace = current_schema()::regnamespace
             ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// An invalid index as a failed `CREATE INDEX CONCURRENTLY` leaves it: a unique index on a
/// column with duplicates.
async fn failed_unique_index(client: &Client) {
    let err = client
        .batch_execute("CREATE UNIQUE INDEX CONCURRENTLY jobs_queue_unique_idx ON jobs (queue)")
        .await
        .expect_err("queues repeat");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION),
        "{err}"
    );
}

/// The leftover of a failed `REINDEX INDEX CONCURRENTLY`: an expression index whose function
/// raises while a setting is on, rebuilt with the setting on, leaves `<index>_ccnew` invalid.
async fn failed_reindex(client: &Client) -> &'static str {
    client
        .batch_execute(
            "CREATE FUNCTION test_boom(bigint) RETURNS bigint IMMUTABLE LANGUAGE plpgsql AS $$
             BEGIN
                 IF current_setting('steward_test.boom', true) = 'on' THEN RAISE 'boom'; END IF;
                 RETURN $1;
             END $$;
             CREATE INDEX jobs_boom_idx ON jobs (test_boom(id));",
        )
        .await
        .unwrap();
    client
        .batch_execute("SET steward_test.boom = 'on'")
        .await
        .unwrap();
    let err = client
        .batch_execute("REINDEX INDEX CONCURRENTLY jobs_boom_idx")
        .await
        .expect_err("the rebuild raises");
    assert!(format!("{err:?}").contains("boom"), "{err:?}");
    client
        .batch_execute("RESET steward_test.boom")
        .await
        .unwrap();
    let invalid = invalid_indexes(client).await;
    assert!(
        invalid.iter().any(|i| i == "jobs_boom_idx_ccnew"),
        "{invalid:?}"
    );
    "jobs_boom_idx_ccnew"
}

/// A window around the current UTC time (`covering`) or one that starts an hour from now.
fn window(covering: bool) -> String {
    let now = Utc::now();
    let (start, end) = if covering {
        (now - Span::hours(1), now + Span::hours(1))
    } else {
        (now + Span::hours(1), now + Span::hours(2))
    };
    format!(
        "{:02}:{:02}-{:02}:{:02}",
        start.hour(),
        start.minute(),
        end.hour(),
        end.minute()
    )
}

fn repairing(covering: bool) -> TableHealth {
    let config: Config = toml::from_str(&format!(
        "reindex = true\nwindow = \"{}\"\nreindex_min_bytes = 0\nreindex_bloat_ratio = 0.5",
        window(covering)
    ))
    .unwrap();
    assert_eq!(config.validate(), vec![]);
    TableHealth::new(config)
}

/// Runs passes until `done` holds for one's outcome (the statistics views are updated
/// asynchronously), or panics after 30 s naming `what`.
async fn run_until(
    branch: &dyn Branch,
    client: &mut Client,
    what: &str,
    done: impl Fn(&Outcome) -> bool,
) -> Outcome {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let outcome = run(branch, client).await;
        if done(&outcome) {
            return outcome;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {:?}",
            report(&outcome)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn reports_every_table_and_index_of_its_schema_only() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    jobs(&client, 1000).await;
    client
        .batch_execute(
            "SELECT create_archive_partition((now() AT TIME ZONE 'UTC')::date + d)
             FROM generate_series(0, 2) AS d;
             CREATE TABLE public.not_steward (x int PRIMARY KEY);
             CREATE SCHEMA other;
             CREATE TABLE other.jobs (x int PRIMARY KEY);",
        )
        .await
        .unwrap();
    let expected_tables: Vec<String> = client
        .query(
            "SELECT relname::text FROM pg_class
             WHERE relnamespace = current_schema()::regnamespace AND relkind IN ('r', 'p')
               AND NOT relispartition ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let expected_indexes: Vec<(String, String)> = client
        .query(
            "SELECT t.relname::text, c.relname::text FROM pg_index i
             JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_class t ON t.oid = i.indrelid
             WHERE c.relnamespace = current_schema()::regnamespace ORDER BY 1, 2",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(expected_tables.contains(&"job_archive".to_owned()));

    let branch = TableHealth::new(Config::default());
    let outcome = run_until(&branch, &mut client, "the jobs' live tuples", |o| {
        report(o)
            .tables
            .iter()
            .any(|t| t.table == "jobs" && t.live_tuples == 1000)
    })
    .await;
    assert_eq!(outcome.rows, 0, "the default is read-only");
    let report = report(&outcome);
    let tables: Vec<&str> = report.tables.iter().map(|t| t.table.as_str()).collect();
    assert_eq!(
        tables, expected_tables,
        "each table of the schema once, the archive's partitions under job_archive"
    );
    let indexes: Vec<(String, String)> = report
        .indexes
        .iter()
        .map(|i| (i.table.clone(), i.index.clone()))
        .collect();
    assert_eq!(indexes, expected_indexes);
    assert!(report.indexes.iter().all(|i| i.valid), "{report:?}");

    let jobs = report.tables.iter().find(|t| t.table == "jobs").unwrap();
    assert!(jobs.bytes > 8192, "{jobs:?}");
    assert!(jobs.last_analyze.is_some(), "analyzed above: {jobs:?}");
    let pkey = index(report, "jobs_pkey").unwrap();
    assert_eq!(pkey.table, "jobs");
    assert!(pkey.bytes >= 2 * 8192, "{pkey:?}");
    assert!(
        pkey.bloat_bytes.is_some(),
        "a fresh b-tree with statistics is estimated: {pkey:?}"
    );
    // Freshly built and filled in order: little or no bloat.
    assert!(pkey.bloat_bytes.unwrap() <= pkey.bytes / 2, "{pkey:?}");
}

#[tokio::test]
async fn dead_tuples_vacuums_and_index_bloat_are_seen() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    // The dead tuples must wait for the test's VACUUM, not autovacuum's.
    client
        .batch_execute("ALTER TABLE jobs SET (autovacuum_enabled = false)")
        .await
        .unwrap();
    jobs(&client, 20_000).await;
    let branch = TableHealth::new(Config::default());
    let before = run(&branch, &mut client).await;
    let pkey_before = index(report(&before), "jobs_pkey").unwrap().clone();

    client
        .execute("DELETE FROM jobs WHERE id % 10 <> 0", &[])
        .await
        .unwrap();
    client
        .batch_execute("SELECT pg_stat_force_next_flush()")
        .await
        .unwrap();
    run_until(&branch, &mut client, "18,000 dead tuples in jobs", |o| {
        report(o)
            .tables
            .iter()
            .any(|t| t.table == "jobs" && t.dead_tuples >= 18_000)
    })
    .await;

    client.batch_execute("VACUUM ANALYZE jobs").await.unwrap();
    client
        .batch_execute("SELECT pg_stat_force_next_flush()")
        .await
        .unwrap();
    let outcome = run_until(&branch, &mut client, "the vacuum", |o| {
        report(o)
            .tables
            .iter()
            .any(|t| t.table == "jobs" && t.last_vacuum.is_some() && t.dead_tuples == 0)
    })
    .await;
    let report = report(&outcome);
    let pkey = index(report, "jobs_pkey").unwrap();
    // The pages stay, a tenth full: most of the index is bloat now.
    assert!(pkey.bytes >= pkey_before.bytes, "{pkey:?} {pkey_before:?}");
    let bloat = pkey.bloat_bytes.expect("estimated");
    assert!(
        bloat as f64 > 0.7 * pkey.bytes as f64,
        "bloat {bloat} of {} bytes",
        pkey.bytes
    );
    let jobs = report.tables.iter().find(|t| t.table == "jobs").unwrap();
    assert_eq!(jobs.live_tuples, 2000, "{jobs:?}");
    assert!(
        jobs.bloat_bytes
            .is_some_and(|b| b as f64 > 0.5 * jobs.bytes as f64),
        "nine rows in ten are free space now: {jobs:?}"
    );
}

#[tokio::test]
async fn an_invalid_index_is_reported_and_the_default_repairs_nothing() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    jobs(&client, 5000).await;
    failed_unique_index(&client).await;
    let leftover = failed_reindex(&client).await;
    bloat_jobs(&client).await;
    let pkey = filenode(&client, "jobs_pkey").await;

    let branch = TableHealth::new(Config::default());
    for _ in 0..3 {
        let outcome = run(&branch, &mut client).await;
        let report = report(&outcome);
        assert_eq!(outcome.rows, 0);
        for name in ["jobs_queue_unique_idx", leftover] {
            let invalid = index(report, name).unwrap_or_else(|| panic!("{name}: {report:?}"));
            assert!(!invalid.valid && invalid.table == "jobs", "{invalid:?}");
        }
        assert!(index(report, "jobs_pkey").unwrap().valid);
    }
    assert_eq!(
        invalid_indexes(&client).await,
        ["jobs_boom_idx_ccnew", "jobs_queue_unique_idx"],
        "nothing dropped"
    );
    assert_eq!(
        filenode(&client, "jobs_pkey").await,
        pkey,
        "nothing rebuilt"
    );

    // A window is not enough: reindex must be on.
    let windowed: Config = toml::from_str(&format!(
        "window = \"{}\"\nreindex_min_bytes = 0",
        window(true)
    ))
    .unwrap();
    let outcome = run(&TableHealth::new(windowed), &mut client).await;
    assert_eq!(outcome.rows, 0);
    assert_eq!(invalid_indexes(&client).await.len(), 2);
    assert_eq!(filenode(&client, "jobs_pkey").await, pkey);
}

#[tokio::test]
async fn outside_its_window_it_repairs_nothing() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    jobs(&client, 5000).await;
    failed_reindex(&client).await;
    bloat_jobs(&client).await;
    let pkey = filenode(&client, "jobs_pkey").await;
    let branch = repairing(false);
    for _ in 0..3 {
        assert_eq!(run(&branch, &mut client).await.rows, 0);
    }
    assert_eq!(invalid_indexes(&client).await, ["jobs_boom_idx_ccnew"]);
    assert_eq!(filenode(&client, "jobs_pkey").await, pkey);
}

#[tokio::test]
async fn in_its_window_it_drops_a_leftover_first_then_rebuilds_bloated_indexes_one_a_pass() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    jobs(&client, 5000).await;
    failed_unique_index(&client).await;
    let leftover = failed_reindex(&client).await;
    bloat_jobs(&client).await;
    let branch = repairing(true);

    let first = run(&branch, &mut client).await;
    assert_eq!(first.rows, 1);
    assert!(
        !index(report(&first), leftover).unwrap().valid,
        "the report is of before the repair"
    );
    assert_eq!(
        invalid_indexes(&client).await,
        ["jobs_queue_unique_idx"],
        "the leftover is dropped; an index whose own build failed is only reported"
    );

    // Then the bloated indexes, the most bloated first, one a pass.
    let before = run(&branch, &mut client).await;
    let (mut bloated, _): (Vec<&IndexStats>, _) = report(&before)
        .indexes
        .iter()
        .filter(|i| i.valid)
        .partition(|i| {
            i.bloat_bytes
                .is_some_and(|b| b as f64 > 0.5 * i.bytes as f64)
        });
    assert!(!bloated.is_empty(), "{:?}", report(&before));
    assert_eq!(before.rows, 1);
    bloated.sort_by_key(|i| std::cmp::Reverse(i.bloat_bytes));
    let mut passes = 1;
    loop {
        let outcome = run(&branch, &mut client).await;
        if outcome.rows == 0 {
            break;
        }
        passes += 1;
        assert!(passes <= bloated.len() + 1, "{:?}", report(&outcome));
    }
    let after = run(&branch, &mut client).await;
    assert_eq!(after.rows, 0);
    for index in report(&after).indexes.iter().filter(|i| i.valid) {
        let share = index.bloat_bytes.unwrap_or(0) as f64 / index.bytes.max(1) as f64;
        assert!(share <= 0.5, "{index:?} was rebuilt");
    }
    let pkey_before = index(report(&before), "jobs_pkey").unwrap();
    let pkey_after = index(report(&after), "jobs_pkey").unwrap();
    assert!(
        pkey_after.bytes < pkey_before.bytes / 2,
        "{pkey_after:?} {pkey_before:?}"
    );
    assert_eq!(invalid_indexes(&client).await, ["jobs_queue_unique_idx"]);
}

#[tokio::test]
async fn instances_repairing_at_the_same_instant_repair_once() {
    let db = db_with_leader().await;
    let client = db.client().await;
    jobs(&client, 2000).await;
    failed_reindex(&client).await;
    let branch = repairing(true);
    let rows = run_concurrently(&db, &branch, 3, 1).await;
    assert_eq!(rows.iter().sum::<u64>(), 1, "{rows:?}");
    assert_eq!(invalid_indexes(&client).await, Vec::<String>::new());
}

#[tokio::test]
async fn a_stale_term_reads_and_repairs_nothing() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    jobs(&client, 100).await;
    failed_reindex(&client).await;
    let err = run_as(&repairing(true), &mut client, EPOCH - 1)
        .await
        .unwrap_err();
    assert_fenced(err);
    assert_eq!(invalid_indexes(&client).await, ["jobs_boom_idx_ccnew"]);
}

#[tokio::test]
async fn the_maintenance_role_reads_and_a_refused_repair_is_skipped() {
    let db = db_with_leader().await;
    let admin = db.client().await;
    jobs(&admin, 100).await;
    failed_reindex(&admin).await;
    let role = steward_testkit::TestRole::maintenance(&db).await;
    let mut client = role_client(&db, &role).await;
    let outcome = run(&repairing(true), &mut client).await;
    assert_eq!(outcome.rows, 0);
    assert!(index(report(&outcome), "jobs_boom_idx_ccnew").is_some());
    let skipped: Vec<&Observation> = outcome
        .observations
        .iter()
        .filter(|o| matches!(o, Observation::Skipped { .. }))
        .collect();
    assert!(
        matches!(skipped.as_slice(), [Observation::Skipped { what, reason }]
            if what.contains("jobs_boom_idx_ccnew") && reason.contains("owner")),
        "{skipped:?}"
    );
    // The lock was released: the owner can repair at once.
    let mut admin = db.client().await;
    assert_eq!(run(&repairing(true), &mut admin).await.rows, 1);
}

async fn role_client(db: &TestDb, role: &steward_testkit::TestRole) -> Client {
    steward_connection::Target::new(role.url(), db.schema().clone())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

#[test]
fn config_names_what_it_refuses() {
    assert_eq!(config_problems("table_health", ""), Ok(vec![]));
    assert_eq!(
        config_problems("table_health", "reindex = true"),
        Ok(vec!["window".to_owned()])
    );
    assert_eq!(
        config_problems(
            "table_health",
            "reindex = true\nwindow = \"02:00-04:00\"\nreindex_timeout = \"30m\""
        ),
        Ok(vec![])
    );
    let config = config("table_health", "reindex = true\nwindow = \"2am-4am\"").unwrap();
    let problems = config.validate();
    assert_eq!(problems.len(), 1, "{problems:?}");
    let message = problems[0].to_string();
    assert!(
        message.contains("branches.table_health.window")
            && message.contains("\"2am-4am\"")
            && message.contains("HH:MM-HH:MM"),
        "{message}"
    );
    assert_eq!(
        config_problems("table_health", "reindex_bloat_ratio = 0.0"),
        Ok(vec!["reindex_bloat_ratio".to_owned()])
    );
    let err = config_problems("table_health", "reindex_window = \"02:00-04:00\"").unwrap_err();
    assert!(err.contains("reindex_window"), "{err}");
    let err = config_problems("table_health", "reindex = \"yes\"").unwrap_err();
    assert!(err.contains("reindex"), "{err}");
}
