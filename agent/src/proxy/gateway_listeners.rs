//! The proxy's explicit listeners: one per port of the Gateways that select this agent (HTTP, TLS terminated or
//! passed through, TCP), opened and closed as the configuration changes; and the forward-proxy port.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

use super::{
    detect::{detect, Detected, HttpVersion},
    http::{Connection, HttpProxy, Listener},
    l4,
    transparent_listener::listener,
};
use crate::policy::routes::GatewayPort;

pub struct GatewayListeners {
    proxy: Arc<HttpProxy>,
    open: BTreeMap<u16, Vec<JoinHandle<()>>>,
}

impl GatewayListeners {
    pub fn new(proxy: Arc<HttpProxy>) -> GatewayListeners {
        GatewayListeners { proxy, open: BTreeMap::new() }
    }

    /// The ports listened on now.
    pub fn ports(&self) -> Vec<u16> {
        self.open.keys().copied().collect()
    }

    /// Listens on every port of `ports` and on no other. A port that cannot be bound (in use) is logged and tried
    /// again at the next change; connections already accepted on a closed port run to their end.
    pub fn reconcile(&mut self, ports: &BTreeSet<u16>) {
        self.open.retain(|port, tasks| {
            let keep = ports.contains(port);
            if !keep {
                tasks.iter().for_each(JoinHandle::abort);
                tracing::info!(port, "gateway listener closed");
            }
            keep
        });
        for &port in ports {
            if self.open.contains_key(&port) {
                continue;
            }
            match bind(port) {
                Ok(listeners) => {
                    let tasks = listeners
                        .into_iter()
                        .map(|listener| tokio::spawn(accept(listener, Listener::Gateway(port), self.proxy.clone())))
                        .collect();
                    self.open.insert(port, tasks);
                    tracing::info!(port, "gateway listener open");
                }
                // Ports below 1024 take CAP_NET_BIND_SERVICE (the DaemonSet grants it).
                Err(error) if error.kind() == std::io::ErrorKind::PermissionDenied => tracing::error!(
                    port,
                    %error,
                    "cannot listen on a Gateway server port: ports below 1024 need CAP_NET_BIND_SERVICE; retried at \
                     the next change"
                ),
                Err(error) => tracing::error!(
                    port,
                    %error,
                    "cannot listen on a Gateway server port (in use by another program?); retried at the next change"
                ),
            }
        }
    }
}

impl GatewayListeners {
    /// Stops listening on every port (the agent is draining); accepted connections run to their end.
    pub fn close_all(&mut self) {
        self.reconcile(&BTreeSet::new());
    }
}

impl Drop for GatewayListeners {
    fn drop(&mut self) {
        self.open.values().flatten().for_each(JoinHandle::abort);
    }
}

/// IPv4 and, where the node has it, IPv6 listeners on `port`.
pub fn bind(port: u16) -> io::Result<Vec<TcpListener>> {
    let mut listeners = vec![listener(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)), false)?];
    match listener(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)), false) {
        Ok(v6) => listeners.push(v6),
        Err(error) => tracing::warn!(port, %error, "no IPv6 gateway listener"),
    }
    Ok(listeners)
}

/// Serves the connections `listener` accepts as `kind` (a Gateway port, or the forward-proxy port).
pub async fn accept(listener: TcpListener, kind: Listener, proxy: Arc<HttpProxy>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let Some(permit) = proxy.admit() else {
                    super::tcp::reset(&stream);
                    continue;
                };
                let Ok(local) = stream.local_addr() else { continue };
                let connection = Connection {
                    peer,
                    local,
                    listener: kind,
                    security: Default::default(),
                    principal: None,
                    server_name: None,
                };
                // Each kind of connection is its own task, boxed as an intercepted connection's is
                // (`intercepted::serve`): one future holding every kind would be as large as the largest (TLS
                // terminated), and copied whole as each connection's task is made.
                let held = (connection, proxy.clone(), permit);
                let served = match kind {
                    Listener::Gateway(port) => (port, proxy.policy().gateway_port(port)),
                    Listener::Mesh | Listener::Forward => (local.port(), GatewayPort::Detected),
                };
                match served {
                    (_, GatewayPort::TerminatesTls) => tokio::spawn(Box::pin(terminated(stream, held))),
                    (port, GatewayPort::Tcp) => tokio::spawn(Box::pin(tcp(stream, port, held))),
                    (port, GatewayPort::PassesTlsThrough) => tokio::spawn(Box::pin(passed_through(stream, port, held))),
                    (_, GatewayPort::Detected) => tokio::spawn(Box::pin(detected(stream, held))),
                };
            }
            Err(error) => {
                tracing::warn!(listener = ?kind, %error, "accepting a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// What each connection's task holds until it ends: the connection, the proxy, and its place among
/// `--max-connections`.
type Held = (Connection, Arc<HttpProxy>, tokio::sync::OwnedSemaphorePermit);

async fn terminated(stream: TcpStream, (connection, proxy, _permit): Held) {
    let _ = stream.set_nodelay(true);
    super::terminate::serve(stream, connection, proxy).await;
}

async fn tcp(stream: TcpStream, port: u16, (connection, proxy, _permit): Held) {
    let (peer, local) = (connection.peer, connection.local);
    l4::serve_tcp(stream, (peer, local), l4::Arrival::Gateway(port), &proxy, l4::Terminated::default()).await;
}

async fn passed_through(stream: TcpStream, port: u16, (connection, proxy, _permit): Held) {
    l4::serve_tls(stream, connection.peer, connection.local, l4::Arrival::Gateway(port), &proxy).await;
}

/// A client whose first bytes say no HTTP version is answered by the HTTP/1.1 server (400), and one that says too
/// little in time is cut off, as a stalled request's headers are.
async fn detected(stream: TcpStream, (connection, proxy, _permit): Held) {
    let version = match detect(&stream, proxy.request_headers_timeout()).await {
        Some(Detected::Http(version)) => version,
        Some(Detected::Tls) if matches!(connection.listener, Listener::Gateway(_)) => {
            let (peer, local) = (connection.peer, connection.local);
            l4::serve_tls(stream, peer, local, l4::Arrival::Gateway(local.port()), &proxy).await;
            return;
        }
        Some(Detected::Opaque | Detected::Tls) => HttpVersion::Http1,
        None => return,
    };
    let _ = stream.set_nodelay(true);
    proxy.serve_connection(stream, connection, version).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `serve` returns: what its connection's task holds, copied whole as it is made.
    fn task_size<A, F: std::future::Future>(_serve: impl FnOnce(TcpStream, A, Held) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// A connection passed through or relayed as TCP does not carry the state of a terminated one's TLS and HTTP
    /// server (bench/README.md's table of choices has what the copies cost).
    #[test]
    fn a_passed_through_connections_task_is_a_few_kilobytes() {
        let passed_through = task_size(passed_through);
        let tcp = task_size(tcp);
        let terminated = task_size(|stream, (), held| terminated(stream, held));
        eprintln!("passed through {passed_through}, tcp {tcp}, terminated {terminated}");
        assert!(passed_through <= 6 * 1024 && tcp <= 6 * 1024, "passed through {passed_through}, tcp {tcp}");
        assert!(terminated > passed_through, "terminated {terminated}");
    }
}
