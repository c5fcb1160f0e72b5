//! CI smoke test: `steward-bench --quick --json` against a real PostgreSQL. It checks the
//! report's shape (every scenario ran and has every key, the SVG exists), never its timings.
//!
//! The failover, footprint, rescue, worker, heartbeat, scale and fleet scenarios need the `steward`
//! binary. This test builds it with `cargo build -p steward` (a no-op when `cargo test
//! --workspace` has already built it) into the target directory this test runs from, and passes
//! it with `--steward-bin`.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

const BENCH: &str = env!("CARGO_BIN_EXE_steward-bench");

fn steward_binary() -> PathBuf {
    let profile_dir = Path::new(BENCH)
        .parent()
        .expect("the bench binary's directory");
    let target_dir = profile_dir.parent().expect("the target directory");
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .args(["build", "--quiet", "-p", "steward", "--target-dir"])
        .arg(target_dir)
        .current_dir(workspace);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        build.arg("--release");
    }
    let status = build.status().expect("running cargo build -p steward");
    assert!(status.success(), "cargo build -p steward failed");
    let bin = profile_dir.join("steward");
    assert!(bin.is_file(), "no steward binary at {}", bin.display());
    bin
}

fn keys(value: &Value, path: &str, expected: &[&str]) {
    let object = value
        .as_object()
        .unwrap_or_else(|| panic!("{path} is not an object: {value}"));
    for key in expected {
        assert!(object.contains_key(*key), "{path} has no key {key:?}");
    }
}

const QUANTILES: &[&str] = &["count", "p50", "p90", "p99", "p999", "max", "mean"];

fn quantiles(value: &Value, path: &str) {
    keys(value, path, QUANTILES);
}

