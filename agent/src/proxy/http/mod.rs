//! The HTTP proxy: HTTP/1.1 and HTTP/2 (prior knowledge) from clients, each request routed by the
//! VirtualServices of its context, checked against the registry, and forwarded over pooled upstream
//! connections, or answered locally the way Envoy answers.

mod body;
mod cors;
mod forward;
mod headers;
mod mirror;
mod retry;
mod tunnel;

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

pub use super::routing::Listener;
use super::{
    authorize,
    connect_failure::ConnectFailure,
    detect::HttpVersion,
    drain::{Drain, Phase},
    failure::Failure,
    idle,
    overload::Overload,
    path,
    relay::{Bounds, Relay},
    routing::{self, Decision, Destination},
    tcp::{self, UpstreamSockets},
    upstreams::{Http1Client, Outgoing, SendError, UpstreamBody, UpstreamTls, Upstreams},
};
use body::*;
use cors::*;
use forward::*;
use headers::*;
use retry::{TryClock, TryDeadline};
use tokio::sync::OwnedSemaphorePermit;
use tunnel::*;

use crate::{
    config::{mesh::PathNormalization, resolver::DnsResolver, workloads::KnownWorkloads},
    policy::clusters::{Outcome, TlsOrigination},
    policy::labels::DestinationLabels,
    policy::routes::{Cors, HostVerify, Matched, Mirror, ProxyPolicy, RetryPolicy, Route, Target},
    telemetry::{
        connections::TcpLabels,
        requests::{ConnectionSecurity, Principal, RequestRecord, RequestTelemetry},
        response_flags::ResponseFlag,
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
/// Mirrored requests in flight at most, and how long each may take: their answers are ignored, so they must cost
/// the gateway no more than this.
const MAX_MIRRORS_IN_FLIGHT: usize = 256;
const MIRROR_TIMEOUT: Duration = Duration::from_secs(30);
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_ENVOY_UPSTREAM_SERVICE_TIME: HeaderName = HeaderName::from_static("x-envoy-upstream-service-time");

/// One client connection's addresses.
#[derive(Clone, Debug)]
pub struct Connection {
    pub peer: SocketAddr,
    /// The accepted socket's local address: for intercepted traffic, the original destination.
    pub local: SocketAddr,
    pub listener: Listener,
    /// Whether the gateway terminated TLS on it, and verified a client certificate.
    pub security: ConnectionSecurity,
    /// The SPIFFE identity of the client's verified certificate (`source_principal`).
    pub principal: Option<Arc<Principal>>,
    /// The name the client's ClientHello asked for, where the gateway terminated its TLS.
    pub server_name: Option<Arc<str>>,
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
    workloads: Arc<KnownWorkloads>,
    /// How decided byte streams (TLS and TCP relays, tunnels, upgrades) are carried.
    relay: Relay,
    /// Whether clients are being moved off this agent (it is stopping).
    drain: Drain,
    /// Whether new work is shed (past `--max-memory`).
    overload: Arc<Overload>,
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
    /// Which code speaks HTTP/1.1 to upstreams.
    pub http1_client: Http1Client,
}

impl HttpProxy {
    pub fn new(policy: Arc<ArcSwap<ProxyPolicy>>, telemetry: RequestTelemetry, limits: Limits) -> HttpProxy {
        let upstreams = Upstreams::new(limits.sockets.clone(), limits.http1_client);
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
            relay: Relay::default(),
            drain: Drain::default(),
            overload: Arc::default(),
        }
    }

    /// New work is shed while `overload` says so.
    pub fn with_overload(mut self, overload: Arc<Overload>) -> HttpProxy {
        self.overload = overload;
        self
    }

    /// Whether new work is shed now; when it is, one shed `what` (`request`, `connection`) is counted.
    pub fn sheds(&self, what: &'static str) -> bool {
        let shedding = self.overload.is_shedding();
        if shedding {
            self.telemetry.overload_shed(what);
        }
        shedding
    }

    /// Client connections are drained when `drain` says so.
    pub fn with_drain(mut self, drain: Drain) -> HttpProxy {
        self.drain = drain;
        self
    }

    /// Decided byte streams between two sockets go through `relay`'s engine (by default splice(2)).
    pub fn with_relay(mut self, relay: Relay) -> HttpProxy {
        self.relay = relay;
        self
    }

    pub fn relay(&self) -> &Relay {
        &self.relay
    }

    /// The workload at `address`, when the pod watcher knows it.
    pub fn workload(&self, address: std::net::IpAddr) -> Option<Arc<crate::config::workloads::Workload>> {
        self.workloads.load().get(address).cloned()
    }

    /// Knows the workloads that send requests from `workloads` (kept current by the pod watcher).
    pub fn with_workloads(mut self, workloads: Arc<KnownWorkloads>) -> HttpProxy {
        self.workloads = workloads;
        self
    }

    /// Resolves the hosts that forward-proxied requests name with `resolver`.
    pub fn with_resolver(mut self, resolver: Arc<DnsResolver>) -> HttpProxy {
        self.resolver = Some(resolver);
        self
    }

    /// The policy in force now: what is read here holds for the one connection or request at hand.
    pub fn policy(&self) -> arc_swap::Guard<Arc<ProxyPolicy>> {
        self.policy.load()
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

    /// Client connections open now (their places of `--max-connections` taken).
    pub fn open_connections(&self) -> usize {
        self.limits.max_connections.saturating_sub(self.connections.available_permits())
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

    /// Serves HTTP on a client's connection (a socket, or TLS the gateway terminated) until it closes or idles.
    pub async fn serve_connection<S>(self: Arc<Self>, stream: S, connection: Connection, version: HttpVersion)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let proxy = self.clone();
        let activity = idle::Activity::new();
        let requests = activity.clone();
        // A request's future is boxed: hyper moves what its service returns, and the whole exchange is kilobytes.
        let peer = connection.peer;
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            // A plain HTTP/1.1 exchange (not a tunnel or an upgrade) can carry the drain's `Connection: close`.
            let closable = request.version() != Version::HTTP_2 && request.method() != Method::CONNECT;
            let closing = closable.then(|| proxy.drain.clone());
            let response = Box::pin(proxy.clone().handle(request, connection.clone(), requests.begin()));
            DrainedResponse { response, closing }
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
                // Its responses ask the client to close from the drain's start; once the listeners close, it is
                // closed when quiet.
                let drained = (self.drain.reached(Phase::Closing), idle::OnDrain::CloseWhenQuiet);
                idle::serve_until_idle(connection, &activity, (first_request, idle), drained).await
            }
            HttpVersion::Http2 => {
                let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .max_header_list_size(MAX_REQUEST_HEADERS_BYTES as u32)
                    .serve_connection(io, service);
                // GOAWAY from the drain's start: the client opens its next streams elsewhere.
                let drained = (self.drain.reached(Phase::Draining), idle::OnDrain::GoAway);
                idle::serve_until_idle(connection, &activity, (first_request, idle), drained).await
            }
        };
        let Some(served) = served else {
            tracing::debug!(%peer, "client connection idle: closed");
            return;
        };
        if let Err(error) = served {
            tracing::debug!(%error, %peer, "client connection ended");
        }
    }

    /// Answers one request. (An async block, not an `async fn`: the future of an `async fn` keeps its arguments
    /// twice, and each request's future is copied whole into its box.)
    #[expect(
        clippy::manual_async_fn,
        reason = "an async block keeps its arguments once; an async fn keeps them twice in the future every request boxes"
    )]
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
            let telemetry = self.telemetry.in_force();
            // Boxed: a request's future holds it across every wait, and is moved as a whole.
            let mut record = Box::new(RequestRecord {
                protocol: protocol_name(request.version()),
                grpc: request
                    .headers()
                    .get(header::CONTENT_TYPE)
                    .is_some_and(|content_type| content_type.as_bytes().starts_with(b"application/grpc")),
                downstream_remote: Some(connection.peer),
                downstream_local: Some(connection.local),
                connection_security: connection.security,
                server_name: connection.server_name.clone(),
                source_principal: connection.principal.as_ref().map(|principal| principal.spiffe.clone()),
                source_workload_namespace: connection
                    .principal
                    .as_ref()
                    .and_then(|principal| principal.namespace.clone()),
                ..RequestRecord::default()
            });
            // The URI's authority (absolute form, HTTP/2), else Host: shared with the request rather than copied.
            let authority = match request.uri().authority() {
                Some(authority) => HeaderValue::from_str(authority.as_str()).ok(),
                None => request.headers().get(header::HOST).cloned(),
            };
            // What only the access log shows (the wall clock included) is read only when there is one, and kept as
            // the request's own values: made text only for a line that is written.
            let details_wanted = self.telemetry.wants_request_details(&telemetry);
            if details_wanted {
                let headers = request.headers();
                record.start = Some(SystemTime::now());
                record.authority = authority.clone();
                record.method = Some(request.method().clone());
                record.path = Some(request.uri().path_and_query().cloned().unwrap_or(PathAndQuery::from_static("/")));
                [record.user_agent, record.x_forwarded_for, record.request_id] =
                    first_values(headers, [&header::USER_AGENT, &X_FORWARDED_FOR, &X_REQUEST_ID]);
                telemetry.capture_headers(headers, &mut record.captured_headers);
                // A workload's own Telemetry (its namespace's, its selector's) for what it sends through the mesh,
                // as its sidecar would apply it; what arrives on a Gateway port is the gateway's.
                if !matches!(connection.listener, Listener::Gateway(_)) && !telemetry.scopes.is_empty() {
                    if let Some(source) = self.workloads.load().get(connection.peer.ip()) {
                        record.telemetry_scope = telemetry.scope_of(source);
                    }
                }
            }
            record.telemetry = Some(telemetry);
            let authority = authority.as_ref().and_then(|value| value.to_str().ok());
            // Past --max-memory, the request is answered before anything else is done for it.
            if self.sheds("request") {
                return self.local_failure(Failure::Overloaded, record, started, None);
            }
            if request.uri().path_and_query().is_some_and(|pq| pq.as_str().len() > MAX_URI_BYTES) {
                return self.local_failure(Failure::UriTooLong, record, started, None);
            }
            // Matched and forwarded as normalized, so that `/a/./b` meets the routes `/a/b` meets.
            match normalize_path(&mut request, policy.path_normalization) {
                Ok(false) => {}
                Ok(true) if details_wanted => {
                    record.path = request.uri().path_and_query().cloned();
                }
                Ok(true) => {}
                Err(path::InvalidPath) => return self.local_failure(Failure::BadRequest, record, started, None),
            }
            let Some(authority) = authority else {
                return self.local_failure(Failure::BadRequest, record, started, None);
            };
            // Istio's RBAC filter comes before the router: a denied request learns nothing of the routes.
            if !policy.authorization.is_empty() {
                let workloads = self.workloads.load();
                let source = workloads.get(connection.peer.ip()).map(|source| &**source);
                let authorized =
                    authorize::request(&policy, &self.telemetry, &request, authority, (&connection, source), None);
                if let Err(details) = authorized {
                    drop(workloads);
                    record.response_code_details = Some(details.into());
                    return self.local_failure(Failure::AccessDenied, record, started, None);
                }
            }
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
            let mut hop = None;
            let decision = {
                let workloads = self.workloads.load();
                let source = workloads.get(connection.peer.ip());
                if let Some(source) = source {
                    record.source_workload = Some(source.name.clone().into());
                    record.source_workload_namespace = Some(source.namespace.clone().into());
                }
                let source = source.map(|source| &**source);
                let decision = routing::decide_noting_hop(
                    &policy,
                    &request,
                    authority,
                    (connection.listener, connection.local),
                    source,
                    fastrand::u32(..),
                    &mut hop,
                );
                // Handed by a mesh route to this gateway's own Service: the gateway's policies decide it too, as
                // they would on the second hop to a gateway pod.
                let denied = match hop.filter(|_| !policy.authorization.is_empty()) {
                    Some(port) => {
                        let connection = (&connection, source);
                        authorize::request(&policy, &self.telemetry, &request, authority, connection, Some(port)).err()
                    }
                    None => None,
                };
                (decision, denied)
            };
            let (decision, denied) = decision;
            if let Some(details) = denied {
                record.response_code_details = Some(details.into());
                return self.local_failure(Failure::AccessDenied, record, started, None);
            }
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
                    return self.local_reply(status, body, ResponseFlag::None, record, started, Some(route));
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
                Decision::RequireTls { location } => {
                    let mut response = Response::new(empty());
                    *response.status_mut() = StatusCode::MOVED_PERMANENTLY;
                    if let Ok(location) = HeaderValue::from_str(&location) {
                        response.headers_mut().insert(header::LOCATION, location);
                    }
                    record.response_code = StatusCode::MOVED_PERMANENTLY.as_u16();
                    return self.finish(response, record, started, None);
                }
                Decision::Forward { route, target, destination, host_mismatch } => {
                    if host_mismatch {
                        let action = if policy.host_verify == HostVerify::Route { "routed" } else { "trusted" };
                        self.telemetry.host_mismatch(action);
                    }
                    record.route_name = route.map(|matched| matched.route.name());
                    self.forward(&policy, request, connection, route, target, authority, destination, record, started)
                }
            };
            forwarding.await
        }
    }

    fn local_failure(
        &self,
        failure: Failure,
        record: Box<RequestRecord>,
        started: Instant,
        labels: Option<DestinationLabels>,
    ) -> Response<ProxyBody> {
        let body = Bytes::from_static(failure.body().as_bytes());
        self.local_failure_saying((failure, failure.flag()), body, record, started, labels)
    }

    /// A local failure answered with `body` rather than the failure's own, and flagged `flag` (the failure's own,
    /// or with why it was not retried).
    fn local_failure_saying(
        &self,
        (failure, flag): (Failure, ResponseFlag),
        body: Bytes,
        mut record: Box<RequestRecord>,
        started: Instant,
        labels: Option<DestinationLabels>,
    ) -> Response<ProxyBody> {
        record.destination = labels;
        if record.response_code_details.is_none() {
            record.response_code_details = failure.details().map(Into::into);
        }
        self.local_reply(failure.status(), body, flag, record, started, None)
    }

    /// The request failed because no connection to its upstream could be made: Envoy's details, transport failure
    /// reason and body say why. `flag`: `UF`, or with why it was not retried.
    fn connect_failure(
        &self,
        (failure, flag): (Failure, ResponseFlag),
        why: &ConnectFailure,
        mut record: Box<RequestRecord>,
        started: Instant,
        labels: Option<DestinationLabels>,
    ) -> Response<ProxyBody> {
        record.upstream_transport_failure_reason = why.transport_reason().map(Into::into);
        record.response_code_details = Some(why.response_code_details().into());
        self.local_failure_saying((failure, flag), Bytes::from(why.body()), record, started, labels)
    }

    fn local_reply(
        &self,
        status: StatusCode,
        body: Bytes,
        flag: ResponseFlag,
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

    /// The request of a connection that leaves HTTP behind, to be recorded when its relay ends (the response it
    /// is answered with records nothing).
    fn record_when_relayed(&self, record: Box<RequestRecord>, started: Instant) -> RecordedWhenRelayed {
        RecordedWhenRelayed { record, started, telemetry: self.telemetry.clone() }
    }
}

/// A response, as hyper's services give it (they never fail: a failure is answered as Envoy answers it).
/// A response that asks an HTTP/1.1 client to close its connection while the proxy drains.
struct DrainedResponse<F> {
    response: Pin<Box<F>>,
    /// Set for a plain HTTP/1.1 exchange, which can close after its response.
    closing: Option<Drain>,
}

impl<F: Future<Output = Response<ProxyBody>>> Future for DrainedResponse<F> {
    type Output = Result<Response<ProxyBody>, std::convert::Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut response = std::task::ready!(self.response.as_mut().poll(cx));
        let draining = self.closing.as_ref().is_some_and(Drain::is_draining);
        if draining && response.status() != StatusCode::SWITCHING_PROTOCOLS {
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        Poll::Ready(Ok(response))
    }
}

/// An empty body: boxed without an allocation (it has no size).
fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

fn protocol_name(version: Version) -> &'static str {
    match version {
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
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

/// True for `percent` % of calls.
fn chance(percent: f64) -> bool {
    percent >= 100.0 || (percent > 0.0 && fastrand::f64() * 100.0 < percent)
}
