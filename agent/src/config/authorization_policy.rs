//! AuthorizationPolicy (`security.istio.io`): who may reach what through the gateway; and Istio's checks of it,
//! with what Sluice cannot enforce (`CUSTOM`, JWT attributes) refused by name.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{error::FieldError, names, service_entry::parse_address};

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<Selector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<TargetRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<TargetRef>,
    /// `ALLOW` (Istio's default), `DENY`, `AUDIT` or `CUSTOM`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<Vec<Rule>>,
    /// The `istio.io/dry-run` annotation's value, carried with the spec (annotations are not otherwise kept).
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "__dryRun")]
    pub dry_run: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Selector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct TargetRef {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// What a target reference names, of the kinds a gateway can be named by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetKind {
    /// A core Service (group `""` or `core`).
    Service,
    /// A Kubernetes Gateway (`gateway.networking.k8s.io`).
    KubernetesGateway,
    Other,
}

impl TargetRef {
    pub fn target_kind(&self) -> TargetKind {
        match (self.group.as_str(), self.kind.as_str()) {
            ("" | "core", "Service") => TargetKind::Service,
            ("gateway.networking.k8s.io", "Gateway") => TargetKind::KubernetesGateway,
            _ => TargetKind::Other,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct Rule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<From>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<To>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<Condition>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct From {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_request_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_remote_ip_blocks: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct To {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<Operation>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(default)]
    pub key: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<String>,
}

/// What stands in for an AuthorizationPolicy (`id`: `AuthorizationPolicy ns/name`) that was rejected and has no
/// last good version: a DENY of everything, in its namespace, for what its `selector` selects (everything there
/// when the selector is not known). An invalid policy fails closed: it denies what it would have governed.
pub fn fail_closed(id: &str, selector: Option<Selector>) -> Option<super::Resource> {
    let (namespace, name) = id.strip_prefix("AuthorizationPolicy ")?.split_once('/')?;
    let metadata =
        super::Metadata { name: name.to_owned(), namespace: Some(namespace.to_owned()), ..Default::default() };
    let policy = AuthorizationPolicy {
        selector,
        action: Some("DENY".into()),
        rules: Some(vec![Rule::default()]),
        ..AuthorizationPolicy::default()
    };
    let spec = super::Spec::AuthorizationPolicy(Box::new(policy));
    Some(super::Resource { kind: super::Kind::AuthorizationPolicy, metadata, spec })
}

/// The annotation that has a policy decided and counted but not enforced.
pub const DRY_RUN: &str = "istio.io/dry-run";

/// What a policy does when a rule matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
    Audit,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Audit => "AUDIT",
        }
    }
}

/// Why a `when` key is refused, if it is: Istio's attributes, less those that need JWT validation.
fn condition_key_problem(key: &str) -> Option<String> {
    if key.starts_with("request.auth.") {
        return Some(format!(
            "'{key}' needs a validated JWT (RequestAuthentication), which Sluice does not validate: refused rather \
             than never matched"
        ));
    }
    let header = key.strip_prefix("request.headers[").and_then(|rest| rest.strip_suffix(']'));
    let known = header.is_some_and(|name| !name.is_empty())
        || matches!(
            key,
            "source.ip"
                | "remote.ip"
                | "source.namespace"
                | "source.principal"
                | "destination.ip"
                | "destination.port"
                | "connection.sni"
        )
        || key.starts_with("experimental.envoy.filters.");
    (!known).then(|| {
        format!(
            "unknown attribute '{key}' (request.headers[NAME], source.ip, remote.ip, source.namespace, \
             source.principal, destination.ip, destination.port or connection.sni)"
        )
    })
}

impl AuthorizationPolicy {
    pub fn action(&self) -> Result<Action, String> {
        match self.action.as_deref().unwrap_or("ALLOW") {
            "ALLOW" => Ok(Action::Allow),
            "DENY" => Ok(Action::Deny),
            "AUDIT" => Ok(Action::Audit),
            "CUSTOM" => {
                Err("CUSTOM (an external authorizer) is not supported by Sluice: refused rather than skipped".into())
            }
            other => Err(format!("'{other}' is not ALLOW, DENY, AUDIT or CUSTOM")),
        }
    }

