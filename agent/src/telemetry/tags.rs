//! The Telemetry API's tag overrides (`metrics.overrides[].tagOverrides`) on Istio's request and TCP metrics, as
//! Istio's stats plugin applies them: per metric, a standard label left out (`REMOVE`), or a label set to a CEL
//! expression's value (`UPSERT`: a standard label's value replaced, or a label added). Compiled once per
//! configuration; evaluated per request (or relayed connection, as it opens) only while some apply — requests and
//! connections without overrides find their series as before. The values come from requests, hostile ones included, so each label takes at most `MAX_VALUES`
//! distinct values (then `overflow`), each cut to `MAX_VALUE_BYTES`: a client cannot grow the series without bound.

use std::{
    collections::{BTreeMap, HashSet},
    sync::{Arc, Mutex, PoisonError},
};

use super::{access_log::format::Fields, expression::Expression};
use crate::policy::labels::{LabelText, UNKNOWN};

/// Distinct values one overridden label takes at most; later ones are counted as `overflow`.
pub const MAX_VALUES: usize = 1000;
/// A value's length at most, in bytes (cut at a character boundary).
pub const MAX_VALUE_BYTES: usize = 256;

/// The request metrics, first in the order of `switches::Metric`.
pub const REQUEST_METRICS: usize = 4;
/// Every metric tags can be overridden on: the request metrics, then the TCP ones, in the order of
/// `switches::Metric`.
pub const TAGGED_METRICS: usize = 8;

/// `metric`'s standard labels (its index in `switches::Metric`), in the order its label sets encode them.
pub fn standard_labels(metric: usize) -> &'static [&'static str] {
    if metric < REQUEST_METRICS {
        &super::requests::REQUEST_LABEL_NAMES
    } else {
        &super::connections::TCP_LABEL_NAMES
    }
}

/// What one override does to a label.
#[derive(Debug)]
struct TagRule {
    label: Arc<str>,
    /// The label's position among the standard labels, if it is one.
    standard: Option<usize>,
    /// `None`: REMOVE.
    value: Option<Arc<Expression>>,
    /// The values it has taken, shared by every series that carries them.
    values: Mutex<HashSet<Arc<str>>>,
}

/// The overrides in force, per metric.
#[derive(Debug, Default)]
pub struct TagOverrides {
    per_metric: [Vec<TagRule>; TAGGED_METRICS],
    /// An expression reads the request's headers: they are all kept per request while these apply.
    pub reads_request_headers: bool,
    /// An expression reads the upstream response's headers: they are all kept per request while these apply.
    pub reads_response_headers: bool,
}

/// What overrides made of one series' labels: the standard ones left out (removed, or replaced by a value set),
/// and the values set.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq)]
pub struct Tags {
    /// A bit per standard label (their order in `requests::REQUEST_LABEL_NAMES`).
    pub left_out: u16,
    pub set: Option<Arc<[SetLabel]>>,
}

/// A label an override set: its name and value.
pub type SetLabel = (Arc<str>, LabelText);

impl TagOverrides {
    /// From each metric's overrides, label → expression (`None`: remove), as the Telemetry resources that apply
    /// left them; `standard` names a metric's standard labels in order.
    pub fn compile(
        overrides: [BTreeMap<String, Option<Arc<Expression>>>; TAGGED_METRICS],
        standard: impl Fn(usize) -> &'static [&'static str],
    ) -> TagOverrides {
        let (mut reads_request_headers, mut reads_response_headers) = (false, false);
        let mut metric = 0;
        let per_metric = overrides.map(|rules| {
            let standard = standard(metric);
            let requests = metric < REQUEST_METRICS;
            metric += 1;
            rules
                .into_iter()
                .map(|(label, value)| {
                    if let (Some(value), true) = (&value, requests) {
                        reads_request_headers |= value.reads_request_headers;
                        reads_response_headers |= value.reads_response_headers;
                    }
                    TagRule {
                        standard: standard.iter().position(|name| *name == label),
                        label: label.into(),
                        value,
                        values: Mutex::default(),
                    }
                })
                .collect()
        });
        TagOverrides { per_metric, reads_request_headers, reads_response_headers }
    }

    /// Whether overrides apply to the request metrics.
    pub fn on_requests(&self) -> bool {
        self.per_metric[..REQUEST_METRICS].iter().any(|rules| !rules.is_empty())
    }

    /// Whether overrides apply to the TCP metrics.
    pub fn on_connections(&self) -> bool {
        self.per_metric[REQUEST_METRICS..].iter().any(|rules| !rules.is_empty())
    }

    /// The tags of `metric` (its index in `switches::Metric`) for the request or connection `fields` describe.
    pub fn tags(&self, metric: usize, fields: &Fields<'_>) -> Tags {
        let rules = &self.per_metric[metric];
        if rules.is_empty() {
            return Tags::default();
        }
        let mut tags = Tags::default();
        let mut set = Vec::new();
        for rule in rules {
            if let Some(position) = rule.standard {
                tags.left_out |= 1 << position;
            }
            let Some(expression) = &rule.value else { continue };
            // Istio's value for what cannot be evaluated (a missing header): not one of the label's values.
            let value = expression.text(fields).map_or(UNKNOWN, |value| rule.admit(value));
            set.push((rule.label.clone(), value));
        }
        tags.set = (!set.is_empty()).then(|| set.into());
        tags
    }
}

