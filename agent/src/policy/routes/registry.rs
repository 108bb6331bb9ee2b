//! The registry: each host's services (ServiceEntries) with their ports, endpoints and clusters, the
//! DestinationRule each viewer's requests go through, and how it is compiled.

use super::*;

/// A host registered by one ServiceEntry. 96 bytes, what most services hold; the rest boxed apart.
#[derive(Debug)]
pub struct Service {
    /// The host as the ServiceEntry writes it (a wildcard stays a wildcard).
    pub host: Arc<str>,
    /// Its namespace and `exportTo`.
    pub exported: Arc<ExportScope>,
    pub resolution: Resolution,
    pub(super) ports: ServicePorts,
    /// The entry's own `addresses`. With its endpoints' (what its name resolves to, for DNS hosts), which its
    /// clusters hold already, every address the host is known at (`known_nets`): the endpoints are not held
    /// twice.
    pub(super) addresses: Box<[IpNet]>,
    /// The host's clusters under each DestinationRule that applies to some workloads (variant 0: under none),
    /// each per port: all endpoints (no subset) and each subset's. One list for all variants: most hosts have
    /// one cluster, held in one allocation.
    pub(super) clusters: Box<[Cluster]>,
    /// What few services have: DestinationRules, another service under the same host.
    pub(super) rare: Option<Box<RareService>>,
}

#[derive(Debug, Default)]
pub(super) struct RareService {
    /// Which variant a viewer's requests go through; `None`: the first, for everyone (no rule applies).
    rules: Option<RuleChoice>,
    /// The next service registered under the same host, in declaration order.
    next: Option<Arc<Service>>,
}

/// Which DestinationRule a workload's requests for a host go through, as Istio chooses: one in the workload's
/// own namespace, else the service's namespace's, else the root namespace's, each if exported to the workload.
#[derive(Debug, Default)]
pub(super) struct RuleChoice {
    /// Namespaces with a rule of their own for the host, and its variant.
    pub(super) own: Vec<(String, usize)>,
    /// The service's namespace's rule, then the root namespace's: to whom each is exported, and its variant.
    pub(super) shared: Vec<(Visibility, usize)>,
    /// The variant of a source not known and of the gateway: the service's namespace's rule, else the root
    /// namespace's, else any namespace's (a configuration read from files names no workload).
    pub(super) unknown: usize,
}

impl RuleChoice {
    /// The variant of `workload`'s requests; of a source not known, `unknown`.
    pub(super) fn variant(&self, workload: Option<&Workload>) -> usize {
        let Some(workload) = workload else { return self.unknown };
        let namespace = &*workload.namespace;
        let own = self.own.iter().find(|(own, _)| own == namespace).map(|(_, variant)| *variant);
        own.or_else(|| self.shared.iter().find(|(to, _)| to.admits(Some(namespace))).map(|(_, v)| *v)).unwrap_or(0)
    }
}

/// A service's ports: one held in place (most ServiceEntries declare one: a lookup that checks the port reads no
/// other allocation); several shared with every service that declares the same (configurations are written from
/// templates: a list of its own was a block per host).
#[derive(Clone, Debug)]
pub(super) enum ServicePorts {
    One(ServicePort),
    Several(Arc<[ServicePort]>),
}

