//! The HTTP proxy: HTTP/1.1 and HTTP/2 (prior knowledge) from clients, each request routed by the
//! VirtualServices of its context, checked against the registry, and forwarded over pooled upstream
//! connections, or answered locally the way Envoy answers.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::{Duration, Instant, SystemTime},
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures_util::FutureExt;
use http::{
    header, uri::PathAndQuery, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version,
};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
use hyper::{
    body::{Body, Frame, Incoming, SizeHint},
    upgrade::OnUpgrade,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use smallvec::SmallVec;
use tokio::net::TcpStream;

pub use super::routing::Listener;
use super::{
    detect::HttpVersion,
    failure::Failure,
    idle, join, path,
    routing::{self, Decision, Destination, Matched},
    tcp::{self, UpstreamSockets},
    upstreams::{Outgoing, SendError, UpstreamTls, Upstreams},
};
use tokio::sync::OwnedSemaphorePermit;

use crate::{
    config::{mesh::PathNormalization, resolver::DnsResolver, workloads::Workloads},
    policy::clusters::{Admission, Outcome, TlsOrigination},
    policy::routes::{Cors, HostVerify, Mirror, ProxyPolicy, RetryPolicy, Route, Target},
    telemetry::{
        connections::TcpLabels,
        labels::DestinationLabels,
        requests::{RequestRecord, RequestTelemetry},
    },
};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// Envoy's default limits on a request's headers: 60 KiB (the request line included) and 100 headers.
const MAX_REQUEST_HEADERS_BYTES: usize = 60 * 1024;
const MAX_REQUEST_HEADERS: usize = 100;
/// The longest request URI taken (a longer one gets 414), within the 60 KiB of the head.
const MAX_URI_BYTES: usize = 16 * 1024;
/// The largest request body kept for retries and mirrors; a larger one (or one of unknown size) is streamed
/// to one try.
const MAX_REPLAYED_BODY: u64 = 64 * 1024;
/// The retries of a route that sets none (Istio's mesh default).
static MESH_RETRIES: std::sync::LazyLock<RetryPolicy> = std::sync::LazyLock::new(RetryPolicy::mesh_default);
/// Headers that describe one hop, never forwarded (RFC 9110, 7.6.1). `Trailer` is end to end: it announces the
/// trailer fields, and an HTTP/1.1 client is sent only those.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::UPGRADE,
    // An h2c upgrade's settings are the connection's (RFC 9113 §3.2).
    HeaderName::from_static("http2-settings"),
];
/// Mirrored requests in flight at most, and how long each may take: their answers are ignored, so they must cost
/// the gateway no more than this.
const MAX_MIRRORS_IN_FLIGHT: usize = 256;
const MIRROR_TIMEOUT: Duration = Duration::from_secs(30);
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_ENVOY_UPSTREAM_SERVICE_TIME: HeaderName = HeaderName::from_static("x-envoy-upstream-service-time");

/// One client connection's addresses.
#[derive(Clone, Copy, Debug)]
pub struct Connection {
    pub peer: SocketAddr,
    /// The accepted socket's local address: for intercepted traffic, the original destination.
    pub local: SocketAddr,
    pub listener: Listener,
}

pub struct HttpProxy {
    policy: Arc<ArcSwap<ProxyPolicy>>,
    upstreams: Upstreams,
    /// Shared with each response body, which records the request when it ends.
    telemetry: Arc<RequestTelemetry>,
    limits: Limits,
    connections: Arc<tokio::sync::Semaphore>,
    /// Mirrored requests in flight: a route mirroring a flood sends no more than this at once (others are not
    /// mirrored).
    mirrors: Arc<tokio::sync::Semaphore>,
    /// Looks up the hosts that forward-proxied requests name.
    resolver: Option<Arc<DnsResolver>>,
    /// The workloads behind the gateway by address (from Kubernetes), for source matches and labels.
    workloads: Arc<ArcSwap<Workloads>>,
}

/// What one client may cost the proxy, and where its upstream connections may go.
#[derive(Clone)]
pub struct Limits {
    /// Client connections open at once (intercepted and on Gateway ports); more are reset at accept.
    pub max_connections: usize,
    /// How long a client may take to send a request's headers (slowloris clients hold a connection no longer).
    pub request_headers_timeout: Duration,
    /// Where upstream connections leave from, and the destinations they never go to (the node itself).
    pub sockets: UpstreamSockets,
    /// How long a request's body, a tunnel or an upgraded connection may go without a byte (Envoy's
    /// `stream_idle_timeout`).
    pub stream_idle_timeout: Duration,
    /// How long a client connection may stay open with no request (Envoy's `idle_timeout`), and an opaque TCP
    /// relay without a byte.
    pub idle_timeout: Duration,
}

impl HttpProxy {
    pub fn new(policy: Arc<ArcSwap<ProxyPolicy>>, telemetry: RequestTelemetry, limits: Limits) -> HttpProxy {
        let upstreams = Upstreams::new(limits.sockets.clone());
        let connections = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
        let telemetry = Arc::new(telemetry);
        let mirrors = Arc::new(tokio::sync::Semaphore::new(MAX_MIRRORS_IN_FLIGHT));
        HttpProxy {
            policy,
            upstreams,
            telemetry,
            limits,
            connections,
            mirrors,
            resolver: None,
            workloads: Default::default(),
        }
    }

    /// The workload at `address`, when the pod watcher knows it.
    pub fn workload(&self, address: std::net::IpAddr) -> Option<Arc<crate::config::workloads::Workload>> {
        self.workloads.load().get(address).cloned()
    }

    /// Knows the workloads that send requests from `workloads` (kept current by its owner).
    pub fn with_workloads(mut self, workloads: Arc<ArcSwap<Workloads>>) -> HttpProxy {
        self.workloads = workloads;
        self
    }

    /// Resolves the hosts that forward-proxied requests name with `resolver`.
    pub fn with_resolver(mut self, resolver: Arc<DnsResolver>) -> HttpProxy {
        self.resolver = Some(resolver);
        self
    }

    pub fn telemetry(&self) -> &RequestTelemetry {
        &self.telemetry
    }

