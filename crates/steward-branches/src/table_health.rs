//! `table_health`: per table of Steward's schema and per index, live and dead tuples, the last
//! (auto)vacuum and (auto)analyze, sizes, a bloat estimate, and invalid indexes, reported as one
//! observation ([`Report`]) each pass. Read-only unless `reindex` is on.
//!
//! Only the queue's own schema is read (`current_schema()`: the sessions pin `search_path` to
//! it), so the series are bounded by Steward's own tables. A partitioned table (`job_archive`)
//! is reported once, its partitions summed, and an index of partitions under its partitioned
//! index's name, so that day partitions coming and going add no series.
//!
//! **Bloat** is estimated from the catalog's statistics, never by reading the relations: the
//! pages a relation would need for its `reltuples` rows (or index entries) of the average width
//! that ANALYZE measured (`pg_stats`), at its fillfactor, against the pages it has (`relpages`).
//! Both come from the last VACUUM or ANALYZE, so the estimate is as fresh as those; it is 0 while
//! a relation has no statistics, and only b-tree indexes on plain columns are estimated. It
//! errs low (b-tree deduplication makes an index smaller than the estimate). For an exact
//! figure, run `pgstattuple('<table>')` or `pgstatindex('<index>')` from the `pgstattuple`
//! extension by hand: they read the whole relation, which is why this branch does not.
//!
//! **Invalid indexes** (`pg_index.indisvalid = false`) are what a failed `CREATE INDEX
//! CONCURRENTLY` or `REINDEX CONCURRENTLY` leaves behind: the latter's `<index>_ccnew` (or,
//! when it failed late, `<index>_ccold`). Writes keep maintaining them, queries never use them.
//!
//! **Repairs**, only with `reindex = true` and only while the UTC time is inside `window`: at
//! most one per pass, an invalid `_ccnew`/`_ccold` leftover is dropped (`DROP INDEX
//! CONCURRENTLY`), or else the valid index with the most estimated bloat above
//! `reindex_bloat_ratio` and `reindex_min_bytes` is rebuilt (`REINDEX INDEX CONCURRENTLY`).
//! Other invalid indexes are only reported (and alerted on): rebuilding one whose build failed on
//! its data would fail again. An index of a table with an index build in progress is left alone.
//! A repair needs the table's owner (the maintenance role of `steward role create` is not): a
//! refused one is reported as skipped. `rows` counts repairs.
//!
//! A repair cannot run in a transaction, so it is not fenced itself: the pass checks its term in
//! the fenced transaction that reads the indexes just before, and a session-level advisory lock
//! ([`TRY_LOCK_REPAIRS`]) keeps a second instance (a new term's leader, say) from starting a
//! repair while one runs. Two repairs of one index would be safe anyway: each waits for the
//! other's lock on the table, and a drop is `IF EXISTS`.

use crate::config::branch_settings;
use crate::{Branch, BranchContext, BranchError, Class, InvalidConfig, Observation, Outcome};
use async_trait::async_trait;
use chrono::{NaiveTime, Timelike, Utc};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

