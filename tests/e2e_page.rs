//! The live page on the metrics port, driven in a real headless Chromium.

#[path = "support/http.rs"]
mod http;
mod support;

use std::time::Duration;
use steward_testkit::TestDb;
use support::*;

/// Debian's Chromium, where CI installs it.
fn chromium() -> Option<std::path::PathBuf> {
    find_on_path(&["chromium", "chromium-browser", "google-chrome"])
}

/// Runs Chromium headless on `url` with `extra` arguments; returns its stdout.
fn headless(browser: &std::path::Path, url: &str, extra: &[&str]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            // The page polls every second: let its scripts run for a few seconds first.
            "--virtual-time-budget=4000",
            "--window-size=1200,1000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(url)
        .output()
        .expect("running chromium");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_page_shows_the_leader_and_passes_in_every_lane() {
    let Some(browser) = chromium() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "no Chromium on PATH under CI (.ci/run installs Debian's chromium)"
        );
        println!("SKIPPED: no Chromium on PATH (CI installs Debian's chromium)");
        return;
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let db = runtime.block_on(TestDb::new());
    // Rescues without a quiet period, so that every loop has passes at once.
    let steward = Steward::spawn(
        &db.url(),
        &[
            "--set",
            "branches.rescue_stale_heartbeats.quiet_period=0s",
            "--set",
            "branches.rescue_expired_deadlines.quiet_period=0s",
            "--set",
            "branches.rescue_expired_callbacks.quiet_period=0s",
        ],
    );
    let instance = steward
        .wait_for("leadership acquired", Duration::from_secs(30))
        .field("instance")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_owned();
    let loops = ["promote_scheduled", "slo", "hygiene"];
    let url = format!("http://{}/", steward.http_addr());
    // Wait until the instance itself has passes of every loop to show.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, body) = steward.get("/passes");
        if loops
            .iter()
            .all(|l| body.contains(&format!("\"loop\":\"{l}\"")))
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "passes: {body}");
        std::thread::sleep(Duration::from_millis(100));
    }

    let dom = headless(&browser, &url, &["--dump-dom"]);
    assert!(
        dom.contains(&format!(
            "data-instance=\"{instance}\" data-leader=\"true\""
        )),
        "the leader is not listed as such:\n{dom}"
    );
    for lane in loops {
        let start = dom
            .find(&format!("data-loop=\"{lane}\""))
            .unwrap_or_else(|| panic!("no lane {lane}:\n{dom}"));
        let end = dom[start..].find("</g>").map_or(dom.len(), |e| start + e);
        assert!(
            dom[start..end].contains("class=\"pass ok\""),
            "no pass in lane {lane}:\n{}",
            &dom[start..end]
        );
    }
    assert!(
        dom.contains("data-branch=\"rescue_stale_heartbeats\""),
        "{dom}"
    );

    // Kept as a test artifact.
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("steward-page.png");
    headless(
        &browser,
        &url,
        &[&format!("--screenshot={}", shot.display())],
    );
    assert!(shot.exists(), "no screenshot at {}", shot.display());
    println!("screenshot: {}", shot.display());
}
