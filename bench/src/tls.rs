//! `sluice-bench tls`: TLS passed through by server name, side by side — new TLS connections per second (a
//! handshake and a small request each) with the proxy's CPU per connection, and one long connection's bulk
//! throughput with the proxy's CPU per GB — for no proxy (the limit), Sluice (intercepting, deciding by SNI),
//! HAProxy (`mode tcp`, `req.ssl_sni`, splice) and nginx (`stream`, `ssl_preread`).

use std::{net::SocketAddr, path::PathBuf, process::Command};

use anyhow::Context;
use sluice_tests::{
    agent::Agent,
    netns::Netns,
    peers::{wait_for_tcp, Nginx},
    process::Process,
    tls::certificates,
    topology::{GATEWAY_WORKLOAD_ADDR, GATEWAY_WORKLOAD_IFACE, SERVER_A},
    Topology,
};

use crate::http::{counting_instructions, pin_tree, tree_cpu_during, tree_status_kib};

/// The name the clients ask for, registered (in Sluice's configuration) at the origin's address.
const NAME: &str = "api.bench";
const CONNECTIONS: &str = "8";
const DURATION: &str = "5s";
/// The bulk download, in MiB.
/// Long enough (about 1.5 s here) that a transfer's start (slow start, buffers growing) does not set its pace.
const BULK_MIB: u64 = 1024;
const PROXY_CPU: &str = "1";
const CLIENT_CPU: &str = "0";

pub struct TlsRun {
    pub name: &'static str,
    pub connections_per_second: f64,
    pub cpu_us_per_connection: Option<f64>,
    pub user_us_per_connection: Option<f64>,
    pub bulk_gbit_per_second: f64,
    pub cpu_seconds_per_gb: Option<f64>,
    /// The share of the download the clients' CPU (curl's, and the origin's) was busy, and its CPU seconds per GB:
    /// where it is all but 1, that CPU bounds the download, and what a proxy adds there is what it loses.
    pub endpoints_busy: f64,
    pub endpoints_seconds_per_gb: f64,
    pub rss_kib: Option<u64>,
}

/// The origin: nginx serving TLS for `NAME` on the origin's port 443, a small answer at `/` and `BULK_MIB` MiB at
/// `/bulk`; with the CA its certificate is signed by.
struct Origin {
    _nginx: Nginx,
    _dir: tempfile::TempDir,
    ca: String,
}

fn origin(topology: &Topology) -> anyhow::Result<Origin> {
    // In memory: a file written to disk just before is still being written back while it is downloaded, and the
    // writeback's CPU landed on the clients' CPU, which bounds the download.
    let dir = tempfile::tempdir_in("/dev/shm").context("a directory in /dev/shm for the origin's files")?;
    let (ca, cert, key) = certificates(dir.path(), "bench-ca", &[NAME]);
    let bulk = dir.path().join("bulk");
    let mut file = std::fs::File::create(&bulk).context("creating the bulk file")?;
    let mebibyte = vec![0x5a; 1 << 20];
    for _ in 0..BULK_MIB {
        std::io::Write::write_all(&mut file, &mebibyte).context("writing the bulk file")?;
    }
    let listen = SocketAddr::new(SERVER_A.parse()?, 443);
    let config = format!(
        "server {{\n    listen {listen} ssl;\n    ssl_certificate {cert};\n    ssl_certificate_key {key};\n    \
         ssl_protocols TLSv1.2 TLSv1.3;\n    keepalive_requests 1000000;\n    location = / {{ default_type text/plain; return 200 \"hello\\n\"; }}\n    \
         location = /bulk {{ alias {}; }}\n  }}\n",
        bulk.display()
    );
    let nginx = Nginx::start_with(&topology.internet, &config, &[listen])?;
    pin_tree(nginx.pid(), CLIENT_CPU)?;
    Ok(Origin { _nginx: nginx, _dir: dir, ca })
}

/// `/etc/netns/NS/hosts` with `NAME` at `address`, which `ip netns exec` shows the clients as /etc/hosts;
/// removed on drop.
pub struct Hosts(PathBuf);

impl Hosts {
    pub fn write(netns: &Netns, address: &str) -> anyhow::Result<Hosts> {
        let dir = PathBuf::from("/etc/netns").join(netns.name());
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("hosts"), format!("127.0.0.1 localhost\n{address} {NAME}\n"))?;
        Ok(Hosts(dir))
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        let _ = std::fs::remove_dir("/etc/netns");
    }
}

