//! The two branches that keep `queue_counts` exact, `refresh_admin_metadata` (every queue, now
//! and then) and `recompute_dirty_admin_metadata` (the queues marked dirty, every few seconds),
//! as one conformance suite. Each is described once ([`Counter`]); every shared case is written
//! once and stamped out for both as `conformance::<branch>::<case>`. Cases of one branch live in
//! the module named after it, cases of both together in `refresh_and_recompute`.

#[macro_use]
mod common;

use common::*;
use std::time::Duration;
use steward_queue::{NewJob, Queue};
use tokio_postgres::Client;

// ---------------------------------------------------------------------------------------------
// The branches
// ---------------------------------------------------------------------------------------------

/// What the shared cases need to know about one of the two branches.
struct Counter {
    /// The branch's name, also its settings table (`[branches.<name>]`).
    name: &'static str,
    interval: Duration,
    /// Counts only the queues marked dirty, taking their marks; concurrent passes split the
    /// work between them.
    dirty_only: bool,
    /// Its settings when passes run concurrently.
    concurrent: &'static str,
    /// Settings its configuration refuses (and the key the refusal names), besides
    /// [`UNKNOWN_KEYS`].
    unknown: &'static [(&'static str, &'static str)],
    /// Settings with the problems validation reports, in order, besides [`INVALID`].
    invalid: &'static [(&'static str, &'static [&'static str])],
}

const REFRESH: Counter = Counter {
    name: "refresh_admin_metadata",
    interval: Duration::from_secs(60),
    dirty_only: false,
    concurrent: "",
    // batch_size means nothing here: the refresh is one statement.
    unknown: &[("batch_size = 5", "batch_size")],
    invalid: &[],
};

const RECOMPUTE: Counter = Counter {
    name: "recompute_dirty_admin_metadata",
    interval: Duration::from_secs(2),
    dirty_only: true,
    concurrent: "batch_size = 25",
    unknown: &[("batch_sise = 5", "batch_sise")],
    invalid: &[("batch_size = 0", &["batch_size"])],
};

const UNKNOWN_KEYS: [(&str, &str); 1] = [("intervall = \"1s\"", "intervall")];

const INVALID: [(&str, &[&str]); 2] = [
    ("interval = \"2d\"", &["interval"]),
    ("interval = \"0s\"", &["interval"]),
];

impl Counter {
    /// The branch with `settings` (TOML of its table; empty for the defaults).
    fn branch(&self, settings: &str) -> std::sync::Arc<dyn steward_branches::Branch> {
        branch(self.name, settings)
    }
}

type Counts = Vec<(String, String, i64)>;

