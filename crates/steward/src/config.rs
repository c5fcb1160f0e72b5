//! `steward run` configuration: defaults, then an optional TOML file, then environment
//! variables (`STEWARD_<SECTION>__<KEY>`, e.g. `STEWARD_BRANCHES__CLEANUP__BATCH_SIZE=500`),
//! then `--set section.key=value` flags. Unknown keys and unusable values are errors that name
//! the key.

use figment::error::Kind;
use figment::providers::{Env, Format, Toml};
use figment::value::{Dict, Map};
use figment::{Figment, Metadata, Profile, Provider};
use serde::Deserialize;
use std::path::Path;
use steward_branches::{BranchesConfig, InvalidConfig};
use steward_connection::redact_text;
use steward_leader::{FleetSettings, LeaderSettings};

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub database_url: Option<String>,
    pub schema: Option<String>,
    /// The queues one `steward run` maintains (`[[queues]]`); empty: the one queue of
    /// `database_url` and `schema`, unless `fleet.discover` finds them.
    pub queues: Vec<QueueEntry>,
    pub fleet: FleetSettings,
    pub leader: LeaderSettings,
    pub branches: BranchesConfig,
}

/// One `[[queues]]` entry: a schema, in `database_url` or else the top-level one.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QueueEntry {
    pub database_url: Option<String>,
    pub schema: String,
}

impl Config {
    /// A short digest of what the leader does with this configuration (its leader and branch
    /// settings, not where the database is): candidates whose digests differ would run the
    /// queue differently after a failover.
    pub fn digest(&self) -> String {
        use sha2::Digest;
        let rendered = format!("{:?}", (&self.leader, &self.branches));
        let hash = sha2::Sha256::digest(rendered.as_bytes());
        hash.iter().take(6).map(|b| format!("{b:02x}")).collect()
    }
}

// Every message echoes what the user wrote through `redact_text`: a configuration line or a
// value may hold a database password.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0} does not exist")]
    MissingFile(String),
    #[error("--set {:?}: expected KEY=VALUE, e.g. branches.cleanup.batch_size=500", redact_text(.0))]
    BadOverride(String),
    #[error("invalid configuration:\n  {}", .0.join("\n  "))]
    Parse(Vec<String>),
    #[error("invalid configuration:\n  {}", .0.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n  "))]
    Invalid(Vec<InvalidConfig>),
}

/// One `--set KEY=VALUE`, named as the user wrote it in errors.
struct SetFlag {
    key: String,
    value: figment::value::Value,
}

impl Provider for SetFlag {
    fn metadata(&self) -> Metadata {
        Metadata::named(format!("--set {}", self.key))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        (self.key.as_str(), self.value.clone()).data()
    }
}

/// A Rust type name as an operator says it.
fn plain(expected: &str) -> &str {
    match expected {
        "i8" | "i16" | "i32" | "i64" | "u8" | "u16" | "u32" | "u64" | "usize" => "a whole number",
        "f32" | "f64" => "a number",
        "bool" | "a boolean" => "true or false",
        other => other,
    }
}

/// One configuration error as an operator reads it: the key as written, what is wrong, what
/// is allowed, and where the value came from; no library type names, no profile prefixes.
fn describe(e: &figment::Error) -> String {
    let key = e.path.join(".");
    let what = match &e.kind {
        Kind::UnknownField(_, expected) => {
            format!("unknown key {key}: expected one of {}", expected.join(", "))
        }
        Kind::InvalidType(actual, expected) => {
            format!("{key}: {actual} is not {}", plain(expected))
        }
        Kind::InvalidValue(actual, expected) => {
            format!("{key}: invalid value {actual}, expected {expected}")
        }
        Kind::MissingField(field) => format!("{key}: {field} is missing"),
        Kind::Message(message) if key.is_empty() => message.clone(),
        other => format!("{key}: {other}"),
    };
    let from = match e.metadata.as_ref() {
        Some(Metadata {
            source: Some(figment::Source::File(path)),
            ..
        }) => format!(" (in {})", path.display()),
        Some(metadata) if metadata.name.starts_with("--set") => format!(" ({})", metadata.name),
        Some(metadata) if metadata.name.contains("environment") => {
            let variable = format!("STEWARD_{}", e.path.join("__").to_uppercase());
            format!(" (environment variable {variable})")
        }
        _ => String::new(),
    };
    redact_text(&format!("{what}{from}"))
}

