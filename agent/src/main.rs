//! The `sluice` command: runs the egress gateway agent on a node.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use ipnet::IpNet;
use sluice_agent::allocator::transient;
use sluice_agent::{
    config::{
        resolver::{self, DnsResolver, Resolved},
        sources::{files, kubernetes, watch},
        store::Store,
        workloads::Workloads,
        Snapshot,
    },
    datapath::{self, Datapath, InterceptRouting},
    policy::{
        self,
        bindings::Bindings,
        compile::{self, NodeSettings},
        routes::{HostVerify, ProxySettings},
        BlackholeAction, L4Rule, OutboundMode,
    },
    proxy::{
        self,
        gateway_listeners::GatewayListeners,
        http::{HttpProxy, Limits, Listener},
        transparent_listener::TransparentListener,
    },
    telemetry::{self, config_dump, requests::AccessLogFormat},
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
    Run(Box<RunArgs>),
    /// Validate Istio configuration files or directories as the agent would; non-zero exit on any error.
    Check(CheckArgs),
    /// Remove everything a previous agent left in the kernel: links, program, maps, policy routing.
    Cleanup(CleanupArgs),
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
    /// Istio configuration: YAML (multi-document) or JSON files, or directories of them. Repeatable.
    #[arg(long = "config", value_name = "PATH")]
    config: Vec<PathBuf>,
    /// What happens to traffic no rule allows: passes (ALLOW_ANY) or is blackholed in the kernel
    /// (REGISTRY_ONLY). Overrides the mesh config's outboundTrafficPolicy.mode; Istio's default is ALLOW_ANY.
    #[arg(long, value_enum, value_name = "MODE")]
    outbound_traffic_policy: Option<OutboundMode>,
    /// What the kernel does with blackholed packets: drop them (clients time out) or reject them (TCP RST,
    /// ICMP administratively prohibited: clients fail at once).
    #[arg(long, value_enum, default_value = "drop")]
    blackhole: BlackholeAction,
    /// A destination allowed at L4: ADDR[/LEN]:PORT/PROTO, e.g. 203.0.113.10:443/tcp or [2001:db8::/64]:53/udp.
    /// Repeatable.
    #[arg(long = "allow", value_name = "ADDR[/LEN]:PORT/PROTO")]
    allow: Vec<L4Rule>,
    /// A range always allowed, any protocol and port (cluster pod and service ranges, DNS servers). Repeatable.
    #[arg(long = "allow-cidr", value_name = "CIDR", value_parser = parse_cidr)]
    allow_cidr: Vec<IpNet>,
    /// A TCP port whose traffic, to any destination not allowed above, is handed to the proxy. Repeatable.
    #[arg(long = "intercept-port", value_name = "PORT")]
    intercept_port: Vec<u16>,
    /// The transparent proxy's listener port.
    #[arg(long, value_name = "PORT", default_value_t = proxy::transparent_listener::DEFAULT_PORT)]
    proxy_port: u16,
    /// Where Prometheus scrapes `/stats/prometheus`.
    #[arg(long, value_name = "ADDR:PORT", default_value = "0.0.0.0:15090")]
    metrics_addr: SocketAddr,
    /// Also read the Istio configuration from Kubernetes (in-cluster config, or KUBECONFIG): watchers on
    /// ServiceEntry, VirtualService, Gateway, DestinationRule, Sidecar and the `istio` mesh ConfigMap.
    #[arg(long)]
    kube: bool,
    /// With --kube: only this namespace's Istio resources (all namespaces by default).
    #[arg(long, value_name = "NAMESPACE")]
    namespace: Option<String>,
    /// With --kube: the namespace of the `istio` ConfigMap.
    #[arg(long, value_name = "NAMESPACE", default_value = "istio-system")]
    mesh_namespace: String,
    /// This agent's labels, for Gateway selectors (`k=v,k=v`; in a cluster, the pod's labels).
    #[arg(long, value_name = "K=V,...", value_parser = parse_labels, default_value = "istio=egressgateway")]
    gateway_labels: std::collections::BTreeMap<String, String>,
    /// DNS server for ServiceEntries resolved by DNS (port 53). Repeatable; the system's resolvers by default.
    #[arg(long = "dns-server", value_name = "IP")]
    dns_server: Vec<std::net::IpAddr>,
    /// Where `/healthz/ready` answers: 200 once the datapath is attached and, with --kube, Kubernetes is synced.
    #[arg(long, value_name = "ADDR:PORT", default_value = "0.0.0.0:15021")]
    readiness_addr: SocketAddr,
    /// Where the admin endpoints (`/config_dump`, `/ready`) listen; keep it on loopback.
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    /// Directory on a bpf filesystem where the maps, program and links are pinned.
    #[arg(long, value_name = "DIR", default_value = datapath::DEFAULT_PIN_DIR)]
    bpffs: PathBuf,
    /// On exit, remove everything from the kernel (by default the last policy stays enforced: fail closed).
    #[arg(long)]
    cleanup_on_exit: bool,
    /// This gateway's own Service (its FQDN), as the workloads' mesh routes name it: a route to it continues in
    /// the gateway context in process (two-hop egress on one node). Repeatable.
    #[arg(
        long = "gateway-service",
        value_name = "HOST",
        default_value = "istio-egressgateway.istio-system.svc.cluster.local"
    )]
    gateway_service: Vec<String>,
    /// The namespace this gateway runs in (in a cluster, its pod's): on its Gateway ports it sees what is
    /// exported there (ServiceEntries, VirtualServices, DestinationRules), as an Istio gateway does. Unset: all.
    #[arg(long, value_name = "NAMESPACE", env = "POD_NAMESPACE")]
    gateway_namespace: Option<String>,
    /// What becomes of an intercepted HTTP request whose Host is registered at other addresses than the one the
    /// client connected to (domain fronting): refused (421), routed to the host's own addresses, or trusted.
    #[arg(long, value_enum, default_value = "strict")]
    host_verify: HostVerify,
    /// Worker threads for the proxy and the agent's tasks (Envoy's --concurrency): by default the CPUs the
    /// agent may run on (its affinity and cgroup CPU limit). With one, the agent's tasks and the proxy share one
    /// thread (a policy being written to the kernel holds requests back while it is written).
    #[arg(long, value_name = "N")]
    concurrency: Option<usize>,
    /// A port for clients that name the proxy in HTTP_PROXY / HTTPS_PROXY: absolute-form HTTP requests are routed
    /// as intercepted ones, and `CONNECT host:port` tunnels are admitted by the same registry (e.g. 3128).
    #[arg(long, value_name = "PORT")]
    forward_proxy_port: Option<u16>,
    /// The address the proxy's upstream connections leave from (one per IP family; the node's fixed egress IP,
    /// as firewalls outside the cluster expect). Repeatable.
    #[arg(long = "upstream-source-address", value_name = "IP")]
    upstream_source_address: Vec<std::net::IpAddr>,
    /// Client connections the proxy holds open at once (intercepted and on Gateway ports); more are reset.
    #[arg(long, value_name = "N", default_value_t = 16384)]
    max_connections: usize,
    /// How long a client may take to send a request's headers before its connection is closed.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = sluice_agent::config::fields::parse_duration)]
    request_headers_timeout: std::time::Duration,
    /// The access log on standard output: Envoy's default text line or one JSON object per request, or none.
    #[arg(long, value_enum, default_value = "text")]
    access_log_format: AccessLogFormat,
}

