use steward_connection::SchemaName;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

/// What the maintenance process may do, and nothing more: the branches' reads and writes, the
/// partition functions (which run as their owner), no DDL, no other schema. Every function it
/// calls is granted by name, so that the role keeps working where EXECUTE is revoked from PUBLIC
/// (cron_sync calls `wake_promoter` and `wake_workers`, the promoter `wake_workers`).
const GRANTS: &str = "
GRANT USAGE ON SCHEMA {schema} TO {role};
GRANT SELECT ON {schema}.schema_history TO {role};
GRANT SELECT, INSERT, UPDATE, DELETE ON {schema}.jobs TO {role};
GRANT SELECT, INSERT, UPDATE, DELETE ON {schema}.queue_counts, {schema}.dirty_queues, {schema}.queue_stats TO {role};
GRANT SELECT, INSERT, UPDATE, DELETE ON {schema}.cron_schedules TO {role};
GRANT SELECT, INSERT, DELETE ON {schema}.cron_fires TO {role};
GRANT SELECT, INSERT ON {schema}.job_archive TO {role};
GRANT SELECT, UPDATE ON {schema}.leader TO {role};
GRANT SELECT, INSERT, UPDATE ON {schema}.leader_terms, {schema}.branch_health TO {role};
GRANT SELECT, INSERT, UPDATE, DELETE ON {schema}.candidates TO {role};
GRANT USAGE ON ALL SEQUENCES IN SCHEMA {schema} TO {role};
GRANT EXECUTE ON FUNCTION {schema}.retry_backoff(integer, double precision, double precision, double precision) TO {role};
GRANT EXECUTE ON FUNCTION {schema}.create_archive_partition(date) TO {role};
GRANT EXECUTE ON FUNCTION {schema}.drop_archive_partitions_before(date) TO {role};
GRANT EXECUTE ON FUNCTION {schema}.fence(bigint, text, text, boolean) TO {role};
GRANT EXECUTE ON FUNCTION {schema}.wake_promoter(timestamptz) TO {role};
GRANT EXECUTE ON FUNCTION {schema}.wake_workers(text[]) TO {role};
";

#[derive(Debug, thiserror::Error)]
pub enum RoleError {
    #[error("invalid role name {0:?}: use a lowercase identifier (a-z, 0-9, _)")]
    InvalidName(String),
    #[error("cannot create or grant role {role}: {source}")]
    Db {
        role: String,
        source: tokio_postgres::Error,
    },
}

/// Creates the maintenance role (NOLOGIN, so it holds privileges; operators grant it to a
/// login role or `ALTER ROLE ... LOGIN PASSWORD ...`) if missing, and grants it what the
/// branches need on `schema`. Idempotent.
pub async fn create_maintenance_role(
    client: &Client,
    schema: &SchemaName,
    role: &str,
) -> Result<(), RoleError> {
    // Same rules as a schema name: a plain identifier, safe unquoted.
    let role_name = SchemaName::new(role).map_err(|_| RoleError::InvalidName(role.to_owned()))?;
    let db = |source| RoleError::Db {
        role: role.to_owned(),
        source,
    };
    let exists = client
        .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&role])
        .await
        .map_err(db)?
        .is_some();
    if !exists {
        match client
            .batch_execute(&format!("CREATE ROLE {role_name} NOLOGIN"))
            .await
        {
            Ok(()) => {}
            // Another process created it in the meantime: roles are cluster-wide.
            Err(e)
                if e.code() == Some(&SqlState::DUPLICATE_OBJECT)
                    || e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {}
            Err(e) => return Err(db(e)),
        }
    }
    let grants = GRANTS
        .replace("{schema}", schema.as_str())
        .replace("{role}", role_name.as_str());
    client.batch_execute(&grants).await.map_err(db)
}
