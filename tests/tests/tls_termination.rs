//! TLS terminated at the gateway, end to end: a workload's curl (with and without client certificates) → the
//! agent's Gateway ports, where Gateway servers with `tls.mode` SIMPLE, MUTUAL and ISTIO_MUTUAL terminate TLS with
//! certificates from files, from `--credentials-dir` and from Istio's mounted workload certificate (rotated
//! while the agent runs) → the servers' HTTP routes → nginx in the internet namespace; and a DestinationRule's
//! `credentialName` originating mutual TLS to nginx.

use sluice_tests::{
    istio::{self, MESH_REGISTRY_ONLY},
    metrics::total,
    peers::Nginx,
    require_root,
    tls::{certificates, openssl_through, signed},
    topology::{addr, GATEWAY_WORKLOAD_ADDR, GATEWAY_WORKLOAD_IFACE, SERVER_A, SERVER_B},
    Agent, Topology,
};

/// nginx answering `backend` on SERVER_A:80, counting the requests it serves on 127.0.0.1:8080 (`stub_status`).
fn backend(topology: &Topology) -> Nginx {
    let config = format!(
        "server {{\n    listen {SERVER_A}:80;\n    location / {{ default_type text/plain; return 200 \"backend\\n\"; }}\n  }}\n  \
         server {{\n    listen 127.0.0.1:8080;\n    location / {{ stub_status; }}\n  }}\n"
    );
    Nginx::start_with(&topology.internet, &config, &[addr(SERVER_A, 80), addr("127.0.0.1", 8080)]).unwrap()
}

/// A VirtualService routing `hosts`' requests on the Gateway `gateway` to the backend, and the ServiceEntry that
/// registers the backend (nginx on SERVER_A:80).
fn routes_to_backend(gateway: &str, hosts: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: via-gateway, namespace: istio-system}}
spec:
  hosts: [{hosts}]
  gateways: [{gateway}]
  http:
  - route: [{{destination: {{host: backend.example, port: {{number: 80}}}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: backend, namespace: istio-system}}
spec:
  hosts: [backend.example]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints: [{{address: {SERVER_A}}}]
  resolution: STATIC
"
    )
}

/// The requests nginx has served so far (the status requests included).
fn served(topology: &Topology) -> u64 {
    let output = topology.internet.command("curl").args(["-sS", "http://127.0.0.1:8080/"]).output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    // "server accepts handled requests\n N N N"
    let counts = text.lines().nth(2).unwrap_or_default().split_whitespace().nth(2).unwrap_or_default().to_owned();
    counts.parse().unwrap_or_else(|_| panic!("stub_status: {text}"))
}

/// `curl` from the workload to `https://name:port/`, `name` resolved to the gateway, with `extra` arguments: what
/// it printed.
fn curl_output(topology: &Topology, name: &str, port: u16, extra: &[&str]) -> std::process::Output {
    topology
        .workload
        .command("curl")
        .args(["-sS", "--max-time", "5", "--resolve", &format!("{name}:{port}:{GATEWAY_WORKLOAD_ADDR}")])
        .args(extra)
        .arg(format!("https://{name}:{port}/"))
        .output()
        .unwrap()
}

