//! `wake_promoter(run_at)` (migration V8), the one rule for when a producer wakes the promoter,
//! against `due_channel`, the channel the promoter listens on.

use std::time::Duration;
use steward_connection::{Notifications, SchemaName, Target};
use steward_queue::{due_channel, NewJob, Queue};
use steward_testkit::TestDb;
use tokio_postgres::Client;

/// A connection listening on the due channel of `target`'s schema.
async fn listen(target: &Target) -> (Client, Notifications) {
    let (listener, notifications) = target.listen().await.unwrap();
    listener
        .batch_execute(&format!("LISTEN {}", due_channel(target.schema())))
        .await
        .unwrap();
    (listener, notifications)
}

async fn next(notifications: &mut Notifications) -> String {
    tokio::time::timeout(Duration::from_secs(10), notifications.recv())
        .await
        .expect("a notification within 10 s")
        .expect("the listening connection is open")
        .channel
}

/// How many notifications besides a sentinel have arrived and not been read: the sentinel is
/// sent (and committed) after everything before it, and a round trip on the listening
/// connection makes the server deliver whatever is pending before it reports ready.
async fn unread(
    sender: &Client,
    listener: &Client,
    notifications: &mut Notifications,
    schema: &SchemaName,
) -> usize {
    sender
        .batch_execute(&format!("NOTIFY {}, 'sentinel'", due_channel(schema)))
        .await
        .unwrap();
    listener.batch_execute("SELECT 1").await.unwrap();
    let mut queued = 0;
    while notifications.try_recv().is_ok() {
        queued += 1;
    }
    assert!(queued >= 1, "the sentinel arrived");
    queued - 1
}

async fn wake(client: &Client, sql: &str) -> bool {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test]
async fn it_notifies_due_channel_only_for_a_time_before_the_published_wakeup() {
    let db = TestDb::new().await;
    let schema = db.schema();
    let (listener, mut notifications) = listen(db.target()).await;
    let client = db.client().await;

    // Nothing published: the promoter wakes on its own, so nothing is sent.
    assert!(!wake(&client, "SELECT wake_promoter(now())").await);
    client
        .batch_execute("UPDATE leader SET promote_wakeup_at = now() + interval '1 hour'")
        .await
        .unwrap();
    assert!(!wake(&client, "SELECT wake_promoter(NULL)").await);
    assert!(!wake(&client, "SELECT wake_promoter(now() + interval '2 hours')").await);
    assert_eq!(
        unread(&client, &listener, &mut notifications, schema).await,
        0
    );

    assert!(wake(&client, "SELECT wake_promoter(now() + interval '1 minute')").await);
    assert_eq!(next(&mut notifications).await, due_channel(schema));
    assert_eq!(
        unread(&client, &listener, &mut notifications, schema).await,
        0
    );
}

/// A producer in another language, or a trigger, may call it from a session whose search_path
/// does not name the schema; the channel is still the schema's own. A second schema, so that
/// the channel cannot be the default schema's by accident.
#[tokio::test]
async fn it_works_from_a_session_without_the_schema_on_its_search_path() {
    let db = TestDb::empty().await;
    let schema = SchemaName::new("queue_two").unwrap();
    let target = Target::new(&db.url(), schema.clone()).unwrap();
    let mut owner = target.connect().await.unwrap();
    steward_schema::migrate(&mut owner, &schema).await.unwrap();
    owner
        .batch_execute("UPDATE leader SET promote_wakeup_at = now() + interval '1 hour'")
        .await
        .unwrap();
    let (listener, mut notifications) = listen(&target).await;

    let producer = target.connect().await.unwrap();
    producer
        .batch_execute("SET search_path = public")
        .await
        .unwrap();
    assert!(
        wake(
            &producer,
            "SELECT queue_two.wake_promoter(now() + interval '1 minute')"
        )
        .await
    );
    assert_eq!(next(&mut notifications).await, "queue_two_due");
    assert!(
        !wake(
            &producer,
            "SELECT queue_two.wake_promoter(now() + interval '2 hours')"
        )
        .await
    );
    assert_eq!(
        unread(&owner, &listener, &mut notifications, &schema).await,
        0
    );

    // The client's enqueues in that schema wake its promoter, single and batched.
    let queue = Queue::new(target.pool(2).unwrap());
    queue
        .enqueue(&NewJob::new("k").run_in(Duration::from_secs(60)))
        .await
        .unwrap();
    assert_eq!(next(&mut notifications).await, "queue_two_due");
    queue
        .enqueue_batch(&[
            NewJob::new("k").run_in(Duration::from_secs(7200)),
            NewJob::new("k").run_in(Duration::from_secs(60)),
            NewJob::new("k"),
        ])
        .await
        .unwrap();
    assert_eq!(next(&mut notifications).await, "queue_two_due");
    assert_eq!(
        unread(&owner, &listener, &mut notifications, &schema).await,
        0,
        "one NOTIFY per statement"
    );
}

/// Every write that makes a run due again later wakes the promoter by the same rule as an
/// enqueue, so that a promoter sleeping a long interval still promotes it on time: a failure
/// (single and batched), a snooze and a failed callback, each once, and a final failure (no
/// retry) not at all.
#[tokio::test]
async fn a_retry_or_a_snooze_wakes_the_promoter_like_an_enqueue() {
    let db = TestDb::new().await;
    let schema = db.schema();
    let client = db.client().await;
    let queue = Queue::new(db.pool(2)).with_retry_policy(steward_queue::RetryPolicy {
        base: Duration::from_secs(1),
        max: Duration::from_secs(1),
        jitter: 0.0,
    });
    for _ in 0..6 {
        queue.enqueue(&NewJob::new("k")).await.unwrap();
    }
    let mut claimed = queue.claim("default", 6).await.unwrap().into_iter();
    let mut lease = || claimed.next().expect("a claimed job").lease;
    client
        .batch_execute("UPDATE leader SET promote_wakeup_at = now() + interval '1 hour'")
        .await
        .unwrap();
    let (listener, mut notifications) = listen(db.target()).await;

    queue.fail(lease(), "boom").await.unwrap();
    assert_eq!(next(&mut notifications).await, due_channel(schema));
    queue
        .fail_many(&[steward_queue::Failure {
            lease: lease(),
            error: "boom".to_owned(),
            reason: "error",
            permanent: false,
        }])
        .await
        .unwrap();
    assert_eq!(next(&mut notifications).await, due_channel(schema));
    queue.snooze(lease(), Duration::from_secs(5)).await.unwrap();
    assert_eq!(next(&mut notifications).await, due_channel(schema));
    let parked = lease();
    let callback = queue
        .wait_for_callback(parked, Duration::from_secs(3600))
        .await
        .unwrap();
    queue
        .resolve_callback(callback, steward_queue::Resolution::Fail("no".to_owned()))
        .await
        .unwrap();
    assert_eq!(next(&mut notifications).await, due_channel(schema));
    assert_eq!(
        unread(&client, &listener, &mut notifications, schema).await,
        0,
        "one NOTIFY per statement"
    );

    // A permanent failure is not due again, and a retry later than the promoter's own wake-up
    // needs no NOTIFY.
    queue
        .fail_many(&[steward_queue::Failure {
            lease: lease(),
            error: "fatal".to_owned(),
            reason: "error",
            permanent: true,
        }])
        .await
        .unwrap();
    client
        .batch_execute("UPDATE leader SET promote_wakeup_at = now() + interval '100 ms'")
        .await
        .unwrap();
    queue.fail(lease(), "boom").await.unwrap();
    assert_eq!(
        unread(&client, &listener, &mut notifications, schema).await,
        0
    );
}
