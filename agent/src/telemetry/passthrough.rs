//! Which destinations passed through unregistered get Istio series of their own: their names come from clients
//! (a Host, an address and port), so they are bounded (`--max-passthrough-series`), and series unused for a while
//! are dropped so that the bound holds the destinations in use.

use std::{
    collections::HashSet,
    hash::Hash,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, LazyLock, PoisonError, RwLock,
    },
};

use crate::policy::labels::{interned, DestinationLabels, LabelText};

/// Istio's PassthroughCluster for `service` (the host or address the client asked for): its own name while the
/// bound allows, `PassthroughCluster` past it.
pub fn destination(service: &str) -> DestinationLabels {
    DestinationLabels::passthrough_as(passthrough_service(service))
}

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
            LabelText::Static(&"PassthroughCluster")
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
    fn requests_passed_through_to_one_host_share_its_text() {
        let text = |labels: DestinationLabels| match labels.service {
            LabelText::Shared(text) => text,
            LabelText::Static(_) => panic!("a host's name is not a static text"),
        };
        let (first, again) = (destination("shared.example"), destination("shared.example"));
        assert!(Arc::ptr_eq(&text(first), &text(again)), "one text: the requests find one series");
        let other = text(destination("other.example"));
        assert_eq!(&*other, "other.example");
    }
}
