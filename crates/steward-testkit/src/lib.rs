//! One fresh database per test, so tests run in parallel against a real PostgreSQL.
//!
//! The server is `DATABASE_URL`, or 127.0.0.1:5432 when it answers; `scripts/test` starts a
//! throwaway cluster (via `with-postgres`) when neither exists. Each [`TestDb`] is cloned from a
//! template database that is migrated once per migration fingerprint (cloning takes tens of
//! milliseconds, migrating takes much longer), and is dropped when the value is.

use deadpool_postgres::Pool;
use std::time::Duration;
use steward_connection::{SchemaName, Target};
use tokio_postgres::{Client, Config, NoTls};

const TEMPLATE_LOCK: &str = "steward.testkit.template";

pub struct TestDb {
    server_url: String,
    name: String,
    target: Target,
}

/// The server tests run against.
pub fn server_url() -> String {
    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => steward_devdb::DEFAULT_LOCAL_URL.to_owned(),
    }
}

impl TestDb {
    /// A new database holding a migrated `steward` schema.
    pub async fn new() -> TestDb {
        Self::create(true).await
    }

    /// A new empty database (no schema), for migration tests.
    pub async fn empty() -> TestDb {
        Self::create(false).await
    }

    async fn create(migrated: bool) -> TestDb {
        let server_url = server_url();
        let admin = admin_client(&server_url).await;
        let name = format!("steward_test_{}", uuid::Uuid::new_v4().simple());
        let template = if migrated {
            ensure_template(&server_url, &admin).await
        } else {
            "template0".to_owned()
        };
        admin
            .batch_execute(&format!("CREATE DATABASE {name} TEMPLATE {template}"))
            .await
            .unwrap_or_else(|e| panic!("creating test database {name} from {template}: {e}"));
        let target = database_target(&server_url, &name);
        TestDb {
            server_url,
            name,
            target,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn schema(&self) -> &SchemaName {
        self.target.schema()
    }

    /// This database and its `steward` schema.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// A URL for this database (without the schema pin), for spawning processes.
    pub fn url(&self) -> String {
        url_with_dbname(&self.server_url, &self.name)
    }

    /// A dedicated connection to this database.
    pub async fn client(&self) -> Client {
        self.target
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.name))
    }

