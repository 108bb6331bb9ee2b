//! Configuration → the proxy's policy: the registry and each context's virtual hosts.

use super::*;

/// Compiles the proxy's policy: the registry from the ServiceEntries (endpoints from `resolved` for DNS), the
/// routes of the VirtualServices as `bindings` bound them, and each workload's outbound mode (`sidecars`, shared
/// with the kernel's per-source exceptions).
pub fn proxy_policy(
    snapshot: &Snapshot,
    resolved: &Resolved,
    bindings: &Bindings,
    sidecars: Arc<SidecarModes>,
    settings: &ProxySettings,
    states: &ClusterStates,
) -> ProxyPolicy {
    // What is only needed while compiling is allocated apart from what the policy keeps (`transient`).
    let rules = transient(|| Rules::new(snapshot));
    let mut interner = Interner::default();
    let mut registry: BTreeMap<String, Vec<Service>> = BTreeMap::new();
    // Whether any host is registered at no address (wildcards, NONE without addresses): only then may a request
    // need its Host checked by DNS.
    let mut unaddressed = false;
    for resource in &snapshot.resources {
        if let Spec::ServiceEntry(entry) = &resource.spec {
            let visible_to = Visibility::compile_or(
                &entry.export_to,
                &snapshot.mesh.default_service_export_to,
                resource.metadata.namespace(),
            );
            let exported = interner.exported(resource.metadata.namespace(), visible_to);
            let inputs = ClusterInputs {
                states,
                credentials: &settings.credentials,
                mesh_h2_upgrade: snapshot.mesh.h2_upgrade(),
            };
            for service in services(entry, &exported, resolved, &rules, &inputs, &mut interner) {
                unaddressed |= service.known_nets().next().is_none();
                transient(|| registry.entry(service.host.to_ascii_lowercase()).or_default().push(service));
            }
        }
    }
    let mut hosts: BTreeMap<String, Host> = BTreeMap::new();
    let mut by_address = AddressIndex::default();
    for (host, services) in registry {
        let first = services.into_iter().rev().fold(None, |next, service| Some(Arc::new(service.followed_by(next))));
        for service in std::iter::successors(first.as_ref(), |service| service.next()) {
            by_address.insert(service);
        }
        transient(|| hosts.entry(host).or_default()).services = first;
    }
    by_address.finish();
    for (host, indexes) in &bindings.mesh {
        let routes = virtual_host(snapshot, indexes, &mut interner);
        let tls = l4_routes(snapshot, indexes, L4Kind::Tls, &mut interner);
        let tcp = l4_routes(snapshot, indexes, L4Kind::Tcp, &mut interner);
        let entry = transient(|| hosts.entry(host.clone()).or_default());
        entry.mesh = Some(routes);
        entry.mesh_l4 = (tls.is_some() || tcp.is_some()).then(|| Box::new(MeshL4Routes { tls, tcp }));
    }
    let mut table = HostTable::default();
    for (host, entry) in hosts {
        table.insert(&host, entry);
    }
    table.shrink_to_fit();
    let mut policy = ProxyPolicy {
        sidecars,
        host_verify: settings.host_verify,
        verifies_hosts_by_dns: unaddressed && settings.host_verify == HostVerify::Strict,
        upgrades: settings.upgrades.iter().map(|protocol| protocol.to_ascii_lowercase()).collect(),
        path_normalization: snapshot.mesh.path_normalization(),
        upstream: UpstreamDefaults {
            connect_timeout: snapshot.mesh.connect_timeout(),
            keepalive: snapshot.mesh.tcp_keepalive.as_ref().map(Keepalive::read),
            h2_upgrade: snapshot.mesh.h2_upgrade(),
        },
        hosts: table,
        by_address,
        gateway_ports: BTreeMap::new(),
        gateways: bindings
            .gateways
            .iter()
            .map(|gateway| {
                let ports = |served: fn(&Server) -> bool| {
                    let servers = gateway.servers.iter().filter(|server| served(server));
                    servers.filter_map(|server| u16::try_from(server.port.number).ok()).collect()
                };
                let tls_servers: Vec<TlsServer> = (gateway.servers.iter().enumerate())
                    .filter(|(_, server)| is_tls(&server.port.protocol))
                    .filter_map(|(index, server)| TlsServer::compile(&gateway.id, index, server, &settings.credentials))
                    .collect();
                // What is inside terminated TLS: requests for the http routes (HTTPS), bytes for the tcp routes (TLS).
                let inside = |opaque: bool| tls_servers.iter().filter(move |server| server.opaque == opaque);
                let mut http_ports: Vec<u16> = ports(|server| is_http(&server.port.protocol));
                http_ports.extend(inside(false).map(|server| server.port));
                let mut tcp_ports: Vec<u16> = ports(|server| server.port.protocol.eq_ignore_ascii_case("TCP"));
                tcp_ports.extend(inside(true).map(|server| server.port));
                GatewayRoutes {
                    id: gateway.id.clone(),
                    http_ports,
                    hosts: gateway.hosts.map(|indexes| virtual_host(snapshot, indexes, &mut interner)),
                    tls_ports: ports(passes_tls_through),
                    tls_hosts: gateway.hosts.map(|indexes| l4_routes(snapshot, indexes, L4Kind::Tls, &mut interner)),
                    tcp_ports,
                    tcp_routes: l4_routes(snapshot, &gateway.services, L4Kind::Tcp, &mut interner),
                    tls_servers,
                    https_redirect_ports: ports(|server| {
                        is_http(&server.port.protocol)
                            && server.tls.as_ref().is_some_and(|tls| tls.https_redirect == Some(true))
                    }),
                }
            })
            .collect(),
        own_services: settings.own_services.clone(),
        gateway: settings.gateway_namespace.as_deref().map(|namespace| Workload {
            name: "gateway".into(),
            namespace: namespace.into(),
            labels: BTreeMap::new(),
        }),
        authorization: crate::policy::authorization::Authorization::compile(
            snapshot,
            &settings.gateway_labels,
            settings.gateway_namespace.as_deref(),
        ),
    };
    policy.gateway_ports = gateway_ports(&policy.gateways);
    policy
}

