//! `cargo xtask bench`: builds what the benchmarks need and runs them, release-optimised.

use crate::build;

pub fn run() -> anyhow::Result<()> {
    crate::deps::install()?;
    crate::deps::install_bench_peers()?;
    build::all(build::Profile::Release)?;
    // Every binary of the bench's package: the bench runs the bare hyper forwarder beside Sluice.
    crate::run(build::cargo().args(["build", "--release", "--quiet", "--package", "sluice-bench", "--bins"]))?;
    crate::run(
        build::cargo()
            .args(["run", "--release", "--quiet", "--package", "sluice-bench", "--bin", "sluice-bench"])
            .env("SLUICE_AGENT_BIN", build::agent_binary(build::Profile::Release))
            .env("SLUICE_AGENT_LOG", "info"),
    )
}
