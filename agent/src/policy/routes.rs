//! The proxy's route table, compiled from the configuration in force: the hosts the registry knows (with their
//! ports and endpoints), and each context's VirtualService HTTP routes in declaration order (first match wins,
//! as Istio orders them). Everything a request needs is computed here; a request only looks up and matches.

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
use smallvec::SmallVec;

use super::{
    bindings::{self, Bindings},
    clusters::{settings_for_port, with_labels, Cluster, ClusterPolicy, ClusterStates, Endpoint, LoadBalance},
    host_match::HostTable,
    http_match::{RegexCache, RequestMatch},
    sidecars::SidecarModes,
    OutboundMode,
};
use crate::allocator::transient;
use crate::config::{
    destination_rule::{DestinationRule, TrafficPolicy},
    fields::{parse_duration, HeaderOperations, Headers, Pairs},
    resolver::Resolved,
    service_entry::{is_http, is_http2, parse_address, Resolution, ServiceEntry},
    virtual_service::{HttpRoute, HttpRouteDestination},
    workloads::Workload,
    Snapshot, Spec,
};
use crate::telemetry::labels::{interned, DestinationLabels};

/// What the node, not the mesh, decides for the proxy.
#[derive(Clone, Debug, Default)]
pub struct ProxySettings {
    /// The mesh's outbound mode (the mesh config's, or what overrides it); Sidecars refine it per workload.
    pub mode: OutboundMode,
    /// This gateway's own Service hosts: a mesh route to one continues in the gateway context.
    pub own_services: Vec<String>,
    pub host_verify: HostVerify,
    /// The namespace this gateway runs in, whose view of the configuration (`exportTo`, DestinationRules) its
    /// Gateway ports have; unknown, they see every resource.
    pub gateway_namespace: Option<String>,
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
    pub sidecars: SidecarModes,
    pub host_verify: HostVerify,
    /// Host → what the registry and the mesh's routes hold for it: one table, so that a request's host is
    /// found once for both.
    hosts: HostTable<Host>,
    /// The selected Gateways' routes, for traffic sent to their ports.
    pub gateways: Vec<GatewayRoutes>,
    own_services: Vec<String>,
    /// This gateway as a viewer of the configuration on its Gateway ports: a workload of its namespace, when
    /// known.
    gateway: Option<Workload>,
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
}

/// One selected Gateway: its server ports and the routes bound to it.
#[derive(Debug)]
pub struct GatewayRoutes {
    /// `namespace/name`.
    pub id: String,
    /// Server ports with an HTTP protocol (HTTP, HTTP2, GRPC, GRPC-WEB).
    pub http_ports: Vec<u16>,
    pub hosts: HostTable<VirtualHost>,
}

/// Who looks a host up: the gateway for its Gateway ports (what is exported to its namespace, the mesh's mode;
/// Sidecars are for workloads), or the workloads' own traffic from a known workload or an unknown one.
#[derive(Clone, Copy, Debug)]
pub enum Viewer<'a> {
    Gateway,
    Workload(Option<&'a Workload>),
}

impl Viewer<'_> {
    /// Whether this viewer sees a resource `exported` so, for `host` on `port`.
    pub fn sees(self, policy: &ProxyPolicy, exported: &Exported, host: &str, port: u16) -> bool {
        let Exported { namespace, visible_to } = exported;
        match self {
            Viewer::Gateway => visible_to.admits(policy.gateway.as_ref().map(|gateway| &*gateway.namespace)),
            Viewer::Workload(source) => {
                visible_to.admits(source.map(|source| &*source.namespace))
                    && policy.sidecars.imports(source, namespace, host, port)
            }
        }
    }

    /// The outbound mode for what this viewer sends that nothing registers.
    pub fn mode(self, policy: &ProxyPolicy) -> OutboundMode {
        match self {
            Viewer::Gateway => policy.sidecars.mesh(),
            Viewer::Workload(source) => policy.sidecars.mode_for(source),
        }
    }
}

/// Where a resource lives and who sees it: one of these is shared by every service and VirtualService of the
/// policy that lives and is exported alike (most of a namespace's are).
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Exported {
    pub namespace: Arc<str>,
    /// Its `exportTo`.
    pub visible_to: Visibility,
}

/// Which namespaces' workloads see a resource (`exportTo`): all (`*`, or nothing said: Istio's default), or the
/// ones listed (`.` is the resource's own; `~` none).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum Visibility {
    #[default]
    All,
    Only(Box<[String]>),
}

impl Visibility {
    /// `export_to` as a resource in `namespace` sets it, or when it sets none, `default` (the mesh config's).
    pub fn compile_or(export_to: &[String], default: &[String], namespace: &str) -> Visibility {
        Visibility::compile(if export_to.is_empty() { default } else { export_to }, namespace)
    }

    pub fn compile(export_to: &[String], namespace: &str) -> Visibility {
        if export_to.is_empty() || export_to.iter().any(|to| to == "*") {
            return Visibility::All;
        }
        let namespaces = export_to
            .iter()
            .filter(|to| *to != "~")
            .map(|to| if to == "." { namespace.to_owned() } else { to.clone() })
            .collect();
        Visibility::Only(namespaces)
    }

    /// Whether a workload of `viewer` sees the resource; an unknown viewer sees everything.
    pub fn admits(&self, viewer: Option<&str>) -> bool {
        match (self, viewer) {
            (Visibility::All, _) | (_, None) => true,
            (Visibility::Only(namespaces), Some(viewer)) => namespaces.iter().any(|namespace| namespace == viewer),
        }
    }
}

/// A host registered by one ServiceEntry.
#[derive(Debug)]
pub struct Service {
    /// The host as the ServiceEntry writes it (a wildcard stays a wildcard).
    pub host: Arc<str>,
    /// Its namespace and `exportTo`.
    pub exported: Arc<Exported>,
    pub resolution: Resolution,
    /// Held in place when there is one (most ServiceEntries declare one port): a lookup that checks the port reads
    /// no other allocation.
    ports: SmallVec<[ServicePort; 1]>,
    /// Every address the host is known at: the entry's `addresses`, its endpoints', what its name resolves to.
    known_at: Box<[IpNet]>,
    /// The host's clusters under each DestinationRule that applies to some workloads (variant 0: under none),
    /// each per port: all endpoints (no subset) and each subset's. One list for all variants: most hosts have
    /// one cluster, held in one allocation.
    clusters: Box<[VariantCluster]>,
    /// Which variant a viewer's requests go through; `None`: the first, for everyone (no rule applies).
    rules: Option<Box<RuleChoice>>,
    /// The next service registered under the same host, in declaration order.
    next: Option<Arc<Service>>,
}

/// One of a host's clusters, of a variant (a DestinationRule); its port and subset are those its labels name.
#[derive(Debug)]
struct VariantCluster {
    variant: u16,
    cluster: Cluster,
}

/// Which DestinationRule a workload's requests for a host go through, as Istio chooses: one in the workload's
/// own namespace, else the service's namespace's, else the root namespace's, each if exported to the workload.
#[derive(Debug, Default)]
struct RuleChoice {
    /// Namespaces with a rule of their own for the host, and its variant.
    own: Vec<(String, usize)>,
    /// The service's namespace's rule, then the root namespace's: to whom each is exported, and its variant.
    shared: Vec<(Visibility, usize)>,
    /// The variant of a source not known and of the gateway: the service's namespace's rule, else the root
    /// namespace's, else any namespace's (a configuration read from files names no workload).
    unknown: usize,
}

