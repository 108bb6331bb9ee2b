//! VirtualService HTTP matches, compiled: string matchers (exact, prefix, RE2 regex matched whole, as Envoy's
//! `safe_regex` does) and request matches over every field a route can test. Regexes are compiled here, once
//! per configuration; a request only runs them.

use std::sync::Arc;

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
        // Written in RE2's syntax (as Envoy reads it), compiled in the `regex` crate's.
        let translated = crate::config::re2::translate(pattern);
        let compiled =
            regex::RegexBuilder::new(&translated).nest_limit(crate::config::re2::NEST_LIMIT).build().ok().map(Arc::new);
        crate::allocator::transient(|| self.compiled.insert(pattern.to_owned(), compiled.clone()));
        compiled
    }
}

/// One compiled `StringMatch`.
#[derive(Clone, Debug)]
pub enum Matcher {
    Exact(Box<str>),
    Prefix(Box<str>),
    Regex(Arc<Regex>),
    /// A match that sets no form: any value (for a header or query parameter, its presence), as Istio reads it.
    Any,
}

impl Matcher {
    /// `None` when its regex does not compile (validation rejects that first).
    pub fn compile(value: &StringMatch, ignore_case: bool, regexes: &mut RegexCache) -> Option<Matcher> {
        let fold = |text: &str| if ignore_case { text.to_ascii_lowercase() } else { text.to_owned() };
        if let Some(exact) = &value.exact {
            Some(Matcher::Exact(fold(exact).into()))
        } else if let Some(prefix) = &value.prefix {
            Some(Matcher::Prefix(fold(prefix).into()))
        } else {
            let Some(pattern) = value.regex.as_deref() else {
                return Some(Matcher::Any);
            };
            let flags = if ignore_case { "(?i)" } else { "" };
            regexes.get(&format!("{flags}^(?:{pattern})$")).map(Matcher::Regex)
        }
    }

