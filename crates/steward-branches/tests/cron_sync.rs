mod common;

use chrono::{
    DateTime, Datelike, Duration as TimeDelta, DurationRound, NaiveDate, TimeZone, Timelike, Utc,
};
use chrono_tz::Europe::Paris;
use common::*;
use serde_json::json;
use std::collections::HashSet;
use std::str::FromStr;
use std::time::Duration;
use steward_branches::cron_sync::{fire_times, Config, CronSync, ScheduleConfig};
use steward_branches::{BranchError, BranchesConfig, Observation};
use tokio_postgres::Client;

fn branch(config: Config) -> CronSync {
    CronSync::new(config)
}

fn with_schedules(schedules: Vec<ScheduleConfig>) -> Config {
    Config {
        schedules,
        ..Config::default()
    }
}

async fn db_now(client: &Client) -> DateTime<Utc> {
    client
        .query_one("SELECT clock_timestamp()", &[])
        .await
        .unwrap()
        .get(0)
}

async fn count(client: &Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

/// run_at of the jobs of `kind`, ascending.
async fn run_ats(client: &Client, kind: &str) -> Vec<DateTime<Utc>> {
    client
        .query(
            "SELECT run_at FROM jobs WHERE kind = $1 ORDER BY run_at",
            &[&kind],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// A pass's fire window ends at its own `now + lookahead`, which the test only knows to lie
/// between two readings of the clock: every fire sure to be in the window must be enqueued,
/// and nothing outside the widest possible window may be.
fn assert_window(
    actual: &[DateTime<Utc>],
    candidates: &[DateTime<Utc>],
    lower: (DateTime<Utc>, DateTime<Utc>),
    upper: (DateTime<Utc>, DateTime<Utc>),
) {
    let surely: Vec<_> = candidates
        .iter()
        .filter(|t| **t > lower.1 && **t <= upper.0)
        .collect();
    let possibly: Vec<_> = candidates
        .iter()
        .filter(|t| **t > lower.0 && **t <= upper.1)
        .collect();
    for t in &surely {
        assert!(actual.contains(t), "{t} missing from {actual:?}");
    }
    for t in actual {
        assert!(
            possibly.contains(&t),
            "{t} is outside the window: {actual:?}"
        );
    }
}

async fn schedules(client: &Client) -> Vec<(String, String, String)> {
    client
        .query(
            "SELECT name, source, expression FROM cron_schedules ORDER BY name",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

fn skipped_names(observations: &[Observation]) -> Vec<(String, String)> {
    observations
        .iter()
        .filter_map(|o| match o {
            Observation::Skipped { what, reason } => Some((what.clone(), reason.clone())),
            _ => None,
        })
        .collect()
}

/// An expression firing at exactly three UTC minutes a couple of minutes from `now` (date
/// included, so its next fire is a year away) and those three fire times: a window that
/// holds them all holds nothing else, however long the test takes to get there.
fn three_fires_soon(now: DateTime<Utc>) -> (String, Vec<DateTime<Utc>>) {
    let mut first = (now + TimeDelta::minutes(2))
        .duration_trunc(TimeDelta::minutes(1))
        .unwrap();
    if first.minute() > 57 {
        // Keep the three minutes in one hour so one field describes them.
        first = first.duration_trunc(TimeDelta::hours(1)).unwrap() + TimeDelta::hours(1);
    }
    let expression = format!(
        "0 {}-{} {} {} {} *",
        first.minute(),
        first.minute() + 2,
        first.hour(),
        first.day(),
        first.month()
    );
    let fires = (0..3).map(|i| first + TimeDelta::minutes(i)).collect();
    (expression, fires)
}

#[tokio::test]
async fn config_schedule_fires_in_the_lookahead_become_scheduled_jobs_once() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    let (expression, fires) = three_fires_soon(db_now(&client).await);
    let sync = branch(Config {
        lookahead: Duration::from_secs(600),
        ..with_schedules(vec![ScheduleConfig {
            queue: "reports".into(),
            args: json!({"report": "daily", "n": 3}),
            priority: 3,
            max_attempts: 5,
            ..ScheduleConfig::new("daily-report", expression, "report.build")
        }])
    });

    let first = run(&sync, &mut client).await;
    assert_eq!(first.rows, 3, "{first:?}");
    assert!(first.observations.is_empty(), "{first:?}");
    let rows = client
        .query(
            "SELECT j.queue, j.kind, j.args, j.priority, j.original_priority, j.max_attempts, j.state::text,
                    j.run_at, f.fire_at
             FROM jobs j JOIN cron_fires f ON f.job_id = j.id AND f.schedule_name = 'daily-report'
             ORDER BY j.run_at",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 3);
    for (row, fire) in rows.iter().zip(&fires) {
        assert_eq!(row.get::<_, String>(0), "reports");
        assert_eq!(row.get::<_, String>(1), "report.build");
        assert_eq!(
            row.get::<_, serde_json::Value>(2),
            json!({"report": "daily", "n": 3})
        );
        assert_eq!((row.get::<_, i16>(3), row.get::<_, i16>(4)), (3, 3));
        assert_eq!(row.get::<_, i32>(5), 5);
        assert_eq!(row.get::<_, String>(6), "scheduled");
        assert_eq!(row.get::<_, DateTime<Utc>>(7), *fire);
        assert_eq!(row.get::<_, DateTime<Utc>>(8), *fire);
    }

    let second = run(&sync, &mut client).await;
    assert_eq!(second.rows, 0, "{second:?}");
    assert_eq!(count(&client, "SELECT count(*) FROM jobs").await, 3);
    assert_eq!(count(&client, "SELECT count(*) FROM cron_fires").await, 3);
}

#[tokio::test]
async fn concurrent_passes_enqueue_each_fire_exactly_once() {
    let db = db_with_leader().await;
    let client = db.client().await;
    let sync = branch(with_schedules(vec![
        ScheduleConfig::new("every-second", "* * * * * *", "tick"),
        ScheduleConfig::new("every-other-second", "*/2 * * * * *", "tock"),
    ]));
    let rows = run_concurrently(&db, &sync, 4, 3).await;
    let total: u64 = rows.iter().sum();
    let jobs = count(&client, "SELECT count(*) FROM jobs").await;
    assert!(jobs >= 450, "five minutes of fires: {jobs}");
    assert_eq!(
        total, jobs as u64,
        "rows reported == jobs enqueued: {rows:?}"
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM cron_fires").await,
        jobs
    );
    let duplicates = count(
        &client,
        "SELECT count(*) FROM (SELECT kind, run_at FROM jobs GROUP BY kind, run_at HAVING count(*) > 1) d",
    )
    .await;
    assert_eq!(duplicates, 0);
    let mismatched = count(
        &client,
        "SELECT count(*) FROM cron_fires f LEFT JOIN jobs j ON j.id = f.job_id
         WHERE j.id IS NULL OR j.run_at <> f.fire_at",
    )
    .await;
    assert_eq!(mismatched, 0, "every fire points at its own job");
    assert_eq!(
        count(&client, "SELECT count(*) FROM cron_schedules").await,
        2
    );
}

#[tokio::test]
async fn malformed_table_rows_are_skipped_and_the_others_still_fire() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO cron_schedules (name, expression, timezone, kind) VALUES
                ('bad-expression', 'not a cron', 'UTC', 'never'),
                ('bad-timezone', '* * * * *', 'Mars/Olympus', 'never'),
                ('empty-kind', '* * * * *', 'UTC', ''),
                ('good', '* * * * *', 'UTC', 'minutely')",
        )
        .await
        .unwrap();
    let before = db_now(&client).await;
    let outcome = run(&branch(Config::default()), &mut client).await;
    let after = db_now(&client).await;

    let skipped = skipped_names(&outcome.observations);
    let whats: Vec<&str> = skipped.iter().map(|(what, _)| what.as_str()).collect();
    assert_eq!(
        whats,
        [
            "cron_schedule:bad-expression",
            "cron_schedule:bad-timezone",
            "cron_schedule:empty-kind"
        ],
        "{skipped:?}"
    );
    assert!(skipped[0].1.contains("expression"), "{skipped:?}");
    assert!(
        skipped[1].1.contains("timezone") && skipped[1].1.contains("Mars/Olympus"),
        "{skipped:?}"
    );
    assert!(skipped[2].1.contains("kind"), "{skipped:?}");

    // Five minute marks in any five-minute window.
    assert_eq!(outcome.rows, 5);
    let got = run_ats(&client, "minutely").await;
    assert_eq!(got.len(), 5);
    assert!(
        got.iter().all(|t| t.second() == 0 && t.nanosecond() == 0),
        "{got:?}"
    );
    assert!(
        got[0] > before && got[4] <= after + TimeDelta::minutes(5),
        "{got:?}"
    );
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM jobs WHERE kind IN ('never', '')"
        )
        .await,
        0
    );
}

#[tokio::test]
async fn catch_up_enqueues_missed_fires_only_within_the_window() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    // Created a day ago, last fired three hours ago: the leader was away since.
    client
        .batch_execute(
            "INSERT INTO cron_schedules (name, expression, kind, updated_at)
                 VALUES ('minutely', '* * * * *', 'tick', now() - interval '1 day');
             INSERT INTO cron_fires (schedule_name, fire_at, job_id, enqueued_at)
                 VALUES ('minutely', date_trunc('minute', now()) - interval '3 hours', 0, now() - interval '3 hours')",
        )
        .await
        .unwrap();
    let sync = branch(Config {
        catch_up: Duration::from_secs(600),
        lookahead: Duration::ZERO,
        ..Config::default()
    });
    let before = db_now(&client).await;
    let outcome = run(&sync, &mut client).await;
    let after = db_now(&client).await;

    // Ten minute marks in any ten-minute window, all due already.
    assert_eq!(outcome.rows, 10, "{outcome:?}");
    let got = run_ats(&client, "tick").await;
    assert_eq!(got.len(), 10);
    assert!(
        got[0] > before - TimeDelta::minutes(10) && got[9] <= after,
        "{got:?}"
    );
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM jobs WHERE state = 'available'"
        )
        .await,
        10
    );
}

