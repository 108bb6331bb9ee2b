//! The proxy's route table, compiled from the configuration in force: the hosts the registry knows (with their
//! ports and endpoints), and each context's VirtualService HTTP routes in declaration order (first match wins,
//! as Istio orders them). Everything a request needs is computed here; a request only looks up and matches.

mod by_address;
mod compile;
mod delegation;
mod interner;
mod l4_routes;
mod registry;
mod route;
#[cfg(test)]
mod tests;
mod visibility;

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    num::NonZeroU32,
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use ipnet::IpNet;
use regex::Regex;

use super::labels::{interned, DestinationLabels};
use super::{
    bindings::{self, Bindings},
    clusters::{
        settings_for_port, with_labels, Cluster, ClusterEndpoint, ClusterPolicy, ClusterStates, Endpoint, Keepalive,
        LoadBalance, UpstreamDefaults,
    },
    host_match::HostTable,
    http_match::{RegexCache, RequestMatch},
    sidecars::SidecarModes,
    OutboundMode,
};
pub use super::{certificates::CredentialSource, tls_servers::TlsServer};
use crate::allocator::transient;
use crate::config::{
    destination_rule::{DestinationRule, TrafficPolicy},
    fields::{parse_duration, Destination, HeaderOperations, Headers, Pairs},
    gateway::Server,
    resolver::Resolved,
    service_entry::{is_http, is_http2, is_tls, parse_address, Resolution, ServiceEntry},
    virtual_service::{HttpRoute, RouteDestination},
    workloads::Workload,
    Snapshot, Spec,
};

use by_address::AddressIndex;
pub use compile::*;
use interner::*;
pub use l4_routes::*;
pub use registry::*;
pub use route::*;
pub use visibility::*;

/// What the node, not the mesh, decides for the proxy.
#[derive(Clone, Debug, Default)]
pub struct ProxySettings {
    /// This gateway's own Service hosts: a mesh route to one continues in the gateway context.
    pub own_services: Vec<String>,
    pub host_verify: HostVerify,
    /// The namespace this gateway runs in, whose view of the configuration (`exportTo`, DestinationRules) its
    /// Gateway ports have; unknown, they see every resource.
    pub gateway_namespace: Option<String>,
    /// The HTTP/1.1 upgrades forwarded (Envoy's `upgrade_configs`; Istio configures `websocket`), lowercase.
    pub upgrades: Vec<String>,
    /// Where Gateway servers' `credentialName`s are read from.
    pub credentials: CredentialSource,
    /// This gateway's labels (`--gateway-labels`): which AuthorizationPolicies select it.
    pub gateway_labels: BTreeMap<String, String>,
}

/// What becomes of an intercepted request whose Host is registered at addresses that do not include the one
/// the client connected to (domain fronting, or a stale DNS answer).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum HostVerify {
    /// Refused (421 Misdirected Request).
    #[default]
    Strict,
    /// Sent to the host's own addresses.
    Route,
    /// Trusted: sent where the host's resolution says (the original destination for resolution NONE).
    Off,
}

impl HostVerify {
    pub fn name(self) -> &'static str {
        match self {
            HostVerify::Strict => "strict",
            HostVerify::Route => "route",
            HostVerify::Off => "off",
        }
    }
}

/// Everything the proxy decides with, swapped whole when the configuration changes.
#[derive(Debug, Default)]
pub struct ProxyPolicy {
    /// The outbound mode of each source workload (its Sidecar's, else the mesh's).
    pub sidecars: Arc<SidecarModes>,
    pub host_verify: HostVerify,
    /// The HTTP/1.1 upgrades forwarded, lowercase; a request asking for another is refused.
    upgrades: Box<[String]>,
    /// Whether some host is registered at no address under `--host-verify strict`: requests for such hosts have
    /// their Host checked by DNS (known when compiled, so that no other request looks for them).
    pub verifies_hosts_by_dns: bool,
    /// How request paths are normalized before they are matched and forwarded (the mesh config's).
    pub path_normalization: crate::config::mesh::PathNormalization,
    /// What upstream connections get where no DestinationRule says (the mesh config's).
    pub upstream: UpstreamDefaults,
    /// Host → what the registry and the mesh's routes hold for it: one table, so that a request's host is
    /// found once for both.
    hosts: HostTable<Host>,
    /// The same services by the addresses they are known at.
    by_address: AddressIndex,
    /// The selected Gateways' routes, for traffic sent to their ports.
    pub gateways: Vec<GatewayRoutes>,
    /// How each of their ports serves its connections (made from `gateways` as the policy compiles).
    gateway_ports: BTreeMap<u16, GatewayPort>,
    own_services: Vec<String>,
    /// This gateway as a viewer of the configuration on its Gateway ports: a workload of its namespace, when
    /// known.
    gateway: Option<Workload>,
    /// The AuthorizationPolicies in force.
    pub authorization: crate::policy::authorization::Authorization,
}

