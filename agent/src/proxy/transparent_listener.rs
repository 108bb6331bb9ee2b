//! The transparent listener: receives the connections the classifier hands over, each accepted socket bound to
//! the flow's original destination (`IP_TRANSPARENT`), which is therefore its local address.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};

/// Istio's port for intercepted outbound traffic.
pub const DEFAULT_PORT: u16 = 15001;

/// An accepted intercepted connection.
pub struct Intercepted {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    /// Where the client meant to connect.
    pub original_destination: SocketAddr,
}

pub struct TransparentListener {
    v4: TcpListener,
    v6: TcpListener,
}

impl TransparentListener {
    /// Binds the IPv4 and IPv6 listeners on `port` on every address.
    pub fn bind(port: u16) -> io::Result<Self> {
        let v4 = listener(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)), true)?;
        let v6 = listener(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)), true)?;
        Ok(TransparentListener { v4, v6 })
    }

    pub async fn accept(&self) -> io::Result<Intercepted> {
        let (stream, peer) = tokio::select! {
            accepted = self.v4.accept() => accepted?,
            accepted = self.v6.accept() => accepted?,
        };
        let original_destination = stream.local_addr()?;
        Ok(Intercepted { stream, peer, original_destination })
    }
}

/// Where `net.ipv4.tcp_migrate_req` is written: the agent's own /proc/sys, read-only in a container; then the host's
/// `/proc/sys/net` as the DaemonSet mounts it (a sysctl of the network namespace of whoever opens it: the node's,
/// on the host's network).
pub const MIGRATE_REQ_SYSCTLS: [&str; 2] =
    ["/proc/sys/net/ipv4/tcp_migrate_req", "/host/proc/sys/net/ipv4/tcp_migrate_req"];

/// Asks the kernel to hand the connections queued at a closing listener to another listener of its port
/// (`net.ipv4.tcp_migrate_req`, per network namespace), so that those a draining agent had not accepted go to its
/// successor rather than being reset. Best effort, through the first of `sysctls` that can be written: whether it
/// is set.
pub fn migrate_queued_connections(sysctls: &[&str]) -> bool {
    let mut last_error = None;
    for sysctl in sysctls {
        if std::fs::read_to_string(sysctl).is_ok_and(|value| value.trim() == "1") {
            return true;
        }
        match std::fs::write(sysctl, "1") {
            Ok(()) => {
                tracing::info!(%sysctl, "net.ipv4.tcp_migrate_req set: a closing listener's queued connections go to its successor");
                return true;
            }
            Err(error) => last_error = Some(error),
        }
    }
    if let Some(error) = last_error {
        tracing::debug!(%error, "net.ipv4.tcp_migrate_req not set: a closing listener's queued connections are reset");
    }
    false
}

/// A listening socket on `addr` (IPv6 only for an IPv6 address); `transparent`: accepting connections addressed
/// to any address (`IP_TRANSPARENT`), as the classifier hands them over.
pub fn listener(addr: SocketAddr, transparent: bool) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    if transparent && addr.is_ipv6() {
        socket.set_ip_transparent_v6(true)?;
    } else if transparent {
        socket.set_ip_transparent_v4(true)?;
    }
    socket.set_reuse_address(true)?;
    // A successor agent listens beside this one while it drains (an upgrade): the kernel spreads new connections
    // over both until this one closes.
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_migration_sysctl_is_written_through_the_first_path_that_takes_it() {
        let dir = tempfile::tempdir().unwrap();
        let mounted = dir.path().join("tcp_migrate_req");
        std::fs::write(&mounted, "0\n").unwrap();
        let mounted = mounted.to_str().unwrap();
        // The container's own path cannot be written (here: it does not exist); the mounted one takes it.
        let missing = dir.path().join("read-only/tcp_migrate_req");
        assert!(migrate_queued_connections(&[missing.to_str().unwrap(), mounted]));
        assert_eq!(std::fs::read_to_string(mounted).unwrap(), "1");
        // Set already: left as it is.
        assert!(migrate_queued_connections(&[mounted]));
        assert!(!migrate_queued_connections(&[missing.to_str().unwrap()]), "nowhere to write it");
    }
}
