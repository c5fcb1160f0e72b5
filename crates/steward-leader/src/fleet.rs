//! A process that maintains many queues (ADR 0003). Per database it keeps one **fleet
//! session**, named `steward:<instance>:fleet`, which holds the leadership lock of every queue
//! the process leads there, and shared pools for the work (see `work.rs`). Every poll interval
//! the fleet session reads who leads what and applies the share rule (`share.rs`); a queue it
//! wins gets a term exactly like a single queue's: its own epoch, fence, loops, quiet periods
//! and health. A process stepping down from a queue says so with `NOTIFY steward_fleet`, so the
//! next process takes it at once rather than at its next poll.

use crate::health::HealthRegistry;
use crate::instance::{Instance, WITHDRAW};
use crate::observe::{LeadershipEvent, Observer, Observers};
use crate::plan::LoopPlan;
use crate::runner::ContactMonitor;
use crate::session::{like_escape, END_TERM, START_TERM, TERMINATE_INSTANCE};
use crate::settings::{FleetSettings, LeaderSettings};
use crate::share::{Action, FleetView, ShareRule};
use crate::term::{self, Holder, TermEnd, TermSessions};
use crate::work::DatabasePools;
use crate::{pinning, LeaderError};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use steward_branches::Branch;
use steward_connection::{describe_pg_error, Notifications, SchemaName, Target};
use tokio::task::JoinSet;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

/// The channel on which a process that steps down from a queue tells the fleet.
pub const FLEET_CHANNEL: &str = "steward_fleet";

/// The fleet as one process sees it in its database: the live fleet sessions, and the session
/// that holds each queue's lock. Reads the lock table once (`MATERIALIZED`) and
/// `pg_stat_activity`; no user table.
pub const FLEET_VIEW: &str = "
WITH held AS MATERIALIZED (
    SELECT l.classid, l.objid, a.application_name
    FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
    WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
), q AS (
    SELECT s, hashtextextended('steward.leader.' || s, 0) AS k FROM unnest($1::text[]) AS s
)
SELECT q.s, held.application_name,
    ARRAY(SELECT DISTINCT a.application_name::text FROM pg_stat_activity a
          WHERE a.application_name LIKE 'steward:%:fleet'
            AND a.datname = current_database()),
    pg_is_in_recovery() OR current_setting('default_transaction_read_only')::bool
FROM q LEFT JOIN held
  ON held.classid = ((q.k >> 32) & 4294967295)::oid AND held.objid = (q.k & 4294967295)::oid";

/// Tries the leadership locks of the queues `$1`, in their order and without waiting, until
/// `$2` are won; returns those. The plan streams (a function scan yielding the array in order,
/// a filter, a limit): the limit stops the scan, so no lock beyond the `$2`-th won is tried.
/// No ORDER BY, which would evaluate the filter, and take the locks, of every row first.
pub const TRY_LOCKS: &str = "
SELECT s FROM unnest($1::text[]) AS s
WHERE pg_try_advisory_lock(hashtextextended('steward.leader.' || s, 0))
LIMIT $2";

/// Releases one queue's lock (the queue's schema `$1`).
pub const RELEASE_QUEUE: &str =
    "SELECT pg_advisory_unlock(hashtextextended('steward.leader.' || $1::text, 0))";

/// The fleet session's probe: whether the server refuses writes, and which of the queues `$1`
/// this session's backend holds the lock of. Reads the lock table once.
pub const FLEET_PROBE: &str = "
WITH mine AS MATERIALIZED (
    SELECT classid, objid FROM pg_locks
    WHERE locktype = 'advisory' AND granted AND objsubid = 1 AND pid = pg_backend_pid()
)
SELECT pg_is_in_recovery() OR current_setting('default_transaction_read_only')::bool,
    ARRAY(SELECT s FROM unnest($1::text[]) AS s,
                 LATERAL (SELECT hashtextextended('steward.leader.' || s, 0) AS k) h
          WHERE EXISTS (SELECT 1 FROM mine
                        WHERE mine.classid = ((h.k >> 32) & 4294967295)::oid
                          AND mine.objid = (h.k & 4294967295)::oid))";

/// How long a term's start may wait for the previous term's passes (its `FOR UPDATE` on the
/// leader row) before the fleet session gives the queue up for this round: the fleet session
/// serves every queue, so it must not wait on one for long.
const START_TERM_LOCK_TIMEOUT: &str = "2s";

/// The name a fleet term's task is reported under when it dies (`loop_restarted`).
pub const TERM_TASK: &str = "term";

/// A queue whose schema this steward cannot run (another version) is tried again after this.
const REFUSED_RECHECK: Duration = Duration::from_secs(60);

/// One queue of the list: where it is and its name (the schema, or `<database>/<schema>` when
/// the list spans databases).
#[derive(Debug, Clone)]
pub struct QueueRef {
    pub name: String,
    /// The database's name, when the list spans databases.
    pub database: Option<String>,
    pub target: Target,
}

