//! The Telemetry resources that apply to this gateway, compiled: whether and which requests its access log writes,
//! and which of Istio's metrics it exports. As Istio scopes them: the root namespace's without a selector apply
//! mesh-wide, then the gateway's namespace's without a selector, then those (of the gateway's namespace, or any when
//! it is not known) whose selector matches `--gateway-labels`, or whose `targetRefs` name this gateway — its own
//! Service (`--gateway-service`), or the Kubernetes Gateway it was deployed for (its pods' label
//! `gateway.networking.k8s.io/gateway-name`), in the resource's namespace; the most specific that configures
//! access logging decides it, and metric overrides apply in that order, the later winning.
//!
//! Intercepted traffic comes from the workloads a sidecar would have served: the Telemetry resources that scope to
//! them (their namespace's without a selector, a selector matching their pod's labels) are layered over the
//! gateway's for their requests, more specific still (see [`WorkloadTelemetry`]).

use std::{collections::BTreeMap, sync::Arc};

use smallvec::SmallVec;

use crate::{
    config::{
        authorization_policy::{TargetKind, TargetRef},
        telemetry::{AccessLogging, Telemetry, METRICS},
        workloads::Workload,
        Snapshot, Spec,
    },
    telemetry::{expression::Expression, tags::TAGGED_METRICS},
};

/// What the Telemetry API asks of the gateway.
#[derive(Debug, Default)]
pub struct GatewayTelemetry {
    /// `None`: no Telemetry configures access logging (the mesh config decides).
    pub access_logging: Option<Logging>,
    /// Istio's metrics (the API's names: `REQUEST_COUNT`…) that are not exported.
    pub disabled_metrics: Vec<&'static str>,
    /// The resource that decided the access log, `namespace/name`, for logs.
    pub decided_by: Option<String>,
    /// Per metric (`REQUEST_COUNT`, `REQUEST_DURATION`, `REQUEST_SIZE`, `RESPONSE_SIZE`, then the four TCP ones, in
    /// the order of `switches::Metric`), each label's override: the value's expression, or `None` to remove it.
    /// Later (more specific) resources win.
    pub tag_overrides: [BTreeMap<String, Option<Arc<Expression>>>; TAGGED_METRICS],
}

#[derive(Debug)]
pub struct Logging {
    pub enabled: bool,
    /// Only entries for which it holds are logged.
    pub filter: Option<Arc<Expression>>,
}

/// A Telemetry resource that applies, and how specifically: 0 mesh-wide, 1 the gateway's namespace, 2 the gateway
/// itself; for a workload's traffic, 3 its namespace, 4 the workload itself. With its namespace and name.
type Applying<'a> = (u8, &'a str, &'a str, &'a Telemetry);

impl GatewayTelemetry {
    pub fn compile(
        snapshot: &Snapshot,
        gateway_labels: &BTreeMap<String, String>,
        gateway_namespace: Option<&str>,
        own_services: &[String],
    ) -> GatewayTelemetry {
        merge(&gateway_applying(snapshot, gateway_labels, gateway_namespace, own_services))
    }
}

