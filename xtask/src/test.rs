//! `cargo xtask test`: everything CI checks, in the order that fails fastest.

use crate::build::{self, Profile};

pub fn run() -> anyhow::Result<()> {
    crate::deps::install()?;
    let root = crate::root();
    crate::run(build::cargo().args(["fmt", "--all", "--", "--check"]))?;
    crate::run(
        build::cargo().args(["fmt", "--manifest-path"]).arg(root.join("ebpf/Cargo.toml")).args(["--", "--check"]),
    )?;
    build::ebpf()?;
    crate::run(build::cargo().args(["clippy", "--workspace", "--all-targets", "--locked", "--", "-D", "warnings"]))?;
    build::agent(Profile::Debug)?;
    crate::run(
        build::cargo()
            .args(["test", "--workspace", "--locked"])
            .env("SLUICE_AGENT_BIN", build::agent_binary(Profile::Debug)),
    )
}