/// Every table of the schema (partitions summed into their root): tuples, vacuum and analyze
/// times (the later of manual and auto; of any partition), size without indexes, and the heap
/// bloat estimate in bytes (NULL without statistics for every column). A heap tuple is a line
/// pointer (4 bytes), a 23-byte header with a null bitmap when a column holds nulls, MAXALIGNed,
/// and its data (the columns' average widths, nulls weighted out), MAXALIGNed; a page holds
/// block_size − 24 bytes of them, up to the table's fillfactor. Catalog and statistics views
/// only.
pub const TABLES: &str = "
WITH rel AS (
    SELECT c.oid, c.relname, c.relkind, c.relpages, c.reltuples,
           coalesce(pg_partition_root(c.oid), c.oid) AS root,
           coalesce((SELECT o.option_value::int FROM pg_options_to_table(c.reloptions) o
                     WHERE o.option_name = 'fillfactor'), 100) AS fillfactor
    FROM pg_class c
    WHERE c.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema())
      AND c.relkind IN ('r', 'p')
),
width AS (
    SELECT r.oid,
           CASE WHEN count(s.attname) = count(*) THEN sum((1 - s.null_frac) * s.avg_width) END
               AS data_width,
           coalesce(bool_or(s.null_frac > 0), false) AS nullable,
           count(*) AS columns
    FROM rel r
    JOIN pg_attribute a ON a.attrelid = r.oid AND a.attnum > 0 AND NOT a.attisdropped
    LEFT JOIN pg_stats s ON s.schemaname = current_schema() AND s.tablename = r.relname
                        AND s.attname = a.attname AND NOT s.inherited
    WHERE r.relkind = 'r'
    GROUP BY r.oid
),
leaf AS (
    SELECT r.root, pg_table_size(r.oid) AS bytes,
           st.n_live_tup, st.n_dead_tup,
           greatest(st.last_vacuum, st.last_autovacuum) AS vacuumed,
           greatest(st.last_analyze, st.last_autoanalyze) AS analyzed,
           CASE WHEN r.reltuples >= 0 AND w.data_width IS NOT NULL THEN
               greatest(0, r.relpages - ceil(
                   r.reltuples
                   * (4 + 8 * ceil((23 + CASE WHEN w.nullable THEN ceil(w.columns / 8.0) ELSE 0 END)
                                   / 8.0)
                        + 8 * ceil(w.data_width / 8.0))
                   / ((current_setting('block_size')::int - 24) * r.fillfactor / 100.0)
               )) * current_setting('block_size')::int
           END AS bloat
    FROM rel r
    LEFT JOIN width w ON w.oid = r.oid
    LEFT JOIN pg_stat_user_tables st ON st.relid = r.oid
)
SELECT t.relname::text,
       coalesce(sum(l.n_live_tup), 0)::int8,
       coalesce(sum(l.n_dead_tup), 0)::int8,
       coalesce(sum(l.bytes), 0)::int8,
       sum(l.bloat)::int8,
       extract(epoch FROM max(l.vacuumed))::float8,
       extract(epoch FROM max(l.analyzed))::float8
FROM leaf l JOIN pg_class t ON t.oid = l.root
GROUP BY t.relname
ORDER BY t.relname";

