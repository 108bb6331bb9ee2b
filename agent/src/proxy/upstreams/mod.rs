//! Upstream connections: HTTP/1.1 pooled per address (keep-alive), by Sluice's own connection code (`http1`) or
//! hyper's client (upgrades, and for comparison); HTTP/2 one multiplexed connection per address. Either way a
//! request names its host (`Host`, or `:authority`) as the client asked, whichever address the cluster picked.

pub(crate) mod http1;
mod http2;
mod hyper_http1;
mod pool;

use std::{future::Future, net::SocketAddr, pin::Pin, sync::Arc, task::Poll, time::Duration};

use bytes::Bytes;
use http::{header, uri::PathAndQuery, HeaderMap, HeaderValue, Method, Uri, Version};
use hyper::{
    body::{Body, Frame, Incoming, SizeHint},
    Request, Response,
};

use super::{
    connect_failure::ConnectFailure,
    http::{BoxError, ProxyBody},
    tcp::{self, UpstreamSockets},
};
use crate::policy::clusters::Connect;

/// Which code speaks HTTP/1.1 to upstreams.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Http1Client {
    /// Sluice's own: each exchange driven in its request's task, responses parsed as hyper parses them.
    #[default]
    Native,
    /// hyper's client: each connection driven by a task of its own (kept for comparison).
    Hyper,
}

/// Why a request got no response.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be made.
    Connect(ConnectFailure),
    /// The connection or stream failed before a response.
    Request(String),
    /// The upstream's response broke HTTP: a malformed head, or framing that cannot be read one way only.
    Protocol(String),
    /// The upstream refused the stream (HTTP/2 REFUSED_STREAM): it processed none of the request.
    Refused(String),
    /// The destination is the gateway node itself: no connection was tried.
    LocalDestination(String),
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
    /// How a new connection is opened (within how long, with which keepalive).
    pub connect: Connect,
    /// TLS to speak to the endpoint (a DestinationRule's origination), if any.
    pub tls: Option<UpstreamTls>,
    /// How the connection is reused after this request.
    pub reuse: Reuse,
}

/// How an HTTP/1.1 upstream connection is reused (a DestinationRule's `connectionPool.http`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reuse {
    /// The requests it carries at most (`maxRequestsPerConnection`); `None`: any number.
    pub max_requests: Option<u32>,
    /// How long it is kept without a request (`idleTimeout`).
    pub idle_timeout: Duration,
    /// How long from its opening it is used at most (`connectionPool.tcp.maxConnectionDuration`); `None`: any.
    pub lifetime: Option<Duration>,
}

/// How long an HTTP/1.1 connection is kept for reuse without a request, unless its DestinationRule says.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

impl Default for Reuse {
    fn default() -> Reuse {
        Reuse { max_requests: None, idle_timeout: IDLE_TIMEOUT, lifetime: None }
    }
}

/// TLS from the proxy to an endpoint: the client configuration and the server name it asks for (SNI) and
/// checks the certificate against.
#[derive(Clone, Debug)]
pub struct UpstreamTls {
    pub config: Arc<rustls::ClientConfig>,
    pub server_name: Arc<rustls::pki_types::ServerName<'static>>,
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

/// A new upstream connection, and the address it left from (`%UPSTREAM_LOCAL_ADDRESS%`, read once per
/// connection rather than per request).
pub(crate) struct Opened {
    pub io: Box<dyn Io + Sync>,
    pub local: Option<SocketAddr>,
}

/// Opens a connection to `address` (as `sockets` allow) as `connect` says, with a TLS handshake over it when `tls`
/// asks (within the same time).
/// (Each pool's `connect`, which calls it, is boxed where it is waited for: a new connection's state, TLS
/// included, is large, and requests sent on pooled connections never need it.)
async fn open(
    address: SocketAddr,
    sockets: &UpstreamSockets,
    connect: Connect,
    tls: Option<&UpstreamTls>,
) -> Result<Opened, SendError> {
    let stream = tcp::connect(address, sockets, connect).await.map_err(|error| {
        if tcp::is_local_destination(&error) {
            SendError::LocalDestination(error.to_string())
        } else {
            SendError::Connect(ConnectFailure::from_connect(&error))
        }
    })?;
    let local = stream.local_addr().ok();
    let Some(tls) = tls else { return Ok(Opened { io: Box::new(stream), local }) };
    let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
    match tokio::time::timeout(connect.within, connector.connect((*tls.server_name).clone(), stream)).await {
        Ok(Ok(stream)) => Ok(Opened { io: Box::new(stream), local }),
        Ok(Err(error)) => Err(SendError::Connect(ConnectFailure::from_handshake(&error))),
        Err(_) => Err(SendError::Connect(ConnectFailure::Timeout)),
    }
}

/// Both kinds of upstream connection, shared by every request (and cheap to clone into a task).
#[derive(Clone)]
pub struct Upstreams {
    http1: Arc<http1::NativeHttp1Pool>,
    hyper_http1: Arc<hyper_http1::HyperHttp1Pool>,
    http2: Arc<http2::Http2Pool>,
    /// Which sends plain HTTP/1.1 requests (upgrades always go through hyper's).
    http1_client: Http1Client,
}

impl Upstreams {
    pub fn new(sockets: UpstreamSockets, http1_client: Http1Client) -> Upstreams {
        Upstreams {
            http1: Arc::new(http1::NativeHttp1Pool::new(sockets.clone())),
            hyper_http1: Arc::new(hyper_http1::HyperHttp1Pool::new(sockets.clone())),
            http2: Arc::new(http2::Http2Pool::new(sockets)),
            http1_client,
        }
    }

