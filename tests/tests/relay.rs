//! The byte relay, engine by engine (`--relay-engine splice|copy|kernel`), end to end: a workload's connections to a
//! registered TCP service → the gateway's classifier → the agent's proxy, which decides the connection by address
//! (or a `CONNECT` on the forward-proxy port) and relays its bytes → a server in the internet namespace that
//! speaks first, as databases do.
//! Each engine must carry large transfers both ways intact, pass half-closes and resets on, throttle a fast
//! sender to a slow receiver, keep a thousand connections apart, count every byte, and end its connections (not
//! hang them) when the agent dies.

use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use ring::digest::{Context, SHA256};
use sluice_tests::{
    istio::{self, MESH_REGISTRY_ONLY},
    metrics::total,
    packets, require_root,
    topology::{addr, GATEWAY_WORKLOAD_ADDR, GATEWAY_WORKLOAD_IFACE, SERVER_B},
    Agent, Topology,
};

const PORT: u16 = 9000;

const REGISTRY: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: store, namespace: egress}
spec:
  hosts: [store.example.com]
  addresses: [203.0.113.20]
  ports: [{number: 9000, name: tcp, protocol: TCP}]
  location: MESH_EXTERNAL
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: tunnelled, namespace: egress}
spec:
  hosts: [tunnel.example.com]
  ports: [{number: 9000, name: tcp, protocol: TCP}]
  location: MESH_EXTERNAL
  resolution: STATIC
  endpoints: [{address: 203.0.113.20}]
";

const FORWARD_PROXY_PORT: u16 = 3128;

/// Each transfer's size, both ways.
const LARGE: u64 = 1 << 30;
/// Bytes of one chunk of the test stream: a fixed random block with the chunk's number in its first 8 bytes, so
/// that a lost, repeated or reordered chunk changes the digest.
const CHUNK: usize = 64 * 1024;
/// Concurrent connections, each carrying `SMALL` bytes down.
const CONCURRENT: usize = 1000;
const SMALL: u64 = 64 * 1024;

fn block() -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    (0..CHUNK)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// The test stream of `size` bytes, chunk by chunk.
fn for_each_chunk(block: &[u8], size: u64, mut each: impl FnMut(&[u8]) -> std::io::Result<()>) -> std::io::Result<()> {
    let mut chunk = block.to_vec();
    let mut left = size;
    let mut number = 0u64;
    while left > 0 {
        chunk[..8].copy_from_slice(&number.to_le_bytes());
        let take = left.min(CHUNK as u64) as usize;
        each(&chunk[..take])?;
        left -= take as u64;
        number += 1;
    }
    Ok(())
}