#[test]
fn quick_run_reports_every_scenario_with_every_key() {
    let out = tempfile::tempdir().unwrap();
    let steward = steward_binary();
    let output = Command::new(BENCH)
        .args(["--quick", "--json", "--out"])
        .arg(out.path())
        .arg("--steward-bin")
        .arg(&steward)
        .output()
        .expect("running steward-bench");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "steward-bench failed:\n{stderr}");
    let report: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}); stderr:\n{stderr}"));

    keys(
        &report,
        "report",
        &[
            "schema_version",
            "harness",
            "mode",
            "command",
            "started_at",
            "finished_at",
            "wall_s",
            "machine",
            "settings",
            "scenarios",
            "targets",
            "plots",
        ],
    );
    assert_eq!(report["schema_version"], 1);
    assert_eq!(report["mode"], "quick");
    keys(
        &report["machine"],
        "machine",
        &[
            "nproc",
            "memory_gib",
            "cpu_model",
            "kernel",
            "loadavg_at_start",
            "postgres",
            "profile",
        ],
    );
    keys(
        &report["machine"]["postgres"],
        "machine.postgres",
        &[
            "version",
            "fsync",
            "synchronous_commit",
            "shared_buffers",
            "autovacuum",
        ],
    );

    let scenarios = &report["scenarios"];
    for name in [
        "isolation",
        "promotion",
        "throughput",
        "failover",
        "footprint",
        "rescue",
        "worker",
        "heartbeat",
        "scale",
        "fleet",
    ] {
        let entry = &scenarios[name];
        keys(
            entry,
            name,
            &["status", "error", "elapsed_s", "targets", "result"],
        );
        assert_eq!(entry["status"], "ok", "{name}: {}", entry["error"]);
        for target in entry["targets"].as_array().unwrap() {
            keys(
                target,
                "target",
                &["name", "target", "value", "unit", "pass"],
            );
        }
    }

    let iso = &scenarios["isolation"]["result"];
    keys(
        iso,
        "isolation",
        &[
            "params",
            "seed_s",
            "split",
            "monolithic",
            "slo_branches",
            "slo_all_start_delay_ratio",
        ],
    );
    for mode in ["split", "monolithic"] {
        let m = &iso[mode];
        keys(
            m,
            mode,
            &[
                "mode",
                "window_s",
                "branches",
                "slo_start_delay_ms",
                "slo_wake_delay_ms",
                "slo_overruns",
                "promotion_lag_ms",
                "hygiene_max_pass_ms",
                "backlog_refilled_rows",
                "workload",
            ],
        );
        quantiles(&m["slo_start_delay_ms"], "slo_start_delay_ms");
        quantiles(&m["promotion_lag_ms"], "promotion_lag_ms");
        for b in m["branches"].as_array().unwrap() {
            keys(
                b,
                "branch",
                &[
                    "branch",
                    "loop",
                    "runs",
                    "rows",
                    "start_delay_ms",
                    "wake_delay_ms",
                    "duration_ms",
                    "overruns",
                    "delayed_runs",
                    "timeouts",
                    "errors",
                    "last_error",
                ],
            );
        }
    }
    let slo: Vec<&str> = iso["slo_branches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["branch"].as_str().unwrap())
        .collect();
    for branch in [
        "promote_scheduled",
        "rescue_expired_callbacks",
        "rescue_expired_deadlines",
        "rescue_stale_heartbeats",
    ] {
        assert!(slo.contains(&branch), "no SLO row for {branch}: {slo:?}");
    }
    for row in iso["slo_branches"].as_array().unwrap() {
        keys(
            row,
            "slo row",
            &[
                "branch",
                "split_start_delay_ms",
                "monolithic_start_delay_ms",
                "split_overruns",
                "monolithic_overruns",
                "split_delayed_runs",
                "monolithic_delayed_runs",
                "start_delay_ratio",
                "split_promotion_lag_ms",
                "monolithic_promotion_lag_ms",
                "promotion_lag_ratio",
            ],
        );
        keys(&row["start_delay_ratio"], "ratio", &["p50", "p99", "max"]);
    }

    let promo = &scenarios["promotion"]["result"];
    keys(
        promo,
        "promotion",
        &[
            "rate",
            "horizon_s",
            "window_s",
            "achieved_rate",
            "lag_ms",
            "promote_runs",
            "promoted_rows",
            "promote_start_delay_ms",
            "promote_wake_delay_ms",
            "workload",
        ],
    );
    quantiles(&promo["lag_ms"], "lag_ms");

    let tput = &scenarios["throughput"]["result"];
    keys(
        tput,
        "throughput",
        &["rows_per_backlog", "repeats", "large_batch", "branches"],
    );
    let names: Vec<&str> = tput["branches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["branch"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "promote_scheduled",
            "rescue_stale_heartbeats",
            "rescue_expired_deadlines",
            "rescue_expired_callbacks",
            "cleanup"
        ]
    );
    for b in tput["branches"].as_array().unwrap() {
        keys(
            b,
            "throughput branch",
            &[
                "branch",
                "rows",
                "plain_s",
                "plain_rows_per_s",
                "plain_samples_s",
                "plain_sql",
                "default",
                "large",
            ],
        );
        for config in ["default", "large"] {
            keys(
                &b[config],
                config,
                &[
                    "config",
                    "batch_size",
                    "max_batches_per_run",
                    "passes",
                    "seconds",
                    "rows_per_s",
                    "ratio",
                    "samples_s",
                    "ratio_samples",
                ],
            );
        }
    }

    let failover = &scenarios["failover"]["result"];
    keys(
        failover,
        "failover",
        &[
            "trials",
            "settle_ms",
            "steward_bin",
            "failover_ms",
            "acquired_ms",
            "samples_ms",
        ],
    );
    quantiles(&failover["failover_ms"], "failover_ms");
    assert_eq!(failover["samples_ms"].as_array().unwrap().len(), 5);

    keys(
        &scenarios["footprint"]["result"],
        "footprint",
        &[
            "window_s",
            "steward_bin",
            "cpu_seconds",
            "cpu_percent",
            "rss_mib_mean",
            "rss_mib_max",
            "threads",
            "db_backends",
            "db_backend_cpu_percent",
        ],
    );

    let rescue = &scenarios["rescue"]["result"];
    keys(
        rescue,
        "rescue",
        &[
            "steward_bin",
            "window_s",
            "every_ms",
            "staleness_s",
            "interval_s",
            "idle_s",
            "reasons",
        ],
    );
    let reasons = rescue["reasons"].as_array().unwrap();
    assert_eq!(reasons.len(), 3);
    for reason in reasons {
        keys(
            reason,
            "rescue.reasons",
            &[
                "reason",
                "branch",
                "runs",
                "early",
                "missed",
                "latency_ms",
                "idle_passes",
                "idle_budget",
            ],
        );
        quantiles(&reason["latency_ms"], "rescue latency_ms");
    }

    let worker = &scenarios["worker"]["result"];
    keys(
        worker,
        "worker",
        &[
            "steward_bin",
            "concurrency",
            "lead_ms",
            "window_s",
            "warmup_s",
            "rates",
        ],
    );
    let rates = worker["rates"].as_array().unwrap();
    assert_eq!(rates.len(), 2);
    for r in rates {
        keys(
            r,
            "worker rate",
            &[
                "rate",
                "enqueued",
                "achieved_enqueue_rate",
                "window_s",
                "completed_in_window",
                "sustained_jobs_per_s",
                "slowest_second",
                "pickup_lag_ms",
                "claim_lag_ms",
                "handler_starts",
                "duplicate_runs",
                "lost_jobs",
                "drain_s",
                "worker_cpu_percent",
                "leader_cpu_percent",
            ],
        );
        quantiles(&r["pickup_lag_ms"], "pickup_lag_ms");
        quantiles(&r["claim_lag_ms"], "claim_lag_ms");
    }

    let heartbeat = &scenarios["heartbeat"]["result"];
    keys(
        heartbeat,
        "heartbeat",
        &[
            "window_s",
            "rtt_ms",
            "staleness_s",
            "rescue_interval_s",
            "heartbeat_interval_s",
            "long_job_s",
            "long_slots",
            "short_rate",
            "short_slots",
            "pool_size",
            "steward_bin",
            "baseline",
            "steward",
        ],
    );
    for mode in ["baseline", "steward"] {
        keys(
            &heartbeat[mode],
            mode,
            &[
                "mode",
                "short_enqueued",
                "long_enqueued",
                "long_runs",
                "rescued",
                "live_runs_rescued",
                "completions_refused",
                "heartbeat_ms",
                "heartbeat_errors",
                "flush_age_max_s",
                "oldest_running_heartbeat_max_s",
                "completed_in_window",
                "jobs_per_s",
            ],
        );
        quantiles(&heartbeat[mode]["heartbeat_ms"], "heartbeat_ms");
    }

    let scale = &scenarios["scale"]["result"];
    keys(
        scale,
        "scale",
        &["params", "sizes", "mass_rescue", "hygiene"],
    );
    let sizes = scale["sizes"].as_array().unwrap();
    assert_eq!(sizes.len(), 2, "quick mode seeds two sizes");
    for size in sizes {
        keys(
            size,
            "scale size",
            &[
                "rows",
                "seed_s",
                "seed_parts",
                "vacuum_analyze_s",
                "flows",
                "before",
                "after_flow",
                "after_all",
                "leader_rss_mib_max",
            ],
        );
        for growth in ["before", "after_flow"] {
            keys(
                &size[growth],
                growth,
                &[
                    "table_bytes",
                    "indexes_bytes",
                    "live_tuples",
                    "dead_tuples",
                    "autovacuum_count",
                    "autoanalyze_count",
                    "indexes",
                ],
            );
        }
        for flow in size["flows"].as_array().unwrap() {
            keys(
                flow,
                "scale flow",
                &[
                    "rate",
                    "achieved_rate",
                    "promotion_lag_ms",
                    "slo",
                    "workload",
                ],
            );
            quantiles(&flow["promotion_lag_ms"], "scale promotion_lag_ms");
            let slo: Vec<&str> = flow["slo"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b["branch"].as_str().unwrap())
                .collect();
            assert_eq!(
                slo,
                [
                    "promote_scheduled",
                    "rescue_stale_heartbeats",
                    "rescue_expired_deadlines",
                    "rescue_expired_callbacks"
                ]
            );
        }
    }
    assert_eq!(sizes[0]["flows"].as_array().unwrap().len(), 1);
    assert_eq!(sizes[1]["flows"].as_array().unwrap().len(), 2);
    keys(
        &scale["mass_rescue"],
        "mass_rescue",
        &[
            "dead_runs",
            "last_attempt",
            "rescued",
            "all_rescued_after_s",
            "promotion_lag_ms",
        ],
    );
    let hygiene = &scale["hygiene"];
    keys(
        hygiene,
        "hygiene",
        &["backlog_rows", "modes", "plain", "split_busy_vs_plain"],
    );
    let modes: Vec<&str> = hygiene["modes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mode"].as_str().unwrap())
        .collect();
    assert_eq!(modes, ["split", "monolithic"]);
    for mode in hygiene["modes"].as_array().unwrap() {
        keys(
            mode,
            "hygiene mode",
            &[
                "slo_start_delay_ms",
                "promotion_lag_ms",
                "cleanup_rows",
                "cleanup_rows_per_s",
                "cleanup_busy_rows_per_s",
                "backlog_left",
            ],
        );
    }
    keys(
        &hygiene["plain"],
        "plain",
        &["rows", "batch_size", "seconds", "rows_per_s"],
    );

    let fleet = &scenarios["fleet"]["result"];
    keys(
        fleet,
        "fleet",
        &[
            "params",
            "settle",
            "idle",
            "busy",
            "backlog_seed_s",
            "takeover",
            "sessions_max",
        ],
    );
    keys(
        &fleet["params"],
        "fleet params",
        &[
            "queues",
            "processes",
            "window_s",
            "warmup_s",
            "rate",
            "backlog_rows_per_queue",
            "trials",
            "poll_interval_ms",
            "slo_sessions",
            "hygiene_sessions",
            "steward_bin",
        ],
    );
    keys(
        &fleet["settle"],
        "fleet settle",
        &[
            "all_led_s",
            "settled_s",
            "fair_share",
            "cap",
            "shares",
            "sessions",
        ],
    );
    assert_eq!(fleet["settle"]["shares"].as_array().unwrap().len(), 3);
    keys(
        &fleet["idle"],
        "fleet idle",
        &[
            "window_s",
            "processes",
            "cpu_percent",
            "cpu_percent_per_queue",
            "rss_mib_total",
            "db_backends",
            "db_backend_cpu_percent",
            "db_backend_cpu_percent_per_queue",
            "sessions_max",
            "machine_cpu_busy_percent",
        ],
    );
    for process in fleet["idle"]["processes"].as_array().unwrap() {
        keys(
            process,
            "fleet idle process",
            &[
                "instance",
                "pid",
                "queues",
                "cpu_percent",
                "cpu_percent_per_queue",
                "rss_mib_mean",
                "rss_mib_max",
                "rss_mib_per_queue",
                "threads",
                "slo",
            ],
        );
    }
    let neighbours: Vec<&str> = fleet["busy"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["neighbours"].as_str().unwrap())
        .collect();
    assert_eq!(neighbours, ["idle", "hygiene"]);
    for busy in fleet["busy"].as_array().unwrap() {
        keys(
            busy,
            "fleet busy",
            &[
                "schema",
                "leader",
                "leader_queues",
                "leader_changed",
                "window_s",
                "achieved_rate",
                "promotion_lag_ms",
                "metrics_promotion_lag_ms",
                "leader_slo",
                "slo_overruns",
                "backlog_rows_at_start",
                "backlog_rows_left",
                "cleanup_rows_per_s",
                "backlog_queues_left_min_per_process",
                "sessions_max",
                "machine_cpu_busy_percent",
                "workload",
            ],
        );
        quantiles(&busy["promotion_lag_ms"], "fleet promotion_lag_ms");
    }
    let takeover = &fleet["takeover"];
    keys(takeover, "fleet takeover", &["trials", "takeover_ms"]);
    quantiles(&takeover["takeover_ms"], "fleet takeover_ms");
    for trial in takeover["trials"].as_array().unwrap() {
        keys(
            trial,
            "fleet trial",
            &[
                "victim",
                "queues",
                "released_ms",
                "takeover_ms",
                "resettled_s",
            ],
        );
    }

    let svg = out.path().join("distributions.svg");
    let scale_svg = out.path().join("scale.svg");
    let plots: Vec<&str> = report["plots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(plots, [svg.to_str().unwrap(), scale_svg.to_str().unwrap()]);
    for path in [&svg, &scale_svg] {
        let svg_text = std::fs::read_to_string(path).expect("the SVG plot");
        assert!(svg_text.starts_with("<svg"), "not an SVG");
    }
    assert!(out.path().join("report.json").is_file());
    assert!(out.path().join("report.txt").is_file());
}
