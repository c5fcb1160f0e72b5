//! `steward jobs` and `steward queues` against a real queue, as an operator runs them.

mod support;

use serde_json::Value;
use std::time::{Duration, Instant};
use steward_queue::{JobState, NewJob, Queue};
use steward_testkit::TestDb;
use support::*;

struct Setup {
    db: TestDb,
    queue: Queue,
    runtime: tokio::runtime::Runtime,
}

impl Setup {
    fn new() -> Self {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let db = runtime.block_on(TestDb::new());
        let queue = Queue::new(db.pool(2));
        Self { db, queue, runtime }
    }

    fn enqueue(&self, job: NewJob) -> i64 {
        self.runtime
            .block_on(self.queue.enqueue(&job))
            .unwrap()
            .id()
    }

    /// A job that failed its only attempt with `error`.
    fn failed(&self, queue: &str, error: &str) -> i64 {
        let id = self.enqueue(NewJob::new("doomed").queue(queue).max_attempts(1));
        self.runtime.block_on(async {
            let claimed = self
                .queue
                .claim_kinds(queue, Some(&["doomed".to_owned()]), 1)
                .await
                .unwrap();
            self.queue.fail(claimed[0].lease, error).await.unwrap();
        });
        id
    }

    fn state(&self, id: i64) -> JobState {
        self.runtime
            .block_on(self.queue.get(id))
            .unwrap()
            .unwrap()
            .state
    }

    fn run(&self, args: &[&str]) -> (Option<i32>, String, String) {
        steward(&self.db.url(), args)
    }

    fn json(&self, args: &[&str]) -> Value {
        let (code, stdout, stderr) = self.run(args);
        assert_eq!(code, Some(0), "{args:?}: {stderr}");
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {stdout}"))
    }
}

#[test]
fn list_and_show_give_a_table_json_and_the_errors_of_each_attempt() {
    let s = Setup::new();
    let mail = s.enqueue(NewJob::new("send").queue("mail"));
    let failed = s.failed("reports", "division by zero\nat line 3");

    let (code, table, _) = s.run(&["jobs", "list"]);
    assert_eq!(code, Some(0));
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("ID") && lines[0].contains("LAST ERROR"),
        "{table}"
    );
    assert!(
        lines[1].starts_with(&failed.to_string()),
        "newest first: {table}"
    );
    assert!(
        lines[1].contains("division by zero") && !lines[1].contains("line 3"),
        "{table}"
    );
    assert!(lines[2].starts_with(&mail.to_string()), "{table}");

    let listed = s.json(&["jobs", "list", "--queue", "mail", "--json"]);
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["id"], mail);
    assert_eq!(listed[0]["state"], "available");
    let listed = s.json(&[
        "jobs", "list", "--state", "failed", "--state", "running", "--json",
    ]);
    assert_eq!(listed[0]["id"], failed);

    let (code, shown, _) = s.run(&["jobs", "show", &failed.to_string()]);
    assert_eq!(code, Some(0));
    assert!(shown.contains("attempt              1 of 1"), "{shown}");
    assert!(
        shown.contains("errors (1)") && shown.contains("division by zero\n    at line 3"),
        "{shown}"
    );
    let shown = s.json(&["jobs", "show", &failed.to_string(), "--json"]);
    assert_eq!(
        shown["job"]["errors"][0]["error"],
        "division by zero\nat line 3"
    );
    assert_eq!(shown["archived_at"], Value::Null);

    let (code, _, stderr) = s.run(&["jobs", "show", "999999"]);
    assert_eq!(code, Some(1));
    assert_eq!(stderr.matches("no job 999999").count(), 1, "{stderr}");
}

#[test]
fn retry_and_cancel_by_id_say_what_they_did_to_each_job() {
    let s = Setup::new();
    let failed = s.failed("reports", "boom");
    let waiting = s.enqueue(NewJob::new("send").queue("mail"));
    let id = |n: i64| n.to_string();

    let (code, out, _) = s.run(&["jobs", "retry", &id(failed), &id(waiting), "--dry-run"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!("job {failed}: would retry (was failed)")),
        "{out}"
    );
    assert!(
        out.contains(&format!("job {waiting}: left available")),
        "{out}"
    );
    assert_eq!(
        s.state(failed),
        JobState::Failed,
        "a dry run changes nothing"
    );

    let (code, out, _) = s.run(&["jobs", "retry", &id(failed), "999999"]);
    assert_eq!(
        code,
        Some(1),
        "a job that is not there fails the command: {out}"
    );
    assert!(out.contains("job 999999: not found"), "{out}");
    assert_eq!(s.state(failed), JobState::Available);

    let out = s.json(&["jobs", "cancel", &id(failed), &id(waiting), "--json"]);
    assert_eq!(
        out["jobs"][0],
        serde_json::json!({"id": failed, "changed": true, "state": "available"})
    );
    assert_eq!(s.state(waiting), JobState::Cancelled);
}