    /// Sends `body` as `outgoing` says. The request is made before the future is, so that the future holds
    /// only what it waits with; the future is the chosen client's own, boxed once (wrapped in a future of
    /// this function's own, it was moved twice more per request).
    pub fn send<'a>(&'a self, outgoing: Outgoing<'_>, body: ProxyBody) -> PendingResponse<'a> {
        let Outgoing { address, http2, authority, path_and_query, method, mut headers, connect, tls, reuse } = outgoing;
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
        match made {
            Err(error) => Box::pin(std::future::ready(Err(error))),
            Ok(request) if http2 => Box::pin(async move {
                let (response, local) = self.http2.send(address, request, connect, tls, reuse.lifetime).await?;
                Ok(response.map(|body| UpstreamBody::hyper(body, local)))
            }),
            // An upgrade's connection is handed back by hyper's client once the upstream switches.
            Ok(request)
                if self.http1_client == Http1Client::Hyper || request.headers().contains_key(header::UPGRADE) =>
            {
                Box::pin(self.hyper_http1.send(address, request, connect, tls, reuse))
            }
            Ok(request) => Box::pin(self.http1.send(address, request, connect, tls, reuse)),
        }
    }
}

/// An upstream's response on its way.
pub type PendingResponse<'a> = Pin<Box<dyn Future<Output = Result<Response<UpstreamBody>, SendError>> + Send + 'a>>;

/// An upstream response's body: from Sluice's HTTP/1.1 connections, or from hyper's client (HTTP/2, upgrades,
/// `--upstream-http1 hyper`).
pub struct UpstreamBody(BodyFrom);

impl UpstreamBody {
    /// The address the response's connection left from (`%UPSTREAM_LOCAL_ADDRESS%`).
    pub fn upstream_local(&self) -> Option<SocketAddr> {
        match &self.0 {
            BodyFrom::Native(body) => body.upstream_local(),
            BodyFrom::Hyper(body) => body.local,
        }
    }
}

/// Each boxed: a response is moved whole through the tries, their timeouts and the shaping of what the client
/// gets, and with the body in place it was 512 bytes (a native body holds its connection and its way back to the
/// pool), 128 with it boxed.
enum BodyFrom {
    Native(Box<http1::ResponseBody>),
    Hyper(Box<hyper_http1::HyperBody>),
}

impl UpstreamBody {
    /// A body from hyper's client whose connection is not pooled (HTTP/2's streams).
    fn hyper(body: Incoming, local: Option<SocketAddr>) -> UpstreamBody {
        UpstreamBody::from_hyper(hyper_http1::HyperBody { body, returning: None, local })
    }

    fn from_hyper(body: hyper_http1::HyperBody) -> UpstreamBody {
        UpstreamBody(BodyFrom::Hyper(Box::new(body)))
    }

    fn native(body: http1::ResponseBody) -> UpstreamBody {
        UpstreamBody(BodyFrom::Native(Box::new(body)))
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().0 {
            BodyFrom::Native(body) => Pin::new(body).poll_frame(cx),
            BodyFrom::Hyper(body) => Pin::new(body).poll_frame(cx).map_err(BoxError::from),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            BodyFrom::Native(body) => body.is_end_stream(),
            BodyFrom::Hyper(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            BodyFrom::Native(body) => body.size_hint(),
            BodyFrom::Hyper(body) => body.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests;
