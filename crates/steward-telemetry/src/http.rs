//! `/metrics`, `/healthz`, `/readyz`, `/leader`, and the live page's `/status` and `/passes`,
//! for every queue this process serves ([`ServedQueues`]). With exactly one queue every answer
//! has the shape it had before a process could serve several (probes and scripts rely on it).

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use steward_connection::{Reconnecting, Target};
use steward_leader::{HealthRegistry, HealthSnapshot};
use tokio::sync::Mutex;

/// One queue this process serves: its own view of itself, and where its tables are.
#[derive(Clone)]
struct ServedQueue {
    health: HealthRegistry,
    target: Target,
    /// Its database's [`database_key`], worked out once.
    database: String,
    /// The session `/status` reads the database's view of this queue with.
    status: Arc<Mutex<Reconnecting>>,
}

/// The queues this process serves, by name (the schema, or `<database>/<schema>` when the
/// queues span databases; see `QueueLabels::name`). Shared and cheap to clone: the process
/// inserts a queue when it starts serving it and removes it when it stops, and the endpoints
/// read the current set on every request.
#[derive(Clone, Default)]
pub struct ServedQueues(Arc<RwLock<BTreeMap<String, ServedQueue>>>);

impl ServedQueues {
    /// Serves `name` from now on (replacing a queue of the same name).
    pub fn insert(&self, name: String, health: HealthRegistry, target: Target) {
        let status = Arc::new(Mutex::new(Reconnecting::new(target.named("steward:page"))));
        let queue = ServedQueue {
            health,
            database: database_key(&target),
            target,
            status,
        };
        self.write().insert(name, queue);
    }

    /// Stops serving `name`; its status session closes once no request holds it.
    pub fn remove(&self, name: &str) {
        self.write().remove(name);
    }

    /// The names of the queues served, in order.
    pub fn names(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }

    /// `f` of the queues served right now, by name. `f` must not await: the map is locked
    /// meanwhile (a process may serve thousands of queues, so requests do not copy it).
    fn with<R>(&self, f: impl FnOnce(&BTreeMap<String, ServedQueue>) -> R) -> R {
        f(&self.read())
    }

    // A poisoned lock only means a writer panicked between two map operations; the map itself
    // is still whole.
    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, ServedQueue>> {
        self.0.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, ServedQueue>> {
        self.0.write().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Clone)]
pub struct HttpState {
    pub prometheus: PrometheusHandle,
    pub instance: String,
    /// `/healthz` fails when a loop of a current term finished no iteration for this long.
    pub loop_stall_limit: Duration,
    pub queues: ServedQueues,
    /// `/readyz`'s probe sessions, one per database (by [`database_key`]), whichever of its
    /// queues opened it: reachability is the server's and the database's, not the schema's.
    probes: Arc<std::sync::Mutex<HashMap<String, Arc<Mutex<Reconnecting>>>>>,
}

impl HttpState {
    pub fn new(
        prometheus: PrometheusHandle,
        instance: String,
        loop_stall_limit: Duration,
        queues: ServedQueues,
    ) -> Self {
        Self {
            prometheus,
            instance,
            loop_stall_limit,
            queues,
            probes: Arc::default(),
        }
    }

