//! Tests of Gateway servers' TLS: which server a name picks, the settings made ready or refused with a reason.

use std::path::PathBuf;

use super::*;
use crate::config::gateway::Server;

fn server(yaml: &str) -> Server {
    serde_yaml_ng::from_str(yaml).unwrap_or_else(|e| panic!("{yaml}: {e}"))
}

/// A self-signed certificate for `name` (also naming a SPIFFE identity), valid from 2020 to 2099 or, `expired`,
/// only through 2020; and its key, written in `dir`: (cert, key).
fn self_signed(dir: &Path, name: &str, expired: bool) -> (PathBuf, PathBuf) {
    let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
    params.subject_alt_names.push(rcgen::SanType::URI("spiffe://td/ns/a/sa/b".try_into().unwrap()));
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = if expired { rcgen::date_time_ymd(2021, 1, 1) } else { rcgen::date_time_ymd(2099, 1, 1) };
    let key = rcgen::KeyPair::generate().unwrap();
    let certificate = params.self_signed(&key).unwrap();
    let (cert_path, key_path) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
    std::fs::write(&cert_path, certificate.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (cert_path, key_path)
}

fn compiled(yaml: &str, credentials: &CredentialSource) -> TlsServer {
    TlsServer::compile("istio-system/egress", 0, &server(yaml), credentials).expect("a terminating server")
}

#[test]
fn a_server_name_picks_the_exact_host_then_the_longest_wildcard_then_any() {
    let none = CredentialSource::default();
    let exact = compiled(
        "{port: {number: 443, name: a, protocol: HTTPS}, hosts: [ns/api.example.com], tls: {mode: SIMPLE}}",
        &none,
    );
    let wide = compiled(
        "{port: {number: 443, name: b, protocol: HTTPS}, hosts: ['*.example.com'], tls: {mode: SIMPLE}}",
        &none,
    );
    let any = compiled("{port: {number: 443, name: c, protocol: HTTPS}, hosts: ['*'], tls: {mode: SIMPLE}}", &none);
    let servers = [&any, &wide, &exact];
    let chosen = |name: Option<&str>| choose(servers.into_iter(), name).map(|server| server.hosts[0].clone());
    assert_eq!(chosen(Some("API.example.com")).as_deref(), Some("api.example.com"));
    assert_eq!(chosen(Some("www.example.com")).as_deref(), Some("*.example.com"));
    assert_eq!(chosen(Some("example.com")).as_deref(), Some("*"), "a wildcard needs a label before its suffix");
    assert_eq!(chosen(None).as_deref(), Some("*"), "no server name: only a server for any host");
    assert!(choose([&exact, &wide].into_iter(), None).is_none());
    assert!(choose([&exact].into_iter(), Some("evil.example")).is_none());
}

#[test]
fn settings_that_cannot_be_served_say_why_and_good_ones_are_made_ready() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path(), "api.example.com", false);
    let (other_cert, other_key) = self_signed(dir.path(), "other.example.com", false);
    let none = CredentialSource::default();
    let with = |tls: &str| {
        let yaml = format!("{{port: {{number: 443, name: a, protocol: HTTPS}}, hosts: ['*'], tls: {tls}}}");
        compiled(&yaml, &none).config.map(|_| ())
    };
    let (cert, key, other_key) = (cert.display(), key.display(), other_key.display());
    assert_eq!(with(&format!("{{mode: SIMPLE, serverCertificate: {cert}, privateKey: {key}}}")), Ok(()));
    let mismatched = with(&format!("{{mode: SIMPLE, serverCertificate: {cert}, privateKey: {other_key}}}"));
    assert!(mismatched.as_ref().is_err_and(|e| e.contains("the certificate and its key")), "{mismatched:?}");
    let missing = with(&format!("{{mode: SIMPLE, serverCertificate: /nonexistent/c.pem, privateKey: {key}}}"));
    assert!(missing.as_ref().is_err_and(|e| e.contains("/nonexistent/c.pem")), "{missing:?}");
    let no_ca = with(&format!("{{mode: MUTUAL, serverCertificate: {cert}, privateKey: {key}}}"));
    assert!(no_ca.as_ref().is_err_and(|e| e.contains("caCertificates")), "{no_ca:?}");
    let optional = with(&format!(
        "{{mode: OPTIONAL_MUTUAL, serverCertificate: {cert}, privateKey: {key}, caCertificates: {}}}",
        other_cert.display()
    ));
    assert_eq!(optional, Ok(()));
    let mutual = with(&format!(
        "{{mode: MUTUAL, serverCertificate: {cert}, privateKey: {key}, caCertificates: {}}}",
        other_cert.display()
    ));
    assert_eq!(mutual, Ok(()));
    let suites =
        with(&format!("{{mode: SIMPLE, serverCertificate: {cert}, privateKey: {key}, cipherSuites: [AES128-SHA]}}"));
    assert!(suites.as_ref().is_err_and(|e| e.contains("AES128-SHA")), "{suites:?}");
    let versions =
        with(&format!("{{mode: SIMPLE, serverCertificate: {cert}, privateKey: {key}, maxProtocolVersion: TLSV1_1}}"));
    assert!(versions.as_ref().is_err_and(|e| e.contains("neither TLS 1.2 nor TLS 1.3")), "{versions:?}");
    let (expired_cert, expired_key) = self_signed(dir.path(), "expired.example.com", true);
    let expired = with(&format!(
        "{{mode: SIMPLE, serverCertificate: {}, privateKey: {}}}",
        expired_cert.display(),
        expired_key.display()
    ));
    assert!(expired.as_ref().is_err_and(|e| e.contains("not now")), "{expired:?}");
}

