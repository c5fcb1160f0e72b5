//! One module per scenario; each returns its result (serialized into the report as is), its
//! targets, and renders its human table.

pub mod failover;
pub mod fleet;
pub mod footprint;
pub mod heartbeat;
pub mod isolation;
pub mod promotion;
pub mod rescue;
pub mod scale;
pub mod throughput;
pub mod worker;
