//! Sluice's integration test harness: network namespaces, links, real servers and the agent, each owned by a
//! guard that removes it on drop, panics included. Nothing here touches the host's root namespace.

pub mod agent;
pub mod http;
pub mod image;
pub mod istio;
pub mod load;
pub mod metrics;
pub mod netns;
pub mod packets;
pub mod peers;
pub mod process;
mod teardown;
pub mod tls;
pub mod topology;

pub use agent::Agent;
pub use netns::Netns;
pub use topology::Topology;

/// Fails the calling test, loudly, unless it runs as root: these tests create namespaces and load eBPF. From then
/// on, an interrupted run (Ctrl-C, SIGTERM, SIGHUP) still removes the namespaces and bpf mounts it made.
pub fn require_root() {
    teardown::on_signals();
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (it creates network namespaces and loads eBPF programs): run `cargo xtask test` as root"
    );
}

/// The workspace's own Python virtual environment (target/tools/python), where `cargo xtask deps` installs the
/// PyPI tools the tests run: Debian's Python refuses packages installed beside its own (PEP 668).
pub fn python_tools() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools/python")
}

/// The npm packages `cargo xtask deps` installs (Istio's CRD schemas, compiled; a YAML reader).
pub fn node_tools() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools/node")
}
