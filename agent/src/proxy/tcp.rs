//! TCP relay for intercepted connections that are not HTTP: to the original destination in ALLOW_ANY
//! (PassthroughCluster), refused in REGISTRY_ONLY (BlackHoleCluster); what the kernel allows at L4 never reaches
//! the proxy. Counted in Istio's TCP metrics.

use std::time::Duration;

use tokio::{io::copy_bidirectional, net::TcpStream, time::timeout};

use super::transparent_listener::Intercepted;
use crate::{
    policy::OutboundMode,
    telemetry::connections::{ConnectionMetrics, TcpLabels},
};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Closes with a RST rather than a FIN: the client must not take the close for an answer.
pub fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

pub async fn relay(connection: Intercepted, mode: OutboundMode, metrics: &ConnectionMetrics) {
    let Intercepted { mut stream, peer, original_destination } = connection;
    if mode == OutboundMode::RegistryOnly {
        tracing::info!(source = %peer, original_dst = %original_destination, verdict = "refused", "intercepted connection");
        let labels = TcpLabels::new("BlackHoleCluster", "BlackHoleCluster", "unknown", "");
        metrics.opened(&labels);
        metrics.closed(&labels, 0, 0);
        reset(&stream);
        return;
    }
    let destination = original_destination.to_string();
    let upstream = match timeout(CONNECT_TIMEOUT, TcpStream::connect(original_destination)).await {
        Ok(Ok(upstream)) => upstream,
        failed => {
            let verdict = if failed.is_err() { "upstream_timeout" } else { "upstream_failed" };
            tracing::info!(source = %peer, original_dst = %original_destination, verdict, "intercepted connection");
            let labels = TcpLabels::new(&destination, "PassthroughCluster", "unknown", "UF");
            metrics.opened(&labels);
            metrics.closed(&labels, 0, 0);
            reset(&stream);
            return;
        }
    };
    let labels = TcpLabels::new(&destination, "PassthroughCluster", "unknown", "");
    metrics.opened(&labels);
    let mut upstream = upstream;
    let result = copy_bidirectional(&mut stream, &mut upstream).await;
    let (received, sent) = result.as_ref().map(|&(up, down)| (up, down)).unwrap_or_default();
    metrics.closed(&labels, received, sent);
    tracing::info!(
        source = %peer,
        original_dst = %original_destination,
        verdict = "relayed",
        bytes_sent = received,
        bytes_received = sent,
        "intercepted connection"
    );
}
