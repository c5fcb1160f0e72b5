//! Scenario 3, throughput: each bulk branch (promote, the three rescues, cleanup) works through
//! a backlog of due rows, timed from its first pass to its last; then the same backlog is
//! seeded again and one plain SQL statement does the same row changes directly (the physical
//! baseline on the same database). ratio = branch rows/s ÷ plain rows/s.

use crate::db::{settle, BenchDb, Pg};
use crate::report::{num, table, Target};
use anyhow::{ensure, Context};
use futures_util::TryStreamExt;
use serde::Serialize;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;
use steward_branches::rescue_stale_heartbeats::RetryConfig;
use steward_branches::{
    cleanup, promote_scheduled, rescue_expired_callbacks, rescue_expired_deadlines,
    rescue_stale_heartbeats, Branch, BranchContext,
};
use tokio_postgres::types::{ToSql, Type};

pub struct Settings {
    pub rows: i64,
    /// batch_size of the "large" configuration, for every branch.
    pub large_batch: i64,
    /// Repetitions (medians reported); plain, default and large runs rotate their order.
    pub repeats: u32,
}

/// One branch configuration's runs.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigRun {
    /// "default" (the branch's shipped settings) or "large" (bigger batches).
    pub config: String,
    pub batch_size: i64,
    pub max_batches_per_run: u32,
    /// Passes of the branch per run (median run).
    pub passes: u64,
    /// Median over the repetitions.
    pub seconds: f64,
    pub rows_per_s: f64,
    /// rows/s ÷ the plain statement's rows/s: the median of `ratio_samples`.
    pub ratio: f64,
    pub samples_s: Vec<f64>,
    /// Per repetition: the plain statement's seconds ÷ this configuration's seconds, both
    /// timed in that repetition (a paired measure, which a machine whose speed drifts between
    /// repetitions moves less than a ratio of medians).
    pub ratio_samples: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BranchThroughput {
    pub branch: String,
    pub rows: u64,
    pub plain_s: f64,
    pub plain_rows_per_s: f64,
    pub plain_samples_s: Vec<f64>,
    pub plain_sql: String,
    pub default: ConfigRun,
    pub large: ConfigRun,
}

#[derive(Debug, Clone, Serialize)]
pub struct ThroughputResult {
    pub rows_per_backlog: i64,
    pub repeats: u32,
    pub large_batch: i64,
    pub branches: Vec<BranchThroughput>,
}

const COLUMNS: &str = "queue, kind, state, priority, original_priority, attempt, max_attempts, run_lease, run_at, created_at, attempted_at, heartbeat_at, deadline_at, callback_id, callback_timeout_at, finalized_at";

struct Configured {
    branch: Arc<dyn Branch>,
    batch_size: i64,
    max_batches: u32,
}

struct Case {
    name: &'static str,
    /// The SELECT list (after `SELECT`) of one seeded row from `g`; columns as [`COLUMNS`].
    seed: &'static str,
    plain: Plain,
    /// The branch with its default settings, then with `large_batch`.
    configs: [Configured; 2],
}

/// The physical baseline of one case.
struct Plain {
    sql: String,
    /// For a rescue: the values of the branch's own parameters `$2..` (see [`Plain::rescue`]).
    rescue_args: Option<Vec<f64>>,
}

/// Where a rescue statement's SET clause ends and its batch picking begins (the shape
/// `rescue_statement!` builds; checked by a test).
const RESCUE_PICK: &str = "\nWHERE j.ctid = ANY(ARRAY(";

impl Plain {
    fn statement(sql: &str) -> Self {
        Self {
            sql: sql.to_owned(),
            rescue_args: None,
        }
    }

