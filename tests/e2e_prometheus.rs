//! End to end: the real `prometheus` binary, with `dashboards/alerts.yml` loaded and a 1 s scrape
//! and evaluation interval, scraping real `steward run` processes. Checks that a lock on the jobs
//! table fires StewardPromotionBacklog and that it resolves after the release, and that a leader
//! restarted over and over fires StewardLeaderCrashLoop, and that StewardNoLeader is judged per
//! queue (schema). Prints when each alert fired and resolved (the figures the alerts' comments
//! promise).
//!
//! Skipped with a message where no `prometheus` is installed, except under CI (`CI` set), where
//! `.ci/run` installs it and a missing binary is a failure.

#[path = "support/http.rs"]
mod http;
mod support;

use http::http_get;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use steward_queue::{NewJob, Queue};
use steward_testkit::TestDb;
use support::*;

const ALERT_RULES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../dashboards/alerts.yml");

/// The `prometheus` binary on PATH; `None` (test skipped) only outside CI.
fn prometheus_binary() -> Option<PathBuf> {
    let found = find_on_path(&["prometheus"]);
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "no prometheus on PATH under CI (.ci/run installs Debian's prometheus)"
        );
        println!("SKIPPED: no prometheus on PATH (CI installs Debian's prometheus)");
    }
    found
}

/// A port nothing listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("finding a free port")
}