#[test]
fn a_credential_name_reads_istios_secret_layout_from_the_credentials_directory() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path(), "api.example.com", false);
    let credential = dir.path().join("api-cert");
    std::fs::create_dir(&credential).unwrap();
    std::fs::copy(&cert, credential.join("tls.crt")).unwrap();
    std::fs::copy(&key, credential.join("tls.key")).unwrap();
    let source = CredentialSource::new(Some(dir.path().to_owned()));
    let yaml =
        "{port: {number: 443, name: a, protocol: HTTPS}, hosts: ['*'], tls: {mode: MUTUAL, credentialName: api-cert}}";
    let error = compiled(yaml, &source).config.unwrap_err();
    assert!(error.contains("MUTUAL needs the CAs clients' certificates chain to"), "{error}");
    // The CA in the companion `<name>-cacert`, as Istio reads it.
    std::fs::create_dir(dir.path().join("api-cert-cacert")).unwrap();
    std::fs::copy(&cert, dir.path().join("api-cert-cacert/ca.crt")).unwrap();
    let server = compiled(yaml, &source);
    assert!(server.config.is_ok() && server.mutual, "{:?}", server.config);
    assert_eq!(server.config.as_ref().unwrap().alpn_protocols, [b"h2".to_vec(), b"http/1.1".to_vec()]);
    // Protocol TLS: bytes for tcp routes, no application protocol agreed for the client.
    let opaque = compiled(&yaml.replace("protocol: HTTPS", "protocol: TLS"), &source);
    assert!(opaque.opaque && opaque.config.as_ref().unwrap().alpn_protocols.is_empty());
    let leaf = certificates(&cert).unwrap().remove(0);
    assert_eq!(subject_alt_names(&leaf), ["api.example.com", "spiffe://td/ns/a/sa/b"]);
    let requiring = |names: &str| {
        let yaml = format!("{{port: {{number: 443, name: a, protocol: HTTPS}}, hosts: ['*'], tls: {{mode: MUTUAL, credentialName: api-cert, subjectAltNames: {names}}}}}");
        compiled(&yaml, &source).accepts_client_names(&subject_alt_names(&leaf))
    };
    assert!(requiring("[spiffe://td/ns/a/sa/b]") && !requiring("[spiffe://td/ns/a/sa/c]"));
}

#[test]
fn the_server_prefers_aes_128_gcm_as_envoy_does() {
    let suites = |names: &[String]| -> Vec<String> {
        provider(names).unwrap().cipher_suites.iter().map(|suite| format!("{:?}", suite.suite())).collect()
    };
    let all = suites(&[]);
    assert_eq!(all[0], "TLS13_AES_128_GCM_SHA256", "{all:?}");
    let limited = suites(&["ECDHE-RSA-AES256-GCM-SHA384".to_owned()]);
    assert!(
        limited.iter().all(|suite| suite.starts_with("TLS13_") || suite == "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384"),
        "{limited:?}"
    );
}

