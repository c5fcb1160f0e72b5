//! Where a term's tasks get their sessions. One queue per process: each task opens a session of
//! its own, as it always has. A fleet process (ADR 0003): the tasks of every queue it leads in
//! a database take a session from a pool of their class for each piece of work, and point it
//! at their queue's schema first. Classes never share a pool, so one queue's hygiene can never
//! hold a session another queue's promoter is waiting for.

use std::ops::Deref;
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
}

/// A pooled session, pointed at the queue's schema.
pub(crate) type Pooled = deadpool_postgres::Object;

impl SharedPool {
    /// A session of the pool with `search_path` set to this queue's schema. Every user of a
    /// shared pool goes through here, so a session never runs with another queue's path.
    pub async fn get(&self) -> Result<Pooled, String> {
        let session = self.pool.get().await.map_err(|e| e.to_string())?;
        // The schema name is validated (a plain identifier); quoted all the same.
        session
            .batch_execute(&format!("SET search_path = \"{}\"", self.schema))
            .await
            .map_err(|e| describe_pg_error(&e))?;
        Ok(session)
    }
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
    slo: (deadpool_postgres::Pool, Target),
    hygiene: (deadpool_postgres::Pool, Target),
    health: (deadpool_postgres::Pool, Target),
    backlog: (deadpool_postgres::Pool, Target),
    pub wakes: crate::runner::WakeRouter,
}

/// A pool and its target: sessions named `role`, at most `size` of them.
fn pool_of(
    target: Target,
    size: usize,
) -> Result<(deadpool_postgres::Pool, Target), steward_connection::ConnectError> {
    Ok((target.pool(size)?, target))
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
        let shared = |(pool, target): &(deadpool_postgres::Pool, Target)| SharedPool {
            pool: pool.clone(),
            target: target.clone(),
            schema: schema.clone(),
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
