//! The PostgreSQL server and the bench's own databases, created, migrated and dropped per
//! scenario.
//!
//! The server is `DATABASE_URL` when set; otherwise a throwaway cluster with stock PostgreSQL
//! settings (`steward_devdb::Tuning::Stock`: durable commits, autovacuum on), so that results
//! do not depend on how the machine's shared server is tuned (a CI server may run without
//! autovacuum, under which a queue's indexes only grow). Without PostgreSQL binaries it falls
//! back to `steward_devdb::ensure_server`.

use anyhow::{bail, Context};
use deadpool_postgres::Pool;
use serde::Serialize;
use std::time::Duration;
use steward_connection::{SchemaName, Target};
use steward_queue::Queue;
use tokio_postgres::{Client, Config, NoTls};

pub struct Pg {
    server: steward_devdb::Server,
    admin: Client,
}

/// What the server is, for the report.
#[derive(Debug, Clone, Serialize)]
pub struct ServerInfo {
    pub version: String,
    pub version_full: String,
    pub source: String,
    pub fsync: String,
    pub synchronous_commit: String,
    pub shared_buffers: String,
    pub max_connections: String,
    pub autovacuum: String,
}

async fn server() -> Result<steward_devdb::Server, steward_devdb::DevDbError> {
    if std::env::var("DATABASE_URL").is_ok_and(|url| !url.is_empty()) {
        return steward_devdb::ensure_server().await;
    }
    match steward_devdb::start_cluster_tuned(steward_devdb::Tuning::Stock).await {
        Err(steward_devdb::DevDbError::NoBinaries) => {
            eprintln!("steward-bench: no PostgreSQL binaries to start a stock cluster; using the server that answers");
            steward_devdb::ensure_server().await
        }
        started => started,
    }
}

impl Pg {
    pub async fn start() -> anyhow::Result<Pg> {
        let server = server().await.context("finding or starting PostgreSQL")?;
        let admin = admin_client(server.url()).await?;
        Ok(Pg { server, admin })
    }

    pub fn url(&self) -> &str {
        self.server.url()
    }

    pub async fn info(&self) -> anyhow::Result<ServerInfo> {
        let show = |name: &'static str| async move {
            self.admin
                .query_one(&format!("SHOW {name}"), &[])
                .await
                .map(|r| r.get::<_, String>(0))
        };
        Ok(ServerInfo {
            version: show("server_version").await?,
            version_full: self.admin.query_one("SELECT version()", &[]).await?.get(0),
            source: format!(
                "{} ({})",
                steward_connection::redact_url(self.url()),
                self.server.describe()
            ),
            fsync: show("fsync").await?,
            synchronous_commit: show("synchronous_commit").await?,
            shared_buffers: show("shared_buffers").await?,
            max_connections: show("max_connections").await?,
            autovacuum: show("autovacuum").await?,
        })
    }

    /// A new database holding a migrated `steward` schema.
    pub async fn create(&self, label: &str) -> anyhow::Result<BenchDb> {
        let db = self.create_empty(label).await?;
        let migrated = async {
            let mut client = db.client().await?;
            steward_schema::migrate(&mut client, &db.schema).await?;
            anyhow::Ok(())
        }
        .await;
        if let Err(error) = migrated {
            self.drop_db(db).await;
            return Err(error.context("migrating the bench database"));
        }
        Ok(db)
    }

    /// A new database without Steward's tables, for a scenario that makes its own schemas
    /// (`db.schema` then names none).
    pub async fn create_empty(&self, label: &str) -> anyhow::Result<BenchDb> {
        let db = self.new_db(label);
        self.admin
            .batch_execute(&format!("CREATE DATABASE {}", db.name))
            .await
            .with_context(|| format!("creating database {}", db.name))?;
        Ok(db)
    }

    /// A copy of `template` (which must have no open sessions).
    pub async fn clone_of(&self, template: &BenchDb, label: &str) -> anyhow::Result<BenchDb> {
        let db = self.new_db(label);
        let statement = format!("CREATE DATABASE {} TEMPLATE {}", db.name, template.name);
        let mut attempts = 0;
        // The seeding session's backend may still be exiting: retry for a bounded time.
        while let Err(error) = self.admin.batch_execute(&statement).await {
            attempts += 1;
            if attempts > 100 {
                bail!("cloning {}: {error}", template.name);
            }
            self.admin
                .execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                    &[&template.name],
                )
                .await?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(db)
    }

    /// Drops the database, ending its sessions. Failures are reported, not fatal.
    pub async fn drop_db(&self, db: BenchDb) {
        let statement = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", db.name);
        if let Err(error) = self.admin.batch_execute(&statement).await {
            eprintln!(
                "steward-bench: could not drop database {}: {error}",
                db.name
            );
        }
    }

    fn new_db(&self, label: &str) -> BenchDb {
        let name = format!(
            "steward_bench_{label}_{}_{:04x}",
            std::process::id(),
            rand::random::<u16>()
        );
        let schema = SchemaName::default();
        let url = url_with_dbname(self.url(), &name);
        BenchDb { name, url, schema }
    }
}

