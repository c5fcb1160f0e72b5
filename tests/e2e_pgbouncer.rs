//! End to end through a real PgBouncer (Debian package `pgbouncer`, started here with its
//! default configuration but for the pool mode): in session mode Steward elects, takes over
//! after a SIGKILL and from a wedged leader, and shuts down; in transaction or statement mode
//! it refuses to start, naming the mode and the fix.
//!
//! Skipped with a message where PgBouncer is not installed, except under CI (`CI` set), where
//! `.ci/run` installs it.

mod support;

use std::time::{Duration, SystemTime};
use steward_devdb::{DevDbError, PgBouncer, PoolMode};
use steward_testkit::TestDb;
use support::*;

const ACQUIRED: &str = "leadership acquired";
const STANDING_BY: &str = "standing by for leadership";
const FIRST_PASS: &str = "first branch pass of the term";
const WEDGE_TAKEOVER: &str = "ended the wedged leader's sessions";
const LOST: &str = "leadership lost; back to standby";

/// A PgBouncer in `mode` in front of the test server; `None` (test skipped) only where
/// PgBouncer is not installed outside CI.
fn pgbouncer(runtime: &tokio::runtime::Runtime, mode: PoolMode) -> Option<PgBouncer> {
    let server = steward_testkit::server_url();
    match runtime.block_on(PgBouncer::in_front_of(&server, mode)) {
        Ok(pgbouncer) => Some(pgbouncer),
        Err(error @ DevDbError::NoPgBouncer) if std::env::var_os("CI").is_none() => {
            println!("SKIPPED: {error}");
            None
        }
        Err(error) => panic!("starting PgBouncer: {error}"),
    }
}

fn first_slo_pass(s: &Steward, epoch: i64) -> Option<LogLine> {
    s.logs().into_iter().find(|l| {
        l.message() == FIRST_PASS
            && l.field("class").and_then(|v| v.as_str()) == Some("slo")
            && l.field("epoch").and_then(|v| v.as_i64()) == Some(epoch)
    })
}

/// The application_name of the backend holding the leadership lock.
fn lock_holder(runtime: &tokio::runtime::Runtime, db: &TestDb) -> Option<String> {
    runtime.block_on(async {
        db.client()
            .await
            .query_opt(
                "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid)
                 WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
                   AND ((l.classid::int8 << 32) | l.objid::int8)
                       = hashtextextended('steward.leader.' || $1, 0)",
                &[&db.schema().as_str()],
            )
            .await
            .unwrap()
            .map(|row| row.get(0))
    })
}

#[test]
fn through_pgbouncer_in_session_mode_steward_elects_takes_over_and_shuts_down() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let Some(pgbouncer) = pgbouncer(&runtime, PoolMode::Session) else {
        return;
    };
    let db = runtime.block_on(TestDb::new());
    let url = pgbouncer.url_of(db.name());
    let args = [
        "--set",
        "leader.wedge_timeout=3s",
        "--set",
        "leader.wedge_check_interval=250ms",
        "--set",
        "leader.progress_interval=500ms",
    ];
    let context = |stewards: &[(&str, &Steward)]| {
        let mut out = format!("pgbouncer log:\n{}\n", pgbouncer.log_text());
        for (name, s) in stewards {
            out.push_str(&format!("--- {name}:\n{}\n", s.raw_output()));
        }
        out
    };

    // Election: the lock is held by the leader's own session, not a pooled one.
    let mut a = Steward::spawn(&url, &args);
    let acquired = a.wait_for(ACQUIRED, Duration::from_secs(30));
    let instance = acquired
        .field("instance")
        .and_then(|v| v.as_str())
        .unwrap()
        .to_owned();
    assert_eq!(
        lock_holder(&runtime, &db),
        Some(format!("steward:{instance}:leader")),
        "{}",
        context(&[("a", &a)])
    );
    let mut b = Steward::spawn(&url, &args);
    b.wait_for(STANDING_BY, Duration::from_secs(30));
    wait_until("a's first SLO pass", Duration::from_secs(30), || {
        first_slo_pass(&a, 1).is_some()
    });

    // SIGKILL of the leader: PgBouncer resets the server session (DISCARD ALL releases the
    // lock) and the standby leads.
    let killed_at = SystemTime::now();
    a.signal("KILL");
    a.wait_exit(Duration::from_secs(10));
    wait_until_explained(
        "b's first SLO pass as epoch 2",
        Duration::from_secs(30),
        || first_slo_pass(&b, 2).is_some(),
        || context(&[("b", &b)]),
    );
    let takeover = first_slo_pass(&b, 2)
        .unwrap()
        .at
        .duration_since(killed_at)
        .unwrap_or_default();
    println!("takeover through PgBouncer (SIGKILL to the standby's first SLO pass): {takeover:?}");

    // A wedged leader (SIGSTOP): the standby ends its sessions through the pooler and leads.
    let mut c = Steward::spawn(&url, &args);
    c.wait_for(STANDING_BY, Duration::from_secs(30));
    b.signal("STOP");
    c.wait_for(WEDGE_TAKEOVER, Duration::from_secs(60));
    wait_until_explained(
        "c's first SLO pass as epoch 3",
        Duration::from_secs(30),
        || first_slo_pass(&c, 3).is_some(),
        || context(&[("b", &b), ("c", &c)]),
    );
    b.signal("CONT");
    b.wait_for(LOST, Duration::from_secs(30));

    // Shutdown: both exit cleanly, and the leader's step-down releases the lock.
    c.signal("TERM");
    assert_eq!(
        c.wait_exit(Duration::from_secs(30)),
        Some(0),
        "{}",
        context(&[("c", &c)])
    );
    b.signal("TERM");
    assert_eq!(
        b.wait_exit(Duration::from_secs(30)),
        Some(0),
        "{}",
        context(&[("b", &b)])
    );
    assert_eq!(lock_holder(&runtime, &db), None);
}

fn refused_through(mode: PoolMode) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let Some(pgbouncer) = pgbouncer(&runtime, mode) else {
        return;
    };
    let db = runtime.block_on(TestDb::new());
    let url = pgbouncer.url_of(db.name());
    let mut steward = Steward::spawn(&url, &[]);
    let code = steward.wait_exit(Duration::from_secs(60));
    let output = steward.raw_output();
    assert!(code.is_some_and(|c| c != 0), "exit {code:?}:\n{output}");
    let fix = "Point steward at the database directly, or at a pool with pool_mode = session";
    assert_eq!(output.matches(fix).count(), 1, "{output}");
    assert!(output.contains("transaction or statement"), "{output}");
    assert!(!output.contains(ACQUIRED), "{output}");
    assert_eq!(lock_holder(&runtime, &db), None);
}

#[test]
fn through_a_transaction_pool_steward_refuses_to_start_naming_the_mode_and_the_fix() {
    refused_through(PoolMode::Transaction);
}

#[test]
fn through_a_statement_pool_steward_refuses_to_start_naming_the_mode_and_the_fix() {
    refused_through(PoolMode::Statement);
}
