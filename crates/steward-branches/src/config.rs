//! What every branch's settings have in common, and how each is checked. A branch declares its
//! settings with [`branch_settings!`], which adds `enabled`, `interval` and, for a branch that
//! works in batches, `batch_size` and `max_batches_per_run`, with the branch's defaults; the
//! registry in the crate root checks them all the same way.

use std::fmt;
use std::time::Duration;

/// A configuration value that cannot work, named by its key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid value {value} for {key}: {reason}")]
pub struct InvalidConfig {
    pub key: String,
    pub value: String,
    pub reason: String,
}

impl InvalidConfig {
    pub fn new(key: impl Into<String>, value: impl fmt::Debug, reason: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            value: format!("{value:?}"),
            reason: reason.into(),
        }
    }

    /// The same problem with its key under `prefix` (`retry.base` → `branches.x.retry.base`).
    pub fn under(mut self, prefix: &str) -> Self {
        self.key = format!("{prefix}.{}", self.key);
        self
    }
}

/// Checks an interval: positive and at most a day.
pub fn check_interval(key: &str, value: Duration) -> Result<(), InvalidConfig> {
    if value.is_zero() || value > Duration::from_secs(86_400) {
        return Err(InvalidConfig::new(
            key,
            value,
            "must be between 1ms and 24h",
        ));
    }
    Ok(())
}

/// Checks a batch size: 1 to 100,000 rows.
pub fn check_batch(key: &str, value: i64) -> Result<(), InvalidConfig> {
    if !(1..=100_000).contains(&value) {
        return Err(InvalidConfig::new(
            key,
            value,
            "must be between 1 and 100000",
        ));
    }
    Ok(())
}

/// How a batching branch splits a pass: batches of `size` rows, each its own short fenced
/// transaction, at most `max_per_pass` of them before the pass yields to its loop (and asks to
/// run again at once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    pub size: i64,
    pub max_per_pass: u32,
}

impl Batching {
    fn problems(&self) -> Vec<InvalidConfig> {
        let mut problems: Vec<InvalidConfig> = check_batch("batch_size", self.size)
            .err()
            .into_iter()
            .collect();
        if self.max_per_pass == 0 {
            problems.push(InvalidConfig::new(
                "max_batches_per_run",
                0,
                "must be at least 1",
            ));
        }
        problems
    }
}

/// The settings every branch has; implemented by [`branch_settings!`].
pub trait BranchSettings {
    fn enabled(&self) -> bool;
    fn interval(&self) -> Duration;
    /// `None` for a branch that does not work in batches.
    fn batching(&self) -> Option<Batching>;
    /// Problems with the branch's own settings, keyed relative to the branch.
    fn own_problems(&self) -> Vec<InvalidConfig>;

    /// Every problem, keyed relative to the branch (`interval`, `retry.base`).
    fn problems(&self) -> Vec<InvalidConfig> {
        let mut problems: Vec<InvalidConfig> = check_interval("interval", self.interval())
            .err()
            .into_iter()
            .collect();
        problems.extend(self.batching().iter().flat_map(Batching::problems));
        problems.extend(self.own_problems());
        problems
    }
}

/// Declares a branch's settings struct. It gets `enabled` (default true) and `interval`, and,
/// when `batches:` is given, `batch_size` and `max_batches_per_run`; then the branch's own
/// fields, each with its default. `checks:` names a function (`fn(&Self) ->
/// Vec<InvalidConfig>`) with the checks of the branch's own fields. Unknown keys are refused.
///
/// ```ignore
/// branch_settings! {
///     /// Settings of `priority_aging`.
///     pub struct Config {
///         interval: Duration::from_secs(60),
///         batches: 1000, per_pass: 10,
///         checks: Config::own_problems,
///         /// Waiting this long raises a job's priority by one level.
///         #[serde(with = "humantime_serde")]
///         pub age_step: Duration = Duration::from_secs(300),
///     }
/// }
/// ```
macro_rules! branch_settings {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            interval: $interval:expr,
            $(batches: $batch_size:expr, per_pass: $max_batches:expr,)?
            $(checks: $checks:path,)?
            $(
                $(#[$field_meta:meta])*
                pub $field:ident: $type:ty = $default:expr,
            )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, serde::Deserialize, PartialEq)]
        #[serde(default, deny_unknown_fields)]
        pub struct $name {
            /// Whether the branch runs at all.
            pub enabled: bool,
            /// How often the branch runs when it asks for nothing sooner.
            #[serde(with = "humantime_serde")]
            pub interval: std::time::Duration,
            $(
                #[doc = concat!("Rows per batch (default ", stringify!($batch_size), ").")]
                pub batch_size: i64,
                #[doc = concat!(
                    "Batches per pass before the pass yields to its loop and asks to run again ",
                    "at once (default ", stringify!($max_batches), ")."
                )]
                pub max_batches_per_run: u32,
            )?
            $(
                $(#[$field_meta])*
                pub $field: $type,
            )*
        }

        impl Default for $name {
            fn default() -> Self {
                Self {
                    enabled: true,
                    interval: $interval,
                    $(batch_size: $batch_size, max_batches_per_run: $max_batches,)?
                    $($field: $default,)*
                }
            }
        }

        impl $name {
            /// Every problem, keyed relative to the branch (`interval`, `retry.base`).
            pub fn validate(&self) -> Vec<$crate::config::InvalidConfig> {
                $crate::config::BranchSettings::problems(self)
            }

            $(
                #[doc = concat!(
                    "How a pass splits into batches (by default ", stringify!($batch_size),
                    " rows, ", stringify!($max_batches), " batches per pass)."
                )]
                pub fn batches(&self) -> $crate::config::Batching {
                    $crate::config::Batching {
                        size: self.batch_size,
                        max_per_pass: self.max_batches_per_run,
                    }
                }
            )?
        }

        impl $crate::config::BranchSettings for $name {
            fn enabled(&self) -> bool {
                self.enabled
            }

            fn interval(&self) -> std::time::Duration {
                self.interval
            }

            fn batching(&self) -> Option<$crate::config::Batching> {
                branch_settings!(@batching self $(, $batch_size)?)
            }

            fn own_problems(&self) -> Vec<$crate::config::InvalidConfig> {
                #[allow(unused_mut)]
                let mut problems = Vec::new();
                $(problems.extend($checks(self));)?
                problems
            }
        }
    };
    (@batching $self:ident) => {
        None
    };
    (@batching $self:ident, $batch_size:expr) => {
        Some($crate::config::Batching {
            size: $self.batch_size,
            max_per_pass: $self.max_batches_per_run,
        })
    };
}
pub(crate) use branch_settings;