#[derive(Args)]
struct CheckArgs {
    /// Files or directories of Istio configuration.
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<PathBuf>,
}

#[derive(Args)]
struct CleanupArgs {
    /// The pin directory the agent ran with.
    #[arg(long, value_name = "DIR", default_value = datapath::DEFAULT_PIN_DIR)]
    bpffs: PathBuf,
}

const RUN_HELP: &str = "\
Running on a real node:
  Sluice runs as root (CAP_BPF and CAP_NET_ADMIN) on each gateway node, usually as a DaemonSet with
  hostNetwork. Name every interface that egress traffic enters the node on with --intercept; the classifier
  is attached to its TC ingress hook (TCX, ahead of a CNI's own programs, which still run for the traffic
  Sluice passes). In REGISTRY_ONLY, list traffic to the node itself and to in-cluster ranges with --allow-cidr.

  sluice run --intercept eth1 --outbound-traffic-policy REGISTRY_ONLY \\
      --allow-cidr 10.0.0.0/8 --allow 203.0.113.10:443/tcp --intercept-port 80

  The maps, program and links are pinned under --bpffs: when the agent stops or dies, the kernel keeps
  enforcing the last policy, and the next agent adopts the pins without a gap. `sluice cleanup` (or
  --cleanup-on-exit) removes them, and the policy routing for intercepted traffic with them.";

