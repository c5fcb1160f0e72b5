//! The worker runtime against a real PostgreSQL, with a real leader rescuing stale heartbeats
//! where a test needs one.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use steward_branches::Branch;
use steward_leader::{Candidate, LeaderSettings};
use steward_queue::{JobState, NewJob, Queue, QueueError};
use steward_testkit::TestDb;
use steward_worker::{Done, Job, JobContext, JobError, Worker, WorkerError, WorkerSettings};
use tokio_util::sync::CancellationToken;

const STALENESS: Duration = Duration::from_secs(3);
const INTERVAL: Duration = Duration::from_millis(500);

fn settings() -> WorkerSettings {
    WorkerSettings {
        heartbeat_interval: INTERVAL,
        assumed_staleness: STALENESS,
        poll_interval: Duration::from_millis(200),
        shutdown_grace: Duration::from_millis(300),
        ..WorkerSettings::default()
    }
}

/// A leader that only rescues stale heartbeats, at `STALENESS`, checking every 100 ms and with
/// no quiet period; it has published its staleness when this returns.
async fn rescuer(db: &TestDb) -> (Arc<Candidate>, CancellationToken) {
    use steward_branches::rescue_stale_heartbeats::{Config, RescueStaleHeartbeats};
    let rescue = RescueStaleHeartbeats::new(Config {
        staleness: STALENESS,
        interval: Duration::from_millis(100),
        quiet_period: Some(Duration::ZERO),
        ..Config::default()
    });
    let branches: Vec<Arc<dyn Branch>> = vec![Arc::new(rescue)];
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
    wait_for(
        "the leader to publish its staleness",
        Duration::from_secs(30),
        || async {
            client
                .query_one("SELECT heartbeat_staleness IS NOT NULL FROM leader", &[])
                .await
                .unwrap()
                .get::<_, bool>(0)
        },
    )
    .await;
    (candidate, stop)
}

