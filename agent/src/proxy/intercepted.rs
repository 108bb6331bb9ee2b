//! What happens to each intercepted connection: HTTP goes to the HTTP proxy, TLS is decided by its server name,
//! anything else goes to the TCP relay.

use std::{sync::Arc, time::Duration};

use super::{
    detect::{detect, Detected, DETECTION_TIMEOUT},
    http::{Connection, HttpProxy, Listener},
    tcp,
    transparent_listener::{Intercepted, TransparentListener},
};

/// Accepts intercepted connections until the task is dropped.
pub async fn serve(listener: Arc<TransparentListener>, proxy: Arc<HttpProxy>) {
    loop {
        match listener.accept().await {
            Ok(connection) => {
                tokio::spawn(dispatch(connection, proxy.clone()));
            }
            Err(error) => {
                tracing::warn!(%error, "accepting an intercepted connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn dispatch(connection: Intercepted, proxy: Arc<HttpProxy>) {
    let Some(_permit) = proxy.admit() else {
        tcp::reset(&connection.stream);
        return;
    };
    // A client that says nothing in time may be waiting for a server-first protocol: its bytes are relayed.
    match detect(&connection.stream, DETECTION_TIMEOUT).await.unwrap_or(Detected::Opaque) {
        Detected::Http(version) => {
            tracing::debug!(
                source = %connection.peer,
                original_dst = %connection.original_destination,
                protocol = ?version,
                "intercepted connection"
            );
            let context =
                Connection { peer: connection.peer, local: connection.original_destination, listener: Listener::Mesh };
            proxy.serve_connection(connection.stream, context, version).await;
        }
        Detected::Tls => {
            let (peer, dialled) = (connection.peer, connection.original_destination);
            super::sni::serve(connection.stream, peer, dialled, super::sni::Arrival::Intercepted, &proxy).await
        }
        Detected::Opaque => {
            let mode = proxy.policy().sidecars.mode_for(proxy.workload(connection.peer.ip()).as_deref());
            let idle = proxy.limits().idle_timeout;
            tcp::relay(connection, mode, &proxy.telemetry().tcp, proxy.upstream_sockets(), idle).await
        }
    }
}
