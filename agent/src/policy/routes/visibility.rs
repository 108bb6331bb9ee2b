//! What a viewer sees of the registry and the routes: `exportTo` (and a Sidecar's egress hosts) as Istio applies them.

use super::*;

/// Who looks a host up: the gateway for its Gateway ports (what is exported to its namespace, the mesh's mode;
/// Sidecars are for workloads), or the workloads' own traffic from a known workload or an unknown one.
#[derive(Clone, Copy, Debug)]
pub enum Viewer<'a> {
    Gateway,
    Workload(Option<&'a Workload>),
}

impl Viewer<'_> {
    /// Whether this viewer sees a resource `exported` so, for `host` on `port`.
    pub fn sees(self, policy: &ProxyPolicy, exported: &ExportScope, host: &str, port: u16) -> bool {
        let ExportScope { namespace, visible_to } = exported;
        match self {
            Viewer::Gateway => visible_to.admits(policy.gateway.as_ref().map(|gateway| &*gateway.namespace)),
            Viewer::Workload(source) => {
                visible_to.admits(source.map(|source| &*source.namespace))
                    && policy.sidecars.imports(source, namespace, host, port)
            }
        }
    }

    /// The outbound mode for what this viewer sends that nothing registers.
    pub fn mode(self, policy: &ProxyPolicy) -> OutboundMode {
        match self {
            Viewer::Gateway => policy.sidecars.mesh(),
            Viewer::Workload(source) => policy.sidecars.mode_for(source),
        }
    }
}

/// Where a resource lives and who sees it: one of these is shared by every service and VirtualService of the
/// policy that lives and is exported alike (most of a namespace's are).
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct ExportScope {
    pub namespace: Arc<str>,
    /// Its `exportTo`.
    pub visible_to: Visibility,
}

/// Which namespaces' workloads see a resource (`exportTo`): all (`*`, or nothing said: Istio's default), or the
/// ones listed (`.` is the resource's own; `~` none).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum Visibility {
    #[default]
    All,
    Only(Box<[String]>),
}

impl Visibility {
    /// `export_to` as a resource in `namespace` sets it, or when it sets none, `default` (the mesh config's).
    pub fn compile_or(export_to: &[String], default: &[String], namespace: &str) -> Visibility {
        Visibility::compile(if export_to.is_empty() { default } else { export_to }, namespace)
    }

    pub fn compile(export_to: &[String], namespace: &str) -> Visibility {
        if export_to.is_empty() || export_to.iter().any(|to| to == "*") {
            return Visibility::All;
        }
        let namespaces = export_to
            .iter()
            .filter(|to| *to != "~")
            .map(|to| if to == "." { namespace.to_owned() } else { to.clone() })
            .collect();
        Visibility::Only(namespaces)
    }

    /// Whether a workload of `viewer` sees the resource; an unknown viewer sees everything.
    pub fn admits(&self, viewer: Option<&str>) -> bool {
        match (self, viewer) {
            (Visibility::All, _) | (_, None) => true,
            (Visibility::Only(namespaces), Some(viewer)) => namespaces.iter().any(|namespace| namespace == viewer),
        }
    }
}