fn digest_of(block: &[u8], size: u64) -> String {
    let mut context = Context::new(&SHA256);
    for_each_chunk(block, size, |chunk| {
        context.update(chunk);
        Ok(())
    })
    .unwrap();
    hex(context.finish().as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// What the server saw of connections the client reset.
type Seen = Arc<Mutex<Vec<String>>>;

/// The server: greets each connection with `ready\n`, then obeys one command byte —
/// `U` hash everything until the client's end and answer `DIGEST COUNT\n`; `D` + 8 bytes of size: send that much
/// of the test stream, then end; `R`: read one byte, then reset; `S`: read slowly until the end; `W`: read until
/// the connection fails, and note how; `E`: send back everything it reads until the end.
fn server(topology: &Topology) -> Seen {
    let listener = topology.internet.enter(|| TcpListener::bind(addr(SERVER_B, PORT))).unwrap().unwrap();
    let seen: Seen = Arc::default();
    let noted = seen.clone();
    std::thread::spawn(move || {
        let block = Arc::new(block());
        while let Ok((stream, _)) = listener.accept() {
            let (block, noted) = (block.clone(), noted.clone());
            std::thread::spawn(move || serve(stream, &block, &noted));
        }
    });
    seen
}

fn serve(mut stream: TcpStream, block: &[u8], seen: &Seen) {
    if stream.write_all(b"ready\n").is_err() {
        return;
    }
    let mut command = [0u8; 1];
    if stream.read_exact(&mut command).is_err() {
        return;
    }
    let mut buffer = vec![0u8; CHUNK];
    match command[0] {
        b'U' => {
            let (mut context, mut count) = (Context::new(&SHA256), 0u64);
            while let Ok(read @ 1..) = stream.read(&mut buffer) {
                context.update(&buffer[..read]);
                count += read as u64;
            }
            let _ = stream.write_all(format!("{} {count}\n", hex(context.finish().as_ref())).as_bytes());
        }
        b'D' => {
            let mut size = [0u8; 8];
            if stream.read_exact(&mut size).is_ok() {
                let _ = for_each_chunk(block, u64::from_le_bytes(size), |chunk| stream.write_all(chunk));
            }
        }
        b'R' => {
            let _ = stream.read(&mut buffer[..1]);
            let _ = socket_linger_zero(&stream);
        }
        b'S' => {
            while let Ok(1..) = stream.read(&mut buffer[..16 * 1024]) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        b'E' => {
            while let Ok(read @ 1..) = stream.read(&mut buffer) {
                if stream.write_all(&buffer[..read]).is_err() {
                    return;
                }
            }
        }
        b'W' => {
            stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let how = loop {
                match stream.read(&mut buffer) {
                    Ok(0) => break "end".to_owned(),
                    Ok(_) => continue,
                    Err(error) => break format!("{:?}", error.kind()),
                }
            };
            seen.lock().unwrap().push(how);
        }
        _ => {}
    }
}

/// Sets `stream` to reset when closed (SO_LINGER with a zero timeout), as a crashed or impatient peer does.
fn socket_linger_zero(stream: &TcpStream) -> std::io::Result<()> {
    nix::sys::socket::setsockopt(
        stream,
        nix::sys::socket::sockopt::Linger,
        &nix::libc::linger { l_onoff: 1, l_linger: 0 },
    )
    .map_err(std::io::Error::from)
}

/// A DestinationRule for the service whose `connectionPool.tcp` is `tcp` (YAML flow mapping).
fn store_rule(tcp: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: store, namespace: egress}}\n\
         spec:\n  host: store.example.com\n  trafficPolicy:\n    connectionPool:\n      tcp: {tcp}\n"
    )
}

/// A connection from the workload to the service, as it was accepted (nothing read).
fn dial(topology: &Topology) -> TcpStream {
    try_dial(topology).expect("connecting to the service")
}

/// A connection from the workload to the service, or why there is none. A connection the proxy accepts and
/// refuses at once can fail here already: the reset may arrive before the connect is reported.
fn try_dial(topology: &Topology) -> std::io::Result<TcpStream> {
    topology.workload.enter(|| TcpStream::connect_timeout(&addr(SERVER_B, PORT), Duration::from_secs(3))).unwrap()
}

/// A connection from the workload to the service, its greeting read.
fn connect(topology: &Topology) -> TcpStream {
    let mut stream = dial(topology);
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    stream.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut greeting = [0u8; 6];
    stream.read_exact(&mut greeting).expect("the server's greeting");
    assert_eq!(&greeting, b"ready\n");
    stream
}

/// Sends `size` bytes of the test stream, ends it, and reads the server's answer.
fn upload(topology: &Topology, block: &[u8], size: u64) -> Result<String, String> {
    let mut stream = connect(topology);
    stream.write_all(b"U").unwrap();
    for_each_chunk(block, size, |chunk| stream.write_all(chunk)).map_err(|error| format!("uploading: {error}"))?;
    stream.shutdown(Shutdown::Write).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).map_err(|error| format!("reading the answer after the half-close: {error}"))?;
    Ok(answer)
}

/// As `upload`, through a `CONNECT` tunnel on the forward-proxy port, the command byte in the same write as the
/// `CONNECT` request.
fn tunnel_upload(topology: &Topology, block: &[u8], size: u64) -> Result<String, String> {
    let proxy = addr(GATEWAY_WORKLOAD_ADDR, FORWARD_PROXY_PORT);
    let mut stream = topology
        .workload
        .enter(|| TcpStream::connect_timeout(&proxy, Duration::from_secs(3)))
        .unwrap()
        .map_err(|error| format!("connecting to the forward-proxy port: {error}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    stream.write_all(b"CONNECT tunnel.example.com:9000 HTTP/1.1\r\nHost: tunnel.example.com:9000\r\n\r\nU").unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).map_err(|error| format!("reading the CONNECT answer: {error}"))?;
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("CONNECT answered {head}"));
    }
    let mut greeting = [0u8; 6];
    stream.read_exact(&mut greeting).map_err(|error| format!("the server's greeting: {error}"))?;
    for_each_chunk(block, size, |chunk| stream.write_all(chunk)).map_err(|error| format!("uploading: {error}"))?;
    stream.shutdown(Shutdown::Write).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).map_err(|error| format!("reading the answer after the half-close: {error}"))?;
    Ok(answer)
}