/// [`curl_output`]'s "STATUS HTTP-VERSION BODY", or curl's error.
fn curl(topology: &Topology, name: &str, port: u16, extra: &[&str]) -> Result<String, String> {
    let output = curl_output(topology, name, port, &[&["-w", " %{http_code} %{http_version}"], extra].concat());
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

#[test]
fn simple_and_mutual_gateway_servers_terminate_tls_and_route_their_requests() {
    require_root();
    let topology = Topology::new().unwrap();
    let _backend = backend(&topology);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path();
    // The gateway's own certificates: one CA for the file-based servers, another for the credential's.
    let (ca, cert, key) = certificates(path, "gateway-ca", &["api.internal", "mtls.internal"]);
    let other = tempfile::tempdir().unwrap();
    let (other_ca, other_cert, other_key) = certificates(other.path(), "other-ca", &["other.internal"]);
    let credentials = tempfile::tempdir().unwrap();
    std::fs::create_dir(credentials.path().join("other-cert")).unwrap();
    std::fs::copy(&other_cert, credentials.path().join("other-cert/tls.crt")).unwrap();
    std::fs::copy(&other_key, credentials.path().join("other-cert/tls.key")).unwrap();
    // Clients' certificates: the expected identity, another identity, and one from a CA the gateway does not trust.
    let clients = tempfile::tempdir().unwrap();
    let (client_ca, _, _) = certificates(clients.path(), "client-ca", &["unused.client"]);
    let client = signed(clients.path(), "client-ca", "client", &["URI:spiffe://cluster.local/ns/apps/sa/client"]);
    let stranger = signed(clients.path(), "client-ca", "stranger", &["URI:spiffe://cluster.local/ns/apps/sa/stranger"]);
    // The right CA and identity, another key: only the pin tells it from the good client's.
    let twin = signed(clients.path(), "client-ca", "twin", &["URI:spiffe://cluster.local/ns/apps/sa/client"]);
    let forged = signed(other.path(), "other-ca", "forged", &["URI:spiffe://cluster.local/ns/apps/sa/client"]);
    // The good client's certificate pinned by its whole hash, as `openssl x509 -fingerprint -sha256` prints it.
    let fingerprint = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in", &client.0])
        .output()
        .unwrap();
    let fingerprint = String::from_utf8_lossy(&fingerprint.stdout);
    let pin = fingerprint.trim().rsplit('=').next().unwrap().to_owned();

    let config = tempfile::tempdir().unwrap();
    let routes = routes_to_backend("tls-gw", "api.internal, other.internal, mtls.internal");
    let gateway = format!(
        "apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: tls-gw, namespace: istio-system}}
spec:
  selector: {{istio: egressgateway}}
  servers:
  - port: {{number: 8443, name: https-api, protocol: HTTPS}}
    hosts: [istio-system/api.internal]
    tls: {{mode: SIMPLE, serverCertificate: {cert}, privateKey: {key}}}
  - port: {{number: 8443, name: https-other, protocol: HTTPS}}
    hosts: [other.internal]
    tls: {{mode: SIMPLE, credentialName: other-cert}}
  - port: {{number: 9443, name: https-mtls, protocol: HTTPS}}
    hosts: ['*']
    tls:
      mode: MUTUAL
      serverCertificate: {cert}
      privateKey: {key}
      caCertificates: {client_ca}
      subjectAltNames: [spiffe://cluster.local/ns/apps/sa/client]
      verifyCertificateHash: ['{pin}']
  - port: {{number: 8080, name: http, protocol: HTTP}}
    hosts: [api.internal]
    tls: {{httpsRedirect: true}}
  - port: {{number: 9000, name: tls-tcp, protocol: TLS}}
    hosts: ['*']
    tls: {{mode: SIMPLE, serverCertificate: {cert}, privateKey: {key}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: tcp-inside, namespace: istio-system}}
spec:
  hosts: ['*']
  gateways: [tls-gw]
  tcp:
  - match: [{{port: 9000}}]
    route: [{{destination: {{host: backend.example, port: {{number: 80}}}}}}]
---
{routes}"
    );
    // The access log names the server the ClientHello asked for, for requests inside terminated TLS.
    let mesh = format!("{MESH_REGISTRY_ONLY}    accessLogFile: /dev/stdout\n    accessLogFormat: \"sni=%REQUESTED_SERVER_NAME% path=%REQ(:PATH)%\\n\"\n");
    istio::write(config.path(), &[&mesh, &gateway]).unwrap();
    let args = format!(
        "--intercept {GATEWAY_WORKLOAD_IFACE} --intercept-port 80 --config {} --credentials-dir {} \
         --allow-cidr {GATEWAY_WORKLOAD_ADDR}/32",
        config.path().display(),
        credentials.path().display()
    );
    let agent = Agent::start(&topology.gateway, &args).unwrap();
    agent.wait_for_log("gateway listener open", 4).unwrap();

    // SIMPLE, by server name: the file certificate for one name, the credential's for the other.
    let ok = |version: &str| Ok(format!("backend\n 200 {version}"));
    assert_eq!(curl(&topology, "api.internal", 8443, &["--cacert", &ca]), ok("2"), "{}", agent.log());
    assert_eq!(curl(&topology, "other.internal", 8443, &["--cacert", &other_ca]), ok("2"), "{}", agent.log());
    agent.wait_for_log("sni=other.internal path=/", 1).unwrap();
    assert!(curl(&topology, "other.internal", 8443, &["--cacert", &ca]).is_err(), "not the file certificate");
    // HTTP/2 or HTTP/1.1 as ALPN settles it.
    assert_eq!(curl(&topology, "api.internal", 8443, &["--cacert", &ca, "--http1.1"]), ok("1.1"));
    // A name no server on the port takes: closed in the handshake.
    assert!(curl(&topology, "evil.internal", 8443, &["-k"]).is_err());

    // MUTUAL: the client's certificate must chain to the server's CA and carry the required identity.
    let mtls =
        |extra: &[&str]| curl(&topology, "mtls.internal", 9443, &[&["--cacert", ca.as_str()][..], extra].concat());
    let with = |(cert, key): &(String, String)| mtls(&["--cert", cert, "--key", key]);
    let before = served(&topology);
    assert_eq!(with(&client), ok("2"), "{}", agent.log());
    assert!(mtls(&[]).is_err(), "no client certificate");
    assert!(with(&forged).is_err(), "a certificate from a CA the server does not trust");
    assert!(with(&stranger).is_err(), "a trusted CA's certificate for another identity");
    assert!(with(&twin).is_err(), "the right identity from the right CA, but not the pinned certificate");
    assert_eq!(served(&topology), before + 2, "only the good client's request (and the status request) reached nginx");

    // A TLS server: terminated, the bytes inside relayed by the Gateway's tcp route (here to nginx, as HTTP/1.0).
    let relayed =
        openssl_through(&topology, 9000, "db.internal", &ca, None, b"GET / HTTP/1.0\r\nHost: anything\r\n\r\n");
    assert!(relayed.starts_with("HTTP/1.1 200") && relayed.ends_with("backend\n"), "{relayed}\n{}", agent.log());

    // httpsRedirect on the HTTP server: 301 to the same path over HTTPS.
    let redirect = topology
        .workload
        .command("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}"])
        .arg(format!("http://{GATEWAY_WORKLOAD_ADDR}:8080/path?q=1"))
        .args(["-H", "Host: api.internal:8080"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&redirect.stdout), "301 https://api.internal/path?q=1");

    let metrics = agent.metrics().unwrap();
    let mutual = [("connection_security_policy", "mutual_tls"), ("response_code", "200")];
    assert_eq!(total(&metrics, "istio_requests_total", &mutual), 1, "{metrics}");
    let plain_tls = [("connection_security_policy", "none"), ("response_code", "200")];
    assert_eq!(total(&metrics, "istio_requests_total", &plain_tls), 3, "{metrics}");
    for (reason, count) in [
        ("no_server", 1),
        ("no_client_certificate", 1),
        ("bad_client_certificate", 1),
        ("client_certificate_name", 1),
        ("client_certificate_pin", 1),
    ] {
        let failed = [("reason", reason)];
        assert_eq!(total(&metrics, "sluice_tls_handshake_failed_total", &failed), count, "{reason}: {metrics}");
    }
}

/// Makes `link` (a credential's directory) hold a certificate and key as a Secret's `tls.crt` and `tls.key`,
/// swapped in at once as Kubernetes swaps a Secret's volume: a new directory, then the link renamed over the old.
fn install_credential(link: &std::path::Path, (cert, key): (&str, &str), version: u32) {
    let parent = link.parent().unwrap();
    let data = parent.join(format!("..data-{version}"));
    std::fs::create_dir(&data).unwrap();
    std::fs::copy(cert, data.join("tls.crt")).unwrap();
    std::fs::copy(key, data.join("tls.key")).unwrap();
    let staged = parent.join(format!("..link-{version}"));
    std::os::unix::fs::symlink(&data, &staged).unwrap();
    std::fs::rename(&staged, link).unwrap();
}

/// An HTTP/1.1 connection over TLS kept open from the workload (openssl s_client), for requests one at a time.
struct KeptConnection {
    child: std::process::Child,
    lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
}

impl KeptConnection {
    fn open(topology: &Topology, name: &str, port: u16, ca: &str) -> KeptConnection {
        let mut child = topology
            .workload
            .command("openssl")
            .args(["s_client", "-quiet", "-verify_return_error", "-CAfile", ca, "-servername", name])
            .args(["-connect", &format!("{GATEWAY_WORKLOAD_ADDR}:{port}")])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        KeptConnection { child, lines: std::io::BufRead::lines(std::io::BufReader::new(stdout)) }
    }

    /// Sends `GET /` for `host` and reads the response up to its body's line; empty if the connection ended first.
    fn get(&mut self, host: &str) -> String {
        let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
        if std::io::Write::write_all(self.child.stdin.as_mut().unwrap(), request.as_bytes()).is_err() {
            return String::new();
        }
        self.lines.by_ref().map_while(Result::ok).find(|line| line == "backend").unwrap_or_default()
    }
}

impl Drop for KeptConnection {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits up to 10 s for `condition`.
fn eventually(mut condition: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    false
}

#[test]
fn istio_mutual_takes_the_mesh_identity_and_certificates_rotate_keeping_the_last_good_one() {
    require_root();
    let topology = Topology::new().unwrap();
    let _backend = backend(&topology);
    // The mesh: a root, the gateway's workload certificate as Istio mounts it, a sidecar's client certificate.
    let mesh = tempfile::tempdir().unwrap();
    let (root, _, _) = certificates(mesh.path(), "mesh-root", &["unused.mesh"]);
    let istio_certs = tempfile::tempdir().unwrap();
    let gateway_identity = ["URI:spiffe://cluster.local/ns/istio-system/sa/istio-egressgateway", "DNS:api.internal"];
    let (chain, key) = signed(mesh.path(), "mesh-root", "gateway", &gateway_identity);
    for (from, to) in [(&root, "root-cert.pem"), (&chain, "cert-chain.pem"), (&key, "key.pem")] {
        std::fs::copy(from, istio_certs.path().join(to)).unwrap();
    }
    let sidecar = signed(mesh.path(), "mesh-root", "sidecar", &["URI:spiffe://cluster.local/ns/apps/sa/client"]);
    // A credential to rotate: first from one CA, then another's.
    let (first, second) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (first_ca, first_cert, first_key) = certificates(first.path(), "first-ca", &["rotated.internal"]);
    let (second_ca, second_cert, second_key) = certificates(second.path(), "second-ca", &["rotated.internal"]);
    let credentials = tempfile::tempdir().unwrap();
    let rotated = credentials.path().join("rotated-cert");
    install_credential(&rotated, (&first_cert, &first_key), 1);

    let config = tempfile::tempdir().unwrap();
    // The seeds' Gateway (ISTIO_MUTUAL on 443), with a SIMPLE server beside it.
    let routes = routes_to_backend("istio-egress-gateway", "api.internal, rotated.internal");
    let gateway = format!(
        "apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: istio-egress-gateway, namespace: istio-system}}
spec:
  selector: {{istio: egressgateway}}
  servers:
  - port: {{number: 443, name: https, protocol: HTTPS}}
    hosts: [api.internal]
    tls: {{mode: ISTIO_MUTUAL}}
  - port: {{number: 9443, name: https-rotated, protocol: HTTPS}}
    hosts: [rotated.internal]
    tls: {{mode: SIMPLE, credentialName: rotated-cert}}
---
{routes}"
    );
    istio::write(config.path(), &[MESH_REGISTRY_ONLY, &gateway]).unwrap();
    let args = format!(
        "--intercept {GATEWAY_WORKLOAD_IFACE} --intercept-port 80 --config {} --credentials-dir {} \
         --istio-certs-dir {} --allow-cidr {GATEWAY_WORKLOAD_ADDR}/32",
        config.path().display(),
        credentials.path().display(),
        istio_certs.path().display()
    );
    let agent = Agent::start(&topology.gateway, &args).unwrap();
    agent.wait_for_log("gateway listener open", 2).unwrap();

    // The mesh's mTLS: the sidecar's certificate, checked against the mesh root; its identity in the metrics.
    let mesh_client = ["--cacert", root.as_str(), "--cert", sidecar.0.as_str(), "--key", sidecar.1.as_str()];
    assert_eq!(curl(&topology, "api.internal", 443, &mesh_client), Ok("backend\n 200 2".to_owned()), "{}", agent.log());
    assert!(curl(&topology, "api.internal", 443, &["--cacert", &root]).is_err(), "no client certificate");
    let metrics = agent.metrics().unwrap();
    let identified = [
        ("source_principal", "spiffe://cluster.local/ns/apps/sa/client"),
        ("source_workload_namespace", "apps"),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert_eq!(total(&metrics, "istio_requests_total", &identified), 1, "{metrics}");
    // When the certificates served expire, by where they come from: an alert can fire before one lapses.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    for name in ["istio-certs", "rotated-cert"] {
        let expiry = total(&metrics, "sluice_certificate_expiry_timestamp_seconds", &[("name", name)]);
        assert!(expiry > now && expiry < now + 3 * 86_400, "{name}: {expiry}\n{metrics}");
    }

    // Rotation: the credential's files replaced; new handshakes present the new certificate, and a connection
    // made before goes on with the old one.
    assert!(curl(&topology, "rotated.internal", 9443, &["--cacert", &first_ca]).is_ok(), "{}", agent.log());
    let mut kept = KeptConnection::open(&topology, "rotated.internal", 9443, &first_ca);
    assert_eq!(kept.get("rotated.internal"), "backend", "{}", agent.log());
    install_credential(&rotated, (&second_cert, &second_key), 2);
    let rotated_ok = || curl(&topology, "rotated.internal", 9443, &["--cacert", &second_ca]).is_ok();
    assert!(eventually(rotated_ok), "{}", agent.log());
    assert!(
        curl(&topology, "rotated.internal", 9443, &["--cacert", &first_ca]).is_err(),
        "the old certificate is gone"
    );
    assert_eq!(kept.get("rotated.internal"), "backend", "the connection made before the rotation was not dropped");

    // A bad credential (its key is not the certificate's) is refused alone: the last good certificate stays.
    install_credential(&rotated, (&second_cert, &first_key), 3);
    agent.wait_for_log("cannot be used: it keeps its last good certificate", 1).unwrap();
    assert!(rotated_ok(), "still served with the last good certificate");
    assert_eq!(curl(&topology, "api.internal", 443, &mesh_client), Ok("backend\n 200 2".to_owned()));
    let metrics = agent.metrics().unwrap();
    let rejected = [("kind", "Gateway"), ("name", "istio-egress-gateway")];
    assert_eq!(total(&metrics, "sluice_config_rejected", &rejected), 1, "{metrics}");
}

/// One HTTPS request from the workload to `name:port`, trusting `ca`: the issuer of the certificate the server
/// presented (`CN=…`), or curl's error.
fn issuer_served(topology: &Topology, name: &str, port: u16, ca: &str) -> Result<String, String> {
    let output = curl_output(topology, name, port, &["-v", "-o", "/dev/null", "--cacert", ca, "-w", "%{http_code}"]);
    let (status, verbose) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    let issuer = verbose.lines().find_map(|line| line.split_once("issuer: ").map(|(_, issuer)| issuer.to_owned()));
    match (output.status.success() && status == "200", issuer) {
        (true, Some(issuer)) => Ok(issuer),
        _ => Err(format!("status {status}: {verbose}")),
    }
}

#[test]
fn a_server_certificate_file_rotated_in_place_is_served_to_new_handshakes_with_no_request_failing() {
    require_root();
    let topology = Topology::new().unwrap();
    let _backend = backend(&topology);
    let (first, second) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (first_ca, first_cert, first_key) = certificates(first.path(), "first-ca", &["files.internal"]);
    let (second_ca, second_cert, second_key) = certificates(second.path(), "second-ca", &["files.internal"]);
    // The client trusts both CAs: the loop below tells the certificates apart by issuer.
    let both = first.path().join("both.pem");
    let bundle = [std::fs::read(&first_ca).unwrap(), std::fs::read(&second_ca).unwrap()].concat();
    std::fs::write(&both, bundle).unwrap();
    let both = both.to_str().unwrap();
    // The files the Gateway names, in a directory no flag tells the agent of.
    let served = tempfile::tempdir().unwrap();
    let (cert, key) = (served.path().join("server.pem"), served.path().join("server.key"));
    std::fs::copy(&first_cert, &cert).unwrap();
    std::fs::copy(&first_key, &key).unwrap();

    let config = tempfile::tempdir().unwrap();
    let routes = routes_to_backend("files-gateway", "files.internal");
    let gateway = format!(
        "apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: files-gateway, namespace: istio-system}}
spec:
  selector: {{istio: egressgateway}}
  servers:
  - port: {{number: 9443, name: https-files, protocol: HTTPS}}
    hosts: [files.internal]
    tls: {{mode: SIMPLE, serverCertificate: {}, privateKey: {}}}
---
{routes}",
        cert.display(),
        key.display()
    );
    istio::write(config.path(), &[MESH_REGISTRY_ONLY, &gateway]).unwrap();
    let args = format!(
        "--intercept {GATEWAY_WORKLOAD_IFACE} --intercept-port 80 --config {} --allow-cidr {GATEWAY_WORKLOAD_ADDR}/32",
        config.path().display()
    );
    let agent = Agent::start(&topology.gateway, &args).unwrap();
    agent.wait_for_log("gateway listener open", 1).unwrap();
    assert_eq!(issuer_served(&topology, "files.internal", 9443, both), Ok("CN=first-ca".to_owned()), "{}", agent.log());

    // A client making new connections in a loop while the files are replaced (each renamed over the old, as a
    // certificate manager writes them).
    let stop = std::sync::atomic::AtomicBool::new(false);
    let results = std::sync::Mutex::new(Vec::new());
    let seen = |issuer: &str| {
        let results = results.lock().unwrap();
        results.iter().filter(|result: &&Result<String, String>| result.as_deref() == Ok(issuer)).count()
    };
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let result = issuer_served(&topology, "files.internal", 9443, both);
                results.lock().unwrap().push(result);
            }
        });
        let looping = eventually(|| seen("CN=first-ca") >= 3);
        if looping {
            for (from, to) in [(&second_cert, &cert), (&second_key, &key)] {
                let staged = to.with_extension("new");
                std::fs::copy(from, &staged).unwrap();
                std::fs::rename(&staged, to).unwrap();
            }
        }
        let rotated = looping && eventually(|| seen("CN=second-ca") >= 3);
        // The loop stops before any assertion: the scope waits for it.
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(rotated, "{:?}\n{}", results.lock().unwrap(), agent.log());
    });
    let results = results.into_inner().unwrap();
    let failed: Vec<_> = results.iter().filter_map(|result| result.as_ref().err()).collect();
    assert!(failed.is_empty(), "{} of {} requests failed: {failed:?}", failed.len(), results.len());
    // From the first handshake with the new certificate on, only the new one.
    let first_new = results.iter().position(|result| result.as_deref() == Ok("CN=second-ca")).unwrap();
    assert!(results[first_new..].iter().all(|result| result.as_deref() == Ok("CN=second-ca")), "{results:?}");
}

