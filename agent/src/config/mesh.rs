//! The mesh config's parts Sluice uses, from the `istio` ConfigMap's `mesh` key: `outboundTrafficPolicy.mode`,
//! the `exportTo` that ServiceEntries, VirtualServices and DestinationRules without one get, the root namespace,
//! `pathNormalization`, and the upstream connections' defaults (`connectTimeout`, `tcpKeepalive`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{
    error::FieldError,
    fields::{duration_problem, parse_duration, validate_port},
    names,
};

/// Istio's `outboundTrafficPolicy.mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub enum OutboundTrafficMode {
    #[serde(rename = "ALLOW_ANY")]
    AllowAny,
    #[serde(rename = "REGISTRY_ONLY")]
    RegistryOnly,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbound_traffic_policy: Option<OutboundTrafficPolicy>,
    /// `exportTo` for ServiceEntries that set none (Istio's default: `*`).
    #[serde(default)]
    pub default_service_export_to: Vec<String>,
    /// `exportTo` for VirtualServices that set none.
    #[serde(default)]
    pub default_virtual_service_export_to: Vec<String>,
    /// `exportTo` for DestinationRules that set none.
    #[serde(default)]
    pub default_destination_rule_export_to: Vec<String>,
    /// Where mesh-wide defaults live (a Sidecar without a selector there is every namespace's default); Istio's
    /// default is `istio-system`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_namespace: Option<String>,
    /// How request paths are normalized before they are matched and forwarded.
    #[serde(default)]
    pub path_normalization: Option<PathNormalizationConfig>,
    // Read to be checked as Istio checks them: a mesh config Istio would refuse is refused here too.
    #[serde(default)]
    pub proxy_listen_port: Option<u32>,
    /// How long a new upstream connection may take where no DestinationRule says (Istio's default: 10 s).
    #[serde(default)]
    pub connect_timeout: Option<String>,
    /// Keepalive on every upstream socket (`time`, `interval`, `probes`); a DestinationRule's lays over it.
    #[serde(default)]
    pub tcp_keepalive: Option<serde_json::Value>,
    /// `UPGRADE`: HTTP ports' requests go upstream as HTTP/2 (unless a DestinationRule says `DO_NOT_UPGRADE`).
    #[serde(default)]
    pub h2_upgrade_policy: Option<String>,
    #[serde(default)]
    pub protocol_detection_timeout: Option<String>,
    #[serde(default)]
    pub trust_domain: Option<String>,
    #[serde(default)]
    pub trust_domain_aliases: Vec<String>,
    #[serde(default)]
    pub service_settings: Vec<ServiceSettings>,
    #[serde(default, rename = "meshMTLS")]
    pub mesh_mtls: Option<serde_json::Value>,
    /// Where the access log goes: empty or absent, nowhere (Istio's default); `/dev/stdout`; a file.
    #[serde(default)]
    pub access_log_file: Option<String>,
    #[serde(default)]
    pub access_log_encoding: Option<String>,
    /// Envoy's command operators (TEXT), or a JSON object of field formats (JSON); empty: Istio's default.
    #[serde(default)]
    pub access_log_format: Option<String>,
    #[serde(default)]
    pub default_config: Option<ProxyDefaults>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct ServiceSettings {
    #[serde(default)]
    pub hosts: Vec<String>,
}

/// The parts of the mesh's `defaultConfig` (the proxies' defaults) Istio checks.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyDefaults {
    #[serde(default)]
    pub drain_duration: Option<String>,
    #[serde(default)]
    pub proxy_admin_port: Option<u32>,
    #[serde(default)]
    pub status_port: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct PathNormalizationConfig {
    #[serde(default)]
    pub normalization: Option<PathNormalization>,
}

/// Istio's `pathNormalization.normalization`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PathNormalization {
    /// Istio's default: `BASE`.
    #[default]
    Default,
    /// Paths as sent.
    None,
    /// RFC 3986 normalization (Envoy's `normalize_path`).
    Base,
    /// `BASE`, then runs of slashes merged.
    MergeSlashes,
    /// `MERGE_SLASHES`, with `%2F` and `%5C` decoded first.
    DecodeAndMergeSlashes,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutboundTrafficPolicy {
    pub mode: Option<OutboundTrafficMode>,
    /// Where ALLOW_ANY traffic of a Sidecar goes, in place of its original destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_proxy: Option<super::fields::Destination>,
}