#[tokio::test]
async fn a_schedule_created_now_does_not_backfill_past_fires() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    let sync = branch(Config {
        lookahead: Duration::ZERO,
        ..with_schedules(vec![ScheduleConfig::new("minutely", "* * * * *", "tick")])
    });
    let before = db_now(&client).await;
    run(&sync, &mut client).await;
    assert!(run_ats(&client, "tick").await.iter().all(|t| *t > before));
}

#[tokio::test]
async fn the_time_zone_is_honoured() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    let sync = branch(Config {
        lookahead: Duration::from_secs(86_400),
        ..with_schedules(vec![ScheduleConfig {
            timezone: "Europe/Paris".into(),
            ..ScheduleConfig::new("paris-nine", "0 9 * * *", "morning")
        }])
    });
    let before = db_now(&client).await;
    run(&sync, &mut client).await;
    let after = db_now(&client).await;

    // 09:00 in Paris for the days around now, as chrono-tz sees them (07:00 or 08:00 UTC).
    let today = before.date_naive();
    let candidates: Vec<DateTime<Utc>> = (-1..=2)
        .map(|d| {
            let day = today + TimeDelta::days(d);
            Paris
                .with_ymd_and_hms(day.year(), day.month(), day.day(), 9, 0, 0)
                .single()
                .unwrap()
                .with_timezone(&Utc)
        })
        .collect();
    let got = run_ats(&client, "morning").await;
    assert!(!got.is_empty());
    assert!(
        got.iter().all(|t| t.hour() == 7 || t.hour() == 8),
        "{got:?}"
    );
    let day = TimeDelta::days(1);
    assert_window(
        &got,
        &candidates,
        (before, after),
        (before + day, after + day),
    );
}

