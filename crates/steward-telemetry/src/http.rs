//! `/metrics`, `/healthz`, `/readyz` and `/leader`.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use steward_connection::{Reconnecting, SchemaName, Target};
use steward_leader::HealthRegistry;
use tokio::sync::Mutex;

#[derive(Clone)]
pub struct HttpState {
    pub prometheus: PrometheusHandle,
    pub health: HealthRegistry,
    pub instance: String,
    /// `/healthz` fails when a loop of the current term finished no iteration for this long.
    pub loop_stall_limit: Duration,
    /// `/readyz`'s probe session.
    probe: Arc<Mutex<Reconnecting>>,
    /// The session `/status` reads the database's view with.
    status: Arc<Mutex<Reconnecting>>,
    schema: SchemaName,
}

impl HttpState {
    pub fn new(
        prometheus: PrometheusHandle,
        health: HealthRegistry,
        instance: String,
        loop_stall_limit: Duration,
        target: Target,
    ) -> Self {
        Self {
            prometheus,
            health,
            instance,
            loop_stall_limit,
            probe: Arc::new(Mutex::new(Reconnecting::new(
                target.named("steward:readyz"),
            ))),
            status: Arc::new(Mutex::new(Reconnecting::new(target.named("steward:page")))),
            schema: target.schema().clone(),
        }
    }
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

/// The database's view, as `steward status --json` shows it.
async fn status(State(state): State<HttpState>) -> Response {
    let mut session = state.status.lock().await;
    let read = tokio::time::timeout(Duration::from_secs(2), async {
        let client = session.get().await.map_err(|e| e.to_string())?;
        steward_leader::status::read(client, &state.schema)
            .await
            .map_err(|e| e.to_string())
    })
    .await;
    match read {
        Ok(Ok(status)) => Json(status).into_response(),
        Ok(Err(error)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "error": error })),
        )
            .into_response(),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "error": "no answer within 2s" })),
        )
            .into_response(),
    }
}

#[derive(serde::Deserialize)]
struct Since {
    /// Unix seconds; passes that started after it.
    since: Option<f64>,
}

/// The passes this instance ran in the last few minutes, after `since`.
async fn passes(State(state): State<HttpState>, Query(since): Query<Since>) -> Response {
    let since = since
        .since
        .and_then(|s| std::time::Duration::try_from_secs_f64(s).ok())
        .map_or(std::time::UNIX_EPOCH, |d| std::time::UNIX_EPOCH + d);
    Json(state.health.passes_since(since)).into_response()
}

async fn metrics(State(state): State<HttpState>) -> Response {
    (
        [("content-type", "text/plain; version=0.0.4")],
        state.prometheus.render(),
    )
        .into_response()
}

async fn healthz(State(state): State<HttpState>) -> Response {
    let snapshot = state.health.snapshot();
    let stalled: Vec<String> = snapshot
        .loops
        .iter()
        .filter(|(_, since)| **since > state.loop_stall_limit)
        .map(|(name, since)| format!("{name} (no iteration for {:.1}s)", since.as_secs_f64()))
        .collect();
    let body = serde_json::json!({
        "instance": state.instance,
        "leader": snapshot.is_leader,
        "loops": snapshot.loops.iter().map(|(k, v)| (k.clone(), v.as_secs_f64())).collect::<std::collections::BTreeMap<_, _>>(),
        "stalled": stalled,
    });
    let status = if stalled.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn readyz(State(state): State<HttpState>) -> Response {
    // Reachable is not enough: on a server that refuses writes this instance can never lead.
    if let Some(why) = state.health.snapshot().standing_aside {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({
                "database": "reachable",
                "standing_aside": true,
                "reason": why,
            })),
        )
            .into_response();
    }
    let mut probe = state.probe.lock().await;
    let c = match tokio::time::timeout(Duration::from_secs(2), probe.get()).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return unready(e.to_string()),
        Err(_) => return unready("connecting timed out after 2s".into()),
    };
    match tokio::time::timeout(Duration::from_secs(2), c.simple_query("SELECT 1")).await {
        Ok(Ok(_)) => (
            StatusCode::OK,
            Json(serde_json::json!({"database": "reachable"})),
        )
            .into_response(),
        Ok(Err(e)) => unready(e.to_string()),
        Err(_) => unready("no answer within 2s".into()),
    }
}

fn unready(reason: String) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(serde_json::json!({"database": "unreachable", "reason": reason})),
    )
        .into_response()
}

async fn leader(State(state): State<HttpState>) -> Response {
    let snapshot = state.health.snapshot();
    Json(serde_json::json!({
        "instance": state.instance,
        "leader": snapshot.is_leader,
        "epoch": snapshot.epoch,
        "branches": snapshot.branches,
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics_exporter_prometheus::PrometheusBuilder;
    use steward_leader::{LeadershipEvent, Observer};

    fn state(health: HealthRegistry, loop_stall_limit: Duration) -> HttpState {
        HttpState::new(
            PrometheusBuilder::new().build_recorder().handle(),
            health,
            "host-1-00aa".into(),
            loop_stall_limit,
            Target::new("postgres://localhost/unused", Default::default()).unwrap(),
        )
    }

    async fn healthz_of(state: HttpState) -> (StatusCode, serde_json::Value) {
        let response = healthz(State(state)).await;
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, serde_json::from_slice(&body).unwrap())
    }

    #[tokio::test]
    async fn healthz_fails_and_names_a_loop_whose_last_iteration_is_older_than_the_limit() {
        let health = HealthRegistry::default();
        health.leadership(&LeadershipEvent::Acquired { epoch: 7 });
        health.loop_progress("slo", 7);
        health.loop_progress("hygiene", 7);
        tokio::time::sleep(Duration::from_millis(60)).await;
        // hygiene iterates again; slo does not.
        health.loop_progress("hygiene", 7);

        let (status, body) = healthz_of(state(health.clone(), Duration::from_millis(30))).await;
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

        // The same registry within a generous limit is healthy.
        let (status, body) = healthz_of(state(health, Duration::from_secs(60))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["stalled"].as_array().unwrap().len(), 0, "{body}");
    }
}
