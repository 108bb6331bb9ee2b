//! `sluice status` against a running agent: what it enforces, on which interfaces, with what it rejected and what
//! its names resolve to, as text and as JSON.

use sluice_tests::{
    agent::binary,
    istio::{self, HTTPBIN, MESH_REGISTRY_ONLY},
    peers::Dnsmasq,
    require_root,
    topology::{GATEWAY_WORKLOAD_IFACE, INTERNET_ADDR, SERVER_B},
    Agent, Topology,
};

const DB_BY_DNS: &str = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: db, namespace: egress}\n\
                         spec: {hosts: [db.example], ports: [{number: 5353, name: udp, protocol: UDP}], resolution: DNS}\n";
const MISSING_BY_DNS: &str = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: missing, namespace: egress}\n\
                              spec: {hosts: [missing.example], ports: [{number: 5354, name: udp, protocol: UDP}], resolution: DNS}\n";
const BROKEN: &str =
    "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: broken, namespace: egress}\n\
                      spec: {hosts: ['*'], ports: [{number: 443, name: tls, protocol: TLS}]}\n";
const GATEWAY_8080: &str = "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: egress, namespace: istio-system}\n\
                            spec: {selector: {istio: egressgateway}, servers: [{port: {number: 8080, name: http, protocol: HTTP}, hosts: ['*']}]}\n";

/// What `sluice COMMAND ARGS…` printed in the gateway's namespace (where the agent's admin port is).
fn sluice(topology: &Topology, command: &str, args: &[&str]) -> String {
    let output = topology.gateway.command(binary().to_str().unwrap()).arg(command).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "sluice {command} {args:?}: {stderr}");
    String::from_utf8(output.stdout).unwrap()
}

fn status(topology: &Topology, args: &[&str]) -> String {
    sluice(topology, "status", args)
}

#[test]
fn sluice_status_says_what_the_running_agent_enforces_and_where_it_does_not() {
    require_root();
    let topology = Topology::new().unwrap();
    let _dns = Dnsmasq::start(&topology.internet, INTERNET_ADDR, &[("db.example", SERVER_B)]).unwrap();
    let config = tempfile::tempdir().unwrap();
    istio::write(config.path(), &[MESH_REGISTRY_ONLY, HTTPBIN, DB_BY_DNS, MISSING_BY_DNS, BROKEN, GATEWAY_8080])
        .unwrap();
    let args = format!(
        "--intercept {GATEWAY_WORKLOAD_IFACE} --intercept gw-missing --wait-for-interfaces --config {} \
         --dns-server {INTERNET_ADDR} --forward-proxy-port 3128 --allow-cidr 10.0.0.0/8",
        config.path().display()
    );
    let agent = Agent::start(&topology.gateway, &args).unwrap();

    let text = status(&topology, &[]);
    let expected = [
        "Sluice agent at 127.0.0.1:15000\n",
        "Ready:            no: no classifier on gw-missing (no such interface)\n",
        "Mode:             REGISTRY_ONLY (blackholed traffic: drop), policy generation 1\n",
        "  NOT ENFORCED:   gw-missing (no such interface)\n",
        "Proxy:            transparent :15001 for ports 80; Gateway ports 8080; forward proxy :3128\n",
    ];
    for line in expected {
        assert!(text.contains(line), "missing {line:?} in:\n{text}\n{}", agent.log());
    }
    assert!(text.contains("Resources:        Gateway 1, ServiceEntry 3\n"), "{text}");
    assert!(
        text.contains("Rejected:         1\n") && text.contains(": ServiceEntry egress/broken: spec.hosts[0]"),
        "{text}"
    );
    // Each name with its addresses and the TTL left (dnsmasq answers with --local-ttl=1), or why it has none.
    assert!(text.contains("DNS names:        2\n  db.example -> 203.0.113.20 (TTL "), "{text}");
    assert!(text.contains("\n  missing.example -> none (last lookup failed: "), "{text}");
    let datapath = text.lines().find(|line| line.starts_with("Datapath:")).unwrap();
    assert!(datapath.starts_with("Datapath:         program ") && datapath.ends_with(" on gw-wl"), "{text}");
    assert!(text.contains("L4 policy:        1 rules, 1 always-allowed ranges, 0 kernel denials\n"), "{text}");

    let json: serde_json::Value = serde_json::from_str(&status(&topology, &["-o", "json"])).unwrap();
    assert_eq!(json["ready"], false);
    assert_eq!(json["datapath"]["attached"], serde_json::json!(["gw-wl"]));
    assert!(json["datapath"]["programId"].as_u64().is_some_and(|id| id > 0), "{json}");
    assert_eq!(json["interceptPorts"], serde_json::json!([80]));
    assert_eq!(json["dns"]["db.example"], serde_json::json!([SERVER_B]));
    assert!(json["dnsAnswers"]["db.example"]["ttlSeconds"].as_u64().is_some_and(|ttl| ttl <= 1), "{json}");
    assert!(json["dnsAnswers"]["missing.example"]["error"].is_string(), "{json}");

    let output = topology
        .gateway
        .command(binary().to_str().unwrap())
        .args(["status", "--admin-addr", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("no agent's admin endpoint at 127.0.0.1:1"), "{output:?}");
}

fn routes(topology: &Topology, args: &[&str]) -> String {
    sluice(topology, "routes", args)
}

#[test]
fn sluice_routes_says_what_a_request_would_get_without_sending_it() {
    require_root();
    let topology = Topology::new().unwrap();
    // The sandbox's configuration: httpbin.org registered (resolution NONE) with a teapot route and a default one.
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples/sandbox");
    let agent =
        Agent::start(&topology.gateway, &format!("--intercept {GATEWAY_WORKLOAD_IFACE} --config {config}")).unwrap();

    let routed = routes(&topology, &["httpbin.org"]);
    for line in [
        "Decision:     forwarded\n",
        "Route:        httpbin\n",
        "Cluster:      outbound|80||httpbin.org\n",
        "Service:      httpbin.org\n",
        "Sent to:      the address dialled, port 80\n",
        "Target:       httpbin.org\n",
        "Source:       unknown workload\n",
    ] {
        assert!(routed.contains(line), "missing {line:?} in:\n{routed}\n{}", agent.log());
    }
    let teapot = routes(&topology, &["httpbin.org", "--path", "/status/418"]);
    assert!(teapot.contains("Decision:     answered by the gateway (directResponse)\n"), "{teapot}");
    assert!(teapot.contains("Route:        teapot\n") && teapot.contains("Status:       418\n"), "{teapot}");
    let refused = routes(&topology, &["edition.cnn.com"]);
    assert!(refused.contains("Decision:     refused by the gateway\nStatus:       502\n"), "{refused}");
    assert!(refused.contains("Flag:         -\nCluster:      BlackHoleCluster\n"), "{refused}");
    let fronted = routes(&topology, &["httpbin.org", "--address", SERVER_B]);
    assert!(fronted.contains("Status:       421\n"), "sent to another host's address: {fronted}");

    let json: serde_json::Value =
        serde_json::from_str(&routes(&topology, &["httpbin.org", "--address", "203.0.113.10", "-o", "json"])).unwrap();
    assert_eq!(json["decision"], "forwarded", "{json}");
    assert_eq!(json["address"], "203.0.113.10:80", "{json}");
    assert_eq!(json["hostMismatch"], false, "{json}");
}

const GOOGLE_APIS_TLS: &str = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: googleapis, namespace: egress}\n\
                               spec: {hosts: ['*.googleapis.com'], ports: [{number: 443, name: tls, protocol: TLS}], resolution: NONE}\n";
