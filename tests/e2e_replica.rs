//! End to end against servers that refuse writes: a real streaming replica of a throwaway
//! cluster (`pg_basebackup -R`, promoted with `pg_ctl promote`), and a primary turned read-only
//! mid-term (`default_transaction_read_only`, as a fenced or demoted primary is set).
//!
//! Skipped with a message where no PostgreSQL binaries are installed, except under CI (`CI`
//! set), where `.ci/run` installs them.

#[path = "support/http.rs"]
mod http;
mod support;

use std::time::{Duration, Instant};
use steward_devdb::Server;
use support::*;
use tokio_postgres::{Client, NoTls};

const REFUSES_WRITES: &str = "the server refuses writes (a hot standby, or default_transaction_read_only is on): not standing for election here until it accepts them";
const ACCEPTS_WRITES: &str = "the server accepts writes again: standing for election";

/// A throwaway cluster; `None` (test skipped) only where no PostgreSQL binaries exist outside CI.
fn throwaway(runtime: &tokio::runtime::Runtime) -> Option<Server> {
    match runtime.block_on(steward_devdb::start_cluster()) {
        Ok(server) => Some(server),
        Err(steward_devdb::DevDbError::NoBinaries) if std::env::var_os("CI").is_none() => {
            println!("SKIPPED: no PostgreSQL binaries (initdb, pg_ctl) installed");
            None
        }
        Err(error) => panic!("starting a throwaway cluster: {error}"),
    }
}

/// A throwaway cluster with Steward's schema and a streaming replica of it that has replayed
/// the schema; `None` as for [`throwaway`].
fn migrated_primary_and_replica(runtime: &tokio::runtime::Runtime) -> Option<(Server, Server)> {
    let primary = throwaway(runtime)?;
    let (code, _, stderr) = steward(primary.url(), &["migrate"]);
    assert_eq!(code, Some(0), "migrate: {stderr}");
    let replica = runtime.block_on(primary.start_replica()).unwrap();
    let standby_client = runtime.block_on(connect(replica.url()));
    wait_until(
        "the schema to reach the replica",
        Duration::from_secs(30),
        || {
            runtime.block_on(async {
                standby_client
                    .query_one("SELECT to_regclass('steward.leader') IS NOT NULL", &[])
                    .await
                    .unwrap()
                    .get::<_, bool>(0)
            })
        },
    );
    Some((primary, replica))
}

async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
    tokio::spawn(connection);
    client
}

fn count(steward: &Steward, message: &str) -> usize {
    steward
        .logs()
        .iter()
        .filter(|l| l.message() == message)
        .count()
}

#[test]
fn on_a_hot_standby_steward_waits_on_one_session_and_leads_once_it_is_promoted() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let Some((_primary, replica)) = migrated_primary_and_replica(&runtime) else {
        return;
    };
    let standby_client = runtime.block_on(connect(replica.url()));

    let mut steward_on_replica = Steward::spawn(replica.url(), &[]);
    steward_on_replica.wait_for(REFUSES_WRITES, Duration::from_secs(30));
    let (code, body) = steward_on_replica.get("/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("refuses writes"), "{body}");
    let (_, metrics) = steward_on_replica.get("/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l == r#"steward_server_read_only{schema="steward"} 1"#),
        "{metrics}"
    );
    let (code, out, err) = steward(replica.url(), &["status"]);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(out.contains("refuses writes"), "{out}");

    // It waits on its one leader session: the same backend answers recheck after recheck.
    let leader_backend = || {
        runtime.block_on(async {
            standby_client
                .query_opt(
                    "SELECT pid, query_start FROM pg_stat_activity WHERE application_name LIKE 'steward:%:leader'",
                    &[],
                )
                .await
                .unwrap()
                .map(|r| (r.get::<_, i32>(0), r.get::<_, chrono::DateTime<chrono::Utc>>(1)))
        })
    };
    let (pid, mut last_check) = leader_backend().expect("the leader session on the replica");
    for _ in 0..3 {
        wait_until(
            "the next read-only recheck",
            Duration::from_secs(10),
            || {
                let (now_pid, checked) = leader_backend().expect("the leader session");
                assert_eq!(now_pid, pid, "the leader session was replaced");
                if checked > last_check {
                    last_check = checked;
                    true
                } else {
                    false
                }
            },
        );
    }
    assert_eq!(count(&steward_on_replica, REFUSES_WRITES), 1);
    assert!(steward_on_replica.find("leadership acquired").is_none());

    let promoted = Instant::now();
    runtime.block_on(replica.promote()).unwrap();
    steward_on_replica.wait_for("leadership acquired", Duration::from_secs(30));
    let took = promoted.elapsed();
    assert_eq!(count(&steward_on_replica, ACCEPTS_WRITES), 1);
    let (code, body) = steward_on_replica.get("/readyz");
    assert_eq!(code, 200, "{body}");
    println!(
        "led {:.2} s after pg_ctl promote was called",
        took.as_secs_f64()
    );
    steward_on_replica.signal("TERM");
    assert_eq!(
        steward_on_replica.wait_exit(Duration::from_secs(30)),
        Some(0)
    );
}