    pub fn upstream_sockets(&self) -> &UpstreamSockets {
        &self.limits.sockets
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// A place for one more client connection, or `None` at `--max-connections` (the connection is then reset
    /// and counted).
    pub fn admit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let permit = self.connections.clone().try_acquire_owned().ok();
        if permit.is_none() {
            self.telemetry.connection_refused();
        }
        permit
    }

    /// Keeps one of the runtime's timers due within a second, for as long as it runs. A connection waiting for a
    /// request's headers has a deadline (`request_headers_timeout`) registered with tokio's timer, which wakes its
    /// driver (a system call) whenever a new deadline is earlier than every one it holds: with this one always
    /// due sooner, registering a deadline of a second or more never has to.
    pub async fn keep_a_timer_due() {
        let mut ticks = tokio::time::interval(Duration::from_secs(1));
        loop {
            ticks.tick().await;
        }
    }

    /// How long a client may take to send a request's headers.
    pub fn request_headers_timeout(&self) -> Duration {
        self.limits.request_headers_timeout
    }

    /// Serves one client connection (HTTP/1.1 with keep-alive, or HTTP/2, as its first bytes said) until it
    /// closes.
    pub async fn serve_connection(self: Arc<Self>, stream: TcpStream, connection: Connection, version: HttpVersion) {
        let _ = stream.set_nodelay(true);
        let proxy = self.clone();
        let activity = idle::Activity::new();
        let requests = activity.clone();
        // A request's future is boxed: hyper moves what its service returns, and the whole exchange is kilobytes.
        let service = hyper::service::service_fn(move |request| {
            Box::pin(proxy.clone().handle(request, connection, requests.begin()).map(answered))
        });
        let io = TokioIo::new(stream);
        let (first_request, idle) = (self.limits.request_headers_timeout, self.limits.idle_timeout);
        let served = match version {
            HttpVersion::Http1 => {
                let connection = hyper::server::conn::http1::Builder::new()
                    .writev(false)
                    .timer(TokioTimer::new())
                    .header_read_timeout(self.limits.request_headers_timeout)
                    // The head's size is checked as parsed, not only when the read buffer fills: one read may
                    // bring in more than the limit.
                    .max_header_size(MAX_REQUEST_HEADERS_BYTES)
                    .max_buf_size(MAX_REQUEST_HEADERS_BYTES)
                    .max_headers(MAX_REQUEST_HEADERS)
                    .serve_connection(io, service)
                    .with_upgrades();
                idle::serve_until_idle(connection, &activity, first_request, idle).await
            }
            HttpVersion::Http2 => {
                let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .max_header_list_size(MAX_REQUEST_HEADERS_BYTES as u32)
                    .serve_connection(io, service);
                idle::serve_until_idle(connection, &activity, first_request, idle).await
            }
        };
        let Some(served) = served else {
            tracing::debug!(peer = %connection.peer, "client connection idle: closed");
            return;
        };
        if let Err(error) = served {
            tracing::debug!(%error, peer = %connection.peer, "client connection ended");
        }
    }

