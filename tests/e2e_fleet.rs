//! One fleet of `steward run` processes maintaining many queues (ADR 0003): every queue led
//! exactly once, shared out within the cap, taken over when a process dies, new schemas picked
//! up while running, and a database that cannot be reached kept from the others. Who leads what
//! is read from the lock table, not from what the processes say.

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