/// Every index of the schema's tables, partitions' included: its table and its name as
/// reported (a partition's and its index's under their roots), its qualified name (quoted, for
/// a repair's DDL), validity, size, the bloat estimate (bytes, and the share of the index's
/// pages) of a b-tree on plain columns with statistics, whether it is a `_ccnew`/`_ccold`
/// leftover, and whether an index build is in progress on its table. An index tuple is a line
/// pointer (4 bytes) and an 8-byte header (with a 4-byte null bitmap when a key holds nulls)
/// and its data, MAXALIGNed; a leaf page holds block_size − 24 − 16 bytes of them, up to the
/// fillfactor (90 by default); one metapage. Catalog and statistics views only.
pub const INDEXES: &str = "
WITH idx AS (
    SELECT i.indexrelid, i.indrelid, i.indisvalid, i.indkey::int2[] AS keys,
           ci.relname AS index_name, ci.relkind, ci.relpages, ci.reltuples, am.amname,
           ct.relname AS table_name, n.nspname,
           coalesce(pg_partition_root(i.indrelid), i.indrelid) AS table_root,
           coalesce(pg_partition_root(i.indexrelid), i.indexrelid) AS index_root,
           coalesce((SELECT o.option_value::int FROM pg_options_to_table(ci.reloptions) o
                     WHERE o.option_name = 'fillfactor'), 90) AS fillfactor
    FROM pg_index i
    JOIN pg_class ci ON ci.oid = i.indexrelid
    JOIN pg_class ct ON ct.oid = i.indrelid
    JOIN pg_namespace n ON n.oid = ct.relnamespace
    JOIN pg_am am ON am.oid = ci.relam
    WHERE n.nspname = current_schema() AND ci.relkind IN ('i', 'I')
),
width AS (
    SELECT x.indexrelid,
           CASE WHEN bool_and(k.attnum > 0) AND count(s.attname) = count(*)
                THEN sum((1 - s.null_frac) * s.avg_width) END AS data_width,
           coalesce(bool_or(s.null_frac > 0), false) AS nullable
    FROM idx x
    CROSS JOIN LATERAL unnest(x.keys) AS k(attnum)
    LEFT JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.attnum
    LEFT JOIN pg_stats s ON s.schemaname = current_schema() AND s.tablename = x.table_name
                        AND s.attname = a.attname AND NOT s.inherited
    GROUP BY x.indexrelid
),
estimate AS (
    SELECT x.*,
           CASE WHEN x.relkind = 'i' AND x.amname = 'btree' AND x.reltuples >= 0 AND x.relpages > 0
                     AND w.data_width IS NOT NULL THEN
               greatest(0, x.relpages - 1 - ceil(
                   x.reltuples
                   * (4 + 8 * ceil((8 + CASE WHEN w.nullable THEN 4 ELSE 0 END + w.data_width) / 8.0))
                   / ((current_setting('block_size')::int - 40) * x.fillfactor / 100.0)
               ))
           END AS bloat_pages
    FROM idx x LEFT JOIN width w ON w.indexrelid = x.indexrelid
)
SELECT tr.relname::text AS table_label, ir.relname::text AS index_label,
       format('%I.%I', e.nspname, e.index_name) AS qualified,
       e.indisvalid,
       coalesce(pg_relation_size(e.indexrelid), 0)::int8 AS bytes,
       (e.bloat_pages * current_setting('block_size')::int)::int8 AS bloat_bytes,
       (e.bloat_pages / e.relpages)::float8 AS bloat_ratio,
       e.index_name ~ '_cc(new|old)[0-9]*$' AS leftover,
       EXISTS (SELECT 1 FROM pg_stat_progress_create_index p WHERE p.relid = e.indrelid)
           AS building,
       e.relkind = 'i' AS leaf
FROM estimate e
JOIN pg_class tr ON tr.oid = e.table_root
JOIN pg_class ir ON ir.oid = e.index_root
ORDER BY 1, 2, 3";

/// Serializes repairs between instances (a leader and one that took over while a repair ran):
/// a session-level lock, held from before the indexes are read until the repair's end, since a
/// concurrent repair cannot run in a transaction that a transaction-level lock would last for.
/// Scoped to this schema's `jobs`, since one database can hold several Steward schemas.
pub const TRY_LOCK_REPAIRS: &str = "
SELECT pg_try_advisory_lock(hashtext('steward.table_health_repair'), 'jobs'::regclass::oid::int4)";

/// Releases [`TRY_LOCK_REPAIRS`].
pub const UNLOCK_REPAIRS: &str = "
SELECT pg_advisory_unlock(hashtext('steward.table_health_repair'), 'jobs'::regclass::oid::int4)";

branch_settings! {
    /// Settings of `table_health`.
    pub struct Config {
        interval: Duration::from_secs(60),
        checks: Config::own_problems,
        /// Repair indexes within `window` (at most one per pass): drop invalid `_ccnew`/`_ccold`
        /// leftovers, rebuild bloated indexes concurrently. Off: the branch only reads.
        pub reindex: bool = false,
        /// When repairs may start, `HH:MM-HH:MM` in UTC (it may span midnight, e.g.
        /// `23:00-01:00`). Required with `reindex`. A repair started inside it may run past its
        /// end, for up to `reindex_timeout`.
        pub window: Option<String> = None,
        /// A valid index is rebuilt when its estimated bloat is over this share of its pages...
        pub reindex_bloat_ratio: f64 = 0.5,
        /// ... and at least this many bytes.
        pub reindex_min_bytes: i64 = 10 * 1024 * 1024,
        /// Statement and lock timeout of one repair. A rebuild that times out leaves an invalid
        /// `_ccnew` index behind, which the next pass in the window drops. Keep it below
        /// `--loop-stall-limit` (2 min by default): the loop shows no progress meanwhile.
        #[serde(with = "humantime_serde")]
        pub reindex_timeout: Duration = Duration::from_secs(60),
    }
}