    /// Answers one request. (An async block, not an `async fn`: the future of an `async fn` keeps its arguments
    /// twice, and each request's future is copied whole into its box.)
    #[allow(clippy::manual_async_fn)]
    fn handle(
        self: Arc<Self>,
        mut request: Request<Incoming>,
        mut connection: Connection,
        in_progress: idle::InProgress,
    ) -> impl Future<Output = Response<ProxyBody>> + Send {
        async move {
            // The connection is not idle until the response's head is out.
            let _in_progress = in_progress;
            let started = Instant::now();
            // Every request carries an id from here on, local replies included, as Envoy's do.
            if !request.headers().contains_key(&X_REQUEST_ID) {
                // In an allocation of its own with a count: the copies of the request's headers for retries share it.
                if let Ok(id) = HeaderValue::from_maybe_shared(Bytes::from_owner(request_id())) {
                    request.headers_mut().insert(X_REQUEST_ID, id);
                }
            }
            let policy = self.policy.load_full();
            // Boxed: a request's future holds it across every wait, and is moved as a whole.
            let mut record = Box::new(RequestRecord {
                protocol: protocol_name(request.version()),
                grpc: request
                    .headers()
                    .get(header::CONTENT_TYPE)
                    .is_some_and(|content_type| content_type.as_bytes().starts_with(b"application/grpc")),
                downstream_remote: Some(connection.peer),
                downstream_local: Some(connection.local),
                ..RequestRecord::default()
            });
            // The URI's authority (absolute form, HTTP/2), else Host: shared with the request rather than copied.
            let authority = match request.uri().authority() {
                Some(authority) => HeaderValue::from_str(authority.as_str()).ok(),
                None => request.headers().get(header::HOST).cloned(),
            };
            let authority = authority.as_ref().and_then(|value| value.to_str().ok());
            // What only the access log shows (the wall clock included) is read only when there is one.
            if self.telemetry.logs_requests() {
                record.start = Some(SystemTime::now());
                record.authority = authority.unwrap_or_default().to_owned();
                record.method = request.method().as_str().to_owned();
                record.path =
                    request.uri().path_and_query().map_or_else(|| "/".to_owned(), |pq| pq.as_str().to_owned());
                record.user_agent = header_text(request.headers(), header::USER_AGENT);
                record.x_forwarded_for = header_text(request.headers(), &X_FORWARDED_FOR);
                record.request_id = header_text(request.headers(), &X_REQUEST_ID);
            }
            if request.uri().path_and_query().is_some_and(|pq| pq.as_str().len() > MAX_URI_BYTES) {
                return self.local_failure(Failure::UriTooLong, record, started, None);
            }
            // Matched and forwarded as normalized, so that `/a/./b` meets the routes `/a/b` meets.
            match normalize_path(&mut request, policy.path_normalization) {
                Ok(false) => {}
                Ok(true) if self.telemetry.logs_requests() => {
                    record.path = request.uri().path_and_query().map_or_else(String::new, |pq| pq.as_str().to_owned());
                }
                Ok(true) => {}
                Err(path::InvalidPath) => return self.local_failure(Failure::BadRequest, record, started, None),
            }
            let Some(authority) = authority else {
                return self.local_failure(Failure::BadRequest, record, started, None);
            };
            if connection.listener == Listener::Forward {
                if request.method() == Method::CONNECT {
                    return self.tunnel(&policy, request, authority, record, started).await;
                }
                // An `https://` URL in a request line would go out in the clear: clients tunnel those (CONNECT).
                if request.uri().scheme() == Some(&http::uri::Scheme::HTTPS) {
                    return self.local_failure(Failure::HttpsInTheClear, record, started, None);
                }
                // The destination the request names; its address is looked up only if the route needs it.
                let port = request.uri().port_u16().unwrap_or(80);
                connection.local = SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), port);
            }
            let unverified = {
                let workloads = self.workloads.load();
                let source = workloads.get(connection.peer.ip()).map(|source| &**source);
                routing::host_needs_dns_verification(&policy, authority, connection.listener, connection.local, source)
            };
            if unverified && !self.host_resolves_to(routing::host_of(authority), connection.local.ip()).await {
                self.telemetry.host_mismatch("refused");
                return self.local_failure(Failure::HostMismatch, record, started, None);
            }
            let decision = {
                let workloads = self.workloads.load();
                let source = workloads.get(connection.peer.ip());
                if let Some(source) = source {
                    record.source_workload = Some(source.name.clone().into());
                    record.source_workload_namespace = Some(source.namespace.clone().into());
                }
                routing::decide(
                    &policy,
                    &request,
                    authority,
                    connection.listener,
                    connection.local,
                    source.map(|source| &**source),
                    fastrand::u32(..),
                )
            };
            // The decision is taken apart before the forwarding is waited for, so that the request's future does not
            // keep it.
            let forwarding = match decision {
                Decision::Fail { failure, labels } => {
                    if failure == Failure::HostMismatch {
                        self.telemetry.host_mismatch("refused");
                    }
                    return self.local_failure(failure, record, started, labels);
                }
                Decision::Respond { route, status, body } => {
                    record.route_name = Some(route.name());
                    return self.local_reply(status, body, "", record, started, Some(route));
                }
                Decision::Redirect { route, status, location } => {
                    record.route_name = Some(route.name());
                    let mut response = Response::new(empty());
                    *response.status_mut() = status;
                    if let Ok(location) = HeaderValue::from_str(&location) {
                        response.headers_mut().insert(header::LOCATION, location);
                    }
                    record.response_code = status.as_u16();
                    return self.finish(response, record, started, Some(route));
                }
                Decision::Forward { route, target, destination, host_mismatch } => {
                    if host_mismatch {
                        let action = if policy.host_verify == HostVerify::Route { "routed" } else { "trusted" };
                        self.telemetry.host_mismatch(action);
                    }
                    record.route_name = route.map(|(route, _)| route.name());
                    self.forward(&policy, request, connection, route, target, authority, destination, record, started)
                }
            };
            forwarding.await
        }
    }

    /// Sends the request where routing said, and answers with the upstream's response or the failure. (An async
    /// block, as `handle` is.)
    #[allow(clippy::too_many_arguments, clippy::manual_async_fn)]
    fn forward<'a>(
        &'a self,
        policy: &'a ProxyPolicy,
        request: Request<Incoming>,
        connection: Connection,
        matched: Option<Matched<'a>>,
        target: Option<&'a Target>,
        authority: &'a str,
        mut destination: Destination<'a>,
        mut record: Box<RequestRecord>,
        started: Instant,
    ) -> impl Future<Output = Response<ProxyBody>> + Send + 'a {
        async move {
            let route = matched.map(|(route, _)| route);
            destination.hash_request(request.headers(), request.uri(), connection.peer.ip());
            // Faults are injected before anything is sent, as Envoy's fault filter runs before its router.
            if let Some(route) = route {
                if let Some((delay, percent)) = route.fault().and_then(|fault| fault.delay) {
                    if chance(percent) {
                        record.response_flags = "DI";
                        tokio::time::sleep(delay).await;
                    }
                }
                if let Some((status, percent)) = route.fault().and_then(|fault| fault.abort) {
                    if chance(percent) {
                        let body = Bytes::from_static(b"fault filter abort");
                        return self.local_reply(status, body, "FI", record, started, Some(route));
                    }
                }
            }
            let cors = route.and_then(|route| route.cors());
            let origin = header_text(request.headers(), header::ORIGIN).filter(|o| cors.is_some_and(|c| c.allows(o)));
            if let (Some(cors), Some(origin)) = (cors, origin.as_deref()) {
                if request.method() == Method::OPTIONS
                    && request.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
                {
                    let mut response = Response::new(empty());
                    preflight_headers(cors, origin, response.headers_mut());
                    record.response_code = StatusCode::OK.as_u16();
                    return self.finish(response, record, started, route);
                }
            }

            let (mut parts, body) = request.into_parts();
            // An HTTP/1.1 upgrade (WebSocket): its headers go upstream, and a 101 joins the two connections. Only
            // the protocols allowed (Envoy's `upgrade_configs`; Istio's is `websocket`) are: any other would take
            // the connection out of the proxy's hands (an `h2c` upgrade's later streams would never be routed).
            // An h2c upgrade is dropped and the request served as HTTP/1.1, as Envoy does; others get 403.
            let upgrade = match requested_upgrade(&parts.headers) {
                Some(protocol) if policy.allows_upgrade(&protocol) => Some(protocol),
                Some(protocol) if protocol.as_bytes().eq_ignore_ascii_case(b"h2c") => None,
                Some(protocol) => {
                    tracing::debug!(?protocol, "upgrade not allowed");
                    return self.local_failure(Failure::UpgradeNotAllowed, record, started, Some(destination.labels));
                }
                None => None,
            };
            let client_upgrade = upgrade.as_ref().and_then(|_| parts.extensions.remove::<OnUpgrade>());
            // What a streamed body has carried so far (a body kept for retries is counted whole, at once).
            let mut received = None;
            let path_and_query = match routing::rewritten_path(matched, &parts.uri) {
                Ok(path_and_query) => path_and_query,
                Err(error) => {
                    tracing::debug!(%error, route = ?record.route_name, "the route's rewrite makes no valid path");
                    return self.local_failure(Failure::UpstreamReset, record, started, Some(destination.labels));
                }
            };
            let upstream_authority = route.and_then(|route| route.rewrite()?.authority.as_deref()).unwrap_or(authority);
            let headers = &mut parts.headers;
            let trailers = accepts_trailers(headers);
            strip_hop_by_hop(headers);
            // Of TE, only `trailers` goes on (gRPC needs it), as Envoy forwards it.
            if trailers {
                headers.insert(header::TE, HeaderValue::from_static("trailers"));
            }
            if let Some(protocol) = &upgrade {
                headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                headers.insert(header::UPGRADE, protocol.clone());
            }
            // As Istio's Envoys do: a sidecar (intercepted traffic) keeps what the client says and adds what is
            // missing; a gateway (`use_remote_address`) appends the client's address to `x-forwarded-for` and says
            // itself how the request came (plain HTTP here), whatever the client claimed.
            if let Listener::Gateway(_) = connection.listener {
                append_forwarded_for(headers, connection.peer);
                headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
            } else {
                headers.entry(X_FORWARDED_PROTO).or_insert(HeaderValue::from_static("http"));
            }
            if let Some(route) = route {
                route.request_headers.apply(headers);
            }
            if let Some(operations) = target.and_then(|target| target.request_headers()) {
                operations.apply(headers);
            }

            // A body is kept for retries and mirrors when it is small and says so; any other streams through once.
            let retries = route.and_then(|route| route.retries()).unwrap_or(&MESH_RETRIES);
            let mirror = route.and_then(|route| route.mirror()).filter(|mirror| chance(mirror.percent));
            let small = body.size_hint().upper().is_some_and(|size| size <= MAX_REPLAYED_BODY);
            let mut streamed = None;
            let replayable = if small && (retries.attempts > 0 || mirror.is_some()) {
                match tokio::time::timeout(self.limits.stream_idle_timeout, body.collect()).await {
                    Ok(Ok(collected)) => Some(collected.to_bytes()),
                    Ok(Err(error)) => {
                        tracing::debug!(%error, peer = %connection.peer, "client body ended early");
                        return self.local_failure(Failure::BadRequest, record, started, Some(destination.labels));
                    }
                    Err(_) => {
                        tracing::debug!(peer = %connection.peer, "client body not sent within the stream idle timeout");
                        let labels = Some(destination.labels);
                        return self.local_failure(Failure::StreamIdleTimeout, record, started, labels);
                    }
                }
            } else {
                let counted = Arc::new(AtomicU64::new(0));
                let idle = self.limits.stream_idle_timeout;
                streamed = Some(Counted::new(body, counted.clone(), idle).boxed());
                received = Some(counted);
                None
            };
            if let Some(bytes) = &replayable {
                record.bytes_received = bytes.len() as u64;
            }
            if let (Some(mirror), Some(bytes)) = (mirror, &replayable) {
                self.mirror(policy, mirror, &parts, &path_and_query, upstream_authority, bytes.clone(), connection);
            }

            // A timeout too long to reach (a configuration may say 1000000h) is no timeout, not an overflow.
            let deadline_in = |timeout: Duration| tokio::time::Instant::now().checked_add(timeout);
            let overall = route.and_then(|route| route.timeout()).and_then(deadline_in);
            // The cluster's connection-pool limits: a slot now, a wait within the pending limit, or 503 UO.
            let cluster = destination.cluster();
            let slot = match cluster.map(|cluster| (cluster, cluster.state.admit())) {
                None | Some((_, Admission::Now(None))) => None,
                Some((_, Admission::Now(Some(permit)))) => Some(permit),
                Some((cluster, Admission::Wait(slots))) => {
                    let acquire = slots.acquire_owned();
                    let waited = cluster
                        .state
                        .waiting(async {
                            match overall {
                                Some(deadline) => {
                                    tokio::time::timeout_at(deadline, acquire).await.ok().and_then(Result::ok)
                                }
                                None => acquire.await.ok(),
                            }
                        })
                        .await;
                    match waited {
                        Some(permit) => Some(permit),
                        None => {
                            return self.local_failure(
                                Failure::UpstreamTimeout,
                                record,
                                started,
                                Some(destination.labels),
                            )
                        }
                    }
                }
                Some((_, Admission::Overflow)) => {
                    return self.local_failure(Failure::Overflow, record, started, Some(destination.labels));
                }
            };
            let outlier = cluster.and_then(|cluster| Some((cluster, cluster.policy.outlier.as_ref()?)));
            let mut address = match self.address_of(&destination, routing::host_of(authority)).await {
                Ok(address) => address,
                Err(failure) => return self.local_failure(failure, record, started, Some(destination.labels)),
            };
            // TLS to the endpoints when the DestinationRule originates it; settings that cannot be used refuse the
            // request rather than send it in the clear.
            let tls = match upstream_tls(&destination, upstream_authority) {
                Ok(tls) => tls,
                Err(reason) => {
                    tracing::debug!(destination = %destination.labels.cluster(), %reason, "TLS origination refused");
                    return self.local_failure(Failure::TlsOrigination, record, started, Some(destination.labels));
                }
            };
            let mut attempt = 0u32;
            let outcome = loop {
                let body = match (&replayable, streamed.take()) {
                    (Some(bytes), _) if bytes.is_empty() => empty(),
                    (Some(bytes), _) => Full::new(bytes.clone()).map_err(|never| match never {}).boxed(),
                    (None, Some(body)) => body,
                    (None, None) => break Err(Failure::UpstreamReset),
                };
                let outgoing = Outgoing {
                    address,
                    http2: destination.http2,
                    authority: upstream_authority,
                    path_and_query: path_and_query.clone(),
                    method: parts.method.clone(),
                    headers: parts.headers.clone(),
                    connect_timeout: destination.connect_timeout(),
                    tls: tls.clone(),
                };
                let try_started = Instant::now();
                let per_try = retries.per_try_timeout.and_then(deadline_in);
                let deadline = match (overall, per_try) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                let pending = self.upstreams.send(outgoing, body);
                let result = match deadline {
                    Some(deadline) => tokio::time::timeout_at(deadline, pending).await.ok(),
                    None => Some(pending.await),
                };
                if let Some((cluster, outlier)) = outlier {
                    let outcome = match &result {
                        Some(Ok(response)) => Outcome::Status(response.status().as_u16()),
                        _ => Outcome::Failed,
                    };
                    cluster.state.report(address.ip(), outcome, outlier);
                }
                let time_left = overall.is_none_or(|overall| tokio::time::Instant::now() < overall);
                let may_retry = replayable.is_some() && attempt < retries.attempts && time_left;
                let failure = match result {
                    Some(Ok(response)) if may_retry && retries.on.status(response.status().as_u16()) => None,
                    Some(Ok(response)) => break Ok((response, try_started)),
                    Some(Err(SendError::Connect(error))) => {
                        tracing::debug!(%error, upstream = %address, attempt, "upstream connect failed");
                        Some((Failure::UpstreamConnect, retries.on.connect_failure))
                    }
                    Some(Err(SendError::Request(error))) => {
                        tracing::debug!(%error, upstream = %address, attempt, "upstream request failed");
                        Some((Failure::UpstreamReset, retries.on.reset_or_timeout()))
                    }
                    Some(Err(SendError::LocalDestination(error))) => {
                        tracing::info!(%error, upstream = %address, "upstream refused: the node itself");
                        Some((Failure::LocalDestination, false))
                    }
                    Some(Err(SendError::Refused(error))) => {
                        tracing::debug!(%error, upstream = %address, attempt, "upstream refused the stream");
                        Some((Failure::UpstreamReset, retries.on.refused()))
                    }
                    None => Some((Failure::UpstreamTimeout, time_left && retries.on.reset_or_timeout())),
                };
                if let Some((failure, retriable)) = failure {
                    if !(may_retry && retriable) {
                        break Err(failure);
                    }
                }
                attempt += 1;
                // Envoy's backoff: fully jittered, 25 ms doubling per retry, at most 250 ms.
                let ceiling = (25u64 << attempt.min(4)).min(250);
                tokio::time::sleep(Duration::from_millis(fastrand::u64(0..=ceiling))).await;
                address = destination.next_address();
            };
            record.upstream_host = Some(address);
            let (response, try_started) = match outcome {
                Ok(response) => response,
                Err(failure) => {
                    if let Some(received) = &received {
                        record.bytes_received = received.load(Ordering::Relaxed);
                    }
                    return self.local_failure(failure, record, started, Some(destination.labels));
                }
            };
            let service_time = try_started.elapsed();
            record.upstream_service_time = Some(service_time);
            let mut response = response;
            let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
            if let (true, Some(client_upgrade)) = (switching, client_upgrade) {
                // The upgraded connection outlives the HTTP connection it came from: it holds a connection
                // place of its own.
                let Some(place) = self.admit() else {
                    return self.local_failure(Failure::Overflow, record, started, Some(destination.labels));
                };
                let upstream_upgrade = hyper::upgrade::on(&mut response);
                let idle = self.limits.stream_idle_timeout;
                tokio::spawn(join_upgraded(client_upgrade, upstream_upgrade, connection.peer, idle, place));
            }
            let (mut parts, body) = response.into_parts();
            let upgraded_to = parts.headers.get(header::UPGRADE).cloned().filter(|_| switching);
            strip_hop_by_hop(&mut parts.headers);
            if let Some(protocol) = upgraded_to {
                parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                parts.headers.insert(header::UPGRADE, protocol);
            }
            let service_ms = u64::try_from(service_time.as_millis()).unwrap_or(u64::MAX);
            parts.headers.insert(X_ENVOY_UPSTREAM_SERVICE_TIME, service_time_value(service_ms));
            if let Some(operations) = target.and_then(|target| target.response_headers()) {
                operations.apply(&mut parts.headers);
            }
            if let Some(operations) = route.and_then(|route| route.response_headers()) {
                operations.apply(&mut parts.headers);
            }
            if let (Some(cors), Some(origin)) = (cors, origin.as_deref()) {
                response_cors_headers(cors, origin, &mut parts.headers);
            }
            record.response_code = parts.status.as_u16();
            record.destination = Some(destination.labels);
            let response = Response::from_parts(parts, body.map_err(BoxError::from));
            self.finish_streaming(response, record, started, received, slot)
        }
    }

    /// Whether `host` resolves to `address` (a host that is an address is itself); a failed lookup is a no.
    async fn host_resolves_to(&self, host: &str, address: std::net::IpAddr) -> bool {
        if let Ok(ip) = host.parse::<std::net::IpAddr>() {
            return ip == address;
        }
        let Some(resolver) = &self.resolver else { return false };
        // Boxed: a lookup's state is large, and most requests need none.
        match Box::pin(resolver.resolves_to(host, address)).await {
            Ok(resolves) => resolves,
            Err(error) => {
                tracing::debug!(%host, %error, "verifying the host by DNS failed");
                false
            }
        }
    }

    /// Where `destination` is: its address, or for a forward-proxied request sent to its original destination
    /// (which routing leaves unspecified), the address `host` resolves to (an IP literal, or a DNS name through
    /// the proxy's resolver).
    async fn address_of(&self, destination: &Destination<'_>, host: &str) -> Result<SocketAddr, Failure> {
        let address = destination.address;
        if !address.ip().is_unspecified() {
            return Ok(address);
        }
        if let Ok(ip) = host.parse() {
            return Ok(SocketAddr::new(ip, address.port()));
        }
        let Some(resolver) = &self.resolver else { return Err(Failure::DnsFailure) };
        // Boxed: a lookup's state is large, and most requests need none.
        match Box::pin(resolver.lookup(host)).await {
            Ok(ip) => Ok(SocketAddr::new(ip, address.port())),
            Err(error) => {
                tracing::debug!(%host, %error, "forward proxy lookup failed");
                Err(Failure::DnsFailure)
            }
        }
    }

    /// `CONNECT host:port` on the forward-proxy port: a tunnel, if the registry (or ALLOW_ANY) admits the host on
    /// that port; its bytes are relayed untouched.
    async fn tunnel(
        &self,
        policy: &ProxyPolicy,
        request: Request<Incoming>,
        authority: &str,
        mut record: Box<RequestRecord>,
        started: Instant,
    ) -> Response<ProxyBody> {
        let host = routing::host_of(authority).to_owned();
        let Some(port) = request.uri().port_u16() else {
            return self.local_failure(Failure::BadRequest, record, started, None);
        };
        let unresolved = SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), port);
        let source = record.downstream_remote.and_then(|peer| self.workload(peer.ip()));
        let viewer = routing::viewer(Listener::Forward, source.as_deref());
        let destination = match routing::destination(policy, &host, port, None, Listener::Forward, unresolved, viewer) {
            Ok(destination) => destination,
            Err((failure, labels)) => return self.local_failure(failure, record, started, labels),
        };
        let address = match self.address_of(&destination, &host).await {
            Ok(address) => address,
            Err(failure) => return self.local_failure(failure, record, started, Some(destination.labels)),
        };
        record.upstream_host = Some(address);
        let upstream = match tcp::connect(address, &self.limits.sockets, destination.connect_timeout()).await {
            Ok(upstream) => upstream,
            Err(error) => {
                let failure = if tcp::is_local_destination(&error) {
                    Failure::LocalDestination
                } else {
                    Failure::UpstreamConnect
                };
                return self.local_failure(failure, record, started, Some(destination.labels));
            }
        };
        // The tunnel outlives the HTTP connection it came from: it holds a connection place of its own.
        let Some(place) = self.admit() else {
            return self.local_failure(Failure::Overflow, record, started, Some(destination.labels));
        };
        let peer = record.downstream_remote;
        let tcp_labels = TcpLabels::new(&destination.labels, "");
        let tcp = self.telemetry.tcp.clone();
        let idle = self.limits.stream_idle_timeout;
        tokio::spawn(async move {
            match hyper::upgrade::on(request).await {
                Ok(upgraded) => {
                    tcp.opened(&tcp_labels);
                    let (mut client, mut upstream) = (TokioIo::new(upgraded), upstream);
                    let joined = join::join(&mut client, &mut upstream, idle).await;
                    let counts = joined.as_ref().map(|joined| (joined.from_first, joined.from_second));
                    let (received, sent) = counts.unwrap_or_default();
                    tcp.closed(&tcp_labels, received, sent);
                    tracing::debug!(?peer, upstream = %address, ?joined, "tunnel ended");
                }
                Err(error) => tracing::debug!(?peer, %error, "tunnel not established"),
            }
            drop(place);
        });
        record.response_code = StatusCode::OK.as_u16();
        record.destination = Some(destination.labels);
        self.finish_streaming(Response::new(empty()), record, started, None, None)
    }

    /// Sends a copy of the request to the mirror's destination, its authority suffixed `-shadow` as Envoy's
    /// shadows are; its response and failures are ignored.
    #[allow(clippy::too_many_arguments)]
    fn mirror(
        &self,
        policy: &ProxyPolicy,
        mirror: &Mirror,
        parts: &http::request::Parts,
        path_and_query: &PathAndQuery,
        authority: &str,
        body: Bytes,
        connection: Connection,
    ) {
        let port = mirror.port.unwrap_or(connection.local.port());
        let listener = connection.listener;
        let source = self.workload(connection.peer.ip());
        let viewer = routing::viewer(listener, source.as_deref());
        let Ok(destination) =
            routing::destination(policy, &mirror.host, port, None, listener, connection.local, viewer)
        else {
            tracing::debug!(host = %mirror.host, "mirror destination not reachable; not mirrored");
            return;
        };
        let Ok(tls) = upstream_tls(&destination, &mirror.host) else {
            tracing::debug!(host = %mirror.host, "mirror destination's TLS settings cannot be used; not mirrored");
            return;
        };
        let Ok(place) = self.mirrors.clone().try_acquire_owned() else {
            tracing::debug!(host = %mirror.host, "as many mirrored requests in flight as allowed; not mirrored");
            return;
        };
        let shadow = format!("{}-shadow", routing::host_of(authority));
        let (address, http2, connect_timeout) = (destination.address, destination.http2, destination.connect_timeout());
        let (method, headers, path) = (parts.method.clone(), parts.headers.clone(), path_and_query.clone());
        let upstreams = self.upstreams.clone();
        tokio::spawn(async move {
            let outgoing = Outgoing {
                address,
                http2,
                authority: &shadow,
                path_and_query: path,
                method,
                headers,
                connect_timeout,
                tls,
            };
            let body = Full::new(body).map_err(|never| match never {}).boxed();
            let mirrored = async {
                if let Ok(response) = upstreams.send(outgoing, body).await {
                    // Read to the end so the connection goes back to the pool.
                    let _ = response.into_body().collect().await;
                }
            };
            if tokio::time::timeout(MIRROR_TIMEOUT, mirrored).await.is_err() {
                tracing::debug!(authority = %shadow, "mirrored request unanswered in time: abandoned");
            }
            drop(place);
        });
    }

    fn local_failure(
        &self,
        failure: Failure,
        mut record: Box<RequestRecord>,
        started: Instant,
        labels: Option<DestinationLabels>,
    ) -> Response<ProxyBody> {
        record.response_flags = failure.flag();
        record.destination = labels;
        self.local_reply(
            failure.status(),
            Bytes::from_static(failure.body().as_bytes()),
            failure.flag(),
            record,
            started,
            None,
        )
    }

    fn local_reply(
        &self,
        status: StatusCode,
        body: Bytes,
        flag: &'static str,
        mut record: Box<RequestRecord>,
        started: Instant,
        route: Option<&Route>,
    ) -> Response<ProxyBody> {
        let mut response = Response::new(Full::new(body).map_err(|never| match never {}).boxed());
        *response.status_mut() = status;
        if !response.body().is_end_stream() {
            response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        }
        record.response_code = status.as_u16();
        record.response_flags = flag;
        self.finish(response, record, started, route)
    }

    /// A locally made response: its size is known, so it is recorded now.
    fn finish(
        &self,
        mut response: Response<ProxyBody>,
        record: Box<RequestRecord>,
        started: Instant,
        route: Option<&Route>,
    ) -> Response<ProxyBody> {
        if let Some(operations) = route.and_then(Route::response_headers) {
            operations.apply(response.headers_mut());
        }
        self.finish_streaming(response, record, started, None, None)
    }

    /// Wraps the response body so that the request is recorded when the body ends (or the client goes).
    fn finish_streaming<B>(
        &self,
        response: Response<B>,
        record: Box<RequestRecord>,
        started: Instant,
        received: Option<Arc<AtomicU64>>,
        slot: Option<OwnedSemaphorePermit>,
    ) -> Response<ProxyBody>
    where
        B: Body<Data = Bytes, Error = BoxError> + Send + Sync + Unpin + 'static,
    {
        let (parts, body) = response.into_parts();
        let body = Recorded {
            _slot: slot,
            inner: body,
            sent: 0,
            received,
            record: Some(record),
            started,
            telemetry: self.telemetry.clone(),
        };
        Response::from_parts(parts, body.boxed())
    }
}

