//! What the agent tells the outside: Prometheus metrics and the admin endpoints.

pub mod metrics;
pub mod server;
