//! VirtualService HTTP matches, compiled: string matchers (exact, prefix, RE2 regex matched whole, as Envoy's
//! `safe_regex` does) and request matches over every field a route can test. Regexes are compiled here, once
//! per configuration; a request only runs them.

use std::{collections::BTreeMap, sync::Arc};

use regex::Regex;

use crate::config::{fields::StringMatch, virtual_service::HttpMatch, workloads::Workload};

/// Compiled regexes by pattern: configurations repeat their patterns, and one compiled regex (shared, it is
/// reference-counted) serves every route that writes it.
#[derive(Debug, Default)]
pub struct RegexCache {
    // Arc'd: a cloned Regex shares its program but gets a cache pool of its own, which costs memory per route.
    compiled: std::collections::HashMap<String, Option<Arc<Regex>>>,
}

impl RegexCache {
    /// `pattern` compiled (as written: anchoring is the caller's), or `None` if it does not compile.
    pub fn get(&mut self, pattern: &str) -> Option<Arc<Regex>> {
        if let Some(compiled) = self.compiled.get(pattern) {
            return compiled.clone();
        }
        let compiled = Regex::new(pattern).ok().map(Arc::new);
        self.compiled.insert(pattern.to_owned(), compiled.clone());
        compiled
    }
}

/// One compiled `StringMatch`.
#[derive(Clone, Debug)]
pub enum Matcher {
    Exact(String),
    Prefix(String),
    Regex(Arc<Regex>),
}

impl Matcher {
    /// `None` when the match is empty or its regex does not compile (validation rejects both first).
    pub fn compile(value: &StringMatch, ignore_case: bool, regexes: &mut RegexCache) -> Option<Matcher> {
        let fold = |text: &str| if ignore_case { text.to_ascii_lowercase() } else { text.to_owned() };
        if let Some(exact) = &value.exact {
            Some(Matcher::Exact(fold(exact)))
        } else if let Some(prefix) = &value.prefix {
            Some(Matcher::Prefix(fold(prefix)))
        } else {
            let pattern = value.regex.as_deref()?;
            let flags = if ignore_case { "(?i)" } else { "" };
            regexes.get(&format!("{flags}^(?:{pattern})$")).map(Matcher::Regex)
        }
    }

    /// Whether `text` matches; `ignore_case` must be what the matcher was compiled with.
    pub fn matches(&self, text: &str, ignore_case: bool) -> bool {
        match self {
            Matcher::Exact(exact) if ignore_case => text.eq_ignore_ascii_case(exact),
            Matcher::Exact(exact) => text == exact,
            Matcher::Prefix(prefix) if ignore_case => {
                text.len() >= prefix.len() && text.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
            }
            Matcher::Prefix(prefix) => text.starts_with(prefix.as_str()),
            Matcher::Regex(regex) => regex.is_match(text),
        }
    }
}

/// What a request offers to matching.
pub struct RequestView<'a> {
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub method: &'a str,
    pub scheme: &'a str,
    pub authority: &'a str,
    pub headers: &'a http::HeaderMap,
    /// The port the request was sent to (the original destination's, or the Gateway listener's).
    pub port: u16,
    /// The Gateway (`namespace/name`) whose listener received the request; `mesh` for intercepted traffic.
    pub gateway: &'a str,
    /// The workload that sent the request, when known (pods from Kubernetes, by source address).
    pub source: Option<&'a Workload>,
}

/// One compiled `HTTPMatchRequest`: every field present must hold.
#[derive(Clone, Debug, Default)]
pub struct RequestMatch {
    uri: Option<Matcher>,
    ignore_uri_case: bool,
    scheme: Option<Matcher>,
    method: Option<Matcher>,
    authority: Option<Matcher>,
    headers: Vec<(http::HeaderName, Matcher)>,
    without_headers: Vec<(http::HeaderName, Matcher)>,
    query_params: Vec<(String, Matcher)>,
    port: Option<u16>,
    /// Qualified gateway names (`mesh` or `namespace/name`); empty means any.
    gateways: Vec<String>,
    /// Labels the source workload must carry, and its namespace: an unknown source matches neither.
    source_labels: BTreeMap<String, String>,
    source_namespace: Option<String>,
    /// A field could not be compiled (a regex over the size limit): the match never holds, rather than hold
    /// without that field.
    broken: bool,
}

