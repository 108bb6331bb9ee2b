//! Why the proxy answered a request itself, and the one place that turns each reason into the status, Envoy
//! response flag and body a client (and its runbooks) expect from an Envoy-based egress gateway.

use http::StatusCode;

use crate::telemetry::response_flags::ResponseFlag;

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
    /// The upstream's response head broke HTTP (framing that cannot be read one way only, a malformed head).
    UpstreamProtocolError,
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
    /// An AuthorizationPolicy denies the request.
    AccessDenied,
    /// The proxy is past `--max-memory`: new requests are shed until it is below again.
    Overloaded,
}

impl Failure {
    pub fn status(self) -> StatusCode {
        match self {
            Failure::BadRequest | Failure::HttpsInTheClear => StatusCode::BAD_REQUEST,
            Failure::UriTooLong => StatusCode::URI_TOO_LONG,
            Failure::NoRoute => StatusCode::NOT_FOUND,
            Failure::Blackholed => StatusCode::BAD_GATEWAY,
            Failure::HostMismatch => StatusCode::MISDIRECTED_REQUEST,
            Failure::LocalDestination | Failure::UpgradeNotAllowed | Failure::AccessDenied => StatusCode::FORBIDDEN,
            Failure::NoCluster
            | Failure::NoHealthyUpstream
            | Failure::DnsFailure
            | Failure::Overflow
            | Failure::UpstreamConnect
            | Failure::TlsOrigination
            | Failure::UpstreamReset
            | Failure::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            Failure::UpstreamTimeout | Failure::UpstreamIdle => StatusCode::GATEWAY_TIMEOUT,
            Failure::UpstreamProtocolError => StatusCode::BAD_GATEWAY,
            Failure::StreamIdleTimeout => StatusCode::REQUEST_TIMEOUT,
        }
    }

    /// Envoy's response flag, as access logs and `istio_requests_total{response_flags}` show it.
    pub fn flag(self) -> ResponseFlag {
        match self {
            Failure::BadRequest | Failure::UriTooLong | Failure::HttpsInTheClear => {
                ResponseFlag::DownstreamProtocolError
            }
            Failure::NoRoute => ResponseFlag::NoRouteFound,
            // Envoy routes to the BlackHoleCluster, which has no hosts; Istio's dashboards key on the cluster.
            // Envoy's RBAC filter sets no flag: its denials show in the response code details.
            Failure::Blackholed
            | Failure::HostMismatch
            | Failure::LocalDestination
            | Failure::UpgradeNotAllowed
            | Failure::AccessDenied => ResponseFlag::None,
            Failure::NoCluster => ResponseFlag::NoClusterFound,
            Failure::NoHealthyUpstream => ResponseFlag::NoHealthyUpstream,
            Failure::DnsFailure => ResponseFlag::DnsResolutionFailed,
            Failure::Overflow => ResponseFlag::UpstreamOverflow,
            Failure::UpstreamConnect | Failure::TlsOrigination => ResponseFlag::UpstreamConnectionFailure,
            Failure::UpstreamReset => ResponseFlag::UpstreamConnectionTermination,
            Failure::UpstreamProtocolError => ResponseFlag::UpstreamProtocolError,
            Failure::UpstreamTimeout => ResponseFlag::UpstreamRequestTimeout,
            Failure::StreamIdleTimeout | Failure::UpstreamIdle => ResponseFlag::StreamIdleTimeout,
            Failure::Overloaded => ResponseFlag::OverloadManager,
        }
    }