    /// A rescue's own `UPDATE jobs j SET ...` (state, backoff and the same error text), applied
    /// to every row matching `predicate` at once: the same row changes without batches, row
    /// locks, RETURNING or the promoter's wake-up. The SET clause reads the retry parameters `$2..$4` (the default
    /// retry policy) and, for heartbeats, the staleness `$5` (in `extra`); `$1`, the batch
    /// size, goes unused.
    fn rescue(statement: &str, predicate: &str, extra: &[f64]) -> Self {
        // The statement's UPDATE, without the CTE around it that wakes the promoter.
        let set = statement
            .split_once(RESCUE_PICK)
            .map_or(statement, |(set, _)| set)
            .trim()
            .trim_start_matches("WITH rescued AS (")
            .trim();
        let (base_ms, max_ms, jitter) = RetryConfig::default().policy().sql_params();
        let mut args = vec![base_ms, max_ms, jitter];
        args.extend_from_slice(extra);
        Self {
            sql: format!("{set}\nWHERE {predicate}"),
            rescue_args: Some(args),
        }
    }
}

fn cases(s: &Settings) -> Vec<Case> {
    let large = s.large_batch;
    let promote = |batch_size| {
        let config = promote_scheduled::Config {
            batch_size,
            ..Default::default()
        };
        Configured {
            batch_size,
            max_batches: config.max_batches_per_run,
            branch: Arc::new(promote_scheduled::PromoteScheduled::new(config)),
        }
    };
    let heartbeat = |batch_size| {
        let config = rescue_stale_heartbeats::Config {
            batch_size,
            ..Default::default()
        };
        Configured {
            batch_size,
            max_batches: config.max_batches_per_run,
            branch: Arc::new(rescue_stale_heartbeats::RescueStaleHeartbeats::new(config)),
        }
    };
    let deadline = |batch_size| {
        let config = rescue_expired_deadlines::Config {
            batch_size,
            ..Default::default()
        };
        Configured {
            batch_size,
            max_batches: config.max_batches_per_run,
            branch: Arc::new(rescue_expired_deadlines::RescueExpiredDeadlines::new(
                config,
            )),
        }
    };
    let callback = |batch_size| {
        let config = rescue_expired_callbacks::Config {
            batch_size,
            ..Default::default()
        };
        Configured {
            batch_size,
            max_batches: config.max_batches_per_run,
            branch: Arc::new(rescue_expired_callbacks::RescueExpiredCallbacks::new(
                config,
            )),
        }
    };
    let clean = |batch_size| {
        let config = cleanup::Config {
            batch_size,
            ..Default::default()
        };
        Configured {
            batch_size,
            max_batches: config.max_batches_per_run,
            branch: Arc::new(cleanup::Cleanup::new(config)),
        }
    };
    vec![
        Case {
            name: "promote_scheduled",
            seed: "'tp_' || (g % 4), 'bench.tp', 'scheduled', 2, 2, 0, 25, 0,
                   now() - interval '1 hour' + (g % 3600) * interval '1 second', now() - interval '2 hours',
                   NULL, NULL, NULL, NULL, NULL, NULL",
            plain: Plain::statement(
                "UPDATE jobs SET state = 'available'
WHERE state IN ('scheduled', 'retryable') AND run_at <= now()",
            ),
            configs: [
                promote(promote_scheduled::Config::default().batch_size),
                promote(large),
            ],
        },
        Case {
            name: "rescue_stale_heartbeats",
            seed: "'tp_' || (g % 4), 'bench.tp', 'running', 2, 2, 1, 25, 1,
                   now() - interval '3 hours', now() - interval '3 hours', now() - interval '2 hours',
                   now() - interval '1 hour' - (g % 3600) * interval '1 second', NULL, NULL, NULL, NULL",
            plain: Plain::rescue(
                rescue_stale_heartbeats::RESCUE,
                "state = 'running' AND heartbeat_at < now() - make_interval(secs => $5)",
                &[rescue_stale_heartbeats::Config::default()
                    .staleness
                    .as_secs_f64()],
            ),
            configs: [
                heartbeat(rescue_stale_heartbeats::Config::default().batch_size),
                heartbeat(large),
            ],
        },
        Case {
            name: "rescue_expired_deadlines",
            seed: "'tp_' || (g % 4), 'bench.tp', 'running', 2, 2, 1, 25, 1,
                   now() - interval '3 hours', now() - interval '3 hours', now() - interval '2 hours',
                   now(), now() - interval '1 minute' - (g % 3600) * interval '1 second', NULL, NULL, NULL",
            plain: Plain::rescue(
                rescue_expired_deadlines::RESCUE,
                "state = 'running' AND deadline_at <= now()",
                &[],
            ),
            configs: [
                deadline(rescue_expired_deadlines::Config::default().batch_size),
                deadline(large),
            ],
        },
        Case {
            name: "rescue_expired_callbacks",
            seed: "'tp_' || (g % 4), 'bench.tp', 'waiting_external', 2, 2, 1, 25, 1,
                   now() - interval '3 hours', now() - interval '3 hours', now() - interval '2 hours',
                   now() - interval '2 hours', NULL, gen_random_uuid(),
                   now() - interval '1 minute' - (g % 3600) * interval '1 second', NULL",
            plain: Plain::rescue(
                rescue_expired_callbacks::RESCUE,
                "state = 'waiting_external' AND callback_timeout_at <= now()",
                &[],
            ),
            configs: [
                callback(rescue_expired_callbacks::Config::default().batch_size),
                callback(large),
            ],
        },
        Case {
            name: "cleanup",
            seed: "'tp_' || (g % 4), 'bench.tp', 'completed', 2, 2, 1, 25, 1,
                   now() - interval '4 days', now() - interval '4 days', now() - interval '3 days',
                   NULL, NULL, NULL, NULL,
                   now() - interval '2 days' - (g % 86400) * interval '1 second'",
            plain: Plain::statement(
                "WITH gone AS (
    DELETE FROM jobs
    WHERE state = 'completed' AND finalized_at < now() - interval '24 hours'
    RETURNING id, queue, kind, state, original_priority, attempt, max_attempts, run_at,
              created_at, attempted_at, finalized_at, unique_key, args, errors
)
INSERT INTO job_archive (id, queue, kind, state, priority, attempt, max_attempts, run_at,
                         created_at, attempted_at, finalized_at, unique_key, args, errors)
SELECT id, queue, kind, state, original_priority, attempt, max_attempts, run_at,
       created_at, attempted_at, finalized_at, unique_key, args, errors
FROM gone",
            ),
            configs: [
                clean(cleanup::Config::default().batch_size),
                clean(large),
            ],
        },
    ]
}