fn parse_labels(text: &str) -> Result<std::collections::BTreeMap<String, String>, String> {
    text.split(',')
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
            _ => Err(format!("'{pair}' is not a label (expected key=value)")),
        })
        .collect()
}

fn parse_cidr(text: &str) -> Result<IpNet, String> {
    policy::l4::parse_net(text).ok_or_else(|| format!("'{text}' is not an IP address or CIDR"))
}

fn main() -> ExitCode {
    sluice_agent::allocator::configure();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Run(args) => runtime(args.concurrency).and_then(|rt| rt.block_on(run(*args))),
        Command::Check(args) => check(&args.paths),
        Command::Cleanup(args) => runtime(Some(1)).and_then(|rt| rt.block_on(cleanup(&args.bpffs))),
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

/// The async runtime, with `concurrency` worker threads (the CPUs the agent may use, by default).
fn runtime(concurrency: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    if !nix::unistd::geteuid().is_root() {
        bail!("sluice needs root (CAP_BPF and CAP_NET_ADMIN to load and attach eBPF): run it as root");
    }
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

async fn run(args: RunArgs) -> anyhow::Result<()> {
    // Listeners first: a port in use fails before anything touches the kernel.
    let metrics_listener = listen(args.metrics_addr, "metrics", "--metrics-addr").await?;
    let admin_listener = listen(args.admin_addr, "admin", "--admin-addr").await?;
    let readiness_listener = listen(args.readiness_addr, "readiness", "--readiness-addr").await?;
    let forward_proxy = match args.forward_proxy_port {
        Some(port) => Some(proxy::gateway_listeners::bind(port).map_err(|error| {
            anyhow::anyhow!("binding the forward-proxy listener on port {port}: {error} (see --forward-proxy-port)")
        })?),
        None => None,
    };
    let intercepting = !args.intercept_port.is_empty();
    let transparent = if intercepting {
        let listener = TransparentListener::bind(args.proxy_port).map_err(|error| {
            anyhow::anyhow!("binding the transparent listener on port {}: {error} (see --proxy-port)", args.proxy_port)
        })?;
        Some(Arc::new(listener))
    } else {
        None
    };
    let node = NodeSettings {
        mode: args.outbound_traffic_policy,
        blackhole: args.blackhole,
        allow_cidrs: args.allow_cidr,
        rules: args.allow,
        intercept_ports: args.intercept_port,
        proxy_port: if intercepting { args.proxy_port } else { 0 },
    };
    // One resolver (and one cache) for the ServiceEntries' names and the forward proxy's lookups.
    let resolver = Arc::new(DnsResolver::new(&args.dns_server).map_err(anyhow::Error::msg)?);
    let mut control = Control::new(args.config.clone(), node, resolver.clone());
    control.labels = args.gateway_labels.clone();
    control.proxy.own_services = args.gateway_service.clone();
    control.proxy.host_verify = args.host_verify;
    control.proxy.gateway_namespace = args.gateway_namespace.clone();
    let (kube_sender, mut kube_changes) = tokio::sync::watch::channel(None);
    let workloads = Arc::new(arc_swap::ArcSwap::from_pointee(Workloads::default()));
    // Rung when the pods change: the workloads whose Sidecar's mode differs may have too.
    let pods_changed = Arc::new(tokio::sync::Notify::new());
    if args.kube {
        let client = kube::Client::try_default()
            .await
            .context("connecting to Kubernetes (in-cluster config or KUBECONFIG; see --kube)")?;
        let scope =
            kubernetes::Scope { namespace: args.namespace.clone(), mesh_namespace: args.mesh_namespace.clone() };
        tokio::spawn(kubernetes::watch(client.clone(), scope, kube_sender));
        // The pods behind the gateway, by address: the sources of requests.
        let (pods_sender, mut pods) = tokio::sync::watch::channel(Arc::new(Workloads::default()));
        tokio::spawn(kubernetes::watch_pods(client, pods_sender));
        let (known, changed) = (workloads.clone(), pods_changed.clone());
        tokio::spawn(async move {
            while pods.changed().await.is_ok() {
                let current = pods.borrow_and_update().clone();
                tracing::debug!(addresses = current.len(), "workloads updated");
                known.store(current);
                changed.notify_one();
            }
        });
        control.kube = Some(kube_changes.clone());
    }
    // Watched before the first read, so a change made while the agent starts is not missed.
    let (_watch, mut changes) = if args.config.is_empty() {
        (None, tokio::sync::mpsc::channel(1).1)
    } else {
        let (watch, changes) = watch::watch(&args.config).map_err(anyhow::Error::msg)?;
        (Some(watch), changes)
    };
    let snapshot = control.load();
    let mut refresh = control.resolve().await.1;
    let policy = control.policy(&snapshot);

    Datapath::check_interfaces(&args.intercept)?;
    let mut datapath = Datapath::load(&args.bpffs)?;
    let routing = InterceptRouting::connect().context("connecting to rtnetlink")?;
    if intercepting {
        routing.install().await?;
    }
    datapath.apply(&policy)?;
    for interface in &args.intercept {
        datapath.attach(interface)?;
    }
    let detached = datapath.detach_others()?;
    tracing::info!(
        interfaces = ?datapath.attached(),
        adopted = ?datapath.adopted(),
        detached = ?detached,
        mode = ?policy.mode,
        blackhole = ?policy.blackhole,
        rules = policy.rules.len(),
        allow_cidrs = policy.allow_cidrs.len(),
        intercept_ports = ?policy.intercept_ports,
        metrics = %args.metrics_addr,
        bpffs = %args.bpffs.display(),
        "datapath attached"
    );

    let counters = datapath.counters();
    let metrics = telemetry::metrics::registry(counters.clone(), datapath.blackholed(), args.access_log_format);
    let bindings = control.bind(&snapshot);
    let routes = Arc::new(arc_swap::ArcSwap::from_pointee(control.proxy_policy(&snapshot, &bindings)));
    metrics.config_generation.set(1);
    let (dump, dump_reader) = tokio::sync::watch::channel(Arc::new(control.dump(1, policy, &bindings)));
    drop((bindings, snapshot));
    sluice_agent::allocator::release_freed_memory();
    metrics.set_rejected(control.rejected());
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(events) = datapath.take_events() {
        tasks.spawn(telemetry::blocked_flows::watch(events, metrics.blocked_flows.clone()));
    }
    tasks.spawn(telemetry::server::serve_metrics(metrics_listener, metrics.registry.clone()));
    tasks.spawn(telemetry::server::serve_admin(admin_listener, dump_reader));
    // Ready once attached, and with --kube once every kind has been listed.
    let (ready, ready_reader) = tokio::sync::watch::channel(!args.kube || kube_changes.borrow().is_some());
    tasks.spawn(telemetry::server::serve_readiness(readiness_listener, ready_reader));
    let limits = Limits {
        max_connections: args.max_connections,
        request_headers_timeout: args.request_headers_timeout,
        source: proxy::tcp::SourceAddresses::from_list(&args.upstream_source_address),
    };
    let http = Arc::new(
        HttpProxy::new(routes.clone(), metrics.requests.clone(), limits)
            .with_resolver(resolver)
            .with_workloads(workloads.clone()),
    );
    tasks.spawn(HttpProxy::keep_a_timer_due());
    for listener in forward_proxy.into_iter().flatten() {
        tasks.spawn(proxy::gateway_listeners::accept(listener, Listener::Forward, http.clone()));
    }
    if let Some(listener) = transparent {
        tasks.spawn(proxy::intercepted::serve(listener, http.clone(), routes.clone()));
    }
    let mut gateways = GatewayListeners::new(http);
    gateways.reconcile(&routes.load().gateway_ports());
    let mut enforced = Enforced { datapath, routes, gateways, metrics, dump, workloads, sources: None };
    enforced.apply_sources();

    let mut terminate = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {
                tracing::info!(signal = "SIGINT", "stopping");
                break;
            }
            _ = terminate.recv() => {
                tracing::info!(signal = "SIGTERM", "stopping");
                break;
            }
            Ok(()) = kube_changes.changed(), if args.kube => {
                let _ = ready.send(true);
                refresh = reload(&mut control, &mut enforced).await;
            }
            Some(()) = changes.recv() => refresh = reload(&mut control, &mut enforced).await,
            _ = pods_changed.notified(), if args.kube => enforced.apply_sources(),
            _ = tokio::time::sleep(refresh) => {
                let (changed, next) = control.resolve().await;
                refresh = next;
                if changed {
                    enforced.apply(&control, control.snapshot());
                }
            }
        }
    }
    tasks.abort_all();
    for total in counters.read() {
        tracing::info!(
            verdict = total.verdict.label(),
            packets = total.packets,
            bytes = total.bytes,
            "datapath counters"
        );
    }
    drop(enforced);
    if args.cleanup_on_exit {
        remove_all(&args.bpffs, &routing).await
    } else {
        tracing::info!(bpffs = %args.bpffs.display(), "policy stays enforced in the kernel (sluice cleanup removes it)");
        Ok(())
    }
}