/// A response, as hyper's services give it (they never fail: a failure is answered as Envoy answers it).
fn answered(response: Response<ProxyBody>) -> Result<Response<ProxyBody>, std::convert::Infallible> {
    Ok(response)
}

/// An empty body: boxed without an allocation (it has no size).
fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// `x-envoy-upstream-service-time` for `ms`: the values below a second made once, and shared.
fn service_time_value(ms: u64) -> HeaderValue {
    static BELOW_A_SECOND: std::sync::LazyLock<Box<[HeaderValue]>> =
        std::sync::LazyLock::new(|| (0..1000u64).map(HeaderValue::from).collect());
    usize::try_from(ms).ok().and_then(|ms| BELOW_A_SECOND.get(ms)).cloned().unwrap_or_else(|| HeaderValue::from(ms))
}

fn protocol_name(version: Version) -> &'static str {
    match version {
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

fn header_text(headers: &HeaderMap, name: impl header::AsHeaderName) -> Option<String> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

/// Rewrites the request's path as `mode` normalizes it: whether it changed; a broken escape is an error.
fn normalize_path(request: &mut Request<Incoming>, mode: PathNormalization) -> Result<bool, path::InvalidPath> {
    let Some(path_and_query) = request.uri().path_and_query() else { return Ok(false) };
    let Some(normal) = path::normalize(path_and_query.as_str(), mode)? else { return Ok(false) };
    let mut parts = request.uri().clone().into_parts();
    parts.path_and_query = Some(normal.parse().map_err(|_| path::InvalidPath)?);
    *request.uri_mut() = http::Uri::from_parts(parts).map_err(|_| path::InvalidPath)?;
    Ok(true)
}

/// The protocol an HTTP/1.1 request asks to switch to (`Connection: upgrade` with `Upgrade: …`).
fn requested_upgrade(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|token| token.trim().eq_ignore_ascii_case("upgrade")));
    asks.then(|| headers.get(header::UPGRADE).cloned()).flatten()
}

