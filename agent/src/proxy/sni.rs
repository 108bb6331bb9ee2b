//! Intercepted TLS, decided by the ClientHello's `server_name` (SNI) without terminating TLS: a registered name
//! is relayed to the address the client dialled when that address is the name's, an unregistered one is refused
//! in REGISTRY_ONLY (BlackHoleCluster) and passed through in ALLOW_ANY (PassthroughCluster). A hello without a
//! name is decided by the dialled address, as the kernel decides other TCP. The hello's bytes are replayed to
//! the upstream, which completes the handshake with the client.

use std::{
    net::SocketAddr,
    time::{Instant, SystemTime},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use super::{
    client_hello::{self, Hello},
    http::HttpProxy,
    tcp,
};
use crate::{
    config::{virtual_service::MESH, workloads::Workload},
    policy::{
        labels::DestinationLabels,
        routes::{HostVerify, L4Route, L4View, PortKind, ProxyPolicy, ServiceChoice, Target, Upstream, Viewer},
        OutboundMode,
    },
    telemetry::{
        connections::{ConnectionRecord, TcpLabels},
        response_flags::ResponseFlag,
    },
};

/// Where a TLS connection arrived: intercepted (the mesh's `tls` routes apply), or on a Gateway server's port
/// that passes TLS through (that Gateway's do).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrival {
    Intercepted,
    Gateway(u16),
}

/// What becomes of a TLS connection.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    /// Relayed to `address`. `verify`: a name registered at no address, which must resolve to `address` first
    /// (`--host-verify strict`).
    Forward { address: SocketAddr, labels: DestinationLabels, verify: Option<String> },
    /// Relayed to what `host` resolves to, on `port`: a Gateway's route to a host registered at no address.
    Resolve { host: String, port: u16, labels: DestinationLabels },
    /// Closed without a byte of any server's.
    Refuse { labels: DestinationLabels, flag: ResponseFlag, reason: &'static str },
}

/// How a connection whose name is registered at other addresses than the dialled one was handled, for
/// `sluice_host_mismatch_total{action}`.
pub type Mismatch = Option<&'static str>;

/// Decides a TLS connection from `source` to `dialled` (on a Gateway: the listener's address) whose ClientHello
/// named `server_name`; `roll` (uniform) picks among a route's weighted destinations.
pub fn decide(
    policy: &ProxyPolicy,
    server_name: Option<&str>,
    dialled: SocketAddr,
    source: Option<&Workload>,
    arrival: Arrival,
    roll: u32,
) -> (Verdict, Mismatch) {
    let viewer = Viewer::Workload(source);
    let gateway_port = match arrival {
        Arrival::Gateway(port) => port,
        Arrival::Intercepted => {
            let routed = server_name.and_then(|name| {
                let routes = policy.mesh_tls_routes(name)?;
                let view = L4View { server_name: Some(name), destination: dialled, gateway: MESH, source };
                let visible = |rule: &L4Route| viewer.sees(policy, &rule.scope.exported, name, dialled.port());
                routes.first_match(&view, visible)?.targets.pick(roll)
            });
            match routed {
                // A route to this gateway's own Service continues in the gateway's context, in process.
                Some(target) if policy.is_own_service(target.host()) => target.port().unwrap_or(dialled.port()),
                Some(target) => {
                    let to = SocketAddr::new(dialled.ip(), target.port().unwrap_or(dialled.port()));
                    return by_registry(policy, target.host(), server_name, to, viewer);
                }
                // No route for the name: the registered host itself, as without a VirtualService.
                None => return by_registry(policy, server_name.unwrap_or(""), server_name, dialled, viewer),
            }
        }
    };
    let Some(gateway) = policy.tls_gateway_on(gateway_port) else { return (no_route("no_gateway_server"), None) };
    let Some(name) = server_name else { return (no_route("no_server_name"), None) };
    let at = SocketAddr::new(dialled.ip(), gateway_port);
    let view = L4View { server_name: Some(name), destination: at, gateway: &gateway.id, source };
    let visible = |rule: &L4Route| Viewer::Gateway.sees(policy, &rule.scope.exported, name, gateway_port);
    match gateway.tls_routes(name).and_then(|routes| routes.first_match(&view, visible)?.targets.pick(roll)) {
        Some(target) => (to_target(policy, target, gateway_port, Viewer::Gateway, Some(name), None), None),
        None => (no_route("no_route"), None),
    }
}

