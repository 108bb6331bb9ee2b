//! Connections the proxy relays without reading them — TLS (decided by the ClientHello's `server_name`, read
//! without terminating TLS and replayed to the upstream) and opaque TCP (decided by its address) — on intercepted
//! ports and on Gateway servers that pass TLS through or serve TCP: decided, relayed until either side closes or
//! both are silent, counted in Istio's TCP metrics and written to the access log.

pub mod client_hello;
mod decide;

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Instant, SystemTime},
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

use super::{
    authorize,
    connect_failure::ConnectFailure,
    http::HttpProxy,
    relay::{Bounds, Ended, Engine, Relay, Relayed},
    tcp,
};
use crate::{
    config::workloads::Workload,
    policy::{labels::DestinationLabels, routes::ProxyPolicy},
    telemetry::{
        access_log::format::Fields,
        connections::{ConnectionRecord, OpenConnection, TcpLabels},
        requests::{Principal, RequestTelemetry},
        response_flags::ResponseFlag,
        scopes::Scope,
    },
};
use client_hello::Hello;
pub use decide::{
    decide_tcp, decide_tcp_noting_hop, decide_tls, decide_tls_noting_hop, Arrival, Limited, Mismatch, RelayTerms,
    Verdict,
};

/// A client's stream the relay takes: a socket, or TLS the gateway terminated (a TLS Gateway server with `tcp`
/// routes); reset, rather than closed, when refused, so the client takes no close for an answer.
pub trait ClientStream: AsyncRead + AsyncWrite + Unpin {
    fn reset(&self);

    /// The plain socket, when the client's bytes are its bytes (not terminated TLS): the relay's kernel and
    /// splice engines take only sockets.
    fn socket(&mut self) -> Option<&mut TcpStream> {
        None
    }
}

impl ClientStream for TcpStream {
    fn reset(&self) {
        tcp::reset(self);
    }

    fn socket(&mut self) -> Option<&mut TcpStream> {
        Some(self)
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
    /// The stream does not start with a TLS handshake record (on a port declared TLS, read without detection).
    NotTls,
}

impl HelloRefused {
    pub fn label(self) -> &'static str {
        match self {
            HelloRefused::Malformed(_) => "malformed",
            HelloRefused::Timeout => "timeout",
            HelloRefused::Closed => "closed",
            HelloRefused::NotTls => "not_tls",
        }
    }
}

