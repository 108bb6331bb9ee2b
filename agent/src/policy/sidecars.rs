//! The Sidecars: which outbound mode a workload's traffic follows, and which services and VirtualServices it
//! sees (`egress[].hosts`). Istio's choice of Sidecar for a workload: one in its namespace whose
//! `workloadSelector` selects it, else its namespace's Sidecar without a selector, else the root namespace's
//! without a selector. The chosen Sidecar's `outboundTrafficPolicy.mode` applies, else the mesh's; its egress
//! hosts narrow what the workload sees, a Sidecar without egress hosts narrows nothing.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use super::OutboundMode;
use crate::config::{
    workloads::{Workload, Workloads},
    OutboundTrafficMode, Snapshot, Spec,
};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SidecarModes {
    /// The mode of workloads whose namespace has no Sidecar of its own, and of sources not known.
    pub default: OutboundMode,
    /// The mesh's mode: a chosen Sidecar that sets none has it.
    mesh: OutboundMode,
    /// The root namespace's Sidecar without a selector: the Sidecar of workloads whose namespace has none.
    root: Option<Scoped>,
    /// Per namespace, its Sidecars in order: those with a selector, and the one without.
    namespaces: HashMap<String, Vec<Scoped>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Scoped {
    /// `workloadSelector.labels`; `None`: the whole namespace.
    selector: Option<BTreeMap<String, String>>,
    mode: Option<OutboundMode>,
    /// `egress[]`: each listener's port (`None`: every port no other listener names) and hosts; `None`: no
    /// egress listeners, everything exported to the workload is seen.
    imports: Option<Box<[EgressListener]>>,
}

/// One egress listener: its port (`None`: every port no other listener names) and the hosts it imports.
type EgressListener = (Option<u16>, Box<[Import]>);

/// One `namespace/host` of a Sidecar's egress hosts.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Import {
    /// `None`: any namespace (`*`); `.` is the Sidecar's own, written out; `~` is no namespace (imports nothing).
    namespace: Option<String>,
    /// Lowercase: `*`, `*.suffix`, or a host.
    host: String,
}

impl Import {
    fn parse(text: &str, own_namespace: &str) -> Option<Import> {
        let (namespace, host) = text.split_once('/')?;
        let namespace = match namespace {
            "*" => None,
            "." => Some(own_namespace.to_owned()),
            "~" => return None,
            namespace => Some(namespace.to_owned()),
        };
        Some(Import { namespace, host: host.to_ascii_lowercase() })
    }

    /// Whether a service or VirtualService of `namespace` for `host` is imported.
    fn admits(&self, namespace: &str, host: &str) -> bool {
        if self.namespace.as_deref().is_some_and(|own| own != namespace) {
            return false;
        }
        let host = host.trim_end_matches('.');
        match self.host.strip_prefix('*') {
            Some("") => true,
            // `*.example.com` imports the hosts under it, wildcards among them.
            Some(suffix) => host.len() > suffix.len() && host.to_ascii_lowercase().ends_with(suffix),
            None => self.host.eq_ignore_ascii_case(host),
        }
    }
}

impl SidecarModes {
    /// The Sidecars of `snapshot`, over `mesh` (the mesh config's mode, or what overrides it).
    pub fn compile(snapshot: &Snapshot, mesh: OutboundMode) -> SidecarModes {
        let root = snapshot.mesh.root_namespace();
        let mut namespaces: HashMap<String, Vec<Scoped>> = HashMap::new();
        for resource in &snapshot.resources {
            let Spec::Sidecar(sidecar) = &resource.spec else { continue };
            let selector = sidecar
                .workload_selector
                .as_ref()
                .map(|selector| selector.labels.iter().map(|(key, value)| (key.clone(), value.clone())).collect());
            let mode = sidecar.outbound_traffic_policy.as_ref().and_then(|policy| policy.mode).map(|mode| match mode {
                OutboundTrafficMode::RegistryOnly => OutboundMode::RegistryOnly,
                OutboundTrafficMode::AllowAny => OutboundMode::AllowAny,
            });
            let namespace = resource.metadata.namespace();
            let listener = |listener: &crate::config::sidecar::EgressListener| {
                let port = listener.port.as_ref().and_then(|port| u16::try_from(port.number).ok());
                (port, listener.hosts.iter().filter_map(|host| Import::parse(host, namespace)).collect())
            };
            let imports = (!sidecar.egress.is_empty()).then(|| sidecar.egress.iter().map(listener).collect());
            namespaces.entry(namespace.to_owned()).or_default().push(Scoped { selector, mode, imports });
        }
        let root = namespaces.get(root).and_then(|sidecars| sidecars.iter().find(|s| s.selector.is_none())).cloned();
        let default = root.as_ref().map_or(mesh, |sidecar| sidecar.mode.unwrap_or(mesh));
        SidecarModes { default, mesh, root, namespaces }
    }

