//! The byte relay: every decided byte stream — TLS passed through by SNI, `tcp` routes, TCP passed through in
//! ALLOW_ANY, `CONNECT` tunnels, upgraded (WebSocket) connections — is joined end to end here until either side
//! ends, neither has sent a byte for the idle timeout (a client cannot hold a connection slot, two sockets and
//! a task by going quiet), or the connection has lived as long as its DestinationRule lets it
//! (`maxConnectionDuration`).
//!
//! Three engines (`--relay-engine`; bench/README.md has the figures behind the default):
//! - **splice** (the default for two sockets): splice(2) through a pipe each way — the bytes stay in the kernel's
//!   pages, the proxy is woken per batch but copies nothing — once a direction moves more than a small buffer at a
//!   time (until then it is copied: small exchanges do not pay for a pipe);
//! - **copy**: read and written by the proxy — for streams that are not plain sockets (terminated TLS, hyper's
//!   upgraded connections), and for sockets on request: each direction's buffer starts at 16 KiB and doubles
//!   with every read that fills it, up to 128 KiB (more throughput on one fast connection than splice here, at
//!   more of the proxy's CPU per GB);
//! - **kernel**: the datapath's eBPF stream verdict hands each segment from socket to socket, within a bound of
//!   bytes the far end has not acknowledged; past it the proxy moves them (`kernel.rs`).
//!
//! All pass a half-close on after the bytes before it, and a reset as a reset; what either side can make the
//! relay hold is bounded by the socket buffers and one pipe (or buffer, or the verdict's bound) each way.

mod copy;
mod kernel;
mod splice;

use std::{
    future::Future,
    io,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::Duration,
};

use crate::datapath::RelayMaps;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    time::Instant,
};

/// How the bytes of a relayed connection move.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Engine {
    /// splice(2) through a pipe each way.
    #[default]
    Splice,
    /// Read and written by the proxy.
    Copy,
    /// Handed from socket to socket by the datapath's stream verdict, within a bound of unacknowledged bytes.
    Kernel,
}

impl Engine {
    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Splice => "splice",
            Engine::Copy => "copy",
            Engine::Kernel => "kernel",
        }
    }
}

/// The bytes each side sent, how the relay ended, and which engine carried it.
#[derive(Debug, PartialEq, Eq)]
pub struct Relayed {
    /// Bytes the first side sent (received by the proxy from it).
    pub from_first: u64,
    /// Bytes the second side sent.
    pub from_second: u64,
    pub ended: Ended,
    pub engine: Engine,
}

/// How a relay ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// Both sides ended their streams.
    Closed,
    /// Neither side sent anything for the idle timeout.
    Idle,
    /// A side failed (reset, or a write to a peer that had gone).
    Failed(io::ErrorKind),
    /// It lasted as long as it may (`maxConnectionDuration`).
    Lifetime,
}

impl Ended {
    fn from_outcome<T>(outcome: Result<io::Result<T>, Ended>) -> Ended {
        match outcome {
            Ok(Ok(_)) => Ended::Closed,
            Ok(Err(error)) => Ended::Failed(error.kind()),
            Err(stopped) => stopped,
        }
    }
}

/// How long a relay may last: until neither side has sent a byte for `idle`, and `lifetime` at most.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    pub idle: Duration,
    pub lifetime: Option<Duration>,
}

impl Bounds {
    /// Bounded by the idle timeout alone.
    pub fn idle(idle: Duration) -> Bounds {
        Bounds { idle, lifetime: None }
    }
}

/// The relay as configured: the engine for socket pairs.
#[derive(Clone, Copy, Default)]
pub struct Relay {
    engine: Engine,
    /// The datapath's relay maps, for the kernel engine (they live as long as the agent).
    kernel: Option<&'static RelayMaps>,
}

impl Relay {
    /// A relay with `engine`; the kernel engine only with [`Relay::with_kernel`], else splice.
    pub fn new(engine: Engine) -> Relay {
        Relay { engine: if engine == Engine::Kernel { Engine::Splice } else { engine }, kernel: None }
    }

    /// The kernel engine, over the datapath's relay maps.
    pub fn with_kernel(maps: &'static RelayMaps) -> Relay {
        Relay { engine: Engine::Kernel, kernel: Some(maps) }
    }

