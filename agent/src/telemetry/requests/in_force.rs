//! The telemetry configuration in force — access log, tag overrides, Telemetry scoped to workloads — replaced
//! whole when the configuration changes. A request takes it once as it begins and keeps it to its end: one read
//! of the shared pointer per request rather than one per question, and one configuration for the whole request.

use super::{AccessLog, Scope, TagOverrides, WorkloadScopes};
use crate::config::workloads::Workload;

#[derive(Default)]
pub struct TelemetryInForce {
    pub access_log: AccessLog,
    pub tags: TagOverrides,
    pub scopes: WorkloadScopes,
    /// Whether each request's details are kept (an access log, tag overrides on the request metrics, Telemetry
    /// scoped to workloads): known when compiled, so a request asks once.
    pub details_wanted: bool,
}

impl TelemetryInForce {
    pub fn new(access_log: AccessLog, tags: TagOverrides, scopes: WorkloadScopes) -> TelemetryInForce {
        let details_wanted = access_log.is_on() || tags.on_requests() || !scopes.is_empty();
        TelemetryInForce { access_log, tags, scopes, details_wanted }
    }

    /// The telemetry of `workload`'s requests, when a Telemetry resource scopes to it (`None`: the gateway's).
    pub fn scope_of(&self, workload: &Workload) -> Option<std::sync::Arc<Scope>> {
        if self.scopes.is_empty() {
            None
        } else {
            self.scopes.of(workload)
        }
    }

    /// Keeps the request headers the access log's format reads beyond a record's own fields (all of them while an
    /// override, or a workload's telemetry, may read them).
    pub fn capture_headers(&self, headers: &http::HeaderMap, into: &mut Vec<(http::HeaderName, Box<str>)>) {
        if self.tags.reads_request_headers || !self.scopes.is_empty() {
            crate::telemetry::access_log::capture_all(headers, into);
        } else {
            self.access_log.capture(headers, into);
        }
    }

    /// Keeps the upstream response's headers the access log reads (all of them while a tag override reads them).
    pub fn capture_response_headers(&self, headers: &http::HeaderMap, into: &mut Vec<(http::HeaderName, Box<str>)>) {
        if self.tags.reads_response_headers || !self.scopes.is_empty() {
            crate::telemetry::access_log::capture_all_response(headers, into);
        } else {
            self.access_log.capture_response(headers, into);
        }
    }
}

impl std::fmt::Debug for TelemetryInForce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TelemetryInForce")
            .field("access_log", &self.access_log.is_on())
            .field("details_wanted", &self.details_wanted)
            .finish_non_exhaustive()
    }
}