fn ask_download(topology: &Topology, size: u64) -> TcpStream {
    let mut stream = connect(topology);
    stream.write_all(b"D").unwrap();
    stream.write_all(&size.to_le_bytes()).unwrap();
    stream
}

fn digest_read(stream: &mut TcpStream) -> Result<(String, u64), String> {
    let (mut context, mut count, mut buffer) = (Context::new(&SHA256), 0u64, vec![0u8; CHUNK]);
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => {
                context.update(&buffer[..read]);
                count += read as u64;
            }
            Err(error) => return Err(format!("the download failed after {count} bytes: {error}")),
        }
    }
    Ok((hex(context.finish().as_ref()), count))
}

fn start_agent<'a>(topology: &'a Topology, config: &std::path::Path, engine: &str) -> Agent<'a> {
    let args = format!(
        "--intercept {GATEWAY_WORKLOAD_IFACE} --intercept-port {PORT} --config {} --relay-engine {engine} \
         --forward-proxy-port {FORWARD_PROXY_PORT} --allow-cidr {GATEWAY_WORKLOAD_ADDR}/32 --access-log-format json",
        config.display()
    );
    Agent::start(&topology.gateway, &args).unwrap()
}

fn relays_with(engine: &str) {
    require_root();
    let topology = Topology::new().unwrap();
    let seen = server(&topology);
    let config = tempfile::tempdir().unwrap();
    istio::write(config.path(), &[MESH_REGISTRY_ONLY, REGISTRY]).unwrap();
    let agent = start_agent(&topology, config.path(), engine);
    assert!(agent.log().contains(&format!("relay_engine=\"{engine}\"")), "{}", agent.log());
    let dump: serde_json::Value = serde_json::from_str(&agent.config_dump().unwrap()).unwrap();
    assert_eq!(dump["proxy"]["relayEngine"], engine, "/config_dump says which engine relays");
    let block = block();
    let mut client_sent = 0u64;
    let mut server_sent = 0u64;

    // A gigabyte up, the client's half-close passed on after its last byte, and the answer back through the
    // half-closed connection.
    let started = Instant::now();
    let answer = upload(&topology, &block, LARGE).unwrap_or_else(|error| panic!("{error}\n{}", agent.log()));
    eprintln!(
        "{}",
        agent.log().lines().filter(|l| l.contains("ended its") || l.contains("relayed")).collect::<Vec<_>>().join("\n")
    );
    assert_eq!(answer, format!("{} {LARGE}\n", digest_of(&block, LARGE)), "{}", agent.log());
    eprintln!("{engine}: {LARGE} bytes up in {:?}", started.elapsed());
    client_sent += 1 + LARGE;
    server_sent += 6 + answer.len() as u64;
    // Each connection's access log line says how its bytes were relayed.
    let logged = format!("\"bytes_received\":{},", 1 + LARGE);
    let line = agent.log().lines().find(|line| line.contains(&logged)).map(str::to_owned);
    assert!(
        line.as_ref().is_some_and(|line| line.contains(&format!("\"relay_engine\":\"{engine}\""))),
        "the upload's access log line: {line:?}\n{}",
        agent.log()
    );

    // A gigabyte down, ended by the server.
    let started = Instant::now();
    let mut download = ask_download(&topology, LARGE);
    assert_eq!(digest_read(&mut download), Ok((digest_of(&block, LARGE), LARGE)), "{}", agent.log());
    eprintln!("{engine}: {LARGE} bytes down in {:?}", started.elapsed());
    client_sent += 9;
    server_sent += 6 + LARGE;
    drop(download);

    // Through a CONNECT tunnel, the client's first bytes sent with its CONNECT request, before the answer.
    let tunnelled =
        tunnel_upload(&topology, &block, 64 << 20).unwrap_or_else(|error| panic!("{error}\n{}", agent.log()));
    assert_eq!(tunnelled, format!("{} {}\n", digest_of(&block, 64 << 20), 64 << 20), "{}", agent.log());

    // A thousand connections at once, each with its own bytes.
    let mut streams: Vec<TcpStream> = (0..CONCURRENT).map(|_| ask_download(&topology, SMALL)).collect();
    let small = digest_of(&block, SMALL);
    for stream in &mut streams {
        assert_eq!(digest_read(stream), Ok((small.clone(), SMALL)), "{}", agent.log());
    }
    client_sent += 9 * CONCURRENT as u64;
    server_sent += (6 + SMALL) * CONCURRENT as u64;
    drop(streams);

    // The server resets: the client learns of it as a reset, not as an end.
    let mut reset = connect(&topology);
    reset.write_all(b"Rx").unwrap();
    let mut byte = [0u8; 1];
    let read = reset.read(&mut byte);
    assert!(
        matches!(&read, Err(error) if error.kind() == ErrorKind::ConnectionReset),
        "the server's reset reached the client as {read:?}"
    );
    client_sent += 2;
    server_sent += 6;

    // The client resets: so does the relay, towards the server.
    let waiting = connect(&topology);
    (&waiting).write_all(b"W").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    socket_linger_zero(&waiting).unwrap();
    drop(waiting);
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.lock().unwrap().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(*seen.lock().unwrap(), ["ConnectionReset"], "how the server saw the client's reset");
    client_sent += 1;
    server_sent += 6;

    if engine == "kernel" {
        // Every connection so far has ended, each its own way (ends, resets from either side): none of their
        // sockets or directions is left in the maps. (The slow one below is still draining when the test ends.)
        wait_for(|| kernel_relay_entries(&agent) == (0, 0))
            .unwrap_or_else(|| panic!("left in the maps: {:?}\n{}", kernel_relay_entries(&agent), agent.log()));
    }

    // A sender faster than its receiver is held back: what the relay takes is bounded by socket buffers, not by
    // how long the sender keeps sending.
    let slow = connect(&topology);
    (&slow).write_all(b"S").unwrap();
    slow.set_nonblocking(true).unwrap();
    let mut accepted = 0u64;
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        match (&slow).write(&block) {
            Ok(written) => accepted += written as u64,
            Err(error) if error.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
            Err(error) => panic!("writing to a slow receiver: {error}"),
        }
    }
    assert!(accepted < 64 << 20, "{accepted} bytes were taken from a sender to a receiver reading 320 KiB/s");
    drop(slow);

    // Every byte counted, whichever engine carried it (the slow and the reset connections are left out: how
    // much of them was relayed depends on when they ended).
    let metrics = agent.metrics().unwrap();
    let service = [("destination_service_name", "store.example.com")];
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut metrics = metrics;
    while total(&metrics, "istio_tcp_connections_closed_total", &service) < (CONCURRENT + 6) as u64
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
        metrics = agent.metrics().unwrap();
    }
    let received = total(&metrics, "istio_tcp_received_bytes_total", &service);
    let sent = total(&metrics, "istio_tcp_sent_bytes_total", &service);
    assert!(
        received >= client_sent && received < client_sent + (64 << 20),
        "received {received}, sent by clients {client_sent}"
    );
    assert!(sent >= server_sent && sent < server_sent + (1 << 20), "sent {sent}, sent by the server {server_sent}");

    if engine == "kernel" {
        // The kernel handed on the small downloads whole (their receivers keep up): bytes that never reached the
        // proxy, as its per-connection account says.
        let redirected: u64 = kernel_counts(&agent.log(), "redirected").iter().sum();
        assert!(redirected >= CONCURRENT as u64 * SMALL, "the kernel handed on {redirected} bytes\n{}", agent.log());
        // Every segment the verdict saw began where the one before it ended, or before (a retransmission): the
        // sequence numbers it follows are the segments' own.
        let gaps = kernel_counts(&agent.log(), "gaps");
        assert!(!gaps.is_empty() && gaps.iter().all(|&gaps| gaps == 0), "gaps {gaps:?}\n{}", agent.log());
    }

    // The agent dies in the middle of a transfer: the client's connection ends (reset or cut short), it does not
    // hang; a new agent relays again.
    let mut cut = ask_download(&topology, LARGE);
    let mut buffer = vec![0u8; CHUNK];
    cut.read_exact(&mut buffer).unwrap();
    agent.kill();
    cut.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut after = 0u64;
    let ended = loop {
        match cut.read(&mut buffer) {
            Ok(0) => break Ok(after),
            Ok(read) => after += read as u64,
            Err(error) => break Err(error.kind()),
        }
    };
    assert!(
        matches!(ended, Ok(count) if count < LARGE) || matches!(ended, Err(ErrorKind::ConnectionReset)),
        "a connection relayed by an agent that died ended as {ended:?}"
    );
    let agent = start_agent(&topology, config.path(), engine);
    let answer = upload(&topology, &block, 1 << 20).unwrap_or_else(|error| panic!("{error}\n{}", agent.log()));
    assert_eq!(answer, format!("{} {}\n", digest_of(&block, 1 << 20), 1 << 20), "{}", agent.log());
}

