//! A PostgreSQL server for development, tests and the demo (`steward-demo`).
//!
//! [`ensure_server`] uses `DATABASE_URL` when set, otherwise a server answering on
//! 127.0.0.1:5432, otherwise starts a throwaway cluster with the installed PostgreSQL binaries
//! (`initdb`/`pg_ctl`) that is stopped and deleted when the returned [`Server`] is dropped.
//!
//! [`start_cluster`] always starts such a throwaway cluster, for tests that stop, restart or
//! otherwise abuse their server ([`Server::stop_fast`], [`Server::start`],
//! [`Server::restart_fast`]) and so must never touch a shared one.
//!
//! Throwaway clusters come in two [`Tuning`]s: fast for tests (no fsync), and stock PostgreSQL
//! settings for benchmarks ([`start_cluster_tuned`]).

mod pgbouncer;

pub use pgbouncer::{PgBouncer, PoolMode};

use std::ffi::OsString;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub const DEFAULT_LOCAL_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

#[derive(Debug, thiserror::Error)]
pub enum DevDbError {
    #[error("no PostgreSQL server answers at 127.0.0.1:5432 and no PostgreSQL binaries (initdb, pg_ctl) were found; install PostgreSQL or set DATABASE_URL")]
    NoBinaries,
    #[error("no pgbouncer on PATH or in /usr/sbin; install PgBouncer (Debian package pgbouncer)")]
    NoPgBouncer,
    #[error("{step} failed: {detail}")]
    Cluster { step: &'static str, detail: String },
    #[error("io error while {step}: {source}")]
    Io {
        step: &'static str,
        source: std::io::Error,
    },
    #[error("cannot {0} an existing server: only a throwaway cluster started here can be stopped or started")]
    NotThrowaway(&'static str),
}

/// A server to run against. A throwaway cluster lives as long as this value.
pub struct Server {
    url: String,
    cluster: Option<Cluster>,
}

impl Server {
    /// URL of the server's `postgres` database.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn is_throwaway(&self) -> bool {
        self.cluster.is_some()
    }

    pub fn describe(&self) -> String {
        match &self.cluster {
            Some(c) => format!(
                "throwaway cluster in {} on port {}",
                c.data_dir.display(),
                c.port
            ),
            None => "existing server".to_owned(),
        }
    }

    /// The throwaway cluster's port (None for an existing server).
    pub fn port(&self) -> Option<u16> {
        self.cluster.as_ref().map(|c| c.port)
    }

    /// Stops the throwaway cluster with `pg_ctl stop -m fast` (sessions are terminated, open
    /// transactions roll back, a shutdown checkpoint is written) and waits until it is down.
    /// The data directory and port are kept for [`Server::start`].
    pub async fn stop_fast(&self) -> Result<(), DevDbError> {
        let cluster = self.own_cluster("stop")?;
        cluster
            .run_async("pg_ctl", "pg_ctl stop -m fast", &cluster.stop_args("fast"))
            .await
    }

    /// Starts the (stopped) throwaway cluster again on the same port and data directory, and
    /// waits until it answers.
    pub async fn start(&self) -> Result<(), DevDbError> {
        let cluster = self.own_cluster("start")?;
        cluster
            .run_async("pg_ctl", "pg_ctl start", &cluster.start_args("start"))
            .await?;
        self.wait_until_it_answers("waiting for the restarted cluster")
            .await
    }

    /// `pg_ctl restart -m fast`: a fast shutdown followed by a start on the same port and data
    /// directory; returns once the server answers again.
    pub async fn restart_fast(&self) -> Result<(), DevDbError> {
        let cluster = self.own_cluster("restart")?;
        let mut args = cluster.start_args("restart");
        args.extend(["-m".into(), "fast".into()]);
        cluster
            .run_async("pg_ctl", "pg_ctl restart -m fast", &args)
            .await?;
        self.wait_until_it_answers("waiting for the restarted cluster")
            .await
    }

    /// A streaming replica of this throwaway cluster (`pg_basebackup -R`), started as a hot
    /// standby on a port and in a directory of its own, with the same settings; stopped and
    /// deleted when the returned [`Server`] is dropped.
    pub async fn start_replica(&self) -> Result<Server, DevDbError> {
        let primary = self.own_cluster("replicate")?;
        let (tuning, primary_port) = (primary.tuning, primary.port);
        let replica = tokio::task::spawn_blocking(move || {
            let replica = Cluster::prepare(tuning)?;
            replica.run(
                "pg_basebackup",
                "pg_basebackup",
                &[
                    "-D".into(),
                    replica.data_dir.clone().into(),
                    "-h".into(),
                    "127.0.0.1".into(),
                    "-p".into(),
                    primary_port.to_string().into(),
                    "-U".into(),
                    "postgres".into(),
                    "-R".into(),
                    "-X".into(),
                    "stream".into(),
                    "--no-sync".into(),
                ],
            )?;
            replica.run("pg_ctl", "pg_ctl start", &replica.start_args("start"))?;
            Ok::<_, DevDbError>(replica)
        })
        .await
        .map_err(|e| DevDbError::Cluster {
            step: "starting the replica",
            detail: e.to_string(),
        })??;
        let server = Server {
            url: format!("postgres://postgres@127.0.0.1:{}/postgres", replica.port),
            cluster: Some(replica),
        };
        server
            .wait_until_it_answers("waiting for the replica")
            .await?;
        Ok(server)
    }

    /// Promotes this throwaway cluster, a hot standby, to a primary (`pg_ctl promote`), and
    /// waits until it accepts writes.
    pub async fn promote(&self) -> Result<(), DevDbError> {
        let cluster = self.own_cluster("promote")?;
        let args = vec![
            "promote".into(),
            "-w".into(),
            "-t".into(),
            "60".into(),
            "-D".into(),
            cluster.data_dir.clone().into(),
        ];
        cluster.run_async("pg_ctl", "pg_ctl promote", &args).await
    }

    fn own_cluster(&self, what: &'static str) -> Result<&Cluster, DevDbError> {
        self.cluster.as_ref().ok_or(DevDbError::NotThrowaway(what))
    }

    async fn wait_until_it_answers(&self, step: &'static str) -> Result<(), DevDbError> {
        for _ in 0..100 {
            if answers(&self.url).await {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(DevDbError::Cluster {
            step,
            detail: format!("no answer at {} after 10 s", self.url),
        })
    }
}

/// How a throwaway cluster is configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tuning {
    /// For tests: no fsync, no synchronous commit, no full-page writes (nothing here must
    /// survive a crash of the machine), and room for many parallel test connections.
    Fast,
    /// PostgreSQL's own defaults, as a production server starts out: durable commits and
    /// autovacuum on. What benchmarks measure against, whatever the machine's shared server
    /// is tuned for.
    Stock,
}

impl Tuning {
    fn server_options(self) -> &'static str {
        match self {
            Tuning::Fast => {
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300"
            }
            Tuning::Stock => "-c fsync=on -c synchronous_commit=on -c full_page_writes=on -c autovacuum=on",
        }
    }
}

/// `DATABASE_URL`, else 127.0.0.1:5432 if it answers, else a throwaway cluster.
/// `STEWARD_DEVDB=throwaway` skips the first two (CI uses it to exercise the fallback).
pub async fn ensure_server() -> Result<Server, DevDbError> {
    if std::env::var("STEWARD_DEVDB").is_ok_and(|v| v == "throwaway") {
        return start_cluster().await;
    }
    if let Ok(url) = std::env::var("DATABASE_URL") {
        if !url.is_empty() {
            return Ok(Server { url, cluster: None });
        }
    }
    if answers(DEFAULT_LOCAL_URL).await {
        return Ok(Server {
            url: DEFAULT_LOCAL_URL.to_owned(),
            cluster: None,
        });
    }
    start_cluster().await
}

/// Always starts a throwaway cluster (never uses `DATABASE_URL` or 127.0.0.1:5432), stopped and
/// deleted when the returned [`Server`] is dropped. For tests that stop or restart their server.
pub async fn start_cluster() -> Result<Server, DevDbError> {
    start_cluster_tuned(Tuning::Fast).await
}

/// [`start_cluster`] with a choice of [`Tuning`].
pub async fn start_cluster_tuned(tuning: Tuning) -> Result<Server, DevDbError> {
    let cluster = tokio::task::spawn_blocking(move || Cluster::start(tuning))
        .await
        .map_err(|e| DevDbError::Cluster {
            step: "starting cluster",
            detail: e.to_string(),
        })??;
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", cluster.port);
    let server = Server {
        url,
        cluster: Some(cluster),
    };
    server
        .wait_until_it_answers("waiting for the throwaway cluster")
        .await?;
    Ok(server)
}

async fn answers(url: &str) -> bool {
    let Ok(mut config) = url.parse::<tokio_postgres::Config>() else {
        return false;
    };
    config.connect_timeout(Duration::from_secs(2));
    match tokio::time::timeout(
        Duration::from_secs(3),
        config.connect(tokio_postgres::NoTls),
    )
    .await
    {
        Ok(Ok((client, connection))) => {
            tokio::spawn(connection);
            client.simple_query("SELECT 1").await.is_ok()
        }
        _ => false,
    }
}

struct Cluster {
    /// Keeps the directory until drop; removed after the server stops.
    _dir: tempfile::TempDir,
    data_dir: PathBuf,
    port: u16,
    bin_dir: PathBuf,
    run_as: Option<String>,
    /// Server options (`pg_ctl -o`), reused by every start so that the port stays the same.
    server_options: String,
    tuning: Tuning,
    log: PathBuf,
}

impl Cluster {
    fn start(tuning: Tuning) -> Result<Cluster, DevDbError> {
        let cluster = Self::prepare(tuning)?;
        cluster.run(
            "initdb",
            "initdb",
            &[
                "-D".into(),
                cluster.data_dir.clone().into(),
                "-U".into(),
                "postgres".into(),
                "--auth=trust".into(),
                "--encoding=UTF8".into(),
                "--no-sync".into(),
            ],
        )?;
        cluster.run("pg_ctl", "pg_ctl start", &cluster.start_args("start"))?;
        Ok(cluster)
    }

