//! The agent's run: wires the configuration sources, the datapath, the proxy and the telemetry servers together
//! (`App::start`), then reconciles on every event until told to stop (`App::run_until`).

mod certificate_watch;
mod control;
mod enforced;
mod handover;
mod interfaces;
mod preflight;
mod settings;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use anyhow::Context;
use arc_swap::ArcSwap;
use tokio::{
    sync::{mpsc, watch},
    task::JoinSet,
};

use certificate_watch::CertificateWatch;
use handover::{Claim, Held, Ownership, Successor};

pub use control::Control;
pub use enforced::Enforced;
pub use interfaces::InterfaceFollower;
pub use preflight::capabilities as check_capabilities;
pub use settings::RunSettings;

use crate::{
    config::{
        resolver::DnsResolver,
        secrets::KnownSecrets,
        sources::{kubernetes, watch as file_watch},
        workloads::KnownWorkloads,
    },
    datapath::{self, Datapath, InterceptRouting, VerdictCounters},
    policy::{
        compile::NodeSettings,
        routes::{CredentialSource, ProxySettings},
        tls_servers::LastGood,
    },
    proxy::{
        self,
        drain::Drain,
        gateway_listeners::GatewayListeners,
        http::{HttpProxy, Limits, Listener},
        local_destinations::LocalDestinations,
        overload::Overload,
        relay::{Engine, Relay},
        tcp::{SourceAddresses, UpstreamSockets},
        transparent_listener::TransparentListener,
    },
    telemetry::{self, server::Readiness},
};

/// A running agent: the policy enforced, the servers and proxy serving, the sources watched.
pub struct App {
    control: Control,
    enforced: Enforced,
    /// What reads and writes the policy, and the metrics and admin endpoints: stopped when the drain begins (a
    /// successor's answer from then on).
    tasks: JoinSet<()>,
    /// The proxy's transparent and forward-proxy listeners: closed when the drain delay is over.
    accepting: JoinSet<()>,
    /// The readiness endpoint (503 while draining) and what the proxy needs to its end.
    lasting: JoinSet<()>,
    /// Writing the datapath is this agent's alone until it stops or a successor starts.
    ownership: Option<Ownership>,
    proxy: Arc<HttpProxy>,
    drain: Drain,
    drain_delay: Duration,
    drain_timeout: Duration,
    /// The Kubernetes source's latest full set (`None` until it has listed everything); with --kube.
    kube_changes: Option<watch::Receiver<Option<Arc<kubernetes::Documents>>>>,
    /// The configuration files changed.
    file_changes: mpsc::Receiver<()>,
    /// Keeps the file watch alive.
    _file_watch: Option<file_watch::Watch>,
    /// The certificate files the configuration names, wherever they are.
    certificate_files: CertificateWatch,
    /// With --kube, the pods behind the gateway: when they change, the workloads whose Sidecar's mode differs
    /// may have too.
    pods: Option<Arc<KnownWorkloads>>,
    /// With --kube, the Secrets of the gateway's namespace: when they change, the servers' certificates are read
    /// again.
    secrets: Option<Arc<KnownSecrets>>,
    /// When the configuration's names are looked up again.
    refresh: Duration,
    readiness: watch::Sender<Readiness>,
    counters: VerdictCounters,
    routing: Arc<InterceptRouting>,
    bpffs: PathBuf,
    cleanup_on_exit: bool,
}