impl Config {
    fn own_problems(&self) -> Vec<InvalidConfig> {
        let mut problems = Vec::new();
        match &self.window {
            Some(window) => {
                if let Err(e) = window.parse::<MaintenanceWindow>() {
                    problems.push(InvalidConfig::new("window", window, e.to_string()));
                }
            }
            None if self.reindex => problems.push(InvalidConfig::new(
                "window",
                &self.window,
                "is required when reindex = true: the UTC hours repairs may start in, \
                 e.g. \"02:00-04:00\"",
            )),
            None => {}
        }
        if !(self.reindex_bloat_ratio > 0.0 && self.reindex_bloat_ratio < 1.0) {
            problems.push(InvalidConfig::new(
                "reindex_bloat_ratio",
                self.reindex_bloat_ratio,
                "must be above 0 and below 1 (the estimated share of an index's pages that is bloat)",
            ));
        }
        if self.reindex_min_bytes < 0 {
            problems.push(InvalidConfig::new(
                "reindex_min_bytes",
                self.reindex_min_bytes,
                "must be 0 or more",
            ));
        }
        if self.reindex_timeout < Duration::from_secs(1)
            || self.reindex_timeout > Duration::from_secs(86_400)
        {
            problems.push(InvalidConfig::new(
                "reindex_timeout",
                self.reindex_timeout,
                "must be between 1s and 24h",
            ));
        }
        problems
    }
}

/// The UTC hours in which repairs may start: from `start` (included) to `end` (excluded),
/// across midnight when `end` is before `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaintenanceWindow {
    pub start: NaiveTime,
    pub end: NaiveTime,
}

/// Why a maintenance window does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadWindow {
    #[error("must be HH:MM-HH:MM in UTC, e.g. \"02:00-04:00\"")]
    Format,
    #[error("starts and ends at the same time: give a window of at least a minute")]
    Empty,
}

impl FromStr for MaintenanceWindow {
    type Err = BadWindow;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let time = |t: &str| {
            let t = t.trim();
            // Exactly HH:MM: chrono would also take a single-digit hour.
            if t.len() != 5 {
                return Err(BadWindow::Format);
            }
            NaiveTime::parse_from_str(t, "%H:%M").map_err(|_| BadWindow::Format)
        };
        let (start, end) = s.split_once('-').ok_or(BadWindow::Format)?;
        let (start, end) = (time(start)?, time(end)?);
        if start == end {
            return Err(BadWindow::Empty);
        }
        Ok(Self { start, end })
    }
}

impl MaintenanceWindow {
    pub fn contains(&self, time: NaiveTime) -> bool {
        if self.start < self.end {
            self.start <= time && time < self.end
        } else {
            time >= self.start || time < self.end
        }
    }
}

impl fmt::Display for MaintenanceWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:02}:{:02}-{:02}:{:02} UTC",
            self.start.hour(),
            self.start.minute(),
            self.end.hour(),
            self.end.minute()
        )
    }
}

/// One table (a partitioned one with its partitions summed).
#[derive(Debug, Clone, PartialEq)]
pub struct TableStats {
    pub table: String,
    pub live_tuples: i64,
    pub dead_tuples: i64,
    /// Heap, TOAST, free space and visibility maps; no indexes.
    pub bytes: i64,
    /// `None` while the table has no statistics for every column.
    pub bloat_bytes: Option<i64>,
    /// Unix time of the last vacuum, manual or auto; `None`: never.
    pub last_vacuum: Option<f64>,
    /// Unix time of the last analyze, manual or auto; `None`: never.
    pub last_analyze: Option<f64>,
}