    pub fn pool(&self, size: usize) -> Pool {
        self.target.pool(size).expect("building the test pool")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let dropped = run_on_a_plain_thread(
            &self.server_url,
            format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
        if !dropped {
            eprintln!(
                "steward-testkit: could not drop test database {}",
                self.name
            );
        }
    }
}

fn database_target(server_url: &str, dbname: &str) -> Target {
    Target::new(&url_with_dbname(server_url, dbname), SchemaName::default())
        .expect("DATABASE_URL must parse")
        .named("steward-test")
}

fn url_with_dbname(server_url: &str, dbname: &str) -> String {
    // postgres://user@host:port/db?params -> replace the path segment.
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

async fn try_admin_client(server_url: &str) -> Result<Client, tokio_postgres::Error> {
    let mut config: Config = server_url.parse()?;
    config.connect_timeout(Duration::from_secs(5));
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// Runs `sql` (one or more statements) as the admin of `server_url`, for cleanups in `Drop`:
/// they run outside any runtime guarantee, so on a plain thread with a private runtime. True
/// when every statement succeeded.
fn run_on_a_plain_thread(server_url: &str, sql: String) -> bool {
    let server_url = server_url.to_owned();
    let ran = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        runtime.block_on(async {
            let admin = try_admin_client(&server_url).await.ok()?;
            admin.batch_execute(&sql).await.ok()
        })
    })
    .join();
    matches!(ran, Ok(Some(())))
}

async fn admin_client(server_url: &str) -> Client {
    try_admin_client(server_url).await.unwrap_or_else(|e| {
        panic!(
            "no PostgreSQL for tests at {}: {e}\nset DATABASE_URL, or run the suite with scripts/test, which starts a throwaway cluster",
            steward_connection::redact_url(server_url)
        )
    })
}

/// The migrated template for the current migrations, built once per fingerprint across all
/// test processes (serialized by an advisory lock on the admin database).
async fn ensure_template(server_url: &str, admin: &Client) -> String {
    let name = format!("steward_tmpl_{}", steward_schema::migrations_fingerprint());
    if database_exists(admin, &name).await {
        return name;
    }
    admin
        .execute(
            "SELECT pg_advisory_lock(hashtextextended($1, 0))",
            &[&TEMPLATE_LOCK],
        )
        .await
        .expect("taking the template lock");
    if !database_exists(admin, &name).await {
        // Build under a temporary name and rename, so that a half-built template from a killed
        // run is never used.
        let building = format!("{name}_wip");
        for statement in [
            format!("DROP DATABASE IF EXISTS {building} WITH (FORCE)"),
            format!("CREATE DATABASE {building} TEMPLATE template0"),
        ] {
            admin
                .batch_execute(&statement)
                .await
                .expect("creating the template database");
        }
        {
            let target = database_target(server_url, &building);
            let mut client = target
                .connect()
                .await
                .expect("connecting to the template database");
            steward_schema::migrate(&mut client, target.schema())
                .await
                .expect("migrating the template database");
        }
        // The migrating connection must be gone before the rename (and before any clone).
        // The migrating backend may still be exiting after its client is dropped; the rename
        // fails while any session is connected, so retry for a bounded time.
        let rename = format!("ALTER DATABASE {building} RENAME TO {name}");
        let mut attempts = 0;
        while let Err(error) = admin.batch_execute(&rename).await {
            attempts += 1;
            assert!(attempts < 100, "publishing the template database: {error}");
            admin
                .execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                    &[&building],
                )
                .await
                .expect("terminating template sessions");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    admin
        .execute(
            "SELECT pg_advisory_unlock(hashtextextended($1, 0))",
            &[&TEMPLATE_LOCK],
        )
        .await
        .expect("releasing the template lock");
    name
}

async fn database_exists(admin: &Client, name: &str) -> bool {
    admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await
        .expect("querying pg_database")
        .is_some()
}

/// A login role with exactly the maintenance role's grants in one [`TestDb`] (what `steward role
/// create` does, plus the LOGIN and CONNECT an operator gives it). Roles are cluster-wide, so
/// it is dropped when the value is, passed or not: declare it after its `TestDb`, so that it is
/// dropped while the database still exists.
pub struct TestRole {
    server_url: String,
    name: String,
    url: String,
}

impl TestRole {
    pub async fn maintenance(db: &TestDb) -> TestRole {
        let name = format!("steward_role_{}", uuid::Uuid::new_v4().simple());
        let admin = db.client().await;
        steward_schema::create_maintenance_role(&admin, db.schema(), &name)
            .await
            .unwrap_or_else(|e| panic!("creating role {name}: {e}"));
        admin
            .batch_execute(&format!(
                "ALTER ROLE {name} LOGIN; GRANT CONNECT ON DATABASE {} TO {name}",
                db.name()
            ))
            .await
            .unwrap_or_else(|e| panic!("letting role {name} log in: {e}"));
        TestRole {
            server_url: db.url(),
            url: url_as(&db.url(), &name),
            name,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The test database's URL, logged in as this role.
    pub fn url(&self) -> &str {
        &self.url
    }
}

/// `url` (postgres://…) with its user replaced by `user` and no password.
fn url_as(url: &str, user: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a postgres:// URL");
    let path = rest.find('/').unwrap_or(rest.len());
    let host = rest[..path]
        .rsplit_once('@')
        .map_or(&rest[..path], |(_, h)| h);
    format!("{scheme}://{user}@{host}{}", &rest[path..])
}

impl Drop for TestRole {
    fn drop(&mut self) {
        let role = &self.name;
        // The role's sessions end first: a role with sessions cannot be dropped.
        let dropped = run_on_a_plain_thread(
            &self.server_url,
            format!(
                "ALTER ROLE {role} NOLOGIN;
                 SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}';
                 DROP OWNED BY {role};
                 DROP ROLE {role};"
            ),
        );
        if !dropped {
            eprintln!("steward-testkit: could not drop role {}", self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn replaces_dbname() {
        assert_eq!(
            super::url_with_dbname("postgres://u@h:5432/postgres?sslmode=disable", "t1"),
            "postgres://u@h:5432/t1?sslmode=disable"
        );
        assert_eq!(
            super::url_with_dbname("postgres://u@h", "t1"),
            "postgres://u@h/t1"
        );
    }
}
