//! The HTTP proxy: HTTP/1.1 and HTTP/2 (prior knowledge) from clients, each request routed by the
//! VirtualServices of its context, checked against the registry, and forwarded over pooled upstream
//! connections, or answered locally the way Envoy answers.

use std::{
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
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::{TokioExecutor, TokioIo, TokioTimer},
};
use tokio::net::TcpStream;

use super::failure::Failure;
use crate::{
    policy::{
        http_match::RequestView,
        routes::{Action, ProxyPolicy, Redirect, Registered, Route, Target, Upstream},
        OutboundMode,
    },
    telemetry::requests::{RequestRecord, RequestTelemetry},
};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// Istio's default connect timeout for clusters.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send a request's headers (slow clients hold a connection no longer).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Headers that describe one hop, never forwarded (RFC 9110, 7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
];

/// Which listener a connection arrived on.
#[derive(Clone, Copy, Debug)]
pub enum Listener {
    /// The transparent listener: the workloads' intercepted traffic (Istio's `mesh` gateway).
    Mesh,
    /// A Gateway server port.
    Gateway(u16),
}

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
    http1: Client<HttpConnector, ProxyBody>,
    http2: Client<HttpConnector, ProxyBody>,
    telemetry: RequestTelemetry,
}

/// What a request is sent to, once routed.
struct Destination {
    address: SocketAddr,
    http2: bool,
    labels: ServiceLabels,
}

/// How Istio's metrics name the destination.
#[derive(Clone)]
struct ServiceLabels {
    service: String,
    name: String,
    namespace: String,
    cluster: String,
}

impl ServiceLabels {
    fn special(cluster: &str, service: &str) -> ServiceLabels {
        ServiceLabels {
            service: service.to_owned(),
            name: cluster.to_owned(),
            namespace: "unknown".into(),
            cluster: cluster.to_owned(),
        }
    }
}

impl HttpProxy {
    pub fn new(policy: Arc<ArcSwap<ProxyPolicy>>, telemetry: RequestTelemetry) -> HttpProxy {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.set_nodelay(true);
        let http1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .timer(TokioTimer::new())
            .build(connector.clone());
        let http2 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .timer(TokioTimer::new())
            .http2_only(true)
            .build(connector);
        HttpProxy { policy, http1, http2, telemetry }
    }

    /// Serves one client connection (HTTP/1.1 with keep-alive, or HTTP/2) until it closes.
    pub async fn serve_connection(self: Arc<Self>, stream: TcpStream, connection: Connection) {
        let _ = stream.set_nodelay(true);
        let proxy = self.clone();
        let service = hyper::service::service_fn(move |request| {
            let proxy = proxy.clone();
            async move { Ok::<_, std::convert::Infallible>(proxy.handle(request, connection).await) }
        });
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
        if let Err(error) = builder.serve_connection(TokioIo::new(stream), service).await {
            tracing::debug!(%error, peer = %connection.peer, "client connection ended");
        }
    }