impl RuleChoice {
    /// The variant of `workload`'s requests; of a source not known, `unknown`.
    fn variant(&self, workload: Option<&Workload>) -> usize {
        let Some(workload) = workload else { return self.unknown };
        let namespace = &*workload.namespace;
        let own = self.own.iter().find(|(own, _)| own == namespace).map(|(_, variant)| *variant);
        own.or_else(|| self.shared.iter().find(|(to, _)| to.admits(Some(namespace))).map(|(_, v)| *v)).unwrap_or(0)
    }
}

#[derive(Clone, Debug)]
struct ServicePort {
    number: u16,
    /// Shared across the policy (most ports are named alike).
    name: Arc<str>,
    target: Option<u16>,
    http2: bool,
}

/// Where a request for a registered service goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Upstream {
    /// One of the service's endpoints.
    Endpoint(SocketAddr),
    /// Resolution NONE: the address the client connected to.
    OriginalDestination,
    /// Resolved by DNS (or STATIC) and no address is known now.
    NoEndpoint,
    /// The route names a subset no DestinationRule defines for the host.
    NoSubset,
}

/// The choice when no DestinationRule applies to a host: its first variant, for everyone.
static NO_RULE: RuleChoice = RuleChoice { own: Vec::new(), shared: Vec::new(), unknown: 0 };

impl Service {
    fn rules(&self) -> &RuleChoice {
        self.rules.as_deref().unwrap_or(&NO_RULE)
    }

    /// Whether the service declares `port`.
    pub fn has_port(&self, port: u16) -> bool {
        self.ports.iter().any(|p| p.number == port)
    }

    /// Whether `port` speaks HTTP/2 to the upstream (declared HTTP2 or GRPC).
    pub fn http2(&self, port: u16) -> bool {
        self.ports.iter().any(|p| p.number == port && p.http2)
    }

    /// Whether `address` is one the host is known at; `None` when none is known (nothing to check against).
    pub fn known_at(&self, address: IpAddr) -> Option<bool> {
        (!self.known_at.is_empty()).then(|| self.known_at.iter().any(|net| net.contains(&address)))
    }

    /// The clusters `viewer`'s requests go through (under the DestinationRule that applies to it): an index
    /// for `cluster` and `upstream_for`.
    pub fn variant(&self, viewer: Viewer<'_>, policy: &ProxyPolicy) -> usize {
        let workload = match viewer {
            // The gateway chooses as a workload of its namespace.
            Viewer::Gateway => policy.gateway.as_ref(),
            Viewer::Workload(workload) => workload,
        };
        self.rules().variant(workload)
    }

    /// A single address of the host's own (`addresses` or an endpoint), for a request sent elsewhere.
    pub fn own_address(&self, port: u16) -> Option<SocketAddr> {
        match self.upstream(port, None) {
            Upstream::Endpoint(address) => Some(address),
            _ => self
                .known_at
                .iter()
                .find(|net| net.prefix_len() == net.max_prefix_len())
                .map(|net| SocketAddr::new(net.addr(), port)),
        }
    }

    /// The cluster for `port` and `subset`, of `variant`.
    pub fn cluster(&self, variant: usize, port: u16, subset: Option<&str>) -> Option<&Cluster> {
        self.clusters
            .iter()
            .find(|c| usize::from(c.variant) == variant && c.cluster.labels.is_outbound(port, subset))
            .map(|c| &c.cluster)
    }

    /// The next endpoint for `port` (of `subset`), by the load balancer of the cluster an unknown source uses.
    pub fn upstream(&self, port: u16, subset: Option<&str>) -> Upstream {
        self.upstream_for(self.rules().unknown, port, subset, None)
    }

    /// The endpoint for `port` (of `subset`) in `variant`: the one a request's `hash` goes to, else the load
    /// balancer's next.
    pub fn upstream_for(&self, variant: usize, port: u16, subset: Option<&str>, hash: Option<u64>) -> Upstream {
        let Some(cluster) = self.cluster(variant, port, subset) else { return Upstream::NoSubset };
        if self.resolution == Resolution::None || cluster.policy.lb == LoadBalance::Passthrough {
            return Upstream::OriginalDestination;
        }
        let Some(address) = cluster.pick(hash) else { return Upstream::NoEndpoint };
        let service_port = self.ports.iter().find(|p| p.number == port);
        let endpoint = cluster.endpoint(address);
        let target = service_port
            .and_then(|p| endpoint.and_then(|e| e.ports.get(&*p.name).copied()).or(p.target))
            .unwrap_or(port);
        Upstream::Endpoint(SocketAddr::new(address, target))
    }
}

/// The routes for one host of one context: the http routes of every VirtualService bound there, in order.
#[derive(Debug)]
pub struct VirtualHost {
    pub routes: Box<[Route]>,
}

#[derive(Debug)]
pub struct Route {
    /// Empty: every request matches. Shared with every route of the policy that matches alike.
    pub matches: Arc<Matches>,
    pub action: Action,
    pub request_headers: HeaderOps,
    /// What the route shares with the other routes of its VirtualService (its own name among them).
    pub scope: Arc<RouteScope>,
    /// What few routes set, boxed: a route is as small as what most routes have.
    rare: Option<Box<Rare>>,
    /// Its place in its VirtualService's `http` routes.
    index: u32,
    /// In milliseconds (Istio allows no less than one); `None`: no timeout.
    timeout_ms: Option<NonZeroU32>,
}

/// A route's `match` list, compiled. Behind one thin pointer in each route (shared, so held once): a route is
/// as small as it can be.
#[derive(Debug)]
pub struct Matches(Box<[RequestMatch]>);

impl std::ops::Deref for Matches {
    type Target = [RequestMatch];

    fn deref(&self) -> &[RequestMatch] {
        &self.0
    }
}

/// The VirtualService a route comes from.
#[derive(Debug)]
pub struct RouteScope {
    /// `namespace/name`.
    pub source: Arc<str>,
    /// Its namespace (which Sidecars import by) and `exportTo`.
    pub exported: Arc<Exported>,
    /// Each route's own name, by index (empty when no route has one); a route without one is named by its
    /// VirtualService and index.
    names: Box<[Option<Arc<str>>]>,
}

#[derive(Debug, Default)]
struct Rare {
    rewrite: Option<Rewrite>,
    response_headers: HeaderOps,
    retries: Option<RetryPolicy>,
    fault: Option<Fault>,
    mirror: Option<Mirror>,
    cors: Option<Cors>,
}

impl Rare {
    fn is_empty(&self) -> bool {
        let Rare { rewrite, response_headers, retries, fault, mirror, cors } = self;
        rewrite.is_none()
            && response_headers.is_empty()
            && retries.is_none()
            && fault.is_none()
            && mirror.is_none()
            && cors.is_none()
    }
}

impl Route {
    /// The name a request's record and log carry.
    pub fn name(&self) -> RouteName {
        match self.scope.names.get(self.index as usize) {
            Some(Some(name)) => RouteName::Named(name.clone()),
            _ => RouteName::Indexed(self.scope.source.clone(), self.index),
        }
    }

    pub fn timeout(&self) -> Option<Duration> {
        self.timeout_ms.map(|ms| Duration::from_millis(ms.get().into()))
    }

    pub fn rewrite(&self) -> Option<&Rewrite> {
        self.rare.as_ref()?.rewrite.as_ref()
    }

    pub fn response_headers(&self) -> Option<&HeaderOps> {
        self.rare.as_ref().map(|rare| &rare.response_headers)
    }

    /// `None`: Istio's mesh default.
    pub fn retries(&self) -> Option<&RetryPolicy> {
        self.rare.as_ref()?.retries.as_ref()
    }

    pub fn fault(&self) -> Option<&Fault> {
        self.rare.as_ref()?.fault.as_ref()
    }

    pub fn mirror(&self) -> Option<&Mirror> {
        self.rare.as_ref()?.mirror.as_ref()
    }

    pub fn cors(&self) -> Option<&Cors> {
        self.rare.as_ref()?.cors.as_ref()
    }
}

