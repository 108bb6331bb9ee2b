//! `sluice-bench https`: TLS terminated on a Gateway port, side by side — handshakes per second with the proxy's
//! CPU per handshake, full (clients that never resume: `openssl s_time -new`) and resumed (wrk: a new TLS
//! connection for each request, resuming its last session, as HTTP clients do), and keep-alive requests per second
//! with its CPU per request — for Sluice (a Gateway server with `tls.mode: SIMPLE`), nginx (`ssl` and
//! `proxy_pass`) and HAProxy (`ssl crt`), each in front of the same plain-HTTP origin, all speaking TLS 1.3.

use std::{net::SocketAddr, process::Command};

use anyhow::Context;
use sluice_tests::{
    agent::Agent,
    peers::{wait_for_tcp, Nginx},
    process::Process,
    tls::certificates,
    topology::{GATEWAY_WORKLOAD_ADDR, GATEWAY_WORKLOAD_IFACE, SERVER_A},
    Topology,
};

use crate::{
    http::{counting_instructions, pin_tree, tree_cpu_during, tree_status_kib, TreeTicks},
    tls::{wrk, Hosts},
};

/// The name the clients ask for, which every proxy's certificate carries.
const NAME: &str = "api.bench";
/// The port each proxy terminates TLS on, at the gateway's address.
const PORT: u16 = 8443;
const PROXY_CPU: &str = "1";
const CLIENT_CPU: &str = "0";

pub struct HttpsRun {
    pub name: &'static str,
    pub full_handshakes_per_second: f64,
    pub cpu_us_per_full_handshake: f64,
    pub handshakes_per_second: f64,
    pub cpu_us_per_handshake: f64,
    pub requests_per_second: f64,
    pub cpu_us_per_request: f64,
    /// Of it, user time (the rest is the kernel's: system calls, and the peers' receiving run in them).
    pub user_us_per_request: f64,
    pub rss_kib: u64,
}

/// The origin: nginx answering `hello` over plain HTTP on SERVER_A:80, on the client's CPU.
fn origin(topology: &Topology) -> anyhow::Result<Nginx> {
    let listen = SocketAddr::new(SERVER_A.parse()?, 80);
    let config = format!(
        "server {{\n    listen {listen};\n    keepalive_requests 1000000;\n    \
         location / {{ default_type text/plain; return 200 \"hello\\n\"; }}\n  }}\n"
    );
    let nginx = Nginx::start_with(&topology.internet, &config, &[listen])?;
    pin_tree(nginx.pid(), CLIENT_CPU)?;
    Ok(nginx)
}

/// What every configuration's run starts from: the topology with its origin, the clients' name for the gateway's
/// address, a certificate for `NAME` (and its key) in a directory of the run's own, and the address to listen on.
/// (Fields drop in their order: the topology's namespaces go last, after what runs in them.)
struct Setup {
    dir: tempfile::TempDir,
    cert: String,
    key: String,
    listen: SocketAddr,
    _hosts: Hosts,
    _origin: Nginx,
    topology: Topology,
}

impl Setup {
    fn new() -> anyhow::Result<Setup> {
        let topology = crate::topology::new()?;
        let _origin = origin(&topology)?;
        let _hosts = Hosts::write(&topology.workload, GATEWAY_WORKLOAD_ADDR)?;
        let dir = tempfile::tempdir()?;
        let (_, cert, key) = certificates(dir.path(), "bench-ca", &[NAME]);
        let listen = format!("{GATEWAY_WORKLOAD_ADDR}:{PORT}").parse()?;
        Ok(Setup { dir, cert, key, listen, _hosts, _origin, topology })
    }

    /// Measures `program`, run by `command`, once it listens.
    fn measure_spawned(&self, name: &'static str, (program, command): (&str, Command)) -> anyhow::Result<HttpsRun> {
        let mut process = Process::spawn(program, command)?;
        wait_for_tcp(&self.topology.gateway, self.listen, &mut process)?;
        pin_tree(process.pid(), PROXY_CPU)?;
        measure(name, &self.topology, process.pid())
    }
}

