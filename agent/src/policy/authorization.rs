//! AuthorizationPolicies, compiled: which apply where, and their rules as matchers, decided per request (HTTP)
//! or per connection (TLS, TCP) in Istio's order — a matching DENY denies; then, if any ALLOW policy applies,
//! one of them must match. AUDIT and dry-run policies are decided and reported, never enforced.
//!
//! Where a policy applies: on the gateway's own ports, the policies of the root namespace and of the gateway's
//! namespace (any namespace when it is not known) whose selector matches the gateway's labels (or that have
//! none, in the root or the gateway's namespace); for intercepted traffic, those of the root namespace and of the
//! source workload's namespace whose selector matches the workload (an unknown source: the root namespace's
//! policies without a selector).
//!
//! On a TLS or TCP connection there is no request: `hosts` match the ClientHello's server name where there is
//! one, and what only HTTP has (methods, paths, request headers, request principals) never holds in an ALLOW
//! rule and always holds in a DENY rule — as Istio builds its TCP filters, so a DENY meant for HTTP denies the
//! port's TCP rather than let it by.

mod kernel;
mod targets;

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use ipnet::IpNet;

use crate::config::{
    authorization_policy::{self as config, Action, AuthorizationPolicy},
    service_entry::parse_address,
    workloads::Workload,
    Snapshot, Spec,
};
pub use kernel::{kernel_denials, KernelDenial};
use targets::Targets;
pub use targets::GATEWAY_NAME_LABEL;

/// The policies in force, indexed by where they apply: a request looks at its own few, not at all of them.
#[derive(Debug, Default)]
pub struct Authorization {
    policies: Box<[Policy]>,
    /// Indexes into `policies`: those that apply to the gateway.
    gateway: Box<[usize]>,
    /// The root namespace's, which apply to every workload their selector selects.
    root: Box<[usize]>,
    /// Each other namespace's, which apply to its workloads.
    by_namespace: HashMap<Arc<str>, Box<[usize]>>,
    /// Those attached by `targetRefs` to services: they apply to traffic to those services, from anyone.
    by_destination: Box<[usize]>,
    /// The destinations the kernel refuses by itself, to say which policy refused a flow it reports.
    kernel: Box<[KernelDenial]>,
}

#[derive(Debug)]
struct Policy {
    /// `namespace/name`, as decisions are reported.
    id: Arc<str>,
    namespace: Arc<str>,
    selector: Option<BTreeMap<String, String>>,
    /// What `targetRefs` attach the policy to, instead of a selector.
    targets: Option<Targets>,
    action: Action,
    dry_run: bool,
    rules: Box<[Rule]>,
}

#[derive(Debug)]
struct Rule {
    /// Any one must match (none: any source).
    from: Box<[SourceMatch]>,
    /// Any one must match (none: any operation).
    to: Box<[OperationMatch]>,
    /// Every one must match.
    when: Box<[When]>,
}

#[derive(Debug, Default)]
struct SourceMatch {
    principals: Listed<Text>,
    namespaces: Listed<Text>,
    ip_blocks: Listed<IpNet>,
    remote_ip_blocks: Listed<IpNet>,
    /// `requestPrincipals` / `notRequestPrincipals` set: JWTs are not validated, so they are what only HTTP has.
    request_principals: bool,
}

#[derive(Debug, Default)]
struct OperationMatch {
    hosts: Listed<Text>,
    ports: Listed<u16>,
    methods: Listed<Text>,
    paths: Listed<Text>,
}

/// A field's values and its `not` field's: the value must match one of the first (when there are any) and none
/// of the second.
#[derive(Debug)]
struct Listed<T> {
    any: Box<[T]>,
    none: Box<[T]>,
}

impl<T> Default for Listed<T> {
    fn default() -> Self {
        Listed { any: Box::default(), none: Box::default() }
    }
}

#[derive(Debug)]
enum When {
    Header(http::HeaderName, Listed<Text>),
    SourceIp(Listed<IpNet>),
    RemoteIp(Listed<IpNet>),
    SourceNamespace(Listed<Text>),
    SourcePrincipal(Listed<Text>),
    DestinationIp(Listed<IpNet>),
    DestinationPort(Listed<u16>),
    Sni(Listed<Text>),
    /// An Envoy filter attribute Sluice does not have: never holds in an ALLOW rule, always in a DENY rule.
    Unknown,
}

/// Istio's string match: exact, `prefix*`, `*suffix`, or `*` (any value, which must be present); for paths,
/// also a template (`/api/{*}/items`, `/static/{**}`).
#[derive(Debug)]
enum Text {
    Exact(Box<str>),
    Prefix(Box<str>),
    Suffix(Box<str>),
    Any,
    Template(Box<[Segment]>),
}

