//! What one compile shares among everything it makes, so that alike routes hold one copy.

use super::*;

/// What one compile shares among everything it makes: compiled regexes, and strings (hosts, namespaces).
#[derive(Default)]
pub(super) struct Shared {
    pub(super) regexes: RegexCache,
    pub(super) texts: std::collections::HashSet<Arc<str>>,
    pub(super) exported: std::collections::HashSet<Arc<Exported>>,
    /// Compiled match lists by namespace (gateways are named relative to it) and source, as JSON.
    pub(super) matches: std::collections::HashMap<String, Arc<Matches>>,
    /// Compiled header manipulations by source, as JSON.
    pub(super) header_ops: std::collections::HashMap<String, HeaderOps>,
    /// Targets' subsets and header manipulations, by subset and source of the manipulations.
    pub(super) target_extras: std::collections::HashMap<(Option<Arc<str>>, String), Arc<TargetExtras>>,
    /// Where targets go, by host, port and (shared) extras.
    pub(super) target_destinations: std::collections::HashMap<(Arc<str>, Option<u16>, usize), Arc<TargetDestination>>,
}

impl Shared {
    /// `text`, shared with every other use of it in the policy.
    pub(super) fn text(&mut self, text: &str) -> Arc<str> {
        interned(&mut self.texts, text)
    }

    /// A resource's namespace and `exportTo`, shared with every other resource's that are the same.
    pub(super) fn exported(&mut self, namespace: &str, visible_to: Visibility) -> Arc<Exported> {
        let namespace = self.text(namespace);
        interned(&mut self.exported, Exported { namespace, visible_to })
    }

    /// A route's `match` list compiled, shared with every route of the policy that matches alike (the same
    /// conditions recur across VirtualServices, as configurations are written from templates).
    pub(super) fn matches(
        &mut self,
        matches: &[crate::config::virtual_service::HttpMatch],
        namespace: &str,
    ) -> Arc<Matches> {
        let key = format!("{namespace} {}", serde_json::to_string(matches).unwrap_or_default());
        let regexes = &mut self.regexes;
        let compile =
            || Arc::new(Matches(matches.iter().map(|m| RequestMatch::compile(m, namespace, regexes)).collect()));
        self.matches.entry(key).or_insert_with(compile).clone()
    }

    /// Where a route's destination goes, shared with every target that goes there alike.
    pub(super) fn target_destination(&mut self, destination: &HttpRouteDestination) -> Arc<TargetDestination> {
        let host = self.text(&destination.destination.host);
        let port = destination.destination.port.as_ref().and_then(|p| u16::try_from(p.number).ok());
        let extras = self.target_extras(destination.destination.subset.as_deref(), destination.headers.as_deref());
        let key = (host.clone(), port, extras.as_ref().map_or(0, |extras| Arc::as_ptr(extras) as usize));
        self.target_destinations
            .entry(key)
            .or_insert_with(|| Arc::new(TargetDestination { host, port, extras }))
            .clone()
    }

    /// A target's subset and header manipulations, shared with every target that has the same; `None` without
    /// either.
    pub(super) fn target_extras(
        &mut self,
        subset: Option<&str>,
        headers: Option<&Headers>,
    ) -> Option<Arc<TargetExtras>> {
        if subset.is_none() && headers.is_none() {
            return None;
        }
        let subset = subset.map(|subset| self.text(subset));
        let key = (subset.clone(), serde_json::to_string(&headers).unwrap_or_default());
        if let Some(extras) = self.target_extras.get(&key) {
            return Some(extras.clone());
        }
        let (request, response) = header_ops(headers, self);
        let extras = Arc::new(TargetExtras { subset, headers: [request, response] });
        self.target_extras.insert(key, extras.clone());
        Some(extras)
    }

    /// Header manipulations compiled, shared with every use of the same ones in the policy.
    pub(super) fn header_ops(&mut self, operations: Option<&HeaderOperations>) -> HeaderOps {
        let Some(operations) = operations else { return HeaderOps::default() };
        let key = serde_json::to_string(operations).unwrap_or_default();
        self.header_ops.entry(key).or_insert_with(|| HeaderOps::compile(operations)).clone()
    }
}
