//! End to end: a real leader's Prometheus endpoint, OTLP export to an in-process receiver,
//! the health endpoints, and `steward status` with and without a leader.

#[path = "support/http.rs"]
mod http;
mod support;

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use steward_queue::{NewJob, Queue};
use steward_telemetry::names::{self, Kind, Metric};
use steward_testkit::TestDb;
use support::*;

/// Fast settings so that every branch and every metric shows up within seconds.
const FAST: &[&str] = &[
    "--set",
    "branches.rescue_stale_heartbeats.staleness=1s",
    "--set",
    "branches.rescue_stale_heartbeats.interval=200ms",
    "--set",
    "branches.rescue_expired_deadlines.quiet_period=1s",
    "--set",
    "branches.rescue_expired_deadlines.interval=200ms",
    "--set",
    "branches.rescue_expired_callbacks.quiet_period=1s",
    "--set",
    "branches.rescue_expired_callbacks.interval=200ms",
    "--set",
    "branches.queue_stats.interval=200ms",
    "--set",
    "branches.cron_sync.interval=200ms",
    "--set",
    "branches.table_health.interval=1s",
];

/// Jobs for every SLO branch: due soon, stale heartbeat, expired deadline, expired callback,
/// and one available job so queue gauges have an oldest age; and a malformed cron schedule,
/// which cron_sync skips (a series of steward_maintenance_branch_skipped_total).
async fn seed(db: &TestDb) {
    let queue = Queue::new(db.pool(2));
    queue
        .enqueue_batch(&[
            NewJob::new("stale"),
            NewJob::new("late").run_timeout(Duration::from_millis(1)),
            NewJob::new("parked"),
        ])
        .await
        .unwrap();
    let claimed = queue.claim("default", 3).await.unwrap();
    let parked = claimed.iter().find(|j| j.kind == "parked").unwrap().lease;
    queue
        .wait_for_callback(parked, Duration::from_millis(1))
        .await
        .unwrap();
    db.client()
        .await
        // The late job's worker keeps heartbeating (an hour ahead stands in for that), so only
        // its deadline can rescue it.
        .batch_execute(
            "UPDATE jobs SET heartbeat_at = now() - interval '1 minute' WHERE kind = 'stale';
             UPDATE jobs SET heartbeat_at = now() + interval '1 hour' WHERE kind = 'late';
             INSERT INTO cron_schedules (name, expression, kind)
             VALUES ('malformed', 'not a cron expression', 'never')",
        )
        .await
        .unwrap();
    queue
        .enqueue(&NewJob::new("waiting").queue("other"))
        .await
        .unwrap();
    queue
        .enqueue(&NewJob::new("soon").run_in(Duration::from_millis(300)))
        .await
        .unwrap();
}

/// The listed metric a sample name belongs to, and the sample's suffix (`_bucket`, `_sum`,
/// `_count` of a histogram, else empty).
fn listed(sample: &str) -> Option<(&'static Metric, &'static str)> {
    ["", "_bucket", "_sum", "_count"]
        .into_iter()
        .find_map(|suffix| {
            let metric = names::find(sample.strip_suffix(suffix)?)?;
            ((metric.kind == Kind::Histogram) != suffix.is_empty()).then_some((metric, suffix))
        })
}

/// The sample names in a Prometheus exposition.
fn samples_in(exposition: &str) -> BTreeSet<&str> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect()
}

/// Listed per-queue metrics without a sample in the exposition. The per-process ones are a
/// fleet process's (`steward run` with a list of queues), which `e2e_fleet` checks.
fn missing_metrics(exposition: &str) -> Vec<&'static str> {
    let found: BTreeSet<&str> = samples_in(exposition)
        .into_iter()
        .filter_map(listed)
        .map(|(metric, _)| metric.name)
        .collect();
    names::ALL
        .iter()
        .filter(|m| m.per_queue)
        .map(|m| m.name)
        .filter(|name| !found.contains(name))
        .collect()
}