/// A database the fleet serves, and its queues.
#[derive(Debug, Clone)]
pub struct DatabaseQueues {
    /// The database's URL, as a target (its schema is not used).
    pub target: Target,
    /// Schemas named in the configuration.
    pub schemas: Vec<SchemaName>,
    /// Also every schema that holds Steward's tables, checked again every
    /// `FleetSettings::discover_interval`.
    pub discover: bool,
}

/// What the embedding process supplies for each queue as it joins the list.
pub trait QueueSetup: Send + Sync {
    /// The queue's branches (built per queue: a branch may keep state between passes).
    fn branches(&self) -> Vec<Arc<dyn Branch>>;
    /// Observers of the queue's terms and passes, e.g. its metrics, labelled with the queue.
    fn observers(
        &self,
        queue: &QueueRef,
        plan: &LoopPlan,
        health: &HealthRegistry,
    ) -> Vec<Arc<dyn Observer>>;
    /// The queue left the list (its schema is gone): forget it.
    fn removed(&self, _queue: &QueueRef) {}
    /// After each round in `database`: the queues this process leads there, and its fair share
    /// and cap.
    fn shared(&self, _database: &str, _share: Share) {}
}

/// A process's part of one database's queues, after a round of the share rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    pub led: usize,
    pub fair: usize,
    pub cap: usize,
    /// The live processes of the fleet in the database, this one included.
    pub processes: usize,
}

/// How a fleet term learns it is over: the fleet session is gone, no longer holds the queue's
/// lock, or its server refuses writes.
#[derive(Default)]
pub struct Lease {
    lost: CancellationToken,
    why: Mutex<Option<String>>,
}

impl Lease {
    /// Ends the term; the first reason given is the one reported.
    fn end(&self, why: impl Into<String>) {
        self.why
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(|| why.into());
        self.lost.cancel();
    }

    pub(crate) async fn lost(&self) -> String {
        self.lost.cancelled().await;
        self.why
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_default()
    }
}

/// A fleet of one: this process, maintaining the queues of every database in its list.
pub struct Fleet {
    name: String,
    settings: LeaderSettings,
    fleet: FleetSettings,
    databases: Vec<DatabaseQueues>,
    config_digest: String,
}

impl Fleet {
    pub fn new(
        settings: LeaderSettings,
        fleet: FleetSettings,
        databases: Vec<DatabaseQueues>,
    ) -> Result<Self, LeaderError> {
        let mut problems = settings.validate();
        problems.extend(fleet.validate());
        if !problems.is_empty() {
            return Err(LeaderError::InvalidSettings(problems));
        }
        Ok(Self {
            name: crate::instance::new_name(),
            settings,
            fleet,
            databases,
            config_digest: String::new(),
        })
    }

    /// See [`crate::Candidate::with_config_digest`].
    pub fn with_config_digest(mut self, digest: impl Into<String>) -> Self {
        self.config_digest = digest.into();
        self
    }

    /// This process's instance name, the same in every database.
    pub fn instance(&self) -> &str {
        &self.name
    }

    /// Whether queue names need their database: the list spans more than one.
    fn names_need_database(&self) -> bool {
        let mut names: Vec<Option<&str>> = self
            .databases
            .iter()
            .map(|d| d.target.config().get_dbname())
            .collect();
        names.sort();
        names.dedup();
        names.len() > 1
    }

    /// Maintains every database's queues until `shutdown`, then steps down from each queue;
    /// `setup` supplies each queue's branches and observers. Errors only for what retrying
    /// cannot fix (a pooler that cannot carry the locks); a database that cannot be reached is
    /// retried without disturbing the others.
    pub async fn run(
        &self,
        setup: Arc<dyn QueueSetup>,
        shutdown: CancellationToken,
    ) -> Result<(), LeaderError> {
        let qualified = self.names_need_database();
        let mut actors = JoinSet::new();
        for database in &self.databases {
            let mut instance = Instance::named(self.name.clone(), &database.target, &self.settings);
            instance.set_config_digest(self.config_digest.clone());
            let pools = DatabasePools::new(&instance, &self.settings, &self.fleet)?;
            let actor = DatabaseActor {
                instance,
                settings: self.settings.clone(),
                fleet: self.fleet.clone(),
                database: database.clone(),
                qualified,
                setup: setup.clone(),
                pools,
                queues: BTreeMap::new(),
                terms: JoinSet::new(),
                term_tasks: HashMap::new(),
                read_only: false,
                pinning_checked: false,
                unresponsive: false,
                leaders: BTreeMap::new(),
                termless: HashMap::new(),
            };
            actors.spawn(actor.run(shutdown.clone()));
        }
        let mut result = Ok(());
        while let Some(joined) = actors.join_next().await {
            match joined {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    // Another database's queues must not go on as if nothing happened while
                    // this process exits with an error: stop them all, cleanly.
                    shutdown.cancel();
                    result = Err(error);
                }
                Err(error) => {
                    tracing::error!(%error, "a fleet database task died; stopping");
                    shutdown.cancel();
                    result = Err(LeaderError::FleetTaskDied(error.to_string()));
                }
            }
        }
        result
    }
}

