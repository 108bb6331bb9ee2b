//! `cargo xtask fuzz [TARGET] [--time S]`: the fuzz targets of `fuzz/` (libFuzzer, built by cargo-fuzz with this
//! machine's stable rustc: `RUSTC_BOOTSTRAP=1` lets it take the `-Z` flags the instrumentation needs). Each runs
//! from the committed seeds (`fuzz/seeds/TARGET/`) and what it found before (`target/fuzz/corpus/TARGET/`); an
//! input that crashes or hangs a target is left in `fuzz/artifacts/TARGET/`, and once fixed belongs in
//! `fuzz/regressions/TARGET/`, which `cargo test` replays. `cargo xtask test` runs each target briefly.

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context};

const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// How long `cargo xtask test` runs each target.
pub const TEST_SECONDS: u64 = 10;
/// The largest input tried: a configuration file of a good size, a ClientHello at its limit.
const MAX_INPUT: usize = 64 * 1024;

/// How the targets are built: optimized (by hand: more inputs a second) or not (in `cargo xtask test`: built in
/// a fraction of the time).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Build {
    Optimized,
    Quick,
}

/// One target's run.
pub struct Run {
    pub target: String,
    pub inputs: u64,
    pub seconds: u64,
}

/// The targets, by their sources' names.
pub fn targets() -> anyhow::Result<Vec<String>> {
    let dir = crate::root().join("fuzz/fuzz_targets");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|entry| entry.ok()?.path().file_stem().map(|stem| stem.to_string_lossy().into_owned()))
        .collect();
    names.sort();
    Ok(names)
}

/// Builds and runs `targets` for `seconds` each; fails on the first that finds a crash.
pub fn run(targets: &[String], seconds: u64, build: Build) -> anyhow::Result<Vec<Run>> {
    install()?;
    // One target, or every target (cargo fuzz builds one or all).
    let mut building = cargo_fuzz("build", build);
    if let [target] = targets {
        building.arg(target);
    }
    crate::run(&mut building)?;
    let mut runs = Vec::new();
    for target in targets {
        let corpus = crate::root().join("target/fuzz/corpus").join(target);
        std::fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
        let mut command = cargo_fuzz("run", build);
        command.arg(target).arg(&corpus);
        for committed in ["seeds", "regressions"] {
            let dir: PathBuf = crate::root().join("fuzz").join(committed).join(target);
            if dir.is_dir() {
                command.arg(dir);
            }
        }
        command.args(["--", &format!("-max_total_time={seconds}"), "-timeout=5", "-rss_limit_mb=2048"]);
        command.arg(format!("-max_len={MAX_INPUT}"));
        eprintln!("xtask: running {}", crate::shown(&command));
        let output = command.output().with_context(|| format!("running the fuzz target {target}"))?;
        let log = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() {
            let found: Vec<&str> = log.lines().filter(|line| line.contains("artifact")).collect();
            bail!(
                "the fuzz target {target} failed ({}):\n{}\n{}\nreproduce with `cargo xtask fuzz {target}`; once fixed, add \
                 the input to fuzz/regressions/{target}/",
                output.status,
                tail(&log, 40),
                found.join("\n")
            );
        }
        // libFuzzer's last word: `Done 190427 runs in 21 second(s)`.
        let done = log.lines().rev().find_map(|line| line.strip_prefix("Done ")).unwrap_or_default();
        let number = |at: usize| done.split_whitespace().nth(at).and_then(|n| n.parse().ok()).unwrap_or(0);
        runs.push(Run { target: target.clone(), inputs: number(0), seconds: number(3) });
    }
    Ok(runs)
}

/// Prints one line per run.
pub fn report(runs: &[Run]) {
    for run in runs {
        let rate = run.inputs / run.seconds.max(1);
        println!("fuzz {:<16} {:>10} inputs in {:>4} s ({rate}/s), no crash", run.target, run.inputs, run.seconds);
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// `cargo fuzz SUBCOMMAND` with the build's options.
fn cargo_fuzz(subcommand: &str, build: Build) -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.current_dir(crate::root().join("fuzz")).args(["fuzz", subcommand]);
    command.env("RUSTC_BOOTSTRAP", "1").env("CARGO_TARGET_DIR", crate::root().join("target/fuzz"));
    // No sanitizer: the code is Rust, whose own checks (bounds, overflow, debug assertions) the build keeps;
    // libFuzzer's coverage guidance is what is wanted.
    command.args(["--sanitizer", "none"]);
    if build == Build::Quick {
        command.arg("--dev");
    }
    command
}

/// cargo-fuzz from crates.io, unless this version is installed.
fn install() -> anyhow::Result<()> {
    let installed = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|out| out.status.success() && String::from_utf8_lossy(&out.stdout).contains(CARGO_FUZZ_VERSION));
    if installed {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION} from crates.io (about 30 s)");
    crate::run(Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())).args([
        "install",
        "cargo-fuzz",
        "--locked",
        "--version",
        CARGO_FUZZ_VERSION,
    ]))
    .context("installing cargo-fuzz; by hand: cargo install cargo-fuzz --locked")
}