#[derive(Debug)]
enum Segment {
    Literal(Box<str>),
    /// `{*}`: one segment.
    One,
    /// `{**}`: the rest, any number of segments.
    Rest,
}

impl Text {
    fn compile(value: &str, fold: bool) -> Text {
        let value = if fold { value.to_ascii_lowercase() } else { value.to_owned() };
        if value.contains("{*}") || value.contains("{**}") {
            let segments = value.split('/').map(|segment| match segment {
                "{*}" => Segment::One,
                "{**}" => Segment::Rest,
                literal => Segment::Literal(literal.into()),
            });
            Text::Template(segments.collect())
        } else if value == "*" {
            Text::Any
        } else if let Some(prefix) = value.strip_suffix('*') {
            Text::Prefix(prefix.into())
        } else if let Some(suffix) = value.strip_prefix('*') {
            Text::Suffix(suffix.into())
        } else {
            Text::Exact(value.into())
        }
    }

    fn matches(&self, value: &str, fold: bool) -> bool {
        // Compared as bytes: a hostile server name need not split where a pattern's length falls.
        let eq = |a: &[u8], b: &[u8]| if fold { a.eq_ignore_ascii_case(b) } else { a == b };
        let bytes = value.as_bytes();
        match self {
            Text::Any => true,
            Text::Exact(exact) => eq(bytes, exact.as_bytes()),
            Text::Prefix(prefix) => bytes.get(..prefix.len()).is_some_and(|head| eq(head, prefix.as_bytes())),
            Text::Suffix(suffix) => {
                let start = bytes.len().checked_sub(suffix.len());
                start.is_some_and(|start| eq(&bytes[start..], suffix.as_bytes()))
            }
            Text::Template(segments) => {
                let mut parts = value.split('/');
                for segment in segments.iter() {
                    match segment {
                        Segment::Rest => return true,
                        Segment::One => {
                            if parts.next().is_none_or(str::is_empty) {
                                return false;
                            }
                        }
                        Segment::Literal(literal) => {
                            if parts.next().is_none_or(|part| !eq(part.as_bytes(), literal.as_bytes())) {
                                return false;
                            }
                        }
                    }
                }
                parts.next().is_none()
            }
        }
    }
}

/// What a request or connection offers to the rules.
#[derive(Clone, Copy, Debug)]
pub struct Subject<'a> {
    /// The request, for HTTP; `None` on a TLS or TCP connection.
    pub http: Option<HttpRequest<'a>>,
    /// The ClientHello's server name, on a TLS connection.
    pub sni: Option<&'a str>,
    pub source_ip: IpAddr,
    /// The client's namespace: from its verified certificate, else its pod (`--kube`).
    pub source_namespace: Option<&'a str>,
    /// The client's verified identity, without `spiffe://` (`cluster.local/ns/NS/sa/SA`).
    pub principal: Option<&'a str>,
    pub destination_ip: IpAddr,
    pub destination_port: u16,
}

#[derive(Clone, Copy, Debug)]
pub struct HttpRequest<'a> {
    pub method: &'a str,
    /// The path, without the query.
    pub path: &'a str,
    /// The authority (Host), as sent; its port is not part of what `hosts` match.
    pub host: &'a str,
    pub headers: &'a http::HeaderMap,
}

/// Whose policies apply.
#[derive(Clone, Copy, Debug)]
pub enum Scope<'a> {
    /// The gateway's own ports.
    Gateway,
    /// Intercepted traffic, from this workload (when known).
    Workload(Option<&'a Workload>),
}

/// The decision, and what dry-run and AUDIT policies would have done (reported, not enforced).
#[derive(Debug, Default)]
pub struct Verdict {
    pub denied: bool,
    /// The policy that decided: the matching DENY, the matching ALLOW; `None` when no policy applied, or when
    /// ALLOW policies applied and none matched.
    pub policy: Option<(Arc<str>, Action)>,
    /// Whether any enforced policy applied at all.
    pub governed: bool,
    /// Policies decided but not enforced: (policy, action, whether it matched).
    pub reported: Vec<(Arc<str>, Action, bool)>,
}

