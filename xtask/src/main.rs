//! `cargo xtask`: installs the toolchain, builds the eBPF object and the agent, runs the sandbox and the tests.

mod bench;
mod build;
mod deps;
mod sandbox;
mod test;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Sluice's build, run and test commands")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what building and testing need (Debian's BPF Rust toolchain, bpf-linker, test peers). Idempotent.
    Deps,
    /// Build the eBPF object, then the agent with the object embedded.
    Build {
        /// Build the agent with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Bring up a local sandbox (workload, gateway and internet namespaces) with the agent enforcing egress
    /// policy in it; Ctrl-C tears it all down.
    Run,
    /// Formatting, clippy with warnings as errors, unit and integration tests (as root).
    Test,
    /// Benchmarks, printed as tables (as root).
    Bench,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Deps => deps::install(),
        Command::Build { release } => deps::install().and_then(|()| build::all(build::profile(release))),
        Command::Run => sandbox::run(),
        Command::Test => test::run(),
        Command::Bench => bench::run(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (xtask's parent directory).
fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

/// Runs `command`, echoing it first; fails naming it when it fails.
fn run(command: &mut std::process::Command) -> anyhow::Result<()> {
    eprintln!("xtask: running {}", shown(command));
    let status = command.status().map_err(|e| anyhow::anyhow!("could not start {}: {e}", shown(command)))?;
    anyhow::ensure!(status.success(), "{} failed with {status}", shown(command));
    Ok(())
}

fn shown(command: &std::process::Command) -> String {
    let mut text = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}