/// A route's name: its own, or `namespace/virtualservice[index]` (written out only when shown); a request's
/// record shares it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteName {
    Named(Arc<str>),
    /// The VirtualService (`namespace/name`, shared with its other routes) and the route's index in it.
    Indexed(Arc<str>, u32),
}

impl std::fmt::Display for RouteName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RouteName::Named(name) => f.write_str(name),
            RouteName::Indexed(service, index) => write!(f, "{service}[{index}]"),
        }
    }
}

/// What one compile shares among everything it makes: compiled regexes, and strings (hosts, namespaces).
#[derive(Default)]
struct Shared {
    regexes: RegexCache,
    texts: std::collections::HashSet<Arc<str>>,
    exported: std::collections::HashSet<Arc<Exported>>,
    /// Compiled match lists by namespace (gateways are named relative to it) and source, as JSON.
    matches: std::collections::HashMap<String, Arc<Matches>>,
    /// Compiled header manipulations by source, as JSON.
    header_ops: std::collections::HashMap<String, HeaderOps>,
    /// Targets' subsets and header manipulations, by subset and source of the manipulations.
    target_extras: std::collections::HashMap<(Option<Arc<str>>, String), Arc<TargetExtras>>,
    /// Where targets go, by host, port and (shared) extras.
    target_destinations: std::collections::HashMap<(Arc<str>, Option<u16>, usize), Arc<TargetDestination>>,
}

impl Shared {
    /// `text`, shared with every other use of it in the policy.
    fn text(&mut self, text: &str) -> Arc<str> {
        interned(&mut self.texts, text)
    }

    /// A resource's namespace and `exportTo`, shared with every other resource's that are the same.
    fn exported(&mut self, namespace: &str, visible_to: Visibility) -> Arc<Exported> {
        let namespace = self.text(namespace);
        interned(&mut self.exported, Exported { namespace, visible_to })
    }

    /// A route's `match` list compiled, shared with every route of the policy that matches alike (the same
    /// conditions recur across VirtualServices, as configurations are written from templates).
    fn matches(&mut self, matches: &[crate::config::virtual_service::HttpMatch], namespace: &str) -> Arc<Matches> {
        let key = format!("{namespace} {}", serde_json::to_string(matches).unwrap_or_default());
        let regexes = &mut self.regexes;
        let compile =
            || Arc::new(Matches(matches.iter().map(|m| RequestMatch::compile(m, namespace, regexes)).collect()));
        self.matches.entry(key).or_insert_with(compile).clone()
    }

    /// Where a route's destination goes, shared with every target that goes there alike.
    fn target_destination(&mut self, destination: &HttpRouteDestination) -> Arc<TargetDestination> {
        let host = self.text(&destination.destination.host);
        let port = destination.destination.port.as_ref().and_then(|p| u16::try_from(p.number).ok());
        let extras = self.target_extras(destination.destination.subset.as_deref(), destination.headers.as_deref());
        let key = (host.clone(), port, extras.as_ref().map_or(0, |extras| Arc::as_ptr(extras) as usize));
        self.target_destinations
            .entry(key)
            .or_insert_with(|| Arc::new(TargetDestination { host, port, extras }))
            .clone()
    }

    /// A target's subset and header manipulations, shared with every target that has the same; `None` without
    /// either.
    fn target_extras(&mut self, subset: Option<&str>, headers: Option<&Headers>) -> Option<Arc<TargetExtras>> {
        if subset.is_none() && headers.is_none() {
            return None;
        }
        let subset = subset.map(|subset| self.text(subset));
        let key = (subset.clone(), serde_json::to_string(&headers).unwrap_or_default());
        if let Some(extras) = self.target_extras.get(&key) {
            return Some(extras.clone());
        }
        let (request, response) = header_ops(headers, self);
        let extras = Arc::new(TargetExtras { subset, headers: [request, response] });
        self.target_extras.insert(key, extras.clone());
        Some(extras)
    }

    /// Header manipulations compiled, shared with every use of the same ones in the policy.
    fn header_ops(&mut self, operations: Option<&HeaderOperations>) -> HeaderOps {
        let Some(operations) = operations else { return HeaderOps::default() };
        let key = serde_json::to_string(operations).unwrap_or_default();
        self.header_ops.entry(key).or_insert_with(|| HeaderOps::compile(operations)).clone()
    }
}

/// Retries as Envoy makes them: `attempts` retries after the first try, each try bounded by `per_try_timeout`,
/// on the conditions of `retry_on`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub on: RetryOn,
}

/// Envoy's `retry_on` conditions that apply to HTTP/1.1 and HTTP/2 upstreams.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetryOn {
    pub connect_failure: bool,
    /// `reset`: the upstream reset or closed the connection or stream before a response.
    pub reset: bool,
    /// `refused-stream`: the upstream refused an HTTP/2 stream (REFUSED_STREAM), having processed nothing of it.
    /// Not an HTTP/1.1 connection closed after the request was sent, which may have been processed.
    pub refused_stream: bool,
    /// `5xx`: any 5xx response, a reset or a per-try timeout.
    pub server_error: bool,
    /// `gateway-error`: 502, 503, 504, a reset or a per-try timeout.
    pub gateway_error: bool,
    /// `retriable-4xx`: 409.
    pub retriable_4xx: bool,
    /// `retriable-status-codes`, and plain status codes in `retryOn` (Istio's extension).
    pub status_codes: Vec<u16>,
}

impl RetryOn {
    /// Parses `retryOn` (comma-separated conditions, numbers adding retriable status codes). gRPC conditions
    /// (`cancelled`, `unavailable`, …) apply to gRPC responses only, which a plain HTTP status never is.
    pub fn parse(text: &str) -> RetryOn {
        let mut on = RetryOn::default();
        for condition in text.split(',').map(str::trim) {
            match condition {
                "connect-failure" => on.connect_failure = true,
                "reset" => on.reset = true,
                "refused-stream" => on.refused_stream = true,
                "5xx" => on.server_error = true,
                "gateway-error" => on.gateway_error = true,
                "retriable-4xx" => on.retriable_4xx = true,
                // Istio's default codes for `retriable-status-codes`.
                "retriable-status-codes" => on.status_codes.push(503),
                other => on.status_codes.extend(other.parse::<u16>().ok()),
            }
        }
        on
    }

    /// Whether a response with `status` is retried.
    pub fn status(&self, status: u16) -> bool {
        (self.server_error && (500..600).contains(&status))
            || (self.gateway_error && matches!(status, 502..=504))
            || (self.retriable_4xx && status == 409)
            || self.status_codes.contains(&status)
    }

    /// Whether an upstream reset (or a try that timed out) is retried.
    pub fn reset_or_timeout(&self) -> bool {
        self.reset || self.server_error || self.gateway_error
    }

    /// Whether a stream the upstream refused (HTTP/2 REFUSED_STREAM) is retried: a reset of its own kind.
    pub fn refused(&self) -> bool {
        self.refused_stream || self.reset_or_timeout()
    }
}

impl RetryPolicy {
    /// Istio's default for routes that say nothing: 2 retries on connect failures, refused streams and 503s.
    pub fn mesh_default() -> RetryPolicy {
        RetryPolicy {
            attempts: 2,
            per_try_timeout: None,
            on: RetryOn::parse("connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"),
        }
    }
}

/// Fault injection: a delay and an abort, each on a share of the requests (none when no share is given).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Fault {
    pub delay: Option<(Duration, f64)>,
    pub abort: Option<(StatusCode, f64)>,
}

/// A copy of each request (of a share of them) sent to another destination, its response ignored.
#[derive(Clone, Debug, PartialEq)]
pub struct Mirror {
    pub host: String,
    pub port: Option<u16>,
    pub percent: f64,
}