    /// One probe session per database among `databases` (key and a target in it); sessions of
    /// databases no longer served are dropped, which closes them.
    fn probes(&self, databases: &[(String, Target)]) -> Vec<Arc<Mutex<Reconnecting>>> {
        let mut probes = self.probes.lock().unwrap_or_else(|p| p.into_inner());
        probes.retain(|key, _| databases.iter().any(|(k, _)| k == key));
        databases
            .iter()
            .map(|(key, target)| {
                probes
                    .entry(key.clone())
                    .or_insert_with(|| {
                        Arc::new(Mutex::new(Reconnecting::new(
                            target.named("steward:readyz"),
                        )))
                    })
                    .clone()
            })
            .collect()
    }
}

/// What tells two queues' databases apart: the servers, the database and the user sessions log
/// in as. Queues with the same key share `/readyz`'s probe.
fn database_key(target: &Target) -> String {
    let config = target.config();
    format!(
        "{:?} {:?} {:?} {:?} {:?}",
        config.get_hosts(),
        config.get_hostaddrs(),
        config.get_ports(),
        config.get_dbname(),
        config.get_user()
    )
}

/// The database's name as `/readyz` shows it (PostgreSQL's default: the user's name).
fn database_name(target: &Target) -> String {
    let config = target.config();
    config
        .get_dbname()
        .or(config.get_user())
        .unwrap_or("postgres")
        .to_owned()
}

/// Binds `addr` and serves until the process ends.
pub async fn serve(
    addr: SocketAddr,
    state: HttpState,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    // The bound address, which differs from `addr` for port 0.
    let bound = listener.local_addr()?;
    tracing::info!(addr = %bound, "serving /metrics, /healthz, /readyz and /leader");
    let app = Router::new()
        .route("/", get(page))
        .route("/status", get(status))
        .route("/passes", get(passes))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/leader", get(leader))
        .with_state(state);
    Ok(tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "the HTTP endpoint stopped");
        }
    }))
}

/// A small read-only page: leader, candidates, branches and a live timeline of passes.
async fn page() -> Response {
    (
        [("content-type", "text/html; charset=utf-8")],
        include_str!("page.html"),
    )
        .into_response()
}

fn error(status: StatusCode, body: Value) -> Response {
    (status, Json(body)).into_response()
}

/// Why no queue could be chosen: the status and body to answer with.
type NotChosen = (StatusCode, Value);

/// The queue a `/status` or `/passes` request is about: the one named by `?queue=`, else the
/// first served.
fn chosen(state: &HttpState, name: Option<&str>) -> Result<(String, ServedQueue), NotChosen> {
    state.queues.with(|queues| match name {
        Some(name) => queues
            .get_key_value(name)
            .map(|(n, q)| (n.clone(), q.clone()))
            .ok_or_else(|| {
                let names: Vec<&String> = queues.keys().collect();
                (
                    StatusCode::NOT_FOUND,
                    json!({ "error": format!("no queue named {name:?}"), "queues": names }),
                )
            }),
        None => queues
            .first_key_value()
            .map(|(n, q)| (n.clone(), q.clone()))
            .ok_or_else(|| {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({ "error": "this process serves no queue yet" }),
                )
            }),
    })
}

#[derive(serde::Deserialize)]
struct Which {
    /// The queue's name; the first served by default.
    queue: Option<String>,
}

/// The database's view of a queue, as `steward status --json` shows it. With several queues
/// served, it also lists their names (`queues`) and names the one shown (`queue`).
async fn status(State(state): State<HttpState>, Query(which): Query<Which>) -> Response {
    let (name, queue) = match chosen(&state, which.queue.as_deref()) {
        Ok(chosen) => chosen,
        Err((code, body)) => return error(code, body),
    };
    let mut session = queue.status.lock().await;
    let read = tokio::time::timeout(Duration::from_secs(2), async {
        let client = session.get().await.map_err(|e| e.to_string())?;
        steward_leader::status::read(client, queue.target.schema())
            .await
            .map_err(|e| e.to_string())
    })
    .await;
    let status = match read {
        Ok(Ok(status)) => status,
        Ok(Err(e)) => return error(StatusCode::SERVICE_UNAVAILABLE, json!({ "error": e })),
        Err(_) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({ "error": "no answer within 2s" }),
            )
        }
    };
    let names = state.queues.names();
    if names.len() == 1 {
        return Json(status).into_response();
    }
    match serde_json::to_value(&status) {
        Ok(Value::Object(mut body)) => {
            body.insert("queue".into(), json!(name));
            body.insert("queues".into(), json!(names));
            Json(body).into_response()
        }
        _ => Json(status).into_response(),
    }
}

