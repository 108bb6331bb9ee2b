//! HTTP/1.1 keep-alive through the egress topology, side by side: no proxy (the limit), Sluice (intercepted
//! transparently), nginx (`proxy_pass` with upstream keepalive), HAProxy and Squid (reverse proxy, no cache),
//! each proxy alone on CPU 1; the load generator (wrk) and the origin (nginx) share CPU 0.

use std::{
    net::SocketAddr,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use sluice_tests::{
    peers::{wait_for_tcp, Nginx},
    process::Process,
    topology::{GATEWAY_WORKLOAD_ADDR, GATEWAY_WORKLOAD_IFACE, SERVER_A},
    Agent, Netns, Topology,
};

const DURATION: &str = "5s";
const CONNECTIONS: &str = "32";
const PROXY_CPU: &str = "1";
const CLIENT_CPU: &str = "0";
/// Hosts the Sluice run registers besides the one it serves: the RSS figure is for a 100-host configuration.
const EXTRA_HOSTS: usize = 99;

pub struct Run {
    pub name: &'static str,
    pub requests_per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// CPU time of the proxy's processes per request.
    pub cpu_us_per_request: Option<f64>,
    /// The part of it spent in user space (the rest is the kernel's: system calls and the TCP/IP stack).
    pub user_us_per_request: Option<f64>,
    pub rss_kib: Option<u64>,
}

type Measured = fn() -> anyhow::Result<Run>;

/// The configurations compared, in the table's order: the limit, Sluice intercepting transparently (the origin
/// registered, and not: ALLOW_ANY's passthrough, Istio's default mode) and Sluice on a Gateway port (as the peers are reached: at the proxy's own address), then the peers.
const CONFIGURATIONS: [(&str, Measured); 14] = [
    ("direct", direct),
    ("sluice", sluice),
    ("sluice-hyper-client", sluice_hyper_client),
    ("sluice-log", sluice_logging),
    ("sluice-log-filtered", sluice_logging_errors_only),
    ("sluice-authz", sluice_authorization),
    ("sluice-passthrough", sluice_passthrough),
    ("sluice-gateway", sluice_gateway),
    ("hyper-forwarder", hyper_forwarder),
    ("nginx", nginx),
    ("nginx-log", nginx_logging),
    ("haproxy", haproxy),
    ("haproxy-log", haproxy_logging),
    ("squid", squid),
];

/// The peers Sluice is compared with.
pub const PEERS: [&str; 3] = ["nginx", "haproxy", "squid"];

/// Rounds of the whole comparison: this machine's speed drifts by tens of percent over minutes, so every
/// configuration is measured once per round, in turn, and each figure is the median of its rounds.
pub const ROUNDS: usize = 3;

/// A configuration compared: its key (what `sluice-bench SECTION KEY…` names) and what measures it once.
pub type Configuration<T> = (&'static str, fn() -> anyhow::Result<T>);

/// Runs every configuration (or those named in `only`) in turn, each measuring on a fresh topology, `ROUNDS`
/// times: each chosen configuration's key with its runs, in the configurations' order.
pub fn in_rounds<T>(
    configurations: &[Configuration<T>],
    only: &[String],
) -> anyhow::Result<Vec<(&'static str, Vec<T>)>> {
    let chosen: Vec<_> =
        configurations.iter().filter(|(key, _)| only.is_empty() || only.iter().any(|o| o == key)).collect();
    let mut rounds: Vec<Vec<T>> = chosen.iter().map(|_| Vec::new()).collect();
    for _ in 0..ROUNDS {
        for ((_, run), runs) in chosen.iter().zip(&mut rounds) {
            runs.push(run()?);
        }
    }
    Ok(chosen.iter().map(|(key, _)| *key).zip(rounds).collect())
}

/// The median of `values`; None when there are none.
pub fn middle(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied()
}

/// Each configuration's figures, under its key, are the medians of its rounds.
pub fn compare(only: &[String]) -> anyhow::Result<Vec<(&'static str, Run)>> {
    Ok(in_rounds(&CONFIGURATIONS, only)?.into_iter().map(|(key, runs)| (key, median(runs))).collect())
}

/// The median of each figure over `runs` (of one configuration).
fn median(runs: Vec<Run>) -> Run {
    let of = |figure: fn(&Run) -> f64| middle(runs.iter().map(figure).collect()).unwrap_or(0.0);
    let optional = |figure: fn(&Run) -> Option<f64>| middle(runs.iter().filter_map(figure).collect());
    Run {
        name: runs[0].name,
        requests_per_second: of(|run| run.requests_per_second),
        p50_ms: of(|run| run.p50_ms),
        p99_ms: of(|run| run.p99_ms),
        cpu_us_per_request: optional(|run| run.cpu_us_per_request),
        user_us_per_request: optional(|run| run.user_us_per_request),
        rss_kib: optional(|run| run.rss_kib.map(|kib| kib as f64)).map(|kib| kib as u64),
    }
}

fn origin(topology: &Topology) -> anyhow::Result<Nginx> {
    let origin = Nginx::start(&topology.internet, &[SocketAddr::new(SERVER_A.parse()?, 80)], "hello")?;
    pin_tree(origin.pid(), CLIENT_CPU)?;
    Ok(origin)
}

fn direct() -> anyhow::Result<Run> {
    let topology = crate::topology::new()?;
    let _origin = origin(&topology)?;
    let (rps, p50, p99, _) = wrk(&topology.workload, &format!("http://{SERVER_A}/"))?;
    Ok(Run {
        name: "direct (no proxy)",
        requests_per_second: rps,
        p50_ms: p50,
        p99_ms: p99,
        cpu_us_per_request: None,
        user_us_per_request: None,
        rss_kib: None,
    })
}

fn sluice() -> anyhow::Result<Run> {
    intercepted("sluice", Registry::Only)
}

/// As `sluice`, with 100 AuthorizationPolicies in force: ten in the root namespace that every request meets
/// (DENY rules on paths, methods and headers that do not match; ALLOW rules on hosts and ports, one of which does),
/// and ninety in workload namespaces with selectors, which the requests' source does not meet.
fn sluice_authorization() -> anyhow::Result<Run> {
    let topology = crate::topology::new()?;
    let _origin = origin(&topology)?;
    let config = tempfile::tempdir()?;
    write_sluice_config(config.path(), Registry::Only)?;
    let mut yaml = String::new();
    let policy = |name: String, namespace: &str, spec: &str| {
        format!(
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{spec}"
        )
    };
    for i in 0..5 {
        let spec = format!(
            "  action: DENY\n  rules:\n  - to: [{{operation: {{paths: ['/admin-{i}/*', '*.php'], methods: [DELETE]}}}}]\n  \
             - when: [{{key: 'request.headers[x-blocked-{i}]', values: ['*']}}]\n"
        );
        yaml.push_str(&policy(format!("deny-{i}"), "istio-system", &spec));
        let spec = format!(
            "  rules:\n  - to: [{{operation: {{hosts: ['api-{i}.example.com', '*.svc-{i}.example.com'], ports: ['443']}}}}]\n  \
             - to: [{{operation: {{hosts: ['{SERVER_A}', 'origin.bench'], ports: ['80']}}}}]\n"
        );
        yaml.push_str(&policy(format!("allow-{i}"), "istio-system", &spec));
    }
    for i in 0..90 {
        let spec = format!(
            "  selector: {{matchLabels: {{app: app-{i}}}}}\n  rules:\n  - from: [{{source: {{namespaces: [team-{i}]}}}}]\n    \
             to: [{{operation: {{methods: [GET], paths: ['/api/*']}}}}]\n"
        );
        yaml.push_str(&policy(format!("team-{i}"), &format!("team-{i}"), &spec));
    }
    std::fs::write(config.path().join("authorization.yaml"), yaml).context("writing the bench's policies")?;
    let args = format!("--intercept {GATEWAY_WORKLOAD_IFACE} --intercept-port 80 --access-log-format off");
    measure_sluice(
        "sluice (100 AuthorizationPolicies)",
        &topology,
        config.path(),
        &args,
        None,
        &format!("http://{SERVER_A}/"),
    )
}

/// As `sluice`, in ALLOW_ANY with nothing registering the origin: each request passes through to the address
/// it was sent to, counted under PassthroughCluster.
fn sluice_passthrough() -> anyhow::Result<Run> {
    intercepted("sluice (passthrough)", Registry::AllowAny)
}

/// Sluice intercepting the workload's requests to the origin transparently, the origin as `registry` has it.
/// As `sluice`, its requests sent upstream by hyper's client rather than Sluice's own HTTP/1.1 code: what the
/// latter saves.
fn sluice_hyper_client() -> anyhow::Result<Run> {
    intercepted_with("sluice, hyper's HTTP/1.1 client upstream", Registry::Only, "--upstream-http1 hyper")
}

fn intercepted(name: &'static str, registry: Registry) -> anyhow::Result<Run> {
    intercepted_with(name, registry, "")
}

fn intercepted_with(name: &'static str, registry: Registry, more: &str) -> anyhow::Result<Run> {
    let topology = crate::topology::new()?;
    let _origin = origin(&topology)?;
    let config = tempfile::tempdir()?;
    write_sluice_config(config.path(), registry)?;
    let args = format!("--intercept {GATEWAY_WORKLOAD_IFACE} --intercept-port 80 --access-log-format off {more}");
    measure_sluice(name, &topology, config.path(), &args, None, &format!("http://{SERVER_A}/"))
}

/// As `sluice`, with the access log the mesh config asks for: Istio's default line, written to a file.
fn sluice_logging() -> anyhow::Result<Run> {
    logging("sluice, access log to a file", "")
}

/// As `sluice-log`, with the seeds' Telemetry filter (errors only), which every request here fails: the cost of a
/// request the filter keeps out of the log.
fn sluice_logging_errors_only() -> anyhow::Result<Run> {
    let telemetry = "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: errors-only, namespace: \
                     istio-system}\nspec:\n  accessLogging:\n  - providers: [{name: envoy}]\n    filter: {expression: \
                     'response.code >= 400'}\n";
    logging("sluice, access log filtered (errors only)", telemetry)
}

fn logging(name: &'static str, telemetry: &str) -> anyhow::Result<Run> {
    let topology = crate::topology::new()?;
    let _origin = origin(&topology)?;
    let config = tempfile::tempdir()?;
    let logs = tempfile::tempdir()?;
    let file = logs.path().join("access.log");
    write_sluice_config_with(config.path(), Registry::Only, &format!("    accessLogFile: {}\n", file.display()))?;
    std::fs::write(config.path().join("telemetry.yaml"), telemetry).context("writing the bench's Telemetry")?;
    let args = format!("--intercept {GATEWAY_WORKLOAD_IFACE} --intercept-port 80");
    measure_sluice(name, &topology, config.path(), &args, None, &format!("http://{SERVER_A}/"))
}

/// Sluice as a reverse proxy on a Gateway port (8082 on its own address), as the peers are measured: no
/// interception; the Gateway's VirtualService routes to the origin at its STATIC endpoint (a gateway has no
/// original destination to send a NONE-resolution host's requests to).
fn sluice_gateway() -> anyhow::Result<Run> {
    let topology = crate::topology::new()?;
    let _origin = origin(&topology)?;
    let config = tempfile::tempdir()?;
    write_sluice_config(config.path(), Registry::Only)?;
    std::fs::write(
        config.path().join("gateway.yaml"),
        format!(
            "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: egress, namespace: bench}}\nspec:\n  \
             selector: {{istio: egressgateway}}\n  servers:\n  - port: {{number: 8082, name: http, protocol: HTTP}}\n    \
             hosts: [origin.bench]\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\n\
             metadata: {{name: origin, namespace: bench}}\nspec:\n  hosts: [origin.bench]\n  gateways: [egress]\n  \
             http:\n  - route:\n    - destination: {{host: origin-endpoints.bench, port: {{number: 80}}}}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
             metadata: {{name: origin-endpoints, namespace: bench}}\nspec:\n  hosts: [origin-endpoints.bench]\n  \
             ports: [{{number: 80, name: http, protocol: HTTP}}]\n  resolution: STATIC\n  \
             endpoints: [{{address: {SERVER_A}}}]\n"
        ),
    )
    .context("writing the bench's Gateway")?;
    let args = format!(
        "--intercept {GATEWAY_WORKLOAD_IFACE} --allow-cidr {GATEWAY_WORKLOAD_ADDR}/32 --gateway-labels istio=egressgateway \
         --access-log-format off"
    );
    let url = format!("http://{GATEWAY_WORKLOAD_ADDR}:8082/");
    measure_sluice("sluice (Gateway port)", &topology, config.path(), &args, Some("gateway listener open"), &url)
}

/// Starts Sluice in the gateway namespace on `config` with `args` (one proxy thread), and once it is
/// ready (and has logged `opened`, if given: a listener its readiness does not wait for), measures through it at
/// `url`.
fn measure_sluice(
    name: &'static str,
    topology: &Topology,
    config: &Path,
    args: &str,
    opened: Option<&str>,
    url: &str,
) -> anyhow::Result<Run> {
    let args = format!("{args} --concurrency 1 --config {}", config.display());
    let agent = Agent::start(&topology.gateway, &args)?;
    if let Some(opened) = opened {
        agent.wait_for_log(opened, 1)?;
    }
    pin_tree(agent.pid(), PROXY_CPU)?;
    measure(name, topology, agent.pid(), url)
}

/// How the bench's mesh treats the origin: registered under REGISTRY_ONLY, or unregistered under ALLOW_ANY.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Registry {
    Only,
    AllowAny,
}

fn write_sluice_config(dir: &Path, registry: Registry) -> anyhow::Result<()> {
    write_sluice_config_with(dir, registry, "")
}

/// As [`write_sluice_config`], with more mesh config fields (`mesh`, each line indented as the mesh's own).
fn write_sluice_config_with(dir: &Path, registry: Registry, mesh: &str) -> anyhow::Result<()> {
    let mode = if registry == Registry::Only { "REGISTRY_ONLY" } else { "ALLOW_ANY" };
    let mut yaml = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: istio, namespace: istio-system}}\ndata:\n  mesh: |\n    \
         outboundTrafficPolicy:\n      mode: {mode}\n{mesh}"
    );
    if registry == Registry::Only {
        yaml.push_str(
            "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: origin, namespace: bench}\n\
             spec:\n  hosts: [origin.bench]\n  addresses: [203.0.113.10]\n  ports: [{number: 80, name: http, protocol: HTTP}]\n  \
             resolution: NONE\n",
        );
    }
    for i in 0..EXTRA_HOSTS {
        yaml.push_str(&format!(
            "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: host-{i}, namespace: bench}}\n\
             spec:\n  hosts: [host-{i}.example.com]\n  ports: [{{number: 443, name: tls, protocol: TLS}}]\n  \
             resolution: NONE\n"
        ));
    }
    std::fs::write(dir.join("bench.yaml"), yaml).context("writing the bench configuration")
}

