//! What is known of one request once it has ended — the record its metrics and access-log line are made from — and
//! what the client's connection tells of it (its verified identity, how it was secured).

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use http::{uri::PathAndQuery, HeaderValue, Method};

use super::{Label, Scope};
use crate::{
    policy::labels::{DestinationLabels, LabelText, UNKNOWN},
    telemetry::response_flags::ResponseFlag,
};

/// Everything known of one request once it has ended.
///
/// What the request said of itself (method, path, authority, the headers a line shows) is kept as the request's own
/// values — reference-counted, not copied — and made text only if a line is written: most requests under a filter
/// such as "errors only" never are.
#[derive(Debug, Default)]
pub struct RequestRecord {
    pub start: Option<SystemTime>,
    pub method: Option<Method>,
    pub path: Option<PathAndQuery>,
    pub protocol: &'static str,
    /// A gRPC request (`content-type: application/grpc…`), which Istio labels `request_protocol="grpc"`.
    pub grpc: bool,
    pub response_code: u16,
    pub response_flags: ResponseFlag,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub duration: Duration,
    pub upstream_service_time: Option<Duration>,
    pub x_forwarded_for: Option<HeaderValue>,
    pub user_agent: Option<HeaderValue>,
    pub request_id: Option<HeaderValue>,
    /// The URI's authority (absolute form, HTTP/2), else `Host`.
    pub authority: Option<HeaderValue>,
    pub upstream_host: Option<std::net::SocketAddr>,
    /// The address the upstream connection left from.
    pub upstream_local: Option<std::net::SocketAddr>,
    /// Why no connection to the upstream could be made (`delayed connect error: Connection refused`, a TLS
    /// handshake's `TLS_error:|…`), as Envoy writes it.
    pub upstream_transport_failure_reason: Option<Box<str>>,
    pub route_name: Option<crate::policy::routes::RouteName>,
    pub downstream_remote: Option<std::net::SocketAddr>,
    pub downstream_local: Option<std::net::SocketAddr>,
    /// The workload that sent the request and its namespace, when known.
    pub source_workload: Option<Label>,
    pub source_workload_namespace: Option<Label>,
    /// The SPIFFE identity of the client's certificate, where the gateway verified one.
    pub source_principal: Option<Label>,
    /// The destination (and Envoy cluster) the request went to, when it got that far.
    pub destination: Option<DestinationLabels>,
    pub connection_security: ConnectionSecurity,
    /// The name the client's ClientHello asked for, where the gateway terminated its TLS (`%REQUESTED_SERVER_NAME%`).
    pub server_name: Option<Arc<str>>,
    /// Why the proxy answered as it did, where Envoy says more than the flag (an RBAC denial's
    /// `rbac_access_denied_matched_policy[…]`, `route_not_found`, an upstream reset's `upstream_reset_before_…`).
    pub response_code_details: Option<Box<str>>,
    /// For a `CONNECT` tunnel or an upgraded connection, the relay engine that carried its bytes (the JSON line's
    /// `relay_engine`, as on the relayed TCP connections' lines).
    pub relay_engine: Option<&'static str>,
    /// The request headers the access log's format reads beyond the fields above, as they came.
    pub captured_headers: Vec<(http::HeaderName, Box<str>)>,
    /// The upstream's response headers the access log's format (or filter) reads, as they came.
    pub captured_response_headers: Vec<(http::HeaderName, Box<str>)>,
    /// The source workload's own telemetry, where a Telemetry resource scopes to it.
    pub telemetry_scope: Option<Arc<Scope>>,
    /// The telemetry configuration in force as the request began, which counts and logs it.
    pub telemetry: Option<Arc<super::TelemetryInForce>>,
}

/// The identity a client's verified certificate carries: its SPIFFE URI (`spiffe://TRUST-DOMAIN/ns/NS/sa/SA`,
/// `source_principal`) and the namespace in it (`source_workload_namespace` where the pods are not watched).
#[derive(Debug)]
pub struct Principal {
    pub spiffe: Label,
    pub namespace: Option<Label>,
}

impl Principal {
    /// The SPIFFE identity among a certificate's names, if it has one.
    pub fn from_names(names: &[String]) -> Option<Principal> {
        let spiffe = names.iter().find(|name| name.starts_with("spiffe://"))?;
        let mut segments = spiffe.trim_start_matches("spiffe://").split('/').skip(1);
        let namespace = match (segments.next(), segments.next()) {
            (Some("ns"), Some(namespace)) if !namespace.is_empty() => {
                Some(LabelText::from(Arc::<str>::from(namespace)))
            }
            _ => None,
        };
        Some(Principal { spiffe: LabelText::from(Arc::<str>::from(spiffe.as_str())), namespace })
    }
}

/// What secured the client's connection to the gateway, for `connection_security_policy`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ConnectionSecurity {
    /// Plain text, or TLS the gateway did not terminate: Istio's `unknown`, as a source reports it.
    #[default]
    Unknown,
    /// TLS terminated at the gateway, the client presenting no certificate: `none`.
    Tls,
    /// TLS terminated at the gateway with a client certificate it verified: `mutual_tls`.
    MutualTls,
}

impl ConnectionSecurity {
    pub fn label(self) -> Label {
        match self {
            ConnectionSecurity::Unknown => UNKNOWN,
            ConnectionSecurity::Tls => LabelText::Static(&"none"),
            ConnectionSecurity::MutualTls => LabelText::Static(&"mutual_tls"),
        }
    }
}

impl RequestRecord {
    /// The request's method, empty where its details were not kept.
    pub fn method(&self) -> &str {
        self.method.as_ref().map_or("", Method::as_str)
    }

    /// The request's path and query as forwarded (normalized), empty where not kept.
    pub fn path(&self) -> &str {
        self.path.as_ref().map_or("", PathAndQuery::as_str)
    }

    /// The request's authority, empty where not kept or not text.
    pub fn authority(&self) -> &str {
        text(self.authority.as_ref()).unwrap_or_default()
    }

    pub fn user_agent(&self) -> Option<&str> {
        text(self.user_agent.as_ref())
    }

    pub fn x_forwarded_for(&self) -> Option<&str> {
        text(self.x_forwarded_for.as_ref())
    }

    pub fn request_id(&self) -> Option<&str> {
        text(self.request_id.as_ref())
    }

    /// The Envoy cluster, `-` for a request answered before it had one.
    pub fn upstream_cluster(&self) -> String {
        self.destination.as_ref().map_or_else(|| "-".to_owned(), |destination| destination.cluster().to_string())
    }
}

/// A header's value as text; one with bytes outside visible ASCII (which hyper lets through as obs-text) shows as
/// absent, as it always has in Sluice's lines.
fn text(value: Option<&HeaderValue>) -> Option<&str> {
    value?.to_str().ok()
}
