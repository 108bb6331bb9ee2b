//! How a destination is named in Istio's metrics and logs, made once when its cluster is compiled: label values
//! are static text, or text shared by reference count, so that labelling a request clones pointers rather than
//! strings. (Policy makes them; telemetry only reads them.)

use std::{
    collections::HashSet,
    hash::{Hash, Hasher},
    sync::Arc,
};

use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};

/// Two words, as large as the shared text it mostly is: a static text is held behind a second reference (its
/// `&'static str` in static memory), which leaves the enum room to tell the two apart without a word of its own.
/// A cluster holds two of these.
#[derive(Clone, Debug)]
pub enum LabelText {
    Static(&'static &'static str),
    Shared(Arc<str>),
}

impl LabelText {
    pub fn as_str(&self) -> &str {
        match self {
            LabelText::Static(text) => text,
            LabelText::Shared(text) => text,
        }
    }
}

impl Default for LabelText {
    fn default() -> Self {
        LabelText::Static(&"")
    }
}

impl From<Arc<str>> for LabelText {
    fn from(text: Arc<str>) -> Self {
        LabelText::Shared(text)
    }
}

impl PartialEq for LabelText {
    fn eq(&self, other: &Self) -> bool {
        // Labels made once and shared are usually the very same text: compared by address first.
        let (this, that) = (self.as_str(), other.as_str());
        std::ptr::eq(this, that) || this == that
    }
}

impl Eq for LabelText {}

impl Hash for LabelText {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl EncodeLabelValue for LabelText {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

pub const UNKNOWN: LabelText = LabelText::Static(&"unknown");

/// How Istio's metrics name a destination (`destination_service`, `destination_service_name`,
/// `destination_service_namespace`), and the Envoy cluster it stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DestinationLabels {
    pub service: LabelText,
    pub namespace: LabelText,
    cluster: ClusterName,
}

/// The Envoy cluster a destination stands for: one of Istio's own, or a registered host's on a port (and
/// subset), whose name (`outbound|PORT|SUBSET|HOST`) is written out only where it is shown.
#[derive(Clone, Debug, PartialEq, Eq)]
enum ClusterName {
    /// Istio's cluster for what REGISTRY_ONLY refuses: also the destination service's name.
    BlackHole,
    /// Istio's cluster for what ALLOW_ANY lets through unregistered: it names the destination service too.
    Passthrough,
    Outbound {
        port: u16,
        subset: Option<Arc<str>>,
    },
}

static BLACKHOLE_NAME: LabelText = LabelText::Static(&"BlackHoleCluster");
static PASSTHROUGH_NAME: LabelText = LabelText::Static(&"PassthroughCluster");

/// The value in `set` equal to `value`, or `value` shared and added to it: what is shared so is held once, and
/// found by its address. The set's own room is allocated apart (`transient`): a set is an index (a compile's, most
/// often, dropped with it), whose table would otherwise leave holes among the values that stay.
pub fn interned<T, V, S>(set: &mut HashSet<Arc<T>, S>, value: V) -> Arc<T>
where
    T: ?Sized + Eq + Hash,
    V: std::borrow::Borrow<T>,
    Arc<T>: From<V>,
    S: std::hash::BuildHasher,
{
    if let Some(shared) = set.get(value.borrow()) {
        return shared.clone();
    }
    let shared = Arc::from(value);
    crate::allocator::transient(|| set.insert(shared.clone()));
    shared
}

/// A destination's Envoy cluster name, as shown (`DestinationLabels::cluster`).
pub struct ClusterOf<'a>(&'a DestinationLabels);

impl std::fmt::Display for ClusterOf<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0.cluster {
            ClusterName::BlackHole => f.write_str(BLACKHOLE_NAME.as_str()),
            ClusterName::Passthrough => f.write_str(PASSTHROUGH_NAME.as_str()),
            ClusterName::Outbound { port, subset } => {
                write!(f, "outbound|{port}|{}|{}", subset.as_deref().unwrap_or(""), self.0.service.as_str())
            }
        }
    }
}

impl DestinationLabels {
    /// A registered host's cluster on `port` (and `subset`), named as Istio names it
    /// (`outbound|PORT|SUBSET|HOST`).
    pub fn registered(host: Arc<str>, namespace: Arc<str>, port: u16, subset: Option<Arc<str>>) -> DestinationLabels {
        DestinationLabels {
            service: host.into(),
            namespace: namespace.into(),
            cluster: ClusterName::Outbound { port, subset },
        }
    }

    /// The Envoy cluster's name.
    pub fn cluster(&self) -> ClusterOf<'_> {
        ClusterOf(self)
    }

    /// Istio's BlackHoleCluster: where REGISTRY_ONLY sends what no ServiceEntry registers.
    pub fn blackhole() -> DestinationLabels {
        DestinationLabels { service: BLACKHOLE_NAME.clone(), namespace: UNKNOWN, cluster: ClusterName::BlackHole }
    }

    /// Istio's PassthroughCluster, for `service` (the host or address the client asked for, as telemetry labels
    /// it: `telemetry::passthrough::destination`) under ALLOW_ANY.
    pub fn passthrough_as(service: LabelText) -> DestinationLabels {
        DestinationLabels { service, namespace: UNKNOWN, cluster: ClusterName::Passthrough }
    }

    /// Whether the destination was passed through unregistered (its service named by a client).
    pub fn is_passthrough(&self) -> bool {
        self.cluster == ClusterName::Passthrough
    }

    /// `destination_service_name`: the service's own (its host, or BlackHoleCluster), and PassthroughCluster
    /// for what passes through unregistered. Not held apart: it is one of the two.
    pub fn name(&self) -> &LabelText {
        if self.cluster == ClusterName::Passthrough {
            &PASSTHROUGH_NAME
        } else {
            &self.service
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_are_named_and_their_clusters_written_as_istio_names_them() {
        let registered = |subset: Option<&str>| {
            DestinationLabels::registered("httpbin.org".into(), "egress".into(), 443, subset.map(Arc::from))
        };
        let passthrough = || DestinationLabels::passthrough_as(LabelText::Shared("example.com".into()));
        let cases = [
            (registered(None), "outbound|443||httpbin.org", "httpbin.org"),
            (registered(Some("v1")), "outbound|443|v1|httpbin.org", "httpbin.org"),
            (passthrough(), "PassthroughCluster", "PassthroughCluster"),
            (DestinationLabels::blackhole(), "BlackHoleCluster", "BlackHoleCluster"),
        ];
        for (labels, cluster, name) in cases {
            assert_eq!(labels.cluster().to_string(), cluster);
            assert_eq!(labels.name().as_str(), name, "{cluster}");
        }
        assert!(passthrough().is_passthrough() && !registered(None).is_passthrough());
        assert_eq!(passthrough().service.as_str(), "example.com");
    }

    #[test]
    fn a_label_is_two_words_and_reads_back_as_made() {
        assert_eq!(std::mem::size_of::<LabelText>(), 2 * std::mem::size_of::<usize>());
        for (label, text) in [
            (LabelText::Static(&"UF"), "UF"),
            (LabelText::from(Arc::<str>::from("httpbin.org")), "httpbin.org"),
            (UNKNOWN, "unknown"),
            (LabelText::default(), ""),
        ] {
            assert_eq!(label.as_str(), text);
            assert_eq!(label, LabelText::Shared(text.into()), "equal to the same text shared");
        }
    }
}
