//! Steward's Postgres schema: the embedded migrations, the check that a schema is at this
//! binary's version, and the least-privilege maintenance role. Connections are
//! `steward-connection`'s.

mod migrate;
mod queues;
mod role;

pub use migrate::{
    check_schema, latest_version, migrate, migrations_fingerprint, MigrateReport, SchemaError,
};
pub use queues::{discover_queues, QUEUES};
pub use role::{create_maintenance_role, RoleError};
