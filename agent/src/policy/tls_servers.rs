//! Gateway servers that terminate TLS (`tls.mode` SIMPLE or MUTUAL): the names each answers for, and the TLS it
//! speaks, made ready when the configuration is compiled — certificate and key read and matched, client CAs
//! loaded, versions and cipher suites chosen — so a handshake only picks a server by its server name.

use std::{path::Path, sync::Arc};

use rustls::{
    crypto::CryptoProvider,
    pki_types::CertificateDer,
    server::WebPkiClientVerifier,
    version::{TLS12, TLS13},
    ServerConfig, SupportedProtocolVersion,
};

use super::certificates::{certificates, optional_file, private_key, roots, CredentialSource};
use crate::config::gateway::{Server, ServerTls};

/// One Gateway server terminating TLS on a port.
#[derive(Debug)]
pub struct TlsServer {
    /// `namespace/name[index]` of its Gateway and server, for logs.
    pub name: String,
    /// Its Gateway's `namespace/name`.
    pub gateway: String,
    pub port: u16,
    /// Its hosts without their namespaces: what a ClientHello's server name is matched against.
    pub hosts: Vec<String>,
    /// Ready to accept handshakes, or why it cannot (a missing file, a key that is not the certificate's): its
    /// connections are then closed after the ClientHello.
    pub config: Result<Arc<ServerConfig>, String>,
    /// Where the certificate it presents comes from, and when it expires.
    pub certificate: Option<Presented>,
    /// MUTUAL: clients must present a certificate the CAs sign.
    pub mutual: bool,
    /// Protocol `TLS`: the bytes inside are relayed by the Gateway's `tcp` routes (else, `HTTPS`, its `http`
    /// routes serve the requests inside).
    pub opaque: bool,
    /// MUTUAL: one of these must be among the client certificate's DNS or URI names (none: any).
    pub subject_alt_names: Vec<String>,
    /// The client certificate must match one of these pins (none: any).
    pub pins: Pins,
}

impl TlsServer {
    /// The server `server` of the Gateway `gateway` (its index `index`) if it terminates TLS.
    pub fn compile(gateway: &str, index: usize, server: &Server, credentials: &CredentialSource) -> Option<TlsServer> {
        let tls = server.tls.as_ref().filter(|tls| tls.terminates())?;
        let port = u16::try_from(server.port.number).ok()?;
        let hosts = server.hosts.iter().map(|host| host.rsplit('/').next().unwrap_or(host).to_ascii_lowercase());
        let opaque = server.port.protocol.eq_ignore_ascii_case("TLS");
        let (config, certificate) = match server_config(tls, credentials) {
            Ok((mut config, presented)) => {
                // Bytes for tcp routes: no application protocol is agreed on the client's behalf.
                if opaque {
                    config.alpn_protocols.clear();
                }
                (Ok(Arc::new(config)), Some(presented))
            }
            Err(reason) => (Err(reason), None),
        };
        Some(TlsServer {
            name: format!("{gateway}[{index}]"),
            gateway: gateway.to_owned(),
            port,
            hosts: hosts.collect(),
            config,
            certificate,
            mutual: tls.mutual(),
            opaque,
            subject_alt_names: tls.subject_alt_names.clone(),
            pins: Pins::compile(&tls.verify_certificate_spki, &tls.verify_certificate_hash),
        })
    }

    /// How well this server's hosts match `server_name` (the ClientHello's): an exact host best, then the
    /// longest wildcard suffix, then `*`; `None` when none does. Without a server name only `*` matches.
    pub fn matches(&self, server_name: Option<&str>) -> Option<usize> {
        self.hosts
            .iter()
            .filter_map(|host| match (host.as_str(), server_name) {
                ("*", _) => Some(0),
                (host, Some(name)) if host.eq_ignore_ascii_case(name) => Some(usize::MAX),
                (host, Some(name)) => {
                    let suffix = host.strip_prefix('*')?;
                    let matched = name.len() > suffix.len()
                        && name.get(name.len() - suffix.len()..).is_some_and(|end| end.eq_ignore_ascii_case(suffix));
                    matched.then_some(suffix.len())
                }
                (_, None) => None,
            })
            .max()
    }

