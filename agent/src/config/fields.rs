//! Field types several Istio kinds share, and their checks: string matches, durations, percentages, ports,
//! destinations and the host forms of each context.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{error::FieldError, names, re2};

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

/// `exact`, `prefix` or `regex` (RE2 syntax): at most one. None of them matches any value (a header's or query
/// parameter's presence), as Istio reads it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
pub struct StringMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

/// Whether a `StringMatch` may be an empty prefix: a URI's may (it matches every path), others may not.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum EmptyPrefix {
    Allowed,
    Refused,
}

impl StringMatch {
    pub fn validate(&self, path: &str, empty_prefix: EmptyPrefix, errors: &mut Vec<FieldError>) {
        let set = [self.exact.is_some(), self.prefix.is_some(), self.regex.is_some()].iter().filter(|s| **s).count();
        if set > 1 {
            errors.push(FieldError::new(path, "only one of exact, prefix or regex may be set"));
        }
        if empty_prefix == EmptyPrefix::Refused && self.prefix.as_deref() == Some("") {
            errors.push(FieldError::new(format!("{path}.prefix"), "a prefix match may not be empty"));
        }
        match self.regex.as_deref() {
            Some("") => errors.push(FieldError::new(format!("{path}.regex"), "a regex match may not be empty")),
            Some(pattern) => {
                if let Some(reason) = re2::problem(pattern) {
                    errors.push(FieldError::new(format!("{path}.regex"), reason));
                }
            }
            None => {}
        }
    }
}

/// A duration as Istio writes them (`10s`, `0.5s`, `100ms`, `1m30s`; Go's `time.ParseDuration`), read exactly:
/// in whole nanoseconds, with no rounding through floating point.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let fail = || format!("'{text}' is not a duration (like 10s, 0.5s or 250ms)");
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    if text.is_empty() {
        return Err(fail());
    }
    let mut nanos: u128 = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let number_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(fail)?;
        let (whole, fraction) = rest[..number_len].split_once('.').unwrap_or((&rest[..number_len], ""));
        if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
            return Err(fail());
        }
        rest = &rest[number_len..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let unit: u128 = match &rest[..unit_len] {
            "h" => 3_600_000_000_000,
            "m" => 60_000_000_000,
            "s" => 1_000_000_000,
            "ms" => 1_000_000,
            "us" | "µs" | "μs" => 1_000,
            "ns" => 1,
            _ => return Err(fail()),
        };
        rest = &rest[unit_len..];
        let too_long = || format!("'{text}' is too long a duration");
        let whole: u128 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| too_long())? };
        let mut part = whole.checked_mul(unit).ok_or_else(too_long)?;
        // The fraction's digits, each worth a tenth of the one before; digits beyond a nanosecond are dropped.
        let mut scale = unit;
        for digit in fraction.bytes() {
            scale /= 10;
            part += u128::from(digit - b'0') * scale;
        }
        nanos = nanos.checked_add(part).filter(|n| *n <= u128::from(u64::MAX)).ok_or_else(too_long)?;
    }
    Ok(Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX)))
}

/// A duration Istio accepts for a timeout, interval or age: at least 1ms, in whole milliseconds.
pub fn duration_problem(text: &str) -> Option<String> {
    match parse_duration(text) {
        Err(reason) => Some(reason),
        Ok(duration) if duration < Duration::from_millis(1) => {
            Some(format!("'{text}' is below 1ms, the least allowed"))
        }
        Ok(duration) if duration.subsec_nanos() % 1_000_000 != 0 => {
            Some(format!("'{text}' is finer than a millisecond (durations are in whole milliseconds)"))
        }
        Ok(_) => None,
    }
}

pub fn validate_duration(value: &Option<String>, path: &str, errors: &mut Vec<FieldError>) {
    if let Some(reason) = value.as_deref().and_then(duration_problem) {
        errors.push(FieldError::new(path, reason));
    }
}

/// `{value: 0..100}`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct Percent {
    #[serde(default)]
    pub value: f64,
}

// Validation admits no NaN (`validate_percent`), so a percentage equals itself; hashed as compared (0 and -0
// alike), so that routes written alike share what is compiled from them.
impl Eq for Percent {}

impl std::hash::Hash for Percent {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (self.value + 0.0).to_bits().hash(state);
    }
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

