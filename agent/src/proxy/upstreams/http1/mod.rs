//! Sluice's own HTTP/1.1 upstream connections: a request's exchange is driven in the request's own task — its
//! head written, its body written while the response head is awaited, the response body read straight from the
//! socket by whoever polls it — with no task per connection and no channel per request (hyper's client has
//! both). Responses are parsed as hyper's client parses them, and anything it would refuse is refused.

pub(crate) mod against_hyper;
mod body;
mod chunked;
pub(crate) mod framing;
pub(crate) mod head;

use std::{
    future::{poll_fn, Future},
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, Waker},
    time::Duration,
};

use bytes::BytesMut;
use hyper::{body::Body, Request, Response};
use tokio::io::AsyncWrite;

use body::RequestWriter;
pub(crate) use body::ResponseBody;
use head::BodyShape;

use super::{
    open,
    pool::{IdlePool, PoolKey, Reusable},
    Io, Opened, Reuse, SendError, UpstreamBody, UpstreamTls,
};
use crate::{
    policy::clusters::Connect,
    proxy::{http::ProxyBody, tcp::UpstreamSockets},
};

/// How much room a read into a connection's buffer is given at least.
const READ_SIZE: usize = 16 * 1024;

/// An upstream connection and the bytes read from it but not yet taken.
pub(crate) struct Connection {
    io: Box<dyn Io + Sync>,
    read: BytesMut,
    /// The request head being written (kept, so that each exchange reuses its room).
    head: Vec<u8>,
    /// Whether it carried an exchange before (a failure to write to it may be its upstream having closed it).
    reused: bool,
    /// The requests it has carried.
    served: u32,
    /// The address it left from.
    local: Option<SocketAddr>,
    /// When it was opened, on the coarse clock (for `Reuse::lifetime`).
    opened: Duration,
}

impl Connection {
    fn new(Opened { io, local }: Opened) -> Connection {
        let opened = crate::proxy::idle::coarse_now();
        Connection { io, read: BytesMut::new(), head: Vec::new(), reused: false, served: 0, local, opened }
    }

    /// Reads more from the upstream into `read`: how many bytes (0: the upstream closed).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        if self.read.capacity() - self.read.len() < READ_SIZE / 4 {
            self.read.reserve(READ_SIZE);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read)
    }
}

impl Reusable for Connection {
    /// Reads without waiting: an upstream that closed an idle connection (or sent bytes nobody asked for) has it
    /// dropped; one with nothing to say is open.
    fn is_open(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        self.poll_fill(&mut cx).is_pending()
    }
}

/// The connections and how new ones are made.
pub(crate) struct NativeHttp1Pool {
    pub(in crate::proxy::upstreams) idle: IdlePool<Connection>,
    sockets: UpstreamSockets,
}

/// Why an exchange failed, and whether its request is still whole (nothing of it was written, on a connection
/// the upstream had closed while it idled): another connection may take it.
enum Failed {
    Unsent(ProxyBody),
    Failed(SendError),
}

impl NativeHttp1Pool {
    pub(super) fn new(sockets: UpstreamSockets) -> NativeHttp1Pool {
        NativeHttp1Pool { idle: IdlePool::new(), sockets }
    }