impl Authorization {
    /// The policies of `snapshot`; `gateway_labels` and `gateway_namespace` say which apply on the gateway's
    /// ports.
    pub fn compile(
        snapshot: &Snapshot,
        gateway_labels: &BTreeMap<String, String>,
        gateway_namespace: Option<&str>,
    ) -> Authorization {
        let root: Arc<str> = snapshot.mesh.root_namespace().into();
        let mut policies = Vec::new();
        for resource in &snapshot.resources {
            let Spec::AuthorizationPolicy(policy) = &resource.spec else { continue };
            let Ok(action) = policy.action() else { continue };
            let namespace = resource.metadata.namespace();
            // Policies attached by targetRefs apply to what they name, not to workloads by labels.
            let targets = (policy.attached_by_target())
                .then(|| Targets::compile(policy, namespace, snapshot, gateway_labels, gateway_namespace));
            policies.push(Policy {
                id: format!("{namespace}/{}", resource.metadata.name).into(),
                namespace: namespace.into(),
                selector: policy.selector.as_ref().map(|selector| selector.match_labels.clone()),
                targets,
                action,
                dry_run: policy.is_dry_run(),
                rules: rules(policy),
            });
        }
        let gateway = (policies.iter().enumerate())
            .filter(|(_, policy)| {
                if let Some(targets) = &policy.targets {
                    return targets.gateway;
                }
                let selected = policy
                    .selector
                    .as_ref()
                    .is_none_or(|selector| selector.iter().all(|(key, value)| gateway_labels.get(key) == Some(value)));
                let in_scope = *policy.namespace == *root
                    || gateway_namespace.map_or(policy.selector.is_some(), |namespace| *policy.namespace == *namespace);
                selected && in_scope
            })
            .map(|(index, _)| index)
            .collect();
        let mut by_namespace: HashMap<Arc<str>, Vec<usize>> = HashMap::new();
        let mut in_root = Vec::new();
        let mut by_destination = Vec::new();
        for (index, policy) in policies.iter().enumerate() {
            if let Some(targets) = &policy.targets {
                if targets.names_services() {
                    by_destination.push(index);
                }
            } else if *policy.namespace == *root {
                in_root.push(index);
            } else {
                by_namespace.entry(policy.namespace.clone()).or_default().push(index);
            }
        }
        Authorization {
            policies: policies.into(),
            gateway,
            root: in_root.into(),
            by_namespace: by_namespace.into_iter().map(|(namespace, indexes)| (namespace, indexes.into())).collect(),
            by_destination: by_destination.into(),
            kernel: kernel_denials(snapshot).into(),
        }
    }

    /// The policy whose DENY rule the kernel refused a flow from `source` to `destination` by (the most specific
    /// entry's, as the kernel's longest-prefix lookup found it).
    pub fn denied_in_kernel(&self, source: IpAddr, destination: SocketAddr, protocol: u8) -> Option<&Arc<str>> {
        let ports_apply = |port: u16| port == 0 || (port == destination.port() && matches!(protocol, 6 | 17 | 132));
        let from = |sources: &[IpNet]| sources.is_empty() || sources.iter().any(|net| net.contains(&source));
        (self.kernel.iter())
            .filter(|denial| {
                ports_apply(denial.port) && denial.net.contains(&destination.ip()) && from(&denial.sources)
            })
            .max_by_key(|denial| (denial.net.prefix_len(), denial.port))
            .map(|denial| &denial.policy)
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// Decides `subject` under the policies that apply in `scope`.
    pub fn decide(&self, scope: Scope<'_>, subject: &Subject<'_>) -> Verdict {
        let mut verdict = Verdict::default();
        if self.policies.is_empty() {
            return verdict;
        }
        let (first, second): (&[usize], &[usize]) = match scope {
            Scope::Gateway => (&self.gateway, &[]),
            Scope::Workload(source) => {
                let own = source.and_then(|source| self.by_namespace.get(&*source.namespace));
                (&self.root, own.map_or(&[][..], |indexes| &**indexes))
            }
        };
        let mut allow_applies = false;
        let mut allowed_by = None;
        let to_destination = self.by_destination.iter().map(|&index| &self.policies[index]).filter(|policy| {
            // One attached to this gateway too is among the first already.
            let targets = policy.targets.as_ref();
            let counted = matches!(scope, Scope::Gateway) && targets.is_some_and(|targets| targets.gateway);
            !counted && targets.is_some_and(|targets| targets.holds_destination(subject))
        });
        for policy in first.iter().chain(second).map(|&index| &self.policies[index]).chain(to_destination) {
            if let Scope::Workload(source) = scope {
                if !policy.selects(source) {
                    continue;
                }
            }
            if policy.dry_run || policy.action == Action::Audit {
                verdict.reported.push((policy.id.clone(), policy.action, policy.matches(subject)));
                continue;
            }
            verdict.governed = true;
            // Each enforced policy's rules are run only while they can still change the outcome.
            match policy.action {
                Action::Deny if !verdict.denied && policy.matches(subject) => {
                    verdict.denied = true;
                    verdict.policy = Some((policy.id.clone(), Action::Deny));
                }
                Action::Allow => {
                    allow_applies = true;
                    if !verdict.denied && allowed_by.is_none() && policy.matches(subject) {
                        allowed_by = Some(policy.id.clone());
                    }
                }
                _ => {}
            }
        }
        if !verdict.denied && allow_applies {
            match allowed_by {
                Some(policy) => verdict.policy = Some((policy, Action::Allow)),
                None => verdict.denied = true,
            }
        }
        verdict
    }
}

/// Whether AuthorizationPolicies the kernel cannot decide by itself apply to the workloads' own traffic (so the
/// proxy must see it): one of the root namespace without a selector applies to every source, and so does one
/// attached to services by `targetRefs`; with the pods known (`knows_sources`), any namespace's may apply to its
/// workloads. The same scope rules as [`Authorization::decide`]'s.
pub fn governs_intercepted(snapshot: &Snapshot, knows_sources: bool) -> bool {
    let root = snapshot.mesh.root_namespace();
    snapshot.resources.iter().any(|resource| match &resource.spec {
        Spec::AuthorizationPolicy(policy) if policy.attached_by_target() => policy.targets_services(),
        Spec::AuthorizationPolicy(policy) => {
            let in_root = resource.metadata.namespace() == root;
            if in_root && kernel::wholly_in_kernel(policy) {
                return false;
            }
            knows_sources || (in_root && policy.selector.is_none())
        }
        _ => false,
    })
}

impl Policy {
    /// Whether the policy's selector selects `source` (no selector: every workload; an unknown source carries no
    /// labels, so only such a policy applies to it).
    fn selects(&self, source: Option<&Workload>) -> bool {
        match (&self.selector, source) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(selector), Some(source)) => selector.iter().all(|(key, value)| source.labels.get(key) == Some(value)),
        }
    }

    /// Whether any rule matches. A policy without rules matches nothing (an ALLOW policy `{}` denies all).
    fn matches(&self, subject: &Subject<'_>) -> bool {
        // What only HTTP has, on a connection: an ALLOW rule cannot be met by it, a DENY rule is met regardless.
        let lenient = self.action != Action::Allow;
        self.rules.iter().any(|rule| rule.matches(subject, lenient))
    }
}

