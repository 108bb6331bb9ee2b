//! What one compile shares among everything it makes, so that alike routes hold one copy.

use std::collections::{HashMap, HashSet};

use super::*;
use crate::config::{
    fields::Percent,
    virtual_service::{CorsPolicy, HttpFault, HttpMatch, HttpRetry, HttpRewrite},
};

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

/// What a route's extras are compiled from (`compile::route_extras`), as written.
#[derive(PartialEq, Eq, Hash)]
struct ExtrasSource {
    headers: Option<Box<Headers>>,
    rewrite: Option<Box<HttpRewrite>>,
    retries: Option<Box<HttpRetry>>,
    fault: Option<Box<HttpFault>>,
    mirror: Option<Box<Destination>>,
    mirror_percentage: Option<Box<Percent>>,
    cors: Option<Box<CorsPolicy>>,
}

impl ExtrasSource {
    fn of(route: &HttpRoute) -> ExtrasSource {
        ExtrasSource {
            headers: route.headers.clone(),
            rewrite: route.rewrite.clone(),
            retries: route.retries.clone(),
            fault: route.fault.clone(),
            mirror: route.mirror.clone(),
            mirror_percentage: route.mirror.as_ref().and(route.mirror_percentage.clone()),
            cors: route.cors_policy.clone(),
        }
    }
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
    targets: HashMap<DestinationKey, Arc<Target>>,
    route_extras: HashMap<ExtrasSource, Option<Arc<RouteExtras>>>,
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

    /// What a route sets beyond its match, action and timeout, shared with every route that sets the same;
    /// `None` where it sets nothing.
    pub(super) fn route_extras(&mut self, route: &HttpRoute) -> Option<Arc<RouteExtras>> {
        let source = transient(|| ExtrasSource::of(route));
        if let Some(extras) = self.route_extras.get(&source) {
            return extras.clone();
        }
        let extras = route_extras(route, self);
        let extras = (!extras.is_empty()).then(|| Arc::new(extras));
        transient(|| self.route_extras.insert(source, extras.clone()));
        extras
    }

    /// Where a route's destination goes, shared with every target that goes there alike.
    pub(super) fn target(&mut self, destination: &Destination, headers: Option<&Headers>) -> Arc<Target> {
        let host = self.text(&destination.host);
        let port = destination.port.as_ref().and_then(|p| u16::try_from(p.number).ok());
        let subset = destination.subset.as_deref();
        let extras = self.target_extras(subset, headers);
        let subset = extras.as_ref().and(subset).map(|subset| self.text(subset));
        let extras_key = extras.is_some().then(|| ExtrasKey { subset, headers: transient(|| headers.cloned()) });
        let key = DestinationKey { host: host.clone(), port, extras: extras_key };
        if let Some(target) = self.targets.get(&key) {
            return target.clone();
        }
        let target = Arc::new(Target { host, port, extras });
        transient(|| self.targets.insert(key, target.clone()));
        target
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