type Measured = fn() -> anyhow::Result<HttpsRun>;

const CONFIGURATIONS: [(&str, Measured); 4] =
    [("sluice", sluice), ("nginx", nginx_terminating), ("haproxy", haproxy), ("hyper-forwarder", hyper_forwarder)];

/// Runs every configuration (or those named in `only`), `crate::http::ROUNDS` times in turn; the medians.
pub fn compare(only: &[String]) -> anyhow::Result<Vec<HttpsRun>> {
    Ok(crate::http::in_rounds(&CONFIGURATIONS, only)?.into_iter().map(|(_, runs)| median(runs)).collect())
}

fn median(runs: Vec<HttpsRun>) -> HttpsRun {
    let middle = |figure: fn(&HttpsRun) -> f64| crate::http::middle(runs.iter().map(figure).collect()).unwrap_or(0.0);
    HttpsRun {
        name: runs[0].name,
        full_handshakes_per_second: middle(|run| run.full_handshakes_per_second),
        cpu_us_per_full_handshake: middle(|run| run.cpu_us_per_full_handshake),
        handshakes_per_second: middle(|run| run.handshakes_per_second),
        cpu_us_per_handshake: middle(|run| run.cpu_us_per_handshake),
        requests_per_second: middle(|run| run.requests_per_second),
        cpu_us_per_request: middle(|run| run.cpu_us_per_request),
        user_us_per_request: middle(|run| run.user_us_per_request),
        rss_kib: middle(|run| run.rss_kib as f64) as u64,
    }
}

fn sluice() -> anyhow::Result<HttpsRun> {
    let Setup { topology, dir, cert, key, .. } = &Setup::new()?;
    std::fs::write(
        dir.path().join("gateway.yaml"),
        format!(
            "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: bench, namespace: istio-system}}\n\
             spec:\n  selector: {{istio: egressgateway}}\n  servers:\n  - port: {{number: {PORT}, name: https, \
             protocol: HTTPS}}\n    hosts: [{NAME}, \"*\"]\n    tls: {{mode: SIMPLE, serverCertificate: {cert}, privateKey: \
             {key}}}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: bench, \
             namespace: istio-system}}\nspec:\n  hosts: [{NAME}]\n  gateways: [bench]\n  http:\n  - route: \
             [{{destination: {{host: origin.bench, port: {{number: 80}}}}}}]\n---\napiVersion: \
             networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: origin, namespace: istio-system}}\nspec:\n  \
             hosts: [origin.bench]\n  ports: [{{number: 80, name: http, protocol: HTTP}}]\n  endpoints: \
             [{{address: {SERVER_A}}}]\n  resolution: STATIC\n"
        ),
    )?;
    let args = format!(
        "--intercept {GATEWAY_WORKLOAD_IFACE} --allow-cidr {GATEWAY_WORKLOAD_ADDR}/32 --access-log-format off \
         --concurrency 1 --config {}",
        dir.path().join("gateway.yaml").display()
    );
    let agent = Agent::start(&topology.gateway, &args)?;
    agent.wait_for_log("gateway listener open", 1)?;
    pin_tree(agent.pid(), PROXY_CPU)?;
    measure("sluice (Gateway server, SIMPLE)", topology, agent.pid())
}

fn nginx_terminating() -> anyhow::Result<HttpsRun> {
    let Setup { topology, cert, key, listen, .. } = &Setup::new()?;
    // nginx 1.22 offers TLS 1.2 alone unless told (1.23.4 added 1.3 to its default): the protocols it has
    // offered by default since, so that every proxy here resumes and negotiates TLS 1.3, as clients do.
    let config = format!(
        "upstream origin {{ server {SERVER_A}:80; keepalive 32; }}\n  server {{\n    listen {listen} ssl http2;\n    \
         ssl_certificate {cert};\n    ssl_certificate_key {key};\n    ssl_protocols TLSv1.2 TLSv1.3;\n    \
         keepalive_requests 1000000;\n    \
         location / {{ proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n  }}\n"
    );
    let nginx = Nginx::start_with(&topology.gateway, &config, &[*listen])?;
    pin_tree(nginx.pid(), PROXY_CPU)?;
    measure("nginx 1.22 (ssl, proxy_pass)", topology, nginx.pid())
}

