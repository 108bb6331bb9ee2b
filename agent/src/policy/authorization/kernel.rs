//! The AuthorizationPolicies the kernel enforces by itself: DENY rules that apply to every workload (the root
//! namespace's, without a selector) and need nothing but addresses and ports — no identity, namespace, host,
//! method, path or header. Their destinations are refused in the classifier (from the source ranges they name, or
//! from anyone), before any proxy sees the flow; the proxy still decides them too, for flows that reach it
//! another way (a gateway port).
//!
//! A rule is compiled only when the kernel's answer is exactly the rule's: `ports`, `ipBlocks` /
//! `remoteIpBlocks` (one of them per source), and `destination.ip` / `destination.port` / `source.ip` /
//! `remote.ip` values (no `not` fields, at most one condition of each key, sources named either in `from` or in
//! `when`). Anything else stays with the proxy.

use std::{collections::BTreeSet, sync::Arc};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::config::{
    authorization_policy::{Action, AuthorizationPolicy, Rule},
    service_entry::parse_address,
    Snapshot, Spec,
};

/// A destination a DENY rule refuses: addresses, on one port (0: every port and protocol), from the source ranges
/// named (none: from anyone).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KernelDenial {
    pub net: IpNet,
    pub port: u16,
    pub sources: Vec<IpNet>,
    /// The policy, `namespace/name`, as its decisions are reported.
    pub policy: Arc<str>,
}

/// Every destination the kernel refuses, in a stable order, without repeats.
pub fn kernel_denials(snapshot: &Snapshot) -> Vec<KernelDenial> {
    let root = snapshot.mesh.root_namespace();
    let mut denials = BTreeSet::new();
    for resource in &snapshot.resources {
        let Spec::AuthorizationPolicy(policy) = &resource.spec else { continue };
        if resource.metadata.namespace() != root || !in_kernel(policy) {
            continue;
        }
        let id: Arc<str> = format!("{root}/{}", resource.metadata.name).into();
        for rule in policy.rules.iter().flatten() {
            let Some(Denied { nets, ports, sources }) = denied(rule) else { continue };
            for net in &nets {
                for &port in &ports {
                    denials.insert(KernelDenial { net: *net, port, sources: sources.clone(), policy: id.clone() });
                }
            }
        }
    }
    denials.into_iter().collect()
}

/// Whether a policy is enforced in the kernel: an enforced DENY of the root namespace for every workload, some
/// of whose rules the kernel can decide. (Its other rules stay with the proxy.)
fn applies_to_everyone_as_deny(policy: &AuthorizationPolicy) -> bool {
    policy.selector.is_none()
        && !policy.attached_by_target()
        && !policy.is_dry_run()
        && policy.action().is_ok_and(|action| action == Action::Deny)
}

fn in_kernel(policy: &AuthorizationPolicy) -> bool {
    applies_to_everyone_as_deny(policy) && policy.rules.iter().flatten().any(|rule| denied(rule).is_some())
}

/// Whether the kernel decides every rule of a policy, so the proxy need not see the traffic it governs.
pub fn wholly_in_kernel(policy: &AuthorizationPolicy) -> bool {
    applies_to_everyone_as_deny(policy)
        && policy.rules.as_ref().is_some_and(|rules| !rules.is_empty() && rules.iter().all(|r| denied(r).is_some()))
}

/// What a rule denies, when addresses and ports are all it needs.
struct Denied {
    nets: Vec<IpNet>,
    /// 0: any port.
    ports: Vec<u16>,
    /// Empty: from anyone.
    sources: Vec<IpNet>,
}

