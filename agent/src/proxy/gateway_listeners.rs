//! The proxy's explicit listeners: one per port of the Gateways that select this agent (HTTP, TLS terminated or
//! passed through, TCP), opened and closed as the configuration changes; and the forward-proxy port.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use tokio::{net::TcpListener, task::JoinHandle};

use super::{
    detect::{detect, Detected, HttpVersion},
    http::{Connection, HttpProxy, Listener},
    l4,
    transparent_listener::listener,
};

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
                let proxy = proxy.clone();
                // Boxed, as an intercepted connection's task is (`intercepted::serve`).
                tokio::spawn(Box::pin(async move {
                    // A Gateway's TCP server port: relayed by its `tcp` routes at once (the client may wait for the
                    // server to speak first).
                    if let Listener::Gateway(port) = kind {
                        let policy = proxy.policy();
                        // A port whose servers terminate TLS: the ClientHello picks the server.
                        if policy.tls_servers_on(port).next().is_some() {
                            drop(policy);
                            let _ = stream.set_nodelay(true);
                            super::terminate::serve(stream, connection, proxy).await;
                            drop(permit);
                            return;
                        }
                        let arrival = l4::Arrival::Gateway(port);
                        if policy.tcp_gateways_on(port).next().is_some() {
                            drop(policy);
                            l4::serve_tcp(stream, (peer, local), arrival, &proxy, l4::Terminated::default()).await;
                            drop(permit);
                            return;
                        }
                        // A port whose servers only pass TLS through: the ClientHello is read at once, without
                        // the detection's peek and timer; a client that speaks anything else is refused (counted
                        // `not_tls`), as Envoy's listener, finding no TLS, matches none of its filter chains.
                        if policy.tls_gateways_on(port).next().is_some() && policy.gateway_on(port).is_none() {
                            drop(policy);
                            l4::serve_tls(stream, peer, local, arrival, &proxy).await;
                            drop(permit);
                            return;
                        }
                    }
                    // A client whose first bytes say no HTTP version is answered by the HTTP/1.1 server (400), and
                    // one that says too little in time is cut off, as a stalled request's headers are.
                    let version = match detect(&stream, proxy.request_headers_timeout()).await {
                        Some(Detected::Http(version)) => version,
                        Some(Detected::Tls) if matches!(kind, Listener::Gateway(_)) => {
                            let port = local.port();
                            l4::serve_tls(stream, peer, local, l4::Arrival::Gateway(port), &proxy).await;
                            drop(permit);
                            return;
                        }
                        Some(Detected::Opaque | Detected::Tls) => HttpVersion::Http1,
                        None => return,
                    };
                    let _ = stream.set_nodelay(true);
                    proxy.serve_connection(stream, connection, version).await;
                    drop(permit);
                }));
            }
            Err(error) => {
                tracing::warn!(listener = ?kind, %error, "accepting a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
