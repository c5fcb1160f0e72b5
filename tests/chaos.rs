//! Chaos: real `steward run` processes (scenario 5: the branches themselves) under a mixed
//! workload while something breaks, then proof from the database that nothing was lost,
//! doubled or taken from a live worker. The workload is the shared one (`steward-workload`:
//! its table of behaviours says what each job does), run on `steward-worker` workers with the
//! suite's settings (`tests/support/settings.rs`); `tests/support/audit.rs` holds the audits (a trigger logging every job
//! transition; commit-time records of Steward's transactions) and the checks (`verify`),
//! `tests/support/network.rs` for the network faults and `tests/support/probes.rs` for reading
//! logs, metrics and processes.
//!
//! | test | what breaks | measured (printed) |
//! | --- | --- | --- |
//! | `sigkill_of_the_leader_under_load_loses_nothing` | SIGKILL of the leader, twice | takeover ms, jobs checked, rescues |
//! | `postgres_fast_restart_under_load_one_leader_again` | `pg_ctl restart -m fast` (private cluster) | restart, reconnect and re-election ms |
//! | `network_cut_server_drops_the_old_session_by_keepalive` | the leader's TCP path black-holed (proxy + iptables) | term loss ms, takeover ms, late commits |
//! | `network_cut_half_open_standby_takes_over_by_wedge_detection` | the same, proxy only (the server sees a live peer) | term loss ms, takeover ms, late commits |
//! | `outage_longer_than_the_staleness_rescues_only_runs_their_workers_gave_up` | server down 6 s > staleness 3 s (private cluster) | runs given up and rescued, none rescued from a worker still holding it |
//! | `two_instances_running_every_branch_at_once_double_nothing` | both instances run every branch at the same instant | work per instance, doubles found |
//! | `soak_mixed_load_keeps_memory_and_connections_flat` | nothing: load for `STEWARD_CHAOS_SOAK` (default 60 s) | RSS and sessions over time |
//! | `fleet_network_cut_server_drops_the_old_sessions_by_keepalive` | a fleet process's TCP path black-holed (proxy + iptables); four queues on two processes | queues given up ms, takeover ms, late commits per queue |
//! | `fleet_network_cut_half_open_the_other_process_takes_over_by_wedge_detection` | the same, proxy only | the same |
//!
//! `cargo test -p steward --test chaos -- --nocapture` shows the numbers. The soak runs for
//! 60 s unless `STEWARD_CHAOS_SOAK` gives a duration (e.g. `30m`).
//! Scenarios that stop or restart PostgreSQL use a private throwaway cluster
//! (`steward_devdb::start_cluster`), never the shared server.

// The shared driver of `steward` processes, then the modules only this suite uses.
#[path = "support/audit.rs"]
mod audit;
#[path = "support/http.rs"]
mod http;
#[path = "support/network.rs"]
mod network;
#[path = "support/probes.rs"]
mod probes;
#[path = "support/settings.rs"]
mod settings;
mod support;

use audit::*;
use network::*;
use probes::*;
use settings::*;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use steward_branches::{Branch, BranchContext, BranchError, BranchesConfig, Class};
use steward_connection::{SchemaName, Target};
use steward_queue::Queue;
use steward_testkit::TestDb;
use steward_workload::{Behaviour, Ledger, Run, Workload, WorkloadConfig};
use support::Steward;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn queue_on(db: &TestDb) -> Queue {
    Queue::new(db.pool(16)).with_retry_policy(RETRY)
}

/// Starts the workload: its producer enqueues through `queue`, its workers connect to `target`.
fn start_workload(
    rt: &tokio::runtime::Runtime,
    queue: Queue,
    target: &Target,
    config: WorkloadConfig,
) -> Workload {
    rt.block_on(Workload::start(queue, target, config))
        .unwrap_or_else(|e| panic!("starting the workload: {e}"))
}

/// A private throwaway cluster, migrated, for scenarios that stop or restart PostgreSQL.
struct PrivateDb {
    server: steward_devdb::Server,
    url: String,
}

impl PrivateDb {
    async fn start() -> PrivateDb {
        let server = steward_devdb::start_cluster()
            .await
            .unwrap_or_else(|e| panic!("starting a private PostgreSQL cluster: {e}"));
        let url = server.url().to_owned();
        let db = PrivateDb { server, url };
        let mut client = db.client("chaos-setup").await;
        steward_schema::migrate(&mut client, &SchemaName::default())
            .await
            .expect("migrating the private cluster");
        db
    }

    fn target(&self, application_name: &str) -> Target {
        Target::new(&self.url, SchemaName::default())
            .unwrap()
            .named(application_name)
    }

    async fn client(&self, application_name: &str) -> Client {
        self.target(application_name)
            .connect()
            .await
            .expect("connecting to the private cluster")
    }

    fn queue(&self) -> Queue {
        let pool = self.target("chaos-workload").pool(16).unwrap();
        Queue::new(pool).with_retry_policy(RETRY)
    }
}

/// The workload must have made every rescue branch work, or the scenario proved little.
fn assert_exercised(verified: &Verified) {
    for reason in [
        "heartbeat_stale",
        "deadline_expired",
        "callback_timeout",
        "error",
    ] {
        assert!(
            verified.entries.get(reason).copied().unwrap_or(0) > 0,
            "the workload produced no {reason} entries: {verified}"
        );
    }
    assert!(
        verified.promotions > 0 && verified.cron_fires > 0,
        "{verified}"
    );
}

fn assert_no_panic(stewards: &mut [(&str, &mut Steward)]) {
    for (name, s) in stewards.iter_mut() {
        let output = s.raw_output();
        assert!(!output.contains("panicked"), "{name} panicked:\n{output}");
        assert!(s.try_wait().is_none(), "{name} exited:\n{output}");
    }
}

/// Stop producing (and firing), let Steward and the workers finish everything, then verify.
fn finish(
    rt: &tokio::runtime::Runtime,
    client: &Client,
    workload: Workload,
) -> (Verified, Duration, BTreeMap<&'static str, u64>) {
    rt.block_on(async {
        disable_cron(client).await;
        workload.stop_producing();
        let drained = drain(client, Duration::from_secs(90)).await;
        let ledger: Arc<Ledger> = workload.stop().await;
        let verified = verify(client, &ledger).await;
        let counts = ledger.counts();
        (verified, drained, counts)
    })
}

