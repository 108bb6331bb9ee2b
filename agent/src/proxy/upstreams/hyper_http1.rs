//! HTTP/1.1 upstream exchanges through hyper's client: each connection driven by a task of its own, a request
//! handed to it through hyper's channels. Upgrades (WebSocket) take this path, whose upgraded connection hyper
//! hands back; `--upstream-http1 hyper` sends every HTTP/1.1 request this way, for comparison.

use std::{future::Future, net::SocketAddr, pin::Pin, sync::Arc, task::Poll, time::Duration};

use bytes::Bytes;
use http::StatusCode;
use hyper::{
    body::{Body, Frame, Incoming, SizeHint},
    client::conn::http1,
    Request, Response,
};
use hyper_util::rt::TokioIo;

use super::{
    open,
    pool::{IdlePool, PoolKey, Reusable},
    Io, Opened, Reuse, SendError, UpstreamBody, UpstreamTls,
};
use crate::{
    policy::clusters::Connect,
    proxy::{http::ProxyBody, tcp::UpstreamSockets},
};

/// A connection's sender, and the address the connection left from.
pub(super) struct HyperConnection {
    sender: http1::SendRequest<ProxyBody>,
    local: Option<SocketAddr>,
}

impl Reusable for HyperConnection {
    fn is_open(&mut self) -> bool {
        !self.sender.is_closed()
    }
}

/// HTTP/1.1 connections kept alive per address: a request takes the one given back last, and gives it back once
/// its response has been read to the end.
pub(super) struct HyperHttp1Pool {
    pub(super) idle: IdlePool<HyperConnection>,
    sockets: UpstreamSockets,
}

impl HyperHttp1Pool {
    pub(super) fn new(sockets: UpstreamSockets) -> HyperHttp1Pool {
        HyperHttp1Pool { idle: IdlePool::new(), sockets }
    }

    /// Sends `request` on the connection to `address` given back last, or on a new one. (An async block rather
    /// than an `async fn`, which would keep its arguments twice in every request's future.)
    #[expect(
        clippy::manual_async_fn,
        reason = "an async block keeps its arguments once; an async fn keeps them twice in every request's future"
    )]
    pub(super) fn send<'a>(
        self: &'a Arc<Self>,
        address: SocketAddr,
        mut request: Request<ProxyBody>,
        connect: Connect,
        tls: Option<UpstreamTls>,
        reuse: Reuse,
    ) -> impl Future<Output = Result<Response<UpstreamBody>, SendError>> + Send + 'a {
        async move {
            let key = PoolKey::new(address, tls.as_ref());
            while let Some(mut connection) = self.idle.take(&key) {
                // It finishes the exchange it was given back after, or turns out closed.
                if connection.sender.ready().await.is_err() {
                    continue;
                }
                match connection.sender.try_send_request(request).await {
                    Ok(response) => return Ok(self.returning(key, connection, response, reuse)),
                    Err(mut error) => match error.take_message() {
                        // Closed before a byte of the request was written: another connection takes it.
                        Some(unsent) => request = unsent,
                        None => return Err(failed(error.into_error())),
                    },
                }
            }
            // Boxed: a new connection's state, which requests sent on pooled connections never need.
            let mut connection = Box::pin(self.connect(address, connect, tls.as_ref())).await?;
            let response = connection.sender.send_request(request).await.map_err(failed)?;
            Ok(self.returning(key, connection, response, reuse))
        }
    }

    /// A new connection to `address`, its exchanges driven by a task of its own.
    async fn connect(
        &self,
        address: SocketAddr,
        connect: Connect,
        tls: Option<&UpstreamTls>,
    ) -> Result<HyperConnection, SendError> {
        let Opened { io, local } = open(address, &self.sockets, connect, tls).await?;
        // As `Box<dyn Io>`: the type an upgraded connection is taken back as (see `tunnel`).
        let stream: Box<dyn Io> = io;
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
        Ok(HyperConnection { sender, local })
    }

    /// The response, its body holding the connection until it has been read (a response without a body gives it
    /// back at once; one that switches protocols never does).
    fn returning(
        self: &Arc<Self>,
        key: PoolKey,
        connection: HyperConnection,
        response: Response<Incoming>,
        reuse: Reuse,
    ) -> Response<UpstreamBody> {
        let (parts, incoming) = response.into_parts();
        let mut body = HyperBody { body: incoming, returning: None, local: connection.local };
        if parts.status != StatusCode::SWITCHING_PROTOCOLS {
            body.returning = Some(Returning { pool: self.clone(), key, connection, keep_for: reuse.idle_timeout });
            if body.body.is_end_stream() {
                body.give_back();
            }
        }
        Response::from_parts(parts, UpstreamBody::from_hyper(body))
    }
}

/// A failed exchange: a response hyper could not parse is the upstream's protocol error.
fn failed(error: hyper::Error) -> SendError {
    if error.is_parse() || error.is_parse_status() || error.is_parse_too_large() {
        SendError::Protocol(error.to_string())
    } else {
        SendError::Request(error.to_string())
    }
}

/// Where a hyper response body's connection goes back to once the body has been read.
pub(super) struct Returning {
    pool: Arc<HyperHttp1Pool>,
    key: PoolKey,
    connection: HyperConnection,
    keep_for: Duration,
}

/// A response body from hyper's client; an HTTP/1.1 one gives its connection back to the pool when read to the
/// end (a body dropped before then takes its connection with it).
pub(super) struct HyperBody {
    pub(super) body: Incoming,
    pub(super) returning: Option<Returning>,
    /// The address its connection left from.
    pub(super) local: Option<SocketAddr>,
}

impl HyperBody {
    fn give_back(&mut self) {
        if let Some(Returning { pool, key, connection, keep_for }) = self.returning.take() {
            pool.idle.give_back(key, connection, keep_for);
        }
    }
}

impl Body for HyperBody {
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
