//! The copy engine: bytes read into the proxy and written out again, with tokio. The engine for streams that are
//! not plain sockets (terminated TLS, hyper's upgraded connections), and the other engine for sockets, where each
//! direction's buffer grows with the flow.

use std::{
    io,
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    task::{Context, Poll},
};

use tokio::{
    io::{copy_bidirectional_with_sizes, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::tcp::{ReadHalf, WriteHalf},
};

use super::{Activity, Bounds, Ended, Engine, Relayed};

/// Each direction's buffer: a bulk transfer moves in reads and writes of up to this many bytes. Tokio's default
/// (8 KiB) takes four system calls where this takes one, and larger ones cost memory per relayed connection and
/// zeroing per join (bench/README.md has the figures). Allocated per direction when the join starts, freed when it
/// ends.
const RELAY_BUFFER: usize = 32 * 1024;

/// A socket pair's direction starts with this buffer: a handshake, a request and its answer fit.
pub const SMALL_FLOW_BYTES: usize = 16 * 1024;
/// A read that fills a socket pair's buffer doubles it, up to this: a bulk transfer then moves in reads and
/// writes of 128 KiB, which on one fast connection the receiving host takes in fewer, larger batches
/// (bench/README.md, the relay section, has the figures against 32 KiB and against splice).
const BULK_BUFFER_BYTES: usize = 128 * 1024;

/// Moves bytes from `from` to `to` until `from` ends, then shuts `to`'s sending side (the half-close is passed
/// on once every byte before it was).
pub async fn direction(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    moved: &AtomicU64,
    activity: &Activity,
) -> io::Result<()> {
    let mut buffer = Vec::with_capacity(SMALL_FLOW_BYTES);
    while let Some(read) = pass_on(&mut from, &mut to, &mut buffer, moved, activity).await? {
        grow_if_filled(&mut buffer, read);
    }
    Ok(())
}

/// Doubles `buffer`'s room when a read of `read` bytes filled it, up to `BULK_BUFFER_BYTES`.
fn grow_if_filled(buffer: &mut Vec<u8>, read: usize) {
    if read == buffer.capacity() && read < BULK_BUFFER_BYTES {
        // Room counted from an empty buffer, not from what the read left in it: 16, 32, 64, 128 KiB.
        buffer.clear();
        buffer.reserve_exact((read * 2).min(BULK_BUFFER_BYTES));
    }
}

/// One read from `from` into `buffer`'s room, written on to `to`: how many bytes, or `None` once `from` has
/// ended and `to`'s sending side was shut.
pub async fn pass_on(
    from: &mut ReadHalf<'_>,
    to: &mut WriteHalf<'_>,
    buffer: &mut Vec<u8>,
    moved: &AtomicU64,
    activity: &Activity,
) -> io::Result<Option<usize>> {
    // Read through tokio's `AsyncRead`, which takes a short read as the socket drained (epoll is edge-triggered):
    // an exchange of a few segments costs no read that only answers EAGAIN. Not zeroed: reads fill it.
    buffer.clear();
    let read = from.read_buf(buffer).await?;
    if read == 0 {
        shutdown_sending(to.as_ref());
        return Ok(None);
    }
    to.write_all(buffer).await?;
    moved.fetch_add(read as u64, Ordering::Relaxed);
    activity.moved();
    Ok(Some(read))
}

/// Passes a half-close on: the peer reads the end of the stream once it has read everything before it.
pub fn shutdown_sending(stream: &tokio::net::TcpStream) {
    let _ = socket2::SockRef::from(stream).shutdown(std::net::Shutdown::Write);
}

/// Relays bytes both ways between `first` and `second` until either closes or fails, both are silent for the idle
/// timeout, or the relay has lasted its lifetime.
pub async fn join<A, B>(first: &mut A, second: &mut B, bounds: Bounds) -> Relayed
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let activity = Activity::new();
    let mut first = Watched { inner: first, read: 0, activity: &activity };
    let mut second = Watched { inner: second, read: 0, activity: &activity };
    let copying = copy_bidirectional_with_sizes(&mut first, &mut second, RELAY_BUFFER, RELAY_BUFFER);
    let ended = Ended::from_outcome(activity.within(bounds, copying).await);
    Relayed { from_first: first.read, from_second: second.read, ended, engine: Engine::Copy }
}

