//! The splice engine: each direction moves through a pipe with splice(2), socket to pipe to socket, so the bytes
//! stay in the kernel's pages; the proxy is still woken for every batch, but copies nothing.

use std::{
    io,
    os::fd::OwnedFd,
    sync::atomic::{AtomicU64, Ordering},
};

use nix::{
    fcntl::{splice, OFlag, SpliceFFlags},
    unistd::pipe2,
};
use tokio::{io::Interest, net::TcpStream};

use super::Activity;

/// What one splice call moves at most: a pipe's default capacity.
const PIPE_BYTES: usize = 64 * 1024;

/// Moves bytes from `from` to `to` until `from` ends, then shuts `to`'s sending side (the half-close is passed
/// on once every byte before it was). Returns the bytes moved.
pub async fn direction(from: &TcpStream, to: &TcpStream, moved: &AtomicU64, activity: &Activity) -> io::Result<u64> {
    let (pipe_out, pipe_in) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
    let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
    loop {
        let taken =
            from.async_io(Interest::READABLE, || Ok(splice(from, None, &pipe_in, None, PIPE_BYTES, flags)?)).await?;
        if taken == 0 {
            shutdown_sending(to);
            return Ok(moved.load(Ordering::Relaxed));
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

/// Passes a half-close on: the peer reads the end of the stream once it has read everything before it.
pub fn shutdown_sending(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).shutdown(std::net::Shutdown::Write);
}