    /// Whether `text` matches; `ignore_case` must be what the matcher was compiled with.
    pub fn matches(&self, text: &str, ignore_case: bool) -> bool {
        match self {
            Matcher::Exact(exact) if ignore_case => text.eq_ignore_ascii_case(exact),
            Matcher::Exact(exact) => text == &**exact,
            Matcher::Prefix(prefix) if ignore_case => {
                text.len() >= prefix.len() && text.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
            }
            Matcher::Prefix(prefix) => text.starts_with(&**prefix),
            Matcher::Regex(regex) => regex.is_match(text),
            Matcher::Any => true,
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

/// One compiled `HTTPMatchRequest`: the conditions its fields set, every one of which must hold. Only the fields
/// a match sets take room (most matches set one or two).
#[derive(Clone, Debug, Default)]
pub struct RequestMatch {
    conditions: Box<[Condition]>,
}

#[derive(Clone, Debug)]
enum Condition {
    Uri {
        matcher: Matcher,
        ignore_case: bool,
    },
    Scheme(Matcher),
    Method(Matcher),
    Authority(Matcher),
    Header(http::HeaderName, Matcher),
    WithoutHeader(http::HeaderName, Matcher),
    Query(Box<str>, Matcher),
    Port(u16),
    /// Qualified gateway names (`mesh` or `namespace/name`).
    Gateways(Box<[String]>),
    /// Labels the source workload must carry: an unknown source has none.
    SourceLabels(Box<[(String, String)]>),
    SourceNamespace(Box<str>),
    /// A field could not be compiled (a regex over the size limit): the match never holds, rather than hold
    /// without that field.
    Never,
}

impl RequestMatch {
    /// Compiles `m`; a VirtualService of `namespace` names gateways relative to it.
    pub fn compile(m: &HttpMatch, namespace: &str, regexes: &mut RegexCache) -> RequestMatch {
        let mut conditions = Vec::new();
        let mut add = |condition: Option<Condition>| conditions.push(condition.unwrap_or(Condition::Never));
        if let Some(port) = m.port {
            add(u16::try_from(port).ok().map(Condition::Port));
        }
        if !m.gateways.is_empty() {
            let gateways = m.gateways.iter().map(|gateway| super::bindings::qualify(gateway, namespace)).collect();
            add(Some(Condition::Gateways(gateways)));
        }
        if !m.source_labels.is_empty() {
            let labels = m.source_labels.iter().map(|(key, value)| (key.clone(), value.clone())).collect();
            add(Some(Condition::SourceLabels(labels)));
        }
        if let Some(namespace) = &m.source_namespace {
            add(Some(Condition::SourceNamespace(namespace.as_str().into())));
        }
        if let Some(uri) = &m.uri {
            let matcher = Matcher::compile(uri, m.ignore_uri_case, regexes);
            add(matcher.map(|matcher| Condition::Uri { matcher, ignore_case: m.ignore_uri_case }));
        }
        for (value, condition) in [
            (&m.method, Condition::Method as fn(Matcher) -> Condition),
            (&m.scheme, Condition::Scheme),
            (&m.authority, Condition::Authority),
        ] {
            if let Some(value) = value {
                add(Matcher::compile(value, false, regexes).map(condition));
            }
        }
        for (map, without) in [(&m.headers, false), (&m.without_headers, true)] {
            for (name, value) in map {
                let name = http::HeaderName::from_bytes(name.as_bytes()).ok();
                // `withoutHeaders: {x: {regex: "*"}}` is Istio's "x is absent", not a regex.
                let matcher = if without && value.regex.as_deref() == Some("*") {
                    Some(Matcher::Any)
                } else {
                    Matcher::compile(value, false, regexes)
                };
                add(name.zip(matcher).map(|(name, matcher)| {
                    if without {
                        Condition::WithoutHeader(name, matcher)
                    } else {
                        Condition::Header(name, matcher)
                    }
                }));
            }
        }
        for (name, value) in &m.query_params {
            add(Matcher::compile(value, false, regexes).map(|matcher| Condition::Query(name.as_str().into(), matcher)));
        }
        RequestMatch { conditions: conditions.into() }
    }

    /// The prefix the URI matched on, which a `rewrite.uri` replaces.
    pub fn uri_prefix(&self) -> Option<&str> {
        self.conditions.iter().find_map(|condition| match condition {
            Condition::Uri { matcher: Matcher::Prefix(prefix), .. } => Some(&**prefix),
            _ => None,
        })
    }

    pub fn matches(&self, request: &RequestView<'_>) -> bool {
        let header = |name: &http::HeaderName| request.headers.get(name).and_then(|v| v.to_str().ok());
        self.conditions.iter().all(|condition| match condition {
            Condition::Uri { matcher, ignore_case } => matcher.matches(request.path, *ignore_case),
            Condition::Scheme(matcher) => matcher.matches(request.scheme, false),
            Condition::Method(matcher) => matcher.matches(request.method, false),
            Condition::Authority(matcher) => matcher.matches(request.authority, false),
            Condition::Header(name, matcher) => header(name).is_some_and(|value| matcher.matches(value, false)),
            Condition::WithoutHeader(name, matcher) => !header(name).is_some_and(|value| matcher.matches(value, false)),
            Condition::Query(name, matcher) => {
                query_value(request.query, name).is_some_and(|value| matcher.matches(&value, false))
            }
            Condition::Port(port) => *port == request.port,
            Condition::Gateways(gateways) => gateways.iter().any(|gateway| gateway == request.gateway),
            Condition::SourceLabels(labels) => request
                .source
                .is_some_and(|source| labels.iter().all(|(key, value)| source.labels.get(key) == Some(value))),
            Condition::SourceNamespace(namespace) => {
                request.source.is_some_and(|source| *source.namespace == **namespace)
            }
            Condition::Never => false,
        })
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