/// Where an exposition disagrees with `names::ALL`: a Steward sample that is not listed, a
/// `# TYPE` other than the listed kind, a series whose label names are not exactly its
/// metric's (after `schema`, the one queue's label: a process serving one queue names no
/// database; with `le` on histogram buckets).
fn scrape_problems(exposition: &str) -> BTreeSet<String> {
    let mut problems = BTreeSet::new();
    for line in exposition.lines() {
        if let Some((name, kind)) = line.strip_prefix("# TYPE ").and_then(|t| t.split_once(' ')) {
            let listed_kind = names::find(name).map(|m| m.kind.as_str());
            if name.starts_with("steward_") && listed_kind != Some(kind) {
                problems.insert(format!(
                    "{name} is exported as a {kind}, listed as {listed_kind:?}"
                ));
            }
        }
    }
    for sample in samples_in(exposition) {
        let Some((metric, suffix)) = listed(sample) else {
            if sample.starts_with("steward_") {
                problems.insert(format!(
                    "{sample} is not a series of a metric in names::ALL"
                ));
            }
            continue;
        };
        let mut expected: BTreeSet<String> = metric
            .series_labels(false)
            .into_iter()
            .map(str::to_owned)
            .collect();
        if suffix == "_bucket" {
            expected.insert("le".to_owned());
        }
        for labels in series_of(exposition, sample) {
            let labels: BTreeSet<String> = labels.into_keys().collect();
            if labels != expected {
                problems.insert(format!(
                    "{sample} has labels {labels:?}, listed {expected:?}"
                ));
            }
        }
    }
    problems
}

/// The label sets of the samples named exactly `sample`.
fn series_of(exposition: &str, sample: &str) -> Vec<std::collections::BTreeMap<String, String>> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.strip_prefix(sample))
        .filter(|rest| rest.starts_with('{') || rest.starts_with(' '))
        .map(|rest| {
            let inside = rest
                .strip_prefix('{')
                .and_then(|r| r.split_once('}'))
                .map_or("", |(inside, _)| inside);
            inside
                .split("\",")
                .filter(|pair| !pair.is_empty())
                .filter_map(|pair| pair.split_once("=\""))
                .map(|(k, v)| (k.trim().to_owned(), v.trim_end_matches('"').to_owned()))
                .collect()
        })
        .collect()
}

