//! The scenarios' `steward run` processes: the shared driver of `steward-workload`
//! ([`steward_workload::fleet`]), under the names the scenarios use.

pub use steward_workload::fleet::{
    clock_ticks, machine_cpu, proc_stat, rss_kib, StewardProcess, ACQUIRED, FIRST_PASS, STANDING_BY,
};
// The types of the driver's answers, for scenarios that name them.
#[allow(unused_imports)]
pub use steward_workload::fleet::{LogLine, MachineCpu, ProcStat};

use std::path::PathBuf;

/// The `steward` binary: `explicit` if given; otherwise built with cargo (this harness's
/// profile and target directory) and taken from beside this executable.
pub fn steward_binary(explicit: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    Ok(steward_workload::fleet::steward_binary(
        explicit,
        crate::progress,
    )?)
}
