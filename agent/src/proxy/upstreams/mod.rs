//! Upstream connections: HTTP/1.1 pooled per address (keep-alive), HTTP/2 one multiplexed connection per
//! address. Either way a request names its host (`Host`, or `:authority`) as the client asked, whichever address
//! the cluster picked.

use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    task::Poll,
    time::Duration,
};

use bytes::Bytes;
use http::{header, uri::PathAndQuery, HeaderMap, HeaderValue, Method, StatusCode, Uri, Version};
use hyper::{
    body::{Body, Frame, Incoming, SizeHint},
    client::conn::{http1, http2::SendRequest},
    Request, Response,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::{
    http::ProxyBody,
    tcp::{self, UpstreamSockets},
};

/// Why a request got no response.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be made.
    Connect(String),
    /// The connection or stream failed before a response.
    Request(String),
    /// The upstream refused the stream (HTTP/2 REFUSED_STREAM): it processed none of the request.
    Refused(String),
    /// The destination is the gateway node itself: no connection was tried.
    LocalDestination(String),
}

/// A failed HTTP/2 exchange: refused by the upstream, or failed otherwise.
fn http2_error(error: hyper::Error) -> SendError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&error);
    while let Some(inner) = cause {
        if inner.downcast_ref::<h2::Error>().and_then(h2::Error::reason) == Some(h2::Reason::REFUSED_STREAM) {
            return SendError::Refused(error.to_string());
        }
        cause = inner.source();
    }
    SendError::Request(error.to_string())
}

/// What one request upstream is: where it goes and what it says.
pub struct Outgoing<'a> {
    pub address: SocketAddr,
    pub http2: bool,
    /// The host (and port) the request names.
    pub authority: &'a str,
    pub path_and_query: PathAndQuery,
    pub method: Method,
    /// Its headers; `Host` is made `authority` (the client's own is sent on when it already says so).
    pub headers: HeaderMap,
    /// How long a new connection may take to open.
    pub connect_timeout: Duration,
    /// TLS to speak to the endpoint (a DestinationRule's origination), if any.
    pub tls: Option<UpstreamTls>,
}

/// TLS from the proxy to an endpoint: the client configuration and the server name it asks for (SNI) and
/// checks the certificate against.
#[derive(Clone, Debug)]
pub struct UpstreamTls {
    pub config: Arc<rustls::ClientConfig>,
    pub server_name: Arc<rustls::pki_types::ServerName<'static>>,
}

/// What a pooled connection is for: its address, and the TLS it speaks (configuration and server name).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PoolKey {
    address: SocketAddr,
    tls: Option<(TlsIdentity, Arc<rustls::pki_types::ServerName<'static>>)>,
}

impl PoolKey {
    fn new(address: SocketAddr, tls: Option<&UpstreamTls>) -> PoolKey {
        let tls = tls.map(|tls| (TlsIdentity(tls.config.clone()), tls.server_name.clone()));
        PoolKey { address, tls }
    }
}

/// One TLS client configuration, the same only as itself: a connection made under one CA or client certificate
/// is never reused under another. The key holds the configuration, so its address cannot be freed and taken by a
/// new one while a connection made under it is pooled.
#[derive(Clone, Debug)]
struct TlsIdentity(Arc<rustls::ClientConfig>);

impl PartialEq for TlsIdentity {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for TlsIdentity {}

impl std::hash::Hash for TlsIdentity {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        std::ptr::hash(Arc::as_ptr(&self.0), state);
    }
}

/// A connection's byte stream: TCP, or TLS over it.
pub(crate) trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {
    fn as_any(&self) -> &dyn std::any::Any;
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any>;
}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> Io for T {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any> {
        self
    }
}

/// Whether an upstream connection is a plain socket (not TLS): an upgraded connection over it is relayed between
/// sockets.
pub(crate) fn is_plain_socket(io: &dyn Io) -> bool {
    io.as_any().is::<tokio::net::TcpStream>()
}

/// The plain socket an upstream connection is (None when it is not: see `is_plain_socket`).
pub(crate) fn into_plain_socket(io: Box<dyn Io>) -> Option<tokio::net::TcpStream> {
    io.into_any().downcast::<tokio::net::TcpStream>().ok().map(|socket| *socket)
}