    /// What identifies the server from one configuration to the next: its Gateway, port and hosts.
    pub fn key(&self) -> String {
        format!("{} {} {}", self.gateway, self.port, self.hosts.join(","))
    }

    /// Whether a client's certificate, issued for `names` (its [`subject_alt_names`]), carries a name this server
    /// requires.
    pub fn accepts_client_names(&self, names: &[String]) -> bool {
        one_of(&self.subject_alt_names, names)
    }
}

/// `verifyCertificateSpki` and `verifyCertificateHash`, decoded once: SHA-256 digests of the client certificate's
/// SubjectPublicKeyInfo, and of the whole certificate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pins {
    spki: Vec<Vec<u8>>,
    certificate: Vec<Vec<u8>>,
}

impl Pins {
    /// Pins as Envoy writes them: base64 for the SPKI's, hex (colons allowed, any case) for the certificate's.
    /// One that does not decode matches nothing.
    pub fn compile(spki: &[String], hashes: &[String]) -> Pins {
        use base64::Engine;
        let base64 = |pin: &String| base64::engine::general_purpose::STANDARD.decode(pin.trim()).unwrap_or_default();
        let hex = |pin: &String| {
            let digits: Vec<u8> = pin.bytes().filter(|b| *b != b':').collect();
            let pairs = digits.chunks(2).map(|pair| u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok());
            pairs.collect::<Option<Vec<u8>>>().filter(|_| digits.len() % 2 == 0).unwrap_or_default()
        };
        Pins { spki: spki.iter().map(base64).collect(), certificate: hashes.iter().map(hex).collect() }
    }

    /// Whether `leaf` matches a pin (any certificate when there are none).
    pub fn admit(&self, leaf: &CertificateDer<'_>) -> bool {
        if self.spki.is_empty() && self.certificate.is_empty() {
            return true;
        }
        let sha256 = |bytes: &[u8]| aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes).as_ref().to_vec();
        let spki = x509_parser::parse_x509_certificate(leaf).ok().map(|(_, parsed)| sha256(parsed.public_key().raw));
        spki.is_some_and(|spki| self.spki.contains(&spki)) || self.certificate.contains(&sha256(leaf))
    }
}

/// Whether a certificate issued for `names` carries one of `required` (DNS names or URIs, compared exactly, as
/// Envoy's `match_subject_alt_names` exact entries are); any certificate when none is required.
pub fn one_of(required: &[String], names: &[String]) -> bool {
    required.is_empty() || names.iter().any(|name| required.contains(name))
}

/// The TLS each server last served with, so one whose certificate turns bad (unreadable, not matching its key,
/// expired) keeps serving the last good one rather than refuse every handshake.
#[derive(Debug, Default)]
pub struct LastGood(std::collections::HashMap<String, (Arc<ServerConfig>, Option<Presented>)>);

/// Where a server's certificate is read from (a credential's name, a file, `istio-certs`) and when it expires
/// (Unix seconds).
#[derive(Clone, Debug)]
pub struct Presented {
    pub source: String,
    pub not_after: i64,
}

impl LastGood {
    /// Records the servers that can serve; gives those that cannot their last good TLS where they had one.
    /// Returns the servers that cannot serve with their new settings and why, whether or not an older one stands in.
    pub fn keep<'a>(&mut self, servers: impl Iterator<Item = &'a mut TlsServer>) -> Vec<(String, String, String)> {
        let mut refused = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for server in servers {
            let key = server.key();
            match &server.config {
                Ok(config) => {
                    self.0.insert(key.clone(), (config.clone(), server.certificate.clone()));
                }
                Err(reason) => {
                    refused.push((server.name.clone(), server.gateway.clone(), reason.clone()));
                    if let Some((config, certificate)) = self.0.get(&key) {
                        (server.config, server.certificate) = (Ok(config.clone()), certificate.clone());
                    }
                }
            }
            seen.insert(key);
        }
        self.0.retain(|key, _| seen.contains(key));
        refused
    }
}

