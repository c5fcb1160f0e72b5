//! One fleet of `steward run` processes maintaining many queues (ADR 0003): every queue led
//! exactly once, shared out within the cap, taken over when a process dies, new schemas picked
//! up while running, and a database that cannot be reached kept from the others. Who leads what
//! is read from the lock table, not from what the processes say.

#[path = "support/http.rs"]
mod http;
mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};
use steward_queue::{NewJob, Queue};
use steward_testkit::TestDb;
use steward_workload::fleet::FLEET_STARTING;
use steward_workload::queues;
use support::*;

fn schema_names(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("tenant_{i:03}")).collect()
}

/// The job is promoted (scheduled → available) by whoever leads its queue.
fn assert_promoted(runtime: &tokio::runtime::Runtime, db: &TestDb, schema: &str) {
    let target = db.target().with_schema(schema.parse().unwrap());
    let queue = Queue::new(target.pool(2).unwrap());
    let run_at = chrono::Utc::now() + chrono::Duration::milliseconds(500);
    let id = runtime
        .block_on(queue.enqueue(&NewJob::new("fleet").run_at(run_at)))
        .unwrap()
        .id();
    let client = runtime.block_on(db.client());
    wait_until(
        &format!("job {id} of {schema} to be promoted"),
        Duration::from_secs(30),
        || {
            runtime
                .block_on(client.query_one(
                    &format!("SELECT state::text FROM \"{schema}\".jobs WHERE id = $1"),
                    &[&id],
                ))
                .map(|row| row.get::<_, String>(0) != "scheduled")
                .unwrap_or(false)
        },
    );
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    let rank = ((sorted.len() as f64) * q).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// 50 schemas, 3 processes: each schema has exactly one leader and no process leads more than
/// the cap (18). A SIGKILLed process's schemas are all led again, none without a leader for
/// more than 1 s; the takeover times are printed. A schema created meanwhile is led within 2
/// minutes. The whole fleet stays within 40 sessions.
#[test]
fn fifty_queues_on_three_processes_are_shared_out_and_taken_over() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let db = runtime.block_on(TestDb::new());
    let url = db.url();
    let schemas = schema_names(50);
    queues::migrate(Path::new(STEWARD), &url, &schemas).unwrap();
    let client = runtime.block_on(db.client());
    let mut fleet: Vec<Steward> = (0..3)
        .map(|_| Steward::spawn(&url, &["--discover"]))
        .collect();
    let all = {
        let mut all = schemas.clone();
        all.push(db.schema().to_string());
        all
    };
    let leaders = || runtime.block_on(queues::leaders(&client, &all)).unwrap();
    let settled = |leaders: &BTreeMap<String, String>, cap: usize| {
        leaders.len() == all.len() && queues::counts(leaders).values().all(|n| *n <= cap)
    };
    // 51 queues (the tenants and the database's own schema, found by discovery) on 3.
    wait_until_explained(
        "every queue led once, no process over the cap of 18",
        Duration::from_secs(60),
        || settled(&leaders(), 18),
        || format!("{:?}", queues::counts(&leaders())),
    );
    let counts = queues::counts(&leaders());
    assert_eq!(counts.len(), 3, "every process leads: {counts:?}");
    let sessions = runtime.block_on(queues::sessions(&client)).unwrap();
    assert!(
        sessions <= 40,
        "{sessions} sessions for 51 queues on 3 processes"
    );
    eprintln!("51 queues on 3 processes: led {counts:?}, {sessions} sessions");
    // Each process's metrics say which queues it leads, one series per queue, and its share;
    // /leader lists them.
    let now = leaders();
    for process in &fleet {
        let instance = process
            .find("steward starting as a fleet process")
            .and_then(|l| l.field_str("instance").map(str::to_owned))
            .unwrap();
        let led = now.values().filter(|l| **l == instance).count();
        // Its terms start just after it wins the locks.
        let leading_now = || {
            let (status, body) = process.get("/metrics");
            assert_eq!(status, 200);
            let leading: Vec<String> = body
                .lines()
                .filter(|l| l.starts_with("steward_leader{") && l.ends_with(" 1"))
                .map(str::to_owned)
                .collect();
            (leading, body)
        };
        wait_until_explained(
            "its metrics to show every queue it leads",
            Duration::from_secs(30),
            || leading_now().0.len() == led,
            || format!("{:?}", leading_now().0),
        );
        let (leading, body) = leading_now();
        for (schema, leader) in &now {
            if *leader == instance {
                assert!(
                    leading
                        .iter()
                        .any(|l| l.contains(&format!("schema=\"{schema}\""))),
                    "{schema} missing from {leading:?}"
                );
            }
        }
        assert!(
            body.contains(&format!(
                "steward_fleet_queues_led{{database=\"{}\"}} {led}",
                db.name()
            )),
            "{body}"
        );
        assert!(
            body.contains(&format!(
                "steward_fleet_share{{database=\"{}\",kind=\"cap\"}} 18",
                db.name()
            )),
            "{body}"
        );
        assert!(
            body.contains(&format!(
                "steward_fleet_processes{{database=\"{}\"}} 3",
                db.name()
            )),
            "{body}"
        );
        let (status, body) = process.get("/leader");
        assert_eq!(status, 200, "{body}");
        let leader: serde_json::Value = serde_json::from_str(&body).unwrap();
        let queues = leader["queues"].as_object().unwrap();
        assert_eq!(queues.len(), 51, "{body}");
        assert_eq!(
            queues.values().filter(|q| q["leader"] == true).count(),
            led,
            "{body}"
        );
    }
    assert_promoted(&runtime, &db, "tenant_007");

    // A new tenant while running: discovery finds it.
    let created = Instant::now();
    queues::migrate(Path::new(STEWARD), &url, &["tenant_new".to_owned()]).unwrap();

    // SIGKILL the process that leads the most.
    let before = leaders();
    let (victim, _) = queues::counts(&before)
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .unwrap();
    let index = fleet
        .iter()
        .position(|s| {
            s.find(FLEET_STARTING)
                .and_then(|l| l.field_str("instance").map(str::to_owned))
                .as_deref()
                == Some(victim.as_str())
        })
        .expect("the victim is one of the fleet");
    let orphans: Vec<String> = before
        .iter()
        .filter(|(_, leader)| **leader == victim)
        .map(|(schema, _)| schema.clone())
        .collect();
    let mut victim_process = fleet.remove(index);
    victim_process.signal("KILL");
    let killed = Instant::now();
    let takeover = runtime
        .block_on(queues::await_takeover(
            &client,
            &orphans,
            &victim,
            killed,
            Duration::from_millis(10),
            Duration::from_secs(30),
        ))
        .unwrap();
    let taken = takeover.taken;
    let _ = victim_process.wait_exit(Duration::from_secs(5));
    let mut times: Vec<Duration> = taken.values().copied().collect();
    times.sort();
    let (p50, p99, max) = (
        quantile(&times, 0.5),
        quantile(&times, 0.99),
        times[times.len() - 1],
    );
    eprintln!(
        "SIGKILL of a process leading {} queues: taken over p50 {p50:?}, p99 {p99:?}, max {max:?}",
        orphans.len()
    );
    assert!(
        max <= Duration::from_secs(1),
        "a queue went without a leader for {max:?}: {taken:?}"
    );

    // The new tenant, and 52 queues on the 2 left, within their cap of 27.
    all_with_new(&runtime, &client, &all, created);
    let counts = queues::counts(&leaders());
    assert_eq!(counts.len(), 2, "{counts:?}");
    assert!(counts.values().all(|n| *n <= 27), "{counts:?}");
    assert_promoted(&runtime, &db, "tenant_new");
    for process in &fleet {
        process.signal("TERM");
    }
    for mut process in fleet {
        assert_eq!(process.wait_exit(Duration::from_secs(30)), Some(0));
    }
    assert!(
        leaders().is_empty(),
        "a clean stop releases every queue: {:?}",
        leaders()
    );
}