    /// The engine socket pairs get.
    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// Relays between two TCP sockets with the configured engine. On a failure (a reset, a write to a closed
    /// peer), both are set to reset when dropped: the side still open learns of it as a reset too.
    pub async fn sockets(&self, first: &mut TcpStream, second: &mut TcpStream, bounds: Bounds) -> Relayed {
        let relayed = match (self.engine, self.kernel) {
            (Engine::Kernel, Some(maps)) => match kernel::join(maps, first, second, bounds).await {
                Ok(relayed) => relayed,
                Err(moved) => {
                    let spliced = joined(first, second, bounds, Engine::Splice).await;
                    let (from_first, from_second) =
                        (spliced.from_first + moved.from_first, spliced.from_second + moved.from_second);
                    Relayed { from_first, from_second, ..spliced }
                }
            },
            (engine, _) => joined(first, second, bounds, engine).await,
        };
        if matches!(relayed.ended, Ended::Failed(_)) {
            crate::proxy::tcp::reset(first);
            crate::proxy::tcp::reset(second);
        }
        relayed
    }

    /// Relays between two streams that are not both plain sockets, by copying.
    pub async fn streams<A, B>(first: &mut A, second: &mut B, bounds: Bounds) -> Relayed
    where
        A: AsyncRead + AsyncWrite + Unpin + ?Sized,
        B: AsyncRead + AsyncWrite + Unpin + ?Sized,
    {
        copy::join(first, second, bounds).await
    }
}

/// Two sockets relayed with `engine`, a task per direction.
async fn joined(first: &mut TcpStream, second: &mut TcpStream, bounds: Bounds, engine: Engine) -> Relayed {
    let activity = Activity::new();
    let (from_first, from_second) = (AtomicU64::new(0), AtomicU64::new(0));
    let piped = AtomicBool::new(false);
    let ((first_read, first_write), (second_read, second_write)) = (first.split(), second.split());
    let both = async {
        match engine {
            // The kernel engine reaches here only when the datapath could not take the flow.
            Engine::Splice | Engine::Kernel => tokio::try_join!(
                splice::direction(first_read, second_write, &from_first, &piped, &activity),
                splice::direction(second_read, first_write, &from_second, &piped, &activity),
            ),
            Engine::Copy => tokio::try_join!(
                copy::direction(first_read, second_write, &from_first, &activity),
                copy::direction(second_read, first_write, &from_second, &activity),
            ),
        }
    };
    let outcome = activity.within(bounds, both).await;
    Relayed {
        from_first: from_first.load(Ordering::Relaxed),
        from_second: from_second.load(Ordering::Relaxed),
        ended: Ended::from_outcome(outcome),
        // A flow neither of whose directions moved enough for a pipe was copied.
        engine: if piped.load(Ordering::Relaxed) { Engine::Splice } else { Engine::Copy },
    }
}