    /// Whether `targetRef`/`targetRefs` attach the policy (to a Gateway, a Service or a ServiceEntry) instead of a
    /// selector choosing workloads.
    pub fn attached_by_target(&self) -> bool {
        self.target_ref.is_some() || !self.target_refs.is_empty()
    }

    fn targets(&self) -> impl Iterator<Item = &TargetRef> {
        self.target_ref.iter().chain(&self.target_refs)
    }

    /// Whether `targetRefs` attach the policy to services (a Service or ServiceEntry): it applies to traffic to
    /// them, from any workload.
    pub fn targets_services(&self) -> bool {
        self.targets().any(|target| target.kind != "Gateway")
    }

    /// Where the policy applies, in words (`sluice check` says it of each): `namespace` is the policy's,
    /// `root` the mesh's root namespace.
    pub fn applies_to(&self, namespace: &str, root: &str) -> String {
        if self.attached_by_target() {
            let named: Vec<String> = self
                .targets()
                .map(|target| match target.kind.as_str() {
                    "Gateway" => format!("the gateway if it is Gateway {namespace}/{}", target.name),
                    kind => format!("traffic to {kind} {namespace}/{}", target.name),
                })
                .collect();
            return named.join("; ");
        }
        let labels = self.selector.as_ref().map(|selector| {
            let pairs: Vec<String> =
                selector.match_labels.iter().map(|(key, value)| format!("{key}={value}")).collect();
            pairs.join(",")
        });
        match (namespace == root, labels) {
            (true, None) => "every workload, and the gateway (the root namespace's)".into(),
            (true, Some(labels)) => format!("workloads labelled {labels} in every namespace, and the gateway if it is"),
            (false, None) => {
                format!("every workload of namespace {namespace}, and the gateway if it runs there")
            }
            (false, Some(labels)) => format!(
                "workloads of namespace {namespace} labelled {labels}, and the gateway if it is and runs there (or its \
                 namespace is not known)"
            ),
        }
    }

    /// Whether the `istio.io/dry-run` annotation is `true`.
    pub fn is_dry_run(&self) -> bool {
        self.dry_run.as_deref().is_some_and(|value| value.eq_ignore_ascii_case("true") || value == "1")
    }

    pub fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let mut fail = |path: String, reason: String| errors.push(FieldError::new(path, reason));
        let action = self.action();
        if let Err(reason) = &action {
            fail("spec.action".into(), reason.clone());
        }
        if self.selector.is_some() && self.attached_by_target() {
            fail("spec.selector".into(), "only one of selector or targetRefs may be set".into());
        }
        for (i, target) in self.targets().enumerate() {
            let path = if self.target_ref.is_some() && i == 0 {
                "spec.targetRef".to_owned()
            } else {
                format!("spec.targetRefs[{i}]")
            };
            if target.name.is_empty() {
                fail(format!("{path}.name"), "a target's name is required".into());
            }
            if target.namespace.is_some() {
                fail(
                    format!("{path}.namespace"),
                    "a target is in the policy's namespace: no namespace may be named".into(),
                );
            }
            let allowed = matches!(
                (target.group.as_str(), target.kind.as_str()),
                ("" | "core", "Service")
                    | ("networking.istio.io", "ServiceEntry")
                    | ("gateway.networking.k8s.io", "Gateway")
            );
            if !allowed {
                fail(
                    format!("{path}.kind"),
                    format!(
                        "'{}/{}' is not a Service, ServiceEntry or gateway.networking.k8s.io Gateway",
                        target.group, target.kind
                    ),
                );
            }
        }
        if self.provider.is_some() && !matches!(self.action.as_deref(), Some("CUSTOM")) {
            fail("spec.provider".into(), "a provider goes only with action CUSTOM".into());
        }
        if action == Ok(Action::Deny) && self.rules.is_none() {
            fail(
                "spec.rules".into(),
                "a DENY policy without rules never applies: add an empty rule {} to deny everything".into(),
            );
        }
        if let Some(value) = &self.dry_run {
            if !matches!(action, Ok(Action::Allow | Action::Deny)) {
                fail("metadata.annotations".into(), format!("{DRY_RUN} goes only with ALLOW or DENY"));
            } else if !matches!(value.to_ascii_lowercase().as_str(), "true" | "false" | "1" | "0" | "t" | "f") {
                fail("metadata.annotations".into(), format!("{DRY_RUN}: '{value}' is not true or false"));
            }
        }
        if let Some(selector) = &self.selector {
            names::validate_selector(&selector.match_labels, "spec.selector.matchLabels", &mut errors);
        }
        for (i, rule) in self.rules.iter().flatten().enumerate() {
            rule.validate(&format!("spec.rules[{i}]"), &mut errors);
        }
        errors
    }
}