fn denied(rule: &Rule) -> Option<Denied> {
    let mut sources: Option<Vec<IpNet>> = None;
    if let Some(from) = rule.from.as_ref().filter(|from| !from.is_empty()) {
        let mut named = Vec::new();
        for source in from.iter().map(|from| from.source.as_ref()) {
            let source = source?;
            let only_addresses = source.principals.is_empty()
                && source.not_principals.is_empty()
                && source.request_principals.is_empty()
                && source.not_request_principals.is_empty()
                && source.namespaces.is_empty()
                && source.not_namespaces.is_empty()
                && source.not_ip_blocks.is_empty()
                && source.not_remote_ip_blocks.is_empty();
            // Both address fields hold the peer's address here: a source naming both needs it in each.
            let blocks = match (source.ip_blocks.is_empty(), source.remote_ip_blocks.is_empty()) {
                (false, true) => &source.ip_blocks,
                (true, false) => &source.remote_ip_blocks,
                _ => return None,
            };
            if !only_addresses {
                return None;
            }
            named.extend(parse_nets(blocks)?);
        }
        sources = Some(named);
    }
    let mut ports: Option<BTreeSet<u16>> = None;
    if let Some(to) = &rule.to {
        let mut named = BTreeSet::new();
        for operation in to.iter().map(|to| to.operation.as_ref()) {
            let operation = operation?;
            let only_ports = operation.hosts.is_empty()
                && operation.not_hosts.is_empty()
                && operation.not_ports.is_empty()
                && operation.methods.is_empty()
                && operation.not_methods.is_empty()
                && operation.paths.is_empty()
                && operation.not_paths.is_empty();
            if !only_ports || operation.ports.is_empty() {
                return None;
            }
            named.extend(parse_ports(&operation.ports)?);
        }
        ports = Some(named);
    }
    let mut nets: Option<Vec<IpNet>> = None;
    let mut port_condition = false;
    for condition in &rule.when {
        if !condition.not_values.is_empty() || condition.values.is_empty() {
            return None;
        }
        match condition.key.as_str() {
            "destination.ip" if nets.is_none() => nets = Some(parse_nets(&condition.values)?),
            "source.ip" | "remote.ip" if sources.is_none() => sources = Some(parse_nets(&condition.values)?),
            "destination.port" if !port_condition => {
                port_condition = true;
                let listed = parse_ports(&condition.values)?;
                // Both `to.operation.ports` and the condition: a port must be in each.
                ports = Some(match ports {
                    Some(named) => named.intersection(&listed).copied().collect(),
                    None => listed,
                });
            }
            _ => return None,
        }
    }
    let nets = nets.unwrap_or_else(|| vec![IpNet::V4(Ipv4Net::default()), IpNet::V6(Ipv6Net::default())]);
    let ports: Vec<u16> = ports.map_or_else(|| vec![0], |ports| ports.into_iter().collect());
    let mut sources = sources.unwrap_or_default();
    sources.sort();
    sources.dedup();
    Some(Denied { nets, ports, sources })
}

fn parse_nets(values: &[String]) -> Option<Vec<IpNet>> {
    values.iter().map(|value| parse_address(value).map(|net| net.trunc())).collect()
}

