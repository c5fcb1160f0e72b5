//! `steward jobs` and `steward queues`: what an operator does to jobs without writing SQL.

use crate::DbArgs;
use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::builder::{PossibleValuesParser, TypedValueParser};
use comfy_table::{presets, Table};
use std::process::ExitCode;
use steward_queue::admin::{Action, Change, JobFilter, QueueDepth};
use steward_queue::{Job, JobState, Queue};

#[derive(clap::Subcommand, Debug)]
pub enum JobsCommand {
    /// Jobs, newest first.
    List {
        #[command(flatten)]
        db: DbArgs,
        #[command(flatten)]
        filter: FilterArgs,
        /// At most this many.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(i64).range(1..=10_000))]
        limit: i64,
        /// Only jobs with an id below this one (the next page).
        #[arg(long)]
        before: Option<i64>,
        #[arg(long)]
        json: bool,
    },
    /// One job: its attempts, errors and timestamps (archived jobs too).
    Show {
        #[command(flatten)]
        db: DbArgs,
        id: i64,
        #[arg(long)]
        json: bool,
    },
    /// Run jobs again now: scheduled, retryable and finished ones (a job whose attempts are
    /// used up gets one more). Running and waiting jobs are left alone; cancel them first.
    Retry(ChangeArgs),
    /// Cancel jobs that have not finished. A running job's worker stops it at its next
    /// heartbeat.
    Cancel(ChangeArgs),
}

/// Which jobs: any combination narrows down; none means every job.
#[derive(clap::Args, Debug, Default)]
pub struct FilterArgs {
    #[arg(long)]
    queue: Option<String>,
    /// A state; repeat for several.
    #[arg(long = "state", value_name = "STATE", value_parser = state_parser())]
    states: Vec<JobState>,
    #[arg(long)]
    kind: Option<String>,
}

impl FilterArgs {
    fn filter(&self) -> JobFilter {
        JobFilter {
            queue: self.queue.clone(),
            states: self.states.clone(),
            kind: self.kind.clone(),
        }
    }

    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(queue) = &self.queue {
            parts.push(format!("queue {queue}"));
        }
        if !self.states.is_empty() {
            let states: Vec<&str> = self.states.iter().map(|s| s.as_str()).collect();
            parts.push(format!("state {}", states.join(" or ")));
        }
        if let Some(kind) = &self.kind {
            parts.push(format!("kind {kind}"));
        }
        parts.join(", ")
    }
}

/// The job states as clap values, so that `--help` and a wrong value list them.
fn state_parser() -> impl TypedValueParser<Value = JobState> {
    PossibleValuesParser::new(JobState::ALL.map(JobState::as_str)).try_map(|s| s.parse())
}

#[derive(clap::Args, Debug)]
pub struct ChangeArgs {
    #[command(flatten)]
    db: DbArgs,
    /// Job ids; or choose jobs with --queue, --state and --kind instead.
    ids: Vec<i64>,
    #[command(flatten)]
    filter: FilterArgs,
    /// Say what would change, change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Jobs per transaction when choosing by filter.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(i64).range(1..=100_000))]
    batch: i64,
    #[arg(long)]
    json: bool,
}

/// `steward queues`.
#[derive(clap::Args, Debug)]
pub struct QueuesArgs {
    #[command(flatten)]
    db: DbArgs,
    /// Count the jobs table now (reads all of it) instead of showing admin_metadata's counts.
    #[arg(long)]
    live: bool,
    #[arg(long)]
    json: bool,
}

async fn open(db: &DbArgs) -> anyhow::Result<Queue> {
    let target = db.target(&db.load_config(&[])?)?;
    let client = crate::connect(&target, "steward:jobs").await?;
    steward_schema::check_schema(&client, target.schema()).await?;
    let pool = target
        .named("steward:jobs")
        .pool(2)
        .with_context(|| format!("connecting to {target}"))?;
    Ok(Queue::new(pool))
}