/// Waits until `tenant_new`, created at `created`, is led: within 2 minutes of its creation.
fn all_with_new(
    runtime: &tokio::runtime::Runtime,
    client: &tokio_postgres::Client,
    all: &[String],
    created: Instant,
) {
    let mut with_new = all.to_vec();
    with_new.push("tenant_new".to_owned());
    let deadline = created + Duration::from_secs(120);
    loop {
        let now = runtime
            .block_on(queues::leaders(client, &with_new))
            .unwrap();
        if now.len() == with_new.len() {
            eprintln!(
                "a schema created while running was led {:?} after its creation",
                created.elapsed()
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "within 2 minutes of its creation: {} of {} queues led",
            now.len(),
            with_new.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A queue whose database cannot be reached is retried on its own: the other database's queues
/// are led and maintained meanwhile.
#[test]
fn a_database_that_cannot_be_reached_does_not_disturb_the_others() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let db = runtime.block_on(TestDb::new());
    let url = db.url();
    queues::migrate(Path::new(STEWARD), &url, &schema_names(2)).unwrap();
    // Nothing listens on port 1; the password must never reach a log.
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        config.path(),
        "[[queues]]\nschema = \"tenant_001\"\n[[queues]]\nschema = \"tenant_002\"\n\
         [[queues]]\nschema = \"elsewhere\"\n\
         database_url = \"postgres://postgres:Sup3rS3cret@127.0.0.1:1/nowhere\"\n",
    )
    .unwrap();
    let process = Steward::spawn(&url, &["--config", config.path().to_str().unwrap()]);
    let client = runtime.block_on(db.client());
    let mine = schema_names(2);
    wait_until("both reachable queues led", Duration::from_secs(30), || {
        runtime
            .block_on(queues::leaders(&client, &mine))
            .unwrap()
            .len()
            == 2
    });
    process.wait_for("cannot open the fleet session", Duration::from_secs(30));
    assert_promoted(&runtime, &db, "tenant_002");
    let output = process.raw_output();
    assert!(!output.contains("Sup3rS3cret"), "{output}");
    // Queue names carry their database when the list spans several.
    assert!(
        output.contains(&format!("{}/tenant_001", db.name())),
        "{output}"
    );
}

/// A process that stops making progress (SIGSTOP: sockets open, nothing runs) loses all its
/// queues: the others end its sessions after the wedge timeout and take them. Resumed, it finds
/// its sessions gone, records its terms as lost, and takes its share back as a standby would.
#[test]
fn a_wedged_process_loses_its_queues_and_takes_its_share_back_when_resumed() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let db = runtime.block_on(TestDb::new());
    let url = db.url();
    let mut all = schema_names(9);
    queues::migrate(Path::new(STEWARD), &url, &all).unwrap();
    all.push(db.schema().to_string());
    let client = runtime.block_on(db.client());
    let leaders = || runtime.block_on(queues::leaders(&client, &all)).unwrap();
    let args = ["--discover", "--set", "leader.wedge_timeout=4s"];
    let fleet: Vec<Steward> = (0..2).map(|_| Steward::spawn(&url, &args)).collect();
    let instance_of = |s: &Steward| {
        s.wait_for(
            "steward starting as a fleet process",
            Duration::from_secs(30),
        )
        .field_str("instance")
        .map(str::to_owned)
        .unwrap()
    };
    let names: Vec<String> = fleet.iter().map(instance_of).collect();
    // 10 queues on 2: fair share 5, cap 6.
    wait_until_explained(
        "10 queues shared by both processes",
        Duration::from_secs(60),
        || {
            let counts = queues::counts(&leaders());
            counts.values().sum::<usize>() == 10 && counts.len() == 2
        },
        || format!("{:?}", queues::counts(&leaders())),
    );
    let epochs = |client: &tokio_postgres::Client| -> BTreeMap<String, i64> {
        all.iter()
            .map(|schema| {
                let row = runtime
                    .block_on(client.query_one(
                        &format!("SELECT epoch FROM \"{schema}\".leader WHERE id = 1"),
                        &[],
                    ))
                    .unwrap();
                (schema.clone(), row.get(0))
            })
            .collect()
    };
    let before = epochs(&client);
    let wedged_led: Vec<String> = leaders()
        .into_iter()
        .filter(|(_, l)| *l == names[0])
        .map(|(schema, _)| schema)
        .collect();
    let wedged = &fleet[0];
    wedged.signal("STOP");
    wait_until_explained(
        "the other process to lead all 10 queues",
        Duration::from_secs(60),
        || leaders().values().filter(|l| **l == names[1]).count() == 10,
        || {
            format!(
                "{:?}\nthe other process's output:\n{}",
                queues::counts(&leaders()),
                fleet[1].raw_output()
            )
        },
    );
    fleet[1].wait_for("ended the wedged leader's sessions", Duration::from_secs(5));
    wedged.signal("CONT");
    wedged.wait_for("leadership lost", Duration::from_secs(30));
    wait_until_explained(
        "the resumed process to take a share again",
        Duration::from_secs(60),
        || {
            let counts = queues::counts(&leaders());
            counts.get(&names[0]).is_some_and(|n| *n >= 4) && counts.values().sum::<usize>() == 10
        },
        || format!("{:?}", queues::counts(&leaders())),
    );
    // Each queue taken from the wedged process got a new term; none went back to an old one.
    let after = epochs(&client);
    for schema in &all {
        assert!(
            after[schema] >= before[schema],
            "{schema}: {before:?} → {after:?}"
        );
    }
    for schema in &wedged_led {
        assert!(
            after[schema] > before[schema],
            "{schema}: {before:?} → {after:?}"
        );
    }
}

/// The hygiene of other queues cannot hold up a queue's promoter: with every session of the
/// hygiene pool blocked (two queues' cleanups waiting on a lock the test holds on their
/// archives), a third queue's scheduled job is promoted while those same statements still wait.
#[test]
fn a_queues_promoter_does_not_wait_for_other_queues_hygiene() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let db = runtime.block_on(TestDb::new());
    let url = db.url();
    let tenants = schema_names(3);
    queues::migrate(Path::new(STEWARD), &url, &tenants).unwrap();
    let locker = runtime.block_on(db.client());
    // The archives' locks first, so that the first cleanup of each blocked queue waits.
    runtime
        .block_on(locker.batch_execute(
            "BEGIN; LOCK tenant_002.job_archive, tenant_003.job_archive IN ACCESS EXCLUSIVE MODE",
        ))
        .unwrap();
    let config = tempfile::NamedTempFile::new().unwrap();
    let mut toml = String::from("[fleet]\nhygiene_sessions = 2\n");
    for schema in &tenants {
        toml.push_str(&format!("[[queues]]\nschema = \"{schema}\"\n"));
    }
    std::fs::write(config.path(), toml).unwrap();
    let _process = Steward::spawn(&url, &["--config", config.path().to_str().unwrap()]);
    let client = runtime.block_on(db.client());
    // The hygiene sessions waiting on a lock, with when their statement started.
    let blocked = || -> Vec<(i32, String)> {
        runtime
            .block_on(client.query(
                "SELECT pid, query_start::text FROM pg_stat_activity
                 WHERE application_name LIKE 'steward:%:hygiene' AND wait_event_type = 'Lock'
                 ORDER BY pid",
                &[],
            ))
            .unwrap()
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect()
    };
    // A blocked cleanup gives up after its lock timeout (5 s) and tries again at its next
    // pass; the promotion must happen inside one window in which both wait throughout.
    for attempt in 1..=3 {
        wait_until(
            "both hygiene sessions waiting on the archives' locks",
            Duration::from_secs(90),
            || blocked().len() == 2,
        );
        let before = blocked();
        assert_promoted(&runtime, &db, "tenant_001");
        if blocked() == before {
            return;
        }
        eprintln!("attempt {attempt}: the blocked statements changed meanwhile; again");
    }
    panic!("no promotion within a window of both hygiene sessions blocked");
}

