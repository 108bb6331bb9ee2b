//! The mesh config's parts Sluice uses, from the `istio` ConfigMap's `mesh` key: `outboundTrafficPolicy.mode`,
//! the `exportTo` that ServiceEntries, VirtualServices and DestinationRules without one get, the root namespace,
//! and `pathNormalization`.

use serde::{Deserialize, Serialize};

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
pub struct OutboundTrafficPolicy {
    pub mode: Option<OutboundTrafficMode>,
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

    /// Where mesh-wide defaults live: `rootNamespace`, else Istio's `istio-system`.
    pub fn root_namespace(&self) -> &str {
        self.root_namespace.as_deref().unwrap_or("istio-system")
    }

    /// Parses the YAML held under the ConfigMap's `mesh` key.
    pub fn from_mesh_yaml(text: &str) -> Result<MeshConfig, String> {
        if text.trim().is_empty() {
            return Ok(MeshConfig::default());
        }
        serde_yaml_ng::from_str(text).map_err(|e| e.to_string())
    }
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
        assert!(error.contains("SOMETIMES"), "{error}");
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
