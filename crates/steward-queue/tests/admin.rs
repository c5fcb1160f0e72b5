//! The operator's job commands: list, find, retry, cancel, queue depths.

use std::time::Duration;
use steward_queue::admin::{Action, Change, JobFilter};
use steward_queue::{available_channel, JobState, NewJob, Queue};
use steward_testkit::TestDb;

async fn failed_job(q: &Queue, queue: &str) -> i64 {
    let id = q
        .enqueue(&NewJob::new("doomed").queue(queue).max_attempts(1))
        .await
        .unwrap()
        .id();
    let claimed = q
        .claim_kinds(queue, Some(&["doomed".to_owned()]), 1)
        .await
        .unwrap();
    assert_eq!(claimed[0].lease.job_id, id);
    q.fail(claimed[0].lease, "boom").await.unwrap();
    id
}

#[tokio::test]
async fn list_filters_newest_first_and_pages() {
    let db = TestDb::new().await;
    let q = Queue::new(db.pool(4));
    let mut ids = Vec::new();
    for (queue, kind) in [("a", "x"), ("b", "x"), ("a", "y"), ("a", "x")] {
        ids.push(
            q.enqueue(&NewJob::new(kind).queue(queue))
                .await
                .unwrap()
                .id(),
        );
    }
    let failed = failed_job(&q, "a").await;
    let listed = |jobs: Vec<steward_queue::Job>| jobs.iter().map(|j| j.id).collect::<Vec<_>>();

    let all = q.list(&JobFilter::default(), 10, None).await.unwrap();
    assert_eq!(listed(all), vec![failed, ids[3], ids[2], ids[1], ids[0]]);
    let filter = JobFilter {
        queue: Some("a".into()),
        kind: Some("x".into()),
        ..Default::default()
    };
    assert_eq!(
        listed(q.list(&filter, 10, None).await.unwrap()),
        vec![ids[3], ids[0]]
    );
    let failed_only = JobFilter {
        states: vec![JobState::Failed],
        ..Default::default()
    };
    assert_eq!(
        listed(q.list(&failed_only, 10, None).await.unwrap()),
        vec![failed]
    );
    let page = q.list(&JobFilter::default(), 2, None).await.unwrap();
    assert_eq!(listed(page.clone()), vec![failed, ids[3]]);
    let next = q
        .list(&JobFilter::default(), 2, Some(page[1].id))
        .await
        .unwrap();
    assert_eq!(listed(next), vec![ids[2], ids[1]]);
}

#[tokio::test]
async fn retry_by_id_runs_failed_jobs_again_and_leaves_the_rest() {
    let db = TestDb::new().await;
    let q = Queue::new(db.pool(4));
    let (listener, mut notifications) = db.target().listen().await.unwrap();
    listener
        .batch_execute(&format!("LISTEN {}", available_channel(db.schema())))
        .await
        .unwrap();

    let failed = failed_job(&q, "reports").await;
    let running = q
        .enqueue(&NewJob::new("long").queue("busy"))
        .await
        .unwrap()
        .id();
    let lease = q.claim("busy", 1).await.unwrap()[0].lease;
    // A failed job whose unique key another unfinished job now holds cannot run again.
    let keyed = q
        .enqueue(
            &NewJob::new("k")
                .queue("keyed")
                .max_attempts(1)
                .unique_key("key"),
        )
        .await
        .unwrap()
        .id();
    let keyed_lease = q.claim("keyed", 1).await.unwrap()[0].lease;
    q.fail(keyed_lease, "boom").await.unwrap();
    q.enqueue(&NewJob::new("k").queue("keyed").unique_key("key"))
        .await
        .unwrap();
    // Everything notified so far arrives before this sentinel.
    let channel = available_channel(db.schema());
    listener
        .batch_execute(&format!("NOTIFY {channel}, 'sentinel'"))
        .await
        .unwrap();
    while notifications.recv().await.unwrap().payload != "sentinel" {}

    let ids = [failed, running, keyed, 999_999];
    let preview = q.change_jobs(Action::Retry, &ids, true).await.unwrap();
    let expected = vec![
        (
            failed,
            Change::Changed {
                from: JobState::Failed,
            },
        ),
        (
            running,
            Change::Unchanged {
                state: JobState::Running,
            },
        ),
        (
            keyed,
            Change::Unchanged {
                state: JobState::Failed,
            },
        ),
        (999_999, Change::NotFound),
    ];
    assert_eq!(preview, expected);
    assert_eq!(
        q.get(failed).await.unwrap().unwrap().state,
        JobState::Failed,
        "dry run"
    );

    assert_eq!(
        q.change_jobs(Action::Retry, &ids, false).await.unwrap(),
        expected
    );
    let job = q.get(failed).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Available);
    assert_eq!((job.attempt, job.max_attempts), (1, 2), "one more attempt");
    assert_eq!(job.finalized_at, None);
    assert_eq!(job.error_entries().len(), 1, "the failure stays on record");
    let woken = tokio::time::timeout(Duration::from_secs(10), notifications.recv())
        .await
        .expect("workers of the queue are woken")
        .unwrap();
    assert_eq!(woken.payload, "reports");
    assert_eq!(q.claim("reports", 1).await.unwrap()[0].lease.job_id, failed);
    q.heartbeat(lease)
        .await
        .expect("the running job is untouched");
}

