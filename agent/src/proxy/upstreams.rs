//! Upstream connections: HTTP/1.1 pooled per address (keep-alive), HTTP/2 one multiplexed connection per
//! address. Either way a request names its host (`Host`, or `:authority`) as the client asked, whichever address
//! the cluster picked.

use std::{collections::HashMap, net::SocketAddr, sync::Mutex};

use http::{header, HeaderMap, HeaderValue, Method, Uri, Version};
use hyper::{body::Incoming, client::conn::http2::SendRequest, Request, Response};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::{TokioExecutor, TokioIo, TokioTimer},
};

use super::{
    http::ProxyBody,
    tcp::{self, SourceAddresses},
};

/// Why a request got no response.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be made.
    Connect(String),
    /// The connection or stream failed before a response.
    Request(String),
}

/// What one request upstream is: where it goes and what it says.
pub struct Outgoing<'a> {
    pub address: SocketAddr,
    pub http2: bool,
    /// The host (and port) the request names.
    pub authority: &'a str,
    pub path_and_query: &'a str,
    pub method: Method,
    /// Its headers, without `Host` (set from `authority`).
    pub headers: HeaderMap,
}

/// Both kinds of upstream connection, shared by every request (and cheap to clone into a task).
#[derive(Clone)]
pub struct Upstreams {
    http1: Client<HttpConnector, ProxyBody>,
    http2: std::sync::Arc<Http2Pool>,
}

impl Upstreams {
    pub fn new(source: SourceAddresses) -> Upstreams {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(tcp::CONNECT_TIMEOUT));
        connector.set_nodelay(true);
        match (source.v4, source.v6) {
            (Some(v4), Some(v6)) => connector.set_local_addresses(v4, v6),
            (Some(v4), None) => connector.set_local_address(Some(v4.into())),
            (None, Some(v6)) => connector.set_local_address(Some(v6.into())),
            (None, None) => {}
        }
        let http1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(std::time::Duration::from_secs(60))
            .timer(TokioTimer::new())
            .build(connector);
        Upstreams { http1, http2: std::sync::Arc::new(Http2Pool::new(source)) }
    }

    pub async fn send(&self, outgoing: Outgoing<'_>, body: ProxyBody) -> Result<Response<Incoming>, SendError> {
        let Outgoing { address, http2, authority, path_and_query, method, mut headers } = outgoing;
        // HTTP/1.1: connect to the address, name the host in Host. HTTP/2: the address is the pool's key, the
        // host goes in :authority (a Host beside it would have to match it).
        let uri_authority = if http2 { authority.to_owned() } else { address.to_string() };
        let uri = Uri::builder()
            .scheme("http")
            .authority(uri_authority)
            .path_and_query(path_and_query)
            .build()
            .map_err(|error| SendError::Request(error.to_string()))?;
        if http2 {
            headers.remove(header::HOST);
        } else if let Ok(host) = HeaderValue::from_str(authority) {
            headers.insert(header::HOST, host);
        }
        let mut request = Request::new(body);
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        if http2 {
            *request.version_mut() = Version::HTTP_2;
            self.http2.send(address, request).await
        } else {
            *request.version_mut() = Version::HTTP_11;
            self.http1.request(request).await.map_err(|error| {
                if error.is_connect() {
                    SendError::Connect(error.to_string())
                } else {
                    SendError::Request(error.to_string())
                }
            })
        }
    }
}

struct Http2Pool {
    connections: Mutex<HashMap<SocketAddr, SendRequest<ProxyBody>>>,
    source: SourceAddresses,
}

impl Http2Pool {
    fn new(source: SourceAddresses) -> Http2Pool {
        Http2Pool { connections: Mutex::new(HashMap::new()), source }
    }

    /// Sends `request` on the connection to `address`, made first if there is none (or it has closed).
    async fn send(&self, address: SocketAddr, request: Request<ProxyBody>) -> Result<Response<Incoming>, SendError> {
        let open = self.lock().get(&address).filter(|sender| !sender.is_closed()).cloned();
        let mut sender = match open {
            Some(sender) => sender,
            None => {
                let stream =
                    tcp::connect(address, &self.source).await.map_err(|error| SendError::Connect(error.to_string()))?;
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
                self.lock().insert(address, sender.clone());
                sender
            }
        };
        sender.ready().await.map_err(|error| SendError::Request(error.to_string()))?;
        sender.send_request(request).await.map_err(|error| SendError::Request(error.to_string()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, SendRequest<ProxyBody>>> {
        self.connections.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