type Measured = fn() -> anyhow::Result<TlsRun>;

/// The configurations compared, in the table's order.
const CONFIGURATIONS: [(&str, Measured); 9] = [
    ("direct", direct),
    ("sluice", sluice),
    ("sluice-copy", sluice_copy),
    ("sluice-kernel", sluice_kernel),
    ("sluice-gateway", sluice_gateway),
    ("haproxy", haproxy),
    ("nginx", nginx_stream),
    ("nginx-half-close", nginx_stream_half_close),
    ("tcp-forwarder", tcp_forwarder),
];

/// Runs every configuration (or those named in `only`), `crate::http::ROUNDS` times in turn; the medians.
pub fn compare(only: &[String]) -> anyhow::Result<Vec<(&'static str, TlsRun)>> {
    Ok(crate::http::in_rounds(&CONFIGURATIONS, only)?.into_iter().map(|(key, runs)| (key, median(runs))).collect())
}

fn median(runs: Vec<TlsRun>) -> TlsRun {
    use crate::http::middle;
    let of = |figure: fn(&TlsRun) -> Option<f64>| middle(runs.iter().filter_map(figure).collect());
    TlsRun {
        name: runs[0].name,
        connections_per_second: of(|run| Some(run.connections_per_second)).unwrap_or(0.0),
        cpu_us_per_connection: of(|run| run.cpu_us_per_connection),
        user_us_per_connection: of(|run| run.user_us_per_connection),
        bulk_gbit_per_second: of(|run| Some(run.bulk_gbit_per_second)).unwrap_or(0.0),
        cpu_seconds_per_gb: of(|run| run.cpu_seconds_per_gb),
        endpoints_busy: of(|run| Some(run.endpoints_busy)).unwrap_or(0.0),
        endpoints_seconds_per_gb: of(|run| Some(run.endpoints_seconds_per_gb)).unwrap_or(0.0),
        rss_kib: of(|run| run.rss_kib.map(|kib| kib as f64)).map(|kib| kib as u64),
    }
}

fn direct() -> anyhow::Result<TlsRun> {
    let topology = crate::topology::new()?;
    let origin = origin(&topology)?;
    let _hosts = Hosts::write(&topology.workload, SERVER_A)?;
    measure("direct (no proxy)", &topology, None, 443, &origin.ca)
}

fn sluice() -> anyhow::Result<TlsRun> {
    sluice_with("sluice (intercepted, by SNI)", "splice")
}

/// Sluice with the relay's copy engine: what splicing a transfer saves, and what it costs a short connection.
fn sluice_copy() -> anyhow::Result<TlsRun> {
    sluice_with("sluice (--relay-engine copy)", "copy")
}

fn sluice_kernel() -> anyhow::Result<TlsRun> {
    sluice_with("sluice (--relay-engine kernel)", "kernel")
}

fn sluice_with(name: &'static str, engine: &str) -> anyhow::Result<TlsRun> {
    let topology = crate::topology::new()?;
    let origin = origin(&topology)?;
    let _hosts = Hosts::write(&topology.workload, SERVER_A)?;
    let config = tempfile::tempdir()?;
    std::fs::write(
        config.path().join("bench.yaml"),
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: istio, namespace: istio-system}}\ndata:\n  mesh: |\n    \
             outboundTrafficPolicy:\n      mode: REGISTRY_ONLY\n---\napiVersion: networking.istio.io/v1\n\
             kind: ServiceEntry\nmetadata: {{name: api, namespace: bench}}\nspec:\n  hosts: [{NAME}]\n  \
             addresses: [{SERVER_A}]\n  ports: [{{number: 443, name: tls, protocol: TLS}}]\n  resolution: NONE\n"
        ),
    )?;
    let args = format!(
        "--intercept {GATEWAY_WORKLOAD_IFACE} --intercept-port 443 --access-log-format off --concurrency 1 \
         --relay-engine {engine} --config {}",
        config.path().display()
    );
    let agent = Agent::start(&topology.gateway, &args)?;
    pin_tree(agent.pid(), PROXY_CPU)?;
    measure(name, &topology, Some(agent.pid()), 443, &origin.ca)
}

const PEER_PORT: u16 = 8443;

