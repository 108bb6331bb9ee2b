//! Field types several Istio kinds share, and their checks: string matches, durations, percentages, ports,
//! destinations and the host forms of each context.

use std::{net::IpAddr, time::Duration};

use serde::{Deserialize, Serialize};

use super::{error::FieldError, service_entry::validate_host};

/// A small map as the resource writes it (header names, query parameters): its pairs in the order written, in
/// one allocation (a B-tree would take a node of eleven pairs for one). A name written twice keeps the last value,
/// as a map does.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Pairs<V>(Box<[(String, V)]>);

impl<V> Default for Pairs<V> {
    fn default() -> Self {
        Pairs(Box::default())
    }
}

impl<V> Pairs<V> {
    pub fn iter(&self) -> impl Iterator<Item = (&String, &V)> {
        self.into_iter()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'a, V> IntoIterator for &'a Pairs<V> {
    type Item = (&'a String, &'a V);
    type IntoIter = std::iter::Map<std::slice::Iter<'a, (String, V)>, fn(&'a (String, V)) -> (&'a String, &'a V)>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(name, value)| (name, value))
    }
}

impl<V> FromIterator<(String, V)> for Pairs<V> {
    fn from_iter<I: IntoIterator<Item = (String, V)>>(pairs: I) -> Self {
        let mut kept: Vec<(String, V)> = Vec::new();
        for (name, value) in pairs {
            match kept.iter_mut().find(|(kept, _)| *kept == name) {
                Some(pair) => pair.1 = value,
                None => kept.push((name, value)),
            }
        }
        Pairs(kept.into_boxed_slice())
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Pairs<V> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> serde::de::Visitor<'de> for Visitor<V> {
            type Value = Pairs<V>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a map")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Pairs<V>, A::Error> {
                let mut pairs = Vec::with_capacity(map.size_hint().unwrap_or(0).min(64));
                while let Some(pair) = map.next_entry::<String, V>()? {
                    pairs.push(pair);
                }
                Ok(pairs.into_iter().collect())
            }
        }
        deserializer.deserialize_map(Visitor(std::marker::PhantomData))
    }
}

impl<V: Serialize> Serialize for Pairs<V> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

/// `exact`, `prefix` or `regex` (RE2 syntax): exactly one.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
pub struct StringMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

impl StringMatch {
    pub fn validate(&self, path: &str, errors: &mut Vec<FieldError>) {
        let set = [self.exact.is_some(), self.prefix.is_some(), self.regex.is_some()].iter().filter(|s| **s).count();
        if set != 1 {
            errors.push(FieldError::new(path, "exactly one of exact, prefix or regex is required"));
        }
        if let Some(reason) = self.regex.as_deref().and_then(regex_problem) {
            errors.push(FieldError::new(format!("{path}.regex"), reason));
        }
    }
}

/// A duration as Istio writes them (`10s`, `0.5s`, `100ms`, `1m30s`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let fail = || format!("'{text}' is not a duration (like 10s, 0.5s or 250ms)");
    if text.is_empty() {
        return Err(fail());
    }
    let mut total = 0f64;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(fail)?;
        let value: f64 = rest[..digits].parse().map_err(|_| fail())?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return Err(fail()),
        };
        total += value * scale;
        rest = &rest[unit_len..];
    }
    Duration::try_from_secs_f64(total).map_err(|_| format!("'{text}' is too long a duration"))
}

pub fn validate_duration(value: &Option<String>, path: &str, errors: &mut Vec<FieldError>) {
    if let Some(text) = value {
        if let Err(reason) = parse_duration(text) {
            errors.push(FieldError::new(path, reason));
        }
    }
}

/// `{value: 0..100}`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct Percent {
    #[serde(default)]
    pub value: f64,
}

