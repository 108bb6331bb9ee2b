//! Where configuration comes from.

pub mod files;
pub mod watch;