/// What the agent knows between events: the configuration in force, the DNS answers for it, and the node's
/// own settings; everything the policy is compiled from.
struct Control {
    paths: Vec<PathBuf>,
    node: NodeSettings,
    store: Store,
    resolver: Arc<DnsResolver>,
    resolved: Resolved,
    /// What the last load rejected.
    errors: Vec<sluice_agent::config::ConfigError>,
    /// The names the configuration resolves by DNS.
    names: std::collections::BTreeSet<String>,
    /// The Kubernetes source's latest full set, once it has listed everything.
    kube: Option<tokio::sync::watch::Receiver<Option<Arc<kubernetes::Documents>>>>,
    /// This agent's labels, which Gateway selectors are matched against.
    labels: std::collections::BTreeMap<String, String>,
    /// The proxy's node settings (the mode is the datapath policy's).
    proxy: ProxySettings,
    /// What the proxy's clusters count at run time, carried from one compiled policy to the next.
    clusters: sluice_agent::policy::clusters::ClusterStates,
    /// The fields not applied that have been warned of (`Kind ns/name path`), so each is warned of once.
    warned: std::collections::HashSet<String>,
}

impl Control {
    fn new(paths: Vec<PathBuf>, node: NodeSettings, resolver: Arc<DnsResolver>) -> Control {
        Control {
            paths,
            node,
            store: Store::default(),
            resolver,
            resolved: Resolved::new(),
            errors: Vec::new(),
            names: Default::default(),
            kube: None,
            labels: Default::default(),
            proxy: ProxySettings::default(),
            clusters: Default::default(),
            warned: Default::default(),
        }
    }