#[test]
fn client_certificates_are_pinned_by_their_public_key_or_their_whole_hash_as_envoy_writes_them() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, _) = self_signed(dir.path(), "client.example", false);
    let (other, _) = self_signed(dir.path(), "other.example", false);
    // The pins as Envoy's documentation makes them, with openssl.
    let shell = |script: String| {
        let output = std::process::Command::new("sh").args(["-c", &script]).output().expect("sh runs");
        assert!(output.status.success(), "{script}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    };
    let cert_path = cert.display();
    let spki = shell(format!(
        "openssl x509 -in {cert_path} -noout -pubkey | openssl pkey -pubin -outform DER | openssl dgst -sha256 -binary | openssl enc -base64"
    ));
    let fingerprint = shell(format!("openssl x509 -in {cert_path} -noout -fingerprint -sha256"));
    let hash = fingerprint.rsplit('=').next().unwrap().to_owned();
    let (leaf, stranger) = (certificates(&cert).unwrap().remove(0), certificates(&other).unwrap().remove(0));
    for pins in [
        Pins::compile(std::slice::from_ref(&spki), &[]),
        Pins::compile(&[], std::slice::from_ref(&hash)),
        Pins::compile(&[], &[hash.to_lowercase().replace(':', "")]),
    ] {
        assert!(pins.admit(&leaf) && !pins.admit(&stranger), "{pins:?}");
    }
    assert!(!Pins::compile(&["not base64!".into()], &["zz".into()]).admit(&leaf), "a pin that does not decode");
    assert!(Pins::default().admit(&stranger), "no pins: any certificate");
}

/// A CA and a certificate it signs for `name`, written in `dir`: (CA, cert, key).
fn ca_signed(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let certificate = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap().signed_by(&key, &issuer).unwrap();
    let paths = (dir.join("ca.pem"), dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, certificate.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

/// A TLS 1.3 handshake in memory between a connection of `client` and one of `server`, with the session tickets
/// the server sends after it taken in by the client: whether the client resumed a session.
fn handshake(server: &Arc<ServerConfig>, client: &Arc<rustls::ClientConfig>) -> rustls::HandshakeKind {
    let name = rustls::pki_types::ServerName::try_from("api.example.com").unwrap();
    let mut client = rustls::ClientConnection::new(client.clone(), name).unwrap();
    let mut server = rustls::ServerConnection::new(server.clone()).unwrap();
    // Client hello; server flight; client finished; server tickets.
    for _ in 0..4 {
        transfer(&mut client, &mut server);
        transfer(&mut server, &mut client);
    }
    assert!(!client.is_handshaking() && !server.is_handshaking());
    client.handshake_kind().unwrap()
}

/// Moves the TLS records `from` has to send into `to`, which takes them in.
fn transfer<A, B>(from: &mut rustls::ConnectionCommon<A>, to: &mut rustls::ConnectionCommon<B>) {
    let mut bytes = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut bytes).unwrap();
    }
    let mut read = bytes.as_slice();
    while !read.is_empty() {
        to.read_tls(&mut read).unwrap();
        to.process_new_packets().unwrap();
    }
}

#[test]
fn sessions_resume_from_tickets_however_many_clients_came_since() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = ca_signed(dir.path(), "api.example.com");
    let yaml = format!(
        "{{port: {{number: 443, name: a, protocol: HTTPS}}, hosts: ['*'], tls: {{mode: SIMPLE, serverCertificate: \
         {}, privateKey: {}}}}}",
        cert.display(),
        key.display()
    );
    let server = compiled(&yaml, &CredentialSource::default()).config.unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(certificates(&ca).unwrap());
    let client = || {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        Arc::new(config)
    };
    let first = client();
    assert_eq!(handshake(&server, &first), rustls::HandshakeKind::Full);
    assert_eq!(handshake(&server, &first), rustls::HandshakeKind::Resumed);
    // More clients than a gateway-side cache of sessions (256) holds.
    for _ in 0..300 {
        assert_eq!(handshake(&server, &client()), rustls::HandshakeKind::Full);
    }
    assert_eq!(handshake(&server, &first), rustls::HandshakeKind::Resumed, "the first client's ticket still resumes");
    // Each handshake leaves the client the one ticket its next connection resumes with.
    assert_eq!(handshake(&server, &first), rustls::HandshakeKind::Resumed);
}