pub fn validate_percent(value: &Option<Percent>, path: &str, errors: &mut Vec<FieldError>) {
    if let Some(percent) = value {
        if !(0.0..=100.0).contains(&percent.value) {
            errors.push(FieldError::new(
                format!("{path}.value"),
                format!("{} is not a percentage (0 to 100)", percent.value),
            ));
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct PortSelector {
    #[serde(default)]
    pub number: u32,
}

/// Where a route sends traffic.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Destination {
    #[serde(default)]
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PortSelector>,
}

impl Destination {
    pub fn validate(&self, path: &str, errors: &mut Vec<FieldError>) {
        if self.host.is_empty() {
            errors.push(FieldError::new(format!("{path}.host"), "a destination host is required"));
        } else if self.host.starts_with('*') {
            errors.push(FieldError::new(
                format!("{path}.host"),
                format!("'{}': a destination may not be a wildcard", self.host),
            ));
        } else if let Err(reason) = validate_host_or_ip(&self.host) {
            errors.push(FieldError::new(format!("{path}.host"), reason));
        }
        if let Some(port) = &self.port {
            validate_port(port.number, &format!("{path}.port.number"), errors);
        }
    }
}

/// `headers: {request: {set, add, remove}, response: {…}}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
pub struct Headers {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<HeaderOperations>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<HeaderOperations>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
pub struct HeaderOperations {
    #[serde(default, skip_serializing_if = "Pairs::is_empty")]
    pub set: Pairs<String>,
    #[serde(default, skip_serializing_if = "Pairs::is_empty")]
    pub add: Pairs<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

/// Why `number` is not a port, if it is not.
pub fn port_problem(number: u32) -> Option<String> {
    (!(1..=65535).contains(&number)).then(|| format!("{number} is not a port (1 to 65535)"))
}

pub fn validate_port(number: u32, path: &str, errors: &mut Vec<FieldError>) {
    if let Some(reason) = port_problem(number) {
        errors.push(FieldError::new(path, reason));
    }
}

/// Why `pattern` is not an RE2 regular expression (the `regex` crate's syntax), if it is not.
pub fn regex_problem(pattern: &str) -> Option<String> {
    // Parsed, not compiled: the syntax is what validation checks, and compiling is the policy's job (once).
    regex_syntax::Parser::new().parse(pattern).err().map(|error| {
        let reason = error.to_string().lines().last().unwrap_or("invalid").trim().to_owned();
        format!("invalid regular expression: {reason}")
    })
}

/// A host as VirtualServices and DestinationRules name it: a name, a `*.` wildcard, `*`, or (for destinations)
/// an IP address.
pub fn validate_host_or_ip(host: &str) -> Result<(), String> {
    if host == "*" || host.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    validate_host(host)
}

/// `namespace/host` (`.` for the resource's namespace, `*` for any; the namespace may be left out).
pub fn validate_namespaced_host(value: &str) -> Result<(), String> {
    let (namespace, host) = value.split_once('/').unwrap_or(("*", value));
    if namespace != "." && namespace != "*" && !is_dns_label(namespace) {
        return Err(format!("'{namespace}' in '{value}' is not a namespace, '.' or '*'"));
    }
    validate_host_or_ip(host).map_err(|reason| format!("in '{value}': {reason}"))
}

/// A Kubernetes name: lowercase letters, digits and '-', at most 63 characters.
pub fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// Istio's protocol names for Gateway servers and Service ports.
pub fn is_protocol(protocol: &str) -> bool {
    super::service_entry::transport(protocol).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_read_as_a_map_does_in_the_order_written() {
        let pairs: Pairs<String> =
            serde_json::from_str(r#"{"x-b": "1", "x-a": "2", "x-b": "3"}"#).expect("a map of strings");
        let read: Vec<(&str, &str)> = pairs.iter().map(|(name, value)| (name.as_str(), value.as_str())).collect();
        assert_eq!(read, [("x-b", "3"), ("x-a", "2")], "a name written twice keeps its last value");
        assert_eq!(serde_json::to_string(&pairs).unwrap(), r#"{"x-b":"3","x-a":"2"}"#);
        assert!(serde_json::from_str::<Pairs<String>>(r#"["x-a"]"#).unwrap_err().to_string().contains("a map"));
        assert!(Pairs::<String>::default().is_empty());
    }

    #[test]
    fn durations_read_as_istio_writes_them() {
        for (text, millis) in [("10s", 10_000), ("0.5s", 500), ("250ms", 250), ("1m30s", 90_000), ("1h", 3_600_000)] {
            assert_eq!(parse_duration(text).unwrap().as_millis(), millis, "{text}");
        }
        for text in ["", "10", "s", "10x", "1.2.3s", "-1s", "99999999999999999999999h"] {
            assert!(parse_duration(text).is_err(), "{text}");
        }
    }

    #[test]
    fn string_matches_need_exactly_one_form_and_a_valid_regex() {
        let check = |m: StringMatch| {
            let mut errors = Vec::new();
            m.validate("m", &mut errors);
            errors
        };
        assert!(check(StringMatch { prefix: Some("/a".into()), ..StringMatch::default() }).is_empty());
        assert!(check(StringMatch { regex: Some("^/v[0-9]+/.*".into()), ..StringMatch::default() }).is_empty());
        assert_eq!(check(StringMatch::default())[0].reason, "exactly one of exact, prefix or regex is required");
        let both = StringMatch { exact: Some("a".into()), prefix: Some("b".into()), regex: None };
        assert_eq!(check(both).len(), 1);
        let bad = check(StringMatch { regex: Some("(unclosed".into()), ..StringMatch::default() });
        assert_eq!(bad[0].path, "m.regex");
        assert!(bad[0].reason.starts_with("invalid regular expression"), "{bad:?}");
    }

    #[test]
    fn namespaced_hosts_take_the_gateway_forms() {
        for value in ["*/httpbin.org", "./api.example", "istio-system/*", "*.example.com", "*"] {
            assert_eq!(validate_namespaced_host(value), Ok(()), "{value}");
        }
        for value in ["Bad_NS/host.example", "ns/bad_host.example"] {
            assert!(validate_namespaced_host(value).is_err(), "{value}");
        }
    }
}