    /// Reads the configuration files again, with what Kubernetes holds; a rejected resource keeps its last good
    /// version. Returns the configuration now in force, typed, to compile from (the store holds it compactly).
    fn load(&mut self) -> Snapshot {
        let mut loaded = transient(|| files::load(&self.paths));
        if let Some(kube) = self.kube.as_ref().and_then(|kube| kube.borrow().clone()) {
            loaded.extend(transient(|| kube.load()));
        }
        report(&loaded);
        for id in self.store.update(&loaded).kept {
            tracing::warn!(resource = %id, "keeping the last good version of a rejected resource");
        }
        self.errors = std::mem::take(&mut loaded.errors);
        // The resources as read are dropped before the store's are read back: not both at once.
        drop(loaded);
        let snapshot = self.snapshot();
        self.names = resolver::names(&snapshot);
        for resource in &snapshot.resources {
            for (field, why) in sluice_agent::config::unsupported::fields(resource) {
                let id = resource.id();
                if self.warned.insert(format!("{id} {field}")) {
                    tracing::warn!(resource = %id, %field, reason = why, "field not applied");
                }
            }
        }
        snapshot
    }

    /// Looks up the names the configuration resolves by DNS: whether any answer changed, and when to look again.
    async fn resolve(&mut self) -> (bool, std::time::Duration) {
        let (resolved, refresh) = self.resolver.resolve(&self.names, &self.resolved).await;
        let changed = resolved != self.resolved;
        if changed {
            tracing::info!(
                hosts = resolved.len(),
                addresses = resolved.values().map(Vec::len).sum::<usize>(),
                "DNS answers changed"
            );
        }
        self.resolved = resolved;
        (changed, refresh)
    }