#[test]
fn fire_times_follow_daylight_saving_time() {
    let (cron, tz) =
        steward_branches::cron_sync::parse_schedule("0 9 * * *", "Europe/Paris").unwrap();
    let utc = |y, m, d, h| Utc.with_ymd_and_hms(y, m, d, h, 0, 0).unwrap();
    let paris_nine = |y, m, d| {
        Paris
            .from_local_datetime(
                &NaiveDate::from_ymd_opt(y, m, d)
                    .unwrap()
                    .and_hms_opt(9, 0, 0)
                    .unwrap(),
            )
            .single()
            .unwrap()
            .with_timezone(&Utc)
    };
    // Spring forward on 30 March 2025: 08:00 UTC the day before, 07:00 UTC from then on.
    let fires = fire_times(&cron, tz, utc(2025, 3, 29, 0), utc(2025, 3, 31, 0), 100).unwrap();
    assert_eq!(
        fires.due,
        [paris_nine(2025, 3, 29), paris_nine(2025, 3, 30)]
    );
    assert_eq!(fires.due, [utc(2025, 3, 29, 8), utc(2025, 3, 30, 7)]);
    assert_eq!(fires.next, Some(utc(2025, 3, 31, 7)));
    // Fall back on 26 October 2025.
    let fires = fire_times(&cron, tz, utc(2025, 10, 25, 0), utc(2025, 10, 27, 0), 100).unwrap();
    assert_eq!(
        fires.due,
        [paris_nine(2025, 10, 25), paris_nine(2025, 10, 26)]
    );
    assert_eq!(fires.due, [utc(2025, 10, 25, 7), utc(2025, 10, 26, 8)]);
    // The window is open at its start and closed at its end, and the cap holds.
    let every_hour = croner::Cron::from_str("0 * * * *").unwrap();
    let fires = fire_times(
        &every_hour,
        chrono_tz::UTC,
        utc(2025, 1, 1, 0),
        utc(2025, 1, 1, 3),
        100,
    )
    .unwrap();
    assert_eq!(
        fires.due,
        [utc(2025, 1, 1, 1), utc(2025, 1, 1, 2), utc(2025, 1, 1, 3)]
    );
    let fires = fire_times(
        &every_hour,
        chrono_tz::UTC,
        utc(2025, 1, 1, 0),
        utc(2025, 1, 1, 3),
        2,
    )
    .unwrap();
    assert_eq!(fires.due, [utc(2025, 1, 1, 1), utc(2025, 1, 1, 2)]);
    assert_eq!(fires.next, Some(utc(2025, 1, 1, 3)));
    // An expression with no occurrence left yields nothing rather than an error.
    let never = croner::Cron::from_str("0 0 30 2 *").unwrap();
    let fires = fire_times(
        &never,
        chrono_tz::UTC,
        utc(2025, 1, 1, 0),
        utc(2025, 3, 1, 0),
        100,
    )
    .unwrap();
    assert_eq!((fires.due.len(), fires.next), (0, None));
}

