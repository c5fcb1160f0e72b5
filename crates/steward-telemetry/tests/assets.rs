//! The Grafana dashboard and the alert rules in dashboards/, checked against the metric list in
//! `steward_telemetry::names::ALL`: every Steward metric and label they use is listed, every
//! alert has promtool unit tests, every Grafana variable is defined, and (with promtool on PATH)
//! every dashboard expression parses, and every alert is evaluated per queue. A live scrape is
//! checked against the same list in tests/e2e_telemetry.rs, so a panel or rule cannot select a
//! series Steward does not export.

use regex::Regex;
use serde_json::Value;
use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::sync::LazyLock;
use steward_telemetry::names::{self, Kind, Metric};

fn dashboards() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../dashboards")
}

fn read(file: &str) -> String {
    let path = dashboards().join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn dashboard() -> Value {
    serde_json::from_str(&read("steward.json")).expect("steward.json is JSON")
}

fn yaml(file: &str) -> Value {
    serde_yaml_ng::from_str(&read(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
}

/// Fails the test with every problem found, one a line.
fn assert_none(what: &str, problems: Vec<String>) {
    assert!(problems.is_empty(), "{what}:\n  {}", problems.join("\n  "));
}

// ------------------------------------------------------------------------------ metric names

/// A series name used in PromQL: the metric, and whether it is a histogram's `_bucket`.
fn series(name: &str) -> Option<(&'static Metric, bool)> {
    if let Some(metric) = names::find(name) {
        // A classic histogram has no series under its bare name.
        return (metric.kind != Kind::Histogram).then_some((metric, false));
    }
    ["_bucket", "_sum", "_count"]
        .into_iter()
        .find_map(|suffix| {
            let metric = names::find(name.strip_suffix(suffix)?)?;
            (metric.kind == Kind::Histogram).then_some((metric, suffix == "_bucket"))
        })
}

/// Why `name` is no series of a listed metric.
fn unknown(name: &str) -> String {
    match names::find(name) {
        Some(_) => format!("{name} is a histogram: select its _bucket, _sum or _count series"),
        None => format!("{name} is not in names::ALL"),
    }
}

/// The label names a stored series of `metric` can have: its own and the queue's (`schema`, and
/// `database` where several databases are served), the target's `job` and `instance`
/// (Prometheus keeps a clashing `instance` of the metric's as `exported_instance`), and `le` on
/// a histogram's buckets.
fn labels_of(metric: &Metric, bucket: bool) -> BTreeSet<&'static str> {
    let mut labels: BTreeSet<&str> = metric.series_labels(true).into_iter().collect();
    labels.extend(["job", "instance"]);
    if metric.labels.contains(&"instance") {
        labels.insert("exported_instance");
    }
    if bucket {
        labels.insert("le");
    }
    labels
}

// ---------------------------------------------------------------------------------- PromQL

static STRING: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r#""(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`"#).unwrap());
static STEWARD_NAME: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\bsteward_[A-Za-z0-9_:]*").unwrap());
static SELECTOR: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\b(steward_[A-Za-z0-9_:]*)\s*\{([^}]*)\}").unwrap());
static MATCHER: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)").unwrap());
static CLAUSE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)").unwrap()
});

/// The byte range of the balanced parenthesised group that opens at `open`.
fn group_at(expr: &str, open: usize) -> Option<(usize, usize)> {
    let mut depth = 0;
    for (i, c) in expr.char_indices().skip_while(|(i, _)| *i < open) {
        match c {
            '(' => depth += 1,
            ')' if depth == 1 => return Some((open, i + 1)),
            ')' => depth -= 1,
            _ => {}
        }
    }
    None
}

/// The innermost parenthesised group around byte `at`, or the whole expression.
fn group_around(expr: &str, at: usize) -> &str {
    let mut depth = 0;
    let open = expr[..at].char_indices().rev().find_map(|(i, c)| {
        match c {
            ')' => depth += 1,
            '(' if depth == 0 => return Some(i),
            '(' => depth -= 1,
            _ => {}
        }
        None
    });
    match open.and_then(|open| group_at(expr, open)) {
        Some((start, end)) => &expr[start..end],
        None => expr,
    }
}

/// A grouping or matching clause (`by`, `without`, `on`, `ignoring`, `group_left`,
/// `group_right`) of an expression whose string literals are blanked.
struct Clause<'a> {
    whole: &'a str,
    keyword: &'a str,
    labels: Vec<&'a str>,
    /// The aggregation's argument for `by`/`without (...) (arg)`, else the innermost
    /// parenthesised group around the clause.
    scope: &'a str,
}