/// The server among `servers` whose hosts match `server_name` best (the first of equals, as Istio orders them).
pub fn choose<'a>(servers: impl Iterator<Item = &'a TlsServer>, server_name: Option<&str>) -> Option<&'a TlsServer> {
    let mut best: Option<(usize, &TlsServer)> = None;
    for server in servers {
        if let Some(score) = server.matches(server_name) {
            if best.is_none_or(|(top, _)| score > top) {
                best = Some((score, server));
            }
        }
    }
    best.map(|(_, server)| server)
}

/// The DNS names and URIs (a SPIFFE identity) a certificate is issued for.
pub fn subject_alt_names(certificate: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(certificate) else { return Vec::new() };
    let Ok(Some(extension)) = parsed.subject_alternative_name() else { return Vec::new() };
    extension
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(name) | GeneralName::URI(name) => Some((*name).to_owned()),
            _ => None,
        })
        .collect()
}

/// The ALPN protocols Istio's sidecars offer when they originate the mesh's mTLS: `istio-h2` is HTTP/2, the others
/// HTTP/1.1.
pub const ISTIO_ALPN: [&[u8]; 4] = [b"istio-h2", b"istio-http/1.1", b"istio-http/1.0", b"istio"];

/// Envoy's (OpenSSL's) names for the TLS 1.2 cipher suites rustls offers, with rustls's (IANA's). TLS 1.3's are
/// always on, as in Envoy, whose `cipherSuites` apply to TLS 1.2 and below.
const CIPHER_SUITES: [(&str, &str); 6] = [
    ("ECDHE-ECDSA-AES128-GCM-SHA256", "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"),
    ("ECDHE-RSA-AES128-GCM-SHA256", "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"),
    ("ECDHE-ECDSA-AES256-GCM-SHA384", "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384"),
    ("ECDHE-RSA-AES256-GCM-SHA384", "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384"),
    ("ECDHE-ECDSA-CHACHA20-POLY1305", "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256"),
    ("ECDHE-RSA-CHACHA20-POLY1305", "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256"),
];

/// The TLS a server speaks: its certificate and key (files, or a credential), the client CAs for MUTUAL, the
/// versions and cipher suites it allows, ALPN for HTTP/2 and HTTP/1.1.
fn server_config(tls: &ServerTls, credentials: &CredentialSource) -> Result<(ServerConfig, Presented), String> {
    let istio = tls.mode() == "ISTIO_MUTUAL";
    let (chain, key, ca, source) = match &tls.credential_name {
        // The mesh's own certificate, whatever else the server names (as Istio ignores it).
        _ if istio => {
            let credential = credentials.istio()?;
            (credential.chain, credential.key, credential.ca, "istio-certs".to_owned())
        }
        Some(name) => {
            let credential = credentials.load(name)?;
            let ca = match credential.ca {
                Some(ca) => Some(ca),
                None => optional_file(tls.ca_certificates.as_deref())?,
            };
            (credential.chain, credential.key, ca, name.clone())
        }
        None => {
            let (Some(certificate), Some(key)) = (&tls.server_certificate, &tls.private_key) else {
                return Err("serverCertificate and privateKey (or credentialName) are needed".into());
            };
            let chain = certificates(Path::new(certificate))?;
            let ca = optional_file(tls.ca_certificates.as_deref())?;
            (chain, private_key(Path::new(key))?, ca, certificate.clone())
        }
    };
    let presented = Presented { not_after: still_valid(&chain[0])?, source };
    let provider = Arc::new(provider(&tls.cipher_suites)?);
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions(tls)?)
        .map_err(|error| format!("versions and cipher suites: {error}"))?;
    let optional = tls.mode() == "OPTIONAL_MUTUAL";
    let builder = if tls.mutual() || optional {
        let Some(ca) = ca else {
            return Err(format!(
                "{} needs the CAs clients' certificates chain to (caCertificates, ca.crt, root-cert.pem)",
                tls.mode()
            ));
        };
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca, "the client CAs")?), provider);
        // OPTIONAL_MUTUAL: a client may present no certificate; one that does must present a good one.
        let verifier = if optional { verifier.allow_unauthenticated() } else { verifier };
        builder.with_client_cert_verifier(verifier.build().map_err(|error| format!("the client CAs: {error}"))?)
    } else {
        builder.with_no_client_auth()
    };
    let mut config =
        builder.with_single_cert(chain, key).map_err(|error| format!("the certificate and its key: {error}"))?;
    config.ignore_client_order = true;
    // Sessions resumed from tickets the clients hold (keys rotated every 6 hours), as Envoy resumes them by
    // default: any number of clients resume, where a cache of sessions on the gateway holds a few hundred.
    config.ticketer =
        rustls::crypto::aws_lc_rs::Ticketer::new().map_err(|error| format!("session ticket keys: {error}"))?;
    // One ticket per handshake (rustls sends two by default; OpenSSL one when a session resumes): a client holds
    // what its next connection resumes with, and sealing and sending a second cost 5–15 % of a resumed
    // handshake's CPU in the bench's runs (bench/README.md).
    config.send_tls13_tickets = 1;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    if istio {
        // What Istio's sidecars offer the gateway over the mesh's mTLS.
        config.alpn_protocols.extend(ISTIO_ALPN.iter().map(|protocol| protocol.to_vec()));
    }
    Ok((config, presented))
}

