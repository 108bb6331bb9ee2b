//! Istio's validation of a VirtualService, rule by rule: hosts and gateways, HTTP routes (conflicting actions,
//! matches, header operations, redirects, rewrites, retries, faults, mirrors, CORS, weights), TLS and TCP
//! routes, and delegation. Each error names its field.

use super::{
    CorsPolicy, HttpFault, HttpRedirect, HttpRetry, HttpRewrite, HttpRoute, L4Match, TlsMatch, VirtualService, MESH,
};
use crate::config::{
    error::FieldError,
    fields::{
        duration_problem, parse_duration, validate_duration, validate_fault_percent, validate_percent, validate_port,
        Destination, EmptyPrefix, Headers,
    },
    http_headers::{self, Direction},
    names, re2,
    service_entry::parse_address,
};

/// Envoy's `retryOn` conditions (HTTP and gRPC), besides HTTP status codes.
const RETRY_ON: [&str; 16] = [
    "5xx",
    "gateway-error",
    "reset",
    "reset-before-request",
    "connect-failure",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "retriable-headers",
    "envoy-ratelimited",
    "http3-post-connect-failure",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

/// The HTTP status codes Go names (`http.StatusText`), which `retryOn` may list.
const NAMED_STATUS: [u16; 62] = [
    100, 101, 102, 103, 200, 201, 202, 203, 204, 205, 206, 207, 208, 226, 300, 301, 302, 303, 304, 305, 307, 308, 400,
    401, 402, 403, 404, 405, 406, 407, 408, 409, 410, 411, 412, 413, 414, 415, 416, 417, 418, 421, 422, 423, 424, 425,
    426, 428, 429, 431, 451, 500, 501, 502, 503, 504, 505, 506, 507, 508, 510, 511,
];

const GRPC_STATUS: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

const CORS_METHODS: [&str; 9] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "CONNECT", "OPTIONS", "TRACE"];

/// Istio's cap on a direct response's body.
const MAX_DIRECT_RESPONSE: usize = 1024 * 1024;