#[test]
fn a_leader_exports_every_metric_and_answers_health_checks() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let db = runtime.block_on(TestDb::new());
    runtime.block_on(seed(&db));
    let steward = Steward::spawn(&db.url(), FAST);
    // Every series starts with the queue's label: its schema.
    let schema = format!("schema=\"{}\"", db.schema());
    let acquired = steward.wait_for("leadership acquired", Duration::from_secs(30));
    let instance = acquired
        .field("instance")
        .and_then(|v| v.as_str())
        .unwrap()
        .to_owned();
    let last = std::cell::RefCell::new(String::new());
    let missing = || {
        let body = last.borrow();
        let mut missing: Vec<String> = missing_metrics(&body)
            .into_iter()
            .map(str::to_owned)
            .collect();
        for reason in ["heartbeat", "deadline", "callback"] {
            if !body.contains(&format!(
                "steward_rescued_jobs_total{{{schema},reason=\"{reason}\"}} 1"
            )) {
                missing.push(format!("a {reason} rescue"));
            }
        }
        missing
    };
    wait_until_explained(
        "every metric and every rescue reason",
        Duration::from_secs(60),
        || {
            let (status, body) = steward.get("/metrics");
            assert_eq!(status, 200);
            *last.borrow_mut() = body;
            missing().is_empty()
        },
        || {
            format!(
                "missing {:?} in:\n{}",
                missing(),
                last.borrow()
                    .lines()
                    .filter(|l| l.contains("rescued") || l.contains("runs_total{branch=\"rescue"))
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        },
    );
    let last = last.into_inner();
    assert!(
        last.contains(&format!(
            "steward_leader{{{schema},instance=\"{instance}\"}} 1"
        )),
        "{last}"
    );
    assert!(
        last.contains(&format!(
            "steward_leader_epoch{{{schema},instance=\"{instance}\"}} 1"
        )),
        "{last}"
    );
    assert!(last.contains("mode=\"split\""), "{last}");
    // Millisecond buckets for start delay and promotion lag.
    assert!(
        last.contains(&format!(
            "steward_promotion_lag_seconds_bucket{{{schema},le=\"0.001\"}}"
        )),
        "{last}"
    );

    // The scrape is what names::ALL says, which the dashboards and alert rules are checked
    // against (crates/steward-telemetry/tests/assets.rs): every listed metric, with exactly its
    // label names, and nothing unlisted.
    let problems = scrape_problems(&last);
    assert!(
        problems.is_empty(),
        "the scrape disagrees with names::ALL:\n  {}\n{last}",
        problems.into_iter().collect::<Vec<_>>().join("\n  ")
    );
    // A branch's class is slo or hygiene; its loop is a loop task, the one loop restarts are
    // counted under. The promoter runs in a loop of its own in split mode, so its loop is not
    // its class: alert rules and panels select SLO branches by class.
    let loops: BTreeSet<String> = series_of(&last, names::LOOP_RESTARTS)
        .into_iter()
        .filter_map(|labels| labels.get("loop").cloned())
        .collect();
    for metric in names::ALL.iter().filter(|m| m.labels.contains(&"class")) {
        let sample = match metric.kind {
            Kind::Histogram => format!("{}_count", metric.name),
            Kind::Counter | Kind::Gauge => metric.name.to_owned(),
        };
        for labels in series_of(&last, &sample) {
            let label = |name: &str| labels.get(name).map_or("", String::as_str);
            assert!(
                ["slo", "hygiene"].contains(&label("class")) && loops.contains(label("loop")),
                "{sample} {labels:?}: class must be slo or hygiene, loop one of {loops:?}"
            );
            if label("branch") == "promote_scheduled" {
                assert!(
                    label("class") == "slo" && label("loop") != "slo",
                    "{sample} {labels:?}"
                );
            }
        }
    }
    // An SLO branch running on time is not delayed.
    let promoter_delayed = last.lines().find(|l| {
        l.starts_with("steward_maintenance_branch_delayed{")
            && l.contains("branch=\"promote_scheduled\"")
    });
    assert!(
        promoter_delayed.is_some_and(|l| l.ends_with(" 0")),
        "{promoter_delayed:?} in:\n{last}"
    );
    // Start delay has buckets below 10 ms, where a starved SLO branch first shows.
    let sub_10ms: BTreeSet<String> = series_of(
        &last,
        "steward_maintenance_branch_start_delay_seconds_bucket",
    )
    .into_iter()
    .filter_map(|labels| labels.get("le").cloned())
    .filter(|le| le.parse::<f64>().is_ok_and(|v| v < 0.01))
    .collect();
    assert!(
        sub_10ms.len() >= 3 && sub_10ms.contains("0.001"),
        "start delay buckets below 10 ms: {sub_10ms:?}"
    );

    let (status, body) = steward.get("/healthz");
    assert_eq!(status, 200, "{body}");
    let (status, body) = steward.get("/readyz");
    assert_eq!(status, 200, "{body}");
    let (status, body) = steward.get("/leader");
    assert_eq!(status, 200);
    let leader: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(leader["leader"], true);
    let branches = leader["branches"].as_array().unwrap();
    assert_eq!(branches.len(), steward_branches::NAMES.len(), "{body}");
    // Durations are seconds, as numbers.
    assert!(
        branches.iter().all(|b| b["last_duration_seconds"].is_f64()),
        "{body}"
    );
}

#[test]
fn help_does_not_print_the_database_password() {
    let url = "postgres://u:hunter2@h/db";
    for command in [
        &["run", "--help"][..],
        &["status", "--help"],
        &["migrate", "--help"],
    ] {
        let (code, stdout, stderr) = steward(url, command);
        assert_eq!(code, Some(0), "{command:?}: {stderr}");
        assert!(stdout.contains("DATABASE_URL"), "{command:?}: {stdout}");
        assert!(
            !stdout.contains("hunter2") && !stderr.contains("hunter2"),
            "{command:?} prints the password:\n{stdout}{stderr}"
        );
        // An unset variable is named, not shown as `NAME=`.
        assert!(!stdout.contains("=]"), "{command:?}: {stdout}");
    }
}

