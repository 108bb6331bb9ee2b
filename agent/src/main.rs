//! The `sluice` command: runs the egress gateway agent on a node.

mod datapath;
mod policy;
mod telemetry;

use std::{net::SocketAddr, process::ExitCode, sync::Arc};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use ipnet::IpNet;
use tokio::signal::unix::{signal, SignalKind};

use datapath::Datapath;
use policy::{DatapathPolicy, L4Rule, OutboundMode};

#[derive(Parser)]
#[command(name = "sluice", version, about = "Sluice: an eBPF-accelerated egress gateway node agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: enforce egress policy in the kernel on the intercepted interfaces.
    Run(RunArgs),
    /// Print the version.
    Version,
}

#[derive(Args)]
#[command(after_long_help = RUN_HELP)]
struct RunArgs {
    /// Interface whose incoming traffic is egress to police (pod veths, a tunnel device, or the NIC that
    /// routed traffic arrives on). Repeatable.
    #[arg(long = "intercept", value_name = "IFACE", required = true)]
    intercept: Vec<String>,
    /// What happens to traffic no rule allows: passes (ALLOW_ANY, Istio's default) or is dropped in the
    /// kernel (REGISTRY_ONLY).
    #[arg(long, value_enum, value_name = "MODE", default_value = "ALLOW_ANY")]
    outbound_traffic_policy: OutboundMode,
    /// A destination allowed at L4: ADDR[/LEN]:PORT/PROTO, e.g. 203.0.113.10:443/tcp or [2001:db8::/64]:53/udp.
    /// Repeatable.
    #[arg(long = "allow", value_name = "ADDR[/LEN]:PORT/PROTO")]
    allow: Vec<L4Rule>,
    /// A range always allowed, any protocol and port (cluster pod and service ranges, DNS servers). Repeatable.
    #[arg(long = "allow-cidr", value_name = "CIDR", value_parser = parse_cidr)]
    allow_cidr: Vec<IpNet>,
    /// Where Prometheus scrapes `/stats/prometheus`.
    #[arg(long, value_name = "ADDR:PORT", default_value = "0.0.0.0:15090")]
    metrics_addr: SocketAddr,
}

const RUN_HELP: &str = "\
Running on a real node:
  Sluice runs as root (CAP_BPF and CAP_NET_ADMIN) on each gateway node, usually as a DaemonSet with
  hostNetwork. Name every interface that egress traffic enters the node on with --intercept; the classifier
  is attached to its TC ingress hook (TCX, so a CNI's own programs keep running). Traffic to the node itself
  and to in-cluster ranges should be listed with --allow-cidr when running REGISTRY_ONLY.

  sluice run --intercept eth1 --outbound-traffic-policy REGISTRY_ONLY \\
      --allow-cidr 10.0.0.0/8 --allow 203.0.113.10:443/tcp

  Stopping the agent (SIGINT or SIGTERM) detaches the classifier from every interface.";

fn parse_cidr(text: &str) -> Result<IpNet, String> {
    policy::l4::parse_net(text).ok_or_else(|| format!("'{text}' is not an IP address or CIDR"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Run(args) => run(args),
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

fn run(args: RunArgs) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("sluice run needs root (CAP_BPF and CAP_NET_ADMIN to load and attach eBPF): run it as root");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run_agent(args))
}

async fn run_agent(args: RunArgs) -> anyhow::Result<()> {
    // Bind first: a port in use fails before anything touches the kernel.
    let metrics = tokio::net::TcpListener::bind(args.metrics_addr).await.map_err(|error| {
        anyhow::anyhow!(
            "binding the metrics listener on {}: {error} (is another sluice running? see --metrics-addr)",
            args.metrics_addr
        )
    })?;
    let policy = DatapathPolicy { mode: args.outbound_traffic_policy, allow_cidrs: args.allow_cidr, rules: args.allow };
    let mut datapath = Datapath::load()?;
    datapath.apply(&policy)?;
    for interface in &args.intercept {
        datapath.attach(interface)?;
    }
    tracing::info!(
        interfaces = ?datapath.attached(),
        mode = ?policy.mode,
        rules = policy.rules.len(),
        allow_cidrs = policy.allow_cidrs.len(),
        metrics = %args.metrics_addr,
        "datapath attached"
    );
    let counters = datapath.counters();
    let registry = Arc::new(telemetry::metrics::registry(counters.clone()));
    let server = tokio::spawn(telemetry::server::serve_metrics(metrics, registry));

    let mut terminate = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!(signal = "SIGINT", "stopping"),
        _ = terminate.recv() => tracing::info!(signal = "SIGTERM", "stopping"),
    }
    server.abort();
    for total in counters.read() {
        tracing::info!(
            verdict = total.verdict.label(),
            packets = total.packets,
            bytes = total.bytes,
            "datapath counters"
        );
    }
    drop(datapath);
    tracing::info!("datapath detached");
    Ok(())
}
