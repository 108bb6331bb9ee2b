//! HTTP/2 upstream connections: one multiplexed connection per address (and TLS identity), its streams driven by
//! hyper's client in a task of its own.

use std::{collections::HashMap, future::Future, net::SocketAddr, sync::Mutex, time::Duration};

use hyper::{body::Incoming, client::conn::http2::SendRequest, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::{open, pool::PoolKey, Opened, SendError, UpstreamTls};
use crate::{
    policy::clusters::Connect,
    proxy::{http::ProxyBody, idle, tcp::UpstreamSockets},
};

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

/// An open connection's sender, and the address it left from.
type Http2Connection = (SendRequest<ProxyBody>, Option<SocketAddr>);

/// A pooled connection, and when it was opened (on the coarse clock).
type Pooled = (Http2Connection, Duration);

pub(super) struct Http2Pool {
    connections: Mutex<HashMap<PoolKey, Pooled>>,
    sockets: UpstreamSockets,
}

impl Http2Pool {
    pub(super) fn new(sockets: UpstreamSockets) -> Http2Pool {
        Http2Pool { connections: Mutex::new(HashMap::new()), sockets }
    }

    /// Sends `request` on the connection to `address`, made first if there is none (or it has closed, or lived
    /// past `lifetime`: its streams in progress finish on it, new ones go on the new one): the response, and the
    /// address its connection left from. (An async block, as the HTTP/1.1 pool's.)
    #[expect(
        clippy::manual_async_fn,
        reason = "an async block keeps its arguments once; an async fn keeps them twice in every request's future"
    )]
    pub(super) fn send<'a>(
        &'a self,
        address: SocketAddr,
        request: Request<ProxyBody>,
        connect: Connect,
        tls: Option<UpstreamTls>,
        lifetime: Option<Duration>,
    ) -> impl Future<Output = Result<(Response<Incoming>, Option<SocketAddr>), SendError>> + Send + 'a {
        async move {
            let key = PoolKey::new(address, tls.as_ref());
            let usable = |((sender, _), opened): &&Pooled| {
                !sender.is_closed()
                    && lifetime.is_none_or(|lifetime| idle::coarse_now().saturating_sub(*opened) < lifetime)
            };
            let pooled = self.lock().get(&key).filter(usable).map(|(connection, _)| connection.clone());
            let (mut sender, local) = match pooled {
                Some(sender) => sender,
                // Boxed: a new connection's state, which requests sent on an open connection never need.
                None => Box::pin(self.connect(key, connect, tls.as_ref())).await?,
            };
            sender.ready().await.map_err(|error| SendError::Request(error.to_string()))?;
            let response = sender.send_request(request).await.map_err(http2_error)?;
            Ok((response, local))
        }
    }

    /// A new connection for `key`, its streams driven by a task of its own, kept for the requests after.
    async fn connect(
        &self,
        key: PoolKey,
        connect: Connect,
        tls: Option<&UpstreamTls>,
    ) -> Result<Http2Connection, SendError> {
        let address = key.address;
        let opened = idle::coarse_now();
        let Opened { io: stream, local } = open(address, &self.sockets, connect, tls).await?;
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
        self.lock().insert(key, ((sender.clone(), local), opened));
        Ok((sender, local))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PoolKey, Pooled>> {
        self.connections.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