#[test]
fn an_otlp_protocol_other_than_grpc_stops_steward_at_start() {
    for variable in [
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
    ] {
        let output = std::process::Command::new(STEWARD)
            .arg("run")
            .env("DATABASE_URL", "postgres://unused@127.0.0.1:1/unused")
            .env("STEWARD_METRICS_ADDR", "127.0.0.1:0")
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
            .env(variable, "http/protobuf")
            .output()
            .expect("running steward");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{variable}: {stderr}");
        assert!(
            stderr.contains(&format!("{variable}=\"http/protobuf\""))
                && stderr.contains("gRPC only")
                && stderr.contains("4317"),
            "{variable}: {stderr}"
        );
    }
}

#[test]
fn the_metrics_endpoint_binds_to_loopback_by_default() {
    let (code, stdout, _) = steward("postgres://unused", &["run", "--help"]);
    assert_eq!(code, Some(0));
    assert!(stdout.contains("127.0.0.1:9464"), "{stdout}");
}

/// A received span: its name and its attribute keys.
type SpanSeen = (String, Vec<String>);

#[derive(Default, Clone)]
struct Received {
    metric_names: Arc<Mutex<BTreeSet<String>>>,
    spans: Arc<Mutex<Vec<SpanSeen>>>,
}

#[tonic::async_trait]
impl MetricsService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let mut names = self.metric_names.lock().unwrap();
        for resource in request.into_inner().resource_metrics {
            for scope in resource.scope_metrics {
                names.extend(scope.metrics.into_iter().map(|m| m.name));
            }
        }
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                for span in scope.spans {
                    let keys = span.attributes.into_iter().map(|a| a.key).collect();
                    spans.push((span.name, keys));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[test]
fn a_leader_exports_branch_spans_and_metrics_over_otlp() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let db = runtime.block_on(TestDb::new());
    let received = Received::default();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let server = runtime.spawn(
        tonic::transport::Server::builder()
            .add_service(MetricsServiceServer::new(received.clone()))
            .add_service(TraceServiceServer::new(received.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let mut steward = Steward::spawn_with_env(
        &db.url(),
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_METRIC_EXPORT_INTERVAL", "500"),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
            ("OTEL_SERVICE_NAME", "steward-e2e"),
        ],
    );
    steward.wait_for("leadership acquired", Duration::from_secs(30));
    wait_until(
        "a branch span and a branch metric over OTLP",
        Duration::from_secs(60),
        || {
            let spans = received.spans.lock().unwrap();
            let names = received.metric_names.lock().unwrap();
            spans.iter().any(|(name, keys)| {
                name == "promote_scheduled"
                    && ["branch", "loop", "epoch", "rows", "outcome"]
                        .iter()
                        .all(|k| keys.iter().any(|key| key == k))
            }) && names.contains("steward_maintenance_branch_duration_seconds")
        },
    );
    // The exporters are flushed on shutdown, after which the receiver may stop.
    steward.signal("TERM");
    assert_eq!(steward.wait_exit(Duration::from_secs(30)), Some(0));
    server.abort();
}

#[test]
fn status_shows_the_leader_and_its_branches_then_no_leader() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let db = runtime.block_on(TestDb::new());
    let url = db.url();
    let (code, stdout, _) = steward(&url, &["status"]);
    assert_eq!(code, Some(2), "no leader: exit 2");
    assert!(
        stdout.contains("no leader") && stdout.contains("no term has ever started"),
        "{stdout}"
    );

    let mut leader = Steward::spawn(&url, &[]);
    let acquired = leader.wait_for("leadership acquired", Duration::from_secs(30));
    let instance = acquired
        .field("instance")
        .and_then(|v| v.as_str())
        .unwrap()
        .to_owned();
    wait_until("branch health flushed", Duration::from_secs(30), || {
        let (_, stdout, _) = steward(&url, &["status", "--json"]);
        serde_json::from_str::<serde_json::Value>(&stdout)
            .map(|s| s["branches"].as_array().is_some_and(|b| b.len() >= 5))
            .unwrap_or(false)
    });
    let (code, stdout, _) = steward(&url, &["status", "--json"]);
    assert_eq!(code, Some(0), "{stdout}");
    let status: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(status["lock_held"], true);
    assert_eq!(status["leader"]["instance"], instance.as_str());
    assert_eq!(status["leader"]["epoch"], 1);
    assert_eq!(status["verdict"]["healthy"], true);
    assert_eq!(status["candidates"][0]["instance"], instance.as_str());
    assert_eq!(status["candidates"][0]["leading"], true);
    let (_, table, _) = steward(&url, &["status"]);
    assert!(
        table.contains(&format!("leader: {instance}")) && table.contains("promote_scheduled"),
        "{table}"
    );
    // Every branch is listed, the rescues held in their quiet period (30 s after the start).
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("rescue_stale_heartbeats") && l.contains("held until")),
        "{table}"
    );
    assert!(table.contains("candidates (1):"), "{table}");

    // A reader that goes away at once (`steward status | true`) ends it quietly.
    let mut child = std::process::Command::new(STEWARD)
        .args(["status"])
        .env("DATABASE_URL", &url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_ne!(output.status.code(), Some(101), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    leader.signal("TERM");
    assert_eq!(leader.wait_exit(Duration::from_secs(30)), Some(0));
    let (code, stdout, _) = steward(&url, &["status", "--json"]);
    assert_eq!(code, Some(2), "no leader: exit 2");
    let status: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(status["verdict"]["healthy"], false);
    assert!(
        status["candidates"].as_array().unwrap().is_empty(),
        "{stdout}"
    );
    assert_eq!(status["lock_held"], false);
    assert!(status["leader"].is_null());
    assert_eq!(status["last_term"]["instance"], instance.as_str());
    let (_, table, _) = steward(&url, &["status"]);
    assert!(
        table.contains("no leader") && table.contains("Last term: epoch 1"),
        "{table}"
    );
}

#[test]
fn status_on_a_missing_schema_says_to_migrate() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let db = runtime.block_on(TestDb::empty());
    let (code, _, stderr) = steward(&db.url(), &["status"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("steward migrate"), "{stderr}");
    // With --json, the error is JSON too, on stdout.
    let (code, stdout, _) = steward(&db.url(), &["status", "--json"]);
    assert_eq!(code, Some(1));
    let error: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert!(
        error["error"].as_str().unwrap().contains("steward migrate"),
        "{stdout}"
    );
}

/// Log lines written to a pipe (a file, a collector) carry no terminal colour codes.
#[test]
fn logs_to_a_pipe_have_no_colour_codes() {
    let (code, _, stderr) = steward(
        "postgres://u@127.0.0.1:1/db",
        &[
            "run",
            "--metrics-addr",
            "127.0.0.1:0",
            "--set",
            "leader.wedge_timeout=0s",
        ],
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("ERROR"), "{stderr}");
    assert!(!stderr.contains('\x1b'), "colour codes in {stderr:?}");
}

/// `migrate` and `status` read the configuration file like `run`, and `migrate` says what it did
/// without the driver's or the migration library's chatter.
#[test]
fn migrate_and_status_read_the_config_file_and_migrate_is_quiet() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let db = runtime.block_on(TestDb::empty());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("steward.toml");
    std::fs::write(
        &config,
        format!("database_url = \"{}\"\nschema = \"from_file\"\n", db.url()),
    )
    .unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(STEWARD)
            .args(args)
            .arg("--config")
            .arg(&config)
            .env_remove("DATABASE_URL")
            .env_remove("STEWARD_SCHEMA")
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    };
    for _ in 0..2 {
        let out = run(&["migrate"]);
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(out.status.success(), "{stderr}");
        assert!(stdout.contains("schema from_file"), "{stdout}");
        assert!(
            !stderr.contains("NOTICE") && !stderr.contains("applying migration"),
            "{stderr}"
        );
    }
    let out = run(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["schema"], "from_file");
}