/// The least a proxy on Sluice's stack (hyper's server and client, tokio on one thread, Sluice's allocator) does:
/// each request forwarded as it came to the origin, on a port of the gateway's address as the peers are.
/// What Sluice costs above it is its own work; what it costs is the stack's.
fn hyper_forwarder() -> anyhow::Result<Run> {
    let topology = crate::topology::new()?;
    let _origin = origin(&topology)?;
    let listen: SocketAddr = format!("{GATEWAY_WORKLOAD_ADDR}:8083").parse()?;
    let program = std::env::current_exe()?.with_file_name("hyper-forwarder");
    let mut command = topology.gateway.command(&program.to_string_lossy());
    command.arg(listen.to_string()).arg(format!("{SERVER_A}:80"));
    measure_spawned("hyper (forwarder, no policy)", &topology, ("hyper-forwarder", command), listen)
}

fn nginx() -> anyhow::Result<Run> {
    nginx_with("nginx 1.22 (proxy_pass)", "")
}

/// As `nginx`, writing its combined access log to a file (buffered as nginx does by default: a write per line).
fn nginx_logging() -> anyhow::Result<Run> {
    let logs = tempfile::tempdir()?;
    std::fs::set_permissions(logs.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
    let access_log = format!("access_log {}/access.log combined;", logs.path().display());
    nginx_with("nginx 1.22, access log to a file", &access_log)
}

fn nginx_with(name: &'static str, server: &str) -> anyhow::Result<Run> {
    let topology = crate::topology::new()?;
    let _origin = origin(&topology)?;
    let listen: SocketAddr = format!("{GATEWAY_WORKLOAD_ADDR}:8080").parse()?;
    let config = format!(
        "upstream origin {{ server {SERVER_A}:80; keepalive 64; }}\n  server {{\n    listen {listen};\n    {server}\n    \
         location / {{\n      proxy_pass http://origin;\n      proxy_http_version 1.1;\n      \
         proxy_set_header Connection \"\";\n      proxy_set_header Host origin.bench;\n    }}\n  }}\n"
    );
    let proxy = Nginx::start_with(&topology.gateway, &config, &[listen])?;
    pin_tree(proxy.pid(), PROXY_CPU)?;
    measure(name, &topology, proxy.pid(), &format!("http://{listen}/"))
}

fn haproxy() -> anyhow::Result<Run> {
    haproxy_with("HAProxy 2.6", "", "")
}

/// HAProxy's HTTP log (`option httplog`) written to its standard output, which the bench keeps in a file.
fn haproxy_logging() -> anyhow::Result<Run> {
    haproxy_with(
        "HAProxy 2.6, access log to a file",
        "  log stdout format raw local0\n",
        "  log global\n  option httplog\n",
    )
}

fn haproxy_with(name: &'static str, global: &str, defaults: &str) -> anyhow::Result<Run> {
    let topology = crate::topology::new()?;
    let _origin = origin(&topology)?;
    let dir = tempfile::tempdir()?;
    let listen: SocketAddr = format!("{GATEWAY_WORKLOAD_ADDR}:8081").parse()?;
    let config = format!(
        "global\n  nbthread 1\n  maxconn 4096\n{global}defaults\n  mode http\n{defaults}  timeout connect 5s\n  \
         timeout client 30s\n  timeout server 30s\n  http-reuse always\nfrontend front\n  bind {listen}\n  \
         default_backend origin\nbackend origin\n  server origin {SERVER_A}:80\n"
    );
    measure_configured(name, &topology, ("haproxy", &["-db", "-f"]), &dir.path().join("haproxy.cfg"), &config, listen)
}

fn squid() -> anyhow::Result<Run> {
    let topology = crate::topology::new()?;
    let _origin = origin(&topology)?;
    let dir = tempfile::tempdir()?;
    // Squid drops to its own user: let it write its logs and pid here.
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
    let root = dir.path().display();
    let listen: SocketAddr = format!("{GATEWAY_WORKLOAD_ADDR}:3128").parse()?;
    let config = format!(
        "http_port {listen} accel defaultsite=origin.bench no-vhost\n\
         cache_peer {SERVER_A} parent 80 0 no-query originserver name=origin\n\
         cache_peer_access origin allow all\nhttp_access allow all\ncache deny all\ncache_mem 8 MB\n\
         access_log none\ncache_log {root}/cache.log\npid_filename {root}/squid.pid\ncoredump_dir {root}\n\
         shutdown_lifetime 0 seconds\n"
    );
    let path = dir.path().join("squid.conf");
    measure_configured("Squid 5.7 (accel, no cache)", &topology, ("squid", &["-N", "-f"]), &path, &config, listen)
}

/// Writes `config` to `path`, starts `PROGRAM ARGS… PATH` in the gateway namespace, and once it listens on
/// `listen`, pins it to the proxy CPU and measures through it.
fn measure_configured(
    name: &'static str,
    topology: &Topology,
    (program, args): (&str, &[&str]),
    path: &Path,
    config: &str,
    listen: SocketAddr,
) -> anyhow::Result<Run> {
    std::fs::write(path, config).with_context(|| format!("writing {}", path.display()))?;
    let mut command = topology.gateway.command(program);
    command.args(args).arg(path);
    measure_spawned(name, topology, (program, command), listen)
}

/// Starts `command` (a proxy in the gateway namespace, `program` in messages), and once it listens on `listen`,
/// pins it to the proxy CPU and measures through it.
fn measure_spawned(
    name: &'static str,
    topology: &Topology,
    (program, command): (&str, Command),
    listen: SocketAddr,
) -> anyhow::Result<Run> {
    let mut process = Process::spawn(program, command)?;
    wait_for_tcp(&topology.gateway, listen, &mut process)?;
    pin_tree(process.pid(), PROXY_CPU)?;
    measure(name, topology, process.pid(), &format!("http://{listen}/"))
}

/// Load through a proxy whose processes descend from `pid`: throughput, latency, CPU per request and RSS.
fn measure(name: &'static str, topology: &Topology, pid: u32, url: &str) -> anyhow::Result<Run> {
    // A warm-up, so pools and caches are filled before the measured run.
    let _ = run_wrk(&topology.workload, url, "1s")?;
    let (((rps, p50, p99), requests), ticks) = tree_cpu_during(Some(pid), || {
        counting_instructions(Some(pid), name, "requests", || {
            let (rps, p50, p99, requests) = wrk(&topology.workload, url)?;
            Ok(((rps, p50, p99), requests))
        })
    })?;
    let ticks_per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100);
    let per_request = |ticks: u64| ticks as f64 * 1e6 / ticks_per_second as f64 / requests.max(1) as f64;
    Ok(Run {
        name,
        requests_per_second: rps,
        p50_ms: p50,
        p99_ms: p99,
        cpu_us_per_request: Some(per_request(ticks.all())),
        user_us_per_request: Some(per_request(ticks.user)),
        rss_kib: Some(tree_status_kib(pid, "VmRSS")),
    })
}