pub async fn run(pg: &Pg, s: &Settings) -> anyhow::Result<(ThroughputResult, Vec<Target>)> {
    let db = pg.create("tput").await?;
    let result = run_on(&db, s).await;
    pg.drop_db(db).await;
    result
}

async fn run_on(db: &BenchDb, s: &Settings) -> anyhow::Result<(ThroughputResult, Vec<Target>)> {
    let mut client = db.client().await?;
    // The archive partitions of the seeded days exist before any timed run (catalog only), so
    // that cleanup and its plain statement move rows into the same tables.
    super::scale::create_backlog_partitions(&client).await?;
    // Every timed run starts from an explicit VACUUM and CHECKPOINT (`settle`); a background
    // autovacuum of the last run's dead rows would land in some timed runs and not others.
    client
        .batch_execute(
            "DO $$
             DECLARE t regclass;
             BEGIN
                 FOR t IN SELECT 'jobs'::regclass
                          UNION ALL SELECT inhrelid::regclass FROM pg_inherits
                                    WHERE inhparent = 'job_archive'::regclass
                 LOOP
                     EXECUTE format('ALTER TABLE %s SET (autovacuum_enabled = off)', t);
                 END LOOP;
             END $$",
        )
        .await
        .context("turning autovacuum off for the throughput tables")?;
    let mut branches = Vec::new();
    let repeats = s.repeats.max(1);
    for case in cases(s) {
        crate::progress(format!(
            "throughput: {} over {} rows ({} repeat{})",
            case.name,
            s.rows,
            repeats,
            if repeats == 1 { "" } else { "s" }
        ));
        // Per repetition: the plain statement and both configurations, in rotating order.
        let mut plain = Vec::new();
        let mut runs: [Vec<(f64, u64)>; 2] = [Vec::new(), Vec::new()];
        for rep in 0..repeats as usize {
            for step in 0..3 {
                match (rep + step) % 3 {
                    0 => plain.push(time_plain(&client, &case, s.rows).await?),
                    k => {
                        let run =
                            time_branch(&mut client, &case, &case.configs[k - 1], s.rows).await?;
                        runs[k - 1].push(run);
                    }
                }
            }
        }
        reset(&client).await?;
        let plain_s = median(&plain);
        let plain_rps = s.rows as f64 / plain_s;
        let config_run = |index: usize, name: &str| {
            let configured = &case.configs[index];
            let seconds: Vec<f64> = runs[index].iter().map(|(t, _)| *t).collect();
            let median_s = median(&seconds);
            let passes = runs[index]
                .iter()
                .min_by(|a, b| (a.0 - median_s).abs().total_cmp(&(b.0 - median_s).abs()))
                .map(|(_, p)| *p)
                .unwrap_or(0);
            let rps = s.rows as f64 / median_s;
            let ratios: Vec<f64> = plain
                .iter()
                .zip(&seconds)
                .map(|(plain_s, branch_s)| plain_s / branch_s)
                .collect();
            ConfigRun {
                config: name.to_owned(),
                batch_size: configured.batch_size,
                max_batches_per_run: configured.max_batches,
                passes,
                seconds: round(median_s, 3),
                rows_per_s: round(rps, 0),
                ratio: round(median(&ratios), 3),
                samples_s: seconds.iter().map(|t| round(*t, 3)).collect(),
                ratio_samples: ratios.iter().map(|r| round(*r, 3)).collect(),
            }
        };
        branches.push(BranchThroughput {
            branch: case.name.to_owned(),
            rows: s.rows as u64,
            plain_s: round(plain_s, 3),
            plain_rows_per_s: round(plain_rps, 0),
            plain_samples_s: plain.iter().map(|t| round(*t, 3)).collect(),
            plain_sql: case.plain.sql.clone(),
            default: config_run(0, "default"),
            large: config_run(1, "large"),
        });
    }
    let targets = branches
        .iter()
        .map(|b| {
            Target::at_least(
                format!(
                    "{} rows/s vs plain SQL (batch {})",
                    b.branch, b.large.batch_size
                ),
                Some(b.large.ratio),
                0.8,
                "x",
            )
        })
        .collect();
    Ok((
        ThroughputResult {
            rows_per_backlog: s.rows,
            repeats,
            large_batch: s.large_batch,
            branches,
        },
        targets,
    ))
}

