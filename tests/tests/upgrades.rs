//! Upgrades and restarts under steady load: an agent replaced by SIGTERM and a new start, by a new agent starting
//! beside it (a DaemonSet surge), and by `kill -9` and a new start. Workloads keep sending HTTP on kept-alive and on
//! new connections (proxied), TCP to a port allowed by address (forwarded by the kernel) and connections to a port
//! nobody registered (blackholed): not one allowed flow may fail across any replacement, not one proxied request
//! across a drained one, and the blackholed port is never reached.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Mutex,
    },
    time::Duration,
};

use sluice_tests::{
    agent::Bpffs,
    istio::{self, HTTPBIN, MESH_REGISTRY_ONLY},
    peers::{send_udp, Nginx, UdpSink},
    require_root,
    topology::{addr, GATEWAY_WORKLOAD_IFACE, SERVER_A},
    Agent, Topology,
};

/// What the workloads send, each from a thread of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flow {
    /// HTTP/1.1 to a registered host, many requests per connection (proxied).
    KeptAlive,
    /// HTTP/1.1 to a registered host, one request per connection (proxied).
    NewConnections,
    /// HTTP to a port allowed by address: forwarded by the kernel, never seen by the proxy.
    AllowedByAddress,
    /// Connections to a port nobody registered: each must time out (blackholed).
    Blackholed,
}

const FLOWS: [Flow; 4] = [Flow::KeptAlive, Flow::NewConnections, Flow::AllowedByAddress, Flow::Blackholed];

/// The replacements, in the order the test makes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Steady,
    Sigterm,
    Surge,
    Killed,
}

const PHASES: [Phase; 4] = [Phase::Steady, Phase::Sigterm, Phase::Surge, Phase::Killed];

const ALLOWED_PORT: u16 = 8080;
const BLACKHOLED_PORT: u16 = 9090;
const BLACKHOLED_UDP_PORT: u16 = 6000;

/// The steady load and what became of it, by phase and flow.
struct Load {
    stop: AtomicBool,
    phase: AtomicUsize,
    done: [[AtomicUsize; 4]; 4],
    failures: Mutex<Vec<(Phase, Flow, String)>>,
}

impl Load {
    fn new() -> Load {
        Load {
            stop: AtomicBool::new(false),
            phase: AtomicUsize::new(0),
            done: Default::default(),
            failures: Mutex::new(Vec::new()),
        }
    }

    fn phase(&self) -> Phase {
        PHASES[self.phase.load(Ordering::SeqCst)]
    }

    fn enter(&self, phase: Phase) {
        let index = PHASES.iter().position(|p| *p == phase).unwrap();
        self.phase.store(index, Ordering::SeqCst);
    }

    fn record(&self, phase: Phase, flow: Flow, outcome: Result<(), String>) {
        match outcome {
            Ok(()) => {
                let (p, f) = (phase as usize, FLOWS.iter().position(|x| *x == flow).unwrap());
                self.done[p][f].fetch_add(1, Ordering::Relaxed);
            }
            Err(why) => self.failures.lock().unwrap().push((phase, flow, why)),
        }
    }

    fn done(&self, phase: Phase, flow: Flow) -> usize {
        self.done[phase as usize][FLOWS.iter().position(|x| *x == flow).unwrap()].load(Ordering::Relaxed)
    }

    fn failed(&self, phase: Phase, flow: Flow) -> Vec<String> {
        let failures = self.failures.lock().unwrap();
        failures.iter().filter(|(p, f, _)| *p == phase && *f == flow).map(|(_, _, why)| why.clone()).collect()
    }

