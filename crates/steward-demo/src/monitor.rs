//! What the demo reads back while it runs: from the database (on a dedicated connection of its
//! own) the leader row, `branch_health` and the job counts; from the leader's `/metrics` the
//! promotion lag, which `branch_health` does not hold.

use anyhow::Context;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};
use steward_connection::{SchemaName, Target};
use steward_leader::status::{BranchStatus, Status};
use steward_workload::metrics::{self, Buckets};
use tokio_postgres::Client;

/// The promotion-lag histogram on the leader's `/metrics`.
const PROMOTION_LAG: &str = "steward_promotion_lag_seconds";

/// How far back the live view's promotion lag looks.
pub const LAG_WINDOW: Duration = Duration::from_secs(10);

/// A scrape of the leader's `/metrics` must not hold up the view.
const SCRAPE_TIMEOUT: Duration = Duration::from_millis(500);

/// Job counts by state (a sequential scan: the demo's table stays small).
pub const STATES: &str = "SELECT state::text, count(*) FROM jobs GROUP BY state";

pub const ARCHIVED: &str = "SELECT count(*) FROM job_archive";

/// Who leads, as the demo needs it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LeaderRow {
    /// The current term's epoch, or the last one's when nobody leads.
    pub epoch: i64,
    pub instance: Option<String>,
    pub pid: Option<i32>,
    /// Someone holds the leadership lock.
    pub leading: bool,
}

impl LeaderRow {
    fn of(status: &Status) -> Self {
        match status.leader.as_ref().or(status.last_term.as_ref()) {
            Some(term) => Self {
                epoch: term.epoch,
                instance: Some(term.instance.clone()),
                pid: Some(term.pid),
                leading: status.lock_held,
            },
            None => Self::default(),
        }
    }

    /// A term is open: someone holds the leadership lock.
    pub fn leading(&self) -> bool {
        self.leading
    }

    pub fn pid(&self) -> Option<u32> {
        self.pid.and_then(|p| u32::try_from(p).ok())
    }
}

#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub leader: LeaderRow,
    pub branches: Vec<BranchStatus>,
    /// Count per job state, in the order of `JobState::ALL`, zeros included.
    pub states: Vec<(&'static str, i64)>,
    pub archived: i64,
    /// The leader's promotion lag over the last [`LAG_WINDOW`] (less while the demo has read the
    /// current leader for a shorter time), when its `/metrics` could be read.
    pub promotion_lag: Option<PromotionLag>,
}

/// Promotion lag (now − run_at when a job was promoted) over a recent window, estimated from the
/// leader's histogram buckets the way Prometheus' `histogram_quantile` does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PromotionLag {
    /// Jobs promoted in the window; the quantiles are `None` without any.
    pub jobs: u64,
    /// Seconds.
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    /// How much time the window really covers (less than [`LAG_WINDOW`] at first).
    pub over: Duration,
}

/// The promotion-lag buckets in a Prometheus exposition, or `None` when it has none yet (the
/// histogram appears with the first promotion).
pub fn lag_buckets(exposition: &str) -> Option<Buckets> {
    metrics::buckets(exposition, PROMOTION_LAG, |_| true)
}

/// Promotion lag over the samples' span: newest minus oldest.
fn lag_over(samples: &VecDeque<LagSample>) -> Option<PromotionLag> {
    let (first, last) = (samples.front()?, samples.back()?);
    let delta = metrics::delta(&last.buckets, &first.buckets)?;
    let jobs = delta.last().map_or(0.0, |(_, c)| *c);
    Some(PromotionLag {
        jobs: jobs as u64,
        p50: metrics::quantile(0.5, &delta),
        p99: metrics::quantile(0.99, &delta),
        over: last.at.duration_since(first.at),
    })
}

/// One scrape of the leader's promotion-lag buckets.
#[derive(Debug, Clone)]
struct LagSample {
    at: Instant,
    pid: u32,
    buckets: Buckets,
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
    schema: SchemaName,
    /// The latest row seen per branch and per instance.
    seen: BTreeMap<String, BTreeMap<String, BranchStatus>>,
    /// Where each of the demo's processes serves `/metrics` (bound to port 0), by pid.
    metrics_addrs: HashMap<u32, String>,
    /// The leader's promotion-lag buckets over the last [`LAG_WINDOW`], oldest first.
    lag_samples: VecDeque<LagSample>,
}

impl Monitor {
    pub async fn connect(target: &Target) -> anyhow::Result<Monitor> {
        let client = target
            .named("steward-demo-monitor")
            .connect()
            .await
            .context("connecting the demo's monitor")?;
        Ok(Monitor {
            client,
            schema: target.schema().clone(),
            seen: BTreeMap::new(),
            metrics_addrs: HashMap::new(),
            lag_samples: VecDeque::new(),
        })
    }

