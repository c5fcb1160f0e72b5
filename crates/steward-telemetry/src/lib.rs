//! Steward's telemetry: one set of instruments through the `metrics` facade, exported on a
//! Prometheus endpoint and over OTLP; one span per branch pass over OTLP; logs through
//! `tracing`; and the HTTP health endpoints.

mod http;
mod init;
pub mod names;
mod observer;

pub use http::{serve, HttpState, ServedQueues};
pub use init::{LogFormat, Telemetry, TelemetryError};
pub use observer::{fleet_share, MetricsObserver, QueueLabels};