impl VirtualService {
    pub fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let mut fail = |path: &str, reason: String| errors.push(FieldError::new(path, reason));
        // Without hosts, a VirtualService is a delegate: a root's HTTP route stands it in, so only HTTP routes mean
        // anything in it.
        let delegate = self.hosts.is_empty();
        if delegate {
            let only_http = "a delegate VirtualService (one without hosts) has only http routes";
            if !self.gateways.is_empty() {
                fail("spec.gateways", "a delegate VirtualService (one without hosts) may not name gateways".into());
            }
            if !self.tls.is_empty() {
                fail("spec.tls", only_http.into());
            }
            if !self.tcp.is_empty() {
                fail("spec.tcp", only_http.into());
            }
        }
        for (i, gateway) in self.gateways.iter().enumerate() {
            if let Err(reason) = names::gateway_reference(gateway) {
                fail(&format!("spec.gateways[{i}]"), reason);
            }
        }
        let to_gateways = !self.gateways.is_empty() && !self.gateways.iter().any(|g| g == MESH);
        if !to_gateways {
            for (i, route) in self.http.iter().enumerate() {
                for (j, m) in route.matches.iter().enumerate() {
                    for (field, map) in [("headers", &m.headers), ("withoutHeaders", &m.without_headers)] {
                        for (name, _) in map.iter().filter(|(name, _)| http_headers::is_jwt_claim(name)) {
                            fail(
                                &format!("spec.http[{i}].match[{j}].{field}.{name}"),
                                "routing on JWT claims works only for VirtualServices bound to gateways".into(),
                            );
                        }
                    }
                }
            }
        }
        let sni = self.tls.iter().any(|route| route.matches.iter().any(|m| !m.sni_hosts.is_empty()));
        let mut hosts_valid = true;
        for (i, host) in self.hosts.iter().enumerate() {
            let path = format!("spec.hosts[{i}]");
            let checked = if to_gateways { gateway_bound_host(host, sni) } else { names::wildcard_domain(host) };
            match checked {
                Err(reason) if !names::is_ip(host) => {
                    fail(&path, reason);
                    hosts_valid = false;
                }
                Ok(()) if !to_gateways && host == "*" => {
                    fail(&path, "'*' is not allowed for VirtualServices bound to the mesh".into());
                    hosts_valid = false;
                }
                _ => {}
            }
        }
        if hosts_valid {
            for (i, a) in self.hosts.iter().enumerate() {
                for (j, b) in self.hosts.iter().enumerate().skip(i + 1) {
                    if names::hosts_overlap(a, b) {
                        fail(&format!("spec.hosts[{j}]"), format!("'{b}' overlaps spec.hosts[{i}] '{a}'"));
                    }
                }
            }
        }
        if self.http.is_empty() && self.tls.is_empty() && self.tcp.is_empty() {
            fail("spec", "at least one of http, tls or tcp routes is required".into());
        }
        for (i, route) in self.http.iter().enumerate() {
            route.validate(&format!("spec.http[{i}]"), delegate, &mut errors);
        }
        for (i, route) in self.tls.iter().enumerate() {
            let path = format!("spec.tls[{i}]");
            if route.matches.is_empty() {
                errors.push(FieldError::new(format!("{path}.match"), "a TLS route needs at least one match"));
            }
            for (j, m) in route.matches.iter().enumerate() {
                self.validate_tls_match(m, to_gateways, &format!("{path}.match[{j}]"), &mut errors);
            }
            validate_l4_destinations(route.route.iter().map(|r| (&r.destination, r.weight)), "TLS", &path, &mut errors);
        }
        for (i, route) in self.tcp.iter().enumerate() {
            let path = format!("spec.tcp[{i}]");
            for (j, m) in route.matches.iter().enumerate() {
                m.validate(&format!("{path}.match[{j}]"), &mut errors);
            }
            validate_l4_destinations(route.route.iter().map(|r| (&r.destination, r.weight)), "TCP", &path, &mut errors);
        }
        errors
    }

    fn validate_tls_match(&self, m: &TlsMatch, to_gateways: bool, path: &str, errors: &mut Vec<FieldError>) {
        if m.sni_hosts.is_empty() {
            errors.push(FieldError::new(format!("{path}.sniHosts"), "at least one SNI host is required"));
        }
        for (k, sni) in m.sni_hosts.iter().enumerate() {
            let path = format!("{path}.sniHosts[{k}]");
            let checked = if to_gateways { gateway_bound_host(sni, true) } else { names::wildcard_domain(sni) };
            match checked {
                // An address is no server name, but Istio lets it by with a warning.
                Err(_) if names::is_ip(sni) => {}
                Err(reason) => errors.push(FieldError::new(path, reason)),
                Ok(()) if !self.hosts.iter().any(|host| names::host_within(sni, host)) => errors.push(FieldError::new(
                    path,
                    format!("'{sni}' is not within the VirtualService's hosts ({})", self.hosts.join(", ")),
                )),
                Ok(()) => {}
            }
        }
        m.l4.validate(path, errors);
    }
}

/// A host of a VirtualService bound to gateways: as elsewhere, but Istio's generated SNI names
/// (`outbound_.80_._.svc.cluster.local`) are allowed when TLS routes match on SNI.
fn gateway_bound_host(host: &str, sni: bool) -> Result<(), String> {
    if sni && host.split('.').next() == Some("outbound_") {
        return match host.as_bytes().get("outbound_.".len()) {
            Some(b'0'..=b'8') => Ok(()),
            _ => Err(format!("'{host}' is not a valid DNS name (label 'outbound_')")),
        };
    }
    names::wildcard_domain(host)
}