fn clauses(code: &str) -> Vec<Clause<'_>> {
    CLAUSE
        .captures_iter(code)
        .map(|clause| {
            let whole = clause.get(0).expect("match");
            let keyword = clause.get(1).expect("group").as_str();
            let argument = code[whole.end()..]
                .find(|c: char| !c.is_whitespace())
                .map(|skip| whole.end() + skip)
                .filter(|&at| code[at..].starts_with('('))
                .filter(|_| matches!(keyword, "by" | "without"))
                .and_then(|at| group_at(code, at));
            let scope = match argument {
                Some((start, end)) => &code[start..end],
                None => group_around(code, whole.start()),
            };
            let labels = clause
                .get(2)
                .expect("group")
                .as_str()
                .split(',')
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            Clause {
                whole: whole.as_str(),
                keyword,
                labels,
                scope,
            }
        })
        .collect()
}

/// Problems with one PromQL expression: Steward metric names missing from `names::ALL`, label
/// matchers naming a label their metric lacks, and grouping or matching clauses (`by`, `on`,
/// `group_left`, ...) naming a label that no Steward metric in their scope has. A clause's
/// scope is its aggregation's argument for `by`/`without (...) (arg)`, else the innermost
/// parenthesised group around it; clauses over no Steward metric are not checked.
fn promql_problems(place: &str, expr: &str) -> Vec<String> {
    // String literals can hold anything, braces and metric names included.
    let code = STRING.replace_all(expr, "\"\"");
    let mut problems = Vec::new();
    for name in STEWARD_NAME.find_iter(&code) {
        if series(name.as_str()).is_none() {
            problems.push(format!("{place}: {}", unknown(name.as_str())));
        }
    }
    for selector in SELECTOR.captures_iter(&code) {
        let Some((metric, bucket)) = series(&selector[1]) else {
            continue;
        };
        let allowed = labels_of(metric, bucket);
        for label in MATCHER.captures_iter(&selector[2]) {
            if !allowed.contains(&label[1]) {
                problems.push(format!(
                    "{place}: {} has no label {} (it has {allowed:?})",
                    &selector[1], &label[1]
                ));
            }
        }
    }
    for clause in clauses(&code) {
        let allowed: BTreeSet<&str> = STEWARD_NAME
            .find_iter(clause.scope)
            .filter_map(|name| series(name.as_str()))
            .flat_map(|(metric, bucket)| labels_of(metric, bucket))
            .collect();
        if allowed.is_empty() {
            continue;
        }
        for label in &clause.labels {
            if !allowed.contains(label) {
                problems.push(format!(
                    "{place}: `{}` names {label}, which no Steward metric in its scope has \
                     ({allowed:?})",
                    clause.whole
                ));
            }
        }
    }
    problems
}

// ------------------------------------------------------------------------------- dashboard

/// Grafana's own variables that the dashboard may use, and what they stand for in a check.
const GRAFANA_BUILTINS: &[(&str, &str)] = &[
    ("__rate_interval", "1m"),
    ("__interval", "1m"),
    ("__range", "1h"),
    ("__all", ".*"),
];

static VARIABLE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\$\{(\w+)(?::[^}]*)?\}|\$(\w+)|\[\[(\w+)(?::[^\]]*)?\]\]").unwrap()
});

/// The panels, nested ones (in collapsed rows) included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for panel in list.as_array().into_iter().flatten() {
            out.push(panel);
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

fn variables(dashboard: &Value) -> impl Iterator<Item = &Value> {
    dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
}

/// Every PromQL expression of the dashboard, with where it is: panel queries, annotation
/// queries, and query variables (`label_values(expr, label)` is checked as
/// `group by (label) (expr)`, which asks Prometheus the same).
fn dashboard_expressions(dashboard: &Value) -> Vec<(String, String)> {
    let label_values = Regex::new(r"(?s)^\s*label_values\((.*),\s*(\w+)\s*\)\s*$").unwrap();
    let mut found = Vec::new();
    for panel in panels(dashboard) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                let place = format!("panel {} ({})", panel["title"], target["refId"]);
                found.push((place, expr.to_owned()));
            }
        }
    }
    for annotation in dashboard["annotations"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if let Some(expr) = annotation["expr"].as_str() {
            found.push((
                format!("annotation {}", annotation["name"]),
                expr.to_owned(),
            ));
        }
    }
    for variable in variables(dashboard).filter(|v| v["type"] == "query") {
        let query = variable["query"]["query"]
            .as_str()
            .or(variable["query"].as_str())
            .unwrap_or_default();
        if let Some(call) = label_values.captures(query) {
            let expr = format!("group by ({}) ({})", &call[2], &call[1]);
            found.push((format!("variable {}", variable["name"]), expr));
        }
    }
    found
}

