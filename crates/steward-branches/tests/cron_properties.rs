//! Property tests over cron parsing: whatever a schedule row holds, parsing never panics, and
//! a schedule that parses yields a bounded, strictly increasing list of fires inside its window.

use chrono::{TimeZone, Utc};
use proptest::prelude::*;
use steward_branches::cron_sync::{fire_times, parse_schedule};

/// Strings that look like cron expressions (fields of digits, ranges, steps, lists, names)
/// and strings that do not.
fn expression() -> impl Strategy<Value = String> {
    let field = prop_oneof![
        Just("*".to_owned()),
        (0u32..70).prop_map(|n| n.to_string()),
        (0u32..70, 0u32..70).prop_map(|(a, b)| format!("{a}-{b}")),
        (0u32..70).prop_map(|n| format!("*/{n}")),
        (0u32..70, 0u32..70).prop_map(|(a, b)| format!("{a},{b}")),
        prop::sample::select(vec![
            "MON", "jan", "L", "W", "?", "#", "5#3", "LW", "-", "/", ""
        ])
        .prop_map(str::to_owned),
    ];
    prop_oneof![
        prop::collection::vec(field, 0..8).prop_map(|f| f.join(" ")),
        prop::sample::select(vec![
            "@hourly", "@daily", "@weekly", "@yearly", "@reboot", "@never"
        ])
        .prop_map(str::to_owned),
        ".{0,40}",
    ]
}

fn timezone() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "UTC",
            "Europe/Paris",
            "America/New_York",
            "Asia/Kolkata",
            "Australia/Lord_Howe",
            "Mars/Olympus",
            ""
        ])
        .prop_map(str::to_owned),
        "[A-Za-z/_]{0,20}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn parsing_never_panics_and_fires_are_ordered_and_bounded(expr in expression(), tz in timezone(), start in 0i64..4_000_000_000) {
        let Ok((cron, tz)) = parse_schedule(&expr, &tz) else {
            return Ok(());
        };
        let after = Utc.timestamp_opt(start, 0).single().unwrap();
        let until = after + chrono::Duration::days(2);
        let cap = 50;
        let Ok(fires) = fire_times(&cron, tz, after, until, cap) else {
            return Ok(());
        };
        prop_assert!(fires.due.len() <= cap);
        prop_assert!(fires.due.windows(2).all(|w| w[0] < w[1]), "not increasing: {:?}", fires.due);
        prop_assert!(fires.due.iter().all(|t| *t > after && *t <= until), "outside the window");
        if let (Some(last), Some(next)) = (fires.due.last(), fires.next) {
            prop_assert!(next > *last);
        }
    }
}
