//! What the chaos suite installs in the database and checks against it: a trigger logging
//! every job transition, commit-time records of Steward's transactions, the cron schedule that
//! fires into the chaos queue, and [`verify`], which proves from all of it (and the
//! workload's books) what happened to every job.

use crate::settings::{KIND, MAX_ATTEMPTS, QUEUE};
use std::collections::{BTreeMap, HashMap};
use steward_workload::behaviour::TOKEN;
use steward_workload::Ledger;
use tokio_postgres::Client;

pub const CRON_KIND: &str = "chaos.cron";
pub const CRON_SCHEDULE: &str = "chaos-every-second";

/// Records every transition of every job (insert, state change, new run, new error entry, and
/// any other write to a job that is not running, such as a second promotion of an available
/// job) with the session's application_name. Rolled back with the transaction that made it,
/// so it shows exactly the committed history; `seq` orders the writes of one job, which its row
/// lock serializes.
pub const TRANSITIONS_AUDIT: &str = "
CREATE TABLE chaos_transitions (
    seq        bigserial   PRIMARY KEY,
    job_id     bigint      NOT NULL,
    old_state  text,
    new_state  text        NOT NULL,
    attempt    integer     NOT NULL,
    run_lease  bigint      NOT NULL,
    run_at     timestamptz NOT NULL,
    app        text        NOT NULL,
    at         timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX ON chaos_transitions (job_id, seq);
CREATE FUNCTION chaos_log_transition() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO chaos_transitions (job_id, old_state, new_state, attempt, run_lease, run_at, app)
        VALUES (NEW.id, NULL, NEW.state::text, NEW.attempt, NEW.run_lease, NEW.run_at,
                current_setting('application_name'));
    ELSIF OLD.state IS DISTINCT FROM NEW.state
       OR OLD.run_lease IS DISTINCT FROM NEW.run_lease
       OR OLD.errors IS DISTINCT FROM NEW.errors
       OR (NEW.state <> 'running' AND OLD.priority = NEW.priority) THEN
        INSERT INTO chaos_transitions (job_id, old_state, new_state, attempt, run_lease, run_at, app)
        VALUES (NEW.id, OLD.state::text, NEW.state::text, NEW.attempt, NEW.run_lease, NEW.run_at,
                current_setting('application_name'));
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER chaos_transitions AFTER INSERT OR UPDATE ON jobs
    FOR EACH ROW EXECUTE FUNCTION chaos_log_transition();";

/// Commit-time records (deferred constraint triggers run inside COMMIT, and vanish with a
/// transaction that does not commit): `chaos_commits` gets one row per committed transaction of
/// a Steward session (application_name `steward:<instance>:<role>`) that wrote any of Steward's
/// tables, and `chaos_terms` one row per new epoch with a snapshot taken inside the committing
/// START_TERM transaction. A transaction of the old term absent from that snapshot's committed
/// set committed after the new term was already committing.
pub const COMMITS_AUDIT: &str = "
CREATE TABLE chaos_commits (
    xid  xid8        PRIMARY KEY,
    app  text        NOT NULL,
    tbl  text        NOT NULL,
    at   timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE FUNCTION chaos_note_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('application_name') LIKE 'steward:%' THEN
        INSERT INTO chaos_commits (xid, app, tbl)
        VALUES (pg_current_xact_id(), current_setting('application_name'), TG_TABLE_NAME)
        ON CONFLICT (xid) DO NOTHING;
    END IF;
    RETURN NULL;
END $$;
CREATE TABLE chaos_terms (
    epoch    bigint      PRIMARY KEY,
    app      text        NOT NULL,
    snap     pg_snapshot NOT NULL,
    at       timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE FUNCTION chaos_note_term() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.epoch IS DISTINCT FROM OLD.epoch THEN
        INSERT INTO chaos_terms (epoch, app, snap)
        VALUES (NEW.epoch, current_setting('application_name'), pg_current_snapshot());
    END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER chaos_term AFTER UPDATE ON leader
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION chaos_note_term();";

/// The tables Steward writes, each watched by `chaos_note_commit`.
pub const STEWARD_TABLES: [&str; 10] = [
    "jobs",
    "leader",
    "leader_terms",
    "branch_health",
    "cron_fires",
    "cron_schedules",
    "queue_counts",
    "dirty_queues",
    "queue_stats",
    "job_archive",
];

pub async fn install_transitions_audit(client: &Client) {
    client
        .batch_execute(TRANSITIONS_AUDIT)
        .await
        .expect("installing the transitions audit");
}

pub async fn install_commits_audit(client: &Client) {
    client
        .batch_execute(COMMITS_AUDIT)
        .await
        .expect("installing the commits audit");
    for table in STEWARD_TABLES {
        // job_archive is partitioned: row triggers there are inherited by the partitions.
        client
            .batch_execute(&format!(
                "CREATE CONSTRAINT TRIGGER chaos_commit AFTER INSERT OR UPDATE OR DELETE ON {table}
                 DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION chaos_note_commit()"
            ))
            .await
            .unwrap_or_else(|e| panic!("commit trigger on {table}: {e}"));
    }
}

/// A table-managed cron schedule firing every second into the chaos queue.
pub async fn add_cron_schedule(client: &Client) {
    client
        .execute(
            "INSERT INTO cron_schedules (name, expression, queue, kind, max_attempts, source)
             VALUES ($1, '* * * * * *', $2, $3, $4, 'table')",
            &[&CRON_SCHEDULE, &QUEUE, &CRON_KIND, &MAX_ATTEMPTS],
        )
        .await
        .expect("adding the cron schedule");
}

pub async fn disable_cron(client: &Client) {
    client
        .execute(
            "UPDATE cron_schedules SET enabled = false WHERE name = $1",
            &[&CRON_SCHEDULE],
        )
        .await
        .expect("disabling the cron schedule");
}

/// What [`verify`] found, for the scenario's report.
#[derive(Debug, Default)]
pub struct Verified {
    pub jobs: usize,
    pub states: BTreeMap<String, usize>,
    /// Error entries per reason (`error`, `heartbeat_stale`, `deadline_expired`, ...).
    pub entries: BTreeMap<String, usize>,
    /// Rescues of runs no worker ever received (claimed as the connection died).
    pub orphan_rescues: usize,
    pub promotions: usize,
    pub transitions: usize,
    pub cron_fires: usize,
    pub archived: usize,
}

impl Verified {
    pub fn rescues(&self) -> BTreeMap<String, usize> {
        self.entries
            .iter()
            .filter(|(reason, _)| {
                ["heartbeat_stale", "deadline_expired", "callback_timeout"]
                    .contains(&reason.as_str())
            })
            .map(|(r, n)| (r.clone(), *n))
            .collect()
    }
}

impl std::fmt::Display for Verified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} jobs checked ({} archived) {:?}; {} audited transitions, {} promotions; rescues {:?} ({} of runs no worker received); other error entries {:?}; {} cron fires",
            self.jobs,
            self.archived,
            self.states,
            self.transitions,
            self.promotions,
            self.rescues(),
            self.orphan_rescues,
            self.entries
                .iter()
                .filter(|(r, _)| !self.rescues().contains_key(*r))
                .collect::<BTreeMap<_, _>>(),
            self.cron_fires
        )
    }
}

