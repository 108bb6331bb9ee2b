//! The two bodies of an exchange on an upstream connection: the request's, written as it arrives (framed by
//! length or in chunks), and the response's, read straight from the connection by whoever polls it (the client's
//! connection) and decoded by its framing. The connection goes back to the pool only after both have ended, the
//! response read to its last byte and nothing more sent.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
};

use bytes::{Buf, Bytes};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::AsyncWrite;

use super::{
    chunked::{Chunked, Step},
    head::{RequestFraming, ResponseFraming},
    Connection, NativeHttp1Pool,
};
use crate::proxy::{
    http::{BoxError, ProxyBody},
    upstreams::{pool::PoolKey, Reuse},
};

/// A request body being written upstream.
pub(super) struct RequestWriter {
    body: ProxyBody,
    framing: RequestFraming,
    /// Bytes framed and not yet written.
    pending: VecDeque<Bytes>,
    /// Whether the body has ended (what is pending is all there is left).
    ended: bool,
    /// Whether bytes were written since the connection was last flushed (TLS holds them until it is).
    unflushed: bool,
}

/// Why a request body could not be sent whole.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WriteError {
    #[error("the request body failed: {0}")]
    Body(BoxError),
    #[error("the request body is longer than its Content-Length")]
    TooLong,
    #[error("the request body is shorter than its Content-Length")]
    TooShort,
    #[error("writing the request body upstream: {0}")]
    Io(#[from] std::io::Error),
}

const CRLF: Bytes = Bytes::from_static(b"\r\n");
const LAST_CHUNK: Bytes = Bytes::from_static(b"0\r\n\r\n");

impl RequestWriter {
    pub(super) fn new(body: ProxyBody, framing: RequestFraming) -> RequestWriter {
        RequestWriter { body, framing, pending: VecDeque::new(), ended: false, unflushed: false }
    }

    /// Writes what the body has, and waits for more; `Ready(Ok)` once all of it is written and flushed.
    pub(super) fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        connection: &mut Connection,
    ) -> Poll<Result<(), WriteError>> {
        loop {
            while let Some(front) = self.pending.front_mut() {
                let written = ready!(Pin::new(&mut connection.io).poll_write(cx, front))?;
                if written == 0 {
                    return Poll::Ready(Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into()));
                }
                self.unflushed = true;
                front.advance(written);
                if front.is_empty() {
                    self.pending.pop_front();
                }
            }
            if self.unflushed {
                ready!(Pin::new(&mut connection.io).poll_flush(cx))?;
                self.unflushed = false;
            }
            if self.ended {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                None => self.end()?,
                Some(Err(error)) => return Poll::Ready(Err(WriteError::Body(error))),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => self.frame_data(data)?,
                    // Trailers end a chunked body (sent only as the request's Trailer header announces: none
                    // are, as hyper's client sends them); a body framed by length cannot carry them.
                    Err(_trailers) => self.end()?,
                },
            }
        }
    }

    fn frame_data(&mut self, data: Bytes) -> Result<(), WriteError> {
        if data.is_empty() {
            return Ok(());
        }
        match &mut self.framing {
            RequestFraming::Length(remaining) => {
                *remaining = remaining.checked_sub(data.len() as u64).ok_or(WriteError::TooLong)?;
                self.pending.push_back(data);
            }
            RequestFraming::Chunked => {
                self.pending.push_back(Bytes::from(format!("{:X}\r\n", data.len())));
                self.pending.push_back(data);
                self.pending.push_back(CRLF);
            }
        }
        Ok(())
    }

    fn end(&mut self) -> Result<(), WriteError> {
        self.ended = true;
        match self.framing {
            RequestFraming::Length(0) => Ok(()),
            RequestFraming::Length(_) => Err(WriteError::TooShort),
            RequestFraming::Chunked => {
                self.pending.push_back(LAST_CHUNK);
                Ok(())
            }
        }
    }
}

/// How a response body is decoded.
enum Decoder {
    Length(u64),
    Chunked(Chunked),
    UntilClose,
}

/// A response body read from its upstream connection. Read to its end, it gives the connection back to the pool
/// when the exchange left it reusable; dropped before then, it closes it.
pub(crate) struct ResponseBody {
    /// `None` once the body has ended (the connection given back or closed).
    connection: Option<Connection>,
    decoder: Decoder,
    /// The rest of the request body, while it is being written: an upstream may answer before reading it all.
    writing: Option<RequestWriter>,
    /// Whether the connection may carry another exchange once this one has ended.
    reusable: bool,
    returning: Option<(Arc<NativeHttp1Pool>, PoolKey, Reuse)>,
    /// The address the connection left from.
    local: Option<SocketAddr>,
}