/// A route's CORS policy, as Envoy's CORS filter applies it.
#[derive(Debug)]
pub struct Cors {
    pub allow_origins: Vec<super::http_match::Matcher>,
    pub allow_methods: Option<HeaderValue>,
    pub allow_headers: Option<HeaderValue>,
    pub expose_headers: Option<HeaderValue>,
    pub max_age: Option<HeaderValue>,
    pub allow_credentials: bool,
}

impl Cors {
    pub fn allows(&self, origin: &str) -> bool {
        self.allow_origins.iter().any(|m| m.matches(origin, false))
    }
}

#[derive(Debug)]
pub enum Action {
    Forward(Targets),
    /// Boxed: redirects are rare, and a route is as large as its largest action.
    Redirect(Box<Redirect>),
    /// Boxed: as `Redirect`.
    Respond(Box<(StatusCode, Bytes)>),
}

/// Weighted destinations, picked per request.
#[derive(Debug)]
pub struct Targets(Box<[Target]>);

#[derive(Debug)]
pub struct Target {
    /// Where it goes: shared with every target of the policy that goes there alike (a host's routes mostly
    /// differ in what they match, not in where they go).
    to: Arc<TargetDestination>,
    /// The weights of this target and of those before it, summed: for the pick.
    weight_to: u32,
}

#[derive(Debug)]
struct TargetDestination {
    /// Shared with every other use of the host in the policy.
    host: Arc<str>,
    port: Option<u16>,
    /// Its subset and header manipulations, when it has either (most have neither); shared with every target of
    /// the policy that has the same.
    extras: Option<Arc<TargetExtras>>,
}

#[derive(Debug, Default)]
struct TargetExtras {
    subset: Option<Arc<str>>,
    /// Request and response header manipulations.
    headers: [HeaderOps; 2],
}

impl Target {
    pub fn host(&self) -> &str {
        &self.to.host
    }

    pub fn port(&self) -> Option<u16> {
        self.to.port
    }

    pub fn subset(&self) -> Option<&str> {
        self.to.extras.as_ref()?.subset.as_deref()
    }

    pub fn request_headers(&self) -> Option<&HeaderOps> {
        self.to.extras.as_ref().map(|extras| &extras.headers[0])
    }

    pub fn response_headers(&self) -> Option<&HeaderOps> {
        self.to.extras.as_ref().map(|extras| &extras.headers[1])
    }
}

impl Targets {
    /// A destination by weight; `roll` is uniform in `0..u32::MAX`.
    pub fn pick(&self, roll: u32) -> Option<&Target> {
        let total = self.0.last()?.weight_to;
        if total == 0 {
            return self.0.first();
        }
        let point = roll % total;
        let index = self.0.partition_point(|target| target.weight_to <= point);
        self.0.get(index)
    }
}

#[derive(Debug)]
pub struct Redirect {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub port: Option<u16>,
    pub scheme: Option<String>,
    pub status: StatusCode,
}

#[derive(Debug)]
pub struct Rewrite {
    pub uri: Option<String>,
    pub uri_regex: Option<(Arc<Regex>, String)>,
    pub authority: Option<String>,
}

/// Header manipulations, names and values checked here: removals, then sets, then additions, as Envoy orders
/// them. Most routes have none, and then this holds no allocation; the same manipulations are shared across
/// the policy.
#[derive(Clone, Debug, Default)]
pub struct HeaderOps {
    /// Behind one thin pointer: a route holds one of these for its requests.
    operations: Option<Arc<Box<[HeaderOp]>>>,
}

#[derive(Debug)]
enum HeaderOp {
    Remove(HeaderName),
    Set(HeaderName, HeaderValue),
    Add(HeaderName, HeaderValue),
}

impl HeaderOps {
    fn compile(operations: &HeaderOperations) -> HeaderOps {
        let pairs = |map: &Pairs<String>| {
            map.iter()
                .filter_map(|(name, value)| {
                    Some((HeaderName::from_bytes(name.as_bytes()).ok()?, HeaderValue::from_str(value).ok()?))
                })
                .collect::<Vec<_>>()
        };
        let removals = operations.remove.iter().filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok());
        let sets = pairs(&operations.set).into_iter().map(|(name, value)| HeaderOp::Set(name, value));
        let adds = pairs(&operations.add).into_iter().map(|(name, value)| HeaderOp::Add(name, value));
        let operations: Box<[HeaderOp]> = removals.map(HeaderOp::Remove).chain(sets).chain(adds).collect();
        HeaderOps { operations: (!operations.is_empty()).then(|| Arc::new(operations)) }
    }

    pub fn is_empty(&self) -> bool {
        self.operations.is_none()
    }

    pub fn apply(&self, headers: &mut http::HeaderMap) {
        for operation in self.operations.iter().flat_map(|operations| operations.iter()) {
            match operation {
                HeaderOp::Remove(name) => {
                    headers.remove(name);
                }
                HeaderOp::Set(name, value) => {
                    headers.insert(name.clone(), value.clone());
                }
                HeaderOp::Add(name, value) => {
                    headers.append(name.clone(), value.clone());
                }
            }
        }
    }
}

/// What the registry says of a host on a port.
pub enum Registered<'a> {
    Service(&'a Service),
    /// Known to no ServiceEntry on that port: BlackHoleCluster in REGISTRY_ONLY, PassthroughCluster otherwise.
    Unknown,
}

impl ProxyPolicy {
    /// The service registered for `host` (a Host, an authority or a destination host) on `port`.
    pub fn registered(&self, host: &str, port: u16) -> Registered<'_> {
        self.registered_for(host, port, Viewer::Gateway)
    }

    /// The service registered for `host` on `port` that `viewer` sees: for the workloads' traffic, exported to
    /// the source's namespace (`exportTo`; an unknown source sees all) and imported by its Sidecar.
    pub fn registered_for(&self, host: &str, port: u16, viewer: Viewer<'_>) -> Registered<'_> {
        let visible = |s: &&Service| s.has_port(port) && viewer.sees(self, &s.exported, &s.host, port);
        let first = self.hosts.find(host, |entry| entry.services.as_deref());
        match std::iter::successors(first, |service| service.next.as_deref()).find(visible) {
            Some(service) => Registered::Service(service),
            None => Registered::Unknown,
        }
    }

    /// The routes for intercepted traffic to `authority`: of the VirtualServices bound to the mesh.
    pub fn mesh_routes(&self, authority: &str) -> Option<&VirtualHost> {
        self.hosts.find(authority, |entry| entry.mesh.as_ref())
    }

    /// Whether `host` is this gateway's own Service.
    pub fn is_own_service(&self, host: &str) -> bool {
        self.own_services.iter().any(|own| own.eq_ignore_ascii_case(host.trim_end_matches('.')))
    }

    /// Every port a selected Gateway serves HTTP on.
    pub fn gateway_ports(&self) -> std::collections::BTreeSet<u16> {
        self.gateways.iter().flat_map(|gateway| gateway.http_ports.iter().copied()).collect()
    }

    /// The routes of the Gateway listening on `port`, with the Gateway's id.
    pub fn gateway_on(&self, port: u16) -> Option<&GatewayRoutes> {
        self.gateways.iter().find(|gateway| gateway.http_ports.contains(&port))
    }
}

