//! `sluice-bench relay`: decided TCP byte streams relayed, side by side — one long connection's throughput and a
//! hundred at once (iperf3), the CPU per GB of the proxy's processes and of the whole machine (what the kernel does
//! on a proxy's behalf is not always charged to it), and a 1-byte ping-pong's latency — for no proxy (the limit),
//! Sluice with each relay engine (intercepting, deciding by address), HAProxy (`mode tcp`, `option splice-auto`)
//! and nginx (`stream`).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Context;
use sluice_tests::{
    agent::Agent,
    peers::wait_for_tcp,
    process::Process,
    topology::{GATEWAY_WORKLOAD_ADDR, GATEWAY_WORKLOAD_IFACE, SERVER_A},
    Topology,
};

use crate::http::{pin_tree, tree_cpu_during};

const IPERF_PORT: u16 = 5201;
const ECHO_PORT: u16 = 5202;
/// Where HAProxy and nginx listen on the gateway: the origin's ports plus this.
const PEER_OFFSET: u16 = 10_000;
const SECONDS: &str = "5";
const MANY: &str = "100";
const PING_PONGS: usize = 20_000;
const PROXY_CPU: &str = "1";
const CLIENT_CPU: &str = "0";

pub struct RelayRun {
    pub name: &'static str,
    pub one_gbit: f64,
    pub many_gbit: f64,
    /// CPU seconds per GB relayed (one connection): the proxy's processes, and the whole machine.
    pub proxy_seconds_per_gb: Option<f64>,
    pub machine_seconds_per_gb: f64,
    /// The share of the one connection's run the endpoints' CPU (iperf3's client and server) was busy, and its
    /// CPU seconds per GB: where it is all but 1, that CPU is what bounds the throughput, and whatever extra work
    /// a relayed GB costs it (a second connection's receive processing and acknowledgements run on the sending
    /// side's CPU) is what the proxy's throughput loses against direct.
    pub endpoints_busy: f64,
    pub endpoints_seconds_per_gb: f64,
    pub ping_pong_p50_us: f64,
    pub ping_pong_p99_us: f64,
    /// For the kernel engine: the share of the bytes the kernel handed on (the rest was left to the proxy).
    pub kernel_share: Option<f64>,
}

type Measured = fn() -> anyhow::Result<RelayRun>;

const CONFIGURATIONS: [(&str, Measured); 6] = [
    ("direct", direct),
    ("sluice-splice", sluice_splice),
    ("sluice-copy", sluice_copy),
    ("sluice-kernel", sluice_kernel),
    ("haproxy", haproxy),
    ("nginx", nginx_stream),
];

/// Runs every configuration (or those named in `only`), `crate::http::ROUNDS` times in turn; the medians.
pub fn compare(only: &[String]) -> anyhow::Result<Vec<(&'static str, RelayRun)>> {
    Ok(crate::http::in_rounds(&CONFIGURATIONS, only)?.into_iter().map(|(key, runs)| (key, median(runs))).collect())
}

fn median(runs: Vec<RelayRun>) -> RelayRun {
    use crate::http::middle;
    let of = |figure: fn(&RelayRun) -> f64| middle(runs.iter().map(figure).collect()).unwrap_or(0.0);
    RelayRun {
        name: runs[0].name,
        one_gbit: of(|run| run.one_gbit),
        many_gbit: of(|run| run.many_gbit),
        proxy_seconds_per_gb: middle(runs.iter().filter_map(|run| run.proxy_seconds_per_gb).collect()),
        machine_seconds_per_gb: of(|run| run.machine_seconds_per_gb),
        endpoints_busy: of(|run| run.endpoints_busy),
        endpoints_seconds_per_gb: of(|run| run.endpoints_seconds_per_gb),
        ping_pong_p50_us: of(|run| run.ping_pong_p50_us),
        ping_pong_p99_us: of(|run| run.ping_pong_p99_us),
        kernel_share: middle(runs.iter().filter_map(|run| run.kernel_share).collect()),
    }
}

