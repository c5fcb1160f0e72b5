//! Election, takeover, loop isolation and resilience, against a real PostgreSQL.

use async_trait::async_trait;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use steward_branches::{BacklogKind, Branch, BranchContext, BranchError, Class, Outcome};
use steward_leader::{
    BacklogReport, BranchRun, Candidate, LeaderSettings, LeadershipEvent, LoopMode, Observer,
    OverrunState, RunResult,
};
use steward_testkit::TestDb;
use tokio::sync::watch;
use tokio_postgres::Client;
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

/// The heartbeat rescue, every `interval`, for runs silent longer than `staleness` (also its
/// quiet period).
fn heartbeat_rescue(interval: Duration, staleness: Duration) -> Arc<dyn Branch> {
    use steward_branches::rescue_stale_heartbeats::{Config, RescueStaleHeartbeats};
    Arc::new(RescueStaleHeartbeats::new(Config {
        interval,
        staleness,
        ..Config::default()
    }))
}

/// The promoter, every `interval` unless a NOTIFY wakes it.
fn promoter(interval: Duration) -> Arc<dyn Branch> {
    use steward_branches::promote_scheduled::{Config, PromoteScheduled};
    Arc::new(PromoteScheduled::new(Config {
        interval,
        ..Config::default()
    }))
}

#[derive(Debug, Clone)]
struct Run {
    branch: &'static str,
    loop_name: &'static str,
    epoch: i64,
    start: Instant,
    end: Instant,
    rows: u64,
    result: RunResult,
}

/// Everything a candidate reports, with the time it arrived. Every report also bumps
/// `events`, which [`Recorder::until`] waits on.
struct Recorder {
    runs: Mutex<Vec<Run>>,
    leadership: Mutex<Vec<(LeadershipEvent, Instant)>>,
    progress: Mutex<Vec<(String, Instant)>>,
    backlogs: Mutex<Vec<(BacklogReport, Instant)>>,
    /// (branch, consecutive failures) of every pass.
    failures: Mutex<Vec<(&'static str, u32)>>,
    events: watch::Sender<u64>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self {
            runs: Mutex::default(),
            leadership: Mutex::default(),
            progress: Mutex::default(),
            backlogs: Mutex::default(),
            failures: Mutex::default(),
            events: watch::channel(0).0,
        }
    }
}

impl Observer for Recorder {
    fn branch_run(&self, run: &BranchRun<'_>) {
        let end = Instant::now();
        self.runs.lock().unwrap().push(Run {
            branch: run.branch,
            loop_name: run.loop_name,
            epoch: run.epoch,
            start: end - run.duration,
            end,
            rows: run.rows,
            result: run.result.clone(),
        });
        self.failures
            .lock()
            .unwrap()
            .push((run.branch, run.consecutive_failures));
        self.events.send_modify(|n| *n += 1);
    }
    fn backlog(&self, report: &BacklogReport) {
        self.backlogs
            .lock()
            .unwrap()
            .push((report.clone(), Instant::now()));
        self.events.send_modify(|n| *n += 1);
    }
    fn leadership(&self, event: &LeadershipEvent) {
        self.leadership
            .lock()
            .unwrap()
            .push((event.clone(), Instant::now()));
        self.events.send_modify(|n| *n += 1);
    }
    fn loop_progress(&self, loop_name: &str, _epoch: i64) {
        self.progress
            .lock()
            .unwrap()
            .push((loop_name.to_owned(), Instant::now()));
        self.events.send_modify(|n| *n += 1);
    }
}

