//! Many queues (schemas) in one database, as the fleet suite, the fleet benchmark and the demo
//! set them up and watch them: migrating a batch of schemas, reading who leads each one from
//! the lock table, independently of what the processes say about themselves, and timing how
//! the queues of a killed process are taken over.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// The session holding each queue's leadership lock (`steward.leader.<schema>`), by schema:
/// its `application_name`, `steward:<instance>:<role>`. Queues nobody leads are absent. Reads
/// `pg_locks` once and `pg_stat_activity`.
pub const LEADERS: &str = "
WITH held AS MATERIALIZED (
    SELECT l.classid, l.objid, a.application_name
    FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
    WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
), q AS (
    SELECT s, hashtextextended('steward.leader.' || s, 0) AS k FROM unnest($1::text[]) AS s
)
SELECT q.s, held.application_name::text
FROM q JOIN held
  ON held.classid = ((q.k >> 32) & 4294967295)::oid AND held.objid = (q.k & 4294967295)::oid";

/// Steward's sessions in the current database, from `pg_stat_activity`.
pub const SESSIONS: &str = "
SELECT count(*) FROM pg_stat_activity
WHERE application_name LIKE 'steward:%' AND datname = current_database()";

/// The instance leading each of `schemas` (from the holder's `application_name`).
pub async fn leaders(
    client: &Client,
    schemas: &[String],
) -> Result<BTreeMap<String, String>, tokio_postgres::Error> {
    Ok(client
        .query(LEADERS, &[&schemas])
        .await?
        .iter()
        .map(|row| {
            let holder: String = row.get(1);
            let instance = holder
                .strip_prefix("steward:")
                .and_then(|rest| rest.rsplit_once(':'))
                .map_or(holder.as_str(), |(instance, _)| instance)
                .to_owned();
            (row.get(0), instance)
        })
        .collect())
}

/// How many sessions Steward holds in the current database.
pub async fn sessions(client: &Client) -> Result<i64, tokio_postgres::Error> {
    Ok(client.query_one(SESSIONS, &[]).await?.get(0))
}

/// Queues led per instance.
pub fn counts(leaders: &BTreeMap<String, String>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for instance in leaders.values() {
        *counts.entry(instance.clone()).or_default() += 1;
    }
    counts
}

/// Migrates `schemas` in the database at `url` with `steward migrate`, four at a time.
pub fn migrate(steward: &Path, url: &str, schemas: &[String]) -> Result<(), String> {
    for batch in schemas.chunks(4) {
        let children: Vec<_> = batch
            .iter()
            .map(|schema| {
                Command::new(steward)
                    .args(["migrate", "--schema", schema])
                    .env("DATABASE_URL", url)
                    .env_remove("STEWARD_LOG_FORMAT")
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .map(|child| (schema, child))
                    .map_err(|e| format!("running {}: {e}", steward.display()))
            })
            .collect();
        for child in children {
            let (schema, child) = child?;
            let output = child
                .wait_with_output()
                .map_err(|e| format!("steward migrate --schema {schema}: {e}"))?;
            if !output.status.success() {
                return Err(format!(
                    "steward migrate --schema {schema}: {}",
                    String::from_utf8_lossy(&output.stderr)
                ));
            }
        }
    }
    Ok(())
}

/// How the queues of a killed process were taken over, each time counted from the kill to the
/// first poll that saw it.
#[derive(Debug, Clone)]
pub struct Takeover {
    /// Per queue (schema): until another instance held its lock.
    pub taken: BTreeMap<String, Duration>,
    /// Until the killed instance held none of them (its backend had exited), when seen.
    pub released: Option<Duration>,
}

#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    #[error("reading the lock table: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("{taken} of {of} queues were led again within {within:?}")]
    Timeout {
        taken: usize,
        of: usize,
        within: Duration,
    },
}

/// Reads who leads `orphans` every `every` from `killed` until another instance than `victim`
/// holds each of them, for at most `within`. A time is that of the poll that saw the change
/// (the lock was taken at most one poll and one read of the lock table earlier), so the
/// resolution is `every` plus the read.
pub async fn await_takeover(
    client: &Client,
    orphans: &[String],
    victim: &str,
    killed: Instant,
    every: Duration,
    within: Duration,
) -> Result<Takeover, TakeoverError> {
    let mut taken = BTreeMap::new();
    let mut released = None;
    while taken.len() < orphans.len() {
        if killed.elapsed() > within {
            return Err(TakeoverError::Timeout {
                taken: taken.len(),
                of: orphans.len(),
                within,
            });
        }
        let now = leaders(client, orphans).await?;
        let seen = killed.elapsed();
        if released.is_none() && now.values().all(|leader| leader != victim) {
            released = Some(seen);
        }
        for schema in orphans {
            if now.get(schema).is_some_and(|leader| leader != victim) {
                taken.entry(schema.clone()).or_insert(seen);
            }
        }
        if taken.len() < orphans.len() {
            tokio::time::sleep(every).await;
        }
    }
    Ok(Takeover { taken, released })
}
