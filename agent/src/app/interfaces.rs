//! Follows the node's interfaces while the agent runs: the classifier goes on every interface `--intercept`
//! selects as soon as the kernel says it appeared (and at the latest at the next check, each second), the
//! policy routing for intercepted traffic is put back if it was removed, and every change is made visible — a
//! warning, `sluice_datapath_attached`, `sluice_datapath_reattachments_total`, and readiness. The node's own
//! addresses, which the proxy never connects to for a client, are kept current from the same checks.

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use tokio::sync::watch;

use crate::{
    datapath::{interfaces, Datapath, InterceptRouting, InterfaceSpec, LinkEvents},
    proxy::local_destinations::LocalDestinations,
    telemetry::{metrics::InterfaceMetrics, server::Readiness},
};

/// How often the interfaces and the policy routing are checked when the kernel has said nothing.
const CHECK_EVERY: Duration = Duration::from_secs(1);

pub struct InterfaceFollower {
    datapath: Arc<Mutex<Datapath>>,
    specs: Vec<InterfaceSpec>,
    /// The policy routing to keep in place; `None` when no port is intercepted.
    routing: Option<Arc<InterceptRouting>>,
    metrics: InterfaceMetrics,
    readiness: watch::Sender<Readiness>,
    /// The interfaces with a `sluice_datapath_attached` series.
    reported: BTreeSet<String>,
    /// The node's own addresses, which the proxy refuses as destinations, kept current here.
    local_destinations: Arc<LocalDestinations>,
    /// The kernel's notifications (and the default routes' interfaces); `None` if rtnetlink could not be
    /// subscribed to, when the checks each second are all there is.
    events: Option<LinkEvents>,
}

impl InterfaceFollower {
    pub fn new(
        datapath: Arc<Mutex<Datapath>>,
        specs: Vec<InterfaceSpec>,
        routing: Option<Arc<InterceptRouting>>,
        metrics: InterfaceMetrics,
        readiness: watch::Sender<Readiness>,
        local_destinations: Arc<LocalDestinations>,
    ) -> InterfaceFollower {
        let events = LinkEvents::subscribe()
            .inspect_err(|error| {
                tracing::warn!(%error, "no rtnetlink subscription: interfaces are checked each second only");
            })
            .ok();
        InterfaceFollower {
            datapath,
            specs,
            routing,
            metrics,
            readiness,
            reported: BTreeSet::new(),
            local_destinations,
            events,
        }
    }

    /// The interfaces the default routes leave through now, when `--intercept default-route` asks for them.
    async fn default_route(&self) -> Vec<u32> {
        if !self.specs.contains(&InterfaceSpec::DefaultRoute) {
            return Vec::new();
        }
        let Some(events) = &self.events else { return Vec::new() };
        events.default_route_interfaces().await.unwrap_or_else(|error| {
            tracing::warn!(%error, "listing the default routes (for --intercept default-route)");
            Vec::new()
        })
    }

    /// Puts the classifier on the interfaces selected now and forgets those gone; reports what changed.
    /// Returns the interfaces whose pinned link was taken over from a previous agent.
    pub async fn check(&mut self) -> Vec<String> {
        match interfaces::node_addresses() {
            Ok(addresses) => {
                if self.local_destinations.set_node_addresses(addresses.clone()) {
                    tracing::info!(?addresses, "the node's addresses (refused as upstream destinations)");
                }
            }
            Err(error) => tracing::warn!(%error, "listing the node's addresses"),
        }
        let default_route = self.default_route().await;
        let mut datapath = self.datapath.lock().unwrap_or_else(PoisonError::into_inner);
        let reconciled = match datapath.reconcile_interfaces(&self.specs, &default_route) {
            Ok(reconciled) => reconciled,
            Err(error) => {
                tracing::error!(error = %format!("{error:#}"), "checking the intercepted interfaces");
                return Vec::new();
            }
        };
        let attached: BTreeSet<String> = datapath.attached().map(str::to_owned).collect();
        drop(datapath);
        let mut adopted = Vec::new();
        for (interface, reason) in &reconciled.attached {
            if reason.is_reattachment() {
                tracing::warn!(interface, reason = reason.label(), "classifier attached again");
                let labels = [("interface", interface.clone()), ("reason", reason.label().to_owned())];
                self.metrics.reattachments.get_or_create(&labels).inc();
            } else if *reason == crate::datapath::AttachReason::Adopted {
                adopted.push(interface.clone());
            }
        }
        for interface in &reconciled.forgotten {
            tracing::warn!(interface, "interface gone or no longer selected: its classifier state is forgotten");
        }
        // Warned of once each time an interface becomes unenforced: the last check's list is readiness's.
        let warned: BTreeSet<String> =
            self.readiness.borrow().unenforced.iter().map(|(name, _)| name.clone()).collect();
        for (interface, why) in &reconciled.unenforced {
            if !warned.contains(interface) {
                tracing::warn!(interface, why, "configured interface without the classifier: not enforced");
            }
        }
        // Literal names keep a series (0 while missing); interfaces selected by a pattern lose theirs with them.
        let unenforced: BTreeSet<String> = reconciled.unenforced.iter().map(|(name, _)| name.clone()).collect();
        for gone in self.reported.iter().filter(|name| !attached.contains(*name) && !unenforced.contains(*name)) {
            self.metrics.attached.remove(&[("interface", gone.clone())]);
        }
        for interface in &attached {
            self.metrics.attached.get_or_create(&[("interface", interface.clone())]).set(1);
        }
        for interface in &unenforced {
            self.metrics.attached.get_or_create(&[("interface", interface.clone())]).set(0);
        }
        self.reported = attached.union(&unenforced).cloned().collect();
        self.readiness.send_if_modified(|readiness| {
            let changed = readiness.unenforced != reconciled.unenforced;
            readiness.unenforced = reconciled.unenforced;
            changed
        });
        adopted
    }

    /// Puts the policy routing for intercepted traffic back if it is missing.
    async fn check_routing(&self) {
        let Some(routing) = &self.routing else { return };
        match routing.missing().await {
            Ok(false) => {}
            Ok(true) => {
                tracing::warn!("the policy routing for intercepted traffic was removed: installing it again");
                match routing.install().await {
                    Ok(()) => {
                        self.metrics.routing_restored.inc();
                    }
                    Err(error) => tracing::error!(error = %format!("{error:#}"), "installing the policy routing"),
                };
            }
            Err(error) => tracing::warn!(error = %format!("{error:#}"), "checking the policy routing"),
        }
    }

    /// Checks on every change the kernel reports, and each second regardless (a missed message, an interface
    /// whose link was detached without one).
    pub async fn follow(mut self) {
        let mut every = tokio::time::interval(CHECK_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let changed = async {
                match self.events.as_mut() {
                    Some(events) => events.changed().await,
                    None => std::future::pending().await,
                }
            };
            let subscribed = tokio::select! {
                open = changed => open,
                _ = every.tick() => true,
            };
            if !subscribed {
                tracing::warn!("the rtnetlink subscription ended: interfaces are checked each second only");
                self.events = None;
            }
            self.check().await;
            self.check_routing().await;
        }
    }
}