impl ServicePorts {
    pub(super) fn iter(&self) -> std::slice::Iter<'_, ServicePort> {
        match self {
            ServicePorts::One(port) => std::slice::from_ref(port).iter(),
            ServicePorts::Several(ports) => ports.iter(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct ServicePort {
    pub(super) number: u16,
    /// Shared across the policy (most ports are named alike).
    pub(super) name: Arc<str>,
    pub(super) target: Option<u16>,
    pub(super) http2: bool,
    pub(super) kind: PortKind,
}

/// What a service port's declared protocol makes of its connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PortKind {
    /// HTTP, HTTP2, GRPC, GRPC-WEB: the HTTP proxy's alone, never relayed as opaque bytes (which would pass by
    /// its routes).
    Http,
    /// HTTPS, TLS: decided by the ClientHello's server name.
    Tls,
    /// TCP, or a protocol Istio relays as TCP: decided by address, without waiting for the client to speak.
    Opaque,
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
pub(super) static NO_RULE: RuleChoice = RuleChoice { own: Vec::new(), shared: Vec::new(), unknown: 0 };

impl Service {
    pub(super) fn rules(&self) -> &RuleChoice {
        self.rare.as_ref().and_then(|rare| rare.rules.as_ref()).unwrap_or(&NO_RULE)
    }

    /// The next service registered under the same host, in declaration order.
    pub(super) fn next(&self) -> Option<&Arc<Service>> {
        self.rare.as_ref()?.next.as_ref()
    }

    /// This service with `next` after it under its host.
    pub(super) fn followed_by(mut self, next: Option<Arc<Service>>) -> Service {
        if next.is_some() {
            self.rare.get_or_insert_default().next = next;
        }
        self
    }

    /// Whether the service declares `port`.
    pub fn has_port(&self, port: u16) -> bool {
        self.ports.iter().any(|p| p.number == port)
    }

    /// What the service declares `port` for; `None` when it does not declare it.
    pub fn port_kind(&self, port: u16) -> Option<PortKind> {
        self.ports.iter().find(|p| p.number == port).map(|p| p.kind)
    }

    /// Whether `port` speaks HTTP/2 to the upstream (declared HTTP2 or GRPC).
    pub fn http2(&self, port: u16) -> bool {
        self.ports.iter().any(|p| p.number == port && p.http2)
    }

    /// Every address the host is known at: the entry's `addresses`, then its endpoints' (each once: those of its
    /// first cluster, which is of no DestinationRule and no subset, and has them all).
    pub(super) fn known_nets(&self) -> impl Iterator<Item = IpNet> + '_ {
        let endpoints = self.clusters.first().map_or(&[][..], |cluster| &*cluster.endpoints);
        self.addresses.iter().copied().chain(endpoints.iter().map(|endpoint| IpNet::from(endpoint.address)))
    }

    /// Whether `address` is one the host is known at; `None` when none is known (nothing to check against).
    pub fn known_at(&self, address: IpAddr) -> Option<bool> {
        let mut known = self.known_nets().peekable();
        known.peek()?;
        Some(known.any(|net| net.contains(&address)))
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
                .known_nets()
                .find(|net| net.prefix_len() == net.max_prefix_len())
                .map(|net| SocketAddr::new(net.addr(), port)),
        }
    }

    /// The cluster for `port` and `subset`, of `variant`.
    pub fn cluster(&self, variant: usize, port: u16, subset: Option<&str>) -> Option<&Cluster> {
        self.clusters.iter().find(|c| usize::from(c.variant) == variant && c.is_of(port, subset))
    }

    /// How Istio's metrics label requests through `cluster` (one of this service's), with its Envoy name.
    pub fn labels(&self, cluster: &Cluster) -> DestinationLabels {
        let namespace = self.exported.namespace.clone();
        DestinationLabels::registered(self.host.clone(), namespace, cluster.port, cluster.subset.clone())
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
        let target = cluster.endpoint(address).map_or(port, |endpoint| endpoint.port);
        Upstream::Endpoint(SocketAddr::new(address, target))
    }
}

/// How a request goes through a registered service: on which of its ports, to which subset (the route's), and
/// under which of its DestinationRules (the variant of its clusters that applies to the request's source).
#[derive(Clone, Copy, Debug)]
pub struct ServiceChoice<'p> {
    pub service: &'p Service,
    pub port: u16,
    pub subset: Option<&'p str>,
    pub variant: usize,
}

impl<'p> ServiceChoice<'p> {
    /// The cluster the request goes through (its limits, load balancer and outlier detection).
    pub fn cluster(&self) -> Option<&'p Cluster> {
        self.service.cluster(self.variant, self.port, self.subset)
    }

    /// The endpoint a request with `hash` goes to, else the load balancer's next.
    pub fn upstream(&self, hash: Option<u64>) -> Upstream {
        self.service.upstream_for(self.variant, self.port, self.subset, hash)
    }
}

/// The DestinationRules by namespace (each namespace's first rule for a host), with to whom each is exported.
pub(super) struct Rules<'a> {
    pub(super) by_namespace: BTreeMap<&'a str, HostTable<(&'a DestinationRule, Visibility)>>,
    pub(super) root: &'a str,
}