/// With `SLUICE_BENCH_CALLGRIND` set, the proxy runs under `valgrind --tool=callgrind` (a wrapper named by
/// `SLUICE_AGENT_BIN` execs it), and the measured `run`'s instructions are counted: zeroed before it, dumped after
/// (`callgrind_annotate` reads the dump; its total over the count `run` returns — of `what` — is the instructions
/// per request, connection or handshake).
pub fn counting_instructions<T>(
    pid: Option<u32>,
    name: &str,
    what: &str,
    run: impl FnOnce() -> anyhow::Result<(T, u64)>,
) -> anyhow::Result<(T, u64)> {
    let counting = pid.filter(|_| std::env::var_os("SLUICE_BENCH_CALLGRIND").is_some());
    if let Some(pid) = counting {
        callgrind_control(pid, "--zero")?;
    }
    let tracing = match pid.filter(|_| std::env::var_os("SLUICE_BENCH_SYSCALLS").is_some()) {
        Some(pid) => Some(SyscallCount::start(pid)?),
        None => None,
    };
    let (output, count) = run()?;
    if let Some(pid) = counting {
        let dumped = callgrind_control(pid, "--dump")?;
        eprintln!("{name}: {count} {what}; callgrind: {dumped}");
    }
    if let Some(tracing) = tracing {
        eprintln!("{name}: system calls per {what}: {}", tracing.finish(count)?);
    }
    Ok((output, count))
}