/// Compiles the proxy's policy: the registry from the ServiceEntries (endpoints from `resolved` for DNS), and
/// the routes of the VirtualServices as `bindings` bound them.
pub fn proxy_policy(
    snapshot: &Snapshot,
    resolved: &Resolved,
    bindings: &Bindings,
    settings: &ProxySettings,
    states: &ClusterStates,
) -> ProxyPolicy {
    // What is only needed while compiling is allocated apart from what the policy keeps (`transient`).
    let rules = transient(|| Rules::new(snapshot));
    let mut shared = Shared::default();
    let mut registry: BTreeMap<String, Vec<Service>> = BTreeMap::new();
    for resource in &snapshot.resources {
        if let Spec::ServiceEntry(entry) = &resource.spec {
            let visible_to = Visibility::compile_or(
                &entry.export_to,
                &snapshot.mesh.default_service_export_to,
                resource.metadata.namespace(),
            );
            let exported = shared.exported(resource.metadata.namespace(), visible_to);
            for service in services(entry, &exported, resolved, &rules, states, &mut shared) {
                transient(|| registry.entry(service.host.to_ascii_lowercase()).or_default().push(service));
            }
        }
    }
    let mut hosts: BTreeMap<String, Host> = BTreeMap::new();
    for (host, services) in registry {
        let first = services.into_iter().rev().fold(None, |next, service| Some(Arc::new(Service { next, ..service })));
        transient(|| hosts.entry(host).or_default()).services = first;
    }
    for (host, indexes) in &bindings.mesh {
        let routes = virtual_host(snapshot, indexes, &mut shared);
        transient(|| hosts.entry(host.clone()).or_default()).mesh = Some(routes);
    }
    let mut table = HostTable::default();
    for (host, entry) in hosts {
        table.insert(&host, entry);
    }
    table.shrink_to_fit();
    let mut virtual_host = |indexes: &Vec<usize>| virtual_host(snapshot, indexes, &mut shared);
    ProxyPolicy {
        sidecars: SidecarModes::compile(snapshot, settings.mode),
        host_verify: settings.host_verify,
        hosts: table,
        gateways: bindings
            .gateways
            .iter()
            .map(|gateway| GatewayRoutes {
                id: gateway.id.clone(),
                http_ports: gateway
                    .servers
                    .iter()
                    .filter(|server| is_http(&server.port.protocol))
                    .filter_map(|server| u16::try_from(server.port.number).ok())
                    .collect(),
                hosts: gateway.hosts.map(&mut virtual_host),
            })
            .collect(),
        own_services: settings.own_services.clone(),
        gateway: settings.gateway_namespace.as_deref().map(|namespace| Workload {
            name: "gateway".into(),
            namespace: namespace.into(),
            labels: BTreeMap::new(),
        }),
    }
}

/// The DestinationRules by namespace (each namespace's first rule for a host), with to whom each is exported.
struct Rules<'a> {
    by_namespace: BTreeMap<&'a str, HostTable<(&'a DestinationRule, Visibility)>>,
    root: &'a str,
}

impl<'a> Rules<'a> {
    fn new(snapshot: &'a Snapshot) -> Rules<'a> {
        let mut by_namespace: BTreeMap<&str, HostTable<(&DestinationRule, Visibility)>> = BTreeMap::new();
        for resource in &snapshot.resources {
            if let Spec::DestinationRule(rule) = &resource.spec {
                let namespace = resource.metadata.namespace();
                let default = &snapshot.mesh.default_destination_rule_export_to;
                let visible_to = Visibility::compile_or(&rule.export_to, default, namespace);
                by_namespace.entry(namespace).or_default().insert(&rule.host, (&**rule, visible_to));
            }
        }
        Rules { by_namespace, root: snapshot.mesh.root_namespace() }
    }

    /// The rules that apply to someone's requests for the service `host` of `namespace` (variants 1.. of the
    /// service's clusters), and who goes through which.
    fn for_service(&self, host: &str, namespace: &str) -> (Vec<&'a DestinationRule>, RuleChoice) {
        let mut candidates: Vec<&DestinationRule> = Vec::new();
        let mut choice = RuleChoice::default();
        let mut variant_of = |rule: &'a DestinationRule| match candidates.iter().position(|c| std::ptr::eq(*c, rule)) {
            Some(i) => i + 1,
            None => {
                candidates.push(rule);
                candidates.len()
            }
        };
        let rule_in = |ns: &str| self.by_namespace.get(ns).and_then(|rules| rules.get(host));
        for (ns, rules) in &self.by_namespace {
            if let Some((rule, _)) = rules.get(host) {
                choice.own.push((ns.to_string(), variant_of(rule)));
            }
        }
        for ns in [namespace, self.root] {
            if let Some((rule, visible_to)) = rule_in(ns) {
                choice.shared.push((visible_to.clone(), variant_of(rule)));
            }
        }
        choice.unknown = choice.shared.first().map(|(_, v)| *v).or(choice.own.first().map(|(_, v)| *v)).unwrap_or(0);
        (candidates, choice)
    }
}

/// One service per host of `entry`: DNS hosts resolve on their own (or through the endpoints' names).
fn services(
    entry: &ServiceEntry,
    exported: &Arc<Exported>,
    resolved: &Resolved,
    rules: &Rules<'_>,
    states: &ClusterStates,
    shared: &mut Shared,
) -> Vec<Service> {
    let namespace = &exported.namespace;
    let resolution = entry.resolution();
    let ports: SmallVec<[ServicePort; 1]> = entry
        .ports
        .iter()
        .filter_map(|port| {
            Some(ServicePort {
                number: u16::try_from(port.number).ok()?,
                name: shared.text(&port.name),
                target: port.target_port.and_then(|t| u16::try_from(t).ok()),
                http2: port.protocol.as_deref().is_some_and(is_http2),
            })
        })
        .collect();
    let endpoint_ports = |ports: &BTreeMap<String, u32>| {
        ports.iter().filter_map(|(n, &p)| Some((n.clone(), u16::try_from(p).ok()?))).collect()
    };
    let listed: Vec<Endpoint> = entry
        .endpoints
        .iter()
        .flat_map(|endpoint| {
            let addresses: Vec<IpAddr> = match resolution {
                Resolution::Static => parse_address(&endpoint.address).map(|net| net.addr()).into_iter().collect(),
                Resolution::Dns | Resolution::DnsRoundRobin => match endpoint.address.parse::<IpAddr>() {
                    Ok(address) => vec![address],
                    Err(_) => resolved.get(&endpoint.address).cloned().unwrap_or_default(),
                },
                Resolution::None => Vec::new(),
            };
            addresses.into_iter().map(|address| Endpoint {
                address,
                ports: endpoint_ports(&endpoint.ports),
                labels: endpoint.labels.clone(),
            })
        })
        .collect();
    entry
        .hosts
        .iter()
        .map(|host| {
            let endpoints = if !entry.endpoints.is_empty() {
                listed.clone()
            } else if matches!(resolution, Resolution::Dns | Resolution::DnsRoundRobin) {
                let addresses = resolved.get(host).cloned().unwrap_or_default();
                let endpoint = |address| Endpoint { address, ports: BTreeMap::new(), labels: BTreeMap::new() };
                addresses.into_iter().map(endpoint).collect()
            } else {
                Vec::new()
            };
            let mut known_at: Vec<IpNet> = entry.addresses.iter().filter_map(|a| parse_address(a)).collect();
            known_at.extend(endpoints.iter().map(|e: &Endpoint| IpNet::from(e.address)));
            let (candidates, rules) = rules.for_service(host, namespace);
            let rules = (!candidates.is_empty()).then(|| Box::new(rules));
            let host = shared.text(host);
            // Held for as long as the configuration is: no spare capacity (boxed slices).
            let variants = std::iter::once(None).chain(candidates.into_iter().map(Some));
            let clusters = variants
                .enumerate()
                .flat_map(|(variant, rule)| {
                    let variant = u16::try_from(variant).unwrap_or(u16::MAX);
                    ports
                        .iter()
                        .flat_map(|port| clusters(&host, namespace, port, &endpoints, rule, states, shared))
                        .map(move |cluster| VariantCluster { variant, cluster })
                        .collect::<Vec<_>>()
                })
                .collect();
            Service {
                known_at: known_at.into(),
                host,
                exported: exported.clone(),
                resolution,
                ports: ports.clone(),
                clusters,
                rules,
                next: None,
            }
        })
        .collect()
}