/// A queue of one database, led by this process or not.
struct Queue {
    queue: QueueRef,
    schema: SchemaName,
    plan: LoopPlan,
    observers: Observers,
    health: HealthRegistry,
    /// Its schema is gone: forgotten once its term is over.
    gone: bool,
    /// Since when this process has seen the queue without a leader.
    unled_since: Option<Instant>,
    /// The schema is at a version this steward cannot run: not tried again before this.
    refused_until: Option<Instant>,
    /// Its schema version was checked on this fleet session (checked again after a reconnect
    /// and at each discovery, when a rolling upgrade may have migrated it).
    checked: bool,
    led: Option<Led>,
}

/// A queue this process leads: its term's handles.
struct Led {
    epoch: i64,
    lease: Arc<Lease>,
    /// Cancelled to step down gracefully (a handover or shutdown).
    step_down: CancellationToken,
    contact: ContactMonitor,
}

/// Why a fleet session ended.
enum SessionEnd {
    Shutdown,
    Lost(String),
}

struct DatabaseActor {
    instance: Instance,
    settings: LeaderSettings,
    fleet: FleetSettings,
    database: DatabaseQueues,
    qualified: bool,
    setup: Arc<dyn QueueSetup>,
    pools: DatabasePools,
    queues: BTreeMap<String, Queue>,
    terms: JoinSet<(String, i64, TermEnd)>,
    /// The queue and epoch of each term task, to tell which one died if one does.
    term_tasks: HashMap<tokio::task::Id, (String, i64)>,
    read_only: bool,
    pinning_checked: bool,
    /// A statement on the fleet session went unanswered: the session is given up.
    unresponsive: bool,
    /// The last round's view: the fleet process leading each queue a fleet process leads.
    leaders: BTreeMap<String, String>,
    /// Queues another fleet process holds the lock of without an open term there, with that
    /// process and since when this one has seen it so (see `watch_for_wedged`).
    termless: HashMap<String, (String, Instant)>,
}

impl DatabaseActor {
    fn describe(&self) -> String {
        self.database.target.to_string()
    }

    /// The database's name, as labels show it.
    fn database_name(&self) -> &str {
        self.database
            .target
            .config()
            .get_dbname()
            .unwrap_or_default()
    }