/// Sluice as an egress gateway's TLS PASSTHROUGH server (the seeds' "egress gateway with SNI"), dialled as the
/// peers are: what interception adds to a connection's cost is the difference from the intercepted row.
fn sluice_gateway() -> anyhow::Result<TlsRun> {
    let topology = crate::topology::new()?;
    let origin = origin(&topology)?;
    let _hosts = Hosts::write(&topology.workload, GATEWAY_WORKLOAD_ADDR)?;
    let config = tempfile::tempdir()?;
    std::fs::write(
        config.path().join("bench.yaml"),
        format!(
            "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: bench, namespace: istio-system}}\n\
             spec:\n  selector: {{istio: egressgateway}}\n  servers:\n  - port: {{number: {PEER_PORT}, name: tls, \
             protocol: TLS}}\n    hosts: [{NAME}]\n    tls: {{mode: PASSTHROUGH}}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: bench, namespace: \
             istio-system}}\nspec:\n  hosts: [{NAME}]\n  gateways: [bench]\n  tls:\n  - match: [{{port: {PEER_PORT}, \
             sniHosts: [{NAME}]}}]\n    route: [{{destination: {{host: {NAME}, port: {{number: 443}}}}}}]\n---\n\
             apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: api, namespace: istio-system}}\n\
             spec:\n  hosts: [{NAME}]\n  ports: [{{number: 443, name: tls, protocol: TLS}}]\n  endpoints: \
             [{{address: {SERVER_A}}}]\n  resolution: STATIC\n"
        ),
    )?;
    let args = format!(
        "--intercept {GATEWAY_WORKLOAD_IFACE} --allow-cidr {GATEWAY_WORKLOAD_ADDR}/32 --access-log-format off \
         --concurrency 1 --config {}",
        config.path().display()
    );
    let agent = Agent::start(&topology.gateway, &args)?;
    agent.wait_for_log("gateway listener open", 1)?;
    pin_tree(agent.pid(), PROXY_CPU)?;
    measure("sluice (Gateway server, PASSTHROUGH)", &topology, Some(agent.pid()), PEER_PORT, &origin.ca)
}

fn haproxy() -> anyhow::Result<TlsRun> {
    let topology = crate::topology::new()?;
    let origin = origin(&topology)?;
    let _hosts = Hosts::write(&topology.workload, GATEWAY_WORKLOAD_ADDR)?;
    let dir = tempfile::tempdir()?;
    let listen: SocketAddr = format!("{GATEWAY_WORKLOAD_ADDR}:{PEER_PORT}").parse()?;
    let config = format!(
        "global\n  nbthread 1\n  maxconn 4096\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  \
         timeout server 30s\n  option splice-auto\nfrontend front\n  bind {listen}\n  \
         tcp-request inspect-delay 5s\n  tcp-request content accept if {{ req.ssl_hello_type 1 }}\n  \
         use_backend origin if {{ req.ssl_sni -i {NAME} }}\nbackend origin\n  server origin {SERVER_A}:443\n"
    );
    let path = dir.path().join("haproxy.cfg");
    std::fs::write(&path, config)?;
    let mut command = topology.gateway.command("haproxy");
    command.args(["-db", "-f"]).arg(&path);
    spawned("HAProxy 2.6 (mode tcp, req.ssl_sni)", &topology, ("haproxy", command), listen, &origin.ca)
}

fn nginx_stream() -> anyhow::Result<TlsRun> {
    nginx_stream_with("nginx 1.22 (stream, ssl_preread)", false)
}

/// nginx passing a half-close on, as Envoy's `tcp_proxy` (and so Sluice, and HAProxy) does: by default nginx ends
/// the session at the first side's close, which saves the work of the close's passing and of the other side's.
fn nginx_stream_half_close() -> anyhow::Result<TlsRun> {
    nginx_stream_with("nginx 1.22 (… proxy_half_close on)", true)
}

fn nginx_stream_with(name: &'static str, half_close: bool) -> anyhow::Result<TlsRun> {
    let half_close = if half_close { "    proxy_half_close on;\n" } else { "" };
    let topology = crate::topology::new()?;
    let origin = origin(&topology)?;
    let _hosts = Hosts::write(&topology.workload, GATEWAY_WORKLOAD_ADDR)?;
    let dir = tempfile::tempdir()?;
    let root = dir.path().display();
    let listen: SocketAddr = format!("{GATEWAY_WORKLOAD_ADDR}:{PEER_PORT}").parse()?;
    let config = format!(
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\ndaemon off;\nworker_processes 1;\n\
         pid {root}/nginx.pid;\nerror_log {root}/error.log;\nevents {{ worker_connections 4096; }}\n\
         stream {{\n  map $ssl_preread_server_name $upstream {{ {NAME} {SERVER_A}:443; default 127.0.0.1:1; }}\n  \
         server {{\n    listen {listen};\n    ssl_preread on;\n    proxy_pass $upstream;\n{half_close}  }}\n}}\n"
    );
    let path = dir.path().join("nginx.conf");
    std::fs::write(&path, config)?;
    let mut command = topology.gateway.command("nginx");
    command.args(["-e", &format!("{root}/error.log"), "-p", &root.to_string(), "-c"]).arg(&path);
    spawned(name, &topology, ("nginx", command), listen, &origin.ca)
}

