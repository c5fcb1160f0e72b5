use chrono::Utc;
use serde_json::json;
use std::collections::HashSet;
use std::time::Duration;
use steward_queue::{
    Enqueued, FailOutcome, JobState, NewJob, Queue, QueueError, Resolution, RetryPolicy,
};
use steward_testkit::TestDb;

fn queue(db: &TestDb) -> Queue {
    Queue::new(db.pool(8))
}

async fn claim_one(q: &Queue, queue_name: &str) -> steward_queue::ClaimedJob {
    let mut claimed = q.claim(queue_name, 1).await.unwrap();
    assert_eq!(
        claimed.len(),
        1,
        "expected one job to claim in {queue_name}"
    );
    claimed.remove(0)
}

#[tokio::test]
async fn enqueue_sets_state_from_run_at_and_validates() {
    let db = TestDb::new().await;
    let q = queue(&db);
    let now_id = q
        .enqueue(&NewJob::new("email").args(json!({"to": "a"})))
        .await
        .unwrap()
        .id();
    let later_id = q
        .enqueue(&NewJob::new("email").run_in(Duration::from_secs(3600)))
        .await
        .unwrap()
        .id();
    let now_job = q.get(now_id).await.unwrap().unwrap();
    assert_eq!(now_job.state, JobState::Available);
    assert_eq!(now_job.args, json!({"to": "a"}));
    assert_eq!(
        (now_job.priority, now_job.original_priority, now_job.attempt),
        (2, 2, 0)
    );
    assert_eq!(
        q.get(later_id).await.unwrap().unwrap().state,
        JobState::Scheduled
    );

    for bad in [
        NewJob::new("k").priority(0),
        NewJob::new("k").priority(5),
        NewJob::new("k").max_attempts(0),
        NewJob::new("").queue("q"),
        NewJob::new("k").queue(""),
        NewJob::new("k").run_timeout(Duration::ZERO),
    ] {
        let err = q.enqueue(&bad).await.unwrap_err();
        assert!(
            matches!(err, QueueError::Invalid(_)),
            "{bad:?} gave {err:?}"
        );
    }
}

#[tokio::test]
async fn unique_keys_deduplicate_until_the_job_fails() {
    let db = TestDb::new().await;
    let q = queue(&db);
    let first = q.enqueue(&NewJob::new("k").unique_key("u1")).await.unwrap();
    let second = q.enqueue(&NewJob::new("k").unique_key("u1")).await.unwrap();
    assert!(matches!(first, Enqueued::New(_)));
    assert_eq!(second, Enqueued::Duplicate(first.id()));

    let job = claim_one(&q, "default").await;
    q.fail_permanently(job.lease, "boom").await.unwrap();
    let third = q.enqueue(&NewJob::new("k").unique_key("u1")).await.unwrap();
    assert!(
        matches!(third, Enqueued::New(id) if id != first.id()),
        "{third:?}"
    );
}

#[tokio::test]
async fn batch_enqueue_inserts_all_and_skips_taken_unique_keys() {
    let db = TestDb::new().await;
    let q = queue(&db);
    q.enqueue(&NewJob::new("k").unique_key("taken"))
        .await
        .unwrap();
    let mut jobs: Vec<NewJob> = (0..500)
        .map(|i| NewJob::new("bulk").queue("bulk").args(json!({ "i": i })))
        .collect();
    jobs.push(NewJob::new("k").unique_key("taken"));
    jobs.push(
        NewJob::new("k")
            .run_in(Duration::from_secs(60))
            .run_timeout(Duration::from_secs(5)),
    );
    let ids = q.enqueue_batch(&jobs).await.unwrap();
    assert_eq!(ids.len(), 501);
    let last = q.get(*ids.last().unwrap()).await.unwrap().unwrap();
    assert_eq!(last.state, JobState::Scheduled);
    assert!(q.enqueue_batch(&[]).await.unwrap().is_empty());
    let bad = q
        .enqueue_batch(&[NewJob::new("k").priority(9)])
        .await
        .unwrap_err();
    assert!(matches!(bad, QueueError::Invalid(_)));
}