/// Reads the client's bytes into `bytes` (all to be replayed, whatever the outcome) until they hold a whole
/// ClientHello: its server name. (`bytes` is best passed empty, without capacity: the first read allocates 4 KiB,
/// which holds nearly every hello, where a smaller buffer would be grown — and copied whole — at once.)
pub async fn read_client_hello(
    stream: &mut TcpStream,
    within: std::time::Duration,
    bytes: &mut Vec<u8>,
) -> Result<Option<String>, HelloRefused> {
    let reading = async {
        loop {
            bytes.reserve(4096);
            match stream.read_buf(bytes).await {
                Ok(0) | Err(_) => return Err(HelloRefused::Closed),
                Ok(_) => {}
            }
            match client_hello::parse(bytes) {
                Hello::Incomplete => continue,
                Hello::Complete { server_name, .. } => return Ok(server_name),
                Hello::NotTls => return Err(HelloRefused::NotTls),
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
    if proxy.sheds("connection") {
        super::tcp::reset(&stream);
        return;
    }
    let clock = (SystemTime::now(), Instant::now());
    let mut hello = Vec::new();
    match read_client_hello(&mut stream, proxy.limits().request_headers_timeout, &mut hello).await {
        Ok(server_name) => {
            serve_tls_read(stream, (peer, dialled), (&hello, server_name), arrival, proxy, clock).await;
        }
        // On a port declared TLS (read without detection), a client that speaks something else is decided by the
        // address it dialled, as a ClientHello without a name is, and what it sent is replayed.
        Err(HelloRefused::NotTls) if arrival == Arrival::Intercepted => {
            serve_tcp_read(stream, (peer, dialled), (&hello, Terminated::default()), arrival, proxy, clock).await;
        }
        Err(refused) => refuse_hello(&stream, peer, dialled, refused, proxy),
    }
}

/// Closes a connection whose ClientHello was not read, counted by why.
pub fn refuse_hello(
    stream: &TcpStream,
    peer: SocketAddr,
    dialled: SocketAddr,
    refused: HelloRefused,
    proxy: &HttpProxy,
) {
    let detail = match refused {
        HelloRefused::Malformed(reason) => reason,
        _ => "",
    };
    tracing::debug!(source = %peer, original_dst = %dialled, reason = refused.label(), detail, "ClientHello refused");
    proxy.telemetry().client_hello_refused(refused.label());
    tcp::reset(stream);
}

/// Serves a TLS connection whose ClientHello (`hello`, naming `server_name`) has been read: decided by the name
/// and relayed, the hello replayed first. `clock`: when the connection was accepted.
pub async fn serve_tls_read(
    stream: TcpStream,
    (peer, dialled): (SocketAddr, SocketAddr),
    (hello, server_name): (&[u8], Option<String>),
    arrival: Arrival,
    proxy: &HttpProxy,
    clock: (SystemTime, Instant),
) {
    let workload = proxy.workload(peer.ip());
    let name = server_name.as_deref();
    let policy = proxy.policy();
    let mut hop = None;
    let decided =
        decide_tls_noting_hop(&policy, name, dialled, workload.as_deref(), arrival, fastrand::u32(..), &mut hop);
    let arrival = hop.map_or(arrival, Arrival::Gateway);
    let client = Terminated { principal: None, server_name: name };
    let (decided, denied) = authorized(decided, &policy, proxy, client, (peer, dialled), arrival, workload.as_deref());
    let (source, denied) = (workload.as_deref(), denied.as_deref());
    let scope = workload_scope(proxy, source, arrival);
    let connection = Connection { peer, dialled, server_name: name, hello, source, denied, scope: scope.as_deref() };
    finish(stream, &connection, decided, proxy, clock).await;
}

/// What the gateway knows of a client whose TLS it terminated before relaying the bytes inside (a TLS server's
/// `tcp` routes): its verified identity and the name it asked for, for AuthorizationPolicies and the log.
#[derive(Clone, Copy, Debug, Default)]
pub struct Terminated<'a> {
    pub principal: Option<&'a Principal>,
    pub server_name: Option<&'a str>,
}

/// Serves a connection that is neither HTTP nor TLS (or whose port is declared TCP): intercepted, or accepted on
/// a Gateway's TCP server port (or inside TLS a Gateway server terminated: `terminated`).
pub async fn serve_tcp<S: ClientStream>(
    stream: S,
    (peer, dialled): (SocketAddr, SocketAddr),
    arrival: Arrival,
    proxy: &HttpProxy,
    terminated: Terminated<'_>,
) {
    // Past --max-memory: closed at once (a reset where the stream is a socket of its own).
    if proxy.sheds("connection") {
        return;
    }
    let clock = (SystemTime::now(), Instant::now());
    serve_tcp_read(stream, (peer, dialled), (&[], terminated), arrival, proxy, clock).await;
}

/// Serves a connection decided by its address, `read` (what the client already sent) replayed first.
async fn serve_tcp_read<S: ClientStream>(
    stream: S,
    (peer, dialled): (SocketAddr, SocketAddr),
    (read, terminated): (&[u8], Terminated<'_>),
    arrival: Arrival,
    proxy: &HttpProxy,
    clock: (SystemTime, Instant),
) {
    let workload = proxy.workload(peer.ip());
    let policy = proxy.policy();
    let mut hop = None;
    let decided = decide_tcp_noting_hop(&policy, dialled, workload.as_deref(), arrival, fastrand::u32(..), &mut hop);
    let arrival = hop.map_or(arrival, Arrival::Gateway);
    let (decided, denied) =
        authorized(decided, &policy, proxy, terminated, (peer, dialled), arrival, workload.as_deref());
    let (server_name, source, denied) = (terminated.server_name, workload.as_deref(), denied.as_deref());
    let scope = workload_scope(proxy, source, arrival);
    let connection = Connection { peer, dialled, server_name, hello: read, source, denied, scope: scope.as_deref() };
    finish(stream, &connection, decided, proxy, clock).await;
}

/// The source workload's own Telemetry (its namespace's, its selector's) for what it sends through the mesh; what
/// arrives on a Gateway port (or is handed to one) takes the gateway's.
fn workload_scope(proxy: &HttpProxy, source: Option<&Workload>, arrival: Arrival) -> Option<Arc<Scope>> {
    let telemetry = proxy.telemetry();
    match (source, arrival) {
        (Some(source), Arrival::Intercepted) => telemetry.scope_of(source),
        _ => None,
    }
}

/// The decision, unless an AuthorizationPolicy denies the connection: then it is refused (closed, counted in
/// Istio's TCP metrics against the destination it would have reached), with the denial's termination details.
fn authorized(
    (verdict, mismatch): (Verdict, Mismatch),
    policy: &ProxyPolicy,
    proxy: &HttpProxy,
    client: Terminated<'_>,
    addresses: (SocketAddr, SocketAddr),
    arrival: Arrival,
    source: Option<&Workload>,
) -> ((Verdict, Mismatch), Option<String>) {
    if matches!(verdict, Verdict::Refuse { .. }) {
        return ((verdict, mismatch), None);
    }
    // Arrived on a Gateway port, or handed by a mesh route to this gateway's own Service (that port): the gateway's
    // policies decide it, as on its second hop to a gateway pod.
    let (peer, dialled) = addresses;
    let (gateway, dialled) = match arrival {
        Arrival::Gateway(port) => (true, SocketAddr::new(dialled.ip(), port)),
        Arrival::Intercepted => (false, dialled),
    };
    let (server_name, principal) = (client.server_name, client.principal);
    let client = (server_name, principal);
    let Err(details) = authorize::connection(policy, proxy.telemetry(), client, (peer, dialled), gateway, source)
    else {
        return ((verdict, mismatch), None);
    };
    let labels = match verdict {
        Verdict::Forward { labels, .. } | Verdict::Resolve { labels, .. } | Verdict::Refuse { labels, .. } => labels,
    };
    ((Verdict::Refuse { labels, flag: ResponseFlag::None, reason: "rbac_access_denied" }, mismatch), Some(details))
}

/// Relays a decided connection (or refuses it), then counts it in Istio's TCP metrics and writes its line.
async fn finish<S: ClientStream>(
    mut stream: S,
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
    match outcome.open {
        // Ended with a flag of its own (`DT`): closed under it, as Istio labels a connection's last report.
        Some(open) if outcome.flag != ResponseFlag::None => {
            drop(open);
            let labels = series_labels(telemetry, connection, (&outcome.destination, outcome.flag), outcome.upstream);
            telemetry.tcp.ending(labels.into_each()).closed(outcome.received, outcome.sent);
        }
        Some(open) => open.closed(outcome.received, outcome.sent),
        None => {
            // Refused: counted as opened and closed at once, and reset so the client takes no close for an answer.
            count_opened(telemetry, connection, (&outcome.destination, outcome.flag), outcome.upstream).closed(0, 0);
            stream.reset();
        }
    }
    let record = ConnectionRecord {
        start,
        duration: started.elapsed(),
        flag: outcome.flag,
        received: outcome.received,
        sent: outcome.sent,
        upstream: outcome.upstream,
        upstream_local: outcome.upstream_local,
        upstream_transport_failure_reason: outcome.transport_failure.as_deref(),
        termination_details: connection.denied,
        destination: &outcome.destination,
        local: connection.dialled,
        remote: connection.peer,
        server_name: connection.server_name,
        relay_engine: outcome.engine.map(Engine::as_str),
        refused_because: outcome.refused_because,
    };
    telemetry.log_connection(&record, connection.scope);
}

/// Counts `connection` (to `destination`, with Envoy's response flag) opened in Istio's TCP metrics.
fn count_opened(
    telemetry: &RequestTelemetry,
    connection: &Connection<'_>,
    destination: (&DestinationLabels, ResponseFlag),
    upstream: Option<SocketAddr>,
) -> OpenConnection {
    match series_labels(telemetry, connection, destination, upstream) {
        SeriesLabels::Shared(labels) => telemetry.tcp.opened(&labels),
        SeriesLabels::Tagged(each) => telemetry.tcp.opened_labelled(*each),
    }
}

/// The labels of `connection`'s series: one set for all four metrics, or one each where the Telemetry API's tag
/// overrides apply to them.
enum SeriesLabels {
    Shared(TcpLabels),
    Tagged(Box<[TcpLabels; 4]>),
}

impl SeriesLabels {
    fn into_each(self) -> [TcpLabels; 4] {
        match self {
            SeriesLabels::Shared(labels) => std::array::from_fn(|_| labels.clone()),
            SeriesLabels::Tagged(each) => *each,
        }
    }
}

fn series_labels(
    telemetry: &RequestTelemetry,
    connection: &Connection<'_>,
    (destination, flag): (&DestinationLabels, ResponseFlag),
    upstream: Option<SocketAddr>,
) -> SeriesLabels {
    let labels = TcpLabels::new(destination, flag).from_source(connection.source);
    let gateway_tags;
    let overrides = match connection.scope {
        Some(scope) => Some(&scope.tags).filter(|tags| tags.on_connections()),
        None => {
            gateway_tags = telemetry.connection_tags();
            gateway_tags.as_deref().map(|in_force| &in_force.tags)
        }
    };
    let Some(overrides) = overrides else { return SeriesLabels::Shared(labels) };
    let cluster = destination.cluster();
    let fields = Fields {
        response_flags: flag.text(),
        upstream_host: upstream,
        upstream_cluster: Some(&cluster),
        downstream_local: Some(connection.dialled),
        downstream_remote: Some(connection.peer),
        server_name: connection.server_name,
        ..Fields::default()
    };
    SeriesLabels::Tagged(Box::new(labels.tagged(overrides, &fields)))
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
    /// An AuthorizationPolicy's denial (Envoy's connection termination details), when one refused it.
    denied: Option<&'a str>,
    /// The source workload's own Telemetry, where some scopes to it.
    scope: Option<&'a Scope>,
}

/// How a connection ended: relayed (`upstream` set; counted as opened when it was, `open`), or refused.
struct Outcome {
    destination: DestinationLabels,
    flag: ResponseFlag,
    upstream: Option<SocketAddr>,
    /// The address the upstream connection left from.
    upstream_local: Option<SocketAddr>,
    received: u64,
    sent: u64,
    open: Option<OpenConnection>,
    engine: Option<Engine>,
    /// Why the decision refused it (`rbac_access_denied`, `no_route`…), when it did.
    refused_because: Option<&'static str>,
    /// Why no connection to the upstream could be made, as Envoy says it (`delayed_connect_error:_…`).
    transport_failure: Option<String>,
}

impl Outcome {
    fn refused(destination: DestinationLabels, flag: ResponseFlag) -> Outcome {
        let (upstream, upstream_local, open, engine, refused_because) = (None, None, None, None, None);
        let (received, sent, transport_failure) = (0, 0, None);
        Outcome {
            destination,
            flag,
            upstream,
            upstream_local,
            received,
            sent,
            open,
            engine,
            refused_because,
            transport_failure,
        }
    }
}

/// Relays `connection` where `verdict` says, until either side closes or both are silent for the idle timeout.
async fn relay<S: ClientStream>(
    stream: &mut S,
    connection: &Connection<'_>,
    verdict: Verdict,
    proxy: &HttpProxy,
) -> Outcome {
    let telemetry = proxy.telemetry();
    let Connection { peer, dialled, server_name, hello, .. } = *connection;
    let (address, destination, terms) = match verdict {
        Verdict::Forward { address, labels, verify: Some(host), terms } => {
            if !proxy.host_resolves_to(&host, address.ip()).await {
                telemetry.host_mismatch("refused");
                tracing::debug!(source = %peer, %host, upstream = %address, "the name does not resolve to the address dialled");
                return Outcome::refused(labels, ResponseFlag::NoRouteFound);
            }
            (address, labels, terms)
        }
        Verdict::Forward { address, labels, verify: None, terms } => (address, labels, terms),
        Verdict::Resolve { host, port, labels, terms } => match proxy.resolve(&host, port).await {
            Some(address) => (address, labels, terms),
            None => return Outcome::refused(labels, ResponseFlag::DnsResolutionFailed),
        },
        Verdict::Refuse { labels, flag, reason } => {
            tracing::debug!(source = %peer, original_dst = %dialled, sni = server_name.unwrap_or("-"), reason, "connection refused");
            return Outcome { refused_because: Some(reason), ..Outcome::refused(labels, flag) };
        }
    };
    // The cluster's `maxConnections`: a place held while the connection is relayed, or none left and the
    // connection refused, as Envoy's tcp_proxy refuses it (`UO`).
    let _place = match terms.limited.as_ref().map(Limited::admit) {
        Some(None) => {
            tracing::debug!(source = %peer, upstream = %address, "the cluster's connections are at their limit");
            let refused = Outcome::refused(destination, ResponseFlag::UpstreamOverflow);
            return Outcome { refused_because: Some("upstream_overflow"), ..refused };
        }
        Some(place) => place,
        None => None,
    };
    // A DestinationRule's `connectionPool.tcp` settings over the mesh's, the idle timeout over the agent's.
    let mut upstream = match tcp::connect(address, proxy.upstream_sockets(), terms.connect).await {
        Ok(upstream) => upstream,
        Err(error) => {
            let verdict = tcp::connect_failure(&error);
            tracing::info!(source = %peer, original_dst = %dialled, upstream = %address, %error, verdict, "upstream connect failed");
            let why = (!tcp::is_local_destination(&error)).then(|| ConnectFailure::from_connect(&error));
            let transport_failure = why.and_then(|why| why.transport_reason());
            let upstream = Some(address);
            return Outcome {
                upstream,
                transport_failure,
                ..Outcome::refused(destination, ResponseFlag::UpstreamConnectionFailure)
            };
        }
    };
    // A system call per connection, for the access log alone.
    let upstream_local = telemetry.logs_connections(connection.scope).then(|| upstream.local_addr().ok()).flatten();
    let open = count_opened(telemetry, connection, (&destination, ResponseFlag::None), Some(address));
    let bounds = Bounds { idle: terms.idle.unwrap_or(proxy.limits().idle_timeout), lifetime: terms.lifetime };
    let joined = match upstream.write_all(hello).await {
        Ok(()) => match stream.socket() {
            Some(socket) => Some(proxy.relay().sockets(socket, &mut upstream, bounds).await),
            None => Some(Relay::streams(stream, &mut upstream, bounds).await),
        },
        Err(_) => None,
    };
    tracing::debug!(source = %peer, upstream = %address, relayed = ?joined, "connection relayed");
    let (received, sent) = joined.as_ref().map(|joined| (joined.from_first, joined.from_second)).unwrap_or_default();
    let received = received + hello.len() as u64;
    // Ended by its lifetime: `DT` in its log line, as Envoy's tcp_proxy marks it.
    let flag = match &joined {
        Some(Relayed { ended: Ended::Lifetime, .. }) => ResponseFlag::DurationTimeout,
        _ => ResponseFlag::None,
    };
    let engine = joined.map(|joined| joined.engine);
    let (upstream, open) = (Some(address), Some(open));
    Outcome { upstream, upstream_local, received, sent, open, engine, ..Outcome::refused(destination, flag) }
}
