//! `cron_sync`: cron schedules become jobs, each fire exactly once.
//!
//! Schedules come from the config file (upserted into `cron_schedules` with source 'config'
//! on every pass) or are managed directly in that table (source 'table', never touched here).
//! Each pass enqueues every fire due up to `now + lookahead` as a scheduled job whose `run_at`
//! is the fire time, so that `promote_scheduled`, not this branch's interval, decides how
//! punctual a fire is. A fire is recorded in `cron_fires` in the same statement that inserts
//! its job; that table's primary key is what makes a fire enqueue once, however many instances
//! run the branch. Schedules that cannot be used (bad expression, unknown time zone...) are
//! skipped and reported; they never stop the others.

use crate::config::branch_settings;
use crate::{
    check_batch, Branch, BranchContext, BranchError, Class, InvalidConfig, Observation, Outcome,
};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::errors::CronError;
use croner::Cron;
use serde::Deserialize;
use std::collections::HashSet;
use std::str::FromStr;
use std::time::Duration;
use tokio_postgres::Row;

/// Upserts the config file's schedules (parallel arrays, sorted by name so that concurrent
/// passes lock rows in the same order). Rows that are identical, or that belong to the table
/// (source 'table'), are filtered out before the insert so an unchanged config writes and
/// locks nothing; the `DO UPDATE ... WHERE` re-checks both in case of a race. Key: the
/// primary key of `cron_schedules` (name). `updated_at` moves only on a real change, since it
/// bounds how far back a schedule catches up.
pub const UPSERT_CONFIG_SCHEDULES: &str = "
INSERT INTO cron_schedules AS s (name, expression, timezone, queue, kind, args, priority, max_attempts,
                                 enabled, source, updated_at)
SELECT c.n, c.e, c.tz, c.q, c.k, c.a, c.p, c.m, c.en, 'config', now()
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::jsonb[], $7::int2[],
            $8::int4[], $9::bool[]) WITH ORDINALITY AS c(n, e, tz, q, k, a, p, m, en, ord)
WHERE NOT EXISTS (
    SELECT 1 FROM cron_schedules o
    WHERE o.name = c.n
      AND (o.source = 'table'
           OR (o.expression, o.timezone, o.queue, o.kind, o.args, o.priority, o.max_attempts, o.enabled)
              IS NOT DISTINCT FROM (c.e, c.tz, c.q, c.k, c.a, c.p, c.m, c.en)))
ORDER BY c.ord
ON CONFLICT (name) DO UPDATE
SET expression = EXCLUDED.expression, timezone = EXCLUDED.timezone, queue = EXCLUDED.queue,
    kind = EXCLUDED.kind, args = EXCLUDED.args, priority = EXCLUDED.priority,
    max_attempts = EXCLUDED.max_attempts, enabled = EXCLUDED.enabled, updated_at = now()
WHERE s.source = 'config'
  AND (s.expression, s.timezone, s.queue, s.kind, s.args, s.priority, s.max_attempts, s.enabled)
      IS DISTINCT FROM (EXCLUDED.expression, EXCLUDED.timezone, EXCLUDED.queue, EXCLUDED.kind,
                        EXCLUDED.args, EXCLUDED.priority, EXCLUDED.max_attempts, EXCLUDED.enabled)";

/// Deletes config-sourced schedules the config file no longer names; table-sourced rows are
/// never touched. A sequential scan: the table holds one row per schedule. Their `cron_fires`
/// rows stay until pruned, so a schedule put back does not fire twice.
pub const DELETE_REMOVED_CONFIG_SCHEDULES: &str = "
DELETE FROM cron_schedules WHERE source = 'config' AND NOT (name = ANY($1::text[]))";

/// Every schedule (the table is small; disabled ones are read to spot config names that a
/// table row holds), each with the start of its fire window: the latest of now − catch_up
/// ($1 seconds), its last recorded fire, and its `updated_at` (a new or changed schedule does
/// not backfill fires from before it existed); and the window's end, now + lookahead ($2
/// seconds). Last fire per schedule: the primary key of `cron_fires` (schedule_name, fire_at),
/// one backward index probe per schedule.
pub const READ_SCHEDULES: &str = "
SELECT s.name, s.expression, s.timezone, s.queue, s.kind, s.args, s.priority, s.max_attempts,
       s.enabled, s.source,
       greatest(now() - $1::float8 * interval '1 second', s.updated_at,
                (SELECT max(f.fire_at) FROM cron_fires f WHERE f.schedule_name = s.name)) AS after,
       now() + $2::float8 * interval '1 second' AS until