    fn policy(&self, snapshot: &Snapshot) -> sluice_agent::policy::DatapathPolicy {
        compile::datapath_policy(snapshot, &self.resolved, &self.node)
    }

    /// The configuration in force, typed, read back from the store: held only while compiling, so apart from
    /// what stays (`transient`).
    fn snapshot(&self) -> Snapshot {
        transient(|| self.store.snapshot())
    }

    /// The Gateways that select this agent, and what each context's VirtualServices are: held only while
    /// compiling, so apart from what stays (`transient`).
    fn bind(&self, snapshot: &Snapshot) -> Bindings {
        transient(|| sluice_agent::policy::bindings::bind(snapshot, &self.labels))
    }

    fn proxy_policy(&self, snapshot: &Snapshot, bindings: &Bindings) -> sluice_agent::policy::routes::ProxyPolicy {
        let settings = ProxySettings { mode: compile::mesh_mode(snapshot, &self.node), ..self.proxy.clone() };
        sluice_agent::policy::routes::proxy_policy(snapshot, &self.resolved, bindings, &settings, &self.clusters)
    }

    fn rejected(&self) -> impl Iterator<Item = &str> {
        self.errors.iter().filter_map(|e| e.resource.as_deref())
    }

    fn dump(
        &self,
        generation: u64,
        policy: sluice_agent::policy::DatapathPolicy,
        bindings: &Bindings,
    ) -> config_dump::Dump {
        config_dump::Dump::new(generation, self.store.stored(), &self.errors, policy, bindings)
    }
}

/// Binds one of the agent's HTTP listeners; a port in use is named with the flag that moves it.
async fn listen(addr: SocketAddr, what: &str, flag: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.map_err(|error| {
        anyhow::anyhow!("binding the {what} listener on {addr}: {error} (is another sluice running? see {flag})")
    })
}

/// Reads the configuration again (files and Kubernetes), resolves its names and applies the result; returns
/// when to look the names up again.
async fn reload(control: &mut Control, enforced: &mut Enforced) -> std::time::Duration {
    let snapshot = control.load();
    enforced.metrics.set_rejected(control.rejected());
    let refresh = control.resolve().await.1;
    enforced.apply(control, snapshot);
    refresh
}

