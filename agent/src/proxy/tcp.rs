//! TCP relay for intercepted connections that are not HTTP: to the original destination in ALLOW_ANY, refused
//! in REGISTRY_ONLY (what the kernel allows at L4 never reaches the proxy).

use std::time::Duration;

use tokio::{io::copy_bidirectional, net::TcpStream, time::timeout};

use super::transparent_listener::Intercepted;
use crate::policy::OutboundMode;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Closes with a RST rather than a FIN: the client must not take the close for an answer.
pub fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

pub async fn relay(connection: Intercepted, mode: OutboundMode) {
    let Intercepted { mut stream, peer, original_destination } = connection;
    if mode == OutboundMode::RegistryOnly {
        tracing::info!(source = %peer, original_dst = %original_destination, verdict = "refused", "intercepted connection");
        reset(&stream);
        return;
    }
    let upstream = match timeout(CONNECT_TIMEOUT, TcpStream::connect(original_destination)).await {
        Ok(Ok(upstream)) => upstream,
        Ok(Err(error)) => {
            tracing::info!(source = %peer, original_dst = %original_destination, %error, verdict = "upstream_failed", "intercepted connection");
            reset(&stream);
            return;
        }
        Err(_) => {
            tracing::info!(source = %peer, original_dst = %original_destination, verdict = "upstream_timeout", "intercepted connection");
            reset(&stream);
            return;
        }
    };
    let mut upstream = upstream;
    let result = copy_bidirectional(&mut stream, &mut upstream).await;
    let (sent, received) = result.as_ref().map(|&(up, down)| (up, down)).unwrap_or_default();
    tracing::info!(
        source = %peer,
        original_dst = %original_destination,
        verdict = "relayed",
        bytes_sent = sent,
        bytes_received = received,
        "intercepted connection"
    );
}
