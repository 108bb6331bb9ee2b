//! The userspace proxy: the listeners, and what is done with the connections they accept.

pub mod authorize;
pub mod connect_failure;
pub mod detect;
pub mod drain;
pub mod failure;
pub mod gateway_listeners;
pub mod http;
pub mod idle;
pub mod intercepted;
pub mod l4;
pub mod local_destinations;
pub mod overload;
pub mod path;
pub mod relay;
pub mod routing;
pub mod tcp;
pub mod terminate;
pub mod transparent_listener;
pub mod upstreams;