impl HttpRoute {
    fn validate(&self, path: &str, in_delegate: bool, errors: &mut Vec<FieldError>) {
        let mut fail = |field: &str, reason: &str| {
            let path = if field.is_empty() { path.to_owned() } else { format!("{path}.{field}") };
            errors.push(FieldError::new(path, reason));
        };
        if in_delegate && self.delegate.is_some() {
            fail("delegate", "a delegate's routes may not delegate again");
        }
        if self.delegate.is_some() && !in_delegate {
            // A root route: the delegate's routes take its place, so it routes nothing itself.
            if self.redirect.is_some() {
                fail("redirect", "a route that delegates may not redirect");
            }
            if !self.route.is_empty() {
                fail("route", "a route that delegates may not also route");
            }
        } else if self.redirect.is_some() {
            for (set, field) in [
                (!self.route.is_empty(), "route"),
                (self.fault.is_some(), "fault"),
                (self.rewrite.is_some(), "rewrite"),
                (self.direct_response.is_some(), "directResponse"),
            ] {
                if set {
                    fail(field, &format!("{field} and redirect may not be used together"));
                }
            }
        } else if self.direct_response.is_some() {
            for (set, field) in [
                (!self.route.is_empty(), "route"),
                (self.fault.is_some(), "fault"),
                (self.rewrite.is_some(), "rewrite"),
            ] {
                if set {
                    fail(field, &format!("{field} and directResponse may not be used together"));
                }
            }
        } else if self.route.is_empty() {
            fail("", "one of route, redirect, directResponse or delegate is required");
        }
        if self.mirror.is_some() && !self.mirrors.is_empty() {
            fail("mirrors", "mirror and mirrors may not be used together");
        }
        for (i, m) in self.matches.iter().enumerate() {
            validate_http_match(m, &format!("{path}.match[{i}]"), errors);
        }
        if let Some(headers) = &self.headers {
            validate_headers(headers, &format!("{path}.headers"), errors);
            validate_authority_set_once(self.rewrite.as_deref(), headers, path, errors);
        }
        if let Some(cors) = &self.cors_policy {
            validate_cors(cors, &format!("{path}.corsPolicy"), errors);
        }
        if let Some(fault) = &self.fault {
            validate_fault(fault, &format!("{path}.fault"), errors);
        }
        if let Some(percent) = self.mirror_percent.filter(|percent| *percent > 100) {
            errors.push(FieldError::new(format!("{path}.mirrorPercent"), format!("{percent} is not 0 to 100")));
        }
        validate_percent(&self.mirror_percentage.as_deref().cloned(), &format!("{path}.mirrorPercentage"), errors);
        if let Some(mirror) = &self.mirror {
            mirror.validate(&format!("{path}.mirror"), errors);
        }
        for (i, mirror) in self.mirrors.iter().enumerate() {
            mirror.destination.validate(&format!("{path}.mirrors[{i}].destination"), errors);
            validate_percent(&mirror.percentage, &format!("{path}.mirrors[{i}].percentage"), errors);
        }
        if let Some(redirect) = &self.redirect {
            validate_redirect(redirect, &format!("{path}.redirect"), errors);
        }
        if let Some(response) = &self.direct_response {
            let path = format!("{path}.directResponse");
            validate_status(response.status, &format!("{path}.status"), errors);
            if let Some(body) = &response.body {
                if body.string.is_some() && body.bytes.is_some() {
                    errors.push(FieldError::new(format!("{path}.body"), "only one of string or bytes may be set"));
                }
                // `bytes` is base64: three bytes for every four characters.
                let size =
                    body.string.as_ref().map_or(0, String::len) + body.bytes.as_ref().map_or(0, |b| b.len() / 4 * 3);
                if size > MAX_DIRECT_RESPONSE {
                    errors.push(FieldError::new(
                        format!("{path}.body"),
                        format!("the body is {size} bytes; at most 1 MiB"),
                    ));
                }
            }
        }
        if let Some(retries) = &self.retries {
            validate_retries(retries, &format!("{path}.retries"), errors);
        }
        if let Some(rewrite) = &self.rewrite {
            validate_rewrite(rewrite, &format!("{path}.rewrite"), errors);
        }
        let mut total = 0i64;
        for (i, destination) in self.route.iter().enumerate() {
            let path = format!("{path}.route[{i}]");
            destination.destination.validate(&format!("{path}.destination"), errors);
            if let Some(headers) = &destination.headers {
                validate_headers(headers, &format!("{path}.headers"), errors);
            }
            total += validate_weight(destination.weight, &path, errors);
        }
        if self.route.len() > 1 && total == 0 {
            errors
                .push(FieldError::new(format!("{path}.route"), "the weights add up to 0: no destination gets traffic"));
        }
        validate_duration(&self.timeout, &format!("{path}.timeout"), errors);
    }
}