impl TagRule {
    /// `value`'s shared text, cut to MAX_VALUE_BYTES; `overflow` once the label has taken MAX_VALUES values.
    fn admit(&self, mut value: String) -> LabelText {
        if value.len() > MAX_VALUE_BYTES {
            let mut end = MAX_VALUE_BYTES;
            while !value.is_char_boundary(end) {
                end -= 1;
            }
            value.truncate(end);
        }
        let mut values = self.values.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(known) = values.get(value.as_str()) {
            return LabelText::Shared(known.clone());
        }
        if values.len() >= MAX_VALUES {
            return LabelText::Static(&"overflow");
        }
        let value: Arc<str> = value.into();
        values.insert(value.clone());
        LabelText::Shared(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overrides(rules: &[(&str, Option<&str>)]) -> TagOverrides {
        let compiled: BTreeMap<String, Option<Arc<Expression>>> = rules
            .iter()
            .map(|(label, value)| (label.to_string(), value.map(|value| Arc::new(Expression::compile(value).unwrap()))))
            .collect();
        let mut per_metric: [BTreeMap<String, Option<Arc<Expression>>>; TAGGED_METRICS] = Default::default();
        per_metric[0] = compiled;
        TagOverrides::compile(per_metric, |_| &["reporter", "response_code"])
    }

    #[test]
    fn removed_and_set_labels_and_values_bounded() {
        let tags = overrides(&[("reporter", None), ("response_code", Some("response.code")), ("team", Some("'a'"))]);
        let fields = Fields { response_code: 503, ..Fields::default() };
        let made = tags.tags(0, &fields);
        assert_eq!(made.left_out, 0b11, "reporter removed, response_code replaced");
        let set: Vec<(&str, &str)> =
            made.set.as_deref().unwrap().iter().map(|(label, value)| (&**label, value.as_str())).collect();
        assert_eq!(set, [("response_code", "503"), ("team", "a")]);
        assert_eq!(tags.tags(1, &fields), Tags::default(), "the other metrics keep their labels");

        let hostile = overrides(&[("path", Some("request.path"))]);
        let mut seen = HashSet::new();
        for i in 0..MAX_VALUES + 50 {
            let headers = Path(format!("/{i}{}", "x".repeat(400)));
            let fields = Fields { headers: Some(&headers), ..Fields::default() };
            let made = hostile.tags(0, &fields);
            let value = made.set.unwrap()[0].1.as_str().to_owned();
            assert!(value.len() <= MAX_VALUE_BYTES, "{}", value.len());
            seen.insert(value);
        }
        assert_eq!(seen.len(), MAX_VALUES + 1, "a thousand values, then overflow");
        assert!(seen.contains("overflow"));
        let missing = hostile.tags(0, &Fields::default());
        assert_eq!(missing.set.unwrap()[0].1.as_str(), "unknown", "a value that cannot be evaluated");
    }

    struct Path(String);

    impl crate::telemetry::access_log::format::Headers for Path {
        fn request(&self, name: &str) -> Option<&str> {
            (name == ":path").then_some(self.0.as_str())
        }

        fn response(&self, _: &str) -> Option<&str> {
            None
        }

        fn request_headers(&self) -> Vec<(&str, &str)> {
            Vec::new()
        }
    }
}