/// Opens a connection to `address` (as `sockets` allow) within `within`, with a TLS handshake over it when `tls` asks.
/// (Each pool's `connect`, which calls it, is boxed where it is waited for: a new connection's state, TLS
/// included, is large, and requests sent on pooled connections never need it.)
async fn open(
    address: SocketAddr,
    sockets: &UpstreamSockets,
    within: Duration,
    tls: Option<&UpstreamTls>,
) -> Result<Box<dyn Io>, SendError> {
    let stream = tcp::connect(address, sockets, within).await.map_err(|error| {
        if tcp::is_local_destination(&error) {
            SendError::LocalDestination(error.to_string())
        } else {
            SendError::Connect(error.to_string())
        }
    })?;
    let Some(tls) = tls else { return Ok(Box::new(stream) as Box<dyn Io>) };
    let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
    match tokio::time::timeout(within, connector.connect((*tls.server_name).clone(), stream)).await {
        Ok(Ok(stream)) => Ok(Box::new(stream) as Box<dyn Io>),
        Ok(Err(error)) => Err(SendError::Connect(format!("TLS handshake with {address}: {error}"))),
        Err(_) => Err(SendError::Connect(format!("TLS handshake with {address} timed out"))),
    }
}

/// Both kinds of upstream connection, shared by every request (and cheap to clone into a task).
#[derive(Clone)]
pub struct Upstreams {
    http1: Arc<Http1Pool>,
    http2: Arc<Http2Pool>,
}

impl Upstreams {
    pub fn new(sockets: UpstreamSockets) -> Upstreams {
        Upstreams { http1: Arc::new(Http1Pool::new(sockets.clone())), http2: Arc::new(Http2Pool::new(sockets)) }
    }

    /// Sends `body` as `outgoing` says. The request is made before the future is, so that the future holds
    /// only what it waits with.
    pub fn send<'a>(
        &'a self,
        outgoing: Outgoing<'_>,
        body: ProxyBody,
    ) -> impl Future<Output = Result<Response<UpstreamBody>, SendError>> + Send + 'a {
        let Outgoing { address, http2, authority, path_and_query, method, mut headers, connect_timeout, tls } =
            outgoing;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut request = Request::new(body);
        *request.method_mut() = method;
        let made = if http2 {
            // The address is the pool's key; the host goes in :authority (a Host beside it would have to match).
            headers.remove(header::HOST);
            let uri = Uri::builder().scheme(scheme).authority(authority).path_and_query(path_and_query).build();
            uri.map(|uri| {
                *request.uri_mut() = uri;
                *request.headers_mut() = headers;
                *request.version_mut() = Version::HTTP_2;
                request
            })
            .map_err(|error| SendError::Request(error.to_string()))
        } else {
            // Origin-form, the host in Host.
            *request.uri_mut() = Uri::from(path_and_query);
            // The client's Host goes on as it is when it is the only one and names the host (most requests): no
            // copy of it.
            let mut hosts = headers.get_all(header::HOST).iter();
            let kept =
                hosts.next().is_some_and(|host| host.as_bytes() == authority.as_bytes()) && hosts.next().is_none();
            if !kept {
                if let Ok(host) = HeaderValue::from_str(authority) {
                    headers.insert(header::HOST, host);
                }
            }
            *request.headers_mut() = headers;
            Ok(request)
        };
        async move {
            match made {
                Err(error) => Err(error),
                Ok(request) if http2 => {
                    let response = self.http2.send(address, request, connect_timeout, tls.as_ref()).await?;
                    Ok(response.map(|body| UpstreamBody { body, returning: None }))
                }
                Ok(request) => self.http1.send(address, request, connect_timeout, tls.as_ref()).await,
            }
        }
    }
}