impl Recorder {
    fn runs(&self) -> Vec<Run> {
        self.runs.lock().unwrap().clone()
    }
    /// How many passes of `branch` have been reported.
    fn passes(&self, branch: &str) -> usize {
        self.runs().iter().filter(|r| r.branch == branch).count()
    }
    /// Passes of `branch` that succeeded.
    fn ok_runs(&self, branch: &str) -> Vec<Run> {
        self.runs()
            .into_iter()
            .filter(|r| r.branch == branch && r.result == RunResult::Ok)
            .collect()
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
    /// The promotion backlog's ages as measured, with when they were reported.
    fn promotion_backlog(&self) -> Vec<(Duration, Instant)> {
        self.backlogs
            .lock()
            .unwrap()
            .iter()
            .filter(|(r, _)| r.kind == BacklogKind::Promotion)
            .map(|(r, at)| (r.age, *at))
            .collect()
    }
    /// When `loop_name` reported progress.
    fn progress_of(&self, loop_name: &str) -> Vec<Instant> {
        self.progress
            .lock()
            .unwrap()
            .iter()
            .filter(|(name, _)| name == loop_name)
            .map(|(_, at)| *at)
            .collect()
    }
    /// The first pass of `branch` that reported rows.
    fn first_rows(&self, branch: &str) -> Option<Run> {
        self.runs()
            .into_iter()
            .find(|r| r.branch == branch && r.result == RunResult::Ok && r.rows > 0)
    }

    /// Waits until `check` holds, checking again at every report the candidate makes;
    /// panics after 30 s.
    async fn until(&self, what: &str, check: impl FnMut() -> bool) {
        self.until_within(what, Duration::from_secs(30), check)
            .await
    }

    /// [`Self::until`] with a limit of `within`.
    async fn until_within(&self, what: &str, within: Duration, mut check: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + within;
        let mut events = self.events.subscribe();
        loop {
            // Reports from here on wake the wait below, so none is missed between the check
            // and the wait.
            events.borrow_and_update();
            if check() {
                return;
            }
            match tokio::time::timeout_at(deadline, events.changed()).await {
                Ok(changed) => changed.expect("the recorder outlives its waiters"),
                Err(_) => panic!("not within {within:?}: {what}"),
            }
        }
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

/// A candidate for the test database's schema reporting to `recorder`.
fn candidate(
    db: &TestDb,
    settings: LeaderSettings,
    branches: Vec<Arc<dyn Branch>>,
    recorder: Arc<Recorder>,
) -> Arc<Candidate> {
    Arc::new(
        Candidate::new(db.target().clone(), settings, branches)
            .expect("valid settings")
            .with_observer(recorder),
    )
}

struct Running {
    candidate: Arc<Candidate>,
    recorder: Arc<Recorder>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), steward_leader::LeaderError>>,
}

fn start(db: &TestDb, settings: LeaderSettings, branches: Vec<Arc<dyn Branch>>) -> Running {
    let recorder = Arc::new(Recorder::default());
    let candidate = candidate(db, settings, branches, recorder.clone());
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

/// Polls the database with `probe` every 10 ms until it returns true; panics after 30 s.
async fn poll_db<F, Fut>(what: &str, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while !probe().await {
        assert!(Instant::now() < deadline, "not within 30 s: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The backend pids of `instance`'s sessions in `role` (application_name
/// `steward:<instance>:<role>`) that match `predicate` (SQL over pg_stat_activity).
async fn sessions(client: &Client, instance: &str, role: &str, predicate: &str) -> Vec<i32> {
    client
        .query(
            &format!(
                "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND {predicate}"
            ),
            &[&format!("steward:{instance}:{role}")],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
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
    a.recorder
        .until("a leads", || a.recorder.acquired() == vec![1])
        .await;
    let b = start(&db, fast_settings(LoopMode::Split), branches());
    a.recorder
        .until("a runs both loops", || {
            let runs = a.recorder.runs();
            runs.iter().any(|r| r.branch == "test_slo")
                && runs.iter().any(|r| r.branch == "test_hygiene")
        })
        .await;
    // The standby stands by: its leader session waits for the lock...
    let observer = db.client().await;
    poll_db("b waits for the leadership lock", || {
        let (observer, b) = (&observer, b.candidate.instance());
        async move {
            sessions(observer, b, "leader", "wait_event_type = 'Lock'")
                .await
                .len()
                == 1
        }
    })
    .await;
    // ...and runs nothing while a leads: not during the next 10 SLO passes of a.
    let seen = a.recorder.ok_runs("test_slo").len();
    a.recorder
        .until("10 more SLO passes of a", || {
            a.recorder.ok_runs("test_slo").len() >= seen + 10
        })
        .await;
    assert!(b.recorder.runs().is_empty() && b.recorder.acquired().is_empty());

    assert_eq!(
        terminate_sessions(&db, a.candidate.instance(), "leader").await,
        1
    );
    let cut = Instant::now();
    b.recorder
        .until("b takes over with epoch 2", || {
            b.recorder.acquired() == vec![2]
        })
        .await;
    a.recorder
        .until("a notices the loss", || a.recorder.lost_at(1).is_some())
        .await;
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
    // The loss is reported once the loops have stopped: no pass of the term starts after.
    let lost_at = a.recorder.lost_at(1).unwrap();
    let after_loss: Vec<Run> = a
        .recorder
        .runs()
        .into_iter()
        .filter(|r| r.epoch == 1 && r.start > lost_at)
        .collect();
    assert!(
        after_loss.is_empty(),
        "branches of epoch 1 started after the loss was reported: {after_loss:?}"
    );
    assert!(
        lost_at < cut + Duration::from_secs(5),
        "a noticed the loss of its leader connection late"
    );
    b.recorder
        .until("b runs both loops", || {
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
    a.recorder
        .until("a leads again with epoch 3", || {
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
        leader
            .recorder
            .until("two long passes of the busy branch", || {
                leader.recorder.passes("test_busy") >= 2
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
    leader
        .recorder
        .until("two slow hygiene passes", || {
            leader.recorder.passes("test_hygiene") >= 2
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
    leader
        .recorder
        .until("four hygiene passes", || {
            leader.recorder.passes("test_hygiene") >= 4
        })
        .await;
    assert_eq!(slo_runs_during_hygiene(&leader.recorder.runs()), 0);
    // The SLO branch's own body is fast, but it starts late behind hygiene: start delay makes
    // it visible as overrunning.
    leader
        .recorder
        .until("the starved SLO branch is reported delayed", || {
            leader
                .candidate
                .health()
                .snapshot()
                .branches
                .iter()
                .any(|b| {
                    b.branch == "test_slo" && b.overrun == steward_leader::OverrunState::Delayed
                })
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
    leader
        .recorder
        .until(
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
    // The leader lives on its own single-threaded runtime, whose only thread we then block
    // until b has taken over: its sockets stay open (alive at the TCP level) but it makes no
    // progress at all.
    let recorder_a = Arc::new(Recorder::default());
    let candidate_a = candidate(&db, settings.clone(), vec![slo(20)], recorder_a.clone());
    let (freeze_tx, freeze_rx) = std::sync::mpsc::channel::<()>();
    let (thaw_tx, thaw_rx) = std::sync::mpsc::channel::<()>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
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
                // Block this runtime's only thread when told to, until told to thaw (or the
                // test is over).
                let freeze = tokio::task::spawn_blocking(move || freeze_rx.recv().is_ok())
                    .await
                    .unwrap();
                if freeze {
                    tokio::spawn(async move {
                        let _ = thaw_rx.recv();
                    })
                    .await
                    .unwrap();
                }
                // Running again: until the test has seen what it waits for.
                let _ = stop_rx.await;
                shutdown.cancel();
                let _ = tokio::time::timeout(Duration::from_secs(30), run).await;
            });
        }
    });

    runtime.block_on(async {
        recorder_a
            .until("a leads and runs its branch", || {
                recorder_a.acquired() == vec![1] && !recorder_a.runs().is_empty()
            })
            .await;
        let b = start(&db, settings.clone(), vec![slo(20)]);
        freeze_tx.send(()).unwrap();
        let wedged_at = Instant::now();
        b.recorder
            .until("b takes over from the wedged leader", || {
                b.recorder.acquired() == vec![2]
            })
            .await;
        let took = wedged_at.elapsed();
        assert!(
            took >= Duration::from_secs(2),
            "took over before the wedge timeout: {took:?}"
        );
        let took_over_at = Instant::now();
        thaw_tx.send(()).unwrap();
        recorder_a
            .until("a, once unblocked, knows it lost", || {
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
        stop_tx.send(()).unwrap();
        b.stop().await;
    });
    leader_thread.join().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rescues_wait_a_staleness_window_after_an_election_and_after_losing_the_database() {
    use steward_queue::{JobState, NewJob, Queue};
    let db = TestDb::new().await;
    let queue = Queue::new(db.pool(4));
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
    // The rescue shares the SLO loop with a fast sibling, whose passes show the loop at work.
    let began = Instant::now();
    let leader = start(
        &db,
        fast_settings(LoopMode::Split),
        vec![heartbeat_rescue(Duration::from_millis(50), quiet), slo(20)],
    );
    // Passes of the rescue that got to run (a pass on a connection that was cut fails).
    let rescue_runs_since = |since: Instant| {
        let runs = leader.recorder.ok_runs("rescue_stale_heartbeats");
        runs.iter().filter(|r| r.start > since).count()
    };
    leader
        .recorder
        .until("leads", || leader.recorder.acquired() == vec![1])
        .await;
    let elected = Instant::now();
    // The live worker gets through late, but inside the quiet period: after 10 passes of the
    // loop's sibling, by which time the rescue (due every 50 ms) would have run if it were
    // not held back.
    leader
        .recorder
        .until("10 passes of the SLO sibling", || {
            leader.recorder.ok_runs("test_slo").len() >= 10
        })
        .await;
    assert_eq!(rescue_runs_since(began), 0, "the rescue ran right away");
    assert!(
        elected.elapsed() < quiet,
        "the worker's heartbeat came after the quiet period: the test proves nothing"
    );
    queue
        .heartbeat(live)
        .await
        .expect("the live worker still holds its job");
    // From now on the live worker heartbeats every 300 ms, well within the staleness, until
    // it loses its job (which ends the task) or is cut off.
    let keep_beating = || {
        let queue = queue.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(300));
            every.tick().await;
            loop {
                every.tick().await;
                if let Err(e) = queue.heartbeat(live).await {
                    return e;
                }
            }
        })
    };
    let beating = keep_beating();
    let state = |id| {
        let queue = queue.clone();
        async move { queue.get(id).await.unwrap().unwrap().state }
    };
    // The pass's commit is visible before the loop reports the pass.
    leader
        .recorder
        .until("a rescue pass that rescued something", || {
            leader
                .recorder
                .first_rows("rescue_stale_heartbeats")
                .is_some()
        })
        .await;
    let rescuing = leader
        .recorder
        .first_rows("rescue_stale_heartbeats")
        .unwrap();
    assert_eq!(rescuing.rows, 1, "{rescuing:?}");
    assert_eq!(
        state(dead.job_id).await,
        JobState::Retryable,
        "the dead worker's job was not the one rescued"
    );
    let rescued_at = rescuing.start;
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
    assert!(!beating.is_finished(), "the live worker lost its job");
    beating.abort();
    let instance = leader.candidate.instance();
    let old = sessions(&client, instance, "slo", "true").await;
    assert_eq!(terminate_sessions(&db, instance, "slo").await, 1);
    // From when its backend is gone, no statement gets through on the old connection.
    poll_db("the SLO session's backend is gone", || {
        let (client, old) = (&client, format!("pid = {}", old[0]));
        async move { sessions(client, instance, "slo", &old).await.is_empty() }
    })
    .await;
    let cut = Instant::now();
    client
        .execute(
            "UPDATE jobs SET heartbeat_at = now() - interval '10 seconds' WHERE id = $1",
            &[&live.job_id],
        )
        .await
        .unwrap();
    // The worker gets through late again: after 10 passes of the sibling on the loop's new
    // connection, which an unheld rescue would have shared.
    leader
        .recorder
        .until("10 SLO passes after the reconnect", || {
            let runs = leader.recorder.ok_runs("test_slo");
            runs.iter().filter(|r| r.start > cut).count() >= 10
        })
        .await;
    assert_eq!(
        rescue_runs_since(cut),
        0,
        "the rescue ran right after the reconnect"
    );
    assert!(
        cut.elapsed() < quiet,
        "the worker's heartbeat came after the quiet period: the test proves nothing"
    );
    queue
        .heartbeat(live)
        .await
        .expect("the live worker still holds its job after the cut");
    let beating = keep_beating();
    // Wait until rescue passes have run past the quiet period after the reconnect.
    leader
        .recorder
        .until("rescue passes after the quiet period", || {
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
    assert!(!beating.is_finished(), "the live worker lost its job");
    beating.abort();
    leader.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_that_keeps_panicking_does_not_hold_rescues_back() {
    use steward_queue::{JobState, NewJob, Queue};
    let db = TestDb::new().await;
    let queue = Queue::new(db.pool(2));
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
    let rescue = heartbeat_rescue(Duration::from_millis(50), Duration::from_secs(1));
    let leader = start(
        &db,
        fast_settings(LoopMode::Monolithic),
        vec![panicking, rescue],
    );
    leader
        .recorder
        .until(
            "the dead worker's job rescued while a sibling kept panicking",
            || {
                leader
                    .recorder
                    .first_rows("rescue_stale_heartbeats")
                    .is_some()
            },
        )
        .await;
    // The pass's commit is visible before the loop reports the pass.
    let job = queue.get(dead.job_id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Retryable);
    let rescued_at = leader
        .recorder
        .first_rows("rescue_stale_heartbeats")
        .unwrap()
        .start;
    let panics = leader
        .recorder
        .runs()
        .iter()
        .filter(|r| matches!(r.result, RunResult::Panicked(_)) && r.end < rescued_at)
        .count();
    assert!(
        panics >= 5,
        "the sibling panicked only {panics} times before the rescue"
    );
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
    leader
        .recorder
        .until("two hygiene passes cut by the statement timeout", || {
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
    leader
        .recorder
        .until("leads", || leader.recorder.acquired() == vec![1])
        .await;
    let observer = db.client().await;
    poll_db("the hygiene pass sleeping in its statement", || {
        let (observer, instance) = (&observer, leader.candidate.instance());
        let sleeping = "state = 'active' AND query LIKE '%pg_sleep%'";
        async move {
            sessions(observer, instance, "hygiene", sleeping)
                .await
                .len()
                == 1
        }
    })
    .await;
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
    standby
        .recorder
        .until("the standby leads with epoch 2", || {
            standby.recorder.acquired() == vec![2]
        })
        .await;
    standby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notify_wakes_the_promoter_long_before_its_interval() {
    use steward_queue::{JobState, NewJob, Queue};
    let db = TestDb::new().await;
    let queue = Queue::new(db.pool(2));
    // Interval 60 s: with an empty queue the promoter publishes a wake-up a minute away, so
    // only the producer's NOTIFY can make it promote a job due in 300 ms any sooner.
    let promote = promoter(Duration::from_secs(60));
    let leader = start(&db, fast_settings(LoopMode::Split), vec![promote]);
    leader
        .recorder
        .until("the promoter ran once and published its wake-up", || {
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
    leader
        .recorder
        .until_within(
            "a promoting pass (else the NOTIFY did not wake the loop)",
            Duration::from_secs(20),
            || leader.recorder.first_rows("promote_scheduled").is_some(),
        )
        .await;
    // The pass's commit is visible before the loop reports the pass.
    let state = queue.get(id).await.unwrap().unwrap().state;
    assert_eq!(state, JobState::Available);
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
    leader
        .recorder
        .until("the hourly branch ran once", || {
            leader
                .recorder
                .runs()
                .iter()
                .any(|r| r.branch == "test_hygiene")
        })
        .await;
    let pass = leader
        .recorder
        .runs()
        .iter()
        .find(|r| r.branch == "test_hygiene")
        .unwrap()
        .end;
    // While idle, the loop reports progress every second or so: wait for four such reports
    // after the one that follows the pass, about four seconds.
    let after_pass = || -> Vec<Instant> {
        let progress = leader.recorder.progress_of("hygiene");
        progress.into_iter().filter(|at| *at >= pass).collect()
    };
    leader
        .recorder
        .until("four progress reports of the idle hygiene loop", || {
            after_pass().len() >= 5
        })
        .await;
    let mut last = pass;
    for at in after_pass() {
        assert!(
            at - last < Duration::from_secs(3),
            "the idle loop went {:?} without reporting progress",
            at - last
        );
        last = at;
    }
    assert_eq!(
        leader.recorder.passes("test_hygiene"),
        1,
        "the hourly branch ran again"
    );
    let since = leader
        .candidate
        .health()
        .snapshot()
        .loops
        .get("hygiene")
        .copied();
    assert!(
        since.is_some_and(|s| s < Duration::from_secs(3)),
        "/healthz sees the hygiene loop idle for {since:?}"
    );
    leader.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rescues_hold_off_while_the_database_stalls() {
    use steward_queue::{JobState, NewJob, Queue};
    let db = TestDb::new().await;
    let queue = Queue::new(db.pool(2));
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
    let rescue = heartbeat_rescue(Duration::from_millis(50), Duration::from_secs(1));
    let leader = start(&db, settings, vec![rescue, slo(50)]);
    leader
        .recorder
        .until("the SLO loop runs its other branch", || {
            leader.recorder.passes("test_slo") >= 40
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

/// With the jobs table locked against every statement, each promote pass gives up at its lock
/// timeout, so no pass overruns; yet users wait. The leader's own measurement goes on and shows
/// the promotion backlog growing, the failed passes count in a row and make the branch delayed,
/// and once the lock is released the backlog drains to nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_jobs_table_shows_as_a_growing_backlog_and_failed_passes() {
    use steward_queue::{NewJob, Queue};
    let db = TestDb::new().await;
    let settings = LeaderSettings {
        backlog_interval: Duration::from_millis(200),
        ..fast_settings(LoopMode::Split)
    };
    let leader = start(&db, settings, vec![promoter(Duration::from_millis(250))]);
    leader
        .recorder
        .until("a promote pass", || {
            leader.recorder.passes("promote_scheduled") >= 1
        })
        .await;
    let queue = Queue::new(db.pool(2));
    queue
        .enqueue(&NewJob::new("k").run_in(Duration::from_secs(2)))
        .await
        .unwrap();
    // A measurement after the enqueue knows when the job comes due; the lock comes before it
    // does, so that only the lock keeps it from being promoted.
    let enqueued_at = Instant::now();
    leader
        .recorder
        .until("a measurement that saw the job", || {
            // The second report after the enqueue comes from a reading begun after it.
            leader
                .recorder
                .promotion_backlog()
                .iter()
                .filter(|(_, at)| *at > enqueued_at)
                .count()
                >= 2
        })
        .await;
    let mut locker = db.client().await;
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let locked_at = Instant::now();
    leader
        .recorder
        .until("the backlog to reach a second while locked", || {
            leader
                .recorder
                .promotion_backlog()
                .iter()
                .any(|(age, at)| *at > locked_at && *age >= Duration::from_secs(1))
        })
        .await;
    leader
        .recorder
        .until("three failed promote passes in a row", || {
            leader
                .recorder
                .failures
                .lock()
                .unwrap()
                .iter()
                .any(|(branch, n)| *branch == "promote_scheduled" && *n >= 3)
        })
        .await;
    let delayed = leader
        .candidate
        .health()
        .snapshot()
        .branches
        .iter()
        .any(|b| b.branch == "promote_scheduled" && b.overrun == OverrunState::Delayed);
    assert!(delayed, "failed passes make the branch delayed");
    lock.rollback().await.unwrap();
    let released_at = Instant::now();
    leader
        .recorder
        .until("the backlog to drain after the release", || {
            leader
                .recorder
                .promotion_backlog()
                .iter()
                .any(|(age, at)| *at > released_at && age.is_zero())
        })
        .await;
    leader.stop().await;
}

/// `steward_leader::status` sees every candidate, the leader first, each rescue held in its
/// quiet period with the time it may run, and forgets a standby that stopped cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_lists_every_candidate_leader_first_and_rescues_held_in_their_quiet_period() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let branches = || {
        vec![
            slo(50),
            heartbeat_rescue(Duration::from_millis(200), Duration::from_secs(600)),
        ]
    };
    let leader = start(&db, fast_settings(LoopMode::Split), branches());
    leader
        .recorder
        .until("the leader's first pass", || {
            leader.recorder.passes("test_slo") >= 1
        })
        .await;
    let standby = start(&db, fast_settings(LoopMode::Split), branches());
    let read = || steward_leader::status::read(&client, db.schema());
    poll_db(
        "both candidates and the held rescue in the status",
        || async {
            let status = read().await.unwrap();
            status.candidates.len() == 2
                && status
                    .branches
                    .iter()
                    .any(|b| b.branch == "rescue_stale_heartbeats" && b.held_until.is_some())
        },
    )
    .await;
    let status = read().await.unwrap();
    let first = &status.candidates[0];
    assert!(first.leading, "{status:?}");
    assert_eq!(first.instance, leader.candidate.instance());
    assert_eq!(status.candidates[1].instance, standby.candidate.instance());
    assert!(!status.candidates[1].leading);
    let held = status
        .branches
        .iter()
        .find(|b| b.branch == "rescue_stale_heartbeats")
        .unwrap();
    // Held for its quiet period, the staleness (600 s), from the term's start.
    let held_for = (held.held_until.unwrap() - chrono::Utc::now()).num_seconds();
    assert!((500..=600).contains(&held_for), "{held:?}");
    assert_eq!(held.runs, 0);
    assert!(held.last_run_at.is_none());
    assert_eq!(held.class.as_deref(), Some("slo"));

    standby.stop().await;
    poll_db("the standby withdrawn", || async {
        read().await.unwrap().candidates.len() == 1
    })
    .await;
    leader.stop().await;
    assert!(
        read().await.unwrap().candidates.is_empty(),
        "the leader withdrew too"
    );
}
