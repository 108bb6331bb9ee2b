//! Intercepted TLS, decided by the ClientHello's `server_name` (SNI) without terminating TLS: a registered name
//! is relayed to the address the client dialled when that address is the name's, an unregistered one is refused
//! in REGISTRY_ONLY (BlackHoleCluster) and passed through in ALLOW_ANY (PassthroughCluster). A hello without a
//! name is decided by the dialled address, as the kernel decides other TCP. The hello's bytes are replayed to
//! the upstream, which completes the handshake with the client.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{
    client_hello::{self, Hello},
    http::HttpProxy,
    tcp,
    transparent_listener::Intercepted,
};
use crate::{
    config::workloads::Workload,
    policy::{
        labels::DestinationLabels,
        routes::{HostVerify, ProxyPolicy, ServiceChoice, Viewer},
        OutboundMode,
    },
    telemetry::{connections::TcpLabels, response_flags::ResponseFlag},
};

/// What becomes of an intercepted TLS connection.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    /// Relayed to `address`. `verify`: a name registered at no address, which must resolve to `address` first
    /// (`--host-verify strict`).
    Forward { address: SocketAddr, labels: DestinationLabels, verify: Option<String> },
    /// Closed without a byte of any server's.
    Refuse { labels: DestinationLabels, flag: ResponseFlag, reason: &'static str },
}

/// How a connection whose name is registered at other addresses than the dialled one was handled, for
/// `sluice_host_mismatch_total{action}`.
pub type Mismatch = Option<&'static str>;

/// Decides a connection from `source` to `dialled` whose ClientHello named `server_name`.
pub fn decide(
    policy: &ProxyPolicy,
    server_name: Option<&str>,
    dialled: SocketAddr,
    source: Option<&Workload>,
) -> (Verdict, Mismatch) {
    let viewer = Viewer::Workload(source);
    let port = dialled.port();
    let registered = match server_name {
        Some(name) => policy.registered_for(name, port, viewer),
        None => policy.registered_at(dialled, viewer),
    };
    let Some(service) = registered else {
        return match viewer.mode(policy) {
            OutboundMode::RegistryOnly => {
                let reason = if server_name.is_some() { "unregistered_server_name" } else { "unregistered_address" };
                let labels = DestinationLabels::blackhole();
                (Verdict::Refuse { labels, flag: ResponseFlag::NoHealthyUpstream, reason }, None)
            }
            OutboundMode::AllowAny => {
                let shown = server_name.map_or_else(|| dialled.to_string(), str::to_owned);
                let labels = crate::telemetry::passthrough::destination(&shown);
                (Verdict::Forward { address: dialled, labels, verify: None }, None)
            }
        };
    };
    let choice = ServiceChoice { service, port, subset: None, variant: service.variant(viewer, policy) };
    let labels = choice
        .cluster()
        .map(|cluster| cluster.labels.clone())
        .unwrap_or_else(|| crate::telemetry::passthrough::destination(&service.host));
    match service.known_at(dialled.ip()) {
        Some(true) => (Verdict::Forward { address: dialled, labels, verify: None }, None),
        // The name is another host's address: domain fronting by SNI, or a stale DNS answer.
        Some(false) => match policy.host_verify {
            HostVerify::Strict => {
                (Verdict::Refuse { labels, flag: ResponseFlag::NoRouteFound, reason: "fronted" }, Some("refused"))
            }
            HostVerify::Route => match service.own_address(port) {
                Some(address) => (Verdict::Forward { address, labels, verify: None }, Some("routed")),
                None => {
                    let refused = Verdict::Refuse { labels, flag: ResponseFlag::NoRouteFound, reason: "fronted" };
                    (refused, Some("refused"))
                }
            },
            HostVerify::Off => (Verdict::Forward { address: dialled, labels, verify: None }, Some("trusted")),
        },
        // Registered at no address (a wildcard, resolution NONE): only DNS can tell whether the dialled
        // address is the name's.
        None => {
            let verify = match (server_name, policy.host_verify) {
                (Some(name), HostVerify::Strict) => Some(name.to_owned()),
                _ => None,
            };
            (Verdict::Forward { address: dialled, labels, verify }, None)
        }
    }
}

