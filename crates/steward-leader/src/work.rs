//! Where a term's tasks get their sessions. One queue per process: each task opens a session of
//! its own, as it always has. A fleet process (ADR 0003): the tasks of every queue it leads in
//! a database take a session from a pool of their class for each piece of work, and point it
//! at their queue's schema first. Classes never share a pool, so one queue's hygiene can never
//! hold a session another queue's promoter is waiting for.

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::{Arc, Mutex};
use steward_connection::{describe_pg_error, Reconnecting, SchemaName, Target};
use tokio_postgres::Client;

/// A pool shared by the queues a fleet process leads in one database, and the queue (schema)
/// its user works on.
#[derive(Clone)]
pub(crate) struct SharedPool {
    pub pool: deadpool_postgres::Pool,
    /// The pool's sessions' target: where a running statement is cancelled.
    pub target: Target,
    pub schema: SchemaName,
    /// The schema each of the pool's sessions was last pointed at, so that a session that
    /// serves the same queue again needs no `SET`.
    paths: SearchPaths,
}

type SearchPaths = Arc<Mutex<HashMap<deadpool::managed::ObjectId, SchemaName>>>;

/// A pooled session, pointed at the queue's schema.
pub(crate) type Pooled = deadpool_postgres::Object;

impl SharedPool {
    /// A session of the pool with `search_path` set to this queue's schema. Every user of a
    /// shared pool goes through here, so a session never runs with another queue's path.
    pub async fn get(&self) -> Result<Pooled, String> {
        let session = self.pool.get().await.map_err(|e| e.to_string())?;
        let id = Pooled::id(&session);
        let current = lock(&self.paths).get(&id) == Some(&self.schema);
        if !current {
            // Forgotten first: a SET that fails leaves the session's path unknown.
            lock(&self.paths).remove(&id);
            // The schema name is validated (a plain identifier); quoted all the same.
            session
                .batch_execute(&format!("SET search_path = \"{}\"", self.schema))
                .await
                .map_err(|e| describe_pg_error(&e))?;
            lock(&self.paths).insert(id, self.schema.clone());
        }
        Ok(session)
    }
}

fn lock(
    paths: &SearchPaths,
) -> std::sync::MutexGuard<'_, HashMap<deadpool::managed::ObjectId, SchemaName>> {
    paths.lock().unwrap_or_else(|p| p.into_inner())
}

/// A periodic task's sessions: its own, reopened when it ends, or a shared pool's.
pub(crate) enum Sessions {
    Own(Box<Reconnecting>),
    Shared(Box<SharedPool>),
}

/// A session to run statements on, for as long as it is held.
pub(crate) enum Session<'a> {
    Own(&'a Client),
    Shared(Box<Pooled>),
}

impl Deref for Session<'_> {
    type Target = Client;

    fn deref(&self) -> &Client {
        match self {
            Session::Own(client) => client,
            Session::Shared(pooled) => pooled,
        }
    }
}

impl Sessions {
    pub fn own(target: Target) -> Self {
        Sessions::Own(Box::new(Reconnecting::new(target)))
    }

    pub async fn get(&mut self) -> Result<Session<'_>, String> {
        match self {
            Sessions::Own(session) => session
                .get()
                .await
                .map(Session::Own)
                .map_err(|e| e.to_string()),
            Sessions::Shared(pool) => pool.get().await.map(|s| Session::Shared(Box::new(s))),
        }
    }
}

/// A fleet process's pools in one database, shared by every queue it leads there.
#[derive(Clone)]
pub(crate) struct DatabasePools {
    slo: PoolOf,
    hygiene: PoolOf,
    health: PoolOf,
    backlog: PoolOf,
    pub wakes: crate::runner::WakeRouter,
}

/// A pool, its target, and where its sessions point.
type PoolOf = (deadpool_postgres::Pool, Target, SearchPaths);

/// A pool of at most `size` sessions of `target`.
fn pool_of(target: Target, size: usize) -> Result<PoolOf, steward_connection::ConnectError> {
    Ok((target.pool(size)?, target, SearchPaths::default()))
}

impl DatabasePools {
    pub fn new(
        instance: &crate::instance::Instance,
        settings: &crate::settings::LeaderSettings,
        fleet: &crate::settings::FleetSettings,
    ) -> Result<Self, steward_connection::ConnectError> {
        Ok(Self {
            slo: pool_of(instance.work_session("slo"), fleet.slo_sessions)?,
            hygiene: pool_of(instance.work_session("hygiene"), fleet.hygiene_sessions)?,
            health: pool_of(instance.work_session("health"), 1)?,
            backlog: pool_of(
                instance.session("backlog").with_setting(
                    "statement_timeout",
                    crate::backlog::statement_timeout(settings.backlog_interval),
                ),
                1,
            )?,
            wakes: Default::default(),
        })
    }

    /// The pools as one queue uses them.
    pub fn for_queue(&self, schema: &SchemaName) -> QueuePools {
        let shared = |(pool, target, paths): &PoolOf| SharedPool {
            pool: pool.clone(),
            target: target.clone(),
            schema: schema.clone(),
            paths: paths.clone(),
        };
        QueuePools {
            slo: shared(&self.slo),
            hygiene: shared(&self.hygiene),
            health: shared(&self.health),
            backlog: shared(&self.backlog),
            wakes: self.wakes.clone(),
        }
    }
}

/// One queue's view of its database's pools.
pub(crate) struct QueuePools {
    pub slo: SharedPool,
    pub hygiene: SharedPool,
    pub health: SharedPool,
    pub backlog: SharedPool,
    pub wakes: crate::runner::WakeRouter,
}

impl QueuePools {
    /// A loop whose branches are all SLO branches takes SLO sessions; any other loop (hygiene,
    /// or monolithic mode's single loop) takes hygiene sessions, so it can never hold up another
    /// queue's promoter or rescues.
    pub fn for_loop(&self, planned: &crate::plan::PlannedLoop) -> crate::runner::LoopSessions {
        let slo = planned
            .branches
            .iter()
            .all(|b| b.class() == steward_branches::Class::Slo);
        crate::runner::LoopSessions::Shared {
            pool: if slo {
                self.slo.clone()
            } else {
                self.hygiene.clone()
            },
            wakes: self.wakes.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use steward_testkit::TestDb;

    /// Queues taking turns on one pooled session each see their own schema: the path is set
    /// when the session last served another queue, and only then.
    #[tokio::test]
    async fn a_shared_session_always_runs_with_its_users_schema() {
        let db = TestDb::new().await;
        let (pool, target, paths) = pool_of(db.target().clone(), 1).unwrap();
        let for_schema = |schema: &str| SharedPool {
            pool: pool.clone(),
            target: target.clone(),
            schema: schema.parse().unwrap(),
            paths: paths.clone(),
        };
        let (a, b) = (for_schema("queue_a"), for_schema("queue_b"));
        for (user, expected) in [
            (&a, "queue_a"),
            (&a, "queue_a"),
            (&b, "queue_b"),
            (&a, "queue_a"),
        ] {
            let session = user.get().await.unwrap();
            let path: String = session
                .query_one("SELECT current_setting('search_path')", &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(path.trim_matches('"'), expected);
        }
        let remembered: Vec<String> = lock(&paths).values().map(|s| s.to_string()).collect();
        assert_eq!(remembered, ["queue_a"], "one session, its last path");
    }
}
