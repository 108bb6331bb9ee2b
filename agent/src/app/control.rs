//! What the agent knows between events — the configuration in force, its DNS answers, the node's settings — and
//! the policies compiled from it: the reconciler's state, with no I/O of its own but DNS.

use std::{collections::BTreeMap, path::PathBuf, sync::Arc};

use crate::{
    allocator::transient,
    config::{
        resolver::{self, DnsResolver, Resolved},
        sources::{files, kubernetes},
        store::Store,
        ConfigError, Snapshot,
    },
    policy::{
        bindings::{self, Bindings},
        clusters::ClusterStates,
        compile::{self, NodeSettings},
        routes::{self, ProxyPolicy, ProxySettings},
        sidecars::SidecarModes,
        telemetry::{GatewayTelemetry, WorkloadTelemetry},
        DatapathPolicy,
    },
    proxy::relay::Engine,
    telemetry::{
        access_log::AccessLog,
        config_dump,
        requests::{AccessLogFormat, TelemetryConfig},
        scopes::WorkloadScopes,
        tags::{self, TagOverrides},
    },
};

/// What the agent knows between events: the configuration in force, the DNS answers for it, and the node's
/// own settings; everything the policy is compiled from.
pub struct Control {
    paths: Vec<PathBuf>,
    node: NodeSettings,
    store: Store,
    resolver: Arc<DnsResolver>,
    resolved: Resolved,
    /// What the last round of lookups said of each name (TTLs, failures), read by `/status` when asked.
    pub(super) dns_answers: Arc<arc_swap::ArcSwap<resolver::Answers>>,
    /// What the last load rejected.
    errors: Vec<ConfigError>,
    /// How many resources and mesh configs the last load took from the files (Kubernetes' aside).
    files_accepted: usize,
    /// The names the configuration resolves by DNS.
    names: std::collections::BTreeSet<String>,
    /// The Kubernetes source's latest full set, once it has listed everything.
    pub(super) kube: Option<tokio::sync::watch::Receiver<Option<Arc<kubernetes::Documents>>>>,
    /// This agent's labels, which Gateway selectors are matched against.
    pub(super) labels: BTreeMap<String, String>,
    /// The proxy's node settings (the mode is the datapath policy's).
    pub(super) proxy: ProxySettings,
    /// What the proxy's clusters count at run time, carried from one compiled policy to the next.
    clusters: ClusterStates,
    /// The fields not applied that have been warned of (`Kind ns/name path`), so each is warned of once.
    warned: std::collections::HashSet<String>,
    /// The engine decided byte streams are relayed with, for `/config_dump`.
    pub(super) relay_engine: Engine,
    /// `--access-log-format`, which overrides the mesh config's encoding and format.
    pub(super) access_log_format: Option<AccessLogFormat>,
}

impl Control {
    pub fn new(paths: Vec<PathBuf>, node: NodeSettings, resolver: Arc<DnsResolver>) -> Control {
        Control {
            paths,
            node,
            store: Store::default(),
            resolver,
            resolved: Resolved::new(),
            dns_answers: Default::default(),
            errors: Vec::new(),
            files_accepted: 0,
            names: Default::default(),
            kube: None,
            labels: Default::default(),
            proxy: ProxySettings::default(),
            relay_engine: Engine::default(),
            access_log_format: None,
            clusters: Default::default(),
            warned: Default::default(),
        }
    }

