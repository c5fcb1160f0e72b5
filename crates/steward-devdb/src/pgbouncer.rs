//! A throwaway PgBouncer in front of a server, for tests of Steward through a pooler.

use crate::{answers, chown_to, free_port, is_root, unprivileged_user, DevDbError};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// PgBouncer's `pool_mode`: when a client's server connection goes back to the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    /// When the client disconnects.
    Session,
    /// After each transaction.
    Transaction,
    /// After each statement (transaction blocks are refused).
    Statement,
}

impl PoolMode {
    pub fn as_str(self) -> &'static str {
        match self {
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
            PoolMode::Statement => "statement",
        }
    }
}

/// A PgBouncer process with a configuration of its own (default settings but the pool mode,
/// the listening port and trust authentication for the server URL's user), forwarding every
/// database to that server. Killed when dropped.
pub struct PgBouncer {
    port: u16,
    user: String,
    process: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl PgBouncer {
    /// Starts PgBouncer (`pgbouncer` on PATH or in /usr/sbin) in `mode` in front of the server
    /// `server_url` names (a TCP host and port), and waits until it answers for that URL's user.
    pub async fn in_front_of(server_url: &str, mode: PoolMode) -> Result<PgBouncer, DevDbError> {
        let config: tokio_postgres::Config =
            server_url.parse().map_err(|e| DevDbError::Cluster {
                step: "reading the server URL for PgBouncer",
                detail: format!("{e}"),
            })?;
        let host = match config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
            _ => {
                return Err(DevDbError::Cluster {
                    step: "reading the server URL for PgBouncer",
                    detail: "PgBouncer needs a TCP host".to_owned(),
                })
            }
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let user = config.get_user().unwrap_or("postgres");
        Self::start(&host, port, mode, user).await
    }

    async fn start(
        upstream_host: &str,
        upstream_port: u16,
        mode: PoolMode,
        user: &str,
    ) -> Result<PgBouncer, DevDbError> {
        let binary = find_pgbouncer().ok_or(DevDbError::Cluster {
            step: "finding pgbouncer",
            detail:
                "no pgbouncer on PATH or in /usr/sbin; install PgBouncer (Debian package pgbouncer)"
                    .to_owned(),
        })?;
        let io = |step| move |source| DevDbError::Io { step, source };
        let dir = tempfile::Builder::new()
            .prefix("steward-pgbouncer-")
            .tempdir()
            .map_err(io("creating the PgBouncer directory"))?;
        let port = free_port()?;
        let log = dir.path().join("pgbouncer.log");
        let auth_file = dir.path().join("userlist.txt");
        let ini = dir.path().join("pgbouncer.ini");
        std::fs::write(&auth_file, format!("\"{user}\" \"\"\n"))
            .map_err(io("writing PgBouncer's userlist"))?;
        let config = format!(
            "[databases]\n* = host={upstream_host} port={upstream_port}\n\n[pgbouncer]\n\
             listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
             auth_type = trust\nauth_file = {auth}\npool_mode = {mode}\n\
             max_client_conn = 1000\ndefault_pool_size = 200\nlogfile = {log}\n",
            auth = auth_file.display(),
            mode = mode.as_str(),
            log = log.display(),
        );
        std::fs::write(&ini, config).map_err(io("writing pgbouncer.ini"))?;
        let mut command = Command::new(binary);
        // PgBouncer refuses to run as root; `-u` makes it drop to an unprivileged user itself,
        // so that killing this child kills PgBouncer.
        if is_root() {
            let user = unprivileged_user();
            for path in [dir.path(), &auth_file, &ini] {
                chown_to(path, &user)?;
            }
            command.arg("-u").arg(user);
        }
        let process = command
            .arg(&ini)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io("starting pgbouncer"))?;
        let mut pgbouncer = PgBouncer {
            port,
            user: user.to_owned(),
            process,
            log,
            _dir: dir,
        };
        let probe = pgbouncer.url_of("postgres");
        for _ in 0..100 {
            if let Ok(Some(status)) = pgbouncer.process.try_wait() {
                return Err(DevDbError::Cluster {
                    step: "starting pgbouncer",
                    detail: format!("it exited with {status}: {}", pgbouncer.log_text()),
                });
            }
            if answers(&probe).await {
                return Ok(pgbouncer);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(DevDbError::Cluster {
            step: "starting pgbouncer",
            detail: format!(
                "no answer on port {port} after 10 s: {}",
                pgbouncer.log_text()
            ),
        })
    }

    /// The URL of `database` through this PgBouncer, as the server URL's user.
    pub fn url_of(&self, database: &str) -> String {
        format!(
            "postgres://{}@127.0.0.1:{}/{database}",
            self.user, self.port
        )
    }

    /// What PgBouncer has logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

fn find_pgbouncer() -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("pgbouncer"))
        .find(|path| path.is_file())
}