fn parse_ports(values: &[String]) -> Option<BTreeSet<u16>> {
    values.iter().map(|value| value.parse::<u16>().ok().filter(|port| *port != 0)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denials(yaml: &str) -> Vec<String> {
        let shown = |denial: &KernelDenial| {
            let sources: Vec<String> = denial.sources.iter().map(ToString::to_string).collect();
            let from = if sources.is_empty() { String::new() } else { format!(" from {}", sources.join(",")) };
            format!("{} {}:{}{from}", denial.policy, denial.net, denial.port)
        };
        kernel_denials(&Snapshot::from_yaml(yaml)).iter().map(shown).collect()
    }

    fn policy(namespace: &str, spec: &str) -> String {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: {namespace}}}\nspec:\n{spec}"
        )
    }

    #[test]
    fn only_root_deny_rules_of_destinations_alone_reach_the_kernel() {
        let ports = "  action: DENY\n  rules: [{to: [{operation: {ports: ['5432', '6379']}}, {operation: {ports: ['5432']}}]}]\n";
        assert_eq!(
            denials(&policy("istio-system", ports)),
            [
                "istio-system/p 0.0.0.0/0:5432",
                "istio-system/p 0.0.0.0/0:6379",
                "istio-system/p ::/0:5432",
                "istio-system/p ::/0:6379"
            ]
        );
        let both = "  action: DENY\n  rules:\n  - to: [{operation: {ports: ['443', '8443']}}]\n    when:\n    \
                    - {key: destination.ip, values: ['203.0.113.7', '198.51.100.0/24']}\n    \
                    - {key: destination.port, values: ['8443', '9000']}\n";
        assert_eq!(
            denials(&policy("istio-system", both)),
            ["istio-system/p 198.51.100.0/24:8443", "istio-system/p 203.0.113.7/32:8443"],
            "ports in both the operation and the condition"
        );
        // Each of these needs what the kernel does not see, or is not an enforced DENY for everyone.
        let elsewhere = [
            ("default", ports.to_owned()),
            ("istio-system", ports.replace("DENY", "ALLOW")),
            ("istio-system", ports.replace("DENY", "AUDIT")),
            ("istio-system", format!("  selector: {{matchLabels: {{app: a}}}}\n{ports}")),
            ("istio-system", "  action: DENY\n  rules: [{to: [{operation: {notPorts: ['443']}}]}]\n".to_owned()),
            (
                "istio-system",
                "  action: DENY\n  rules: [{to: [{operation: {ports: ['443'], hosts: [a.example]}}]}]\n".to_owned(),
            ),
            (
                "istio-system",
                "  action: DENY\n  rules: [{to: [{operation: {ports: ['80'], paths: ['/admin']}}]}]\n".to_owned(),
            ),
            ("istio-system", "  action: DENY\n  rules: [{from: [{source: {namespaces: [a]}}]}]\n".to_owned()),
            ("istio-system", "  action: DENY\n  rules: [{from: [{source: {notIpBlocks: [10.0.0.0/8]}}]}]\n".to_owned()),
            (
                "istio-system",
                "  action: DENY\n  rules: [{from: [{source: {ipBlocks: [10.0.0.0/8]}}], when: [{key: source.ip, values: [10.1.1.1]}]}]\n"
                    .to_owned(),
            ),
            (
                "istio-system",
                "  action: DENY\n  rules: [{when: [{key: destination.ip, notValues: [10.0.0.1]}]}]\n".to_owned(),
            ),
            (
                "istio-system",
                "  action: DENY\n  rules: [{when: [{key: connection.sni, values: [a.example]}]}]\n".to_owned(),
            ),
        ];
        for (namespace, spec) in elsewhere {
            assert_eq!(denials(&policy(namespace, &spec)), Vec::<String>::new(), "{namespace}: {spec}");
        }
        let sources = "  action: DENY\n  rules:\n  - from: [{source: {ipBlocks: [10.1.0.0/16]}}, {source: {remoteIpBlocks: [10.2.0.7]}}]\n    \
                       to: [{operation: {ports: ['22']}}]\n  - when: [{key: source.ip, values: ['10.3.0.0/24']}]\n";
        assert_eq!(
            denials(&policy("istio-system", sources)),
            [
                "istio-system/p 0.0.0.0/0:0 from 10.3.0.0/24",
                "istio-system/p 0.0.0.0/0:22 from 10.1.0.0/16,10.2.0.7/32",
                "istio-system/p ::/0:0 from 10.3.0.0/24",
                "istio-system/p ::/0:22 from 10.1.0.0/16,10.2.0.7/32"
            ],
            "source ranges, from `from` or from `when`"
        );
        let dry_run = policy("istio-system", ports)
            .replace("namespace: istio-system}", "namespace: istio-system, annotations: {istio.io/dry-run: 'true'}}");
        assert_eq!(denials(&dry_run), Vec::<String>::new(), "dry run");
    }

    #[test]
    fn a_policy_is_wholly_in_the_kernel_only_when_every_rule_is() {
        let parse = |spec: &str| -> AuthorizationPolicy { serde_yaml_ng::from_str(spec).unwrap() };
        assert!(wholly_in_kernel(&parse("action: DENY\nrules: [{to: [{operation: {ports: ['22']}}]}]")));
        assert!(wholly_in_kernel(&parse("action: DENY\nrules: [{}]")), "denies everything, everywhere");
        let mixed =
            "action: DENY\nrules: [{to: [{operation: {ports: ['22']}}]}, {to: [{operation: {methods: [POST]}}]}]";
        assert!(!wholly_in_kernel(&parse(mixed)), "the POST rule needs the proxy");
        assert!(!wholly_in_kernel(&parse("action: ALLOW\nrules: [{to: [{operation: {ports: ['22']}}]}]")));
    }
}