#[test]
fn a_destination_rules_credential_name_originates_mutual_tls() {
    require_root();
    let topology = Topology::new().unwrap();
    // The destination: nginx requiring a client certificate from the client CA.
    let (origin, clients) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (origin_ca, origin_cert, origin_key) = certificates(origin.path(), "origin-ca", &["secure.backend"]);
    let (client_ca, _, _) = certificates(clients.path(), "client-ca", &["unused.client"]);
    let (client_cert, client_key) = signed(clients.path(), "client-ca", "gateway-client", &["DNS:gateway.client"]);
    let listen = addr(SERVER_B, 443);
    let server = format!(
        "server {{\n    listen {listen} ssl;\n    ssl_certificate {origin_cert};\n    ssl_certificate_key {origin_key};\n    \
         ssl_client_certificate {client_ca};\n    ssl_verify_client on;\n    \
         location / {{ default_type text/plain; return 200 \"client=$ssl_client_s_dn\\n\"; }}\n  }}\n"
    );
    let _origin = Nginx::start_with(&topology.internet, &server, &[listen]).unwrap();
    // The gateway's credential, as a Secret would hold it: its client certificate and key, the origin's CA.
    let credentials = tempfile::tempdir().unwrap();
    let credential = credentials.path().join("client-cred");
    std::fs::create_dir(&credential).unwrap();
    for (from, to) in [(&client_cert, "tls.crt"), (&client_key, "tls.key"), (&origin_ca, "ca.crt")] {
        std::fs::copy(from, credential.join(to)).unwrap();
    }
    let config = tempfile::tempdir().unwrap();
    let routes = format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: secure, namespace: egress}}
