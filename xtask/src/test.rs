//! `cargo xtask test`: everything CI checks, in the order that fails fastest.

use std::{
    io::{BufRead, BufReader},
    process::Stdio,
};

use anyhow::Context;

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
    let mut tests = build::cargo();
    tests.args(["test", "--workspace", "--locked"]).env("SLUICE_AGENT_BIN", build::agent_binary(Profile::Debug));
    cargo_test(&mut tests)?;
    // Every fuzz target, briefly: what it finds fails the run (`cargo xtask fuzz` runs them longer).
    let runs = crate::fuzz::run(&crate::fuzz::targets()?, crate::fuzz::TEST_SECONDS, crate::fuzz::Build::Quick)?;
    crate::fuzz::report(&runs);
    Ok(())
}

/// `tests/tests/soak.rs` for `minutes`, its output shown as it comes.
pub fn soak(minutes: u64) -> anyhow::Result<()> {
    crate::deps::install()?;
    build::all(Profile::Debug)?;
    crate::run(
        build::cargo()
            .args(["test", "--locked", "-p", "sluice-tests", "--test", "soak", "--", "--nocapture"])
            .env("SLUICE_AGENT_BIN", build::agent_binary(Profile::Debug))
            .env("SLUICE_SOAK_MINUTES", minutes.to_string()),
    )
}

/// Runs `cargo test`, passing its output through, and closes with one line totalling every test binary.
fn cargo_test(command: &mut std::process::Command) -> anyhow::Result<()> {
    eprintln!("xtask: running {}", crate::shown(command));
    let mut child = command.stdout(Stdio::piped()).spawn().context("starting cargo test")?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test's output")?;
        println!("{line}");
        if let Some(result) = line.strip_prefix("test result: ") {
            passed += count(result, " passed");
            failed += count(result, " failed");
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    println!("tests: {passed} passed, {failed} failed");
    anyhow::ensure!(status.success(), "cargo test failed with {status}");
    anyhow::ensure!(passed > 0, "cargo test ran no test");
    Ok(())
}

/// The number before `label` in a `test result:` line (`ok. 4 passed; 0 failed; …`).
fn count(result: &str, label: &str) -> u64 {
    result
        .split(';')
        .find_map(|part| part.trim_end().strip_suffix(label)?.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}