/// The least a TCP proxy on Sluice's stack (tokio on one thread, Sluice's allocator) does: every connection joined
/// to the origin and copied both ways, a half-close passed on; no server name read, nothing decided or counted.
/// What Sluice costs above it is its own work; what it costs is the stack's.
fn tcp_forwarder() -> anyhow::Result<TlsRun> {
    let topology = crate::topology::new()?;
    let origin = origin(&topology)?;
    let _hosts = Hosts::write(&topology.workload, GATEWAY_WORKLOAD_ADDR)?;
    let listen: SocketAddr = format!("{GATEWAY_WORKLOAD_ADDR}:{PEER_PORT}").parse()?;
    let program = std::env::current_exe()?.with_file_name("tcp-forwarder");
    let mut command = topology.gateway.command(&program.to_string_lossy());
    command.arg(listen.to_string()).arg(format!("{SERVER_A}:443"));
    spawned("tokio (forwarder, no policy)", &topology, ("tcp-forwarder", command), listen, &origin.ca)
}

fn spawned(
    name: &'static str,
    topology: &Topology,
    (program, command): (&str, Command),
    listen: SocketAddr,
    ca: &str,
) -> anyhow::Result<TlsRun> {
    let mut process = Process::spawn(program, command)?;
    wait_for_tcp(&topology.gateway, listen, &mut process)?;
    pin_tree(process.pid(), PROXY_CPU)?;
    measure(name, topology, Some(process.pid()), listen.port(), ca)
}

/// New connections per second and a bulk download through the proxy whose processes descend from `pid` (none:
/// no proxy), at `NAME` on `port`.
fn measure(name: &'static str, topology: &Topology, pid: Option<u32>, port: u16, ca: &str) -> anyhow::Result<TlsRun> {
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64;
    let url = format!("https://{NAME}:{port}/");
    let _ = run_wrk(&topology.workload, &url, "1s", true)?;
    let ((per_second, connections), connecting) = tree_cpu_during(pid, || {
        counting_instructions(pid, name, "connections", || wrk(&topology.workload, &url, true))
    })?;
    let per_connection = |ticks: u64| ticks as f64 * 1e6 / hz / connections.max(1) as f64;

    let ((bytes_per_second, endpoints), downloading) = tree_cpu_during(pid, || {
        crate::relay::busy_during(&format!("cpu{CLIENT_CPU}"), || {
            bulk(&topology.workload, &format!("https://{NAME}:{port}/bulk"), ca)
        })
    })?;
    let gb = (BULK_MIB << 20) as f64 / 1e9;
    Ok(TlsRun {
        name,
        connections_per_second: per_second,
        cpu_us_per_connection: pid.map(|_| per_connection(connecting.all())),
        user_us_per_connection: pid.map(|_| per_connection(connecting.user)),
        bulk_gbit_per_second: bytes_per_second * 8.0 / 1e9,
        cpu_seconds_per_gb: pid.map(|_| downloading.all() as f64 / hz / gb),
        endpoints_busy: endpoints.share,
        endpoints_seconds_per_gb: endpoints.seconds / gb,
        rss_kib: pid.map(|pid| tree_status_kib(pid, "VmRSS")),
    })
}

/// wrk for `DURATION`, opening a new connection for each request (`Connection: close`) when `close`, else on
/// kept-alive connections: requests per second and their count.
pub fn wrk(netns: &Netns, url: &str, close: bool) -> anyhow::Result<(f64, u64)> {
    let output = run_wrk(netns, url, DURATION, close)?;
    let per_second = output
        .lines()
        .find_map(|line| line.trim().strip_prefix("Requests/sec:")?.trim().parse().ok())
        .context("wrk printed no Requests/sec")?;
    let count = output
        .lines()
        .find_map(|line| line.trim().split_once(" requests in ")?.0.trim().parse::<u64>().ok())
        .context("wrk printed no request count")?;
    Ok((per_second, count))
}

