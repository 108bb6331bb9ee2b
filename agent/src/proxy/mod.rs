//! The userspace proxy: the listeners, and what is done with the connections they accept.

pub mod detect;
pub mod failure;
pub mod http;
pub mod intercepted;
pub mod tcp;
pub mod transparent_listener;