#[tokio::test]
async fn the_cap_limits_fires_per_pass_and_the_next_pass_continues() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    let sync = branch(Config {
        max_fires_per_pass: 50,
        ..with_schedules(vec![ScheduleConfig::new(
            "every-second",
            "* * * * * *",
            "tick",
        )])
    });
    let first = run(&sync, &mut client).await;
    assert_eq!(first.rows, 50);
    assert_eq!(
        first.run_again_in,
        Some(Duration::ZERO),
        "fires are left in the window"
    );
    let second = run(&sync, &mut client).await;
    assert_eq!(second.rows, 50);
    let got = run_ats(&client, "tick").await;
    assert_eq!(got.len(), 100);
    assert!(
        got.windows(2).all(|w| w[1] - w[0] == TimeDelta::seconds(1)),
        "no gap, no repeat: {got:?}"
    );
}

#[tokio::test]
async fn config_rows_follow_the_config_and_table_rows_are_left_alone() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO cron_schedules (name, expression, kind) VALUES ('table-owned', '0 0 1 1 *', 'yearly')",
        )
        .await
        .unwrap();
    let yearly = |name: &str| ScheduleConfig::new(name, "0 0 1 1 *", "yearly");
    run(
        &branch(with_schedules(vec![yearly("a"), yearly("b")])),
        &mut client,
    )
    .await;
    let row = |n: &str, s: &str, e: &str| (n.to_owned(), s.to_owned(), e.to_owned());
    assert_eq!(
        schedules(&client).await,
        [
            row("a", "config", "0 0 1 1 *"),
            row("b", "config", "0 0 1 1 *"),
            row("table-owned", "table", "0 0 1 1 *")
        ]
    );

    // b leaves the config, a changes, and a config schedule tries to take the table row's name.
    let outcome = run(
        &branch(with_schedules(vec![
            ScheduleConfig::new("a", "0 0 2 1 *", "yearly"),
            ScheduleConfig::new("table-owned", "* * * * *", "hijack"),
        ])),
        &mut client,
    )
    .await;
    assert_eq!(
        schedules(&client).await,
        [
            row("a", "config", "0 0 2 1 *"),
            row("table-owned", "table", "0 0 1 1 *")
        ]
    );
    let skipped = skipped_names(&outcome.observations);
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert_eq!(skipped[0].0, "cron_schedule:table-owned");
    assert_eq!(
        count(&client, "SELECT count(*) FROM jobs WHERE kind = 'hijack'").await,
        0
    );

    // With no config schedules at all, only table rows remain.
    run(&branch(Config::default()), &mut client).await;
    assert_eq!(
        schedules(&client).await,
        [row("table-owned", "table", "0 0 1 1 *")]
    );
}