/// A database that does not exist is an error retrying cannot fix: `steward run` says what is
/// wrong, once per retry, and stops after `leader.give_up_after` instead of retrying for ever.
#[test]
fn run_gives_up_on_a_database_that_does_not_exist() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let db = runtime.block_on(TestDb::new());
    let missing = db.url().replace(db.name(), "steward_no_such_database");
    let mut child = std::process::Command::new(STEWARD)
        .args(["run", "--metrics-addr", "127.0.0.1:0"])
        .args(["--set", "leader.give_up_after=1s"])
        .env("DATABASE_URL", &missing)
        .env_remove("STEWARD_LOG_FORMAT")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(code, Some(1), "still retrying after 30 s: {stderr}");
    assert!(stderr.contains("the database does not exist"), "{stderr}");
    assert!(!stderr.contains("cannot reach the database"), "{stderr}");
}

/// A broken configuration file is reported once, without the password its line holds.
#[test]
fn a_broken_config_file_is_reported_once_without_its_password() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(
        &config,
        "database_url = \"postgres://u:Sup3rS3cretPw!@127.0.0.1:5432/postgres\n",
    )
    .unwrap();
    let config = config.display().to_string();
    let (code, stdout, stderr) = steward(
        "postgres://u@127.0.0.1:1/db",
        &["run", "--metrics-addr", "127.0.0.1:0", "--config", &config],
    );
    assert_eq!(code, Some(1), "{stderr}");
    let output = format!("{stdout}{stderr}");
    assert!(!output.contains("Sup3rS3cretPw"), "{output}");
    assert_eq!(output.matches("TOML parse error").count(), 1, "{output}");
}

