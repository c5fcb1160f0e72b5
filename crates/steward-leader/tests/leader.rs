//! Election, takeover, loop isolation and resilience, against a real PostgreSQL.

use async_trait::async_trait;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use steward_branches::{Branch, BranchContext, BranchError, Class, Outcome};
use steward_leader::{
    BranchRun, Candidate, LeaderSettings, LeadershipEvent, LoopMode, Observer, RunResult,
};
use steward_testkit::TestDb;
use tokio_util::sync::CancellationToken;

/// A branch that holds a fenced transaction open for `hold` (pg_sleep), or panics.
struct TestBranch {
    name: &'static str,
    class: Class,
    interval: Duration,
    hold: Duration,
    panics: bool,
    own_loop: bool,
}

#[async_trait]
impl Branch for TestBranch {
    fn name(&self) -> &'static str {
        self.name
    }
    fn class(&self) -> Class {
        self.class
    }
    fn interval(&self) -> Duration {
        self.interval
    }
    fn needs_own_loop(&self) -> bool {
        self.own_loop
    }
    async fn run(&self, ctx: &mut BranchContext<'_>) -> Result<Outcome, BranchError> {
        if self.panics {
            panic!("test branch always panics");
        }
        let tx = ctx.fenced().await?;
        tx.execute("SELECT pg_sleep($1)", &[&self.hold.as_secs_f64()])
            .await?;
        tx.commit().await?;
        Ok(Outcome {
            rows: 1,
            ..Outcome::default()
        })
    }
}

fn slo(interval_ms: u64) -> Arc<dyn Branch> {
    Arc::new(TestBranch {
        name: "test_slo",
        class: Class::Slo,
        interval: Duration::from_millis(interval_ms),
        hold: Duration::ZERO,
        panics: false,
        own_loop: false,
    })
}

fn hygiene(interval_ms: u64, hold_ms: u64) -> Arc<dyn Branch> {
    Arc::new(TestBranch {
        name: "test_hygiene",
        class: Class::Hygiene,
        interval: Duration::from_millis(interval_ms),
        hold: Duration::from_millis(hold_ms),
        panics: false,
        own_loop: false,
    })
}

#[derive(Debug, Clone)]
struct Run {
    branch: &'static str,
    loop_name: &'static str,
    epoch: i64,
    start: Instant,
    end: Instant,
    result: RunResult,
}

#[derive(Default)]
struct Recorder {
    runs: Mutex<Vec<Run>>,
    rows: Mutex<std::collections::HashMap<(&'static str, Instant), u64>>,
    leadership: Mutex<Vec<(LeadershipEvent, Instant)>>,
}

impl Observer for Recorder {
    fn branch_run(&self, run: &BranchRun<'_>) {
        let end = Instant::now();
        self.rows
            .lock()
            .unwrap()
            .insert((run.branch, end - run.duration), run.rows);
        self.runs.lock().unwrap().push(Run {
            branch: run.branch,
            loop_name: run.loop_name,
            epoch: run.epoch,
            start: end - run.duration,
            end,
            result: run.result.clone(),
        });
    }
    fn leadership(&self, event: &LeadershipEvent) {
        self.leadership
            .lock()
            .unwrap()
            .push((event.clone(), Instant::now()));
    }
}

impl Recorder {
    fn runs(&self) -> Vec<Run> {
        self.runs.lock().unwrap().clone()
    }
    fn acquired(&self) -> Vec<i64> {
        self.leadership
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(e, _)| match e {
                LeadershipEvent::Acquired { epoch } => Some(*epoch),
                _ => None,
            })
            .collect()
    }
    fn lost_at(&self, epoch: i64) -> Option<Instant> {
        self.leadership
            .lock()
            .unwrap()
            .iter()
            .find_map(|(e, at)| match e {
                LeadershipEvent::Lost { epoch: e, .. } if *e == epoch => Some(*at),
                _ => None,
            })
    }
}

fn fast_settings(mode: LoopMode) -> LeaderSettings {
    LeaderSettings {
        loop_mode: mode,
        probe_interval: Duration::from_millis(200),
        progress_interval: Duration::from_millis(200),
        reconnect_min: Duration::from_millis(50),
        ..LeaderSettings::default()
    }
}

struct Running {
    candidate: Arc<Candidate>,
    recorder: Arc<Recorder>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), steward_leader::LeaderError>>,
}

