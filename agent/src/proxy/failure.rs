//! Why the proxy answered a request itself, and the one place that turns each reason into the status, Envoy
//! response flag and body a client (and its runbooks) expect from an Envoy-based egress gateway.

use http::StatusCode;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The request names no host, or is otherwise unusable.
    BadRequest,
    /// The request's URI is longer than the proxy takes.
    UriTooLong,
    /// No route of the VirtualServices for the host matches (or no host is served on a Gateway port).
    NoRoute,
    /// REGISTRY_ONLY and the destination host is registered by no ServiceEntry on that port.
    Blackholed,
    /// `--host-verify strict`: the Host is registered at addresses that do not include the one the client
    /// connected to.
    HostMismatch,
    /// The destination is known but has no cluster this context can reach (an unregistered host behind a
    /// Gateway, or a NONE-resolution host, which only intercepted traffic has an address for).
    NoCluster,
    /// Registered, but no endpoint address is known now (a DNS name not yet, or no longer, resolved).
    NoHealthyUpstream,
    /// The host a forward-proxied request names could not be looked up.
    DnsFailure,
    /// The cluster's connection-pool limits are reached (in flight and pending).
    Overflow,
    /// Connecting to the upstream failed (refused, unreachable, connect timeout).
    UpstreamConnect,
    /// The destination's DestinationRule originates TLS with settings that cannot be used (a file missing, a
    /// Secret named): refused rather than sent in the clear.
    TlsOrigination,
    /// The upstream closed or reset the connection before answering.
    UpstreamReset,
    /// The route's timeout passed before the upstream answered.
    UpstreamTimeout,
    /// The destination is the gateway node itself (loopback, link-local, one of its addresses): the proxy does
    /// not act for a client with the node's identity.
    LocalDestination,
    /// The request asks to upgrade to a protocol the proxy does not forward (not in `--allow-upgrade`).
    UpgradeNotAllowed,
    /// The client sent nothing of the request's body for the stream idle timeout.
    StreamIdleTimeout,
    /// An absolute-form `https://` request on the forward-proxy port: it would be sent in the clear.
    HttpsInTheClear,
    /// The upstream answered nothing for the stream idle timeout (the route sets no timeout of its own).
    UpstreamIdle,
}

impl Failure {
    pub fn status(self) -> StatusCode {
        match self {
            Failure::BadRequest | Failure::HttpsInTheClear => StatusCode::BAD_REQUEST,
            Failure::UriTooLong => StatusCode::URI_TOO_LONG,
            Failure::NoRoute => StatusCode::NOT_FOUND,
            Failure::Blackholed => StatusCode::BAD_GATEWAY,
            Failure::HostMismatch => StatusCode::MISDIRECTED_REQUEST,
            Failure::LocalDestination | Failure::UpgradeNotAllowed => StatusCode::FORBIDDEN,
            Failure::NoCluster
            | Failure::NoHealthyUpstream
            | Failure::DnsFailure
            | Failure::Overflow
            | Failure::UpstreamConnect
            | Failure::TlsOrigination
            | Failure::UpstreamReset => StatusCode::SERVICE_UNAVAILABLE,
            Failure::UpstreamTimeout | Failure::UpstreamIdle => StatusCode::GATEWAY_TIMEOUT,
            Failure::StreamIdleTimeout => StatusCode::REQUEST_TIMEOUT,
        }
    }

    /// Envoy's response flag, as access logs and `istio_requests_total{response_flags}` show it.
    pub fn flag(self) -> &'static str {
        match self {
            Failure::BadRequest | Failure::UriTooLong | Failure::HttpsInTheClear => "DPE",
            Failure::NoRoute => "NR",
            // Envoy routes to the BlackHoleCluster, which has no hosts; Istio's dashboards key on the cluster.
            Failure::Blackholed | Failure::HostMismatch | Failure::LocalDestination | Failure::UpgradeNotAllowed => "-",
            Failure::NoCluster => "NC",
            Failure::NoHealthyUpstream => "UH",
            Failure::DnsFailure => "DF",
            Failure::Overflow => "UO",
            Failure::UpstreamConnect | Failure::TlsOrigination => "UF",
            Failure::UpstreamReset => "UR",
            Failure::UpstreamTimeout => "UT",
            Failure::StreamIdleTimeout | Failure::UpstreamIdle => "SI",
        }
    }

    /// Envoy's body for the same local reply.
    pub fn body(self) -> &'static str {
        match self {
            Failure::BadRequest => "bad request: no host\n",
            Failure::HttpsInTheClear => "https:// is tunnelled with CONNECT, never sent in the clear\n",
            Failure::UriTooLong => "URI too long\n",
            Failure::NoRoute | Failure::Blackholed | Failure::UpgradeNotAllowed => "",
            Failure::HostMismatch => "the host is not served at the address connected to\n",
            Failure::NoCluster => "no cluster for the destination\n",
            Failure::NoHealthyUpstream => "no healthy upstream",
            Failure::DnsFailure => "dns resolution failure",
            Failure::Overflow => "upstream connect error or disconnect/reset before headers. reset reason: overflow",
            Failure::UpstreamConnect => {
                "upstream connect error or disconnect/reset before headers. reset reason: connection failure"
            }
            Failure::TlsOrigination => {
                "upstream connect error or disconnect/reset before headers. reset reason: connection failure, \
                 transport failure reason: the DestinationRule's TLS settings cannot be used"
            }
            Failure::UpstreamReset => {
                "upstream connect error or disconnect/reset before headers. reset reason: connection termination"
            }
            Failure::UpstreamTimeout => "upstream request timeout",
            Failure::StreamIdleTimeout | Failure::UpstreamIdle => "stream timeout",
            Failure::LocalDestination => "destination refused: it is the gateway node itself\n",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_failure_answers_as_envoy_does() {
        let cases = [
            (Failure::NoRoute, 404, "NR"),
            (Failure::Blackholed, 502, "-"),
            (Failure::NoHealthyUpstream, 503, "UH"),
            (Failure::UpstreamConnect, 503, "UF"),
            (Failure::UpstreamReset, 503, "UR"),
            (Failure::UpstreamTimeout, 504, "UT"),
            (Failure::LocalDestination, 403, "-"),
            (Failure::UpgradeNotAllowed, 403, "-"),
            (Failure::StreamIdleTimeout, 408, "SI"),
            (Failure::HttpsInTheClear, 400, "DPE"),
            (Failure::UpstreamIdle, 504, "SI"),
        ];
        for (failure, status, flag) in cases {
            assert_eq!((failure.status().as_u16(), failure.flag()), (status, flag), "{failure:?}");
        }
    }
}
