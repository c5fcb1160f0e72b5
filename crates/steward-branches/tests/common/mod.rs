//! Shared by the branch tests: run a branch pass the way a loop would.
#![allow(dead_code)]

use steward_branches::{Branch, BranchContext, BranchError, Outcome};
use steward_testkit::TestDb;
use tokio_postgres::Client;

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