/// The entries of the agent's kernel relay maps — (sockets, directions) — read from the maps it holds open.
fn kernel_relay_entries(agent: &Agent) -> (usize, usize) {
    use aya::maps::{HashMap, Map, MapData, MapInfo, SockHash};
    let (mut sockets, mut directions) = (None, None);
    for entry in std::fs::read_dir(format!("/proc/{}/fdinfo", agent.pid())).unwrap().flatten() {
        let Ok(info) = std::fs::read_to_string(entry.path()) else { continue };
        let id = info.lines().find_map(|line| line.strip_prefix("map_id:")?.trim().parse::<u32>().ok());
        let Some((id, map)) = id.and_then(|id| Some((id, MapInfo::from_id(id).ok()?))) else { continue };
        match map.name_as_str() {
            Some("SLUICE_RSOCKS") => {
                let map = SockHash::<_, u64>::try_from(Map::SockHash(MapData::from_id(id).unwrap())).unwrap();
                sockets = Some(map.keys().count());
            }
            Some("SLUICE_RDIRS") => {
                let map = HashMap::<_, u64, sluice_common::RelayDirection>::try_from(Map::HashMap(
                    MapData::from_id(id).unwrap(),
                ))
                .unwrap();
                directions = Some(map.keys().count());
            }
            _ => {}
        }
    }
    (sockets.expect("the agent holds SLUICE_RSOCKS"), directions.expect("the agent holds SLUICE_RDIRS"))
}

