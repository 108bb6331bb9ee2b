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

pub use super::routing::Listener;
use super::{
    failure::Failure,
    routing::{self, Decision, Destination, Matched, ServiceLabels},
};
use crate::{
    policy::routes::{ProxyPolicy, Route, Target},
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

    async fn handle(&self, mut request: Request<Incoming>, connection: Connection) -> Response<ProxyBody> {
        let started = Instant::now();
        // Every request carries an id from here on, local replies included, as Envoy's do.
        if !request.headers().contains_key("x-request-id") {
            if let Ok(id) = HeaderValue::from_str(&request_id()) {
                request.headers_mut().insert("x-request-id", id);
            }
        }
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
        let decision =
            routing::decide(&policy, &request, &authority, connection.listener, connection.local, fastrand::u32(..));
        match decision {
            Decision::Fail { failure, labels } => self.local_failure(failure, record, started, labels),
            Decision::Respond { route, status, body } => {
                record.route_name = Some(route.name.clone());
                self.local_reply(status, body, "", record, started, Some(route))
            }
            Decision::Redirect { route, status, location } => {
                record.route_name = Some(route.name.clone());
                let mut response = Response::new(empty());
                *response.status_mut() = status;
                if let Ok(location) = HeaderValue::from_str(&location) {
                    response.headers_mut().insert(header::LOCATION, location);
                }
                record.response_code = status.as_u16();
                self.finish(response, record, started, Some(route))
            }
            Decision::Forward { route, target, destination } => {
                record.route_name = route.map(|(route, _)| route.name.clone());
                self.forward(request, connection, route, target, &authority, destination, record, started).await
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &self,
        request: Request<Incoming>,
        connection: Connection,
        route: Option<Matched<'_>>,
        target: Option<&Target>,
        authority: &str,
        destination: Destination,
        mut record: RequestRecord,
        started: Instant,
    ) -> Response<ProxyBody> {
        let (mut parts, body) = request.into_parts();
        let received = Arc::new(AtomicU64::new(0));
        let path_and_query = routing::rewritten_path(route, &parts.uri);
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
}