impl Rule {
    fn validate(&self, path: &str, errors: &mut Vec<FieldError>) {
        if self.from.as_ref().is_some_and(Vec::is_empty) {
            errors.push(FieldError::new(format!("{path}.from"), "from may not be an empty list"));
        }
        for (i, from) in self.from.iter().flatten().enumerate() {
            let path = format!("{path}.from[{i}].source");
            match &from.source {
                None => errors.push(FieldError::new(path, "a source is required")),
                Some(source) => source.validate(&path, errors),
            }
        }
        if self.to.as_ref().is_some_and(Vec::is_empty) {
            errors.push(FieldError::new(format!("{path}.to"), "to may not be an empty list"));
        }
        for (i, to) in self.to.iter().flatten().enumerate() {
            let path = format!("{path}.to[{i}].operation");
            match &to.operation {
                None => errors.push(FieldError::new(path, "an operation is required")),
                Some(operation) => operation.validate(&path, errors),
            }
        }
        for (i, condition) in self.when.iter().enumerate() {
            let path = format!("{path}.when[{i}]");
            if condition.key.is_empty() {
                errors.push(FieldError::new(format!("{path}.key"), "a key is required"));
                continue;
            }
            if condition.values.is_empty() && condition.not_values.is_empty() {
                errors.push(FieldError::new(&path, "at least one of values or notValues is required"));
            }
            if let Some(reason) = condition_key_problem(&condition.key) {
                errors.push(FieldError::new(format!("{path}.key"), reason));
                continue;
            }
            for (field, values) in [("values", &condition.values), ("notValues", &condition.not_values)] {
                for (j, value) in values.iter().enumerate() {
                    let reason = match condition.key.as_str() {
                        "source.ip" | "remote.ip" | "destination.ip" if parse_address(value).is_none() => {
                            Some(format!("'{value}' is not an IP address or CIDR"))
                        }
                        "destination.port" if value.parse::<u16>().is_err() => {
                            Some(format!("'{value}' is not a port (0 to 65535)"))
                        }
                        _ => None,
                    };
                    if let Some(reason) = reason {
                        errors.push(FieldError::new(format!("{path}.{field}[{j}]"), reason));
                    }
                }
            }
        }
    }
}

/// Istio refuses empty strings in every list of a source or an operation.
fn validate_values(list: &[String], path: &str, errors: &mut Vec<FieldError>) {
    for (i, value) in list.iter().enumerate() {
        if value.is_empty() {
            errors.push(FieldError::new(format!("{path}[{i}]"), "an empty value is not allowed"));
        }
    }
}

