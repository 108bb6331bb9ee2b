//! What the agent tells the outside: Prometheus metrics, request access logs, blocked-flow logs and the admin
//! endpoints.

pub mod access_log;
pub mod admin_client;
pub mod blocked_flows;
pub mod config_dump;
pub mod connections;
pub mod expression;
pub mod flows;
pub mod metrics;
pub mod passthrough;
pub mod recent;
pub mod requests;
pub mod response_flags;
pub mod scopes;
pub mod server;
pub mod status;
pub mod switches;
pub mod tags;
