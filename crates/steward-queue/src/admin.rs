//! What an operator does to jobs by hand: list, look at one, retry, cancel, and the depth of
//! each queue. Changes go in batches, each its own short transaction, so that a retry of a
//! million failed jobs never holds a million row locks.

pub mod sql;

use crate::{Job, JobState, Queue, Result};
use chrono::{DateTime, Utc};
use std::collections::BTreeMap;

/// Which jobs a command is about; `None` and empty mean any.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobFilter {
    pub queue: Option<String>,
    pub states: Vec<JobState>,
    pub kind: Option<String>,
}

impl JobFilter {
    fn states(&self) -> Option<Vec<&'static str>> {
        (!self.states.is_empty()).then(|| self.states.iter().map(|s| s.as_str()).collect())
    }

    /// Whether it narrows anything down.
    pub fn is_empty(&self) -> bool {
        self.queue.is_none() && self.states.is_empty() && self.kind.is_none()
    }
}

/// What an operator does to chosen jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Make them available now ([`sql::RETRY`]).
    Retry,
    /// Cancel those that have not finished ([`sql::CANCEL`]).
    Cancel,
}

impl Action {
    fn statement(self) -> &'static str {
        match self {
            Action::Retry => sql::RETRY,
            Action::Cancel => sql::CANCEL,
        }
    }

    /// The states a job can be moved out of by this action.
    pub fn applies_to(self) -> &'static [JobState] {
        match self {
            Action::Retry => &RETRYABLE,
            Action::Cancel => &CANCELLABLE,
        }
    }
}

/// The states a retry moves a job out of.
pub const RETRYABLE: [JobState; 5] = [
    JobState::Scheduled,
    JobState::Retryable,
    JobState::Completed,
    JobState::Failed,
    JobState::Cancelled,
];

/// The states a cancel moves a job out of.
pub const CANCELLABLE: [JobState; 5] = [
    JobState::Scheduled,
    JobState::Available,
    JobState::Running,
    JobState::WaitingExternal,
    JobState::Retryable,
];

/// A job found by [`Queue::find`]: in the jobs table, or moved to the archive.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    pub job: Job,
    pub archived_at: Option<DateTime<Utc>>,
}

/// What happened to one job of a retry or cancel by id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Done; the job was in this state.
    Changed { from: JobState },
    /// Left as it was: retry and cancel do not apply to a job in this state, or (retry) another
    /// unfinished job holds its unique key.
    Unchanged { state: JobState },
    /// No such job in the jobs table (it may have been archived or deleted).
    NotFound,
}

/// The jobs of one queue in one state.
#[derive(Debug, Clone, PartialEq)]
pub struct Depth {
    pub queue: String,
    pub state: JobState,
    pub count: i64,
    /// When this count was taken.
    pub counted_at: DateTime<Utc>,
}

/// One queue's depth by state, and how long its oldest available job has been due.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueDepth {
    pub queue: String,
    pub by_state: BTreeMap<&'static str, i64>,
    /// When the counts were taken (the oldest of them).
    pub counted_at: DateTime<Utc>,
    pub oldest_available_since: Option<DateTime<Utc>>,
}

impl Queue {
    /// Jobs matching `filter`, newest first, at most `limit`, with ids below `before`.
    pub async fn list(
        &self,
        filter: &JobFilter,
        limit: i64,
        before: Option<i64>,
    ) -> Result<Vec<Job>> {
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(sql::LIST).await?;
        let rows = client
            .query(
                &statement,
                &[
                    &filter.queue,
                    &filter.states(),
                    &filter.kind,
                    &before,
                    &limit,
                ],
            )
            .await?;
        rows.iter().map(Job::from_row).collect()
    }

    /// A job by id, in the jobs table or else in the archive.
    pub async fn find(&self, id: i64) -> Result<Option<Found>> {
        if let Some(job) = self.get(id).await? {
            return Ok(Some(Found {
                job,
                archived_at: None,
            }));
        }
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(sql::GET_ARCHIVED).await?;
        match client.query_opt(&statement, &[&id]).await? {
            Some(row) => Ok(Some(Found {
                job: Job::from_row(&row)?,
                archived_at: Some(row.get("archived_at")),
            })),
            None => Ok(None),
        }
    }

