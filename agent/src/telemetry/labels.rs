//! Label values for Istio's metrics: static text, or text shared by reference count, so that labelling a request
//! clones pointers rather than strings. A destination's labels are made once, when its cluster is compiled.

use std::{
    collections::HashSet,
    hash::{Hash, Hasher},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, LazyLock, PoisonError, RwLock,
    },
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

/// The services passed through that have series of their own, by name: each request for a host gets the same
/// text, so its requests find their series by the text's address (`RequestMetrics::recent`) rather than
/// labelling each anew. Its names come from clients (a Host, an address and port), so it is bounded: past
/// `passthrough_limit` names, requests to new ones are counted under `PassthroughCluster` alone.
static PASSTHROUGH_SERVICES: LazyLock<RwLock<PassthroughNames>> = LazyLock::new(RwLock::default);

/// How many passed-through services get series of their own (`--max-passthrough-series`).
static PASSTHROUGH_LIMIT: AtomicUsize = AtomicUsize::new(DEFAULT_PASSTHROUGH_LIMIT);
pub const DEFAULT_PASSTHROUGH_LIMIT: usize = 1000;

/// Requests and connections counted under `PassthroughCluster` because the limit was reached.
pub static PASSTHROUGH_COLLAPSED: LazyLock<prometheus_client::metrics::counter::Counter> =
    LazyLock::new(Default::default);

/// A passthrough series as the sweep last saw it: its requests' (or connections') counter.
pub struct Watched {
    counter: prometheus_client::metrics::counter::Counter,
    seen: u64,
    quiet_sweeps: u32,
}

impl Watched {
    pub fn new(counter: prometheus_client::metrics::counter::Counter) -> Watched {
        Watched { counter, seen: 0, quiet_sweeps: 0 }
    }
}

/// Takes out of `watched` the series whose counters have not moved in `quiet_sweeps` sweeps (this one counted).
pub fn stale<K: Clone + Eq + Hash>(watched: &mut std::collections::HashMap<K, Watched>, quiet_sweeps: u32) -> Vec<K> {
    let mut stale = Vec::new();
    for (key, series) in watched.iter_mut() {
        let count = series.counter.get();
        if count == series.seen {
            series.quiet_sweeps += 1;
        } else {
            (series.seen, series.quiet_sweeps) = (count, 0);
        }
        if series.quiet_sweeps >= quiet_sweeps {
            stale.push(key.clone());
        }
    }
    for key in &stale {
        watched.remove(key);
    }
    stale
}

/// Gives back `service`'s place among the passed-through services with series of their own (its series were
/// dropped for want of use): a new destination may take it.
pub fn release_passthrough(service: &str) {
    PASSTHROUGH_SERVICES.write().unwrap_or_else(PoisonError::into_inner).names.remove(service);
}

/// Sets how many passed-through services get series of their own.
pub fn set_passthrough_limit(limit: usize) {
    PASSTHROUGH_LIMIT.store(limit, Ordering::Relaxed);
}

/// `service`'s text, shared with the other requests passed through to it; `PassthroughCluster` once as many
/// services as the limit allows have series.
fn passthrough_service(service: &str) -> LabelText {
    if let Some(shared) = PASSTHROUGH_SERVICES.read().unwrap_or_else(PoisonError::into_inner).names.get(service) {
        return LabelText::Shared(shared.clone());
    }
    let limit = PASSTHROUGH_LIMIT.load(Ordering::Relaxed);
    match PASSTHROUGH_SERVICES.write().unwrap_or_else(PoisonError::into_inner).admit(service, limit) {
        Some(shared) => LabelText::Shared(shared),
        None => {
            PASSTHROUGH_COLLAPSED.inc();
            PASSTHROUGH_NAME.clone()
        }
    }
}

/// The passed-through services' names that label series of their own.
#[derive(Default)]
struct PassthroughNames {
    names: HashSet<Arc<str>, foldhash::fast::RandomState>,
}