/// One database of the bench.
pub struct BenchDb {
    pub name: String,
    /// A URL for this database (the schema is pinned by the connection config, not the URL).
    pub url: String,
    pub schema: SchemaName,
}

impl BenchDb {
    /// This database and its schema.
    pub fn target(&self) -> anyhow::Result<Target> {
        Ok(Target::new(&self.url, self.schema.clone())?)
    }

    /// A dedicated connection with the schema pinned.
    pub async fn client(&self) -> anyhow::Result<Client> {
        Ok(self.target()?.named("steward-bench").connect().await?)
    }

    pub fn pool(&self, size: usize, application_name: &str) -> anyhow::Result<Pool> {
        Ok(self.target()?.named(application_name).pool(size)?)
    }

    pub fn queue(&self, size: usize, application_name: &str) -> anyhow::Result<Queue> {
        Ok(Queue::new(self.pool(size, application_name)?))
    }
}

async fn admin_client(url: &str) -> anyhow::Result<Client> {
    let mut config: Config = url.parse().context("parsing the server URL")?;
    config.connect_timeout(Duration::from_secs(10));
    config.application_name("steward-bench:admin");
    let (client, connection) = config
        .connect(NoTls)
        .await
        .with_context(|| format!("connecting to {}", steward_connection::redact_url(url)))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// The server URL with its database replaced (URL form and key=value form).
pub fn url_with_dbname(server_url: &str, dbname: &str) -> String {
    if !server_url.contains("://") {
        let kept: Vec<&str> = server_url
            .split_whitespace()
            .filter(|kv| !kv.starts_with("dbname="))
            .collect();
        return format!("{} dbname={dbname}", kept.join(" "));
    }
    let (base, query) = match server_url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (server_url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let path_start = base[scheme_end..]
        .find('/')
        .map(|i| i + scheme_end)
        .unwrap_or(base.len());
    let mut url = format!("{}/{}", &base[..path_start], dbname);
    if let Some(q) = query {
        url.push('?');
        url.push_str(q);
    }
    url
}

/// Runs VACUUM ANALYZE on the job tables and a CHECKPOINT (ignored without the privilege), so
/// that timed work starts from the same state every time.
pub async fn settle(client: &Client) -> anyhow::Result<()> {
    client
        .batch_execute("VACUUM ANALYZE jobs")
        .await
        .context("VACUUM ANALYZE jobs")?;
    let _ = client.batch_execute("CHECKPOINT").await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::url_with_dbname;

    #[test]
    fn replaces_the_database() {
        assert_eq!(
            url_with_dbname("postgres://u@h:5432/postgres?sslmode=disable", "b1"),
            "postgres://u@h:5432/b1?sslmode=disable"
        );
        assert_eq!(url_with_dbname("postgres://u@h", "b1"), "postgres://u@h/b1");
        assert_eq!(
            url_with_dbname("host=h user=u dbname=x", "b1"),
            "host=h user=u dbname=b1"
        );
    }
}
