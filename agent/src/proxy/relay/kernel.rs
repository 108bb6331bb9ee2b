//! The kernel engine: once both sockets have joined the datapath's relay maps, its stream verdict
//! (ebpf/src/relay.rs) hands each arriving segment from socket to socket, and the proxy moves only what the verdict
//! leaves it — segments that came while the peer held more unacknowledged bytes than the verdict's bound, and every
//! one after them until the proxy has caught up. The proxy writes nothing on before the peer has taken all the
//! verdict handed it, so the two paths never reorder a stream.
#![expect(
    unsafe_code,
    reason = "SO_COOKIE, TCP_INFO's byte counts and SIOCOUTQ have no safe wrapper in nix or socket2"
)]

use std::{
    io,
    net::Shutdown,
    os::fd::AsRawFd,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::Duration,
};

use tokio::net::TcpStream;

use super::{Activity, Bounds, Ended, Engine, Relayed};
use crate::datapath::{Joining, RelayMaps};
use sluice_common::RelayDirection;

/// The proxy's buffer per direction, for what the verdict leaves it.
const BUFFER: usize = 64 * 1024;
/// How long the proxy waits before it looks again whether the peer has taken what the verdict handed it: the first
/// wait, doubled while nothing moves up to the last (a peer that takes nothing costs a few wake-ups a second).
const CATCH_UP_POLL: (Duration, Duration) = (Duration::from_millis(1), Duration::from_millis(100));
/// How often the relay looks whether the kernel moved bytes (they do not wake the proxy), for the idle timeout: a
/// quarter of it, within these bounds (a connection that keeps sending is never taken for idle; Istio's default
/// hour costs one look a second).
const ACTIVITY_POLL: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));

/// Bytes moved before the sockets could not join the relay maps: the caller relays the rest another way.
pub struct Unjoined {
    pub from_first: u64,
    pub from_second: u64,
}

/// Relays between `first` and `second` through the kernel.
pub async fn join(
    maps: &RelayMaps,
    first: &TcpStream,
    second: &TcpStream,
    bounds: Bounds,
) -> Result<Relayed, Unjoined> {
    let activity = Activity::new();
    // Bytes already queued are moved by the proxy first: the verdict sees whole segments only from the join on.
    let early = (drain(first, second).await, drain(second, first).await);
    let (early_first, early_second) = match early {
        (Ok(first), Ok(second)) => (first, second),
        (Err(error), _) | (_, Err(error)) => {
            return Ok(Relayed {
                from_first: 0,
                from_second: 0,
                ended: Ended::Failed(error.kind()),
                engine: Engine::Kernel,
            })
        }
    };
    let joined = (|| -> io::Result<_> {
        // What each socket had taken to send before the join: its peer direction's bytes are counted from here.
        let bases = (accepted_exactly(first)?, accepted_exactly(second)?);
        let first = Joining { socket: first, cookie: cookie(first)?, bytes_acked: bytes_acked(first)? };
        let second = Joining { socket: second, cookie: cookie(second)?, bytes_acked: bytes_acked(second)? };
        maps.join(&first, &second).map_err(io::Error::other)?;
        Ok((first.cookie, second.cookie, bases))
    })();
    let (first_cookie, second_cookie, bases) = match joined {
        Ok(joined) => joined,
        Err(error) => {
            static WARNED: AtomicBool = AtomicBool::new(false);
            if !WARNED.swap(true, Ordering::Relaxed) {
                tracing::warn!(%error, "a connection could not join the kernel relay: it is spliced (said once)");
            }
            return Err(Unjoined { from_first: early_first, from_second: early_second });
        }
    };
    // From here the entries leave the maps however the relay ends, a relay dropped half-way (the agent stopping)
    // too: the sockets' closing takes them out of the socket map, not out of the others.
    let _joined = Joined { maps, cookies: [first_cookie, second_cookie] };
    let (written_first, written_second) = (AtomicU64::new(0), AtomicU64::new(0));
    let both = async {
        let directions = async {
            tokio::try_join!(
                direction(maps, (first, first_cookie), (second, bases.1), &written_first, &activity),
                direction(maps, (second, second_cookie), (first, bases.0), &written_second, &activity),
            )
        };
        tokio::select! {
            done = directions => done,
            broken = watch(maps, [first_cookie, second_cookie], &activity, bounds.idle) => Err(broken),
        }
    };
    let outcome = activity.within(bounds, both).await;
    let (first_counts, second_counts) = (maps.direction(first_cookie), maps.direction(second_cookie));
    tracing::debug!(
        ?first_counts,
        ?second_counts,
        "bytes relayed in the kernel (redirected) and by the proxy (passed)"
    );
    let redirected = |counts: Option<RelayDirection>| counts.map_or(0, |direction| direction.redirected);
    Ok(Relayed {
        from_first: early_first + redirected(first_counts) + written_first.load(Ordering::Relaxed),
        from_second: early_second + redirected(second_counts) + written_second.load(Ordering::Relaxed),
        ended: Ended::from_outcome(outcome),
        engine: Engine::Kernel,
    })
}