/// The resources that apply to the gateway, least specific first.
fn gateway_applying<'a>(
    snapshot: &'a Snapshot,
    gateway_labels: &BTreeMap<String, String>,
    gateway_namespace: Option<&str>,
    own_services: &[String],
) -> Vec<Applying<'a>> {
    let root = snapshot.mesh.root_namespace();
    let mut applying: Vec<Applying<'a>> = Vec::new();
    for resource in &snapshot.resources {
        let Spec::Telemetry(telemetry) = &resource.spec else { continue };
        let namespace = resource.metadata.namespace();
        let in_gateway_namespace = gateway_namespace.is_none_or(|gateway| gateway == namespace);
        if telemetry.attached_by_target() {
            let refs = telemetry.target_ref.iter().chain(&telemetry.target_refs);
            let targets_this_gateway = refs
                .filter(|target| target.namespace.as_deref().is_none_or(|ns| ns == namespace))
                .any(|target| targets_gateway(target, namespace, gateway_labels, own_services));
            if targets_this_gateway && in_gateway_namespace {
                applying.push((2, namespace, &resource.metadata.name, telemetry));
            }
            continue;
        }
        let rank = match &telemetry.selector {
            None if namespace == root => 0,
            None if gateway_namespace == Some(namespace) && namespace != root => 1,
            None => continue,
            Some(selector) => {
                let selects = !selector.match_labels.is_empty()
                    && selector.match_labels.iter().all(|(key, value)| gateway_labels.get(key) == Some(value));
                if !(selects && (in_gateway_namespace || namespace == root)) {
                    continue;
                }
                2
            }
        };
        applying.push((rank, namespace, &resource.metadata.name, telemetry));
    }
    applying.sort_by_key(|(rank, namespace, name, _)| (*rank, *namespace, *name));
    applying
}

