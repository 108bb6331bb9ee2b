//! Which Gateways select this agent, and which VirtualServices apply in each context: the mesh (traffic
//! intercepted from the workloads) and each selected Gateway (traffic sent to its ports).

use std::collections::BTreeMap;

use super::host_match::HostTable;
use crate::config::{gateway::Server, virtual_service::MESH, Resource, Snapshot, Spec};

/// A Gateway that selects this agent, with the VirtualServices bound to it by host.
#[derive(Debug)]
pub struct BoundGateway {
    /// `namespace/name`.
    pub id: String,
    pub servers: Vec<Server>,
    /// Host → indexes (into the snapshot's resources) of the VirtualServices for it, in declaration order.
    pub hosts: HostTable<Vec<usize>>,
    /// Every VirtualService bound to it, in declaration order (TCP routes match no host).
    pub services: Vec<usize>,
}

#[derive(Debug, Default)]
pub struct Bindings {
    pub gateways: Vec<BoundGateway>,
    /// Host (lowercase, as written: exact or wildcard) → VirtualServices (indexes) that apply to intercepted
    /// traffic.
    pub mesh: BTreeMap<String, Vec<usize>>,
}

/// Binds the snapshot's VirtualServices to the mesh and to the Gateways whose selector `labels` satisfy.
pub fn bind(snapshot: &Snapshot, labels: &BTreeMap<String, String>) -> Bindings {
    let mut bindings = Bindings::default();
    for resource in &snapshot.resources {
        if let Spec::Gateway(gateway) = &resource.spec {
            if gateway.selects(labels) {
                bindings.gateways.push(BoundGateway {
                    id: format!("{}/{}", resource.metadata.namespace(), resource.metadata.name),
                    servers: gateway.servers.clone(),
                    hosts: HostTable::default(),
                    services: Vec::new(),
                });
            }
        }
    }
    let mut per_gateway: Vec<BTreeMap<String, Vec<usize>>> = vec![BTreeMap::new(); bindings.gateways.len()];
    for (index, resource) in snapshot.resources.iter().enumerate() {
        let Spec::VirtualService(service) = &resource.spec else { continue };
        let namespace = resource.metadata.namespace();
        let gateways: Vec<String> = if service.gateways.is_empty() {
            vec![MESH.to_owned()]
        } else {
            service.gateways.iter().map(|g| qualify(g, namespace)).collect()
        };
        for host in &service.hosts {
            if gateways.iter().any(|g| g == MESH) {
                bindings.mesh.entry(host.to_ascii_lowercase()).or_default().push(index);
            }
            for (i, gateway) in bindings.gateways.iter_mut().enumerate() {
                if gateways.contains(&gateway.id) && admits(&gateway.servers, &gateway.id, namespace, host) {
                    per_gateway[i].entry(host.to_ascii_lowercase()).or_default().push(index);
                    if gateway.services.last() != Some(&index) {
                        gateway.services.push(index);
                    }
                }
            }
        }
    }
    for (gateway, hosts) in bindings.gateways.iter_mut().zip(per_gateway) {
        for (host, services) in hosts {
            gateway.hosts.insert(&host, services);
        }
    }
    bindings
}

/// `mesh` stays; `name` is in the VirtualService's namespace; `ns/name` is as written.
pub fn qualify(gateway: &str, namespace: &str) -> String {
    if gateway == MESH || gateway.contains('/') {
        gateway.to_owned()
    } else {
        format!("{namespace}/{gateway}")
    }
}

/// Whether some server of the Gateway lets a VirtualService of `namespace` serve `host`: a server host
/// `ns/host` (`.` the Gateway's namespace, `*` any) whose host pattern covers `host`.
fn admits(servers: &[Server], gateway_id: &str, namespace: &str, host: &str) -> bool {
    let gateway_namespace = gateway_id.split('/').next().unwrap_or("");
    servers.iter().flat_map(|server| &server.hosts).any(|server_host| {
        let (allowed_namespace, pattern) = server_host.split_once('/').unwrap_or(("*", server_host));
        let namespace_ok = match allowed_namespace {
            "*" => true,
            "." => namespace == gateway_namespace,
            other => namespace == other,
        };
        namespace_ok && covers(pattern, host)
    })
}

/// Whether the server host `pattern` covers the VirtualService host `host` (both may be wildcards).
fn covers(pattern: &str, host: &str) -> bool {
    let (pattern, host) = (pattern.to_ascii_lowercase(), host.to_ascii_lowercase());
    if pattern == "*" || pattern == host {
        return true;
    }
    match pattern.strip_prefix('*') {
        Some(suffix) => host.ends_with(suffix) && host.len() > suffix.len(),
        None => false,
    }
}

/// The VirtualService resources `indexes` point at.
pub fn services<'a>(snapshot: &'a Snapshot, indexes: &'a [usize]) -> impl Iterator<Item = &'a Resource> {
    indexes.iter().filter_map(|&i| snapshot.resources.get(i).map(|resource| &**resource))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn names(snapshot: &Snapshot, indexes: Option<&Vec<usize>>) -> Vec<String> {
        indexes.map(|i| services(snapshot, i).map(|r| r.metadata.name.clone()).collect()).unwrap_or_default()
    }

    #[test]
    fn the_seeds_two_hop_egress_binds_to_the_mesh_and_to_the_selected_gateway() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/examples/seeds/create-egress-gateway.yaml"
        ));
        let snapshot = Snapshot::from_yaml(&text.unwrap());

        let bindings = bind(&snapshot, &labels(&[("gateway-name", "egress-demo"), ("gateway-type", "egress")]));

        assert_eq!(bindings.gateways.iter().map(|g| g.id.as_str()).collect::<Vec<_>>(), ["smm-demo/egress-demo"]);
        assert_eq!(names(&snapshot, bindings.mesh.get("httpbin.org")), ["httpbin-egress"]);
        assert_eq!(names(&snapshot, bindings.gateways[0].hosts.get("HTTPBIN.org:80")), ["httpbin-egress"]);
        assert!(!bindings.mesh.contains_key("example.com"));

        let elsewhere = bind(&snapshot, &labels(&[("istio", "ingressgateway")]));
        assert!(elsewhere.gateways.is_empty(), "a Gateway whose selector this agent does not satisfy is not served");
    }

    #[test]
    fn server_hosts_limit_which_namespaces_and_hosts_bind() {
        let snapshot = Snapshot::from_yaml(
            "apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: egress, namespace: istio-system}
spec:
  selector: {istio: egressgateway}
  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ['team-a/*.example.com', './internal.example']}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: a, namespace: team-a}
spec: {hosts: [api.example.com], gateways: [istio-system/egress], http: [{route: [{destination: {host: api.example.com}}]}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: b, namespace: team-b}
spec: {hosts: [api.example.com], gateways: [istio-system/egress], http: [{route: [{destination: {host: api.example.com}}]}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: c, namespace: team-a}
spec: {hosts: [other.test], gateways: [istio-system/egress], http: [{route: [{destination: {host: other.test}}]}]}
",
        );
        let bindings = bind(&snapshot, &labels(&[("istio", "egressgateway")]));
        let gateway = &bindings.gateways[0];
        assert_eq!(names(&snapshot, gateway.hosts.get("api.example.com")), ["a"], "team-b is not admitted");
        assert!(gateway.hosts.get("other.test").is_none(), "no server host covers other.test");
        assert!(bindings.mesh.is_empty(), "none of them is bound to the mesh");
    }
}