pub async fn command(command: JobsCommand) -> anyhow::Result<ExitCode> {
    match command {
        JobsCommand::List {
            db,
            filter,
            limit,
            before,
            json,
        } => {
            let jobs = open(&db)
                .await?
                .list(&filter.filter(), limit, before)
                .await?;
            match json {
                true => print_json(&jobs)?,
                false if jobs.is_empty() => println!("no jobs match"),
                false => print_table(list_table(&jobs, Utc::now()))?,
            }
            Ok(ExitCode::SUCCESS)
        }
        JobsCommand::Show { db, id, json } => {
            let Some(found) = open(&db).await?.find(id).await? else {
                anyhow::bail!("no job {id}, neither in the jobs table nor in the archive");
            };
            match json {
                true => print_json(&serde_json::json!({
                    "job": found.job,
                    "archived_at": found.archived_at,
                }))?,
                false => {
                    crate::write_stdout(show(&found.job, found.archived_at, Utc::now()).as_bytes())?
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        JobsCommand::Retry(args) => change(Action::Retry, args).await,
        JobsCommand::Cancel(args) => change(Action::Cancel, args).await,
    }
}

fn verb(action: Action, dry_run: bool) -> &'static str {
    match (action, dry_run) {
        (Action::Retry, false) => "retried",
        (Action::Retry, true) => "would retry",
        (Action::Cancel, false) => "cancelled",
        (Action::Cancel, true) => "would cancel",
    }
}

async fn change(action: Action, args: ChangeArgs) -> anyhow::Result<ExitCode> {
    let filter = args.filter.filter();
    let by_filter = !filter.is_empty();
    if by_filter && !args.ids.is_empty() {
        anyhow::bail!("name jobs by id or choose them with --queue/--state/--kind, not both");
    }
    if !by_filter && args.ids.is_empty() {
        anyhow::bail!("which jobs? give job ids, or choose them with --queue, --state and --kind");
    }
    if let Some(state) = filter
        .states
        .iter()
        .find(|s| !action.applies_to().contains(s))
    {
        let applies: Vec<&str> = action.applies_to().iter().map(|s| s.as_str()).collect();
        anyhow::bail!(
            "--state {state}: {} applies to {} jobs only",
            match action {
                Action::Retry => "retry",
                Action::Cancel => "cancel",
            },
            applies.join(", ")
        );
    }
    let queue = open(&args.db).await?;
    let verb = verb(action, args.dry_run);
    if by_filter {
        let chosen = args.filter.describe();
        let count = match args.dry_run {
            true => queue.count_matching(&filter, action.applies_to()).await?,
            false => {
                let progress = |n: u64| {
                    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                        eprint!("\r{verb} {n} jobs so far…");
                    }
                };
                let changed = queue
                    .change_matching(&filter, action, args.batch, progress)
                    .await?;
                if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                    eprint!("\r\x1b[K");
                }
                i64::try_from(changed).unwrap_or(i64::MAX)
            }
        };
        match args.json {
            true => print_json(&serde_json::json!({
                "dry_run": args.dry_run, "count": count, "filter": chosen,
            }))?,
            false => println!("{verb} {count} jobs ({chosen})"),
        }
        return Ok(ExitCode::SUCCESS);
    }
    let outcome = queue.change_jobs(action, &args.ids, args.dry_run).await?;
    let missing = outcome
        .iter()
        .any(|(_, change)| *change == Change::NotFound);
    if args.json {
        let jobs: Vec<serde_json::Value> = outcome
            .iter()
            .map(|(id, change)| match change {
                Change::Changed { from } => {
                    serde_json::json!({"id": id, "changed": true, "state": from})
                }
                Change::Unchanged { state } => {
                    serde_json::json!({"id": id, "changed": false, "state": state})
                }
                Change::NotFound => serde_json::json!({"id": id, "changed": false, "state": null}),
            })
            .collect();
        print_json(&serde_json::json!({"dry_run": args.dry_run, "jobs": jobs}))?;
    } else {
        let mut text = String::new();
        for (id, change) in &outcome {
            text += &match change {
                Change::Changed { from } => format!("job {id}: {verb} (was {from})\n"),
                Change::Unchanged { state } => {
                    format!(
                        "job {id}: left {state}: {}\n",
                        why_unchanged(action, *state)
                    )
                }
                Change::NotFound => format!("job {id}: not found (or archived)\n"),
            };
        }
        let changed = outcome
            .iter()
            .filter(|(_, c)| matches!(c, Change::Changed { .. }))
            .count();
        text += &format!("{verb} {changed} of {} jobs\n", outcome.len());
        crate::write_stdout(text.as_bytes())?;
    }
    Ok(match missing {
        true => ExitCode::FAILURE,
        false => ExitCode::SUCCESS,
    })
}