impl RequestMatch {
    /// Compiles `m`; a VirtualService of `namespace` names gateways relative to it.
    pub fn compile(m: &HttpMatch, namespace: &str, regexes: &mut RegexCache) -> RequestMatch {
        let mut broken = false;
        let mut compile = |value: &Option<Box<StringMatch>>| {
            let compiled = value.as_deref().and_then(|v| Matcher::compile(v, false, &mut *regexes));
            broken |= value.is_some() && compiled.is_none();
            compiled
        };
        let (scheme, method, authority) = (compile(&m.scheme), compile(&m.method), compile(&m.authority));
        let mut headers = |map: &BTreeMap<String, StringMatch>| {
            let compiled: Vec<_> = map
                .iter()
                .filter_map(|(name, value)| {
                    let name = http::HeaderName::from_bytes(name.as_bytes()).ok()?;
                    Some((name, Matcher::compile(value, false, &mut *regexes)?))
                })
                .collect();
            (compiled.len() != map.len(), compiled)
        };
        let ((broken_with, with), (broken_without, without)) = (headers(&m.headers), headers(&m.without_headers));
        let uri = m.uri.as_ref().and_then(|uri| Matcher::compile(uri, m.ignore_uri_case, regexes));
        let query_params: Vec<_> = m
            .query_params
            .iter()
            .filter_map(|(name, value)| Some((name.clone(), Matcher::compile(value, false, regexes)?)))
            .collect();
        let broken = broken
            || broken_with
            || broken_without
            || (m.uri.is_some() && uri.is_none())
            || query_params.len() != m.query_params.len();
        RequestMatch {
            uri,
            ignore_uri_case: m.ignore_uri_case,
            scheme,
            method,
            authority,
            headers: with,
            without_headers: without,
            query_params,
            port: m.port.and_then(|port| u16::try_from(port).ok()),
            gateways: m.gateways.iter().map(|gateway| super::bindings::qualify(gateway, namespace)).collect(),
            source_labels: m.source_labels.clone(),
            source_namespace: m.source_namespace.clone(),
            broken,
        }
    }

    /// The prefix the URI matched on, which a `rewrite.uri` replaces.
    pub fn uri_prefix(&self) -> Option<&str> {
        match &self.uri {
            Some(Matcher::Prefix(prefix)) => Some(prefix),
            _ => None,
        }
    }

    pub fn matches(&self, request: &RequestView<'_>) -> bool {
        let header = |name: &http::HeaderName| request.headers.get(name).and_then(|v| v.to_str().ok());
        !self.broken
            && self.port.is_none_or(|port| port == request.port)
            && (self.gateways.is_empty() || self.gateways.iter().any(|g| g == request.gateway))
            && (self.source_labels.is_empty()
                || request.source.is_some_and(|source| {
                    self.source_labels.iter().all(|(key, value)| source.labels.get(key) == Some(value))
                }))
            && self
                .source_namespace
                .as_ref()
                .is_none_or(|namespace| request.source.is_some_and(|source| source.namespace == *namespace))
            && self.uri.as_ref().is_none_or(|m| m.matches(request.path, self.ignore_uri_case))
            && self.method.as_ref().is_none_or(|m| m.matches(request.method, false))
            && self.scheme.as_ref().is_none_or(|m| m.matches(request.scheme, false))
            && self.authority.as_ref().is_none_or(|m| m.matches(request.authority, false))
            && self.headers.iter().all(|(name, m)| header(name).is_some_and(|value| m.matches(value, false)))
            && self.without_headers.iter().all(|(name, m)| !header(name).is_some_and(|value| m.matches(value, false)))
            && self
                .query_params
                .iter()
                .all(|(name, m)| query_value(request.query, name).is_some_and(|value| m.matches(&value, false)))
    }
}