/// Decides an opaque TCP connection from `source` to `dialled` (on a Gateway: the listener's address): by the
/// registered service the address is, its `tcp` routes, and on a Gateway port the Gateway's.
pub fn decide_tcp(
    policy: &ProxyPolicy,
    dialled: SocketAddr,
    source: Option<&Workload>,
    arrival: Arrival,
    roll: u32,
) -> (Verdict, Mismatch) {
    let viewer = Viewer::Workload(source);
    let port = dialled.port();
    let gateway_port = match arrival {
        Arrival::Gateway(port) => port,
        Arrival::Intercepted => {
            // A port declared HTTP is the HTTP proxy's: bytes it cannot read are not relayed past its routes.
            let service = policy.registered_at(dialled, viewer);
            if service.is_some_and(|service| service.port_kind(port) == Some(PortKind::Http)) {
                return (no_route("not_http_on_an_http_port"), None);
            }
            let routed = service.and_then(|service| {
                let routes = policy.mesh_tcp_routes(&service.host)?;
                let view = L4View { server_name: None, destination: dialled, gateway: MESH, source };
                let visible = |rule: &L4Route| viewer.sees(policy, &rule.scope.exported, &service.host, port);
                routes.first_match(&view, visible)?.targets.pick(roll)
            });
            match routed {
                Some(target) if policy.is_own_service(target.host()) => target.port().unwrap_or(port),
                Some(target) => return (to_target(policy, target, port, viewer, None, Some(dialled)), None),
                None => return by_registry(policy, "", None, dialled, viewer),
            }
        }
    };
    let Some(gateway) = policy.tcp_gateway_on(gateway_port) else { return (no_route("no_gateway_server"), None) };
    let at = SocketAddr::new(dialled.ip(), gateway_port);
    let view = L4View { server_name: None, destination: at, gateway: &gateway.id, source };
    let visible = |rule: &L4Route| Viewer::Gateway.sees(policy, &rule.scope.exported, "", gateway_port);
    match gateway.tcp_routes.as_ref().and_then(|routes| routes.first_match(&view, visible)?.targets.pick(roll)) {
        Some(target) => (to_target(policy, target, gateway_port, Viewer::Gateway, None, None), None),
        None => (no_route("no_route"), None),
    }
}

fn no_route(reason: &'static str) -> Verdict {
    Verdict::Refuse { labels: DestinationLabels::blackhole(), flag: ResponseFlag::NoRouteFound, reason }
}

/// Where a route's `target` goes, as `viewer` sees the registry: an endpoint of the registered host; for one
/// registered at no address, `original` (intercepted traffic: the address dialled), else what the name resolves
/// to (a route's wildcard host: the name the client asked for, `server_name`).
fn to_target(
    policy: &ProxyPolicy,
    target: &Target,
    port: u16,
    viewer: Viewer<'_>,
    server_name: Option<&str>,
    original: Option<SocketAddr>,
) -> Verdict {
    let (host, port) = (target.host(), target.port().unwrap_or(port));
    let resolved_name = match server_name {
        Some(name) if host.starts_with('*') => name,
        _ => host,
    };
    let unaddressed = |labels| match original {
        Some(address) => Verdict::Forward { address: SocketAddr::new(address.ip(), port), labels, verify: None },
        None => Verdict::Resolve { host: resolved_name.to_owned(), port, labels },
    };
    let Some(service) = policy.registered_for(host, port, viewer) else {
        return match viewer.mode(policy) {
            OutboundMode::RegistryOnly => blackholed("unregistered_destination"),
            OutboundMode::AllowAny => unaddressed(crate::telemetry::passthrough::destination(resolved_name)),
        };
    };
    let choice = ServiceChoice { service, port, subset: target.subset(), variant: service.variant(viewer, policy) };
    let labels = labels_of(&choice);
    match choice.upstream(None) {
        Upstream::Endpoint(address) => Verdict::Forward { address, labels, verify: None },
        Upstream::OriginalDestination => unaddressed(labels),
        Upstream::NoEndpoint => {
            Verdict::Refuse { labels, flag: ResponseFlag::NoHealthyUpstream, reason: "no_endpoint" }
        }
        Upstream::NoSubset => Verdict::Refuse { labels, flag: ResponseFlag::NoClusterFound, reason: "no_subset" },
    }
}