    /// Tells the monitor where process `pid` serves `/metrics` (from its log).
    pub fn metrics_addr(&mut self, pid: u32, addr: String) {
        self.metrics_addrs.insert(pid, addr);
    }

    /// Scrapes the leader's promotion lag and returns it over the recent window; `None` when
    /// there is no leader or its `/metrics` cannot be read (the view then shows a dash).
    async fn promotion_lag(&mut self, leader: &LeaderRow) -> Option<PromotionLag> {
        let pid = leader.pid().filter(|_| leader.leading());
        // A new leader's histogram starts from zero: never subtract across processes.
        self.lag_samples.retain(|s| Some(s.pid) == pid);
        let pid = pid?;
        let addr = self.metrics_addrs.get(&pid)?.clone();
        let now = Instant::now();
        // No promotion yet: no histogram, which is an empty one.
        let buckets =
            lag_buckets(&metrics::scrape(&addr, SCRAPE_TIMEOUT).await?).unwrap_or_default();
        self.lag_samples.push_back(LagSample {
            at: now,
            pid,
            buckets,
        });
        while self
            .lag_samples
            .front()
            .is_some_and(|s| now.duration_since(s.at) > LAG_WINDOW)
        {
            self.lag_samples.pop_front();
        }
        let lag = lag_over(&self.lag_samples);
        if lag.is_none() {
            // Counts went down: start the window over from this scrape.
            self.lag_samples.drain(..self.lag_samples.len() - 1);
        }
        lag
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    async fn status(&self) -> anyhow::Result<Status> {
        Ok(steward_leader::status::read(&self.client, &self.schema).await?)
    }

    pub async fn leader(&self) -> anyhow::Result<LeaderRow> {
        Ok(LeaderRow::of(&self.status().await?))
    }

    /// Reads everything the live view shows, and remembers the branch counters for the totals.
    pub async fn sample(&mut self) -> anyhow::Result<Snapshot> {
        let status = self.status().await?;
        let leader = LeaderRow::of(&status);
        let branches = status.branches;
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
        let promotion_lag = self.promotion_lag(&leader).await;
        Ok(Snapshot {
            leader,
            branches,
            states,
            archived,
            promotion_lag,
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

#[cfg(test)]
mod tests {
    use super::*;

    const SCRAPE: &str = "\
# TYPE steward_promotion_lag_seconds histogram
steward_promotion_lag_seconds_bucket{schema=\"steward\",le=\"0.001\"} 10
steward_promotion_lag_seconds_bucket{schema=\"steward\",le=\"0.002\"} 50
steward_promotion_lag_seconds_bucket{schema=\"steward\",le=\"0.005\"} 90
steward_promotion_lag_seconds_bucket{schema=\"steward\",le=\"0.01\"} 100
steward_promotion_lag_seconds_bucket{schema=\"steward\",le=\"+Inf\"} 100
steward_promotion_lag_seconds_sum{schema=\"steward\"} 0.2
steward_promotion_lag_seconds_count{schema=\"steward\"} 100
steward_maintenance_branch_duration_seconds_bucket{schema=\"steward\",branch=\"x\",le=\"0.001\"} 7
";

    #[test]
    fn promotion_lag_buckets_are_read_from_a_scrape() {
        let buckets = lag_buckets(SCRAPE).unwrap();
        assert_eq!(
            buckets,
            vec![
                (0.001, 10.0),
                (0.002, 50.0),
                (0.005, 90.0),
                (0.01, 100.0),
                (f64::INFINITY, 100.0)
            ]
        );
        assert_eq!(lag_buckets("steward_leader 1\n"), None);
    }

    #[test]
    fn the_window_counts_only_the_promotions_it_saw() {
        let start = Instant::now();
        let sample = |secs: u64, buckets: Buckets| LagSample {
            at: start + Duration::from_secs(secs),
            pid: 1,
            buckets,
        };
        let mut samples = VecDeque::new();
        // Before the first promotion the histogram does not exist.
        samples.push_back(sample(0, Vec::new()));
        samples.push_back(sample(1, vec![(0.001, 5.0), (f64::INFINITY, 5.0)]));
        samples.push_back(sample(
            2,
            vec![(0.001, 5.0), (0.01, 9.0), (f64::INFINITY, 9.0)],
        ));
        let lag = lag_over(&samples).unwrap();
        assert_eq!(lag.jobs, 9);
        assert_eq!(lag.over, Duration::from_secs(2));
        samples.pop_front();
        samples.pop_front();
        // One sample: an empty window.
        let lag = lag_over(&samples).unwrap();
        assert_eq!((lag.jobs, lag.p50), (0, None));
        // Counts going down are not a window.
        samples.push_back(sample(3, vec![(0.001, 1.0), (f64::INFINITY, 1.0)]));
        assert_eq!(lag_over(&samples), None);
    }
}
