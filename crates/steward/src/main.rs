//! `steward`: the maintenance leader for a Postgres job queue.

mod config;
mod fleet;
mod jobs;
mod run;
mod status;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use steward_connection::{SchemaName, Target};

// Every environment variable's value is hidden in --help: clap shows an unset one as
// `[env: NAME=]`, and a set one could hold a secret.
#[derive(Parser, Debug)]
#[command(
    name = "steward",
    version,
    about = "Maintenance leader for Postgres-backed job queues"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the queue lives: flags and environment variables, then the configuration file's
/// `database_url` and `schema`, for every command.
#[derive(clap::Args, Debug, Clone)]
pub struct DbArgs {
    /// PostgreSQL URL, e.g. postgres://steward@db:5432/app (overrides `database_url` in the
    /// configuration file).
    // hide_env_values: the URL may hold a password, which --help must not print.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Schema holding Steward's tables (overrides `schema` in the configuration file; default
    /// steward).
    #[arg(long, env = "STEWARD_SCHEMA", hide_env_values = true)]
    schema: Option<String>,
    /// TOML configuration file.
    #[arg(long, env = "STEWARD_CONFIG", hide_env_values = true)]
    config: Option<std::path::PathBuf>,
}

impl DbArgs {
    /// The configuration file (if any) with `overrides` applied, checked.
    pub fn load_config(&self, overrides: &[String]) -> Result<config::Config, config::ConfigError> {
        config::load(self.config.as_deref(), overrides)
    }

    /// Whether a schema was named (flag, environment or configuration file).
    pub fn names_a_schema(&self, config: &config::Config) -> bool {
        self.schema.is_some() || config.schema.is_some()
    }

    /// The database URL: flags and environment first, then `config`.
    pub fn database_url(&self, config: &config::Config) -> Option<String> {
        self.database_url.clone().or(config.database_url.clone())
    }

    /// The queue's target: flags and environment first, then `config`.
    pub fn target(&self, config: &config::Config) -> anyhow::Result<Target> {
        let database_url = self
            .database_url
            .clone()
            .or(config.database_url.clone())
            .context(
                "no database: set DATABASE_URL, --database-url or database_url in the config file",
            )?;
        let schema: SchemaName = self
            .schema
            .clone()
            .or(config.schema.clone())
            .unwrap_or_else(|| SchemaName::DEFAULT.to_owned())
            .parse()?;
        Ok(Target::new(&database_url, schema)?)
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Probe a running steward's HTTP endpoint (a container's health check): exit 0 when it
    /// answers 200, 1 otherwise.
    Health {
        /// The address steward run serves on (its --metrics-addr); 0.0.0.0 means this host.
        #[arg(
            long,
            env = "STEWARD_METRICS_ADDR",
            hide_env_values = true,
            default_value = "127.0.0.1:9464"
        )]
        addr: std::net::SocketAddr,
        /// /healthz (the process and its loops are alive) or /readyz (the database answers).
        #[arg(long, default_value = "/healthz")]
        path: String,
    },
    /// Print shell completions (bash, zsh, fish, elvish, powershell) to stdout.
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff) to stdout: `steward man > steward.1`.
    Man,
    /// Create the schema and apply pending migrations (idempotent, safe to run concurrently).
    Migrate {
        #[command(flatten)]
        db: DbArgs,
    },
    /// Manage the least-privilege role the maintenance process runs as.
    Role {
        #[command(subcommand)]
        command: RoleCommand,
    },
    /// List, show, retry and cancel jobs.
    Jobs {
        #[command(subcommand)]
        command: jobs::JobsCommand,
    },
    /// Each queue's jobs by state and its oldest available job.
    Queues(jobs::QueuesArgs),
    /// Stand for election and, when elected, run the maintenance branches until SIGTERM/SIGINT.
    Run(run::RunArgs),
    /// Who leads, and per branch: last run, duration, start delay, overrun state, last error.
    /// With no schema named and several queues in the database: one line per queue. Exit code:
    /// 0 healthy; 1 unreachable or not migrated; 2 no leader, a leader making no progress, or an
    /// SLO branch delayed (in any queue).
    Status {
        #[command(flatten)]
        db: DbArgs,
        /// Machine-readable output (errors too).
        #[arg(long)]
        json: bool,
        /// Read again every two seconds, in place.
        #[arg(long)]
        watch: bool,
    },
}

#[derive(Subcommand, Debug)]
enum RoleCommand {
    /// Create the maintenance role (NOLOGIN) if missing and grant it exactly what the branches need.
    Create {
        #[command(flatten)]
        db: DbArgs,
        /// Name of the role to create.
        #[arg(long, default_value = "steward_maintenance")]
        role: String,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, Default)]
enum LogFormat {
    #[default]
    Human,
    Json,
}

impl From<LogFormat> for steward_telemetry::LogFormat {
    fn from(format: LogFormat) -> Self {
        match format {
            LogFormat::Human => steward_telemetry::LogFormat::Human,
            LogFormat::Json => steward_telemetry::LogFormat::Json,
        }
    }
}

fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_level.into());
    // Colours only for a person at a terminal: log files and collectors get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run_command(Cli::parse()).await {
        Ok(code) => code,
        Err(error) if error.is::<run::Logged>() => std::process::ExitCode::FAILURE,
        Err(error) => {
            // The message and its causes, never a backtrace: these are an operator's errors
            // (a bad value, an unreachable database), not the program's.
            eprintln!("Error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run_command(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    // `run` sets up its own telemetry (metrics, traces, logs).
    match cli.command {
        Command::Run(_) => {}
        // The commands print what they did; the driver's and the migration library's chatter
        // (server NOTICEs, "applying migration") stays out unless RUST_LOG asks for it.
        _ => init_logging(
            LogFormat::Human,
            "info,tokio_postgres=warn,refinery_core=warn,refinery=warn",
        ),
    }
    match cli.command {
        Command::Health { addr, path } => return Ok(health(addr, &path).await),
        Command::Completions { shell } => {
            let mut text = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "steward", &mut text);
            write_stdout(&text)?;
        }
        Command::Man => {
            let mut text = Vec::new();
            clap_mangen::Man::new(Cli::command()).render(&mut text)?;
            write_stdout(&text)?;
        }
        Command::Jobs { command } => return jobs::command(command).await,
        Command::Queues(args) => return jobs::queues(args).await,
        Command::Run(args) => run::run(args).await?,
        Command::Migrate { db } => {
            let target = db.target(&db.load_config(&[])?)?;
            let mut client = connect(&target, "steward-migrate").await?;
            let schema = target.schema();
            let report = steward_schema::migrate(&mut client, schema).await?;
            if report.applied.is_empty() {
                println!(
                    "schema {schema} is up to date at version {}",
                    report.version
                );
            } else {
                println!(
                    "schema {schema} migrated to version {}: applied {}",
                    report.version,
                    report.applied.join(", ")
                );
            }
        }
        Command::Role {
            command: RoleCommand::Create { db, role },
        } => {
            let target = db.target(&db.load_config(&[])?)?;
            let client = connect(&target, "steward-role").await?;
            let schema = target.schema();
            steward_schema::check_schema(&client, schema).await?;
            steward_schema::create_maintenance_role(&client, schema, &role).await?;
            println!(
                "role {role} holds the maintenance privileges on schema {schema}; give it a login \
                 with `ALTER ROLE {role} LOGIN PASSWORD '...'` or `GRANT {role} TO <login role>`"
            );
        }
        Command::Status { db, json, watch } => {
            let read = || async {
                let config = db.load_config(&[])?;
                let target = db.target(&config)?;
                let client = connect(&target, "steward:status").await?;
                // No schema named and several queues in the database: a line for each.
                if !db.names_a_schema(&config) {
                    let queues = steward_schema::discover_queues(&client).await?;
                    if queues.len() > 1 {
                        let mut all = Vec::new();
                        for schema in queues {
                            let status = queue_status(&client, &schema).await;
                            all.push((schema.to_string(), status.map_err(|e| format!("{e:#}"))));
                        }
                        return Ok(status::Reading::Queues(all));
                    }
                }
                Ok(status::Reading::Queue(Box::new(
                    queue_status(&client, target.schema()).await?,
                )))
            };
            return Ok(status::command(read, json, watch).await);
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// The status of the queue in `schema`, read over `client` with its search path set there.
async fn queue_status(
    client: &tokio_postgres::Client,
    schema: &SchemaName,
) -> anyhow::Result<steward_leader::status::Status> {
    // A validated schema name is a plain identifier (SchemaName), safe to splice.
    client
        .batch_execute(&format!("SET search_path = {schema}"))
        .await?;
    steward_schema::check_schema(client, schema).await?;
    Ok(steward_leader::status::read(client, schema).await?)
}

/// Writes `bytes` to stdout; a reader that went away (`| head`) is not an error.
fn write_stdout(bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// GET `path` from a running steward (plain HTTP, loopback for an unspecified address).
async fn health(addr: std::net::SocketAddr, path: &str) -> std::process::ExitCode {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = if addr.ip().is_unspecified() {
        std::net::SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
    } else {
        addr
    };
    let probe = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let failed = |why: String| {
        eprintln!("{addr}{path}: {why}");
        std::process::ExitCode::FAILURE
    };
    match tokio::time::timeout(std::time::Duration::from_secs(3), probe).await {
        Ok(Ok(response)) => {
            let status = response.lines().next().unwrap_or_default();
            if status.split_whitespace().nth(1) == Some("200") {
                std::process::ExitCode::SUCCESS
            } else {
                let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
                failed(format!("{status} {body}"))
            }
        }
        Ok(Err(error)) => failed(error.to_string()),
        Err(_) => failed("no answer within 3s".into()),
    }
}

async fn connect(
    target: &Target,
    application_name: &str,
) -> anyhow::Result<tokio_postgres::Client> {
    target
        .named(application_name)
        .connect()
        .await
        .with_context(|| format!("connecting to {target}"))
}