/// Relays bytes between an upgraded client connection and its upgraded upstream until either closes or both
/// are silent for `idle`; `place` is its share of `--max-connections`, held until then.
async fn join_upgraded(
    client: OnUpgrade,
    upstream: OnUpgrade,
    peer: SocketAddr,
    idle: Duration,
    place: OwnedSemaphorePermit,
) {
    match tokio::try_join!(client, upstream) {
        Ok((client, upstream)) => {
            let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
            let joined = join::join(&mut client, &mut upstream, idle).await;
            tracing::debug!(%peer, ?joined, "upgraded connection ended");
        }
        Err(error) => tracing::debug!(%peer, %error, "upgrade failed"),
    }
    drop(place);
}

/// True for `percent` % of calls.
fn chance(percent: f64) -> bool {
    percent >= 100.0 || (percent > 0.0 && fastrand::f64() * 100.0 < percent)
}

/// The answer to a CORS preflight from an allowed origin.
fn preflight_headers(cors: &Cors, origin: &str, headers: &mut HeaderMap) {
    if let Ok(origin) = HeaderValue::from_str(origin) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    }
    for (name, value) in [
        (header::ACCESS_CONTROL_ALLOW_METHODS, &cors.allow_methods),
        (header::ACCESS_CONTROL_ALLOW_HEADERS, &cors.allow_headers),
        (header::ACCESS_CONTROL_MAX_AGE, &cors.max_age),
    ] {
        if let Some(value) = value {
            headers.insert(name, value.clone());
        }
    }
    if cors.allow_credentials {
        headers.insert(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
    }
}