/// How long an HTTP/1.1 connection is kept for reuse without a request.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// HTTP/1.1 connections kept alive per address: a request takes the one given back last, and gives it back once
/// its response has been read to the end.
struct Http1Pool {
    idle: Mutex<HashMap<PoolKey, VecDeque<Idle>, foldhash::fast::RandomState>>,
    sockets: UpstreamSockets,
    /// Connections given back, so that every `SWEEP_EVERY`th sweeps the whole pool.
    given_back: std::sync::atomic::AtomicUsize,
}

/// How often (in connections given back) the pool drops what closed or idled too long at every address, not
/// only at the one in use: passthrough traffic reaches many addresses once each.
const SWEEP_EVERY: usize = 1024;

struct Idle {
    sender: http1::SendRequest<ProxyBody>,
    /// When it was given back, on the coarse clock.
    since: Duration,
}

/// Monotonic time at the kernel's tick (a few milliseconds), read without the fine clock's cost: enough to tell
/// a connection idle for a minute, and read twice per request.
fn coarse_now() -> Duration {
    super::idle::coarse_now()
}

impl Http1Pool {
    fn new(sockets: UpstreamSockets) -> Http1Pool {
        Http1Pool { idle: Mutex::default(), sockets, given_back: Default::default() }
    }

    /// Sends `request` on the connection to `address` given back last, or on a new one. (An async block rather
    /// than an `async fn`, which would keep its arguments twice in every request's future.)
    #[expect(
        clippy::manual_async_fn,
        reason = "an async block keeps its arguments once; an async fn keeps them twice in every request's future"
    )]
    fn send<'a>(
        self: &'a Arc<Self>,
        address: SocketAddr,
        mut request: Request<ProxyBody>,
        connect_timeout: Duration,
        tls: Option<&'a UpstreamTls>,
    ) -> impl Future<Output = Result<Response<UpstreamBody>, SendError>> + Send + 'a {
        async move {
            let key = PoolKey::new(address, tls);
            while let Some(mut sender) = self.take(&key) {
                // It finishes the exchange it was given back after, or turns out closed.
                if sender.ready().await.is_err() {
                    continue;
                }
                match sender.try_send_request(request).await {
                    Ok(response) => return Ok(self.returning(key, sender, response)),
                    Err(mut error) => match error.take_message() {
                        // Closed before a byte of the request was written: another connection takes it.
                        Some(unsent) => request = unsent,
                        None => return Err(SendError::Request(error.into_error().to_string())),
                    },
                }
            }
            // Boxed: a new connection's state, which requests sent on pooled connections never need.
            let mut sender = Box::pin(self.connect(address, connect_timeout, tls)).await?;
            let response = sender.send_request(request).await.map_err(|error| SendError::Request(error.to_string()))?;
            Ok(self.returning(key, sender, response))
        }
    }

    /// A new connection to `address`, its exchanges driven by a task of its own.
    async fn connect(
        &self,
        address: SocketAddr,
        connect_timeout: Duration,
        tls: Option<&UpstreamTls>,
    ) -> Result<http1::SendRequest<ProxyBody>, SendError> {
        let stream = open(address, &self.sockets, connect_timeout, tls).await?;
        let (sender, connection) = http1::Builder::new()
            .writev(false)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|error| SendError::Request(error.to_string()))?;
        tokio::spawn(async move {
            if let Err(error) = connection.with_upgrades().await {
                tracing::debug!(%address, %error, "HTTP/1.1 upstream connection ended");
            }
        });
        Ok(sender)
    }

    /// The response, its body holding the connection until it has been read (a response without a body gives it
    /// back at once; one that switches protocols never does).
    fn returning(
        self: &Arc<Self>,
        key: PoolKey,
        sender: http1::SendRequest<ProxyBody>,
        response: Response<Incoming>,
    ) -> Response<UpstreamBody> {
        let (parts, incoming) = response.into_parts();
        let mut body = UpstreamBody { body: incoming, returning: None };
        if parts.status != StatusCode::SWITCHING_PROTOCOLS {
            body.returning = Some(Returning { pool: self.clone(), key, sender });
            if body.body.is_end_stream() {
                body.give_back();
            }
        }
        Response::from_parts(parts, body)
    }

    /// The connection for `key` given back last, if one is open and has not idled too long.
    fn take(&self, key: &PoolKey) -> Option<http1::SendRequest<ProxyBody>> {
        let mut idle = self.lock();
        let connections = idle.get_mut(key)?;
        let mut taken = None;
        let now = coarse_now();
        while let Some(Idle { sender, since }) = connections.pop_back() {
            if !sender.is_closed() && now.saturating_sub(since) < IDLE_TIMEOUT {
                taken = Some(sender);
                break;
            }
        }
        if connections.is_empty() {
            idle.remove(key);
        }
        taken
    }

    fn give_back(&self, key: PoolKey, sender: http1::SendRequest<ProxyBody>) {
        let now = coarse_now();
        let sweep = self.given_back.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % SWEEP_EVERY == 0;
        let mut idle = self.lock();
        if sweep {
            idle.retain(|_, connections| {
                connections.retain(|c| !c.sender.is_closed() && now.saturating_sub(c.since) < IDLE_TIMEOUT);
                !connections.is_empty()
            });
        }
        let connections = idle.entry(key).or_default();
        // The oldest are at the front: those idle too long are closed (by dropping them).
        while connections.front().is_some_and(|oldest| now.saturating_sub(oldest.since) >= IDLE_TIMEOUT) {
            connections.pop_front();
        }
        connections.push_back(Idle { sender, since: now });
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<PoolKey, VecDeque<Idle>, foldhash::fast::RandomState>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

struct Returning {
    pool: Arc<Http1Pool>,
    key: PoolKey,
    sender: http1::SendRequest<ProxyBody>,
}

/// An upstream response's body; an HTTP/1.1 one gives its connection back to the pool when read to the end (a
/// body dropped before then takes its connection with it).
pub struct UpstreamBody {
    body: Incoming,
    returning: Option<Returning>,
}

impl UpstreamBody {
    fn give_back(&mut self) {
        if let Some(Returning { pool, key, sender }) = self.returning.take() {
            pool.give_back(key, sender);
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Ok(_)))) && this.body.is_end_stream() {
            this.give_back();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

struct Http2Pool {
    connections: Mutex<HashMap<PoolKey, SendRequest<ProxyBody>>>,
    sockets: UpstreamSockets,
}

impl Http2Pool {
    fn new(sockets: UpstreamSockets) -> Http2Pool {
        Http2Pool { connections: Mutex::new(HashMap::new()), sockets }
    }

    /// Sends `request` on the connection to `address`, made first if there is none (or it has closed). (An
    /// async block, as the HTTP/1.1 pool's.)
    #[expect(
        clippy::manual_async_fn,
        reason = "an async block keeps its arguments once; an async fn keeps them twice in every request's future"
    )]
    fn send<'a>(
        &'a self,
        address: SocketAddr,
        request: Request<ProxyBody>,
        connect_timeout: Duration,
        tls: Option<&'a UpstreamTls>,
    ) -> impl Future<Output = Result<Response<Incoming>, SendError>> + Send + 'a {
        async move {
            let key = PoolKey::new(address, tls);
            let pooled = self.lock().get(&key).filter(|sender| !sender.is_closed()).cloned();
            let mut sender = match pooled {
                Some(sender) => sender,
                // Boxed: a new connection's state, which requests sent on an open connection never need.
                None => Box::pin(self.connect(key, connect_timeout, tls)).await?,
            };
            sender.ready().await.map_err(|error| SendError::Request(error.to_string()))?;
            sender.send_request(request).await.map_err(http2_error)
        }
    }

    /// A new connection for `key`, its streams driven by a task of its own, kept for the requests after.
    async fn connect(
        &self,
        key: PoolKey,
        connect_timeout: Duration,
        tls: Option<&UpstreamTls>,
    ) -> Result<SendRequest<ProxyBody>, SendError> {
        let address = key.address;
        let stream = open(address, &self.sockets, connect_timeout, tls).await?;
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|error| SendError::Request(error.to_string()))?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%address, %error, "HTTP/2 upstream connection ended");
            }
        });
        self.lock().insert(key, sender.clone());
        Ok(sender)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PoolKey, SendRequest<ProxyBody>>> {
        self.connections.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests;