/// The origin: an iperf3 server and a 1-byte echo server at the origin's address.
struct Origin {
    _iperf: Process,
}

fn origin(topology: &Topology) -> anyhow::Result<Origin> {
    let mut command = topology.internet.command("taskset");
    command.args(["-c", CLIENT_CPU, "iperf3", "-s", "-B", SERVER_A, "-p", &IPERF_PORT.to_string()]);
    let mut iperf = Process::spawn("iperf3", command)?;
    wait_for_tcp(&topology.internet, SocketAddr::new(SERVER_A.parse()?, IPERF_PORT), &mut iperf)?;
    let echo = topology.internet.enter(|| TcpListener::bind((SERVER_A, ECHO_PORT)))??;
    std::thread::spawn(move || {
        while let Ok((mut stream, _)) = echo.accept() {
            let _ = stream.set_nodelay(true);
            std::thread::spawn(move || {
                let mut byte = [0u8; 1];
                while stream.read_exact(&mut byte).is_ok() && stream.write_all(&byte).is_ok() {}
            });
        }
    });
    Ok(Origin { _iperf: iperf })
}

fn direct() -> anyhow::Result<RelayRun> {
    let topology = crate::topology::new()?;
    let _origin = origin(&topology)?;
    measure("direct (no proxy)", &topology, None, SERVER_A, 0)
}

fn sluice_splice() -> anyhow::Result<RelayRun> {
    sluice("sluice (splice engine)", "splice")
}

fn sluice_copy() -> anyhow::Result<RelayRun> {
    sluice("sluice (copy engine)", "copy")
}

fn sluice_kernel() -> anyhow::Result<RelayRun> {
    sluice("sluice (kernel engine)", "kernel")
}

fn sluice(name: &'static str, engine: &str) -> anyhow::Result<RelayRun> {
    let topology = crate::topology::new()?;
    let _origin = origin(&topology)?;
    let config = tempfile::tempdir()?;
    std::fs::write(
        config.path().join("bench.yaml"),
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: istio, namespace: istio-system}}\ndata:\n  mesh: |\n    \
             outboundTrafficPolicy:\n      mode: REGISTRY_ONLY\n---\napiVersion: networking.istio.io/v1\n\
             kind: ServiceEntry\nmetadata: {{name: origin, namespace: bench}}\nspec:\n  hosts: [origin.bench]\n  \
             addresses: [{SERVER_A}]\n  ports: [{{number: {IPERF_PORT}, name: iperf, protocol: TCP}}, \
             {{number: {ECHO_PORT}, name: echo, protocol: TCP}}]\n  resolution: NONE\n"
        ),
    )?;
    let args = format!(
        "--intercept {GATEWAY_WORKLOAD_IFACE} --intercept-port {IPERF_PORT} --intercept-port {ECHO_PORT} \
         --access-log-format off --concurrency 1 --relay-engine {engine} --config {}",
        config.path().display()
    );
    // The kernel engine logs, per connection at debug, what the kernel and the proxy each carried.
    let level = std::env::var("SLUICE_AGENT_LOG").unwrap_or_else(|_| "info".into());
    if engine == "kernel" {
        std::env::set_var("SLUICE_AGENT_LOG", format!("{level},sluice_agent::proxy::relay=debug"));
    }
    let agent = Agent::start(&topology.gateway, &args);
    std::env::set_var("SLUICE_AGENT_LOG", level);
    let agent = agent?;
    pin_tree(agent.pid(), PROXY_CPU)?;
    let run = measure(name, &topology, Some(agent.pid()), SERVER_A, 0)?;
    Ok(RelayRun { kernel_share: (engine == "kernel").then(|| kernel_share(&agent.log())), ..run })
}