/// Every string in a JSON document.
fn strings(value: &Value) -> Vec<&str> {
    match value {
        Value::String(s) => vec![s],
        Value::Array(items) => items.iter().flat_map(strings).collect(),
        Value::Object(map) => map.values().flat_map(strings).collect(),
        _ => Vec::new(),
    }
}

/// Grafana variables used anywhere in the dashboard that it does not define.
fn undefined_variables(dashboard: &Value) -> Vec<String> {
    let defined: BTreeSet<&str> = variables(dashboard)
        .filter_map(|v| v["name"].as_str())
        .chain(GRAFANA_BUILTINS.iter().map(|(name, _)| *name))
        .collect();
    let used: BTreeSet<&str> = strings(dashboard)
        .into_iter()
        .flat_map(|s| VARIABLE.captures_iter(s))
        .filter_map(|c| c.iter().skip(1).flatten().next().map(|m| m.as_str()))
        .collect();
    used.difference(&defined)
        .map(|name| format!("${name} is used but not defined under templating"))
        .collect()
}

/// `expr` with each variable replaced by its default (a variable set to "All" by its
/// `allValue`), as Grafana would send it to Prometheus.
fn substitute(dashboard: &Value, expr: &str) -> String {
    let value = |name: &str| -> String {
        if let Some((_, value)) = GRAFANA_BUILTINS.iter().find(|(n, _)| *n == name) {
            return (*value).to_owned();
        }
        let Some(variable) = variables(dashboard).find(|v| v["name"] == name) else {
            return format!("${name}");
        };
        let current = &variable["current"]["value"];
        let current = current.as_str().or(current[0].as_str()).unwrap_or(".*");
        match current {
            "$__all" => variable["allValue"].as_str().unwrap_or(".*").to_owned(),
            value => value.to_owned(),
        }
    };
    VARIABLE
        .replace_all(expr, |c: &regex::Captures| {
            value(c.iter().skip(1).flatten().next().map_or("", |m| m.as_str()))
        })
        .into_owned()
}

#[test]
fn the_dashboard_uses_only_listed_metrics_and_labels() {
    let dashboard = dashboard();
    let expressions = dashboard_expressions(&dashboard);
    assert!(expressions.len() >= 20, "{expressions:?}");
    let problems = expressions
        .iter()
        .flat_map(|(place, expr)| promql_problems(place, &substitute(&dashboard, expr)))
        .collect();
    assert_none("dashboards/steward.json", problems);
}

