//! `cargo xtask`: installs the toolchain, builds the eBPF object and the agent, runs the sandbox and the tests.

mod bench;
mod build;
mod deps;
mod fuzz;
mod image;
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
    /// Mixed traffic through the agent for --minutes, with configuration churn, changing DNS answers and restarts;
    /// prints failures by cause and the agent's memory, descriptors, threads and series over time (as root).
    Soak {
        /// How long it runs (`cargo xtask test` runs it for one).
        #[arg(long, default_value_t = 30)]
        minutes: u64,
    },
    /// Build the release agent into an OCI image (from scratch: the binary and the libraries it links), written as
    /// an OCI layout and archive under target/image; prints its reference (the DaemonSet's `image:`) and digest.
    Image {
        /// Package this binary instead of building the release agent.
        #[arg(long, value_name = "PATH")]
        binary: Option<std::path::PathBuf>,
        /// Where the layout and archive are written.
        #[arg(long, value_name = "DIR")]
        out: Option<std::path::PathBuf>,
    },
    /// Run the fuzz targets of fuzz/ (all, or one), each for --time seconds.
    Fuzz {
        /// One target (configuration, first_bytes, routing, access_log, datapath_event, upstream_response); all by default.
        target: Option<String>,
        /// How long each target runs, in seconds.
        #[arg(long, default_value_t = 60)]
        time: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Deps => deps::install(),
        Command::Build { release } => deps::install().and_then(|()| build::all(build::profile(release))),
        Command::Run => sandbox::run(),
        Command::Test => test::run(),
        Command::Bench => bench::run(),
        Command::Fuzz { target, time } => fuzz_targets(target, time),
        Command::Soak { minutes } => test::soak(minutes),
        Command::Image { binary, out } => image::run(binary, out),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn fuzz_targets(target: Option<String>, seconds: u64) -> anyhow::Result<()> {
    let all = fuzz::targets()?;
    let targets = match target {
        Some(target) if !all.contains(&target) => {
            anyhow::bail!("no fuzz target {target}: there are {}", all.join(", "))
        }
        Some(target) => vec![target],
        None => all,
    };
    let runs = fuzz::run(&targets, seconds, fuzz::Build::Optimized)?;
    fuzz::report(&runs);
    Ok(())
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