/// Why a response body ended early or was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    #[error("the upstream closed the connection before the end of the response body")]
    Incomplete,
    #[error(transparent)]
    Chunked(#[from] super::chunked::ChunkError),
    #[error("reading the response body: {0}")]
    Io(#[from] std::io::Error),
}

impl ResponseBody {
    pub(super) fn new(
        connection: Connection,
        framing: ResponseFraming,
        writing: Option<RequestWriter>,
        keep_alive: bool,
        returning: (Arc<NativeHttp1Pool>, PoolKey, Reuse),
    ) -> ResponseBody {
        let decoder = match framing {
            ResponseFraming::Length(length) => Decoder::Length(length),
            ResponseFraming::Chunked => Decoder::Chunked(Chunked::new()),
            ResponseFraming::UntilClose => Decoder::UntilClose,
        };
        let reusable = keep_alive && framing != ResponseFraming::UntilClose;
        let local = connection.local;
        let returning = Some(returning);
        let mut body = ResponseBody { connection: Some(connection), decoder, writing, reusable, returning, local };
        if matches!(body.decoder, Decoder::Length(0)) {
            body.end();
        }
        body
    }

    pub(crate) fn upstream_local(&self) -> Option<SocketAddr> {
        self.local
    }

    /// The body has been read: the connection goes back to the pool if nothing of this exchange is left on it —
    /// the request written whole, no byte read past the response — else it is closed.
    fn end(&mut self) {
        let connection = self.connection.take();
        if let (Some(connection), true, None) = (connection, self.reusable, &self.writing) {
            if connection.read.is_empty() {
                if let Some((pool, key, reuse)) = self.returning.take() {
                    pool.give_back(key, connection, reuse);
                }
            }
        }
        self.writing = None;
    }

    /// Fails the body: the connection is closed.
    fn fail(&mut self, error: impl Into<BoxError>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.connection = None;
        self.writing = None;
        Poll::Ready(Some(Err(error.into())))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            let Some(connection) = &mut this.connection else { return Poll::Ready(None) };
            // The request body goes on while the response comes; if the upstream stops taking it, the response
            // still comes, and the connection is not reused.
            if let Some(writing) = &mut this.writing {
                match writing.poll_write(cx, connection) {
                    Poll::Ready(Ok(())) => this.writing = None,
                    Poll::Ready(Err(error)) => {
                        tracing::debug!(%error, "request body not sent whole; the response goes on");
                        this.writing = None;
                        this.reusable = false;
                    }
                    Poll::Pending => {}
                }
            }
            let step = match &mut this.decoder {
                Decoder::Length(remaining) => {
                    if connection.read.is_empty() {
                        None
                    } else {
                        let take = usize::try_from(*remaining).unwrap_or(usize::MAX).min(connection.read.len());
                        *remaining -= take as u64;
                        let data = connection.read.split_to(take).freeze();
                        Some(Step::Data(data))
                    }
                }
                Decoder::Chunked(chunked) => match chunked.step(&mut connection.read) {
                    Ok(Step::More) => None,
                    Ok(step) => Some(step),
                    Err(error) => return this.fail(error),
                },
                Decoder::UntilClose if connection.read.is_empty() => None,
                Decoder::UntilClose => Some(Step::Data(connection.read.split().freeze())),
            };
            match step {
                Some(Step::Data(data)) => {
                    if matches!(this.decoder, Decoder::Length(0)) {
                        this.end();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Step::End(trailers)) => {
                    this.end();
                    return Poll::Ready(trailers.map(|trailers| Ok(Frame::trailers(trailers))));
                }
                Some(Step::More) | None => {}
            }
            match ready!(connection.poll_fill(cx)) {
                Ok(0) if matches!(this.decoder, Decoder::UntilClose) => {
                    this.reusable = false;
                    this.end();
                    return Poll::Ready(None);
                }
                Ok(0) => return this.fail(ReadError::Incomplete),
                Ok(_) => {}
                Err(error) => return this.fail(ReadError::Io(error)),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.connection.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder {
            Decoder::Length(remaining) => SizeHint::with_exact(remaining),
            _ => SizeHint::default(),
        }
    }
}
