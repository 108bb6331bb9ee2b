//! AuthorizationPolicies at the proxy: what a request or a relayed connection offers to them, decided and
//! counted, and a denial logged with the policy that made it, as Envoy reports it
//! (`rbac_access_denied_matched_policy[…]`).

use std::net::SocketAddr;

use http::Request;

use super::{http::Connection, routing::Listener};
use crate::{
    config::workloads::Workload,
    policy::{
        authorization::{HttpRequest, Scope, Subject},
        routes::ProxyPolicy,
    },
    telemetry::requests::{Principal, RequestTelemetry},
};

/// Whether `request` may go on; denied, Envoy's response code details (`rbac_access_denied_matched_policy[…]`).
/// `source`: the workload behind the client's address, when known. `hop`: the Gateway port a mesh route handed
/// the request to (this gateway's own Service), where the gateway's policies decide it as on that port.
pub fn request<B>(
    policy: &ProxyPolicy,
    telemetry: &RequestTelemetry,
    request: &Request<B>,
    authority: &str,
    (connection, source): (&Connection, Option<&Workload>),
    hop: Option<u16>,
) -> Result<(), String> {
    let principal = connection.principal.as_deref();
    let port = match (hop, connection.listener) {
        (Some(port), _) => port,
        // The destination the request names, as the forward proxy will reach it.
        (None, Listener::Forward) => request
            .uri()
            .port_u16()
            .or_else(|| authority.rsplit_once(':').and_then(|(_, port)| port.parse().ok()))
            .unwrap_or(80),
        (None, _) => connection.local.port(),
    };
    let subject = Subject {
        http: Some(HttpRequest {
            method: request.method().as_str(),
            path: request.uri().path(),
            host: authority,
            headers: request.headers(),
        }),
        sni: None,
        source_ip: connection.peer.ip(),
        source_namespace: namespace_of(principal, source),
        principal: principal.map(spiffe_id),
        destination_ip: connection.local.ip(),
        destination_port: port,
    };
    let scope = match (hop, connection.listener) {
        (Some(_), _) | (None, Listener::Gateway(_)) => Scope::Gateway,
        (None, Listener::Mesh | Listener::Forward) => Scope::Workload(source),
    };
    decided(policy, telemetry, scope, &subject, connection.peer)
}

/// Whether a TLS or TCP connection from `peer` to `dialled` (on a Gateway port: `gateway`) may be relayed; a
/// client whose TLS the gateway terminated is known by its certificate's identity (`principal`). Denied, Envoy's
/// connection termination details (`rbac_access_denied_matched_policy[…]`).
pub fn connection(
    policy: &ProxyPolicy,
    telemetry: &RequestTelemetry,
    (server_name, principal): (Option<&str>, Option<&Principal>),
    (peer, dialled): (SocketAddr, SocketAddr),
    gateway: bool,
    source: Option<&Workload>,
) -> Result<(), String> {
    let subject = Subject {
        http: None,
        sni: server_name,
        source_ip: peer.ip(),
        source_namespace: namespace_of(principal, source),
        principal: principal.map(spiffe_id),
        destination_ip: dialled.ip(),
        destination_port: dialled.port(),
    };
    let scope = if gateway { Scope::Gateway } else { Scope::Workload(source) };
    decided(policy, telemetry, scope, &subject, peer)
}

/// The client's namespace: its verified identity's, else its pod's.
fn namespace_of<'a>(principal: Option<&'a Principal>, source: Option<&'a Workload>) -> Option<&'a str> {
    let verified = principal.and_then(|principal| principal.namespace.as_ref().map(|namespace| namespace.as_str()));
    verified.or(source.map(|source| &*source.namespace))
}

/// An identity as Istio's `principals` name it: the SPIFFE ID without its scheme.
fn spiffe_id(principal: &Principal) -> &str {
    principal.spiffe.as_str().trim_start_matches("spiffe://")
}

fn decided(
    policy: &ProxyPolicy,
    telemetry: &RequestTelemetry,
    scope: Scope<'_>,
    subject: &Subject<'_>,
    peer: SocketAddr,
) -> Result<(), String> {
    if policy.authorization.is_empty() {
        return Ok(());
    }
    let verdict = policy.authorization.decide(scope, subject);
    telemetry.authorization(&verdict);
    if !verdict.denied {
        return Ok(());
    }
    let matched = verdict.policy.as_ref().map_or("none", |(policy, _)| &**policy);
    let details = format!("rbac_access_denied_matched_policy[{matched}]");
    tracing::debug!(
        source = %peer,
        destination_port = subject.destination_port,
        sni = subject.sni.unwrap_or("-"),
        %details,
        "denied by AuthorizationPolicy"
    );
    Err(details)
}