impl OutboundTrafficMode {
    /// The mode as Istio spells it.
    pub fn name(self) -> &'static str {
        match self {
            OutboundTrafficMode::AllowAny => "ALLOW_ANY",
            OutboundTrafficMode::RegistryOnly => "REGISTRY_ONLY",
        }
    }
}

impl MeshConfig {
    /// The mode the mesh config sets, if it sets one (Istio's default, ALLOW_ANY, applies otherwise).
    pub fn outbound_mode(&self) -> Option<OutboundTrafficMode> {
        self.outbound_traffic_policy.as_ref().and_then(|policy| policy.mode)
    }

    /// How request paths are normalized (`DEFAULT`, or none set, is `BASE`).
    pub fn path_normalization(&self) -> PathNormalization {
        match self.path_normalization.as_ref().and_then(|config| config.normalization) {
            None | Some(PathNormalization::Default) => PathNormalization::Base,
            Some(mode) => mode,
        }
    }

    /// How long a new upstream connection may take where no DestinationRule says: `connectTimeout`, else Istio's
    /// 10 s.
    pub fn connect_timeout(&self) -> Duration {
        let set = self.connect_timeout.as_deref().and_then(|timeout| parse_duration(timeout).ok());
        set.unwrap_or(Duration::from_secs(10))
    }

    /// Whether `h2UpgradePolicy` is `UPGRADE` (Istio's default: `DO_NOT_UPGRADE`).
    pub fn h2_upgrade(&self) -> bool {
        self.h2_upgrade_policy.as_deref() == Some("UPGRADE")
    }

    /// Where mesh-wide defaults live: `rootNamespace`, else Istio's `istio-system`.
    pub fn root_namespace(&self) -> &str {
        self.root_namespace.as_deref().unwrap_or("istio-system")
    }

    /// Parses the YAML held under the ConfigMap's `mesh` key; an error names its field under `data.mesh`.
    pub fn from_mesh_yaml(text: &str) -> Result<MeshConfig, FieldError> {
        if text.trim().is_empty() {
            return Ok(MeshConfig::default());
        }
        serde_path_to_error::deserialize(serde_yaml_ng::Deserializer::from_str(text)).map_err(|e| {
            let message = e.inner().to_string();
            FieldError::from_serde("data.mesh", &e.path().to_string(), &message)
        })
    }

