//! Steward's connections to PostgreSQL. A [`Target`] says where a queue lives (a database URL
//! and the schema holding Steward's tables) and how to reach it (TLS, session settings). It is
//! parsed and validated once, then connects, listens for notifications, pools and cancels.
//!
//! All SQL in Steward is written unqualified; every connection a [`Target`] opens pins
//! `search_path` to its schema, so one database can host several independent Steward schemas.

mod redact;
mod schema_name;
mod target;
mod tls;

pub use redact::{describe_pg_error, redact_text, redact_url};
pub use schema_name::{InvalidSchemaName, SchemaName};
pub use target::{
    ConnectError, Ended, Liveness, Notification, Notifications, Reconnecting, Target,
};
pub use tls::{SslMode, TlsSetupError};