    /// Reads the configuration files again, with what Kubernetes holds; a rejected resource keeps its last good
    /// version. Returns the configuration now in force, typed, to compile from (the store holds it compactly).
    pub fn load(&mut self) -> Snapshot {
        let mut loaded = transient(|| files::load(&self.paths));
        self.files_accepted = loaded.sources.len() + loaded.mesh_documents;
        if let Some(kube) = self.kube.as_ref().and_then(|kube| kube.borrow().clone()) {
            loaded.extend(transient(|| kube.load()));
        }
        report(&loaded);
        for id in self.store.update(&loaded).kept {
            tracing::warn!(resource = %id, "keeping the last good version of a rejected resource");
        }
        self.errors = std::mem::take(&mut loaded.errors);
        // The resources as read are dropped before the store's are read back: not both at once.
        drop(loaded);
        let snapshot = self.snapshot();
        self.names = resolver::names(&snapshot);
        for resource in &snapshot.resources {
            for (field, why) in crate::config::unsupported::fields(resource, self.kube.is_some()) {
                let id = resource.id();
                if self.warned.insert(format!("{id} {field}")) {
                    tracing::warn!(resource = %id, %field, reason = why, "field not applied");
                }
            }
            for (field, why) in crate::config::warnings::warnings(resource) {
                let id = resource.id();
                if self.warned.insert(format!("{id} {field} {why}")) {
                    tracing::warn!(resource = %id, %field, reason = why, "as Istio warns");
                }
            }
        }
        snapshot
    }

    /// Looks up the names the configuration resolves by DNS: whether any answer changed, and when to look again.
    pub async fn resolve(&mut self) -> (bool, std::time::Duration) {
        let (resolved, refresh, answers) = self.resolver.resolve(&self.names, &self.resolved).await;
        self.dns_answers.store(Arc::new(answers));
        let changed = resolved != self.resolved;
        if changed {
            tracing::info!(
                hosts = resolved.len(),
                addresses = resolved.values().map(Vec::len).sum::<usize>(),
                "DNS answers changed"
            );
        }
        self.resolved = resolved;
        (changed, refresh)
    }

    /// The access log the mesh config, the Telemetry API and the command line ask for, and the metrics the
    /// Telemetry API turns off.
    pub fn telemetry(&self, snapshot: &Snapshot) -> TelemetryConfig {
        let (labels, namespace) = (&self.proxy.gateway_labels, self.proxy.gateway_namespace.as_deref());
        let telemetry = GatewayTelemetry::compile(snapshot, labels, namespace, &self.proxy.own_services);
        let access_log = AccessLog::compile(&snapshot.mesh, self.access_log_format, &telemetry);
        let tag_overrides = TagOverrides::compile(telemetry.tag_overrides, tags::standard_labels);
        let workloads = WorkloadTelemetry::compile(snapshot, labels, namespace, &self.proxy.own_services);
        let scopes = WorkloadScopes::new(workloads, &snapshot.mesh, self.access_log_format);
        TelemetryConfig { access_log, disabled_metrics: telemetry.disabled_metrics, tags: tag_overrides, scopes }
    }

    pub fn policy(&self, snapshot: &Snapshot) -> DatapathPolicy {
        compile::datapath_policy(snapshot, &self.resolved, &self.node)
    }

    /// The configuration in force, typed, read back from the store: held only while compiling, so apart from
    /// what stays (`transient`).
    pub fn snapshot(&self) -> Snapshot {
        transient(|| self.store.snapshot())
    }

    /// The Gateways that select this agent, and what each context's VirtualServices are: held only while
    /// compiling, so apart from what stays (`transient`).
    pub fn bind(&self, snapshot: &Snapshot) -> Bindings {
        transient(|| bindings::bind(snapshot, &self.labels))
    }

    /// Each workload's outbound mode (the mesh's, refined by Sidecars): compiled once, read by the proxy for
    /// opaque connections and by the kernel for its per-source exceptions.
    pub fn sidecar_modes(&self, snapshot: &Snapshot) -> Arc<SidecarModes> {
        Arc::new(SidecarModes::compile(snapshot, compile::mesh_mode(snapshot, &self.node)))
    }

    pub fn proxy_policy(&self, snapshot: &Snapshot, bindings: &Bindings, sidecars: Arc<SidecarModes>) -> ProxyPolicy {
        routes::proxy_policy(snapshot, &self.resolved, bindings, sidecars, &self.proxy, &self.clusters)
    }