/// The share of the relayed bytes the kernel handed on, from the kernel engine's per-connection debug lines
/// (`… redirected: N, passed: M …` for each direction).
fn kernel_share(log: &str) -> f64 {
    let count = |line: &str, field: &str| -> u64 {
        line.match_indices(field)
            .filter_map(|(at, _)| {
                let digits: String = line[at + field.len()..].chars().take_while(char::is_ascii_digit).collect();
                digits.parse::<u64>().ok()
            })
            .sum()
    };
    let lines = log.lines().filter(|line| line.contains("redirected: "));
    let (redirected, passed) =
        lines.fold((0, 0), |(r, p), line| (r + count(line, "redirected: "), p + count(line, "passed: ")));
    redirected as f64 / (redirected + passed).max(1) as f64
}

fn haproxy() -> anyhow::Result<RelayRun> {
    let topology = crate::topology::new()?;
    let _origin = origin(&topology)?;
    let dir = tempfile::tempdir()?;
    let mut config = "global\n  nbthread 1\n  maxconn 4096\ndefaults\n  mode tcp\n  timeout connect 5s\n  \
                      timeout client 60s\n  timeout server 60s\n  option splice-auto\n"
        .to_owned();
    for port in [IPERF_PORT, ECHO_PORT] {
        config += &format!(
            "listen relay{port}\n  bind {GATEWAY_WORKLOAD_ADDR}:{}\n  server origin {SERVER_A}:{port}\n",
            port + PEER_OFFSET
        );
    }
    let path = dir.path().join("haproxy.cfg");
    std::fs::write(&path, config)?;
    let mut command = topology.gateway.command("haproxy");
    command.args(["-db", "-f"]).arg(&path);
    spawned("HAProxy 2.6 (mode tcp, splice-auto)", &topology, ("haproxy", command))
}

fn nginx_stream() -> anyhow::Result<RelayRun> {
    let topology = crate::topology::new()?;
    let _origin = origin(&topology)?;
    let dir = tempfile::tempdir()?;
    let root = dir.path().display();
    let servers: String = [IPERF_PORT, ECHO_PORT]
        .iter()
        .map(|port| {
            format!(
                "  server {{ listen {GATEWAY_WORKLOAD_ADDR}:{}; proxy_pass {SERVER_A}:{port}; }}\n",
                port + PEER_OFFSET
            )
        })
        .collect();
    let config = format!(
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\ndaemon off;\nworker_processes 1;\n\
         pid {root}/nginx.pid;\nerror_log {root}/error.log;\nevents {{ worker_connections 4096; }}\n\
         stream {{\n{servers}}}\n"
    );
    let path = dir.path().join("nginx.conf");
    std::fs::write(&path, config)?;
    let mut command = topology.gateway.command("nginx");
    command.args(["-e", &format!("{root}/error.log"), "-p", &root.to_string(), "-c"]).arg(&path);
    spawned("nginx 1.22 (stream)", &topology, ("nginx", command))
}

fn spawned(name: &'static str, topology: &Topology, (program, command): (&str, Command)) -> anyhow::Result<RelayRun> {
    let mut process = Process::spawn(program, command)?;
    let listen = SocketAddr::new(GATEWAY_WORKLOAD_ADDR.parse()?, IPERF_PORT + PEER_OFFSET);
    wait_for_tcp(&topology.gateway, listen, &mut process)?;
    pin_tree(process.pid(), PROXY_CPU)?;
    measure(name, topology, Some(process.pid()), GATEWAY_WORKLOAD_ADDR, PEER_OFFSET)
}