    pub(super) fn give_back(&self, key: PoolKey, mut connection: Connection, reuse: Reuse) {
        // The last request the cluster lets it carry has been: closed (by dropping it).
        if reuse.max_requests.is_some_and(|max| connection.served >= max) {
            return;
        }
        // Nor is one past its lifetime; one within it waits no longer than what is left of it.
        let keep_for = match reuse.lifetime {
            Some(lifetime) => {
                let age = crate::proxy::idle::coarse_now().saturating_sub(connection.opened);
                match lifetime.checked_sub(age).filter(|left| !left.is_zero()) {
                    Some(left) => left.min(reuse.idle_timeout),
                    None => return,
                }
            }
            None => reuse.idle_timeout,
        };
        connection.reused = true;
        // An idle connection keeps no more than a read's room (a large body's reads may have grown it).
        if connection.read.capacity() > READ_SIZE {
            connection.read = BytesMut::new();
        }
        self.idle.give_back(key, connection, keep_for);
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
        request: Request<ProxyBody>,
        connect: Connect,
        tls: Option<UpstreamTls>,
        reuse: Reuse,
    ) -> impl Future<Output = Result<Response<UpstreamBody>, SendError>> + Send + 'a {
        async move {
            let key = PoolKey::new(address, tls.as_ref());
            let (mut parts, mut body) = request.into_parts();
            while let Some(connection) = self.idle.take(&key) {
                match self.exchange(connection, &mut parts, body, &key, reuse).await {
                    Ok(response) => return Ok(response),
                    Err(Failed::Unsent(unsent)) => body = unsent,
                    Err(Failed::Failed(error)) => return Err(error),
                }
            }
            // Boxed: a new connection's state, which requests sent on pooled connections never need.
            let opened = Box::pin(open(address, &self.sockets, connect, tls.as_ref())).await?;
            match self.exchange(Connection::new(opened), &mut parts, body, &key, reuse).await {
                Ok(response) => Ok(response),
                Err(Failed::Unsent(_)) => Err(SendError::Request("the new connection closed at once".into())),
                Err(Failed::Failed(error)) => Err(error),
            }
        }
    }

    /// One request and its response's head on `connection`; the response's body reads the rest.
    async fn exchange(
        self: &Arc<Self>,
        mut connection: Connection,
        parts: &mut http::request::Parts,
        body: ProxyBody,
        key: &PoolKey,
        reuse: Reuse,
    ) -> Result<Response<UpstreamBody>, Failed> {
        connection.served = connection.served.saturating_add(1);
        let shape = if body.is_end_stream() {
            BodyShape::Empty
        } else {
            body.size_hint().exact().map_or(BodyShape::Unknown, BodyShape::Known)
        };
        let path = parts.uri.path_and_query().map_or("/", |path| path.as_str());
        let mut head = std::mem::take(&mut connection.head);
        let framing = head::write_request(&parts.method, path, &mut parts.headers, shape, &mut head);
        let written = write_all(&mut connection, &head).await;
        connection.head = head;
        match written {
            Ok(()) => {}
            Err((0, _)) if connection.reused => return Err(Failed::Unsent(body)),
            Err((_, error)) => return Err(Failed::Failed(SendError::Request(format!("writing the request: {error}")))),
        }
        let mut writing = (shape != BodyShape::Empty).then(|| RequestWriter::new(body, framing));
        // Whether the request went out whole: a connection whose request was cut short is never reused.
        let mut cut_short = false;
        let method = &parts.method;
        let response = poll_fn(|cx| {
            if let Some(writer) = &mut writing {
                match writer.poll_write(cx, &mut connection) {
                    Poll::Ready(Ok(())) => writing = None,
                    // The client's body failing fails the request; the upstream not taking it may mean it has
                    // answered already.
                    Poll::Ready(Err(body::WriteError::Io(error))) => {
                        tracing::debug!(%error, "request body not sent whole; awaiting the response");
                        writing = None;
                        cut_short = true;
                    }
                    Poll::Ready(Err(error)) => return Poll::Ready(Err(SendError::Request(error.to_string()))),
                    Poll::Pending => {}
                }
            }
            loop {
                match head::read_response(&mut connection.read, method) {
                    Ok(Some(head)) => return Poll::Ready(Ok(head)),
                    Ok(None) => {}
                    Err(error) => return Poll::Ready(Err(SendError::Protocol(error.to_string()))),
                }
                match std::task::ready!(connection.poll_fill(cx)) {
                    Ok(0) => {
                        let error = "the upstream closed the connection before a response".to_owned();
                        return Poll::Ready(Err(SendError::Request(error)));
                    }
                    Ok(_) => {}
                    Err(error) => {
                        return Poll::Ready(Err(SendError::Request(format!("reading the response: {error}"))))
                    }
                }
            }
        })
        .await
        .map_err(Failed::Failed)?;
        let head::ResponseHead { parts, framing, keep_alive } = response;
        let keep_alive = keep_alive && !cut_short;
        let body = ResponseBody::new(connection, framing, writing, keep_alive, (self.clone(), key.clone(), reuse));
        Ok(Response::from_parts(parts, UpstreamBody::native(body)))
    }
}

/// Writes `bytes` to the connection whole, and flushes it; on failure, how much was written.
async fn write_all(connection: &mut Connection, bytes: &[u8]) -> Result<(), (usize, std::io::Error)> {
    let mut written = 0;
    poll_fn(|cx| {
        while written < bytes.len() {
            match std::task::ready!(Pin::new(&mut connection.io).poll_write(cx, &bytes[written..])) {
                Ok(0) => return Poll::Ready(Err((written, std::io::ErrorKind::WriteZero.into()))),
                Ok(n) => written += n,
                Err(error) => return Poll::Ready(Err((written, error))),
            }
        }
        Pin::new(&mut connection.io).poll_flush(cx).map_err(|error| (written, error))
    })
    .await
}