/// One index (an index of partitions under its partitioned index's name).
#[derive(Debug, Clone, PartialEq)]
pub struct IndexStats {
    pub table: String,
    pub index: String,
    pub bytes: i64,
    /// `None` for an index that is not estimated (not a b-tree on plain columns, or without
    /// statistics).
    pub bloat_bytes: Option<i64>,
    pub valid: bool,
}

/// What a pass found, the whole schema each time: what is no longer listed is gone.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    pub tables: Vec<TableStats>,
    pub indexes: Vec<IndexStats>,
}

/// A repair a pass made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    /// `DROP INDEX CONCURRENTLY` of an invalid leftover.
    Drop,
    /// `REINDEX INDEX CONCURRENTLY` of a bloated index.
    Reindex,
}

impl Repair {
    /// The statement that makes it.
    pub fn statement(self) -> &'static str {
        match self {
            Repair::Drop => "DROP INDEX CONCURRENTLY",
            Repair::Reindex => "REINDEX INDEX CONCURRENTLY",
        }
    }
}

/// An index as [`INDEXES`] returns it, with what a repair needs.
#[derive(Debug, Clone)]
struct IndexRow {
    stats: IndexStats,
    qualified: String,
    bloat_ratio: Option<f64>,
    leftover: bool,
    building: bool,
    leaf: bool,
}

pub struct TableHealth {
    config: Config,
    /// Parsed from `config.window` when repairs are on (validation refuses them without one).
    window: Option<MaintenanceWindow>,
}

impl TableHealth {
    pub fn new(config: Config) -> Self {
        let window = config
            .window
            .as_deref()
            .and_then(|w| w.parse().ok())
            .filter(|_| config.reindex);
        Self { config, window }
    }

    /// Whether a repair may start now.
    fn in_window(&self) -> bool {
        self.window
            .is_some_and(|window| window.contains(Utc::now().time()))
    }

    /// The one repair to make, if any: a leftover to drop first, else the most bloated index
    /// over both thresholds.
    fn choose<'a>(&self, indexes: &'a [IndexRow]) -> Option<(Repair, &'a IndexRow)> {
        let candidates = || indexes.iter().filter(|i| i.leaf && !i.building);
        if let Some(leftover) = candidates().find(|i| !i.stats.valid && i.leftover) {
            return Some((Repair::Drop, leftover));
        }
        candidates()
            .filter(|i| i.stats.valid)
            .filter(|i| {
                i.bloat_ratio
                    .is_some_and(|r| r > self.config.reindex_bloat_ratio)
            })
            .filter(|i| {
                i.stats
                    .bloat_bytes
                    .is_some_and(|b| b >= self.config.reindex_min_bytes)
            })
            .max_by_key(|i| i.stats.bloat_bytes)
            .map(|i| (Repair::Reindex, i))
    }

    /// Runs `repair` on `index` outside any transaction, under the session-level lock taken
    /// by the caller, with this branch's repair timeouts for the one statement.
    async fn repair(
        &self,
        client: &Client,
        repair: Repair,
        index: &IndexRow,
    ) -> Result<(), tokio_postgres::Error> {
        // REINDEX and DROP INDEX CONCURRENTLY refuse to run in a transaction block (and a
        // multi-statement simple query is one), so the timeouts are session settings, each
        // statement sent on its own, and reset after.
        let timeout = format!("{}ms", self.config.reindex_timeout.as_millis());
        client
            .batch_execute(&format!("SET statement_timeout = '{timeout}'"))
            .await?;
        client
            .batch_execute(&format!("SET lock_timeout = '{timeout}'"))
            .await?;
        // `qualified` is quoted by the server (format('%I.%I')).
        let ddl = match repair {
            Repair::Drop => format!("{} IF EXISTS {}", repair.statement(), index.qualified),
            Repair::Reindex => format!("{} {}", repair.statement(), index.qualified),
        };
        let done = client.batch_execute(&ddl).await;
        let reset = client
            .batch_execute("RESET statement_timeout")
            .await
            .and(client.batch_execute("RESET lock_timeout").await);
        done.and(reset)
    }
}