#[derive(serde::Deserialize)]
struct Since {
    /// Unix seconds; passes that started after it.
    since: Option<f64>,
    /// The queue's name; the first served by default.
    queue: Option<String>,
}

/// The passes this instance ran in the last few minutes, after `since`, for one queue.
async fn passes(State(state): State<HttpState>, Query(since): Query<Since>) -> Response {
    let queue = match chosen(&state, since.queue.as_deref()) {
        Ok((_, queue)) => queue,
        // No queue served yet: no passes either.
        Err(_) if since.queue.is_none() => return Json(json!([])).into_response(),
        Err((code, body)) => return error(code, body),
    };
    let since = since
        .since
        .and_then(|s| std::time::Duration::try_from_secs_f64(s).ok())
        .map_or(std::time::UNIX_EPOCH, |d| std::time::UNIX_EPOCH + d);
    Json(queue.health.passes_since(since)).into_response()
}

async fn metrics(State(state): State<HttpState>) -> Response {
    (
        [("content-type", "text/plain; version=0.0.4")],
        state.prometheus.render(),
    )
        .into_response()
}

/// The loops of `snapshot` whose last iteration is older than `limit`, as `/healthz` names them.
fn stalled_loops(snapshot: &HealthSnapshot, limit: Duration) -> Vec<String> {
    snapshot
        .loops
        .iter()
        .filter(|(_, since)| **since > limit)
        .map(|(name, since)| format!("{name} (no iteration for {:.1}s)", since.as_secs_f64()))
        .collect()
}

fn loop_ages(snapshot: &HealthSnapshot) -> BTreeMap<String, f64> {
    snapshot
        .loops
        .iter()
        .map(|(k, v)| (k.clone(), v.as_secs_f64()))
        .collect()
}

/// 503 when a loop of any queue's current term has stalled. One queue: `leader` is a boolean
/// and `loops` its loops. Several: `leader` lists the queues this process leads, `loops` is by
/// queue, and each stalled loop is named `<queue>: <loop> (...)`.
async fn healthz(State(state): State<HttpState>) -> Response {
    let limit = state.loop_stall_limit;
    let (body, stalled) = state
        .queues
        .with(|queues| healthz_body(&state.instance, queues, limit));
    let status = if stalled {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (status, Json(body)).into_response()
}

/// `/healthz`'s body, and whether a loop stalled.
fn healthz_body(
    instance: &str,
    queues: &BTreeMap<String, ServedQueue>,
    limit: Duration,
) -> (Value, bool) {
    if let (1, Some(queue)) = (queues.len(), queues.values().next()) {
        let snapshot = queue.health.snapshot();
        let stalled = stalled_loops(&snapshot, limit);
        let body = json!({
            "instance": instance,
            "leader": snapshot.is_leader,
            "loops": loop_ages(&snapshot),
            "stalled": stalled,
        });
        (body, !stalled.is_empty())
    } else {
        let mut leading = Vec::new();
        let mut loops = BTreeMap::new();
        let mut stalled = Vec::new();
        for (name, queue) in queues {
            let snapshot = queue.health.snapshot();
            if snapshot.is_leader {
                leading.push(name.clone());
            }
            stalled.extend(
                stalled_loops(&snapshot, limit)
                    .into_iter()
                    .map(|l| format!("{name}: {l}")),
            );
            loops.insert(name.clone(), loop_ages(&snapshot));
        }
        let body = json!({
            "instance": instance,
            "leader": leading,
            "loops": loops,
            "stalled": stalled,
        });
        (body, !stalled.is_empty())
    }
}

/// Whether the probe session answers `SELECT 1` within 2 s; why not otherwise.
async fn probe(session: Arc<Mutex<Reconnecting>>) -> Result<(), String> {
    let mut probe = session.lock().await;
    let c = match tokio::time::timeout(Duration::from_secs(2), probe.get()).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err("connecting timed out after 2s".into()),
    };
    match tokio::time::timeout(Duration::from_secs(2), c.simple_query("SELECT 1")).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer within 2s".into()),
    }
}

