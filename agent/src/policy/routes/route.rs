//! A context's routes for a host, compiled: match lists, targets, retries, faults, mirrors, CORS, redirects,
//! rewrites and header manipulations, each as a request uses it.

use super::*;
use crate::policy::http_match::RequestView;

/// The routes for one host of one context: the http routes of every VirtualService bound there, in order.
#[derive(Debug)]
pub struct VirtualHost {
    pub routes: Box<[Route]>,
}

impl VirtualHost {
    /// The first route, in declaration order, that `visible` lets the request see and whose match list admits
    /// it (a route without matches admits every request): Istio's first-match rule.
    pub fn first_match(&self, view: &RequestView<'_>, visible: impl Fn(&Route) -> bool) -> Option<Matched<'_>> {
        self.routes.iter().filter(|route| visible(route)).find_map(|route| {
            if route.matches.is_empty() {
                return Some(Matched { route, uri_prefix: None });
            }
            let found = route.matches.iter().find(|m| m.matches(view))?;
            Some(Matched { route, uri_prefix: found.uri_prefix() })
        })
    }
}

/// The route a request matched, and the URI prefix it matched on (which `rewrite.uri` replaces).
#[derive(Clone, Copy, Debug)]
pub struct Matched<'p> {
    pub route: &'p Route,
    pub uri_prefix: Option<&'p str>,
}

/// 48 bytes: what every route has, the rest behind thin pointers.
#[derive(Debug)]
pub struct Route {
    /// Empty: every request matches. Shared with every route of the policy that matches alike.
    pub matches: Arc<Matches>,
    pub action: Action,
    /// What the route shares with the other routes of its VirtualService (its own name among them).
    pub scope: Arc<RouteScope>,
    /// What only some routes set (header manipulations, a rewrite, retries…): shared with every route of the
    /// policy that sets the same (routes are written from templates), and none where nothing is set.
    pub(super) extras: Option<Arc<RouteExtras>>,
    /// Its place in its VirtualService's `http` routes.
    pub(super) index: u32,
    /// In milliseconds (Istio allows no less than one); `None`: no timeout.
    pub(super) timeout_ms: Option<NonZeroU32>,
}

/// A route's `match` list, compiled. Behind one thin pointer in each route (shared, so held once): a route is
/// as small as it can be.
#[derive(Debug)]
pub struct Matches(pub(super) Box<[RequestMatch]>);

impl std::ops::Deref for Matches {
    type Target = [RequestMatch];

    fn deref(&self) -> &[RequestMatch] {
        &self.0
    }
}

/// The VirtualService a route comes from.
#[derive(Debug)]
pub struct RouteScope {
    /// Its name, in the namespace of `exported` (`namespace/name` is written out only where shown).
    pub name: Box<str>,
    /// Its namespace (which Sidecars import by) and `exportTo`.
    pub exported: Arc<ExportScope>,
    /// Each route's own name, by index (`None` when no route has one: most VirtualServices; behind one thin
    /// pointer); a route without one is named by its VirtualService and index.
    pub(super) names: Option<Box<RouteNames>>,
}

impl RouteScope {
    /// A VirtualService's scope exported everywhere, its routes unnamed: for records made in tests.
    #[cfg(test)]
    pub fn new(namespace: &str, name: &str) -> RouteScope {
        let exported = Arc::new(ExportScope { namespace: namespace.into(), visible_to: Visibility::All });
        RouteScope { name: name.into(), exported, names: None }
    }
}

impl std::fmt::Display for RouteScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.exported.namespace, self.name)
    }
}

/// The routes' own names of a VirtualService, by index.
#[derive(Debug)]
pub(super) struct RouteNames(pub(super) Box<[Option<Arc<str>>]>);

/// The rarest of them boxed again (a CORS policy alone is 192 bytes): a route with a rewrite and retries, the
/// usual extras, holds no room for a CORS policy, a fault or a mirror it does not have.
#[derive(Debug, Default)]
pub(super) struct RouteExtras {
    pub(super) request_headers: HeaderOps,
    pub(super) rewrite: Option<Rewrite>,
    pub(super) response_headers: HeaderOps,
    /// Shared with every route of the policy that retries alike (routes are written from templates).
    pub(super) retries: Option<Arc<RetryPolicy>>,
    pub(super) fault: Option<Box<Fault>>,
    pub(super) mirror: Option<Box<Mirror>>,
    pub(super) cors: Option<Box<Cors>>,
}

impl RouteExtras {
    pub(super) fn is_empty(&self) -> bool {
        let RouteExtras { request_headers, rewrite, response_headers, retries, fault, mirror, cors } = self;
        request_headers.is_empty()
            && rewrite.is_none()
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
        match self.scope.names.as_ref().and_then(|names| names.0.get(self.index as usize)) {
            Some(Some(name)) => RouteName::Named(name.clone()),
            _ => RouteName::Indexed(self.scope.clone(), self.index),
        }
    }

    pub fn timeout(&self) -> Option<Duration> {
        self.timeout_ms.map(|ms| Duration::from_millis(ms.get().into()))
    }

    /// What the route does to its requests' headers (before its destination's manipulations).
    pub fn request_headers(&self) -> &HeaderOps {
        static NONE: HeaderOps = HeaderOps { operations: None };
        self.extras.as_ref().map_or(&NONE, |extras| &extras.request_headers)
    }

    pub fn rewrite(&self) -> Option<&Rewrite> {
        self.extras.as_ref()?.rewrite.as_ref()
    }

    pub fn response_headers(&self) -> Option<&HeaderOps> {
        self.extras.as_ref().map(|extras| &extras.response_headers)
    }

