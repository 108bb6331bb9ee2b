//! Policies attached by `targetRefs` rather than chosen by a selector, applied as Istio applies them:
//! - a `gateway.networking.k8s.io` **Gateway** named `X` in the policy's namespace: the gateway whose labels say it
//!   is that Gateway's deployment (`gateway.networking.k8s.io/gateway-name: X`, the label Istio gives it), on its own
//!   ports;
//! - a **ServiceEntry** (or a Kubernetes **Service**) of the policy's namespace: traffic to that service, whoever
//!   sends it — as Istio's waypoint for the service decides it: a request whose host (or a TLS connection whose
//!   server name) is one of the service's hosts, or a connection to one of its addresses.

use std::collections::BTreeMap;

use ipnet::IpNet;

use super::{strip_port, Subject, Text};
use crate::config::{authorization_policy::AuthorizationPolicy, service_entry::parse_address, Snapshot, Spec};

/// The label Istio gives a Gateway API gateway's deployment: the Gateway's name.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

/// What a policy's `targetRefs` attach it to.
#[derive(Debug, Default)]
pub(super) struct Targets {
    /// This gateway is one of the Gateways named.
    pub gateway: bool,
    /// The named services' hosts (case-folded; `*.suffix` wildcards as Istio's hosts).
    hosts: Box<[Text]>,
    /// The named services' addresses.
    nets: Box<[IpNet]>,
}

impl Targets {
    /// The targets of `policy` (of `namespace`), as seen from a gateway with `gateway_labels` in
    /// `gateway_namespace` (unknown: any).
    pub fn compile(
        policy: &AuthorizationPolicy,
        namespace: &str,
        snapshot: &Snapshot,
        gateway_labels: &BTreeMap<String, String>,
        gateway_namespace: Option<&str>,
    ) -> Targets {
        let mut targets = Targets::default();
        let (mut hosts, mut nets) = (Vec::new(), Vec::new());
        for target in policy.target_ref.iter().chain(&policy.target_refs) {
            match (target.group.as_str(), target.kind.as_str()) {
                ("gateway.networking.k8s.io", "Gateway") => {
                    let named = gateway_labels.get(GATEWAY_NAME_LABEL).is_some_and(|name| *name == target.name);
                    targets.gateway |= named && gateway_namespace.is_none_or(|gateway| gateway == namespace);
                }
                ("networking.istio.io", "ServiceEntry") => {
                    let entries = snapshot.resources.iter().filter(|resource| {
                        resource.metadata.namespace() == namespace && resource.metadata.name == target.name
                    });
                    for resource in entries {
                        let Spec::ServiceEntry(entry) = &resource.spec else { continue };
                        hosts.extend(entry.hosts.iter().map(|host| Text::compile(host, true)));
                        nets.extend(entry.addresses.iter().filter_map(|address| parse_address(address)));
                    }
                }
                // A Kubernetes Service, by the names a client calls it.
                _ => {
                    let service = format!("{}.{namespace}", target.name);
                    for host in [format!("{service}.svc.cluster.local"), format!("{service}.svc"), service] {
                        hosts.push(Text::compile(&host, true));
                    }
                }
            }
        }
        targets.hosts = hosts.into();
        targets.nets = nets.into();
        targets
    }

    /// Whether the request or connection goes to one of the named services.
    pub fn holds_destination(&self, subject: &Subject<'_>) -> bool {
        let host = match (&subject.http, subject.sni) {
            (Some(request), _) => Some(strip_port(request.host)),
            (None, sni) => sni,
        };
        host.is_some_and(|host| self.hosts.iter().any(|pattern| pattern.matches(host, true)))
            || self.nets.iter().any(|net| net.contains(&subject.destination_ip))
    }

    /// Whether the policy applies to traffic to services (not to this gateway alone).
    pub fn names_services(&self) -> bool {
        !self.hosts.is_empty() || !self.nets.is_empty()
    }
}
