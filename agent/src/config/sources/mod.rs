//! Where configuration comes from.

pub mod files;