impl Source {
    fn validate(&self, path: &str, errors: &mut Vec<FieldError>) {
        let lists = [
            ("principals", &self.principals),
            ("notPrincipals", &self.not_principals),
            ("requestPrincipals", &self.request_principals),
            ("notRequestPrincipals", &self.not_request_principals),
            ("namespaces", &self.namespaces),
            ("notNamespaces", &self.not_namespaces),
            ("ipBlocks", &self.ip_blocks),
            ("notIpBlocks", &self.not_ip_blocks),
            ("remoteIpBlocks", &self.remote_ip_blocks),
            ("notRemoteIpBlocks", &self.not_remote_ip_blocks),
        ];
        if lists.iter().all(|(_, list)| list.is_empty()) {
            errors.push(FieldError::new(path, "a source must set at least one field"));
        }
        for (field, list) in lists {
            validate_values(list, &format!("{path}.{field}"), errors);
        }
        for (field, list) in [
            ("ipBlocks", &self.ip_blocks),
            ("notIpBlocks", &self.not_ip_blocks),
            ("remoteIpBlocks", &self.remote_ip_blocks),
            ("notRemoteIpBlocks", &self.not_remote_ip_blocks),
        ] {
            for (i, block) in list.iter().enumerate().filter(|(_, block)| !block.is_empty()) {
                if parse_address(block).is_none() {
                    errors.push(FieldError::new(
                        format!("{path}.{field}[{i}]"),
                        format!("'{block}' is not an IP address or CIDR"),
                    ));
                }
            }
        }
    }
}

impl Operation {
    fn validate(&self, path: &str, errors: &mut Vec<FieldError>) {
        let lists = [
            ("hosts", &self.hosts),
            ("notHosts", &self.not_hosts),
            ("ports", &self.ports),
            ("notPorts", &self.not_ports),
            ("methods", &self.methods),
            ("notMethods", &self.not_methods),
            ("paths", &self.paths),
            ("notPaths", &self.not_paths),
        ];
        if lists.iter().all(|(_, list)| list.is_empty()) {
            errors.push(FieldError::new(path, "an operation must set at least one field"));
        }
        for (field, list) in lists {
            validate_values(list, &format!("{path}.{field}"), errors);
        }
        for (field, list) in [("ports", &self.ports), ("notPorts", &self.not_ports)] {
            for (i, port) in list.iter().enumerate().filter(|(_, port)| !port.is_empty()) {
                if port.parse::<u16>().is_err() {
                    errors.push(FieldError::new(
                        format!("{path}.{field}[{i}]"),
                        format!("'{port}' is not a port (0 to 65535)"),
                    ));
                }
            }
        }
        for (field, list) in [("paths", &self.paths), ("notPaths", &self.not_paths)] {
            for (i, template) in list.iter().enumerate() {
                if let Some(reason) = path_template_problem(template) {
                    errors.push(FieldError::new(format!("{path}.{field}[{i}]"), reason));
                }
            }
        }
    }
}