/// A joined pair's entries in the relay maps, taken out when dropped.
struct Joined<'a> {
    maps: &'a RelayMaps,
    cookies: [u64; 2],
}

impl Drop for Joined<'_> {
    fn drop(&mut self) {
        self.maps.leave(self.cookies);
    }
}

/// Moves what `from` already holds to `to`; the bytes moved. A stream that has ended stays ended: the direction
/// reads its end again after the join.
async fn drain(from: &TcpStream, to: &TcpStream) -> io::Result<u64> {
    // On the heap: held across the writes' waits, an array would make every relay's future (whichever engine
    // carries it) 16 KiB larger, copied whole as each connection's task is made.
    let mut buffer = vec![0u8; 16 * 1024];
    let mut moved = 0;
    loop {
        match receive(from, &mut buffer) {
            Ok(0) => return Ok(moved),
            Ok(read) => {
                write_all(to, &buffer[..read]).await?;
                moved += read as u64;
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(moved),
            Err(error) => return Err(error),
        }
    }
}

/// One direction: what the verdict leaves in `from` is written on to `to` once `to` has taken everything the verdict
/// handed it; at `from`'s end, `to` is shut for writing once it has taken everything.
async fn direction(
    maps: &RelayMaps,
    (from, cookie): (&TcpStream, u64),
    (to, base): (&TcpStream, u64),
    written: &AtomicU64,
    activity: &Activity,
) -> io::Result<()> {
    let mut buffer = vec![0u8; BUFFER];
    let mut total = 0u64;
    // The first look runs the verdict over segments that arrived between the drain and the join (the kernel
    // does so, under the socket's lock, when a receive finds them still queued); later ones wait to be woken.
    // Bytes left to the proxy are peeked, written on, and only then taken from the socket: until then they keep
    // the sender's window shut, so the proxy catches up with the verdict and the kernel carries the stream again.
    let mut received = peek(from, &mut buffer);
    loop {
        let read = match std::mem::replace(&mut received, Err(io::ErrorKind::WouldBlock.into())) {
            Ok(read) => read,
            // Nothing left to the proxy (woken for a segment the verdict handed on).
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                from.readable().await?;
                received = from.try_io(tokio::io::Interest::READABLE, || peek(from, &mut buffer));
                continue;
            }
            Err(error) => return Err(error),
        };
        caught_up(maps, cookie, to, base, total).await?;
        if read == 0 {
            return socket2::SockRef::from(to).shutdown(Shutdown::Write);
        }
        write_all(to, &buffer[..read]).await?;
        total += read as u64;
        written.store(total, Ordering::Relaxed);
        maps.written(cookie, total).map_err(io::Error::other)?;
        discard(from, &mut buffer[..read])?;
        activity.moved();
        received = peek(from, &mut buffer);
    }
}

/// Waits until `to` has taken into its send queue every byte handed to it: `base` before the join, then what the
/// verdict redirected and the proxy wrote.
async fn caught_up(maps: &RelayMaps, cookie: u64, to: &TcpStream, base: u64, written: u64) -> io::Result<()> {
    let (mut wait, mut last) = (CATCH_UP_POLL.0, 0);
    loop {
        let redirected = maps.direction(cookie).map_or(0, |direction| direction.redirected);
        let taken = accepted(to)?.saturating_sub(base);
        if taken >= redirected + written {
            return Ok(());
        }
        if let Some(error) = to.take_error()? {
            return Err(error);
        }
        wait = if taken > last { CATCH_UP_POLL.0 } else { (wait * 2).min(CATCH_UP_POLL.1) };
        last = taken;
        tokio::time::sleep(wait).await;
    }
}

/// Marks the relay active whenever the kernel moved bytes since the last look; returns only when the verdict
/// dropped a segment it could not trim (the stream has a hole: the relay fails, and both sides are reset).
async fn watch(maps: &RelayMaps, cookies: [u64; 2], activity: &Activity, idle: Duration) -> io::Error {
    let poll = (idle / 4).clamp(ACTIVITY_POLL.0, ACTIVITY_POLL.1);
    let mut last = 0;
    loop {
        tokio::time::sleep(poll).await;
        let directions = cookies.map(|cookie| maps.direction(cookie).unwrap_or_default());
        if directions.iter().any(|direction| direction.broken != 0) {
            return io::Error::new(io::ErrorKind::InvalidData, "the kernel relay dropped a segment it could not trim");
        }
        let moved: u64 = directions.iter().map(|direction| direction.redirected + direction.passed).sum();
        if moved != last {
            last = moved;
            activity.moved();
        }
    }
}