fn why_unchanged(action: Action, state: JobState) -> &'static str {
    match (action, state) {
        (Action::Retry, JobState::Available) => "it is already waiting to run",
        (Action::Retry, JobState::Running | JobState::WaitingExternal) => {
            "a worker holds it; cancel it first"
        }
        (Action::Retry, _) => "another unfinished job holds its unique key",
        (Action::Cancel, _) => "it has already finished",
    }
}

pub async fn queues(args: QueuesArgs) -> anyhow::Result<ExitCode> {
    let depths = open(&args.db).await?.queue_depths(args.live).await?;
    let now = Utc::now();
    if args.json {
        let queues: Vec<serde_json::Value> = depths
            .iter()
            .map(|d| {
                serde_json::json!({
                    "queue": d.queue,
                    "by_state": d.by_state,
                    "counted_at": d.counted_at,
                    "oldest_available_since": d.oldest_available_since,
                    "oldest_available_age_seconds": d.oldest_available_since
                        .map(|t| (now - t).as_seconds_f64().max(0.0)),
                })
            })
            .collect();
        print_json(&queues)?;
        return Ok(ExitCode::SUCCESS);
    }
    if depths.is_empty() {
        match args.live {
            true => println!("no jobs"),
            false => println!(
                "no counts yet: the admin_metadata branch of steward run keeps them; \
                 --live counts the jobs table now"
            ),
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut text = table_text(queues_table(&depths, now));
    if !args.live {
        let oldest = depths.iter().map(|d| d.counted_at).min().unwrap_or(now);
        text += &format!(
            "\ncounts by admin_metadata, the oldest {}; --live counts now\n",
            relative(oldest, now)
        );
    }
    crate::write_stdout(text.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}

fn queues_table(depths: &[QueueDepth], now: DateTime<Utc>) -> Table {
    let mut table = table();
    let mut header = vec!["QUEUE".to_owned()];
    header.extend(JobState::ALL.iter().map(|s| s.as_str().to_uppercase()));
    header.push("OLDEST AVAILABLE".to_owned());
    table.set_header(header);
    for depth in depths {
        let mut row = vec![depth.queue.clone()];
        row.extend(JobState::ALL.iter().map(|s| {
            depth
                .by_state
                .get(s.as_str())
                .copied()
                .unwrap_or(0)
                .to_string()
        }));
        row.push(
            depth
                .oldest_available_since
                .map(|t| format!("due {}", relative(t, now)))
                .unwrap_or_else(|| "-".to_owned()),
        );
        table.add_row(row);
    }
    table
}

fn list_table(jobs: &[Job], now: DateTime<Utc>) -> Table {
    let mut table = table();
    table.set_header([
        "ID",
        "QUEUE",
        "KIND",
        "STATE",
        "ATTEMPT",
        "PRIORITY",
        "WHEN",
        "CREATED",
        "LAST ERROR",
    ]);
    for job in jobs {
        table.add_row([
            job.id.to_string(),
            job.queue.clone(),
            job.kind.clone(),
            job.state.to_string(),
            format!("{}/{}", job.attempt, job.max_attempts),
            job.priority.to_string(),
            when(job, now),
            relative(job.created_at, now),
            last_error(job).map(|e| clip(&e, 60)).unwrap_or_default(),
        ]);
    }
    table
}

/// The time that matters for the job's state.
fn when(job: &Job, now: DateTime<Utc>) -> String {
    let at = |label: &str, t: Option<DateTime<Utc>>| match t {
        Some(t) => format!("{label} {}", relative(t, now)),
        None => "-".to_owned(),
    };
    match job.state {
        JobState::Scheduled | JobState::Retryable | JobState::Available => {
            at("due", Some(job.run_at))
        }
        JobState::Running => at("heartbeat", job.heartbeat_at.or(job.attempted_at)),
        JobState::WaitingExternal => at("times out", job.callback_timeout_at),
        JobState::Completed | JobState::Failed | JobState::Cancelled => {
            at("finished", job.finalized_at)
        }
    }
}

fn last_error(job: &Job) -> Option<String> {
    let entry = job.error_entries().last()?;
    let text = entry
        .get("error")
        .and_then(|e| e.as_str())
        .or_else(|| entry.get("reason").and_then(|r| r.as_str()))?;
    Some(text.lines().next().unwrap_or_default().to_owned())
}

fn show(job: &Job, archived_at: Option<DateTime<Utc>>, now: DateTime<Utc>) -> String {
    let mut text = String::new();
    let mut line = |key: &str, value: String| text += &format!("{key:<20} {value}\n");
    line("id", job.id.to_string());
    line("queue", job.queue.clone());
    line("kind", job.kind.clone());
    line("state", job.state.to_string());
    line(
        "attempt",
        format!("{} of {}", job.attempt, job.max_attempts),
    );
    line(
        "priority",
        match job.priority == job.original_priority {
            true => job.priority.to_string(),
            false => format!("{} (enqueued at {})", job.priority, job.original_priority),
        },
    );
    let times = [
        ("created", Some(job.created_at)),
        ("due", Some(job.run_at)),
        ("attempted", job.attempted_at),
        ("heartbeat", job.heartbeat_at),
        ("deadline", job.deadline_at),
        ("callback times out", job.callback_timeout_at),
        ("finished", job.finalized_at),
        ("archived", archived_at),
    ];
    for (key, at) in times {
        if let Some(at) = at {
            line(
                key,
                format!(
                    "{} ({})",
                    at.format("%Y-%m-%d %H:%M:%S%.3f UTC"),
                    relative(at, now)
                ),
            );
        }
    }
    if let Some(callback) = job.callback_id {
        line("callback id", callback.to_string());
    }
    if let Some(key) = &job.unique_key {
        line("unique key", key.clone());
    }
    line("args", job.args.to_string());
    let errors = job.error_entries();
    text += &format!("errors ({})\n", errors.len());
    for entry in errors {
        let field = |k: &str| {
            entry.get(k).map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| v.to_string())
            })
        };
        text += &format!(
            "  attempt {} at {}: {}: {}\n",
            field("attempt").unwrap_or_default(),
            field("at").unwrap_or_default(),
            field("reason").unwrap_or_else(|| "error".to_owned()),
            field("error").unwrap_or_default().replace('\n', "\n    "),
        );
    }
    text
}

/// "3m 12s ago" or "in 5s", to the second (to the minute beyond an hour).
fn relative(at: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let delta = now - at;
    let secs = delta.num_seconds().unsigned_abs();
    let secs = if secs >= 3600 { secs - secs % 60 } else { secs };
    if secs == 0 {
        return "now".to_owned();
    }
    let span = humantime::format_duration(std::time::Duration::from_secs(secs));
    match delta >= chrono::Duration::zero() {
        true => format!("{span} ago"),
        false => format!("in {span}"),
    }
}

fn clip(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

fn table() -> Table {
    let mut table = Table::new();
    table.load_preset(presets::NOTHING);
    table
}

fn table_text(table: Table) -> String {
    // The preset pads each line with a leading space; tables read left-aligned.
    let mut text: String = table
        .lines()
        .map(|line| {
            let line = line.trim_end();
            line.strip_prefix(' ').unwrap_or(line).to_owned() + "\n"
        })
        .collect();
    if text.is_empty() {
        text.push('\n');
    }
    text
}

fn print_table(table: Table) -> std::io::Result<()> {
    crate::write_stdout(table_text(table).as_bytes())
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    Ok(crate::write_stdout(text.as_bytes())?)
}
