//! The maintenance process runs as the least-privilege role of `steward role create`: a real
//! `Candidate` logged in as that role runs every default branch, and each one does its work;
//! the role cannot read, write or create anything outside what the branches need.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use steward_branches::cron_sync::ScheduleConfig;
use steward_branches::{BranchesConfig, RetryConfig};
use steward_connection::Target;
use steward_leader::{BranchRun, Candidate, LeaderSettings, LeadershipEvent, Observer, RunResult};
use steward_testkit::{TestDb, TestRole};
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

/// Generous: every branch acts within a second or two of the term's start.
const DEADLINE: Duration = Duration::from_secs(60);

#[derive(Default)]
struct Recorder {
    runs: Mutex<Vec<(&'static str, RunResult, u64)>>,
    acquired: Mutex<Vec<i64>>,
}

impl Observer for Recorder {
    fn branch_run(&self, run: &BranchRun<'_>) {
        let entry = (run.branch, run.result.clone(), run.rows);
        self.runs.lock().unwrap().push(entry);
    }
    fn leadership(&self, event: &LeadershipEvent) {
        if let LeadershipEvent::Acquired { epoch } = event {
            self.acquired.lock().unwrap().push(*epoch);
        }
    }
}

/// Polls `sql` (one boolean) until it is true.
async fn until(client: &Client, what: &str, sql: &str) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let row = client
            .query_one(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{what}: {sql}: {e}"));
        if row.get::<_, bool>(0) {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Each distinct (branch, result) among the passes that were not Ok.
fn failed_passes(runs: &[(&'static str, RunResult, u64)]) -> Vec<(&'static str, RunResult)> {
    let mut failed: Vec<_> = runs
        .iter()
        .filter(|(_, r, _)| *r != RunResult::Ok)
        .map(|(b, r, _)| (*b, r.clone()))
        .collect();
    failed.sort_by_key(|(b, _)| *b);
    failed.dedup();
    failed
}

async fn denied(client: &Client, statement: &str) {
    let err = client
        .batch_execute(statement)
        .await
        .expect_err(&format!("the role may not run {statement}"));
    assert_eq!(
        err.code(),
        Some(&SqlState::INSUFFICIENT_PRIVILEGE),
        "{statement}: {err}"
    );
}

fn branches() -> BranchesConfig {
    let mut c = BranchesConfig::default();
    let fast = Duration::from_millis(300);
    // Rescued jobs with attempts left stay retryable (not promoted again) for the whole test.
    let retry = RetryConfig {
        base: Duration::from_secs(3600),
        max: Duration::from_secs(7200),
        jitter: 0.0,
    };
    c.promote_scheduled.interval = Duration::from_millis(100);
    c.rescue_stale_heartbeats.interval = fast;
    c.rescue_stale_heartbeats.staleness = Duration::from_secs(600);
    c.rescue_stale_heartbeats.quiet_period = Some(Duration::ZERO);
    c.rescue_stale_heartbeats.retry = retry;
    for rescue in [
        &mut c.rescue_expired_deadlines,
        &mut c.rescue_expired_callbacks,
    ] {
        rescue.interval = fast;
        rescue.quiet_period = Duration::ZERO;
        rescue.retry = retry;
    }
    c.cleanup.interval = fast;
    c.cron_sync.interval = fast;
    c.cron_sync.schedules = vec![ScheduleConfig::new(
        "lp-every-minute",
        "* * * * *",
        "lp.tick",
    )];
    c.queue_stats.interval = fast;
    c.refresh_admin_metadata.interval = fast;
    c.recompute_dirty_admin_metadata.interval = fast;
    c.priority_aging.interval = fast;
    c.rotate_archive.interval = fast;
    // Read-only (reindex is off by default): catalog and statistics views only.
    c.table_health.interval = fast;
    assert_eq!(c.validate(), vec![]);
    c
}

/// Work for every branch, seeded as the superuser. Queue `lp` unless said otherwise; `note`
/// names each job for the assertions.
const SEED: &str = "
INSERT INTO jobs (queue, kind, state, priority, original_priority, attempt, max_attempts,
                  run_lease, run_at, attempted_at, heartbeat_at, deadline_at, callback_id,
                  callback_timeout_at, finalized_at, args)
VALUES
 ('lp', 'k', 'scheduled', 2, 2, 0, 5, 0, now() - interval '1 minute', NULL, NULL, NULL, NULL, NULL, NULL,
  '{\"note\": \"due_scheduled\"}'),
 ('lp', 'k', 'retryable', 2, 2, 1, 5, 1, now() - interval '1 minute', now() - interval '2 minutes', NULL, NULL, NULL, NULL, NULL,
  '{\"note\": \"due_retryable\"}'),
 ('lp', 'k', 'running', 2, 2, 1, 5, 1, now() - interval '1 hour', now() - interval '1 hour', now() - interval '1 hour', NULL, NULL, NULL, NULL,
  '{\"note\": \"stale_retry\"}'),
 ('lp', 'k', 'running', 2, 2, 1, 1, 1, now() - interval '1 hour', now() - interval '1 hour', now() - interval '1 hour', NULL, NULL, NULL, NULL,
  '{\"note\": \"stale_last_attempt\"}'),
 ('lp', 'k', 'running', 2, 2, 1, 5, 1, now() - interval '1 hour', now() - interval '1 hour', now(), now() - interval '1 minute', NULL, NULL, NULL,
  '{\"note\": \"deadline\"}'),
 ('lp', 'k', 'waiting_external', 2, 2, 1, 5, 1, now() - interval '1 hour', now() - interval '1 hour', now() - interval '1 hour', NULL,
  gen_random_uuid(), now() - interval '1 minute', NULL, '{\"note\": \"callback\"}'),
 ('lp', 'k', 'completed', 2, 2, 1, 5, 1, now() - interval '2 days', now() - interval '2 days', NULL, NULL, NULL, NULL, now() - interval '2 days',
  '{\"note\": \"old_completed\"}'),
 ('lp', 'k', 'failed', 2, 2, 5, 5, 1, now() - interval '4 days', now() - interval '4 days', NULL, NULL, NULL, NULL, now() - interval '4 days',
  '{\"note\": \"old_failed\"}'),
 ('lp', 'k', 'available', 3, 3, 0, 5, 0, now() - interval '20 minutes', NULL, NULL, NULL, NULL, NULL, NULL,
  '{\"note\": \"aging\"}'),
 ('lp_quiet', 'k', 'available', 1, 1, 0, 5, 0, now(), NULL, NULL, NULL, NULL, NULL, NULL,
  '{\"note\": \"quiet\"}');
-- A stale count for a queue with no jobs: only the full refresh removes it.
INSERT INTO queue_counts (queue, state, count, updated_at)
VALUES ('lp_ghost', 'available', 99, now() - interval '1 day');
-- A fire record past fire_retention (7 days): cron_sync prunes it.
INSERT INTO cron_fires (schedule_name, fire_at, job_id, enqueued_at)
VALUES ('lp-gone', now() - interval '30 days', 0, now() - interval '30 days');
-- An archive partition past retention_days (14): rotate_archive drops it.
SELECT create_archive_partition((now() AT TIME ZONE 'UTC')::date - 30);
-- A hardened install revokes EXECUTE from PUBLIC: the role holds a grant of its own for every
-- function a branch calls (fence, retry_backoff, wake_promoter, the partition functions).
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA steward FROM PUBLIC;
-- Outside Steward's schema.
CREATE TABLE public.secrets (x int);
INSERT INTO public.secrets VALUES (42);
CREATE SCHEMA other;
CREATE TABLE other.secrets (x int);
INSERT INTO other.secrets VALUES (42);
";

/// What each branch must have done, as SQL booleans over the database.
const EFFECTS: &[(&str, &str)] = &[
    (
        "promote_scheduled: the due scheduled and retryable jobs are available",
        "SELECT count(*) = 2 FROM jobs WHERE args->>'note' IN ('due_scheduled', 'due_retryable')
           AND state = 'available'",
    ),
    (
        "rescue_stale_heartbeats: the stale jobs retry or fail",
        "SELECT count(*) = 2 FROM jobs
         WHERE ((args->>'note' = 'stale_retry' AND state = 'retryable' AND run_at > now() + interval '30 minutes')
             OR (args->>'note' = 'stale_last_attempt' AND state = 'failed' AND finalized_at IS NOT NULL))
           AND errors @> '[{\"reason\": \"heartbeat_stale\"}]'",
    ),
    (
        "rescue_expired_deadlines: the job past its deadline retries",
        "SELECT count(*) = 1 FROM jobs WHERE args->>'note' = 'deadline' AND state = 'retryable'
           AND errors @> '[{\"reason\": \"deadline_expired\"}]'",
    ),
    (
        "rescue_expired_callbacks: the job whose callback timed out retries",
        "SELECT count(*) = 1 FROM jobs WHERE args->>'note' = 'callback' AND state = 'retryable'
           AND callback_timeout_at IS NULL AND errors @> '[{\"reason\": \"callback_timeout\"}]'",
    ),
    (
        "cleanup: the finished jobs past retention moved to job_archive",
        "SELECT NOT EXISTS (SELECT 1 FROM jobs WHERE args->>'note' IN ('old_completed', 'old_failed'))
            AND (SELECT count(*) FROM job_archive
                 WHERE args->>'note' IN ('old_completed', 'old_failed')) = 2",
    ),
    (
        "cron_sync: the config schedule is stored and its fires enqueued, the old fire pruned",
        "SELECT EXISTS (SELECT 1 FROM cron_schedules WHERE name = 'lp-every-minute' AND source = 'config')
            AND EXISTS (SELECT 1 FROM cron_fires f JOIN jobs j ON j.id = f.job_id
                        WHERE f.schedule_name = 'lp-every-minute' AND j.kind = 'lp.tick')
            AND NOT EXISTS (SELECT 1 FROM cron_fires WHERE schedule_name = 'lp-gone')",
    ),
    (
        "queue_stats: a snapshot of the lp queue",
        "SELECT EXISTS (SELECT 1 FROM queue_stats WHERE queue = 'lp' AND state = 'available'
                        AND depth >= 1 AND oldest_available_age_secs > 60)",
    ),
    (
        "refresh_admin_metadata: the stale count is gone",
        "SELECT NOT EXISTS (SELECT 1 FROM queue_counts WHERE queue = 'lp_ghost')",
    ),
    (
        "recompute_dirty_admin_metadata: the quiet queue was taken off dirty_queues and counted",
        "SELECT NOT EXISTS (SELECT 1 FROM dirty_queues WHERE queue = 'lp_quiet')
            AND EXISTS (SELECT 1 FROM queue_counts WHERE queue = 'lp_quiet' AND state = 'available' AND count = 1)",
    ),
    (
        "priority_aging: the job waiting 20 minutes is at priority 1",
        "SELECT count(*) = 1 FROM jobs WHERE args->>'note' = 'aging' AND priority = 1 AND original_priority = 3",
    ),
    (
        "rotate_archive: partitions up to 3 days ahead exist, the expired one is dropped",
        "SELECT bool_and(to_regclass(format('job_archive_p%s', to_char(d, 'YYYYMMDD'))) IS NOT NULL)
            AND to_regclass(format('job_archive_p%s',
                to_char((now() AT TIME ZONE 'UTC')::date - 30, 'YYYYMMDD'))) IS NULL
         FROM generate_series(0, 3) g, LATERAL (SELECT (now() AT TIME ZONE 'UTC')::date + g AS d) days",
    ),
];

/// The wedge takeover's statement (steward-leader's `session::TERMINATE_INSTANCE`, private).
const TERMINATE_INSTANCE: &str = "
SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))
FROM pg_stat_activity
WHERE application_name LIKE $1 AND pid <> pg_backend_pid()";

#[tokio::test]
async fn every_branch_runs_as_the_maintenance_role_and_nothing_else_is_reachable() {
    let started = Instant::now();
    let db = TestDb::new().await;
    let admin = db.client().await;
    // What `steward role create` does, then the login an operator gives it.
    let test_role = TestRole::maintenance(&db).await;
    let role = test_role.name().to_owned();
    admin.batch_execute(SEED).await.unwrap();
    let role_url = test_role.url().to_owned();
    let role_target = Target::new(&role_url, db.schema().clone()).unwrap();

    let config = branches();
    let built = config.build();
    let names: Vec<&'static str> = built.iter().map(|b| b.name()).collect();
    assert_eq!(names, steward_branches::NAMES, "every branch runs");
    let recorder = Arc::new(Recorder::default());
    let settings = LeaderSettings {
        probe_interval: Duration::from_millis(200),
        progress_interval: Duration::from_millis(200),
        reconnect_min: Duration::from_millis(50),
        ..LeaderSettings::default()
    };
    let candidate = Arc::new(
        Candidate::new(role_target.clone(), settings, built)
            .expect("valid settings")
            .with_observer(recorder.clone()),
    );
    let shutdown = CancellationToken::new();
    let task = tokio::spawn({
        let (candidate, shutdown) = (candidate.clone(), shutdown.clone());
        async move { candidate.run(shutdown).await }
    });

    // Every branch passes with Ok.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let runs = recorder.runs.lock().unwrap().clone();
        let missing: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| !runs.iter().any(|(b, r, _)| b == n && *r == RunResult::Ok))
            .collect();
        if missing.is_empty() {
            break;
        }
        // A missing grant fails every pass: say so after three, rather than at the deadline.
        let stuck = missing.iter().any(|n| {
            runs.iter()
                .filter(|(b, r, _)| b == n && *r != RunResult::Ok)
                .count()
                >= 3
        });
        assert!(
            !stuck && Instant::now() < deadline && !task.is_finished(),
            "no Ok pass of {missing:?}; failed passes: {:?}",
            failed_passes(&runs)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ... and did its work.
    for (what, sql) in EFFECTS {
        until(&admin, what, sql).await;
    }

    // The term started as the role: epoch recorded, the term logged, health written.
    let epoch = *recorder.acquired.lock().unwrap().first().expect("elected");
    assert!(epoch >= 1);
    let status = steward_leader::status::read(&admin, db.schema())
        .await
        .unwrap();
    let leader = status
        .leader
        .expect("the lock is held and the term recorded");
    assert_eq!(
        (leader.epoch, leader.instance.as_str()),
        (epoch, candidate.instance())
    );
    let backend_recorded: bool = admin
        .query_one(
            "SELECT backend_pid IS NOT NULL FROM leader WHERE id = 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(backend_recorded);
    let terms: i64 = admin
        .query_one(
            "SELECT count(*) FROM leader_terms WHERE epoch = $1 AND instance = $2",
            &[&epoch, &candidate.instance()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(terms, 1);
    // Health written: a success of every branch in this term, as `steward status` reads it.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let status = steward_leader::status::read(&admin, db.schema())
            .await
            .unwrap();
        let succeeded: Vec<&str> = status
            .branches
            .iter()
            .filter(|b| b.epoch == epoch && b.last_success_at.is_some())
            .map(|b| b.branch.as_str())
            .collect();
        if steward_branches::NAMES
            .iter()
            .all(|n| succeeded.contains(n))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "branch_health has successes of {succeeded:?} only"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Every one of the candidate's sessions is the role's.
    let sessions = admin
        .query(
            "SELECT usename::text FROM pg_stat_activity WHERE application_name LIKE $1",
            &[&format!("steward:{}:%", candidate.instance())],
        )
        .await
        .unwrap();
    assert!(sessions.len() >= 3, "leader, slo and hygiene sessions");
    assert!(sessions.iter().all(|r| r.get::<_, String>(0) == role));
    // No pass failed, for any reason (a missing grant shows here first).
    let failures = failed_passes(&recorder.runs.lock().unwrap());
    assert!(failures.is_empty(), "failed passes: {failures:?}");

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("the candidate stops within 30 s")
        .unwrap()
        .expect("clean stop");
    // The step-down was recorded as the role too.
    let ended: Option<String> = admin
        .query_one(
            "SELECT end_reason FROM leader_terms WHERE epoch = $1",
            &[&epoch],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(ended.as_deref(), Some("stepped_down"));

    // Nothing outside what the branches need.
    let client = role_target
        .named("steward-lp-check")
        .connect()
        .await
        .unwrap();
    let user: String = client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(user, role);
    for statement in [
        "SELECT * FROM public.secrets",
        "INSERT INTO public.secrets VALUES (1)",
        "UPDATE public.secrets SET x = 0",
        "DELETE FROM public.secrets",
        "SELECT * FROM other.secrets",
        "INSERT INTO other.secrets VALUES (1)",
        "DELETE FROM other.secrets",
        // PostgreSQL 15 no longer grants CREATE on public to PUBLIC.
        "CREATE TABLE public.lp_new (x int)",
        "CREATE TABLE other.lp_new (x int)",
        "CREATE TABLE lp_new (x int)",
        "CREATE TABLE steward.lp_new (x int)",
        "CREATE SCHEMA lp_new",
        "TRUNCATE jobs",
        "DROP TABLE job_archive",
    ] {
        denied(&client, statement).await;
    }
    let intact: i64 = admin
        .query_one(
            "SELECT (SELECT count(*) FROM public.secrets) + (SELECT count(*) FROM other.secrets)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(intact, 2);

    // The wedge takeover: a session of the role ends another session of the role.
    let victim = role_target
        .named("steward:lpvictim:leader")
        .connect()
        .await
        .unwrap();
    victim.simple_query("SELECT 1").await.unwrap();
    let ended: i64 = client
        .query_one(TERMINATE_INSTANCE, &[&"steward:lpvictim:%"])
        .await
        .unwrap()
        .get(0);
    assert_eq!(ended, 1);
    let deadline = Instant::now() + DEADLINE;
    while victim.simple_query("SELECT 1").await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "the terminated session still answers"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("least_privilege took {:?}", started.elapsed());
}