/// Through the proxy whose processes descend from `pid` (none: no proxy), at `host`'s origin ports + `offset`.
fn measure(
    name: &'static str,
    topology: &Topology,
    pid: Option<u32>,
    host: &str,
    offset: u16,
) -> anyhow::Result<RelayRun> {
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64;
    let port = IPERF_PORT + offset;
    let endpoints = format!("cpu{CLIENT_CPU}");
    let ((((one_gbit, bytes), endpoints), machine), proxy) =
        tree_cpu_during(pid, || busy_during("cpu", || busy_during(&endpoints, || iperf(topology, host, port, "1"))))?;
    let gb = (bytes as f64 / 1e9).max(1e-9);
    let per_gb = |ticks: u64| ticks as f64 / hz / gb;
    let (many_gbit, _) = iperf(topology, host, port, MANY)?;
    let echo = SocketAddr::new(host.parse()?, ECHO_PORT + offset);
    let (p50, p99) = topology.workload.enter(|| ping_pong(echo))??;
    Ok(RelayRun {
        name,
        one_gbit,
        many_gbit,
        proxy_seconds_per_gb: pid.map(|_| per_gb(proxy.all())),
        machine_seconds_per_gb: machine.seconds / gb,
        endpoints_busy: endpoints.share,
        endpoints_seconds_per_gb: endpoints.seconds / gb,
        ping_pong_p50_us: p50,
        ping_pong_p99_us: p99,
        kernel_share: None,
    })
}

/// iperf3 from the workload for `SECONDS` with `streams` connections: Gbit/s received, and bytes received.
fn iperf(topology: &Topology, host: &str, port: u16, streams: &str) -> anyhow::Result<(f64, u64)> {
    let output = topology
        .workload
        .command("taskset")
        .args(["-c", CLIENT_CPU, "iperf3", "-c", host, "-p", &port.to_string(), "-t", SECONDS, "-P", streams, "-J"])
        .output()
        .context("running iperf3")?;
    let text = String::from_utf8_lossy(&output.stdout);
    let json: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("iperf3 printed {text}"))?;
    let received = &json["end"]["sum_received"];
    let (Some(bits), Some(bytes)) = (received["bits_per_second"].as_f64(), received["bytes"].as_u64()) else {
        anyhow::bail!("iperf3 to {host}:{port}: {text}{}", String::from_utf8_lossy(&output.stderr));
    };
    Ok((bits / 1e9, bytes))
}

/// How busy a CPU (or the whole machine) was while something ran.
#[derive(Clone, Copy, Debug)]
pub struct Busy {
    /// The share of the time it was busy.
    pub share: f64,
    /// Its busy CPU seconds.
    pub seconds: f64,
}

/// Runs `work`, noting how busy `cpu` was meanwhile: `/proc/stat`'s line `cpu` (the whole machine) or `cpuN`.
pub fn busy_during<T>(cpu: &str, work: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(T, Busy)> {
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64;
    let (busy_before, all_before) = busy_ticks(cpu)?;
    let done = work()?;
    let (busy_after, all_after) = busy_ticks(cpu)?;
    let busy = busy_after.saturating_sub(busy_before);
    let all = all_after.saturating_sub(all_before).max(1);
    Ok((done, Busy { share: busy as f64 / all as f64, seconds: busy as f64 / hz }))
}

/// Busy CPU time (all but idle and I/O wait) and all CPU time of `/proc/stat`'s line `cpu` (the whole machine) or
/// `cpuN`, in clock ticks.
fn busy_ticks(cpu: &str) -> anyhow::Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat
        .lines()
        .find(|line| line.split_whitespace().next() == Some(cpu))
        .with_context(|| format!("/proc/stat has no line {cpu}"))?;
    let ticks: Vec<u64> = line.split_whitespace().skip(1).filter_map(|field| field.parse().ok()).collect();
    let total: u64 = ticks.iter().take(8).sum();
    Ok((total - ticks.get(3).copied().unwrap_or(0) - ticks.get(4).copied().unwrap_or(0), total))
}

/// `PING_PONGS` one-byte round trips on one connection to the echo server: p50 and p99, µs.
fn ping_pong(echo: SocketAddr) -> anyhow::Result<(f64, f64)> {
    let mut stream = TcpStream::connect_timeout(&echo, Duration::from_secs(3))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut byte = [0u8; 1];
    let mut latencies = Vec::with_capacity(PING_PONGS);
    for i in 0..PING_PONGS + 1000 {
        let started = Instant::now();
        stream.write_all(&[i as u8])?;
        stream.read_exact(&mut byte)?;
        // The first thousand warm the path.
        if i >= 1000 {
            latencies.push(started.elapsed().as_secs_f64() * 1e6);
        }
    }
    latencies.sort_by(f64::total_cmp);
    let at = |quantile: f64| latencies[((latencies.len() as f64 * quantile) as usize).min(latencies.len() - 1)];
    Ok((at(0.50), at(0.99)))
}