    /// Envoy's `%RESPONSE_CODE_DETAILS%` for the same local reply (Istio's `block_all` route answers REGISTRY_ONLY's
    /// 502 directly); `None` where Envoy has no such reply (then the log shows `-`).
    pub fn details(self) -> Option<&'static str> {
        Some(match self {
            Failure::BadRequest | Failure::UriTooLong | Failure::HttpsInTheClear => return None,
            Failure::HostMismatch | Failure::LocalDestination => return None,
            Failure::NoRoute => "route_not_found",
            Failure::Blackholed => "direct_response",
            Failure::NoCluster => "cluster_not_found",
            Failure::NoHealthyUpstream => "no_healthy_upstream",
            Failure::DnsFailure => "dns_resolution_failure",
            Failure::Overflow => "upstream_reset_before_response_started{overflow}",
            Failure::UpstreamConnect => "upstream_reset_before_response_started{remote_connection_failure}",
            // As Envoy says of a DestinationRule's `credentialName` it has no certificate for.
            Failure::TlsOrigination => {
                "upstream_reset_before_response_started{remote_connection_failure|TLS_error:_Secret_is_not_supplied_by_SDS}"
            }
            Failure::UpstreamReset => "upstream_reset_before_response_started{connection_termination}",
            Failure::UpstreamProtocolError => "upstream_reset_before_response_started{protocol_error}",
            Failure::UpstreamTimeout => "response_timeout",
            Failure::StreamIdleTimeout | Failure::UpstreamIdle => "stream_idle_timeout",
            Failure::UpgradeNotAllowed => "upgrade_failed",
            Failure::AccessDenied => "rbac_access_denied_matched_policy[none]",
            Failure::Overloaded => "overload",
        })
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
            Failure::UpstreamProtocolError => {
                "upstream connect error or disconnect/reset before headers. reset reason: protocol error"
            }
            Failure::UpstreamTimeout => "upstream request timeout",
            Failure::StreamIdleTimeout | Failure::UpstreamIdle => "stream timeout",
            Failure::LocalDestination => "destination refused: it is the gateway node itself\n",
            Failure::AccessDenied => "RBAC: access denied",
            Failure::Overloaded => "overloaded\n",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_failure_answers_as_envoy_does() {
        // Every variant, with the status, flag and body an Envoy-based gateway answers it with.
        let cases = [
            (Failure::BadRequest, 400, "DPE", "bad request: no host\n"),
            (Failure::UriTooLong, 414, "DPE", "URI too long\n"),
            (Failure::NoRoute, 404, "NR", ""),
            (Failure::Blackholed, 502, "-", ""),
            (Failure::HostMismatch, 421, "-", "the host is not served at the address connected to\n"),
            (Failure::NoCluster, 503, "NC", "no cluster for the destination\n"),
            (Failure::NoHealthyUpstream, 503, "UH", "no healthy upstream"),
            (Failure::DnsFailure, 503, "DF", "dns resolution failure"),
            (
                Failure::Overflow,
                503,
                "UO",
                "upstream connect error or disconnect/reset before headers. reset reason: overflow",
            ),
            (
                Failure::UpstreamConnect,
                503,
                "UF",
                "upstream connect error or disconnect/reset before headers. reset reason: connection failure",
            ),
            (
                Failure::TlsOrigination,
                503,
                "UF",
                "upstream connect error or disconnect/reset before headers. reset reason: connection failure, \
                 transport failure reason: the DestinationRule's TLS settings cannot be used",
            ),
            (
                Failure::UpstreamProtocolError,
                502,
                "UPE",
                "upstream connect error or disconnect/reset before headers. reset reason: protocol error",
            ),
            (
                Failure::UpstreamReset,
                503,
                "UR",
                "upstream connect error or disconnect/reset before headers. reset reason: connection termination",
            ),
            (Failure::UpstreamTimeout, 504, "UT", "upstream request timeout"),
            (Failure::LocalDestination, 403, "-", "destination refused: it is the gateway node itself\n"),
            (Failure::UpgradeNotAllowed, 403, "-", ""),
            (Failure::StreamIdleTimeout, 408, "SI", "stream timeout"),
            (Failure::HttpsInTheClear, 400, "DPE", "https:// is tunnelled with CONNECT, never sent in the clear\n"),
            (Failure::UpstreamIdle, 504, "SI", "stream timeout"),
            (Failure::AccessDenied, 403, "-", "RBAC: access denied"),
            (Failure::Overloaded, 503, "OM", "overloaded\n"),
        ];
        for (failure, status, flag, body) in cases {
            assert_eq!(
                (failure.status().as_u16(), failure.flag().text(), failure.body()),
                (status, flag, body),
                "{failure:?}"
            );
        }
        // A variant added without a row here fails to compile: the match lists every one.
        for (failure, ..) in cases {
            match failure {
                Failure::BadRequest
                | Failure::UriTooLong
                | Failure::NoRoute
                | Failure::Blackholed
                | Failure::HostMismatch
                | Failure::NoCluster
                | Failure::NoHealthyUpstream
                | Failure::DnsFailure
                | Failure::UpstreamProtocolError
                | Failure::Overflow
                | Failure::UpstreamConnect
                | Failure::TlsOrigination
                | Failure::UpstreamReset
                | Failure::AccessDenied
                | Failure::UpstreamTimeout
                | Failure::LocalDestination
                | Failure::UpgradeNotAllowed
                | Failure::StreamIdleTimeout
                | Failure::HttpsInTheClear
                | Failure::UpstreamIdle
                | Failure::Overloaded => {}
            }
        }
        assert_eq!(cases.len(), 21);
    }

    #[test]
    fn local_replies_carry_envoys_response_code_details() {
        let cases = [
            (Failure::NoRoute, Some("route_not_found")),
            (Failure::Blackholed, Some("direct_response")),
            (Failure::NoHealthyUpstream, Some("no_healthy_upstream")),
            (Failure::Overflow, Some("upstream_reset_before_response_started{overflow}")),
            (Failure::UpstreamReset, Some("upstream_reset_before_response_started{connection_termination}")),
            (Failure::UpstreamTimeout, Some("response_timeout")),
            (Failure::UpstreamIdle, Some("stream_idle_timeout")),
            (Failure::HostMismatch, None),
        ];
        for (failure, details) in cases {
            assert_eq!(failure.details(), details, "{failure:?}");
        }
    }
}