#[tokio::test]
async fn cancel_by_filter_goes_in_batches_and_takes_running_jobs_from_their_worker() {
    let db = TestDb::new().await;
    let q = Queue::new(db.pool(4));
    for _ in 0..25 {
        q.enqueue(&NewJob::new("spam").queue("mail")).await.unwrap();
    }
    q.enqueue(&NewJob::new("ham").queue("mail")).await.unwrap();
    let lease = q
        .claim_kinds("mail", Some(&["spam".to_owned()]), 1)
        .await
        .unwrap()[0]
        .lease;
    let done = failed_job(&q, "mail").await;
    let filter = JobFilter {
        queue: Some("mail".into()),
        kind: Some("spam".into()),
        ..Default::default()
    };
    assert_eq!(
        q.count_matching(&filter, Action::Cancel.applies_to())
            .await
            .unwrap(),
        25
    );

    let mut totals = Vec::new();
    let cancelled = q
        .change_matching(&filter, Action::Cancel, 10, |n| totals.push(n))
        .await
        .unwrap();
    assert_eq!(cancelled, 25);
    assert_eq!(totals, vec![10, 20, 25]);
    assert!(q.heartbeat(lease).await.is_err(), "the worker lost its run");
    assert_eq!(
        q.count_matching(&filter, Action::Cancel.applies_to())
            .await
            .unwrap(),
        0
    );
    let ham = JobFilter {
        queue: Some("mail".into()),
        kind: Some("ham".into()),
        ..Default::default()
    };
    assert_eq!(
        q.count_matching(&ham, Action::Cancel.applies_to())
            .await
            .unwrap(),
        1
    );
    assert_eq!(q.get(done).await.unwrap().unwrap().state, JobState::Failed);
}

#[tokio::test]
async fn queue_depths_count_by_state_with_the_oldest_available() {
    let db = TestDb::new().await;
    let q = Queue::new(db.pool(4));
    for queue in ["a", "a", "b"] {
        q.enqueue(&NewJob::new("k").queue(queue)).await.unwrap();
    }
    q.enqueue(
        &NewJob::new("k")
            .queue("a")
            .priority(4)
            .run_in(Duration::from_secs(60)),
    )
    .await
    .unwrap();
    failed_job(&q, "c").await;
    let client = db.client().await;
    let oldest_a: chrono::DateTime<chrono::Utc> = client
        .query_one(
            "SELECT min(run_at) FROM jobs WHERE queue = 'a' AND state = 'available'",
            &[],
        )
        .await
        .unwrap()
        .get(0);

    let live = q.queue_depths(true).await.unwrap();
    let names: Vec<&str> = live.iter().map(|d| d.queue.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"]);
    assert_eq!(live[0].by_state["available"], 2);
    assert_eq!(live[0].by_state["scheduled"], 1);
    assert_eq!(live[0].oldest_available_since, Some(oldest_a));
    assert_eq!(live[2].by_state["failed"], 1);
    assert_eq!(live[2].oldest_available_since, None);

    // Without --live: admin_metadata's counts, however old.
    assert!(q.queue_depths(false).await.unwrap().is_empty());
    client
        .execute(
            "INSERT INTO queue_counts (queue, state, count, updated_at)
             VALUES ('a', 'available', 7, now() - interval '1 minute')",
            &[],
        )
        .await
        .unwrap();
    let counted = q.queue_depths(false).await.unwrap();
    assert_eq!(counted.len(), 1);
    assert_eq!(counted[0].by_state["available"], 7);
    assert_eq!(counted[0].oldest_available_since, Some(oldest_a));
    assert!(counted[0].counted_at < chrono::Utc::now() - chrono::Duration::seconds(50));
}

#[tokio::test]
async fn find_looks_in_the_archive_too() {
    let db = TestDb::new().await;
    let q = Queue::new(db.pool(4));
    let client = db.client().await;
    client
        .execute("SELECT create_archive_partition(current_date)", &[])
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO job_archive (id, queue, kind, state, priority, attempt, max_attempts,
                 run_at, created_at, finalized_at, args, errors)
             VALUES (424242, 'q', 'old', 'completed', 2, 1, 25, now(), now(), now(), '{}', '[]')",
            &[],
        )
        .await
        .unwrap();
    let found = q.find(424242).await.unwrap().expect("archived job");
    assert_eq!(
        (found.job.kind.as_str(), found.job.state),
        ("old", JobState::Completed)
    );
    assert!(found.archived_at.is_some());
    let id = q.enqueue(&NewJob::new("new")).await.unwrap().id();
    assert_eq!(q.find(id).await.unwrap().unwrap().archived_at, None);
    assert!(q.find(999_999).await.unwrap().is_none());
}