/// What `applying` (least specific first) asks, merged: the most specific that configures access logging decides
/// it, metric overrides apply in order, the later winning.
fn merge(applying: &[Applying<'_>]) -> GatewayTelemetry {
    let mut compiled = GatewayTelemetry::default();
    let mut disabled: BTreeMap<&'static str, bool> = BTreeMap::new();
    for (_, namespace, name, telemetry) in applying {
        if let Some(logging) = telemetry.access_logging.iter().find(|logging| writes_envoy_log(logging)) {
            let filter = logging.filter.as_ref().and_then(|filter| Expression::compile(&filter.expression).ok());
            compiled.access_logging =
                Some(Logging { enabled: logging.disabled != Some(true), filter: filter.map(Arc::new) });
            compiled.decided_by = Some(format!("{namespace}/{name}"));
        }
        for metric_override in telemetry.metrics.iter().flat_map(|metrics| &metrics.overrides) {
            let selector = metric_override.matches.as_ref();
            // The gateway reports as the client side (`reporter="source"`): SERVER-only overrides are not its.
            if selector.and_then(|selector| selector.mode.as_deref()) == Some("SERVER") {
                continue;
            }
            let selected = selector.and_then(|selector| selector.metric.as_deref());
            let selects =
                |metric: &str| selected.is_none_or(|selected| selected == "ALL_METRICS" || selected == metric);
            if let Some(off) = metric_override.disabled {
                for (metric, _) in METRICS.iter().filter(|(metric, _)| selects(metric)) {
                    disabled.insert(metric, off);
                }
            }
            for (index, (metric, _)) in METRICS.iter().take(TAGGED_METRICS).enumerate() {
                if !selects(metric) {
                    continue;
                }
                for (label, tag) in &metric_override.tag_overrides {
                    let value = match tag.operation.as_deref() {
                        Some("REMOVE") => None,
                        _ => match tag.value.as_deref().map(Expression::compile) {
                            Some(Ok(expression)) => Some(Arc::new(expression)),
                            // Refused by validation: the resource is not in force.
                            _ => continue,
                        },
                    };
                    compiled.tag_overrides[index].insert(label.clone(), value);
                }
            }
        }
    }
    compiled.disabled_metrics = disabled.into_iter().filter(|(_, off)| *off).map(|(metric, _)| metric).collect();
    compiled
}

/// The Telemetry resources that scope to workloads rather than the gateway — a namespace's own (not the root's), a
/// selector's — kept (with the gateway's) to be layered over the gateway's for the requests of the workloads they
/// select, as those workloads' sidecars would apply them.
#[derive(Debug, Default)]
pub struct WorkloadTelemetry {
    root: String,
    /// The gateway's, least specific first.
    gateway: Vec<(u8, String, String, Telemetry)>,
    /// Namespace, name and resource, in that order.
    scoped: Vec<(String, String, Telemetry)>,
}

/// Which of [`WorkloadTelemetry`]'s workload-scoped resources apply to a workload, by position.
pub type WorkloadSet = SmallVec<[u16; 4]>;

impl WorkloadTelemetry {
    pub fn compile(
        snapshot: &Snapshot,
        gateway_labels: &BTreeMap<String, String>,
        gateway_namespace: Option<&str>,
        own_services: &[String],
    ) -> WorkloadTelemetry {
        let root = snapshot.mesh.root_namespace();
        let gateway = gateway_applying(snapshot, gateway_labels, gateway_namespace, own_services)
            .into_iter()
            .map(|(rank, namespace, name, telemetry)| (rank, namespace.to_owned(), name.to_owned(), telemetry.clone()))
            .collect();
        let mut scoped = Vec::new();
        for resource in &snapshot.resources {
            let Spec::Telemetry(telemetry) = &resource.spec else { continue };
            let namespace = resource.metadata.namespace();
            let scopes_workloads = match &telemetry.selector {
                _ if telemetry.attached_by_target() => false,
                None => namespace != root,
                Some(selector) => !selector.match_labels.is_empty(),
            };
            if scopes_workloads && scoped.len() < usize::from(u16::MAX) {
                scoped.push((namespace.to_owned(), resource.metadata.name.clone(), (**telemetry).clone()));
            }
        }
        scoped.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        WorkloadTelemetry { root: root.to_owned(), gateway, scoped }
    }

    /// Whether no resource scopes to workloads (then their requests take the gateway's telemetry).
    pub fn is_empty(&self) -> bool {
        self.scoped.is_empty()
    }

    /// The workload-scoped resources that apply to `workload`: its namespace's, and those whose selector its pod's
    /// labels match (in its namespace, or the root namespace).
    pub fn applying_to(&self, workload: &Workload) -> WorkloadSet {
        let applies = |(namespace, _, telemetry): &(String, String, Telemetry)| match &telemetry.selector {
            None => *namespace == *workload.namespace,
            Some(selector) => {
                (*namespace == *workload.namespace || *namespace == self.root)
                    && selector.match_labels.iter().all(|(key, value)| workload.labels.get(key) == Some(value))
            }
        };
        (self.scoped.iter().enumerate()).filter(|(_, scoped)| applies(scoped)).map(|(i, _)| i as u16).collect()
    }

    /// What applies to the requests of a workload `set` names: the gateway's resources, then its namespace's, then
    /// its selectors', the more specific winning.
    pub fn merged(&self, set: &[u16]) -> GatewayTelemetry {
        let gateway =
            self.gateway.iter().map(|(rank, namespace, name, telemetry)| (*rank, &**namespace, &**name, telemetry));
        let mut own: Vec<Applying<'_>> = (set.iter().filter_map(|i| self.scoped.get(usize::from(*i))))
            .map(|(namespace, name, telemetry)| {
                let rank = if telemetry.selector.is_none() { 3 } else { 4 };
                (rank, namespace.as_str(), name.as_str(), telemetry)
            })
            .collect();
        own.sort_by_key(|(rank, namespace, name, _)| (*rank, *namespace, *name));
        merge(&gateway.chain(own).collect::<Vec<_>>())
    }
}

/// Whether `target` (of a resource in `namespace`) names this gateway: its own Service, or the Kubernetes Gateway
/// its pods were deployed for.
fn targets_gateway(
    target: &TargetRef,
    namespace: &str,
    gateway_labels: &BTreeMap<String, String>,
    own_services: &[String],
) -> bool {
    match target.target_kind() {
        TargetKind::Service => {
            let service = format!("{}.{namespace}", target.name);
            own_services.iter().any(|own| own == &service || own.starts_with(&format!("{service}.")))
        }
        TargetKind::KubernetesGateway => {
            gateway_labels.get("gateway.networking.k8s.io/gateway-name") == Some(&target.name)
        }
        TargetKind::Other => false,
    }
}

/// Whether an `accessLogging` entry concerns the file access log (Istio's `envoy` provider; no providers: the
/// defaults, which are it).
fn writes_envoy_log(logging: &AccessLogging) -> bool {
    logging.providers.is_empty() || logging.providers.iter().any(|provider| provider.name == "envoy")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compiled(yaml: &str, labels: &[(&str, &str)], namespace: Option<&str>) -> GatewayTelemetry {
        let labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let services = ["istio-egressgateway.istio-system.svc.cluster.local".to_owned()];
        GatewayTelemetry::compile(&Snapshot::from_yaml(yaml), &labels, namespace, &services)
    }

    const SEEDS: &str = "apiVersion: telemetry.istio.io/v1alpha1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  accessLogging: [{providers: [{name: envoy}]}]
---
apiVersion: telemetry.istio.io/v1alpha1
kind: Telemetry
metadata: {name: gateway-logging, namespace: istio-system}
spec:
  selector: {matchLabels: {istio: egressgateway}}
  accessLogging:
  - providers: [{name: envoy}]
    filter: {expression: response.code >= 400}
  metrics:
  - providers: [{name: prometheus}]
    overrides:
    - match: {metric: REQUEST_SIZE}
      disabled: true
    - match: {metric: RESPONSE_SIZE}
      disabled: true
";

    #[test]
    fn the_most_specific_telemetry_decides_the_access_log_and_overrides_accumulate() {
        let gateway = compiled(SEEDS, &[("istio", "egressgateway")], Some("istio-system"));
        let logging = gateway.access_logging.as_ref().unwrap();
        assert!(logging.enabled && logging.filter.is_some(), "the gateway's own, with its filter");
        assert_eq!(gateway.decided_by.as_deref(), Some("istio-system/gateway-logging"));
        assert_eq!(gateway.disabled_metrics, ["REQUEST_SIZE", "RESPONSE_SIZE"]);

        let other = compiled(SEEDS, &[("istio", "ingressgateway")], Some("istio-system"));
        let logging = other.access_logging.as_ref().unwrap();
        assert!(logging.enabled && logging.filter.is_none(), "only the mesh-wide one applies");
        assert!(other.disabled_metrics.is_empty());

        let disabled =
            "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: quiet, namespace: egress}\n\
                        spec:\n  accessLogging: [{disabled: true}]\n";
        let both = format!("{SEEDS}---\n{disabled}");
        let in_egress = compiled(&both, &[("app", "gw")], Some("egress"));
        assert!(!in_egress.access_logging.unwrap().enabled, "the namespace's overrides the mesh's");
        let unknown = compiled(&both, &[("app", "gw")], None);
        assert!(unknown.access_logging.unwrap().enabled, "a namespace-wide one applies only where the gateway runs");
    }

    #[test]
    fn a_workloads_own_telemetry_is_layered_over_the_gateways_for_its_requests() {
        let workload_scoped = "apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: apps-quiet, namespace: apps}
spec:
  accessLogging: [{disabled: true}]
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: noisy, namespace: apps}
spec:
  selector: {matchLabels: {app: noisy}}
  accessLogging: [{filter: {expression: response.code >= 500}}]
  metrics: [{overrides: [{match: {metric: REQUEST_COUNT}, tagOverrides: {team: {value: \"'noisy'\"}}}]}]
";
        let snapshot = Snapshot::from_yaml(&format!("{SEEDS}---\n{workload_scoped}"));
        let gateway_labels = [("istio".to_owned(), "egressgateway".to_owned())].into();
        let scoped = WorkloadTelemetry::compile(&snapshot, &gateway_labels, Some("istio-system"), &[]);
        let workload = |namespace: &str, app: &str| Workload {
            name: app.into(),
            namespace: namespace.into(),
            labels: [("app".to_owned(), app.to_owned())].into(),
        };
        // Elsewhere: nothing of their own, the gateway's applies.
        assert!(scoped.applying_to(&workload("other", "noisy")).is_empty());
        // The namespace's turns the log off for its workloads.
        let quiet = scoped.merged(&scoped.applying_to(&workload("apps", "calm")));
        assert!(!quiet.access_logging.unwrap().enabled);
        assert_eq!(quiet.disabled_metrics, ["REQUEST_SIZE", "RESPONSE_SIZE"], "the gateway's overrides stay");
        // The selector's is more specific than the namespace's: on again, with its own filter and labels.
        let noisy = scoped.merged(&scoped.applying_to(&workload("apps", "noisy")));
        let logging = noisy.access_logging.unwrap();
        assert!(logging.enabled && logging.filter.is_some());
        assert_eq!(noisy.decided_by.as_deref(), Some("apps/noisy"));
        assert!(noisy.tag_overrides[0].contains_key("team"));
    }

    #[test]
    fn target_refs_name_the_gateway_by_its_service_or_its_kubernetes_gateway() {
        let telemetry = |name: &str, namespace: &str, target: &str| {
            format!(
                "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {{name: {name}, namespace: {namespace}}}\n\
                 spec:\n  targetRefs: [{target}]\n  accessLogging: [{{disabled: true}}]\n"
            )
        };
        let by_service = telemetry("quiet", "istio-system", "{kind: Service, group: '', name: istio-egressgateway}");
        let gateway = compiled(&by_service, &[("istio", "egressgateway")], Some("istio-system"));
        assert!(!gateway.access_logging.unwrap().enabled, "its own Service names it");
        let elsewhere = telemetry("quiet", "other", "{kind: Service, group: '', name: istio-egressgateway}");
        assert!(compiled(&elsewhere, &[], Some("istio-system")).access_logging.is_none(), "another namespace's");
        let other = telemetry("quiet", "istio-system", "{kind: Service, group: '', name: reviews}");
        assert!(compiled(&other, &[], Some("istio-system")).access_logging.is_none(), "another Service");

        let by_gateway =
            telemetry("quiet", "istio-system", "{kind: Gateway, group: gateway.networking.k8s.io, name: egress}");
        let labelled = [("gateway.networking.k8s.io/gateway-name", "egress")];
        assert!(compiled(&by_gateway, &labelled, Some("istio-system")).access_logging.is_some());
        assert!(compiled(&by_gateway, &[("istio", "egressgateway")], Some("istio-system")).access_logging.is_none());
    }

    #[test]
    fn tag_overrides_apply_per_metric_the_more_specific_winning_and_server_side_ones_left_out() {
        let yaml = "apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh, namespace: istio-system}
spec:
  metrics:
  - overrides:
    - tagOverrides: {team: {value: \"'mesh'\"}, reporter: {operation: REMOVE}}
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: gateway, namespace: istio-system}
spec:
  selector: {matchLabels: {istio: egressgateway}}
  metrics:
  - overrides:
    - match: {metric: REQUEST_COUNT}
      tagOverrides: {team: {value: \"'gateway'\"}}
    - match: {metric: REQUEST_DURATION, mode: SERVER}
      tagOverrides: {server_only: {value: \"'x'\"}}
";
        let gateway = compiled(yaml, &[("istio", "egressgateway")], Some("istio-system"));
        let labels = |metric: usize| gateway.tag_overrides[metric].keys().cloned().collect::<Vec<_>>();
        assert_eq!(labels(0), ["reporter", "team"], "ALL_METRICS by default");
        assert_eq!(labels(1), ["reporter", "team"], "the SERVER-only override is not the gateway's");
        assert!(gateway.tag_overrides[0]["reporter"].is_none(), "REMOVE");
        let fields = crate::telemetry::access_log::format::Fields::default();
        let team = |metric: usize| gateway.tag_overrides[metric]["team"].as_ref().unwrap().text(&fields).unwrap();
        assert_eq!((team(0), team(1)), ("gateway".to_owned(), "mesh".to_owned()), "the gateway's own wins");
    }
}