/// The clusters of `host` on `port`: all its endpoints, and each subset's, under the DestinationRule's policy
/// (a subset's own policy replacing the rule's, a port-level setting replacing either).
fn clusters(
    host: &Arc<str>,
    namespace: &Arc<str>,
    port: &ServicePort,
    endpoints: &[Endpoint],
    rule: Option<&DestinationRule>,
    states: &ClusterStates,
    shared: &mut Shared,
) -> Vec<Cluster> {
    let cluster = |subset: Option<Arc<str>>, endpoints: Vec<Endpoint>, policy: Option<&TrafficPolicy>| {
        let policy = policy
            .map(|policy| ClusterPolicy::compile(settings_for_port(policy, port.number), port.http2))
            .unwrap_or_default();
        let labels = DestinationLabels::registered(host.clone(), namespace.clone(), port.number, subset);
        // State that must outlive recompiles is kept only where a policy needs it, by cluster name.
        let state = if policy.limits.is_some() || policy.outlier.is_some() {
            states.get(&labels.cluster().to_string(), policy.limits)
        } else if endpoints.is_empty() {
            states.none()
        } else {
            states.fresh()
        };
        Cluster { labels, endpoints: endpoints.into(), policy: ClusterPolicy::shared(policy), state }
    };
    let top = rule.and_then(|rule| rule.traffic_policy.as_ref());
    let mut out = vec![cluster(None, endpoints.to_vec(), top)];
    for subset in rule.map(|rule| rule.subsets.as_slice()).unwrap_or_default() {
        let members = with_labels(endpoints, &subset.labels);
        let policy = subset.traffic_policy.as_ref().or(top);
        out.push(cluster(Some(shared.text(&subset.name)), members, policy));
    }
    out
}

fn virtual_host(snapshot: &Snapshot, indexes: &[usize], shared: &mut Shared) -> VirtualHost {
    let mut routes = Vec::new();
    for resource in bindings::services(snapshot, indexes) {
        let Spec::VirtualService(service) = &resource.spec else { continue };
        let namespace = resource.metadata.namespace();
        let visible_to =
            Visibility::compile_or(&service.export_to, &snapshot.mesh.default_virtual_service_export_to, namespace);
        let scope = Arc::new(RouteScope {
            source: format!("{namespace}/{}", resource.metadata.name).into(),
            exported: shared.exported(namespace, visible_to),
            names: if service.http.iter().any(|route| route.name.is_some()) {
                service.http.iter().map(|route| route.name.as_deref().map(Arc::from)).collect()
            } else {
                Box::default()
            },
        });
        for (i, route) in service.http.iter().enumerate() {
            let index = u32::try_from(i).unwrap_or(u32::MAX);
            routes.push(compile_route(route, &scope, index, shared));
        }
    }
    // Held for as long as the configuration is: no spare capacity.
    VirtualHost { routes: routes.into() }
}

fn compile_route(route: &HttpRoute, scope: &Arc<RouteScope>, index: u32, shared: &mut Shared) -> Route {
    let namespace = &scope.exported.namespace;
    let (request_headers, response_headers) = header_ops(route.headers.as_deref(), shared);
    let action = if let Some(redirect) = &route.redirect {
        Action::Redirect(Box::new(Redirect {
            uri: redirect.uri.clone(),
            authority: redirect.authority.clone(),
            port: redirect.port.and_then(|p| u16::try_from(p).ok()),
            scheme: redirect.scheme.clone(),
            status: redirect
                .redirect_code
                .and_then(|code| StatusCode::from_u16(u16::try_from(code).ok()?).ok())
                .unwrap_or(StatusCode::MOVED_PERMANENTLY),
        }))
    } else if let Some(response) = &route.direct_response {
        let body = response.body.as_ref().map_or_else(Bytes::new, |body| match (&body.string, &body.bytes) {
            (Some(text), _) => Bytes::from(text.clone()),
            (None, Some(encoded)) => {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD.decode(encoded).map(Bytes::from).unwrap_or_default()
            }
            (None, None) => Bytes::new(),
        });
        let status = u16::try_from(response.status).ok().and_then(|s| StatusCode::from_u16(s).ok());
        Action::Respond(Box::new((status.unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), body)))
    } else {
        let mut total = 0u32;
        let targets = route
            .route
            .iter()
            .map(|destination| {
                // A lone destination takes everything; otherwise the weights (validated to sum to 100) decide.
                let weight = if route.route.len() == 1 { 100 } else { destination.weight.unwrap_or(0) };
                total += u32::try_from(weight).unwrap_or(0);
                Target { to: shared.target_destination(destination), weight_to: total }
            })
            .collect();
        Action::Forward(Targets(targets))
    };
    let regexes = &mut shared.regexes;
    let rare = Rare {
        rewrite: route.rewrite.as_ref().map(|rewrite| Rewrite {
            uri: rewrite.uri.clone(),
            uri_regex: rewrite
                .uri_regex_rewrite
                .as_ref()
                .and_then(|r| Some((regexes.get(&r.pattern)?, r.rewrite.replace("\\", "$")))),
            authority: rewrite.authority.clone(),
        }),
        response_headers,
        retries: route.retries.as_deref().map(retry_policy),
        fault: route.fault.as_deref().map(fault),
        mirror: route.mirror.as_ref().map(|mirror| Mirror {
            host: mirror.host.clone(),
            port: mirror.port.as_ref().and_then(|p| u16::try_from(p.number).ok()),
            // Istio mirrors every request when no share is given.
            percent: route.mirror_percentage.as_ref().map_or(100.0, |p| p.value),
        }),
        cors: route.cors_policy.as_ref().map(|policy| cors(policy, regexes)),
    };
    Route {
        matches: shared.matches(&route.matches, namespace),
        action,
        request_headers,
        scope: scope.clone(),
        rare: (!rare.is_empty()).then(|| Box::new(rare)),
        index,
        // Rounded up: a timeout below a millisecond is not none. One too long for 32 bits (49 days) is as long as
        // they hold.
        timeout_ms: route
            .timeout
            .as_deref()
            .and_then(|t| parse_duration(t).ok())
            .and_then(|t| NonZeroU32::new(u32::try_from(t.as_nanos().div_ceil(1_000_000)).unwrap_or(u32::MAX))),
    }
}

fn retry_policy(retries: &crate::config::virtual_service::HttpRetry) -> RetryPolicy {
    let default = RetryPolicy::mesh_default();
    RetryPolicy {
        attempts: u32::try_from(retries.attempts).unwrap_or(0),
        per_try_timeout: retries.per_try_timeout.as_deref().and_then(|t| parse_duration(t).ok()),
        on: retries.retry_on.as_deref().map_or(default.on, RetryOn::parse),
    }
}

fn fault(fault: &crate::config::virtual_service::HttpFault) -> Fault {
    Fault {
        delay: fault.delay.as_ref().and_then(|delay| {
            let duration = parse_duration(delay.fixed_delay.as_deref()?).ok()?;
            let percent = delay.percentage.as_ref().map(|p| p.value).or(delay.percent.map(f64::from)).unwrap_or(0.0);
            Some((duration, percent))
        }),
        abort: fault.abort.as_ref().and_then(|abort| {
            let status = StatusCode::from_u16(u16::try_from(abort.http_status?).ok()?).ok()?;
            Some((status, abort.percentage.as_ref().map_or(0.0, |p| p.value)))
        }),
    }
}