    async fn run(mut self, shutdown: CancellationToken) -> Result<(), LeaderError> {
        for schema in self.database.schemas.clone() {
            self.add_queue(schema);
        }
        let mut backoff = self.settings.reconnect_min;
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            match self.connect().await {
                Ok((mut client, mut notifications)) => {
                    backoff = self.settings.reconnect_min;
                    match self.serve(&mut client, &mut notifications, &shutdown).await {
                        SessionEnd::Shutdown => return Ok(()),
                        SessionEnd::Lost(why) => {
                            tracing::warn!(database = %self.describe(), %why, "the fleet session ended; every queue led here is handed back, reconnecting");
                            self.lose_all(&why).await;
                        }
                    }
                }
                Err(ConnectFailure::Fatal(error)) => return Err(error),
                Err(ConnectFailure::Retry(error)) => {
                    tracing::warn!(database = %self.describe(), %error, retry_in = ?backoff, "cannot open the fleet session");
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(self.settings.reconnect_max);
        }
    }

    async fn connect(&mut self) -> Result<(Client, Notifications), ConnectFailure> {
        let (client, notifications) = self
            .instance
            .session("fleet")
            .listen()
            .await
            .map_err(|e| ConnectFailure::Retry(e.to_string()))?;
        // Once per database: a target that moves sessions between backends can never carry
        // the locks, so that is refused rather than retried.
        if !self.pinning_checked {
            match pinning::check(&self.instance.session("check")).await {
                Ok(()) => self.pinning_checked = true,
                Err(error @ pinning::PinningError::Pooled { .. }) => {
                    return Err(ConnectFailure::Fatal(error.into()))
                }
                Err(error) => return Err(ConnectFailure::Retry(error.to_string())),
            }
        }
        client
            .batch_execute(&format!("LISTEN {FLEET_CHANNEL}"))
            .await
            .map_err(|e| ConnectFailure::Retry(describe_pg_error(&e)))?;
        Ok((client, notifications))
    }

    fn add_queue(&mut self, schema: SchemaName) {
        if self.queues.contains_key(schema.as_str()) {
            return;
        }
        let database = self
            .qualified
            .then(|| self.database_name().to_owned())
            .filter(|name| !name.is_empty());
        let name = match &database {
            Some(database) => format!("{database}/{schema}"),
            None => schema.to_string(),
        };
        let queue = QueueRef {
            name,
            database,
            target: self.database.target.with_schema(schema.clone()),
        };
        let branches = self.setup.branches();
        let plan = LoopPlan::new(self.settings.loop_mode, &branches);
        let health = HealthRegistry::default();
        let mut observers = Observers::new(vec![Arc::new(health.clone())]);
        for observer in self.setup.observers(&queue, &plan, &health) {
            observers.push(observer);
        }
        tracing::info!(name = %queue.name, %schema, database = %self.describe(), "maintaining a queue");
        self.queues.insert(
            schema.to_string(),
            Queue {
                queue,
                schema,
                plan,
                observers,
                health,
                gone: false,
                unled_since: None,
                refused_until: None,
                checked: false,
                led: None,
            },
        );
    }

    /// One fleet session's life: poll, probe, watch for wedged leaders, discover queues and
    /// look after the terms, until shutdown or the session fails.
    async fn serve(
        &mut self,
        client: &mut Client,
        notifications: &mut Notifications,
        shutdown: &CancellationToken,
    ) -> SessionEnd {
        let ticker = |every: Duration| {
            let mut interval = tokio::time::interval(every);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            interval
        };
        for q in self.queues.values_mut() {
            q.checked = false;
        }
        let mut poll = ticker(self.fleet.poll_interval);
        let mut probe = ticker(self.settings.probe_interval);
        let mut wedge = ticker(self.settings.wedge_check_interval);
        let mut discover = ticker(self.fleet.discover_interval);
        loop {
            let result = tokio::select! {
                _ = shutdown.cancelled() => {
                    self.step_down_all(client).await;
                    return SessionEnd::Shutdown;
                }
                notification = notifications.recv() => match notification {
                    None => return SessionEnd::Lost("the fleet session closed".to_owned()),
                    // A queue was handed over: take it now rather than at the next poll.
                    Some(n) if n.channel == FLEET_CHANNEL => {
                        poll.reset_immediately();
                        Ok(())
                    }
                    Some(n) => {
                        self.pools.wakes.route(n);
                        Ok(())
                    }
                },
                _ = poll.tick() => match self.round(client).await {
                    Ok(true) => {
                        poll.reset_immediately();
                        Ok(())
                    }
                    Ok(false) => Ok(()),
                    Err(error) => Err(error),
                },
                _ = probe.tick() => self.probe(client).await,
                _ = wedge.tick() => self.watch_for_wedged(client).await,
                _ = discover.tick() => self.discover(client).await,
                Some(joined) = self.terms.join_next_with_id() => match self.finished(joined) {
                    Some((schema, epoch, end)) => self.term_ended(client, &schema, epoch, end).await,
                    None => Ok(()),
                },
            };
            if let Err(error) = result {
                if client.is_closed() || std::mem::take(&mut self.unresponsive) {
                    return SessionEnd::Lost(error);
                }
                tracing::warn!(database = %self.describe(), %error, "fleet session statement failed");
            }
        }
    }

    /// One round of the share rule: read the fleet, then take and hand over queues. True when
    /// it won a queue: the next round then follows at once, since the others' view changed.
    async fn round(&mut self, client: &mut Client) -> Result<bool, String> {
        let now = Instant::now();
        let candidates: Vec<String> = self
            .queues
            .iter()
            .filter(|(_, q)| q.refused_until.is_none_or(|until| until <= now))
            .map(|(schema, _)| schema.clone())
            .collect();
        let rows = self
            .bounded(
                "reading the fleet",
                client.query(FLEET_VIEW, &[&candidates]),
            )
            .await?;
        let Some(first) = rows.first() else {
            return Ok(false);
        };
        let read_only: bool = first.get(3);
        self.set_read_only(read_only);
        let live: BTreeSet<String> = first
            .get::<_, Vec<String>>(2)
            .iter()
            .filter_map(|name| instance_of(name, "fleet"))
            .collect();
        let mut queues = BTreeSet::new();
        let mut leaders = BTreeMap::new();
        for row in &rows {
            let schema: String = row.get(0);
            let holder: Option<String> = row.get(1);
            match holder.as_deref().map(|h| instance_of(h, "fleet")) {
                // Led by a process of the fleet (this one included).
                Some(Some(instance)) => {
                    leaders.insert(schema.clone(), instance);
                }
                // Led by a single-queue `steward run` (or anything else holding the lock): not
                // the fleet's to share.
                Some(None) => {
                    if let Some(q) = self.queues.get_mut(&schema) {
                        q.unled_since = None;
                    }
                    continue;
                }
                None => {}
            }
            queues.insert(schema);
        }
        let mut unled_for = BTreeMap::new();
        for (schema, q) in self.queues.iter_mut() {
            if !queues.contains(schema) {
                continue;
            }
            let leader_alive = leaders.get(schema).is_some_and(|l| live.contains(l));
            if leader_alive {
                q.unled_since = None;
            } else {
                let since = *q.unled_since.get_or_insert(now);
                unled_for.insert(schema.clone(), now - since);
            }
        }
        // A lock this session holds without a term (a release that failed) would keep the
        // queue from everyone: give it back, so that the queue is free next round.
        let me = self.instance.name().to_owned();
        for (schema, leader) in &leaders {
            if *leader == me && self.queues.get(schema).is_some_and(|q| q.led.is_none()) {
                tracing::warn!(schema = %schema, "held the queue's lock without a term; releasing it");
                release(client, schema).await?;
            }
        }
        self.leaders = leaders.clone();
        self.setup.shared(
            self.database_name(),
            Share {
                led: self.queues.values().filter(|q| q.led.is_some()).count(),
                fair: ShareRule::fair_share(queues.len(), live.len()),
                cap: ShareRule::cap(queues.len(), live.len()),
                processes: live.len(),
            },
        );
        if read_only {
            return Ok(false);
        }
        let rule = ShareRule {
            grace: self.fleet.poll_interval * 4,
            handoff_wait: self.fleet.poll_interval * 2,
        };
        let actions = rule.decide(
            self.instance.name(),
            FleetView {
                queues: &queues,
                live: &live,
                leaders: &leaders,
                unled_for: &unled_for,
            },
        );
        let mut won = Vec::new();
        for action in actions {
            match action {
                Action::Acquire { queues, up_to } => {
                    let wanted: Vec<String> = queues
                        .into_iter()
                        .filter(|schema| self.queues.get(schema).is_some_and(|q| q.led.is_none()))
                        .collect();
                    if wanted.is_empty() {
                        continue;
                    }
                    let limit = i64::try_from(up_to).unwrap_or(i64::MAX);
                    let rows = self
                        .bounded("trying locks", client.query(TRY_LOCKS, &[&wanted, &limit]))
                        .await?;
                    won.extend(rows.iter().map(|row| row.get::<_, String>(0)));
                }
                Action::StepDown(schema) => {
                    if let Some(led) = self.queues.get(&schema).and_then(|q| q.led.as_ref()) {
                        tracing::info!(schema = %schema, epoch = led.epoch, "over this process's share: handing the queue over");
                        led.step_down.cancel();
                    }
                }
            }
        }
        let again = !won.is_empty();
        for schema in won {
            self.start(client, &schema).await?;
        }
        Ok(again)
    }

    /// Opens a term on a queue whose lock the fleet session has just won, and starts it.
    async fn start(&mut self, client: &mut Client, schema: &str) -> Result<(), String> {
        let Some(q) = self.queues.get_mut(schema) else {
            return release(client, schema).await;
        };
        match if q.checked {
            Ok(0)
        } else {
            steward_schema::check_schema(client, &q.schema).await
        } {
            Ok(_) => q.checked = true,
            Err(steward_schema::SchemaError::Db(error)) => {
                release(client, schema).await?;
                return Err(describe_pg_error(&error));
            }
            Err(error) => {
                // Logged once per recheck: another version, or the tables are gone.
                tracing::warn!(schema = %q.schema, %error, recheck_in = ?REFUSED_RECHECK, "not leading this queue");
                q.refused_until = Some(Instant::now() + REFUSED_RECHECK);
                return release(client, schema).await;
            }
        }
        let staleness = q
            .plan
            .branches()
            .find_map(|(_, branch)| branch.heartbeat_staleness())
            .map(|s| s.as_secs_f64());
        let registration = self.instance.registration();
        let started = async {
            let tx = client.transaction().await?;
            tx.batch_execute(&format!(
                "{}; SET LOCAL lock_timeout = '{START_TERM_LOCK_TIMEOUT}'",
                in_schema(schema)
            ))
            .await?;
            let epoch: i64 = tx
                .query_one(
                    START_TERM,
                    &[
                        &registration.instance,
                        &registration.host,
                        &(std::process::id() as i32),
                        &staleness,
                    ],
                )
                .await?
                .get(0);
            tx.commit().await?;
            Ok::<_, tokio_postgres::Error>(epoch)
        }
        .await;
        let epoch = match started {
            Ok(epoch) => epoch,
            Err(error) => {
                tracing::warn!(schema = %q.schema, error = %describe_pg_error(&error), "could not start a leadership term; trying again next round");
                return release(client, schema).await;
            }
        };
        // The loops' wake-ups come through the fleet session.
        for channel in q
            .plan
            .branches()
            .filter_map(|(_, branch)| branch.wake_channel(&q.schema))
            .collect::<BTreeSet<_>>()
        {
            client
                .batch_execute(&format!("LISTEN {channel}"))
                .await
                .map_err(|e| describe_pg_error(&e))?;
        }
        tracing::info!(schema = %q.schema, epoch, instance = %self.instance.name(), "leadership acquired");
        q.observers.leadership(&LeadershipEvent::Acquired { epoch });
        q.unled_since = None;
        let led = Led {
            epoch,
            lease: Arc::new(Lease::default()),
            step_down: CancellationToken::new(),
            contact: ContactMonitor::new(),
        };
        let pools = self.pools.for_queue(&q.schema);
        let plan = q.plan.clone();
        let settings = self.settings.clone();
        let registration = registration.clone();
        let observer: Arc<dyn Observer> = Arc::new(q.observers.clone());
        let health = q.health.clone();
        let (lease, step_down, contact) = (
            led.lease.clone(),
            led.step_down.clone(),
            led.contact.clone(),
        );
        let schema_name = schema;
        let schema = schema.to_owned();
        let task = self.terms.spawn(async move {
            let end = term::run_term(
                term::Term {
                    epoch,
                    registration: &registration,
                    plan: &plan,
                    settings: &settings,
                    sessions: TermSessions::Shared(&pools),
                    holder: Holder::Fleet(&lease),
                    contact,
                    observer,
                    health,
                },
                &step_down,
            )
            .await;
            (schema, epoch, end)
        });
        self.term_tasks
            .insert(task.id(), (schema_name.to_owned(), epoch));
        q.led = Some(led);
        Ok(())
    }

    /// A queue's term is over: record it and release the queue's lock (on a graceful
    /// step-down, close the term and tell the fleet).
    async fn term_ended(
        &mut self,
        client: &mut Client,
        schema: &str,
        epoch: i64,
        end: TermEnd,
    ) -> Result<(), String> {
        let Some(q) = self.queues.get_mut(schema) else {
            return release(client, schema).await;
        };
        // Only the queue's current term gives its lock back: a stale term's end must never
        // release a lock a newer term holds.
        if q.led.as_ref().is_none_or(|led| led.epoch != epoch) {
            tracing::debug!(schema = %q.schema, epoch, "an earlier term ended");
            return Ok(());
        }
        q.led = None;
        let q = &*q;
        match end {
            TermEnd::SteppedDown => {
                end_term(client, schema, epoch).await;
                release(client, schema).await?;
                client
                    .execute("SELECT pg_notify($1, $2)", &[&FLEET_CHANNEL, &schema])
                    .await
                    .map_err(|e| describe_pg_error(&e))?;
                tracing::info!(schema = %q.schema, epoch, "stepped down");
                q.observers
                    .leadership(&LeadershipEvent::SteppedDown { epoch });
            }
            TermEnd::Lost(reason) => {
                tracing::warn!(schema = %q.schema, epoch, %reason, "leadership lost");
                q.observers
                    .leadership(&LeadershipEvent::Lost { epoch, reason });
                if !client.is_closed() {
                    release(client, schema).await?;
                }
            }
        }
        Ok(())
    }

    /// Checks the server still accepts writes and that the fleet session still holds every
    /// queue this process leads; a slow answer is a stall, after which rescues wait again.
    async fn probe(&mut self, client: &mut Client) -> Result<(), String> {
        let led: Vec<String> = self
            .queues
            .iter()
            .filter(|(_, q)| q.led.is_some())
            .map(|(schema, _)| schema.clone())
            .collect();
        let started = Instant::now();
        let row = self
            .bounded("the probe", client.query_one(FLEET_PROBE, &[&led]))
            .await?;
        let rtt = started.elapsed();
        let read_only: bool = row.get(0);
        let held: HashSet<String> = row.get::<_, Vec<String>>(1).into_iter().collect();
        self.set_read_only(read_only);
        let stalled = rtt > self.settings.stall_threshold;
        if stalled {
            tracing::warn!(
                rtt_ms = rtt.as_millis() as u64,
                "database stall: rescues wait a quiet period again"
            );
        }
        for (schema, q) in &self.queues {
            let Some(led) = &q.led else { continue };
            if read_only {
                led.lease.end(term::READ_ONLY_SERVER);
            } else if !held.contains(schema) {
                led.lease
                    .end("the fleet session no longer holds the queue's leadership lock");
            } else if stalled {
                led.contact.restored_now();
            }
        }
        Ok(())
    }

    /// Runs a statement of the fleet session that must answer within the probe timeout, as
    /// the single-queue probe must: a session that does not is given up (every queue led on it
    /// ends), rather than left to hold up every other statement of the fleet.
    async fn bounded<T>(
        &mut self,
        what: &str,
        statement: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, String> {
        match tokio::time::timeout(self.settings.probe_timeout, statement).await {
            Ok(answer) => answer.map_err(|e| describe_pg_error(&e)),
            Err(_) => {
                self.unresponsive = true;
                Err(format!(
                    "{what}: no answer on the fleet session within {:?}",
                    self.settings.probe_timeout
                ))
            }
        }
    }

    /// Tells every queue's observers when the server starts or stops refusing writes.
    fn set_read_only(&mut self, read_only: bool) {
        if read_only == self.read_only {
            return;
        }
        self.read_only = read_only;
        if read_only {
            tracing::warn!(database = %self.describe(), "the server refuses writes (a hot standby, or default_transaction_read_only is on): leading no queue here until it accepts them");
        } else {
            tracing::info!(database = %self.describe(), "the server accepts writes again");
        }
        for q in self.queues.values() {
            q.observers.server_read_only(read_only);
            q.observers
                .standing_aside(read_only.then_some(term::READ_ONLY_SERVER));
        }
    }

    /// Standby side, for every queue another fleet process leads: a leader that has made no
    /// progress for `wedge_timeout` is ended, all its sessions at once, so that its queues can
    /// be taken over (its process is stuck, not one queue).
    async fn watch_for_wedged(&mut self, client: &mut Client) -> Result<(), String> {
        let me = self.instance.name().to_owned();
        let holders: BTreeMap<String, String> = self
            .leaders
            .iter()
            .filter(|(_, leader)| leader.as_str() != me)
            .map(|(schema, leader)| (schema.clone(), leader.clone()))
            .collect();
        self.termless
            .retain(|schema, (holder, _)| holders.get(schema) == Some(holder));
        if holders.is_empty() {
            return Ok(());
        }
        let watched: Vec<&str> = holders.keys().map(String::as_str).collect();
        let progress = progress_of(&watched);
        let rows = self
            .bounded(
                "reading the leaders' progress",
                client.query(&progress, &[]),
            )
            .await?;
        let timeout = self.settings.wedge_timeout;
        let mut wedged: BTreeMap<String, (String, i64, f64)> = BTreeMap::new();
        for row in rows {
            let (schema, epoch, instance, age): (String, i64, Option<String>, Option<f64>) =
                (row.get(0), row.get(1), row.get(2), row.get(3));
            let Some(holder) = holders.get(&schema) else {
                continue;
            };
            let stalled = if instance.as_ref() == Some(holder) {
                self.termless.remove(&schema);
                age.unwrap_or_default()
            } else {
                // The holder has the lock but no open term here: a process that wedged between
                // winning the lock and starting its term makes no progress mark to go stale, so
                // the time since the lock was first seen without a term stands in for it.
                let (_, since) = self
                    .termless
                    .entry(schema.clone())
                    .or_insert_with(|| (holder.clone(), Instant::now()));
                since.elapsed().as_secs_f64()
            };
            if stalled >= timeout.as_secs_f64() {
                wedged
                    .entry(holder.clone())
                    .or_insert((schema, epoch, stalled));
            }
        }
        for (instance, (schema, epoch, stalled)) in wedged {
            tracing::warn!(schema = %schema, epoch, %instance, stalled_secs = stalled, "the leader has made no progress; ending its sessions to take over");
            let pattern = format!("steward:{}:%", like_escape(&instance));
            match client.query_one(TERMINATE_INSTANCE, &[&pattern]).await {
                Ok(row) => {
                    tracing::warn!(%instance, sessions = row.get::<_, i64>(0), "ended the wedged leader's sessions")
                }
                Err(error) => {
                    tracing::error!(error = %describe_pg_error(&error), %instance, "could not end the wedged leader's sessions")
                }
            }
        }
        Ok(())
    }

    /// Refreshes this process's record in every queue's candidates and, with discovery on,
    /// the list of queues: new schemas join it, dropped ones leave it.
    async fn discover(&mut self, client: &mut Client) -> Result<(), String> {
        for q in self.queues.values_mut() {
            q.checked = false;
        }
        if self.database.discover {
            let found: BTreeSet<SchemaName> = steward_schema::discover_queues(client)
                .await
                .map_err(|e| describe_pg_error(&e))?
                .into_iter()
                .chain(self.database.schemas.iter().cloned())
                .collect();
            for schema in &found {
                self.add_queue(schema.clone());
            }
            let gone: Vec<String> = self
                .queues
                .keys()
                .filter(|s| !found.iter().any(|f| f.as_str() == s.as_str()))
                .cloned()
                .collect();
            for schema in gone {
                if let Some(q) = self.queues.get_mut(&schema) {
                    q.gone = true;
                    if let Some(led) = &q.led {
                        // Its passes would fail: the term ends, and the queue is forgotten then.
                        led.lease.end("the queue's schema is gone");
                    }
                }
            }
            self.forget_gone();
        }
        let registration = self.instance.registration().clone();
        for schema in self.queues.keys() {
            let refreshed = async {
                let tx = client.transaction().await?;
                tx.batch_execute(&in_schema(schema)).await?;
                registration.refresh(&tx).await?;
                tx.commit().await
            };
            if let Err(error) = refreshed.await {
                tracing::debug!(schema = %schema, error = %describe_pg_error(&error), "could not record this candidate");
            }
        }
        Ok(())
    }

    /// Shutdown: every led queue steps down gracefully (its running passes get the grace
    /// period), then its term is closed, its lock released and the fleet told.
    async fn step_down_all(&mut self, client: &mut Client) {
        for q in self.queues.values() {
            if let Some(led) = &q.led {
                led.step_down.cancel();
            }
        }
        let bound = self.settings.shutdown_grace + Duration::from_secs(2);
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            let joined = tokio::select! {
                joined = self.terms.join_next_with_id() => joined,
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::warn!("terms did not end in time; closing the fleet session releases their locks");
                    self.terms.abort_all();
                    break;
                }
            };
            let Some(joined) = joined else { break };
            if let Some((schema, epoch, end)) = self.finished(joined) {
                if let Err(error) = self.term_ended(client, &schema, epoch, end).await {
                    tracing::debug!(schema = %schema, %error, "could not close the term; closing the session releases the lock");
                }
            }
        }
        for schema in self.queues.keys() {
            let withdrawn = async {
                let tx = client.transaction().await?;
                tx.batch_execute(&in_schema(schema)).await?;
                tx.execute(WITHDRAW, &[&self.instance.registration().instance])
                    .await?;
                tx.commit().await
            };
            if let Err(error) = withdrawn.await {
                tracing::debug!(schema = %schema, error = %describe_pg_error(&error), "could not withdraw the candidate");
            }
        }
    }