fn table_stats(row: &tokio_postgres::Row) -> TableStats {
    TableStats {
        table: row.get(0),
        live_tuples: row.get(1),
        dead_tuples: row.get(2),
        bytes: row.get(3),
        bloat_bytes: row.get(4),
        last_vacuum: row.get(5),
        last_analyze: row.get(6),
    }
}

fn index_row(row: &tokio_postgres::Row) -> IndexRow {
    IndexRow {
        stats: IndexStats {
            table: row.get(0),
            index: row.get(1),
            valid: row.get(3),
            bytes: row.get(4),
            bloat_bytes: row.get(5),
        },
        qualified: row.get(2),
        bloat_ratio: row.get(6),
        leftover: row.get(7),
        building: row.get(8),
        leaf: row.get(9),
    }
}

/// The indexes as reported: each index of partitions once, under its partitioned index's name,
/// its partitions' sizes and estimates summed, invalid when any of them is.
fn rolled_up(indexes: &[IndexRow]) -> Vec<IndexStats> {
    let mut by_name: BTreeMap<(&str, &str), IndexStats> = BTreeMap::new();
    for row in indexes {
        let stats = &row.stats;
        by_name
            .entry((&stats.table, &stats.index))
            .and_modify(|sum| {
                sum.bytes += stats.bytes;
                sum.bloat_bytes = match (sum.bloat_bytes, stats.bloat_bytes) {
                    (None, None) => None,
                    (a, b) => Some(a.unwrap_or(0) + b.unwrap_or(0)),
                };
                sum.valid &= stats.valid;
            })
            .or_insert_with(|| stats.clone());
    }
    by_name.into_values().collect()
}

#[async_trait]
impl Branch for TableHealth {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn class(&self) -> Class {
        Class::Hygiene
    }

    fn interval(&self) -> Duration {
        self.config.interval
    }

    /// A repair can take minutes: with repairs on, the branch runs on a loop of its own so that
    /// its siblings on the hygiene loop do not wait for it.
    fn needs_own_loop(&self) -> bool {
        self.config.reindex
    }