fn haproxy() -> anyhow::Result<HttpsRun> {
    let setup = Setup::new()?;
    let Setup { dir, cert, key, listen, .. } = &setup;
    // HAProxy reads the certificate and its key from one file.
    let pem = dir.path().join("haproxy.pem");
    std::fs::write(&pem, [std::fs::read(cert)?, std::fs::read(key)?].concat())?;
    let config = format!(
        "global\n  nbthread 1\n  maxconn 4096\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  \
         timeout server 30s\nfrontend front\n  bind {listen} ssl crt {} alpn h2,http/1.1\n  default_backend origin\n\
         backend origin\n  server origin {SERVER_A}:80\n",
        pem.display()
    );
    let path = dir.path().join("haproxy.cfg");
    std::fs::write(&path, config)?;
    let mut command = setup.topology.gateway.command("haproxy");
    command.args(["-db", "-f"]).arg(&path);
    setup.measure_spawned("HAProxy 2.6 (ssl crt)", ("haproxy", command))
}

/// The least a proxy on Sluice's stack does (rustls, hyper's server and client, tokio on one thread, Sluice's
/// allocator): TLS terminated as Sluice's Gateway servers configure it, each request forwarded as it came.
/// What Sluice costs above it is its own work; what it costs is the stack's.
fn hyper_forwarder() -> anyhow::Result<HttpsRun> {
    let setup = Setup::new()?;
    let program = std::env::current_exe()?.with_file_name("hyper-forwarder");
    let mut command = setup.topology.gateway.command(&program.to_string_lossy());
    command.arg(setup.listen.to_string()).arg(format!("{SERVER_A}:80")).arg(&setup.cert).arg(&setup.key);
    setup.measure_spawned("hyper + rustls (forwarder, no policy)", ("hyper-forwarder", command))
}

/// Full handshakes, resumed handshakes (a new connection for each request), then keep-alive requests, through the
/// proxy whose processes descend from `pid`.
fn measure(name: &'static str, topology: &Topology, pid: u32) -> anyhow::Result<HttpsRun> {
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64;
    let url = format!("https://{NAME}:{PORT}/");
    let per = |ticks: u64, count: u64| ticks as f64 * 1e6 / hz / count.max(1) as f64;
    // One measured phase: (per second, count, the proxy's CPU ticks), its instructions counted under callgrind.
    let phase = |what: &str, run: &dyn Fn() -> anyhow::Result<(f64, u64)>| -> anyhow::Result<(f64, u64, TreeTicks)> {
        let ((per_second, count), ticks) =
            tree_cpu_during(Some(pid), || counting_instructions(Some(pid), name, what, run))?;
        Ok((per_second, count, ticks))
    };
    wrk(&topology.workload, &url, true).context("warming up")?;
    let (full_handshakes_per_second, full_handshakes, full_handshake_ticks) =
        phase("full handshakes", &|| full_handshakes(topology))?;
    let (handshakes_per_second, handshakes, handshake_ticks) =
        phase("resumed handshakes", &|| wrk(&topology.workload, &url, true))?;
    let (requests_per_second, requests, request_ticks) = phase("requests", &|| wrk(&topology.workload, &url, false))?;
    Ok(HttpsRun {
        name,
        full_handshakes_per_second,
        cpu_us_per_full_handshake: per(full_handshake_ticks.all(), full_handshakes),
        handshakes_per_second,
        cpu_us_per_handshake: per(handshake_ticks.all(), handshakes),
        requests_per_second,
        cpu_us_per_request: per(request_ticks.all(), requests),
        user_us_per_request: per(request_ticks.user, requests),
        rss_kib: tree_status_kib(pid, "VmRSS"),
    })
}