    /// The fleet session is gone: every term here ends at once (their locks went with it).
    async fn lose_all(&mut self, why: &str) {
        for q in self.queues.values() {
            if let Some(led) = &q.led {
                led.lease.end(why);
            }
        }
        while let Some(joined) = self.terms.join_next_with_id().await {
            let Some((schema, epoch, end)) = self.finished(joined) else {
                continue;
            };
            let reason = match end {
                TermEnd::Lost(reason) => reason,
                TermEnd::SteppedDown => why.to_owned(),
            };
            if let Some(q) = self.queues.get_mut(&schema) {
                tracing::warn!(schema = %q.schema, epoch, %reason, "leadership lost");
                q.observers
                    .leadership(&LeadershipEvent::Lost { epoch, reason });
            }
        }
        for q in self.queues.values_mut() {
            q.led = None;
        }
        self.forget_gone();
    }

    /// How a term task ended, by its queue. A task that died (run_term never panics, so this
    /// is a bug) ends its term as lost, logged and counted as a restart: the queue is released
    /// and taken again at a next round, by this process or another.
    fn finished(
        &mut self,
        joined: Result<(tokio::task::Id, (String, i64, TermEnd)), tokio::task::JoinError>,
    ) -> Option<(String, i64, TermEnd)> {
        match joined {
            Ok((id, ended)) => {
                self.term_tasks.remove(&id);
                Some(ended)
            }
            Err(error) => {
                let (schema, epoch) = self.term_tasks.remove(&error.id())?;
                let reason = format!("the term's task died: {error}");
                tracing::error!(%schema, epoch, %reason, "a queue's term died; releasing the queue");
                if let Some(q) = self.queues.get(&schema) {
                    q.observers.loop_restarted(TERM_TASK, &reason);
                }
                Some((schema, epoch, TermEnd::Lost(reason)))
            }
        }
    }

