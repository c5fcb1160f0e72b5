//! Which loops a term runs and which branches each one runs. A branch declares only its class
//! and whether it needs a loop of its own; the plan gives each loop its name, and that name is
//! the one spans, metrics, `branch_health`, `/healthz` and `steward status` show.

use crate::settings::LoopMode;
use std::sync::Arc;
use steward_branches::Branch;

/// The name of the one loop of monolithic mode.
pub const MONOLITHIC: &str = "monolithic";

/// One loop: a task with its own work connection, running its branches each when it is due.
#[derive(Clone)]
pub struct PlannedLoop {
    pub name: &'static str,
    pub branches: Vec<Arc<dyn Branch>>,
}

/// The loops of a term, in the order of the branches they run.
///
/// Split mode: a loop per class (`slo`, `hygiene`) and one per branch that needs its own, named
/// after that branch (`promote_scheduled`); loops without branches are left out. Monolithic
/// mode: one loop, `monolithic`, with every branch.
#[derive(Clone)]
pub struct LoopPlan {
    mode: LoopMode,
    loops: Vec<PlannedLoop>,
}

impl LoopPlan {
    pub fn new(mode: LoopMode, branches: &[Arc<dyn Branch>]) -> Self {
        let mut loops: Vec<PlannedLoop> = Vec::new();
        for branch in branches {
            let name = match mode {
                LoopMode::Monolithic => MONOLITHIC,
                LoopMode::Split if branch.needs_own_loop() => branch.name(),
                LoopMode::Split => branch.class().as_str(),
            };
            match loops.iter_mut().find(|l| l.name == name) {
                Some(planned) => planned.branches.push(branch.clone()),
                None => loops.push(PlannedLoop {
                    name,
                    branches: vec![branch.clone()],
                }),
            }
        }
        Self { mode, loops }
    }

    pub fn mode(&self) -> LoopMode {
        self.mode
    }

    pub fn loops(&self) -> &[PlannedLoop] {
        &self.loops
    }

    /// Every branch with the name of the loop that runs it.
    pub fn branches(&self) -> impl Iterator<Item = (&'static str, &Arc<dyn Branch>)> {
        self.loops
            .iter()
            .flat_map(|l| l.branches.iter().map(move |b| (l.name, b)))
    }

    /// The loop that runs `branch`.
    pub fn loop_of(&self, branch: &str) -> Option<&'static str> {
        self.branches()
            .find(|(_, b)| b.name() == branch)
            .map(|(name, _)| name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use std::time::Duration;
    use steward_branches::{BranchContext, BranchError, Class, Outcome};

    struct Fake(&'static str, Class, bool);

    #[async_trait]
    impl Branch for Fake {
        fn name(&self) -> &'static str {
            self.0
        }
        fn class(&self) -> Class {
            self.1
        }
        fn needs_own_loop(&self) -> bool {
            self.2
        }
        fn interval(&self) -> Duration {
            Duration::from_secs(1)
        }
        async fn run(&self, _: &mut BranchContext<'_>) -> Result<Outcome, BranchError> {
            Ok(Outcome::default())
        }
    }

    fn branches() -> Vec<Arc<dyn Branch>> {
        vec![
            Arc::new(Fake("promote", Class::Slo, true)),
            Arc::new(Fake("rescue", Class::Slo, false)),
            Arc::new(Fake("cleanup", Class::Hygiene, false)),
            Arc::new(Fake("stats", Class::Hygiene, false)),
        ]
    }

    fn shape(plan: &LoopPlan) -> Vec<(&'static str, Vec<&'static str>)> {
        plan.loops()
            .iter()
            .map(|l| (l.name, l.branches.iter().map(|b| b.name()).collect()))
            .collect()
    }

    #[test]
    fn split_mode_gives_each_class_a_loop_and_a_branch_that_needs_one_its_own() {
        let plan = LoopPlan::new(LoopMode::Split, &branches());
        assert_eq!(
            shape(&plan),
            [
                ("promote", vec!["promote"]),
                ("slo", vec!["rescue"]),
                ("hygiene", vec!["cleanup", "stats"]),
            ]
        );
        assert_eq!(plan.loop_of("stats"), Some("hygiene"));
        assert_eq!(plan.loop_of("nope"), None);
    }

    #[test]
    fn monolithic_mode_runs_every_branch_on_one_loop() {
        let plan = LoopPlan::new(LoopMode::Monolithic, &branches());
        assert_eq!(
            shape(&plan),
            [(MONOLITHIC, vec!["promote", "rescue", "cleanup", "stats"])]
        );
    }

    #[test]
    fn loops_without_branches_are_left_out() {
        let only_hygiene: Vec<Arc<dyn Branch>> =
            vec![Arc::new(Fake("cleanup", Class::Hygiene, false))];
        let plan = LoopPlan::new(LoopMode::Split, &only_hygiene);
        assert_eq!(shape(&plan), [("hygiene", vec!["cleanup"])]);
    }
}