/// What the policy holds for one host (exact or wildcard), in its table's slot: a lookup reads no other
/// allocation to reach the services or the routes.
#[derive(Debug, Default)]
struct Host {
    /// The first of the services ServiceEntries register under the host (in declaration order; each holds the
    /// next): one pointer in the slot, however many there are.
    services: Option<Arc<Service>>,
    /// The routes for intercepted traffic.
    mesh: Option<VirtualHost>,
    /// The `tls` and `tcp` routes for intercepted traffic, when its VirtualServices have any: boxed, as most
    /// hosts have none (a slot is as large as what most hosts hold).
    mesh_l4: Option<Box<MeshL4Routes>>,
}

#[derive(Debug)]
struct MeshL4Routes {
    /// The `tls` routes, by the ClientHello's server name.
    tls: Option<L4Routes>,
    /// The `tcp` routes, for traffic to the host's addresses.
    tcp: Option<L4Routes>,
}

/// One selected Gateway: its server ports and the routes bound to it.
/// How a Gateway port serves the connections accepted on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GatewayPort {
    /// Its servers terminate TLS: the ClientHello picks the server.
    TerminatesTls,
    /// A TCP server port: relayed by the Gateways' `tcp` routes at once (the client may wait for the server to
    /// speak first).
    Tcp,
    /// Its servers only pass TLS through: the ClientHello is read at once, and a client that sends anything else
    /// is refused, as Envoy's listener, finding no TLS, matches none of its filter chains.
    PassesTlsThrough,
    /// What the client's first bytes say: HTTP, or TLS passed through.
    Detected,
}

#[derive(Debug)]
pub struct GatewayRoutes {
    /// `namespace/name`.
    pub id: String,
    /// Server ports with an HTTP protocol (HTTP, HTTP2, GRPC, GRPC-WEB).
    pub http_ports: Vec<u16>,
    pub hosts: HostTable<VirtualHost>,
    /// Server ports whose TLS passes through (`tls.mode: PASSTHROUGH`): connections routed by server name.
    pub tls_ports: Vec<u16>,
    pub tls_hosts: HostTable<Option<L4Routes>>,
    /// Server ports with protocol `TCP`: connections routed by the `tcp` routes bound to the Gateway.
    pub tcp_ports: Vec<u16>,
    pub tcp_routes: Option<L4Routes>,
    /// Servers terminating TLS: with protocol HTTPS their requests take the `http` routes, as on the Gateway's
    /// HTTP ports (their ports are among `http_ports`); with protocol TLS the bytes inside take the `tcp` routes
    /// (their ports are among `tcp_ports`).
    pub tls_servers: Vec<TlsServer>,
    /// HTTP server ports with `tls.httpsRedirect`: their requests are answered 301 to HTTPS.
    pub https_redirect_ports: Vec<u16>,
}

impl GatewayRoutes {
    /// The `tls` routes bound to this Gateway for `server_name`.
    pub fn tls_routes(&self, server_name: &str) -> Option<&L4Routes> {
        self.tls_hosts.find(server_name, |routes| routes.as_ref())
    }
}

impl ProxyPolicy {
    /// Whether an `Upgrade: protocol` request is forwarded.
    pub fn allows_upgrade(&self, protocol: &HeaderValue) -> bool {
        self.upgrades.iter().any(|allowed| protocol.as_bytes().eq_ignore_ascii_case(allowed.as_bytes()))
    }

