//! The telemetry of requests from workloads that Telemetry resources select: their access log (on, off, its
//! filter), tag overrides and metric switches, layered over the gateway's as those workloads' sidecars would apply
//! them (see `policy::telemetry::WorkloadTelemetry`). Each distinct set of resources is compiled the first time one
//! of its workloads sends a request and kept for the configuration's life (at most `MAX_SCOPES`); a workload that no
//! resource selects takes the gateway's telemetry, with no work per request.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError},
};

use super::{
    access_log::AccessLog,
    requests::AccessLogFormat,
    tags::{self, TagOverrides},
};
use crate::{
    config::{mesh::MeshConfig, telemetry::METRICS, workloads::Workload},
    policy::telemetry::{WorkloadSet, WorkloadTelemetry},
};

/// Distinct sets of workload-scoped resources compiled at most; workloads whose set is not among them take the
/// gateway's telemetry (and a warning says so, once).
const MAX_SCOPES: usize = 256;

/// The telemetry of one workload's requests.
#[derive(Debug)]
pub struct Scope {
    pub access_log: AccessLog,
    pub tags: TagOverrides,
    /// Per metric, in the order of `switches::Metric`: whether it is off for these requests.
    pub disabled: [bool; METRICS.len()],
}

/// The workload-scoped Telemetry in force, and the scopes compiled from it so far.
#[derive(Debug, Default)]
pub struct WorkloadScopes {
    telemetry: WorkloadTelemetry,
    mesh: MeshConfig,
    flag: Option<AccessLogFormat>,
    compiled: Mutex<HashMap<WorkloadSet, Arc<Scope>>>,
}

impl WorkloadScopes {
    pub fn new(telemetry: WorkloadTelemetry, mesh: &MeshConfig, flag: Option<AccessLogFormat>) -> WorkloadScopes {
        WorkloadScopes { telemetry, mesh: mesh.clone(), flag, compiled: Mutex::default() }
    }

    /// Whether no Telemetry resource scopes to workloads.
    pub fn is_empty(&self) -> bool {
        self.telemetry.is_empty()
    }

    /// Where a scope's access log writes when it is on: the mesh config's file, else standard output (every log
    /// of one configuration writes to the same place).
    pub fn destination(&self) -> Option<PathBuf> {
        let on = crate::policy::telemetry::GatewayTelemetry {
            access_logging: Some(crate::policy::telemetry::Logging { enabled: true, filter: None }),
            ..Default::default()
        };
        AccessLog::compile(&self.mesh, self.flag, &on).file
    }

    /// The telemetry of `workload`'s requests, when some resource scopes to it (`None`: the gateway's).
    pub fn of(&self, workload: &Workload) -> Option<Arc<Scope>> {
        if self.is_empty() {
            return None;
        }
        let set = self.telemetry.applying_to(workload);
        if set.is_empty() {
            return None;
        }
        let mut compiled = self.compiled.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(scope) = compiled.get(&set) {
            return Some(scope.clone());
        }
        if compiled.len() >= MAX_SCOPES {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::warn!(
                    limit = MAX_SCOPES,
                    "more distinct sets of workload-scoped Telemetry resources than kept: the rest take the gateway's"
                )
            });
            return None;
        }
        let merged = self.telemetry.merged(&set);
        let access_log = AccessLog::compile(&self.mesh, self.flag, &merged);
        let mut disabled = [false; METRICS.len()];
        for (off, (name, _)) in disabled.iter_mut().zip(METRICS) {
            *off = merged.disabled_metrics.contains(&name);
        }
        let tags = TagOverrides::compile(merged.tag_overrides, tags::standard_labels);
        let scope = Arc::new(Scope { access_log, tags, disabled });
        compiled.insert(set, scope.clone());
        Some(scope)
    }
}