/// The CORS headers of an actual response to an allowed origin.
fn response_cors_headers(cors: &Cors, origin: &str, headers: &mut HeaderMap) {
    if let Ok(origin) = HeaderValue::from_str(origin) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    }
    if let Some(expose) = &cors.expose_headers {
        headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, expose.clone());
    }
    if cors.allow_credentials {
        headers.insert(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
    }
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names finds which are present (most messages carry none, or only `Connection`), so only
    // those are removed.
    let mut present = 0u8;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|hop| hop == name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    // Headers the Connection header names are hop-by-hop too. Its usual options (`close`, `keep-alive`) name none
    // that is not removed anyway: a Connection header of one of them alone, most messages', is not split.
    let names_nothing = |option: &[u8]| {
        option.eq_ignore_ascii_case(b"close")
            || HOP_BY_HOP.iter().any(|hop| hop.as_str().as_bytes().eq_ignore_ascii_case(option))
    };
    if !headers.get_all(header::CONNECTION).iter().all(|value| names_nothing(value.as_bytes())) {
        let named: SmallVec<[HeaderName; 2]> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|option| !names_nothing(option.as_bytes()))
            .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for (i, hop) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(hop);
        }
    }
}

/// The TLS `destination`'s requests go upstream with (`None`: plain), the server name its `sni`, else `host`'s;
/// `Err` when its DestinationRule's TLS settings cannot be used.
fn upstream_tls(destination: &routing::Destination<'_>, host: &str) -> Result<Option<UpstreamTls>, String> {
    match destination.cluster().and_then(|cluster| cluster.policy.tls.as_deref()) {
        None => Ok(None),
        Some(TlsOrigination::Unusable(reason)) => Err(reason.clone()),
        Some(TlsOrigination::Ready { config, sni }) => {
            let server_name = match sni {
                Some(sni) => sni.clone(),
                None => rustls::pki_types::ServerName::try_from(routing::host_of(host).to_owned())
                    .map(Arc::new)
                    .map_err(|error| error.to_string())?,
            };
            Ok(Some(UpstreamTls { config: config.clone(), server_name }))
        }
    }
}