#[tokio::test]
async fn an_unchanged_config_does_not_rewrite_its_rows() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    let sync = branch(with_schedules(vec![ScheduleConfig::new(
        "a",
        "0 0 1 1 *",
        "yearly",
    )]));
    run(&sync, &mut client).await;
    // xmin changes when the row is rewritten, xmax when it is locked (or deleted).
    let version = "SELECT xmin::text::int8 * 1000000000000 + xmax::text::int8
                   FROM cron_schedules WHERE name = 'a'";
    let first = count(&client, version).await;
    run(&sync, &mut client).await;
    assert_eq!(
        count(&client, version).await,
        first,
        "the row was neither updated nor locked"
    );
    // A changed schedule is rewritten.
    let changed = branch(with_schedules(vec![ScheduleConfig::new(
        "a",
        "0 0 2 1 *",
        "yearly",
    )]));
    run(&changed, &mut client).await;
    assert_ne!(count(&client, version).await, first);
}

#[tokio::test]
async fn old_fire_records_are_pruned_in_batches() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO cron_fires (schedule_name, fire_at, job_id, enqueued_at)
             SELECT 'gone', now() - d * interval '1 day', 0, now() - d * interval '1 day'
             FROM generate_series(8, 10) d;
             INSERT INTO cron_fires (schedule_name, fire_at, job_id, enqueued_at)
             VALUES ('gone', now() - interval '6 days', 0, now() - interval '6 days')",
        )
        .await
        .unwrap();
    let sync = branch(Config {
        prune_batch_size: 2,
        ..Config::default()
    });
    let first = run(&sync, &mut client).await;
    assert_eq!(first.rows, 0, "pruned records are not counted as rows");
    assert_eq!(
        first.run_again_in,
        Some(Duration::ZERO),
        "a full batch asks to continue"
    );
    assert_eq!(count(&client, "SELECT count(*) FROM cron_fires").await, 2);
    let second = run(&sync, &mut client).await;
    assert_eq!(second.run_again_in, None);
    let left = count(
        &client,
        "SELECT count(*) FROM cron_fires WHERE enqueued_at > now() - interval '7 days'",
    )
    .await;
    assert_eq!(
        (
            count(&client, "SELECT count(*) FROM cron_fires").await,
            left
        ),
        (1, 1)
    );
}