fn cors(policy: &crate::config::virtual_service::CorsPolicy, regexes: &mut RegexCache) -> Cors {
    let list =
        |items: &[String]| (!items.is_empty()).then(|| HeaderValue::from_str(&items.join(","))).and_then(Result::ok);
    Cors {
        allow_origins: policy
            .allow_origins
            .iter()
            .filter_map(|origin| super::http_match::Matcher::compile(origin, false, regexes))
            .collect(),
        allow_methods: list(&policy.allow_methods),
        allow_headers: list(&policy.allow_headers),
        expose_headers: list(&policy.expose_headers),
        max_age: policy
            .max_age
            .as_deref()
            .and_then(|age| parse_duration(age).ok())
            .and_then(|age| HeaderValue::from_str(&age.as_secs().to_string()).ok()),
        allow_credentials: policy.allow_credentials.unwrap_or(false),
    }
}

fn header_ops(headers: Option<&Headers>, shared: &mut Shared) -> (HeaderOps, HeaderOps) {
    (
        shared.header_ops(headers.and_then(|h| h.request.as_ref())),
        shared.header_ops(headers.and_then(|h| h.response.as_ref())),
    )
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::policy::{bindings::bind, http_match::RequestView};

    fn policy(yaml: &str, resolved: &Resolved) -> ProxyPolicy {
        let snapshot = Snapshot::from_yaml(yaml);
        let labels = BTreeMap::from([("istio".to_owned(), "egressgateway".to_owned())]);
        let settings = ProxySettings { mode: OutboundMode::RegistryOnly, ..ProxySettings::default() };
        proxy_policy(&snapshot, resolved, &bind(&snapshot, &labels), &settings, &Default::default())
    }

    const CONFIG: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: httpbin, namespace: egress}
spec:
  hosts: [httpbin.org]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wildcard}
spec:
  hosts: ['*.example.com']
  ports: [{number: 80, name: http, protocol: HTTP}, {number: 8080, name: grpc, protocol: GRPC}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db}
spec:
  hosts: [db.internal]
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8000}]
  resolution: STATIC
  endpoints: [{address: 192.0.2.1}, {address: 192.0.2.2, ports: {http: 9000}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: httpbin, namespace: egress}
spec:
  hosts: [httpbin.org]
  http:
  - name: teapot
    match: [{uri: {prefix: /status/418}}]
    directResponse: {status: 418, body: {string: short and stout}}
  - match: [{uri: {exact: /old}}]
    redirect: {uri: /new, redirectCode: 308}
  - match: [{headers: {x-canary: {exact: 'yes'}}}]
    route:
    - {destination: {host: a.example.com}, weight: 25}
    - {destination: {host: b.example.com}, weight: 75}
  - route: [{destination: {host: httpbin.org}}]
    timeout: 2s
";

    fn first_match<'a>(host: &'a VirtualHost, path: &str, headers: &http::HeaderMap) -> Option<&'a Route> {
        let view = RequestView {
            path,
            query: None,
            method: "GET",
            scheme: "http",
            authority: "httpbin.org",
            headers,
            port: 80,
            gateway: "mesh",
            source: None,
        };
        host.routes.iter().find(|r| r.matches.is_empty() || r.matches.iter().any(|m| m.matches(&view)))
    }

    #[test]
    fn routes_that_match_alike_share_their_compiled_matches_header_manipulations_destinations_and_exports() {
        let service = |name: &str, namespace: &str, host: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, namespace: {namespace}}}\n\
                 spec:\n  hosts: [{host}]\n  http:\n  - match: [{{uri: {{prefix: /api/}}, gateways: [edge]}}]\n    \
                 headers: {{request: {{set: {{x-route: api}}}}}}\n    route: [{{destination: {{host: {host}, subset: v1}}}}]\n  \
                 - match: [{{uri: {{prefix: /v2/}}}}]\n    route: [{{destination: {{host: {host}}}}}]\n  \
                 - route: [{{destination: {{host: {host}}}}}]\n"
            )
        };
        let yaml =
            [service("a", "team", "a.example"), service("b", "team", "b.example"), service("c", "other", "c.example")]
                .join("---\n");
        let policy = policy(&yaml, &Resolved::new());
        let bound = |host: &str| policy.mesh_routes(host).map(|host| &host.routes[0]);
        let (a, b, c) = (bound("a.example"), bound("b.example"), bound("c.example"));
        let (Some(a), Some(b), Some(c)) = (a, b, c) else { panic!("each VirtualService is bound: {policy:?}") };
        assert!(Arc::ptr_eq(&a.matches, &b.matches), "the same conditions in one namespace: compiled once");
        assert!(!Arc::ptr_eq(&a.matches, &c.matches), "`edge` names another namespace's Gateway in `other`");
        let (Some(a_ops), Some(c_ops)) = (&a.request_headers.operations, &c.request_headers.operations) else {
            panic!("the header set is compiled")
        };
        assert!(Arc::ptr_eq(a_ops, c_ops), "the same header manipulations: compiled once");
        let mut headers = http::HeaderMap::new();
        c.request_headers.apply(&mut headers);
        assert_eq!(headers["x-route"], "api", "and applied by each route");
        let extras = |route: &Route| match &route.action {
            Action::Forward(targets) => targets.0[0].to.extras.clone(),
            _ => None,
        };
        let (Some(a_extras), Some(c_extras)) = (extras(a), extras(c)) else { panic!("the subset is compiled") };
        assert!(Arc::ptr_eq(&a_extras, &c_extras), "the same subset: held once");
        let Action::Forward(targets) = &a.action else { panic!() };
        assert_eq!(targets.0[0].subset(), Some("v1"));
        let routes = &policy.mesh_routes("a.example").expect("bound").routes;
        let to = |route: &Route| match &route.action {
            Action::Forward(targets) => targets.0[0].to.clone(),
            _ => panic!("a forwarding route"),
        };
        assert!(Arc::ptr_eq(&to(&routes[1]), &to(&routes[2])), "the same destination: held once");
        assert!(!Arc::ptr_eq(&to(&routes[0]), &to(&routes[1])), "another subset: another destination");
        assert_eq!((to(&routes[1]).host.as_ref(), &*a.scope.exported.namespace), ("a.example", "team"));
        assert!(Arc::ptr_eq(&a.scope.exported, &b.scope.exported), "one namespace, exported alike: held once");
        assert!(!Arc::ptr_eq(&a.scope.exported, &c.scope.exported), "another namespace");
    }

    #[test]
    fn routes_are_tried_in_declaration_order_and_the_first_match_wins() {
        let policy = policy(CONFIG, &Resolved::new());
        let host = policy.mesh_routes("HTTPBIN.org:80").expect("the VirtualService is bound to the mesh");
        let none = http::HeaderMap::new();
        assert_eq!(first_match(host, "/status/418", &none).unwrap().name().to_string(), "teapot");
        assert!(matches!(
            &first_match(host, "/status/418", &none).unwrap().action,
            Action::Respond(response) if response.0 == StatusCode::IM_A_TEAPOT
        ));
        assert!(matches!(
            &first_match(host, "/old", &none).unwrap().action,
            Action::Redirect(redirect) if redirect.status == StatusCode::PERMANENT_REDIRECT
        ));
        let last = first_match(host, "/get", &none).unwrap();
        assert_eq!(last.name().to_string(), "egress/httpbin[3]");
        assert_eq!(last.timeout(), Some(Duration::from_secs(2)));
        let mut canary = http::HeaderMap::new();
        canary.insert("x-canary", "yes".parse().unwrap());
        let Action::Forward(targets) = &first_match(host, "/get", &canary).unwrap().action else { panic!() };
        let picks: Vec<&str> = [0, 24, 25, 99, 100, 124, 125].map(|roll| targets.pick(roll).unwrap().host()).into();
        assert_eq!(
            picks,
            [
                "a.example.com",
                "a.example.com",
                "b.example.com",
                "b.example.com",
                "a.example.com",
                "a.example.com",
                "b.example.com"
            ]
        );
    }

    #[test]
    fn retries_default_to_istios_and_read_envoys_conditions() {
        let default = RetryPolicy::mesh_default();
        assert_eq!(default.attempts, 2);
        assert!(default.on.connect_failure && default.on.refused_stream && default.on.status(503));
        assert!(!default.on.reset_or_timeout(), "a reset after the request was sent is not retried by default");
        assert!(!default.on.status(500) && !default.on.status(502));
        let cases = [
            ("5xx", 500, true),
            ("5xx", 404, false),
            ("gateway-error", 504, true),
            ("gateway-error", 500, false),
            ("retriable-4xx", 409, true),
            ("connect-failure,429", 429, true),
            ("connect-failure", 503, false),
        ];
        for (retry_on, status, expected) in cases {
            assert_eq!(RetryOn::parse(retry_on).status(status), expected, "{retry_on} on {status}");
        }
        assert!(RetryOn::parse("gateway-error").reset_or_timeout());
        assert!(!RetryOn::parse("connect-failure,retriable-4xx").reset_or_timeout());
    }

    #[test]
    fn destination_rule_subsets_select_endpoints_by_label() {
        let yaml = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api}