    async fn run(&self, ctx: &mut BranchContext<'_>) -> Result<Outcome, BranchError> {
        let repairing = self.in_window();
        // Read in a fenced transaction for its timeouts (a catalog read waits on a relation
        // that is being dropped); the lock, session-level, outlives it.
        let tx = ctx.fenced().await?;
        let locked = if repairing {
            tx.query_one(TRY_LOCK_REPAIRS, &[]).await?.get::<_, bool>(0)
        } else {
            false
        };
        let read = async {
            let tables = tx.query(TABLES, &[]).await?;
            let indexes = tx.query(INDEXES, &[]).await?;
            tx.commit().await?;
            Ok::<_, tokio_postgres::Error>((tables, indexes))
        };
        let (tables, indexes) = match read.await {
            Ok(read) => read,
            Err(e) => {
                if locked {
                    let _ = ctx.client.query_one(UNLOCK_REPAIRS, &[]).await;
                }
                return Err(e.into());
            }
        };
        let indexes: Vec<IndexRow> = indexes.iter().map(index_row).collect();
        let report = Report {
            tables: tables.iter().map(table_stats).collect(),
            indexes: rolled_up(&indexes),
        };

        let mut rows = 0;
        let mut observations = Vec::new();
        if locked {
            let chosen = self.choose(&indexes);
            let repaired = match chosen {
                Some((repair, index)) => {
                    tracing::info!(index = %index.qualified, statement = repair.statement(), estimated_bloat_bytes = ?index.stats.bloat_bytes, "table_health: repairing an index");
                    Some((repair, index, self.repair(ctx.client, repair, index).await))
                }
                None => None,
            };
            let unlocked = ctx.client.query_one(UNLOCK_REPAIRS, &[]).await;
            match repaired {
                Some((_, _, Ok(()))) => rows = 1,
                Some((repair, index, Err(e)))
                    if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) =>
                {
                    let reason = format!(
                        "{} needs the owner of the index's table: {}",
                        repair.statement(),
                        steward_connection::describe_pg_error(&e)
                    );
                    tracing::warn!(index = %index.qualified, %reason, "table_health: repair refused");
                    observations.push(Observation::Skipped {
                        what: format!("index {}", index.qualified),
                        reason,
                    });
                }
                Some((_, index, Err(e))) => {
                    tracing::warn!(index = %index.qualified, error = %steward_connection::describe_pg_error(&e), "table_health: repair failed");
                    return Err(e.into());
                }
                None => {}
            }
            unlocked?;
        }
        observations.insert(0, Observation::TableHealth(report));
        Ok(Outcome {
            rows,
            run_again_in: None,
            observations,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(h: u32, m: u32) -> NaiveTime {
        NaiveTime::from_hms_opt(h, m, 0).unwrap()
    }

    #[test]
    fn a_window_parses_and_contains_its_start_but_not_its_end() {
        let w: MaintenanceWindow = "02:00-04:00".parse().unwrap();
        assert_eq!(w.to_string(), "02:00-04:00 UTC");
        assert!(!w.contains(at(1, 59)));
        assert!(w.contains(at(2, 0)));
        assert!(w.contains(at(3, 59)));
        assert!(!w.contains(at(4, 0)));
    }

    #[test]
    fn a_window_may_span_midnight() {
        let w: MaintenanceWindow = " 23:30 - 00:30 ".parse().unwrap();
        assert!(w.contains(at(23, 45)));
        assert!(w.contains(at(0, 15)));
        assert!(!w.contains(at(0, 30)));
        assert!(!w.contains(at(12, 0)));
    }

    #[test]
    fn bad_windows_say_what_is_expected() {
        for bad in [
            "",
            "02:00",
            "2:00-04:00",
            "02:00-24:00",
            "25:00-04:00",
            "02:00-04:00-05:00",
            "two-four",
        ] {
            assert_eq!(
                bad.parse::<MaintenanceWindow>(),
                Err(BadWindow::Format),
                "{bad:?}"
            );
        }
        assert_eq!(
            "03:00-03:00".parse::<MaintenanceWindow>(),
            Err(BadWindow::Empty)
        );
    }

    #[test]
    fn repairs_need_a_window_and_sane_thresholds() {
        let config = Config {
            reindex: true,
            ..Config::default()
        };
        let problems = config.validate();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].key, "window");
        let config = Config {
            window: Some("2am-4am".into()),
            reindex_bloat_ratio: 1.5,
            reindex_min_bytes: -1,
            reindex_timeout: Duration::ZERO,
            ..Config::default()
        };
        let keys: Vec<String> = config.validate().into_iter().map(|p| p.key).collect();
        assert_eq!(
            keys,
            [
                "window",
                "reindex_bloat_ratio",
                "reindex_min_bytes",
                "reindex_timeout"
            ]
        );
        assert_eq!(Config::default().validate(), vec![]);
    }

    #[test]
    fn without_reindex_there_is_no_window_to_repair_in() {
        let branch = TableHealth::new(Config {
            window: Some("00:00-23:59".into()),
            ..Config::default()
        });
        assert!(branch.window.is_none());
        assert!(!branch.needs_own_loop());
    }
}