    async fn handle(&self, request: Request<Incoming>, connection: Connection) -> Response<ProxyBody> {
        let started = Instant::now();
        let policy = self.policy.load_full();
        let mut record = RequestRecord {
            start: Some(SystemTime::now()),
            method: request.method().as_str().to_owned(),
            path: request.uri().path_and_query().map_or_else(|| "/".to_owned(), |pq| pq.as_str().to_owned()),
            protocol: protocol_name(request.version()),
            user_agent: header_text(request.headers(), header::USER_AGENT),
            x_forwarded_for: header_text(request.headers(), "x-forwarded-for"),
            request_id: header_text(request.headers(), "x-request-id"),
            downstream_remote: Some(connection.peer),
            downstream_local: Some(connection.local),
            ..RequestRecord::default()
        };
        let authority = request
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| header_text(request.headers(), header::HOST));
        let Some(authority) = authority else {
            return self.local_failure(Failure::BadRequest, record, started, None);
        };
        record.authority = authority.clone();
        let (port, gateway_id, virtual_host) = match connection.listener {
            Listener::Mesh => (connection.local.port(), "mesh", policy.mesh.get(&authority)),
            Listener::Gateway(port) => match policy.gateway_on(port) {
                Some(gateway) => (port, gateway.id.as_str(), gateway.hosts.get(&authority)),
                None => (port, "", None),
            },
        };
        let route = match virtual_host {
            Some(host) => {
                let query = request.uri().query();
                let view = RequestView {
                    path: request.uri().path(),
                    query,
                    method: request.method().as_str(),
                    scheme: request.uri().scheme_str().unwrap_or("http"),
                    authority: &authority,
                    headers: request.headers(),
                    port,
                    gateway: gateway_id,
                };
                let found = host.routes.iter().find_map(|route| {
                    if route.matches.is_empty() {
                        return Some((route, None));
                    }
                    route.matches.iter().find(|m| m.matches(&view)).map(|m| (route, m.uri_prefix()))
                });
                match found {
                    Some(found) => Some(found),
                    None => return self.local_failure(Failure::NoRoute, record, started, None),
                }
            }
            None if matches!(connection.listener, Listener::Gateway(_)) => {
                return self.local_failure(Failure::NoRoute, record, started, None)
            }
            None => None,
        };
        if let Some((route, _)) = route {
            record.route_name = Some(route.name.clone());
        }
        let target = match route.map(|(route, _)| &route.action) {
            Some(Action::Respond { status, body }) => {
                let route = route.map(|(route, _)| route);
                return self.local_reply(*status, body.clone(), "", record, started, route);
            }
            Some(Action::Redirect(redirect)) => {
                let location = redirect_location(redirect, &authority, request.uri());
                let mut response = Response::new(empty());
                *response.status_mut() = redirect.status;
                if let Ok(location) = HeaderValue::from_str(&location) {
                    response.headers_mut().insert(header::LOCATION, location);
                }
                record.response_code = redirect.status.as_u16();
                record.upstream_cluster = "-".into();
                return self.finish(response, record, started, None);
            }
            Some(Action::Forward(targets)) => targets.pick(fastrand::u32(..)),
            None => None,
        };
        let (host, destination_port) = match target {
            Some(target) => (target.host.as_str(), target.port.unwrap_or(port)),
            None => (host_of(&authority), port),
        };
        let destination = match self.destination(&policy, host, destination_port, connection) {
            Ok(destination) => destination,
            Err((failure, labels)) => return self.local_failure(failure, record, started, labels),
        };
        self.forward(request, connection, route, target, &authority, destination, record, started).await
    }

    /// Where `host`:`port` is reached from `connection`, by the registry and the outbound mode.
    fn destination(
        &self,
        policy: &ProxyPolicy,
        host: &str,
        port: u16,
        connection: Connection,
    ) -> Result<Destination, (Failure, Option<ServiceLabels>)> {
        let original = SocketAddr::new(connection.local.ip(), port);
        let intercepted = matches!(connection.listener, Listener::Mesh);
        match policy.registered(host, port) {
            Registered::Service(service) => {
                let labels = ServiceLabels {
                    service: host.to_owned(),
                    name: host.to_owned(),
                    namespace: service.namespace.clone(),
                    cluster: format!("outbound|{port}||{host}"),
                };
                let address = match service.upstream(port) {
                    Upstream::Endpoint(address) => address,
                    Upstream::OriginalDestination if intercepted => original,
                    Upstream::OriginalDestination => return Err((Failure::NoCluster, Some(labels))),
                    Upstream::NoEndpoint => return Err((Failure::NoHealthyUpstream, Some(labels))),
                };
                Ok(Destination { address, http2: service.http2(port), labels })
            }
            Registered::Unknown if policy.mode == OutboundMode::RegistryOnly => {
                Err((Failure::Blackholed, Some(ServiceLabels::special("BlackHoleCluster", "BlackHoleCluster"))))
            }
            Registered::Unknown if intercepted => Ok(Destination {
                address: original,
                http2: false,
                labels: ServiceLabels::special("PassthroughCluster", host),
            }),
            Registered::Unknown => Err((Failure::NoCluster, None)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &self,
        request: Request<Incoming>,
        connection: Connection,
        route: Option<(&Route, Option<&str>)>,
        target: Option<&Target>,
        authority: &str,
        destination: Destination,
        mut record: RequestRecord,
        started: Instant,
    ) -> Response<ProxyBody> {
        let (mut parts, body) = request.into_parts();
        let received = Arc::new(AtomicU64::new(0));
        let path_and_query = rewritten_path(route, &parts.uri);
        let upstream_authority = route
            .and_then(|(route, _)| route.rewrite.as_ref()?.authority.clone())
            .unwrap_or_else(|| authority.to_owned());
        let uri = Uri::builder()
            .scheme("http")
            .authority(destination.address.to_string())
            .path_and_query(path_and_query)
            .build();
        let Ok(uri) = uri else {
            return self.local_failure(Failure::BadRequest, record, started, Some(destination.labels));
        };
        parts.uri = uri;
        parts.version = if destination.http2 { Version::HTTP_2 } else { Version::HTTP_11 };
        let headers = &mut parts.headers;
        strip_hop_by_hop(headers);
        if let Ok(host) = HeaderValue::from_str(&upstream_authority) {
            headers.insert(header::HOST, host);
        }
        if !headers.contains_key("x-request-id") {
            let id = request_id();
            record.request_id = Some(id.clone());
            if let Ok(value) = HeaderValue::from_str(&id) {
                headers.insert("x-request-id", value);
            }
        }
        headers.entry("x-forwarded-proto").or_insert(HeaderValue::from_static("http"));
        if let Listener::Gateway(_) = connection.listener {
            append_forwarded_for(headers, connection.peer);
        }
        if let Some((route, _)) = route {
            route.request_headers.apply(headers);
        }
        if let Some(target) = target {
            target.request_headers.apply(headers);
        }
        let body = Counted { inner: body.map_err(BoxError::from).boxed(), bytes: received.clone() }.boxed();
        let upstream_request = Request::from_parts(parts, body);
        let client = if destination.http2 { &self.http2 } else { &self.http1 };
        let sent_at = Instant::now();
        let pending = client.request(upstream_request);
        let timeout = route.and_then(|(route, _)| route.timeout);
        let result = match timeout {
            Some(timeout) => tokio::time::timeout(timeout, pending).await.map_err(|_| Failure::UpstreamTimeout),
            None => Ok(pending.await),
        };
        record.upstream_host = Some(destination.address);
        let response = match result {
            Ok(Ok(response)) => response,
            Ok(Err(error)) => {
                let failure = if error.is_connect() { Failure::UpstreamConnect } else { Failure::UpstreamReset };
                tracing::debug!(%error, upstream = %destination.address, "upstream request failed");
                record.bytes_received = received.load(Ordering::Relaxed);
                return self.local_failure(failure, record, started, Some(destination.labels));
            }
            Err(failure) => {
                record.bytes_received = received.load(Ordering::Relaxed);
                return self.local_failure(failure, record, started, Some(destination.labels));
            }
        };
        let service_time = sent_at.elapsed();
        record.upstream_service_time = Some(service_time);
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        if let Ok(value) = HeaderValue::from_str(&service_time.as_millis().to_string()) {
            parts.headers.insert("x-envoy-upstream-service-time", value);
        }
        if let Some(target) = target {
            target.response_headers.apply(&mut parts.headers);
        }
        if let Some((route, _)) = route {
            route.response_headers.apply(&mut parts.headers);
        }
        record.response_code = parts.status.as_u16();
        let labels = destination.labels;
        record.upstream_cluster = labels.cluster.clone();
        apply_labels(&mut record, &labels);
        let response = Response::from_parts(parts, body.map_err(BoxError::from).boxed());
        self.finish_streaming(response, record, started, received)
    }

    fn local_failure(
        &self,
        failure: Failure,
        mut record: RequestRecord,
        started: Instant,
        labels: Option<ServiceLabels>,
    ) -> Response<ProxyBody> {
        record.response_flags = failure.flag();
        if let Some(labels) = &labels {
            record.upstream_cluster = labels.cluster.clone();
            apply_labels(&mut record, labels);
        }
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
        mut record: RequestRecord,
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
        mut record: RequestRecord,
        started: Instant,
        route: Option<&Route>,
    ) -> Response<ProxyBody> {
        if let Some(route) = route {
            route.response_headers.apply(response.headers_mut());
        }
        if record.destination_service.is_empty() {
            record.destination_service = "unknown".into();
            record.destination_service_name = "unknown".into();
            record.destination_service_namespace = "unknown".into();
        }
        if record.upstream_cluster.is_empty() {
            record.upstream_cluster = "-".into();
        }
        self.finish_streaming(response, record, started, Arc::new(AtomicU64::new(0)))
    }

    /// Wraps the response body so that the request is recorded when the body ends (or the client goes).
    fn finish_streaming(
        &self,
        response: Response<ProxyBody>,
        record: RequestRecord,
        started: Instant,
        received: Arc<AtomicU64>,
    ) -> Response<ProxyBody> {
        let (parts, body) = response.into_parts();
        let body = Recorded {
            inner: body,
            sent: 0,
            received,
            record: Some(Box::new(record)),
            started,
            telemetry: self.telemetry.clone(),
        };
        Response::from_parts(parts, body.boxed())
    }
}

fn apply_labels(record: &mut RequestRecord, labels: &ServiceLabels) {
    record.destination_service = labels.service.clone().into();
    record.destination_service_name = labels.name.clone().into();
    record.destination_service_namespace = labels.namespace.clone().into();
}

fn empty() -> ProxyBody {
    Full::new(Bytes::new()).map_err(|never| match never {}).boxed()
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

/// `host:port` → `host` (`[v6]:port` → `v6`).
fn host_of(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    }
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers the Connection header names are hop-by-hop too.
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .filter(|name| !name.is_empty())
        .collect();
    for name in named.iter().map(String::as_str).chain(HOP_BY_HOP) {
        headers.remove(name);
    }
}

fn append_forwarded_for(headers: &mut HeaderMap, peer: SocketAddr) {
    let value = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(existing) => format!("{existing}, {}", peer.ip()),
        None => peer.ip().to_string(),
    };
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.insert("x-forwarded-for", value);
    }
}