/// How each port of the selected Gateways serves its connections: decided here, not per connection.
fn gateway_ports(gateways: &[GatewayRoutes]) -> BTreeMap<u16, GatewayPort> {
    let ports = gateways
        .iter()
        .flat_map(|gateway| gateway.http_ports.iter().chain(&gateway.tls_ports).chain(&gateway.tcp_ports));
    ports
        .map(|&port| {
            let any = |serves: &dyn Fn(&GatewayRoutes) -> bool| gateways.iter().any(serves);
            let kind = if any(&|gateway| gateway.tls_servers.iter().any(|server| server.port == port)) {
                GatewayPort::TerminatesTls
            } else if any(&|gateway| gateway.tcp_ports.contains(&port)) {
                GatewayPort::Tcp
            } else if any(&|gateway| gateway.tls_ports.contains(&port))
                && !any(&|gateway| gateway.http_ports.contains(&port))
            {
                GatewayPort::PassesTlsThrough
            } else {
                GatewayPort::Detected
            };
            (port, kind)
        })
        .collect()
}

/// Whether a Gateway server passes TLS through to be routed by server name: protocol `TLS` (or `HTTPS`) with
/// `tls.mode: PASSTHROUGH`.
fn passes_tls_through(server: &Server) -> bool {
    is_tls(&server.port.protocol) && server.tls.as_ref().is_some_and(|tls| tls.mode() == "PASSTHROUGH")
}

/// A route's weighted destinations, each with its header manipulations: a lone destination takes everything;
/// otherwise the weights (validated to sum to 100) decide.
pub(super) fn targets<'a>(
    destinations: impl ExactSizeIterator<Item = (&'a Destination, Option<i64>, Option<&'a Headers>)>,
    interner: &mut Interner,
) -> Targets {
    let mut destinations = destinations.peekable();
    if destinations.len() == 1 {
        if let Some(&(destination, _, headers)) = destinations.peek() {
            return Targets::One(interner.target(destination, headers));
        }
    }
    let mut total = 0u32;
    let targets = destinations
        .map(|(destination, weight, headers)| {
            total += u32::try_from(weight.unwrap_or(0)).unwrap_or(0);
            WeightedTarget { to: interner.target(destination, headers), weight_to: total }
        })
        .collect();
    Targets::Weighted(Box::new(Weighted(targets)))
}

/// What a VirtualService's routes share: its name, its namespace and `exportTo`, and its routes' own `names`.
pub(super) fn route_scope(
    snapshot: &Snapshot,
    resource: &crate::config::Resource,
    service: &crate::config::virtual_service::VirtualService,
    names: Option<Box<RouteNames>>,
    interner: &mut Interner,
) -> Arc<RouteScope> {
    let namespace = resource.metadata.namespace();
    let visible_to =
        Visibility::compile_or(&service.export_to, &snapshot.mesh.default_virtual_service_export_to, namespace);
    Arc::new(RouteScope {
        name: resource.metadata.name.as_str().into(),
        exported: interner.exported(namespace, visible_to),
        names,
    })
}