/// Selectors of per-queue metrics that do not filter by the dashboard's queue variables: a panel
/// would mix the queues the viewer did not select into the ones they did.
fn unfiltered_selectors(place: &str, expr: &str) -> Vec<String> {
    let code = STRING.replace_all(expr, |c: &regex::Captures| {
        // The variables' matchers stay readable; other strings are blanked as elsewhere.
        match &c[0] {
            r#""$schema""# | r#""$database""# => c[0].to_owned(),
            _ => "\"\"".to_owned(),
        }
    });
    SELECTOR
        .captures_iter(&code)
        .filter(|selector| series(&selector[1]).is_some_and(|(metric, _)| metric.per_queue))
        .filter(|selector| {
            !(selector[2].contains(r#"schema=~"$schema""#)
                && selector[2].contains(r#"database=~"$database""#))
        })
        .map(|selector| {
            format!(
                "{place}: {} does not filter by schema=~\"$schema\" and database=~\"$database\"",
                &selector[0]
            )
        })
        .collect()
}

#[test]
fn every_dashboard_query_filters_by_the_selected_queues() {
    let dashboard = dashboard();
    let problems = dashboard_expressions(&dashboard)
        .iter()
        // The queue variables themselves list what there is to select from.
        .filter(|(place, _)| {
            !["variable \"schema\"", "variable \"database\""].contains(&place.as_str())
        })
        .flat_map(|(place, expr)| unfiltered_selectors(place, expr))
        .collect();
    assert_none("dashboards/steward.json", problems);
    let queue_variables: Vec<&str> = variables(&dashboard)
        .filter_map(|v| v["name"].as_str())
        .filter(|name| [names::SCHEMA_LABEL, names::DATABASE_LABEL].contains(name))
        .collect();
    assert_eq!(queue_variables, ["schema", "database"]);
}

#[test]
fn the_dashboard_defines_every_variable_it_uses() {
    assert_none("dashboards/steward.json", undefined_variables(&dashboard()));
}

/// promtool's own parser is the reference: every dashboard expression, variables substituted,
/// goes into a rules file for `promtool check rules`. CI installs promtool; a machine without
/// it skips this check and says so.
#[test]
fn promtool_parses_every_dashboard_expression() {
    if Command::new("promtool").arg("--version").output().is_err() {
        // Written to stderr itself, which the test harness does not capture, so it shows.
        let _ = writeln!(
            std::io::stderr(),
            "promtool_parses_every_dashboard_expression: skipped, promtool is not on PATH \
             (apt-get install prometheus)"
        );
        return;
    }
    let dashboard = dashboard();
    let expressions = dashboard_expressions(&dashboard);
    let rules: Vec<Value> = expressions
        .iter()
        .enumerate()
        .map(|(i, (_, expr))| {
            let expr = substitute(&dashboard, expr);
            serde_json::json!({"record": format!("dashboard:expr_{i}"), "expr": expr})
        })
        .collect();
    let file = serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]});
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("dashboard-rules.yml");
    std::fs::write(&path, serde_yaml_ng::to_string(&file).expect("YAML")).expect("writing rules");
    let output = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&path)
        .output()
        .expect("running promtool");
    let report = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    // promtool names the failing rule; say which panel it is.
    let places: Vec<String> = expressions
        .iter()
        .enumerate()
        .filter(|(i, _)| report.contains(&format!("\"dashboard:expr_{i}\"")))
        .map(|(i, (place, expr))| format!("dashboard:expr_{i} is {place}: {expr}"))
        .collect();
    assert!(output.status.success(), "{report}\n{}", places.join("\n"));
}

// ----------------------------------------------------------------------------- alert rules

/// (name of the alert or recorded series, expression) of every rule.
fn rules(alerts: &Value) -> Vec<(String, String)> {
    let groups = alerts["groups"].as_array().into_iter().flatten();
    groups
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .map(|rule| {
            let name = rule["alert"].as_str().or(rule["record"].as_str());
            let expr = rule["expr"].as_str().unwrap_or_default();
            (name.unwrap_or("?").to_owned(), expr.to_owned())
        })
        .collect()
}

#[test]
fn the_alert_rules_use_only_listed_metrics_and_labels() {
    let rules = rules(&yaml("alerts.yml"));
    assert!(rules.len() >= 4, "{rules:?}");
    let problems = rules
        .iter()
        .flat_map(|(name, expr)| promql_problems(&format!("rule {name}"), expr))
        .collect();
    assert_none("dashboards/alerts.yml", problems);
}

/// Rules that may aggregate over a queue label, and the label: a read-only server refuses writes
/// for every schema in it, so StewardServerReadOnly is one alert per instance and database.
const ACROSS_QUEUES: &[(&str, &str)] = &[("StewardServerReadOnly", names::SCHEMA_LABEL)];

static AGGREGATION: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"\b(sum|min|max|avg|group|stddev|stdvar|count|count_values|bottomk|topk|quantile)\s*\(",
    )
    .unwrap()
});

