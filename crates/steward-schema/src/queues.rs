//! Finding the queues of a database: every schema that holds Steward's tables.

use steward_connection::SchemaName;
use tokio_postgres::Client;

/// Schemas holding both Steward's migration history and its leader row, by name. Catalog only.
pub const QUEUES: &str = "
SELECT n.nspname::text
FROM pg_namespace n
WHERE EXISTS (SELECT 1 FROM pg_class c
              WHERE c.relnamespace = n.oid AND c.relname = 'schema_history' AND c.relkind = 'r')
  AND EXISTS (SELECT 1 FROM pg_class c
              WHERE c.relnamespace = n.oid AND c.relname = 'leader' AND c.relkind = 'r')
ORDER BY n.nspname";

/// The schemas of the database `client` is connected to that hold a Steward queue. A schema
/// whose name Steward would not accept (it never creates one) is left out.
pub async fn discover_queues(client: &Client) -> Result<Vec<SchemaName>, tokio_postgres::Error> {
    Ok(client
        .query(QUEUES, &[])
        .await?
        .iter()
        .filter_map(|row| SchemaName::new(row.get::<_, String>(0)).ok())
        .collect())
}