/// A random UUID (version 4), as Envoy generates `x-request-id`.
fn request_id() -> String {
    let bits = (fastrand::u128(..) & !(0xf000 << 64) & !(0xc000 << 48)) | (0x4000 << 64) | (0x8000 << 48);
    let hex = format!("{bits:032x}");
    format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
}

/// The path and query sent upstream: a route's `rewrite.uri` replaces the prefix the route matched on (or the
/// whole path), `uriRegexRewrite` rewrites the path; the query is kept.
fn rewritten_path(route: Option<(&Route, Option<&str>)>, uri: &Uri) -> String {
    let path = uri.path();
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    let Some((route, prefix)) = route else {
        return format!("{path}{query}");
    };
    let Some(rewrite) = &route.rewrite else {
        return format!("{path}{query}");
    };
    let path = if let Some(uri) = &rewrite.uri {
        match prefix {
            Some(prefix) if path.len() >= prefix.len() => format!("{uri}{}", &path[prefix.len()..]),
            _ => uri.clone(),
        }
    } else if let Some((regex, replacement)) = &rewrite.uri_regex {
        regex.replace_all(path, replacement.as_str()).into_owned()
    } else {
        path.to_owned()
    };
    format!("{path}{query}")
}

/// The `Location` of a redirect: the redirect's scheme, authority, port and path, the request's otherwise (a
/// redirect path without a query keeps the request's query, as Envoy does).
fn redirect_location(redirect: &Redirect, authority: &str, uri: &Uri) -> String {
    let scheme = redirect.scheme.as_deref().unwrap_or("http");
    let host = redirect.authority.as_deref().unwrap_or(authority);
    let host = match redirect.port {
        Some(port) => format!("{}:{port}", host_of(host)),
        None => host.to_owned(),
    };
    let path = match &redirect.uri {
        Some(path) if path.contains('?') => path.clone(),
        Some(path) => format!("{path}{}", uri.query().map(|q| format!("?{q}")).unwrap_or_default()),
        None => uri.path_and_query().map_or_else(|| "/".to_owned(), |pq| pq.as_str().to_owned()),
    };
    format!("{scheme}://{host}{path}")
}