    /// Forgets the queues whose schema is gone, once their terms are over.
    fn forget_gone(&mut self) {
        let gone: Vec<String> = self
            .queues
            .iter()
            .filter(|(_, q)| q.gone && q.led.is_none())
            .map(|(schema, _)| schema.clone())
            .collect();
        for schema in gone {
            if let Some(q) = self.queues.remove(&schema) {
                tracing::info!(schema = %q.schema, "the queue's schema is gone: no longer maintaining it");
                self.setup.removed(&q.queue);
            }
        }
    }
}

enum ConnectFailure {
    /// Retrying cannot help.
    Fatal(LeaderError),
    Retry(String),
}

/// Points the fleet session's current transaction at the queue `schema` (a validated
/// identifier, quoted all the same): the fleet session serves every queue of its database.
fn in_schema(schema: &str) -> String {
    format!("SET LOCAL search_path = \"{schema}\"")
}

/// Releases the queue's lock on the fleet session.
async fn release(client: &Client, schema: &str) -> Result<(), String> {
    client
        .execute(RELEASE_QUEUE, &[&schema])
        .await
        .map(|_| ())
        .map_err(|e| describe_pg_error(&e))
}

/// Closes our term of the queue on a graceful step-down, so `steward status` shows no leader
/// until the next. Bounded: a failure only leaves the term for the next one to close.
async fn end_term(client: &mut Client, schema: &str, epoch: i64) {
    let ended = async {
        let tx = client.transaction().await?;
        tx.batch_execute(&in_schema(schema)).await?;
        tx.execute(END_TERM, &[&epoch, &"stepped_down"]).await?;
        tx.commit().await
    };
    match tokio::time::timeout(Duration::from_secs(2), ended).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            tracing::warn!(schema = %schema, error = %describe_pg_error(&error), "could not record the end of the term")
        }
        Err(_) => tracing::warn!(schema = %schema, "recording the end of the term timed out"),
    }
}