    /// The Sidecar Istio chooses for `workload` (`None`: a source not known, which gets the root namespace's).
    fn chosen(&self, workload: Option<&Workload>) -> Option<&Scoped> {
        let Some(workload) = workload else { return self.root.as_ref() };
        let Some(sidecars) = self.namespaces.get(&*workload.namespace) else { return self.root.as_ref() };
        let selects = |sidecar: &&Scoped| {
            let selector = sidecar.selector.as_ref();
            selector.is_some_and(|labels| labels.iter().all(|(k, v)| workload.labels.get(k) == Some(v)))
        };
        sidecars.iter().find(selects).or_else(|| sidecars.iter().find(|s| s.selector.is_none())).or(self.root.as_ref())
    }

    /// The mesh's mode, which Sidecars refine.
    pub fn mesh(&self) -> OutboundMode {
        self.mesh
    }

    /// The mode `workload`'s traffic follows (`None`: a source not known, which gets the default).
    pub fn mode_for(&self, workload: Option<&Workload>) -> OutboundMode {
        self.chosen(workload).map_or(self.default, |sidecar| sidecar.mode.unwrap_or(self.mesh))
    }

    /// Whether `workload` sees a service or VirtualService of `namespace` for `host` on `port`: its Sidecar's
    /// egress listener for the port (else the one for every other port) imports it.
    pub fn imports(&self, workload: Option<&Workload>, namespace: &str, host: &str, port: u16) -> bool {
        let Some(listeners) = self.chosen(workload).and_then(|sidecar| sidecar.imports.as_deref()) else {
            return true;
        };
        let listener = listeners
            .iter()
            .find(|(on, _)| *on == Some(port))
            .or_else(|| listeners.iter().find(|(on, _)| on.is_none()));
        listener.is_some_and(|(_, imports)| imports.iter().any(|import| import.admits(namespace, host)))
    }