/// Where the policy is in force: the kernel, the proxy's routes and Gateway listeners, and what reports on them.
struct Enforced {
    datapath: Datapath,
    routes: Arc<arc_swap::ArcSwap<sluice_agent::policy::routes::ProxyPolicy>>,
    gateways: GatewayListeners,
    metrics: telemetry::metrics::Metrics,
    dump: tokio::sync::watch::Sender<Arc<config_dump::Dump>>,
    workloads: Arc<arc_swap::ArcSwap<Workloads>>,
    /// The per-workload modes the kernel holds; `None` until written (a previous agent's may be pinned there).
    sources: Option<std::collections::BTreeMap<std::net::IpAddr, OutboundMode>>,
}

impl Enforced {
    /// Compiles and applies the policy to the datapath, then the proxy; one the datapath refuses leaves both as
    /// they are. The typed configuration is dropped then, and what compiling freed returned to the system.
    fn apply(&mut self, control: &Control, snapshot: Snapshot) {
        let policy = control.policy(&snapshot);
        match self.datapath.apply(&policy) {
            Ok(()) => {
                let bindings = control.bind(&snapshot);
                let routes = control.proxy_policy(&snapshot, &bindings);
                self.gateways.reconcile(&routes.gateway_ports());
                self.routes.store(Arc::new(routes));
                self.apply_sources();
                let generation = self.metrics.config_generation.inc() + 1;
                tracing::info!(
                    generation,
                    mode = ?policy.mode,
                    rules = policy.rules.len(),
                    gateway_ports = ?self.gateways.ports(),
                    "policy applied"
                );
                let _ = self.dump.send(Arc::new(control.dump(generation as u64, policy, &bindings)));
            }
            Err(error) => {
                tracing::error!(error = %error, "the new policy was not applied; the previous one stays in force")
            }
        }
        drop(snapshot);
        sluice_agent::allocator::release_freed_memory();
    }
}

impl Enforced {
    /// Tells the kernel which workloads' mode differs from the policy's (their Sidecars'), by address.
    fn apply_sources(&mut self) {
        let exceptions = self.routes.load().sidecars.exceptions(&self.workloads.load());
        if self.sources.as_ref() == Some(&exceptions) {
            return;
        }
        match self.datapath.set_source_modes(&exceptions) {
            Ok(()) => {
                tracing::info!(workloads = exceptions.len(), "workloads with their own outbound mode applied");
                self.sources = Some(exceptions);
            }
            Err(error) => tracing::error!(%error, "the workloads' own outbound modes were not applied"),
        }
    }
}

/// Logs what loading the configuration rejected and ignored; the rest is applied.
fn report(loaded: &files::Loaded) {
    for error in &loaded.errors {
        tracing::warn!(error = %error, "configuration rejected");
    }
    for ignored in &loaded.ignored {
        tracing::debug!(document = %ignored, "not read: not a kind Sluice uses");
    }
    tracing::info!(
        resources = loaded.snapshot.resources.len(),
        rejected = loaded.errors.len(),
        mesh_mode = ?loaded.snapshot.mesh.outbound_mode(),
        "configuration loaded"
    );
}

fn check(paths: &[PathBuf]) -> anyhow::Result<()> {
    use std::io::Write;
    let loaded = files::load(paths);
    // This command's output is its result: one line per error, then a summary.
    let mut out = std::io::stdout().lock();
    for error in &loaded.errors {
        let _ = writeln!(out, "{error}");
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

async fn cleanup(bpffs: &std::path::Path) -> anyhow::Result<()> {
    let routing = InterceptRouting::connect().context("connecting to rtnetlink")?;
    remove_all(bpffs, &routing).await
}

async fn remove_all(bpffs: &std::path::Path, routing: &InterceptRouting) -> anyhow::Result<()> {
    let removed = datapath::cleanup(bpffs)?;
    routing.remove().await?;
    tracing::info!(bpffs = %bpffs.display(), ?removed, "removed from the kernel");
    Ok(())
}
