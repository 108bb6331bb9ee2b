//! The `sluice` command: runs the egress gateway agent on a node.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use sluice_agent::{
    app::{self, App, RunSettings},
    config::sources::files,
    datapath::{self, InterceptRouting},
};
use tokio::signal::unix::{signal, SignalKind};

#[global_allocator]
static ALLOCATOR: sluice_agent::allocator::Allocator = sluice_agent::allocator::Allocator;

#[derive(Parser)]
#[command(name = "sluice", version, about = "Sluice: an eBPF-accelerated egress gateway node agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: enforce egress policy in the kernel on the intercepted interfaces.
    Run(Box<RunSettings>),
    /// Validate Istio configuration files or directories as the agent would; non-zero exit on any error.
    Check(CheckArgs),
    /// Remove everything a previous agent left in the kernel: links, program, maps, policy routing.
    Cleanup(CleanupArgs),
    /// Ask the running agent what it enforces: readiness, the classifier and its interfaces, the policy's size,
    /// the proxy's listeners, rejected resources, DNS answers.
    Status(StatusArgs),
    /// Ask the running agent what a request to HOST[:PORT] (or a TLS connection naming HOST, or a TCP connection to
    /// --address) would get now: the route, the cluster and its endpoints, or the gateway's own answer (refused,
    /// redirected), without sending it.
    Routes(RoutesArgs),
    /// Watch the running agent's flow decisions as they happen: flows the kernel blackholed or denied, requests and
    /// connections the proxy forwarded, refused or denied, with the source workload when known.
    Observe(ObserveArgs),
    /// Print the version.
    Version,
}

#[derive(Args)]
struct ObserveArgs {
    /// Only flows with this verdict.
    #[arg(long, value_enum)]
    verdict: Option<ObservedVerdict>,
    /// Only flows to this host (the Host, the TLS server name, or the destination's address), exactly or as
    /// `*.example.com`.
    #[arg(long, value_name = "HOST")]
    host: Option<String>,
    /// Only flows from this source: a pod address, a workload `namespace/name`, or a namespace `namespace/`.
    #[arg(long, value_name = "SOURCE")]
    source: Option<String>,
    /// Stop after this many flows (else: until interrupted).
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// The agent's admin endpoint (its --admin-addr).
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:15000")]
    admin_addr: std::net::SocketAddr,
    /// `text`: a line a flow, for people; `json`: the agent's JSON lines as they are.
    #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
    output: Output,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ObservedVerdict {
    Forwarded,
    Refused,
    Denied,
    Blackholed,
}

#[derive(Args)]
struct CheckArgs {
    /// Files or directories of Istio configuration.
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<PathBuf>,
}

#[derive(Args)]
struct StatusArgs {
    /// The agent's admin endpoint (its --admin-addr).
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:15000")]
    admin_addr: std::net::SocketAddr,
    /// `text` for people, `json` for programs (the agent's /status as it is).
    #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
    output: Output,
}

#[derive(Args)]
struct RoutesArgs {
    /// The request's Host, with its port when not 80 (the Gateway port's, with --gateway-port); with `--protocol
    /// tls`, the ClientHello's server name (port 443 unless given); not needed with `--protocol tcp`.
    #[arg(value_name = "HOST[:PORT]")]
    host: Option<String>,
    /// What is sent: an HTTP request, a TLS connection (decided by its server name, relayed unread) or an opaque
    /// TCP connection (decided by --address, or by --gateway-port's server).
    #[arg(long, value_enum, default_value = "http")]
    protocol: RouteProtocol,
    /// The request's path.
    #[arg(long, default_value = "/")]
    path: String,
    /// Where the request is sent (its original destination): checked against the host's registered addresses as
    /// the proxy checks intercepted requests. Unset: the Host alone decides.
    #[arg(long, value_name = "IP[:PORT]")]
    address: Option<String>,
    /// The request arrives on this Gateway server port instead of being intercepted from a workload.
    #[arg(long, value_name = "PORT")]
    gateway_port: Option<u16>,
    /// The workload sending it, by its pod address (with --kube the agent knows its labels and namespace).
    #[arg(long, value_name = "IP")]
    source: Option<std::net::IpAddr>,
    /// The agent's admin endpoint (its --admin-addr).
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:15000")]
    admin_addr: std::net::SocketAddr,
    #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
    output: Output,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum RouteProtocol {
    Http,
    Tls,
    Tcp,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Args)]
struct CleanupArgs {
    /// The pin directory the agent ran with.
    #[arg(long, value_name = "DIR", default_value = datapath::DEFAULT_PIN_DIR)]
    bpffs: PathBuf,
}

fn main() -> ExitCode {
    sluice_agent::allocator::configure();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        // kube's client logs every failed request at ERROR; the agent says what failed itself, once.
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
                .unwrap_or_else(|_| "info,kube_client::client::builder=off".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Run(settings) => runtime(settings.concurrency).and_then(|rt| rt.block_on(run(*settings))),
        Command::Check(args) => check(&args.paths),
        Command::Cleanup(args) => runtime(Some(1)).and_then(|rt| rt.block_on(cleanup(&args.bpffs))),
        Command::Status(args) => status(&args),
        Command::Routes(args) => routes(&args),
        Command::Observe(args) => observe(&args),
        Command::Version => {
            // The one line this command exists to print.
            use std::io::Write;
            let _ = writeln!(std::io::stdout(), "sluice {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the agent until SIGINT or SIGTERM.
async fn run(settings: RunSettings) -> anyhow::Result<()> {
    let mut terminate = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    // SIGHUP: the access log's file is reopened (logrotate's `postrotate`), as Envoy reopens its own.
    let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            sluice_agent::telemetry::access_log::REOPEN.store(true, std::sync::atomic::Ordering::Relaxed);
            tracing::info!("SIGHUP: the access log is reopened before its next line");
        }
    });
    // The first signal starts the drain; a second cuts it short.
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let (signals, received) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let name = tokio::select! {
                Some(()) = interrupt.recv() => "SIGINT",
                Some(()) = terminate.recv() => "SIGTERM",
                else => break,
            };
            if signals.send(name).await.is_err() {
                break;
            }
        }
    });
    let app = App::start(settings).await?;
    app.run_until(received).await
}