    /// `None`: Istio's mesh default.
    pub fn retries(&self) -> Option<&RetryPolicy> {
        self.extras.as_ref()?.retries.as_deref()
    }

    pub fn fault(&self) -> Option<&Fault> {
        self.extras.as_ref()?.fault.as_deref()
    }

    pub fn mirror(&self) -> Option<&Mirror> {
        self.extras.as_ref()?.mirror.as_deref()
    }

    pub fn cors(&self) -> Option<&Cors> {
        self.extras.as_ref()?.cors.as_deref()
    }
}

/// A route's name: its own, or `namespace/virtualservice[index]` (written out only when shown); a request's
/// record shares it.
#[derive(Clone)]
pub enum RouteName {
    Named(Arc<str>),
    /// The VirtualService (shared with its other routes) and the route's index in it.
    Indexed(Arc<RouteScope>, u32),
}

impl std::fmt::Display for RouteName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RouteName::Named(name) => f.write_str(name),
            RouteName::Indexed(service, index) => write!(f, "{service}[{index}]"),
        }
    }
}

// As shown: a VirtualService's whole scope says nothing more of the route.
impl std::fmt::Debug for RouteName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

impl PartialEq for RouteName {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (RouteName::Named(a), RouteName::Named(b)) => a == b,
            (RouteName::Indexed(a, i), RouteName::Indexed(b, j)) => {
                i == j && (Arc::ptr_eq(a, b) || (a.name == b.name && a.exported.namespace == b.exported.namespace))
            }
            _ => false,
        }
    }
}

impl Eq for RouteName {}

/// Retries as Envoy makes them: `attempts` retries after the first try, each try bounded by `per_try_timeout`,
/// on the conditions of `retry_on`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub on: RetryOn,
}

/// Envoy's `retry_on` conditions that apply to HTTP/1.1 and HTTP/2 upstreams.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
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
    pub allow_origins: Vec<crate::policy::http_match::Matcher>,
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

/// 16 bytes, the size of its one-destination case.
#[derive(Debug)]
pub enum Action {
    Forward(Targets),
    /// Boxed: redirects are extras, and a route is as large as its largest action.
    Redirect(Box<Redirect>),
    /// Boxed: as `Redirect`.
    Respond(Box<(StatusCode, Bytes)>),
}

/// Where a route's requests go: its one destination (most routes), or several picked by weight per request.
/// Each destination is shared with every route of the policy that goes there alike (a host's routes mostly
/// differ in what they match, not in where they go).
#[derive(Debug)]
pub enum Targets {
    One(Arc<Target>),
    /// Behind one thin pointer: a route is as small as its one-destination case.
    Weighted(Box<Weighted>),
}

/// Destinations picked by weight.
#[derive(Debug)]
pub struct Weighted(pub(super) Box<[WeightedTarget]>);

#[derive(Debug)]
pub(super) struct WeightedTarget {
    pub(super) to: Arc<Target>,
    /// The weights of this target and of those before it, summed: for the pick.
    pub(super) weight_to: u32,
}

/// One destination of a route.
#[derive(Debug)]
pub struct Target {
    /// Shared with every other use of the host in the policy.
    pub(super) host: Arc<str>,
    pub(super) port: Option<u16>,
    /// Its subset and header manipulations, when it has either (most have neither); shared with every target of
    /// the policy that has the same.
    pub(super) extras: Option<Arc<TargetExtras>>,
}

#[derive(Debug, Default)]
pub(super) struct TargetExtras {
    pub(super) subset: Option<Arc<str>>,
    pub(super) headers: HeaderManipulations,
}

/// What a route or a destination does to the headers of a request, and of its response.
#[derive(Debug, Default)]
pub(super) struct HeaderManipulations {
    pub(super) request: HeaderOps,
    pub(super) response: HeaderOps,
}

impl Target {
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> Option<u16> {
        self.port
    }

    pub fn subset(&self) -> Option<&str> {
        self.extras.as_ref()?.subset.as_deref()
    }

    pub fn request_headers(&self) -> Option<&HeaderOps> {
        self.extras.as_ref().map(|extras| &extras.headers.request)
    }

    pub fn response_headers(&self) -> Option<&HeaderOps> {
        self.extras.as_ref().map(|extras| &extras.headers.response)
    }
}

impl Targets {
    /// A destination by weight; `roll` is uniform in `0..u32::MAX`.
    pub fn pick(&self, roll: u32) -> Option<&Target> {
        let targets = match self {
            Targets::One(only) => return Some(only),
            Targets::Weighted(weighted) => &weighted.0,
        };
        let total = targets.last()?.weight_to;
        if total == 0 {
            return targets.first().map(|target| &*target.to);
        }
        let point = roll % total;
        let index = targets.partition_point(|target| target.weight_to <= point);
        targets.get(index).map(|target| &*target.to)
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
    pub uri: Option<Box<str>>,
    pub uri_regex: Option<(Arc<Regex>, Box<str>)>,
    pub authority: Option<Box<str>>,
}

/// Header manipulations, names and values checked here: removals, then sets, then additions, as Envoy orders
/// them. Most routes have none, and then this holds no allocation; the same manipulations are shared across
/// the policy.
#[derive(Clone, Debug, Default)]
pub struct HeaderOps {
    /// Behind one thin pointer: a route holds one of these for its requests.
    pub(super) operations: Option<Arc<Box<[HeaderOp]>>>,
}

#[derive(Debug)]
pub(super) enum HeaderOp {
    Remove(HeaderName),
    Set(HeaderName, HeaderValue),
    Add(HeaderName, HeaderValue),
}

impl HeaderOps {
    pub(super) fn compile(operations: &HeaderOperations) -> HeaderOps {
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
