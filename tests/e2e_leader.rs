//! End to end: real `steward run` processes against a real PostgreSQL.

mod support;

use std::time::Duration;
use steward_testkit::{TestDb, TestRole};
use support::*;

const FIRST_PASS: &str = "first branch pass of the term";
const STANDING_BY: &str = "standing by for leadership";
const ACQUIRED: &str = "leadership acquired";
const ANOTHER_LEADS: &str = "standing by: another instance leads";

fn slo_first_pass(s: &Steward, epoch: i64) -> Option<LogLine> {
    s.logs().into_iter().find(|l| {
        l.message() == FIRST_PASS
            && l.field("class").and_then(|v| v.as_str()) == Some("slo")
            && l.field("epoch").and_then(|v| v.as_i64()) == Some(epoch)
    })
}

/// SIGKILL the leader while a standby waits: the standby runs its first SLO branch soon
/// after. The time is printed (the benchmark reports quantiles over many trials); the test
/// asserts the takeover itself, with a generous bound.
#[test]
fn standby_takes_over_when_the_leader_process_is_killed() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let db = runtime.block_on(TestDb::new());
    let url = db.url();
    let mut leader = Steward::spawn(&url, &[]);
    leader.wait_for(ACQUIRED, Duration::from_secs(30));
    let mut failovers = Vec::new();
    for epoch in 2..=4 {
        let standby = Steward::spawn(&url, &[]);
        standby.wait_for(STANDING_BY, Duration::from_secs(30));
        // The standby says whom it waits behind.
        let leads = standby.wait_for(ANOTHER_LEADS, Duration::from_secs(30));
        let acquired = leader.wait_for(ACQUIRED, Duration::from_secs(1));
        assert_eq!(leads.field("leader"), acquired.field("instance"));
        // Let the leader settle into its loops before it dies.
        std::thread::sleep(Duration::from_millis(300));
        let killed_at = std::time::SystemTime::now();
        leader.signal("KILL");
        leader.wait_exit(Duration::from_secs(10));
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let first = loop {
            if let Some(line) = slo_first_pass(&standby, epoch) {
                break line;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the standby never ran an SLO branch as epoch {epoch}:\n{}",
                standby.raw_output()
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        let failover = first.at.duration_since(killed_at).unwrap_or_default();
        failovers.push(failover);
        leader = standby;
    }
    println!("failover (SIGKILL to the standby's first SLO pass): {failovers:?}");
    assert!(
        failovers.iter().all(|f| *f < Duration::from_secs(5)),
        "{failovers:?}"
    );
    leader.signal("TERM");
    assert_eq!(leader.wait_exit(Duration::from_secs(30)), Some(0));
}

#[test]
fn sigterm_steps_down_releases_the_lock_and_exits_zero() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let db = runtime.block_on(TestDb::new());
    let url = db.url();
    let mut leader = Steward::spawn(&url, &["--set", "branches.promote_scheduled.interval=20ms"]);
    leader.wait_for(FIRST_PASS, Duration::from_secs(30));
    let standby = Steward::spawn(&url, &[]);
    standby.wait_for(STANDING_BY, Duration::from_secs(30));
    leader.signal("TERM");
    assert_eq!(leader.wait_exit(Duration::from_secs(30)), Some(0));
    leader.wait_for("stepped down", Duration::from_secs(1));
    standby.wait_for(ACQUIRED, Duration::from_secs(30));
    let reason: String = runtime.block_on(async {
        db.client()
            .await
            .query_one("SELECT end_reason FROM leader_terms WHERE epoch = 1", &[])
            .await
            .unwrap()
            .get(0)
    });
    assert_eq!(reason, "stepped_down");
}

#[test]
fn a_missing_schema_is_a_clear_error_naming_steward_migrate() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let db = runtime.block_on(TestDb::empty());
    let mut process = Steward::spawn(&db.url(), &[]);
    assert_eq!(process.wait_exit(Duration::from_secs(30)), Some(1));
    let output = process.raw_output();
    assert!(output.contains("steward migrate"), "{output}");
}

