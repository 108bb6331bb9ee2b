//! When a client connection has nothing in progress: it is closed gracefully once it has been so for the idle
//! timeout (Envoy's `idle_timeout`), and before its first request once the header timeout passes — a client that
//! opens HTTP/2 with a bare preface, or keeps a connection open and silent, does not hold a connection place
//! for ever.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use hyper::server::conn;

/// A monotonic clock read cheaply (to a few milliseconds): for bookkeeping on every request.
pub fn coarse_now() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE).map(Duration::from).unwrap_or_default()
}

/// What one client connection has in progress, and since when it has had nothing.
#[derive(Debug)]
pub struct Activity {
    in_flight: AtomicUsize,
    /// When the last request ended (or the connection opened), in milliseconds of `coarse_now`.
    quiet_since: AtomicU64,
    /// Requests begun on the connection.
    requests: AtomicU64,
}

/// A request in progress on its connection; ended when dropped.
pub struct InProgress(Arc<Activity>);

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.quiet_since.store(coarse_now().as_millis() as u64, Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Activity {
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            in_flight: AtomicUsize::new(0),
            quiet_since: AtomicU64::new(coarse_now().as_millis() as u64),
            requests: AtomicU64::new(0),
        })
    }

    /// Notes a request begun; it is in progress until the returned guard drops.
    pub fn begin(self: &Arc<Self>) -> InProgress {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        InProgress(self.clone())
    }

    /// How long the connection has had nothing in progress; `None` while a request is.
    fn quiet_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let since = Duration::from_millis(self.quiet_since.load(Ordering::Relaxed));
        Some(coarse_now().saturating_sub(since))
    }
}

/// A served connection that can be asked to finish what it has in progress and close (HTTP/2: GOAWAY).
pub trait Graceful: Future {
    fn shut_down(self: Pin<&mut Self>);
}

impl<I, S, E, B> Graceful for conn::http2::Connection<I, S, E>
where
    conn::http2::Connection<I, S, E>: Future,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn shut_down(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S, B> Graceful for conn::http1::UpgradeableConnection<I, S>
where
    conn::http1::UpgradeableConnection<I, S>: Future,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn shut_down(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// How long a connection asked to close may take to finish before it is dropped (its socket closed).
const CLOSING_GRACE: Duration = Duration::from_secs(1);
/// Once the drain has closed the listeners, how long an HTTP/1.1 connection may be quiet before it is closed: a
/// client that connected just before has this long to send its request, which is then served.
const DRAINED_QUIET: Duration = Duration::from_secs(1);

/// What the drain does to a connection when it reaches it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum OnDrain {
    /// HTTP/2: GOAWAY at once (the client knows which of its streams were taken, and sends the others elsewhere).
    GoAway,
    /// HTTP/1.1: closed once quiet for a moment (each response already asked the client to close).
    CloseWhenQuiet,
}

/// Serves `connection` until it ends, or until it has had nothing in progress for `idle` (`first_request` before
/// its first request): then it is shut down gracefully, and dropped if it has not ended within a second. When
/// `drained` completes, the drain reaches it as `on_drain` says, and what it has in flight may finish (the
/// agent's drain bounds how long).
pub async fn serve_until_idle<C: Graceful>(
    connection: C,
    activity: &Activity,
    (first_request, idle): (Duration, Duration),
    (drained, on_drain): (impl Future<Output = ()>, OnDrain),
) -> Option<C::Output> {
    tokio::pin!(connection);
    tokio::pin!(drained);
    let mut draining = false;
    loop {
        let limit = if activity.requests.load(Ordering::Relaxed) == 0 { first_request } else { idle };
        let limit = if draining { limit.min(DRAINED_QUIET) } else { limit };
        let wait = match activity.quiet_for() {
            Some(quiet) if quiet >= limit => break,
            Some(quiet) => (limit - quiet).max(Duration::from_millis(10)),
            None => limit.max(Duration::from_millis(10)),
        };
        tokio::select! {
            ended = connection.as_mut() => return Some(ended),
            () = tokio::time::sleep(wait) => {}
            () = &mut drained, if !draining => {
                if on_drain == OnDrain::GoAway {
                    connection.as_mut().shut_down();
                    return Some(connection.await);
                }
                draining = true;
            }
        }
    }
    connection.as_mut().shut_down();
    tokio::time::timeout(CLOSING_GRACE, connection).await.ok()
}