    /// A directory, a free port and the server options for a cluster, with no data yet.
    fn prepare(tuning: Tuning) -> Result<Cluster, DevDbError> {
        let bin_dir = find_bin_dir().ok_or(DevDbError::NoBinaries)?;
        // initdb refuses to run as root: run the server as an unprivileged user then.
        let run_as = is_root().then(unprivileged_user);
        let dir = tempfile::Builder::new()
            .prefix("steward-pg-")
            .tempdir()
            .map_err(|source| DevDbError::Io {
                step: "creating the cluster directory",
                source,
            })?;
        let data_dir = dir.path().join("data");
        if let Some(user) = &run_as {
            chown_to(dir.path(), user)?;
        }
        let port = free_port()?;
        let socket_dir = dir.path().to_path_buf();
        let server_options = format!(
            "-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} {}",
            socket_dir.display(),
            tuning.server_options()
        );
        let log = data_dir.join("server.log");
        Ok(Cluster {
            _dir: dir,
            data_dir,
            port,
            bin_dir,
            run_as,
            server_options,
            tuning,
            log,
        })
    }

    /// `pg_ctl <action>` (start or restart) with this cluster's data directory, log and options,
    /// waiting (up to 60 s) for the server to accept connections.
    fn start_args(&self, action: &str) -> Vec<OsString> {
        vec![
            action.into(),
            "-w".into(),
            "-t".into(),
            "60".into(),
            "-D".into(),
            self.data_dir.clone().into(),
            "-l".into(),
            self.log.clone().into(),
            "-o".into(),
            self.server_options.clone().into(),
        ]
    }