fn run_wrk(netns: &Netns, url: &str, duration: &str, close: bool) -> anyhow::Result<String> {
    let close: &[&str] = if close { &["-H", "Connection: close"] } else { &[] };
    let output = netns
        .command("taskset")
        .args(["-c", CLIENT_CPU, "wrk", "-t1", "-c", CONNECTIONS, "-d", duration])
        .args(close)
        .arg(url)
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    anyhow::ensure!(output.status.success(), "wrk failed: {text}{}", String::from_utf8_lossy(&output.stderr));
    anyhow::ensure!(
        !text.contains("Non-2xx or 3xx responses") && !text.contains("Socket errors: connect"),
        "wrk saw errors through {url}:\n{text}"
    );
    Ok(text)
}

/// One download of `url` with curl, verifying the origin's certificate: bytes per second.
fn bulk(netns: &Netns, url: &str, ca: &str) -> anyhow::Result<f64> {
    let output = netns
        .command("taskset")
        .args([
            "-c",
            CLIENT_CPU,
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "--cacert",
            ca,
            "-w",
            "%{speed_download} %{size_download}",
        ])
        .arg(url)
        .output()
        .context("running curl")?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let mut fields = text.split_whitespace().map(|field| field.parse::<f64>());
    let (Some(Ok(speed)), Some(Ok(size))) = (fields.next(), fields.next()) else {
        anyhow::bail!("curl {url}: {text}{}", String::from_utf8_lossy(&output.stderr));
    };
    anyhow::ensure!(size as u64 == BULK_MIB << 20, "curl {url} got {size} bytes");
    Ok(speed)
}

/// Prints the table and the ratios the targets are stated in.
pub fn print(runs: &[(&'static str, TlsRun)]) {
    println!(
        "TLS passed through by server name (wrk -t1 -c{CONNECTIONS} -d{DURATION}, a new TLS connection per request; \
         curl, one {BULK_MIB} MiB download; medians of {} rounds; TCP congestion control {})",
        crate::http::ROUNDS,
        crate::topology::congestion_control()
    );
    println!(
        "{:<36} {:>10} {:>14} {:>12} {:>12} {:>10} {:>16} {:>8}",
        "through", "conns/s", "CPU us/conn", "(user)", "bulk Gbit/s", "CPU s/GB", "CPU 0 busy, s/GB", "RSS MiB"
    );
    let optional = |value: Option<f64>, precision: usize| value.map_or("-".to_owned(), |v| format!("{v:.precision$}"));
    for (_, run) in runs {
        println!(
            "{:<36} {:>10.0} {:>14} {:>12} {:>12.2} {:>10} {:>16} {:>8}",
            run.name,
            run.connections_per_second,
            optional(run.cpu_us_per_connection, 1),
            optional(run.user_us_per_connection, 1),
            run.bulk_gbit_per_second,
            optional(run.cpu_seconds_per_gb, 2),
            format!("{:.0} %, {:.3}", run.endpoints_busy * 100.0, run.endpoints_seconds_per_gb),
            optional(run.rss_kib.map(|kib| kib as f64 / 1024.0), 1),
        );
    }
    let get = |key: &str| runs.iter().find(|(k, _)| *k == key).map(|(_, run)| run);
    if let Some(sluice) = get("sluice") {
        let best_peer =
            ["haproxy", "nginx"].iter().filter_map(|key| get(key)?.cpu_us_per_connection).fold(f64::INFINITY, f64::min);
        if let (Some(cpu), true) = (sluice.cpu_us_per_connection, best_peer.is_finite()) {
            println!("sluice CPU per connection / best peer's = {:.2}", cpu / best_peer);
        }
        // The same semantics: both pass the half-close on.
        if let (Some(cpu), Some(peer)) =
            (sluice.cpu_us_per_connection, get("nginx-half-close").and_then(|run| run.cpu_us_per_connection))
        {
            println!("sluice CPU per connection / nginx's passing the half-close on = {:.2}", cpu / peer);
        }
        if let (Some(cpu), Some(stack)) =
            (sluice.cpu_us_per_connection, get("tcp-forwarder").and_then(|run| run.cpu_us_per_connection))
        {
            println!("sluice CPU per connection / its stack's (the forwarder) = {:.2}", cpu / stack);
        }
        if let Some(direct) = get("direct") {
            println!(
                "sluice bulk throughput / direct = {:.2}",
                sluice.bulk_gbit_per_second / direct.bulk_gbit_per_second.max(1e-9)
            );
        }
    }
}