/// A process that wedges between winning a queue's lock and starting its term leaves no
/// progress mark to go stale. A session named as a fleet session that holds a queue's lock and
/// never opens a term looks exactly like that to the others, which take the queue over after
/// the wedge timeout.
#[test]
fn a_lock_held_without_a_term_is_taken_over_after_the_wedge_timeout() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let db = runtime.block_on(TestDb::new());
    let url = db.url();
    let tenant = schema_names(1);
    queues::migrate(Path::new(STEWARD), &url, &tenant).unwrap();
    let stuck = runtime.block_on(async {
        let client = db.client().await;
        client
            .batch_execute(
                "SET application_name = 'steward:stuck-1-0000:fleet';
                 SELECT pg_advisory_lock(hashtextextended('steward.leader.tenant_001', 0))",
            )
            .await
            .unwrap();
        client
    });
    let all = vec![tenant[0].clone(), db.schema().to_string()];
    let process = Steward::spawn(&url, &["--discover", "--set", "leader.wedge_timeout=4s"]);
    let instance = process
        .wait_for(
            "steward starting as a fleet process",
            Duration::from_secs(30),
        )
        .field_str("instance")
        .map(str::to_owned)
        .unwrap();
    let client = runtime.block_on(db.client());
    wait_until_explained(
        "the queue held without a term to be taken over",
        Duration::from_secs(60),
        || {
            let leaders = runtime.block_on(queues::leaders(&client, &all)).unwrap();
            leaders.len() == 2 && leaders.values().all(|l| *l == instance)
        },
        || {
            format!(
                "{:?}\n{}",
                runtime.block_on(queues::leaders(&client, &all)).unwrap(),
                process.raw_output()
            )
        },
    );
    assert!(stuck.is_closed() || runtime.block_on(stuck.simple_query("SELECT 1")).is_err());
    process.wait_for("ended the wedged leader's sessions", Duration::from_secs(5));
}