    /// Istio's checks of the mesh config's fields Sluice reads or a mesh commonly sets; `prefix` is where the
    /// mesh config sits (`data.mesh` in the ConfigMap, `spec` in a MeshConfig resource).
    pub fn validate(&self, prefix: &str) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let at = |field: &str| format!("{prefix}.{field}");
        if let Some(port) = self.proxy_listen_port {
            validate_port(port, &at("proxyListenPort"), &mut errors);
        }
        if let Some(timeout) = &self.connect_timeout {
            match duration_problem(timeout) {
                Some(reason) => errors.push(FieldError::new(at("connectTimeout"), reason)),
                None if parse_duration(timeout).is_ok_and(|d| d > Duration::from_secs(3600)) => errors
                    .push(FieldError::new(at("connectTimeout"), format!("'{timeout}' is above 1h, the most allowed"))),
                None => {}
            }
        }
        if let Some(policy) = self.h2_upgrade_policy.as_deref().filter(|p| !matches!(*p, "DO_NOT_UPGRADE" | "UPGRADE"))
        {
            errors.push(FieldError::new(at("h2UpgradePolicy"), format!("'{policy}' is not DO_NOT_UPGRADE or UPGRADE")));
        }
        if let Some(keepalive) = &self.tcp_keepalive {
            super::fields::keepalive_problems(keepalive, &at("tcpKeepalive"), &mut errors);
        }
        if let Some(timeout) = &self.protocol_detection_timeout {
            match parse_duration(timeout) {
                Err(reason) => errors.push(FieldError::new(at("protocolDetectionTimeout"), reason)),
                Ok(d) if d.subsec_nanos() % 1_000_000 != 0 => errors.push(FieldError::new(
                    at("protocolDetectionTimeout"),
                    format!("'{timeout}' is finer than a millisecond"),
                )),
                Ok(_) => {}
            }
        }
        if let Some(domain) = &self.trust_domain {
            if let Some(reason) = trust_domain_problem(domain) {
                errors.push(FieldError::new(at("trustDomain"), reason));
            }
        }
        for (i, alias) in self.trust_domain_aliases.iter().enumerate() {
            if let Some(reason) = trust_domain_problem(alias) {
                errors.push(FieldError::new(at(&format!("trustDomainAliases[{i}]")), reason));
            }
        }
        for (i, settings) in self.service_settings.iter().enumerate() {
            for (j, host) in settings.hosts.iter().enumerate() {
                if let Err(reason) = names::wildcard_domain(host) {
                    errors.push(FieldError::new(at(&format!("serviceSettings[{i}].hosts[{j}]")), reason));
                }
            }
        }
        if self.mesh_mtls.as_ref().is_some_and(|mtls| mtls.get("ecdhCurves").is_some()) {
            errors.push(FieldError::new(at("meshMTLS.ecdhCurves"), "the mesh's mTLS takes no ECDH curves"));
        }
        if let Some(encoding) = self.access_log_encoding.as_deref().filter(|e| !matches!(*e, "TEXT" | "JSON")) {
            errors.push(FieldError::new(at("accessLogEncoding"), format!("'{encoding}' is not TEXT or JSON")));
        }
        if let Some(format) = self.access_log_format.as_deref().filter(|format| !format.trim().is_empty()) {
            let json = self.access_log_encoding.as_deref() == Some("JSON");
            if let Err(reason) = crate::telemetry::access_log::check(format, json) {
                errors.push(FieldError::new(at("accessLogFormat"), reason));
            }
        }
        if let Some(defaults) = &self.default_config {
            if let Some(drain) = &defaults.drain_duration {
                let reason = duration_problem(drain).or_else(|| {
                    (parse_duration(drain).is_ok_and(|d| d.subsec_nanos() != 0))
                        .then(|| format!("'{drain}': a drain duration is in whole seconds"))
                });
                if let Some(reason) = reason {
                    errors.push(FieldError::new(at("defaultConfig.drainDuration"), reason));
                }
            }
            for (field, port) in [("proxyAdminPort", defaults.proxy_admin_port), ("statusPort", defaults.status_port)] {
                if let Some(port) = port {
                    validate_port(port, &at(&format!("defaultConfig.{field}")), &mut errors);
                }
            }
        }
        errors
    }
}