    /// What the files gave at the last load: how many resources and mesh configs were taken, and every error.
    pub fn files_read(&self) -> (usize, &[ConfigError]) {
        (self.files_accepted, &self.errors)
    }

    pub fn rejected(&self) -> impl Iterator<Item = &str> {
        self.errors.iter().filter_map(|e| e.resource.as_deref())
    }

    pub fn dump(&self, generation: u64, policy: DatapathPolicy, bindings: &Bindings) -> config_dump::Dump {
        config_dump::Dump::new(generation, self.store.stored(), &self.errors, policy, bindings)
            .with_relay_engine(self.relay_engine)
            .with_dns(&self.resolved)
    }
}

/// Logs what loading the configuration rejected and ignored; the rest is applied.
fn report(loaded: &files::Loaded) {
    for error in &loaded.errors {
        tracing::warn!(error = %error, "configuration rejected");
    }
    for ignored in &loaded.ignored {
        tracing::debug!(document = %ignored, "not read: not a kind Sluice uses");
    }
    tracing::info!(
        resources = loaded.snapshot.resources.len(),
        rejected = loaded.errors.len(),
        mesh_mode = ?loaded.snapshot.mesh.outbound_mode(),
        "configuration loaded"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{L4Rule, OutboundMode};

    const ENTRY: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: default}
spec:
  hosts: [api.example]
  addresses: [203.0.113.10]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: NONE
";

    fn control(dir: &std::path::Path) -> Control {
        let node = NodeSettings { mode: Some(OutboundMode::RegistryOnly), ..NodeSettings::default() };
        let resolver = Arc::new(DnsResolver::new(&["127.0.0.1".parse().unwrap()]).unwrap());
        Control::new(vec![dir.to_owned()], node, resolver)
    }

    fn rule(text: &str) -> L4Rule {
        text.parse().unwrap()
    }

    #[test]
    fn a_reload_with_a_bad_resource_keeps_its_last_good_version_and_reports_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("api.yaml");
        std::fs::write(&file, ENTRY).unwrap();
        let mut control = control(dir.path());
        let first = control.load();
        assert_eq!(control.policy(&first).rules, vec![rule("203.0.113.10:443/tcp")]);

        std::fs::write(&file, ENTRY.replace("number: 443", "number: 0")).unwrap();
        let second = control.load();

        assert_eq!(control.policy(&second).rules, vec![rule("203.0.113.10:443/tcp")], "the last good version stays");
        assert_eq!(control.rejected().collect::<Vec<_>>(), vec!["ServiceEntry default/api"]);
        assert!(control.errors[0].to_string().contains("spec.ports[0].number"), "{}", control.errors[0]);

        std::fs::write(&file, ENTRY.replace("203.0.113.10", "203.0.113.20")).unwrap();
        let third = control.load();
        assert_eq!(control.policy(&third).rules, vec![rule("203.0.113.20:443/tcp")]);
        assert_eq!(control.rejected().count(), 0);
    }

    #[test]
    fn new_dns_answers_are_compiled_into_the_next_policy() {
        let dir = tempfile::tempdir().unwrap();
        let entry = ENTRY.replace("  addresses: [203.0.113.10]\n", "").replace("resolution: NONE", "resolution: DNS");
        std::fs::write(dir.path().join("api.yaml"), entry).unwrap();
        let mut control = control(dir.path());
        let snapshot = control.load();
        assert_eq!(control.names.iter().collect::<Vec<_>>(), ["api.example"]);
        assert!(control.policy(&snapshot).rules.is_empty(), "nothing is admitted before the name resolves");

        control.resolved.insert("api.example".into(), vec!["198.51.100.7".parse().unwrap()]);
        assert_eq!(control.policy(&control.snapshot()).rules, vec![rule("198.51.100.7:443/tcp")]);

        control.resolved.insert("api.example".into(), vec!["198.51.100.8".parse().unwrap()]);
        assert_eq!(control.policy(&control.snapshot()).rules, vec![rule("198.51.100.8:443/tcp")]);
    }
}