/// Whether the client says it accepts trailers (`TE: trailers`).
fn accepts_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|coding| coding.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("trailers"))
}

fn append_forwarded_for(headers: &mut HeaderMap, peer: SocketAddr) {
    let value = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(existing) => format!("{existing}, {}", peer.ip()),
        None => peer.ip().to_string(),
    };
    // The string becomes the header's bytes without a copy.
    if let Ok(value) = HeaderValue::from_maybe_shared(Bytes::from(value)) {
        headers.insert(X_FORWARDED_FOR, value);
    }
}

/// A random UUID (version 4), as Envoy generates `x-request-id`, written in place.
fn request_id() -> [u8; 36] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bits = (fastrand::u128(..) & !(0xf000 << 64) & !(0xc000 << 48)) | (0x4000 << 64) | (0x8000 << 48);
    let mut id = [b'-'; 36];
    let digits = (0..36).filter(|i| ![8, 13, 18, 23].contains(i));
    for (nibble, at) in digits.enumerate() {
        id[at] = HEX[((bits >> (124 - 4 * nibble)) & 0xf) as usize];
    }
    id
}

/// A request body streamed upstream: counts the bytes it carries, and fails when the client sends nothing for
/// the stream idle timeout (a half-sent body holds the upstream connection no longer).
struct Counted {
    inner: Incoming,
    bytes: Arc<AtomicU64>,
    idle: Duration,
    /// When the client's silence ends the body; made at the first wait, moved on at each frame.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Counted {
    fn new(inner: Incoming, bytes: Arc<AtomicU64>, idle: Duration) -> Counted {
        Counted { inner, bytes, idle, deadline: None }
    }
}