FROM cron_schedules s
ORDER BY s.name";

/// Records the fires of one schedule ($1: name, $2: fire times ascending) and inserts a job for
/// each fire that was not recorded before, in one statement. The job id is drawn from the jobs
/// identity sequence for the fire row itself, so the job is inserted from the fire's RETURNING
/// row and `cron_fires.job_id` never needs an update. A fire another pass is recording at the
/// same instant waits for that pass and then conflicts, so it inserts no job: exactly once per
/// (schedule, fire_at) by the primary key of `cron_fires`. Jobs due later are 'scheduled'
/// (promote_scheduled, via jobs_due_idx, makes them available on time); jobs already due are
/// 'available'. Same wake-up rules as the queue client's ENQUEUE_BATCH: `wake_promoter` of the
/// earliest new scheduled job (migration V8), `wake_workers` of the queue when a job is available
/// at once (V9). Returns the number of jobs inserted, 1 when the promoter was notified (else 0),
/// and 1 when the workers were.
pub const ENQUEUE_FIRES: &str = "
WITH fire AS (
    INSERT INTO cron_fires (schedule_name, fire_at, job_id)
    SELECT $1::text, f.at, nextval(pg_get_serial_sequence('jobs', 'id'))
    FROM unnest($2::timestamptz[]) WITH ORDINALITY AS f(at, ord)
    ORDER BY f.ord
    ON CONFLICT (schedule_name, fire_at) DO NOTHING
    RETURNING job_id, fire_at
), job AS (
    INSERT INTO jobs (id, queue, kind, args, state, priority, original_priority, max_attempts, run_at)
    OVERRIDING SYSTEM VALUE
    SELECT fire.job_id, $3::text, $4::text, $5::jsonb,
           CASE WHEN fire.fire_at > now() THEN 'scheduled'::job_state ELSE 'available'::job_state END,
           $6::int2, $6::int2, $7::int4, fire.fire_at
    FROM fire
    RETURNING state, run_at
), wake AS (
    SELECT wake_promoter(min(run_at)) AS sent FROM job WHERE state = 'scheduled'
), woken AS (
    SELECT wake_workers(array_agg($3::text)) FROM job WHERE state = 'available'
)
SELECT count(*), (SELECT count(*) FROM wake WHERE sent), (SELECT count(*) FROM woken) FROM job";

/// Deletes up to $2 fire records enqueued more than $1 seconds ago, oldest first. Index:
/// cron_fires_enqueued_idx; the delete itself goes by the primary key. No `FOR UPDATE SKIP
/// LOCKED`: that needs UPDATE on `cron_fires`, which the maintenance role does not hold, and
/// a concurrent pass deleting the same records only makes this one wait and delete fewer.
pub const PRUNE_FIRES: &str = "
WITH old AS (
    SELECT schedule_name, fire_at FROM cron_fires
    WHERE enqueued_at < now() - $1::float8 * interval '1 second'
    ORDER BY enqueued_at
    LIMIT $2
)
DELETE FROM cron_fires f
USING old
WHERE f.schedule_name = old.schedule_name AND f.fire_at = old.fire_at";

/// One schedule from the config file: `[[branches.cron_sync.schedules]]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    pub name: String,
    /// Cron expression: 5 fields (minute first), 6 (seconds first) or 7 (year last), or a
    /// nickname such as `@daily`.
    pub expression: String,
    /// IANA time zone the expression is read in.
    #[serde(default = "default_timezone")]
    pub timezone: String,
    #[serde(default = "default_queue")]
    pub queue: String,
    pub kind: String,
    #[serde(default = "default_args")]
    pub args: serde_json::Value,
    #[serde(default = "default_priority")]
    pub priority: i16,
    #[serde(default = "default_max_attempts")]
    pub max_attempts: i32,
    #[serde(default = "default_true")]
    pub enabled: bool,
}