#[test]
fn a_leader_whose_server_turns_read_only_ends_its_term_and_leads_again_when_it_is_writable() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let Some(server) = throwaway(&runtime) else {
        return;
    };
    let (code, _, stderr) = steward(server.url(), &["migrate"]);
    assert_eq!(code, Some(0), "migrate: {stderr}");
    let mut leader = Steward::spawn(server.url(), &[]);
    leader.wait_for("leadership acquired", Duration::from_secs(30));
    let admin = runtime.block_on(connect(server.url()));
    // This session keeps writing whatever the server's default becomes.
    let turned_read_only = Instant::now();
    runtime.block_on(async {
        // One statement per call: ALTER SYSTEM cannot run in the implicit transaction of a
        // multi-statement query.
        for statement in [
            "SET default_transaction_read_only = off",
            "ALTER SYSTEM SET default_transaction_read_only = on",
            "SELECT pg_reload_conf()",
        ] {
            admin.batch_execute(statement).await.unwrap();
        }
    });
    let lost = leader.wait_for("leadership lost; back to standby", Duration::from_secs(30));
    let reason = lost
        .field("reason")
        .and_then(|r| r.as_str())
        .unwrap_or_default();
    assert!(reason.contains("refuses writes"), "{reason}");
    println!(
        "the term ended {:.2} s after the server turned read-only",
        turned_read_only.elapsed().as_secs_f64()
    );
    leader.wait_for(REFUSES_WRITES, Duration::from_secs(30));
    let (code, body) = leader.get("/readyz");
    assert_eq!(code, 503, "{body}");

    runtime.block_on(async {
        for statement in [
            "ALTER SYSTEM RESET default_transaction_read_only",
            "SELECT pg_reload_conf()",
        ] {
            admin.batch_execute(statement).await.unwrap();
        }
    });
    leader.wait_for(ACCEPTS_WRITES, Duration::from_secs(30));
    wait_until("a second term", Duration::from_secs(30), || {
        count(&leader, "leadership acquired") == 2
    });
    assert_eq!(count(&leader, REFUSES_WRITES), 1);
    leader.signal("TERM");
    assert_eq!(leader.wait_exit(Duration::from_secs(30)), Some(0));
}

/// A libpq multi-host URL naming the standby first and the primary second, with
/// `target_session_attrs=read-write`: Steward leads on the primary without ever standing aside
/// on the standby, and after the primary stops and the standby is promoted it leads there,
/// with the URL unchanged.
#[test]
fn a_multi_host_url_with_target_session_attrs_read_write_follows_the_primary_through_a_failover() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let Some((primary, replica)) = migrated_primary_and_replica(&runtime) else {
        return;
    };
    let url = format!(
        "host=127.0.0.1,127.0.0.1 port={},{} user=postgres dbname=postgres target_session_attrs=read-write",
        replica.port().unwrap(),
        primary.port().unwrap()
    );
    let mut steward = Steward::spawn(&url, &[]);
    let first = steward.wait_for("leadership acquired", Duration::from_secs(30));
    assert_eq!(first.field("epoch").and_then(|e| e.as_i64()), Some(1));
    let leads_on = |server: &Server| {
        runtime.block_on(async {
            connect(server.url())
                .await
                .query_opt(
                    "SELECT epoch FROM steward.leader WHERE id = 1 AND resigned_at IS NULL
                       AND backend_pid IN (SELECT pid FROM pg_stat_activity)",
                    &[],
                )
                .await
                .unwrap()
                .map(|r| r.get::<_, i64>(0))
        })
    };
    assert_eq!(leads_on(&primary), Some(1));

    let failover = Instant::now();
    runtime.block_on(primary.stop_fast()).unwrap();
    runtime.block_on(replica.promote()).unwrap();
    wait_until_explained(
        "a term on the promoted standby",
        Duration::from_secs(60),
        || count(&steward, "leadership acquired") == 2,
        || steward.raw_output(),
    );
    println!(
        "led on the promoted standby {:.2} s after the primary was stopped",
        failover.elapsed().as_secs_f64()
    );
    assert_eq!(leads_on(&replica), Some(2));
    assert_eq!(count(&steward, REFUSES_WRITES), 0);
    steward.signal("TERM");
    assert_eq!(steward.wait_exit(Duration::from_secs(30)), Some(0));
}