/// Where an expression over per-queue metrics mixes queues: an aggregation without `by`, or a
/// `by`/`on` clause without `schema` and `database` (`on ()` aside, which matches anything),
/// or a `without`/`ignoring` clause that drops them. `across` are the labels this rule may drop.
fn per_queue_problems(place: &str, expr: &str, across: &[&str]) -> Vec<String> {
    let code = STRING.replace_all(expr, "\"\"");
    let per_queue = |scope: &str| {
        STEWARD_NAME
            .find_iter(scope)
            .filter_map(|name| series(name.as_str()))
            .any(|(metric, _)| metric.per_queue)
    };
    let queue_labels = [names::SCHEMA_LABEL, names::DATABASE_LABEL];
    let mut problems = Vec::new();
    for clause in clauses(&code) {
        if !per_queue(clause.scope) {
            continue;
        }
        let missing: Vec<&str> = match clause.keyword {
            "by" | "on" if clause.keyword == "on" && clause.labels.is_empty() => Vec::new(),
            "by" | "on" => queue_labels
                .into_iter()
                .filter(|l| !clause.labels.contains(l) && !across.contains(l))
                .collect(),
            "without" | "ignoring" => queue_labels
                .into_iter()
                .filter(|l| clause.labels.contains(l) && !across.contains(l))
                .collect(),
            _ => Vec::new(),
        };
        if !missing.is_empty() {
            problems.push(format!(
                "{place}: `{}` mixes queues: it loses {missing:?}",
                clause.whole
            ));
        }
    }
    for aggregation in AGGREGATION.find_iter(&code) {
        let Some((start, end)) = group_at(&code, aggregation.end() - 1) else {
            continue;
        };
        let after = code[end..].trim_start();
        if per_queue(&code[start..end]) && !after.starts_with("by") && !after.starts_with("without")
        {
            problems.push(format!(
                "{place}: `{}...)` aggregates every queue together: add by (..., schema, database)",
                aggregation.as_str()
            ));
        }
    }
    problems
}

#[test]
fn every_alert_is_evaluated_per_queue() {
    let problems = rules(&yaml("alerts.yml"))
        .iter()
        .flat_map(|(name, expr)| {
            let across: Vec<&str> = ACROSS_QUEUES
                .iter()
                .filter(|(rule, _)| rule == name)
                .map(|(_, label)| *label)
                .collect();
            per_queue_problems(&format!("rule {name}"), expr, &across)
        })
        .collect();
    assert_none("dashboards/alerts.yml", problems);
}