#[test]
fn bad_configuration_is_refused_with_the_key_and_value() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let db = runtime.block_on(TestDb::new());
    let (code, _, stderr) = steward(
        &db.url(),
        &["run", "--set", "branches.cleanup.batch_size=-3"],
    );
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("branches.cleanup.batch_size") && stderr.contains("-3"),
        "{stderr}"
    );
    let (code, _, stderr) = steward(&db.url(), &["run", "--loop-mode", "sideways"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("sideways"), "{stderr}");
    let (code, _, stderr) = steward(&db.url(), &["run", "--set", "branches.clenup.interval=5s"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("clenup"), "{stderr}");
}

#[test]
fn an_unreachable_database_is_retried_with_a_clear_log_and_no_crash() {
    // Nothing listens on port 1: connection refused at once.
    let process = Steward::spawn("postgres://steward:secret@127.0.0.1:1/nothing", &[]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while process
        .logs()
        .iter()
        .filter(|l| l.message() == "cannot reach the database")
        .count()
        < 3
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            process.raw_output()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = process.raw_output();
    assert!(
        !output.contains("secret"),
        "the password leaked into the logs: {output}"
    );
    assert!(output.contains("127.0.0.1:1"), "{output}");
    drop(process);
}

/// A candidate the server has no connection slot for (its role's connection limit is reached)
/// says so and backs off, without spinning and without costing the leader a session; it stands
/// by once a slot is free.
#[test]
fn a_candidate_without_a_connection_slot_backs_off_and_the_leader_keeps_its_sessions() {
    const NO_SLOT: &str = "no connection slot for this candidate (max_connections, or the role's or database's connection limit); retrying";
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let db = runtime.block_on(TestDb::new());
    let role = runtime.block_on(TestRole::maintenance(&db));
    let admin = runtime.block_on(db.client());
    let sessions = || -> Vec<i32> {
        runtime.block_on(async {
            admin
                .query(
                    "SELECT pid FROM pg_stat_activity WHERE usename = $1 ORDER BY pid",
                    &[&role.name()],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect()
        })
    };
    let leader = Steward::spawn(role.url(), &[]);
    leader.wait_for(ACQUIRED, Duration::from_secs(30));
    // Split mode: the lock session, three loops, the health writer and the backlog reader.
    wait_until_explained(
        "the leader's six sessions",
        Duration::from_secs(30),
        || sessions().len() >= 6,
        || format!("{:?}", sessions()),
    );
    let before = sessions();
    let limit = |n: i32| {
        runtime.block_on(async {
            admin
                .batch_execute(&format!("ALTER ROLE {} CONNECTION LIMIT {n}", role.name()))
                .await
                .unwrap()
        })
    };
    limit(before.len() as i32);

    let standby = Steward::spawn(role.url(), &[]);
    let refusals = || -> Vec<String> {
        standby
            .logs()
            .iter()
            .filter(|l| l.message() == NO_SLOT)
            .map(|l| {
                l.field("retry_in")
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect()
    };
    wait_until_explained(
        "three refusals",
        Duration::from_secs(30),
        || refusals().len() >= 3,
        || standby.raw_output(),
    );
    // Backing off: each retry waits longer than the one before.
    let waits = refusals();
    assert!(waits[0] != waits[1] && waits[1] != waits[2], "{waits:?}");
    assert_eq!(sessions(), before, "the leader's sessions changed");
    assert!(leader.find("leadership lost; back to standby").is_none());

    limit(-1);
    standby.wait_for(STANDING_BY, Duration::from_secs(60));
}

/// Timeouts a DBA set low for Steward's role do not end its sessions: the leader's lock session
/// sits idle past `idle_session_timeout` (its probe runs every 5 s here), and a standby waits for
/// the lock past `statement_timeout` and `lock_timeout`, all in one term.
#[test]
fn role_level_timeouts_do_not_end_the_lock_session_or_the_standbys_wait() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let db = runtime.block_on(TestDb::new());
    let role = runtime.block_on(TestRole::maintenance(&db));
    let admin = runtime.block_on(db.client());
    runtime.block_on(async {
        admin
            .batch_execute(&format!(
                "ALTER ROLE {0} SET idle_session_timeout = '2s';
                 ALTER ROLE {0} SET idle_in_transaction_session_timeout = '1s';
                 ALTER ROLE {0} SET statement_timeout = '500ms';
                 ALTER ROLE {0} SET lock_timeout = '500ms'",
                role.name()
            ))
            .await
            .unwrap()
    });
    let args = ["--set", "leader.probe_interval=5s"];
    let leader = Steward::spawn(role.url(), &args);
    let acquired = leader.wait_for(ACQUIRED, Duration::from_secs(30));
    let instance = acquired
        .field("instance")
        .and_then(|v| v.as_str())
        .unwrap()
        .to_owned();
    let standby = Steward::spawn(role.url(), &args);
    standby.wait_for(STANDING_BY, Duration::from_secs(30));
    let lock_session = format!("steward:{instance}:leader");
    let observed = || -> (bool, bool) {
        runtime.block_on(async {
            let row = admin
                .query_one(
                    "SELECT
                        coalesce(bool_or(application_name = $2 AND state = 'idle'
                            AND clock_timestamp() - state_change > interval '3s'), false),
                        coalesce(bool_or(application_name <> $2 AND application_name LIKE 'steward:%:leader'
                            AND wait_event_type = 'Lock'
                            AND clock_timestamp() - query_start > interval '1s'), false)
                     FROM pg_stat_activity WHERE usename = $1",
                    &[&role.name(), &lock_session],
                )
                .await
                .unwrap();
            (row.get(0), row.get(1))
        })
    };
    wait_until_explained(
        "the lock session idle for over 3 s while the standby waits for the lock for over 1 s",
        Duration::from_secs(30),
        || observed() == (true, true),
        || {
            format!(
                "{:?}\n--- leader:\n{}\n--- standby:\n{}",
                observed(),
                leader.raw_output(),
                standby.raw_output()
            )
        },
    );
    assert!(leader.find("leadership lost; back to standby").is_none());
    assert!(standby.find(ACQUIRED).is_none());
    assert!(standby
        .find("waiting for leadership failed; retrying")
        .is_none());
}

/// A standby logged in as a role that may not end the leader's sessions says once, when it
/// first sees that leader, that it could not take over from it if it wedged; a standby of the
/// leader's own role, or of a role granted pg_signal_backend, does not.
#[test]
fn a_standby_whose_role_cannot_end_the_leaders_sessions_says_so_once() {
    const CANNOT: &str = "this standby cannot take over if the leader wedges: its role may not end the leader's sessions (that needs the leader role's privileges or pg_signal_backend, and a superuser's sessions need a superuser); run every steward as the same role, or grant pg_signal_backend to this one";
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let db = runtime.block_on(TestDb::new());
    let leader_role = runtime.block_on(TestRole::maintenance(&db));
    let other_role = runtime.block_on(TestRole::maintenance(&db));
    let args = ["--set", "leader.wedge_check_interval=100ms"];
    let leader = Steward::spawn(leader_role.url(), &args);
    leader.wait_for(ACQUIRED, Duration::from_secs(30));

    let same_role = Steward::spawn(leader_role.url(), &args);
    same_role.wait_for(ANOTHER_LEADS, Duration::from_secs(30));
    let other = Steward::spawn(other_role.url(), &args);
    let warning = other.wait_for(CANNOT, Duration::from_secs(30));
    assert_eq!(
        warning.field("leader_role").and_then(|v| v.as_str()),
        Some(leader_role.name())
    );
    assert_eq!(
        warning.field("role").and_then(|v| v.as_str()),
        Some(other_role.name())
    );

    runtime.block_on(async {
        db.client()
            .await
            .batch_execute(&format!("GRANT pg_signal_backend TO {}", other_role.name()))
            .await
            .unwrap()
    });
    let granted = Steward::spawn(other_role.url(), &args);
    granted.wait_for(ANOTHER_LEADS, Duration::from_secs(30));
    // `other` kept checking the leader meanwhile (every 100 ms); it said so once, for the term.
    let count = |s: &Steward| s.logs().iter().filter(|l| l.message() == CANNOT).count();
    assert_eq!(count(&other), 1, "{}", other.raw_output());
    assert_eq!(count(&same_role), 0, "{}", same_role.raw_output());
    assert_eq!(count(&granted), 0, "{}", granted.raw_output());
}