fn default_timezone() -> String {
    "UTC".to_owned()
}

fn default_queue() -> String {
    "default".to_owned()
}

fn default_args() -> serde_json::Value {
    serde_json::Value::Object(serde_json::Map::new())
}

fn default_priority() -> i16 {
    2
}

fn default_max_attempts() -> i32 {
    25
}

fn default_true() -> bool {
    true
}

impl ScheduleConfig {
    /// A schedule with the defaults, for code and tests.
    pub fn new(
        name: impl Into<String>,
        expression: impl Into<String>,
        kind: impl Into<String>,
    ) -> Self {
        Self {
            name: name.into(),
            expression: expression.into(),
            timezone: default_timezone(),
            queue: default_queue(),
            kind: kind.into(),
            args: default_args(),
            priority: default_priority(),
            max_attempts: default_max_attempts(),
            enabled: true,
        }
    }
}

branch_settings! {
    /// Settings of `cron_sync`.
    pub struct Config {
        interval: Duration::from_secs(10),
        checks: Config::own_problems,
        /// Fires up to now + lookahead are enqueued ahead of time as scheduled jobs.
        #[serde(with = "humantime_serde")]
        pub lookahead: Duration = Duration::from_secs(5 * 60),
        /// Fires missed while no leader ran are still enqueued if no older than this.
        #[serde(with = "humantime_serde")]
        pub catch_up: Duration = Duration::from_secs(10 * 60),
        /// Fire records (by when they were enqueued) older than this are deleted.
        #[serde(with = "humantime_serde")]
        pub fire_retention: Duration = Duration::from_secs(7 * 86_400),
        /// Fires enqueued per schedule per pass; the pass asks to run again at once when a
        /// schedule had more, so a per-second expression cannot flood one transaction.
        pub max_fires_per_pass: i64 = 1000,
        /// Fire records deleted per pass.
        pub prune_batch_size: i64 = 10_000,
        pub schedules: Vec<ScheduleConfig> = Vec::new(),
    }
}

const MAX_LOOKAHEAD: Duration = Duration::from_secs(86_400);
const MAX_CATCH_UP: Duration = Duration::from_secs(7 * 86_400);

impl Config {
    fn own_problems(&self) -> Vec<InvalidConfig> {
        let mut problems: Vec<InvalidConfig> = [
            check_batch("max_fires_per_pass", self.max_fires_per_pass),
            check_batch("prune_batch_size", self.prune_batch_size),
        ]
        .into_iter()
        .filter_map(Result::err)
        .collect();
        if self.lookahead > MAX_LOOKAHEAD {
            problems.push(InvalidConfig::new(
                "lookahead",
                self.lookahead,
                "must be at most 24h",
            ));
        }
        if self.catch_up > MAX_CATCH_UP {
            problems.push(InvalidConfig::new(
                "catch_up",
                self.catch_up,
                "must be at most 7days",
            ));
        }
        // A fire is enqueued at most `lookahead` before it is due, and the fire window never
        // reaches back past `catch_up`: a record kept this long is never needed again, while a
        // shorter retention could let a fire still in the window be enqueued a second time.
        if self.fire_retention <= self.catch_up + self.lookahead {
            problems.push(InvalidConfig::new(
                "fire_retention",
                self.fire_retention,
                "must exceed catch_up + lookahead",
            ));
        }
        let mut names = HashSet::new();
        for (i, schedule) in self.schedules.iter().enumerate() {
            // A schedule is named by its name, as the file says it; by its place only when it
            // has none.
            let key = |field: &str| {
                if schedule.name.trim().is_empty() {
                    format!("schedules[{}].{field}", i + 1)
                } else {
                    format!("schedules[name = {:?}].{field}", schedule.name)
                }
            };
            if schedule.name.trim().is_empty() {
                problems.push(InvalidConfig::new(
                    key("name"),
                    &schedule.name,
                    "must not be empty",
                ));
            } else if !names.insert(schedule.name.as_str()) {
                problems.push(InvalidConfig::new(
                    key("name"),
                    &schedule.name,
                    "is used by another schedule",
                ));
            }
            if let Err(bad) = check_schedule(
                &schedule.expression,
                &schedule.timezone,
                &schedule.queue,
                &schedule.kind,
                schedule.priority,
                schedule.max_attempts,
            ) {
                problems.push(InvalidConfig::new(key(bad.field), bad.value, bad.reason));
            }
        }
        problems
    }
}