/// Why a ClientHello was not read, for `sluice_tls_client_hello_refused_total{reason}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HelloRefused {
    /// Its framing is broken, or it is larger than the gateway reads.
    Malformed(&'static str),
    /// Not whole within the request headers timeout.
    Timeout,
    /// The client closed (or reset) before it was whole.
    Closed,
}

impl HelloRefused {
    pub fn label(self) -> &'static str {
        match self {
            HelloRefused::Malformed(_) => "malformed",
            HelloRefused::Timeout => "timeout",
            HelloRefused::Closed => "closed",
        }
    }
}

/// Reads the client's bytes until they hold a whole ClientHello: the bytes read (all to be replayed) and its
/// server name.
async fn read_client_hello(
    stream: &mut tokio::net::TcpStream,
    within: std::time::Duration,
) -> Result<(Vec<u8>, Option<String>), HelloRefused> {
    let reading = async {
        let mut bytes = Vec::with_capacity(2048);
        loop {
            bytes.reserve(4096);
            match stream.read_buf(&mut bytes).await {
                Ok(0) | Err(_) => return Err(HelloRefused::Closed),
                Ok(_) => {}
            }
            match client_hello::parse(&bytes) {
                Hello::Incomplete => continue,
                Hello::Complete { server_name, .. } => return Ok((bytes, server_name)),
                // The first byte said handshake: a stream that turns out not to be one is broken TLS.
                Hello::NotTls => return Err(HelloRefused::Malformed("not a TLS handshake")),
                Hello::Malformed(reason) => return Err(HelloRefused::Malformed(reason)),
            }
        }
    };
    tokio::time::timeout(within, reading).await.unwrap_or(Err(HelloRefused::Timeout))
}