/// A Prometheus server of its own, scraping `targets` as job "steward" every second.
struct Prometheus {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(binary: &PathBuf, targets: &[String]) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        let targets = targets
            .iter()
            .map(|t| format!("\"{t}\""))
            .collect::<Vec<_>>()
            .join(", ");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {ALERT_RULES}\n\
                 scrape_configs:\n  - job_name: steward\n    static_configs:\n      - targets: [{targets}]\n"
            ),
        )
        .unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting prometheus");
        let prometheus = Prometheus {
            child,
            addr,
            _dir: dir,
        };
        prometheus.wait_until("Prometheus to be ready", Duration::from_secs(60), |p| {
            p.get("/-/ready").0 == 200
        });
        prometheus
    }

    /// GET `path`; (0, "") while nothing listens yet.
    fn get(&self, path: &str) -> (u16, String) {
        if std::net::TcpStream::connect(&self.addr).is_err() {
            return (0, String::new());
        }
        http_get(&self.addr, path)
    }

    /// The values of an instant query's series.
    fn query(&self, expr: &str) -> Vec<f64> {
        let query = utf8_percent_encode(expr, NON_ALPHANUMERIC);
        let (status, body) = self.get(&format!("/api/v1/query?query={query}"));
        assert_eq!(status, 200, "query {expr}: {body}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        json["data"]["result"]
            .as_array()
            .map(|series| {
                series
                    .iter()
                    .filter_map(|s| s["value"][1].as_str().and_then(|v| v.parse().ok()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The state of alert `name` ("pending", "firing"), if it is active.
    fn alert_state(&self, name: &str) -> Option<String> {
        let (status, body) = self.get("/api/v1/alerts");
        assert_eq!(status, 200, "alerts: {body}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        json["data"]["alerts"].as_array().and_then(|alerts| {
            alerts
                .iter()
                .find(|a| a["labels"]["alertname"] == name)
                .and_then(|a| a["state"].as_str().map(str::to_owned))
        })
    }

    /// The `schema` label of each active alert `name` (empty for an alert without one).
    fn alert_schemas(&self, name: &str) -> Vec<String> {
        let (status, body) = self.get("/api/v1/alerts");
        assert_eq!(status, 200, "alerts: {body}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        json["data"]["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["labels"]["alertname"] == name)
            .map(|a| {
                a["labels"]["schema"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect()
    }

    /// Polls `condition` until it holds, listing the active alerts if it does not within
    /// `within`; returns how long it took.
    fn wait_until(
        &self,
        what: &str,
        within: Duration,
        condition: impl Fn(&Prometheus) -> bool,
    ) -> Duration {
        let started = Instant::now();
        wait_until_explained(
            what,
            within,
            || condition(self),
            || format!("active alerts: {}", self.get("/api/v1/alerts").1),
        );
        started.elapsed()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_lock_on_the_jobs_table_fires_the_promotion_backlog_alert_and_it_resolves() {
    let Some(binary) = prometheus_binary() else {
        return;
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let db = runtime.block_on(TestDb::new());
    // Jobs come due every 250 ms for the next two minutes, enqueued before the leader starts so
    // that its first backlog reading already sees them.
    let now = chrono::Utc::now();
    let jobs: Vec<NewJob> = (0..480)
        .map(|i| {
            NewJob::new("e2e.tick").run_at(now + chrono::Duration::milliseconds(2_000 + 250 * i))
        })
        .collect();
    let client = runtime.block_on(async {
        Queue::new(db.pool(1)).enqueue_batch(&jobs).await.unwrap();
        db.client().await
    });
    let leader = Steward::spawn(&db.url(), &[]);
    leader.wait_for("leadership acquired", Duration::from_secs(30));
    let standby = Steward::spawn(&db.url(), &[]);
    let prometheus = Prometheus::start(&binary, &[leader.http_addr(), standby.http_addr()]);
    prometheus.wait_until(
        "both instances scraped, one leading",
        Duration::from_secs(30),
        |p| {
            p.query("up{job=\"steward\"} == 1").len() == 2
                && p.query("steward_leader{job=\"steward\"} == 1").len() == 1
        },
    );
    // The promoter is at work: jobs are being promoted on time.
    prometheus.wait_until("the first promotions", Duration::from_secs(30), |_| {
        runtime.block_on(async {
            let promoted: i64 = client
                .query_one(
                    "SELECT count(*) FROM steward.jobs WHERE state <> 'scheduled'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            promoted > 0
        })
    });

    runtime.block_on(async {
        client
            .batch_execute("BEGIN; LOCK TABLE steward.jobs IN ACCESS EXCLUSIVE MODE")
            .await
            .unwrap()
    });
    // dashboards/alerts.yml promises: a 20 s lock fires within 30 s of taking it.
    let fired = prometheus.wait_until(
        "StewardPromotionBacklog to fire during the lock",
        Duration::from_secs(30),
        |p| p.alert_state("StewardPromotionBacklog").as_deref() == Some("firing"),
    );
    runtime.block_on(async { client.batch_execute("ROLLBACK").await.unwrap() });
    // ... and resolves within 30 s of the release.
    let resolved = prometheus.wait_until(
        "StewardPromotionBacklog to resolve after the release",
        Duration::from_secs(30),
        |p| p.alert_state("StewardPromotionBacklog").is_none(),
    );
    println!(
        "StewardPromotionBacklog fired {:.1} s after LOCK TABLE and resolved {:.1} s after the release",
        fired.as_secs_f64(),
        resolved.as_secs_f64()
    );
}

#[test]
fn a_leader_restarted_over_and_over_fires_the_crash_loop_alert() {
    let Some(binary) = prometheus_binary() else {
        return;
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let db = runtime.block_on(TestDb::new());
    // One address for every incarnation, as a restarted pod keeps its target.
    let addr = format!("127.0.0.1:{}", free_port());
    let prometheus = Prometheus::start(&binary, std::slice::from_ref(&addr));
    let started = Instant::now();
    // Five terms: the alert needs more than 3 new terms in 10 minutes, so it must stay quiet
    // through the fourth and fire from the fifth. Each incarnation is killed only once
    // Prometheus has seen it lead.
    let mut epochs = Vec::new();
    for _ in 0..5 {
        let mut steward =
            Steward::spawn_with_env(&db.url(), &[], &[("STEWARD_METRICS_ADDR", &addr)]);
        let epoch = steward
            .wait_for("leadership acquired", Duration::from_secs(30))
            .field("epoch")
            .and_then(|v| v.as_i64())
            .expect("the acquired line names its epoch");
        epochs.push(epoch);
        prometheus.wait_until(
            "Prometheus to scrape this incarnation leading",
            Duration::from_secs(30),
            |p| {
                p.query(&format!(
                    "steward_leader_epoch{{job=\"steward\"}} == {epoch} and on (instance, exported_instance) steward_leader == 1"
                ))
                .len()
                    == 1
            },
        );
        assert!(
            prometheus.alert_state("StewardLeaderCrashLoop").is_none() || epochs.len() > 4,
            "StewardLeaderCrashLoop fired after only {} terms: {epochs:?}",
            epochs.len()
        );
        steward.signal("KILL");
        steward.wait_exit(Duration::from_secs(10));
    }
    let restarts_took = started.elapsed();
    let fired = prometheus.wait_until(
        "StewardLeaderCrashLoop to fire",
        Duration::from_secs(60),
        |p| p.alert_state("StewardLeaderCrashLoop").as_deref() == Some("firing"),
    );
    println!(
        "terms {epochs:?} in {:.1} s; StewardLeaderCrashLoop fired {:.1} s after the last kill",
        restarts_took.as_secs_f64(),
        fired.as_secs_f64()
    );
}

/// StewardNoLeader is judged per queue: two processes in one scrape job serve two schemas of one
/// database; one leads `steward`, the other stands aside for `tenant_b` (its schema is newer
/// than the binary, so it exports steward_leader 0 and never leads). The alert becomes active
/// for tenant_b alone, although the job has a leader. It is checked while pending (its `for` is
/// a minute): pending is where a wrong, job-wide expression would already differ.
#[test]
fn a_schema_without_a_leader_is_alerted_while_another_schema_has_one() {
    let Some(binary) = prometheus_binary() else {
        return;
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let db = runtime.block_on(TestDb::new());
    let url = db.url();
    let (code, _, stderr) = steward(&url, &["migrate", "--schema", "tenant_b"]);
    assert_eq!(code, Some(0), "{stderr}");
    runtime.block_on(async {
        db.client()
            .await
            .batch_execute(
                "INSERT INTO tenant_b.schema_history (version, name, applied_on, checksum)
                 VALUES (99, 'from_the_future', now()::text, '0')",
            )
            .await
            .unwrap()
    });
    let leader = Steward::spawn(&url, &[]);
    leader.wait_for("leadership acquired", Duration::from_secs(30));
    let aside = Steward::spawn(&url, &["--schema", "tenant_b"]);
    aside.wait_for(
        "this steward is older than the schema: not standing for election until it is upgraded",
        Duration::from_secs(30),
    );
    let prometheus = Prometheus::start(&binary, &[leader.http_addr(), aside.http_addr()]);
    prometheus.wait_until(
        "both schemas scraped, steward led and tenant_b not",
        Duration::from_secs(30),
        |p| {
            p.query("steward_leader{job=\"steward\", schema=\"steward\"} == 1")
                .len()
                == 1
                && p.query("steward_leader{job=\"steward\", schema=\"tenant_b\"} == 0")
                    .len()
                    == 1
        },
    );
    prometheus.wait_until(
        "StewardNoLeader active for tenant_b alone",
        Duration::from_secs(30),
        |p| p.alert_schemas("StewardNoLeader") == ["tenant_b"],
    );
}