fn blackholed(reason: &'static str) -> Verdict {
    Verdict::Refuse { labels: DestinationLabels::blackhole(), flag: ResponseFlag::NoHealthyUpstream, reason }
}

fn labels_of(choice: &ServiceChoice<'_>) -> DestinationLabels {
    choice
        .cluster()
        .map(|cluster| cluster.labels.clone())
        .unwrap_or_else(|| crate::telemetry::passthrough::destination(&choice.service.host))
}

/// Decides an intercepted connection to `dialled` by the registry: `host` (the name asked for, or a route's
/// destination; empty when the hello named none) on `dialled`'s port, else the dialled address itself.
fn by_registry(
    policy: &ProxyPolicy,
    host: &str,
    server_name: Option<&str>,
    dialled: SocketAddr,
    viewer: Viewer<'_>,
) -> (Verdict, Mismatch) {
    let port = dialled.port();
    let registered = match host {
        "" => policy.registered_at(dialled, viewer),
        host => policy.registered_for(host, port, viewer),
    };
    let Some(service) = registered else {
        return match viewer.mode(policy) {
            OutboundMode::RegistryOnly => {
                let reason = if server_name.is_some() { "unregistered_server_name" } else { "unregistered_address" };
                (blackholed(reason), None)
            }
            OutboundMode::AllowAny => {
                let shown = server_name.map_or_else(|| dialled.to_string(), str::to_owned);
                let labels = crate::telemetry::passthrough::destination(&shown);
                (Verdict::Forward { address: dialled, labels, verify: None }, None)
            }
        };
    };
    let labels = labels_of(&ServiceChoice { service, port, subset: None, variant: service.variant(viewer, policy) });
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
    stream: &mut TcpStream,
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

/// Serves a connection that opened with a TLS handshake record: intercepted (`dialled` its original
/// destination), or accepted on a Gateway port that passes TLS through (`dialled` the listener's address).
pub async fn serve_tls(
    mut stream: TcpStream,
    peer: SocketAddr,
    dialled: SocketAddr,
    arrival: Arrival,
    proxy: &HttpProxy,
) {
    let clock = (SystemTime::now(), Instant::now());
    let telemetry = proxy.telemetry();
    let (hello, server_name) = match read_client_hello(&mut stream, proxy.limits().request_headers_timeout).await {
        Ok(read) => read,
        Err(refused) => {
            let detail = match refused {
                HelloRefused::Malformed(reason) => reason,
                _ => "",
            };
            tracing::debug!(source = %peer, original_dst = %dialled, reason = refused.label(), detail, "ClientHello refused");
            telemetry.client_hello_refused(refused.label());
            tcp::reset(&stream);
            return;
        }
    };
    let workload = proxy.workload(peer.ip());
    let name = server_name.as_deref();
    let decided = decide(&proxy.policy(), name, dialled, workload.as_deref(), arrival, fastrand::u32(..));
    let connection = Connection { peer, dialled, server_name: name, hello: &hello, source: workload.as_deref() };
    finish(stream, &connection, decided, proxy, clock).await;
}

/// Serves a connection that is neither HTTP nor TLS (or whose port is declared TCP): intercepted, or accepted on
/// a Gateway's TCP server port.
pub async fn serve_tcp(stream: TcpStream, peer: SocketAddr, dialled: SocketAddr, arrival: Arrival, proxy: &HttpProxy) {
    let clock = (SystemTime::now(), Instant::now());
    let workload = proxy.workload(peer.ip());
    let decided = decide_tcp(&proxy.policy(), dialled, workload.as_deref(), arrival, fastrand::u32(..));
    let connection = Connection { peer, dialled, server_name: None, hello: &[], source: workload.as_deref() };
    finish(stream, &connection, decided, proxy, clock).await;
}

/// Relays a decided connection (or refuses it), then counts it in Istio's TCP metrics and writes its line.
async fn finish(
    mut stream: TcpStream,
    connection: &Connection<'_>,
    (verdict, mismatch): (Verdict, Mismatch),
    proxy: &HttpProxy,
    (start, started): (SystemTime, Instant),
) {
    let telemetry = proxy.telemetry();
    if let Some(action) = mismatch {
        telemetry.host_mismatch(action);
    }
    let outcome = relay(&mut stream, connection, verdict, proxy).await;
    let labels = TcpLabels::new(&outcome.destination, outcome.flag).from_source(connection.source);
    if outcome.upstream.is_none() {
        // Refused: counted as opened and closed at once, and reset so the client takes no close for an answer.
        telemetry.tcp.opened(&labels);
        tcp::reset(&stream);
    }
    telemetry.tcp.closed(&labels, outcome.received, outcome.sent);
    telemetry.log_connection(&ConnectionRecord {
        start,
        duration: started.elapsed(),
        flag: outcome.flag,
        received: outcome.received,
        sent: outcome.sent,
        upstream: outcome.upstream,
        destination: &outcome.destination,
        local: connection.dialled,
        remote: connection.peer,
        server_name: connection.server_name,
    });
}

/// A connection about to be relayed.
struct Connection<'a> {
    peer: SocketAddr,
    dialled: SocketAddr,
    /// The ClientHello's, for TLS.
    server_name: Option<&'a str>,
    /// The bytes read so far (a ClientHello), replayed to the upstream.
    hello: &'a [u8],
    source: Option<&'a Workload>,
}