// ---------------------------------------------------------------------------------------------
// 1. SIGKILL of the leader under load
// ---------------------------------------------------------------------------------------------

/// The leader dies (SIGKILL) twice under load; each time the standby takes over, and the
/// killed instance comes back as the next standby. Every job ends in exactly one terminal
/// state, cron fires once per second throughout.
#[test]
fn sigkill_of_the_leader_under_load_loses_nothing() {
    let rt = runtime();
    let _guard = rt.enter();
    let db = rt.block_on(TestDb::new());
    let url = db.url();
    let client = rt.block_on(db.client());
    rt.block_on(async {
        install_transitions_audit(&client).await;
        add_cron_schedule(&client).await;
    });
    let args = steward_args(&[]);
    let args = as_strs(&args);
    let mut leader = Steward::spawn(&url, &args);
    leader.wait_for(ACQUIRED, Duration::from_secs(30));
    let mut standby = Steward::spawn(&url, &args);
    standby.wait_for(STANDING_BY, Duration::from_secs(30));
    let workload = start_workload(&rt, queue_on(&db), db.target(), workload_config());
    std::thread::sleep(Duration::from_secs(5));

    let mut takeovers = Vec::new();
    for epoch in [2, 3] {
        let killed_at = SystemTime::now();
        leader.signal("KILL");
        leader.wait_exit(Duration::from_secs(10));
        let pass = wait_until(
            &format!("the standby's first SLO pass as epoch {epoch}"),
            Duration::from_secs(30),
            || slo_first_pass(&standby, epoch),
            || outputs(&[("standby", &standby)]),
        );
        takeovers.push(millis(killed_at, pass.at));
        // The killed instance comes back as the next standby.
        let next = Steward::spawn(&url, &args);
        next.wait_for(STANDING_BY, Duration::from_secs(30));
        leader = std::mem::replace(&mut standby, next);
        std::thread::sleep(Duration::from_secs(4));
    }

    let (verified, drained, counts) = finish(&rt, &client, workload);
    let terms: Vec<(i64, Option<String>)> = rt.block_on(async {
        client
            .query(
                "SELECT epoch, end_reason FROM leader_terms ORDER BY epoch",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    });
    println!(
        "[chaos 1: SIGKILL of the leader under load] takeovers (SIGKILL -> standby's first SLO pass): {takeovers:?} ms; drained in {drained:.1?}; {verified}; terms {terms:?}; workload {counts:?}"
    );
    assert!(
        takeovers.iter().all(|t| *t < 5_000),
        "slow takeover: {takeovers:?} ms"
    );
    assert_eq!(
        terms,
        vec![
            (1, Some("superseded".to_owned())),
            (2, Some("superseded".to_owned())),
            (3, None)
        ]
    );
    assert_exercised(&verified);
    assert_no_panic(&mut [("leader", &mut leader), ("standby", &mut standby)]);
}

// ---------------------------------------------------------------------------------------------
// 2. PostgreSQL restarted (fast shutdown) under load
// ---------------------------------------------------------------------------------------------

/// `pg_ctl restart -m fast` under load: both instances reconnect, exactly one leads again
/// (one new term, and each instance's /leader agrees with the database), nothing panics, and
/// no run a live worker held is rescued.
#[test]
fn postgres_fast_restart_under_load_one_leader_again() {
    let rt = runtime();
    let _guard = rt.enter();
    let private = rt.block_on(PrivateDb::start());
    rt.block_on(async {
        let client = private.client("chaos-setup").await;
        install_transitions_audit(&client).await;
        add_cron_schedule(&client).await;
    });
    let args = steward_args(&[]);
    let args = as_strs(&args);
    let mut a = Steward::spawn(&private.url, &args);
    a.wait_for(ACQUIRED, Duration::from_secs(30));
    let mut b = Steward::spawn(&private.url, &args);
    b.wait_for(STANDING_BY, Duration::from_secs(30));
    let workload = start_workload(
        &rt,
        private.queue(),
        &private.target("chaos-worker"),
        workload_config(),
    );
    std::thread::sleep(Duration::from_secs(5));

    let restart_at = SystemTime::now();
    rt.block_on(private.server.restart_fast())
        .expect("pg_ctl restart -m fast");
    let up_at = SystemTime::now();
    let context = || outputs(&[("a", &a), ("b", &b)]);
    let (who, pass) = wait_until(
        "an instance leading again after the restart",
        Duration::from_secs(30),
        || {
            [("a", &a), ("b", &b)]
                .into_iter()
                .find_map(|(name, s)| slo_first_pass(s, 2).map(|l| (name, l)))
        },
        context,
    );
    let reconnected: Vec<u128> = [&a, &b]
        .iter()
        .map(|s| {
            let line = wait_until(
                "both instances standing for election again",
                Duration::from_secs(30),
                || find_after(s, STANDING_BY, restart_at, |_| true),
                context,
            );
            millis(up_at, line.at)
        })
        .collect();
    // Exactly one leads: the instances' own views agree with each other and with the database.
    let views = wait_until(
        "exactly one instance reporting leadership",
        Duration::from_secs(15),
        || {
            let views = [leader_view(&a), leader_view(&b)];
            (views.iter().filter(|v| v.0).count() == 1).then_some(views)
        },
        context,
    );
    let client = rt.block_on(private.client("chaos-check"));
    let status = rt
        .block_on(steward_leader::status::read(
            &client,
            &SchemaName::default(),
        ))
        .unwrap();
    let term = status.leader.expect("the leadership lock is held");
    let leading = views.iter().find(|v| v.0).unwrap();
    assert_eq!(leading.1, term.instance, "views {views:?}");
    assert_eq!(
        term.epoch, 2,
        "one term before the restart, exactly one after"
    );

    std::thread::sleep(Duration::from_secs(5));
    let (verified, drained, counts) = finish(&rt, &client, workload);
    let leader_after = millis(up_at, pass.at);
    println!(
        "[chaos 2: fast restart under load] restart took {} ms; first SLO pass of the new term ({who}) {leader_after} ms after the server was back; instances standing by again after {reconnected:?} ms; drained in {drained:.1?}; {verified}; workload {counts:?}",
        millis(restart_at, up_at)
    );
    assert!(leader_after < 10_000, "re-election took {leader_after} ms");
    assert_no_panic(&mut [("a", &mut a), ("b", &mut b)]);
    assert!(verified.jobs > 0);
}

// ---------------------------------------------------------------------------------------------
// 3. The leader's network path cut
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Cut {
    /// Proxy silent, and the proxy's packets to and from the server dropped by the kernel: the
    /// server's keepalive probes go unanswered, as on a real partition.
    Kernel,
    /// Proxy silent only: its kernel still answers the server's keepalives (a half-open path,
    /// like a hung middlebox). Only the standby's wedge detection can end the old session.
    UserSpace,
}

const PROBE_INTERVAL_MS: u128 = 250;
const PROBE_TIMEOUT_MS: u128 = 1_000;
/// After a loss the term waits up to 1 s for its loops to stop before it logs the loss.
const LOOP_STOP_BOUND_MS: u128 = 1_000;

/// Instance A reaches PostgreSQL through a proxy, standby B directly. The proxy goes silent
/// both ways (sockets stay open). A's probe times out and A stops all branch work; B takes over
/// once the server has dropped A's session; nothing A committed lands after B's term began.
///
/// Keepalives (TCP, both sides; `leader.keepalive_idle`, `leader.keepalive_interval`,
/// `leader.keepalive_retries`): the server drops a silent peer's session after about
/// idle + interval x retries (here 1 s + 1 s x 2). A session whose server side has
/// unacknowledged data when the path goes dark (a reply in flight) is bounded by the same time
/// through `tcp_user_timeout`, which Steward sets alongside; so the kernel rules go in at the
/// moment the proxy goes silent, whatever is in flight.
#[test]
fn network_cut_server_drops_the_old_session_by_keepalive() {
    if !KernelBlackHole::available() {
        println!(
            "[chaos 3a: network cut, keepalive] SKIPPED: needs root and iptables, to make the server's keepalive probes go unanswered"
        );
        return;
    }
    network_cut(Cut::Kernel);
}

#[test]
fn network_cut_half_open_standby_takes_over_by_wedge_detection() {
    network_cut(Cut::UserSpace);
}

fn network_cut(cut: Cut) {
    let rt = runtime();
    let _guard = rt.enter();
    let db = rt.block_on(TestDb::new());
    let client = rt.block_on(db.client());
    rt.block_on(async {
        install_transitions_audit(&client).await;
        install_commits_audit(&client).await;
        add_cron_schedule(&client).await;
    });
    let server = server_addr(&db.url());
    let proxy = rt.block_on(BlackHoleProxy::start(server));
    let through_proxy = url_via(&db.url(), proxy.addr());
    let mut settings = vec![
        "leader.probe_interval=250ms",
        "leader.probe_timeout=1s",
        "leader.keepalive_idle=1s",
        "leader.keepalive_interval=1s",
        "leader.keepalive_retries=2",
        "leader.idle_in_transaction_timeout=5s",
        "leader.progress_interval=500ms",
    ];
    if cut == Cut::UserSpace {
        // The default 30 s stays for the kernel cut: a takeover well before it is the
        // keepalive's doing.
        settings.extend([
            "leader.wedge_timeout=3s",
            "leader.wedge_check_interval=250ms",
        ]);
    }
    let args = steward_args(&settings);
    let args = as_strs(&args);
    let mut a = Steward::spawn(&through_proxy, &args);
    let acquired = a.wait_for(ACQUIRED, Duration::from_secs(30));
    assert_eq!(epoch(&acquired), Some(1));
    let a_instance = acquired
        .field("instance")
        .and_then(|v| v.as_str())
        .expect("instance in the acquired log")
        .to_owned();
    let mut b = Steward::spawn(&db.url(), &args);
    b.wait_for(STANDING_BY, Duration::from_secs(30));
    let workload = start_workload(
        &rt,
        queue_on(&db),
        db.target(),
        WorkloadConfig {
            rate: 20.0,
            ..workload_config()
        },
    );
    std::thread::sleep(Duration::from_secs(3));
    let context = || outputs(&[("a", &a), ("b", &b)]);

    let cut_at = SystemTime::now();
    proxy.black_hole();
    let _kernel = (cut == Cut::Kernel)
        .then(|| KernelBlackHole::drop_connections(server, &proxy.upstream_addrs()));

    let lost = wait_until(
        "A logging the loss of its term",
        Duration::from_secs(30),
        || find_after(&a, LOST, cut_at, |l| epoch(l) == Some(1)),
        context,
    );
    let a_stopped = millis(cut_at, lost.at);
    // A's HTTP endpoint is direct: read its branch pass counter now and later.
    let runs_at_loss = metric_sum(&a, BRANCH_RUNS);
    let b_acquired = wait_until(
        "B leading after the cut",
        Duration::from_secs(60),
        || find_after(&b, ACQUIRED, cut_at, |l| epoch(l) == Some(2)),
        context,
    );
    let b_pass = wait_until(
        "B's first SLO pass",
        Duration::from_secs(30),
        || slo_first_pass(&b, 2),
        context,
    );
    let b_leads = millis(cut_at, b_acquired.at);
    let wedge = find_after(&b, WEDGE_TAKEOVER, cut_at, |_| true);
    let settle = (lost.at + Duration::from_secs(3))
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    std::thread::sleep(settle);
    let runs_later = metric_sum(&a, BRANCH_RUNS);
    assert_eq!(
        runs_at_loss, runs_later,
        "A ran branches after losing its term"
    );
    assert!(
        a_stopped <= PROBE_INTERVAL_MS + PROBE_TIMEOUT_MS + LOOP_STOP_BOUND_MS,
        "A noticed the cut after {a_stopped} ms (probe every {PROBE_INTERVAL_MS} ms, timeout {PROBE_TIMEOUT_MS} ms)"
    );
    match cut {
        Cut::Kernel => assert!(
            wedge.is_none(),
            "B took over by wedge detection, not because the server dropped A's session"
        ),
        Cut::UserSpace => assert!(
            wedge.is_some(),
            "B took over without ending A's sessions, yet the server cannot see A's path is dead:\n{}",
            context()
        ),
    }
    assert!(b_leads < 15_000, "B led {b_leads} ms after the cut");

    // Nothing committed by the old term after the new term began: every transaction of A's
    // sessions that committed (recorded at commit time) must be visible in the snapshot taken
    // inside B's committing START_TERM. START_TERM takes the leader row FOR UPDATE, which waits
    // for every fenced transaction of the old term (they hold FOR KEY SHARE on it) to end; an
    // old-term transaction committing later would be absent from that snapshot. The check
    // covers every table Steward writes, fenced or not (branch_health, the progress mark).
    let late = rt.block_on(late_commits(&client, 2, &a_instance));
    assert!(late.a_commits > 0, "the audit saw no commit of A: {late:?}");
    assert_eq!(late.late, 0, "A committed after B's term began: {late:?}");
    // The detector is not blind: a write in A's name now counts as late.
    rt.block_on(async {
        let control = db
            .target()
            .named(&format!("steward:{a_instance}:control"))
            .connect()
            .await
            .unwrap();
        control
            .execute(
                "UPDATE leader SET last_progress_at = last_progress_at WHERE id = 1",
                &[],
            )
            .await
            .unwrap();
    });
    let control = rt.block_on(late_commits(&client, 2, &a_instance));
    assert_eq!(
        control.late, 1,
        "the late-commit detector missed a control write"
    );

    let (verified, drained, counts) = finish(&rt, &client, workload);
    println!(
        "[chaos 3{}: network cut, {}] A stopped (term lost) {a_stopped} ms after the cut (probe every {PROBE_INTERVAL_MS} ms, timeout {PROBE_TIMEOUT_MS} ms), no branch pass after ({runs_at_loss} before); B leads {b_leads} ms after the cut{}, first SLO pass at {} ms; A's commits audited: {} (last {:.0} ms before B's term, 0 after); proxy connections {}; drained in {drained:.1?}; {verified}; workload {counts:?}",
        if cut == Cut::Kernel { "a" } else { "b" },
        match cut {
            Cut::Kernel => "kernel drops packets, server keepalive 1 s + 1 s x 2",
            Cut::UserSpace => "half-open, wedge_timeout 3 s",
        },
        if wedge.is_some() { " (by wedge detection)" } else { " (server dropped A's session)" },
        millis(cut_at, b_pass.at),
        late.a_commits,
        late.last_before_ms,
        proxy.connections(),
    );
    assert_no_panic(&mut [("a", &mut a), ("b", &mut b)]);
}

#[derive(Debug)]
struct LateCommits {
    /// Committed transactions of A's sessions.
    a_commits: usize,
    /// Of those, not visible to the new term's START_TERM.
    late: usize,
    /// How long before the new term's commit A's last commit was.
    last_before_ms: f64,
}

async fn late_commits(client: &Client, new_epoch: i64, instance: &str) -> LateCommits {
    let prefix = format!("steward:{instance}:");
    let rows = client
        .query(
            "SELECT c.app, pg_visible_in_snapshot(c.xid, t.snap),
                    extract(epoch FROM t.at - c.at)::float8 * 1000
             FROM chaos_commits c CROSS JOIN chaos_terms t WHERE t.epoch = $1",
            &[&new_epoch],
        )
        .await
        .expect("reading the commit audit");
    let ours: Vec<_> = rows
        .iter()
        .filter(|r| r.get::<_, String>(0).starts_with(&prefix))
        .collect();
    LateCommits {
        a_commits: ours.len(),
        late: ours.iter().filter(|r| !r.get::<_, bool>(1)).count(),
        last_before_ms: ours
            .iter()
            .map(|r| r.get::<_, f64>(2))
            .fold(f64::INFINITY, f64::min),
    }
}

// ---------------------------------------------------------------------------------------------
// 4. An outage longer than the heartbeat staleness
// ---------------------------------------------------------------------------------------------

/// The server is down 6 s, twice the 3 s staleness, while workers hold long runs. A
/// steward-worker whose heartbeats have failed for the staleness can no longer vouch for its
/// runs: its watchdog gives them up (cancels them and writes nothing), since the leader will
/// take them back. Just before the outage one worker crashes: its runs are the control. After
/// recovery every run given up or crashed is rescued and then completes on a later attempt;
/// the audit (`verify`) proves no run was rescued from a worker still holding it.
#[test]
fn outage_longer_than_the_staleness_rescues_only_runs_their_workers_gave_up() {
    let rt = runtime();
    let _guard = rt.enter();
    let private = rt.block_on(PrivateDb::start());
    rt.block_on(async {
        let client = private.client("chaos-setup").await;
        install_transitions_audit(&client).await;
        add_cron_schedule(&client).await;
    });
    let args = steward_args(&[]);
    let args = as_strs(&args);
    let mut a = Steward::spawn(&private.url, &args);
    a.wait_for(ACQUIRED, Duration::from_secs(30));
    let mut b = Steward::spawn(&private.url, &args);
    b.wait_for(STANDING_BY, Duration::from_secs(30));
    let workload = start_workload(
        &rt,
        private.queue(),
        &private.target("chaos-worker"),
        WorkloadConfig {
            rate: 20.0,
            mix: vec![
                (Behaviour::Normal, 40),
                (Behaviour::Long, 25),
                (Behaviour::Flaky, 8),
                (Behaviour::Doomed, 4),
                (Behaviour::Answered, 8),
                (Behaviour::Unanswered, 5),
                (Behaviour::Overrun, 5),
                (Behaviour::Cancelled, 5),
            ],
            timings: steward_workload::Timings {
                long_for: Duration::from_secs(12),
                answer_timeout: Duration::from_secs(15),
                ..steward_workload::Timings::default()
            },
            ..workload_config()
        },
    );
    std::thread::sleep(Duration::from_secs(5));
    let crashed = workload.crash_a_worker();
    assert!(!crashed.is_empty(), "the crashed worker held no run");
    std::thread::sleep(Duration::from_millis(300));
    let spanning: Vec<Run> = workload
        .held_runs()
        .into_iter()
        .filter(|(_, b)| *b == Behaviour::Long)
        .map(|(run, _)| run)
        .collect();
    assert!(
        spanning.len() >= 3,
        "too few long runs to span the outage: {spanning:?}"
    );

    let down_at = SystemTime::now();
    rt.block_on(private.server.stop_fast())
        .expect("pg_ctl stop -m fast");
    std::thread::sleep(Duration::from_secs(6));
    rt.block_on(private.server.start()).expect("pg_ctl start");
    let up_at = SystemTime::now();
    let context = || outputs(&[("a", &a), ("b", &b)]);
    let (who, pass) = wait_until(
        "an instance leading after the outage",
        Duration::from_secs(30),
        || {
            [("a", &a), ("b", &b)]
                .into_iter()
                .find_map(|(name, s)| slo_first_pass(s, 2).map(|l| (name, l)))
        },
        context,
    );
    // Past the quiet period and the long runs' end.
    std::thread::sleep(Duration::from_secs(10));
    let given_up: Vec<Run> = {
        let books = workload.ledger().books();
        spanning
            .iter()
            .filter(|run| books.abandoned.contains(run))
            .copied()
            .collect()
    };
    let client = rt.block_on(private.client("chaos-check"));
    let (verified, drained, counts) = finish(&rt, &client, workload);

    // Every long run spanning the outage was given up by its worker, rescued for its stale
    // heartbeat after recovery, and completed on a later attempt; so were the crashed
    // worker's runs.
    let rescued_after = |runs: &[Run]| -> usize {
        let ids: Vec<i64> = runs.iter().map(|r| r.0).collect();
        let attempts: Vec<i32> = runs.iter().map(|r| r.1).collect();
        rt.block_on(client.query_one(
            "SELECT count(*) FROM jobs, jsonb_array_elements(errors) e,
                    unnest($1::bigint[], $2::int[]) AS r(id, attempt)
             WHERE jobs.id = r.id AND (e->>'attempt')::int = r.attempt
               AND e->>'reason' = 'heartbeat_stale' AND (e->>'at')::timestamptz > $3
               AND state = 'completed' AND jobs.attempt > r.attempt",
            &[
                &ids,
                &attempts,
                &chrono::DateTime::<chrono::Utc>::from(up_at),
            ],
        ))
        .unwrap()
        .get::<_, i64>(0) as usize
    };
    let spanning_rescued = rescued_after(&spanning);
    let crashed_rescued = rescued_after(&crashed);
    println!(
        "[chaos 4: outage 6 s > staleness 3 s] server down {} ms; first SLO pass of the new term ({who}) {} ms after it was back; long runs spanning the outage: {}, given up by their workers: {}, rescued after recovery and completed later: {spanning_rescued}; crashed worker's runs {} -> {crashed_rescued} rescued after recovery; drained in {drained:.1?}; {verified}; workload {counts:?}",
        millis(down_at, up_at),
        millis(up_at, pass.at),
        spanning.len(),
        given_up.len(),
        crashed.len(),
    );
    assert_eq!(
        given_up, spanning,
        "a worker kept a run it could not vouch for through the outage"
    );
    assert_eq!(
        spanning_rescued,
        spanning.len(),
        "not every run given up was rescued after the outage and completed later"
    );
    assert!(
        crashed_rescued > 0,
        "no run of the crashed worker was rescued after the outage (control)"
    );
    assert_no_panic(&mut [("a", &mut a), ("b", &mut b)]);
}

// ---------------------------------------------------------------------------------------------
// 5. Two instances running every branch at the same time
// ---------------------------------------------------------------------------------------------

#[derive(Default, Debug)]
struct DriverStats {
    passes: u64,
    rows: u64,
    timeouts: BTreeMap<&'static str, u64>,
    errors: Vec<String>,
}

/// One instance's loop over `branches`, in lock step with its twin: both start each branch
/// at the same instant (a barrier), under the same epoch, on their own connections.
async fn drive(
    branches: Vec<Arc<dyn Branch>>,
    target: Target,
    barrier: Arc<tokio::sync::Barrier>,
    stop_now: Arc<AtomicBool>,
    stop: CancellationToken,
    pause: Duration,
) -> DriverStats {
    let mut client = target.connect().await.unwrap();
    let mut stats = DriverStats::default();
    loop {
        // Both decide to stop at the same round, or one would wait for the other forever.
        if barrier.wait().await.is_leader() {
            stop_now.store(stop.is_cancelled(), Ordering::SeqCst);
        }
        barrier.wait().await;
        if stop_now.load(Ordering::SeqCst) {
            return stats;
        }
        for branch in &branches {
            barrier.wait().await;
            let mut ctx = BranchContext {
                client: &mut client,
                epoch: 1,
                timeouts: branch.timeouts(),
            };
            match branch.run(&mut ctx).await {
                Ok(outcome) => {
                    stats.passes += 1;
                    stats.rows += outcome.rows;
                }
                // Lock timeouts against the twin are the expected cost of running together.
                Err(BranchError::Timeout(_)) => {
                    *stats.timeouts.entry(branch.name()).or_default() += 1
                }
                Err(e) => stats.errors.push(format!("{}: {e}", branch.name())),
            }
        }
        tokio::time::sleep(pause).await;
    }
}

/// The advisory lock keeps a second leader out, so the branches run here straight from the
/// library: two "instances", each with an SLO loop and a hygiene loop on its own connections,
/// start every branch at the same instant as the other, under one epoch, for 15 s of load and
/// then the drain. Cleanup archives finished jobs after 2 s, so it runs concurrently too. The
/// audit must show no double promotion, claim, rescue or retry, no job archived twice, and
/// one job per cron fire.
#[test]
fn two_instances_running_every_branch_at_once_double_nothing() {
    let rt = runtime();
    let _guard = rt.enter();
    let db = rt.block_on(TestDb::new());
    let client = rt.block_on(db.client());
    rt.block_on(async {
        install_transitions_audit(&client).await;
        add_cron_schedule(&client).await;
        client
            .execute(
                "UPDATE leader SET epoch = 1, instance = 'chaos-twins', since = now() WHERE id = 1",
                &[],
            )
            .await
            .unwrap();
    });
    let mut config = BranchesConfig::default();
    config.rescue_stale_heartbeats.staleness = STALENESS;
    for retry in [
        &mut config.rescue_stale_heartbeats.retry,
        &mut config.rescue_expired_deadlines.retry,
        &mut config.rescue_expired_callbacks.retry,
    ] {
        retry.base = RETRY.base;
        retry.max = RETRY.max;
    }
    config.cron_sync.lookahead = Duration::from_secs(1);
    config.cleanup.retention.completed = Duration::from_secs(2);
    config.cleanup.retention.failed = Duration::from_secs(2);
    config.cleanup.retention.cancelled = Duration::from_secs(2);
    assert_eq!(config.validate(), vec![]);

    let stop = CancellationToken::new();
    let mut drivers = tokio::task::JoinSet::new();
    for (kind, pause) in [
        (Class::Slo, Duration::from_millis(50)),
        (Class::Hygiene, Duration::from_millis(200)),
    ] {
        let barrier = Arc::new(tokio::sync::Barrier::new(2));
        let stop_now = Arc::new(AtomicBool::new(false));
        for instance in ["a", "b"] {
            let branches: Vec<Arc<dyn Branch>> = config
                .build()
                .into_iter()
                .filter(|b| b.class() == kind)
                .collect();
            let target = db
                .target()
                .named(&format!("chaos:{instance}:{}", kind.as_str()));
            let driver = drive(
                branches,
                target,
                barrier.clone(),
                stop_now.clone(),
                stop.clone(),
                pause,
            );
            drivers.spawn(async move { (instance, kind, driver.await) });
        }
    }
    let workload = start_workload(&rt, queue_on(&db), db.target(), workload_config());
    std::thread::sleep(Duration::from_secs(15));
    let (verified, drained, counts) = finish(&rt, &client, workload);
    stop.cancel();
    let stats = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(60), async {
            let mut all = Vec::new();
            while let Some(done) = drivers.join_next().await {
                all.push(done.expect("a branch driver panicked"));
            }
            all
        })
        .await
        .expect("the branch drivers did not stop within 60 s")
    });
    // Who did what, from the audit: promotions, rescues (a Steward session moving a run back
    // to retryable or failed) and cron fires (inserts), per instance.
    let per_instance: BTreeMap<String, (i64, i64, i64)> = rt.block_on(async {
        client
            .query(
                "SELECT split_part(app, ':', 2),
                    count(*) FILTER (WHERE old_state IN ('scheduled', 'retryable') AND new_state = 'available'),
                    count(*) FILTER (WHERE old_state IN ('running', 'waiting_external')
                                       AND new_state IN ('retryable', 'failed')),
                    count(*) FILTER (WHERE old_state IS NULL)
                 FROM chaos_transitions WHERE app LIKE 'chaos:%' GROUP BY 1 ORDER BY 1",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
            .collect()
    });
    for (instance, kind, s) in &stats {
        println!(
            "[chaos 5: twins] instance {instance} {} loop: {} passes, {} rows, lock timeouts {:?}, errors {:?}",
            kind.as_str(),
            s.passes,
            s.rows,
            s.timeouts,
            s.errors
        );
    }
    println!(
        "[chaos 5: twins] per instance (promotions, rescues, cron fires): {per_instance:?}; drained in {drained:.1?}; {verified}; workload {counts:?}"
    );
    let errors: Vec<&String> = stats.iter().flat_map(|(_, _, s)| &s.errors).collect();
    assert!(errors.is_empty(), "branch errors: {errors:?}");
    for instance in ["a", "b"] {
        let (promotions, _, _) = per_instance.get(instance).copied().unwrap_or_default();
        assert!(
            promotions > 0,
            "instance {instance} promoted nothing: the twins did not really run together"
        );
    }
    assert!(
        verified.archived > 0,
        "cleanup archived nothing: {verified}"
    );
    assert_exercised(&verified);
}