/// A destination's weight: any non-negative number (Envoy shares traffic by weight over their total).
fn validate_weight(weight: Option<i64>, path: &str, errors: &mut Vec<FieldError>) -> i64 {
    match weight {
        Some(weight) if weight < 0 => {
            errors.push(FieldError::new(format!("{path}.weight"), format!("{weight} is negative")));
            0
        }
        Some(weight) => weight,
        None => 0,
    }
}

fn validate_l4_destinations<'a>(
    destinations: impl ExactSizeIterator<Item = (&'a Destination, Option<i64>)>,
    kind: &str,
    path: &str,
    errors: &mut Vec<FieldError>,
) {
    let several = destinations.len() > 1;
    if destinations.len() == 0 {
        errors.push(FieldError::new(format!("{path}.route"), format!("a {kind} route needs at least one destination")));
    }
    let mut total = 0;
    for (i, (destination, weight)) in destinations.enumerate() {
        let path = format!("{path}.route[{i}]");
        destination.validate(&format!("{path}.destination"), errors);
        total += validate_weight(weight, &path, errors);
    }
    if several && total == 0 {
        errors.push(FieldError::new(format!("{path}.route"), "the weights add up to 0: no destination gets traffic"));
    }
}

fn validate_http_match(m: &super::HttpMatch, path: &str, errors: &mut Vec<FieldError>) {
    if let Some(uri) = &m.uri {
        uri.validate(&format!("{path}.uri"), EmptyPrefix::Allowed, errors);
    }
    for (field, value) in [("scheme", &m.scheme), ("method", &m.method), ("authority", &m.authority)] {
        if let Some(value) = value {
            value.validate(&format!("{path}.{field}"), EmptyPrefix::Refused, errors);
        }
    }
    for (field, map) in [("headers", &m.headers), ("withoutHeaders", &m.without_headers)] {
        for (name, value) in map {
            let path = format!("{path}.{field}.{name}");
            if let Some(reason) = http_headers::match_name_problem(name) {
                errors.push(FieldError::new(&path, reason));
            }
            // `withoutHeaders: {x: {regex: "*"}}` is Istio's "x is absent", not a regex.
            if !(field == "withoutHeaders" && value.regex.as_deref() == Some("*")) {
                value.validate(&path, EmptyPrefix::Refused, errors);
            }
        }
    }
    for (name, value) in &m.query_params {
        value.validate(&format!("{path}.queryParams.{name}"), EmptyPrefix::Refused, errors);
    }
    // Port 0 is no port: the match does not test it.
    if let Some(port) = m.port.filter(|port| *port != 0) {
        validate_port(port, &format!("{path}.port"), errors);
    }
    names::validate_labels(&m.source_labels, &format!("{path}.sourceLabels"), errors);
    for (i, gateway) in m.gateways.iter().enumerate() {
        if let Err(reason) = names::gateway_reference(gateway) {
            errors.push(FieldError::new(format!("{path}.gateways[{i}]"), reason));
        }
    }
    if let Some(namespace) = m.source_namespace.as_deref().filter(|namespace| !names::is_dns_label(namespace)) {
        errors.push(FieldError::new(format!("{path}.sourceNamespace"), format!("'{namespace}' is not a namespace")));
    }
}

impl L4Match {
    fn validate(&self, path: &str, errors: &mut Vec<FieldError>) {
        for (i, subnet) in self.destination_subnets.iter().enumerate() {
            if parse_address(subnet).is_none() {
                let reason = format!("'{subnet}' is not an IP address or CIDR");
                errors.push(FieldError::new(format!("{path}.destinationSubnets[{i}]"), reason));
            }
        }
        if let Some(port) = self.port.filter(|port| *port != 0) {
            validate_port(port, &format!("{path}.port"), errors);
        }
        names::validate_labels(&self.source_labels, &format!("{path}.sourceLabels"), errors);
        for (i, gateway) in self.gateways.iter().enumerate() {
            if let Err(reason) = names::gateway_reference(gateway) {
                errors.push(FieldError::new(format!("{path}.gateways[{i}]"), reason));
            }
        }
    }
}

fn validate_headers(headers: &Headers, path: &str, errors: &mut Vec<FieldError>) {
    if let Some(request) = &headers.request {
        http_headers::validate_operations(request, Direction::Request, &format!("{path}.request"), errors);
    }
    if let Some(response) = &headers.response {
        http_headers::validate_operations(response, Direction::Response, &format!("{path}.response"), errors);
    }
}

