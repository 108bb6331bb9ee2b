//! TLS for the tests: certificates for TLS peers, made with openssl as an operator would, ClientHellos as a
//! client sends them (for tests that split or break them), nginx serving TLS, and curl as a TLS client.

use std::{net::SocketAddr, path::Path, sync::Arc};

use crate::{peers::Nginx, topology::addr, Topology};

/// A CA and a certificate it signs for `names` (the first is its common name), made with openssl in `dir`:
/// (ca.pem, cert.pem, key.pem).
pub fn certificates(dir: &Path, ca: &str, names: &[&str]) -> (String, String, String) {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let file = |f: &str| dir.join(f).to_str().unwrap().to_owned();
    let (ca_key, ca_pem) = (file(&format!("{ca}.key")), file(&format!("{ca}.pem")));
    let ca_subject = format!("/CN={ca}");
    openssl(
        &[&["req", "-x509"][..], &ec, &["-keyout", &ca_key, "-out", &ca_pem, "-days", "2", "-subj", &ca_subject]]
            .concat(),
    );
    let alt_names: Vec<String> = names.iter().map(|name| format!("DNS:{name}")).collect();
    let alt_names: Vec<&str> = alt_names.iter().map(String::as_str).collect();
    let (cert, key) = signed(dir, ca, "server", &alt_names);
    (ca_pem, cert, key)
}

/// A certificate signed by the CA `ca` that [`certificates`] made in `dir`, for `alt_names` (openssl's
/// `DNS:name`, `URI:spiffe://…`), written as `stem.pem` and `stem.key`: (cert, key).
pub fn signed(dir: &Path, ca: &str, stem: &str, alt_names: &[&str]) -> (String, String) {
    let file = |f: &str| dir.join(f).to_str().unwrap().to_owned();
    let (ca_key, ca_pem) = (file(&format!("{ca}.key")), file(&format!("{ca}.pem")));
    let (key, csr, cert, ext) = (
        file(&format!("{stem}.key")),
        file(&format!("{stem}.csr")),
        file(&format!("{stem}.pem")),
        file(&format!("{stem}.ext")),
    );
    std::fs::write(&ext, format!("subjectAltName={}\n", alt_names.join(","))).unwrap();
    let common_name = alt_names.first().and_then(|name| name.strip_prefix("DNS:")).unwrap_or(stem);
    let subject = format!("/CN={common_name}");
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    openssl(&[&["req"][..], &ec, &["-keyout", &key, "-out", &csr, "-subj", &subject]].concat());
    openssl(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        &ca_pem,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-out",
        &cert,
        "-days",
        "2",
        "-extfile",
        &ext,
    ]);
    (cert, key)
}

fn openssl(args: &[&str]) {
    let output = std::process::Command::new("openssl").args(args).output().expect("openssl runs");
    assert!(output.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
}

/// A ClientHello as rustls sends it for `name`, in one record.
/// Opens TLS from the workload to the gateway's `port` with openssl (`server_name` in the ClientHello, the
/// server verified against `ca`, presenting `client` when given), sends `request` inside, and returns what came
/// back before the connection closed.
pub fn openssl_through(
    topology: &Topology,
    port: u16,
    server_name: &str,
    ca: &str,
    client: Option<&(String, String)>,
    request: &[u8],
) -> String {
    use std::io::Write;
    let mut command = topology.workload.command("openssl");
    command
        .args(["s_client", "-quiet", "-connect", &format!("{}:{port}", crate::topology::GATEWAY_WORKLOAD_ADDR)])
        .args(["-servername", server_name, "-verify_return_error", "-CAfile", ca]);
    if let Some((cert, key)) = client {
        command.args(["-cert", cert, "-key", key]);
    }
    let mut openssl = command
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("openssl runs");
    openssl.stdin.as_mut().expect("piped").write_all(request).expect("openssl takes the request");
    String::from_utf8_lossy(&openssl.wait_with_output().expect("openssl ends").stdout).into_owned()
}

pub fn client_hello(name: &str) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring's defaults")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(name.to_owned()).expect("a DNS name");
    let mut client = rustls::ClientConnection::new(Arc::new(config), name).expect("a client");
    let mut bytes = Vec::new();
    while client.wants_write() {
        client.write_tls(&mut bytes).expect("writes to memory");
    }
    bytes
}

/// nginx serving TLS on `listen` for every name the certificate holds, answering with the name the client sent,
/// and counting the connections it accepts on a plain port (`stub_status` on 127.0.0.1:8080).
pub fn tls_server(topology: &Topology, listen: &[SocketAddr], cert: &str, key: &str) -> Nginx {
    tls_server_answering(topology, listen, (cert, key), "sni=$ssl_server_name")
}

/// As `tls_server`, answering `body` (nginx variables expanded).
pub fn tls_server_answering(
    topology: &Topology,
    listen: &[SocketAddr],
    (cert, key): (&str, &str),
    body: &str,
) -> Nginx {
    let servers: String = listen
        .iter()
        .map(|listen| {
            format!(
                "server {{\n    listen {listen} ssl;\n    ssl_certificate {cert};\n    ssl_certificate_key {key};\n    \
                 location / {{ default_type text/plain; return 200 \"{body}\\n\"; }}\n  }}\n"
            )
        })
        .collect();
    let status = "server {\n    listen 127.0.0.1:8080;\n    location / { stub_status; }\n  }\n";
    let mut listening = listen.to_vec();
    listening.push(addr("127.0.0.1", 8080));
    Nginx::start_with(&topology.internet, &(servers + status), &listening).unwrap()
}

/// The connections nginx has accepted so far (its TLS ports' and the status port's own).
pub fn accepted(topology: &Topology) -> u64 {
    let output = topology.internet.command("curl").args(["-sS", "http://127.0.0.1:8080/"]).output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    // "server accepts handled requests\n N N N"
    let counts = text.lines().nth(2).unwrap_or_default().split_whitespace().next().unwrap_or_default().to_owned();
    counts.parse().unwrap_or_else(|_| panic!("stub_status: {text}"))
}

/// `curl https://name/` from the workload, `name` resolved to `address`, trusting `ca`: the body, or the error.
pub fn https(topology: &Topology, name: &str, address: &str, ca: &str) -> Result<String, String> {
    let output = topology
        .workload
        .command("curl")
        .args(["-sS", "--max-time", "5", "--cacert", ca, "--resolve", &format!("{name}:443:{address}")])
        .arg(format!("https://{name}/"))
        .output()
        .unwrap();
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}