/// Serves an intercepted connection that opened with a TLS handshake record.
pub async fn serve(connection: Intercepted, proxy: &HttpProxy) {
    let Intercepted { mut stream, peer, original_destination } = connection;
    let telemetry = proxy.telemetry();
    let (hello, server_name) = match read_client_hello(&mut stream, proxy.limits().request_headers_timeout).await {
        Ok(read) => read,
        Err(refused) => {
            let detail = match refused {
                HelloRefused::Malformed(reason) => reason,
                _ => "",
            };
            tracing::info!(
                source = %peer,
                original_dst = %original_destination,
                verdict = "client_hello_refused",
                reason = refused.label(),
                detail,
                "intercepted TLS connection"
            );
            telemetry.client_hello_refused(refused.label());
            tcp::reset(&stream);
            return;
        }
    };
    let workload = proxy.workload(peer.ip());
    let (verdict, mismatch) =
        decide(&proxy.policy(), server_name.as_deref(), original_destination, workload.as_deref());
    if let Some(action) = mismatch {
        telemetry.host_mismatch(action);
    }
    let sni = server_name.as_deref().unwrap_or("-");
    let (address, labels) = match verdict {
        Verdict::Forward { address, labels, verify: Some(host) } => {
            if !proxy.host_resolves_to(&host, address.ip()).await {
                telemetry.host_mismatch("refused");
                let refused = TcpLabels::new(&labels, ResponseFlag::NoRouteFound);
                telemetry.tcp.opened(&refused);
                telemetry.tcp.closed(&refused, 0, 0);
                tracing::info!(source = %peer, original_dst = %original_destination, sni, verdict = "refused", reason = "not_resolved_there", "intercepted TLS connection");
                tcp::reset(&stream);
                return;
            }
            (address, labels)
        }
        Verdict::Forward { address, labels, verify: None } => (address, labels),
        Verdict::Refuse { labels, flag, reason } => {
            let refused = TcpLabels::new(&labels, flag);
            telemetry.tcp.opened(&refused);
            telemetry.tcp.closed(&refused, 0, 0);
            tracing::info!(source = %peer, original_dst = %original_destination, sni, verdict = "refused", reason, "intercepted TLS connection");
            tcp::reset(&stream);
            return;
        }
    };
    let mut upstream = match tcp::connect(address, proxy.upstream_sockets(), tcp::CONNECT_TIMEOUT).await {
        Ok(upstream) => upstream,
        Err(error) => {
            let reason = tcp::connect_failure(&error);
            let failed = TcpLabels::new(&labels, ResponseFlag::UpstreamConnectionFailure);
            telemetry.tcp.opened(&failed);
            telemetry.tcp.closed(&failed, 0, 0);
            tracing::info!(source = %peer, original_dst = %original_destination, sni, upstream = %address, verdict = reason, "intercepted TLS connection");
            tcp::reset(&stream);
            return;
        }
    };
    let labels = TcpLabels::new(&labels, ResponseFlag::None);
    telemetry.tcp.opened(&labels);
    let replayed = upstream.write_all(&hello).await;
    let joined = match replayed {
        Ok(()) => super::join::join(&mut stream, &mut upstream, proxy.limits().idle_timeout).await.ok(),
        Err(_) => None,
    };
    let (received, sent) = joined.map(|joined| (joined.from_first, joined.from_second)).unwrap_or_default();
    let received = received + hello.len() as u64;
    telemetry.tcp.closed(&labels, received, sent);
    tracing::info!(
        source = %peer,
        original_dst = %original_destination,
        sni,
        upstream = %address,
        verdict = "relayed",
        bytes_sent = received,
        bytes_received = sent,
        "intercepted TLS connection"
    );
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, sync::Arc};

    use super::*;
    use crate::{
        config::{resolver::Resolved, Snapshot},
        policy::{
            bindings::bind,
            routes::{proxy_policy, ProxySettings},
            sidecars::SidecarModes,
        },
    };

    const REGISTRY: &str = "
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: stripe, namespace: egress}
spec:
  hosts: [api.stripe.com]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: google, namespace: egress}
spec:
  hosts: ['*.googleapis.com']
  ports: [{number: 443, name: https, protocol: HTTPS}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: legacy, namespace: egress}
spec:
  hosts: [legacy.internal]
  addresses: [198.51.100.0/24]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: NONE