spec:
  hosts: [secure.backend, absent.backend]
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 443}}]
  resolution: STATIC
  endpoints: [{{address: {SERVER_B}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: secure, namespace: egress}}
spec:
  host: secure.backend
  trafficPolicy: {{tls: {{mode: MUTUAL, credentialName: client-cred, sni: secure.backend}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: absent, namespace: egress}}
spec:
  host: absent.backend
  trafficPolicy: {{tls: {{mode: MUTUAL, credentialName: absent-cred, sni: secure.backend}}}}
"
    );
    istio::write(config.path(), &[MESH_REGISTRY_ONLY, &routes]).unwrap();
    let args = format!(
        "--intercept {GATEWAY_WORKLOAD_IFACE} --intercept-port 80 --config {} --credentials-dir {}",
        config.path().display(),
        credentials.path().display()
    );
    let agent = Agent::start(&topology.gateway, &args).unwrap();
    let get = |host: &str| {
        let output = topology
            .workload
            .command("curl")
            .args(["-sS", "--max-time", "5", "-w", " %{http_code}", "--resolve", &format!("{host}:80:{SERVER_B}")])
            .arg(format!("http://{host}/"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    };
    // Plain HTTP from the workload; mutual TLS from the gateway, with the credential's certificate.
    assert_eq!(get("secure.backend"), "client=CN=gateway.client\n 200", "{}", agent.log());
    // A credential that is not there: refused, never sent in the clear.
    assert!(get("absent.backend").ends_with(" 503"), "{}", agent.log());
    assert!(agent.log().contains("absent-cred"), "the reason names the credential: {}", agent.log());
}