    /// The addresses of the `workloads` whose mode is not the default, with theirs: what the kernel must know
    /// beside the policy's mode.
    pub fn exceptions(&self, workloads: &Workloads) -> BTreeMap<IpAddr, OutboundMode> {
        if self.namespaces.is_empty() {
            return BTreeMap::new();
        }
        workloads
            .iter()
            .map(|(address, workload)| (address, self.mode_for(Some(workload))))
            .filter(|(_, mode)| *mode != self.default)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(addresses: Vec<IpAddr>, workload: Workload) -> crate::config::workloads::PodAddresses {
        crate::config::workloads::PodAddresses { addresses, workload, created: 0 }
    }

    fn workload(namespace: &str, labels: &[(&str, &str)]) -> Workload {
        let labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Workload { name: "w".into(), namespace: namespace.into(), labels }
    }

    #[test]
    fn a_workload_follows_the_sidecar_istio_would_choose_for_it() {
        let snapshot = Snapshot::from_yaml(
            "apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: istio-system}
spec: {outboundTrafficPolicy: {mode: REGISTRY_ONLY}}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: legacy}
spec: {outboundTrafficPolicy: {mode: ALLOW_ANY}}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: batch, namespace: legacy}
spec: {workloadSelector: {labels: {app: batch}}, outboundTrafficPolicy: {mode: REGISTRY_ONLY}}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: plain}
spec: {egress: [{hosts: ['./*']}]}
",
        );
        let modes = SidecarModes::compile(&snapshot, OutboundMode::AllowAny);
        assert_eq!(modes.default, OutboundMode::RegistryOnly, "the root namespace's Sidecar is everyone's default");
        assert_eq!(modes.mode_for(None), OutboundMode::RegistryOnly, "an unknown source gets the default");
        assert_eq!(modes.mode_for(Some(&workload("shop", &[]))), OutboundMode::RegistryOnly);
        assert_eq!(modes.mode_for(Some(&workload("legacy", &[("app", "web")]))), OutboundMode::AllowAny);
        assert_eq!(
            modes.mode_for(Some(&workload("legacy", &[("app", "batch")]))),
            OutboundMode::RegistryOnly,
            "a Sidecar selecting the workload comes before its namespace's"
        );
        assert_eq!(
            modes.mode_for(Some(&workload("plain", &[]))),
            OutboundMode::AllowAny,
            "a namespace's Sidecar that sets no mode leaves the mesh's, not the root Sidecar's"
        );

        let pods = Workloads::from_pods([
            pod(vec!["10.0.0.1".parse().unwrap()], workload("shop", &[])),
            pod(vec!["10.0.0.2".parse().unwrap(), "fd00::2".parse().unwrap()], workload("legacy", &[("app", "web")])),
            pod(vec!["10.0.0.3".parse().unwrap()], workload("legacy", &[("app", "batch")])),
        ]);
        let exceptions = modes.exceptions(&pods);
        let expected: BTreeMap<IpAddr, OutboundMode> = [
            ("10.0.0.2".parse().unwrap(), OutboundMode::AllowAny),
            ("fd00::2".parse().unwrap(), OutboundMode::AllowAny),
        ]
        .into();
        assert_eq!(exceptions, expected, "only the workloads whose mode is not the default");
    }

    #[test]
    fn egress_hosts_import_by_namespace_and_host() {
        let snapshot = Snapshot::from_yaml(
            "apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: istio-system}
spec: {egress: [{hosts: ['*/*.shared.example']}]}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: team-a}
spec: {egress: [{hosts: ['./*', 'egress/api.example.com']}, {port: {number: 5432, name: pg, protocol: TCP}, hosts: ['~/*']}]}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: team-b}
spec: {outboundTrafficPolicy: {mode: REGISTRY_ONLY}}
",
        );
        let sidecars = SidecarModes::compile(&snapshot, OutboundMode::AllowAny);
        let team_a = workload("team-a", &[]);
        let sees =
            |workload: Option<&Workload>, namespace: &str, host: &str| sidecars.imports(workload, namespace, host, 80);
        assert!(sees(Some(&team_a), "team-a", "anything.internal"), "./* imports its own namespace");
        assert!(sees(Some(&team_a), "egress", "API.example.com."), "a named host, in any case, trailing dot or not");
        assert!(!sees(Some(&team_a), "egress", "other.example.com"), "not another host of that namespace");
        assert!(!sees(Some(&team_a), "team-c", "api.example.com"), "nor that host from another namespace");
        assert!(
            sees(Some(&workload("team-b", &[])), "anywhere", "any.host"),
            "a Sidecar without egress narrows nothing"
        );
        let shop = workload("shop", &[]);
        assert!(sees(Some(&shop), "anywhere", "db.shared.example"), "the root Sidecar's imports: any namespace");
        assert!(sees(Some(&shop), "anywhere", "*.eu.shared.example"), "a wildcard host under the import");
        assert!(!sees(Some(&shop), "anywhere", "shared.example"), "*.suffix needs a label before the suffix");
        assert!(!sees(None, "anywhere", "api.example.com"), "an unknown source has the root namespace's Sidecar");
        let on_5432 = |namespace: &str, host: &str| sidecars.imports(Some(&team_a), namespace, host, 5432);
        assert!(!on_5432("team-a", "db.internal"), "the listener for 5432 imports nothing (~/*)");
        assert!(sees(Some(&team_a), "team-a", "db.internal"), "while the catch-all listener imports it on port 80");
    }

    #[test]
    fn without_sidecars_the_mesh_mode_is_everyones() {
        let modes = SidecarModes::compile(&Snapshot::default(), OutboundMode::RegistryOnly);
        assert_eq!(modes.default, OutboundMode::RegistryOnly);
        assert_eq!(modes.mode_for(Some(&workload("shop", &[]))), OutboundMode::RegistryOnly);
        let pods = Workloads::from_pods([pod(vec!["10.0.0.1".parse().unwrap()], workload("shop", &[]))]);
        assert!(modes.exceptions(&pods).is_empty());
    }
}
