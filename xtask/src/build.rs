//! Builds the eBPF object with Debian's rustc (it ships `core` for bpfel-unknown-none), then the agent.

use std::process::Command;

use crate::deps::{DEBIAN_CARGO, DEBIAN_RUSTC};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    Debug,
    Release,
}

pub fn profile(release: bool) -> Profile {
    if release {
        Profile::Release
    } else {
        Profile::Debug
    }
}

pub fn all(profile: Profile) -> anyhow::Result<()> {
    ebpf()?;
    agent(profile)
}

/// The eBPF object, at target/ebpf/bpfel-unknown-none/release/sluice (where agent/build.rs looks).
pub fn ebpf() -> anyhow::Result<()> {
    let root = crate::root();
    let mut command = Command::new(DEBIAN_CARGO);
    command
        .current_dir(root.join("ebpf"))
        .args(["build", "--release", "--target", "bpfel-unknown-none", "--ignore-rust-version", "--target-dir"])
        .arg(root.join("target/ebpf"))
        // aya-ebpf uses #![feature(asm_experimental_arch)] on BPF targets.
        .env("RUSTC_BOOTSTRAP", "1")
        .env("RUSTC", DEBIAN_RUSTC)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO_TARGET_DIR")
        .env("RUSTFLAGS", "-D warnings")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    crate::run(&mut command)
}

/// The agent, with the object embedded.
pub fn agent(profile: Profile) -> anyhow::Result<()> {
    let mut command = cargo();
    command.args(["build", "--package", "sluice-agent"]);
    if profile == Profile::Release {
        command.arg("--release");
    }
    crate::run(&mut command)
}

/// The workspace's own cargo (rustup's), run from the workspace root.
pub fn cargo() -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.current_dir(crate::root());
    command
}

pub fn agent_binary(profile: Profile) -> std::path::PathBuf {
    crate::root().join("target").join(if profile == Profile::Release { "release" } else { "debug" }).join("sluice")
}