/// A request body that counts the bytes it carries.
struct Counted {
    inner: ProxyBody,
    bytes: Arc<AtomicU64>,
}

impl Body for Counted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
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

/// A response body that records its request when it ends, or when it is dropped unfinished.
struct Recorded {
    inner: ProxyBody,
    sent: u64,
    received: Arc<AtomicU64>,
    record: Option<Box<RequestRecord>>,
    started: Instant,
    telemetry: RequestTelemetry,
}

impl Recorded {
    fn emit(&mut self) {
        if let Some(mut record) = self.record.take() {
            record.bytes_sent = self.sent;
            record.bytes_received = record.bytes_received.max(self.received.load(Ordering::Relaxed));
            record.duration = self.started.elapsed();
            self.telemetry.record(&record);
        }
    }
}

impl Body for Recorded {
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

impl Drop for Recorded {
    fn drop(&mut self) {
        self.emit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_version_4_uuids() {
        let id = request_id();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4", "{id}");
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"), "{id}");
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_not_forwarded() {
        let mut headers = HeaderMap::new();
        for (name, value) in
            [("connection", "keep-alive, x-secret"), ("keep-alive", "5"), ("x-secret", "1"), ("x-kept", "1")]
        {
            headers.insert(name, value.parse().unwrap());
        }
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-kept"]);
    }

    #[test]
    fn redirects_keep_what_they_do_not_replace() {
        let redirect = |uri: Option<&str>, authority: Option<&str>, port: Option<u16>| Redirect {
            uri: uri.map(Into::into),
            authority: authority.map(Into::into),
            port,
            scheme: None,
            status: StatusCode::MOVED_PERMANENTLY,
        };
        let uri: Uri = "/old/path?x=1".parse().unwrap();
        let cases = [
            (redirect(Some("/new"), None, None), "http://httpbin.org/new?x=1"),
            (redirect(Some("/new?y=2"), None, None), "http://httpbin.org/new?y=2"),
            (redirect(None, Some("example.com"), Some(8080)), "http://example.com:8080/old/path?x=1"),
        ];
        for (redirect, expected) in cases {
            assert_eq!(redirect_location(&redirect, "httpbin.org", &uri), expected);
        }
    }
}
