//! What the demo reads back from the database while it runs: the leader row, `branch_health`
//! and the job counts, on a dedicated connection of its own.

use anyhow::Context;
use std::collections::BTreeMap;
use tokio_postgres::Client;

/// The current term. Primary key.
pub const LEADER: &str =
    "SELECT epoch, instance, pid, resigned_at IS NOT NULL FROM leader WHERE id = 1";

/// Per-branch health as the leader last flushed it, with the instance of the term that wrote
/// it (the counters are per process: each instance counts from zero).
pub const BRANCHES: &str = "
SELECT b.branch, b.loop_name, b.epoch, t.instance, b.runs, b.last_rows, b.last_duration_ms,
       b.last_start_delay_ms, b.overrun_state, b.overrun_episodes, b.errors, b.last_error
FROM branch_health b LEFT JOIN leader_terms t ON t.epoch = b.epoch
ORDER BY b.loop_name DESC, b.branch";

/// Job counts by state (a sequential scan: the demo's table stays small).
pub const STATES: &str = "SELECT state::text, count(*) FROM jobs GROUP BY state";

pub const ARCHIVED: &str = "SELECT count(*) FROM job_archive";

#[derive(Debug, Clone, Default, PartialEq)]
pub struct LeaderRow {
    pub epoch: i64,
    pub instance: Option<String>,
    pub pid: Option<i32>,
    pub resigned: bool,
}

impl LeaderRow {
    /// A term is open: someone was elected and has not stepped down.
    pub fn leading(&self) -> bool {
        self.epoch > 0 && self.instance.is_some() && !self.resigned
    }

    pub fn pid(&self) -> Option<u32> {
        self.pid.and_then(|p| u32::try_from(p).ok())
    }
}

/// One `branch_health` row.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BranchRow {
    pub branch: String,
    pub loop_name: String,
    pub epoch: i64,
    /// The instance that led `epoch`.
    pub instance: Option<String>,
    pub runs: i64,
    pub last_rows: Option<i64>,
    pub last_duration_ms: Option<f64>,
    pub last_start_delay_ms: Option<f64>,
    pub overrun_state: String,
    pub overrun_episodes: i64,
    pub errors: i64,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub leader: LeaderRow,
    pub branches: Vec<BranchRow>,
    /// Count per job state, in the order of `JobState::ALL`, zeros included.
    pub states: Vec<(&'static str, i64)>,
    pub archived: i64,
}

/// A branch's counters summed over every instance that led during the demo.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BranchTotal {
    pub branch: String,
    pub loop_name: String,
    pub runs: i64,
    pub errors: i64,
    pub overrun_episodes: i64,
    /// How many instances' counters were summed.
    pub instances: usize,
    pub last_error: Option<String>,
}

pub struct Monitor {
    client: Client,
    /// The latest row seen per branch and per instance.
    seen: BTreeMap<String, BTreeMap<String, BranchRow>>,
}

impl Monitor {
    pub async fn connect(config: &tokio_postgres::Config) -> anyhow::Result<Monitor> {
        let mut config = config.clone();
        config.application_name("steward-demo-monitor");
        let client = steward_schema::connect(&config)
            .await
            .context("connecting the demo's monitor")?;
        Ok(Monitor {
            client,
            seen: BTreeMap::new(),
        })
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub async fn leader(&self) -> anyhow::Result<LeaderRow> {
        let row = self
            .client
            .query_one(LEADER, &[])
            .await
            .context("reading the leader row")?;
        Ok(LeaderRow {
            epoch: row.try_get(0)?,
            instance: row.try_get(1)?,
            pid: row.try_get(2)?,
            resigned: row.try_get(3)?,
        })
    }

    /// Reads everything the live view shows, and remembers the branch counters for the totals.
    pub async fn sample(&mut self) -> anyhow::Result<Snapshot> {
        let leader = self.leader().await?;
        let mut branches = Vec::new();
        for row in self
            .client
            .query(BRANCHES, &[])
            .await
            .context("reading branch_health")?
        {
            branches.push(BranchRow {
                branch: row.try_get(0)?,
                loop_name: row.try_get(1)?,
                epoch: row.try_get(2)?,
                instance: row.try_get(3)?,
                runs: row.try_get(4)?,
                last_rows: row.try_get(5)?,
                last_duration_ms: row.try_get(6)?,
                last_start_delay_ms: row.try_get(7)?,
                overrun_state: row.try_get(8)?,
                overrun_episodes: row.try_get(9)?,
                errors: row.try_get(10)?,
                last_error: row.try_get(11)?,
            });
        }
        let mut counts = BTreeMap::new();
        for row in self
            .client
            .query(STATES, &[])
            .await
            .context("counting jobs")?
        {
            counts.insert(row.try_get::<_, String>(0)?, row.try_get::<_, i64>(1)?);
        }
        let states = steward_queue::JobState::ALL
            .iter()
            .map(|s| (s.as_str(), counts.get(s.as_str()).copied().unwrap_or(0)))
            .collect();
        let archived = self
            .client
            .query_one(ARCHIVED, &[])
            .await
            .context("counting archived jobs")?
            .try_get(0)?;
        for row in &branches {
            let writer = row
                .instance
                .clone()
                .unwrap_or_else(|| format!("epoch {}", row.epoch));
            self.seen
                .entry(row.branch.clone())
                .or_default()
                .insert(writer, row.clone());
        }
        Ok(Snapshot {
            leader,
            branches,
            states,
            archived,
        })
    }

    /// Branch counters summed over the instances seen: each leader's last flushed counts.
    pub fn totals(&self) -> Vec<BranchTotal> {
        let mut totals: Vec<BranchTotal> = self
            .seen
            .iter()
            .map(|(branch, by_instance)| {
                let mut total = BranchTotal {
                    branch: branch.clone(),
                    instances: by_instance.len(),
                    ..BranchTotal::default()
                };
                let mut latest_epoch = i64::MIN;
                for row in by_instance.values() {
                    total.runs += row.runs;
                    total.errors += row.errors;
                    total.overrun_episodes += row.overrun_episodes;
                    if row.epoch > latest_epoch {
                        latest_epoch = row.epoch;
                        total.loop_name = row.loop_name.clone();
                    }
                    if row.last_error.is_some() {
                        total.last_error = row.last_error.clone();
                    }
                }
                total
            })
            .collect();
        totals.sort_by(|a, b| {
            b.loop_name
                .cmp(&a.loop_name)
                .then_with(|| a.branch.cmp(&b.branch))
        });
        totals
    }
}