/// The first value of `name` in a query string, percent-decoded.
fn query_value(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then(|| percent_decode(value))
    })
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let decoded = match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|hex| u8::from_str_radix(hex, 16).ok())
            }
            _ => None,
        };
        match (bytes[i], decoded) {
            (_, Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b'+', None) => {
                out.push(b' ');
                i += 1;
            }
            (byte, None) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string_match(kind: &str, value: &str) -> StringMatch {
        let mut m = StringMatch::default();
        match kind {
            "exact" => m.exact = Some(value.into()),
            "prefix" => m.prefix = Some(value.into()),
            _ => m.regex = Some(value.into()),
        }
        m
    }

    #[test]
    fn string_matches_follow_envoy() {
        let cases = [
            ("exact", "/status", false, "/status", true),
            ("exact", "/status", false, "/status/", false),
            ("exact", "/Status", true, "/sTATUS", true),
            ("prefix", "/api", false, "/api/v1", true),
            ("prefix", "/api", false, "/API/v1", false),
            ("prefix", "/API", true, "/api/v1", true),
            ("prefix", "/api/v1", true, "/api", false),
            // RE2, matched against the whole value.
            ("regex", "/v[0-9]+", false, "/v12", true),
            ("regex", "/v[0-9]+", false, "/v12/x", false),
            ("regex", "/V[0-9]+", true, "/v1", true),
            ("regex", "a|b", false, "b", true),
        ];
        for (kind, pattern, ignore_case, text, expected) in cases {
            let matcher =
                Matcher::compile(&string_match(kind, pattern), ignore_case, &mut RegexCache::default()).unwrap();
            assert_eq!(matcher.matches(text, ignore_case), expected, "{kind} {pattern} on {text}");
        }
    }

    fn http_match(yaml: &str) -> RequestMatch {
        RequestMatch::compile(&serde_yaml_ng::from_str(yaml).unwrap(), "team", &mut RegexCache::default())
    }

    #[test]
    fn every_field_of_a_request_match_must_hold() {
        let source = Workload {
            name: "shop".into(),
            namespace: "team".into(),
            labels: [("app".to_owned(), "shop".to_owned()), ("version".to_owned(), "v2".to_owned())].into(),
        };
        let mut headers = http::HeaderMap::new();
        headers.insert("x-user", "alice".parse().unwrap());
        headers.insert("x-debug", "1".parse().unwrap());
        let request = RequestView {
            path: "/api/v1/items",
            query: Some("id=4%2F2&flag&q=a+b"),
            method: "GET",
            scheme: "http",
            authority: "api.example.com",
            headers: &headers,
            port: 80,
            gateway: "team/egress",
            source: Some(&source),
        };
        let cases = [
            ("{}", true),
            ("{uri: {prefix: /api}}", true),
            ("{uri: {prefix: /API}, ignoreUriCase: true}", true),
            ("{uri: {exact: /api}}", false),
            ("{method: {exact: GET}, scheme: {exact: http}}", true),
            ("{method: {exact: POST}}", false),
            ("{authority: {regex: '.*\\.example\\.com'}}", true),
            ("{headers: {x-user: {exact: alice}}}", true),
            ("{headers: {x-user: {exact: bob}}}", false),
            ("{headers: {x-missing: {prefix: ''}}}", false),
            ("{withoutHeaders: {x-debug: {exact: '1'}}}", false),
            ("{withoutHeaders: {x-missing: {exact: '1'}}}", true),
            ("{queryParams: {id: {exact: 4/2}}}", true),
            ("{queryParams: {q: {exact: a b}}}", true),
            ("{queryParams: {flag: {exact: ''}}}", true),
            ("{queryParams: {id: {regex: '[0-9]'}}}", false),
            ("{port: 80}", true),
            ("{port: 8080}", false),
            ("{gateways: [egress]}", true),
            ("{gateways: [mesh]}", false),
            ("{gateways: [other/egress, team/egress]}", true),
            ("{sourceLabels: {app: shop}}", true),
            ("{sourceLabels: {app: shop, version: v1}}", false),
            ("{sourceNamespace: team}", true),
            ("{sourceNamespace: other}", false),
            // Valid RE2 that is too large to compile: the match holds for nothing rather than ignore the field.
            ("{withoutHeaders: {x-user: {regex: '(?:(?:a{100}){100}){100}'}}}", false),
        ];
        for (yaml, expected) in cases {
            assert_eq!(http_match(yaml).matches(&request), expected, "{yaml}");
        }
    }
}