const DB_TCP: &str = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: db, namespace: egress}\n\
                      spec: {hosts: [db.internal], addresses: [203.0.113.20], ports: [{number: 5432, name: tcp, protocol: TCP}], resolution: NONE}\n";

#[test]
fn sluice_routes_says_what_a_tls_or_tcp_connection_would_get() {
    require_root();
    let topology = Topology::new().unwrap();
    let config = tempfile::tempdir().unwrap();
    istio::write(config.path(), &[MESH_REGISTRY_ONLY, GOOGLE_APIS_TLS, DB_TCP]).unwrap();
    let args = format!("--intercept {GATEWAY_WORKLOAD_IFACE} --config {}", config.path().display());
    let agent = Agent::start(&topology.gateway, &args).unwrap();

    let tls = routes(&topology, &["storage.googleapis.com", "--protocol", "tls"]);
    for line in [
        "Decision:     forwarded (relayed unread)\n",
        "Cluster:      outbound|443||*.googleapis.com\n",
        "Sent to:      the address dialled, port 443\n",
    ] {
        assert!(tls.contains(line), "missing {line:?} in:\n{tls}\n{}", agent.log());
    }
    let unregistered = routes(&topology, &["evil.example.com", "--protocol", "tls"]);
    assert!(
        unregistered.contains("Decision:     refused by the gateway (the connection is reset)\n"),
        "{unregistered}"
    );
    assert!(unregistered.contains("Cluster:      BlackHoleCluster\n"), "{unregistered}");

    let db = routes(&topology, &["--protocol", "tcp", "--address", "203.0.113.20:5432"]);
    for line in ["Decision:     forwarded (relayed unread)\n", "Cluster:      outbound|5432||db.internal\n"] {
        assert!(db.contains(line), "missing {line:?} in:\n{db}");
    }
    let json: serde_json::Value = serde_json::from_str(&routes(
        &topology,
        &["--protocol", "tcp", "--address", "203.0.113.99:5432", "-o", "json"],
    ))
    .unwrap();
    assert_eq!(json["cluster"], "BlackHoleCluster", "{json}");
    assert_eq!(json["protocol"], "tcp", "{json}");

    // A TCP connection is decided by where it goes: without --address there is nothing to decide.
    let output =
        topology.gateway.command(binary().to_str().unwrap()).args(["routes", "--protocol", "tcp"]).output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("address is required for tcp"), "{output:?}");
}