/// The async runtime, with `concurrency` worker threads (the CPUs the agent may use, by default).
fn runtime(concurrency: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    // What the agent needs is capabilities, not uid 0: the missing ones are named (`run` and `cleanup` alike).
    app::check_capabilities()?;
    let workers = concurrency
        .or_else(|| std::thread::available_parallelism().ok().map(std::num::NonZeroUsize::get))
        .unwrap_or(2)
        .max(1);
    // One worker runs every task on the thread that drives the I/O: no hand-offs between threads.
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(workers);
        builder
    };
    builder.enable_all().build().context("starting the async runtime")
}

fn check(paths: &[PathBuf]) -> anyhow::Result<()> {
    use std::io::Write;
    let loaded = files::load(paths);
    // This command's output is its result: one line per error, then a summary.
    let mut out = std::io::stdout().lock();
    for error in &loaded.errors {
        let _ = writeln!(out, "{error}");
    }
    // Valid, but with a field that does nothing in Sluice yet: said, so that nothing is ignored in silence.
    for resource in &loaded.snapshot.resources {
        for (field, why) in sluice_agent::config::unsupported::fields(resource, false) {
            let _ = writeln!(out, "{}: {field}: not applied: {why}", resource.id());
        }
        // What Istio warns of, and takes.
        for (field, why) in sluice_agent::config::warnings::warnings(resource) {
            let _ = writeln!(out, "{}: {field}: warning: {why}", resource.id());
        }
    }
    // Where each AuthorizationPolicy applies, since that is what a reader of its YAML most often gets wrong.
    let root = loaded.snapshot.mesh.root_namespace();
    let in_kernel: std::collections::BTreeSet<_> =
        sluice_agent::policy::authorization::kernel_denials(&loaded.snapshot).into_iter().map(|d| d.policy).collect();
    for resource in &loaded.snapshot.resources {
        if let sluice_agent::config::Spec::AuthorizationPolicy(policy) = &resource.spec {
            let action = policy.action().map_or("?", |action| action.name());
            let trial = if policy.is_dry_run() { " (dry run: counted, not enforced)" } else { "" };
            let scope = policy.applies_to(resource.metadata.namespace(), root);
            let id = format!("{}/{}", resource.metadata.namespace(), resource.metadata.name);
            let kernel = if in_kernel.contains(id.as_str()) {
                "; its rules of addresses and ports alone are also refused in the kernel"
            } else {
                ""
            };
            let _ = writeln!(out, "{}: {action}{trial}, applies to {scope}{kernel}", resource.id());
        }
    }
    let _ = writeln!(
        out,
        "{} resources valid, {} errors, {} documents of other kinds not read",
        loaded.snapshot.resources.len(),
        loaded.errors.len(),
        loaded.ignored.len()
    );
    if loaded.errors.is_empty() {
        Ok(())
    } else {
        bail!("{} configuration errors", loaded.errors.len())
    }
}