/// Ready when every database served is reachable and this process may lead at least one
/// queue. With one queue the answer is as it always was; with several it also lists each
/// database (`databases`) and the queues standing aside (`standing_aside`).
async fn readyz(State(state): State<HttpState>) -> Response {
    // Each queue's name and why it stands aside, if it does; each database's key, a target in
    // it, and its queues' names.
    type Databases = Vec<(String, Target, Vec<String>)>;
    let (queues, databases): (Vec<(String, Option<String>)>, Databases) =
        state.queues.with(|served| {
            let mut databases: Databases = Vec::new();
            let mut queues = Vec::with_capacity(served.len());
            for (name, queue) in served {
                queues.push((name.clone(), queue.health.snapshot().standing_aside));
                match databases.iter_mut().find(|(k, _, _)| *k == queue.database) {
                    Some((_, _, names)) => names.push(name.clone()),
                    None => databases.push((
                        queue.database.clone(),
                        queue.target.clone(),
                        vec![name.clone()],
                    )),
                }
            }
            (queues, databases)
        });
    if queues.is_empty() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "database": "unknown", "reason": "this process serves no queue yet" }),
        );
    }
    // Reachable is not enough: on a server that refuses writes this instance can never lead.
    let aside: Vec<(&String, &String)> = queues
        .iter()
        .filter_map(|(name, why)| Some((name, why.as_ref()?)))
        .collect();
    if aside.len() == queues.len() {
        let reason = match aside.as_slice() {
            [(_, why)] => (*why).clone(),
            _ => aside
                .iter()
                .map(|(name, why)| format!("{name}: {why}"))
                .collect::<Vec<_>>()
                .join("; "),
        };
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "database": "reachable", "standing_aside": true, "reason": reason }),
        );
    }

    // One probe per database, all at once: a slow database must not delay the others' answer.
    let keyed: Vec<(String, Target)> = databases
        .iter()
        .map(|(k, t, _)| (k.clone(), t.clone()))
        .collect();
    let mut running = tokio::task::JoinSet::new();
    for (i, session) in state.probes(&keyed).into_iter().enumerate() {
        running.spawn(async move { (i, probe(session).await) });
    }
    let mut results: Vec<Result<(), String>> =
        vec![Err("the probe did not finish".into()); databases.len()];
    while let Some(done) = running.join_next().await {
        if let Ok((i, result)) = done {
            results[i] = result;
        }
    }

    if let ([_], [result]) = (queues.as_slice(), results.as_slice()) {
        return match result {
            Ok(()) => (StatusCode::OK, Json(json!({"database": "reachable"}))).into_response(),
            Err(reason) => unready(reason.clone()),
        };
    }
    let unreachable: Vec<String> = databases
        .iter()
        .zip(&results)
        .filter_map(|((_, target, _), r)| {
            let reason = r.as_ref().err()?;
            Some(format!("{}: {reason}", database_name(target)))
        })
        .collect();
    let listed: Vec<Value> = databases
        .iter()
        .zip(&results)
        .map(|((_, target, names), result)| match result {
            Ok(()) => json!({
                "database": database_name(target),
                "queues": names,
                "reachable": true,
            }),
            Err(reason) => json!({
                "database": database_name(target),
                "queues": names,
                "reachable": false,
                "reason": reason,
            }),
        })
        .collect();
    let aside: Vec<&String> = aside.into_iter().map(|(name, _)| name).collect();
    if unreachable.is_empty() {
        let body = json!({
            "database": "reachable",
            "databases": listed,
            "standing_aside": aside,
        });
        (StatusCode::OK, Json(body)).into_response()
    } else {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({
                "database": "unreachable",
                "reason": unreachable.join("; "),
                "databases": listed,
                "standing_aside": aside,
            }),
        )
    }
}