/// Refuses a certificate whose validity has ended (or not begun): clients would refuse every handshake. When it
/// ends (Unix seconds).
fn still_valid(leaf: &CertificateDer<'_>) -> Result<i64, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf).map_err(|error| format!("the certificate: {error}"))?;
    let validity = parsed.validity();
    if validity.is_valid() {
        Ok(validity.not_after.timestamp())
    } else {
        Err(format!("the certificate is valid from {} to {}, not now", validity.not_before, validity.not_after))
    }
}

/// aws-lc-rs's provider with the TLS 1.2 suites limited to `names` (Envoy's names; none: rustls's defaults).
fn provider(names: &[String]) -> Result<CryptoProvider, String> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    // The server's order, as Envoy's (BoringSSL's) on a CPU with AES instructions: AES-128-GCM first. Its
    // SHA-256 key schedule runs on the CPU's SHA instructions, where AES-256-GCM's SHA-384 has none (a tenth of a
    // handshake's CPU, measured in bench/README.md).
    provider.cipher_suites.sort_by_key(|suite| {
        let name = format!("{:?}", suite.suite());
        (!name.contains("AES_128_GCM"), suite.version() != &TLS13)
    });
    if names.is_empty() {
        return Ok(provider);
    }
    let mut wanted = Vec::new();
    for name in names {
        let Some((_, iana)) = CIPHER_SUITES.iter().find(|(envoy, _)| envoy.eq_ignore_ascii_case(name)) else {
            return Err(format!("cipher suite {name:?} is not one rustls offers"));
        };
        wanted.push(*iana);
    }
    provider
        .cipher_suites
        .retain(|suite| suite.version() == &TLS13 || wanted.contains(&format!("{:?}", suite.suite()).as_str()));
    Ok(provider)
}

/// The versions between `minProtocolVersion` and `maxProtocolVersion` that rustls speaks (1.2 and 1.3).
fn versions(tls: &ServerTls) -> Result<Vec<&'static SupportedProtocolVersion>, String> {
    let rank = |version: Option<&str>, auto: u8| match version {
        None | Some("TLS_AUTO") => auto,
        Some("TLSV1_0") => 0,
        Some("TLSV1_1") => 1,
        Some("TLSV1_2") => 2,
        Some(_) => 3,
    };
    let (min, max) = (rank(tls.min_protocol_version.as_deref(), 2), rank(tls.max_protocol_version.as_deref(), 3));
    let versions: Vec<_> = [(2, &TLS12), (3, &TLS13)]
        .into_iter()
        .filter(|(rank, _)| (min..=max).contains(rank))
        .map(|(_, version)| version)
        .collect();
    if versions.is_empty() {
        return Err(
            "minProtocolVersion..maxProtocolVersion holds neither TLS 1.2 nor TLS 1.3 (what rustls speaks)".into()
        );
    }
    Ok(versions)
}

#[cfg(test)]
mod tests;