    /// Sends `flow` until told to stop (on a thread inside the workload's namespace).
    fn send(&self, flow: Flow) {
        let mut kept: Option<BufReader<TcpStream>> = None;
        while !self.stop.load(Ordering::SeqCst) {
            let phase = self.phase();
            let outcome = match flow {
                Flow::KeptAlive => kept_alive(&mut kept),
                Flow::NewConnections => one_request(addr(SERVER_A, 80), "httpbin.org"),
                Flow::AllowedByAddress => one_request(addr(SERVER_A, ALLOWED_PORT), "server-a"),
                Flow::Blackholed => blackholed(),
            };
            self.record(phase, flow, outcome);
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn connect(to: SocketAddr) -> Result<TcpStream, String> {
    let stream = TcpStream::connect_timeout(&to, Duration::from_secs(2)).map_err(|e| format!("connect: {e}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    Ok(stream)
}

/// One request on the kept connection (opened if there is none); the connection is dropped when the response asks.
fn kept_alive(kept: &mut Option<BufReader<TcpStream>>) -> Result<(), String> {
    if kept.is_none() {
        *kept = Some(BufReader::new(connect(addr(SERVER_A, 80))?));
    }
    let reader = kept.as_mut().unwrap();
    let request = "GET / HTTP/1.1\r\nHost: httpbin.org\r\n\r\n";
    let outcome = reader.get_mut().write_all(request.as_bytes()).map_err(|e| format!("write: {e}"));
    let closes = outcome.and_then(|()| read_response(reader));
    match closes {
        Ok(false) => Ok(()),
        Ok(true) => {
            *kept = None;
            Ok(())
        }
        Err(why) => {
            *kept = None;
            Err(why)
        }
    }
}

fn one_request(to: SocketAddr, host: &str) -> Result<(), String> {
    let mut reader = BufReader::new(connect(to)?);
    let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    reader.get_mut().write_all(request.as_bytes()).map_err(|e| format!("write: {e}"))?;
    read_response(&mut reader).map(|_| ())
}

/// Reads one response (200 with a Content-Length body); whether it asked to close the connection.
fn read_response(reader: &mut BufReader<TcpStream>) -> Result<bool, String> {
    let mut line = String::new();
    reader.read_line(&mut line).map_err(|e| format!("reading the status: {e}"))?;
    if !line.starts_with("HTTP/1.1 200") {
        return Err(format!("status line {line:?}"));
    }
    let (mut length, mut closes) = (0, false);
    loop {
        line.clear();
        reader.read_line(&mut line).map_err(|e| format!("reading headers: {e}"))?;
        let header = line.trim_end().to_ascii_lowercase();
        if header.is_empty() {
            break;
        }
        if let Some(value) = header.strip_prefix("content-length:") {
            length = value.trim().parse().map_err(|_| format!("bad length {header:?}"))?;
        }
        closes |= header == "connection: close";
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).map_err(|e| format!("reading the body: {e}"))?;
    Ok(closes)
}

/// A connection to the blackholed port: it must not be established.
fn blackholed() -> Result<(), String> {
    match TcpStream::connect_timeout(&addr(SERVER_A, BLACKHOLED_PORT), Duration::from_millis(200)) {
        Ok(_) => Err("a blackholed port was reached".into()),
        Err(_) => Ok(()),
    }
}

#[test]
fn replacing_the_agent_fails_no_allowed_flow_and_a_drained_one_no_proxied_request() {
    require_root();
    let topology = Topology::new().unwrap();
    let ports = [addr(SERVER_A, 80), addr(SERVER_A, ALLOWED_PORT)];
    let _nginx = Nginx::start(&topology.internet, &ports, "served").unwrap();
    let blackholed_server =
        topology.internet.enter(|| TcpListener::bind(addr(SERVER_A, BLACKHOLED_PORT))).unwrap().unwrap();
    blackholed_server.set_nonblocking(true).unwrap();
    let blackholed_udp = UdpSink::bind(&topology.internet, addr(SERVER_A, BLACKHOLED_UDP_PORT)).unwrap();
    let config = tempfile::tempdir().unwrap();
    istio::write(config.path(), &[MESH_REGISTRY_ONLY, HTTPBIN]).unwrap();
    let bpffs = Bpffs::mount().unwrap();
    let args = format!(
        "--intercept {GATEWAY_WORKLOAD_IFACE} --config {} --allow {SERVER_A}:{ALLOWED_PORT}/tcp \
         --drain-delay 3s --drain-timeout 5s",
        config.path().display()
    );
    let start = || Agent::start_pinned(&topology.gateway, &bpffs, &args).unwrap();
    let load = Load::new();

    let logs = std::thread::scope(|scope| {
        // The load begins once the first agent is up (connections opened before would be cut by its interception).
        let first = start();
        for flow in FLOWS {
            let (load, workload) = (&load, &topology.workload);
            scope.spawn(move || workload.enter(|| load.send(flow)).unwrap());
        }
        let steady = || std::thread::sleep(Duration::from_secs(1));
        let mut logs = Vec::new();
        steady();

        // SIGTERM, and the next agent started at once: the first drains while the second takes over.
        load.enter(Phase::Sigterm);
        first.terminate();
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while first.readiness().is_ok() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let draining = first.readiness().map_err(|e| format!("{e:#}"));
        let second = start();
        let (status, log) = first.wait_for_exit(Duration::from_secs(15));
        logs.push(("first", log));
        steady();

        // Surge: a new agent starts beside the running one, which hands the datapath over and drains by itself.
        load.enter(Phase::Surge);
        let third = start();
        let handed_over =
            second.wait_for_log("handed over and drained: waiting for SIGTERM", 1).map_err(|e| e.to_string());
        second.terminate();
        let (second_status, log) = second.wait_for_exit(Duration::from_secs(5));
        logs.push(("second", log));
        steady();

        // A crash: the kernel goes on alone until the next agent adopts the pins.
        load.enter(Phase::Killed);
        logs.push(("third", third.kill()));
        let fourth = start();
        steady();
        load.stop.store(true, Ordering::SeqCst);
        let (_, log) = fourth.stop();
        logs.push(("fourth", log));
        (logs, draining, status, handed_over, second_status)
    });
    let (logs, draining, first_status, handed_over, second_status) = logs;
    let all_logs: String = logs.iter().map(|(name, log)| format!("--- {name} agent ---\n{log}\n")).collect();

    let draining = draining.expect_err("readiness answers 200 after SIGTERM");
    assert!(draining.contains("503") || draining.contains("draining"), "readiness while draining: {draining}");
    assert!(first_status.is_some_and(|status| status.success()), "the first agent exits after its drain:\n{all_logs}");
    assert!(logs[0].1.contains("drained: no client connection is open"), "{all_logs}");
    handed_over.unwrap_or_else(|why| panic!("the surged agent hands over: {why}"));
    assert!(second_status.is_some_and(|status| status.success()), "{all_logs}");
    assert!(logs[3].1.contains("adopted="), "{all_logs}");

    for phase in PHASES {
        let counts: Vec<String> = FLOWS
            .iter()
            .map(|flow| format!("{flow:?} {}/{}", load.done(phase, *flow), load.failed(phase, *flow).len()))
            .collect();
        eprintln!("{phase:?}: done/failed {}", counts.join(", "));
        for flow in FLOWS {
            assert!(load.done(phase, flow) > 0, "{flow:?} made no progress in {phase:?}\n{all_logs}");
        }
        let may_fail = |flow| phase == Phase::Killed && matches!(flow, Flow::KeptAlive | Flow::NewConnections);
        for flow in FLOWS.into_iter().filter(|flow| !may_fail(*flow)) {
            let failed = load.failed(phase, flow);
            assert!(
                failed.is_empty(),
                "{} of {} {flow:?} failed in {phase:?}: {:?}\n{all_logs}",
                failed.len(),
                failed.len() + load.done(phase, flow),
                &failed[..failed.len().min(5)]
            );
        }
    }
    assert!(blackholed_server.accept().is_err(), "no connection reached the blackholed port");
    send_udp(&topology.workload, addr(SERVER_A, BLACKHOLED_UDP_PORT), 3, 64).unwrap();
    assert_eq!(blackholed_udp.drain(), 0);
    let lost =
        load.failed(Phase::Killed, Flow::KeptAlive).len() + load.failed(Phase::Killed, Flow::NewConnections).len();
    eprintln!("proxied requests failed across kill -9: {lost}");
}