/// When bytes last moved either way.
struct Activity {
    started: Instant,
    /// Milliseconds from `started` to the last byte moved.
    last: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity { started: Instant::now(), last: AtomicU64::new(0) }
    }

    fn moved(&self) {
        self.last.store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn quiet_for(&self) -> Duration {
        self.started.elapsed().saturating_sub(Duration::from_millis(self.last.load(Ordering::Relaxed)))
    }

    /// `work`'s output; `Ended::Idle` once nothing moved for the idle timeout, `Ended::Lifetime` once it has
    /// run for its lifetime.
    async fn within<F: Future>(&self, bounds: Bounds, work: F) -> Result<F::Output, Ended> {
        tokio::pin!(work);
        let end = bounds.lifetime.map(|lifetime| self.started + lifetime);
        loop {
            let left = bounds.idle.checked_sub(self.quiet_for()).filter(|left| !left.is_zero()).ok_or(Ended::Idle)?;
            let wake = Instant::now() + left;
            let (wake, ended) = match end {
                Some(end) if end <= wake => (end, Ended::Lifetime),
                _ => (wake, Ended::Idle),
            };
            tokio::select! {
                output = &mut work => return Ok(output),
                () = tokio::time::sleep_until(wake) => if ended == Ended::Lifetime {
                    return Err(Ended::Lifetime);
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;

    /// A connected pair of loopback sockets: (the side a peer holds, the side the relay holds).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (connected, accepted) = tokio::join!(TcpStream::connect(address), listener.accept());
        (connected.unwrap(), accepted.unwrap().0)
    }

    /// Relays between a client and a server with `engine`: the client sends `up` bytes and ends its stream; the
    /// server reads them all, answers `down` bytes and ends. What each read, and the relay's account.
    async fn exchange(engine: Engine, up: usize, down: usize) -> (usize, usize, Relayed) {
        let (up, down, relayed, _) = exchange_noting_unsent_limits(engine, up, down).await;
        (up, down, relayed)
    }

    /// `exchange`, with the relay's two sockets' `TCP_NOTSENT_LOWAT` once it ended (server side, client side).
    async fn exchange_noting_unsent_limits(
        engine: Engine,
        up: usize,
        down: usize,
    ) -> (usize, usize, Relayed, [u32; 2]) {
        let (mut client, mut proxy_client_side) = pair().await;
        let (mut proxy_server_side, mut server) = pair().await;
        let relaying = tokio::spawn(async move {
            let relayed = Relay::new(engine)
                .sockets(&mut proxy_client_side, &mut proxy_server_side, Bounds::idle(Duration::from_secs(60)))
                .await;
            let limit = |socket: &TcpStream| socket2::SockRef::from(socket).tcp_notsent_lowat().unwrap();
            (relayed, [limit(&proxy_server_side), limit(&proxy_client_side)])
        });
        let serving = tokio::spawn(async move {
            let mut received = Vec::new();
            server.read_to_end(&mut received).await.unwrap();
            server.write_all(&vec![7u8; down]).await.unwrap();
            received.len()
        });
        client.write_all(&vec![5u8; up]).await.unwrap();
        client.shutdown().await.unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        let (relayed, limits) = relaying.await.unwrap();
        (serving.await.unwrap(), answer.len(), relayed, limits)
    }

    /// What every relayed connection's task holds for its relay, whichever engine carries it, and copies whole as
    /// the task is made: buffers belong on the heap, where only the connections that use them pay (bench/README.md's
    /// table of choices has what one array cost).
    #[tokio::test]
    async fn a_relays_own_state_is_a_few_kilobytes() {
        let ((mut first, _), (mut second, _)) = (pair().await, pair().await);
        let relay = Relay::new(Engine::Splice);
        let relaying = relay.sockets(&mut first, &mut second, Bounds::idle(Duration::from_secs(1)));
        let size = std::mem::size_of_val(&relaying);
        assert!(size <= 6 * 1024, "a relay's future is {size} bytes");
    }

    #[test]
    fn the_kernel_engine_is_had_only_with_the_datapaths_maps() {
        assert_eq!(Relay::new(Engine::Kernel).engine(), Engine::Splice);
        assert_eq!(Relay::new(Engine::Copy).engine(), Engine::Copy);
    }

    #[tokio::test]
    async fn a_transfer_is_spliced_and_a_short_exchange_copied_with_every_byte_counted() {
        let (up, down, relayed) = exchange(Engine::Splice, 3 << 20, 5 << 20).await;
        assert_eq!((up, down), (3 << 20, 5 << 20));
        assert_eq!(
            relayed,
            Relayed { from_first: 3 << 20, from_second: 5 << 20, ended: Ended::Closed, engine: Engine::Splice }
        );

        let (up, down, relayed) = exchange(Engine::Splice, 300, 2000).await;
        assert_eq!((up, down), (300, 2000));
        assert_eq!(relayed, Relayed { from_first: 300, from_second: 2000, ended: Ended::Closed, engine: Engine::Copy });

        let (up, down, relayed) = exchange(Engine::Copy, 1 << 20, 1 << 20).await;
        assert_eq!((up, down, relayed.engine), (1 << 20, 1 << 20, Engine::Copy));
    }

    #[tokio::test]
    async fn a_spliced_direction_keeps_the_unsent_queue_it_writes_to_short() {
        let kernel_default = pair().await.0;
        let default = socket2::SockRef::from(&kernel_default).tcp_notsent_lowat().unwrap();
        assert_ne!(default, splice::SPLICED_UNSENT_BYTES);

        // Both directions take a pipe: both sockets written to keep at most 128 KiB unsent.
        let (up, down, relayed, limits) = exchange_noting_unsent_limits(Engine::Splice, 3 << 20, 5 << 20).await;
        assert_eq!((up, down, relayed.engine), (3 << 20, 5 << 20, Engine::Splice));
        assert_eq!(limits, [splice::SPLICED_UNSENT_BYTES; 2]);

        // Only the answer is large: only the socket it is written to (the client's side) is limited.
        let (_, _, _, limits) = exchange_noting_unsent_limits(Engine::Splice, 300, 5 << 20).await;
        assert_eq!(limits, [default, splice::SPLICED_UNSENT_BYTES]);

        // Copied bytes are the proxy's own: nothing is limited.
        let (_, _, _, limits) = exchange_noting_unsent_limits(Engine::Copy, 3 << 20, 5 << 20).await;
        assert_eq!(limits, [default; 2]);
    }
}
