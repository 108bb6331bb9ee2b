//! Mirrored requests: a copy sent to the mirror's destination, its answer ignored, bounded in number and time.

use super::*;

impl HttpProxy {
    /// Sends a copy of the request to the mirror's destination, its authority suffixed `-shadow` as Envoy's
    /// shadows are; its response and failures are ignored.
    #[expect(
        clippy::too_many_arguments,
        reason = "the parts of the request being mirrored, borrowed from the forwarding that owns them"
    )]
    pub(super) fn mirror(
        &self,
        policy: &ProxyPolicy,
        mirror: &Mirror,
        parts: &http::request::Parts,
        path_and_query: &PathAndQuery,
        authority: &str,
        body: Bytes,
        connection: &Connection,
    ) {
        let port = mirror.port.unwrap_or(connection.local.port());
        let listener = connection.listener;
        let source = self.workload(connection.peer.ip());
        let viewer = routing::viewer(listener, source.as_deref());
        let Ok(destination) =
            routing::destination(policy, &mirror.host, port, None, listener, connection.local, viewer)
        else {
            tracing::debug!(host = %mirror.host, "mirror destination not reachable; not mirrored");
            return;
        };
        let Ok(tls) = upstream_tls(&destination, &mirror.host) else {
            tracing::debug!(host = %mirror.host, "mirror destination's TLS settings cannot be used; not mirrored");
            return;
        };
        let Ok(place) = self.mirrors.clone().try_acquire_owned() else {
            tracing::debug!(host = %mirror.host, "as many mirrored requests in flight as allowed; not mirrored");
            return;
        };
        let shadow = format!("{}-shadow", routing::host_of(authority));
        let (address, http2, connect) = (destination.address, destination.http2, destination.connect(&policy.upstream));
        let reuse = destination.reuse();
        let (method, headers, path) = (parts.method.clone(), parts.headers.clone(), path_and_query.clone());
        let upstreams = self.upstreams.clone();
        tokio::spawn(async move {
            let outgoing = Outgoing {
                address,
                http2,
                authority: &shadow,
                path_and_query: path,
                method,
                headers,
                connect,
                tls,
                reuse,
            };
            let body = Full::new(body).map_err(|never| match never {}).boxed();
            let mirrored = async {
                if let Ok(response) = upstreams.send(outgoing, body).await {
                    // Read to the end so the connection goes back to the pool.
                    let _ = response.into_body().collect().await;
                }
            };
            if tokio::time::timeout(MIRROR_TIMEOUT, mirrored).await.is_err() {
                tracing::debug!(authority = %shadow, "mirrored request unanswered in time: abandoned");
            }
            drop(place);
        });
    }
}
