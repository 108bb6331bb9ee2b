//! Sluice's node agent. Configuration flows one way: `config → policy → {datapath, proxy} → telemetry`.

pub mod allocator;
pub mod app;
pub mod config;
pub mod datapath;
pub mod fuzzing;
pub mod policy;
pub mod proxy;
pub mod telemetry;