fn start(db: &TestDb, settings: LeaderSettings, branches: Vec<Arc<dyn Branch>>) -> Running {
    let recorder = Arc::new(Recorder::default());
    let candidate = Arc::new(
        Candidate::new(db.target().clone(), settings, branches)
            .expect("valid settings")
            .with_observer(recorder.clone()),
    );
    let shutdown = CancellationToken::new();
    let task = tokio::spawn({
        let candidate = candidate.clone();
        let shutdown = shutdown.clone();
        async move { candidate.run(shutdown).await }
    });
    Running {
        candidate,
        recorder,
        shutdown,
        task,
    }
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("a candidate stops within 30 s of shutdown")
            .unwrap()
            .expect("clean stop");
    }
}

/// Polls `check` every 20 ms for up to 30 s.
async fn eventually<F: FnMut() -> bool>(what: &str, mut check: F) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn terminate_sessions(db: &TestDb, instance: &str, role: &str) -> i64 {
    db.client()
        .await
        .query_one(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
            &[&format!("steward:{instance}:{role}")],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_and_a_standby_takes_over_when_the_leader_connection_dies() {
    let db = TestDb::new().await;
    let branches = || vec![slo(20), hygiene(50, 0)];
    let a = start(&db, fast_settings(LoopMode::Split), branches());
    eventually("a leads", || a.recorder.acquired() == vec![1]).await;
    let b = start(&db, fast_settings(LoopMode::Split), branches());
    eventually("a runs both loops", || {
        let runs = a.recorder.runs();
        runs.iter().any(|r| r.branch == "test_slo")
            && runs.iter().any(|r| r.branch == "test_hygiene")
    })
    .await;
    // The standby runs nothing while a leads.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(b.recorder.runs().is_empty() && b.recorder.acquired().is_empty());

    assert_eq!(
        terminate_sessions(&db, a.candidate.instance(), "leader").await,
        1
    );
    let cut = Instant::now();
    eventually("b takes over with epoch 2", || {
        b.recorder.acquired() == vec![2]
    })
    .await;
    eventually("a notices the loss", || a.recorder.lost_at(1).is_some()).await;
    // The leader connection's end is noticed at once, and both loops stop before any further
    // branch starts. Allow 1 s for the termination to reach a's connection driver: had the
    // loops gone on, the SLO branch (every 20 ms) would have started ~50 times in that span.
    let noticed_by = cut + Duration::from_secs(1);
    let late: Vec<Run> = a
        .recorder
        .runs()
        .into_iter()
        .filter(|r| r.epoch == 1 && r.start > noticed_by)
        .collect();
    assert!(
        late.is_empty(),
        "branches of epoch 1 started after its leader connection was cut: {late:?}"
    );
    assert!(
        a.recorder.lost_at(1).unwrap() < cut + Duration::from_secs(5),
        "a noticed the loss of its leader connection late"
    );
    eventually("b runs both loops", || {
        let runs = b.recorder.runs();
        runs.iter().any(|r| r.branch == "test_slo")
            && runs.iter().any(|r| r.branch == "test_hygiene")
    })
    .await;
    assert!(!a.candidate.health().snapshot().is_leader);

    // a went back to standby: it takes over in turn.
    assert_eq!(
        terminate_sessions(&db, b.candidate.instance(), "leader").await,
        1
    );
    eventually("a leads again with epoch 3", || {
        a.recorder.acquired() == vec![1, 3]
    })
    .await;
    // The standby first, so that it cannot take over from a's step-down.
    b.stop().await;
    a.stop().await;
    let terms: Vec<(i64, Option<String>)> = db
        .client()
        .await
        .query(
            "SELECT epoch, end_reason FROM leader_terms ORDER BY epoch",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        terms,
        vec![
            (1, Some("superseded".to_owned())),
            (2, Some("superseded".to_owned())),
            (3, Some("stepped_down".to_owned()))
        ]
    );
}

/// SLO passes that started while a hygiene pass was running.
/// Passes of `branch` that started while a pass of `busy` was running.
fn runs_during(runs: &[Run], branch: &str, busy: &str) -> usize {
    let busy: Vec<&Run> = runs.iter().filter(|r| r.branch == busy).collect();
    runs.iter()
        .filter(|r| r.branch == branch)
        .filter(|s| busy.iter().any(|b| s.start > b.start && s.start < b.end))
        .count()
}

fn slo_runs_during_hygiene(runs: &[Run]) -> usize {
    runs_during(runs, "test_slo", "test_hygiene")
}

/// A branch with a loop of its own (as the promoter has) runs on its own connection in split
/// mode: its long passes do not hold back the SLO branches of the shared loop. In monolithic
/// mode it shares the one loop like every other branch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_with_its_own_loop_does_not_hold_back_its_class_siblings() {
    let busy = || -> Arc<dyn Branch> {
        Arc::new(TestBranch {
            name: "test_busy",
            class: Class::Slo,
            // 900 ms stays inside the 1 s statement timeout derived from the 100 ms interval.
            interval: Duration::from_millis(100),
            hold: Duration::from_millis(900),
            panics: false,
            own_loop: true,
        })
    };
    let db = TestDb::new().await;
    for mode in [LoopMode::Split, LoopMode::Monolithic] {
        let leader = start(&db, fast_settings(mode), vec![busy(), slo(20)]);
        eventually("two long passes of the busy branch", || {
            leader
                .recorder
                .runs()
                .iter()
                .filter(|r| r.branch == "test_busy")
                .count()
                >= 2
        })
        .await;
        let recorder = leader.recorder.clone();
        leader.stop().await;
        let runs = recorder.runs();
        let loops = |branch: &str| -> Vec<&'static str> {
            let mut names: Vec<&'static str> = runs
                .iter()
                .filter(|r| r.branch == branch)
                .map(|r| r.loop_name)
                .collect();
            names.dedup();
            names
        };
        let during = runs_during(&runs, "test_slo", "test_busy");
        match mode {
            LoopMode::Split => {
                assert_eq!(loops("test_busy"), ["test_busy"]);
                assert_eq!(loops("test_slo"), ["slo"]);
                assert!(during >= 10, "SLO passes during the busy passes: {during}");
            }
            LoopMode::Monolithic => {
                assert_eq!(loops("test_busy"), ["monolithic"]);
                assert_eq!(during, 0);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_mode_keeps_slo_branches_running_during_a_slow_hygiene_pass() {
    let db = TestDb::new().await;
    let leader = start(
        &db,
        fast_settings(LoopMode::Split),
        // 900 ms stays inside the 1 s statement timeout derived from the 100 ms interval.
        vec![slo(20), hygiene(100, 900)],
    );
    eventually("two slow hygiene passes", || {
        leader
            .recorder
            .runs()
            .iter()
            .filter(|r| r.branch == "test_hygiene")
            .count()
            >= 2
    })
    .await;
    let overlapping = slo_runs_during_hygiene(&leader.recorder.runs());
    assert!(
        overlapping >= 10,
        "SLO passes during hygiene passes: {overlapping}"
    );
    // The starved... nothing: in split mode the SLO branch is never overrunning.
    let snapshot = leader.candidate.health().snapshot();
    let slo_health = snapshot
        .branches
        .iter()
        .find(|b| b.branch == "test_slo")
        .unwrap();
    assert_eq!(slo_health.overrun, steward_leader::OverrunState::OnTime);
    leader.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monolithic_mode_runs_one_branch_at_a_time_and_shows_the_starved_branch() {
    let db = TestDb::new().await;
    let leader = start(
        &db,
        fast_settings(LoopMode::Monolithic),
        vec![slo(20), hygiene(100, 400)],
    );
    eventually("four hygiene passes", || {
        leader
            .recorder
            .runs()
            .iter()
            .filter(|r| r.branch == "test_hygiene")
            .count()
            >= 4
    })
    .await;
    assert_eq!(slo_runs_during_hygiene(&leader.recorder.runs()), 0);
    // The SLO branch's own body is fast, but it starts late behind hygiene: start delay makes
    // it visible as overrunning.
    eventually("the starved SLO branch is reported delayed", || {
        leader
            .candidate
            .health()
            .snapshot()
            .branches
            .iter()
            .any(|b| b.branch == "test_slo" && b.overrun == steward_leader::OverrunState::Delayed)
    })
    .await;
    leader.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_branch_is_retried_and_never_stops_its_loop() {
    let db = TestDb::new().await;
    let panicking: Arc<dyn Branch> = Arc::new(TestBranch {
        name: "test_panic",
        class: Class::Slo,
        interval: Duration::from_millis(30),
        hold: Duration::ZERO,
        panics: true,
        own_loop: false,
    });
    let leader = start(
        &db,
        fast_settings(LoopMode::Split),
        vec![panicking, slo(30)],
    );
    eventually(
        "the panicking branch ran 5 times and its sibling 5 times",
        || {
            let runs = leader.recorder.runs();
            runs.iter()
                .filter(|r| matches!(r.result, RunResult::Panicked(_)))
                .count()
                >= 5
                && runs
                    .iter()
                    .filter(|r| r.branch == "test_slo" && r.result == RunResult::Ok)
                    .count()
                    >= 5
        },
    )
    .await;
    let health = leader.candidate.health().snapshot();
    let entry = health
        .branches
        .iter()
        .find(|b| b.branch == "test_panic")
        .unwrap();
    assert!(entry.errors >= 5 && entry.last_error.as_deref().unwrap().contains("panicked"));
    leader.stop().await;
}

#[test]
fn a_wedged_leader_is_taken_over_and_commits_nothing_afterwards() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let db = runtime.block_on(TestDb::new());
    let settings = LeaderSettings {
        wedge_timeout: Duration::from_secs(2),
        wedge_check_interval: Duration::from_millis(200),
        ..fast_settings(LoopMode::Split)
    };
    // The leader lives on its own single-threaded runtime, which we then block: its sockets
    // stay open (alive at the TCP level) but it makes no progress at all.
    let recorder_a = Arc::new(Recorder::default());
    let candidate_a = Arc::new(
        Candidate::new(db.target().clone(), settings.clone(), vec![slo(20)])
            .expect("valid settings")
            .with_observer(recorder_a.clone()),
    );
    let (wedge_tx, wedge_rx) = std::sync::mpsc::channel::<Duration>();
    let leader_thread = std::thread::spawn({
        let candidate = candidate_a.clone();
        move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let shutdown = CancellationToken::new();
                let run = tokio::spawn({
                    let shutdown = shutdown.clone();
                    async move { candidate.run(shutdown).await }
                });
                // Block this runtime's only thread when told to.
                let wedge = tokio::task::spawn_blocking(move || wedge_rx.recv().ok())
                    .await
                    .unwrap();
                if let Some(freeze) = wedge {
                    tokio::spawn(async move { std::thread::sleep(freeze) })
                        .await
                        .unwrap();
                }
                tokio::time::sleep(Duration::from_secs(3)).await;
                shutdown.cancel();
                let _ = tokio::time::timeout(Duration::from_secs(30), run).await;
            });
        }
    });

    runtime.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(30);
        while recorder_a.acquired() != vec![1] || recorder_a.runs().is_empty() {
            assert!(Instant::now() < deadline, "a never led");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let b = start(&db, settings.clone(), vec![slo(20)]);
        wedge_tx.send(Duration::from_secs(6)).unwrap();
        let wedged_at = Instant::now();
        eventually("b takes over from the wedged leader", || {
            b.recorder.acquired() == vec![2]
        })
        .await;
        let took = wedged_at.elapsed();
        assert!(
            took >= Duration::from_secs(2),
            "took over before the wedge timeout: {took:?}"
        );
        let took_over_at = Instant::now();
        eventually("a, once unblocked, knows it lost", || {
            recorder_a.lost_at(1).is_some()
        })
        .await;
        // A pass frozen after its commit reached the server reports Ok late, but committed
        // before b ended a's sessions; a pass that *started* after the takeover must not
        // succeed. (tests/chaos.rs audits commit times in the database itself.)
        let committed_late: Vec<Run> = recorder_a
            .runs()
            .into_iter()
            .filter(|r| r.result == RunResult::Ok && r.start > took_over_at)
            .collect();
        assert!(
            committed_late.is_empty(),
            "the wedged term committed after takeover: {committed_late:?}"
        );
        b.stop().await;
    });
    leader_thread.join().unwrap();
}

/// First time a pass of `branch` reported rows.
fn first_rows_at(recorder: &Recorder, branch: &str) -> Option<Instant> {
    recorder
        .runs()
        .iter()
        .filter(|r| r.branch == branch)
        .find(|r| r.result == RunResult::Ok && recorder.rows_of(r) > 0)
        .map(|r| r.start)
}

impl Recorder {
    fn rows_of(&self, run: &Run) -> u64 {
        self.rows
            .lock()
            .unwrap()
            .get(&(run.branch, run.start))
            .copied()
            .unwrap_or(0)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rescues_wait_a_staleness_window_after_an_election_and_after_losing_the_database() {
    use steward_branches::rescue_stale_heartbeats::{Config, RescueStaleHeartbeats};
    use steward_queue::{JobState, NewJob, Queue};
    let db = TestDb::new().await;
    let queue = Queue::new(db.pool(4), db.schema());
    queue
        .enqueue_batch(&[NewJob::new("live"), NewJob::new("dead")])
        .await
        .unwrap();
    let claimed = queue.claim("default", 2).await.unwrap();
    let live = claimed.iter().find(|j| j.kind == "live").unwrap().lease;
    let dead = claimed.iter().find(|j| j.kind == "dead").unwrap().lease;
    let client = db.client().await;
    // Both workers look dead: last heartbeat 10 s ago, staleness 2 s (as after an outage).
    client
        .batch_execute("UPDATE jobs SET heartbeat_at = now() - interval '10 seconds'")
        .await
        .unwrap();

    let quiet = Duration::from_secs(2);
    let rescue = RescueStaleHeartbeats::new(Config {
        interval: Duration::from_millis(50),
        staleness: quiet,
        ..Config::default()
    });
    let leader = start(&db, fast_settings(LoopMode::Split), vec![Arc::new(rescue)]);
    eventually("leads", || leader.recorder.acquired() == vec![1]).await;
    let elected = Instant::now();
    // The live worker gets through only after a second: inside the quiet period.
    tokio::time::sleep(Duration::from_secs(1)).await;
    queue
        .heartbeat(live)
        .await
        .expect("the live worker still holds its job");
    let beating = tokio::spawn({
        let queue = queue.clone();
        async move {
            loop {
                tokio::time::sleep(Duration::from_millis(300)).await;
                if queue.heartbeat(live).await.is_err() {
                    return false;
                }
            }
        }
    });
    let state = |id| {
        let queue = queue.clone();
        async move { queue.get(id).await.unwrap().unwrap().state }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while state(dead.job_id).await != JobState::Retryable {
        assert!(
            Instant::now() < deadline,
            "the dead worker's job was never rescued"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The pass's commit is visible before the loop reports the pass.
    eventually("the rescuing pass is reported", || {
        first_rows_at(&leader.recorder, "rescue_stale_heartbeats").is_some()
    })
    .await;
    let rescued_at = first_rows_at(&leader.recorder, "rescue_stale_heartbeats").unwrap();
    assert!(
        rescued_at >= elected + quiet - Duration::from_millis(200),
        "rescued {:?} after the election, inside the quiet period",
        rescued_at - elected
    );
    assert_eq!(
        state(live.job_id).await,
        JobState::Running,
        "the live job was rescued"
    );

    // Now the leader loses its SLO work connection, and during that outage the live worker
    // could not heartbeat either (its last heartbeat looks 10 s old); it gets through 1 s late.
    beating.abort();
    assert_eq!(
        terminate_sessions(&db, leader.candidate.instance(), "slo").await,
        1
    );
    let cut = Instant::now();
    client
        .execute(
            "UPDATE jobs SET heartbeat_at = now() - interval '10 seconds' WHERE id = $1",
            &[&live.job_id],
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    queue
        .heartbeat(live)
        .await
        .expect("the live worker still holds its job after the cut");
    // Wait until rescue passes have run past the quiet period after the reconnect.
    eventually("rescue passes after the quiet period", || {
        leader.recorder.runs().iter().any(|r| {
            r.branch == "rescue_stale_heartbeats"
                && r.start > cut + quiet + Duration::from_millis(200)
        })
    })
    .await;
    let job = queue.get(live.job_id).await.unwrap().unwrap();
    assert_eq!(
        (job.state, job.run_lease),
        (JobState::Running, live.run_lease)
    );
    assert!(job.error_entries().is_empty());
    leader.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_that_keeps_panicking_does_not_hold_rescues_back() {
    use steward_branches::rescue_stale_heartbeats::{Config, RescueStaleHeartbeats};
    use steward_queue::{JobState, NewJob, Queue};
    let db = TestDb::new().await;
    let queue = Queue::new(db.pool(2), db.schema());
    queue.enqueue(&NewJob::new("dead")).await.unwrap();
    let dead = queue.claim("default", 1).await.unwrap()[0].lease;
    db.client()
        .await
        .batch_execute("UPDATE jobs SET heartbeat_at = now() - interval '10 seconds'")
        .await
        .unwrap();
    // A panic replaces the loop's connection, but the database answered throughout: the
    // rescue's quiet period (1 s) must not start again at every panic (every 50 ms here).
    let panicking: Arc<dyn Branch> = Arc::new(TestBranch {
        name: "test_panic",
        class: Class::Hygiene,
        interval: Duration::from_millis(50),
        hold: Duration::ZERO,
        panics: true,
        own_loop: false,
    });
    let rescue = RescueStaleHeartbeats::new(Config {
        interval: Duration::from_millis(50),
        staleness: Duration::from_secs(1),
        ..Config::default()
    });
    let leader = start(
        &db,
        fast_settings(LoopMode::Monolithic),
        vec![panicking, Arc::new(rescue)],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let job = queue.get(dead.job_id).await.unwrap().unwrap();
        if job.state == JobState::Retryable {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the dead worker's job was never rescued while a sibling kept panicking"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let panics = leader
        .recorder
        .runs()
        .iter()
        .filter(|r| matches!(r.result, RunResult::Panicked(_)))
        .count();
    assert!(panics >= 5, "the sibling panicked only {panics} times");
    leader.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_past_its_derived_timeout_is_cut_and_the_loop_goes_on() {
    let db = TestDb::new().await;
    // Interval 100 ms: statement timeout 1 s (Timeouts::for_interval); the pass sleeps 3 s.
    let leader = start(
        &db,
        fast_settings(LoopMode::Split),
        vec![slo(20), hygiene(100, 3000)],
    );
    eventually("two hygiene passes cut by the statement timeout", || {
        leader
            .recorder
            .runs()
            .iter()
            .filter(|r| r.branch == "test_hygiene" && matches!(r.result, RunResult::Timeout(_)))
            .count()
            >= 2
    })
    .await;
    let runs = leader.recorder.runs();
    for run in runs.iter().filter(|r| r.branch == "test_hygiene") {
        let took = run.end - run.start;
        assert!(
            took < Duration::from_millis(2500),
            "a hygiene pass ran {took:?}, past its 1 s statement timeout"
        );
    }
    let health = leader.candidate.health().snapshot();
    let entry = health
        .branches
        .iter()
        .find(|b| b.branch == "test_hygiene")
        .unwrap();
    assert!(
        entry
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("statement timeout")),
        "{:?}",
        entry.last_error
    );
    assert!(
        runs.iter()
            .filter(|r| r.branch == "test_slo" && r.result == RunResult::Ok)
            .count()
            >= 10
    );
    leader.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_during_a_long_statement_cancels_it_within_the_grace_and_releases_the_lock() {
    let db = TestDb::new().await;
    let settings = LeaderSettings {
        shutdown_grace: Duration::from_millis(200),
        ..fast_settings(LoopMode::Split)
    };
    let leader = start(&db, settings.clone(), vec![slo(20), hygiene(60_000, 5_000)]);
    eventually("leads", || leader.recorder.acquired() == vec![1]).await;
    let observer = db.client().await;
    let sleeping = format!("steward:{}:hygiene", leader.candidate.instance());
    let count_sleeping = || {
        let observer = &observer;
        let sleeping = sleeping.clone();
        async move {
            observer
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                     WHERE application_name = $1 AND state = 'active' AND query LIKE '%pg_sleep%'",
                    &[&sleeping],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while count_sleeping().await == 0 {
        assert!(Instant::now() < deadline, "the hygiene pass never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let standby = start(&db, settings, vec![slo(20)]);
    let asked = Instant::now();
    leader.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), leader.task)
        .await
        .expect("the leader exits within grace + 1 s + step-down")
        .unwrap()
        .expect("clean stop");
    let stopped_in = asked.elapsed();
    // The 5 s statement was cancelled after the 200 ms grace, not waited for.
    assert!(
        stopped_in < Duration::from_secs(3),
        "stopping took {stopped_in:?}: the running statement was waited for"
    );
    eventually("the standby leads with epoch 2", || {
        standby.recorder.acquired() == vec![2]
    })
    .await;
    standby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notify_wakes_the_promoter_long_before_its_interval() {
    use steward_branches::promote_scheduled::{Config, PromoteScheduled};
    use steward_queue::{JobState, NewJob, Queue};
    let db = TestDb::new().await;
    let queue = Queue::new(db.pool(2), db.schema());
    // Interval 60 s: with an empty queue the promoter publishes a wake-up a minute away, so
    // only the producer's NOTIFY can make it promote a job due in 300 ms any sooner.
    let promote = PromoteScheduled::new(Config {
        interval: Duration::from_secs(60),
        ..Config::default()
    });
    let leader = start(&db, fast_settings(LoopMode::Split), vec![Arc::new(promote)]);
    eventually("the promoter ran once and published its wake-up", || {
        leader
            .recorder
            .runs()
            .iter()
            .any(|r| r.branch == "promote_scheduled" && r.result == RunResult::Ok)
    })
    .await;
    let steward_queue::Enqueued::New(id) = queue
        .enqueue(&NewJob::new("soon").run_in(Duration::from_millis(300)))
        .await
        .unwrap()
    else {
        panic!("a job without a unique key is always new")
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while queue.get(id).await.unwrap().unwrap().state != JobState::Available {
        assert!(
            Instant::now() < deadline,
            "the job was not promoted within 20 s: the NOTIFY did not wake the loop"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    leader.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_loop_keeps_reporting_progress_between_rare_passes() {
    let db = TestDb::new().await;
    // One pass at the start, the next in an hour: /healthz must not take the loop for stuck.
    let leader = start(
        &db,
        fast_settings(LoopMode::Split),
        vec![slo(20), hygiene(3_600_000, 0)],
    );
    eventually("the hourly branch ran once", || {
        leader
            .recorder
            .runs()
            .iter()
            .any(|r| r.branch == "test_hygiene")
    })
    .await;
    let first_pass = Instant::now();
    eventually(
        "the hygiene loop reported progress well after its only pass",
        || {
            let since = leader
                .candidate
                .health()
                .snapshot()
                .loops
                .get("hygiene")
                .copied();
            first_pass.elapsed() > Duration::from_secs(4)
                && since.is_some_and(|s| s < Duration::from_secs(3))
        },
    )
    .await;
    leader.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rescues_hold_off_while_the_database_stalls() {
    use steward_branches::rescue_stale_heartbeats::{Config, RescueStaleHeartbeats};
    use steward_queue::{JobState, NewJob, Queue};
    let db = TestDb::new().await;
    let queue = Queue::new(db.pool(2), db.schema());
    queue.enqueue(&NewJob::new("looks-dead")).await.unwrap();
    let job = queue.claim("default", 1).await.unwrap()[0].lease;
    db.client()
        .await
        .batch_execute("UPDATE jobs SET heartbeat_at = now() - interval '10 seconds'")
        .await
        .unwrap();
    // Every probe (every 200 ms) counts as a stall: each one starts the 1 s quiet period
    // again, as a database answering slowly would. The job looks dead the whole time.
    let settings = LeaderSettings {
        stall_threshold: Duration::from_nanos(1),
        ..fast_settings(LoopMode::Split)
    };
    let rescue = RescueStaleHeartbeats::new(Config {
        interval: Duration::from_millis(50),
        staleness: Duration::from_secs(1),
        ..Config::default()
    });
    let leader = start(&db, settings, vec![Arc::new(rescue), slo(50)]);
    eventually("the SLO loop runs its other branch", || {
        leader
            .recorder
            .runs()
            .iter()
            .filter(|r| r.branch == "test_slo")
            .count()
            >= 40
    })
    .await;
    // 40 passes of the 50 ms sibling: at least 2 s, two quiet periods, of stalls.
    let state = queue.get(job.job_id).await.unwrap().unwrap().state;
    assert_eq!(state, JobState::Running, "a rescue acted during a stall");
    assert!(
        !leader
            .recorder
            .runs()
            .iter()
            .any(|r| r.branch == "rescue_stale_heartbeats"),
        "the rescue ran inside its quiet period"
    );
    leader.stop().await;
}
