//! Sluice's HTTP/1.1 response reading held against hyper's client, the reference it follows: the same bytes from
//! an upstream, read by both, must give the same status, headers, body and trailers, or be refused by both. The
//! fuzz target `upstream_response` feeds it arbitrary responses.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{HeaderMap, Method, Request};
use http_body_util::{BodyExt, Empty};
use hyper::body::Body;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{Connection, NativeHttp1Pool};
use crate::proxy::{
    http::ProxyBody,
    local_destinations::LocalDestinations,
    tcp::{SourceAddresses, UpstreamSockets},
    upstreams::{pool::PoolKey, Opened},
};

/// What a client made of a response: its status, headers, body and trailers, or `None` where it refused it.
#[derive(Debug, PartialEq, Eq)]
pub struct Reading {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
}

/// An upstream that, once sent a request, answers `bytes`, at most `piece` at a time, then closes; what it is
/// sent is dropped.
struct Scripted {
    bytes: Bytes,
    piece: usize,
    /// Whether a request has arrived (an upstream answering before that is a client's error, not its reading).
    asked: bool,
    waiting: Option<std::task::Waker>,
}

impl AsyncRead for Scripted {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if !self.asked {
            self.waiting = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = self.piece.min(self.bytes.len()).min(buf.remaining());
        let piece = self.bytes.split_to(n);
        buf.put_slice(&piece);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Scripted {
    fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.asked = true;
        if let Some(waiting) = self.waiting.take() {
            waiting.wake();
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn request(method: &Method) -> Request<ProxyBody> {
    let mut request = Request::new(Empty::new().map_err(|never| match never {}).boxed());
    *request.method_mut() = method.clone();
    *request.uri_mut() = http::Uri::from_static("/");
    request.headers_mut().insert(http::header::HOST, http::HeaderValue::from_static("upstream.test"));
    request
}

/// The body read to its end: its bytes and trailers.
async fn collect<B>(body: B) -> Option<(Bytes, Option<HeaderMap>)>
where
    B: Body<Data = Bytes>,
{
    let collected = body.collect().await.ok()?;
    let trailers = collected.trailers().cloned();
    Some((collected.to_bytes(), trailers))
}

/// `response` read as the answer to a `method` request by Sluice's code, and by hyper's client: both readings.
/// The upstream sends it `piece` bytes at a time.
pub fn both_readings(method: &Method, response: &[u8], piece: usize) -> (Option<Reading>, Option<Reading>) {
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread().build() else { return (None, None) };
    let upstream =
        || Scripted { bytes: Bytes::copy_from_slice(response), piece: piece.max(1), asked: false, waiting: None };
    let native = runtime.block_on(async {
        let local = Arc::new(LocalDestinations::new(Vec::new(), Default::default()));
        let pool = Arc::new(NativeHttp1Pool::new(UpstreamSockets::new(SourceAddresses::default(), local)));
        let key = PoolKey::new(([192, 0, 2, 1], 80).into(), None);
        let (mut parts, body) = request(method).into_parts();
        let connection = Connection::new(Opened { io: Box::new(upstream()), local: None });
        let response = pool.exchange(connection, &mut parts, body, &key, Default::default()).await.ok()?;
        let (parts, body) = response.into_parts();
        let (body, trailers) = collect(body).await?;
        Some(Reading { status: parts.status.as_u16(), headers: parts.headers, body, trailers })
    });
    let hyper = runtime.block_on(async {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(upstream())).await.ok()?;
        let driven = tokio::spawn(async move {
            let _ = connection.with_upgrades().await;
        });
        let response = sender.send_request(request(method)).await;
        let reading = async {
            let (parts, body) = response.ok()?.into_parts();
            // A switch of protocols no upgrade asked for is refused by Sluice.
            if parts.status == http::StatusCode::SWITCHING_PROTOCOLS {
                return None;
            }
            let (body, trailers) = collect(body).await?;
            let mut headers = parts.headers;
            // Sluice drops a length that Transfer-Encoding overrides (a body that has one), as a proxy must.
            let bodiless = *method == Method::HEAD || matches!(parts.status.as_u16(), 204 | 304);
            if headers.contains_key(http::header::TRANSFER_ENCODING) && !bodiless {
                headers.remove(http::header::CONTENT_LENGTH);
            }
            Some(Reading { status: parts.status.as_u16(), headers, body, trailers })
        }
        .await;
        driven.abort();
        reading
    });
    (native, hyper)
}
