//! A soak: mixed traffic through the agent for `SLUICE_SOAK_MINUTES` (1 by default; `cargo xtask soak --minutes
//! N` runs it longer) — HTTP/1.1 kept alive and on new connections, HTTP/2, TLS by server name, opaque TCP,
//! TCP allowed by address under a DNS ServiceEntry whose answers keep changing, and connections to a blackholed
//! port — while the configuration changes every second and the agent is replaced (SIGTERM and a new start)
//! every `RESTART_EVERY` (once, midway, in a short run). It prints the failures by cause and the agent's
//! resident memory, open descriptors, threads and metric series over time, and fails on any failed flow and on
//! growth that does not level off.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener},
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use sluice_tests::{
    agent::Bpffs,
    istio::{self, HTTPBIN, MESH_REGISTRY_ONLY},
    load::{self, Load},
    peers::{Dnsmasq, Nginx},
    require_root, tls,
    topology::{addr, GATEWAY_WORKLOAD_IFACE, INTERNET_ADDR, SERVER_A, SERVER_B},
    Agent, Topology,
};

const KEPT_ALIVE: &str = "HTTP/1.1 kept alive";
const NEW_CONNECTIONS: &str = "HTTP/1.1 on new connections";
const HTTP2: &str = "HTTP/2 (curl)";
const TLS: &str = "TLS by server name (curl)";
const OPAQUE_TCP: &str = "opaque TCP (relayed by address)";
const DNS_RESOLVED: &str = "TCP to a DNS ServiceEntry (kernel)";
const BLACKHOLED: &str = "connections to a blackholed port";
const FLOWS: [&str; 7] = [KEPT_ALIVE, NEW_CONNECTIONS, HTTP2, TLS, OPAQUE_TCP, DNS_RESOLVED, BLACKHOLED];

const TCP_PORT: u16 = 9000;
const DNS_PORT: u16 = 8080;
const BLACKHOLED_PORT: u16 = 9090;
/// How often the agent is replaced in a long soak.
const RESTART_EVERY: Duration = Duration::from_secs(300);

/// The registry: httpbin.org (HTTP, server A), tls.example (TLS, server B), store.example (TCP, server B) and
/// dns.example (TCP, resolved by DNS).
fn registry() -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: tls, namespace: egress}}\n\
         spec: {{hosts: [tls.example], addresses: ['{SERVER_B}'], ports: [{{number: 443, name: tls, protocol: TLS}}], resolution: NONE}}\n\
         ---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: store, namespace: egress}}\n\
         spec: {{hosts: [store.example], addresses: ['{SERVER_B}'], ports: [{{number: {TCP_PORT}, name: tcp, protocol: TCP}}], resolution: NONE}}\n\
         ---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: resolved, namespace: egress}}\n\
         spec: {{hosts: [dns.example], ports: [{{number: {DNS_PORT}, name: tcp-resolved, protocol: TCP}}], resolution: DNS}}\n"
    )
}

/// A ServiceEntry that changes with `step`: the configuration is rewritten every second.
fn churn(step: u64) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: churn, namespace: egress}}\n\
         spec: {{hosts: [churn-{step}.example], addresses: ['198.51.100.{}'], ports: [{{number: 80, name: http, protocol: HTTP}}], resolution: NONE}}\n",
        1 + step % 200
    )
}