/// Why a schedule cannot be used: the field at fault, its value, and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadSchedule {
    pub field: &'static str,
    pub value: String,
    pub reason: String,
}

impl std::fmt::Display for BadSchedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {:?}: {}", self.field, self.value, self.reason)
    }
}

/// Parses an expression in a time zone. croner's default parser takes 5 fields (seconds
/// default to 0), 6 (seconds first) or 7 (year last), and nicknames such as `@hourly`.
pub fn parse_schedule(expression: &str, timezone: &str) -> Result<(Cron, Tz), BadSchedule> {
    let cron = Cron::from_str(expression).map_err(|e| BadSchedule {
        field: "expression",
        value: expression.to_owned(),
        reason: e.to_string(),
    })?;
    let tz = Tz::from_str(timezone).map_err(|_| BadSchedule {
        field: "timezone",
        value: timezone.to_owned(),
        reason: "not a known IANA time zone".to_owned(),
    })?;
    // An expression no date matches (30 February) parses, and would never fire.
    if cron
        .find_next_occurrence(&Utc::now().with_timezone(&tz), false)
        .is_err()
    {
        return Err(BadSchedule {
            field: "expression",
            value: expression.to_owned(),
            reason: "no date matches it: the schedule would never fire".to_owned(),
        });
    }
    Ok((cron, tz))
}

/// The checks shared by config schedules (at start) and table rows (at each pass). The
/// database enforces priority and max_attempts for table rows; config rows are checked here
/// so that a bad one fails at start rather than failing every upsert.
fn check_schedule(
    expression: &str,
    timezone: &str,
    queue: &str,
    kind: &str,
    priority: i16,
    max_attempts: i32,
) -> Result<(Cron, Tz), BadSchedule> {
    let bad = |field, value: String, reason: &str| BadSchedule {
        field,
        value,
        reason: reason.to_owned(),
    };
    if queue.is_empty() {
        return Err(bad("queue", queue.to_owned(), "must not be empty"));
    }
    if kind.is_empty() {
        return Err(bad("kind", kind.to_owned(), "must not be empty"));
    }
    if !(1..=4).contains(&priority) {
        return Err(bad(
            "priority",
            priority.to_string(),
            "must be between 1 and 4",
        ));
    }
    if max_attempts < 1 {
        return Err(bad(
            "max_attempts",
            max_attempts.to_string(),
            "must be at least 1",
        ));
    }
    parse_schedule(expression, timezone)
}

/// The fires of a schedule in a window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fires {
    /// Fire times in the window, earliest first, at most the cap.
    pub due: Vec<DateTime<Utc>>,
    /// The first fire after `due`: past the window's end, or within it when the cap cut the
    /// window short. None when the expression has no later occurrence.
    pub next: Option<DateTime<Utc>>,
}

/// The fire times of `cron`, read in `tz`, in (after, until], at most `cap` of them.
///
/// croner's exclusive search starts at the second after `after`'s wall clock second (it
/// ignores sub-second parts), which is exactly the open lower bound; its inclusive search
/// would return the truncated second, which may lie before `after`. A search that exceeds
/// croner's limit (an expression with no occurrence left, such as 30 February) ends the
/// list rather than failing.
pub fn fire_times(
    cron: &Cron,
    tz: Tz,
    after: DateTime<Utc>,
    until: DateTime<Utc>,
    cap: usize,
) -> Result<Fires, CronError> {
    let mut due = Vec::new();
    let mut from = after.with_timezone(&tz);
    loop {
        let next = match cron.find_next_occurrence(&from, false) {
            Ok(next) => next,
            Err(CronError::TimeSearchLimitExceeded) => return Ok(Fires { due, next: None }),
            Err(e) => return Err(e),
        };
        let at = next.with_timezone(&Utc);
        if at > until || due.len() >= cap {
            return Ok(Fires {
                due,
                next: Some(at),
            });
        }
        due.push(at);
        from = next;
    }
}

pub struct CronSync {
    config: Config,
}