/// The error a streamed request body ends with when the client went silent.
#[derive(Debug, thiserror::Error)]
#[error("the client sent nothing of the request body for {0:?}")]
struct BodyIdle(Duration);

impl Body for Counted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                if let Some(deadline) = &mut this.deadline {
                    deadline.as_mut().reset(tokio::time::Instant::now() + this.idle);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(other) => Poll::Ready(other.map(|result| result.map_err(BoxError::from))),
            Poll::Pending => {
                let idle = this.idle;
                let deadline = this.deadline.get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                match deadline.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(BoxError::from(BodyIdle(idle))))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that records its request when it ends, or when it is dropped unfinished.
struct Recorded<B> {
    /// The cluster slot the request holds until its response has gone.
    _slot: Option<OwnedSemaphorePermit>,
    inner: B,
    sent: u64,
    /// What a streamed request body carried.
    received: Option<Arc<AtomicU64>>,
    record: Option<Box<RequestRecord>>,
    started: Instant,
    telemetry: Arc<RequestTelemetry>,
}

impl<B> Recorded<B> {
    fn emit(&mut self) {
        if let Some(mut record) = self.record.take() {
            record.bytes_sent = self.sent;
            if let Some(received) = &self.received {
                record.bytes_received = record.bytes_received.max(received.load(Ordering::Relaxed));
            }
            record.duration = self.started.elapsed();
            self.telemetry.record(&record);
        }
    }
}

impl<B: Body<Data = Bytes, Error = BoxError> + Unpin> Body for Recorded<B> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.sent += data.len() as u64;
                }
            }
            Poll::Ready(None) => self.emit(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for Recorded<B> {
    fn drop(&mut self) {
        self.emit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_not_forwarded() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut map = HeaderMap::new();
            for (name, value) in pairs {
                map.append(HeaderName::from_static(name), HeaderValue::from_static(value));
            }
            map
        };
        let mut message = headers(&[
            ("connection", "keep-alive, X-Session-Token"),
            ("connection", "close, Upgrade"),
            ("keep-alive", "timeout=5"),
            ("x-session-token", "secret"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("trailer", "x-checksum"),
            ("x-kept", "1"),
        ]);
        strip_hop_by_hop(&mut message);
        assert_eq!(message, headers(&[("trailer", "x-checksum"), ("x-kept", "1")]));

        // The usual Connection header alone (not split for names) goes, with what it governs.
        let mut message = headers(&[("connection", "Keep-Alive"), ("keep-alive", "timeout=5"), ("x-kept", "1")]);
        strip_hop_by_hop(&mut message);
        assert_eq!(message, headers(&[("x-kept", "1")]));

        let end_to_end = headers(&[("content-type", "text/plain"), ("x-kept", "1"), ("x-kept", "2")]);
        let mut message = end_to_end.clone();
        strip_hop_by_hop(&mut message);
        assert_eq!(message, end_to_end);
    }

    #[test]
    fn request_ids_are_version_4_uuids() {
        let id = String::from_utf8(request_id().to_vec()).unwrap();
        assert_eq!(id.len(), 36);
        assert_eq!(id.matches('-').count(), 4);
        assert!(id.split('-').map(str::len).eq([8, 4, 4, 4, 12]), "{id}");
        assert!(id.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit()), "{id}");
        assert_ne!(request_id(), request_id());
        assert_eq!(&id[14..15], "4", "{id}");
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"), "{id}");
    }

    #[test]
    fn upstream_service_times_are_written_in_milliseconds_whatever_their_size() {
        for ms in [0, 7, 999, 1000, 86_400_000] {
            assert_eq!(service_time_value(ms), ms.to_string().as_str());
        }
    }
}