impl App {
    /// Binds the listeners, reads the configuration, loads and attaches the datapath with the policy compiled
    /// from it, and starts the proxy and the telemetry servers.
    pub async fn start(settings: RunSettings) -> anyhow::Result<App> {
        raise_descriptor_limit(settings.max_connections);
        telemetry::passthrough::set_passthrough_limit(settings.max_passthrough_series);
        // Listeners first: a port in use fails before anything touches the kernel.
        let metrics_listener = listen(settings.metrics_addr, "metrics", "--metrics-addr")?;
        let admin_listener = listen(settings.admin_addr, "admin", "--admin-addr")?;
        let readiness_listener = listen(settings.readiness_addr, "readiness", "--readiness-addr")?;
        proxy::transparent_listener::migrate_queued_connections(&proxy::transparent_listener::MIGRATE_REQ_SYSCTLS);
        let forward_proxy = match settings.forward_proxy_port {
            Some(port) => Some(proxy::gateway_listeners::bind(port).map_err(|error| {
                anyhow::anyhow!("binding the forward-proxy listener on port {port}: {error} (see --forward-proxy-port)")
            })?),
            None => None,
        };
        // The proxy takes the ports the configuration names for HTTP, TLS and routed TCP, and --intercept-port's;
        // --proxy-port 0 leaves every port to the kernel, by address.
        let intercepting = settings.proxy_port != 0;
        let transparent = if intercepting {
            let listener = TransparentListener::bind(settings.proxy_port).map_err(|error| {
                anyhow::anyhow!(
                    "binding the transparent listener on port {}: {error} (see --proxy-port)",
                    settings.proxy_port
                )
            })?;
            Some(Arc::new(listener))
        } else {
            None
        };
        let node = NodeSettings {
            mode: settings.outbound_traffic_policy,
            blackhole: settings.blackhole,
            allow_cidrs: settings.allow_cidr.clone(),
            rules: settings.allow.clone(),
            intercept_ports: settings.intercept_port.clone(),
            proxy_port: if intercepting { settings.proxy_port } else { 0 },
            knows_sources: settings.kube,
        };
        // One resolver (and one cache) for the ServiceEntries' names and the forward proxy's lookups.
        let resolver = Arc::new(DnsResolver::new(&settings.dns_server).map_err(anyhow::Error::msg)?);
        let mut control = Control::new(settings.config.clone(), node, resolver.clone());
        control.labels = settings.gateway_labels.clone();
        control.relay_engine = settings.relay_engine;
        control.access_log_format = settings.access_log_format;
        control.proxy = ProxySettings {
            own_services: settings.gateway_service.clone(),
            host_verify: settings.host_verify,
            gateway_namespace: settings.gateway_namespace.clone(),
            upgrades: settings.allow_upgrade.clone(),
            credentials: CredentialSource {
                dir: settings.credentials_dir.clone(),
                secrets: None,
                istio_certs: Some(settings.istio_certs_dir.clone()),
            },
            gateway_labels: settings.gateway_labels.clone(),
        };
        // With --kube, credentialNames are the Secrets of the gateway's namespace, as Istio reads them.
        let secrets = match (settings.kube, &settings.gateway_namespace) {
            (true, Some(_)) => Some(Arc::new(KnownSecrets::default())),
            (true, None) => {
                tracing::warn!("--gateway-namespace (POD_NAMESPACE) is unset: credentialName Secrets are not read");
                None
            }
            (false, _) => None,
        };
        control.proxy.credentials.secrets = secrets.clone();
        let workloads = Arc::new(KnownWorkloads::default());
        let mut kube_changes = None;
        if settings.kube {
            let changes = watch_kubernetes(&settings, workloads.clone(), secrets.clone()).await?;
            control.kube = Some(changes.clone());
            kube_changes = Some(changes);
        }
        // Watched before the first read, so a change made while the agent starts is not missed. The certificates'
        // directories too: a rotated certificate is read with the configuration, for new handshakes.
        let certificates = [&settings.credentials_dir, &Some(settings.istio_certs_dir.clone())];
        let watched: Vec<_> = (settings.config.iter().cloned())
            .chain(certificates.into_iter().flatten().filter(|dir| dir.is_dir()).cloned())
            .collect();
        let (file_watch, file_changes) = if watched.is_empty() {
            (None, mpsc::channel(1).1)
        } else {
            let (watch, changes) = file_watch::watch(&watched).map_err(anyhow::Error::msg)?;
            (Some(watch), changes)
        };
        // Read before anything touches the kernel: a configuration or interface that cannot be what the operator
        // meant stops the start here.
        let snapshot = control.load();
        preflight::configuration(&settings.config, control.files_read(), settings.kube, settings.allow_empty_config)?;
        preflight::interfaces(&settings.intercept, settings.wait_for_interfaces)?;
        // A running agent on the same pins holds still (writes nothing, serves on) while this one takes them up;
        // it hands them over once this one is ready, and goes on if this one fails first.
        let claim = Claim::on(&settings.bpffs).await?;
        // The datapath first: when the maps hold a previous agent's policy, attaching at once enforces it on
        // interfaces that came while no agent ran, before the configuration's names are resolved.
        let mut datapath = if settings.relay_engine == Engine::Kernel {
            Datapath::load_with_kernel_relay(&settings.bpffs)?
        } else {
            Datapath::load(&settings.bpffs)?
        };
        let routing = Arc::new(InterceptRouting::connect().context("connecting to rtnetlink")?);
        if intercepting {
            routing.install().await?;
        }
        let counters = datapath.counters();
        let access_log = control.telemetry(&crate::config::Snapshot::default()).access_log;
        let metrics = telemetry::metrics::registry(counters.clone(), datapath.blackholed(), access_log);
        let early = datapath.holds_policy();
        let events = datapath.take_events();
        let relay = match settings.relay_engine {
            Engine::Kernel => match datapath.take_relay() {
                // The maps live as long as the agent: every relay shares them.
                Ok(maps) => Relay::with_kernel(Box::leak(Box::new(maps))),
                Err(why) => {
                    tracing::warn!(%why, "the kernel relay cannot run on this kernel: decided streams are spliced");
                    Relay::new(Engine::Splice)
                }
            },
            engine => Relay::new(engine),
        };
        tracing::info!(relay_engine = relay.engine().as_str(), "decided byte streams are relayed by this engine");
        // /config_dump says which engine runs, not which was asked for.
        control.relay_engine = relay.engine();
        let datapath = Arc::new(Mutex::new(datapath));
        let listed = kube_changes.as_ref().is_none_or(|changes| changes.borrow().is_some());
        let (readiness, readiness_reader) =
            watch::channel(Readiness { listed, unenforced: Vec::new(), draining: false });
        let local_destinations = Arc::new(LocalDestinations::new(
            settings.allow_local_destination.clone(),
            metrics.local_destinations_refused.clone(),
        ));
        let mut follower = InterfaceFollower::new(
            datapath.clone(),
            settings.intercept.clone(),
            intercepting.then(|| routing.clone()),
            metrics.interfaces.clone(),
            readiness.clone(),
            local_destinations.clone(),
        );
        let mut adopted = if early { follower.check().await } else { Vec::new() };

        let refresh = control.resolve().await.1;
        let policy = control.policy(&snapshot);
        datapath.lock().unwrap_or_else(PoisonError::into_inner).apply(&policy)?;
        adopted.extend(follower.check().await);
        let detached = datapath.lock().unwrap_or_else(PoisonError::into_inner).detach_others()?;
        tracing::info!(
            interfaces = ?datapath.lock().unwrap_or_else(PoisonError::into_inner).attached().collect::<Vec<_>>(),
            adopted = ?adopted,
            detached = ?detached,
            mode = ?policy.mode,
            blackhole = ?policy.blackhole,
            rules = policy.rules.len(),
            allow_cidrs = policy.allow_cidrs.len(),
            intercept_ports = ?policy.intercept_ports,
            metrics = %settings.metrics_addr,
            bpffs = %settings.bpffs.display(),
            "datapath attached"
        );

        let bindings = control.bind(&snapshot);
        let sidecars = control.sidecar_modes(&snapshot);
        let mut routes = control.proxy_policy(&snapshot, &bindings, sidecars.clone());
        metrics.requests.configure(control.telemetry(&snapshot));
        metrics.config_generation.set(1);
        let (dump, dump_reader) = watch::channel(Arc::new(control.dump(1, policy, &bindings)));
        let certificate_files = CertificateWatch::new(snapshot.certificate_files());
        drop((bindings, snapshot));
        crate::allocator::release_freed_memory();
        metrics.set_rejected(control.rejected());
        let mut certificates = LastGood::default();
        enforced::keep_good_certificates(&mut routes, &mut certificates, &metrics);
        let routes = Arc::new(ArcSwap::from_pointee(routes));
        let (mut tasks, mut accepting, mut lasting) = (JoinSet::new(), JoinSet::new(), JoinSet::new());
        if let Some(events) = events {
            let (total, requests) = (metrics.blocked_flows.clone(), metrics.requests.clone());
            tasks.spawn(telemetry::blocked_flows::watch(events, total, routes.clone(), requests));
        }
        tasks.spawn(follower.follow());
        tasks.spawn(telemetry::server::serve_metrics(metrics_listener, metrics.registry.clone()));
        tasks.spawn(sweep_passthrough_series(metrics.requests.clone()));
        let status = telemetry::status::AgentState {
            dump: dump_reader,
            readiness: readiness_reader.clone(),
            datapath: datapath.clone(),
            forward_proxy_port: settings.forward_proxy_port,
            routes: routes.clone(),
            workloads: workloads.clone(),
            dns_answers: control.dns_answers.clone(),
            flows: metrics.requests.flows().clone(),
        };
        tasks.spawn(telemetry::server::serve_admin(admin_listener, status));
        // Ready once every configured interface has the classifier, and with --kube once every kind is listed.
        lasting.spawn(telemetry::server::serve_readiness(readiness_listener, readiness_reader));
        let limits = Limits {
            max_connections: settings.max_connections,
            request_headers_timeout: settings.request_headers_timeout,
            stream_idle_timeout: settings.stream_idle_timeout,
            idle_timeout: settings.idle_timeout,
            http1_client: settings.upstream_http1,
            sockets: UpstreamSockets::new(
                SourceAddresses::from_list(&settings.upstream_source_address),
                local_destinations.clone(),
            ),
        };
        let drain = Drain::default();
        let overload = Arc::new(Overload::default());
        match settings.max_memory.or_else(proxy::overload::default_threshold).filter(|bytes| *bytes > 0) {
            Some(threshold) => {
                tracing::info!(threshold, "past this resident memory the proxy sheds new work (--max-memory)");
                let (overload, active) = (overload.clone(), metrics.requests.overloaded());
                lasting.spawn(async move { overload.watch(threshold, active).await });
            }
            None => tracing::info!("no --max-memory and no cgroup memory limit: the proxy never sheds work"),
        }
        let http = Arc::new(
            HttpProxy::new(routes.clone(), metrics.requests.clone(), limits)
                .with_resolver(resolver)
                .with_workloads(workloads.clone())
                .with_relay(relay)
                .with_drain(drain.clone())
                .with_overload(overload),
        );
        lasting.spawn(HttpProxy::keep_a_timer_due());
        for listener in forward_proxy.into_iter().flatten() {
            accepting.spawn(proxy::gateway_listeners::accept(listener, Listener::Forward, http.clone()));
        }
        if let Some(listener) = transparent {
            accepting.spawn(proxy::intercepted::serve(listener, http.clone()));
        }
        let mut gateways = GatewayListeners::new(http.clone());
        gateways.reconcile(&routes.load().gateway_ports());
        let pods = settings.kube.then(|| workloads.clone());
        let mut enforced =
            Enforced { datapath, routes, gateways, metrics, dump, workloads, sidecars, sources: None, certificates };
        enforced.apply_sources();
        let ownership = claim.complete().await?;
        Ok(App {
            control,
            enforced,
            tasks,
            accepting,
            lasting,
            ownership: Some(ownership),
            proxy: http,
            drain,
            drain_delay: settings.drain_delay,
            drain_timeout: settings.drain_timeout,
            kube_changes,
            file_changes,
            _file_watch: file_watch,
            certificate_files,
            pods,
            secrets,
            refresh,
            readiness,
            counters,
            routing,
            bpffs: settings.bpffs,
            cleanup_on_exit: settings.cleanup_on_exit,
        })
    }

