use steward_connection::SchemaName;
use tokio_postgres::Client;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Refinery's history table, inside the Steward schema.
const HISTORY_TABLE: &str = "schema_history";

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("schema {schema:?} does not exist or holds no Steward tables: run `steward migrate`")]
    Missing { schema: String },
    #[error("schema {schema:?} is at version {found}, this steward expects {expected}: run `steward migrate`")]
    Behind {
        schema: String,
        found: i32,
        expected: i32,
    },
    #[error("schema {schema:?} is at version {found}, newer than this steward, which knows up to version {expected}: this steward is older than the schema and must be upgraded")]
    Ahead {
        schema: String,
        found: i32,
        expected: i32,
    },
    #[error("migration failed: {0}")]
    Migration(#[from] refinery::Error),
    #[error("database error: {}", steward_connection::describe_pg_error(.0))]
    Db(tokio_postgres::Error),
}

impl From<tokio_postgres::Error> for SchemaError {
    fn from(e: tokio_postgres::Error) -> Self {
        SchemaError::Db(e)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateReport {
    /// Migrations applied by this call, as `V<version>__<name>`.
    pub applied: Vec<String>,
    pub version: i32,
}

/// The newest migration version compiled into this binary.
pub fn latest_version() -> i32 {
    embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| m.version())
        .max()
        .unwrap_or(0)
}

/// Creates the schema if needed and applies pending migrations. Idempotent, and safe to call
/// from several processes at once: the whole run holds a session advisory lock keyed on the
/// schema name (refinery takes no lock of its own). `client` must have been configured with
/// [`crate::pg_config`] for the same schema.
pub async fn migrate(
    client: &mut Client,
    schema: &SchemaName,
) -> Result<MigrateReport, SchemaError> {
    let lock_key = format!("steward.migrate.{schema}");
    client
        .execute(
            "SELECT pg_advisory_lock(hashtextextended($1, 0))",
            &[&lock_key],
        )
        .await?;
    let result = migrate_locked(client, schema).await;
    // Unlock even after a failed run; a dead session releases it anyway.
    let unlocked = client
        .execute(
            "SELECT pg_advisory_unlock(hashtextextended($1, 0))",
            &[&lock_key],
        )
        .await;
    let report = result?;
    unlocked?;
    Ok(report)
}

async fn migrate_locked(
    client: &mut Client,
    schema: &SchemaName,
) -> Result<MigrateReport, SchemaError> {
    // SchemaName is validated as a plain lowercase identifier, so it is safe unquoted.
    client
        .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
        .await?;
    // A schema migrated by a newer steward: this one must not touch it, and must say so plainly
    // (refinery would only report a migration missing from its files).
    let expected = latest_version();
    if let Some(found) = current_version(client, schema)
        .await?
        .filter(|found| *found > expected)
    {
        return Err(SchemaError::Ahead {
            schema: schema.to_string(),
            found,
            expected,
        });
    }
    let report = embedded::migrations::runner()
        .set_migration_table_name(HISTORY_TABLE)
        .run_async(client)
        .await?;
    let applied = report
        .applied_migrations()
        .iter()
        .map(|m| format!("V{}__{}", m.version(), m.name()))
        .collect();
    Ok(MigrateReport {
        applied,
        version: current_version(client, schema).await?.unwrap_or(0),
    })
}

async fn current_version(client: &Client, schema: &SchemaName) -> Result<Option<i32>, SchemaError> {
    let history = format!("{schema}.{HISTORY_TABLE}");
    let exists: bool = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&history])
        .await?
        .get(0);
    if !exists {
        return Ok(None);
    }
    let row = client
        .query_one(&format!("SELECT max(version) FROM {history}"), &[])
        .await?;
    Ok(row.get::<_, Option<i32>>(0))
}

/// Checks that `schema` is migrated to exactly this binary's version; the error tells the
/// operator what to run.
pub async fn check_schema(client: &Client, schema: &SchemaName) -> Result<i32, SchemaError> {
    let expected = latest_version();
    match current_version(client, schema).await? {
        None => Err(SchemaError::Missing {
            schema: schema.to_string(),
        }),
        Some(found) if found < expected => Err(SchemaError::Behind {
            schema: schema.to_string(),
            found,
            expected,
        }),
        Some(found) if found > expected => Err(SchemaError::Ahead {
            schema: schema.to_string(),
            found,
            expected,
        }),
        Some(found) => Ok(found),
    }
}

/// Identifies the exact set of embedded migrations (versions and checksums): test harnesses
/// key cached, pre-migrated template databases on it.
pub fn migrations_fingerprint() -> String {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for m in embedded::migrations::runner().get_migrations() {
        m.version().hash(&mut hasher);
        m.checksum().hash(&mut hasher);
    }
    format!("{:016x}", hasher.finish())
}
