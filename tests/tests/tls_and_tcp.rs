//! TLS decided by its ClientHello's server name and TCP by its address, end to end: a workload's curl, openssl
//! and raw sockets → the gateway's classifier → the agent, which reads the ClientHello without terminating TLS →
//! nginx serving TLS, and a server-first TCP server, in the internet namespace; with Istio configuration from files.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use sluice_tests::{
    istio::{self, MESH_REGISTRY_ONLY},
    metrics::total,
    peers::{Dnsmasq, Nginx, Postgres},
    require_root,
    tls::{accepted, certificates, client_hello, https, tls_server, tls_server_answering},
    topology::{addr, GATEWAY_WORKLOAD_ADDR, GATEWAY_WORKLOAD_IFACE, INTERNET_ADDR, SERVER_A, SERVER_B},
    Agent, Topology,
};

const REGISTRY: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: egress}
spec:
  hosts: [api.example.com]
  addresses: [203.0.113.10]
  ports: [{number: 443, name: tls, protocol: TLS}]
  location: MESH_EXTERNAL
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: googleapis, namespace: egress}
spec:
  hosts: ['*.googleapis.com']
  ports: [{number: 443, name: https, protocol: HTTPS}]
  location: MESH_EXTERNAL
  resolution: NONE
";

/// Sends `pieces` from the workload to `dst`, each in a segment of its own, and reads what comes back within a
/// second: the bytes, and whether the connection was closed (or reset).
fn send_in_pieces(topology: &Topology, dst: SocketAddr, pieces: &[Vec<u8>]) -> (Vec<u8>, bool) {
    topology
        .workload
        .enter(|| {
            let mut stream = TcpStream::connect_timeout(&dst, Duration::from_secs(3)).unwrap();
            stream.set_nodelay(true).unwrap();
            for piece in pieces {
                if stream.write_all(piece).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            stream.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            let mut answer = vec![0; 4096];
            match stream.read(&mut answer) {
                Ok(n) => (answer[..n].to_vec(), n == 0),
                // Nothing within the second: still open.
                Err(error) if matches!(error.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    (Vec::new(), false)
                }
                Err(_) => (Vec::new(), true),
            }
        })
        .unwrap()
}

/// The handshake message of a one-record hello, sent again as records of `size` bytes.
fn in_records(hello: &[u8], size: usize) -> Vec<Vec<u8>> {
    hello[5..]
        .chunks(size)
        .map(|fragment| {
            let mut record = vec![0x16, 3, 1];
            record.extend_from_slice(&(fragment.len() as u16).to_be_bytes());
            record.extend_from_slice(fragment);
            record
        })
        .collect()
}

#[test]
fn intercepted_tls_is_decided_by_its_server_name_and_nothing_unregistered_reaches_a_server() {
    require_root();
    let topology = Topology::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let names = ["api.example.com", "storage.googleapis.com", "evil.example"];
    let (ca, cert, key) = certificates(dir.path(), "sluice-test-ca", &names);
    let _nginx = tls_server(&topology, &[addr(SERVER_A, 443), addr(SERVER_B, 443)], &cert, &key);
    let _dns = Dnsmasq::start(&topology.internet, INTERNET_ADDR, &[("storage.googleapis.com", SERVER_B)]).unwrap();
    let config = tempfile::tempdir().unwrap();
    istio::write(config.path(), &[MESH_REGISTRY_ONLY, REGISTRY]).unwrap();
    let args = format!(
        "--intercept {GATEWAY_WORKLOAD_IFACE} --access-log-format text --intercept-port 80 --config {} --dns-server {INTERNET_ADDR}",
        config.path().display()
    );
    let agent = Agent::start(&topology.gateway, &args).unwrap();
    // 443 is named TLS by the configuration: handed to the proxy with the port the node intercepts.
    assert!(agent.log().contains("intercept_ports=[80, 443]"), "{}", agent.log());

    // A registered name at its own address: relayed, and the server's certificate verifies end to end.
    assert_eq!(https(&topology, "api.example.com", SERVER_A, &ca).as_deref(), Ok("sni=api.example.com\n"));
    // A wildcard registered at no address: relayed where the name resolves.
    let storage = https(&topology, "storage.googleapis.com", SERVER_B, &ca);
    assert_eq!(storage.as_deref(), Ok("sni=storage.googleapis.com\n"), "{}", agent.log());

    let before = accepted(&topology);
    // An unregistered name, even at a registered address.
    assert!(https(&topology, "evil.example", SERVER_A, &ca).is_err());
    // A registered name sent to another address (fronting), and a wildcard's name where it does not resolve.
    assert!(https(&topology, "api.example.com", SERVER_B, &ca).is_err());
    assert!(https(&topology, "storage.googleapis.com", SERVER_A, &ca).is_err());
    // No name at all, to an address nothing is registered at.
    let unnamed = topology
        .workload
        .command("openssl")
        .args(["s_client", "-connect", &format!("{SERVER_B}:443"), "-noservername"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&unnamed.stdout).contains("BEGIN CERTIFICATE"), "no server answered");
    // A broken ClientHello: a length that runs past its message.
    let mut broken = client_hello("api.example.com");
    broken[5 + 4 + 2 + 32] = 200;
    let (answer, closed) = send_in_pieces(&topology, addr(SERVER_A, 443), &[broken]);
    assert!(answer.is_empty() && closed, "{answer:?}");
    assert_eq!(accepted(&topology), before + 1, "none of them reached a server (the one is the status request's)");

    // No name, to a registered address: decided by the address, as the kernel decides other TCP.
    let unnamed = topology
        .workload
        .command("openssl")
        .args(["s_client", "-connect", &format!("{SERVER_A}:443"), "-noservername"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&unnamed.stdout).contains("BEGIN CERTIFICATE"), "the server answered");
    // A hello split over records of 100 bytes, each record in a segment of its own: read whole, then replayed.
    let split = in_records(&client_hello("api.example.com"), 100);
    assert!(split.len() >= 3, "{} records", split.len());
    let (answer, _) = send_in_pieces(&topology, addr(SERVER_A, 443), &split);
    assert_eq!(answer.first(), Some(&0x16), "the server's handshake came back: {answer:?}");

    let metrics = agent.metrics().unwrap();
    let blackholed = [("destination_service_name", "BlackHoleCluster"), ("response_flags", "UH")];
    assert_eq!(total(&metrics, "istio_tcp_connections_opened_total", &blackholed), 2, "{metrics}");
    let api = [("destination_service_name", "api.example.com"), ("response_flags", "-")];
    assert_eq!(total(&metrics, "istio_tcp_connections_opened_total", &api), 3, "{metrics}");
    assert!(total(&metrics, "istio_tcp_received_bytes_total", &api) > 0, "{metrics}");
    assert_eq!(total(&metrics, "sluice_host_mismatch_total", &[("action", "refused")]), 2, "{metrics}");
    let malformed = [("reason", "malformed")];
    assert_eq!(total(&metrics, "sluice_tls_client_hello_refused_total", &malformed), 1, "{metrics}");
    // Each connection's access-log line, as Istio's Envoys write TCP ones, with the name the client asked for.
    let log = agent.log();
    let refused = log.lines().find(|line| line.ends_with(" evil.example")).unwrap_or_else(|| panic!("{log}"));
    assert!(
        refused.contains("\"- - -\" 0 UH 0 0 ") && refused.contains(" BlackHoleCluster 203.0.113.10:443 "),
        "{refused}"
    );
    let relayed =
        log.lines().find(|line| line.contains(" outbound|443||api.example.com ")).unwrap_or_else(|| panic!("{log}"));
    assert!(relayed.contains("\"- - -\" 0 - ") && relayed.contains("\"203.0.113.10:443\""), "{relayed}");
}

#[test]
fn the_seeds_sni_egress_gateway_takes_mesh_traffic_and_its_own_port_to_the_registered_host() {
    require_root();
    let topology = Topology::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let names = ["www.googleapis.com", "storage.googleapis.com", "api.example.com"];
    let (ca, cert, key) = certificates(dir.path(), "sluice-test-ca", &names);
    // Each server says which it is: the route's destination (www.googleapis.com) resolves to server B.
    let servers: String = [SERVER_A, SERVER_B]
        .iter()
        .map(|server| {
            format!(
                "server {{\n    listen {server}:443 ssl;\n    ssl_certificate {cert};\n    ssl_certificate_key {key};\n    \
                 location / {{ default_type text/plain; return 200 \"{server} sni=$ssl_server_name\\n\"; }}\n  }}\n"
            )
        })
        .collect();
    let _nginx = Nginx::start_with(&topology.internet, &servers, &[addr(SERVER_A, 443), addr(SERVER_B, 443)]).unwrap();
    let _dns = Dnsmasq::start(&topology.internet, INTERNET_ADDR, &[("www.googleapis.com", SERVER_B)]).unwrap();
    let config = tempfile::tempdir().unwrap();
    // A second Gateway passing TLS through on the same port, with its own name and route.
    let second = "apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: api-passthrough, namespace: istio-system}
spec:
  selector: {istio: egressgateway}
  servers: [{port: {number: 443, name: tls, protocol: TLS}, hosts: [api.example.com], tls: {mode: PASSTHROUGH}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api, namespace: istio-system}
spec:
  hosts: [api.example.com]
  gateways: [api-passthrough]
  tls: [{match: [{port: 443, sniHosts: [api.example.com]}], route: [{destination: {host: api.example.com}}]}]
";
    let sni_egress = istio::seed("egress-gateway-sni");
    istio::write(config.path(), &[MESH_REGISTRY_ONLY, &sni_egress, REGISTRY, second]).unwrap();
    let args = format!(
        "--intercept {GATEWAY_WORKLOAD_IFACE} --access-log-format text --intercept-port 443 --config {} --dns-server {INTERNET_ADDR} \
         --allow-cidr {GATEWAY_WORKLOAD_ADDR}/32 \
         --gateway-service istio-egressgateway.istio-system.svc.cluster.local",
        config.path().display()
    );
    let agent = Agent::start(&topology.gateway, &args).unwrap();
    agent.wait_for_log("gateway listener open", 1).unwrap();

    // From the mesh: whatever address the workload dialled, the mesh route hands it to the gateway, whose route
    // sends it to www.googleapis.com's address, with the client's own name and end-to-end TLS.
    let mesh = https(&topology, "storage.googleapis.com", SERVER_A, &ca);
    assert_eq!(mesh.as_deref(), Ok(&*format!("{SERVER_B} sni=storage.googleapis.com\n")), "{}", agent.log());
    // To the gateway's own port (as another node's sidecar would send it): the Gateway's route.
    let direct = https(&topology, "storage.googleapis.com", GATEWAY_WORKLOAD_ADDR, &ca);
    assert_eq!(direct.as_deref(), Ok(&*format!("{SERVER_B} sni=storage.googleapis.com\n")), "{}", agent.log());
    // The other Gateway on the port routes its own name to its own host (server A).
    let api = https(&topology, "api.example.com", GATEWAY_WORKLOAD_ADDR, &ca);
    assert_eq!(api.as_deref(), Ok(&*format!("{SERVER_A} sni=api.example.com\n")), "{}", agent.log());
    // A name the Gateways serve no route for is closed there; from the mesh, it is unregistered.
    assert!(https(&topology, "evil.example", GATEWAY_WORKLOAD_ADDR, &ca).is_err());
    assert!(https(&topology, "evil.example", SERVER_A, &ca).is_err());
    // Plain HTTP to the port that only passes TLS through: refused as no ClientHello, no HTTP answer given.
    let plain = topology
        .workload
        .command("curl")
        .args(["-sS", "--max-time", "5", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("http://{GATEWAY_WORKLOAD_ADDR}:443/"))
        .output()
        .unwrap();
    assert!(!plain.status.success(), "plain HTTP on a PASSTHROUGH port: {plain:?}");
    assert_eq!(String::from_utf8_lossy(&plain.stdout), "000", "no HTTP status: {plain:?}");

    let metrics = agent.metrics().unwrap();
    let not_tls = [("reason", "not_tls")];
    assert_eq!(total(&metrics, "sluice_tls_client_hello_refused_total", &not_tls), 1, "{metrics}");
    let relayed = [("destination_service_name", "www.googleapis.com"), ("response_flags", "-")];
    assert_eq!(total(&metrics, "istio_tcp_connections_opened_total", &relayed), 2, "{metrics}");
    let no_route = [("response_flags", "NR")];
    assert_eq!(total(&metrics, "istio_tcp_connections_opened_total", &no_route), 1, "{metrics}");
    let blackholed = [("destination_service_name", "BlackHoleCluster"), ("response_flags", "UH")];
    assert_eq!(total(&metrics, "istio_tcp_connections_opened_total", &blackholed), 1, "{metrics}");
}

/// A server-first TCP server on `addr` (as a database greets its clients): it says `ready ADDR` on accepting,
/// then echoes one line back. Counts the connections it accepts.
fn greeting_server(topology: &Topology, addr: SocketAddr) -> Arc<AtomicUsize> {
    let listener = topology.internet.enter(|| TcpListener::bind(addr)).unwrap().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    std::thread::spawn(move || {
        while let Ok((mut stream, _)) = listener.accept() {
            counter.fetch_add(1, Ordering::SeqCst);
            let _ = stream.write_all(format!("ready {addr}\n").as_bytes());
            let mut line = String::new();
            if BufReader::new(&stream).read_line(&mut line).is_ok() {
                let _ = stream.write_all(format!("echo {line}").as_bytes());
            }
        }
    });
    accepted
}

/// Connects from the workload to `dst`, reads the greeting without saying anything first, then sends a line and
/// reads its echo: both lines, or what went wrong.
fn greet(topology: &Topology, dst: SocketAddr) -> Result<(String, String), String> {
    topology
        .workload
        .enter(|| {
            let stream = TcpStream::connect_timeout(&dst, Duration::from_secs(3)).map_err(|e| e.to_string())?;
            stream.set_read_timeout(Some(Duration::from_secs(3))).map_err(|e| e.to_string())?;
            let mut reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
            let mut greeting = String::new();
            reader.read_line(&mut greeting).map_err(|e| e.to_string())?;
            (&stream).write_all(b"hello\n").map_err(|e| e.to_string())?;
            let mut echo = String::new();
            reader.read_line(&mut echo).map_err(|e| e.to_string())?;
            if greeting.is_empty() {
                return Err("closed without a greeting".into());
            }
            Ok((greeting, echo))
        })
        .unwrap()
}

#[test]
fn the_seeds_tcp_egress_gateway_relays_a_server_first_protocol_by_address_and_route() {
    require_root();
    let topology = Topology::new().unwrap();
    let db = greeting_server(&topology, addr(SERVER_B, 5432));
    let other = greeting_server(&topology, addr(SERVER_A, 5432));
    let _dns = Dnsmasq::start(&topology.internet, INTERNET_ADDR, &[("db.external-service.com", SERVER_B)]).unwrap();
    let config = tempfile::tempdir().unwrap();
    let tcp_egress = istio::seed("egress-gateway-tcp");
    istio::write(config.path(), &[MESH_REGISTRY_ONLY, &tcp_egress]).unwrap();
    let args = format!(
        "--intercept {GATEWAY_WORKLOAD_IFACE} --access-log-format text --intercept-port 80 --config {} --dns-server {INTERNET_ADDR} \
         --allow-cidr {GATEWAY_WORKLOAD_ADDR}/32 \
         --gateway-service istio-egressgateway.istio-system.svc.cluster.local",
        config.path().display()
    );
    let agent = Agent::start(&topology.gateway, &args).unwrap();
    agent.wait_for_log("gateway listener open", 1).unwrap();
    // 5432 is named by the mesh's tcp route: handed to the proxy with the port the node intercepts.
    assert!(agent.log().contains("intercept_ports=[80, 5432]"), "{}", agent.log());

    // From the mesh, to the database's address: the mesh route, then the gateway's, to the registered host; the
    // client says nothing until the server has greeted it.
    let expected = (format!("ready {SERVER_B}:5432\n"), "echo hello\n".to_owned());
    assert_eq!(greet(&topology, addr(SERVER_B, 5432)), Ok(expected.clone()), "{}", agent.log());
    // To the gateway's own TCP server port.
    assert_eq!(greet(&topology, addr(GATEWAY_WORKLOAD_ADDR, 5432)), Ok(expected), "{}", agent.log());
    // To an address nothing registers on that port: reset, and nothing reached it.
    assert!(greet(&topology, addr(SERVER_A, 5432)).is_err());
    assert_eq!((db.load(Ordering::SeqCst), other.load(Ordering::SeqCst)), (2, 0));

    let metrics = agent.metrics().unwrap();
    let relayed = [("destination_service_name", "db.external-service.com"), ("response_flags", "-")];
    assert_eq!(total(&metrics, "istio_tcp_connections_opened_total", &relayed), 2, "{metrics}");
    let blackholed = [("destination_service_name", "BlackHoleCluster"), ("response_flags", "UH")];
    assert_eq!(total(&metrics, "istio_tcp_connections_opened_total", &blackholed), 1, "{metrics}");
}

#[test]
fn allow_any_passes_unregistered_names_through_and_slow_or_odd_hellos_are_handled() {
    require_root();
    let topology = Topology::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificates(dir.path(), "sluice-test-ca", &["api.example.com", "anything.example"]);
    let _nginx = tls_server(&topology, &[addr(SERVER_A, 443), addr(SERVER_B, 443)], &cert, &key);
    let db_a = greeting_server(&topology, addr(SERVER_A, 5432));
    let db_b = greeting_server(&topology, addr(SERVER_B, 5432));
    let config = tempfile::tempdir().unwrap();
    // Two TCP services on one port, told apart by their addresses.
    let databases = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db-a, namespace: egress}
spec:
  hosts: [db-a.example]
  addresses: [203.0.113.10]
  ports: [{number: 5432, name: pg, protocol: TCP}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db-b, namespace: egress}
spec:
  hosts: [db-b.example]
  addresses: [203.0.113.20]
  ports: [{number: 5432, name: pg, protocol: TCP}]
  resolution: NONE
";
    istio::write(config.path(), &[REGISTRY, databases]).unwrap();
    let args = format!(
        "--intercept {GATEWAY_WORKLOAD_IFACE} --access-log-format text --intercept-port 443 --intercept-port 5432 --config {} \
         --outbound-traffic-policy ALLOW_ANY --request-headers-timeout 1s",
        config.path().display()
    );
    let agent = Agent::start(&topology.gateway, &args).unwrap();

    // ALLOW_ANY: an unregistered name goes to the address the client dialled (PassthroughCluster).
    assert_eq!(https(&topology, "anything.example", SERVER_B, &ca).as_deref(), Ok("sni=anything.example\n"));
    // A TLS 1.2 client.
    let tls12 = topology
        .workload
        .command("openssl")
        .args(["s_client", "-tls1_2", "-connect", &format!("{SERVER_A}:443"), "-servername", "api.example.com"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&tls12.stdout);
    assert!(said.contains("Protocol  : TLSv1.2") || said.contains("TLSv1.2"), "{said}");
    // One record's hello split over two TCP segments.
    let hello = client_hello("api.example.com");
    let (first, second) = hello.split_at(hello.len() / 2);
    let (answer, _) = send_in_pieces(&topology, addr(SERVER_A, 443), &[first.to_vec(), second.to_vec()]);
    assert_eq!(answer.first(), Some(&0x16), "the server's handshake came back: {answer:?}");
    // Half a hello, then nothing: cut off after the header timeout, never relayed.
    let started = std::time::Instant::now();
    let (answer, closed) = topology
        .workload
        .enter(|| {
            let mut stream = TcpStream::connect_timeout(&addr(SERVER_A, 443), Duration::from_secs(3)).unwrap();
            stream.write_all(&hello[..hello.len() / 2]).unwrap();
            stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut answer = Vec::new();
            let closed = stream.read_to_end(&mut answer).is_ok() || answer.is_empty();
            (answer, closed)
        })
        .unwrap();
    assert!(answer.is_empty() && closed && started.elapsed() < Duration::from_secs(5), "{answer:?}");

    // TCP by address: each database's connections under its own name.
    let (a, _) = greet(&topology, addr(SERVER_A, 5432)).unwrap();
    let (b, _) = greet(&topology, addr(SERVER_B, 5432)).unwrap();
    assert_eq!((a, b), (format!("ready {SERVER_A}:5432\n"), format!("ready {SERVER_B}:5432\n")));
    assert_eq!((db_a.load(Ordering::SeqCst), db_b.load(Ordering::SeqCst)), (1, 1));

    let metrics = agent.metrics().unwrap();
    let passthrough = [("destination_service", "anything.example"), ("destination_service_name", "PassthroughCluster")];
    assert_eq!(total(&metrics, "istio_tcp_connections_opened_total", &passthrough), 1, "{metrics}");
    let timeout = [("reason", "timeout")];
    assert_eq!(total(&metrics, "sluice_tls_client_hello_refused_total", &timeout), 1, "{metrics}");
    for database in ["db-a.example", "db-b.example"] {
        let opened = [("destination_service_name", database)];
        assert_eq!(total(&metrics, "istio_tcp_connections_opened_total", &opened), 1, "{database}: {metrics}");
    }
}

/// An SSLv2-compatible ClientHello (the two-byte record header with its high bit set, as old clients send to
/// reach TLS 1.0 servers): it carries no extensions, so no server name.
fn sslv2_compatible_hello() -> Vec<u8> {
    let ciphers: [u8; 6] = [0x00, 0x00, 0x2f, 0x00, 0x00, 0x35];
    let challenge = [0x5a; 16];
    let mut body = vec![0x01, 0x03, 0x01];
    for length in [ciphers.len(), 0, challenge.len()] {
        body.extend_from_slice(&(length as u16).to_be_bytes());
    }
    body.extend_from_slice(&ciphers);
    body.extend_from_slice(&challenge);
    let mut hello = vec![0x80 | (body.len() >> 8) as u8, body.len() as u8];
    hello.extend_from_slice(&body);
    hello
}

/// `psql` from the workload to `address`: the address the server says the connection reached
/// (`inet_server_addr()`), or what went wrong.
fn psql_server_address(topology: &Topology, address: &str) -> Result<String, String> {
    let output = topology
        .workload
        .command("psql")
        .arg(format!("host={address} port=5432 user=postgres dbname=postgres connect_timeout=5"))
        .args(["-Atc", "select host(inet_server_addr())"])
        .output()
        .unwrap();
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

#[test]
fn weighted_tls_and_tcp_routes_split_connections_psql_reaches_postgres_and_sslv2_hellos_go_by_address() {
    require_root();
    let topology = Topology::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificates(dir.path(), "sluice-test-ca", &["api.example.com"]);
    let listen = [addr(SERVER_A, 443), addr(SERVER_B, 443), addr(INTERNET_ADDR, 443)];
    let _nginx = tls_server_answering(&topology, &listen, (&cert, &key), "at=$server_addr");
    let _postgres = Postgres::start(&topology.internet, &[SERVER_A, SERVER_B], 5432).unwrap();
    let config = tempfile::tempdir().unwrap();
    let split =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/corpus/valid/weighted-split.yaml")).unwrap();
    istio::write(config.path(), &[MESH_REGISTRY_ONLY, &split]).unwrap();
    let args = format!(
        "--intercept {GATEWAY_WORKLOAD_IFACE} --access-log-format text --intercept-port 80 --config {}",
        config.path().display()
    );
    let agent = Agent::start(&topology.gateway, &args).unwrap();
    assert!(agent.log().contains("intercept_ports=[80, 443, 5432]"), "{}", agent.log());

    // The name at its virtual IP, split between the two pools by the route's weights.
    let mut pools = std::collections::BTreeMap::new();
    for _ in 0..24 {
        let answer =
            https(&topology, "api.example.com", "198.51.100.1", &ca).unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
        *pools.entry(answer).or_insert(0) += 1;
    }
    let seen: Vec<_> = pools.keys().cloned().collect();
    assert_eq!(seen, [format!("at={SERVER_A}\n"), format!("at={SERVER_B}\n")], "{pools:?}");

    // psql to the database's virtual IP: PostgreSQL's own protocol (SSLRequest, startup, query) relayed to the
    // endpoint of the subset the tcp route picks, each subset in turn by weight.
    let mut servers = std::collections::BTreeSet::new();
    for _ in 0..16 {
        servers
            .insert(psql_server_address(&topology, "198.51.100.2").unwrap_or_else(|e| panic!("{e}\n{}", agent.log())));
    }
    assert_eq!(servers.into_iter().collect::<Vec<_>>(), [SERVER_A, SERVER_B]);
    // An endpoint's own address is db.example's too: its route applies.
    assert!(psql_server_address(&topology, SERVER_B).is_ok());

    // An SSLv2-compatible hello names no server: decided by the address dialled, as TCP is — relayed to a
    // registered one, refused at an unregistered one before anything reaches it.
    let before = accepted(&topology);
    send_in_pieces(&topology, addr(SERVER_A, 443), &[sslv2_compatible_hello()]);
    assert_eq!(accepted(&topology), before + 2, "relayed to nginx (and the status request)");
    let (answer, closed) = send_in_pieces(&topology, addr(INTERNET_ADDR, 443), &[sslv2_compatible_hello()]);
    assert!(answer.is_empty() && closed);
    assert_eq!(accepted(&topology), before + 3, "only the status requests: nothing reached the unregistered address");

    let metrics = agent.metrics().unwrap();
    for pool in ["pool-a.internal", "pool-b.internal"] {
        let opened = [("destination_service_name", pool)];
        assert!(total(&metrics, "istio_tcp_connections_opened_total", &opened) >= 1, "{pool}: {metrics}");
    }
    let databases = [("destination_service_name", "db.example")];
    assert_eq!(total(&metrics, "istio_tcp_connections_opened_total", &databases), 17, "{metrics}");
    let blackholed = [("destination_service_name", "BlackHoleCluster")];
    assert_eq!(total(&metrics, "istio_tcp_connections_opened_total", &blackholed), 1, "{metrics}");
}