#[tokio::test]
async fn claim_sets_running_lease_heartbeat_and_deadline_in_priority_order() {
    let db = TestDb::new().await;
    let q = queue(&db);
    let low = q.enqueue(&NewJob::new("k").priority(4)).await.unwrap().id();
    let high = q
        .enqueue(
            &NewJob::new("k")
                .priority(1)
                .run_timeout(Duration::from_secs(30)),
        )
        .await
        .unwrap()
        .id();
    q.enqueue(&NewJob::new("k").queue("other")).await.unwrap();
    q.enqueue(&NewJob::new("k").run_in(Duration::from_secs(3600)))
        .await
        .unwrap();

    let before = Utc::now();
    let claimed = q.claim("default", 10).await.unwrap();
    let ids: Vec<i64> = claimed.iter().map(|c| c.lease.job_id).collect();
    assert_eq!(
        ids,
        vec![high, low],
        "only available jobs of the queue, priority first"
    );
    let first = &claimed[0];
    assert_eq!((first.attempt, first.lease.run_lease), (1, 1));
    let deadline = first
        .deadline_at
        .expect("a run_timeout sets deadline_at at claim");
    assert!(
        deadline >= before + chrono::Duration::seconds(29),
        "{deadline}"
    );
    assert!(claimed[1].deadline_at.is_none());
    let row = q.get(high).await.unwrap().unwrap();
    assert_eq!(row.state, JobState::Running);
    assert!(row.heartbeat_at.is_some() && row.attempted_at.is_some());
    assert!(q.claim("default", 10).await.unwrap().is_empty());
}

#[tokio::test]
async fn heartbeat_and_complete() {
    let db = TestDb::new().await;
    let q = queue(&db);
    let id = q.enqueue(&NewJob::new("k")).await.unwrap().id();
    let job = claim_one(&q, "default").await;
    let first_beat = q.get(id).await.unwrap().unwrap().heartbeat_at.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    q.heartbeat(job.lease).await.unwrap();
    assert!(q.get(id).await.unwrap().unwrap().heartbeat_at.unwrap() > first_beat);
    assert!(q.heartbeat_many(&[job.lease]).await.unwrap().is_empty());
    q.complete(job.lease).await.unwrap();
    let done = q.get(id).await.unwrap().unwrap();
    assert_eq!(done.state, JobState::Completed);
    assert!(done.finalized_at.is_some());
    // A finished run can do nothing more.
    assert!(matches!(
        q.heartbeat(job.lease).await,
        Err(QueueError::LeaseLost { .. })
    ));
    assert!(matches!(
        q.complete(job.lease).await,
        Err(QueueError::LeaseLost { .. })
    ));
    assert_eq!(
        q.heartbeat_many(&[job.lease]).await.unwrap(),
        vec![job.lease]
    );
}

/// A run its own handler parked is reported parked, not lost: the worker must not cancel a
/// handler whose park committed before it heard back. A callback resolved since is lost.
#[tokio::test]
async fn a_heartbeat_reports_a_run_parked_under_its_lease_as_parked_not_lost() {
    let db = TestDb::new().await;
    let q = queue(&db);
    q.enqueue(&NewJob::new("k")).await.unwrap();
    q.enqueue(&NewJob::new("k")).await.unwrap();
    let running = claim_one(&q, "default").await;
    let parking = claim_one(&q, "default").await;
    let callback = q
        .wait_for_callback(parking.lease, Duration::from_secs(3600))
        .await
        .unwrap();
    let client = db.client().await;
    let report = steward_queue::heartbeat_leases(&client, &[running.lease, parking.lease])
        .await
        .unwrap();
    assert_eq!(report.renewed, vec![running.lease]);
    assert_eq!(report.parked, vec![parking.lease]);
    assert!(
        report.lost.is_empty() && report.busy.is_empty(),
        "{report:?}"
    );
    q.resolve_callback(callback, steward_queue::Resolution::Complete)
        .await
        .unwrap();
    let report = steward_queue::heartbeat_leases(&client, &[parking.lease])
        .await
        .unwrap();
    assert_eq!(report.lost, vec![parking.lease]);
}

