//! What happens to each intercepted connection: HTTP goes to the HTTP proxy, TLS is decided by its server name,
//! anything else by its destination address.

use std::{sync::Arc, time::Duration};

use tokio::sync::OwnedSemaphorePermit;

use super::{
    detect::{detect, Detected, DETECTION_TIMEOUT},
    http::{Connection, HttpProxy, Listener},
    l4::{self, Arrival},
    tcp,
    transparent_listener::{Intercepted, TransparentListener},
};
use crate::policy::routes::{PortKind, Viewer};

/// Accepts intercepted connections until the task is dropped.
pub async fn serve(listener: Arc<TransparentListener>, proxy: Arc<HttpProxy>) {
    loop {
        match listener.accept().await {
            Ok(connection) => {
                // Its place is taken before its task runs: a drain that finds no place taken has no connection
                // left to wait for.
                let Some(permit) = proxy.admit() else {
                    tcp::reset(&connection.stream);
                    continue;
                };
                // Boxed: the task then holds a pointer, and what it moves as it is spawned, run and finished is
                // a pointer's bytes, not the connection's whole future (kilobytes, copied about eight times).
                tokio::spawn(Box::pin(dispatch(connection, permit, proxy.clone())));
            }
            Err(error) => {
                tracing::warn!(%error, "accepting an intercepted connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn dispatch(connection: Intercepted, _permit: OwnedSemaphorePermit, proxy: Arc<HttpProxy>) {
    let Intercepted { stream, peer, original_destination: dialled } = connection;
    // What the registered service at the address declares the port: TCP is decided by address at once (a
    // server-first protocol's client says nothing until the server has); TLS is read as a ClientHello at once (no
    // peek to detect it first).
    let declared = {
        let policy = proxy.policy();
        let source = proxy.workload(peer.ip());
        let service = policy.registered_at(dialled, Viewer::Workload(source.as_deref()));
        service.and_then(|service| service.port_kind(dialled.port()))
    };
    let detected = match declared {
        Some(PortKind::Opaque) => Detected::Opaque,
        Some(PortKind::Tls) => Detected::Tls,
        // A client that says nothing in time may be waiting for a server-first protocol: decided as TCP.
        _ => detect(&stream, DETECTION_TIMEOUT).await.unwrap_or(Detected::Opaque),
    };
    match detected {
        Detected::Http(version) => {
            tracing::debug!(source = %peer, original_dst = %dialled, protocol = ?version, "intercepted connection");
            let context = Connection {
                peer,
                local: dialled,
                listener: Listener::Mesh,
                security: Default::default(),
                principal: None,
                server_name: None,
            };
            let _ = stream.set_nodelay(true);
            proxy.serve_connection(stream, context, version).await;
        }
        Detected::Tls => l4::serve_tls(stream, peer, dialled, Arrival::Intercepted, &proxy).await,
        Detected::Opaque => {
            l4::serve_tcp(stream, (peer, dialled), Arrival::Intercepted, &proxy, l4::Terminated::default()).await
        }
    }
}