/// With `SLUICE_BENCH_SYSCALLS` set, the system calls the proxy's processes make during a measured run, counted
/// by `perf stat` on the kernel's `syscalls:sys_enter_*` tracepoints (what the kernel half of CPU per request
/// buys).
struct SyscallCount {
    perf: std::process::Child,
    output: tempfile::NamedTempFile,
}

impl SyscallCount {
    fn start(pid: u32) -> anyhow::Result<Self> {
        let output = tempfile::NamedTempFile::new()?;
        let pids = tree(pid).iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        let perf = Command::new("perf")
            .args(["stat", "-x", ",", "-e", "syscalls:sys_enter_*", "-p", &pids, "-o"])
            .arg(output.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("running perf stat (SLUICE_BENCH_SYSCALLS)")?;
        // perf attaches to the tracepoints before it counts; give it that moment.
        std::thread::sleep(Duration::from_millis(500));
        Ok(SyscallCount { perf, output })
    }

    /// Stops counting; the calls made per one of `count`, the total first, then each call's share, most first.
    fn finish(mut self, count: u64) -> anyhow::Result<String> {
        let perf = nix::unistd::Pid::from_raw(self.perf.id() as i32);
        nix::sys::signal::kill(perf, nix::sys::signal::Signal::SIGINT)?;
        self.perf.wait()?;
        let text = std::fs::read_to_string(self.output.path())?;
        let mut calls: Vec<(String, f64)> = text
            .lines()
            .filter_map(|line| {
                let mut fields = line.split(',');
                let calls = fields.next()?.parse::<f64>().ok()?;
                let name = fields.nth(1)?.strip_prefix("syscalls:sys_enter_")?;
                (calls > 0.0).then(|| (name.to_owned(), calls / count.max(1) as f64))
            })
            .collect();
        // perf that could not attach (no tracepoints, no permission) counts nothing: say so rather than print 0.
        anyhow::ensure!(!calls.is_empty(), "perf stat counted no system calls (SLUICE_BENCH_SYSCALLS): {text}");
        calls.sort_by(|a, b| b.1.total_cmp(&a.1));
        let total: f64 = calls.iter().map(|(_, n)| n).sum();
        let each = calls.iter().map(|(name, n)| format!("{name} {n:.2}")).collect::<Vec<_>>().join(", ");
        Ok(format!("{total:.2} ({each})"))
    }
}

fn callgrind_control(pid: u32, action: &str) -> anyhow::Result<String> {
    let output = Command::new("callgrind_control").arg(action).arg(pid.to_string()).output()?;
    anyhow::ensure!(output.status.success(), "callgrind_control {action} {pid}: {output:?}");
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

fn wrk(netns: &Netns, url: &str) -> anyhow::Result<(f64, f64, f64, u64)> {
    let output = run_wrk(netns, url, DURATION)?;
    let rps = field(&output, "Requests/sec:").context("wrk printed no Requests/sec")?;
    let p50 = latency(&output, "50%").context("wrk printed no 50% latency")?;
    let p99 = latency(&output, "99%").context("wrk printed no 99% latency")?;
    let requests = output
        .lines()
        .find_map(|line| line.trim().split_once(" requests in ")?.0.trim().parse::<u64>().ok())
        .context("wrk printed no request count")?;
    Ok((rps, p50, p99, requests))
}

fn run_wrk(netns: &Netns, url: &str, duration: &str) -> anyhow::Result<String> {
    let started = Instant::now();
    let output = netns
        .command("taskset")
        .args(["-c", CLIENT_CPU, "wrk", "-t1", "-c", CONNECTIONS, "-d", duration, "--latency"])
        .args(["-H", "Host: origin.bench", url])
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() || started.elapsed() < Duration::from_millis(500) && text.is_empty() {
        bail!("wrk failed: {}{}", text, String::from_utf8_lossy(&output.stderr));
    }
    if text.contains("Non-2xx or 3xx responses") || text.contains("Socket errors") {
        bail!("wrk saw errors through {url}:\n{text}");
    }
    Ok(text)
}

fn field(output: &str, label: &str) -> Option<f64> {
    output.lines().find_map(|line| line.trim().strip_prefix(label)?.trim().parse().ok())
}

/// A latency percentile line of `wrk --latency` (`50%  1.23ms`), in milliseconds.
fn latency(output: &str, percentile: &str) -> Option<f64> {
    output.lines().find_map(|line| {
        let value = line.trim().strip_prefix(percentile)?.trim();
        let (number, scale) = if let Some(us) = value.strip_suffix("us") {
            (us, 1e-3)
        } else if let Some(ms) = value.strip_suffix("ms") {
            (ms, 1.0)
        } else if let Some(s) = value.strip_suffix('s') {
            (s, 1e3)
        } else {
            return None;
        };
        number.parse::<f64>().ok().map(|n| n * scale)
    })
}

/// `pid` and its descendants.
fn tree(pid: u32) -> Vec<u32> {
    let mut parents = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        if let Some(stat) = stat_fields(child) {
            if let Some(parent) = stat.get(1).and_then(|p| p.parse::<u32>().ok()) {
                parents.push((child, parent));
            }
        }
    }
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let current = found[i];
        found.extend(parents.iter().filter(|(_, parent)| *parent == current).map(|(child, _)| *child));
        i += 1;
    }
    found
}