#[tokio::test]
async fn a_fire_due_before_the_promoters_wakeup_notifies_it() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    let (_listener, mut notifications, channel) = listen_for_promoter_wakeups(&db).await;
    client
        .batch_execute("UPDATE leader SET promote_wakeup_at = now() + interval '1 hour'")
        .await
        .unwrap();
    let (expression, _) = three_fires_soon(db_now(&client).await);
    let sync = branch(Config {
        lookahead: Duration::from_secs(600),
        ..with_schedules(vec![ScheduleConfig::new("soon", expression, "k")])
    });
    assert_eq!(run(&sync, &mut client).await.rows, 3);
    let got = tokio::time::timeout(Duration::from_secs(10), notifications.recv())
        .await
        .expect("the promoter is woken")
        .unwrap();
    assert_eq!(got.channel, channel);
}

#[tokio::test]
async fn a_stale_term_commits_nothing() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO cron_schedules (name, expression, kind) VALUES ('t', '* * * * * *', 'k')",
        )
        .await
        .unwrap();
    let sync = branch(with_schedules(vec![ScheduleConfig::new(
        "c",
        "* * * * * *",
        "k",
    )]));
    let err = run_as(&sync, &mut client, EPOCH - 1).await.unwrap_err();
    assert!(
        matches!(err, BranchError::Fenced { epoch, current } if epoch == EPOCH - 1 && current == EPOCH)
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM cron_schedules").await,
        1
    );
    assert_eq!(count(&client, "SELECT count(*) FROM cron_fires").await, 0);
    assert_eq!(count(&client, "SELECT count(*) FROM jobs").await, 0);
}