async fn write_all(to: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        to.writable().await?;
        match to.try_write(bytes) {
            Ok(written) => bytes = &bytes[written..],
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

fn cookie(socket: &TcpStream) -> io::Result<u64> {
    let mut cookie = 0u64;
    getsockopt(socket, libc::SOL_SOCKET, libc::SO_COOKIE, &mut cookie)?;
    Ok(cookie)
}

/// Bytes the socket has sent that its peer acknowledged (`tcpi_bytes_acked`).
fn bytes_acked(socket: &TcpStream) -> io::Result<u64> {
    // struct tcp_info up to and including tcpi_bytes_acked, which lies at byte 120 (uapi/linux/tcp.h).
    const BYTES_ACKED_AT: usize = 120;
    let mut info = [0u8; BYTES_ACKED_AT + 8];
    let length = getsockopt(socket, libc::IPPROTO_TCP, libc::TCP_INFO, &mut info)?;
    if length < info.len() {
        return Err(io::Error::other("tcp_info without tcpi_bytes_acked"));
    }
    Ok(u64::from_ne_bytes(info[BYTES_ACKED_AT..].try_into().expect("8 bytes")))
}

/// Every byte the socket has taken to send since it connected, or fewer (`SocketCounts::read`).
fn accepted(socket: &TcpStream) -> io::Result<u64> {
    // A few tries: an acknowledgement between the reads makes the figure short, and the catch-up would wait a poll.
    const TRIES: usize = 4;
    match counts(socket).read(TRIES)? {
        Accepted::Exactly(accepted) | Accepted::AtMost(accepted) => Ok(accepted),
    }
}

/// Every byte the socket has taken to send since it connected, exactly (`SocketCounts::read`). For a socket
/// nothing else writes to.
fn accepted_exactly(socket: &TcpStream) -> io::Result<u64> {
    const TRIES: usize = 16;
    match counts(socket).read(TRIES)? {
        Accepted::Exactly(accepted) => Ok(accepted),
        Accepted::AtMost(_) => {
            Err(io::Error::other(format!("acknowledgements kept arriving through {TRIES} reads of the send queue")))
        }
    }
}

/// The socket's own counters: `tcpi_bytes_acked` and SIOCOUTQ.
fn counts(
    socket: &TcpStream,
) -> SocketCounts<impl FnMut() -> io::Result<u64> + '_, impl FnMut() -> io::Result<u64> + '_> {
    SocketCounts { acknowledged: || bytes_acked(socket), queued: || queued(socket) }
}

/// A socket's two send counters, read one at a time: the bytes its peer acknowledged and those it still holds.
/// Their sum is every byte the socket took to send, if no acknowledgement arrives between the two reads.
struct SocketCounts<A, Q> {
    acknowledged: A,
    queued: Q,
}

/// What the reads of a socket's counters found.
#[derive(Debug, PartialEq, Eq)]
enum Accepted {
    /// Every byte the socket took to send.
    Exactly(u64),
    /// No more than it: acknowledgements kept arriving between the reads.
    AtMost(u64),
}

impl<A: FnMut() -> io::Result<u64>, Q: FnMut() -> io::Result<u64>> SocketCounts<A, Q> {
    /// The acknowledged bytes, the queue, and the acknowledged bytes again, up to `tries` times until the two
    /// agree (no acknowledgement arrived while the queue was read: the sum is exact). The acknowledged bytes are
    /// read first: an acknowledgement arriving before the queue is read then makes the sum short, never long —
    /// long, the proxy would write on before the peer socket had taken what the verdict handed it, and the stream
    /// would be reordered (or shut before its last bytes).
    fn read(&mut self, tries: usize) -> io::Result<Accepted> {
        let mut at_most = 0;
        for _ in 0..tries {
            let acknowledged = (self.acknowledged)()?;
            let queued = (self.queued)()?;
            if (self.acknowledged)()? == acknowledged {
                return Ok(Accepted::Exactly(acknowledged + queued));
            }
            at_most = acknowledged + queued;
        }
        Ok(Accepted::AtMost(at_most))
    }
}

/// Bytes the socket holds to send that its peer has not acknowledged (SIOCOUTQ).
fn queued(socket: &TcpStream) -> io::Result<u64> {
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::TIOCOUTQ, &mut queued) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(queued.max(0) as u64)
}

/// One receive(2) from the socket, whatever tokio last learnt of its readiness.
fn receive(socket: &TcpStream, buffer: &mut [u8]) -> io::Result<usize> {
    receive_with(socket, buffer, libc::MSG_DONTWAIT)
}

/// What the socket holds, left in it.
fn peek(socket: &TcpStream, buffer: &mut [u8]) -> io::Result<usize> {
    receive_with(socket, buffer, libc::MSG_DONTWAIT | libc::MSG_PEEK)
}

/// Takes from the socket the bytes a peek into `buffer` saw.
fn discard(socket: &TcpStream, buffer: &mut [u8]) -> io::Result<()> {
    let mut left = buffer.len();
    while left > 0 {
        match receive(socket, &mut buffer[..left]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(taken) => left -= taken,
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

fn receive_with(socket: &TcpStream, buffer: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: `buffer` is `buffer.len()` writable bytes.
    let received = unsafe { libc::recv(socket.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len(), flags) };
    if received < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(received as usize)
}

/// getsockopt into `value`; the length the kernel wrote.
fn getsockopt<T>(socket: &TcpStream, level: libc::c_int, name: libc::c_int, value: &mut T) -> io::Result<usize> {
    let mut length = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` is `length` writable bytes.
    let got = unsafe { libc::getsockopt(socket.as_raw_fd(), level, name, (value as *mut T).cast(), &mut length) };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(length as usize)
}

#[cfg(test)]
mod tests {
    use std::{cell::Cell, io::Read};

    use super::*;

    /// A socket that has taken `written` bytes, of which `acknowledged` are acknowledged; `arriving` bytes more
    /// are acknowledged just after each read of either counter, until all are.
    struct Acknowledging {
        written: u64,
        acknowledged: Cell<u64>,
        arriving: u64,
    }

    impl Acknowledging {
        fn counts(&self) -> SocketCounts<impl FnMut() -> io::Result<u64> + '_, impl FnMut() -> io::Result<u64> + '_> {
            let arrive = move |read: u64| {
                self.acknowledged.set((self.acknowledged.get() + self.arriving).min(self.written));
                Ok(read)
            };
            SocketCounts {
                acknowledged: move || arrive(self.acknowledged.get()),
                queued: move || arrive(self.written - self.acknowledged.get()),
            }
        }
    }

    /// The catch-up waits on `accepted`: a figure above what the socket really took would let the proxy write
    /// before the bytes the verdict handed on, reordering the stream.
    #[test]
    fn an_acknowledgement_between_the_reads_makes_the_sum_short_never_long() {
        let socket = Acknowledging { written: 100_000, acknowledged: Cell::new(10_000), arriving: 1_448 };
        // Acknowledged 10,000 read, 1,448 more arrive, the queue read (88,552), 1,448 more arrive: not exact.
        assert_eq!(socket.counts().read(1).unwrap(), Accepted::AtMost(100_000 - 1_448));
    }

    #[test]
    fn the_exact_sum_is_read_once_no_acknowledgement_arrives_between_the_reads() {
        // 30,000 bytes are acknowledged after every read until all 100,000 are; then none arrive.
        let socket = Acknowledging { written: 100_000, acknowledged: Cell::new(10_000), arriving: 30_000 };
        assert_eq!(socket.counts().read(16).unwrap(), Accepted::Exactly(100_000));
        let quiet = Acknowledging { written: 100_000, acknowledged: Cell::new(10_000), arriving: 0 };
        assert_eq!(quiet.counts().read(1).unwrap(), Accepted::Exactly(100_000));
        // Acknowledged without pause, the socket is never read exactly, and its sum is never long.
        let busy = Acknowledging { written: u64::MAX, acknowledged: Cell::new(0), arriving: 1 };
        assert!(matches!(busy.counts().read(16).unwrap(), Accepted::AtMost(sum) if sum < u64::MAX));
    }

    /// The two counters of a real socket add up to what it was given to send, while a reader drains the far end.
    #[tokio::test(flavor = "current_thread")]
    async fn a_sockets_counters_add_up_to_the_bytes_written_to_it() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let sender = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut receiver, _) = listener.accept().unwrap();
        let reader = std::thread::spawn(move || {
            let mut buffer = vec![0u8; 64 * 1024];
            let mut total = 0u64;
            while let Ok(read @ 1..) = receiver.read(&mut buffer) {
                total += read as u64;
            }
            total
        });
        sender.set_nonblocking(true).unwrap();
        let sender = TcpStream::from_std(sender).unwrap();
        // The handshake's SYN may be counted among the acknowledged bytes.
        let handshake = accepted_exactly(&sender).unwrap();
        assert!(handshake <= 1, "{handshake}");
        let chunk = vec![7u8; 4096];
        let mut written = 0u64;
        for _ in 0..2_000 {
            if let Ok(sent) = sender.try_write(&chunk) {
                written += sent as u64;
            }
            let accepted = accepted(&sender).unwrap() - handshake;
            assert!(accepted <= written, "accepted {accepted} of {written} written");
            if let Ok(exactly) = accepted_exactly(&sender) {
                assert_eq!(exactly - handshake, written);
            }
        }
        sender.into_std().unwrap().shutdown(Shutdown::Write).unwrap();
        assert_eq!(reader.join().unwrap(), written);
    }
}