impl Rule {
    fn matches(&self, subject: &Subject<'_>, lenient: bool) -> bool {
        (self.from.is_empty() || self.from.iter().any(|from| from.matches(subject, lenient)))
            && (self.to.is_empty() || self.to.iter().any(|to| to.matches(subject, lenient)))
            && self.when.iter().all(|when| when.matches(subject, lenient))
    }
}

impl<T> Listed<T> {
    fn is_empty(&self) -> bool {
        self.any.is_empty() && self.none.is_empty()
    }
}

/// `value` against a field and its `not` field: absent, it meets no entry.
fn admits<T, V: Copy>(listed: &Listed<T>, value: Option<V>, matches: impl Fn(&T, V) -> bool) -> bool {
    let hit = |list: &[T]| value.is_some_and(|value| list.iter().any(|entry| matches(entry, value)));
    (listed.any.is_empty() || hit(&listed.any)) && !hit(&listed.none)
}

impl SourceMatch {
    fn matches(&self, subject: &Subject<'_>, lenient: bool) -> bool {
        if self.request_principals && subject.http.is_none() {
            return lenient;
        }
        if self.request_principals && !lenient {
            return false;
        }
        admits(&self.principals, subject.principal, |text, value| text.matches(value, false))
            && admits(&self.namespaces, subject.source_namespace, |text, value| text.matches(value, false))
            && admits(&self.ip_blocks, Some(subject.source_ip), |net, ip| net.contains(&ip))
            && admits(&self.remote_ip_blocks, Some(subject.source_ip), |net, ip| net.contains(&ip))
    }
}

impl OperationMatch {
    fn matches(&self, subject: &Subject<'_>, lenient: bool) -> bool {
        if !admits(&self.ports, Some(subject.destination_port), |port, value| *port == value) {
            return false;
        }
        match &subject.http {
            Some(request) => {
                let host = strip_port(request.host);
                admits(&self.hosts, Some(host), |text, value| text.matches(value, true))
                    && admits(&self.methods, Some(request.method), |text, value| text.matches(value, false))
                    && admits(&self.paths, Some(request.path), |text, value| text.matches(value, false))
            }
            None => {
                let hosts = match subject.sni {
                    _ if self.hosts.is_empty() => true,
                    Some(sni) => admits(&self.hosts, Some(sni), |text, value| text.matches(value, true)),
                    None => lenient,
                };
                let http_only = self.methods.is_empty() && self.paths.is_empty();
                hosts && (http_only || lenient)
            }
        }
    }
}

