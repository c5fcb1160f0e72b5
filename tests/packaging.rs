//! The deployment examples parse and agree with the binary; the binary's own health probe,
//! completions and man page work.

#[path = "support/http.rs"]
mod http;
mod support;

use std::path::Path;
use std::time::Duration;
use steward_testkit::TestDb;
use support::*;

fn repo(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

fn run_help() -> String {
    let (_, stdout, _) = steward("postgres://u@h/db", &["run", "--help"]);
    stdout
}

#[test]
fn the_kubernetes_example_has_two_replicas_probes_a_budget_and_a_secret() {
    let text = std::fs::read_to_string(repo("deploy/kubernetes/steward.yaml")).unwrap();
    let documents: Vec<serde_yaml_ng::Value> = serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("a valid YAML document"))
        .collect();
    let of_kind = |kind: &str| {
        documents
            .iter()
            .find(|d| d["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind}"))
            .clone()
    };
    for d in &documents {
        assert!(
            d["apiVersion"].is_string() && d["metadata"]["name"].is_string(),
            "{d:?}"
        );
    }
    let secret = of_kind("Secret");
    assert!(secret["stringData"]["DATABASE_URL"].is_string());
    let deployment = of_kind("Deployment");
    let spec = &deployment["spec"];
    assert_eq!(spec["replicas"], 2);
    let labels = &spec["template"]["metadata"]["labels"];
    assert_eq!(&spec["selector"]["matchLabels"], labels);
    let container = &spec["template"]["spec"]["containers"][0];
    assert_eq!(container["args"][0], "run");
    assert_eq!(container["ports"][0]["containerPort"], 9464);
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(
        container["envFrom"][0]["secretRef"]["name"],
        secret["metadata"]["name"]
    );
    // Every variable it sets is one steward run reads.
    let help = run_help();
    for env in container["env"].as_sequence().unwrap() {
        let name = env["name"].as_str().unwrap();
        assert!(
            help.contains(&format!("env: {name}")),
            "{name} is not read by steward run"
        );
    }
    let budget = of_kind("PodDisruptionBudget");
    assert_eq!(budget["spec"]["minAvailable"], 1);
    assert_eq!(&budget["spec"]["selector"]["matchLabels"], labels);
}

#[test]
fn the_systemd_unit_verifies_and_runs_steward_run() {
    let unit = std::fs::read_to_string(repo("deploy/systemd/steward.service")).unwrap();
    assert!(
        unit.contains("ExecStart=/usr/local/bin/steward run"),
        "{unit}"
    );
    let help = run_help();
    let env = std::fs::read_to_string(repo("deploy/systemd/steward.env")).unwrap();
    for name in env
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains('='))
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
    {
        assert!(
            help.contains(&format!("env: {name}")),
            "{name} is not read by steward run"
        );
    }
    let Ok(analyze) = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
    else {
        println!("SKIPPED systemd-analyze verify: not installed");
        return;
    };
    assert!(analyze.status.success());
    // The unit names the installed path; verify it against the binary under test.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("steward.service");
    std::fs::write(&copy, unit.replace("/usr/local/bin/steward", STEWARD)).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_image_checks_its_health_with_the_binary() {
    let dockerfile = std::fs::read_to_string(repo("Dockerfile")).unwrap();
    assert!(
        dockerfile.contains(r#"HEALTHCHECK"#)
            && dockerfile.contains(r#"CMD ["steward", "health"]"#),
        "{dockerfile}"
    );
    let compose = std::fs::read_to_string(repo("docker-compose.yml")).unwrap();
    let compose: serde_yaml_ng::Value = serde_yaml_ng::from_str(&compose).unwrap();
    for volume in ["postgres-data", "prometheus-data", "grafana-data"] {
        assert!(
            !compose["volumes"][volume].is_sequence(),
            "named volume {volume}"
        );
        assert!(
            compose["volumes"].get(volume).is_some(),
            "named volume {volume}"
        );
    }
}

#[test]
fn steward_health_probes_a_running_steward() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let db = runtime.block_on(TestDb::new());
    let running = Steward::spawn(&db.url(), &[]);
    running.wait_for("leadership acquired", Duration::from_secs(30));
    let addr = running.http_addr();
    assert_eq!(running.get("/healthz").0, 200);
    let (code, _, stderr) = steward(&db.url(), &["health", "--addr", &addr]);
    assert_eq!(code, Some(0), "{stderr}");
    let (code, _, stderr) = steward(&db.url(), &["health", "--addr", &addr, "--path", "/nope"]);
    assert_eq!(code, Some(1), "a 404 is unhealthy");
    assert!(stderr.contains("404"), "{stderr}");
    let (code, _, _) = steward(&db.url(), &["health", "--addr", &addr, "--path", "/readyz"]);
    assert_eq!(code, Some(0));
    drop(running);
    let (code, _, stderr) = steward(&db.url(), &["health", "--addr", &addr]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains(&addr), "{stderr}");
}

#[test]
fn completions_and_the_man_page_come_from_the_cli() {
    let (code, bash, _) = steward("", &["completions", "bash"]);
    assert_eq!(code, Some(0));
    assert!(
        bash.contains("_steward") && bash.contains("status"),
        "{bash}"
    );
    let (code, man, _) = steward("", &["man"]);
    assert_eq!(code, Some(0));
    assert!(
        man.contains(".TH steward") && man.contains("migrate"),
        "{man}"
    );
}
