//! `/config_dump`: the configuration in force and the policy compiled from it, as JSON.

use serde_json::{json, Value};

use crate::{
    config::{ConfigError, Snapshot},
    policy::{bindings::Bindings, DatapathPolicy},
};

pub fn render(
    generation: u64,
    snapshot: &Snapshot,
    rejected: &[ConfigError],
    policy: &DatapathPolicy,
    bindings: &Bindings,
) -> String {
    let resources: Vec<Value> = snapshot
        .resources
        .iter()
        .map(|resource| {
            json!({
                "kind": resource.kind.name(),
                "namespace": resource.metadata.namespace(),
                "name": resource.metadata.name,
                "spec": resource.spec.to_json(),
            })
        })
        .collect();
    let dump = json!({
        "generation": generation,
        "mesh": { "outboundTrafficPolicy": { "mode": snapshot.mesh.outbound_mode().map(|mode| mode.name()) } },
        "resources": resources,
        "rejected": rejected.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "gateways": bindings.gateways.iter().map(|gateway| json!({
            "id": gateway.id,
            "ports": gateway.servers.iter().map(|server| server.port.number).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "datapath": {
            "mode": policy.mode.name(),
            "blackhole": format!("{:?}", policy.blackhole).to_lowercase(),
            "allowCidrs": policy.allow_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "rules": policy.rules.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "interceptPorts": policy.intercept_ports,
            "proxyPort": policy.proxy_port,
        },
    });
    serde_json::to_string_pretty(&dump).unwrap_or_else(|_| "{}".into())
}
