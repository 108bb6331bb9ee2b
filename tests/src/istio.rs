//! Istio configuration the tests write for the agent.

use std::path::Path;

/// The mesh config (the `istio` ConfigMap) in REGISTRY_ONLY.
pub const MESH_REGISTRY_ONLY: &str = "apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |
    outboundTrafficPolicy:
      mode: REGISTRY_ONLY
";

/// httpbin.org registered at the topology's server A (resolution NONE: the proxy keeps the original destination).
pub const HTTPBIN: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: httpbin, namespace: egress}
spec:
  hosts: [httpbin.org]
  addresses: [203.0.113.10]
  ports: [{number: 80, name: http, protocol: HTTP}]
  location: MESH_EXTERNAL
  resolution: NONE
";

/// A ServiceEntry for `NAME.backend` on port 80 (HTTP), served at `address`:`target_port` (resolution STATIC).
pub fn backend(name: &str, address: &str, target_port: u16) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: egress}}
spec:
  hosts: [{name}.backend]
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: {target_port}}}]
  resolution: STATIC
  endpoints: [{{address: {address}}}]
"
    )
}

/// The Istio configuration of one of the seeds, as `deploy/examples/seeds/NAME.yaml` holds it.
pub fn seed(name: &str) -> String {
    let path = format!("{}/../deploy/examples/seeds/{name}.yaml", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("reading the seed {path}: {error}"))
}

/// Writes `documents` as one multi-document YAML file in `dir`.
pub fn write(dir: &Path, documents: &[&str]) -> std::io::Result<()> {
    std::fs::write(dir.join("istio.yaml"), documents.join("---\n"))
}

/// Two endpoints: one refuses connections (server B, port 81), the other is server A's nginx.
pub const FLAKY: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: flaky, namespace: egress}
spec:
  hosts: [flaky.backend]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 203.0.113.20, ports: {http: 81}}, {address: 203.0.113.10}]
";