    /// Applies `action` to the jobs `ids` in one transaction; with `dry_run`, rolls it back
    /// (nothing changes, nobody is woken) and reports what it would have done.
    pub async fn change_jobs(
        &self,
        action: Action,
        ids: &[i64],
        dry_run: bool,
    ) -> Result<Vec<(i64, Change)>> {
        let mut client = self.pool.get().await?;
        let transaction = client.transaction().await?;
        let statement = transaction.prepare_cached(action.statement()).await?;
        let rows = transaction.query(&statement, &[&ids]).await?;
        match dry_run {
            true => transaction.rollback().await?,
            false => transaction.commit().await?,
        }
        let mut found = BTreeMap::new();
        for row in rows {
            let state = parse_state(row.get(1))?;
            let change = match row.get::<_, bool>(2) {
                true => Change::Changed { from: state },
                false => Change::Unchanged { state },
            };
            found.insert(row.get::<_, i64>(0), change);
        }
        Ok(ids
            .iter()
            .map(|id| (*id, found.get(id).copied().unwrap_or(Change::NotFound)))
            .collect())
    }

    /// How many jobs match `filter` in the states `applies_to` (those of it the filter names, or
    /// all of them).
    pub async fn count_matching(&self, filter: &JobFilter, applies_to: &[JobState]) -> Result<i64> {
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(sql::COUNT_MATCHING).await?;
        let row = client
            .query_one(
                &statement,
                &[&filter.queue, &narrowed(filter, applies_to), &filter.kind],
            )
            .await?;
        Ok(row.get(0))
    }

    /// Applies `action` to every job matching `filter` in the states it applies to, `batch` at a time in id order; `progress` hears the running total
    /// after each batch. Returns how many changed.
    pub async fn change_matching(
        &self,
        filter: &JobFilter,
        action: Action,
        batch: i64,
        mut progress: impl FnMut(u64),
    ) -> Result<u64> {
        let states = narrowed(filter, action.applies_to());
        let mut after = 0i64;
        let mut changed = 0u64;
        loop {
            let ids: Vec<i64> = {
                let client = self.pool.get().await?;
                let statement = client.prepare_cached(sql::MATCHING_IDS).await?;
                client
                    .query(
                        &statement,
                        &[&filter.queue, &states, &filter.kind, &after, &batch],
                    )
                    .await?
                    .iter()
                    .map(|row| row.get(0))
                    .collect()
            };
            let Some(&last) = ids.last() else {
                return Ok(changed);
            };
            after = last;
            let outcome = self.change_jobs(action, &ids, false).await?;
            changed += outcome
                .iter()
                .filter(|(_, change)| matches!(change, Change::Changed { .. }))
                .count() as u64;
            progress(changed);
        }
    }

    /// Each queue's depth by state and its oldest available job. `live` counts the jobs table
    /// now (it reads all of it); otherwise the counts are admin_metadata's latest.
    pub async fn queue_depths(&self, live: bool) -> Result<Vec<QueueDepth>> {
        let client = self.pool.get().await?;
        let statement = match live {
            true => sql::LIVE_DEPTHS,
            false => sql::COUNTED_DEPTHS,
        };
        let mut queues: BTreeMap<String, QueueDepth> = BTreeMap::new();
        for row in client.query(statement, &[]).await? {
            let queue: String = row.get(0);
            let state = parse_state(row.get(1))?;
            let counted_at: DateTime<Utc> = row.get(3);
            let entry = queues.entry(queue.clone()).or_insert_with(|| QueueDepth {
                queue,
                by_state: BTreeMap::new(),
                counted_at,
                oldest_available_since: None,
            });
            entry.by_state.insert(state.as_str(), row.get(2));
            entry.counted_at = entry.counted_at.min(counted_at);
        }
        let names: Vec<&str> = queues.keys().map(String::as_str).collect();
        let statement = client.prepare_cached(sql::OLDEST_AVAILABLE).await?;
        let oldest: Vec<(String, DateTime<Utc>)> = client
            .query(&statement, &[&names])
            .await?
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        for (queue, since) in oldest {
            if let Some(depth) = queues.get_mut(&queue) {
                depth.oldest_available_since = Some(since);
            }
        }
        Ok(queues.into_values().collect())
    }
}

/// The states of `applies_to` that `filter` names, or all of them when it names none.
fn narrowed(filter: &JobFilter, applies_to: &[JobState]) -> Vec<&'static str> {
    applies_to
        .iter()
        .filter(|s| filter.states.is_empty() || filter.states.contains(s))
        .map(|s| s.as_str())
        .collect()
}

fn parse_state(state: String) -> Result<JobState> {
    state
        .parse()
        .map_err(|e: crate::ParseStateError| crate::QueueError::Invalid(e.to_string()))
}