struct JobRow {
    id: i64,
    kind: String,
    state: String,
    attempt: i32,
    max_attempts: i32,
    args: serde_json::Value,
    errors: serde_json::Value,
}

/// One audited transition: (old state, new state, attempt, run lease).
type Step = (Option<String>, String, i32, i64);

/// Allowed state changes of one job (`None`: the insert).
fn allowed(old: Option<&str>, new: &str) -> bool {
    matches!(
        (old, new),
        (None, "scheduled" | "available")
            | (Some("scheduled" | "retryable"), "available" | "cancelled")
            | (Some("available"), "running" | "cancelled")
            | (
                Some("running"),
                "completed" | "retryable" | "failed" | "waiting_external" | "cancelled"
            )
            | (
                Some("waiting_external"),
                "completed" | "retryable" | "failed" | "cancelled"
            )
    )
}

fn terminal(state: &str) -> bool {
    matches!(state, "completed" | "failed" | "cancelled")
}

/// Every job of the chaos queue (in `jobs` or archived) against the audit and the workload's
/// books. Panics listing the first problems. Checks:
/// - every job is finished; no job id appears twice (jobs and archive together);
/// - every acknowledged enqueue exists exactly once, and every job was enqueued (or is a fire);
/// - its audited history is a valid path (insert, promotions, claims, finishes) ending in its
///   one and only terminal transition: no double promotion, claim, rescue or retry;
/// - its error entries are one per failed attempt: completed = attempts 1..n-1,
///   failed = 1..n with n = max_attempts, cancelled = a subset of 1..n;
/// - each rescue is justified: `heartbeat_stale` only for a run its worker gave up (a crash,
///   heartbeats failing for the staleness, an outcome it could not write) or that no worker
///   received, `deadline_expired` for a run that overran its timeout (or was given up),
///   `callback_timeout` for a callback left unanswered (or a run given up while parking);
/// - an acknowledged completion is never lost or doubled, an acknowledged final failure holds;
/// - no live worker lost a run it had no reason to lose;
/// - each cron fire made exactly one job, due at the fire time, and fires are one second apart.
pub async fn verify(client: &Client, ledger: &Ledger) -> Verified {
    let mut problems: Vec<String> = Vec::new();
    let mut out = Verified::default();
    let rows = client
        .query(
            "SELECT id, kind, state::text, attempt, max_attempts, args, errors, false
             FROM jobs WHERE queue = $1
             UNION ALL
             SELECT id, kind, state::text, attempt, max_attempts, args, errors, true
             FROM job_archive WHERE queue = $1",
            &[&QUEUE],
        )
        .await
        .expect("reading the jobs");
    let mut jobs: BTreeMap<i64, JobRow> = BTreeMap::new();
    for row in &rows {
        let job = JobRow {
            id: row.get(0),
            kind: row.get(1),
            state: row.get(2),
            attempt: row.get(3),
            max_attempts: row.get(4),
            args: row.get(5),
            errors: row.get(6),
        };
        if row.get::<_, bool>(7) {
            out.archived += 1;
        }
        if jobs.insert(job.id, job).is_some() {
            problems.push(format!(
                "job {} appears twice (jobs and archive, or archived twice)",
                row.get::<_, i64>(0)
            ));
        }
    }
    out.jobs = jobs.len();

    let transitions = client
        .query(
            "SELECT job_id, old_state, new_state, attempt, run_lease, run_at
             FROM chaos_transitions ORDER BY job_id, seq",
            &[],
        )
        .await
        .expect("reading the transitions audit");
    let fires = client
        .query(
            "SELECT fire_at, job_id FROM cron_fires WHERE schedule_name = $1 ORDER BY fire_at",
            &[&CRON_SCHEDULE],
        )
        .await
        .expect("reading cron fires");
    // Read after the queries: the lock is not held across an await.
    let books = ledger.books();
    // Enqueues: nothing lost, nothing made up, nothing doubled.
    let mut tokens: HashMap<u64, i64> = HashMap::new();
    for job in jobs.values().filter(|j| j.kind == KIND) {
        match job.args.get(TOKEN).and_then(|t| t.as_u64()) {
            Some(token) => {
                if let Some(other) = tokens.insert(token, job.id) {
                    problems.push(format!(
                        "enqueue token {token} became two jobs: {other} and {}",
                        job.id
                    ));
                }
                if !books.acked.contains(&token) && !books.unacked.contains(&token) {
                    problems.push(format!("job {} has token {token} nobody enqueued", job.id));
                }
            }
            None => problems.push(format!("job {} has no token", job.id)),
        }
    }
    let missing: Vec<&u64> = books
        .acked
        .iter()
        .filter(|t| !tokens.contains_key(t))
        .collect();
    if !missing.is_empty() {
        problems.push(format!(
            "{} acknowledged enqueues have no job, e.g. tokens {:?}",
            missing.len(),
            missing.iter().take(5).collect::<Vec<_>>()
        ));
    }

    // Audited histories.
    out.transitions = transitions.len();
    let mut history: BTreeMap<i64, Vec<Step>> = BTreeMap::new();
    // Each job's due time as enqueued (retries move run_at).
    let mut enqueued_due: HashMap<i64, chrono::DateTime<chrono::Utc>> = HashMap::new();
    for t in &transitions {
        if t.get::<_, Option<String>>(1).is_none() {
            enqueued_due.insert(t.get(0), t.get(5));
        }
        history
            .entry(t.get(0))
            .or_default()
            .push((t.get(1), t.get(2), t.get(3), t.get(4)));
    }

    for job in jobs.values() {
        let id = job.id;
        *out.states.entry(job.state.clone()).or_default() += 1;
        if !terminal(&job.state) {
            problems.push(format!("job {id} is still {}", job.state));
        }
        // History.
        let steps = history.get(&id).map(Vec::as_slice).unwrap_or_default();
        if steps.is_empty() {
            problems.push(format!("job {id} has no audited history"));
        }
        let mut previous: Option<&Step> = None;
        let mut terminals = 0;
        for step in steps {
            let (old, new, attempt, lease) = step;
            if !allowed(old.as_deref(), new) {
                problems.push(format!(
                    "job {id}: forbidden transition {old:?} -> {new} (attempt {attempt}); history {steps:?}"
                ));
            }
            if let Some(prev) = previous {
                if old.as_deref() != Some(prev.1.as_str()) {
                    problems.push(format!(
                        "job {id}: transition from {old:?} after reaching {}; history {steps:?}",
                        prev.1
                    ));
                }
                if new == "running" && (*attempt != prev.2 + 1 || *lease <= prev.3) {
                    problems.push(format!(
                        "job {id}: claim to attempt {attempt} lease {lease} after attempt {} lease {}",
                        prev.2, prev.3
                    ));
                }
            }
            if matches!(old.as_deref(), Some("scheduled" | "retryable")) && new == "available" {
                out.promotions += 1;
            }
            if terminal(new) {
                terminals += 1;
            }
            previous = Some(step);
        }
        if terminals != 1 || previous.is_some_and(|p| p.1 != job.state) {
            problems.push(format!(
                "job {id} ({}): {terminals} terminal transitions; history {steps:?}",
                job.state
            ));
        }

        // Error entries: one per failed attempt.
        let entries = job.errors.as_array().cloned().unwrap_or_default();
        let mut attempts: Vec<i32> = Vec::new();
        for entry in &entries {
            let attempt = entry["attempt"].as_i64().unwrap_or(-1) as i32;
            let reason = entry["reason"].as_str().unwrap_or("?").to_owned();
            attempts.push(attempt);
            let run = (id, attempt);
            let justified = match reason.as_str() {
                "heartbeat_stale" => {
                    books.abandoned.contains(&run) || !books.claimed.contains(&run)
                }
                "deadline_expired" => {
                    books.overran.contains(&run)
                        || books.abandoned.contains(&run)
                        || !books.claimed.contains(&run)
                }
                // A worker that crashed while parking never passed the callback on.
                "callback_timeout" => {
                    books.unanswered.contains(&run)
                        || books.abandoned.contains(&run)
                        || !books.claimed.contains(&run)
                }
                _ => true,
            };
            if !justified {
                problems.push(format!(
                    "job {id}: {reason} rescue of run {run:?}, which a live worker held ({})",
                    job.args
                ));
            }
            if reason != "error"
                && reason != "callback_failed"
                && job.kind == KIND
                && !books.claimed.contains(&run)
            {
                out.orphan_rescues += 1;
            }
            *out.entries.entry(reason).or_default() += 1;
        }
        let mut distinct = attempts.clone();
        distinct.sort_unstable();
        distinct.dedup();
        if distinct.len() != attempts.len() {
            problems.push(format!(
                "job {id}: two error entries for one attempt: {attempts:?}"
            ));
        }
        let upto = |n: i32| (1..=n).collect::<Vec<i32>>();
        let consistent = match job.state.as_str() {
            "completed" => distinct == upto(job.attempt - 1),
            "failed" => distinct == upto(job.attempt) && job.attempt == job.max_attempts,
            "cancelled" => distinct.iter().all(|a| (1..=job.attempt).contains(a)),
            _ => true,
        };
        if !consistent {
            problems.push(format!(
                "job {id} {} at attempt {} of {} has error entries for attempts {attempts:?}",
                job.state, job.attempt, job.max_attempts
            ));
        }
    }

    // The workers' acknowledgements.
    for (id, n) in &books.completions {
        let state = jobs.get(id).map(|j| j.state.as_str());
        if *n != 1 || state != Some("completed") {
            problems.push(format!(
                "job {id}: {n} acknowledged completions, state {state:?}"
            ));
        }
    }
    for id in &books.final_failures {
        let state = jobs.get(id).map(|j| j.state.as_str());
        if state != Some("failed") {
            problems.push(format!("job {id}: acknowledged as failed, state {state:?}"));
        }
    }
    for what in &books.unexpected {
        problems.push(what.clone());
    }

    // Cron: one job per fire, due at the fire, fires one second apart.
    out.cron_fires = fires.len();
    let cron_jobs: HashMap<i64, &JobRow> = jobs
        .values()
        .filter(|j| j.kind == CRON_KIND)
        .map(|j| (j.id, j))
        .collect();
    if cron_jobs.len() != fires.len() {
        problems.push(format!(
            "{} cron fires but {} cron jobs",
            fires.len(),
            cron_jobs.len()
        ));
    }
    let mut last: Option<chrono::DateTime<chrono::Utc>> = None;
    for fire in &fires {
        let (at, job_id): (chrono::DateTime<chrono::Utc>, i64) = (fire.get(0), fire.get(1));
        match cron_jobs.get(&job_id) {
            Some(_) if enqueued_due.get(&job_id) == Some(&at) => {}
            Some(_) => problems.push(format!(
                "cron fire {at} made job {job_id} due at {:?}",
                enqueued_due.get(&job_id)
            )),
            None => problems.push(format!("cron fire {at}: job {job_id} is missing")),
        }
        if let Some(last) = last {
            if at - last != chrono::Duration::seconds(1) {
                problems.push(format!(
                    "cron fires {last} and {at} are not one second apart"
                ));
            }
        }
        last = Some(at);
    }

    if !problems.is_empty() {
        let total = problems.len();
        problems.truncate(25);
        panic!(
            "{total} problems found ({out}); workload counts {:?}:\n  {}",
            books.counts,
            problems.join("\n  ")
        );
    }
    out
}