/// A TCP server that speaks first (as databases do) and echoes a line.
fn banner_server(listener: TcpListener, stop: &AtomicBool) {
    listener.set_nonblocking(true).unwrap();
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((mut stream, _)) => {
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                std::thread::spawn(move || {
                    let _ = stream.write_all(b"hello\n");
                    let mut line = String::new();
                    if BufReader::new(&stream).read_line(&mut line).is_ok() {
                        let _ = stream.write_all(line.as_bytes());
                    }
                });
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// One exchange with the banner server at `to`.
fn banner_exchange(to: SocketAddr) -> Result<(), String> {
    let stream = load::connect(to)?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).map_err(|e| format!("reading the banner: {e}"))?;
    if line != "hello\n" {
        return Err(format!("banner {line:?}"));
    }
    reader.get_mut().write_all(b"ping\n").map_err(|e| format!("write: {e}"))?;
    line.clear();
    reader.read_line(&mut line).map_err(|e| format!("reading the echo: {e}"))?;
    (line == "ping\n").then_some(()).ok_or_else(|| format!("echo {line:?}"))
}

/// One request by curl from the workload; `Err` names curl's complaint.
fn curl(topology: &Topology, args: &[&str]) -> Result<(), String> {
    let output =
        topology.workload.command("curl").args(["-sS", "--max-time", "5", "-o", "/dev/null"]).args(args).output();
    let output = output.map_err(|e| format!("curl: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).trim().to_owned())
    }
}

/// Sends `flow` until the load stops (HTTP and TCP from a thread inside the workload's namespace).
fn send(topology: &Topology, load: &Load, flow: &'static str, ca: &str) {
    let proxied = addr(SERVER_A, 80);
    let pause = Duration::from_millis(20);
    let inside = |run: &(dyn Fn() + Sync)| topology.workload.enter(run).unwrap();
    match flow {
        KEPT_ALIVE => inside(&|| {
            let mut kept = None;
            load.send(flow, pause, || load::kept_alive(&mut kept, proxied, "httpbin.org"))
        }),
        NEW_CONNECTIONS => inside(&|| load.send(flow, pause, || load::one_request(proxied, "httpbin.org"))),
        HTTP2 => {
            let resolve = format!("httpbin.org:80:{SERVER_A}");
            load.send(flow, pause, || {
                curl(topology, &["--http2-prior-knowledge", "--resolve", &resolve, "http://httpbin.org/"])
            })
        }
        TLS => {
            let resolve = format!("tls.example:443:{SERVER_B}");
            load.send(flow, pause, || curl(topology, &["--cacert", ca, "--resolve", &resolve, "https://tls.example/"]))
        }
        OPAQUE_TCP => inside(&|| load.send(flow, pause, || banner_exchange(addr(SERVER_B, TCP_PORT)))),
        DNS_RESOLVED => inside(&|| load.send(flow, pause, || load::one_request(addr(SERVER_A, DNS_PORT), "dns"))),
        _ => inside(&|| load.send(flow, pause, || load::never_connects(addr(SERVER_A, BLACKHOLED_PORT)))),
    }
}

/// What the agent holds at one moment.
#[derive(Clone, Copy, Debug)]
struct Sample {
    at: Duration,
    agent: usize,
    rss_kib: u64,
    descriptors: usize,
    threads: usize,
    /// The runtime's tasks alive (`sluice_runtime_tasks`).
    tasks: u64,
    series: usize,
}

fn sample(agent: &Agent, index: usize, at: Duration) -> Option<Sample> {
    let proc = Path::new("/proc").join(agent.pid().to_string());
    let rss_kib = agent.resident_kib()?;
    let descriptors = std::fs::read_dir(proc.join("fd")).ok()?.count();
    let threads = std::fs::read_dir(proc.join("task")).ok()?.count();
    let metrics = agent.metrics().ok()?;
    let series = metrics.lines().filter(|line| !line.starts_with('#') && !line.is_empty()).count();
    let tasks = sluice_tests::agent::sample(&metrics, "sluice_runtime_tasks")?;
    Some(Sample { at, agent: index, rss_kib, descriptors, threads, tasks, series })
}

/// Within one agent's life, after its first third: its last third may hold no more than its middle third, but for
/// the allowance. Growth that levels off passes; growth that keeps on does not.
fn levels_off(samples: &[Sample], value: impl Fn(&Sample) -> u64, allowance: u64) -> Result<(), String> {
    let third = samples.len() / 3;
    if third < 2 {
        return Ok(());
    }
    let mean = |part: &[Sample]| part.iter().map(&value).sum::<u64>() / part.len() as u64;
    let (middle, last) = (mean(&samples[third..2 * third]), mean(&samples[2 * third..]));
    if last > middle + allowance {
        return Err(format!("grew from {middle} to {last} (allowed {allowance}) over {} samples", samples.len()));
    }
    Ok(())
}

#[test]
fn mixed_traffic_with_config_churn_dns_changes_and_restarts_fails_nothing_and_leaks_nothing() {
    require_root();
    let minutes: f64 = std::env::var("SLUICE_SOAK_MINUTES").ok().and_then(|m| m.parse().ok()).unwrap_or(1.0);
    let length = Duration::from_secs_f64(minutes * 60.0);
    let restart_every = RESTART_EVERY.min(length / 2);
    let every = if length > Duration::from_secs(600) { Duration::from_secs(10) } else { Duration::from_secs(2) };

    let topology = Topology::new().unwrap();
    let ports = [addr(SERVER_A, 80), addr(SERVER_A, DNS_PORT), addr(SERVER_B, DNS_PORT)];
    let _nginx = Nginx::start(&topology.internet, &ports, "served").unwrap();
    let certificates = tempfile::tempdir().unwrap();
    let (ca, cert, key) = tls::certificates(certificates.path(), "soak-ca", &["tls.example"]);
    let _tls = tls::tls_server(&topology, &[addr(SERVER_B, 443)], &cert, &key);
    let banner = topology.internet.enter(|| TcpListener::bind(addr(SERVER_B, TCP_PORT))).unwrap().unwrap();
    let blackholed = topology.internet.enter(|| TcpListener::bind(addr(SERVER_A, BLACKHOLED_PORT))).unwrap().unwrap();
    blackholed.set_nonblocking(true).unwrap();
    // dns.example's answers alternate between server A alone and servers A and B: the kernel's entries for it
    // change under the flow, which always goes to A.
    let answers = |both: bool| {
        let mut records = vec![("dns.example", SERVER_A)];
        if both {
            records.push(("dns.example", SERVER_B));
        }
        Dnsmasq::start(&topology.internet, INTERNET_ADDR, &records).unwrap()
    };
    let mut dns = Some(answers(false));
    let config = tempfile::tempdir().unwrap();
    istio::write(config.path(), &[MESH_REGISTRY_ONLY, HTTPBIN, &registry(), &churn(0)]).unwrap();
    let bpffs = Bpffs::mount().unwrap();
    let args = format!(
        "--intercept {GATEWAY_WORKLOAD_IFACE} --config {} --dns-server {INTERNET_ADDR} --drain-delay 2s \
         --drain-timeout 5s",
        config.path().display()
    );
    let start = || Agent::start_pinned(&topology.gateway, &bpffs, &args).unwrap();
    let load = Load::default();
    let stop_servers = AtomicBool::new(false);

    let (samples, logs) = std::thread::scope(|scope| {
        scope.spawn(|| banner_server(banner, &stop_servers));
        let mut agent = start();
        let mut index = 0;
        let senders: Vec<_> = FLOWS
            .iter()
            .map(|&flow| {
                let (topology, load, ca) = (&topology, &load, ca.as_str());
                scope.spawn(move || send(topology, load, flow, ca))
            })
            .collect();
        let began = Instant::now();
        let (mut samples, mut logs, mut step) = (Vec::new(), Vec::new(), 0);
        let (mut next_sample, mut next_restart) = (Duration::ZERO, restart_every);
        while began.elapsed() < length {
            std::thread::sleep(Duration::from_secs(1));
            step += 1;
            istio::write(config.path(), &[MESH_REGISTRY_ONLY, HTTPBIN, &registry(), &churn(step)]).unwrap();
            if step % 5 == 0 {
                // The old server first: the new one listens where it did.
                drop(dns.take());
                dns = Some(answers(step % 10 == 0));
            }
            let at = began.elapsed();
            if at >= next_sample {
                samples.extend(sample(&agent, index, at));
                next_sample = at + every;
            }
            if at >= next_restart {
                agent.terminate();
                let next = start();
                let (status, log) = std::mem::replace(&mut agent, next).wait_for_exit(Duration::from_secs(15));
                logs.push(format!("--- agent {index} ({status:?}) ---\n{log}"));
                index += 1;
                next_restart = at + restart_every;
            }
        }
        // The senders finish what they began before the servers go: an exchange cut by the test's own end is not
        // the agent's failure.
        load.stop();
        for sender in senders {
            let _ = sender.join();
        }
        stop_servers.store(true, Ordering::SeqCst);
        logs.push(format!("--- agent {index} ---\n{}", agent.log()));
        (samples, logs)
    });
    drop(dns);

    let header = ["seconds", "agent", "RSS KiB", "fds", "threads", "tasks", "series"];
    println!(
        "{:>7} {:>5} {:>9} {:>5} {:>7} {:>5} {:>6}",
        header[0], header[1], header[2], header[3], header[4], header[5], header[6]
    );
    for s in &samples {
        let seconds = s.at.as_secs_f64();
        println!(
            "{seconds:>7.0} {:>5} {:>9} {:>5} {:>7} {:>5} {:>6}",
            s.agent, s.rss_kib, s.descriptors, s.threads, s.tasks, s.series
        );
    }
    let totals = load.totals();
    for (flow, tally) in &totals {
        println!("{flow}: {} done, {} failed {:?}", tally.done, tally.failures(), tally.failed);
    }
    let tail_of_logs: String =
        logs.iter().map(|log| log.lines().rev().take(30).collect::<Vec<_>>().join("\n")).collect();
    for flow in FLOWS {
        let tally = totals.get(flow).cloned().unwrap_or_default();
        assert!(tally.done > 0, "{flow} made no progress\n{tail_of_logs}");
        // What every agent logged around each failure, rather than only the end of its log.
        let around: String =
            logs.iter().map(|log| load::log_around(log, &tally.failed_at)).collect::<Vec<_>>().join("\n");
        assert_eq!(
            tally.failures(),
            0,
            "{flow} failed at {:?}: {:?}\n--- the agents' logs around it ---\n{around}\n--- their ends ---\n{tail_of_logs}",
            tally.failed_at,
            tally.failed
        );
    }
    assert!(blackholed.accept().is_err(), "no connection reached the blackholed port");
    // The churn was applied, and the DNS answers followed, all along.
    let all_logs = logs.concat();
    let seconds = length.as_secs() as usize;
    let applied = all_logs.matches("policy applied").count();
    assert!(applied >= seconds / 2, "{applied} policies applied in {seconds} s\n{tail_of_logs}");
    assert!(all_logs.contains("DNS answers changed"), "{tail_of_logs}");
    let agents = samples.iter().map(|s| s.agent).max().unwrap_or(0);
    for index in 0..=agents {
        let life: Vec<Sample> = samples.iter().filter(|s| s.agent == index).copied().collect();
        let check = |what: &str, result: Result<(), String>| {
            result.unwrap_or_else(|why| panic!("agent {index}'s {what} {why}"));
        };
        check("resident memory", levels_off(&life, |s| s.rss_kib, 8 * 1024));
        check("open descriptors", levels_off(&life, |s| s.descriptors as u64, 32));
        check("threads", levels_off(&life, |s| s.threads as u64, 2));
        check("tasks", levels_off(&life, |s| s.tasks, 64));
        check("metric series", levels_off(&life, |s| s.series as u64, 16));
    }
}