async fn wait_for<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Records every distinct heartbeat_at of a job, polling the database, until stopped; returns
/// the largest gap between two of them and how many there were.
fn watch_heartbeats(
    db: &TestDb,
    job_id: i64,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<(Duration, usize)> {
    let target = db.target().clone();
    tokio::spawn(async move {
        let client = target.connect().await.unwrap();
        let mut seen: Vec<(chrono::DateTime<chrono::Utc>, Instant)> = Vec::new();
        while !stop.is_cancelled() {
            let at: Option<chrono::DateTime<chrono::Utc>> = client
                .query_one("SELECT heartbeat_at FROM jobs WHERE id = $1", &[&job_id])
                .await
                .unwrap()
                .get(0);
            if let Some(at) = at {
                if seen.last().is_none_or(|(last, _)| *last != at) {
                    seen.push((at, Instant::now()));
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let gap = seen
            .windows(2)
            .map(|w| (w[1].0 - w[0].0).to_std().unwrap_or_default())
            .max()
            .unwrap_or(Duration::MAX);
        (gap, seen.len())
    })
}

async fn state_of(queue: &Queue, id: i64) -> steward_queue::Job {
    queue.get(id).await.unwrap().expect("the job exists")
}

async fn wait_running(queue: &Queue, id: i64) {
    wait_for("the job to run", Duration::from_secs(30), || async {
        state_of(queue, id).await.state == JobState::Running
    })
    .await;
}

/// A handler that runs until its context is cancelled, recording when that happened.
fn until_cancelled(
    cancelled_at: Arc<Mutex<Option<Instant>>>,
) -> impl Fn(Job, JobContext) -> futures_util::future::BoxFuture<'static, Result<Done, JobError>>
       + Send
       + Sync
       + 'static {
    move |_job, ctx| {
        let cancelled_at = cancelled_at.clone();
        let token = ctx.cancellation().clone();
        tokio::spawn(async move {
            token.cancelled().await;
            *cancelled_at.lock().unwrap() = Some(Instant::now());
        });
        Box::pin(async move {
            std::future::pending::<()>().await;
            Ok(Done::Complete)
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_job_stays_alive_while_claims_and_completions_hammer_a_pool_of_two() {
    let db = TestDb::new().await;
    let (_leader, leader_stop) = rescuer(&db).await;
    let long_ran = Arc::new(AtomicUsize::new(0));
    let worker = Worker::builder(db.target().clone())
        .queue("long", 1)
        .queue("short", 20)
        .handler("long", {
            let long_ran = long_ran.clone();
            move |_job, _ctx| {
                long_ran.fetch_add(1, Ordering::SeqCst);
                async move {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    Ok(Done::Complete)
                }
            }
        })
        .handler("short", |_job, _ctx| async move { Ok(Done::Complete) })
        .settings(WorkerSettings {
            pool_size: 2,
            ..settings()
        })
        .start()
        .await
        .unwrap();
    let queue = worker.queue().clone();
    let long = queue
        .enqueue(&NewJob::new("long").queue("long").max_attempts(1))
        .await
        .unwrap()
        .id();
    wait_running(&queue, long).await;

    // Twenty producers keep the worker's two pooled sessions busy with claims and completions
    // of short jobs for the whole minute.
    let stop = CancellationToken::new();
    let mut producers = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let (queue, stop) = (queue.clone(), stop.clone());
        producers.spawn(async move {
            let mut enqueued = 0u64;
            while !stop.is_cancelled() {
                let batch: Vec<NewJob> = (0..20)
                    .map(|_| NewJob::new("short").queue("short"))
                    .collect();
                queue.enqueue_batch(&batch).await.unwrap();
                enqueued += 20;
            }
            enqueued
        });
    }
    let gaps = watch_heartbeats(&db, long, stop.clone());
    wait_for(
        "the long job to finish",
        Duration::from_secs(120),
        || async { state_of(&queue, long).await.state.is_terminal() },
    )
    .await;
    stop.cancel();
    let mut enqueued = 0;
    while let Some(n) = producers.join_next().await {
        enqueued += n.unwrap();
    }
    let (largest_gap, _) = gaps.await.unwrap();
    let job = state_of(&queue, long).await;
    println!(
        "long job: {:?} after {} short jobs enqueued; largest heartbeat gap {largest_gap:?}",
        job.state, enqueued
    );
    assert_eq!(job.state, JobState::Completed, "errors: {}", job.errors);
    assert_eq!(job.attempt, 1);
    assert_eq!(long_ran.load(Ordering::SeqCst), 1, "the long job ran once");
    assert!(
        largest_gap < STALENESS,
        "largest heartbeat gap {largest_gap:?}"
    );
    worker.shutdown().await;
    leader_stop.cancel();
}

#[tokio::test]
async fn a_run_rescued_under_its_job_cancels_it_within_an_interval_and_its_completion_is_refused() {
    let db = TestDb::new().await;
    let cancelled_at = Arc::new(Mutex::new(None));
    let worker = Worker::builder(db.target().clone())
        .queue("default", 1)
        .handler("k", until_cancelled(cancelled_at.clone()))
        .settings(settings())
        .start()
        .await
        .unwrap();
    let queue = worker.queue().clone();
    let id = queue.enqueue(&NewJob::new("k")).await.unwrap().id();
    wait_running(&queue, id).await;
    let lease = steward_queue::Lease {
        job_id: id,
        run_lease: state_of(&queue, id).await.run_lease,
    };
    // What a rescue does: the run is no longer running under this lease.
    db.client()
        .await
        .execute(
            "UPDATE jobs SET state = 'retryable', run_at = now() + interval '1 hour' WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    let rescued_at = Instant::now();
    wait_for(
        "the job to be cancelled",
        Duration::from_secs(10),
        || async { cancelled_at.lock().unwrap().is_some() },
    )
    .await;
    let took = cancelled_at.lock().unwrap().unwrap() - rescued_at;
    println!("cancelled {took:?} after the rescue (heartbeat interval {INTERVAL:?})");
    // Within one interval, plus the flush that finds it.
    assert!(
        took < INTERVAL + INTERVAL / 2,
        "cancelled {took:?} after the rescue"
    );
    assert!(matches!(
        queue.complete(lease).await,
        Err(QueueError::LeaseLost { .. })
    ));
    assert_eq!(state_of(&queue, id).await.state, JobState::Retryable);
    assert_eq!(worker.running(), 0);
    worker.shutdown().await;
}

/// A park commits before its handler hears back (the answer is still on the wire) and a
/// heartbeat flush reads the row in between: the run is parked under its own lease, not lost,
/// so the flush must not cancel it. Cancelling drops the handler with the callback id it was
/// about to pass on, and the job then waits out its callback timeout for nothing.
#[tokio::test]
async fn a_flush_between_a_park_and_its_answer_does_not_cancel_the_run() {
    let db = TestDb::new().await;
    let (parked_tx, mut parked_rx) = tokio::sync::mpsc::unbounded_channel();
    let go = CancellationToken::new();
    let target = db.target().clone();
    let handler_go = go.clone();
    let worker = Worker::builder(db.target().clone())
        .queue("default", 2)
        .handler("park", move |_job, ctx| {
            let (target, parked_tx, go) = (target.clone(), parked_tx.clone(), handler_go.clone());
            async move {
                // The park as it commits on the server, its answer not yet seen by the worker.
                let lease = ctx.lease();
                let client = target.connect().await.unwrap();
                client
                    .query_one(
                        steward_queue::sql::WAIT_FOR_CALLBACK,
                        &[&lease.job_id, &lease.run_lease, &3_600_000.0f64],
                    )
                    .await
                    .unwrap();
                let at: chrono::DateTime<chrono::Utc> = client
                    .query_one("SELECT clock_timestamp()", &[])
                    .await
                    .unwrap()
                    .get(0);
                parked_tx.send((at, ctx.cancellation().clone())).unwrap();
                go.cancelled().await;
                Ok(Done::Complete)
            }
        })
        .handler("long", |_job, _ctx| async move {
            std::future::pending::<()>().await;
            Ok(Done::Complete)
        })
        .settings(settings())
        .start()
        .await
        .unwrap();
    let queue = worker.queue().clone();
    let long = queue.enqueue(&NewJob::new("long")).await.unwrap().id();
    wait_running(&queue, long).await;
    let parked = queue.enqueue(&NewJob::new("park")).await.unwrap().id();
    let (parked_at, cancellation) = tokio::time::timeout(Duration::from_secs(30), parked_rx.recv())
        .await
        .expect("the handler to park")
        .unwrap();
    // Two flushes whose statements began after the park committed (the long job's
    // heartbeat_at, the flush's now(), passes it twice): the first one's verdict on the parked
    // run has been acted on before the second one runs.
    let mut after = parked_at;
    for flush in [
        "a first flush after the park",
        "a second flush after the park",
    ] {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match state_of(&queue, long).await.heartbeat_at {
                Some(at) if at > after => {
                    after = at;
                    break;
                }
                _ => assert!(Instant::now() < deadline, "timed out waiting for {flush}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert!(
        !cancellation.is_cancelled(),
        "a heartbeat flush cancelled the run parked under its own lease"
    );
    go.cancel();
    assert_eq!(
        state_of(&queue, parked).await.state,
        JobState::WaitingExternal
    );
    worker.shutdown().await;
}

/// Runs one long job on `worker` (on `queue`) for `span`, applying `disturb` once it runs, and
/// returns the largest gap between two of its heartbeats and how many heartbeats it had.
async fn heartbeats_while<F, Fut>(
    db: &TestDb,
    worker: &Worker,
    queue: &str,
    span: Duration,
    disturb: F,
) -> (Duration, usize)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let client = worker.queue().clone();
    let id = client
        .enqueue(&NewJob::new("long").queue(queue))
        .await
        .unwrap()
        .id();
    wait_running(&client, id).await;
    let stop = CancellationToken::new();
    let gaps = watch_heartbeats(db, id, stop.clone());
    disturb().await;
    tokio::time::sleep(span).await;
    stop.cancel();
    let seen = gaps.await.unwrap();
    assert_eq!(state_of(&client, id).await.state, JobState::Running);
    seen
}

async fn long_job_worker(db: &TestDb, queue: &str) -> Worker {
    Worker::builder(db.target().clone())
        .queue(queue, 4)
        .handler("long", |_job, _ctx| async move {
            std::future::pending::<()>().await;
            Ok(Done::Complete)
        })
        .settings(settings())
        .start()
        .await
        .unwrap()
}

#[tokio::test]
async fn an_older_worker_shutting_down_does_not_stop_a_newer_ones_heartbeats() {
    let db = TestDb::new().await;
    let older = long_job_worker(&db, "old").await;
    let queue = older.queue().clone();
    let old_job = queue
        .enqueue(&NewJob::new("long").queue("old"))
        .await
        .unwrap()
        .id();
    wait_running(&queue, old_job).await;
    let newer = long_job_worker(&db, "new").await;
    let (gap, _) = heartbeats_while(&db, &newer, "new", INTERVAL * 6, || async {
        // The older worker hands its run back while the newer one runs.
        let report = older.shutdown().await;
        assert_eq!(report.released, 1);
    })
    .await;
    assert!(gap < INTERVAL * 2, "largest heartbeat gap {gap:?}");
    newer.shutdown().await;
}

#[tokio::test]
async fn a_flush_that_hangs_once_is_cut_off_and_heartbeats_go_on() {
    let db = TestDb::new().await;
    let worker = long_job_worker(&db, "default").await;
    let (gap, _) = heartbeats_while(&db, &worker, "default", INTERVAL * 6, || async {
        worker.faults().hang_next_flush(INTERVAL * 4);
    })
    .await;
    assert!(gap < INTERVAL * 2, "largest heartbeat gap {gap:?}");
    worker.shutdown().await;
}

#[tokio::test]
async fn a_flush_that_panics_once_is_retried_and_heartbeats_go_on() {
    let db = TestDb::new().await;
    let worker = long_job_worker(&db, "default").await;
    let (gap, _) = heartbeats_while(&db, &worker, "default", INTERVAL * 6, || async {
        worker.faults().panic_next_flush();
    })
    .await;
    assert!(gap < INTERVAL * 2, "largest heartbeat gap {gap:?}");
    worker.shutdown().await;
}

#[tokio::test]
async fn a_storm_of_wake_requests_neither_stops_nor_floods_the_heartbeats() {
    let db = TestDb::new().await;
    let worker = Arc::new(long_job_worker(&db, "default").await);
    let stop = CancellationToken::new();
    let storm = tokio::spawn({
        let (worker, stop) = (worker.clone(), stop.clone());
        async move {
            let mut requests = 0u64;
            while !stop.is_cancelled() {
                worker.heartbeat_now();
                requests += 1;
                tokio::task::yield_now().await;
            }
            requests
        }
    });
    let span = INTERVAL * 6;
    let (gap, heartbeats) = heartbeats_while(&db, &worker, "default", span, || async {}).await;
    stop.cancel();
    let requests = storm.await.unwrap();
    println!("{requests} wake requests; {heartbeats} heartbeats in {span:?}; largest gap {gap:?}");
    assert!(requests > 1000, "the storm was a storm: {requests}");
    assert!(gap < INTERVAL * 2, "largest heartbeat gap {gap:?}");
    // Flushes keep their minimum gap of a quarter interval, however many requests come.
    let most = (span.as_millis() / (INTERVAL / 4).as_millis()) as usize + 2;
    assert!(
        heartbeats <= most,
        "{heartbeats} heartbeats, at most {most} expected"
    );
    let worker = Arc::into_inner(worker).expect("the storm has ended");
    worker.shutdown().await;
}

#[tokio::test]
async fn shutdown_lets_short_jobs_finish_and_hands_long_runs_back() {
    let db = TestDb::new().await;
    let worker = Worker::builder(db.target().clone())
        .queue("default", 4)
        .handler("long", |_job, _ctx| async move {
            std::future::pending::<()>().await;
            Ok(Done::Complete)
        })
        .handler("short", |_job, _ctx| async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok(Done::Complete)
        })
        .settings(WorkerSettings {
            shutdown_grace: Duration::from_secs(2),
            ..settings()
        })
        .start()
        .await
        .unwrap();
    let queue = worker.queue().clone();
    let long = queue.enqueue(&NewJob::new("long")).await.unwrap().id();
    wait_running(&queue, long).await;
    let short = queue.enqueue(&NewJob::new("short")).await.unwrap().id();
    wait_running(&queue, short).await;
    let report = worker.shutdown().await;
    assert_eq!(report.released, 1);
    assert_eq!(state_of(&queue, short).await.state, JobState::Completed);
    let long = state_of(&queue, long).await;
    assert_eq!(long.state, JobState::Available, "handed back");
    assert_eq!(long.attempt, 0, "the interrupted attempt does not count");
    assert_eq!(long.errors[0]["reason"], "released");
}

#[tokio::test]
async fn outcomes_are_written_and_a_panic_fails_only_its_attempt() {
    let db = TestDb::new().await;
    let worker = Worker::builder(db.target().clone())
        .queue("default", 8)
        .handler("ok", |_job, _ctx| async move { Ok(Done::Complete) })
        .handler("error", |_job, _ctx| async move {
            Err::<Done, JobError>("it broke".into())
        })
        .handler("fatal", |_job, _ctx| async move {
            Ok(Done::Fail("hopeless".into()))
        })
        .handler("panic", |_job, _ctx| async move {
            panic!("handler bug");
            #[allow(unreachable_code)]
            Ok(Done::Complete)
        })
        .handler("snooze", {
            // Snoozed once, completed on the next run.
            let snoozed = Arc::new(std::sync::atomic::AtomicBool::new(false));
            move |_job: Job, _ctx| {
                let first = !snoozed.swap(true, Ordering::SeqCst);
                async move {
                    Ok(if first {
                        Done::Snooze(Duration::from_millis(1))
                    } else {
                        Done::Complete
                    })
                }
            }
        })
        .handler("slow", |_job, _ctx| async move {
            std::future::pending::<()>().await;
            Ok(Done::Complete)
        })
        .handler("park", |_job, ctx: JobContext| async move {
            ctx.await_callback(Duration::from_secs(3600)).await?;
            Ok(Done::Parked)
        })
        .settings(settings())
        .start()
        .await
        .unwrap();
    let queue = worker.queue().clone();
    let enqueue = |job: NewJob| {
        let queue = queue.clone();
        async move { queue.enqueue(&job).await.unwrap().id() }
    };
    let ok = enqueue(NewJob::new("ok")).await;
    let error = enqueue(NewJob::new("error")).await;
    let fatal = enqueue(NewJob::new("fatal")).await;
    let panic = enqueue(NewJob::new("panic")).await;
    let snooze = enqueue(NewJob::new("snooze")).await;
    let slow = enqueue(NewJob::new("slow").run_timeout(Duration::from_millis(300))).await;
    let park = enqueue(NewJob::new("park")).await;
    let unknown = enqueue(NewJob::new("nobody_handles_this")).await;
    let expect = [
        (ok, JobState::Completed, None),
        (error, JobState::Retryable, Some("error")),
        (fatal, JobState::Failed, Some("error")),
        (panic, JobState::Retryable, Some("panic")),
        (slow, JobState::Retryable, Some("timeout")),
        (park, JobState::WaitingExternal, None),
    ];
    for (id, state, reason) in expect {
        wait_for(
            &format!("job {id} to be {state}"),
            Duration::from_secs(20),
            || async { state_of(&queue, id).await.state == state },
        )
        .await;
        let job = state_of(&queue, id).await;
        assert_eq!(
            job.errors.get(0).map(|e| e["reason"].as_str()),
            reason.map(Some),
            "{job:?}"
        );
    }
    // The snoozed job comes back (the promoter is not running here: make it due by hand).
    wait_for("the snooze", Duration::from_secs(20), || async {
        state_of(&queue, snooze).await.state == JobState::Scheduled
    })
    .await;
    db.client()
        .await
        .execute(
            "UPDATE jobs SET state = 'available' WHERE id = $1",
            &[&snooze],
        )
        .await
        .unwrap();
    wait_for(
        "the snoozed job to complete",
        Duration::from_secs(20),
        || async { state_of(&queue, snooze).await.state == JobState::Completed },
    )
    .await;
    assert_eq!(
        state_of(&queue, snooze).await.attempt,
        1,
        "a snooze uses no attempt"
    );
    // Only kinds with a handler are claimed.
    assert_eq!(state_of(&queue, unknown).await.state, JobState::Available);
    worker.shutdown().await;
}

#[tokio::test]
async fn a_heartbeat_interval_over_a_third_of_the_leaders_staleness_is_refused() {
    let db = TestDb::new().await;
    let (_leader, stop) = rescuer(&db).await;
    let refused = Worker::builder(db.target().clone())
        .queue("default", 1)
        .handler("k", |_job, _ctx| async move { Ok(Done::Complete) })
        .settings(WorkerSettings {
            heartbeat_interval: STALENESS / 2,
            // The published staleness wins over the assumed one.
            assumed_staleness: Duration::from_secs(3600),
            ..settings()
        })
        .start()
        .await;
    let Err(error @ WorkerError::HeartbeatTooSlow { .. }) = refused else {
        panic!("started with a heartbeat of half the staleness");
    };
    let message = error.to_string();
    assert!(
        message.contains("published by the leader") && message.contains("1s"),
        "{message}"
    );
    stop.cancel();
}

#[tokio::test]
async fn a_notify_wakes_the_worker_long_before_its_poll() {
    let db = TestDb::new().await;
    let done = Arc::new(tokio::sync::Notify::new());
    let worker = Worker::builder(db.target().clone())
        .queue("default", 1)
        .handler("k", {
            let done = done.clone();
            move |_job, _ctx| {
                let done = done.clone();
                async move {
                    done.notify_one();
                    Ok(Done::Complete)
                }
            }
        })
        .settings(WorkerSettings {
            poll_interval: Duration::from_secs(3600),
            ..settings()
        })
        .start()
        .await
        .unwrap();
    // Once the first claim (at start) has found nothing, the claimer waits for a NOTIFY or its
    // hourly poll: only the NOTIFY can bring the job in time.
    wait_for("the first claim", Duration::from_secs(20), || async {
        worker.claims() >= 1
    })
    .await;
    worker.queue().enqueue(&NewJob::new("k")).await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), done.notified())
        .await
        .expect("the job ran: the NOTIFY woke the claimer");
    worker.shutdown().await;
}

/// Set in the environment of the child process that `a_sigkilled_workers_runs_are_rescued...`
/// starts: the database URL the child's worker uses.
const CHILD_URL: &str = "STEWARD_WORKER_TEST_CHILD_URL";

/// Not a test of its own: the worker process that the SIGKILL test starts and kills. It runs a
/// worker with a job that never ends until it is killed.
#[tokio::test]
#[ignore = "run by a_sigkilled_workers_runs_are_rescued_after_the_staleness_and_not_before"]
async fn child_worker_until_killed() {
    let Ok(url) = std::env::var(CHILD_URL) else {
        return;
    };
    let target = steward_connection::Target::new(&url, Default::default()).unwrap();
    let _worker = Worker::builder(target)
        .queue("default", 4)
        .handler("long", |_job, _ctx| async move {
            std::future::pending::<()>().await;
            Ok(Done::Complete)
        })
        .settings(settings())
        .start()
        .await
        .unwrap();
    std::future::pending::<()>().await;
}

#[tokio::test]
async fn a_sigkilled_workers_runs_are_rescued_after_the_staleness_and_not_before() {
    let db = TestDb::new().await;
    let (_leader, leader_stop) = rescuer(&db).await;
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "child_worker_until_killed"])
        .env(CHILD_URL, db.url())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let client = db.client().await;
    let queue = Queue::new(db.pool(2));
    let ids: Vec<i64> = queue
        .enqueue_batch(&[NewJob::new("long"), NewJob::new("long")])
        .await
        .unwrap();
    for id in &ids {
        wait_running(&queue, *id).await;
    }
    // A heartbeat after the claim, so that the worker was demonstrably alive.
    wait_for(
        "a heartbeat after the claim",
        Duration::from_secs(10),
        || async {
            client
                .query_one(
                    "SELECT bool_and(heartbeat_at > attempted_at) FROM jobs WHERE id = ANY($1)",
                    &[&ids],
                )
                .await
                .unwrap()
                .get::<_, Option<bool>>(0)
                == Some(true)
        },
    )
    .await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    wait_for("both runs rescued", Duration::from_secs(30), || async {
        client
            .query_one(
                "SELECT bool_and(state = 'retryable') FROM jobs WHERE id = ANY($1)",
                &[&ids],
            )
            .await
            .unwrap()
            .get::<_, Option<bool>>(0)
            == Some(true)
    })
    .await;
    // The rescue's entry records when it ran; the row keeps the last heartbeat.
    for row in client
        .query(
            "SELECT id, extract(epoch FROM (errors->0->>'at')::timestamptz - heartbeat_at)::float8,
                    errors->0->>'reason'
             FROM jobs WHERE id = ANY($1)",
            &[&ids],
        )
        .await
        .unwrap()
    {
        let after: f64 = row.get(1);
        println!(
            "job {}: rescued {after:.3}s after its last heartbeat",
            row.get::<_, i64>(0)
        );
        assert_eq!(row.get::<_, String>(2), "heartbeat_stale");
        assert!(
            after >= STALENESS.as_secs_f64(),
            "rescued {after}s after the last heartbeat"
        );
    }
    leader_stop.cancel();
}