/// How a connection ended: relayed (`upstream` set; counted as opened when it was), or refused.
struct Outcome {
    destination: DestinationLabels,
    flag: ResponseFlag,
    upstream: Option<SocketAddr>,
    received: u64,
    sent: u64,
}

impl Outcome {
    fn refused(destination: DestinationLabels, flag: ResponseFlag) -> Outcome {
        Outcome { destination, flag, upstream: None, received: 0, sent: 0 }
    }
}

/// Relays `connection` where `verdict` says, until either side closes or both are silent for the idle timeout.
async fn relay(stream: &mut TcpStream, connection: &Connection<'_>, verdict: Verdict, proxy: &HttpProxy) -> Outcome {
    let telemetry = proxy.telemetry();
    let Connection { peer, dialled, server_name, hello, source } = *connection;
    let (address, destination) = match verdict {
        Verdict::Forward { address, labels, verify: Some(host) } => {
            if !proxy.host_resolves_to(&host, address.ip()).await {
                telemetry.host_mismatch("refused");
                tracing::debug!(source = %peer, %host, upstream = %address, "the name does not resolve to the address dialled");
                return Outcome::refused(labels, ResponseFlag::NoRouteFound);
            }
            (address, labels)
        }
        Verdict::Forward { address, labels, verify: None } => (address, labels),
        Verdict::Resolve { host, port, labels } => match proxy.resolve(&host, port).await {
            Some(address) => (address, labels),
            None => return Outcome::refused(labels, ResponseFlag::DnsResolutionFailed),
        },
        Verdict::Refuse { labels, flag, reason } => {
            tracing::debug!(source = %peer, original_dst = %dialled, sni = server_name.unwrap_or("-"), reason, "connection refused");
            return Outcome::refused(labels, flag);
        }
    };
    let mut upstream = match tcp::connect(address, proxy.upstream_sockets(), tcp::CONNECT_TIMEOUT).await {
        Ok(upstream) => upstream,
        Err(error) => {
            let verdict = tcp::connect_failure(&error);
            tracing::info!(source = %peer, original_dst = %dialled, upstream = %address, %error, verdict, "upstream connect failed");
            return Outcome::refused(destination, ResponseFlag::UpstreamConnectionFailure);
        }
    };
    telemetry.tcp.opened(&TcpLabels::new(&destination, ResponseFlag::None).from_source(source));
    let joined = match upstream.write_all(hello).await {
        Ok(()) => super::join::join(stream, &mut upstream, proxy.limits().idle_timeout).await.ok(),
        Err(_) => None,
    };
    let (received, sent) = joined.map(|joined| (joined.from_first, joined.from_second)).unwrap_or_default();
    let received = received + hello.len() as u64;
    Outcome { destination, flag: ResponseFlag::None, upstream: Some(address), received, sent }
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
            Verdict::Refuse { .. } | Verdict::Resolve { .. } => None,
        }
    }

    #[test]
    fn a_registered_name_at_its_own_address_is_relayed_and_elsewhere_refused_as_fronting() {
        let policy = policy(OutboundMode::RegistryOnly, HostVerify::Strict);
        let (verdict, mismatch) =
            decide(&policy, Some("api.stripe.com"), to("203.0.113.10"), None, Arrival::Intercepted, 0);
        assert_eq!(forwarded(&verdict), Some((to("203.0.113.10"), "api.stripe.com".into())));
        assert_eq!(mismatch, None);
        // The name of a registered host, sent to an address that is not its own (a CDN's other tenant).
        let (verdict, mismatch) =
            decide(&policy, Some("api.stripe.com"), to("192.0.2.66"), None, Arrival::Intercepted, 0);
        assert!(matches!(verdict, Verdict::Refuse { reason: "fronted", .. }), "{verdict:?}");
        assert_eq!(mismatch, Some("refused"));

        let routed = super::tests::policy(OutboundMode::RegistryOnly, HostVerify::Route);
        let (verdict, mismatch) =
            decide(&routed, Some("api.stripe.com"), to("192.0.2.66"), None, Arrival::Intercepted, 0);
        assert_eq!(forwarded(&verdict), Some((to("203.0.113.10"), "api.stripe.com".into())), "sent to its own");
        assert_eq!(mismatch, Some("routed"));
    }

    #[test]
    fn registry_only_refuses_an_unregistered_name_even_at_a_registered_address() {
        let policy = policy(OutboundMode::RegistryOnly, HostVerify::Strict);
        let (verdict, _) = decide(&policy, Some("evil.example"), to("203.0.113.10"), None, Arrival::Intercepted, 0);
        let Verdict::Refuse { labels, flag, reason } = verdict else { panic!("{verdict:?}") };
        assert_eq!(
            (labels.name().as_str(), flag, reason),
            ("BlackHoleCluster", ResponseFlag::NoHealthyUpstream, "unregistered_server_name")
        );

        let allow_any = super::tests::policy(OutboundMode::AllowAny, HostVerify::Strict);
        let (verdict, _) = decide(&allow_any, Some("evil.example"), to("192.0.2.7"), None, Arrival::Intercepted, 0);
        assert_eq!(forwarded(&verdict).map(|(address, _)| address), Some(to("192.0.2.7")), "passed through");
    }

    #[test]
    fn wildcard_names_registered_at_no_address_are_checked_by_dns() {
        let policy = policy(OutboundMode::RegistryOnly, HostVerify::Strict);
        let (verdict, _) =
            decide(&policy, Some("storage.googleapis.com"), to("192.0.2.9"), None, Arrival::Intercepted, 0);
        let Verdict::Forward { address, labels, verify } = verdict else { panic!("{verdict:?}") };
        assert_eq!((address, verify.as_deref()), (to("192.0.2.9"), Some("storage.googleapis.com")));
        assert_eq!(labels.name().as_str().to_owned(), "*.googleapis.com");
        let (verdict, _) = decide(&policy, Some("googleapis.com"), to("192.0.2.9"), None, Arrival::Intercepted, 0);
        assert!(matches!(verdict, Verdict::Refuse { .. }), "the wildcard does not take the bare domain");

        let trusting = super::tests::policy(OutboundMode::RegistryOnly, HostVerify::Off);
        let (verdict, _) =
            decide(&trusting, Some("storage.googleapis.com"), to("192.0.2.9"), None, Arrival::Intercepted, 0);
        assert!(matches!(verdict, Verdict::Forward { verify: None, .. }), "--host-verify off trusts it");
    }

    #[test]
    fn a_hello_without_a_name_is_decided_by_the_dialled_address() {
        let policy = policy(OutboundMode::RegistryOnly, HostVerify::Strict);
        let (verdict, _) = decide(&policy, None, to("198.51.100.20"), None, Arrival::Intercepted, 0);
        assert_eq!(forwarded(&verdict), Some((to("198.51.100.20"), "legacy.internal".into())), "in its range");
        let (verdict, _) = decide(&policy, None, to("203.0.113.10"), None, Arrival::Intercepted, 0);
        assert_eq!(forwarded(&verdict).map(|(_, name)| name), Some("api.stripe.com".into()), "resolved there");
        let (verdict, _) = decide(&policy, None, to("192.0.2.1"), None, Arrival::Intercepted, 0);
        assert!(matches!(verdict, Verdict::Refuse { reason: "unregistered_address", .. }), "{verdict:?}");
        let (verdict, _) = decide(
            &policy,
            None,
            SocketAddr::new("198.51.100.20".parse().unwrap(), 8443),
            None,
            Arrival::Intercepted,
            0,
        );
        assert!(matches!(verdict, Verdict::Refuse { .. }), "registered on 443 only");
    }
}