/// Problems with the unit tests of the alerts in `alerts`: an alert without a test case where
/// it fires or one where it stays quiet.
fn untested_alerts(alerts: &Value, tests: &Value) -> Vec<String> {
    let cases: Vec<&Value> = tests["tests"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|t| t["alert_rule_test"].as_array().into_iter().flatten())
        .collect();
    let alert_names = alerts["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .filter_map(|rule| rule["alert"].as_str());
    let fires = |case: &Value| case["exp_alerts"].as_array().is_some_and(|a| !a.is_empty());
    let mut problems = Vec::new();
    for alert in alert_names {
        let of_alert: Vec<&Value> = cases
            .iter()
            .copied()
            .filter(|c| c["alertname"] == alert)
            .collect();
        if !of_alert.iter().any(|c| fires(c)) {
            problems.push(format!("no test case where {alert} fires"));
        }
        if !of_alert.iter().any(|c| !fires(c)) {
            problems.push(format!("no test case where {alert} stays quiet"));
        }
    }
    problems
}

#[test]
fn every_alert_has_unit_tests_where_it_fires_and_where_it_does_not() {
    let tests = yaml("alerts.test.yml");
    let rule_files = tests["rule_files"].as_array().into_iter().flatten();
    assert!(
        rule_files
            .into_iter()
            .any(|f| f.as_str() == Some("alerts.yml")),
        "alerts.test.yml does not load alerts.yml"
    );
    assert_none(
        "dashboards/alerts.test.yml",
        untested_alerts(&yaml("alerts.yml"), &tests),
    );
}

/// The labels the OpenTelemetry collector's Prometheus exporter adds to what it re-exports.
const COLLECTOR_LABELS: &[&str] = &["exported_job", "otel_scope_name"];

/// The unit tests' input series must look like what Prometheus stores: a listed metric with
/// exactly its labels and the target's, or the tests would exercise series that never exist.
#[test]
fn the_alert_tests_input_series_carry_exactly_the_listed_labels() {
    let tests = yaml("alerts.test.yml");
    let series_re = Regex::new(r"^\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*(?:\{(.*)\})?\s*$").unwrap();
    let pair = Regex::new(r#"([A-Za-z_][A-Za-z0-9_]*)\s*=\s*"[^"]*""#).unwrap();
    let inputs: Vec<&str> = tests["tests"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|t| t["input_series"].as_array().into_iter().flatten())
        .filter_map(|s| s["series"].as_str())
        .collect();
    assert!(inputs.len() >= 10, "{inputs:?}");
    let mut problems = Vec::new();
    for input in inputs {
        let Some(parts) = series_re.captures(input) else {
            problems.push(format!("cannot read series {input}"));
            continue;
        };
        if !parts[1].starts_with("steward_") {
            continue;
        }
        let Some((metric, bucket)) = series(&parts[1]) else {
            problems.push(format!("{input}: {}", unknown(&parts[1])));
            continue;
        };
        let labels = parts.get(2).map_or("", |m| m.as_str());
        let has: BTreeSet<&str> = pair
            .captures_iter(labels)
            .map(|c| c.get(1).expect("group").as_str())
            .collect();
        let mut expected = labels_of(metric, bucket);
        // `database` is there only where a test serves queues of several databases.
        if !has.contains(names::DATABASE_LABEL) {
            expected.remove(names::DATABASE_LABEL);
        }
        if labels.contains(r#"job="otel-collector""#) {
            expected.extend(COLLECTOR_LABELS);
        }
        if has != expected {
            problems.push(format!("{input}: labels {has:?}, expected {expected:?}"));
        }
    }
    assert_none("dashboards/alerts.test.yml input series", problems);
}

// ------------------------------------------------------------------- the checks themselves

#[test]
fn the_metric_list_names_each_metric_and_label_once() {
    let names: BTreeSet<&str> = names::ALL.iter().map(|m| m.name).collect();
    assert_eq!(names.len(), names::ALL.len());
    for metric in names::ALL {
        let labels: BTreeSet<&&str> = metric.labels.iter().collect();
        assert_eq!(labels.len(), metric.labels.len(), "{metric:?}");
        assert!(metric.name.starts_with("steward_"), "{metric:?}");
    }
}

/// The checks above must fail on the mistakes they are there for.
#[test]
fn the_checks_catch_unknown_metrics_labels_variables_and_untested_alerts() {
    let problems = promql_problems(
        "bad",
        r#"sum by (branch, lop) (rate(steward_maintenance_branch_runs_total{clas="slo", job="x"}[5m]))
           + on (job, instance) group_left (event) steward_leader_transitions_total
           + steward_no_such_metric + steward_promotion_lag_seconds
           + steward_leader{exported_instance="a"} + steward_queue_jobs{exported_instance="b"}
           + steward_promotion_lag_seconds_count{le="1"}"#,
    )
    .join("\n");
    for expected in [
        "names lop",
        "has no label clas",
        "steward_no_such_metric is not in names::ALL",
        // A histogram is only ever selected through its _bucket, _sum or _count series.
        "steward_promotion_lag_seconds is a histogram",
        "steward_queue_jobs has no label exported_instance",
        "steward_promotion_lag_seconds_count has no label le",
    ] {
        assert!(
            problems.contains(expected),
            "{expected:?} not in:\n{problems}"
        );
    }
    for fine in ["names branch", "names event", "steward_leader has no label"] {
        assert!(!problems.contains(fine), "{fine:?} in:\n{problems}");
    }

    let dashboard = serde_json::json!({
        "templating": {"list": [{"name": "job", "type": "query"}]},
        "panels": [{"targets": [{"expr": "up{job=~\"$job\", x=\"${jobb}\"}[$__rate_interval]"}]}],
    });
    assert_eq!(
        undefined_variables(&dashboard),
        ["$jobb is used but not defined under templating"]
    );

    let mixed = per_queue_problems(
        "bad",
        r#"(max(steward_leader) or on () vector(0)) < 1
           + max by (job, schema) (steward_promotion_backlog_age_seconds)
           + (steward_index_invalid and on (job, instance, schema, database) steward_leader)
           + sum without (schema) (steward_queue_jobs)"#,
        &[],
    )
    .join("\n");
    for expected in [
        "`max(...)` aggregates every queue together",
        r#"`by (job, schema)` mixes queues: it loses ["database"]"#,
        r#"`without (schema)` mixes queues: it loses ["schema"]"#,
    ] {
        assert!(mixed.contains(expected), "{expected:?} not in:\n{mixed}");
    }
    assert!(!mixed.contains("on ()"), "{mixed}");
    assert!(
        !mixed.contains("on (job, instance, schema, database)"),
        "{mixed}"
    );

    let alerts = serde_json::json!({"groups": [{"rules": [{"alert": "A"}, {"alert": "B"}]}]});
    let tests = serde_json::json!({"tests": [{"alert_rule_test": [
        {"alertname": "A", "exp_alerts": []},
        {"alertname": "A", "exp_alerts": [{"exp_labels": {}}]},
        {"alertname": "B", "exp_alerts": []},
    ]}]});
    assert_eq!(
        untested_alerts(&alerts, &tests),
        ["no test case where B fires"]
    );
}