/// A standby whose configuration differs from the leader's is named once in the leader's log
/// and counted apart in `steward_candidates`, before any failover makes it lead.
#[test]
fn the_leader_names_a_candidate_whose_configuration_differs() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let db = runtime.block_on(TestDb::new());
    let leader = Steward::spawn(&db.url(), &[]);
    leader.wait_for("leadership acquired", Duration::from_secs(30));
    let standby = Steward::spawn(&db.url(), &["--set", "branches.cleanup.interval=77s"]);
    let standby_instance = standby
        .wait_for("standing by for leadership", Duration::from_secs(30))
        .field("instance")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_owned();
    const DRIFT: &str =
        "a candidate runs another version or configuration: if it takes over, maintenance changes";
    let warning = leader.wait_for(DRIFT, Duration::from_secs(60));
    assert_eq!(
        warning.field("candidate").and_then(|v| v.as_str()),
        Some(standby_instance.as_str())
    );
    let counted = || -> Vec<String> {
        let (_, body) = leader.get("/metrics");
        body.lines()
            .filter(|l| l.starts_with("steward_candidates{") && l.ends_with(" 1"))
            .map(str::to_owned)
            .collect()
    };
    wait_until_explained(
        "two candidate configurations counted",
        Duration::from_secs(60),
        || counted().len() == 2,
        || format!("{:?}", counted()),
    );
    let warnings = leader
        .logs()
        .iter()
        .filter(|l| l.message() == DRIFT)
        .count();
    assert_eq!(warnings, 1);
}