#[cfg(test)]
mod routed {
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

    /// The seeds' "Egress Gateway with SNI" (Pattern 3), with the Gateway and ServiceEntry it refers to.
    const PATTERN_3: &str = "
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: googleapis, namespace: default}
spec:
  hosts: [www.googleapis.com]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: istio-egress-gateway-sni, namespace: istio-system}
spec:
  selector: {istio: egressgateway}
  servers:
  - port: {number: 443, name: tls, protocol: TLS}
    hosts: ['*.googleapis.com']
    tls: {mode: PASSTHROUGH}
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: sni-egress, namespace: default}
spec:
  hosts: ['*.googleapis.com']
  gateways: [istio-system/istio-egress-gateway-sni, mesh]
  tls:
  - match: [{gateways: [mesh], port: 443, sniHosts: ['*.googleapis.com']}]
    route: [{destination: {host: istio-egressgateway.istio-system.svc.cluster.local, port: {number: 443}}}]
  - match: [{gateways: [istio-system/istio-egress-gateway-sni], port: 443, sniHosts: ['*.googleapis.com']}]
    route: [{destination: {host: www.googleapis.com, port: {number: 443}}}]
";

    fn policy() -> ProxyPolicy {
        let snapshot = Snapshot::from_yaml(PATTERN_3);
        let resolved = Resolved::from([("www.googleapis.com".to_owned(), vec!["203.0.113.30".parse().unwrap()])]);
        let sidecars = Arc::new(SidecarModes::compile(&snapshot, OutboundMode::RegistryOnly));
        let settings = ProxySettings {
            own_services: vec!["istio-egressgateway.istio-system.svc.cluster.local".into()],
            ..ProxySettings::default()
        };
        let labels = BTreeMap::from([("istio".to_owned(), "egressgateway".to_owned())]);
        proxy_policy(&snapshot, &resolved, &bind(&snapshot, &labels), sidecars, &settings, &Default::default())
    }

    fn at(port: u16) -> SocketAddr {
        SocketAddr::new("10.240.1.1".parse().unwrap(), port)
    }

    #[test]
    fn the_seeds_sni_egress_goes_mesh_to_gateway_to_host_in_process() {
        let policy = policy();
        assert_eq!(policy.gateway_ports().into_iter().collect::<Vec<_>>(), [443], "the PASSTHROUGH server's port");
        let googleapis = SocketAddr::new("203.0.113.30".parse().unwrap(), 443);
        for (arrival, dialled) in
            [(Arrival::Intercepted, "192.0.2.50:443".parse().unwrap()), (Arrival::Gateway(443), at(443))]
        {
            let (verdict, _) = decide(&policy, Some("storage.googleapis.com"), dialled, None, arrival, 0);
            let Verdict::Forward { address, labels, verify: None } = verdict else {
                panic!("{arrival:?}: {verdict:?}")
            };
            assert_eq!(address, googleapis, "{arrival:?}: the gateway's route, to the registered host's address");
            assert_eq!(labels.name().as_str(), "www.googleapis.com");
        }
    }

    #[test]
    fn a_gateway_port_refuses_names_and_ports_its_routes_do_not_serve() {
        let policy = policy();
        let refused =
            |name: Option<&str>, port: u16| match decide(&policy, name, at(port), None, Arrival::Gateway(port), 0) {
                (Verdict::Refuse { reason, .. }, _) => reason,
                (verdict, _) => panic!("{verdict:?}"),
            };
        assert_eq!(refused(Some("evil.example"), 443), "no_route");
        assert_eq!(refused(None, 443), "no_server_name");
        assert_eq!(refused(Some("storage.googleapis.com"), 8443), "no_gateway_server");
        // Intercepted, a name no route takes is decided by the registry: here, unregistered.
        let (verdict, _) = decide(&policy, Some("evil.example"), at(443), None, Arrival::Intercepted, 0);
        assert!(matches!(verdict, Verdict::Refuse { reason: "unregistered_server_name", .. }), "{verdict:?}");
    }
}