/// The values of one of the kernel relay's per-direction counts in the agent's accounts of its connections.
fn kernel_counts(log: &str, count: &str) -> Vec<u64> {
    let field = format!("{count}: ");
    log.lines()
        .filter(|line| line.contains("relayed in the kernel"))
        .flat_map(|line| {
            line.match_indices(&field)
                .filter_map(|(at, _)| {
                    let digits: String = line[at + field.len()..].chars().take_while(char::is_ascii_digit).collect();
                    digits.parse::<u64>().ok()
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn the_splice_engine_relays_intact_passes_ends_and_resets_on_throttles_and_counts() {
    relays_with("splice");
}

#[test]
fn the_copy_engine_relays_intact_passes_ends_and_resets_on_throttles_and_counts() {
    relays_with("copy");
}

#[test]
fn the_kernel_engine_relays_intact_passes_ends_and_resets_on_throttles_and_counts() {
    relays_with("kernel");
}

/// `connectionPool.tcp.idleTimeout` of the destination's DestinationRule ends a relayed connection that went
/// quiet (the agent's own `--idle-timeout`, an hour, would not); one that keeps sending is kept.
#[test]
fn a_destination_rules_tcp_idle_timeout_ends_quiet_relayed_connections() {
    require_root();
    let topology = Topology::new().unwrap();
    let _seen = server(&topology);
    let config = tempfile::tempdir().unwrap();
    let rule = store_rule("{idleTimeout: 1s, connectTimeout: 2s}");
    istio::write(config.path(), &[MESH_REGISTRY_ONLY, REGISTRY, &rule]).unwrap();
    // Every engine: the kernel's moves bytes the proxy never sees, and must still tell busy from quiet.
    for engine in ["splice", "copy", "kernel"] {
        let agent = start_agent(&topology, config.path(), engine);
        let mut quiet = connect(&topology);
        let mut kept = connect(&topology);
        kept.write_all(b"U").unwrap();
        let started = Instant::now();
        for _ in 0..6 {
            std::thread::sleep(Duration::from_millis(400));
            kept.write_all(b"x").unwrap();
        }
        // The quiet one was closed after a second without a byte.
        let mut byte = [0u8; 1];
        let read = quiet.read(&mut byte);
        let elapsed = started.elapsed();
        assert!(matches!(read, Ok(0)), "{engine}: a connection quiet for {elapsed:?}: {read:?}\n{}", agent.log());
        // The one that kept sending is still relayed, both ways.
        kept.shutdown(Shutdown::Write).unwrap();
        let mut answer = String::new();
        kept.read_to_string(&mut answer).unwrap();
        assert!(answer.ends_with(" 6\n"), "{engine}: the server got the six bytes: {answer:?}\n{}", agent.log());
    }
}

/// `connectionPool.tcp.maxConnectionDuration` ends a relayed connection however busy it is (`DT` in its log
/// line), and `connectionPool.tcp.tcpKeepalive` turns keepalive on for the upstream socket at the rule's time.
#[test]
fn a_destination_rules_max_connection_duration_ends_busy_relays_and_its_keepalive_is_on_the_upstream_socket() {
    require_root();
    let topology = Topology::new().unwrap();
    let _seen = server(&topology);
    let config = tempfile::tempdir().unwrap();
    let rule = store_rule("{maxConnectionDuration: 2s, tcpKeepalive: {time: 7s, interval: 3s, probes: 4}}");
    istio::write(config.path(), &[MESH_REGISTRY_ONLY, REGISTRY, &rule]).unwrap();
    // Every engine: the kernel's relays bytes the proxy never sees, and must still end at the lifetime.
    for engine in ["splice", "copy", "kernel"] {
        let agent = start_agent(&topology, config.path(), engine);

        let mut busy = connect(&topology);
        let opened = Instant::now();
        busy.write_all(b"U").unwrap();
        // The agent's socket to the server keeps alive at the rule's time (the kernel's default is two hours).
        let sockets = topology.gateway.command("ss").args(["-Htno", "state", "established"]).output().unwrap();
        let sockets = String::from_utf8_lossy(&sockets.stdout).into_owned();
        // The one whose peer is the server (the client's, accepted transparently, has the server's address as its own).
        let server = format!("{SERVER_B}:{PORT}");
        let upstream = sockets.lines().find(|line| line.split_whitespace().nth(3) == Some(&server)).unwrap_or_default();
        // ss writes the time left as `6.992ms` (6 s 992 ms), `7sec`, or with minutes (`120min`).
        let timer = upstream.split("timer:(keepalive,").nth(1).and_then(|rest| rest.split(',').next());
        let timer = timer.unwrap_or_else(|| {
            panic!("no keepalive timer on the upstream socket: {upstream:?}\n{sockets}\n{}", agent.log())
        });
        let seconds: u32 = timer.split(|c: char| !c.is_ascii_digit()).next().and_then(|s| s.parse().ok()).unwrap_or(99);
        assert!(
            !timer.contains("min") && seconds <= 7,
            "keepalive after at most 7 s, not the kernel's 2 h: {upstream}"
        );

        // A byte every 200 ms: never idle, yet closed after two seconds.
        busy.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let ended = loop {
            assert!(opened.elapsed() < Duration::from_secs(6), "{engine}: still relayed after 6 s\n{}", agent.log());
            let _ = busy.write_all(b"x");
            match busy.read(&mut [0u8; 64]) {
                Ok(0) => break opened.elapsed(),
                Err(error) if error.kind() == ErrorKind::ConnectionReset => break opened.elapsed(),
                Ok(_) | Err(_) => {}
            }
        };
        assert!(
            ended >= Duration::from_millis(1800),
            "{engine}: ended after {ended:?}, before its lifetime\n{}",
            agent.log()
        );
        let logged = || agent.log().lines().any(|line| line.contains("\"response_flags\":\"DT\""));
        wait_for(logged).unwrap_or_else(|| panic!("{engine}: the connection's line carries DT\n{}", agent.log()));
        // Istio's TCP metrics: opened as `-`, closed (with its bytes) under the flag it ended with.
        let metrics = agent.metrics().unwrap();
        let series = |flag| [("destination_service_name", "store.example.com"), ("response_flags", flag)];
        assert_eq!(total(&metrics, "istio_tcp_connections_opened_total", &series("-")), 1, "{metrics}");
        assert_eq!(total(&metrics, "istio_tcp_connections_closed_total", &series("DT")), 1, "{metrics}");
        assert_eq!(total(&metrics, "istio_tcp_connections_closed_total", &series("-")), 0, "{metrics}");
        assert!(total(&metrics, "istio_tcp_received_bytes_total", &series("DT")) >= 10, "{metrics}");
    }
}

/// `connectionPool.tcp.maxConnections` bounds the connections relayed to a cluster at once: one more is closed
/// without a byte of the server's (`UO`, as Envoy's tcp_proxy refuses it), and a place freed is taken again.
#[test]
fn a_destination_rules_max_connections_bounds_relayed_connections() {
    require_root();
    let topology = Topology::new().unwrap();
    let _seen = server(&topology);
    let config = tempfile::tempdir().unwrap();
    let rule = store_rule("{maxConnections: 2}");
    istio::write(config.path(), &[MESH_REGISTRY_ONLY, REGISTRY, &rule]).unwrap();
    let agent = start_agent(&topology, config.path(), "splice");

    let first = connect(&topology);
    let _second = connect(&topology);
    // The third: no greeting, the connection ends.
    let mut greeting = Vec::new();
    // Closed or reset, without a byte of the server's (a reset may already fail the connect).
    if let Ok(mut third) = try_dial(&topology) {
        third.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = third.read_to_end(&mut greeting);
    }
    assert!(greeting.is_empty(), "a third was relayed: {greeting:?}\n{}", agent.log());
    let metrics = agent.metrics().unwrap();
    let overflowed = [("destination_service_name", "store.example.com"), ("response_flags", "UO")];
    assert_eq!(total(&metrics, "istio_tcp_connections_opened_total", &overflowed), 1, "{metrics}");
    // One closed: its place is free for the next.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        // Until the agent has seen the first close, the next is refused as the third was.
        if let Ok(mut next) = try_dial(&topology) {
            next.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut greeting = [0u8; 6];
            if next.read_exact(&mut greeting).is_ok() {
                assert_eq!(&greeting, b"ready\n");
                break;
            }
        }
        assert!(Instant::now() < deadline, "the freed place was not taken again\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A retransmission that overlaps bytes already relayed — TCP queues it whole, and the kernel engine's verdict is
/// handed it whole — reaches the server once, through every engine: the workload's segment carries 600 bytes the
/// server already has and 400 new ones (crafted with the connection's own sequence numbers, sent from a raw socket
/// in the workload's namespace), the client then sends the 400 itself as TCP would, and the server's echo must be
/// exactly the 400.
#[test]
fn a_retransmission_overlapping_relayed_bytes_reaches_the_server_once_with_every_engine() {
    require_root();
    let topology = Topology::new().unwrap();
    // Segments without timestamps are the crafted segment's shape; the workload's connections then carry none.
    topology.workload.sysctl("net.ipv4.tcp_timestamps", "0").unwrap();
    let _seen = server(&topology);
    let config = tempfile::tempdir().unwrap();
    istio::write(config.path(), &[MESH_REGISTRY_ONLY, REGISTRY]).unwrap();
    let first: Vec<u8> = (0..1000u32).map(|at| (at % 251) as u8).collect();
    let new: Vec<u8> = (0..400u32).map(|at| (at % 241) as u8 ^ 0x5a).collect();
    for engine in ["splice", "copy", "kernel"] {
        let agent = start_agent(&topology, config.path(), engine);
        let mut stream = connect(&topology);
        stream.write_all(b"E").unwrap();
        // The relay has joined the two sockets (the kernel engine's verdict sees what follows).
        std::thread::sleep(Duration::from_millis(300));
        stream.write_all(&first).unwrap();
        let mut echoed = vec![0u8; first.len()];
        stream.read_exact(&mut echoed).unwrap_or_else(|error| panic!("{engine}: the first echo: {error}"));
        assert_eq!(echoed, first, "{engine}");
        std::thread::sleep(Duration::from_millis(200));

        let (sent, received) = packets::sequence_numbers(&stream);
        let mut payload = first[first.len() - 600..].to_vec();
        payload.extend(&new);
        let local = stream.local_addr().unwrap();
        let segment =
            packets::tcp_data_segment(local, addr(SERVER_B, PORT), sent.wrapping_sub(600), received, &payload);
        topology
            .workload
            .enter(|| packets::send_raw(&segment, addr(SERVER_B, PORT)))
            .unwrap()
            .unwrap_or_else(|error| panic!("sending the crafted segment: {error}"));
        stream.write_all(&new).unwrap();

        let mut echoed = vec![0u8; new.len()];
        stream.read_exact(&mut echoed).unwrap_or_else(|error| panic!("{engine}: the second echo: {error}"));
        assert_eq!(echoed, new, "{engine}: the server was sent bytes it already had\n{}", agent.log());
        stream.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).unwrap_or_else(|error| panic!("{engine}: after the half-close: {error}"));
        assert!(rest.is_empty(), "{engine}: {} more bytes echoed\n{}", rest.len(), agent.log());
        if engine == "kernel" {
            // The verdict cut the overlap itself (splice and copy read through TCP, which skips it).
            wait_for(|| kernel_counts(&agent.log(), "trimmed").iter().sum::<u64>() >= 600)
                .unwrap_or_else(|| panic!("the verdict trimmed nothing\n{}", agent.log()));
        }
    }
}

/// Polls `done` for up to ten seconds.
fn wait_for(mut done: impl FnMut() -> bool) -> Option<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if done() {
            return Some(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// The kernel's socket map takes established sockets only: a client that ended its stream before the relay began
/// (a `CONNECT` with the upload and the half-close in the same burst) cannot join it. The kernel engine then relays
/// the connection by splice — the upload intact, the answer back through the half-closed connection — says so
/// once in its log, and the access log names the engine that carried it. Whether the client's FIN is in before
/// the join is a race the client does not control (a FIN that comes later is relayed by the kernel, as correct),
/// so tunnels are opened until one could not join, each checked whole.
#[test]
fn the_kernel_engine_splices_a_connection_that_cannot_join_the_socket_map() {
    require_root();
    let topology = Topology::new().unwrap();
    let _seen = server(&topology);
    let config = tempfile::tempdir().unwrap();
    istio::write(config.path(), &[MESH_REGISTRY_ONLY, REGISTRY]).unwrap();
    let agent = start_agent(&topology, config.path(), "kernel");
    let block = block();
    const SIZE: u64 = 16 * 1024;
    const TRIES: usize = 8;
    // Each tunnel's access-log line is written as it ends, with its bytes and the engine that carried them.
    let tunnels = || -> Vec<serde_json::Value> {
        agent
            .log()
            .lines()
            .filter(|line| line.contains("\"method\":\"CONNECT\""))
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    };
    let spliced = |lines: &[serde_json::Value]| lines.iter().any(|line| line["relay_engine"] != "kernel");
    for tunnel in 1..=TRIES {
        let proxy = addr(GATEWAY_WORKLOAD_ADDR, FORWARD_PROXY_PORT);
        let mut stream =
            topology.workload.enter(|| TcpStream::connect_timeout(&proxy, Duration::from_secs(3))).unwrap().unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut burst = b"CONNECT tunnel.example.com:9000 HTTP/1.1\r\nHost: tunnel.example.com:9000\r\n\r\nU".to_vec();
        for_each_chunk(&block, SIZE, |chunk| {
            burst.extend(chunk);
            Ok(())
        })
        .unwrap();
        stream.write_all(&burst).unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap_or_else(|error| panic!("{error}\n{}", agent.log()));
        let expected = format!("ready\n{} {SIZE}\n", digest_of(&block, SIZE));
        assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with(&expected), "{answer:?}\n{}", agent.log());
        wait_for(|| tunnels().len() == tunnel).unwrap_or_else(|| panic!("{tunnel} tunnels' lines\n{}", agent.log()));
        if spliced(&tunnels()) {
            break;
        }
    }
    let lines = tunnels();
    assert!(spliced(&lines), "none of {TRIES} tunnels fell back to splice\n{}", agent.log());
    for line in &lines {
        assert!(["kernel", "splice", "copy"].contains(&line["relay_engine"].as_str().unwrap_or_default()), "{line}");
        assert_eq!(line["bytes_received"], SIZE + 1, "the upload and its command byte: {line}");
        assert_eq!(line["bytes_sent"], 6 + 65 + SIZE.to_string().len() as u64 + 1, "greeting and answer: {line}");
    }
    assert_eq!(agent.log().matches("could not join the kernel relay").count(), 1, "{}", agent.log());
}
