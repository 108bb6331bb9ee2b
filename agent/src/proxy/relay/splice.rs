//! The splice engine: each direction moves through a pipe with splice(2), socket to pipe to socket, so the bytes
//! stay in the kernel's pages; the proxy is still woken for every batch, but copies nothing. A direction starts by
//! copying through a small buffer, and takes a pipe (two descriptors, two calls more per batch) only once a read
//! fills that buffer: a handshake or a request and its answer never pay for a pipe, a transfer does.

use std::{
    io,
    os::fd::OwnedFd,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
};

use nix::{
    fcntl::{splice, OFlag, SpliceFFlags},
    unistd::pipe2,
};
use tokio::{
    io::Interest,
    net::{
        tcp::{ReadHalf, WriteHalf},
        TcpStream,
    },
};

use super::{
    copy::{pass_on, shutdown_sending, SMALL_FLOW_BYTES},
    Activity,
};

/// What one splice call moves at most: a pipe's default capacity.
const PIPE_BYTES: usize = 64 * 1024;
/// The unsent bytes a spliced direction lets queue on the socket it writes to (`TCP_NOTSENT_LOWAT`). Spliced
/// bytes are the sending peer's own pages, held until the far end acknowledges them; a short unsent queue holds
/// fewer, and the sender writes into pages still warm (bench/README.md has the figures).
pub const SPLICED_UNSENT_BYTES: u32 = 128 * 1024;

/// Moves bytes from `from` to `to` until `from` ends, then shuts `to`'s sending side (the half-close is passed
/// on once every byte before it was). Sets `piped` when it takes a pipe.
pub async fn direction(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    moved: &AtomicU64,
    piped: &AtomicBool,
    activity: &Activity,
) -> io::Result<()> {
    let mut buffer = Vec::with_capacity(SMALL_FLOW_BYTES);
    let mut without_pipe = false;
    let (pipe_out, pipe_in) = loop {
        let Some(read) = pass_on(&mut from, &mut to, &mut buffer, moved, activity).await? else { return Ok(()) };
        if read < SMALL_FLOW_BYTES || without_pipe {
            continue;
        }
        match pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC) {
            Ok(pipe) => break pipe,
            // Out of descriptors, say: the direction goes on copying rather than failing.
            Err(error) => {
                tracing::debug!(%error, "no pipe for the relay: this direction is copied");
                without_pipe = true;
            }
        }
    };
    drop(buffer);
    if let Err(error) = socket2::SockRef::from(to.as_ref()).set_tcp_notsent_lowat(SPLICED_UNSENT_BYTES) {
        tracing::debug!(%error, "TCP_NOTSENT_LOWAT not set: the spliced direction queues as the kernel lets it");
    }
    piped.store(true, Ordering::Relaxed);
    let (from, to) = (from.as_ref(), to.as_ref());
    let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
    loop {
        let taken =
            from.async_io(Interest::READABLE, || Ok(splice(from, None, &pipe_in, None, PIPE_BYTES, flags)?)).await?;
        if taken == 0 {
            shutdown_sending(to);
            return Ok(());
        }
        give(&pipe_out, to, taken, flags).await?;
        moved.fetch_add(taken as u64, Ordering::Relaxed);
        activity.moved();
    }
}

/// Writes the `left` bytes waiting in the pipe to `to`.
async fn give(pipe_out: &OwnedFd, to: &TcpStream, mut left: usize, flags: SpliceFFlags) -> io::Result<()> {
    while left > 0 {
        left -= to.async_io(Interest::WRITABLE, || Ok(splice(pipe_out, None, to, None, left, flags)?)).await?;
    }
    Ok(())
}
