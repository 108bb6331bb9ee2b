//! What one compile shares among everything it makes, so that alike routes hold one copy.

use std::collections::{HashMap, HashSet};

use super::*;
use crate::config::virtual_service::HttpMatch;

/// What makes two targets' extras alike: the subset and the header manipulations as written.
#[derive(Clone, PartialEq, Eq, Hash)]
struct ExtrasKey {
    subset: Option<Arc<str>>,
    headers: Option<Headers>,
}

/// What makes two targets go alike.
#[derive(PartialEq, Eq, Hash)]
struct DestinationKey {
    host: Arc<str>,
    port: Option<u16>,
    extras: Option<ExtrasKey>,
}

/// What one compile shares among everything it makes: compiled regexes, strings (hosts, namespaces), and the
/// parts of routes that recur across VirtualServices, each keyed by the configuration it was compiled from.
#[derive(Default)]
pub(super) struct Interner {
    pub(super) regexes: RegexCache,
    texts: HashSet<Arc<str>>,
    exported: HashSet<Arc<ExportScope>>,
    /// Compiled match lists by namespace (gateways are named relative to it) and source.
    matches: HashMap<(Arc<str>, Vec<HttpMatch>), Arc<Matches>>,
    header_ops: HashMap<HeaderOperations, HeaderOps>,
    target_extras: HashMap<ExtrasKey, Arc<TargetExtras>>,
    target_destinations: HashMap<DestinationKey, Arc<TargetDestination>>,
    retries: HashSet<Arc<RetryPolicy>>,
    ports: HashSet<Arc<[ServicePort]>>,
    cluster_policies: HashSet<Arc<ClusterPolicy>>,
}

impl Interner {
    /// `text`, shared with every other use of it in the policy.
    pub(super) fn text(&mut self, text: &str) -> Arc<str> {
        interned(&mut self.texts, text)
    }

    /// A resource's namespace and `exportTo`, shared with every other resource's that are the same.
    pub(super) fn exported(&mut self, namespace: &str, visible_to: Visibility) -> Arc<ExportScope> {
        let namespace = self.text(namespace);
        interned(&mut self.exported, ExportScope { namespace, visible_to })
    }

    /// A route's `match` list compiled, shared with every route of the policy that matches alike (the same
    /// conditions recur across VirtualServices, as configurations are written from templates).
    pub(super) fn matches(&mut self, matches: &[HttpMatch], namespace: &str) -> Arc<Matches> {
        let key = (self.text(namespace), transient(|| matches.to_vec()));
        if let Some(compiled) = self.matches.get(&key) {
            return compiled.clone();
        }
        let regexes = &mut self.regexes;
        let compiled =
            Arc::new(Matches(matches.iter().map(|m| RequestMatch::compile(m, namespace, regexes)).collect()));
        transient(|| self.matches.insert(key, compiled.clone()));
        compiled
    }

    /// Where a route's destination goes, shared with every target that goes there alike.
    pub(super) fn target_destination(
        &mut self,
        destination: &Destination,
        headers: Option<&Headers>,
    ) -> Arc<TargetDestination> {
        let host = self.text(&destination.host);
        let port = destination.port.as_ref().and_then(|p| u16::try_from(p.number).ok());
        let subset = destination.subset.as_deref();
        let extras = self.target_extras(subset, headers);
        let subset = extras.as_ref().and(subset).map(|subset| self.text(subset));
        let extras_key = extras.is_some().then(|| ExtrasKey { subset, headers: transient(|| headers.cloned()) });
        let key = DestinationKey { host: host.clone(), port, extras: extras_key };
        if let Some(destination) = self.target_destinations.get(&key) {
            return destination.clone();
        }
        let destination = Arc::new(TargetDestination { host, port, extras });
        transient(|| self.target_destinations.insert(key, destination.clone()));
        destination
    }

    /// A target's subset and header manipulations, shared with every target that has the same; `None` without
    /// either.
    fn target_extras(&mut self, subset: Option<&str>, headers: Option<&Headers>) -> Option<Arc<TargetExtras>> {
        if subset.is_none() && headers.is_none() {
            return None;
        }
        let subset = subset.map(|subset| self.text(subset));
        let key = ExtrasKey { subset: subset.clone(), headers: transient(|| headers.cloned()) };
        if let Some(extras) = self.target_extras.get(&key) {
            return Some(extras.clone());
        }
        let headers = header_ops(headers, self);
        let extras = Arc::new(TargetExtras { subset, headers });
        transient(|| self.target_extras.insert(key, extras.clone()));
        Some(extras)
    }

    /// A route's retry policy, shared with every route of the policy that retries alike.
    pub(super) fn retries(&mut self, policy: RetryPolicy) -> Arc<RetryPolicy> {
        interned(&mut self.retries, policy)
    }

    /// A service's ports (several), shared with every service that declares the same.
    pub(super) fn ports(&mut self, ports: Vec<ServicePort>) -> Arc<[ServicePort]> {
        interned(&mut self.ports, ports)
    }

    /// A cluster's policy, shared with every cluster whose policy is alike (`ClusterPolicy::shared`).
    pub(super) fn cluster_policy(&mut self, policy: ClusterPolicy) -> Arc<ClusterPolicy> {
        ClusterPolicy::shared(policy, &mut self.cluster_policies)
    }

    /// Header manipulations compiled, shared with every use of the same ones in the policy.
    pub(super) fn header_ops(&mut self, operations: Option<&HeaderOperations>) -> HeaderOps {
        let Some(operations) = operations else { return HeaderOps::default() };
        if let Some(compiled) = self.header_ops.get(operations) {
            return compiled.clone();
        }
        let compiled = HeaderOps::compile(operations);
        transient(|| self.header_ops.insert(operations.clone(), compiled.clone()));
        compiled
    }
}
