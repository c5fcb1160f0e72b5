//! `--inject-hygiene-delay`: a bench-only hygiene branch whose pass holds a fenced transaction
//! open in `pg_sleep`, so hygiene is slow by a repeatable amount on every machine. It occupies
//! its loop's work connection exactly as a slow cleanup would.

use async_trait::async_trait;
use std::time::Duration;
use steward_branches::{Branch, BranchContext, BranchError, Class, Outcome, Timeouts};

pub const NAME: &str = "bench_injected_delay";

pub struct InjectedDelay {
    pub delay: Duration,
    pub interval: Duration,
}

#[async_trait]
impl Branch for InjectedDelay {
    fn name(&self) -> &'static str {
        NAME
    }

    fn class(&self) -> Class {
        Class::Hygiene
    }

    fn interval(&self) -> Duration {
        self.interval
    }

    fn timeouts(&self) -> Timeouts {
        Timeouts {
            statement: self.delay + Duration::from_secs(5),
            lock: Duration::from_secs(1),
        }
    }

    async fn run(&self, ctx: &mut BranchContext<'_>) -> Result<Outcome, BranchError> {
        let tx = ctx.fenced().await?;
        tx.execute("SELECT pg_sleep($1)", &[&self.delay.as_secs_f64()])
            .await?;
        tx.commit().await?;
        Ok(Outcome::default())
    }
}
