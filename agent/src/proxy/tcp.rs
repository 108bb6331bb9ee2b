//! The proxy's upstream TCP connections: from which source address, to which destinations never (the node
//! itself), within which time; and the reset that tells a client it got no answer.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use tokio::{
    net::{TcpSocket, TcpStream},
    time::timeout,
};

use super::local_destinations::{LocalDestination, LocalDestinations};
use crate::policy::clusters::{Connect, Keepalive};

/// The addresses upstream connections leave from (`--upstream-source-address`): a fixed egress IP per family, as
/// firewalls outside the cluster expect; the routing table's choice where none is set.
#[derive(Clone, Copy, Debug, Default)]
pub struct SourceAddresses {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

impl SourceAddresses {
    pub fn from_list(addresses: &[IpAddr]) -> SourceAddresses {
        let mut source = SourceAddresses::default();
        for address in addresses {
            match address {
                IpAddr::V4(v4) => source.v4 = source.v4.or(Some(*v4)),
                IpAddr::V6(v6) => source.v6 = source.v6.or(Some(*v6)),
            }
        }
        source
    }

    fn for_destination(&self, destination: SocketAddr) -> Option<IpAddr> {
        match destination {
            SocketAddr::V4(_) => self.v4.map(IpAddr::V4),
            SocketAddr::V6(_) => self.v6.map(IpAddr::V6),
        }
    }
}

/// How the proxy's upstream connections are made: from which source address, and to which destinations never.
#[derive(Clone)]
pub struct UpstreamSockets {
    pub source: SourceAddresses,
    pub local: Arc<LocalDestinations>,
}

impl UpstreamSockets {
    /// Connections from the routing table's choice of source, to anywhere but the node itself.
    pub fn new(source: SourceAddresses, local: Arc<LocalDestinations>) -> UpstreamSockets {
        UpstreamSockets { source, local }
    }
}

/// Connects to `destination` from the configured source address, within `connect.within` (the mesh config's
/// `connectTimeout`, a DestinationRule's `connectionPool.tcp.connectTimeout`), with `connect.keepalive` on the
/// socket. A destination that is the node itself is refused before any packet is sent: an error that
/// [`is_local_destination`] tells apart.
pub async fn connect(
    destination: SocketAddr,
    sockets: &UpstreamSockets,
    connect: Connect,
) -> std::io::Result<TcpStream> {
    sockets
        .local
        .check(destination)
        .map_err(|refused| std::io::Error::new(std::io::ErrorKind::PermissionDenied, refused))?;
    let source = &sockets.source;
    let connecting = async {
        let socket = if destination.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        if let Some(address) = source.for_destination(destination) {
            socket.bind(SocketAddr::new(address, 0))?;
        }
        if let Some(keepalive) = connect.keepalive {
            set_keepalive(&socket, keepalive)?;
        }
        let stream = socket.connect(destination).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    };
    timeout(connect.within, connecting)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")))
}

/// Turns keepalive on for `socket`, with the times and count `keepalive` sets (the kernel's defaults for the
/// others). The kernel takes whole seconds from 1 to 32,767 and up to 127 probes: values past them are held
/// to them, so that a setting it would refuse does not fail every connection.
fn set_keepalive(socket: &TcpSocket, keepalive: Keepalive) -> std::io::Result<()> {
    let seconds = |duration: Duration| Duration::from_secs(duration.as_secs().clamp(1, 32_767));
    let mut settings = socket2::TcpKeepalive::new();
    if let Some(time) = keepalive.time {
        settings = settings.with_time(seconds(time));
    }
    if let Some(interval) = keepalive.interval {
        settings = settings.with_interval(seconds(interval));
    }
    if let Some(probes) = keepalive.probes {
        settings = settings.with_retries(probes.min(127));
    }
    socket2::SockRef::from(socket).set_tcp_keepalive(&settings)
}

/// Whether `error` is [`connect`]'s refusal of a destination that is the node itself.
pub fn is_local_destination(error: &std::io::Error) -> bool {
    error.get_ref().is_some_and(|inner| inner.is::<LocalDestination>())
}

/// What a failed [`connect`] is called in logs: the node itself refused, a timeout, or another failure.
pub fn connect_failure(error: &std::io::Error) -> &'static str {
    if is_local_destination(error) {
        "local_destination"
    } else if error.kind() == std::io::ErrorKind::TimedOut {
        "upstream_timeout"
    } else {
        "upstream_failed"
    }
}

/// Closes with a RST rather than a FIN: the client must not take the close for an answer.
pub fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}