/// The authority may be rewritten in one place only: `rewrite.authority`, or one request `set`/`add` of it.
fn validate_authority_set_once(
    rewrite: Option<&HttpRewrite>,
    headers: &Headers,
    path: &str,
    errors: &mut Vec<FieldError>,
) {
    let Some(request) = &headers.request else { return };
    let rewritten = rewrite.and_then(|r| r.authority.as_deref()).filter(|a| !a.is_empty()).is_some();
    let by_headers = request.set.iter().chain(request.add.iter()).filter(|(name, _)| http_headers::is_authority(name));
    if usize::from(rewritten) + by_headers.count() > 1 {
        errors.push(FieldError::new(
            format!("{path}.headers.request"),
            "the authority is set more than once (rewrite.authority and the request's headers)",
        ));
    }
}

fn validate_cors(cors: &CorsPolicy, path: &str, errors: &mut Vec<FieldError>) {
    for (i, origin) in cors.allow_origins.iter().enumerate() {
        let path = format!("{path}.allowOrigins[{i}]");
        let value = origin.exact.as_deref().or(origin.prefix.as_deref()).or(origin.regex.as_deref());
        if value.unwrap_or("").is_empty() {
            errors.push(FieldError::new(&path, "an origin needs a non-empty exact, prefix or regex"));
        } else {
            origin.validate(&path, EmptyPrefix::Refused, errors);
        }
    }
    for (i, method) in cors.allow_methods.iter().enumerate() {
        if !CORS_METHODS.contains(&method.as_str()) {
            errors.push(FieldError::new(
                format!("{path}.allowMethods[{i}]"),
                format!("'{method}' is not an HTTP method ({})", CORS_METHODS.join(", ")),
            ));
        }
    }
    for (field, list) in [("allowHeaders", &cors.allow_headers), ("exposeHeaders", &cors.expose_headers)] {
        for (i, name) in list.iter().enumerate() {
            if let Some(reason) = http_headers::cors_name_problem(name) {
                errors.push(FieldError::new(format!("{path}.{field}[{i}]"), reason));
            }
        }
    }
    if let Some(age) = &cors.max_age {
        let path = format!("{path}.maxAge");
        match duration_problem(age) {
            Some(reason) => errors.push(FieldError::new(path, reason)),
            None if parse_duration(age).is_ok_and(|d| d.subsec_nanos() != 0) => {
                errors.push(FieldError::new(path, format!("'{age}': a max age is in whole seconds")))
            }
            None => {}
        }
    }
}

fn validate_fault(fault: &HttpFault, path: &str, errors: &mut Vec<FieldError>) {
    if fault.delay.is_none() && fault.abort.is_none() {
        errors.push(FieldError::new(path, "a fault needs a delay or an abort"));
    }
    if let Some(delay) = &fault.delay {
        let path = format!("{path}.delay");
        validate_fault_percent(&delay.percentage, &format!("{path}.percentage"), errors);
        validate_duration(&delay.fixed_delay, &format!("{path}.fixedDelay"), errors);
        if delay.exponential_delay.is_some() {
            errors.push(FieldError::new(format!("{path}.exponentialDelay"), "exponential delays are not supported"));
        }
    }
    if let Some(abort) = &fault.abort {
        let path = format!("{path}.abort");
        validate_fault_percent(&abort.percentage, &format!("{path}.percentage"), errors);
        if let Some(status) = abort.http_status {
            validate_status(status, &format!("{path}.httpStatus"), errors);
        }
        if let Some(status) = abort.grpc_status.as_deref().filter(|status| !GRPC_STATUS.contains(status)) {
            errors.push(FieldError::new(
                format!("{path}.grpcStatus"),
                format!("'{status}' is not a gRPC status name (like NOT_FOUND or UNAVAILABLE)"),
            ));
        }
        if abort.http2_error.is_some() {
            errors.push(FieldError::new(format!("{path}.http2Error"), "HTTP/2 error aborts are not supported"));
        }
    }
}

/// A status a route may answer with: 200 to 600, as Istio allows.
fn validate_status(status: u32, path: &str, errors: &mut Vec<FieldError>) {
    if !(200..=600).contains(&status) {
        errors.push(FieldError::new(path, format!("{status} is not an HTTP status (200 to 599)")));
    }
}