/// Clients that never resume — `openssl s_time -new`, four at once on the client's CPU, each handshaking and
/// closing for the bench's duration (it sends no name: each proxy's default server answers) — and the handshakes
/// they completed: (per second, count).
fn full_handshakes(topology: &Topology) -> anyhow::Result<(f64, u64)> {
    const CLIENTS: usize = 4;
    let address = format!("{GATEWAY_WORKLOAD_ADDR}:{PORT}");
    let clients = (0..CLIENTS)
        .map(|_| {
            let mut command = topology.workload.command("taskset");
            command.args(["-c", CLIENT_CPU, "openssl", "s_time", "-connect", &address, "-new", "-time", "5"]);
            command.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::null());
            command.spawn().context("running openssl s_time")
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (mut count, mut seconds) = (0, 0.0f64);
    for client in clients {
        let output = client.wait_with_output()?;
        let text = String::from_utf8_lossy(&output.stdout);
        // "N connections in T real seconds, …"
        let (n, t) = text
            .lines()
            .find_map(|line| {
                let (n, rest) = line.split_once(" connections in ")?;
                let t = rest.split_once(" real seconds")?.0;
                Some((n.trim().parse::<u64>().ok()?, t.trim().parse::<f64>().ok()?))
            })
            .with_context(|| format!("openssl s_time printed no count:\n{text}"))?;
        count += n;
        seconds = seconds.max(t);
    }
    anyhow::ensure!(count > 0, "no full handshake completed through {address}");
    Ok((count as f64 / seconds.max(1.0), count))
}

/// Prints the table and the ratios the targets are stated in.
pub fn print(runs: &[HttpsRun]) {
    println!(
        "TLS 1.3 terminated on a Gateway port (full: openssl s_time -new ×4, 5 s; resumed: wrk -t1 -c8 -d5s, a \
         new TLS connection per request; then keep-alive; medians of {} rounds)",
        crate::http::ROUNDS
    );
    println!(
        "{:<36} {:>7} {:>9} {:>10} {:>9} {:>10} {:>11} {:>8} {:>8}",
        "through", "full/s", "CPU us", "resumed/s", "CPU us", "requests/s", "CPU us/req", "(user)", "RSS MiB"
    );
    for run in runs {
        println!(
            "{:<36} {:>7.0} {:>9.1} {:>10.0} {:>9.1} {:>10.0} {:>11.1} {:>8.1} {:>8.1}",
            run.name,
            run.full_handshakes_per_second,
            run.cpu_us_per_full_handshake,
            run.handshakes_per_second,
            run.cpu_us_per_handshake,
            run.requests_per_second,
            run.cpu_us_per_request,
            run.user_us_per_request,
            run.rss_kib as f64 / 1024.0
        );
    }
    let Some(sluice) = runs.iter().find(|run| run.name.starts_with("sluice")) else { return };
    // The peers are the other proxies; the forwarder is Sluice's own stack, not one of them.
    let stack = runs.iter().find(|run| run.name.starts_with("hyper"));
    let peers: Vec<&HttpsRun> =
        runs.iter().filter(|run| !run.name.starts_with("sluice") && !run.name.starts_with("hyper")).collect();
    let best = |figure: fn(&HttpsRun) -> f64| peers.iter().map(|run| figure(run)).fold(f64::INFINITY, f64::min);
    if !peers.is_empty() {
        println!(
            "sluice CPU per full handshake / best peer's = {:.2}",
            sluice.cpu_us_per_full_handshake / best(|run| run.cpu_us_per_full_handshake)
        );
        println!(
            "sluice CPU per resumed handshake / best peer's = {:.2}",
            sluice.cpu_us_per_handshake / best(|run| run.cpu_us_per_handshake)
        );
        println!(
            "sluice CPU per request / best peer's = {:.2}",
            sluice.cpu_us_per_request / best(|run| run.cpu_us_per_request)
        );
    }
    if let Some(stack) = stack {
        println!(
            "sluice CPU per request / its stack's (the forwarder) = {:.2}",
            sluice.cpu_us_per_request / stack.cpu_us_per_request
        );
    }
}