/// Prints what the running agent says of itself.
fn status(args: &StatusArgs) -> anyhow::Result<()> {
    use std::io::Write;
    // Asking needs no privileges: a runtime of its own, not the agent's (which checks for root).
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting a runtime")?;
    let status = runtime.block_on(sluice_agent::telemetry::admin_client::fetch(args.admin_addr, "/status"))?;
    let shown = match args.output {
        Output::Json => serde_json::to_string_pretty(&status)? + "\n",
        Output::Text => sluice_agent::telemetry::status::text(&status, args.admin_addr),
    };
    // This command's output is its result.
    let _ = std::io::stdout().lock().write_all(shown.as_bytes());
    Ok(())
}

/// Prints what the running agent would do with a request.
fn routes(args: &RoutesArgs) -> anyhow::Result<()> {
    use std::io::Write;
    let mut query = form_urlencoded::Serializer::new(String::new());
    let protocol = match args.protocol {
        RouteProtocol::Http => "http",
        RouteProtocol::Tls => "tls",
        RouteProtocol::Tcp => "tcp",
    };
    if args.host.is_none() && args.protocol != RouteProtocol::Tcp {
        bail!("HOST is required for --protocol {protocol}");
    }
    query.append_pair("host", args.host.as_deref().unwrap_or("")).append_pair("path", &args.path);
    query.append_pair("protocol", protocol);
    if let Some(address) = &args.address {
        query.append_pair("address", address);
    }
    if let Some(port) = args.gateway_port {
        query.append_pair("gateway", &port.to_string());
    }
    if let Some(source) = args.source {
        query.append_pair("source", &source.to_string());
    }
    let target = format!("/routes?{}", query.finish());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting a runtime")?;
    let answer = runtime.block_on(sluice_agent::telemetry::admin_client::fetch(args.admin_addr, &target))?;
    let shown = match args.output {
        Output::Json => serde_json::to_string_pretty(&answer)? + "\n",
        Output::Text => sluice_agent::proxy::routing::explain::text(&answer),
    };
    // This command's output is its result.
    let _ = std::io::stdout().lock().write_all(shown.as_bytes());
    Ok(())
}

/// Prints the running agent's flow decisions as they come.
fn observe(args: &ObserveArgs) -> anyhow::Result<()> {
    use std::io::Write;
    let mut query = form_urlencoded::Serializer::new(String::new());
    if let Some(verdict) = args.verdict {
        let verdict = match verdict {
            ObservedVerdict::Forwarded => "forwarded",
            ObservedVerdict::Refused => "refused",
            ObservedVerdict::Denied => "denied",
            ObservedVerdict::Blackholed => "blackholed",
        };
        query.append_pair("verdict", verdict);
    }
    if let Some(host) = &args.host {
        query.append_pair("host", host);
    }
    if let Some(source) = &args.source {
        query.append_pair("source", source);
    }
    let target = format!("/observe?{}", query.finish());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting a runtime")?;
    let (mut shown, output) = (0u64, args.output);
    let mut out = std::io::stdout();
    runtime.block_on(sluice_agent::telemetry::admin_client::follow(args.admin_addr, &target, |flow| {
        if let Some(lost) = flow["lost"].as_u64() {
            tracing::warn!(lost, "flows lost: this client read too slowly");
            return true;
        }
        let line = match output {
            Output::Json => flow.to_string() + "\n",
            Output::Text => sluice_agent::telemetry::flows::text(&flow),
        };
        // This command's output is its result; a closed pipe (`| head`) ends it.
        if out.write_all(line.as_bytes()).and_then(|()| out.flush()).is_err() {
            return false;
        }
        shown += 1;
        args.count.is_none_or(|count| shown < count)
    }))
}

async fn cleanup(bpffs: &std::path::Path) -> anyhow::Result<()> {
    let routing = InterceptRouting::connect().context("connecting to rtnetlink")?;
    app::remove_all(bpffs, &routing).await
}
