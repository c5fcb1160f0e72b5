//! `steward status`: who leads and how each branch is doing, from any host with database
//! access ([`steward_leader::status`]).

use steward_leader::status::Status;

/// Prints `status` as a table, or as JSON.
pub fn print(status: &Status, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(status)?);
    } else {
        print_table(status);
    }
    Ok(())
}

fn ms(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into())
}

fn since(t: &steward_leader::status::TermStatus) -> String {
    t.since
        .map(|s| s.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| "-".into())
}

fn print_table(status: &Status) {
    match (&status.leader, &status.last_term) {
        (Some(l), _) => {
            println!(
                "leader: {} on {} (pid {}), epoch {}, since {}",
                l.instance,
                l.host,
                l.pid,
                l.epoch,
                since(l)
            );
            if let Some(age) = l.seconds_since_progress {
                let warn = if age > 10.0 { "  <- no progress: wedged or stalled?" } else { "" };
                println!("last progress: {age:.1}s ago{warn}");
            }
        }
        (None, Some(t)) => println!(
            "no leader: nobody holds the leadership lock for schema {}. Last term: epoch {} by {} on {}, since {}",
            status.schema,
            t.epoch,
            t.instance,
            t.host,
            since(t)
        ),
        (None, None) => println!(
            "no leader: nobody holds the leadership lock for schema {} and no term has ever started; start `steward run`",
            status.schema
        ),
    }
    if status.branches.is_empty() {
        return;
    }
    println!();
    println!(
        "{:<31} {:<17} {:>9} {:>11} {:>11} {:>8} {:>9} {:>8} {:>7}  last error",
        "branch",
        "loop",
        "last run",
        "duration ms",
        "delay ms",
        "rows",
        "overrun",
        "runs",
        "errors"
    );
    for b in &status.branches {
        let ago = b
            .seconds_since_run
            .map(|s| format!("{s:.0}s ago"))
            .unwrap_or_else(|| "-".into());
        let overrun = if b.overrun_state == "delayed" {
            format!("DELAYED/{}", b.overrun_episodes)
        } else {
            format!("ok/{}", b.overrun_episodes)
        };
        let error = b.last_error.as_deref().unwrap_or("");
        let error: String = error.chars().take(60).collect();
        println!(
            "{:<31} {:<17} {:>9} {:>11} {:>11} {:>8} {:>9} {:>8} {:>7}  {}",
            b.branch,
            b.loop_name,
            ago,
            ms(b.last_duration_ms),
            ms(b.last_start_delay_ms),
            b.last_rows
                .map(|r| r.to_string())
                .unwrap_or_else(|| "-".into()),
            overrun,
            b.runs,
            b.errors,
            error
        );
    }
}
