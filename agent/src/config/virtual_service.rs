//! VirtualService (`networking.istio.io`): how traffic to a set of hosts is routed, HTTP, TLS and TCP; and the
//! checks Istio's validation makes of it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{
    error::FieldError,
    fields::{
        is_dns_label, regex_problem, validate_duration, validate_host_or_ip, validate_percent, validate_port,
        Destination, Headers, Pairs, Percent, StringMatch,
    },
};

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VirtualService {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http: Vec<HttpRoute>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tls: Vec<TlsRoute>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tcp: Vec<TcpRoute>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub export_to: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRoute {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, rename = "match")]
    pub matches: Vec<HttpMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub route: Vec<HttpRouteDestination>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<Box<HttpRedirect>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_response: Option<Box<HttpDirectResponse>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<Box<HttpRewrite>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Box<HttpRetry>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Box<HttpFault>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Box<Destination>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror_percentage: Option<Box<Percent>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cors_policy: Option<Box<CorsPolicy>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<Box<Headers>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<Box<StringMatch>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<Box<StringMatch>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<Box<StringMatch>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<Box<StringMatch>>,
    #[serde(default, skip_serializing_if = "Pairs::is_empty")]
    pub headers: Pairs<StringMatch>,
    #[serde(default, skip_serializing_if = "Pairs::is_empty")]
    pub query_params: Pairs<StringMatch>,
    #[serde(default, skip_serializing_if = "Pairs::is_empty")]
    pub without_headers: Pairs<StringMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub source_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_namespace: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ignore_uri_case: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteDestination {
    #[serde(default)]
    pub destination: Destination,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<Box<Headers>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRedirect {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect_code: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct HttpDirectResponse {
    #[serde(default)]
    pub status: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<HttpBody>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct HttpBody {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub string: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRewrite {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri_regex_rewrite: Option<RegexRewrite>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RegexRewrite {
    #[serde(default, rename = "match")]
    pub pattern: String,
    #[serde(default)]
    pub rewrite: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRetry {
    #[serde(default)]
    pub attempts: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_on: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct HttpFault {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultDelay {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fixed_delay: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentage: Option<Percent>,
    /// Deprecated integer form of `percentage`, still read by Istio.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultAbort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentage: Option<Percent>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CorsPolicy {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_origins: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_headers: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expose_headers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_credentials: Option<bool>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TlsRoute {
    #[serde(default, rename = "match")]
    pub matches: Vec<TlsMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub route: Vec<RouteDestination>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TlsMatch {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sni_hosts: Vec<String>,
    /// The fields TLS matches share with TCP matches.
    #[serde(flatten)]
    pub l4: L4Match,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpRoute {
    #[serde(default, rename = "match")]
    pub matches: Vec<L4Match>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub route: Vec<RouteDestination>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct L4Match {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destination_subnets: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub source_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_namespace: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct RouteDestination {
    #[serde(default)]
    pub destination: Destination,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<i64>,
}

/// The reserved gateway name for sidecars (for Sluice: intercepted traffic).
pub const MESH: &str = "mesh";

impl VirtualService {
    /// Whether it applies to the workloads' own traffic (no `gateways`, or `mesh` among them).
    pub fn binds_to_mesh(&self) -> bool {
        self.gateways.is_empty() || self.gateways.iter().any(|g| g == MESH)
    }

    pub fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if self.hosts.is_empty() {
            errors.push(FieldError::new("spec.hosts", "at least one host is required"));
        }
        let bound_to_mesh = self.binds_to_mesh();
        for (i, host) in self.hosts.iter().enumerate() {
            let path = format!("spec.hosts[{i}]");
            if host == "*" && bound_to_mesh {
                errors.push(FieldError::new(path, "'*' is not allowed for VirtualServices bound to the mesh"));
            } else if let Err(reason) = validate_host_or_ip(host) {
                errors.push(FieldError::new(path, reason));
            }
        }
        for (i, gateway) in self.gateways.iter().enumerate() {
            validate_gateway_name(gateway, &format!("spec.gateways[{i}]"), &mut errors);
        }
        if self.http.is_empty() && self.tls.is_empty() && self.tcp.is_empty() {
            errors.push(FieldError::new("spec", "at least one of http, tls or tcp routes is required"));
        }
        for (i, route) in self.http.iter().enumerate() {
            route.validate(&format!("spec.http[{i}]"), &mut errors);
        }
        for (i, route) in self.tls.iter().enumerate() {
            let path = format!("spec.tls[{i}]");
            if route.matches.is_empty() {
                errors.push(FieldError::new(format!("{path}.match"), "a TLS route needs at least one match"));
            }
            for (j, m) in route.matches.iter().enumerate() {
                let path = format!("{path}.match[{j}]");
                if m.sni_hosts.is_empty() {
                    errors.push(FieldError::new(format!("{path}.sniHosts"), "at least one SNI host is required"));
                }
                for (k, sni) in m.sni_hosts.iter().enumerate() {
                    if let Err(reason) = validate_host_or_ip(sni) {
                        errors.push(FieldError::new(format!("{path}.sniHosts[{k}]"), reason));
                    }
                }
                m.l4.validate(&path, &mut errors);
            }
            validate_destinations(route.route.iter().map(|r| (&r.destination, r.weight)), &path, &mut errors);
        }
        for (i, route) in self.tcp.iter().enumerate() {
            let path = format!("spec.tcp[{i}]");
            for (j, m) in route.matches.iter().enumerate() {
                m.validate(&format!("{path}.match[{j}]"), &mut errors);
            }
            validate_destinations(route.route.iter().map(|r| (&r.destination, r.weight)), &path, &mut errors);
        }
        errors
    }
}

impl HttpRoute {
    fn validate(&self, path: &str, errors: &mut Vec<FieldError>) {
        let actions = [!self.route.is_empty(), self.redirect.is_some(), self.direct_response.is_some()];
        match actions.iter().filter(|a| **a).count() {
            0 => errors.push(FieldError::new(path, "one of route, redirect or directResponse is required")),
            1 => {}
            _ => errors.push(FieldError::new(path, "route, redirect and directResponse are mutually exclusive")),
        }
        if self.rewrite.is_some() && self.redirect.is_some() {
            errors.push(FieldError::new(format!("{path}.rewrite"), "rewrite may not be used with redirect"));
        }
        for (i, m) in self.matches.iter().enumerate() {
            let path = format!("{path}.match[{i}]");
            for (field, value) in
                [("uri", &m.uri), ("scheme", &m.scheme), ("method", &m.method), ("authority", &m.authority)]
            {
                if let Some(value) = value {
                    value.validate(&format!("{path}.{field}"), errors);
                }
            }
            for (field, map) in
                [("headers", &m.headers), ("queryParams", &m.query_params), ("withoutHeaders", &m.without_headers)]
            {
                for (name, value) in map {
                    let field_path = format!("{path}.{field}.{name}");
                    if field != "queryParams" && name.to_ascii_lowercase() != *name {
                        errors.push(FieldError::new(&field_path, "header names must be lowercase"));
                    }
                    value.validate(&field_path, errors);
                }
            }
            validate_match_port(m.port, &path, errors);
            for (j, gateway) in m.gateways.iter().enumerate() {
                validate_gateway_name(gateway, &format!("{path}.gateways[{j}]"), errors);
            }
        }
        validate_destinations(self.route.iter().map(|r| (&r.destination, r.weight)), path, errors);
        if let Some(redirect) = &self.redirect {
            if let Some(code) = redirect.redirect_code {
                if !(300..=399).contains(&code) {
                    errors.push(FieldError::new(
                        format!("{path}.redirect.redirectCode"),
                        format!("{code} is not a redirect (3xx)"),
                    ));
                }
            }
            if let Some(port) = redirect.port {
                validate_port(port, &format!("{path}.redirect.port"), errors);
            }
        }
        if let Some(response) = &self.direct_response {
            if !(200..=599).contains(&response.status) {
                errors.push(FieldError::new(
                    format!("{path}.directResponse.status"),
                    format!("{} is not an HTTP status (200 to 599)", response.status),
                ));
            }
        }
        if let Some(rewrite) = &self.rewrite {
            if let Some(reason) = rewrite.uri_regex_rewrite.as_ref().and_then(|rewrite| regex_problem(&rewrite.pattern))
            {
                errors.push(FieldError::new(format!("{path}.rewrite.uriRegexRewrite.match"), reason));
            }
        }
        validate_duration(&self.timeout, &format!("{path}.timeout"), errors);
        if let Some(retries) = &self.retries {
            if retries.attempts < 0 {
                errors.push(FieldError::new(format!("{path}.retries.attempts"), "attempts may not be negative"));
            }
            validate_duration(&retries.per_try_timeout, &format!("{path}.retries.perTryTimeout"), errors);
        }
        if let Some(fault) = &self.fault {
            if fault.delay.is_none() && fault.abort.is_none() {
                errors.push(FieldError::new(format!("{path}.fault"), "a fault needs a delay or an abort"));
            }
            if let Some(delay) = &fault.delay {
                if delay.fixed_delay.is_none() {
                    errors.push(FieldError::new(format!("{path}.fault.delay.fixedDelay"), "a fixed delay is required"));
                }
                validate_duration(&delay.fixed_delay, &format!("{path}.fault.delay.fixedDelay"), errors);
                validate_percent(&delay.percentage, &format!("{path}.fault.delay.percentage"), errors);
            }
            if let Some(abort) = &fault.abort {
                match abort.http_status {
                    Some(status) if !(200..=599).contains(&status) => errors.push(FieldError::new(
                        format!("{path}.fault.abort.httpStatus"),
                        format!("{status} is not an HTTP status (200 to 599)"),
                    )),
                    None if abort.grpc_status.is_none() => errors.push(FieldError::new(
                        format!("{path}.fault.abort"),
                        "an abort needs an httpStatus or a grpcStatus",
                    )),
                    _ => {}
                }
                validate_percent(&abort.percentage, &format!("{path}.fault.abort.percentage"), errors);
            }
        }
        if let Some(mirror) = &self.mirror {
            mirror.validate(&format!("{path}.mirror"), errors);
        }
        validate_percent(&self.mirror_percentage.as_deref().cloned(), &format!("{path}.mirrorPercentage"), errors);
        if let Some(cors) = &self.cors_policy {
            for (i, origin) in cors.allow_origins.iter().enumerate() {
                origin.validate(&format!("{path}.corsPolicy.allowOrigins[{i}]"), errors);
            }
            validate_duration(&cors.max_age, &format!("{path}.corsPolicy.maxAge"), errors);
        }
    }
}

/// Destinations and weights: each destination valid, weights 0 to 100, and summing to 100 when there are
/// several (one destination may leave its weight out).
fn validate_destinations<'a>(
    destinations: impl Iterator<Item = (&'a Destination, Option<i64>)>,
    path: &str,
    errors: &mut Vec<FieldError>,
) {
    let destinations: Vec<_> = destinations.collect();
    let mut total = 0;
    for (i, (destination, weight)) in destinations.iter().enumerate() {
        destination.validate(&format!("{path}.route[{i}].destination"), errors);
        if let Some(weight) = weight {
            if !(0..=100).contains(weight) {
                errors.push(FieldError::new(format!("{path}.route[{i}].weight"), format!("{weight} is not 0 to 100")));
            }
            total += weight;
        }
    }
    if destinations.len() > 1 && total != 100 {
        errors.push(FieldError::new(format!("{path}.route"), format!("weights add up to {total}, not 100")));
    }
}

impl L4Match {
    fn validate(&self, path: &str, errors: &mut Vec<FieldError>) {
        for (i, subnet) in self.destination_subnets.iter().enumerate() {
            if super::service_entry::parse_address(subnet).is_none() {
                let reason = format!("'{subnet}' is not an IP address or CIDR");
                errors.push(FieldError::new(format!("{path}.destinationSubnets[{i}]"), reason));
            }
        }
        validate_match_port(self.port, path, errors);
        for (i, gateway) in self.gateways.iter().enumerate() {
            validate_gateway_name(gateway, &format!("{path}.gateways[{i}]"), errors);
        }
    }
}

fn validate_match_port(port: Option<u32>, path: &str, errors: &mut Vec<FieldError>) {
    if let Some(port) = port {
        validate_port(port, &format!("{path}.port"), errors);
    }
}

/// `mesh`, `name` or `namespace/name`.
fn validate_gateway_name(gateway: &str, path: &str, errors: &mut Vec<FieldError>) {
    let (namespace, name) = gateway.split_once('/').unwrap_or(("", gateway));
    let valid_name = name.split('.').all(is_dns_label);
    if (!namespace.is_empty() && !is_dns_label(namespace)) || !valid_name {
        errors.push(FieldError::new(path, format!("'{gateway}' is not a gateway name (mesh, name or namespace/name)")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(yaml: &str) -> VirtualService {
        serde_yaml_ng::from_str(yaml).unwrap_or_else(|e| panic!("{yaml}: {e}"))
    }

    #[test]
    fn valid_virtual_services_have_no_errors() {
        let cases = [
            // The seeds' two-hop egress route.
            "hosts: [httpbin.org]\ngateways: [egress-demo, mesh]\nhttp:\n- match: [{gateways: [mesh], port: 80}]\n  route: [{destination: {host: egress-demo.smm-demo.svc.cluster.local, port: {number: 80}}}]\n- match: [{gateways: [egress-demo], port: 80}]\n  route: [{destination: {host: httpbin.org, port: {number: 80}}}]",
            "hosts: ['*']\ngateways: [istio-system/egress]\nhttp: [{route: [{destination: {host: a.example}, weight: 90}, {destination: {host: b.example}, weight: 10}]}]",
            "hosts: [api.example]\nhttp:\n- match: [{uri: {regex: '^/v[0-9]+/.*'}, headers: {x-user: {exact: tester}}}]\n  redirect: {uri: /new, redirectCode: 301}\n- directResponse: {status: 503, body: {string: down}}",
            "hosts: [api.example]\nhttp: [{route: [{destination: {host: api.example}}], timeout: 0.5s, retries: {attempts: 3, perTryTimeout: 2s, retryOn: 5xx}, fault: {abort: {httpStatus: 503, percentage: {value: 10}}}}]",
            "hosts: [api.example]\ntls: [{match: [{sniHosts: [api.example], port: 443}], route: [{destination: {host: api.example, port: {number: 443}}}]}]",
            "hosts: [db.example]\ntcp: [{match: [{port: 5432, destinationSubnets: [203.0.113.0/24]}], route: [{destination: {host: db.example}}]}]",
        ];
        for yaml in cases {
            assert_eq!(service(yaml).validate(), vec![], "{yaml}");
        }
    }

    #[test]
    fn invalid_virtual_services_say_which_field_and_why() {
        let route = "route: [{destination: {host: a.example}}]";
        let cases = [
            (format!("http: [{{{route}}}]"), "spec.hosts", "at least one host"),
            ("hosts: ['*']\nhttp: [{route: [{destination: {host: a.example}}]}]".into(), "spec.hosts[0]", "bound to the mesh"),
            ("hosts: [a.example]".into(), "spec", "at least one of http, tls or tcp"),
            ("hosts: [a.example]\nhttp: [{}]".into(), "spec.http[0]", "one of route, redirect or directResponse"),
            (
                format!("hosts: [a.example]\nhttp: [{{{route}, redirect: {{uri: /x}}}}]"),
                "spec.http[0]",
                "mutually exclusive",
            ),
            (
                "hosts: [a.example]\nhttp: [{route: [{destination: {host: a.example}, weight: 60}, {destination: {host: b.example}, weight: 30}]}]".into(),
                "spec.http[0].route",
                "weights add up to 90, not 100",
            ),
            ("hosts: [a.example]\nhttp: [{route: [{destination: {}}]}]".into(), "spec.http[0].route[0].destination.host", "required"),
            (
                format!("hosts: [a.example]\nhttp: [{{match: [{{uri: {{regex: '(open'}}}}], {route}}}]"),
                "spec.http[0].match[0].uri.regex",
                "invalid regular expression",
            ),
            (
                format!("hosts: [a.example]\nhttp: [{{match: [{{uri: {{}}}}], {route}}}]"),
                "spec.http[0].match[0].uri",
                "exactly one of exact, prefix or regex",
            ),
            (
                format!("hosts: [a.example]\nhttp: [{{match: [{{headers: {{X-User: {{exact: a}}}}}}], {route}}}]"),
                "spec.http[0].match[0].headers.X-User",
                "lowercase",
            ),
            (format!("hosts: [a.example]\nhttp: [{{{route}, timeout: 5 seconds}}]"), "spec.http[0].timeout", "not a duration"),
            (
                format!("hosts: [a.example]\nhttp: [{{{route}, retries: {{attempts: 2, perTryTimeout: soon}}}}]"),
                "spec.http[0].retries.perTryTimeout",
                "not a duration",
            ),
            (
                format!("hosts: [a.example]\nhttp: [{{{route}, fault: {{abort: {{httpStatus: 700}}}}}}]"),
                "spec.http[0].fault.abort.httpStatus",
                "not an HTTP status",
            ),
            (
                format!("hosts: [a.example]\nhttp: [{{{route}, fault: {{delay: {{fixedDelay: 1s, percentage: {{value: 150}}}}}}}}]"),
                "spec.http[0].fault.delay.percentage.value",
                "not a percentage",
            ),
            ("hosts: [a.example]\nhttp: [{redirect: {uri: /x, redirectCode: 200}}]".into(), "spec.http[0].redirect.redirectCode", "not a redirect"),
            ("hosts: [a.example]\nhttp: [{directResponse: {status: 42}}]".into(), "spec.http[0].directResponse.status", "not an HTTP status"),
            ("hosts: [a.example]\ntls: [{route: [{destination: {host: a.example}}]}]".into(), "spec.tls[0].match", "at least one match"),
            (
                "hosts: [a.example]\ntcp: [{match: [{destinationSubnets: [nope]}], route: [{destination: {host: a.example}}]}]".into(),
                "spec.tcp[0].match[0].destinationSubnets[0]",
                "not an IP address or CIDR",
            ),
            (format!("hosts: [a.example]\ngateways: [Bad_Name]\nhttp: [{{{route}}}]"), "spec.gateways[0]", "not a gateway name"),
        ];
        for (yaml, path, reason) in cases {
            let errors = service(&yaml).validate();
            assert!(
                errors.iter().any(|e| e.path == path && e.reason.contains(reason)),
                "{yaml}\nexpected {path}: {reason}\ngot {errors:?}"
            );
        }
    }
}