impl CronSync {
    pub fn new(config: Config) -> Self {
        Self { config }
    }
}

/// A `cron_schedules` row as read by a pass.
struct ScheduleRow {
    name: String,
    expression: String,
    timezone: String,
    queue: String,
    kind: String,
    args: serde_json::Value,
    priority: i16,
    max_attempts: i32,
    enabled: bool,
    source: String,
    after: DateTime<Utc>,
    until: DateTime<Utc>,
}

impl ScheduleRow {
    /// Every column is NOT NULL, so decoding fails only on a schema change; it is still
    /// reported per row rather than allowed to panic the pass.
    fn from_row(row: &Row) -> Result<Self, tokio_postgres::Error> {
        Ok(Self {
            name: row.try_get("name")?,
            expression: row.try_get("expression")?,
            timezone: row.try_get("timezone")?,
            queue: row.try_get("queue")?,
            kind: row.try_get("kind")?,
            args: row.try_get("args")?,
            priority: row.try_get("priority")?,
            max_attempts: row.try_get("max_attempts")?,
            enabled: row.try_get("enabled")?,
            source: row.try_get("source")?,
            after: row.try_get("after")?,
            until: row.try_get("until")?,
        })
    }
}

/// Skips a schedule: a warning and an observation, never an error.
fn skip(observations: &mut Vec<Observation>, name: &str, reason: String) {
    tracing::warn!(schedule = name, %reason, "cron_sync: schedule skipped");
    observations.push(Observation::Skipped {
        what: format!("cron_schedule:{name}"),
        reason,
    });
}

#[async_trait]
impl Branch for CronSync {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn class(&self) -> Class {
        Class::Hygiene
    }

    fn interval(&self) -> Duration {
        self.config.interval
    }

    async fn run(&self, ctx: &mut BranchContext<'_>) -> Result<Outcome, BranchError> {
        let mut observations = Vec::new();
        let config_names = self.sync_config_schedules(ctx, &mut observations).await?;
        let rows = {
            let tx = ctx.fenced().await?;
            let rows = tx
                .query(
                    READ_SCHEDULES,
                    &[
                        &self.config.catch_up.as_secs_f64(),
                        &self.config.lookahead.as_secs_f64(),
                    ],
                )
                .await?;
            tx.commit().await?;
            rows
        };

        // Rows = jobs enqueued; pruned fire records are bookkeeping and not counted.
        let mut enqueued = 0;
        let mut run_again_in: Option<Duration> = None;
        let mut sooner = |wait: Duration| {
            if wait < self.config.interval {
                run_again_in = Some(run_again_in.map_or(wait, |r| r.min(wait)));
            }
        };
        // Guards an unvalidated config against a zero cap, which would ask to rerun forever.
        let cap = usize::try_from(self.config.max_fires_per_pass)
            .unwrap_or(1)
            .max(1);
        for row in &rows {
            let schedule = match ScheduleRow::from_row(row) {
                Ok(schedule) => schedule,
                Err(e) => {
                    let name: String = row.try_get("name").unwrap_or_else(|_| "?".to_owned());
                    skip(&mut observations, &name, format!("unreadable row: {e}"));
                    continue;
                }
            };
            if schedule.source == "table" && config_names.contains(&schedule.name) {
                skip(
                    &mut observations,
                    &schedule.name,
                    "the config file's schedule of this name is ignored: a table-managed schedule holds the name"
                        .to_owned(),
                );
            }
            if !schedule.enabled {
                continue;
            }
            let (cron, tz) = match check_schedule(
                &schedule.expression,
                &schedule.timezone,
                &schedule.queue,
                &schedule.kind,
                schedule.priority,
                schedule.max_attempts,
            ) {
                Ok(parsed) => parsed,
                Err(bad) => {
                    skip(&mut observations, &schedule.name, bad.to_string());
                    continue;
                }
            };
            let fires = match fire_times(&cron, tz, schedule.after, schedule.until, cap) {
                Ok(fires) => fires,
                Err(e) => {
                    skip(
                        &mut observations,
                        &schedule.name,
                        format!("no fire time: {e}"),
                    );
                    continue;
                }
            };
            if !fires.due.is_empty() {
                enqueued += self.enqueue(ctx, &schedule, &fires.due).await?;
            }
            if let Some(next) = fires.next {
                // The next fire enters the window `next − until` from now: run then if that
                // is sooner than the interval (at once when the cap left fires in the window).
                sooner((next - schedule.until).to_std().unwrap_or(Duration::ZERO));
            }
        }

        let pruned = {
            let tx = ctx.fenced().await?;
            let pruned = tx
                .execute(
                    PRUNE_FIRES,
                    &[
                        &self.config.fire_retention.as_secs_f64(),
                        &self.config.prune_batch_size,
                    ],
                )
                .await?;
            tx.commit().await?;
            pruned
        };
        if pruned >= u64::try_from(self.config.prune_batch_size).unwrap_or(u64::MAX) {
            sooner(Duration::ZERO);
        }

        Ok(Outcome {
            rows: enqueued,
            run_again_in,
            observations,
        })
    }
}