impl PassthroughNames {
    /// `service`'s shared text, added if fewer than `limit` names are held; `None` past the limit.
    fn admit(&mut self, service: &str, limit: usize) -> Option<Arc<str>> {
        if let Some(shared) = self.names.get(service) {
            return Some(shared.clone());
        }
        (self.names.len() < limit).then(|| interned(&mut self.names, service))
    }
}

/// The value in `set` equal to `value`, or `value` shared and added to it: what is shared so is held once, and
/// found by its address.
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
    set.insert(shared.clone());
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

    /// Whether these are a registered host's cluster on `port`, of `subset` (or of no subset).
    pub fn is_outbound(&self, port: u16, subset: Option<&str>) -> bool {
        matches!(&self.cluster, ClusterName::Outbound { port: p, subset: s } if *p == port && s.as_deref() == subset)
    }

    /// Istio's BlackHoleCluster: where REGISTRY_ONLY sends what no ServiceEntry registers.
    pub fn blackhole() -> DestinationLabels {
        DestinationLabels { service: BLACKHOLE_NAME.clone(), namespace: UNKNOWN, cluster: ClusterName::BlackHole }
    }

    /// Istio's PassthroughCluster, for `service` (the host or address the client asked for) under ALLOW_ANY.
    pub fn passthrough(service: &str) -> DestinationLabels {
        DestinationLabels {
            service: passthrough_service(service),
            namespace: UNKNOWN,
            cluster: ClusterName::Passthrough,
        }
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
    fn passed_through_services_get_series_of_their_own_up_to_the_limit() {
        let mut names = PassthroughNames::default();
        let first = names.admit("a.example", 2).unwrap();
        assert!(Arc::ptr_eq(&first, &names.admit("a.example", 2).unwrap()), "one text per name");
        assert!(names.admit("b.example", 2).is_some());
        assert_eq!(names.admit("c.example", 2), None, "past the limit a new name gets none");
        assert!(names.admit("a.example", 2).is_some(), "names already held keep theirs");
    }

    #[test]
    fn destinations_are_named_and_their_clusters_written_as_istio_names_them() {
        let registered = |subset: Option<&str>| {
            DestinationLabels::registered("httpbin.org".into(), "egress".into(), 443, subset.map(Arc::from))
        };
        let cases = [
            (registered(None), "outbound|443||httpbin.org", "httpbin.org"),
            (registered(Some("v1")), "outbound|443|v1|httpbin.org", "httpbin.org"),
            (DestinationLabels::passthrough("example.com"), "PassthroughCluster", "PassthroughCluster"),
            (DestinationLabels::blackhole(), "BlackHoleCluster", "BlackHoleCluster"),
        ];
        for (labels, cluster, name) in cases {
            assert_eq!(labels.cluster().to_string(), cluster);
            assert_eq!(labels.name().as_str(), name, "{cluster}");
        }
        assert!(registered(Some("v1")).is_outbound(443, Some("v1")));
        assert!(!registered(Some("v1")).is_outbound(443, None) && !registered(None).is_outbound(80, None));
        assert!(!DestinationLabels::passthrough("example.com").is_outbound(443, None));
        assert_eq!(DestinationLabels::passthrough("example.com").service.as_str(), "example.com");
    }

    #[test]
    fn requests_passed_through_to_one_host_share_its_text() {
        let text = |labels: DestinationLabels| match labels.service {
            LabelText::Shared(text) => text,
            LabelText::Static(_) => panic!("a host's name is not a static text"),
        };
        let (first, again) =
            (DestinationLabels::passthrough("shared.example"), DestinationLabels::passthrough("shared.example"));
        assert!(Arc::ptr_eq(&text(first), &text(again)), "one text: the requests find one series");
        let other = text(DestinationLabels::passthrough("other.example"));
        assert_eq!(&*other, "other.example");
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
