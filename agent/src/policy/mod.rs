//! The compiled policy: what the datapath and the proxy need, computed once per configuration change.

pub mod authorization;
pub mod bindings;
pub mod certificates;
pub mod clusters;
pub mod compile;
pub mod host_match;
pub mod http_match;
pub mod l4;
pub mod labels;
pub mod routes;
pub mod sidecars;
pub mod telemetry;
pub mod tls_servers;

pub use l4::{BlackholeAction, DatapathPolicy, L4Rule, OutboundMode, Protocol};