/// The fields of `/proc/PID/stat` after the command name: state, ppid, …
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// User and system CPU time of the tree, in clock ticks.
pub fn tree_cpu_ticks(pid: u32) -> u64 {
    let (user, system) = tree_cpu_ticks_split(pid);
    user + system
}

/// CPU time a process tree used, in clock ticks.
#[derive(Clone, Copy, Debug, Default)]
pub struct TreeTicks {
    pub user: u64,
    pub system: u64,
}

impl TreeTicks {
    pub fn all(self) -> u64 {
        self.user + self.system
    }
}

/// Runs `work`, noting the CPU time the tree of `pid` used meanwhile (none without a pid: no proxy).
pub fn tree_cpu_during<T>(
    pid: Option<u32>,
    work: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(T, TreeTicks)> {
    let ticks = || pid.map(tree_cpu_ticks_split).unwrap_or_default();
    let before = ticks();
    let done = work()?;
    let after = ticks();
    Ok((done, TreeTicks { user: after.0.saturating_sub(before.0), system: after.1.saturating_sub(before.1) }))
}

/// User CPU time and system CPU time of the tree, in clock ticks.
pub fn tree_cpu_ticks_split(pid: u32) -> (u64, u64) {
    let field = |fields: &[String], i: usize| fields.get(i).and_then(|t| t.parse::<u64>().ok()).unwrap_or(0);
    tree(pid)
        .into_iter()
        .filter_map(stat_fields)
        .fold((0, 0), |(user, system), f| (user + field(&f, 11), system + field(&f, 12)))
}

/// A memory figure of `/proc/PID/status` (`VmRSS`, `RssAnon`, `VmHWM`: resident memory, of it what no file
/// backs, and the most resident at any time),
/// KiB, summed over the process tree of `pid`.
pub fn tree_status_kib(pid: u32, field: &str) -> u64 {
    tree(pid)
        .into_iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|status| {
            status.lines().find_map(|line| {
                line.strip_prefix(field)?.strip_prefix(':')?.trim().strip_suffix(" kB")?.trim().parse::<u64>().ok()
            })
        })
        .sum()
}

/// Pins every thread of every process of the tree to `cpu`.
pub fn pin_tree(pid: u32, cpu: &str) -> anyhow::Result<()> {
    for pid in tree(pid) {
        let status = Command::new("taskset").args(["-a", "-p", "-c", cpu, &pid.to_string()]).output()?.status;
        anyhow::ensure!(status.success(), "pinning process {pid} to CPU {cpu}");
    }
    Ok(())
}
