//! [`Target`]: one queue's database and schema, and every way Steward opens a session there.

use crate::tls::{Tls, TlsParams};
use crate::{describe_pg_error, redact_url, SchemaName, SslMode, TlsSetupError};
use deadpool_postgres::{Hook, HookError, Manager, ManagerConfig, Pool, RecyclingMethod};
use std::fmt;
use std::future::Future;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch};
use tokio_postgres::error::SqlState;
use tokio_postgres::{CancelToken, Client, Config, Connection, NoTls};

// The driver error is shown in full in the message (see `describe_pg_error`) and so is not
// also chained as the `source`, which would print it twice in `anyhow`'s report.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invalid database URL {url}: {}", describe_pg_error(.cause))]
    InvalidUrl {
        url: String,
        cause: tokio_postgres::Error,
    },
    #[error("cannot connect to {target}: {}", describe_pg_error(.cause))]
    Connect {
        target: String,
        cause: tokio_postgres::Error,
    },
    #[error("cannot cancel a statement on {target}: {}", describe_pg_error(.cause))]
    Cancel {
        target: String,
        cause: tokio_postgres::Error,
    },
    #[error("cannot build a connection pool for {target}: {reason}")]
    Pool { target: String, reason: String },
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
}

impl ConnectError {
    /// What is wrong when retrying cannot help: the server refused the session for a reason
    /// only an operator can fix (a database or role that does not exist, a wrong password, no
    /// right to connect). `None` for errors that can pass (the server unreachable, restarting).
    pub fn permanent(&self) -> Option<&'static str> {
        let ConnectError::Connect { cause, .. } = self else {
            return None;
        };
        let code = cause.code()?;
        Some(if *code == SqlState::INVALID_CATALOG_NAME {
            "the database does not exist"
        } else if *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION {
            "the role does not exist or may not log in"
        } else if *code == SqlState::INVALID_PASSWORD {
            "password authentication failed"
        } else if *code == SqlState::INSUFFICIENT_PRIVILEGE {
            "the role may not connect to this database"
        } else {
            return None;
        })
    }
}

impl ConnectError {
    /// A refusal that passes once sessions end: no connection slot left on the server
    /// (`max_connections`) or for the role or database (their `CONNECTION LIMIT`).
    pub fn no_connection_slot(&self) -> bool {
        matches!(self, ConnectError::Connect { cause, .. }
            if cause.code() == Some(&SqlState::TOO_MANY_CONNECTIONS))
    }
}

/// How both ends of a long-lived session notice that the other is gone: TCP keepalives on
/// the client and (as session settings) on the server, a TCP user timeout, and the server's
/// check for a vanished client while a statement runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    pub keepalive_idle: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_retries: u32,
    pub connection_check_interval: Duration,
}

impl Liveness {
    /// Keepalives only probe an idle connection. When data is in flight as the path goes dark
    /// (a reply the peer never acknowledges), TCP retransmits for many minutes instead; the
    /// user timeout bounds that to the same time the keepalives take.
    pub fn user_timeout(&self) -> Duration {
        self.keepalive_idle + self.keepalive_interval * self.keepalive_retries
    }
}

/// One NOTIFY a listening session received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub channel: String,
    pub payload: String,
}

/// NOTIFYs in the order they arrive; closed when the connection ends.
pub type Notifications = mpsc::UnboundedReceiver<Notification>;

/// Resolves once a watched connection has ended.
#[derive(Clone)]
pub struct Ended(watch::Receiver<bool>);

impl Ended {
    pub async fn wait(&self) {
        let mut ended = self.0.clone();
        // An error means the sender is gone, which also means the connection ended.
        let _ = ended.wait_for(|done| *done).await;
    }
}

/// Where a queue lives (a database and the schema holding Steward's tables) and how to reach
/// it: the parsed URL, its TLS setting, and the session settings (the schema pinned in
/// `search_path` first) of the sessions opened from it. Built and validated once; cheap to clone.
///
/// Session settings are sent with `SET` once the session is open, not as the startup packet's
/// `options`: PgBouncer refuses a startup parameter it does not know, and a `SET` also wins over
/// a value a DBA set for the role or database.
#[derive(Clone)]
pub struct Target {
    config: Config,
    tls: Tls,
    schema: SchemaName,
    /// (name, value) in the order first set; a later `with_setting` of a name replaces its value.
    settings: Vec<(String, String)>,
    /// The URL as given with its password replaced, for logs and errors.
    redacted: String,
}

impl Target {
    /// Parses `url` (a URL or libpq key=value string; `sslmode` and `sslrootcert` as in
    /// libpq) and pins the sessions' `search_path` to `schema`, keeping any options the URL
    /// carries. Sessions are named `steward` unless the URL names them.
    pub fn new(url: &str, schema: SchemaName) -> Result<Self, ConnectError> {
        let redacted = redact_url(url);
        // TLS parameters tokio-postgres does not know (verify-*, sslrootcert) are Steward's.
        let params = TlsParams::parse(url)?;
        let tls = Tls::from_params(&params)?;
        let mut config: Config =
            params
                .rewritten
                .parse()
                .map_err(|cause| ConnectError::InvalidUrl {
                    url: redacted.clone(),
                    cause,
                })?;
        if config.get_application_name().is_none() {
            config.application_name("steward");
        }
        let target = Self {
            config,
            tls,
            schema: schema.clone(),
            redacted,
            settings: Vec::new(),
        };
        Ok(target.with_setting("search_path", schema))
    }

