//! Shared by the branch tests: build a branch from its settings, run a pass the way a loop
//! would, and look at the result.
//!
//! The conformance suites (`rescues.rs`, `admin_metadata.rs`) build their branches, queues and
//! promoter only through the helpers here, so that a change of those APIs is adapted here.
#![allow(dead_code)]

use std::sync::Arc;
use steward_branches::promote_scheduled::{self, PromoteScheduled};
use steward_branches::{Branch, BranchContext, BranchError, BranchesConfig, Outcome};
use steward_queue::Queue;
use steward_testkit::TestDb;
use tokio_postgres::Client;

/// Stamps out the test functions of a conformance suite for one subject: a `#[tokio::test]`
/// for each case after `async:` and a `#[test]` for each after `sync:`, each calling the
/// function of the same name at the crate root with `&$subject`. Used in a module named after
/// the subject, so that a failure names it (`conformance::<subject>::<case>`).
#[allow(unused_macros)]
macro_rules! cases {
    ($subject:expr; async: $($case:ident),+; sync: $($sync:ident),+ $(,)?) => {
        $(
            #[tokio::test]
            async fn $case() {
                crate::$case(&$subject).await
            }
        )+
        $(
            #[test]
            fn $sync() {
                crate::$sync(&$subject)
            }
        )+
    };
}

/// The branch settings as the binary reads them, with `settings` (TOML, as in the branch's
/// `[branches.<name>]` table; empty for the defaults) for the branch `name`.
pub fn config(name: &str, settings: &str) -> Result<BranchesConfig, String> {
    let table: toml::Table = settings.parse().map_err(|e| format!("{e}"))?;
    let mut branches = toml::Table::new();
    branches.insert(name.to_owned(), toml::Value::Table(table));
    branches.try_into().map_err(|e| format!("{e}"))
}

/// The keys (relative to the branch's table) that validation reports for `settings`, in
/// order, or the error that refused them.
pub fn config_problems(name: &str, settings: &str) -> Result<Vec<String>, String> {
    let prefix = format!("branches.{name}.");
    Ok(config(name, settings)?
        .validate()
        .into_iter()
        .map(|p| p.key.strip_prefix(&prefix).unwrap_or(&p.key).to_owned())
        .collect())
}

/// The branch `name` built the way the binary builds it, from `settings` (see [`config`]).
/// Panics on settings that do not parse or validate: a test's settings must be valid.
pub fn branch(name: &str, settings: &str) -> Arc<dyn Branch> {
    let config = config(name, settings).unwrap_or_else(|e| panic!("{name} settings: {e}"));
    let problems = config.validate();
    assert!(problems.is_empty(), "{name} settings: {problems:?}");
    config
        .build()
        .into_iter()
        .find(|b| b.name() == name)
        .unwrap_or_else(|| panic!("no branch {name} built from {settings:?}"))
}

/// The promoter with its default settings.
pub fn promoter() -> PromoteScheduled {
    PromoteScheduled::new(promote_scheduled::Config::default())
}

/// A queue client on a pool of `connections` to the test database.
pub fn queue(db: &TestDb, connections: usize) -> Queue {
    Queue::new(db.pool(connections))
}

/// Asserts that a pass under [`EPOCH`] - 1 was refused by the fence, naming both epochs.
pub fn assert_fenced(err: BranchError) {
    assert!(
        matches!(err, BranchError::Fenced { epoch, current } if epoch == EPOCH - 1 && current == EPOCH),
        "{err:?}"
    );
}

/// The plan PostgreSQL prints for `query` (an EXPLAIN).
pub async fn explain(client: &Client, query: &str) -> String {
    client
        .simple_query(query)
        .await
        .unwrap()
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The epoch tests run their branches under.
pub const EPOCH: i64 = 7;

/// A migrated database whose leader row is at [`EPOCH`].
pub async fn db_with_leader() -> TestDb {
    let db = TestDb::new().await;
    db.client()
        .await
        .execute("UPDATE leader SET epoch = $1", &[&EPOCH])
        .await
        .unwrap();
    db
}

/// A session listening on the promoter's wake-up channel (`due_channel`) of `db`'s schema: the
/// session (keep it open), its notifications and the channel.
pub async fn listen_for_promoter_wakeups(
    db: &TestDb,
) -> (Client, steward_connection::Notifications, String) {
    let (listener, notifications) = db.target().listen().await.unwrap();
    let channel = steward_queue::due_channel(db.schema());
    listener
        .batch_execute(&format!("LISTEN {channel}"))
        .await
        .unwrap();
    (listener, notifications, channel)
}

/// One pass of `branch` on `client` under `epoch`.
pub async fn run_as(
    branch: &dyn Branch,
    client: &mut Client,
    epoch: i64,
) -> Result<Outcome, BranchError> {
    let mut ctx = BranchContext {
        client,
        epoch,
        timeouts: branch.timeouts(),
    };
    branch.run(&mut ctx).await
}

/// One pass under [`EPOCH`]; panics on error.
pub async fn run(branch: &dyn Branch, client: &mut Client) -> Outcome {
    run_as(branch, client, EPOCH)
        .await
        .unwrap_or_else(|e| panic!("{} failed: {e}", branch.name()))
}

/// Job states by id, for assertions.
pub async fn state_of(client: &Client, id: i64) -> String {
    client
        .query_one("SELECT state::text FROM jobs WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0)
}

/// Runs `branch` from `instances` connections at the same instant, `rounds` times, and returns
/// the rows each pass reported. Used to prove that concurrent passes never double-apply.
pub async fn run_concurrently(
    db: &TestDb,
    branch: &dyn Branch,
    instances: usize,
    rounds: usize,
) -> Vec<u64> {
    let mut clients = Vec::new();
    for _ in 0..instances {
        clients.push(db.client().await);
    }
    let mut rows = Vec::new();
    for _ in 0..rounds {
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(instances));
        let passes = clients.iter_mut().map(|client| {
            let barrier = barrier.clone();
            async move {
                barrier.wait().await;
                run(branch, client).await.rows
            }
        });
        rows.extend(futures_util::future::join_all(passes).await);
    }
    rows
}

/// A rescued job as the rescue tests look at it.
#[derive(Debug)]
pub struct After {
    pub state: String,
    pub errors: Vec<serde_json::Value>,
    /// run_at minus the time of the last error entry, in seconds: the backoff applied.
    pub backoff: Option<f64>,
    pub finalized: bool,
    pub run_at_in_future: bool,
}

pub async fn after(client: &Client, id: i64) -> After {
    let row = client
        .query_one(
            "SELECT state::text, errors,
                    extract(epoch FROM run_at - (errors -> -1 ->> 'at')::timestamptz)::float8,
                    finalized_at IS NOT NULL, run_at > now()
             FROM jobs WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    let errors: serde_json::Value = row.get(1);
    After {
        state: row.get(0),
        errors: errors.as_array().cloned().unwrap_or_default(),
        backoff: row.get(2),
        finalized: row.get(3),
        run_at_in_future: row.get(4),
    }
}

/// Jobs matching an SQL predicate.
pub async fn count_where(client: &Client, predicate: &str) -> i64 {
    client
        .query_one(&format!("SELECT count(*) FROM jobs WHERE {predicate}"), &[])
        .await
        .unwrap()
        .get(0)
}
