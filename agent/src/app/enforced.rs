//! Where the policy is in force — the kernel, the proxy's routes and Gateway listeners, and what reports on
//! them — and how a newly compiled policy is applied to each.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use arc_swap::ArcSwap;

use super::control::Control;
use crate::{
    config::{workloads::KnownWorkloads, Snapshot},
    datapath::Datapath,
    policy::{routes::ProxyPolicy, sidecars::SidecarModes, tls_servers::LastGood, OutboundMode},
    proxy::gateway_listeners::GatewayListeners,
    telemetry::{self, config_dump},
};

/// Where the policy is in force: the kernel, the proxy's routes and Gateway listeners, and what reports on them.
pub struct Enforced {
    /// Shared with the interface follower, which attaches the classifier as interfaces come.
    pub(super) datapath: Arc<Mutex<Datapath>>,
    pub(super) routes: Arc<ArcSwap<ProxyPolicy>>,
    pub(super) gateways: GatewayListeners,
    pub(super) metrics: telemetry::metrics::Metrics,
    pub(super) dump: tokio::sync::watch::Sender<Arc<config_dump::Dump>>,
    pub(super) workloads: Arc<KnownWorkloads>,
    /// Each workload's outbound mode, as the policy in force compiled it (the proxy's routes hold the same).
    pub(super) sidecars: Arc<SidecarModes>,
    /// The per-workload modes the kernel holds; `None` until written (a previous agent's may be pinned there).
    pub(super) sources: Option<BTreeMap<IpAddr, OutboundMode>>,
    /// The TLS each Gateway server terminating TLS last served with.
    pub(super) certificates: LastGood,
}

/// Gives the Gateway servers whose TLS settings cannot be used now the certificate they last served with, logging
/// each and marking its Gateway in `sluice_config_rejected`.
pub(super) fn keep_good_certificates(
    routes: &mut ProxyPolicy,
    last_good: &mut LastGood,
    metrics: &telemetry::metrics::Metrics,
) {
    let servers = routes.gateways.iter_mut().flat_map(|gateway| &mut gateway.tls_servers);
    for (server, gateway, reason) in last_good.keep(servers) {
        tracing::error!(%server, %reason, "a Gateway server's TLS settings cannot be used: it keeps its last good certificate, if it had one");
        metrics.add_rejected(&format!("Gateway {gateway}"));
    }
    metrics.certificate_expiry.clear();
    let servers = routes.gateways.iter().flat_map(|gateway| &gateway.tls_servers);
    for certificate in servers.filter_map(|server| server.certificate.as_ref()) {
        metrics.certificate_expiry.get_or_create(&[("name", certificate.source.clone())]).set(certificate.not_after);
    }
}

impl Enforced {
    fn datapath(&self) -> MutexGuard<'_, Datapath> {
        self.datapath.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Compiles and applies the policy to the datapath, then the proxy; one the datapath refuses leaves both as
    /// they are. The typed configuration is dropped then, and what compiling freed returned to the system.
    pub fn apply(&mut self, control: &Control, snapshot: Snapshot) {
        let policy = control.policy(&snapshot);
        let applied = self.datapath().apply(&policy);
        match applied {
            Ok(()) => {
                let bindings = control.bind(&snapshot);
                self.sidecars = control.sidecar_modes(&snapshot);
                let mut routes = control.proxy_policy(&snapshot, &bindings, self.sidecars.clone());
                self.metrics.requests.configure(control.telemetry(&snapshot));
                keep_good_certificates(&mut routes, &mut self.certificates, &self.metrics);
                self.gateways.reconcile(&routes.gateway_ports());
                self.routes.store(Arc::new(routes));
                self.apply_sources();
                let generation = self.metrics.config_generation.inc() + 1;
                tracing::info!(
                    generation,
                    mode = ?policy.mode,
                    rules = policy.rules.len(),
                    gateway_ports = ?self.gateways.ports(),
                    "policy applied"
                );
                let _ = self.dump.send(Arc::new(control.dump(generation as u64, policy, &bindings)));
            }
            Err(error) => {
                tracing::error!(error = %error, "the new policy was not applied; the previous one stays in force")
            }
        }
        drop(snapshot);
        crate::allocator::release_freed_memory();
    }

    /// Puts this agent's classifier back on its links where a successor that went away left its own.
    pub fn reclaim_links(&mut self) {
        match self.datapath().reclaim() {
            Ok(interfaces) if interfaces.is_empty() => {}
            Ok(interfaces) => tracing::warn!(?interfaces, "this agent's classifier put back on the links"),
            Err(error) => {
                tracing::error!(error = %format!("{error:#}"), "putting this agent's classifier back on its links")
            }
        }
    }

    /// Tells the kernel which workloads' mode differs from the policy's (their Sidecars'), by address.
    pub fn apply_sources(&mut self) {
        let exceptions = self.sidecars.exceptions(&self.workloads.load());
        if self.sources.as_ref() == Some(&exceptions) {
            return;
        }
        let applied = self.datapath().set_source_modes(&exceptions);
        match applied {
            Ok(()) => {
                tracing::info!(workloads = exceptions.len(), "workloads with their own outbound mode applied");
                self.sources = Some(exceptions);
            }
            Err(error) => tracing::error!(%error, "the workloads' own outbound modes were not applied"),
        }
    }
}