    pub fn schema(&self) -> &SchemaName {
        &self.schema
    }

    pub fn ssl_mode(&self) -> SslMode {
        self.tls.mode()
    }

    /// The driver's configuration, for reading (database name, user, hosts).
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The same database with its sessions' `search_path` pinned to `schema` instead: another
    /// queue in the same database.
    pub fn with_schema(&self, schema: SchemaName) -> Target {
        let mut target = self.with_setting("search_path", &schema);
        target.schema = schema;
        target
    }

    /// The same target with its sessions named `name` (their `application_name`, which
    /// `pg_stat_activity` shows).
    pub fn named(&self, name: &str) -> Target {
        let mut target = self.clone();
        target.config.application_name(name);
        target
    }

    /// The same target with a server setting for every session, e.g.
    /// `with_setting("idle_in_transaction_session_timeout", "60000ms")`. `name` is a setting's
    /// name as code writes it, never user input; the value is sent as a quoted literal.
    pub fn with_setting(&self, name: &str, value: impl fmt::Display) -> Target {
        let mut target = self.clone();
        let value = value.to_string();
        match target.settings.iter_mut().find(|(n, _)| n == name) {
            Some(setting) => setting.1 = value,
            None => target.settings.push((name.to_owned(), value)),
        }
        target
    }

    /// One batch of `SET` statements for the session settings (sent right after connecting).
    fn set_statements(&self) -> String {
        self.settings
            .iter()
            .map(|(name, value)| format!("SET {name} = '{}';", value.replace('\'', "''")))
            .collect()
    }

    /// The same target with `liveness` on both ends of every session.
    pub fn with_liveness(&self, liveness: &Liveness) -> Target {
        let mut target = self
            .with_setting(
                "tcp_keepalives_idle",
                liveness.keepalive_idle.as_secs().max(1),
            )
            .with_setting(
                "tcp_keepalives_interval",
                liveness.keepalive_interval.as_secs().max(1),
            )
            .with_setting("tcp_keepalives_count", liveness.keepalive_retries)
            .with_setting("tcp_user_timeout", liveness.user_timeout().as_millis())
            .with_setting(
                "client_connection_check_interval",
                format!("{}ms", liveness.connection_check_interval.as_millis()),
            );
        target
            .config
            .keepalives(true)
            .keepalives_idle(liveness.keepalive_idle)
            .keepalives_interval(liveness.keepalive_interval)
            .keepalives_retries(liveness.keepalive_retries)
            .tcp_user_timeout(liveness.user_timeout())
            .connect_timeout(Duration::from_secs(10));
        target
    }

    /// A dedicated session (not pooled). Its I/O runs on a task of the current runtime that
    /// ends with the connection, which `Client::is_closed` reports.
    pub async fn connect(&self) -> Result<Client, ConnectError> {
        self.open(Watch(None)).await
    }

    /// A dedicated session and a signal that fires the moment it ends.
    pub async fn connect_watched(&self) -> Result<(Client, Ended), ConnectError> {
        let (sender, ended) = watch::channel(false);
        let client = self.open(Watch(Some(sender))).await?;
        Ok((client, Ended(ended)))
    }

    /// A dedicated session whose NOTIFY messages arrive on the returned receiver (LISTEN is
    /// the caller's to send).
    pub async fn listen(&self) -> Result<(Client, Notifications), ConnectError> {
        let (sender, notifications) = mpsc::unbounded_channel();
        let client = self.open(Forward(sender)).await?;
        Ok((client, notifications))
    }

    /// A pool of up to `max_size` sessions.
    pub fn pool(&self, max_size: usize) -> Result<Pool, ConnectError> {
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match self.tls.connector() {
            None => Manager::from_config(self.config.clone(), NoTls, manager_config),
            Some(tls) => Manager::from_config(self.config.clone(), tls.clone(), manager_config),
        };
        let set = self.set_statements();
        Pool::builder(manager)
            .max_size(max_size)
            .post_create(Hook::async_fn(move |client, _| {
                let set = set.clone();
                Box::pin(
                    async move { client.batch_execute(&set).await.map_err(HookError::Backend) },
                )
            }))
            .build()
            .map_err(|e| ConnectError::Pool {
                target: self.describe(),
                reason: e.to_string(),
            })
    }

    /// Asks the server to cancel what `token`'s session (one of this target's) is running.
    pub async fn cancel(&self, token: &CancelToken) -> Result<(), ConnectError> {
        let cancelled = match self.tls.connector() {
            None => token.cancel_query(NoTls).await,
            Some(tls) => token.cancel_query(tls.clone()).await,
        };
        cancelled.map_err(|cause| ConnectError::Cancel {
            target: self.describe(),
            cause,
        })
    }