/// Istio's path templates: `{*}` stands for one segment, `{**}` for the rest (last, and only once); neither may
/// share a segment with other text, nor go with a `*` prefix or suffix match.
fn path_template_problem(path: &str) -> Option<String> {
    if !path.contains('{') && !path.contains('}') {
        return None;
    }
    if path.starts_with('*') || path.ends_with('*') {
        return Some(format!("'{path}': a template may not also be a prefix or suffix match"));
    }
    let segments: Vec<&str> = path.split('/').collect();
    for (i, segment) in segments.iter().enumerate() {
        let templated = segment.contains('{') || segment.contains('}');
        match *segment {
            "{*}" => {}
            "{**}" if i == segments.len() - 1 => {}
            "{**}" => return Some(format!("'{path}': {{**}} must be the last segment")),
            _ if templated => {
                return Some(format!("'{path}': a template segment is exactly {{*}} or {{**}}"));
            }
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> AuthorizationPolicy {
        serde_yaml_ng::from_str(yaml).unwrap_or_else(|e| panic!("{yaml}: {e}"))
    }

    #[test]
    fn what_istio_accepts_is_accepted() {
        for yaml in [
            // The seeds' restrict-egress.
            "selector: {matchLabels: {istio: egressgateway}}\naction: ALLOW\nrules:\n- to:\n  - operation:\n      hosts: [api.trusted-service.com, '*.internal.company.com']\n      ports: ['443', '8443']",
            "{}",
            "action: DENY\nrules: [{}]",
            "action: AUDIT\nrules: [{from: [{source: {namespaces: [payments]}}]}]",
            "rules: [{from: [{source: {ipBlocks: [10.0.0.0/8], notPrincipals: ['cluster.local/ns/a/sa/b']}}], to: [{operation: {methods: [GET], paths: ['/api/{*}/items', '/static/{**}']}}], when: [{key: 'request.headers[x-team]', values: [payments]}, {key: destination.port, notValues: ['22']}]}]",
            "targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: egress}]\nrules: [{}]",
        ] {
            assert_eq!(policy(yaml).validate(), vec![], "{yaml}");
        }
    }

    #[test]
    fn what_istio_refuses_is_refused_with_its_field() {
        for (yaml, path, reason) in [
            ("action: CUSTOM\nprovider: {name: opa}\nrules: [{}]", "spec.action", "not supported by Sluice"),
            ("action: MAYBE", "spec.action", "not ALLOW, DENY, AUDIT or CUSTOM"),
            ("action: DENY", "spec.rules", "never applies"),
            ("provider: {name: opa}\nrules: [{}]", "spec.provider", "only with action CUSTOM"),
            ("selector: {matchLabels: {app: a}}\ntargetRef: {kind: Service, name: a}", "spec.selector", "only one of"),
            ("targetRefs: [{kind: Deployment, name: a}]", "spec.targetRefs[0].kind", "not a Service"),
            ("selector: {matchLabels: {app: '*'}}", "spec.selector.matchLabels.app", "wildcard"),
            ("rules: [{from: []}]", "spec.rules[0].from", "empty list"),
            ("rules: [{from: [{}]}]", "spec.rules[0].from[0].source", "source is required"),
            ("rules: [{from: [{source: {}}]}]", "spec.rules[0].from[0].source", "at least one field"),
            (
                "rules: [{from: [{source: {ipBlocks: [10.0.0.0/40]}}]}]",
                "spec.rules[0].from[0].source.ipBlocks[0]",
                "not an IP address",
            ),
            (
                "rules: [{from: [{source: {namespaces: ['']}}]}]",
                "spec.rules[0].from[0].source.namespaces[0]",
                "empty value",
            ),
            ("rules: [{to: [{operation: {}}]}]", "spec.rules[0].to[0].operation", "at least one field"),
            (
                "rules: [{to: [{operation: {ports: ['https']}}]}]",
                "spec.rules[0].to[0].operation.ports[0]",
                "not a port",
            ),
            (
                "rules: [{to: [{operation: {paths: ['/a/{**}/b']}}]}]",
                "spec.rules[0].to[0].operation.paths[0]",
                "last segment",
            ),
            (
                "rules: [{to: [{operation: {paths: ['/a{*}']}}]}]",
                "spec.rules[0].to[0].operation.paths[0]",
                "exactly {*} or {**}",
            ),
            (
                "rules: [{when: [{key: 'request.auth.claims[group]', values: [a]}]}]",
                "spec.rules[0].when[0].key",
                "does not validate",
            ),
            ("rules: [{when: [{key: source.country, values: [a]}]}]", "spec.rules[0].when[0].key", "unknown attribute"),
            ("rules: [{when: [{key: source.ip}]}]", "spec.rules[0].when[0]", "values or notValues"),
            (
                "rules: [{when: [{key: destination.port, values: ['http']}]}]",
                "spec.rules[0].when[0].values[0]",
                "not a port",
            ),
            ("action: AUDIT\nrules: [{}]\n__dryRun: 'true'", "metadata.annotations", "only with ALLOW or DENY"),
            ("rules: [{}]\n__dryRun: 'maybe'", "metadata.annotations", "not true or false"),
        ] {
            let errors = policy(yaml).validate();
            assert!(errors.iter().any(|e| e.path == path && e.reason.contains(reason)), "{yaml}\n{errors:?}");
        }
    }
}
