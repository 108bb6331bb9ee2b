//! Where configuration comes from.

pub mod files;
pub mod kubernetes;
pub mod watch;
pub mod yaml;
