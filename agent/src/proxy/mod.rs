//! The userspace proxy: the listeners, and what is done with the connections they accept.

pub mod tcp;
pub mod transparent_listener;