    async fn open(&self, driver: impl Drive) -> Result<Client, ConnectError> {
        let failed = |cause| ConnectError::Connect {
            target: self.describe(),
            cause,
        };
        let client = match self.tls.connector() {
            None => {
                let (client, connection) = self.config.connect(NoTls).await.map_err(failed)?;
                tokio::spawn(driver.drive(connection));
                client
            }
            Some(tls) => {
                let (client, connection) =
                    self.config.connect(tls.clone()).await.map_err(failed)?;
                tokio::spawn(driver.drive(connection));
                client
            }
        };
        client
            .batch_execute(&self.set_statements())
            .await
            .map_err(failed)?;
        Ok(client)
    }

    /// user@hosts:port/database, never a password.
    fn describe(&self) -> String {
        let hosts: Vec<String> = self
            .config
            .get_hosts()
            .iter()
            .map(|h| match h {
                tokio_postgres::config::Host::Tcp(h) => h.clone(),
                tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
            })
            .collect();
        // libpq pairs hosts with ports by position; one port applies to every host.
        let ports = self.config.get_ports();
        let hosts: Vec<String> = hosts
            .into_iter()
            .enumerate()
            .map(|(i, host)| {
                let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
                format!("{host}:{port}")
            })
            .collect();
        format!(
            "postgres://{}@{}/{}",
            self.config.get_user().unwrap_or("?"),
            hosts.join(","),
            self.config.get_dbname().unwrap_or("?")
        )
    }
}

/// The URL as given, password replaced, and the schema.
impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (schema {})", self.redacted, self.schema)
    }
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Target")
            .field("url", &self.redacted)
            .field("schema", &self.schema)
            .field("ssl_mode", &self.tls.mode())
            .finish()
    }
}

/// A dedicated session of a target, opened when first needed and again whenever it has ended:
/// for periodic work on a connection of its own, which must survive a restart of the server.
pub struct Reconnecting {
    target: Target,
    client: Option<Client>,
}

impl Reconnecting {
    pub fn new(target: Target) -> Self {
        Self {
            target,
            client: None,
        }
    }

    /// The open session, or a new one when there is none or it has ended.
    pub async fn get(&mut self) -> Result<&Client, ConnectError> {
        let client = match self.client.take() {
            Some(client) if !client.is_closed() => client,
            _ => self.target.connect().await?,
        };
        Ok(self.client.insert(client))
    }
}

/// What runs a new session's I/O; every connection needs a task driving it, whatever its
/// TLS stream type.
trait Drive: Send + 'static {
    fn drive<S, T>(self, connection: Connection<S, T>) -> impl Future<Output = ()> + Send
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static;
}

/// Drives the connection and, when it ends, says so.
struct Watch(Option<watch::Sender<bool>>);

impl Drive for Watch {
    async fn drive<S, T>(self, connection: Connection<S, T>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "database connection ended");
        }
        if let Some(ended) = self.0 {
            let _ = ended.send(true);
        }
    }
}

/// Drives the connection and forwards each notification.
struct Forward(mpsc::UnboundedSender<Notification>);

impl Drive for Forward {
    async fn drive<S, T>(self, mut connection: Connection<S, T>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                    // A closed receiver just means nobody listens any more.
                    let _ = self.0.send(Notification {
                        channel: n.channel().to_owned(),
                        payload: n.payload().to_owned(),
                    });
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => {
                    tracing::debug!(%error, "database connection ended");
                    break;
                }
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_search_path_with_set_and_keeps_the_urls_options() {
        let schema = SchemaName::new("s1").unwrap();
        let t = Target::new(
            "postgres://u@h/db?options=-c%20statement_timeout%3D5s",
            schema,
        )
        .unwrap();
        assert_eq!(t.config().get_options(), Some("-c statement_timeout=5s"));
        assert_eq!(t.set_statements(), "SET search_path = 's1';");
        assert_eq!(t.config().get_application_name(), Some("steward"));
        let named = t
            .named("steward:x:leader")
            .with_setting("lock_timeout", "1s")
            .with_setting("application_name", "it's")
            .with_setting("lock_timeout", "2s");
        assert_eq!(
            named.set_statements(),
            "SET search_path = 's1';SET lock_timeout = '2s';SET application_name = 'it''s';"
        );
        assert_eq!(
            named.config().get_application_name(),
            Some("steward:x:leader")
        );
    }

    #[test]
    fn shows_no_password() {
        let t = Target::new("postgres://u:secret@h/db", SchemaName::default()).unwrap();
        assert!(!format!("{t} {t:?}").contains("secret"), "{t} {t:?}");
        let err = Target::new("postgres://u:secret@h:notaport/db", SchemaName::default())
            .unwrap_err()
            .to_string();
        assert!(!err.contains("secret"), "{err}");
    }
}