pub(super) fn virtual_host(snapshot: &Snapshot, indexes: &[usize], interner: &mut Interner) -> VirtualHost {
    let mut routes = Vec::new();
    for resource in bindings::services(snapshot, indexes) {
        let Spec::VirtualService(service) = &resource.spec else { continue };
        let http = super::delegation::expanded(snapshot, resource.metadata.namespace(), service);
        let names = http
            .iter()
            .any(|route| route.name.is_some())
            .then(|| Box::new(RouteNames(http.iter().map(|route| route.name.as_deref().map(Arc::from)).collect())));
        let scope = route_scope(snapshot, resource, service, names, interner);
        for (i, route) in http.iter().enumerate() {
            let index = u32::try_from(i).unwrap_or(u32::MAX);
            routes.push(compile_route(route, &scope, index, interner));
        }
    }
    // Held for as long as the configuration is: no spare capacity.
    VirtualHost { routes: routes.into() }
}

pub(super) fn compile_route(route: &HttpRoute, scope: &Arc<RouteScope>, index: u32, interner: &mut Interner) -> Route {
    let namespace = &scope.exported.namespace;
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
        let destinations = route.route.iter().map(|d| (&d.destination, d.weight, d.headers.as_deref()));
        Action::Forward(targets(destinations, interner))
    };
    Route {
        matches: interner.matches(&route.matches, namespace),
        action,
        scope: scope.clone(),
        extras: interner.route_extras(route),
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

/// What a route sets beyond its match, action and timeout, compiled (`Interner::route_extras` shares it).
pub(super) fn route_extras(route: &HttpRoute, interner: &mut Interner) -> RouteExtras {
    let HeaderManipulations { request: request_headers, response: response_headers } =
        header_ops(route.headers.as_deref(), interner);
    let retries = route.retries.as_deref().map(|retries| interner.retries(retry_policy(retries)));
    let regexes = &mut interner.regexes;
    RouteExtras {
        request_headers,
        rewrite: route.rewrite.as_ref().map(|rewrite| Rewrite {
            uri: rewrite.uri.as_deref().map(Box::from),
            uri_regex: rewrite
                .uri_regex_rewrite
                .as_ref()
                .and_then(|r| Some((regexes.get(&r.pattern)?, r.rewrite.replace("\\", "$").into()))),
            authority: rewrite.authority.as_deref().map(Box::from),
        }),
        response_headers,
        retries,
        fault: route.fault.as_deref().map(|f| Box::new(fault(f))),
        mirror: route.mirror.as_ref().map(|mirror| {
            Box::new(Mirror {
                host: mirror.host.clone(),
                port: mirror.port.as_ref().and_then(|p| u16::try_from(p.number).ok()),
                // Istio mirrors every request when no share is given.
                percent: route.mirror_percentage.as_ref().map_or(100.0, |p| p.value),
            })
        }),
        cors: route.cors_policy.as_ref().map(|policy| Box::new(cors(policy, regexes))),
    }
}

pub(super) fn retry_policy(retries: &crate::config::virtual_service::HttpRetry) -> RetryPolicy {
    let default = RetryPolicy::mesh_default();
    RetryPolicy {
        attempts: u32::try_from(retries.attempts).unwrap_or(0),
        per_try_timeout: retries.per_try_timeout.as_deref().and_then(|t| parse_duration(t).ok()),
        on: retries.retry_on.as_deref().map_or(default.on, RetryOn::parse),
    }
}

pub(super) fn fault(fault: &crate::config::virtual_service::HttpFault) -> Fault {
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

pub(super) fn cors(policy: &crate::config::virtual_service::CorsPolicy, regexes: &mut RegexCache) -> Cors {
    let list =
        |items: &[String]| (!items.is_empty()).then(|| HeaderValue::from_str(&items.join(","))).and_then(Result::ok);
    Cors {
        allow_origins: policy
            .allow_origins
            .iter()
            .filter_map(|origin| crate::policy::http_match::Matcher::compile(origin, false, regexes))
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

pub(super) fn header_ops(headers: Option<&Headers>, interner: &mut Interner) -> HeaderManipulations {
    HeaderManipulations {
        request: interner.header_ops(headers.and_then(|h| h.request.as_ref())),
        response: interner.header_ops(headers.and_then(|h| h.response.as_ref())),
    }
}