/// Jobs in every state, through the queue client: enqueue, claim, complete, fail (retryable
/// and failed), wait for a callback, snooze, cancel; two claimed runs stay running.
async fn mixed_transitions(queue: &Queue, name: &str) {
    let batch: Vec<NewJob> = (0..12)
        .map(|_| NewJob::new("k").queue(name).max_attempts(3))
        .collect();
    let ids = queue.enqueue_batch(&batch).await.unwrap();
    queue
        .enqueue(
            &NewJob::new("k")
                .queue(name)
                .run_in(Duration::from_secs(3600)),
        )
        .await
        .unwrap();
    let claimed = queue.claim(name, 8).await.unwrap();
    queue.complete(claimed[0].lease).await.unwrap();
    queue.complete(claimed[1].lease).await.unwrap();
    queue.fail(claimed[2].lease, "boom").await.unwrap();
    queue
        .fail_permanently(claimed[3].lease, "bad input")
        .await
        .unwrap();
    queue
        .wait_for_callback(claimed[4].lease, Duration::from_secs(3600))
        .await
        .unwrap();
    queue
        .snooze(claimed[5].lease, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(queue.cancel(ids[11]).await.unwrap());
}

/// The counts in `queue_counts`.
async fn stored(client: &Client) -> Counts {
    client
        .query(
            "SELECT queue, state::text, count FROM queue_counts ORDER BY 1, 2",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// The counts as they are in `jobs`.
async fn actual(client: &Client) -> Counts {
    client
        .query(
            "SELECT queue, state::text, count(*) FROM jobs GROUP BY 1, 2 ORDER BY 1, 2",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// The queues marked dirty.
async fn dirty(client: &Client) -> Vec<String> {
    client
        .query("SELECT queue FROM dirty_queues ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// `per_state` jobs in each of three states in each of `queues` queues (q1, q2, ...), in one
/// statement.
async fn seed_queues(client: &Client, queues: i64, per_state: i64) {
    client
        .execute(
            "INSERT INTO jobs (queue, kind, state, priority, original_priority, max_attempts, finalized_at)
             SELECT 'q' || q, 'k', s::job_state, 2, 2, 5, CASE WHEN s = 'completed' THEN now() END
             FROM generate_series(1, $1::int8) q, unnest(ARRAY['available', 'scheduled', 'completed']) s,
                  generate_series(1, $2::int8)",
            &[&queues, &per_state],
        )
        .await
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// The shared cases, stamped out for each branch
// ---------------------------------------------------------------------------------------------

mod conformance {
    /// Every shared case, in a module per branch.
    macro_rules! conformance {
        ($($module:ident: $counter:expr),+ $(,)?) => {
            $(
                mod $module {
                    cases!($counter;
                        async:
                            counts_every_state_of_every_queue_exactly,
                            a_queue_that_emptied_loses_its_counts,
                            a_stale_term_commits_nothing,
                            concurrent_passes_write_each_count_once_and_keep_counts_exact;
                        sync:
                            a_hygiene_branch,
                            config_rejects_unknown_keys_and_bad_values,
                    );
                }
            )+
        };
    }

    conformance!(
        refresh: crate::REFRESH,
        recompute_dirty: crate::RECOMPUTE,
    );
}

/// Every state of every queue that changed, counted exactly; counts that did not change are
/// not rewritten; states that emptied and a queue that disappeared lose their rows.
async fn counts_every_state_of_every_queue_exactly(c: &Counter) {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    let queue = queue(&db, 4);
    for name in ["emails", "reports", "billing"] {
        mixed_transitions(&queue, name).await;
    }
    let counter = c.branch("");
    let outcome = run(&*counter, &mut client).await;
    let want = actual(&client).await;
    assert_eq!(stored(&client).await, want);
    assert_eq!(want.len(), 3 * 8, "every state is represented: {want:?}");
    assert_eq!(outcome.rows, want.len() as u64);
    assert_eq!(outcome.run_again_in, None);

    let again = run(&*counter, &mut client).await;
    assert_eq!(again.rows, 0, "no count changed");

    // More transitions, including states that empty out and a queue that disappears.
    client
        .batch_execute(
            "DELETE FROM jobs WHERE queue = 'billing';
             DELETE FROM jobs WHERE state = 'completed';
             UPDATE jobs SET state = 'cancelled', finalized_at = now(), callback_timeout_at = NULL
             WHERE state = 'waiting_external'",
        )
        .await
        .unwrap();
    mixed_transitions(&queue, "search").await;
    let outcome = run(&*counter, &mut client).await;
    assert_eq!(stored(&client).await, actual(&client).await);
    // billing: 8 rows gone; emails, reports: completed and waiting_external gone, cancelled
    // changed; search: 8 new rows.
    assert_eq!(outcome.rows, 8 + 2 * 3 + 8);
}

async fn a_queue_that_emptied_loses_its_counts(c: &Counter) {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    let queue = queue(&db, 4);
    mixed_transitions(&queue, "emails").await;
    mixed_transitions(&queue, "reports").await;
    let counter = c.branch("");
    run(&*counter, &mut client).await;
    client
        .batch_execute("DELETE FROM jobs WHERE queue = 'emails'")
        .await
        .unwrap();
    let outcome = run(&*counter, &mut client).await;
    assert_eq!(outcome.rows, 8, "every state of emails removed");
    assert_eq!(stored(&client).await, actual(&client).await);
    assert!(stored(&client).await.iter().all(|(q, _, _)| q == "reports"));
}

async fn a_stale_term_commits_nothing(c: &Counter) {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    let queue = queue(&db, 2);
    mixed_transitions(&queue, "emails").await;
    let err = run_as(&*c.branch(""), &mut client, EPOCH - 1)
        .await
        .unwrap_err();
    assert_fenced(err);
    assert_eq!(
        dirty(&client).await,
        vec!["emails"],
        "the dirty mark is kept"
    );
    assert_eq!(stored(&client).await, vec![]);
}

/// Passes at the same instant from four connections, until every queue is counted: each count
/// row is written as changed once, and the counts end exact.
async fn concurrent_passes_write_each_count_once_and_keep_counts_exact(c: &Counter) {
    let db = db_with_leader().await;
    let client = db.client().await;
    // About 20,000 jobs, so that counting every queue takes a while.
    seed_queues(&client, 400, 17).await;
    let counter = c.branch(c.concurrent);
    let rows = run_concurrently(&db, &*counter, 4, 5).await;
    assert_eq!(
        rows.iter().sum::<u64>(),
        400 * 3,
        "each count row written as changed once: {rows:?}"
    );
    if c.dirty_only {
        assert!(
            rows.iter().filter(|r| **r > 0).count() > 1,
            "passes shared the queues: {rows:?}"
        );
        assert_eq!(dirty(&client).await.len(), 0);
    }
    assert_eq!(stored(&client).await, actual(&client).await);
}

fn a_hygiene_branch(c: &Counter) {
    let counter = c.branch("");
    assert_eq!(counter.name(), c.name);
    assert_eq!(counter.class(), steward_branches::Class::Hygiene);
    assert_eq!(counter.interval(), c.interval);
    assert_eq!(counter.quiet_period(), None);
    let counter = c.branch("interval = \"2m\"");
    assert_eq!(counter.interval(), Duration::from_secs(120));
}

fn config_rejects_unknown_keys_and_bad_values(c: &Counter) {
    for (settings, key) in UNKNOWN_KEYS.iter().chain(c.unknown) {
        let err = config_problems(c.name, settings).unwrap_err();
        assert!(err.contains(key), "{settings:?}: {err}");
    }
    assert_eq!(config_problems(c.name, ""), Ok(vec![]));
    for (settings, keys) in INVALID.iter().chain(c.invalid) {
        let found = config_problems(c.name, settings).unwrap();
        assert_eq!(found, *keys, "{settings:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Cases of one branch, and of both together
// ---------------------------------------------------------------------------------------------

mod refresh {
    use super::*;
    use steward_branches::refresh_admin_metadata::WRITE_COUNTS;

    #[tokio::test]
    async fn repairs_counts_the_dirty_recompute_missed() {
        let db = db_with_leader().await;
        let mut client = db.client().await;
        let queue = queue(&db, 4);
        mixed_transitions(&queue, "emails").await;
        let refresh = REFRESH.branch("");
        run(&*refresh, &mut client).await;
        // As if changes had gone unmarked: a wrong count and a queue that no longer exists.
        client
            .batch_execute(
                "UPDATE queue_counts SET count = 999, updated_at = now() - interval '1 minute' WHERE state = 'running';
                 INSERT INTO queue_counts (queue, state, count, updated_at)
                 VALUES ('ghost', 'available', 3, now() - interval '1 minute')",
            )
            .await
            .unwrap();
        let outcome = run(&*refresh, &mut client).await;
        assert_eq!(outcome.rows, 2);
        assert_eq!(stored(&client).await, actual(&client).await);
    }

    #[tokio::test]
    async fn a_count_never_replaces_one_taken_later() {
        let db = db_with_leader().await;
        let client = db.client().await;
        let write = |queues: Vec<&'static str>,
                     states: Vec<&'static str>,
                     counts: Vec<i64>,
                     scope: Option<Vec<&'static str>>,
                     secs_ago: f64| {
            let client = &client;
            async move {
                let taken_at: chrono::DateTime<chrono::Utc> = client
                    .query_one(
                        "SELECT now() - $1::float8 * interval '1 second'",
                        &[&secs_ago],
                    )
                    .await
                    .unwrap()
                    .get(0);
                client
                    .query_one(
                        WRITE_COUNTS,
                        &[&queues, &states, &counts, &scope, &taken_at],
                    )
                    .await
                    .unwrap()
                    .get::<_, i64>(0)
            }
        };
        assert_eq!(
            write(
                vec!["q", "q"],
                vec!["available", "running"],
                vec![5, 2],
                None,
                10.0
            )
            .await,
            2
        );
        // An older count (taken 20 s ago) neither updates nor deletes.
        assert_eq!(
            write(vec!["q"], vec!["available"], vec![3], Some(vec!["q"]), 20.0).await,
            0
        );
        assert_eq!(
            stored(&client).await,
            vec![
                ("q".into(), "available".into(), 5),
                ("q".into(), "running".into(), 2)
            ]
        );
        // A newer one does both; a new (queue, state) is inserted whatever its time.
        assert_eq!(
            write(
                vec!["q", "r"],
                vec!["available", "scheduled"],
                vec![4, 1],
                Some(vec!["q", "r"]),
                5.0
            )
            .await,
            3
        );
        assert_eq!(
            stored(&client).await,
            vec![
                ("q".into(), "available".into(), 4),
                ("r".into(), "scheduled".into(), 1)
            ]
        );
        // Out of scope rows are left alone.
        assert_eq!(
            write(vec![], vec![], vec![], Some(vec!["other"]), 0.0).await,
            0
        );
        assert_eq!(stored(&client).await.len(), 2);
    }
}

mod recompute_dirty {
    use super::*;

    #[tokio::test]
    async fn recounts_the_queues_that_changed_and_only_those() {
        let db = db_with_leader().await;
        let mut client = db.client().await;
        let queue = queue(&db, 4);
        mixed_transitions(&queue, "emails").await;
        mixed_transitions(&queue, "reports").await;
        assert_eq!(
            dirty(&client).await,
            vec!["emails", "reports"],
            "the trigger marked them"
        );

        let recompute = RECOMPUTE.branch("");
        let outcome = run(&*recompute, &mut client).await;
        let want = actual(&client).await;
        assert_eq!(stored(&client).await, want);
        assert_eq!(outcome.rows, want.len() as u64);
        assert_eq!(outcome.run_again_in, None);
        assert_eq!(dirty(&client).await, Vec::<String>::new());
        let again = run(&*recompute, &mut client).await;
        assert_eq!(again.rows, 0, "nothing is dirty");

        // A count that is wrong but not dirty stays wrong (only the full refresh repairs
        // it)...
        client
            .batch_execute(
                "UPDATE queue_counts SET count = 999 WHERE queue = 'emails' AND state = 'running'",
            )
            .await
            .unwrap();
        // ...while a changed queue is recounted.
        let claimed = queue.claim("reports", 1).await.unwrap();
        queue.complete(claimed[0].lease).await.unwrap();
        assert_eq!(dirty(&client).await, vec!["reports"]);
        let outcome = run(&*recompute, &mut client).await;
        assert_eq!(
            outcome.rows, 2,
            "reports: one fewer available, one more completed"
        );
        let emails_running = ("emails".to_owned(), "running".to_owned(), 999);
        let mut want = actual(&client).await;
        for row in want.iter_mut() {
            if (row.0.as_str(), row.1.as_str()) == ("emails", "running") {
                *row = emails_running.clone();
            }
        }
        assert_eq!(stored(&client).await, want);
    }

    #[tokio::test]
    async fn works_in_batches_of_queues_and_asks_to_continue_when_work_is_left() {
        let db = db_with_leader().await;
        let mut client = db.client().await;
        seed_queues(&client, 250, 2).await;
        assert_eq!(dirty(&client).await.len(), 250);
        let recompute = RECOMPUTE.branch("");
        let first = run(&*recompute, &mut client).await;
        assert_eq!(
            (first.rows, first.run_again_in),
            (300, Some(Duration::ZERO))
        );
        assert_eq!(dirty(&client).await.len(), 150);
        let second = run(&*recompute, &mut client).await;
        assert_eq!(
            (second.rows, second.run_again_in),
            (300, Some(Duration::ZERO))
        );
        let third = run(&*recompute, &mut client).await;
        assert_eq!((third.rows, third.run_again_in), (150, None));
        assert_eq!(dirty(&client).await.len(), 0);
        assert_eq!(stored(&client).await, actual(&client).await);
        assert_eq!(run(&*recompute, &mut client).await.rows, 0);
    }

    #[test]
    fn reads_its_batch_size_from_its_settings() {
        let config = config(RECOMPUTE.name, "interval = \"1s\"\nbatch_size = 500").unwrap();
        let config = config.recompute_dirty_admin_metadata;
        assert_eq!(
            (config.interval, config.batch_size),
            (Duration::from_secs(1), 500)
        );
    }
}

mod refresh_and_recompute {
    use super::*;

    #[tokio::test]
    async fn refresh_and_dirty_recompute_at_the_same_instant_agree() {
        let db = db_with_leader().await;
        let admin = db.client().await;
        let mut refresher = db.client().await;
        let mut recomputer = db.client().await;
        let queue = queue(&db, 4);
        let refresh = REFRESH.branch("");
        let recompute = RECOMPUTE.branch("batch_size = 2");
        for round in 0..6 {
            for name in ["a", "b", "c", "d"] {
                mixed_transitions(&queue, &format!("{name}{}", round % 3)).await;
            }
            admin
                .batch_execute("DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE state = 'completed' LIMIT 3)")
                .await
                .unwrap();
            let barrier = tokio::sync::Barrier::new(2);
            tokio::join!(
                async {
                    barrier.wait().await;
                    run(&*refresh, &mut refresher).await
                },
                async {
                    barrier.wait().await;
                    // Until every dirty queue is recounted.
                    while run(&*recompute, &mut recomputer)
                        .await
                        .run_again_in
                        .is_some()
                    {}
                }
            );
            assert_eq!(stored(&admin).await, actual(&admin).await, "round {round}");
        }
    }
}