    /// The service registered for `host` (a Host, an authority or a destination host) on `port`; `None` when no
    /// ServiceEntry has it on that port (BlackHoleCluster in REGISTRY_ONLY, PassthroughCluster otherwise).
    pub fn registered(&self, host: &str, port: u16) -> Option<&Service> {
        self.registered_for(host, port, Viewer::Gateway)
    }

    /// The service registered for `host` on `port` that `viewer` sees: for the workloads' traffic, exported to
    /// the source's namespace (`exportTo`; an unknown source sees all) and imported by its Sidecar.
    pub fn registered_for(&self, host: &str, port: u16, viewer: Viewer<'_>) -> Option<&Service> {
        let visible = |s: &&Service| s.has_port(port) && viewer.sees(self, &s.exported, &s.host, port);
        let first = self.hosts.find(host, |entry| entry.services.as_deref());
        std::iter::successors(first, |service| service.next().map(|next| &**next)).find(visible)
    }

    /// The service registered on `address`'s port at its address that `viewer` sees: for a connection that
    /// names no host.
    pub fn registered_at(&self, address: SocketAddr, viewer: Viewer<'_>) -> Option<&Service> {
        let port = address.port();
        self.by_address
            .at(address.ip(), port)
            .find(|s| s.has_port(port) && viewer.sees(self, &s.exported, &s.host, port))
    }

    /// The routes for intercepted traffic to `authority`: of the VirtualServices bound to the mesh.
    pub fn mesh_routes(&self, authority: &str) -> Option<&VirtualHost> {
        self.hosts.find(authority, |entry| entry.mesh.as_ref())
    }

    /// Whether `host` is this gateway's own Service.
    pub fn is_own_service(&self, host: &str) -> bool {
        self.own_services.iter().any(|own| own.eq_ignore_ascii_case(host.trim_end_matches('.')))
    }

    /// Every port a selected Gateway serves, HTTP or TLS passed through.
    pub fn gateway_ports(&self) -> std::collections::BTreeSet<u16> {
        let ports = |gateway: &GatewayRoutes| {
            gateway.http_ports.iter().chain(&gateway.tls_ports).chain(&gateway.tcp_ports).copied().collect::<Vec<_>>()
        };
        self.gateways.iter().flat_map(ports).collect()
    }

    /// How connections accepted on the Gateway port `port` are served.
    pub fn gateway_port(&self, port: u16) -> GatewayPort {
        self.gateway_ports.get(&port).copied().unwrap_or(GatewayPort::Detected)
    }

    /// The Gateways serving TCP on `port`, with their `tcp` routes.
    pub fn tcp_gateways_on(&self, port: u16) -> impl Iterator<Item = &GatewayRoutes> {
        self.gateways.iter().filter(move |gateway| gateway.tcp_ports.contains(&port))
    }

    /// The `tcp` routes for intercepted traffic to `host` (a registered service's host).
    pub fn mesh_tcp_routes(&self, host: &str) -> Option<&L4Routes> {
        self.hosts.find(host, |entry| entry.mesh_l4.as_ref()?.tcp.as_ref())
    }

    /// The Gateways passing TLS through on `port`, with their `tls` routes.
    pub fn tls_gateways_on(&self, port: u16) -> impl Iterator<Item = &GatewayRoutes> {
        self.gateways.iter().filter(move |gateway| gateway.tls_ports.contains(&port))
    }

    /// The `tls` routes for intercepted traffic whose ClientHello names `server_name`.
    pub fn mesh_tls_routes(&self, server_name: &str) -> Option<&L4Routes> {
        self.hosts.find(server_name, |entry| entry.mesh_l4.as_ref()?.tls.as_ref())
    }

    /// The servers terminating TLS on `port`, of every selected Gateway.
    pub fn tls_servers_on(&self, port: u16) -> impl Iterator<Item = &TlsServer> {
        self.gateways.iter().flat_map(|gateway| &gateway.tls_servers).filter(move |server| server.port == port)
    }

    /// The routes of the Gateway listening on `port`, with the Gateway's id.
    pub fn gateway_on(&self, port: u16) -> Option<&GatewayRoutes> {
        self.gateways.iter().find(|gateway| gateway.http_ports.contains(&port))
    }
}