/// One statement reading the leader row of every queue of `schemas` (validated identifiers,
/// quoted all the same): the schema, epoch, the instance whose term is open (NULL when none is)
/// and seconds since its last progress mark. Database clock on both sides. Primary key of each
/// one-row `leader` table.
fn progress_of(schemas: &[&str]) -> String {
    schemas
        .iter()
        .map(|schema| {
            format!(
                "SELECT '{schema}'::text, epoch, \
                 CASE WHEN resigned_at IS NULL THEN instance END, \
                 extract(epoch FROM clock_timestamp() - last_progress_at)::float8 \
                 FROM \"{schema}\".leader WHERE id = 1"
            )
        })
        .collect::<Vec<_>>()
        .join(" UNION ALL ")
}

/// The instance in a Steward session's `application_name` (`steward:<instance>:<role>`) when
/// its role is `role`.
fn instance_of(application_name: &str, role: &str) -> Option<String> {
    application_name
        .strip_prefix("steward:")?
        .strip_suffix(&format!(":{role}"))
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_instance_of_a_fleet_session_only() {
        assert_eq!(
            instance_of("steward:host-1-00af:fleet", "fleet").as_deref(),
            Some("host-1-00af")
        );
        assert_eq!(instance_of("steward:host-1-00af:leader", "fleet"), None);
        assert_eq!(instance_of("psql", "fleet"), None);
    }
}