pub fn load(file: Option<&Path>, overrides: &[String]) -> Result<Config, ConfigError> {
    let mut figment = Figment::new();
    if let Some(path) = file {
        if !path.exists() {
            return Err(ConfigError::MissingFile(path.display().to_string()));
        }
        figment = figment.merge(Toml::file_exact(path));
    }
    // Only nested keys come from the environment; flat STEWARD_* variables (STEWARD_SCHEMA,
    // STEWARD_LOOP_MODE, ...) belong to command-line flags.
    figment = figment.merge(
        Env::prefixed("STEWARD_")
            .filter(|k| k.as_str().contains("__"))
            .split("__"),
    );
    for item in overrides {
        let (key, value) = item
            .split_once('=')
            .filter(|(k, _)| !k.trim().is_empty())
            .ok_or_else(|| ConfigError::BadOverride(item.clone()))?;
        let value: figment::value::Value = value
            .parse()
            .map_err(|_| ConfigError::BadOverride(item.clone()))?;
        figment = figment.merge(SetFlag {
            key: key.trim().to_owned(),
            value,
        });
    }
    let config: Config = figment
        .extract()
        .map_err(|e| ConfigError::Parse(e.into_iter().map(|e| describe(&e)).collect()))?;
    let mut problems = config.leader.validate();
    problems.extend(config.fleet.validate());
    problems.extend(config.branches.validate());
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError::Invalid(problems))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Duration;

    fn file(contents: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(contents.as_bytes()).unwrap();
        f
    }

    #[test]
    fn defaults_load_without_a_file() {
        assert_eq!(load(None, &[]).unwrap(), Config::default());
    }

    #[test]
    fn file_then_overrides() {
        let f = file(
            "schema = \"q1\"\n[leader]\nloop_mode = \"monolithic\"\n[branches.cleanup]\nbatch_size = 200\ninterval = \"45s\"\n",
        );
        let config = load(Some(f.path()), &["branches.cleanup.batch_size=300".into()]).unwrap();
        assert_eq!(config.schema.as_deref(), Some("q1"));
        assert_eq!(
            config.leader.loop_mode,
            steward_leader::LoopMode::Monolithic
        );
        assert_eq!(config.branches.cleanup.batch_size, 300);
        assert_eq!(config.branches.cleanup.interval, Duration::from_secs(45));
    }

    #[test]
    fn a_list_of_queues_and_fleet_settings_load_from_the_file() {
        let f = file(
            "[[queues]]\nschema = \"tenant_a\"\n[[queues]]\nschema = \"tenant_b\"\ndatabase_url = \"postgres://h/other\"\n[fleet]\ndiscover = true\nslo_sessions = 3\n",
        );
        let config = load(Some(f.path()), &[]).unwrap();
        let schemas: Vec<&str> = config.queues.iter().map(|q| q.schema.as_str()).collect();
        assert_eq!(schemas, ["tenant_a", "tenant_b"]);
        assert_eq!(
            config.queues[1].database_url.as_deref(),
            Some("postgres://h/other")
        );
        assert!(config.fleet.discover);
        assert_eq!(config.fleet.slo_sessions, 3);
        let err = load(None, &["fleet.slo_sessions=0".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("fleet.slo_sessions"), "{err}");
        let f = file("[[queues]]\nschema = \"a\"\nshema = \"b\"\n");
        let err = load(Some(f.path()), &[]).unwrap_err().to_string();
        assert!(err.contains("shema"), "{err}");
    }

    #[test]
    fn unknown_keys_are_named() {
        let f = file("[branches.cleanup]\nbatch_sise = 5\n");
        let err = load(Some(f.path()), &[]).unwrap_err().to_string();
        assert!(err.contains("batch_sise"), "{err}");
        let err = load(None, &["leader.wedge_timout=5s".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("wedge_timout"), "{err}");
    }

    /// No library internals in a message: no type names, no figment profiles.
    fn assert_plain(message: &str) {
        for internal in ["figment", "global.", "default.", "(&str", "i64", "u32"] {
            assert!(!message.contains(internal), "{internal:?} in {message}");
        }
    }

    #[test]
    fn errors_name_keys_as_written_and_where_they_came_from() {
        let err = load(None, &["leader.wedge_timout=5s".into()])
            .unwrap_err()
            .to_string();
        assert_plain(&err);
        assert!(
            err.contains("unknown key leader.wedge_timout") && err.contains("wedge_timeout"),
            "{err}"
        );
        assert!(err.contains("(--set leader.wedge_timout)"), "{err}");
        let err = load(None, &["branches.cleanup.batch_size=abc".into()])
            .unwrap_err()
            .to_string();
        assert_plain(&err);
        assert!(
            err.contains("branches.cleanup.batch_size") && err.contains("a whole number"),
            "{err}"
        );
        let f = file("[leader]\nprobe_interval = \"soon\"\n");
        let err = load(Some(f.path()), &[]).unwrap_err().to_string();
        assert_plain(&err);
        assert!(
            err.contains("leader.probe_interval") && err.contains(&f.path().display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn an_invalid_interval_is_reported_without_the_settings_derived_from_it() {
        let Err(ConfigError::Invalid(problems)) =
            load(None, &["branches.promote_scheduled.interval=0s".into()])
        else {
            panic!("a zero interval is refused");
        };
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["branches.promote_scheduled.interval"]);
    }

    #[test]
    fn a_password_in_a_broken_file_or_flag_is_never_echoed() {
        let f = file("database_url = \"postgres://u:Sup3rS3cretPw!@127.0.0.1:5432/postgres\n");
        let err = load(Some(f.path()), &[]).unwrap_err().to_string();
        assert!(!err.contains("Sup3rS3cretPw"), "{err}");
        assert!(err.contains("postgres://u:***@"), "{err}");
        let err = load(None, &["postgres://u:Sup3rS3cretPw!@h/db".into()])
            .unwrap_err()
            .to_string();
        assert!(!err.contains("Sup3rS3cretPw"), "{err}");
    }

    #[test]
    fn bad_values_name_their_key_and_value() {
        let err = load(None, &["branches.promote_scheduled.batch_size=0".into()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("branches.promote_scheduled.batch_size") && err.contains('0'),
            "{err}"
        );
        let err = load(None, &["branches.cleanup.interval=soon".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("interval"), "{err}");
        let err = load(None, &["leader.loop_mode=sideways".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("sideways"), "{err}");
        assert!(matches!(
            load(None, &["nokey".into()]),
            Err(ConfigError::BadOverride(_))
        ));
        assert!(matches!(
            load(Some(Path::new("/nonexistent/steward.toml")), &[]),
            Err(ConfigError::MissingFile(_))
        ));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Real keys, near-miss keys and nonsense.
        fn key() -> impl Strategy<Value = String> {
            prop_oneof![
                prop::sample::select(vec![
                    "leader.loop_mode",
                    "leader.wedge_timeout",
                    "leader.keepalive_retries",
                    "branches.cleanup.batch_size",
                    "branches.cleanup.retention.completed",
                    "branches.promote_scheduled.interval",
                    "branches.rescue_stale_heartbeats.staleness",
                    "branches.cron_sync.lookahead",
                    "branches.rotate_archive.retention_days",
                    "schema",
                ])
                .prop_map(str::to_owned),
                "[a-z_]{1,12}(\\.[a-z_]{1,12}){0,3}",
            ]
        }

        fn value() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<i64>().prop_map(|n| n.to_string()),
                prop::sample::select(vec![
                    "0",
                    "-1",
                    "1ms",
                    "250ms",
                    "30s",
                    "5m",
                    "24h",
                    "soon",
                    "true",
                    "split",
                    "monolithic",
                    "\"\"",
                    "[]",
                    "{}"
                ])
                .prop_map(str::to_owned),
                ".{0,20}",
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

            #[test]
            fn any_override_is_accepted_or_refused_naming_its_key(key in key(), value in value()) {
                match load(None, &[format!("{key}={value}")]) {
                    Ok(_) => {}
                    Err(ConfigError::BadOverride(item)) => prop_assert!(item.contains(&key)),
                    Err(e) => {
                        // The error names the key, or the segment of it that is unknown.
                        let message = e.to_string();
                        prop_assert!(
                            key.split('.').any(|segment| message.contains(segment)),
                            "{message} does not name {key}"
                        );
                    }
                }
            }

            #[test]
            fn any_file_is_accepted_or_refused_without_panicking(contents in ".{0,200}") {
                let f = file(&contents);
                let _ = load(Some(f.path()), &[]);
            }
        }
    }
}