impl CronSync {
    /// Writes the config file's schedules to `cron_schedules` and deletes config-sourced rows
    /// it no longer names. Returns every name the config uses. Schedules that fail the checks
    /// (only possible when the config was not validated) are skipped, not written.
    async fn sync_config_schedules(
        &self,
        ctx: &mut BranchContext<'_>,
        observations: &mut Vec<Observation>,
    ) -> Result<HashSet<String>, BranchError> {
        let mut usable: Vec<&ScheduleConfig> = Vec::new();
        let mut names = HashSet::new();
        for schedule in &self.config.schedules {
            if !names.insert(schedule.name.clone()) {
                skip(
                    observations,
                    &schedule.name,
                    "a config schedule of this name comes earlier".to_owned(),
                );
                continue;
            }
            match check_schedule(
                &schedule.expression,
                &schedule.timezone,
                &schedule.queue,
                &schedule.kind,
                schedule.priority,
                schedule.max_attempts,
            ) {
                Ok(_) => usable.push(schedule),
                Err(bad) => skip(observations, &schedule.name, bad.to_string()),
            }
        }
        // Sorted so that concurrent passes take row locks in the same order.
        usable.sort_by(|a, b| a.name.cmp(&b.name));
        let column =
            |f: fn(&ScheduleConfig) -> &str| usable.iter().map(|s| f(s)).collect::<Vec<&str>>();
        let args: Vec<&serde_json::Value> = usable.iter().map(|s| &s.args).collect();
        let priorities: Vec<i16> = usable.iter().map(|s| s.priority).collect();
        let max_attempts: Vec<i32> = usable.iter().map(|s| s.max_attempts).collect();
        let enabled: Vec<bool> = usable.iter().map(|s| s.enabled).collect();
        let all_names: Vec<&str> = names.iter().map(String::as_str).collect();

        let tx = ctx.fenced().await?;
        tx.execute(
            UPSERT_CONFIG_SCHEDULES,
            &[
                &column(|s| &s.name),
                &column(|s| &s.expression),
                &column(|s| &s.timezone),
                &column(|s| &s.queue),
                &column(|s| &s.kind),
                &args,
                &priorities,
                &max_attempts,
                &enabled,
            ],
        )
        .await?;
        // Every configured name is kept, usable or not: a config entry that went bad keeps
        // its last good row rather than vanishing.
        tx.execute(DELETE_REMOVED_CONFIG_SCHEDULES, &[&all_names])
            .await?;
        tx.commit().await?;
        Ok(names)
    }

    /// Records `due` fires of one schedule and enqueues a job for each new one, in one fenced
    /// transaction. Returns the number of jobs enqueued.
    async fn enqueue(
        &self,
        ctx: &mut BranchContext<'_>,
        schedule: &ScheduleRow,
        due: &[DateTime<Utc>],
    ) -> Result<u64, BranchError> {
        let tx = ctx.fenced().await?;
        let row = tx
            .query_one(
                ENQUEUE_FIRES,
                &[
                    &schedule.name,
                    &due,
                    &schedule.queue,
                    &schedule.kind,
                    &schedule.args,
                    &schedule.priority,
                    &schedule.max_attempts,
                ],
            )
            .await?;
        tx.commit().await?;
        let inserted: i64 = row.try_get(0)?;
        Ok(u64::try_from(inserted).unwrap_or(0))
    }
}