// ---------------------------------------------------------------------------------------------
// 6. Soak
// ---------------------------------------------------------------------------------------------

/// `STEWARD_CHAOS_SOAK` (e.g. `30m`), else 60 s.
fn soak_duration() -> Duration {
    match std::env::var("STEWARD_CHAOS_SOAK") {
        Ok(value) if !value.trim().is_empty() => humantime::parse_duration(value.trim())
            .unwrap_or_else(|e| panic!("STEWARD_CHAOS_SOAK={value:?}: {e}")),
        _ => Duration::from_secs(60),
    }
}

/// Mixed load on a leader and a standby for the soak duration, sampling each process's RSS
/// and the number of Steward sessions. After a warm-up, the mean RSS of the last third of the
/// samples must stay within 20% of the first third's, and the session count must not move.
#[test]
fn soak_mixed_load_keeps_memory_and_connections_flat() {
    let duration = soak_duration();
    let short = duration <= Duration::from_secs(120);
    let warmup = if short {
        Duration::from_secs(15)
    } else {
        (duration / 10).min(Duration::from_secs(300))
    };
    let every = if short {
        Duration::from_secs(1)
    } else {
        (duration / 200).max(Duration::from_secs(1))
    };
    let rt = runtime();
    let _guard = rt.enter();
    let db = rt.block_on(TestDb::new());
    let url = db.url();
    let client = rt.block_on(db.client());
    rt.block_on(async {
        install_transitions_audit(&client).await;
        add_cron_schedule(&client).await;
    });
    let args = steward_args(&[]);
    let args = as_strs(&args);
    let mut leader = Steward::spawn(&url, &args);
    leader.wait_for(ACQUIRED, Duration::from_secs(30));
    let mut standby = Steward::spawn(&url, &args);
    standby.wait_for(STANDING_BY, Duration::from_secs(30));
    let workload = start_workload(&rt, queue_on(&db), db.target(), workload_config());

    let started = Instant::now();
    let mut samples: Vec<(Duration, u64, u64, i64)> = Vec::new();
    while started.elapsed() < duration {
        std::thread::sleep(every);
        let rss = |s: &Steward, name: &str| {
            rss_kib(s.pid()).unwrap_or_else(|| panic!("the {name} is gone"))
        };
        samples.push((
            started.elapsed(),
            rss(&leader, "leader"),
            rss(&standby, "standby"),
            rt.block_on(steward_sessions(&client)),
        ));
    }
    let (verified, drained, counts) = finish(&rt, &client, workload);
    let terms: i64 = rt
        .block_on(client.query_one("SELECT count(*) FROM leader_terms", &[]))
        .unwrap()
        .get(0);

    let steady: Vec<_> = samples.iter().filter(|s| s.0 >= warmup).collect();
    assert!(steady.len() >= 9, "too few samples after the warm-up");
    let third = steady.len() / 3;
    let mean_of = |range: &[&(Duration, u64, u64, i64)],
                   pick: fn(&(Duration, u64, u64, i64)) -> u64| {
        mean(&range.iter().map(|s| pick(s) as f64).collect::<Vec<_>>())
    };
    let first = &steady[..third];
    let last = &steady[steady.len() - third..];
    let rss_leader = (mean_of(first, |s| s.1), mean_of(last, |s| s.1));
    let rss_standby = (mean_of(first, |s| s.2), mean_of(last, |s| s.2));
    let sessions: Vec<i64> = steady.iter().map(|s| s.3).collect();
    let (min_sessions, max_sessions) = (
        *sessions.iter().min().unwrap(),
        *sessions.iter().max().unwrap(),
    );
    println!(
        "[chaos 6: soak {duration:?}] {} samples every {every:?} after a {warmup:?} warm-up; leader RSS {:.1} -> {:.1} MiB ({:+.1}%), standby RSS {:.1} -> {:.1} MiB ({:+.1}%) (first vs last third means); Steward sessions {min_sessions}..{max_sessions}; terms {terms}; drained in {drained:.1?}; {verified}; workload {counts:?}",
        steady.len(),
        rss_leader.0 / 1024.0,
        rss_leader.1 / 1024.0,
        (rss_leader.1 / rss_leader.0 - 1.0) * 100.0,
        rss_standby.0 / 1024.0,
        rss_standby.1 / 1024.0,
        (rss_standby.1 / rss_standby.0 - 1.0) * 100.0,
    );
    for (name, (first, last)) in [("leader", rss_leader), ("standby", rss_standby)] {
        assert!(
            last <= first * 1.2,
            "{name} RSS grew from {first:.0} KiB to {last:.0} KiB"
        );
    }
    assert_eq!(
        min_sessions, max_sessions,
        "the number of Steward sessions moved: {sessions:?}"
    );
    assert_eq!(terms, 1, "leadership changed during the soak");
    assert_no_panic(&mut [("leader", &mut leader), ("standby", &mut standby)]);
}