#[test]
fn retry_and_cancel_by_filter_count_first_and_change_in_batches() {
    let s = Setup::new();
    for _ in 0..7 {
        s.failed("reports", "boom");
    }
    let other = s.failed("mail", "boom");
    let out = s.json(&[
        "jobs",
        "retry",
        "--queue",
        "reports",
        "--state",
        "failed",
        "--dry-run",
        "--json",
    ]);
    assert_eq!(out["count"], 7);
    assert_eq!(out["dry_run"], true);
    let (code, out, _) = s.run(&[
        "jobs", "retry", "--queue", "reports", "--state", "failed", "--batch", "3",
    ]);
    assert_eq!(code, Some(0));
    assert_eq!(out.trim(), "retried 7 jobs (queue reports, state failed)");
    assert_eq!(s.state(other), JobState::Failed, "other queues untouched");
    let live = s.json(&["queues", "--live", "--json"]);
    let reports = live
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["queue"] == "reports")
        .unwrap();
    assert_eq!(reports["by_state"]["available"], 7);
    assert!(reports["oldest_available_age_seconds"].as_f64().unwrap() >= 0.0);

    let (code, out, _) = s.run(&["jobs", "cancel", "--kind", "doomed"]);
    assert_eq!(code, Some(0));
    assert_eq!(out.trim(), "cancelled 7 jobs (kind doomed)");
}

#[test]
fn queues_shows_the_counts_admin_metadata_keeps_or_live_ones() {
    let s = Setup::new();
    s.enqueue(NewJob::new("send").queue("mail"));
    let (code, out, _) = s.run(&["queues"]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("no counts yet") && out.contains("--live"),
        "{out}"
    );
    let (code, out, _) = s.run(&["queues", "--live"]);
    assert_eq!(code, Some(0));
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("QUEUE") && lines[0].contains("OLDEST AVAILABLE"),
        "{out}"
    );
    assert!(lines[1].starts_with("mail"), "{out}");

    // A leader's admin_metadata counts the queue; `steward queues` then shows its counts.
    let leader = Steward::spawn(&s.db.url(), &[]);
    leader.wait_for("leadership acquired", Duration::from_secs(30));
    let deadline = Instant::now() + Duration::from_secs(30);
    let counted = loop {
        let queues = s.json(&["queues", "--json"]);
        if let Some(mail) = queues.as_array().and_then(|q| q.first()) {
            break mail.clone();
        }
        assert!(
            Instant::now() < deadline,
            "admin_metadata never counted the queue"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(counted["queue"], "mail");
    assert_eq!(counted["by_state"]["available"], 1);
    let (code, out, _) = s.run(&["queues"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("counts by admin_metadata"), "{out}");
}

#[test]
fn a_wrong_request_is_refused_once_and_changes_nothing() {
    let s = Setup::new();
    let failed = s.failed("reports", "boom");
    for (args, says) in [
        (vec!["jobs", "retry"], "which jobs?"),
        (vec!["jobs", "retry", "1", "--queue", "q"], "not both"),
        (
            vec!["jobs", "retry", "--state", "running"],
            "--state running: retry applies to",
        ),
        (
            vec!["jobs", "cancel", "--state", "failed"],
            "--state failed: cancel applies to",
        ),
        (
            vec!["jobs", "list", "--state", "stuck"],
            "invalid value 'stuck' for '--state <STATE>'",
        ),
    ] {
        let (code, _, stderr) = s.run(&args);
        assert_ne!(code, Some(0), "{args:?}");
        assert_eq!(stderr.matches(says).count(), 1, "{args:?}: {stderr}");
    }
    assert_eq!(s.state(failed), JobState::Failed);
}
