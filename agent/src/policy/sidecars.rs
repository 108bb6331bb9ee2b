//! The Sidecars' outbound traffic policies: which mode a workload's traffic follows. Istio's choice of Sidecar
//! for a workload: one in its namespace whose `workloadSelector` selects it, else its namespace's Sidecar without
//! a selector, else the root namespace's without a selector; the chosen Sidecar's `outboundTrafficPolicy.mode`,
//! else the mesh's mode.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use super::OutboundMode;
use crate::config::{
    workloads::{Workload, Workloads},
    OutboundTrafficMode, Snapshot, Spec,
};

/// Istio's root namespace when the mesh config names none.
const ROOT_NAMESPACE: &str = "istio-system";

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SidecarModes {
    /// The mode of workloads whose namespace has no Sidecar of its own, and of sources not known.
    pub default: OutboundMode,
    /// The mesh's mode: a chosen Sidecar that sets none has it.
    mesh: OutboundMode,
    /// Per namespace, its Sidecars in order: those with a selector, and the one without.
    namespaces: HashMap<String, Vec<Scoped>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Scoped {
    /// `workloadSelector.labels`; `None`: the whole namespace.
    selector: Option<BTreeMap<String, String>>,
    mode: Option<OutboundMode>,
}

impl SidecarModes {
    /// The Sidecars of `snapshot`, over `mesh` (the mesh config's mode, or what overrides it).
    pub fn compile(snapshot: &Snapshot, mesh: OutboundMode) -> SidecarModes {
        let root = snapshot.mesh.root_namespace.as_deref().unwrap_or(ROOT_NAMESPACE);
        let mut namespaces: HashMap<String, Vec<Scoped>> = HashMap::new();
        for resource in &snapshot.resources {
            let Spec::Sidecar(sidecar) = &resource.spec else { continue };
            let selector = sidecar.workload_selector.as_ref().map(|selector| {
                let labels = selector.get("labels").and_then(|labels| labels.as_object());
                let text =
                    |(key, value): (&String, &serde_json::Value)| Some((key.clone(), value.as_str()?.to_owned()));
                labels.into_iter().flatten().filter_map(text).collect()
            });
            let mode = sidecar.outbound_traffic_policy.as_ref().and_then(|policy| policy.mode).map(|mode| match mode {
                OutboundTrafficMode::RegistryOnly => OutboundMode::RegistryOnly,
                OutboundTrafficMode::AllowAny => OutboundMode::AllowAny,
            });
            namespaces.entry(resource.metadata.namespace().to_owned()).or_default().push(Scoped { selector, mode });
        }
        let root_default = namespaces.get(root).and_then(|sidecars| sidecars.iter().find(|s| s.selector.is_none()));
        let default = root_default.map_or(mesh, |sidecar| sidecar.mode.unwrap_or(mesh));
        SidecarModes { default, mesh, namespaces }
    }

    /// The mode `workload`'s traffic follows (`None`: a source not known, which gets the default).
    pub fn mode_for(&self, workload: Option<&Workload>) -> OutboundMode {
        let Some(workload) = workload else { return self.default };
        let Some(sidecars) = self.namespaces.get(&*workload.namespace) else { return self.default };
        let selects = |sidecar: &&Scoped| {
            sidecar
                .selector
                .as_ref()
                .is_some_and(|labels| labels.iter().all(|(k, v)| workload.labels.get(k) == Some(v)))
        };
        let chosen = sidecars.iter().find(selects).or_else(|| sidecars.iter().find(|s| s.selector.is_none()));
        match chosen {
            Some(sidecar) => sidecar.mode.unwrap_or(self.mesh),
            None => self.default,
        }
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
            (vec!["10.0.0.1".parse().unwrap()], workload("shop", &[])),
            (vec!["10.0.0.2".parse().unwrap(), "fd00::2".parse().unwrap()], workload("legacy", &[("app", "web")])),
            (vec!["10.0.0.3".parse().unwrap()], workload("legacy", &[("app", "batch")])),
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
    fn without_sidecars_the_mesh_mode_is_everyones() {
        let modes = SidecarModes::compile(&Snapshot::default(), OutboundMode::RegistryOnly);
        assert_eq!(modes.default, OutboundMode::RegistryOnly);
        assert_eq!(modes.mode_for(Some(&workload("shop", &[]))), OutboundMode::RegistryOnly);
        let pods = Workloads::from_pods([(vec!["10.0.0.1".parse().unwrap()], workload("shop", &[]))]);
        assert!(modes.exceptions(&pods).is_empty());
    }
}