";

    fn policy(mode: OutboundMode, host_verify: HostVerify) -> ProxyPolicy {
        let snapshot = Snapshot::from_yaml(REGISTRY);
        let resolved = Resolved::from([("api.stripe.com".to_owned(), vec!["203.0.113.10".parse().unwrap()])]);
        let sidecars = Arc::new(SidecarModes::compile(&snapshot, mode));
        let settings = ProxySettings { host_verify, ..ProxySettings::default() };
        proxy_policy(&snapshot, &resolved, &bind(&snapshot, &BTreeMap::new()), sidecars, &settings, &Default::default())
    }

    fn to(address: &str) -> SocketAddr {
        SocketAddr::new(address.parse().unwrap(), 443)
    }

    fn forwarded(verdict: &Verdict) -> Option<(SocketAddr, String)> {
        match verdict {
            Verdict::Forward { address, labels, .. } => Some((*address, labels.name().as_str().to_owned())),
            Verdict::Refuse { .. } => None,
        }
    }

    #[test]
    fn a_registered_name_at_its_own_address_is_relayed_and_elsewhere_refused_as_fronting() {
        let policy = policy(OutboundMode::RegistryOnly, HostVerify::Strict);
        let (verdict, mismatch) = decide(&policy, Some("api.stripe.com"), to("203.0.113.10"), None);
        assert_eq!(forwarded(&verdict), Some((to("203.0.113.10"), "api.stripe.com".into())));
        assert_eq!(mismatch, None);
        // The name of a registered host, sent to an address that is not its own (a CDN's other tenant).
        let (verdict, mismatch) = decide(&policy, Some("api.stripe.com"), to("192.0.2.66"), None);
        assert!(matches!(verdict, Verdict::Refuse { reason: "fronted", .. }), "{verdict:?}");
        assert_eq!(mismatch, Some("refused"));

        let routed = super::tests::policy(OutboundMode::RegistryOnly, HostVerify::Route);
        let (verdict, mismatch) = decide(&routed, Some("api.stripe.com"), to("192.0.2.66"), None);
        assert_eq!(forwarded(&verdict), Some((to("203.0.113.10"), "api.stripe.com".into())), "sent to its own");
        assert_eq!(mismatch, Some("routed"));
    }

    #[test]
    fn registry_only_refuses_an_unregistered_name_even_at_a_registered_address() {
        let policy = policy(OutboundMode::RegistryOnly, HostVerify::Strict);
        let (verdict, _) = decide(&policy, Some("evil.example"), to("203.0.113.10"), None);
        let Verdict::Refuse { labels, flag, reason } = verdict else { panic!("{verdict:?}") };
        assert_eq!(
            (labels.name().as_str(), flag, reason),
            ("BlackHoleCluster", ResponseFlag::NoHealthyUpstream, "unregistered_server_name")
        );

        let allow_any = super::tests::policy(OutboundMode::AllowAny, HostVerify::Strict);
        let (verdict, _) = decide(&allow_any, Some("evil.example"), to("192.0.2.7"), None);
        assert_eq!(forwarded(&verdict).map(|(address, _)| address), Some(to("192.0.2.7")), "passed through");
    }

    #[test]
    fn wildcard_names_registered_at_no_address_are_checked_by_dns() {
        let policy = policy(OutboundMode::RegistryOnly, HostVerify::Strict);
        let (verdict, _) = decide(&policy, Some("storage.googleapis.com"), to("192.0.2.9"), None);
        let Verdict::Forward { address, labels, verify } = verdict else { panic!("{verdict:?}") };
        assert_eq!((address, verify.as_deref()), (to("192.0.2.9"), Some("storage.googleapis.com")));
        assert_eq!(labels.name().as_str().to_owned(), "*.googleapis.com");
        let (verdict, _) = decide(&policy, Some("googleapis.com"), to("192.0.2.9"), None);
        assert!(matches!(verdict, Verdict::Refuse { .. }), "the wildcard does not take the bare domain");

        let trusting = super::tests::policy(OutboundMode::RegistryOnly, HostVerify::Off);
        let (verdict, _) = decide(&trusting, Some("storage.googleapis.com"), to("192.0.2.9"), None);
        assert!(matches!(verdict, Verdict::Forward { verify: None, .. }), "--host-verify off trusts it");
    }

    #[test]
    fn a_hello_without_a_name_is_decided_by_the_dialled_address() {
        let policy = policy(OutboundMode::RegistryOnly, HostVerify::Strict);
        let (verdict, _) = decide(&policy, None, to("198.51.100.20"), None);
        assert_eq!(forwarded(&verdict), Some((to("198.51.100.20"), "legacy.internal".into())), "in its range");
        let (verdict, _) = decide(&policy, None, to("203.0.113.10"), None);
        assert_eq!(forwarded(&verdict).map(|(_, name)| name), Some("api.stripe.com".into()), "resolved there");
        let (verdict, _) = decide(&policy, None, to("192.0.2.1"), None);
        assert!(matches!(verdict, Verdict::Refuse { reason: "unregistered_address", .. }), "{verdict:?}");
        let (verdict, _) = decide(&policy, None, SocketAddr::new("198.51.100.20".parse().unwrap(), 8443), None);
        assert!(matches!(verdict, Verdict::Refuse { .. }), "registered on 443 only");
    }
}
