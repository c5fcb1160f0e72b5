//! One synthetic workload for the demo (`steward-demo`), the benchmark harness
//! (`steward-bench`) and the chaos suite (`tests/chaos.rs`), and the `steward run` processes
//! they run it against.
//!
//! - [`behaviour`]: the one table of what a job does when it runs (completes, works slowly,
//!   fails once, crashes, overruns its deadline, parks on a callback nobody answers, ...), what
//!   that looks like on `steward-worker`, and what a correct end of the job is.
//! - [`workload`]: producers enqueuing a mix of behaviours at a steady rate, and workers
//!   running them on [`steward_worker::Worker`], keeping books ([`Ledger`]) of what they were
//!   told happened, for a consumer to report or to check against the database.
//! - [`fleet`]: `steward run` processes: spawned with JSON logs, their lines collected with the
//!   time each was written, signalled, and read from /proc.
//! - [`queues`]: many queues in one database: migrating them, who leads each, and how the
//!   queues of a killed process are taken over.
//! - [`metrics`]: a process's `/metrics` read back: histogram buckets and their quantiles.

pub mod behaviour;
pub mod fleet;
pub mod metrics;
pub mod queues;
mod rng;
pub mod workload;

pub use behaviour::Behaviour;
pub use rng::Rng;
pub use workload::{Books, Ledger, Run, Stats, Timings, Workload, WorkloadConfig, WorkloadError};