/// A SPIFFE trust domain: DNS labels, one trailing dot allowed.
fn trust_domain_problem(domain: &str) -> Option<String> {
    if domain.is_empty() {
        return Some("a trust domain may not be empty".into());
    }
    let labels: Vec<&str> = domain.split('.').collect();
    let valid = labels
        .iter()
        .enumerate()
        .all(|(i, label)| (i == labels.len() - 1 && label.is_empty()) || names::is_dns_label(label));
    (!valid).then(|| format!("'{domain}' is not a trust domain (DNS labels, like cluster.local)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mode_is_read_from_the_mesh_yaml() {
        let cases = [
            ("outboundTrafficPolicy:\n  mode: REGISTRY_ONLY\n", Some(OutboundTrafficMode::RegistryOnly)),
            ("outboundTrafficPolicy:\n  mode: ALLOW_ANY\n", Some(OutboundTrafficMode::AllowAny)),
            ("accessLogFile: /dev/stdout\n", None),
            ("", None),
        ];
        for (yaml, mode) in cases {
            assert_eq!(MeshConfig::from_mesh_yaml(yaml).unwrap().outbound_mode(), mode, "{yaml}");
        }
        let defaults =
            MeshConfig::from_mesh_yaml("defaultServiceExportTo: ['.']\ndefaultVirtualServiceExportTo: ['*']\n");
        let defaults = defaults.unwrap();
        assert_eq!(
            (defaults.default_service_export_to, defaults.default_virtual_service_export_to),
            (vec![".".to_owned()], vec!["*".to_owned()])
        );
        let error = MeshConfig::from_mesh_yaml("outboundTrafficPolicy:\n  mode: SOMETIMES\n").unwrap_err();
        assert_eq!(error.path, "data.mesh.outboundTrafficPolicy.mode");
        assert_eq!(error.reason, "'SOMETIMES' is not ALLOW_ANY or REGISTRY_ONLY");
    }

    #[test]
    fn the_mesh_config_is_checked_as_istio_checks_it() {
        let errors = |yaml: &str| -> Vec<String> {
            let mesh = MeshConfig::from_mesh_yaml(yaml).unwrap();
            mesh.validate("data.mesh").into_iter().map(|e| format!("{}: {}", e.path, e.reason)).collect()
        };
        let valid = "connectTimeout: 10s\ntcpKeepalive: {time: 7200s, interval: 75s, probes: 9}\n\
                     protocolDetectionTimeout: 0s\ntrustDomain: cluster.local\n\
                     serviceSettings: [{settings: {clusterLocal: true}, hosts: ['*.svc.cluster.local']}]\n\
                     defaultConfig: {drainDuration: 45s, proxyAdminPort: 15000}\naccessLogEncoding: JSON\n";
        assert_eq!(errors(valid), Vec::<String>::new());
        for (yaml, expected) in [
            ("connectTimeout: 0s\n", "data.mesh.connectTimeout: '0s' is below 1ms"),
            ("connectTimeout: 2h\n", "data.mesh.connectTimeout: '2h' is above 1h"),
            ("proxyListenPort: 70000\n", "data.mesh.proxyListenPort: 70000 is not a port"),
            ("trustDomain: bad_domain\n", "data.mesh.trustDomain: 'bad_domain' is not a trust domain"),
            ("trustDomainAliases: [ok.local, 'x y']\n", "data.mesh.trustDomainAliases[1]: 'x y' is not a trust domain"),
            ("serviceSettings: [{hosts: ['bad_host.example']}]\n", "data.mesh.serviceSettings[0].hosts[0]: "),
            ("accessLogEncoding: XML\n", "data.mesh.accessLogEncoding: 'XML' is not TEXT or JSON"),
            (
                "defaultConfig: {drainDuration: 1.5s}\n",
                "data.mesh.defaultConfig.drainDuration: '1.5s': a drain duration is in whole seconds",
            ),
            ("meshMTLS: {ecdhCurves: [P-256]}\n", "data.mesh.meshMTLS.ecdhCurves: "),
            ("tcpKeepalive: {time: soon}\n", "data.mesh.tcpKeepalive.time: "),
            ("tcpKeepalive: {probes: -1}\n", "data.mesh.tcpKeepalive.probes: -1 is not a count"),
            ("tcpKeepalive: {idle: 5s}\n", "data.mesh.tcpKeepalive.idle: unknown field"),
            ("tcpKeepalive: 5s\n", "data.mesh.tcpKeepalive: tcpKeepalive is an object"),
            ("h2UpgradePolicy: SOMETIMES\n", "data.mesh.h2UpgradePolicy: 'SOMETIMES' is not DO_NOT_UPGRADE or UPGRADE"),
        ] {
            let found = errors(yaml);
            assert!(found.iter().any(|e| e.starts_with(expected)), "{yaml}: {found:?}");
        }
    }

    #[test]
    fn the_upstream_defaults_are_read() {
        let mesh = MeshConfig::from_mesh_yaml("connectTimeout: 3s\ntcpKeepalive: {time: 60s, probes: 3}\n").unwrap();
        assert!(mesh.validate("data.mesh").is_empty());
        assert_eq!(mesh.connect_timeout(), Duration::from_secs(3));
        assert_eq!(mesh.tcp_keepalive, Some(serde_json::json!({"time": "60s", "probes": 3})));
        assert_eq!(MeshConfig::default().connect_timeout(), Duration::from_secs(10), "Istio's default");
        assert!(MeshConfig::from_mesh_yaml("h2UpgradePolicy: UPGRADE\n").unwrap().h2_upgrade());
        assert!(!MeshConfig::default().h2_upgrade());
    }

    #[test]
    fn path_normalization_is_read_and_defaults_to_base() {
        let mode = |yaml: &str| MeshConfig::from_mesh_yaml(yaml).unwrap().path_normalization();
        assert_eq!(mode(""), PathNormalization::Base);
        assert_eq!(mode("pathNormalization: {normalization: DEFAULT}\n"), PathNormalization::Base);
        assert_eq!(mode("pathNormalization: {normalization: NONE}\n"), PathNormalization::None);
        assert_eq!(mode("pathNormalization: {normalization: MERGE_SLASHES}\n"), PathNormalization::MergeSlashes);
        assert_eq!(
            mode("pathNormalization:\n  normalization: DECODE_AND_MERGE_SLASHES\n"),
            PathNormalization::DecodeAndMergeSlashes
        );
        assert!(MeshConfig::from_mesh_yaml("pathNormalization: {normalization: SOMETIMES}\n").is_err());
    }
}