    fn stop_args(&self, mode: &str) -> Vec<OsString> {
        vec![
            "stop".into(),
            "-w".into(),
            "-t".into(),
            "60".into(),
            "-m".into(),
            mode.into(),
            "-D".into(),
            self.data_dir.clone().into(),
        ]
    }

    /// `program` from the PostgreSQL binaries, as the unprivileged user when we are root.
    fn command(&self, program: &str, args: &[OsString]) -> Command {
        let binary = self.bin_dir.join(program);
        let mut command = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.arg("-u").arg(user).arg("--").arg(&binary);
                c
            }
            None => Command::new(&binary),
        };
        command.args(args).current_dir("/");
        command
    }

    fn run(&self, program: &str, step: &'static str, args: &[OsString]) -> Result<(), DevDbError> {
        checked(step, self.command(program, args).output())
    }

    async fn run_async(
        &self,
        program: &str,
        step: &'static str,
        args: &[OsString],
    ) -> Result<(), DevDbError> {
        let output = tokio::process::Command::from(self.command(program, args))
            .output()
            .await;
        checked(step, output)
    }
}

fn checked(
    step: &'static str,
    output: std::io::Result<std::process::Output>,
) -> Result<(), DevDbError> {
    let output = output.map_err(|source| DevDbError::Io { step, source })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(DevDbError::Cluster {
            step,
            detail: format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // A test may have left the server stopped: nothing to do then (`pg_ctl status` exits
        // non-zero when no server runs on the data directory).
        let status = vec!["status".into(), "-D".into(), self.data_dir.clone().into()];
        if self.run("pg_ctl", "pg_ctl status", &status).is_err() {
            return;
        }
        if let Err(error) = self.run("pg_ctl", "pg_ctl stop", &self.stop_args("immediate")) {
            eprintln!("steward-devdb: stopping the throwaway cluster failed: {error}");
        }
    }
}

/// The path of an installed PostgreSQL program (`psql`, `pg_basebackup`...), from the same
/// installation the throwaway clusters use.
pub fn pg_binary(name: &str) -> Option<PathBuf> {
    find_bin_dir()
        .map(|dir| dir.join(name))
        .filter(|path| path.exists())
}

fn find_bin_dir() -> Option<PathBuf> {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && dir.join("initdb").exists() {
            return Some(dir);
        }
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>());
    let debian = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"));
    let mut candidates: Vec<PathBuf> = on_path.chain(debian).collect();
    // Prefer the newest Debian version when several are installed.
    candidates.sort_by(|a, b| b.cmp(a));
    candidates
        .into_iter()
        .find(|d| d.join("initdb").exists() && d.join("pg_ctl").exists())
        // Resolve symlinks (e.g. /usr/local/bin/initdb) to the real directory holding pg_ctl too.
        .map(|d| {
            std::fs::canonicalize(d.join("initdb"))
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf))
                .unwrap_or(d)
        })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn unprivileged_user() -> String {
    let exists = |u: &str| {
        Command::new("id")
            .arg("-u")
            .arg(u)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if exists("postgres") {
        "postgres".to_owned()
    } else {
        "nobody".to_owned()
    }
}

fn chown_to(path: &Path, user: &str) -> Result<(), DevDbError> {
    let status = Command::new("chown")
        .arg(user)
        .arg(path)
        .status()
        .map_err(|source| DevDbError::Io {
            step: "chown of the cluster directory",
            source,
        })?;
    if status.success() {
        Ok(())
    } else {
        Err(DevDbError::Cluster {
            step: "chown of the cluster directory",
            detail: format!("chown {user} {} exited with {status}", path.display()),
        })
    }
}

fn free_port() -> Result<u16, DevDbError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|source| DevDbError::Io {
        step: "finding a free port",
        source,
    })?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|source| DevDbError::Io {
            step: "finding a free port",
            source,
        })
}