#[cfg(test)]
mod tcp_routed {
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

    /// The seeds' "TCP Egress Gateway" (Pattern 2), beside an HTTP service and a TCP one known at no address.
    const PATTERN_2: &str = "
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: external-db, namespace: default}
spec:
  hosts: [db.external-service.com]
  ports: [{number: 5432, name: postgres, protocol: TCP}]
  location: MESH_EXTERNAL
  resolution: DNS
---
apiVersion: networking.istio.io/v1beta1
kind: Gateway
metadata: {name: istio-egress-gateway-tcp, namespace: istio-system}
spec:
  selector: {istio: egressgateway}
  servers:
  - port: {number: 5432, name: tcp-postgres, protocol: TCP}
    hosts: [db.external-service.com]
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: route-external-db, namespace: default}
spec:
  hosts: [db.external-service.com]
  gateways: [istio-system/istio-egress-gateway-tcp, mesh]
  tcp:
  - match: [{gateways: [mesh], port: 5432}]
    route: [{destination: {host: istio-egressgateway.istio-system.svc.cluster.local, port: {number: 5432}}}]
  - match: [{gateways: [istio-system/istio-egress-gateway-tcp], port: 5432}]
    route: [{destination: {host: db.external-service.com, port: {number: 5432}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web, namespace: default}
spec:
  hosts: [web.example]
  addresses: [203.0.113.80]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: mysql, namespace: default}
spec:
  hosts: [mysql.example]
  ports: [{number: 3306, name: mysql, protocol: TCP}]
  resolution: NONE
";

    fn policy() -> ProxyPolicy {
        let snapshot = Snapshot::from_yaml(PATTERN_2);
        let resolved = Resolved::from([("db.external-service.com".to_owned(), vec!["203.0.113.40".parse().unwrap()])]);
        let sidecars = Arc::new(SidecarModes::compile(&snapshot, OutboundMode::RegistryOnly));
        let settings = ProxySettings {
            own_services: vec!["istio-egressgateway.istio-system.svc.cluster.local".into()],
            ..ProxySettings::default()
        };
        let labels = BTreeMap::from([("istio".to_owned(), "egressgateway".to_owned())]);
        proxy_policy(&snapshot, &resolved, &bind(&snapshot, &labels), sidecars, &settings, &Default::default())
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    fn forwarded(verdict: Verdict) -> (SocketAddr, String) {
        match verdict {
            Verdict::Forward { address, labels, verify: None } => (address, labels.name().as_str().to_owned()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_seeds_tcp_egress_goes_mesh_to_gateway_to_host_in_process() {
        let policy = policy();
        let db = (addr("203.0.113.40:5432"), "db.external-service.com".to_owned());
        let intercepted = decide_tcp(&policy, addr("203.0.113.40:5432"), None, Arrival::Intercepted, 0).0;
        assert_eq!(forwarded(intercepted), db, "the mesh route, then the gateway's");
        let at_gateway = decide_tcp(&policy, addr("10.240.1.1:5432"), None, Arrival::Gateway(5432), 0).0;
        assert_eq!(forwarded(at_gateway), db, "the Gateway's TCP server port");
        assert!(policy.gateway_ports().contains(&5432));
    }

    #[test]
    fn tcp_is_decided_by_address_and_http_ports_relay_no_opaque_bytes() {
        let policy = policy();
        let refused = |dialled: &str| match decide_tcp(&policy, addr(dialled), None, Arrival::Intercepted, 0).0 {
            Verdict::Refuse { reason, .. } => reason,
            other => panic!("{other:?}"),
        };
        assert_eq!(refused("192.0.2.1:5432"), "unregistered_address");
        assert_eq!(refused("203.0.113.80:80"), "not_http_on_an_http_port", "bytes that are not HTTP pass no route");
        // A TCP service known at no address has the whole port, as Istio gives it.
        let anywhere = decide_tcp(&policy, addr("198.51.100.7:3306"), None, Arrival::Intercepted, 0).0;
        assert_eq!(forwarded(anywhere), (addr("198.51.100.7:3306"), "mysql.example".to_owned()));
        let no_server = decide_tcp(&policy, addr("10.240.1.1:6379"), None, Arrival::Gateway(6379), 0).0;
        assert!(matches!(no_server, Verdict::Refuse { reason: "no_gateway_server", .. }));
    }
}