impl When {
    fn matches(&self, subject: &Subject<'_>, lenient: bool) -> bool {
        match self {
            When::Header(name, values) => match &subject.http {
                Some(request) => {
                    let value = request.headers.get(name).and_then(|value| value.to_str().ok());
                    admits(values, value, |text, value| text.matches(value, false))
                }
                None => lenient,
            },
            When::SourceIp(nets) | When::RemoteIp(nets) => {
                admits(nets, Some(subject.source_ip), |net, ip| net.contains(&ip))
            }
            When::SourceNamespace(values) => {
                admits(values, subject.source_namespace, |text, value| text.matches(value, false))
            }
            When::SourcePrincipal(values) => {
                admits(values, subject.principal, |text, value| text.matches(value, false))
            }
            When::DestinationIp(nets) => admits(nets, Some(subject.destination_ip), |net, ip| net.contains(&ip)),
            When::DestinationPort(ports) => admits(ports, Some(subject.destination_port), |port, value| *port == value),
            When::Sni(values) => admits(values, subject.sni, |text, value| text.matches(value, true)),
            When::Unknown => lenient,
        }
    }
}

/// `host:port` → `host` (an IPv6 literal keeps its brackets' contents whole).
fn strip_port(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    }
}

fn texts(values: &[String], fold: bool) -> Box<[Text]> {
    values.iter().map(|value| Text::compile(value, fold)).collect()
}

fn listed(any: &[String], none: &[String], fold: bool) -> Listed<Text> {
    Listed { any: texts(any, fold), none: texts(none, fold) }
}

/// Addresses and CIDRs (validation refused any other value).
fn nets(any: &[String], none: &[String]) -> Listed<IpNet> {
    let parsed = |values: &[String]| values.iter().filter_map(|value| parse_address(value)).collect();
    Listed { any: parsed(any), none: parsed(none) }
}

fn ports(any: &[String], none: &[String]) -> Listed<u16> {
    let parsed = |values: &[String]| values.iter().filter_map(|value| value.parse().ok()).collect();
    Listed { any: parsed(any), none: parsed(none) }
}

fn rules(policy: &AuthorizationPolicy) -> Box<[Rule]> {
    let rules = policy.rules.iter().flatten().map(|rule| Rule {
        from: (rule.from.iter().flatten())
            .filter_map(|from| from.source.as_ref())
            .map(|source| SourceMatch {
                // Istio's principals are SPIFFE identities without their scheme.
                principals: listed(&source.principals, &source.not_principals, false),
                namespaces: listed(&source.namespaces, &source.not_namespaces, false),
                ip_blocks: nets(&source.ip_blocks, &source.not_ip_blocks),
                remote_ip_blocks: nets(&source.remote_ip_blocks, &source.not_remote_ip_blocks),
                request_principals: !source.request_principals.is_empty() || !source.not_request_principals.is_empty(),
            })
            .collect(),
        to: (rule.to.iter().flatten())
            .filter_map(|to| to.operation.as_ref())
            .map(|operation| OperationMatch {
                hosts: listed(&operation.hosts, &operation.not_hosts, true),
                ports: ports(&operation.ports, &operation.not_ports),
                methods: listed(&operation.methods, &operation.not_methods, false),
                paths: listed(&operation.paths, &operation.not_paths, false),
            })
            .collect(),
        when: rule.when.iter().map(when).collect(),
    });
    rules.collect()
}

fn when(condition: &config::Condition) -> When {
    let (values, not) = (&condition.values, &condition.not_values);
    match condition.key.as_str() {
        "source.ip" => When::SourceIp(nets(values, not)),
        "remote.ip" => When::RemoteIp(nets(values, not)),
        "destination.ip" => When::DestinationIp(nets(values, not)),
        "destination.port" => When::DestinationPort(ports(values, not)),
        "source.namespace" => When::SourceNamespace(listed(values, not, false)),
        "source.principal" => When::SourcePrincipal(listed(values, not, false)),
        "connection.sni" => When::Sni(listed(values, not, true)),
        key => {
            let header = key.strip_prefix("request.headers[").and_then(|rest| rest.strip_suffix(']'));
            match header.and_then(|name| http::HeaderName::from_bytes(name.as_bytes()).ok()) {
                Some(name) => When::Header(name, listed(values, not, false)),
                None => When::Unknown,
            }
        }
    }
}

#[cfg(test)]
mod tests;