fn validate_redirect(redirect: &HttpRedirect, path: &str, errors: &mut Vec<FieldError>) {
    let set = |value: &Option<String>| value.as_deref().is_some_and(|value| !value.is_empty());
    if !set(&redirect.uri)
        && !set(&redirect.authority)
        && !set(&redirect.scheme)
        && redirect.port.is_none()
        && redirect.derive_port.is_none()
    {
        errors.push(FieldError::new(path, "a redirect must change at least one of uri, authority, scheme or port"));
    }
    if let Some(code) = redirect.redirect_code.filter(|code| *code != 0 && !(300..=399).contains(code)) {
        errors.push(FieldError::new(format!("{path}.redirectCode"), format!("{code} is not a redirect (3xx)")));
    }
    if let Some(scheme) = redirect.scheme.as_deref().filter(|s| !s.is_empty() && *s != "http" && *s != "https") {
        errors.push(FieldError::new(format!("{path}.scheme"), format!("'{scheme}' is not http or https")));
    }
    if let Some(port) = redirect.port.filter(|port| *port > 0) {
        validate_port(port, &format!("{path}.port"), errors);
    }
    if redirect.port.is_some() && redirect.derive_port.is_some() {
        errors.push(FieldError::new(format!("{path}.derivePort"), "only one of port or derivePort may be set"));
    }
    if let Some(derive) =
        redirect.derive_port.as_deref().filter(|d| !matches!(*d, "FROM_PROTOCOL_DEFAULT" | "FROM_REQUEST_PORT"))
    {
        errors.push(FieldError::new(
            format!("{path}.derivePort"),
            format!("'{derive}' is not FROM_PROTOCOL_DEFAULT or FROM_REQUEST_PORT"),
        ));
    }
}

fn validate_retries(retries: &HttpRetry, path: &str, errors: &mut Vec<FieldError>) {
    if retries.attempts < 0 {
        errors.push(FieldError::new(format!("{path}.attempts"), "attempts may not be negative"));
    }
    let configured =
        retries.per_try_timeout.is_some() || retries.retry_on.is_some() || retries.retry_remote_localities.is_some();
    if retries.attempts == 0 && configured {
        errors.push(FieldError::new(
            format!("{path}.attempts"),
            "retries are off (attempts 0), yet perTryTimeout, retryOn or retryRemoteLocalities is set",
        ));
    }
    validate_duration(&retries.per_try_timeout, &format!("{path}.perTryTimeout"), errors);
    for condition in retries.retry_on.as_deref().into_iter().flat_map(|on| on.split(',')) {
        let status = condition.parse::<u16>().is_ok_and(|code| NAMED_STATUS.contains(&code));
        if !status && !RETRY_ON.contains(&condition) {
            errors.push(FieldError::new(
                format!("{path}.retryOn"),
                format!("'{condition}' is not a retry condition Envoy knows (like 5xx, reset, connect-failure or 503)"),
            ));
        }
    }
}

fn validate_rewrite(rewrite: &HttpRewrite, path: &str, errors: &mut Vec<FieldError>) {
    let uri = rewrite.uri.as_deref().is_some_and(|uri| !uri.is_empty());
    let authority = rewrite.authority.as_deref().is_some_and(|authority| !authority.is_empty());
    if uri && rewrite.uri_regex_rewrite.is_some() {
        errors.push(FieldError::new(path, "only one of uri or uriRegexRewrite may be set"));
    }
    if !uri && !authority && rewrite.uri_regex_rewrite.is_none() {
        errors.push(FieldError::new(path, "a rewrite must set uri, uriRegexRewrite or authority"));
    }
    if let Some(regex) = &rewrite.uri_regex_rewrite {
        let path = format!("{path}.uriRegexRewrite");
        if regex.pattern.is_empty() || regex.rewrite.is_empty() {
            errors.push(FieldError::new(&path, "both match and rewrite are required"));
        } else if let Some(reason) = re2::problem(&regex.pattern) {
            errors.push(FieldError::new(format!("{path}.match"), reason));
        }
    }
}

#[cfg(test)]
mod tests;