    /// Reconciles on every change (configuration files, Kubernetes, pods, DNS answers running out) until a signal
    /// comes on `signals` or a successor agent starts; then drains (`drain`) and, with --cleanup-on-exit, removes
    /// everything from the kernel (by default the last policy stays enforced).
    pub async fn run_until(mut self, mut signals: mpsc::Receiver<&'static str>) -> anyhow::Result<()> {
        let successor = loop {
            let kube_changed = async {
                match self.kube_changes.as_mut() {
                    Some(changes) => changes.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            let pods_changed = async {
                match &self.pods {
                    Some(pods) => pods.changed().await,
                    None => std::future::pending().await,
                }
            };
            let secrets_changed = async {
                match &self.secrets {
                    Some(secrets) => secrets.changed().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                signal = signals.recv() => {
                    tracing::info!(signal = signal.unwrap_or("none"), "stopping");
                    break None;
                }
                successor = successor_asks(&self.ownership) => {
                    tracing::info!("a successor agent is starting on these pins: holding still until it is ready");
                    let held = tokio::select! {
                        held = successor.ready() => held,
                        signal = signals.recv() => {
                            tracing::info!(signal = signal.unwrap_or("none"), "stopping");
                            break None;
                        }
                    };
                    match held {
                        Held::Ready(successor) => {
                            tracing::info!("the successor is ready: handing the datapath over");
                            break Some(successor);
                        }
                        Held::Gone => {
                            tracing::warn!("the successor went away before it was ready: this agent goes on");
                            // Its classifier (and maps, if another layout) may be on the links: this agent's back.
                            self.enforced.reclaim_links();
                            // What the successor wrote is replaced by this agent's policy, whole.
                            self.enforced.sources = None;
                            self.reload().await;
                        }
                    }
                }
                true = kube_changed => {
                    self.readiness.send_if_modified(|readiness| !std::mem::replace(&mut readiness.listed, true));
                    self.reload().await;
                }
                Some(()) = self.file_changes.recv() => self.reload().await,
                () = self.certificate_files.changed() => self.reload().await,
                () = pods_changed => self.enforced.apply_sources(),
                () = secrets_changed => self.reload().await,
                () = tokio::time::sleep(self.refresh) => {
                    let (changed, next) = self.control.resolve().await;
                    self.refresh = next;
                    if changed {
                        self.enforced.apply(&self.control, self.control.snapshot());
                    }
                }
            }
        };
        let handed_over = successor.is_some();
        let stopped_at_once = self.drain(successor, &mut signals).await;
        if handed_over && !stopped_at_once {
            // Exiting would have the pod restarted, and the restarted agent take the datapath back.
            tracing::info!("handed over and drained: waiting for SIGTERM");
            signals.recv().await;
        }
        self.lasting.abort_all();
        for total in self.counters.read() {
            tracing::info!(
                verdict = total.verdict.label(),
                packets = total.packets,
                bytes = total.bytes,
                "datapath counters"
            );
        }
        drop(self.enforced);
        // A successor's pins are its own.
        let successor_owns = Ownership::try_take(&self.bpffs).is_none();
        if self.cleanup_on_exit && successor_owns {
            tracing::info!("another agent owns the datapath now: --cleanup-on-exit leaves it in place");
            Ok(())
        } else if self.cleanup_on_exit {
            remove_all(&self.bpffs, &self.routing).await
        } else {
            tracing::info!(bpffs = %self.bpffs.display(), "policy stays enforced in the kernel (sluice cleanup removes it)");
            Ok(())
        }
    }
}

/// A successor asking for the datapath, while this agent owns it.
async fn successor_asks(ownership: &Option<Ownership>) -> Successor {
    match ownership {
        Some(ownership) => ownership.successor().await,
        None => std::future::pending().await,
    }
}

impl App {
    /// Moves clients off this agent, as Envoy drains: stops writing the policy (handing the datapath to
    /// `successor`, or to whichever agent starts next), turns readiness to 503, asks clients to close (HTTP/1.1
    /// `Connection: close`, HTTP/2 GOAWAY) while the listeners go on accepting for --drain-delay, then closes the
    /// listeners and gives the connections in flight up to --drain-timeout. A second signal cuts it short; whether
    /// one did.
    async fn drain(&mut self, successor: Option<Successor>, signals: &mut mpsc::Receiver<&'static str>) -> bool {
        // Nothing reads or writes the kernel from here on; the metrics and admin endpoints close (a successor's
        // answer), and the kernel's counters go on in the pinned maps.
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        self.readiness.send_modify(|readiness| readiness.draining = true);
        self.drain.begin();
        if let Some(ownership) = self.ownership.take() {
            ownership.release(successor).await;
        }
        tracing::info!(delay = ?self.drain_delay, "draining: clients are asked to close; the listeners accept for the delay");
        let cut_short = |signal: Option<&str>| {
            tracing::info!(signal = signal.unwrap_or("none"), "stopping at once: the drain is cut short");
            true
        };
        let mut stopped_at_once = tokio::select! {
            () = tokio::time::sleep(self.drain_delay) => false,
            signal = signals.recv() => cut_short(signal),
        };
        self.accepting.abort_all();
        while self.accepting.join_next().await.is_some() {}
        self.enforced.gateways.close_all();
        self.drain.close();
        let deadline = tokio::time::sleep(self.drain_timeout);
        tokio::pin!(deadline);
        while !stopped_at_once {
            let open = self.proxy.open_connections();
            if open == 0 {
                tracing::info!("drained: no client connection is open");
                break;
            }
            tokio::select! {
                () = &mut deadline => {
                    tracing::warn!(connections = open, "the drain timeout is over: the connections still open are closed");
                    break;
                }
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
                signal = signals.recv() => stopped_at_once = cut_short(signal),
            }
        }
        stopped_at_once
    }
}

/// How often the series of destinations passed through unregistered are looked over, and how many looks in a row
/// one may go unused before it is dropped (an hour): the passthrough series cap then holds the destinations in
/// use, not the first ever seen.
const PASSTHROUGH_SWEEP_EVERY: Duration = Duration::from_secs(300);
const PASSTHROUGH_QUIET_SWEEPS: u32 = 12;

async fn sweep_passthrough_series(telemetry: telemetry::requests::RequestTelemetry) {
    let mut every = tokio::time::interval(PASSTHROUGH_SWEEP_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let dropped = telemetry.sweep_passthrough(PASSTHROUGH_QUIET_SWEEPS);
        if dropped > 0 {
            tracing::debug!(destinations = dropped, "dropped the metric series of unused passthrough destinations");
        }
    }
}

/// Starts the Kubernetes watchers: the Istio resources (their latest full set) and the pods behind the gateway,
/// whose addresses identify the sources of requests (published in `workloads`).
async fn watch_kubernetes(
    settings: &RunSettings,
    workloads: Arc<KnownWorkloads>,
    secrets: Option<Arc<KnownSecrets>>,
) -> anyhow::Result<watch::Receiver<Option<Arc<kubernetes::Documents>>>> {
    let config = kube::Config::infer()
        .await
        .context("--kube: no Kubernetes configuration (in-cluster service account, or KUBECONFIG)")?;
    let url = config.cluster_url.clone();
    let client = kube::Client::try_from(config).context("--kube: making the Kubernetes client")?;
    // The API server must answer at start: otherwise the agent would wait unready for ever, enforcing what the files
    // say. Stopping says why; the DaemonSet restarts the agent, and the kernel keeps the last policy meanwhile.
    let deadline = tokio::time::Instant::now() + settings.kube_connect_timeout;
    loop {
        match tokio::time::timeout_at(deadline, client.apiserver_version()).await {
            Ok(Ok(version)) => {
                tracing::info!(%url, version = version.git_version, "Kubernetes API server reached");
                break;
            }
            Ok(Err(error)) if tokio::time::Instant::now() + KUBE_RETRY < deadline => {
                tracing::debug!(%url, %error, "the Kubernetes API server does not answer yet");
                tokio::time::sleep(KUBE_RETRY).await;
            }
            Ok(Err(error)) => anyhow::bail!(
                "--kube: the Kubernetes API server at {url} does not answer: {error} (tried for {:?}; see KUBECONFIG \
                 or the pod's service account, and --kube-connect-timeout)",
                settings.kube_connect_timeout
            ),
            Err(_) => anyhow::bail!(
                "--kube: the Kubernetes API server at {url} did not answer within {:?} (see KUBECONFIG or the pod's \
                 service account, and --kube-connect-timeout)",
                settings.kube_connect_timeout
            ),
        }
    }
    let scope =
        kubernetes::Scope { namespace: settings.namespace.clone(), mesh_namespace: settings.mesh_namespace.clone() };
    let (kube_sender, kube_changes) = watch::channel(None);
    tokio::spawn(kubernetes::watch(client.clone(), scope, kube_sender));
    if let (Some(secrets), Some(namespace)) = (secrets, &settings.gateway_namespace) {
        tokio::spawn(kubernetes::watch_secrets(client.clone(), namespace.clone(), secrets));
    }
    tokio::spawn(kubernetes::watch_pods(client, workloads));
    Ok(kube_changes)
}

/// How long to wait between attempts to reach the API server at start.
const KUBE_RETRY: Duration = Duration::from_millis(500);

impl App {
    /// Reads the configuration again (files and Kubernetes), resolves its names and applies the result, then
    /// watches the certificate files it names; looks the names up again when their answers run out.
    async fn reload(&mut self) {
        let snapshot = self.control.load();
        self.enforced.metrics.set_rejected(self.control.rejected());
        self.refresh = self.control.resolve().await.1;
        self.certificate_files.follow(snapshot.certificate_files());
        self.enforced.apply(&self.control, snapshot);
    }
}

/// Raises the soft limit on open descriptors to what `max_connections` clients need (each with an upstream
/// connection, and room for pools, maps and listeners), as far as the hard limit allows: at the default soft
/// limit (1,024) accept would fail with EMFILE long before `--max-connections`.
fn raise_descriptor_limit(max_connections: usize) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let wanted = (max_connections as u64).saturating_mul(2).saturating_add(1024);
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return };
    let raised = wanted.min(hard);
    if raised > soft {
        match setrlimit(Resource::RLIMIT_NOFILE, raised, hard) {
            Ok(()) => tracing::debug!(from = soft, to = raised, "raised the open-descriptor limit"),
            Err(error) => tracing::warn!(%error, "raising the open-descriptor limit"),
        }
    }
    if raised < wanted {
        tracing::warn!(
            limit = raised,
            wanted,
            "the open-descriptor limit is below what --max-connections needs: accepts may fail before it is reached"
        );
    }
}

/// Binds one of the agent's HTTP listeners; a port in use is named with the flag that moves it.
/// A telemetry listener on `addr`, shared with a successor agent that starts while this one drains.
fn listen(addr: SocketAddr, what: &str, flag: &str) -> anyhow::Result<tokio::net::TcpListener> {
    let bind = || {
        use socket2::{Domain, Protocol, Socket, Type};
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        tokio::net::TcpListener::from_std(socket.into())
    };
    bind().map_err(|error: std::io::Error| {
        anyhow::anyhow!("binding the {what} listener on {addr}: {error} (is another program listening? see {flag})")
    })
}

/// Removes everything Sluice put in the kernel under `bpffs`: links, program, maps, and the policy routing.
pub async fn remove_all(bpffs: &std::path::Path, routing: &InterceptRouting) -> anyhow::Result<()> {
    let removed = datapath::cleanup(bpffs)?;
    routing.remove().await?;
    tracing::info!(bpffs = %bpffs.display(), ?removed, "removed from the kernel");
    Ok(())
}
