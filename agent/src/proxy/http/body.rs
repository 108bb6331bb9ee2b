//! The bodies the proxy passes along: a request body streamed upstream (counted, bounded in idleness), and
//! a response body that records its request when it ends.

use super::*;

/// A request body streamed upstream: counts the bytes it carries, and fails when the client sends nothing for
/// the stream idle timeout (a half-sent body holds the upstream connection no longer).
pub(super) struct Counted {
    pub(super) inner: Incoming,
    pub(super) bytes: Arc<AtomicU64>,
    pub(super) idle: Duration,
    /// When the client's silence ends the body; made at the first wait, moved on at each frame.
    pub(super) deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Counted {
    pub(super) fn new(inner: Incoming, bytes: Arc<AtomicU64>, idle: Duration) -> Counted {
        Counted { inner, bytes, idle, deadline: None }
    }
}

/// The error a streamed request body ends with when the client went silent.
#[derive(Debug, thiserror::Error)]
#[error("the client sent nothing of the request body for {0:?}")]
pub(super) struct BodyIdle(Duration);

impl Body for Counted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                if let Some(deadline) = &mut this.deadline {
                    deadline.as_mut().reset(tokio::time::Instant::now() + this.idle);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(other) => Poll::Ready(other.map(|result| result.map_err(BoxError::from))),
            Poll::Pending => {
                let idle = this.idle;
                let deadline = this.deadline.get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                match deadline.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(BoxError::from(BodyIdle(idle))))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that records its request when it ends, or when it is dropped unfinished.
pub(super) struct Recorded<B> {
    /// The cluster slot the request holds until its response has gone.
    pub(super) _slot: Option<OwnedSemaphorePermit>,
    pub(super) inner: B,
    pub(super) sent: u64,
    /// What a streamed request body carried.
    pub(super) received: Option<Arc<AtomicU64>>,
    pub(super) record: Option<Box<RequestRecord>>,
    pub(super) started: Instant,
    pub(super) telemetry: Arc<RequestTelemetry>,
}

impl<B> Recorded<B> {
    fn emit(&mut self) {
        if let Some(mut record) = self.record.take() {
            record.bytes_sent = self.sent;
            if let Some(received) = &self.received {
                record.bytes_received = record.bytes_received.max(received.load(Ordering::Relaxed));
            }
            record.duration = self.started.elapsed();
            self.telemetry.record(&record);
        }
    }
}

impl<B: Body<Data = Bytes, Error = BoxError> + Unpin> Body for Recorded<B> {
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

/// A `CONNECT` tunnel's or an upgraded connection's request, recorded once its bytes stop moving, as Envoy logs
/// such a stream when it ends: the bytes relayed each way, the whole duration and the relay engine.
pub(super) struct RecordedWhenRelayed {
    pub(super) record: Box<RequestRecord>,
    pub(super) started: Instant,
    pub(super) telemetry: Arc<RequestTelemetry>,
}

impl RecordedWhenRelayed {
    /// Records the request; `relayed` is None when the connection never switched (the upgrade failed).
    pub(super) fn ended(mut self, relayed: Option<&crate::proxy::relay::Relayed>) {
        if let Some(relayed) = relayed {
            self.record.bytes_received += relayed.from_first;
            self.record.bytes_sent += relayed.from_second;
            self.record.relay_engine = Some(relayed.engine.as_str());
        }
        self.record.duration = self.started.elapsed();
        self.telemetry.record(&self.record);
    }
}

impl<B> Drop for Recorded<B> {
    fn drop(&mut self) {
        self.emit();
    }
}
