use crate::tls::{TlsParams, TlsSetupError};
use crate::{SchemaName, Tls};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_postgres::{Client, Config, Connection, NoTls};

/// A driver error with its cause. tokio-postgres's own message is only its kind ("db error",
/// "error connecting to server"); the server's message or the OS error is what an operator
/// needs to read in a log line.
pub fn describe_pg_error(error: &tokio_postgres::Error) -> String {
    match std::error::Error::source(error) {
        Some(cause) => format!("{error}: {cause}"),
        None => error.to_string(),
    }
}

// The driver error is shown in full in the message (see `describe_pg_error`) and so is not
// also chained as the `source`, which would print it twice in `anyhow`'s report.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invalid database URL {url}: {}", describe_pg_error(.cause))]
    InvalidUrl {
        url: String,
        cause: tokio_postgres::Error,
    },
    #[error("cannot connect to {url}: {}", describe_pg_error(.cause))]
    Connect {
        url: String,
        cause: tokio_postgres::Error,
    },
    #[error("cannot build connection pool: {0}")]
    Pool(String),
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
}

/// The URL with any password replaced, for logs and errors: the userinfo password and a
/// `password` query parameter of a URL, or a `password` key (quoted or not) of a key=value
/// connection string.
pub fn redact_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (base, query) = match rest.split_once('?') {
                Some((base, query)) => (base, Some(query)),
                None => (rest, None),
            };
            let mut out = format!("{scheme}://");
            match base.rsplit_once('@') {
                Some((userinfo, host)) => match userinfo.split_once(':') {
                    Some((user, _)) => out.push_str(&format!("{user}:***@{host}")),
                    None => out.push_str(&format!("{userinfo}@{host}")),
                },
                None => out.push_str(base),
            }
            if let Some(query) = query {
                let params: Vec<&str> = query
                    .split('&')
                    .map(|kv| match kv.split_once('=') {
                        Some((key, _)) if key.eq_ignore_ascii_case("password") => "password=***",
                        _ => kv,
                    })
                    .collect();
                out.push('?');
                out.push_str(&params.join("&"));
            }
            out
        }
        None => redact_key_value(url),
    }
}

/// libpq's key=value form: `key = value` pairs, values optionally single-quoted with `\\`
/// escapes. Everything but the password's value is kept as written.
fn redact_key_value(conninfo: &str) -> String {
    let mut out = String::with_capacity(conninfo.len());
    let mut rest = conninfo;
    while let Some(eq) = rest.find('=') {
        let (before, after) = (&rest[..eq], &rest[eq + 1..]);
        let key = before
            .trim_end()
            .rsplit(char::is_whitespace)
            .next()
            .unwrap_or_default();
        out.push_str(before);
        out.push('=');
        let spaces = after.len() - after.trim_start().len();
        out.push_str(&after[..spaces]);
        let value = &after[spaces..];
        let len = conninfo_value_len(value);
        if key.eq_ignore_ascii_case("password") {
            out.push_str("***");
        } else {
            out.push_str(&value[..len]);
        }
        rest = &value[len..];
    }
    out.push_str(rest);
    out
}

/// Length of the value at the start of `value`: up to the closing quote of a quoted value
/// (an unclosed one runs to the end), else up to the next whitespace.
fn conninfo_value_len(value: &str) -> usize {
    let Some(quoted) = value.strip_prefix('\'') else {
        return value.find(char::is_whitespace).unwrap_or(value.len());
    };
    let mut escaped = false;
    for (i, c) in quoted.char_indices() {
        match c {
            '\'' if !escaped => return i + 2,
            '\\' => escaped = !escaped,
            _ => escaped = false,
        }
    }
    value.len()
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
        .map_err(|cause| ConnectError::InvalidUrl {
            url: redact_url(url),
            cause,
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

fn connect_error(config: &Config, cause: tokio_postgres::Error) -> ConnectError {
    ConnectError::Connect {
        url: describe(config),
        cause,
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
        assert_eq!(
            redact_url("postgres://u@h/db?sslmode=require&password=secret&x=1"),
            "postgres://u@h/db?sslmode=require&password=***&x=1"
        );
        assert_eq!(
            redact_url("postgres://u:p%40ss@h/db?password=other"),
            "postgres://u:***@h/db?password=***"
        );
        assert_eq!(
            redact_url("host=h password = 'a \\' b' user=u"),
            "host=h password = *** user=u"
        );
        assert_eq!(
            redact_url("host=h  PASSWORD=secret"),
            "host=h  PASSWORD=***"
        );
    }

    proptest::proptest! {
        /// Whatever the password and however the string is written, it never shows.
        #[test]
        fn no_form_of_connection_string_shows_the_password(
            suffix in "[A-Za-z0-9!#$%^*()_+ -]{4,20}",
        ) {
            let password = format!("pw-{suffix}");
            let quoted = password.replace('\\', "\\\\").replace('\'', "\\'");
            let forms = [
                format!("host=h password='{quoted}' user=u"),
                format!("password = '{quoted}' host=h"),
                format!("postgres://u:{}@h/db", password.replace(' ', "%20")),
                format!("postgres://u@h/db?password={}", password.replace(' ', "%20")),
            ];
            for form in forms {
                let redacted = redact_url(&form);
                let needle = password.trim().replace(' ', "%20");
                proptest::prop_assert!(
                    !redacted.contains(&needle) && !redacted.contains(password.trim()),
                    "{form} -> {redacted}"
                );
            }
        }
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
