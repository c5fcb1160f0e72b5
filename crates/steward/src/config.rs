//! `steward run` configuration: defaults, then an optional TOML file, then environment
//! variables (`STEWARD_<SECTION>__<KEY>`, e.g. `STEWARD_BRANCHES__CLEANUP__BATCH_SIZE=500`),
//! then `--set section.key=value` flags. Unknown keys and unusable values are errors that name
//! the key.

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::Deserialize;
use std::path::Path;
use steward_branches::{BranchesConfig, InvalidConfig};
use steward_leader::LeaderSettings;

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub database_url: Option<String>,
    pub schema: Option<String>,
    pub leader: LeaderSettings,
    pub branches: BranchesConfig,
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

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0} does not exist")]
    MissingFile(String),
    #[error("--set {0:?}: expected KEY=VALUE, e.g. branches.cleanup.batch_size=500")]
    BadOverride(String),
    #[error("invalid configuration: {0}")]
    Parse(String),
    #[error("invalid configuration:\n  {}", .0.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n  "))]
    Invalid(Vec<InvalidConfig>),
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
        figment = figment.merge((key.trim(), value));
    }
    let config: Config = figment.extract().map_err(|e| {
        ConfigError::Parse(
            e.into_iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; "),
        )
    })?;
    let mut problems = config.leader.validate();
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
    fn unknown_keys_are_named() {
        let f = file("[branches.cleanup]\nbatch_sise = 5\n");
        let err = load(Some(f.path()), &[]).unwrap_err().to_string();
        assert!(err.contains("batch_sise"), "{err}");
        let err = load(None, &["leader.wedge_timout=5s".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("wedge_timout"), "{err}");
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
