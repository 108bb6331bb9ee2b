//! `cargo xtask bench`: builds what the benchmarks need and runs them, release-optimised.

use crate::build;

pub fn run() -> anyhow::Result<()> {
    crate::deps::install()?;
    build::ebpf()?;
    crate::run(build::cargo().args(["run", "--release", "--quiet", "--package", "sluice-bench"]))
}