// ---------------------------------------------------------------------------------------------
// 7. A fleet process's network path cut
// ---------------------------------------------------------------------------------------------

/// The same cuts as scenario 3, for a fleet (ADR 0003): fleet process A reaches PostgreSQL
/// through the proxy, B directly, and they share four queues. When A's path goes dark, A gives
/// up every queue it led and runs no branch after; B leads all four (by the server dropping
/// A's sessions, or by wedge detection on a half-open path); and in each queue A led, nothing
/// A committed lands after B's term there began.
#[test]
fn fleet_network_cut_server_drops_the_old_sessions_by_keepalive() {
    if !KernelBlackHole::available() {
        println!(
            "[chaos 7a: fleet network cut, keepalive] SKIPPED: needs root and iptables, to make the server's keepalive probes go unanswered"
        );
        return;
    }
    fleet_network_cut(Cut::Kernel);
}

#[test]
fn fleet_network_cut_half_open_the_other_process_takes_over_by_wedge_detection() {
    fleet_network_cut(Cut::UserSpace);
}

fn fleet_network_cut(cut: Cut) {
    let rt = runtime();
    let _guard = rt.enter();
    let db = rt.block_on(TestDb::new());
    let tenants: Vec<String> = (1..=4).map(|i| format!("tenant_{i}")).collect();
    steward_workload::queues::migrate(std::path::Path::new(support::STEWARD), &db.url(), &tenants)
        .unwrap_or_else(|e| panic!("migrating the tenant schemas: {e}"));
    // One client per tenant schema, with the commit audit installed there.
    let clients: BTreeMap<String, Client> = rt.block_on(async {
        let mut clients = BTreeMap::new();
        for schema in &tenants {
            let client = db
                .target()
                .with_schema(schema.parse().unwrap())
                .connect()
                .await
                .unwrap();
            install_commits_audit(&client).await;
            clients.insert(schema.clone(), client);
        }
        clients
    });
    let client = rt.block_on(db.client());
    let leaders = || {
        rt.block_on(steward_workload::queues::leaders(&client, &tenants))
            .unwrap()
    };
    let config = tempfile::NamedTempFile::new().unwrap();
    let toml: String = tenants
        .iter()
        .map(|schema| format!("[[queues]]\nschema = \"{schema}\"\n"))
        .collect();
    std::fs::write(config.path(), toml).unwrap();
    let server = server_addr(&db.url());
    let proxy = rt.block_on(BlackHoleProxy::start(server));
    let through_proxy = url_via(&db.url(), proxy.addr());
    let mut settings = vec![
        "leader.probe_interval=250ms",
        "leader.probe_timeout=1s",
        "leader.keepalive_idle=1s",
        "leader.keepalive_interval=1s",
        "leader.keepalive_retries=2",
        "leader.idle_in_transaction_timeout=5s",
        "leader.progress_interval=500ms",
    ];
    if cut == Cut::UserSpace {
        settings.extend([
            "leader.wedge_timeout=3s",
            "leader.wedge_check_interval=250ms",
        ]);
    }
    let mut args = steward_args(&settings);
    args.extend(["--config".to_owned(), config.path().display().to_string()]);
    let args = as_strs(&args);
    let instance_of = |s: &Steward| {
        s.wait_for(
            steward_workload::fleet::FLEET_STARTING,
            Duration::from_secs(30),
        )
        .field_str("instance")
        .map(str::to_owned)
        .expect("instance in the fleet's first line")
    };
    let mut a = Steward::spawn(&through_proxy, &args);
    let a_instance = instance_of(&a);
    let mut b = Steward::spawn(&db.url(), &args);
    let b_instance = instance_of(&b);
    let context = || {
        format!(
            "leaders {:?}\n{}",
            leaders(),
            outputs(&[("a", &a), ("b", &b)])
        )
    };
    // The leader row's epoch and instance: the term that holds the queue.
    let term_of = |schema: &str| -> (i64, Option<String>) {
        let row = rt
            .block_on(
                clients[schema].query_one("SELECT epoch, instance FROM leader WHERE id = 1", &[]),
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    // Four queues on two: two each, every lock holder's term started.
    wait_until(
        "both processes leading two queues each",
        Duration::from_secs(60),
        || {
            let leaders = leaders();
            let counts = steward_workload::queues::counts(&leaders);
            let started = leaders
                .iter()
                .all(|(schema, leader)| term_of(schema).1.as_deref() == Some(leader.as_str()));
            (counts.get(&a_instance) == Some(&2) && counts.get(&b_instance) == Some(&2) && started)
                .then_some(())
        },
        context,
    );
    let a_led: Vec<String> = leaders()
        .into_iter()
        .filter(|(_, leader)| *leader == a_instance)
        .map(|(schema, _)| schema)
        .collect();
    let epoch_of = |schema: &str| term_of(schema).0;
    let before: BTreeMap<String, i64> = a_led.iter().map(|s| (s.clone(), epoch_of(s))).collect();
    // A few progress marks and branch passes of A in its queues.
    std::thread::sleep(Duration::from_secs(2));

    let cut_at = SystemTime::now();
    proxy.black_hole();
    let _kernel = (cut == Cut::Kernel)
        .then(|| KernelBlackHole::drop_connections(server, &proxy.upstream_addrs()));

    // A gives up each queue it led.
    let mut a_stopped = 0;
    for schema in &a_led {
        let lost = wait_until(
            &format!("A logging the loss of {schema}"),
            Duration::from_secs(30),
            || {
                find_after(&a, "leadership lost", cut_at, |l| {
                    l.field_str("schema") == Some(schema.as_str())
                })
            },
            context,
        );
        a_stopped = a_stopped.max(millis(cut_at, lost.at));
    }
    let runs_at_loss = metric_sum(&a, BRANCH_RUNS);
    wait_until(
        "B leading all four queues",
        Duration::from_secs(60),
        || {
            let leaders = leaders();
            (leaders.len() == 4 && leaders.values().all(|l| *l == b_instance)).then_some(())
        },
        context,
    );
    let b_leads = millis(cut_at, SystemTime::now());
    let wedge = find_after(&b, WEDGE_TAKEOVER, cut_at, |_| true);
    std::thread::sleep(Duration::from_secs(3));
    let runs_later = metric_sum(&a, BRANCH_RUNS);
    assert_eq!(
        runs_at_loss, runs_later,
        "A ran branches after giving up its queues"
    );
    assert!(
        a_stopped <= PROBE_INTERVAL_MS + PROBE_TIMEOUT_MS + LOOP_STOP_BOUND_MS,
        "A gave up its queues {a_stopped} ms after the cut (probe every {PROBE_INTERVAL_MS} ms, timeout {PROBE_TIMEOUT_MS} ms)"
    );
    match cut {
        Cut::Kernel => assert!(
            wedge.is_none(),
            "B took over by wedge detection, not because the server dropped A's sessions:\n{}",
            context()
        ),
        Cut::UserSpace => assert!(
            wedge.is_some(),
            "B took over without ending A's sessions, yet the server cannot see A's path is dead:\n{}",
            context()
        ),
    }
    assert!(
        b_leads < 15_000,
        "B led every queue {b_leads} ms after the cut"
    );

    // Per queue A led: a new term, and no commit of A's after it began (see scenario 3).
    let mut audited = Vec::new();
    for schema in &a_led {
        let epoch = epoch_of(schema);
        assert!(
            epoch > before[schema],
            "{schema}: epoch {} → {epoch}",
            before[schema]
        );
        let late = rt.block_on(late_commits(
            &clients[schema],
            before[schema] + 1,
            &a_instance,
        ));
        assert!(
            late.a_commits > 0,
            "{schema}: the audit saw no commit of A: {late:?}"
        );
        assert_eq!(
            late.late, 0,
            "{schema}: A committed after B's term began: {late:?}"
        );
        audited.push(late.a_commits);
    }
    // And B maintains them: a job due now in each is promoted.
    for schema in &a_led {
        let queue = Queue::new(
            db.target()
                .with_schema(schema.parse().unwrap())
                .pool(2)
                .unwrap(),
        );
        let due = chrono::Utc::now() + chrono::Duration::milliseconds(200);
        let id = rt
            .block_on(queue.enqueue(&steward_queue::NewJob::new("fleet").run_at(due)))
            .unwrap()
            .id();
        wait_until(
            &format!("job {id} of {schema} promoted by B"),
            Duration::from_secs(30),
            || {
                let state: String = rt
                    .block_on(
                        clients[schema]
                            .query_one("SELECT state::text FROM jobs WHERE id = $1", &[&id]),
                    )
                    .unwrap()
                    .get(0);
                (state != "scheduled").then_some(())
            },
            context,
        );
    }
    println!(
        "[chaos 7{}: fleet network cut, {}] A gave up its {} queues {a_stopped} ms after the cut, no branch pass after ({runs_at_loss} before); B led all 4 {b_leads} ms after the cut{}; A's commits audited per queue {audited:?}, 0 after B's terms began; proxy connections {}",
        if cut == Cut::Kernel { "a" } else { "b" },
        match cut {
            Cut::Kernel => "kernel drops packets, server keepalive 1 s + 1 s x 2",
            Cut::UserSpace => "half-open, wedge_timeout 3 s",
        },
        a_led.len(),
        if wedge.is_some() { " (by wedge detection)" } else { " (server dropped A's sessions)" },
        proxy.connections(),
    );
    assert_no_panic(&mut [("a", &mut a), ("b", &mut b)]);
}