spec:
  hosts: [api.internal]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 192.0.2.1, labels: {version: v1}}, {address: 192.0.2.2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api}
spec:
  host: api.internal
  trafficPolicy: {loadBalancer: {simple: RANDOM}}
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}, trafficPolicy: {loadBalancer: {simple: PASSTHROUGH}}}]
";
        let policy = policy(yaml, &Resolved::new());
        let Registered::Service(service) = policy.registered("api.internal", 80) else { panic!("registered") };
        let v1 = Upstream::Endpoint("192.0.2.1:80".parse().unwrap());
        assert!((0..5).all(|_| service.upstream(80, Some("v1")) == v1));
        assert_eq!(service.upstream(80, Some("v2")), Upstream::OriginalDestination, "the subset's own policy");
        assert_eq!(service.upstream(80, Some("v3")), Upstream::NoSubset);
        let variant = service.variant(Viewer::Gateway, &policy);
        assert_eq!(service.cluster(variant, 80, None).unwrap().policy.lb, LoadBalance::Random);
    }

    #[test]
    fn the_destination_rule_of_the_workloads_namespace_comes_before_the_services_and_the_roots() {
        // Each rule told apart by its connect timeout (seconds).
        let rule = |namespace: &str, seconds: u32, export: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: api, namespace: {namespace}}}\n\
                 spec: {{host: api.internal, exportTo: [{export}], trafficPolicy: {{connectionPool: {{tcp: {{connectTimeout: {seconds}s}}}}}}}}\n---\n"
            )
        };
        let yaml = format!(
            "{}{}{}{}apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: api, namespace: services}}
spec:
  hosts: [api.internal]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 192.0.2.1}}]
",
            rule("team-a", 1, "'.'"),
            rule("services", 2, "'team-b', 'team-c'"),
            rule("istio-system", 3, "'team-d'"),
            rule("team-x", 4, "'*'"),
        );
        let policy = policy(&yaml, &Resolved::new());
        let Registered::Service(service) = policy.registered("api.internal", 80) else { panic!("registered") };
        let timeout = |namespace: Option<&str>| {
            let workload =
                namespace.map(|ns| Workload { name: "w".into(), namespace: ns.into(), ..Default::default() });
            let variant = service.variant(Viewer::Workload(workload.as_ref()), &policy);
            service.cluster(variant, 80, None).unwrap().policy.connect_timeout.map(|t| t.as_secs())
        };
        assert_eq!(timeout(Some("team-a")), Some(1), "the workload's own namespace's rule");
        assert_eq!(timeout(Some("team-b")), Some(2), "the service's namespace's, exported to team-b");
        assert_eq!(timeout(Some("team-d")), Some(3), "the root namespace's, exported to team-d");
        assert_eq!(timeout(Some("team-e")), None, "none is exported to team-e (team-x's is for its own)");
        assert_eq!(timeout(None), Some(2), "an unknown source: the service's namespace's");
    }

    #[test]
    fn the_registry_knows_hosts_by_port_and_where_their_endpoints_are() {
        let resolved = Resolved::from([("httpbin.org".to_owned(), vec!["203.0.113.80".parse().unwrap()])]);
        let policy = policy(CONFIG, &resolved);
        let service = |host: &str, port: u16| match policy.registered(host, port) {
            Registered::Service(service) => Some(service),
            Registered::Unknown => None,
        };
        assert_eq!(
            service("httpbin.org", 80).unwrap().upstream(80, None),
            Upstream::Endpoint("203.0.113.80:80".parse().unwrap())
        );
        assert!(service("httpbin.org", 443).is_none(), "a port the ServiceEntry does not declare is not registered");
        assert!(service("edition.cnn.com", 80).is_none());
        let wildcard = service("api.example.com", 8080).unwrap();
        assert_eq!(wildcard.upstream(8080, None), Upstream::OriginalDestination);
        assert!(wildcard.http2(8080) && !wildcard.http2(80));
        let db = service("db.internal", 80).unwrap();
        let picks = [db.upstream(80, None), db.upstream(80, None), db.upstream(80, None)];
        assert_eq!(
            picks,
            [
                Upstream::Endpoint("192.0.2.1:8000".parse().unwrap()),
                Upstream::Endpoint("192.0.2.2:9000".parse().unwrap()),
                Upstream::Endpoint("192.0.2.1:8000".parse().unwrap())
            ]
        );
        let unresolved = policy_without_answers();
        assert!(
            matches!(unresolved.registered("httpbin.org", 80), Registered::Service(s) if s.upstream(80, None) == Upstream::NoEndpoint)
        );
    }

    #[test]
    fn of_the_services_registered_under_one_host_a_viewer_gets_the_first_it_sees_on_the_port() {
        let entry = |name: &str, namespace: &str, port: u16, export: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: {namespace}}}\n\
                 spec: {{hosts: [API.shared], ports: [{{number: {port}, name: p, protocol: TCP}}], resolution: NONE, \
                 exportTo: [{export}]}}\n"
            )
        };
        let yaml = [
            entry("first", "team-a", 80, "'.'"),
            entry("second", "team-b", 80, "'*'"),
            entry("third", "team-c", 443, "'*'"),
            entry("fourth", "team-d", 80, "'*'"),
        ]
        .join("---\n");
        let policy = policy(&yaml, &Resolved::new());
        let registered = |namespace: Option<&str>, port: u16| {
            let workload =
                namespace.map(|ns| Workload { name: "w".into(), namespace: ns.into(), ..Default::default() });
            match policy.registered_for("api.shared", port, Viewer::Workload(workload.as_ref())) {
                Registered::Service(service) => Some(service.exported.namespace.to_string()),
                Registered::Unknown => None,
            }
        };
        assert_eq!(registered(Some("team-a"), 80).as_deref(), Some("team-a"), "the first, exported to its own");
        assert_eq!(registered(Some("team-x"), 80).as_deref(), Some("team-b"), "the first exported to everyone");
        assert_eq!(registered(Some("team-x"), 443).as_deref(), Some("team-c"), "the first with the port");
        assert_eq!(registered(None, 80).as_deref(), Some("team-a"), "an unknown source sees all: the first");
        assert_eq!(registered(Some("team-x"), 8080), None, "no service has the port");
    }

    fn policy_without_answers() -> ProxyPolicy {
        policy(CONFIG, &Resolved::new())
    }
}
