//! Every row of the behaviour table, acted out by the workload's steward-worker against a real
//! PostgreSQL with a real leader rescuing: each job ends as its row says, and the rescue its
//! row names is what took its first run back.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use steward_branches::{Branch, BranchesConfig};
use steward_leader::{Candidate, LeaderSettings};
use steward_queue::{Queue, RetryPolicy};
use steward_testkit::TestDb;
use steward_worker::WorkerSettings;
use steward_workload::behaviour::{Ends, TABLE};
use steward_workload::{Behaviour, Timings, Workload, WorkloadConfig};
use tokio_util::sync::CancellationToken;

const QUEUE: &str = "behaviours";
const KIND: &str = "behaviours.job";
const STALENESS: Duration = Duration::from_secs(3);

/// A leader running every branch, with a 3 s staleness, rescues every 100 ms from the start of
/// its term and quick retries; it has published its staleness when this returns.
async fn leader(db: &TestDb) -> CancellationToken {
    let mut config = BranchesConfig::default();
    config.rescue_stale_heartbeats.staleness = STALENESS;
    config.rescue_stale_heartbeats.interval = Duration::from_millis(100);
    config.rescue_stale_heartbeats.quiet_period = Some(Duration::ZERO);
    for expiry in [
        &mut config.rescue_expired_deadlines,
        &mut config.rescue_expired_callbacks,
    ] {
        expiry.interval = Duration::from_millis(100);
        expiry.quiet_period = Duration::ZERO;
    }
    for retry in [
        &mut config.rescue_stale_heartbeats.retry,
        &mut config.rescue_expired_deadlines.retry,
        &mut config.rescue_expired_callbacks.retry,
    ] {
        retry.base = Duration::from_millis(100);
        retry.max = Duration::from_millis(500);
    }
    assert_eq!(config.validate(), vec![]);
    let branches: Vec<Arc<dyn Branch>> = config.build();
    let candidate = Arc::new(
        Candidate::new(db.target().clone(), LeaderSettings::default(), branches)
            .expect("valid leader settings"),
    );
    let stop = CancellationToken::new();
    tokio::spawn({
        let (candidate, stop) = (candidate.clone(), stop.clone());
        async move { candidate.run(stop).await }
    });
    let client = db.client().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !client
        .query_one("SELECT heartbeat_staleness IS NOT NULL FROM leader", &[])
        .await
        .unwrap()
        .get::<_, bool>(0)
    {
        assert!(
            Instant::now() < deadline,
            "the leader published no staleness"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_behaviour_ends_as_its_row_says() {
    let db = TestDb::new().await;
    let stop_leader = leader(&db).await;
    let queue = Queue::new(db.pool(4));
    let timings = Timings {
        slow_for: Duration::from_millis(500),
        long_for: Duration::from_secs(1),
        answer_timeout: Duration::from_secs(5),
        ..Timings::default()
    };
    // No producer: one job of each behaviour, enqueued here.
    let config = WorkloadConfig {
        queue: QUEUE.to_owned(),
        kind: KIND.to_owned(),
        rate: 0.0,
        max_attempts: 3,
        workers: 1,
        concurrency: 20,
        worker: WorkerSettings {
            heartbeat_interval: Duration::from_millis(500),
            assumed_staleness: STALENESS,
            poll_interval: Duration::from_millis(50),
            shutdown_grace: Duration::from_millis(500),
            retry: RetryPolicy {
                base: Duration::from_millis(100),
                max: Duration::from_millis(500),
                jitter: 0.1,
            },
            ..WorkerSettings::default()
        },
        keep_books: true,
        timings: timings.clone(),
        ..WorkloadConfig::default()
    };
    let workload = Workload::start(queue.clone(), db.target(), config)
        .await
        .expect("starting the workload");
    let mut ids: BTreeMap<i64, Behaviour> = BTreeMap::new();
    for (token, row) in TABLE.iter().enumerate() {
        let mut job = row
            .behaviour
            .job(KIND, QUEUE, token as u64, &timings)
            .max_attempts(3);
        if row.behaviour == Behaviour::Cancelled {
            job = job.run_in(Duration::from_secs(2));
        }
        let enqueued = queue.enqueue(&job).await.expect("enqueueing");
        ids.insert(enqueued.id(), row.behaviour);
    }
    let cancelled = ids
        .iter()
        .find(|(_, b)| **b == Behaviour::Cancelled)
        .map(|(id, _)| *id)
        .expect("a cancelled job");
    assert!(queue.cancel(cancelled).await.expect("cancelling"));

    let client = db.client().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let rows = loop {
        let rows = client
            .query(
                "SELECT id, state::text, errors FROM jobs WHERE queue = $1 ORDER BY id",
                &[&QUEUE],
            )
            .await
            .unwrap();
        let done = rows.iter().all(|r| {
            matches!(
                r.get::<_, String>(1).as_str(),
                "completed" | "failed" | "cancelled"
            )
        });
        if done {
            break rows;
        }
        assert!(
            Instant::now() < deadline,
            "jobs still unfinished after 60 s: {:?}",
            rows.iter()
                .map(|r| (ids[&r.get::<_, i64>(0)].name(), r.get::<_, String>(1)))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let ledger = workload.stop().await;
    stop_leader.cancel();

    let mut problems = Vec::new();
    for row in &rows {
        let (id, state): (i64, String) = (row.get(0), row.get(1));
        let errors: serde_json::Value = row.get(2);
        let behaviour = ids[&id];
        let spec = behaviour.row();
        let ended_right = match spec.ends {
            Ends::Completed => state == "completed",
            Ends::Failed => state == "failed",
            Ends::CancelledOrCompleted => state == "cancelled" || state == "completed",
        };
        if !ended_right {
            problems.push(format!("{} ended {state}; errors {errors}", spec.name));
        }
        let first_reason = errors
            .as_array()
            .and_then(|e| e.iter().find(|e| e["attempt"] == 1))
            .and_then(|e| e["reason"].as_str());
        if let Some(rescue) = spec.rescued_by {
            if first_reason != Some(rescue) {
                problems.push(format!(
                    "{}: attempt 1 ended by {first_reason:?}, not the {rescue} rescue; errors {errors}",
                    spec.name
                ));
            }
        }
    }
    let books = ledger.books();
    assert!(
        problems.is_empty() && books.unexpected.is_empty(),
        "{problems:#?}; unexpected: {:?}; counts {:?}",
        books.unexpected,
        books.counts
    );
}
