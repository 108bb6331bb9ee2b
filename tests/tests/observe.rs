//! `sluice observe` against a running agent: the flows it decides — requests forwarded and refused by the proxy,
//! packets blackholed in the kernel — printed as they happen, filtered by verdict, host and source.

use std::{
    io::Read,
    process::{Child, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::Value;
use sluice_tests::{
    agent::binary,
    http::{get, ECHO},
    istio::{self, HTTPBIN, MESH_REGISTRY_ONLY},
    peers::{curl, send_udp, Nginx},
    require_root,
    topology::{addr, GATEWAY_WORKLOAD_IFACE, SERVER_A, SERVER_B, WORKLOAD_ADDR},
    Agent, Topology,
};

/// api.example.com registered for TLS on 443: the port is handed to the proxy, which decides by server name.
const API_TLS: &str = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: api, namespace: egress}\n\
                       spec: {hosts: [api.example.com], ports: [{number: 443, name: tls, protocol: TLS}], resolution: NONE}\n";

/// A `sluice observe` running in the gateway's namespace, its output gathered as it comes; killed on drop.
struct Observer {
    child: Child,
    output: Arc<Mutex<String>>,
}

impl Observer {
    fn start(topology: &Topology, args: &[&str]) -> Observer {
        let mut child = topology
            .gateway
            .command(binary().to_str().unwrap())
            .arg("observe")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let output = Arc::new(Mutex::new(String::new()));
        let (mut stdout, gathered) = (child.stdout.take().unwrap(), output.clone());
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(read @ 1..) = stdout.read(&mut chunk) {
                gathered.lock().unwrap().push_str(&String::from_utf8_lossy(&chunk[..read]));
            }
        });
        Observer { child, output }
    }

    fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    fn json(&self) -> Vec<Value> {
        self.output().lines().map(|line| serde_json::from_str(line).unwrap()).collect()
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn sluice_observe_shows_each_flow_decided_with_its_verdict_and_filters_them() {
    require_root();
    let topology = Topology::new().unwrap();
    let _nginx = Nginx::start(&topology.internet, &[addr(SERVER_A, 80)], ECHO).unwrap();
    let config = tempfile::tempdir().unwrap();
    istio::write(config.path(), &[MESH_REGISTRY_ONLY, HTTPBIN, API_TLS]).unwrap();
    let agent = Agent::start(
        &topology.gateway,
        &format!("--intercept {GATEWAY_WORKLOAD_IFACE} --config {}", config.path().display()),
    )
    .unwrap();

    let everything = Observer::start(&topology, &["-o", "json"]);
    let blackholed = Observer::start(&topology, &["--verdict", "blackholed"]);
    let to_httpbin = Observer::start(&topology, &["--host", "httpbin.org", "--source", WORKLOAD_ADDR, "-o", "json"]);
    let mut counted = Observer::start(&topology, &["--count", "1", "-o", "json"]);
    // The observers connect while the flows go: rounds until each has seen what it waits for.
    let deadline = Instant::now() + Duration::from_secs(20);
    let seen = |verdict: &str| everything.json().iter().any(|flow| flow["verdict"] == verdict);
    let tls_seen = || everything.json().iter().any(|flow| flow["protocol"] == "tls");
    let mut counted_status = None;
    loop {
        counted_status = counted_status.or_else(|| counted.child.try_wait().unwrap());
        let filtered = !blackholed.output().is_empty() && !to_httpbin.output().is_empty();
        if seen("forwarded")
            && seen("refused")
            && seen("blackholed")
            && tls_seen()
            && filtered
            && counted_status.is_some()
        {
            break;
        }
        assert!(Instant::now() < deadline, "not every verdict observed:\n{}\n{}", everything.output(), agent.log());
        assert_eq!(get(&topology, "httpbin.org", SERVER_A, "/", &[]).0, 200);
        assert_eq!(get(&topology, "edition.cnn.com", SERVER_B, "/", &[]).0, 502);
        send_udp(&topology.workload, addr(SERVER_B, 6000), 1, 50).unwrap();
        // A TLS connection naming a host no ServiceEntry registers: reset by the proxy after its ClientHello.
        let resolve = format!("evil.example:443:{SERVER_B}");
        let _ = curl(&topology.workload, &["-sk", "--max-time", "2", "--resolve", &resolve, "https://evil.example/"]);
        std::thread::sleep(Duration::from_millis(200));
    }

    let flows = everything.json();
    // The last of each: a request begun before its observer connected has no details kept.
    let forwarded = flows.iter().rfind(|flow| flow["verdict"] == "forwarded").unwrap();
    assert_eq!((&forwarded["method"], &forwarded["path"]), (&"GET".into(), &"/".into()), "{forwarded}");
    assert_eq!(forwarded["by"], "proxy", "{forwarded}");
    assert_eq!(forwarded["host"], "httpbin.org", "{forwarded}");
    assert_eq!(forwarded["responseCode"], 200, "{forwarded}");
    assert_eq!(forwarded["cluster"], "outbound|80||httpbin.org", "{forwarded}");
    assert_eq!(forwarded["upstream"], "203.0.113.10:80", "{forwarded}");
    assert!(forwarded["source"].as_str().unwrap().starts_with(&format!("{WORKLOAD_ADDR}:")), "{forwarded}");
    let refused = flows.iter().rfind(|flow| flow["verdict"] == "refused" && flow["protocol"] == "HTTP/1.1").unwrap();
    assert_eq!((&refused["host"], &refused["responseCode"]), (&"edition.cnn.com".into(), &502.into()), "{refused}");
    assert_eq!(refused["cluster"], "BlackHoleCluster", "{refused}");
    let kernel = flows.iter().find(|flow| flow["verdict"] == "blackholed").unwrap();
    assert_eq!((&kernel["by"], &kernel["protocol"]), (&"kernel".into(), &"udp".into()), "{kernel}");
    assert_eq!(kernel["destination"], "203.0.113.20:6000", "{kernel}");
    let tls = flows.iter().find(|flow| flow["protocol"] == "tls").unwrap();
    assert_eq!((&tls["verdict"], &tls["host"]), (&"refused".into(), &"evil.example".into()), "{tls}");
    assert_eq!(tls["cluster"], "BlackHoleCluster", "{tls}");

    // Filtered: only the kernel's, as text lines…
    let text = blackholed.output();
    assert!(text.lines().all(|line| line.contains(" BLACKHOLED udp") && line.ends_with("[kernel]")), "{text}");
    assert!(text.contains(&format!(" -> {SERVER_B}:6000 ")), "{text}");
    // …only httpbin.org's from the workload…
    let httpbin = to_httpbin.json();
    assert!(!httpbin.is_empty() && httpbin.iter().all(|flow| flow["host"] == "httpbin.org"), "{httpbin:?}");
    // …and --count ends the command once it has printed that many.
    let status = counted_status.unwrap();
    assert!(status.success(), "{status:?}");
    assert_eq!(counted.json().len(), 1, "{}", counted.output());

    // A filter the agent does not know is refused, naming it.
    let output = topology
        .gateway
        .command("curl")
        .args(["-sS", "http://127.0.0.1:15000/observe?verdict=maybe"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&output.stdout).contains("verdict: \"maybe\""), "{output:?}");
}