/// In a rolling upgrade the schema can be newer than a steward still running: that steward
/// stands aside (neither leads nor exits, and `/readyz` says why) and stands for election again
/// once the schema is no newer than it. A steward whose schema lags behind it refuses to start
/// until `steward migrate` has run.
#[test]
fn a_steward_older_than_the_schema_stands_aside_and_a_newer_one_refuses_to_start() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let db = runtime.block_on(TestDb::new());
    let client = runtime.block_on(db.client());
    let future_version =
        |sql: &'static str| runtime.block_on(async { client.batch_execute(sql).await.unwrap() });
    future_version(
        "INSERT INTO steward.schema_history (version, name, applied_on, checksum)
         VALUES (99, 'from_the_future', now()::text, '0')",
    );
    let mut older = Steward::spawn(&db.url(), &[]);
    let aside = older.wait_for(
        "this steward is older than the schema: not standing for election until it is upgraded",
        Duration::from_secs(30),
    );
    let error = aside
        .field("error")
        .and_then(|v| v.as_str())
        .unwrap_or_default();
    assert!(error.contains("version 99"), "{error}");
    let (code, body) = older.get("/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("older than the schema"), "{body}");
    assert!(older.try_wait().is_none(), "{}", older.raw_output());
    assert!(older.find("leadership acquired").is_none());
    future_version("DELETE FROM steward.schema_history WHERE version = 99");
    older.wait_for("leadership acquired", Duration::from_secs(30));
    let (code, body) = older.get("/readyz");
    assert_eq!(code, 200, "{body}");

    let behind = runtime.block_on(TestDb::new());
    let client = runtime.block_on(behind.client());
    runtime.block_on(async {
        client
            .batch_execute(
                "DELETE FROM steward.schema_history
                 WHERE version = (SELECT max(version) FROM steward.schema_history)",
            )
            .await
            .unwrap()
    });
    let mut newer = Steward::spawn(&behind.url(), &[]);
    assert_eq!(newer.wait_exit(Duration::from_secs(30)), Some(1));
    assert!(
        newer.raw_output().contains("run `steward migrate`"),
        "{}",
        newer.raw_output()
    );
}

/// A database holding several queues (schemas) and no schema named: one line per queue, the
/// one nobody leads flagged, exit 2 until every queue has a leader. Naming a schema still gives
/// that queue's full status.
#[test]
fn status_without_a_schema_summarises_every_queue_and_flags_one_without_a_leader() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let db = runtime.block_on(TestDb::new());
    let url = db.url();
    for schema in ["tenant_b", "tenant_c"] {
        let (code, _, stderr) = steward(&url, &["migrate", "--schema", schema]);
        assert_eq!(code, Some(0), "{stderr}");
    }
    let default = db.schema().to_string();
    let leaders: Vec<Steward> = [default.as_str(), "tenant_b"]
        .iter()
        .map(|schema| Steward::spawn(&url, &["--schema", schema]))
        .collect();
    for leader in &leaders {
        leader.wait_for("leadership acquired", Duration::from_secs(30));
    }

    let (code, stdout, stderr) = steward(&url, &["status"]);
    assert_eq!(code, Some(2), "{stdout}{stderr}");
    let line = |schema: &str| {
        stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(schema))
            .unwrap_or_else(|| panic!("no line for {schema}:\n{stdout}"))
            .to_owned()
    };
    for schema in [default.as_str(), "tenant_b"] {
        let instance = leaders[if schema == "tenant_b" { 1 } else { 0 }]
            .find("leadership acquired")
            .and_then(|l| {
                l.field("instance")
                    .and_then(|v| v.as_str())
                    .map(str::to_owned)
            })
            .unwrap();
        assert!(line(schema).contains(&instance), "{stdout}");
    }
    assert!(line("tenant_c").contains("NO LEADER"), "{stdout}");
    assert!(
        stdout.contains("3 queues: 1 with problems, 1 without a leader"),
        "{stdout}"
    );
    let (_, json, _) = steward(&url, &["status", "--json"]);
    let summary: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(summary["healthy"], false);
    assert_eq!(
        summary["queues"].as_array().map(Vec::len),
        Some(3),
        "{json}"
    );

    // The full status of one queue when it is named.
    let (code, stdout, _) = steward(&url, &["status", "--schema", "tenant_b"]);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.contains("leader: "), "{stdout}");

    let third = Steward::spawn(&url, &["--schema", "tenant_c"]);
    third.wait_for("leadership acquired", Duration::from_secs(30));
    let (code, stdout, _) = steward(&url, &["status"]);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(
        stdout.contains("3 queues: 0 with problems, 0 without a leader"),
        "{stdout}"
    );
}