impl<'a> Rules<'a> {
    pub(super) fn new(snapshot: &'a Snapshot) -> Rules<'a> {
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
    pub(super) fn for_service(&self, host: &str, namespace: &str) -> (Vec<&'a DestinationRule>, RuleChoice) {
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
        // Held for as long as the configuration is: no spare capacity.
        choice.own.shrink_to_fit();
        choice.shared.shrink_to_fit();
        (candidates, choice)
    }
}

/// What compiling clusters reads besides the configuration: the state clusters keep across compiles (pool
/// limits, outlier detection), and where DestinationRules' `credentialName`s are read from.
pub(super) struct ClusterInputs<'a> {
    pub(super) states: &'a ClusterStates,
    pub(super) credentials: &'a CredentialSource,
    /// The mesh config's `h2UpgradePolicy: UPGRADE` (HTTP ports' requests go upstream as HTTP/2).
    pub(super) mesh_h2_upgrade: bool,
}

/// One service per host of `entry`: DNS hosts resolve on their own (or through the endpoints' names).
pub(super) fn services(
    entry: &ServiceEntry,
    exported: &Arc<ExportScope>,
    resolved: &Resolved,
    rules: &Rules<'_>,
    inputs: &ClusterInputs<'_>,
    interner: &mut Interner,
) -> Vec<Service> {
    let namespace = &exported.namespace;
    let resolution = entry.resolution();
    let ports: Vec<ServicePort> = entry
        .ports
        .iter()
        .filter_map(|port| {
            Some(ServicePort {
                number: u16::try_from(port.number).ok()?,
                name: interner.text(&port.name),
                target: port.target_port.and_then(|t| u16::try_from(t).ok()),
                http2: port.protocol.as_deref().is_some_and(is_http2),
                kind: match port.protocol.as_deref() {
                    Some(protocol) if is_http(protocol) => PortKind::Http,
                    Some(protocol) if is_tls(protocol) => PortKind::Tls,
                    _ => PortKind::Opaque,
                },
            })
        })
        .collect();
    let ports = match <[ServicePort; 1]>::try_from(ports) {
        Ok([port]) => ServicePorts::One(port),
        Err(several) => ServicePorts::Several(interner.ports(several)),
    };
    let endpoint_ports = |ports: &BTreeMap<String, u32>| {
        ports.iter().filter_map(|(n, &p)| Some((n.clone(), u16::try_from(p).ok()?))).collect()
    };
    // Read into the clusters below, then dropped: allocated apart from what the policy keeps.
    let listed: Vec<Endpoint> = transient(|| {
        entry
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
            .collect()
    });
    let addresses: Box<[IpNet]> = entry.addresses.iter().filter_map(|a| parse_address(a)).collect();
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
            let (candidates, rules) = rules.for_service(host, namespace);
            let rare = (!candidates.is_empty()).then(|| Box::new(RareService { rules: Some(rules), next: None }));
            let host = interner.text(host);
            // Held for as long as the configuration is: no spare capacity (boxed slices).
            let variants = std::iter::once(None).chain(candidates.into_iter().map(Some));
            let clusters = variants
                .enumerate()
                .flat_map(|(variant, rule)| {
                    let variant = u16::try_from(variant).unwrap_or(u16::MAX);
                    ports
                        .iter()
                        .flat_map(|port| clusters(&host, namespace, port, &endpoints, rule, inputs, interner))
                        .map(move |mut cluster| {
                            cluster.variant = variant;
                            cluster
                        })
                        .collect::<Vec<_>>()
                })
                .collect();
            Service {
                addresses: addresses.clone(),
                host,
                exported: exported.clone(),
                resolution,
                ports: ports.clone(),
                clusters,
                rare,
            }
        })
        .collect()
}

/// The clusters of `host` on `port`: all its endpoints, and each subset's, under the DestinationRule's policy
/// (a subset's own policy replacing the rule's, a port-level setting replacing either).
pub(super) fn clusters(
    host: &Arc<str>,
    namespace: &Arc<str>,
    port: &ServicePort,
    endpoints: &[Endpoint],
    rule: Option<&DestinationRule>,
    inputs: &ClusterInputs<'_>,
    interner: &mut Interner,
) -> Vec<Cluster> {
    let states = inputs.states;
    // On this port: each endpoint's own port for the port's name, else the port's target, else its number.
    let on_port = |endpoint: &Endpoint| ClusterEndpoint {
        address: endpoint.address,
        port: endpoint.ports.get(&*port.name).copied().or(port.target).unwrap_or(port.number),
    };
    let compile = |policy: Option<&TrafficPolicy>, interner: &mut Interner| {
        let settings = policy.map(|policy| settings_for_port(policy, port.number));
        let mesh_upgrade = inputs.mesh_h2_upgrade && port.kind == PortKind::Http;
        let protocol = (port.http2, mesh_upgrade);
        let compiled = settings.map(|settings| ClusterPolicy::compile(settings, protocol, inputs.credentials));
        interner.cluster_policy(compiled.unwrap_or_default())
    };
    let cluster = |subset: Option<Arc<str>>, endpoints: Vec<ClusterEndpoint>, policy: Arc<ClusterPolicy>| {
        // State that must outlive recompiles is kept only where a policy needs it, by cluster name.
        let state = if policy.limits.is_some() || policy.outlier.is_some() || policy.max_retries().is_some() {
            let labels = DestinationLabels::registered(host.clone(), namespace.clone(), port.number, subset.clone());
            states.get(labels.cluster(), policy.limits)
        } else {
            states.none()
        };
        Cluster::new((port.number, subset), endpoints, policy, state)
    };
    let top = compile(rule.and_then(|rule| rule.traffic_policy.as_ref()), interner);
    let mut out = vec![cluster(None, endpoints.iter().map(on_port).collect(), top.clone())];
    for subset in rule.map(|rule| rule.subsets.as_slice()).unwrap_or_default() {
        let members = with_labels(endpoints, &subset.labels).iter().map(on_port).collect();
        // A subset without a policy of its own shares the rule's, compiled once.
        let policy = match &subset.traffic_policy {
            Some(own) => compile(Some(own), interner),
            None => top.clone(),
        };
        out.push(cluster(Some(interner.text(&subset.name)), members, policy));
    }
    out
}