/// A fault's percentage: 0, or 0.0001 to 100 (Envoy's finest fraction is a millionth).
pub fn validate_fault_percent(value: &Option<Percent>, path: &str, errors: &mut Vec<FieldError>) {
    if let Some(percent) = value {
        let value = percent.value;
        if !(0.0..=100.0).contains(&value) || (value > 0.0 && value < 0.0001) {
            errors.push(FieldError::new(
                format!("{path}.value"),
                format!("{value} is not a fault percentage (0, or 0.0001 to 100)"),
            ));
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
pub struct PortSelector {
    #[serde(default)]
    pub number: u32,
}

/// `workloadSelector: {labels: …}` of Sidecars and ServiceEntries.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct WorkloadSelector {
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

/// Where a route sends traffic.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
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
        } else if self.host == "*" {
            errors.push(FieldError::new(format!("{path}.host"), "'*' is not a destination host"));
        } else if let Err(reason) = names::wildcard_domain(&self.host) {
            errors.push(FieldError::new(format!("{path}.host"), reason));
        }
        if let Some(subset) = &self.subset {
            if let Some(reason) = subset_name_problem(subset) {
                errors.push(FieldError::new(format!("{path}.subset"), reason));
            }
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

/// Why `name` is not a subset name (a DNS label), if it is not.
pub fn subset_name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("a subset name may not be empty".into());
    }
    (!names::is_dns_label(name)).then(|| format!("'{name}' is not a subset name (letters, digits and '-')"))
}

/// Istio's port protocols (any case): what Gateway servers, ServiceEntry and Sidecar ports may declare.
pub const PROTOCOLS: &str = "HTTP, HTTPS, HTTP2, GRPC, GRPC-WEB, HTTP_PROXY, MONGO, MYSQL, REDIS, TCP, TLS or UDP";

pub fn is_protocol(protocol: &str) -> bool {
    matches!(
        protocol.to_ascii_uppercase().as_str(),
        "HTTP"
            | "HTTPS"
            | "HTTP2"
            | "GRPC"
            | "GRPC-WEB"
            | "HTTP_PROXY"
            | "MONGO"
            | "MYSQL"
            | "REDIS"
            | "TCP"
            | "TLS"
            | "UDP"
    )
}

/// Istio's checks of a `tcpKeepalive` object at `path`: `time` and `interval` durations, `probes` a count.
pub fn keepalive_problems(keepalive: &serde_json::Value, path: &str, errors: &mut Vec<FieldError>) {
    let Some(fields) = keepalive.as_object() else {
        errors.push(FieldError::new(path, "tcpKeepalive is an object (time, interval, probes)"));
        return;
    };
    for (field, value) in fields {
        let at = format!("{path}.{field}");
        let problem = match (field.as_str(), value) {
            ("time" | "interval", serde_json::Value::String(text)) => duration_problem(text),
            ("time" | "interval", other) => Some(format!("{other} is not a duration (like 10s or 250ms)")),
            ("probes", value) if value.as_u64().is_some_and(|n| n <= u64::from(u32::MAX)) => None,
            ("probes", other) => Some(format!("{other} is not a count")),
            _ => Some("unknown field (time, interval, probes)".to_owned()),
        };
        if let Some(reason) = problem {
            errors.push(FieldError::new(at, reason));
        }
    }
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
        for text in ["", "10", "s", "10x", "1.2.3s", "-1s", "99999999999999999999999h", ".s"] {
            assert!(parse_duration(text).is_err(), "{text}");
        }
        assert_eq!(parse_duration("0.001s").unwrap(), Duration::from_millis(1), "exact, not rounded through f64");
        assert_eq!(parse_duration("1.5us").unwrap(), Duration::from_nanos(1500));
        assert_eq!(duration_problem("0.001s"), None);
        assert!(duration_problem("0s").unwrap().contains("below 1ms"), "Istio refuses a zero timeout");
        assert!(duration_problem("0").unwrap().contains("below 1ms"));
        assert!(duration_problem("1.5ms").unwrap().contains("finer than a millisecond"));
    }

    #[test]
    fn string_matches_take_at_most_one_form_and_a_valid_regex() {
        let check = |m: StringMatch| {
            let mut errors = Vec::new();
            m.validate("m", EmptyPrefix::Refused, &mut errors);
            errors
        };
        assert!(check(StringMatch { prefix: Some("/a".into()), ..StringMatch::default() }).is_empty());
        assert!(check(StringMatch { regex: Some("^/v[0-9]+/.*".into()), ..StringMatch::default() }).is_empty());
        assert!(check(StringMatch::default()).is_empty(), "no form: presence, as Istio reads it");
        assert_eq!(check(StringMatch { prefix: Some(String::new()), ..StringMatch::default() })[0].path, "m.prefix");
        let mut uri = Vec::new();
        StringMatch { prefix: Some(String::new()), ..StringMatch::default() }.validate(
            "u",
            EmptyPrefix::Allowed,
            &mut uri,
        );
        assert!(uri.is_empty(), "a URI's empty prefix matches every path");
        let both = StringMatch { exact: Some("a".into()), prefix: Some("b".into()), regex: None };
        assert_eq!(check(both).len(), 1);
        let bad = check(StringMatch { regex: Some("(unclosed".into()), ..StringMatch::default() });
        assert_eq!(bad[0].path, "m.regex");
        assert!(bad[0].reason.starts_with("invalid regular expression"), "{bad:?}");
    }
}