/// Seeds the backlog and runs the branch pass after pass until it is done: (seconds, passes).
async fn time_branch(
    client: &mut tokio_postgres::Client,
    case: &Case,
    configured: &Configured,
    expected: i64,
) -> anyhow::Result<(f64, u64)> {
    reset(client).await?;
    seed(client, case, expected).await?;
    let branch = &configured.branch;
    let started = Instant::now();
    let (mut rows, mut passes) = (0u64, 0u64);
    loop {
        let mut ctx = BranchContext {
            client: &mut *client,
            epoch: 0,
            timeouts: branch.timeouts(),
        };
        let outcome = branch
            .run(&mut ctx)
            .await
            .with_context(|| format!("{} pass {}", case.name, passes + 1))?;
        passes += 1;
        rows += outcome.rows;
        if outcome.rows == 0 || rows >= expected as u64 {
            break;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    ensure!(
        rows == expected as u64,
        "{} changed {rows} rows of {expected}",
        case.name
    );
    Ok((seconds, passes))
}

/// Seeds the backlog and runs the plain statement once: seconds.
async fn time_plain(
    client: &tokio_postgres::Client,
    case: &Case,
    expected: i64,
) -> anyhow::Result<f64> {
    reset(client).await?;
    seed(client, case, expected).await?;
    let started = Instant::now();
    let rows = match &case.plain.rescue_args {
        None => client.execute(case.plain.sql.as_str(), &[]).await,
        Some(args) => {
            let unused_batch_size = 0_i64;
            let mut params: Vec<(&(dyn ToSql + Sync), Type)> =
                vec![(&unused_batch_size, Type::INT8)];
            params.extend(
                args.iter()
                    .map(|a| (a as &(dyn ToSql + Sync), Type::FLOAT8)),
            );
            execute_typed(client, &case.plain.sql, &params).await
        }
    }
    .with_context(|| format!("plain statement for {}", case.name))?;
    let seconds = started.elapsed().as_secs_f64();
    ensure!(
        rows == expected as u64,
        "the plain statement for {} changed {rows} rows of {expected}",
        case.name
    );
    Ok(seconds)
}

/// Runs a statement with typed parameters; returns the rows it changed.
async fn execute_typed(
    client: &tokio_postgres::Client,
    sql: &str,
    params: &[(&(dyn ToSql + Sync), Type)],
) -> Result<u64, tokio_postgres::Error> {
    let rows = client.query_typed_raw(sql, params.iter().cloned()).await?;
    futures_util::pin_mut!(rows);
    while rows.try_next().await?.is_some() {}
    Ok(rows.rows_affected().unwrap_or(0))
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

fn round(v: f64, decimals: i32) -> f64 {
    let f = 10f64.powi(decimals);
    (v * f).round() / f
}

async fn reset(client: &tokio_postgres::Client) -> anyhow::Result<()> {
    client
        .batch_execute("TRUNCATE jobs, job_archive, dirty_queues, queue_counts")
        .await
        .context("resetting the throughput database")
}

async fn seed(client: &tokio_postgres::Client, case: &Case, rows: i64) -> anyhow::Result<()> {
    let statement = format!(
        "INSERT INTO jobs ({COLUMNS}) SELECT {} FROM generate_series(1, $1::int8) g",
        case.seed
    );
    client
        .execute(&statement, &[&rows])
        .await
        .with_context(|| format!("seeding {}", case.name))?;
    settle(client).await
}

pub fn render(r: &ThroughputResult) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "throughput: {} due rows per backlog, median of {}; each branch runs pass after pass to completion; plain = the same row changes by one SQL statement; ratio = median over repetitions of plain seconds / branch seconds",
        r.rows_per_backlog, r.repeats
    );
    let mut rows = vec![vec![
        "branch".to_owned(),
        "plain rows/s".to_owned(),
        "config".to_owned(),
        "batch x max/pass".to_owned(),
        "passes".to_owned(),
        "seconds".to_owned(),
        "rows/s".to_owned(),
        "ratio".to_owned(),
    ]];
    for b in &r.branches {
        for (i, c) in [&b.default, &b.large].into_iter().enumerate() {
            rows.push(vec![
                if i == 0 {
                    b.branch.clone()
                } else {
                    String::new()
                },
                if i == 0 {
                    num(b.plain_rows_per_s)
                } else {
                    String::new()
                },
                c.config.clone(),
                format!("{} x {}", c.batch_size, c.max_batches_per_run),
                c.passes.to_string(),
                num(c.seconds),
                num(c.rows_per_s),
                format!("{}x", num(c.ratio)),
            ]);
        }
    }
    out.push_str(&table(&rows));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rescue_baselines_are_the_branch_statements_set_clauses() {
        let settings = Settings {
            rows: 10,
            large_batch: 10,
            repeats: 1,
        };
        for case in cases(&settings) {
            let Some(args) = &case.plain.rescue_args else {
                continue;
            };
            let sql = &case.plain.sql;
            assert!(sql.starts_with("UPDATE jobs j SET"), "{sql}");
            assert!(
                !sql.contains("LIMIT") && !sql.contains("RETURNING"),
                "{sql}"
            );
            assert!(
                sql.contains("retry_backoff(j.attempt, $2, $3, $4)"),
                "{sql}"
            );
            assert!(
                sql.contains("'error', format("),
                "the branch's error text: {sql}"
            );
            let heartbeat = case.name == "rescue_stale_heartbeats";
            assert_eq!(args.len(), if heartbeat { 4 } else { 3 }, "{}", case.name);
        }
        for statement in [
            rescue_stale_heartbeats::RESCUE,
            rescue_expired_deadlines::RESCUE,
            rescue_expired_callbacks::RESCUE,
        ] {
            assert_eq!(statement.matches(RESCUE_PICK).count(), 1, "{statement}");
        }
    }
}