/// Prints the table and the ratios the targets are stated in.
pub fn print(runs: &[(&'static str, RelayRun)]) {
    println!(
        "TCP relayed (iperf3 -t{SECONDS}, one connection and -P{MANY}; {PING_PONGS} one-byte round trips; medians of {} \
         rounds; CPU s/GB of the one connection; TCP congestion control {})",
        crate::http::ROUNDS,
        crate::topology::congestion_control()
    );
    println!(
        "{:<36} {:>10} {:>12} {:>14} {:>16} {:>16} {:>10} {:>10}",
        "through",
        "1 Gbit/s",
        "100 Gbit/s",
        "proxy CPU s/GB",
        "machine CPU s/GB",
        "CPU 0 busy, s/GB",
        "p50 us",
        "p99 us"
    );
    for (_, run) in runs {
        println!(
            "{:<36} {:>10.2} {:>12.2} {:>14} {:>16.3} {:>16} {:>10.1} {:>10.1}",
            run.name,
            run.one_gbit,
            run.many_gbit,
            run.proxy_seconds_per_gb.map_or("-".to_owned(), |v| format!("{v:.3}")),
            run.machine_seconds_per_gb,
            format!("{:.0} %, {:.3}", run.endpoints_busy * 100.0, run.endpoints_seconds_per_gb),
            run.ping_pong_p50_us,
            run.ping_pong_p99_us,
        );
    }
    let get = |key: &str| runs.iter().find(|(k, _)| *k == key).map(|(_, run)| run);
    if let Some(share) = get("sluice-kernel").and_then(|run| run.kernel_share) {
        println!("sluice (kernel): {:.1} % of the bytes handed on by the kernel, the rest by the proxy", share * 100.0);
    }
    let Some(sluice) = get("sluice-splice") else { return };
    if let Some(direct) = get("direct") {
        println!(
            "sluice (splice) throughput / direct = {:.2} (one connection), {:.2} (100)",
            sluice.one_gbit / direct.one_gbit.max(1e-9),
            sluice.many_gbit / direct.many_gbit.max(1e-9)
        );
        println!(
            "CPU 0 (iperf3's client and server) per GB, direct / sluice (splice) = {:.2}: one connection's ceiling \
             while that CPU is the busy one",
            direct.endpoints_seconds_per_gb / sluice.endpoints_seconds_per_gb.max(1e-9)
        );
        // Direct, one CPU carries the whole path; relayed, the proxy's CPU alone carries a connection's receive
        // and a second one's send (and, on a veth, that second one's receive): when it is the busy one, its cost
        // per GB against the whole direct path's bounds the one connection.
        for key in ["sluice-splice", "sluice-copy"] {
            if let Some(cpu) = get(key).and_then(|run| run.proxy_seconds_per_gb) {
                println!(
                    "machine CPU per GB direct / proxy CPU per GB {key} = {:.2}: one connection's ceiling while the \
                     proxy's CPU is the busy one",
                    direct.machine_seconds_per_gb / cpu.max(1e-9)
                );
            }
        }
    }
    if let (Some(haproxy), Some(cpu)) = (get("haproxy"), sluice.proxy_seconds_per_gb) {
        if let Some(peer) = haproxy.proxy_seconds_per_gb {
            println!("sluice (splice) proxy CPU per GB / HAProxy's = {:.2}", cpu / peer.max(1e-9));
        }
        println!(
            "sluice (splice) ping-pong p99 / HAProxy's = {:.2}",
            sluice.ping_pong_p99_us / haproxy.ping_pong_p99_us.max(1e-9)
        );
    }
}