/// A stream that counts what is read from it and notes when anything last moved either way.
struct Watched<'a, T: ?Sized> {
    inner: &'a mut T,
    read: u64,
    activity: &'a Activity,
}

impl<T: AsyncRead + Unpin + ?Sized> AsyncRead for Watched<'_, T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut *self.inner).poll_read(cx, buf);
        let read = (buf.filled().len() - before) as u64;
        if read > 0 {
            self.read += read;
            self.activity.moved();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin + ?Sized> AsyncWrite for Watched<'_, T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut *self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(written)) if written > 0) {
            self.activity.moved();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

    use super::*;
    use std::time::Duration;

    #[test]
    fn a_buffer_doubles_with_each_read_that_fills_it_up_to_128_kib() {
        let mut buffer = Vec::with_capacity(SMALL_FLOW_BYTES);
        let mut rooms = vec![buffer.capacity()];
        for _ in 0..5 {
            // A read that fills the buffer.
            buffer.clear();
            let read = buffer.capacity();
            buffer.resize(read, 0);
            grow_if_filled(&mut buffer, read);
            rooms.push(buffer.capacity());
        }
        assert_eq!(rooms, [16, 32, 64, 128, 128, 128].map(|kib| kib * 1024));
        // A short read leaves the room as it is.
        buffer.truncate(1000);
        grow_if_filled(&mut buffer, 1000);
        assert_eq!(buffer.capacity(), BULK_BUFFER_BYTES);
    }

    #[tokio::test(start_paused = true)]
    async fn a_join_ends_when_both_sides_are_silent_for_the_idle_timeout() {
        let (mut client, mut proxy_client_side) = duplex(1024);
        let (mut proxy_upstream_side, mut upstream) = duplex(1024);
        let joining = tokio::spawn(async move {
            join(&mut proxy_client_side, &mut proxy_upstream_side, Bounds::idle(Duration::from_secs(60))).await
        });
        client.write_all(b"hello").await.unwrap();
        let mut echoed = [0u8; 5];
        upstream.read_exact(&mut echoed).await.unwrap();
        tokio::time::sleep(Duration::from_secs(50)).await;
        upstream.write_all(b"late").await.unwrap();
        client.read_exact(&mut [0u8; 4]).await.unwrap();
        tokio::time::sleep(Duration::from_secs(50)).await;
        assert!(!joining.is_finished(), "traffic 50 s ago keeps it open");

        tokio::time::sleep(Duration::from_secs(11)).await;
        let joined = joining.await.unwrap();
        assert_eq!(joined, Relayed { from_first: 5, from_second: 4, ended: Ended::Idle, engine: Engine::Copy });
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_join_ends_at_its_lifetime() {
        let (mut client, mut proxy_client_side) = duplex(1024);
        let (mut proxy_upstream_side, mut upstream) = duplex(1024);
        let bounds = Bounds { idle: Duration::from_secs(60), lifetime: Some(Duration::from_secs(30)) };
        let joining = tokio::spawn(async move { join(&mut proxy_client_side, &mut proxy_upstream_side, bounds).await });
        // A byte every 10 s: never idle.
        for _ in 0..2 {
            client.write_all(b"x").await.unwrap();
            upstream.read_exact(&mut [0u8; 1]).await.unwrap();
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
        client.write_all(b"x").await.unwrap();
        upstream.read_exact(&mut [0u8; 1]).await.unwrap();
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert!(!joining.is_finished(), "29 s in, within its lifetime");
        tokio::time::sleep(Duration::from_secs(2)).await;
        let joined = joining.await.unwrap();
        assert_eq!(joined, Relayed { from_first: 3, from_second: 0, ended: Ended::Lifetime, engine: Engine::Copy });
    }

    #[tokio::test]
    async fn a_join_ends_with_its_counts_when_a_side_closes() {
        let (mut client, mut proxy_client_side) = duplex(1024);
        let (mut proxy_upstream_side, mut upstream) = duplex(1024);
        let joining = tokio::spawn(async move {
            join(&mut proxy_client_side, &mut proxy_upstream_side, Bounds::idle(Duration::from_secs(60))).await
        });
        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap();
        let mut received = Vec::new();
        upstream.read_to_end(&mut received).await.unwrap();
        upstream.write_all(b"answer").await.unwrap();
        drop(upstream);
        let joined = joining.await.unwrap();
        assert_eq!(joined, Relayed { from_first: 7, from_second: 6, ended: Ended::Closed, engine: Engine::Copy });
    }
}
