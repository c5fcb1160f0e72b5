//! The text of every statement that is built from macros (cleanup's, the rescues') and of the
//! promoter's, as snapshot files under `tests/sql/`, one per statement, named
//! `<module>__<constant>.snap` (`cleanup__archive_completed.snap` holds
//! `cleanup::ARCHIVE_COMPLETED`): the SQL that runs, to read in review or to paste into
//! `EXPLAIN`, so that a change to a macro shows as a diff of real SQL.
//!
//! A statement that differs from its file, or has none, fails its test with the diff;
//! `.config/insta.yaml` makes plain `cargo test` compare only, never write. To accept a change:
//! `INSTA_UPDATE=always cargo test -p steward-branches --test sql_snapshots` (or
//! `cargo insta test --review`), then commit the rewritten files.

use std::path::Path;

/// Where the snapshot files are, relative to this file.
const DIR: &str = "sql";

fn check(name: &str, constant: &str, sql: &str) {
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path(DIR);
    settings.set_prepend_module_to_snapshot(false);
    settings.set_omit_expression(true);
    settings.set_description(constant);
    settings.bind(|| insta::assert_snapshot!(name, sql));
}

/// One test per statement, `<module>::<test>`, comparing `steward_branches::<module>::<CONSTANT>`
/// with `tests/sql/<module>__<test>.snap`; and `NAMES`, every snapshot name.
macro_rules! snapshots {
    ($($module:ident { $($test:ident: $constant:ident),* $(,)? })*) => {
        $(mod $module {
            $(#[test]
            fn $test() {
                super::check(
                    concat!(stringify!($module), "__", stringify!($test)),
                    concat!(stringify!($module), "::", stringify!($constant)),
                    steward_branches::$module::$constant,
                );
            })*
        })*

        const NAMES: &[&str] = &[$($(concat!(stringify!($module), "__", stringify!($test)),)*)*];
    };
}

snapshots! {
    cleanup {
        archive_completed: ARCHIVE_COMPLETED,
        archive_failed: ARCHIVE_FAILED,
        archive_cancelled: ARCHIVE_CANCELLED,
        archive_completed_skipping: ARCHIVE_COMPLETED_SKIPPING,
        archive_failed_skipping: ARCHIVE_FAILED_SKIPPING,
        archive_cancelled_skipping: ARCHIVE_CANCELLED_SKIPPING,
        batch_days_completed: BATCH_DAYS_COMPLETED,
        batch_days_failed: BATCH_DAYS_FAILED,
        batch_days_cancelled: BATCH_DAYS_CANCELLED,
        delete_completed: DELETE_COMPLETED,
        delete_failed: DELETE_FAILED,
        delete_cancelled: DELETE_CANCELLED,
        delete_completed_skipping: DELETE_COMPLETED_SKIPPING,
        delete_failed_skipping: DELETE_FAILED_SKIPPING,
        delete_cancelled_skipping: DELETE_CANCELLED_SKIPPING,
    }
    rescue_stale_heartbeats {
        rescue: RESCUE,
    }
    rescue_expired_deadlines {
        rescue: RESCUE,
    }
    rescue_expired_callbacks {
        rescue: RESCUE,
    }
    promote_scheduled {
        promote: PROMOTE,
        plan_wakeup: PLAN_WAKEUP,
    }
}

/// A snapshot whose statement is gone (renamed or removed) fails here rather than lingering.
#[test]
fn every_snapshot_file_has_its_statement() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(DIR);
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    let mut expected: Vec<String> = NAMES.iter().map(|name| format!("{name}.snap")).collect();
    expected.sort();
    assert_eq!(files, expected, "files in {}", dir.display());
}