#[test]
fn validate_names_each_bad_key() {
    let good = ScheduleConfig::new("ok", "*/5 * * * *", "k");
    let config = Config {
        lookahead: Duration::from_secs(2 * 86_400),
        fire_retention: Duration::from_secs(60),
        max_fires_per_pass: 0,
        schedules: vec![
            good.clone(),
            ScheduleConfig {
                timezone: "Mars/Olympus".into(),
                ..ScheduleConfig::new("tz", "* * * * *", "k")
            },
            ScheduleConfig::new("expr", "not a cron", "k"),
            good.clone(),
            ScheduleConfig {
                priority: 9,
                ..ScheduleConfig::new("prio", "@daily", "k")
            },
            ScheduleConfig {
                max_attempts: 0,
                ..ScheduleConfig::new("attempts", "0 0 * * * *", "k")
            },
            ScheduleConfig::new("", "* * * * *", ""),
            // 30 February: it parses, and would never fire.
            ScheduleConfig::new("feb30", "0 0 0 30 2 *", "k"),
        ],
        ..Config::default()
    };
    let keys: HashSet<String> = config.validate().into_iter().map(|p| p.key).collect();
    let expected: HashSet<String> = [
        "lookahead",
        "fire_retention",
        "max_fires_per_pass",
        "schedules[name = \"tz\"].timezone",
        "schedules[name = \"expr\"].expression",
        "schedules[name = \"ok\"].name",
        "schedules[name = \"prio\"].priority",
        "schedules[name = \"attempts\"].max_attempts",
        "schedules[7].name",
        "schedules[7].kind",
        "schedules[name = \"feb30\"].expression",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(keys, expected);
    assert_eq!(Config::default().validate(), vec![]);

    // Through the whole branch config, keys carry their full path.
    let branches = BranchesConfig {
        cron_sync: with_schedules(vec![
            good.clone(),
            good.clone(),
            ScheduleConfig::new("x", "61 * * * *", "k"),
        ]),
        ..BranchesConfig::default()
    };
    let keys: Vec<String> = branches.validate().into_iter().map(|p| p.key).collect();
    assert_eq!(
        keys,
        [
            "branches.cron_sync.schedules[name = \"ok\"].name",
            "branches.cron_sync.schedules[name = \"x\"].expression"
        ]
    );
}

#[test]
fn toml_schedules_take_defaults_and_unknown_keys_are_rejected() {
    let branches: BranchesConfig = toml::from_str(
        r#"
        [cron_sync]
        lookahead = "2m"
        catch_up = "1h"

        [[cron_sync.schedules]]
        name = "nightly"
        expression = "0 3 * * *"
        kind = "nightly.cleanup"

        [[cron_sync.schedules]]
        name = "paris"
        expression = "0 9 * * MON-FRI"
        timezone = "Europe/Paris"
        queue = "mail"
        kind = "digest"
        args = { list = "daily", limit = 10 }
        priority = 1
        max_attempts = 3
        enabled = false
        "#,
    )
    .unwrap();
    let config = &branches.cron_sync;
    assert_eq!(config.lookahead, Duration::from_secs(120));
    assert_eq!(config.catch_up, Duration::from_secs(3600));
    assert_eq!(config.interval, Duration::from_secs(10));
    assert_eq!(config.fire_retention, Duration::from_secs(7 * 86_400));
    assert_eq!(
        config.schedules[0],
        ScheduleConfig::new("nightly", "0 3 * * *", "nightly.cleanup")
    );
    assert_eq!(
        config.schedules[1],
        ScheduleConfig {
            timezone: "Europe/Paris".into(),
            queue: "mail".into(),
            args: json!({"list": "daily", "limit": 10}),
            priority: 1,
            max_attempts: 3,
            enabled: false,
            ..ScheduleConfig::new("paris", "0 9 * * MON-FRI", "digest")
        }
    );
    assert_eq!(branches.validate(), vec![]);

    let err = toml::from_str::<Config>("look_ahead = \"1m\"").unwrap_err();
    assert!(err.to_string().contains("look_ahead"), "{err}");
    let err = toml::from_str::<Config>(
        "[[schedules]]\nname = \"a\"\nexpression = \"* * * * *\"\nkind = \"k\"\nkindd = \"x\"",
    )
    .unwrap_err();
    assert!(err.to_string().contains("kindd"), "{err}");
    let err = toml::from_str::<Config>("[[schedules]]\nname = \"a\"\nexpression = \"* * * * *\"")
        .unwrap_err();
    assert!(
        err.to_string().contains("kind"),
        "a schedule needs a kind: {err}"
    );
}

/// Deleting config rows the config dropped needs DELETE on cron_schedules, which
/// steward-schema's role grants do not include yet.
#[tokio::test]
async fn runs_with_the_maintenance_roles_privileges() {
    let db = db_with_leader().await;
    let mut client = db.client().await;
    let role = format!("steward_maint_{}", &db.name()[db.name().len() - 12..]);
    steward_schema::create_maintenance_role(&client, db.schema(), &role)
        .await
        .unwrap();
    client
        .batch_execute(&format!("SET ROLE {role}"))
        .await
        .unwrap();
    let sync = branch(with_schedules(vec![ScheduleConfig::new(
        "every-second",
        "* * * * * *",
        "tick",
    )]));
    let outcome = run(&sync, &mut client).await;
    assert!(outcome.rows >= 300, "{outcome:?}");
    run(&branch(Config::default()), &mut client).await;
    assert_eq!(
        count(&client, "SELECT count(*) FROM cron_schedules").await,
        0
    );
}
