//! `/config_dump`: the configuration in force and the policy compiled from it, as JSON.
//!
//! What a dump shows is held (the resources themselves are shared with the store), and the JSON is written when
//! it is asked for: a rendered dump of a large configuration would cost as much memory as the configuration.

use std::sync::Arc;

use serde_json::{json, Value};

use crate::{
    config::{store::Packed, ConfigError, MeshConfig},
    policy::{bindings::Bindings, DatapathPolicy},
    proxy::relay::Engine,
};

/// One generation's configuration and datapath policy.
#[derive(Debug)]
pub struct Dump {
    generation: u64,
    /// The resources in force, as the store holds them.
    resources: Arc<Packed>,
    mesh: MeshConfig,
    rejected: Vec<String>,
    /// The Gateways that select this agent: id and server ports.
    gateways: Vec<(String, Vec<u32>)>,
    policy: DatapathPolicy,
    relay_engine: Engine,
    /// The names the configuration resolves by DNS, with their answers.
    dns: crate::config::resolver::Resolved,
}

impl Dump {
    pub fn new(
        generation: u64,
        (resources, mesh): (Arc<Packed>, MeshConfig),
        rejected: &[ConfigError],
        policy: DatapathPolicy,
        bindings: &Bindings,
    ) -> Dump {
        Dump {
            generation,
            resources,
            mesh,
            rejected: rejected.iter().map(ToString::to_string).collect(),
            gateways: bindings
                .gateways
                .iter()
                .map(|gateway| (gateway.id.clone(), gateway.servers.iter().map(|server| server.port.number).collect()))
                .collect(),
            policy,
            relay_engine: Engine::default(),
            dns: Default::default(),
        }
    }

    /// Shows `resolved` as the DNS answers in force.
    pub fn with_dns(mut self, resolved: &crate::config::resolver::Resolved) -> Dump {
        self.dns = resolved.clone();
        self
    }

    /// What `sluice status` shows of this generation: counts, not contents.
    pub fn summary(&self) -> Value {
        let policy = &self.policy;
        let mut kinds = std::collections::BTreeMap::<&str, usize>::new();
        for (kind, _, _) in self.resources.entries() {
            *kinds.entry(kind.name()).or_default() += 1;
        }
        json!({
            "generation": self.generation,
            "mode": policy.mode.name(),
            "blackhole": format!("{:?}", policy.blackhole).to_lowercase(),
            "resources": kinds,
            "rejected": self.rejected,
            "l4Rules": policy.rules.len(),
            "allowCidrs": policy.allow_cidrs.len(),
            "kernelDenials": policy.denials.len(),
            "interceptPorts": policy.intercept_ports,
            "proxyPort": (policy.proxy_port != 0).then_some(policy.proxy_port),
            "gatewayPorts": self.gateways.iter().flat_map(|(_, ports)| ports.iter().copied()).collect::<std::collections::BTreeSet<_>>(),
            "dns": self.dns,
        })
    }

    /// Shows `engine` as the one decided byte streams are relayed with.
    pub fn with_relay_engine(mut self, engine: Engine) -> Dump {
        self.relay_engine = engine;
        self
    }

    /// The dump as JSON.
    pub fn render(&self) -> String {
        let policy = &self.policy;
        let resources: Vec<Value> = self
            .resources
            .entries()
            .map(|(kind, metadata, spec)| {
                json!({
                    "kind": kind.name(),
                    "namespace": metadata.namespace(),
                    "name": metadata.name,
                    "spec": spec,
                })
            })
            .collect();
        let dump = json!({
            "generation": self.generation,
            "mesh": { "outboundTrafficPolicy": { "mode": self.mesh.outbound_mode().map(|mode| mode.name()) } },
            "resources": resources,
            "rejected": self.rejected,
            "gateways": self.gateways.iter().map(|(id, ports)| json!({"id": id, "ports": ports})).collect::<Vec<_>>(),
            "datapath": {
                "mode": policy.mode.name(),
                "blackhole": format!("{:?}", policy.blackhole).to_lowercase(),
                "allowCidrs": policy.allow_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "rules": policy.rules.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "interceptPorts": policy.intercept_ports,
                "unmatchedTcpToProxy": policy.unmatched_tcp_to_proxy,
                "denied": policy.denials.iter().map(|denial| json!({
                    "destination": denial.net.to_string(),
                    "port": denial.port,
                    "sources": denial.sources.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "policy": &*denial.policy,
                })).collect::<Vec<_>>(),
                "proxyPort": policy.proxy_port,
            },
            "proxy": { "relayEngine": self.relay_engine.as_str() },
            "dns": self.dns,
        });
        serde_json::to_string_pretty(&dump).unwrap_or_else(|_| "{}".into())
    }
}