#[tokio::test]
async fn fail_retries_with_backoff_then_fails_when_attempts_are_exhausted() {
    let db = TestDb::new().await;
    let q = queue(&db).with_retry_policy(RetryPolicy {
        base: Duration::from_secs(10),
        max: Duration::from_secs(3600),
        jitter: 0.0,
    });
    let id = q
        .enqueue(&NewJob::new("k").max_attempts(2))
        .await
        .unwrap()
        .id();

    let run1 = claim_one(&q, "default").await;
    let before = Utc::now();
    let outcome = q.fail(run1.lease, "first error").await.unwrap();
    let FailOutcome::Retrying { run_at } = outcome else {
        panic!("expected a retry, got {outcome:?}");
    };
    let delay = (run_at - before).num_milliseconds();
    assert!(
        (9_000..=11_000).contains(&delay),
        "attempt 1 backs off base=10s, got {delay} ms"
    );
    let job = q.get(id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Retryable);
    assert_eq!(job.error_entries().len(), 1);
    assert_eq!(job.error_entries()[0]["error"], "first error");
    assert_eq!(job.error_entries()[0]["attempt"], 1);

    // Make it due and available again (what promote_scheduled does), then fail the last attempt.
    let client = db.client().await;
    client
        .execute(
            "UPDATE jobs SET state = 'available', run_at = now() WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    let run2 = claim_one(&q, "default").await;
    assert_eq!(run2.attempt, 2);
    assert_eq!(
        q.fail(run2.lease, "second error").await.unwrap(),
        FailOutcome::Failed
    );
    let job = q.get(id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Failed);
    assert!(job.finalized_at.is_some());
    assert_eq!(job.error_entries().len(), 2);
}

#[tokio::test]
async fn fail_permanently_skips_retries() {
    let db = TestDb::new().await;
    let q = queue(&db);
    let id = q
        .enqueue(&NewJob::new("k").max_attempts(10))
        .await
        .unwrap()
        .id();
    let run = claim_one(&q, "default").await;
    assert_eq!(
        q.fail_permanently(run.lease, "bad input").await.unwrap(),
        FailOutcome::Failed
    );
    assert_eq!(q.get(id).await.unwrap().unwrap().state, JobState::Failed);
}

#[tokio::test]
async fn snooze_reschedules_without_using_an_attempt() {
    let db = TestDb::new().await;
    let q = queue(&db);
    let id = q.enqueue(&NewJob::new("k")).await.unwrap().id();
    let run = claim_one(&q, "default").await;
    let run_at = q.snooze(run.lease, Duration::from_secs(60)).await.unwrap();
    assert!(run_at > Utc::now() + chrono::Duration::seconds(50));
    let job = q.get(id).await.unwrap().unwrap();
    assert_eq!((job.state, job.attempt), (JobState::Scheduled, 0));
    assert!(matches!(
        q.complete(run.lease).await,
        Err(QueueError::LeaseLost { .. })
    ));
}

#[tokio::test]
async fn callbacks_resolve_once() {
    let db = TestDb::new().await;
    let q = queue(&db);
    let id = q.enqueue(&NewJob::new("k")).await.unwrap().id();
    let run = claim_one(&q, "default").await;
    let callback = q
        .wait_for_callback(run.lease, Duration::from_secs(60))
        .await
        .unwrap();
    let job = q.get(id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::WaitingExternal);
    assert_eq!(job.callback_id, Some(callback));
    assert!(job.callback_timeout_at.unwrap() > Utc::now() + chrono::Duration::seconds(50));
    // The worker no longer holds a running lease.
    assert!(matches!(
        q.heartbeat(run.lease).await,
        Err(QueueError::LeaseLost { .. })
    ));

    assert_eq!(
        q.resolve_callback(callback, Resolution::Complete)
            .await
            .unwrap(),
        id
    );
    assert_eq!(q.get(id).await.unwrap().unwrap().state, JobState::Completed);
    let again = q
        .resolve_callback(callback, Resolution::Complete)
        .await
        .unwrap_err();
    assert!(matches!(again, QueueError::CallbackNotPending(c) if c == callback));
    let unknown = uuid::Uuid::new_v4();
    assert!(matches!(
        q.resolve_callback(unknown, Resolution::Complete).await,
        Err(QueueError::CallbackNotPending(_))
    ));
}

#[tokio::test]
async fn failed_callback_retries() {
    let db = TestDb::new().await;
    let q = queue(&db);
    let id = q
        .enqueue(&NewJob::new("k").max_attempts(3))
        .await
        .unwrap()
        .id();
    let run = claim_one(&q, "default").await;
    let callback = q
        .wait_for_callback(run.lease, Duration::from_secs(60))
        .await
        .unwrap();
    q.resolve_callback(callback, Resolution::Fail("remote said no".into()))
        .await
        .unwrap();
    let job = q.get(id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Retryable);
    assert_eq!(job.error_entries()[0]["reason"], "callback_failed");
    assert!(job.callback_timeout_at.is_none());
}

#[tokio::test]
async fn cancel_stops_pending_and_running_jobs_but_not_finished_ones() {
    let db = TestDb::new().await;
    let q = queue(&db);
    let scheduled = q
        .enqueue(&NewJob::new("k").run_in(Duration::from_secs(60)))
        .await
        .unwrap()
        .id();
    assert!(q.cancel(scheduled).await.unwrap());
    assert_eq!(
        q.get(scheduled).await.unwrap().unwrap().state,
        JobState::Cancelled
    );
    assert!(
        !q.cancel(scheduled).await.unwrap(),
        "cancelling twice changes nothing"
    );

    let running = q.enqueue(&NewJob::new("k")).await.unwrap().id();
    let run = claim_one(&q, "default").await;
    assert!(q.cancel(running).await.unwrap());
    assert!(matches!(
        q.complete(run.lease).await,
        Err(QueueError::LeaseLost { .. })
    ));
    assert!(matches!(
        q.fail(run.lease, "x").await,
        Err(QueueError::LeaseLost { .. })
    ));
    assert_eq!(
        q.get(running).await.unwrap().unwrap().state,
        JobState::Cancelled
    );

    let waiting = q.enqueue(&NewJob::new("k")).await.unwrap().id();
    let run = claim_one(&q, "default").await;
    let callback = q
        .wait_for_callback(run.lease, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(q.cancel(waiting).await.unwrap());
    assert!(q
        .resolve_callback(callback, Resolution::Complete)
        .await
        .is_err());
    assert!(q.get(999_999).await.unwrap().is_none());
}

#[tokio::test]
async fn a_stale_worker_cannot_touch_the_next_run() {
    let db = TestDb::new().await;
    let q = queue(&db);
    let id = q.enqueue(&NewJob::new("k")).await.unwrap().id();
    let stale = claim_one(&q, "default").await;
    // The run is rescued (its worker looked dead) and claimed again by another worker.
    db.client()
        .await
        .execute("UPDATE jobs SET state = 'available' WHERE id = $1", &[&id])
        .await
        .unwrap();
    let fresh = claim_one(&q, "default").await;
    assert_eq!(fresh.lease.job_id, stale.lease.job_id);
    assert_eq!(fresh.lease.run_lease, stale.lease.run_lease + 1);

    assert!(matches!(
        q.heartbeat(stale.lease).await,
        Err(QueueError::LeaseLost { .. })
    ));
    assert_eq!(
        q.heartbeat_many(&[stale.lease, fresh.lease]).await.unwrap(),
        vec![stale.lease]
    );
    assert!(matches!(
        q.complete(stale.lease).await,
        Err(QueueError::LeaseLost { .. })
    ));
    assert!(matches!(
        q.fail(stale.lease, "late").await,
        Err(QueueError::LeaseLost { .. })
    ));
    assert!(matches!(
        q.snooze(stale.lease, Duration::from_secs(1)).await,
        Err(QueueError::LeaseLost { .. })
    ));
    assert!(matches!(
        q.wait_for_callback(stale.lease, Duration::from_secs(1))
            .await,
        Err(QueueError::LeaseLost { .. })
    ));
    let job = q.get(id).await.unwrap().unwrap();
    assert_eq!(
        (job.state, job.attempt),
        (JobState::Running, 2),
        "the fresh run is untouched"
    );
    q.complete(fresh.lease).await.unwrap();
}

#[tokio::test]
async fn concurrent_claimers_never_claim_a_job_twice() {
    let db = TestDb::new().await;
    let q = Queue::new(db.pool(16));
    let jobs: Vec<NewJob> = (0..3000)
        .map(|i| NewJob::new("k").args(json!({ "i": i })))
        .collect();
    q.enqueue_batch(&jobs).await.unwrap();
    let claimers = (0..16).map(|_| {
        let q = q.clone();
        tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let batch = q.claim("default", 7).await.unwrap();
                if batch.is_empty() {
                    return mine;
                }
                mine.extend(batch.into_iter().map(|j| j.lease.job_id));
            }
        })
    });
    let mut all = Vec::new();
    for claimer in futures_util::future::join_all(claimers).await {
        all.extend(claimer.unwrap());
    }
    let unique: HashSet<i64> = all.iter().copied().collect();
    assert_eq!(all.len(), 3000, "every job claimed");
    assert_eq!(unique.len(), 3000, "no job claimed twice");
}

