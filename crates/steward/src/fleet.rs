//! `steward run` with a list of queues (`[[queues]]`, or discovery): one process of a fleet
//! that shares the queues out (ADR 0003).

use crate::config::Config;
use crate::run::{forward_signals, RunArgs};
use anyhow::Context;
use std::collections::BTreeMap;
use std::sync::Arc;
use steward_branches::{Branch, BranchesConfig};
use steward_connection::{SchemaName, Target};
use steward_leader::fleet::{DatabaseQueues, Fleet, QueueRef, QueueSetup, Share};
use steward_leader::{HealthRegistry, LoopPlan, Observer};
use steward_telemetry::{HttpState, MetricsObserver, QueueLabels, ServedQueues, Telemetry};
use tokio_util::sync::CancellationToken;

/// Each queue's branches and its metrics, and the queues the HTTP endpoints serve.
struct Setup {
    branches: BranchesConfig,
    instance: String,
    served: ServedQueues,
}

impl QueueSetup for Setup {
    fn branches(&self) -> Vec<Arc<dyn Branch>> {
        self.branches.build()
    }

    fn observers(
        &self,
        queue: &QueueRef,
        plan: &LoopPlan,
        health: &HealthRegistry,
    ) -> Vec<Arc<dyn Observer>> {
        // Series carry the database exactly when the list spans databases.
        let labels = QueueLabels {
            schema: queue.target.schema().to_string(),
            database: queue.database.clone(),
        };
        let metrics = Arc::new(MetricsObserver::new(self.instance.clone(), labels));
        metrics.register_initial(plan);
        self.served
            .insert(queue.name.clone(), health.clone(), queue.target.clone());
        vec![metrics]
    }

    fn removed(&self, queue: &QueueRef) {
        self.served.remove(&queue.name);
    }

    fn shared(&self, database: &str, share: Share) {
        steward_telemetry::fleet_share(database, &share);
    }
}

/// The databases of the list, each with its named schemas; discovery, when on, looks in every
/// one of them.
fn databases(args: &RunArgs, config: &Config) -> anyhow::Result<Vec<DatabaseQueues>> {
    anyhow::ensure!(
        !args.db.names_a_schema(config),
        "--schema (STEWARD_SCHEMA, or schema in the config file) names one queue; with [[queues]] or discovery, list the schemas in [[queues]]"
    );
    let default_url = args.db.database_url(config);
    let mut by_url: BTreeMap<String, Vec<SchemaName>> = BTreeMap::new();
    if config.fleet.discover {
        let url = default_url.clone().context(
            "discovery needs a database: set DATABASE_URL, --database-url or database_url in the config file",
        )?;
        by_url.entry(url).or_default();
    }
    for (i, entry) in config.queues.iter().enumerate() {
        let url = entry.database_url.clone().or(default_url.clone()).with_context(|| {
            format!("[[queues]] entry {} (schema {:?}) has no database: give it database_url, or set DATABASE_URL", i + 1, entry.schema)
        })?;
        let schema: SchemaName = entry
            .schema
            .parse()
            .with_context(|| format!("[[queues]] entry {}", i + 1))?;
        let schemas = by_url.entry(url).or_default();
        if !schemas.contains(&schema) {
            schemas.push(schema);
        }
    }
    by_url
        .into_iter()
        .map(|(url, schemas)| {
            let schema = schemas.first().cloned().unwrap_or_default();
            Ok(DatabaseQueues {
                target: Target::new(&url, schema)?,
                schemas,
                discover: config.fleet.discover,
            })
        })
        .collect()
}

pub async fn run(args: &RunArgs, config: Config, telemetry: &Telemetry) -> anyhow::Result<()> {
    let databases = databases(args, &config)?;
    let fleet = Fleet::new(
        config.leader.clone(),
        config.fleet.clone(),
        databases.clone(),
    )?
    .with_config_digest(config.digest());
    anyhow::ensure!(!databases.is_empty(), "no queues to maintain");
    let served = ServedQueues::default();
    let setup = Arc::new(Setup {
        branches: config.branches.clone(),
        instance: fleet.instance().to_owned(),
        served: served.clone(),
    });
    steward_telemetry::serve(
        args.metrics_addr,
        HttpState::new(
            telemetry.prometheus(),
            fleet.instance().to_owned(),
            args.loop_stall_limit,
            served,
        ),
    )
    .await
    .with_context(|| format!("cannot serve metrics on {}", args.metrics_addr))?;
    tracing::info!(
        instance = fleet.instance(),
        databases = databases.len(),
        discover = config.fleet.discover,
        mode = config.leader.loop_mode.as_str(),
        "steward starting as a fleet process"
    );
    let shutdown = CancellationToken::new();
    tokio::spawn(forward_signals(shutdown.clone()));
    fleet.run(setup, shutdown).await?;
    tracing::info!("steward stopped");
    Ok(())
}
