//! Whether a session keeps one server backend from one transaction to the next. A session
//! advisory lock lives in its backend: through a pooler in transaction or statement mode
//! (PgBouncer's `pool_mode = transaction`), the lock stays on whichever server connection ran
//! it, other clients' transactions run there, and this candidate's next statement may run
//! elsewhere. Such a target cannot carry an election, so it is refused before standing.

use steward_connection::{describe_pg_error, ConnectError, Target};
use tokio_postgres::{Client, SimpleQueryMessage};

/// Each session's server backend.
pub const BACKEND_PID: &str = "SELECT pg_backend_pid()";

/// How many times the probe is repeated; one hit is proof.
const ROUNDS: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum PinningError {
    #[error(
        "{target} does not keep a session on one server connection: {evidence}. A connection \
         pooler in transaction or statement mode (PgBouncer's pool_mode = transaction or \
         statement) is in the way, and a session advisory lock cannot be held through it. \
         Point steward at the database directly, or at a pool with pool_mode = session"
    )]
    Pooled { target: String, evidence: String },
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("cannot check that {target} keeps a session on one server connection: {error}")]
    Db { target: String, error: String },
}

/// Refuses a target whose sessions move between server backends. Two sessions: `a` reads
/// its backend, `b` opens a transaction (pinning a backend under any pool mode) and reads its
/// own, then `a` reads again. A session pinned to its backend sees the same pid twice and
/// never shares it with `b`; a transaction pool hands `a`'s released backend to `b` (PgBouncer
/// reuses the last released one first) and so moves `a`, and a statement pool refuses `b`'s
/// transaction. Simple queries only: a transaction pool loses prepared statements.
pub async fn check(target: &Target) -> Result<(), PinningError> {
    let a = target.connect().await?;
    let b = target.connect().await?;
    let failed = |error: tokio_postgres::Error| PinningError::Db {
        target: target.to_string(),
        error: describe_pg_error(&error),
    };
    let pooled = |evidence: String| PinningError::Pooled {
        target: target.to_string(),
        evidence,
    };
    for _ in 0..ROUNDS {
        let first = backend(&a).await.map_err(failed)?;
        // `b` holds its transaction open while `a` reads again.
        let opened = async {
            b.batch_execute("BEGIN").await?;
            backend(&b).await
        };
        let other = opened.await.map_err(|error| {
            pooled(format!(
                "a transaction block failed ({})",
                describe_pg_error(&error)
            ))
        })?;
        let again = backend(&a).await.map_err(failed)?;
        b.batch_execute("ROLLBACK").await.map_err(failed)?;
        if other == first {
            return Err(pooled(format!(
                "two sessions ran on the same server backend (pid {first})"
            )));
        }
        if again != first {
            return Err(pooled(format!(
                "one session's statements ran on server backends {first} and {again}"
            )));
        }
    }
    Ok(())
}

async fn backend(client: &Client) -> Result<String, tokio_postgres::Error> {
    let rows = client.simple_query(BACKEND_PID).await?;
    Ok(rows
        .iter()
        .find_map(|message| match message {
            SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
        .unwrap_or_default())
}