#[tokio::test]
async fn retry_backoff_doubles_caps_and_jitters_within_bounds() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let backoff_ms = |attempt: i32, jitter: f64| {
        let client = &client;
        async move {
            client
                .query_one(
                    "SELECT extract(epoch FROM retry_backoff($1, 1000, 60000, $2))::float8 * 1000",
                    &[&attempt, &jitter],
                )
                .await
                .unwrap()
                .get::<_, f64>(0)
        }
    };
    let expected = [
        1000.0, 2000.0, 4000.0, 8000.0, 16000.0, 32000.0, 60000.0, 60000.0,
    ];
    for (i, want) in expected.iter().enumerate() {
        let got = backoff_ms(i as i32 + 1, 0.0).await;
        assert!(
            (got - want).abs() < 0.01,
            "attempt {}: {got} != {want}",
            i + 1
        );
    }
    assert!(
        (backoff_ms(0, 0.0).await - 1000.0).abs() < 0.01,
        "attempt 0 counts as 1"
    );
    assert!(
        (backoff_ms(10_000, 0.0).await - 60000.0).abs() < 0.01,
        "huge attempts stay capped"
    );
    let mut seen = HashSet::new();
    for _ in 0..200 {
        let got = backoff_ms(3, 0.25).await;
        assert!(
            (3000.0..=5000.0).contains(&got),
            "4000 +/- 25% but got {got}"
        );
        seen.insert(got as i64);
    }
    assert!(
        seen.len() > 20,
        "jitter spreads retries: {} distinct values",
        seen.len()
    );
}
