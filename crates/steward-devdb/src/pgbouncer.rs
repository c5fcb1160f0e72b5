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
/// the listening port and trust authentication for `users`), forwarding every database to
/// `upstream_host:upstream_port`. Killed when dropped.
pub struct PgBouncer {
    port: u16,
    process: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl PgBouncer {
    /// Starts PgBouncer (`pgbouncer` on PATH or in /usr/sbin) and waits until it answers for
    /// `users[0]`'s `postgres` database.
    pub async fn start(
        upstream_host: &str,
        upstream_port: u16,
        mode: PoolMode,
        users: &[&str],
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
        let userlist: String = users.iter().map(|u| format!("\"{u}\" \"\"\n")).collect();
        std::fs::write(&auth_file, userlist).map_err(io("writing PgBouncer's userlist"))?;
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
            process,
            log,
            _dir: dir,
        };
        let probe = pgbouncer.url(users.first().copied().unwrap_or("postgres"), "postgres");
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

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of `database` through this PgBouncer, as `user`.
    pub fn url(&self, user: &str, database: &str) -> String {
        format!("postgres://{user}@127.0.0.1:{}/{database}", self.port)
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
