use crate::tls::{TlsParams, TlsSetupError};
use crate::{SchemaName, Tls};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_postgres::{Client, Config, Connection, NoTls};

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invalid database URL {url}: {source}")]
    InvalidUrl {
        url: String,
        source: tokio_postgres::Error,
    },
    #[error("cannot connect to {url}: {source}")]
    Connect {
        url: String,
        source: tokio_postgres::Error,
    },
    #[error("cannot build connection pool: {0}")]
    Pool(String),
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
}

/// The URL with any password replaced, for logs and errors.
pub fn redact_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((userinfo, host)) => {
                let user = userinfo.split(':').next().unwrap_or_default();
                if userinfo.contains(':') {
                    format!("{scheme}://{user}:***@{host}")
                } else {
                    format!("{scheme}://{userinfo}@{host}")
                }
            }
            None => url.to_owned(),
        },
        // key=value form: blank out password=...
        None => url
            .split_whitespace()
            .map(|kv| {
                if kv.starts_with("password=") {
                    "password=***"
                } else {
                    kv
                }
            })
            .collect::<Vec<_>>()
            .join(" "),
    }
}

/// Parses `url` and pins the session's `search_path` to `schema`, keeping any options the URL
/// already carries.
pub fn pg_config(
    url: &str,
    schema: &SchemaName,
    application_name: &str,
) -> Result<Config, ConnectError> {
    // TLS parameters tokio-postgres does not know (verify-*, sslrootcert) are Steward's: see Tls.
    let url_for_driver = TlsParams::parse(url)?.rewritten;
    let mut config: Config = url_for_driver
        .parse()
        .map_err(|source| ConnectError::InvalidUrl {
            url: redact_url(url),
            source,
        })?;
    let pinned = format!("-c search_path={schema}");
    let options = match config.get_options() {
        Some(existing) if !existing.is_empty() => format!("{existing} {pinned}"),
        _ => pinned,
    };
    config.options(&options);
    if config.get_application_name().is_none() {
        config.application_name(application_name);
    }
    Ok(config)
}

/// A dedicated connection without TLS; see [`connect_with`].
pub async fn connect(config: &Config) -> Result<Client, ConnectError> {
    connect_with(config, &Tls::none()).await
}

/// A dedicated connection (not pooled); its driver task is spawned on the current runtime and
/// ends when the connection does, which `Client::is_closed` reports.
pub async fn connect_with(config: &Config, tls: &Tls) -> Result<Client, ConnectError> {
    let (client, _ended) = connect_watched(config, tls).await?;
    Ok(client)
}

/// A dedicated connection and a signal that turns true the moment its driver ends (the
/// connection is gone): the leader connection watches it.
pub async fn connect_watched(
    config: &Config,
    tls: &Tls,
) -> Result<(Client, tokio::sync::watch::Receiver<bool>), ConnectError> {
    let (ended_tx, ended) = tokio::sync::watch::channel(false);
    let client = match tls.connector() {
        None => {
            let (client, connection) = config
                .connect(NoTls)
                .await
                .map_err(|e| connect_error(config, e))?;
            tokio::spawn(drive(connection, ended_tx));
            client
        }
        Some(connector) => {
            let (client, connection) = config
                .connect(connector.clone())
                .await
                .map_err(|e| connect_error(config, e))?;
            tokio::spawn(drive(connection, ended_tx));
            client
        }
    };
    Ok((client, ended))
}

async fn drive<S, T>(connection: Connection<S, T>, ended: tokio::sync::watch::Sender<bool>)
where
    S: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
{
    if let Err(error) = connection.await {
        tracing::debug!(%error, "database connection ended");
    }
    let _ = ended.send(true);
}

fn connect_error(config: &Config, source: tokio_postgres::Error) -> ConnectError {
    ConnectError::Connect {
        url: describe(config),
        source,
    }
}

/// Asks the server to cancel whatever `token`'s session is running (over TLS when `tls` says so).
pub async fn cancel_query(
    token: tokio_postgres::CancelToken,
    tls: &Tls,
) -> Result<(), tokio_postgres::Error> {
    match tls.connector() {
        None => token.cancel_query(NoTls).await,
        Some(connector) => token.cancel_query(connector.clone()).await,
    }
}

/// [`connect_listening_with`] without TLS.
pub async fn connect_listening(
    config: &Config,
) -> Result<(Client, tokio::sync::mpsc::UnboundedReceiver<String>), ConnectError> {
    connect_listening_with(config, &Tls::none()).await
}

/// A dedicated connection whose NOTIFY messages are forwarded (by channel name) to the
/// returned receiver. The receiver closes when the connection ends.
pub async fn connect_listening_with(
    config: &Config,
    tls: &Tls,
) -> Result<(Client, tokio::sync::mpsc::UnboundedReceiver<String>), ConnectError> {
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
    let client = match tls.connector() {
        None => {
            let (client, connection) = config
                .connect(NoTls)
                .await
                .map_err(|e| connect_error(config, e))?;
            tokio::spawn(forward_notifications(connection, sender));
            client
        }
        Some(connector) => {
            let (client, connection) = config
                .connect(connector.clone())
                .await
                .map_err(|e| connect_error(config, e))?;
            tokio::spawn(forward_notifications(connection, sender));
            client
        }
    };
    Ok((client, receiver))
}

async fn forward_notifications<S, T>(
    mut connection: Connection<S, T>,
    sender: tokio::sync::mpsc::UnboundedSender<String>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                // A closed receiver just means nobody listens any more.
                let _ = sender.send(n.channel().to_owned());
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

/// [`pool_with`] without TLS.
pub fn pool(config: Config, max_size: usize) -> Result<Pool, ConnectError> {
    pool_with(config, &Tls::none(), max_size)
}

/// A connection pool whose connections all use `config` (and so the pinned schema).
pub fn pool_with(config: Config, tls: &Tls, max_size: usize) -> Result<Pool, ConnectError> {
    let manager_config = ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    };
    let manager = match tls.connector() {
        None => Manager::from_config(config, NoTls, manager_config),
        Some(connector) => Manager::from_config(config, connector.clone(), manager_config),
    };
    Pool::builder(manager)
        .max_size(max_size)
        .build()
        .map_err(|e| ConnectError::Pool(e.to_string()))
}

fn describe(config: &Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .collect();
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "postgres://{}@{}:{}/{}",
        config.get_user().unwrap_or("?"),
        hosts.join(","),
        port,
        config.get_dbname().unwrap_or("?")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            redact_url("host=h password=secret user=u"),
            "host=h password=*** user=u"
        );
    }

    #[test]
    fn pins_search_path_and_keeps_options() {
        let schema = SchemaName::new("s1").unwrap();
        let c = pg_config(
            "postgres://u@h/db?options=-c%20statement_timeout%3D5s",
            &schema,
            "t",
        )
        .unwrap();
        assert_eq!(
            c.get_options(),
            Some("-c statement_timeout=5s -c search_path=s1")
        );
        assert_eq!(c.get_application_name(), Some("t"));
    }
}