fn unready(reason: String) -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        json!({"database": "unreachable", "reason": reason}),
    )
}

/// This instance's view of its leadership. One queue: `leader`, `epoch` and `branches` at the
/// top. Several: the same three per queue under `queues`.
async fn leader(State(state): State<HttpState>) -> Response {
    let view = |snapshot: HealthSnapshot| {
        json!({
            "leader": snapshot.is_leader,
            "epoch": snapshot.epoch,
            "branches": snapshot.branches,
        })
    };
    let body = state.queues.with(|queues| {
        if let (1, Some(queue)) = (queues.len(), queues.values().next()) {
            let mut body = view(queue.health.snapshot());
            body["instance"] = json!(state.instance);
            return body;
        }
        let by_queue: BTreeMap<&String, Value> = queues
            .iter()
            .map(|(name, queue)| (name, view(queue.health.snapshot())))
            .collect();
        json!({ "instance": state.instance, "queues": by_queue })
    });
    Json(body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics_exporter_prometheus::PrometheusBuilder;
    use steward_connection::SchemaName;
    use steward_leader::{LeadershipEvent, Observer};
    use steward_testkit::TestDb;

    /// A target nothing is asked of (`/healthz` and `/leader` do not connect).
    fn unused_target() -> Target {
        Target::new("postgres://localhost/unused", Default::default()).unwrap()
    }

    fn state_of(
        queues: &[(&str, HealthRegistry, Target)],
        loop_stall_limit: Duration,
    ) -> HttpState {
        let served = ServedQueues::default();
        for (name, health, target) in queues {
            served.insert((*name).to_owned(), health.clone(), target.clone());
        }
        HttpState::new(
            PrometheusBuilder::new().build_recorder().handle(),
            "host-1-00aa".into(),
            loop_stall_limit,
            served,
        )
    }

    fn state(health: HealthRegistry, loop_stall_limit: Duration) -> HttpState {
        state_of(&[("steward", health, unused_target())], loop_stall_limit)
    }

    async fn body_of(response: Response) -> (StatusCode, Value) {
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, serde_json::from_slice(&body).unwrap())
    }

    async fn healthz_of(state: HttpState) -> (StatusCode, Value) {
        body_of(healthz(State(state)).await).await
    }

    async fn readyz_of(state: HttpState) -> (StatusCode, Value) {
        body_of(readyz(State(state)).await).await
    }

    async fn leader_of(state: HttpState) -> (StatusCode, Value) {
        body_of(leader(State(state)).await).await
    }

    /// The keys of a JSON object, sorted.
    fn keys(value: &Value) -> Vec<&str> {
        let mut keys: Vec<&str> = value
            .as_object()
            .map(|o| o.keys().map(String::as_str).collect())
            .unwrap_or_default();
        keys.sort_unstable();
        keys
    }

    /// A registry leading at `epoch` whose `slo` loop last iterated more than [`STALE`] ago and
    /// whose `hygiene` loop iterated just now. It waits on the registry's own clock for `slo` to
    /// age, so a `/healthz` limit of [`LIMIT`] (half of STALE) tells the two apart.
    async fn with_stalled_slo(epoch: i64) -> HealthRegistry {
        let health = HealthRegistry::default();
        health.leadership(&LeadershipEvent::Acquired { epoch });
        health.loop_progress("slo", epoch);
        while health
            .snapshot()
            .loops
            .get("slo")
            .is_none_or(|age| *age <= STALE)
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        health.loop_progress("hygiene", epoch);
        health
    }

    const STALE: Duration = Duration::from_millis(400);
    const LIMIT: Duration = Duration::from_millis(200);

    #[tokio::test]
    async fn healthz_fails_and_names_a_loop_whose_last_iteration_is_older_than_the_limit() {
        let health = with_stalled_slo(7).await;

        let (status, body) = healthz_of(state(health.clone(), LIMIT)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        let stalled = body["stalled"].as_array().unwrap();
        assert_eq!(stalled.len(), 1, "{body}");
        assert!(
            stalled[0]
                .as_str()
                .unwrap()
                .starts_with("slo (no iteration for "),
            "{body}"
        );
        assert_eq!(body["instance"], "host-1-00aa");
        // One queue: the shape of a single-queue process, leader a boolean.
        assert_eq!(keys(&body), ["instance", "leader", "loops", "stalled"]);
        assert_eq!(body["leader"], true);
        assert_eq!(keys(&body["loops"]), ["hygiene", "slo"], "{body}");

        // The same registry within a generous limit is healthy.
        let (status, body) = healthz_of(state(health, Duration::from_secs(60))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["stalled"].as_array().unwrap().len(), 0, "{body}");
    }

    #[tokio::test]
    async fn healthz_of_several_queues_names_the_queue_whose_loop_stalled() {
        let stalled = with_stalled_slo(3).await;
        let led = HealthRegistry::default();
        led.leadership(&LeadershipEvent::Acquired { epoch: 9 });
        led.loop_progress("slo", 9);
        let standby = HealthRegistry::default();
        let state = |limit| {
            state_of(
                &[
                    ("tenant_a", stalled.clone(), unused_target()),
                    ("tenant_b", led.clone(), unused_target()),
                    ("tenant_c", standby.clone(), unused_target()),
                ],
                limit,
            )
        };

        let (status, body) = healthz_of(state(LIMIT)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        let named: Vec<&str> = body["stalled"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(named.len(), 1, "{body}");
        assert!(
            named[0].starts_with("tenant_a: slo (no iteration for "),
            "{body}"
        );
        assert_eq!(body["leader"], json!(["tenant_a", "tenant_b"]), "{body}");
        assert_eq!(keys(&body["loops"]), ["tenant_a", "tenant_b", "tenant_c"]);
        assert_eq!(keys(&body["loops"]["tenant_a"]), ["hygiene", "slo"]);

        let (status, body) = healthz_of(state(Duration::from_secs(60))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    #[tokio::test]
    async fn leader_is_flat_for_one_queue_and_by_queue_for_several() {
        let led = HealthRegistry::default();
        led.leadership(&LeadershipEvent::Acquired { epoch: 4 });
        let standby = HealthRegistry::default();

        let (_, body) = leader_of(state(led.clone(), Duration::from_secs(60))).await;
        assert_eq!(keys(&body), ["branches", "epoch", "instance", "leader"]);
        assert_eq!(body["leader"], true);
        assert_eq!(body["epoch"], 4);

        let several = state_of(
            &[
                ("app/tenant_a", led, unused_target()),
                ("other/tenant_a", standby, unused_target()),
            ],
            Duration::from_secs(60),
        );
        let (_, body) = leader_of(several).await;
        assert_eq!(keys(&body), ["instance", "queues"], "{body}");
        assert_eq!(body["queues"]["app/tenant_a"]["leader"], true);
        assert_eq!(body["queues"]["app/tenant_a"]["epoch"], 4);
        assert_eq!(body["queues"]["other/tenant_a"]["leader"], false);
        assert!(body["queues"]["other/tenant_a"]["epoch"].is_null());
        assert_eq!(
            keys(&body["queues"]["other/tenant_a"]),
            ["branches", "epoch", "leader"]
        );
    }

    /// `/readyz` against the real server: one probe per database, the unreachable one named.
    #[tokio::test]
    async fn readyz_probes_each_database_once_and_names_the_unreachable_one() {
        let db = TestDb::new().await;
        let target =
            |url: &str, schema: &str| Target::new(url, SchemaName::new(schema).unwrap()).unwrap();
        let url = db.url();
        let missing = url.replace(db.name(), "steward_no_such_database");

        // One queue: exactly the single-queue answer.
        let one = state_of(
            &[(
                "steward",
                HealthRegistry::default(),
                target(&url, "steward"),
            )],
            Duration::from_secs(60),
        );
        let (status, body) = readyz_of(one).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body, json!({"database": "reachable"}));

        let aside = HealthRegistry::default();
        aside.standing_aside(Some("the server refuses writes"));
        let queues = [
            (
                "a/tenant_a",
                HealthRegistry::default(),
                target(&url, "tenant_a"),
            ),
            ("a/tenant_b", aside.clone(), target(&url, "tenant_b")),
        ];
        let (status, body) = readyz_of(state_of(&queues, Duration::from_secs(60))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let databases = body["databases"].as_array().unwrap();
        assert_eq!(databases.len(), 1, "one probe for both schemas: {body}");
        assert_eq!(databases[0]["queues"], json!(["a/tenant_a", "a/tenant_b"]));
        assert_eq!(databases[0]["reachable"], true);
        assert_eq!(body["standing_aside"], json!(["a/tenant_b"]));

        let with_missing = [
            queues[0].clone(),
            queues[1].clone(),
            (
                "b/tenant_a",
                HealthRegistry::default(),
                target(&missing, "tenant_a"),
            ),
        ];
        let (status, body) = readyz_of(state_of(&with_missing, Duration::from_secs(60))).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["database"], "unreachable");
        assert!(
            body["reason"]
                .as_str()
                .unwrap()
                .starts_with("steward_no_such_database: "),
            "{body}"
        );
        let databases = body["databases"].as_array().unwrap();
        assert_eq!(databases.len(), 2, "{body}");
        assert_eq!(databases[1]["queues"], json!(["b/tenant_a"]));
        assert_eq!(databases[1]["reachable"], false);

        // Every queue standing aside: not ready, each named with its reason.
        let all_aside = [
            ("a/tenant_a", aside.clone(), target(&url, "tenant_a")),
            ("a/tenant_b", aside, target(&url, "tenant_b")),
        ];
        let (status, body) = readyz_of(state_of(&all_aside, Duration::from_secs(60))).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["standing_aside"], true);
        assert_eq!(
            body["reason"],
            "a/tenant_a: the server refuses writes; a/tenant_b: the server refuses writes"
        );
    }

    /// `/status` shows the first queue unless one is named; with several it lists them all.
    #[tokio::test]
    async fn status_serves_the_named_or_first_queue_and_lists_several() {
        let db = TestDb::new().await;
        async fn status_of(state: HttpState, queue: Option<&str>) -> (StatusCode, Value) {
            let which = Which {
                queue: queue.map(str::to_owned),
            };
            body_of(status(State(state), Query(which)).await).await
        }
        let one = state_of(
            &[("steward", HealthRegistry::default(), db.target().clone())],
            Duration::from_secs(60),
        );
        let (code, body) = status_of(one.clone(), None).await;
        assert_eq!(code, StatusCode::OK, "{body}");
        assert_eq!(body["schema"], "steward");
        assert!(body.get("queues").is_none(), "{body}");

        // The same schema served under two names stands in for two queues.
        one.queues.insert(
            "other/steward".into(),
            HealthRegistry::default(),
            db.target().clone(),
        );
        let (code, body) = status_of(one.clone(), Some("steward")).await;
        assert_eq!(code, StatusCode::OK, "{body}");
        assert_eq!(body["queue"], "steward");
        assert_eq!(body["queues"], json!(["other/steward", "steward"]));
        let (_, body) = status_of(one.clone(), None).await;
        assert_eq!(body["queue"], "other/steward", "the first by name");
        let (code, body) = status_of(one.clone(), Some("nope")).await;
        assert_eq!(code, StatusCode::NOT_FOUND, "{body}");

        one.queues.remove("other/steward");
        one.queues.remove("steward");
        assert!(one.queues.names().is_empty());
        let (code, _) = status_of(one, None).await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    }
}
