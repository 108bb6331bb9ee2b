//! Upstream clusters: a registered host's endpoints, as a DestinationRule divides them (subsets by endpoint
//! labels) and governs them (load balancing, connection-pool limits, outlier detection). What a cluster counts at
//! run time (requests in flight, ejected endpoints) lives in a `ClusterState` that outlives recompiles, so a
//! configuration change or a DNS refresh neither resets an ejection nor lifts a limit.

use std::{
    collections::{BTreeMap, HashMap},
    hash::{BuildHasher, Hash},
    net::IpAddr,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use http::{header, HeaderMap, HeaderName, Uri};
use rustls::pki_types::ServerName;

use super::certificates::CredentialSource;
use crate::config::{
    destination_rule::{ClientTls, ConsistentHash, PolicySettings, TrafficPolicy},
    fields::parse_duration,
};

/// How a cluster picks among its endpoints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum LoadBalance {
    /// ROUND_ROBIN, and the least-request family (LEAST_REQUEST, LEAST_CONN, UNSPECIFIED), served round robin.
    #[default]
    RoundRobin,
    Random,
    /// PASSTHROUGH: the original destination, whatever the endpoints.
    Passthrough,
}

/// What a consistent-hash cluster hashes to pick an endpoint: requests with the same key go to the same endpoint
/// for as long as it is there (and not ejected), from any gateway replica.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum HashKey {
    Header(HeaderName),
    Cookie(String),
    SourceIp,
    QueryParameter(String),
}

/// Hashes that agree between agents (and restarts): a fixed seed.
const HASH_SEED: u64 = 0x5e1c_e0f5_1ce0_f51c;

fn fixed_hash(value: impl Hash) -> u64 {
    foldhash::fast::FixedState::with_seed(HASH_SEED).hash_one(value)
}

impl HashKey {
    fn compile(hash: &ConsistentHash) -> Option<HashKey> {
        if let Some(name) = &hash.http_header_name {
            return HeaderName::from_bytes(name.as_bytes()).ok().map(HashKey::Header);
        }
        if let Some(cookie) = &hash.http_cookie {
            return Some(HashKey::Cookie(cookie.name.clone()));
        }
        if hash.use_source_ip {
            return Some(HashKey::SourceIp);
        }
        hash.http_query_parameter_name.clone().map(HashKey::QueryParameter)
    }

    /// The request's key hashed; `None` when the request has none (it is then balanced as round robin).
    pub fn hash(&self, headers: &HeaderMap, uri: &Uri, peer: IpAddr) -> Option<u64> {
        match self {
            HashKey::Header(name) => headers.get(name).map(|value| fixed_hash(value.as_bytes())),
            HashKey::Cookie(name) => headers
                .get_all(header::COOKIE)
                .iter()
                .filter_map(|value| value.to_str().ok())
                .flat_map(|value| value.split(';'))
                .find_map(|pair| pair.trim().split_once('=').filter(|(key, _)| key == name))
                .map(|(_, value)| fixed_hash(value.as_bytes())),
            HashKey::SourceIp => Some(fixed_hash(peer)),
            HashKey::QueryParameter(name) => uri
                .query()?
                .split('&')
                .find_map(|pair| pair.split_once('=').filter(|(key, _)| key == name))
                .map(|(_, value)| fixed_hash(value.as_bytes())),
        }
    }
}

/// Outlier detection as Istio configures Envoy's.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Outlier {
    pub consecutive_5xx: Option<u32>,
    pub consecutive_gateway: Option<u32>,
    pub base_ejection: Duration,
    pub max_ejection_percent: u32,
}

/// What a DestinationRule's traffic policy says of one cluster (and port). Compared and hashed as written, but for
/// its TLS, which is the same only as the very same (a policy that originates TLS is its own).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClusterPolicy {
    pub lb: LoadBalance,
    /// Requests in flight at once (`tcp.maxConnections` for HTTP/1.1 upstreams, `http.http2MaxRequests` for
    /// HTTP/2), and requests that may wait for one of them (`http.http1MaxPendingRequests`); beyond: 503 UO.
    pub limits: Option<(usize, usize)>,
    pub outlier: Option<Outlier>,
    /// `connectionPool.tcp.connectTimeout`.
    pub connect_timeout: Option<Duration>,
    /// `connectionPool.tcp.idleTimeout`: how long a relayed connection may go without a byte either way (`0s`:
    /// never closed for it, kept as a century).
    pub tcp_idle_timeout: Option<Duration>,
    /// What few rules set of their connections (lifetime, keepalive, HTTP/2 upgrade, retry budget); `None` when
    /// nothing.
    pub connections: Option<Box<ConnectionSettings>>,
    /// `connectionPool.http.maxRequestsPerConnection`: the requests one HTTP/1.1 upstream connection carries before
    /// it is closed (1: none is reused); unset or 0, no limit.
    pub max_requests_per_connection: Option<u32>,
    /// `connectionPool.http.idleTimeout`: how long an HTTP/1.1 upstream connection is kept for reuse without a
    /// request (`0s`: Istio's default, an hour).
    pub http_idle_timeout: Option<Duration>,
    /// `loadBalancer.consistentHash`: what picks the endpoint instead of the load balancer.
    pub hash: Option<HashKey>,
    /// `tls.mode` SIMPLE or MUTUAL: the proxy speaks TLS to the endpoints.
    pub tls: Option<Arc<TlsOrigination>>,
}

/// What few DestinationRules set of their connections: held apart (boxed) so that a policy without them, held per
/// rule and port, stays small.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnectionSettings {
    /// `connectionPool.tcp.maxConnectionDuration`: how long an upstream connection lives at most from its opening
    /// (a relayed one is then closed; an HTTP one is not used again).
    pub max_connection_duration: Option<Duration>,
    /// `connectionPool.tcp.tcpKeepalive`: keepalive probes on the upstream sockets (over the mesh config's).
    pub keepalive: Option<Keepalive>,
    /// `connectionPool.http.h2UpgradePolicy`: `UPGRADE` (true) sends requests to the endpoints as HTTP/2
    /// whatever the port declares (a WebSocket upgrade excepted), `DO_NOT_UPGRADE` (false) keeps HTTP/1.1 where
    /// the mesh config upgrades; unset, the mesh config's policy applies.
    pub h2_upgrade: Option<bool>,
    /// `connectionPool.http.maxRetries`: retries in flight at once to the cluster (Envoy's `max_retries` circuit
    /// breaker); beyond it, a try that would be retried is answered as it came. Unset or 0: no bound (Istio's).
    pub max_retries: Option<usize>,
}

/// TCP keepalive on upstream sockets, as Istio's `tcpKeepalive` (a DestinationRule's `connectionPool.tcp`, the
/// mesh config's): set, the kernel probes a quiet connection, so a peer or a middlebox that went away is found
/// and the connection ended; each field left unset is the kernel's default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Keepalive {
    /// Quiet time before the first probe (`time`).
    pub time: Option<Duration>,
    /// Between probes (`interval`).
    pub interval: Option<Duration>,
    /// Unanswered probes before the connection is dropped (`probes`).
    pub probes: Option<u32>,
}

impl Keepalive {
    /// A `tcpKeepalive` object (validated where it was read: durations and a count).
    pub fn read(value: &serde_json::Value) -> Keepalive {
        let duration = |field: &str| value.get(field)?.as_str().and_then(|text| parse_duration(text).ok());
        let probes = value.get("probes").and_then(serde_json::Value::as_u64).filter(|&n| n > 0);
        Keepalive {
            time: duration("time"),
            interval: duration("interval"),
            probes: probes.map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
        }
    }

    /// `over`'s fields where it sets them, else `under`'s, as Istio lays a DestinationRule's over the mesh's;
    /// `None` when neither asks for keepalive.
    pub fn layered(under: Option<Keepalive>, over: Option<Keepalive>) -> Option<Keepalive> {
        match (under, over) {
            (Some(under), Some(over)) => Some(Keepalive {
                time: over.time.or(under.time),
                interval: over.interval.or(under.interval),
                probes: over.probes.or(under.probes),
            }),
            (under, over) => over.or(under),
        }
    }
}

/// What upstream connections get where no DestinationRule says: the mesh config's `connectTimeout`,
/// `tcpKeepalive` and `h2UpgradePolicy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UpstreamDefaults {
    pub connect_timeout: Duration,
    pub keepalive: Option<Keepalive>,
    /// `h2UpgradePolicy: UPGRADE`: HTTP ports' requests go to the endpoints as HTTP/2.
    pub h2_upgrade: bool,
}

impl Default for UpstreamDefaults {
    /// Istio's: 10 s to connect, no keepalive, no upgrade.
    fn default() -> UpstreamDefaults {
        UpstreamDefaults { connect_timeout: Duration::from_secs(10), keepalive: None, h2_upgrade: false }
    }
}

/// How one upstream connection is opened: within how long, with which keepalive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Connect {
    pub within: Duration,
    pub keepalive: Option<Keepalive>,
}

impl UpstreamDefaults {
    /// For a connection through a cluster under `policy` (none: no cluster, as passthrough traffic has): the
    /// rule's settings, laid over these.
    pub fn connect(&self, policy: Option<&ClusterPolicy>) -> Connect {
        Connect {
            within: policy.and_then(|policy| policy.connect_timeout).unwrap_or(self.connect_timeout),
            keepalive: Keepalive::layered(self.keepalive, policy.and_then(ClusterPolicy::keepalive)),
        }
    }

    /// Whether requests through a cluster under `policy` go to the endpoints as HTTP/2 where the port does not
    /// declare it, as Istio decides: the rule's `UPGRADE` on any port, its `DO_NOT_UPGRADE` never, else the mesh's
    /// `UPGRADE` on ports declared HTTP (`http_port`).
    pub fn speaks_http2(&self, policy: Option<&ClusterPolicy>, http_port: bool) -> bool {
        policy.and_then(ClusterPolicy::h2_upgrade).unwrap_or(self.h2_upgrade && http_port)
    }
}

/// TLS from the proxy to a cluster's endpoints (a DestinationRule's `tls`, SIMPLE or MUTUAL), made ready at
/// compile time; settings that cannot be used (a missing file, `credentialName`) refuse the requests rather than
/// send them in the clear.
#[derive(Debug)]
pub enum TlsOrigination {
    Ready {
        config: Arc<rustls::ClientConfig>,
        /// `sni`, checked here; else the request's host.
        sni: Option<Arc<ServerName<'static>>>,
    },
    Unusable(String),
}

impl PartialEq for TlsOrigination {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}

impl Eq for TlsOrigination {}

impl Hash for TlsOrigination {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        std::ptr::hash(self, state)
    }
}

impl TlsOrigination {
    fn compile(tls: &ClientTls, http2: bool, credentials: &CredentialSource) -> Option<TlsOrigination> {
        let mode = tls.mode.as_deref().filter(|mode| matches!(*mode, "SIMPLE" | "MUTUAL"))?;
        let sni = tls.sni.clone().map(|sni| {
            ServerName::try_from(sni.clone()).map(Arc::new).map_err(|error| format!("sni {sni:?}: {error}"))
        });
        Some(match (client_config(tls, mode, http2, credentials), sni.transpose()) {
            (Ok(config), Ok(sni)) => TlsOrigination::Ready { config: Arc::new(config), sni },
            (Err(reason), _) | (_, Err(reason)) => TlsOrigination::Unusable(reason),
        })
    }
}

fn client_config(
    tls: &ClientTls,
    mode: &str,
    http2: bool,
    credentials: &CredentialSource,
) -> Result<rustls::ClientConfig, String> {
    use super::certificates::{certificates, optional_file, private_key, roots};
    use std::path::Path;
    if tls.insecure_skip_verify == Some(true) {
        return Err("insecureSkipVerify is not supported".into());
    }
    // The CAs to check the destination against and, for MUTUAL, the certificate to present: from the credential
    // (its ca.crt; tls.crt and tls.key) or from the files.
    let (ca, client) = match &tls.credential_name {
        Some(name) if mode == "MUTUAL" => {
            let credential = credentials.load(name)?;
            let ca = match credential.ca {
                Some(ca) => Some(ca),
                None => optional_file(tls.ca_certificates.as_deref())?,
            };
            (ca, Some((credential.chain, credential.key)))
        }
        Some(name) => (Some(credentials.ca(name)?), None),
        None if mode == "MUTUAL" => {
            let (Some(certificate), Some(key)) = (&tls.client_certificate, &tls.private_key) else {
                return Err("MUTUAL needs clientCertificate and privateKey (or credentialName)".into());
            };
            let client = (certificates(Path::new(certificate))?, private_key(Path::new(key))?);
            (optional_file(tls.ca_certificates.as_deref())?, Some(client))
        }
        None => (optional_file(tls.ca_certificates.as_deref())?, None),
    };
    let roots = match ca {
        Some(ca) => roots(ca, tls.ca_certificates.as_deref().or(tls.credential_name.as_deref()).unwrap_or("the CA"))?,
        None => {
            let mut roots = rustls::RootCertStore::empty();
            for certificate in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(certificate);
            }
            roots
        }
    };
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| error.to_string())?
        .with_root_certificates(roots);
    let mut config = match client {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).map_err(|error| error.to_string())?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![if http2 { b"h2".to_vec() } else { b"http/1.1".to_vec() }];
    Ok(config)
}

impl ClusterPolicy {
    /// `connectionPool.tcp.maxConnectionDuration`.
    pub fn max_connection_duration(&self) -> Option<Duration> {
        self.connections.as_ref()?.max_connection_duration
    }

    /// `connectionPool.tcp.tcpKeepalive` (the rule's alone; see `UpstreamDefaults::connect`).
    pub fn keepalive(&self) -> Option<Keepalive> {
        self.connections.as_ref()?.keepalive
    }

    /// `connectionPool.http.h2UpgradePolicy` (see `UpstreamDefaults::speaks_http2`).
    pub fn h2_upgrade(&self) -> Option<bool> {
        self.connections.as_ref()?.h2_upgrade
    }

    /// `connectionPool.http.maxRetries`.
    pub fn max_retries(&self) -> Option<usize> {
        self.connections.as_ref()?.max_retries
    }

    /// `policy` held for a cluster: the defaults are one allocation that every cluster without settings shares,
    /// other policies one per policy alike in `held` (DestinationRules are written from templates: a policy of
    /// its own was 200 bytes per rule and port).
    #[expect(
        clippy::mutable_key_type,
        reason = "a policy's TLS (rustls' session cache inside) is compared and hashed by address, which it never changes"
    )]
    pub fn shared(
        policy: ClusterPolicy,
        held: &mut std::collections::HashSet<Arc<ClusterPolicy>>,
    ) -> Arc<ClusterPolicy> {
        static DEFAULT: std::sync::LazyLock<Arc<ClusterPolicy>> = std::sync::LazyLock::new(Arc::default);
        if policy == ClusterPolicy::default() {
            DEFAULT.clone()
        } else {
            crate::policy::labels::interned(held, policy)
        }
    }

    /// `http2`: the port declares HTTP/2; `mesh_upgrade`: the mesh config upgrades the port's HTTP/1.1 (see
    /// `UpstreamDefaults::speaks_http2`).
    pub fn compile(
        settings: &PolicySettings,
        (http2, mesh_upgrade): (bool, bool),
        credentials: &CredentialSource,
    ) -> ClusterPolicy {
        let lb = match settings.load_balancer.as_ref().and_then(|lb| lb.simple.as_deref()) {
            Some("RANDOM") => LoadBalance::Random,
            Some("PASSTHROUGH") => LoadBalance::Passthrough,
            _ => LoadBalance::RoundRobin,
        };
        let pool = settings.connection_pool.as_ref();
        let number = |section: &str, field: &str| {
            pool.and_then(|p| p.get(section)?.get(field)?.as_u64()).and_then(|n| usize::try_from(n).ok())
        };
        let in_flight = if http2 { number("http", "http2MaxRequests") } else { number("tcp", "maxConnections") };
        let pending = number("http", "http1MaxPendingRequests");
        let limits = match (in_flight, pending) {
            (None, None) => None,
            (in_flight, pending) => Some((in_flight.unwrap_or(u32::MAX as usize).max(1), pending.unwrap_or(1024))),
        };
        let outlier = settings.outlier_detection.as_ref().map(|o| Outlier {
            consecutive_5xx: o.consecutive_5xx_errors.filter(|&n| n > 0),
            consecutive_gateway: o.consecutive_gateway_errors.filter(|&n| n > 0),
            base_ejection: o
                .base_ejection_time
                .as_deref()
                .and_then(|t| parse_duration(t).ok())
                .unwrap_or(Duration::from_secs(30)),
            max_ejection_percent: o.max_ejection_percent.map_or(10, |p| p.clamp(0, 100) as u32),
        });
        let outlier = outlier.map(|mut o| {
            // Istio's default when outlier detection is on and neither count is given.
            if o.consecutive_5xx.is_none() && o.consecutive_gateway.is_none() {
                o.consecutive_5xx = Some(5);
            }
            o
        });
        let connect_timeout = pool
            .and_then(|p| p.get("tcp")?.get("connectTimeout")?.as_str().map(str::to_owned))
            .and_then(|t| parse_duration(&t).ok());
        let tcp_idle_timeout = pool
            .and_then(|p| p.get("tcp")?.get("idleTimeout")?.as_str().map(str::to_owned))
            .and_then(|t| parse_duration(&t).ok())
            .map(|t| if t.is_zero() { Duration::from_secs(100 * 365 * 24 * 3600) } else { t });
        let max_connection_duration = pool
            .and_then(|p| p.get("tcp")?.get("maxConnectionDuration")?.as_str().map(str::to_owned))
            .and_then(|t| parse_duration(&t).ok())
            .filter(|t| !t.is_zero());
        let keepalive = pool.and_then(|p| p.get("tcp")?.get("tcpKeepalive")).map(Keepalive::read);
        let max_requests_per_connection =
            number("http", "maxRequestsPerConnection").filter(|&n| n > 0).map(|n| u32::try_from(n).unwrap_or(u32::MAX));
        let http_idle_timeout = pool
            .and_then(|p| p.get("http")?.get("idleTimeout")?.as_str().map(str::to_owned))
            .and_then(|t| parse_duration(&t).ok())
            .map(|t| if t.is_zero() { Duration::from_secs(3600) } else { t });
        let hash =
            settings.load_balancer.as_ref().and_then(|lb| lb.consistent_hash.as_ref()).and_then(HashKey::compile);
        let h2_upgrade = match pool.and_then(|p| p.get("http")?.get("h2UpgradePolicy")?.as_str()) {
            Some("UPGRADE") => Some(true),
            Some("DO_NOT_UPGRADE") => Some(false),
            _ => None,
        };
        // ALPN offers what is spoken: h2 where the port, the rule or the mesh makes it HTTP/2.
        let http2 = http2 || h2_upgrade.unwrap_or(mesh_upgrade);
        let connections = ConnectionSettings {
            max_connection_duration,
            keepalive,
            h2_upgrade,
            max_retries: number("http", "maxRetries").filter(|&n| n > 0),
        };
        let connections = (connections != ConnectionSettings::default()).then(|| Box::new(connections));
        let tls = settings.tls.as_ref().and_then(|tls| TlsOrigination::compile(tls, http2, credentials)).map(Arc::new);
        ClusterPolicy {
            lb,
            limits,
            outlier,
            connect_timeout,
            tcp_idle_timeout,
            connections,
            max_requests_per_connection,
            http_idle_timeout,
            hash,
            tls,
        }
    }
}

/// A traffic policy for one port: a port-level setting replaces the whole policy (Istio does not merge them).
pub fn settings_for_port(policy: &TrafficPolicy, port: u16) -> &PolicySettings {
    policy
        .port_level_settings
        .iter()
        .find(|p| p.port.as_ref().is_some_and(|selector| selector.number == u32::from(port)))
        .map_or(&policy.settings, |p| &p.settings)
}

/// One endpoint of a cluster.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub address: IpAddr,
    /// Port name → port on this endpoint.
    pub ports: BTreeMap<String, u16>,
    pub labels: BTreeMap<String, String>,
}

/// One endpoint as a cluster (of one port) holds it: where requests go, its labels and port names read
/// already (when the subsets were formed and the port chosen).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClusterEndpoint {
    pub address: IpAddr,
    /// The port it serves the cluster's port on (its own for the port's name, else the port's target).
    pub port: u16,
}

/// A cluster's endpoints: most clusters have one (a STATIC entry's address, a DNS name's answer) or none
/// (resolution NONE), held in place; several in a list of their own.
#[derive(Debug)]
pub enum ClusterEndpoints {
    One(ClusterEndpoint),
    Several(Box<[ClusterEndpoint]>),
}

impl From<Vec<ClusterEndpoint>> for ClusterEndpoints {
    fn from(endpoints: Vec<ClusterEndpoint>) -> Self {
        match <[ClusterEndpoint; 1]>::try_from(endpoints) {
            Ok([only]) => ClusterEndpoints::One(only),
            Err(several) => ClusterEndpoints::Several(several.into()),
        }
    }
}

impl std::ops::Deref for ClusterEndpoints {
    type Target = [ClusterEndpoint];

    fn deref(&self) -> &[ClusterEndpoint] {
        match self {
            ClusterEndpoints::One(only) => std::slice::from_ref(only),
            ClusterEndpoints::Several(endpoints) => endpoints,
        }
    }
}

/// A set of endpoints under one policy: a host's on one port, or one subset's. Its metrics' labels and Envoy
/// name (`outbound|PORT|SUBSET|HOST`) are its service's with its port and subset (`Service::labels`): the
/// service's host and namespace are not held again in each of its clusters. 64 bytes.
#[derive(Debug)]
pub struct Cluster {
    pub subset: Option<Arc<str>>,
    pub endpoints: ClusterEndpoints,
    /// Shared by every cluster without a DestinationRule's settings (most of them): see `ClusterPolicy::shared`.
    pub policy: Arc<ClusterPolicy>,
    /// What must outlive a recompile (limits' places, ejections, retries in flight): shared by every cluster
    /// that keeps none.
    pub state: Arc<ClusterState>,
    /// Round-robin cursor: the cluster's own, in room its other fields leave (a state of its own for it alone
    /// was 64 bytes per cluster of several endpoints). Starts over when the configuration is recompiled.
    next: AtomicU32,
    /// Which of its host's DestinationRules it is compiled under (0: none), as the registry numbers them: held
    /// here, in the same spare room, rather than beside each cluster in a word of its own.
    pub variant: u16,
    /// The service port it serves.
    pub port: u16,
}

impl Cluster {
    pub fn new(
        (port, subset): (u16, Option<Arc<str>>),
        endpoints: Vec<ClusterEndpoint>,
        policy: Arc<ClusterPolicy>,
        state: Arc<ClusterState>,
    ) -> Cluster {
        let endpoints = endpoints.into();
        Cluster { subset, endpoints, policy, state, next: AtomicU32::new(0), variant: 0, port }
    }

    /// Whether it is the cluster of `port` and `subset` (or of no subset).
    pub fn is_of(&self, port: u16, subset: Option<&str>) -> bool {
        self.port == port && self.subset.as_deref() == subset
    }

    /// An endpoint's address by the load balancer (or for a request's `hash`, the endpoint it hashes to),
    /// passing over ejected endpoints (unless more than the allowed share would be passed over); `None` without
    /// endpoints.
    pub fn pick(&self, hash: Option<u64>) -> Option<IpAddr> {
        match &*self.endpoints {
            [] => return None,
            // The pick whatever the load balancer or the ejections (one may always stay): no cursor, no lock.
            [only] => return Some(only.address),
            _ => {}
        }
        // Without outlier detection nothing is ever ejected: no lock, no look.
        let (ejected, allowed) = match &self.policy.outlier {
            Some(outlier) => (
                self.state.ejected(Instant::now()),
                // At least one endpoint may be ejected whatever the percentage, as Envoy allows.
                (self.endpoints.len() * outlier.max_ejection_percent as usize / 100).max(1),
            ),
            None => (Vec::new(), 0),
        };
        let skip = |address: &IpAddr| !ejected.is_empty() && ejected.len() <= allowed && ejected.contains(address);
        if let Some(hash) = hash {
            // Rendezvous hashing: the endpoint whose address scores highest with the key. An endpoint that goes
            // (or is ejected) moves only the keys it had; the others stay where they were.
            let score = |endpoint: &&ClusterEndpoint| fixed_hash((hash, endpoint.address));
            let healthy = self.endpoints.iter().filter(|endpoint| !skip(&endpoint.address)).max_by_key(score);
            return healthy.or_else(|| self.endpoints.iter().max_by_key(score)).map(|endpoint| endpoint.address);
        }
        let count = self.endpoints.len();
        let start = match self.policy.lb {
            LoadBalance::Random => fastrand::usize(..count),
            // Wraps at 2^32 requests: one uneven step in the rotation.
            _ => self.next.fetch_add(1, Ordering::Relaxed) as usize,
        };
        (0..count)
            .map(|i| &self.endpoints[(start + i) % count])
            .find(|endpoint| !skip(&endpoint.address))
            .or_else(|| self.endpoints.get(start % count))
            .map(|endpoint| endpoint.address)
    }

    /// The endpoint with `address`.
    pub fn endpoint(&self, address: IpAddr) -> Option<&ClusterEndpoint> {
        self.endpoints.iter().find(|e| e.address == address)
    }
}

/// The outcome of one try, for outlier detection.
#[derive(Clone, Copy, Debug)]
pub enum Outcome {
    Status(u16),
    /// Connect failure, reset or timeout: a gateway error.
    Failed,
}

/// What a cluster counts while requests go through it: 48 bytes, 64 with its reference counts (one is held per
/// cluster of every rule with limits, outlier detection or a retry budget).
#[derive(Debug)]
pub struct ClusterState {
    slots: Option<Arc<tokio::sync::Semaphore>>,
    waiting: AtomicU32,
    max_waiting: u32,
    /// Retries in flight (for `maxRetries`).
    retrying: AtomicU32,
    /// By endpoint, for outlier detection: a list (a cluster has a few endpoints), empty and unallocated in most
    /// clusters, which have none; grown by one when an endpoint first reports.
    health: Mutex<Box<[(IpAddr, Health)]>>,
}

#[derive(Debug, Default)]
struct Health {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
}

/// One retry in flight in a cluster's budget (`maxRetries`), given back when dropped.
#[derive(Debug)]
pub struct RetryPlace(Arc<ClusterState>);

impl Drop for RetryPlace {
    fn drop(&mut self) {
        self.0.retrying.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A place for one request in a cluster with limits.
pub enum Admission {
    /// Admitted (the permit is held until the request ends).
    Now(Option<tokio::sync::OwnedSemaphorePermit>),
    /// Over the in-flight limit, within the pending one: wait for a slot.
    Wait(Arc<tokio::sync::Semaphore>),
    /// Over both: 503 UO.
    Overflow,
}

impl ClusterState {
    pub(crate) fn new(limits: Option<(usize, usize)>) -> ClusterState {
        ClusterState {
            slots: limits.map(|(in_flight, _)| Arc::new(tokio::sync::Semaphore::new(in_flight))),
            waiting: AtomicU32::new(0),
            max_waiting: limits.map_or(0, |(_, pending)| u32::try_from(pending).unwrap_or(u32::MAX)),
            retrying: AtomicU32::new(0),
            health: Mutex::new(Box::default()),
        }
    }

    /// A place for one retry while fewer than `max` are in flight; `None` when the budget is spent. The place is
    /// held for the retry's try.
    pub fn retry(self: &Arc<Self>, max: usize) -> Option<RetryPlace> {
        let add = |retrying: u32| (usize::try_from(retrying).is_ok_and(|n| n < max)).then_some(retrying + 1);
        self.retrying.fetch_update(Ordering::AcqRel, Ordering::Acquire, add).ok()?;
        Some(RetryPlace(self.clone()))
    }

    pub fn admit(&self) -> Admission {
        let Some(slots) = &self.slots else { return Admission::Now(None) };
        if let Ok(permit) = slots.clone().try_acquire_owned() {
            return Admission::Now(Some(permit));
        }
        if self.waiting.load(Ordering::Relaxed) < self.max_waiting {
            Admission::Wait(slots.clone())
        } else {
            Admission::Overflow
        }
    }

    /// Counts a request waiting for a slot while `f` runs.
    pub async fn waiting<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let result = f.await;
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        result
    }

    fn ejected(&self, now: Instant) -> Vec<IpAddr> {
        let health = self.health.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        health.iter().filter(|(_, h)| h.ejected_until.is_some_and(|until| until > now)).map(|(a, _)| *a).collect()
    }

    /// Records a try's outcome at `address`; enough consecutive errors eject it, for the base ejection time
    /// times the number of its ejections.
    pub fn report(&self, address: IpAddr, outcome: Outcome, outlier: &Outlier) {
        let mut all = self.health.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let index = all.iter().position(|(known, _)| *known == address).unwrap_or_else(|| {
            let mut grown = std::mem::take(&mut *all).into_vec();
            grown.push((address, Health::default()));
            *all = grown.into_boxed_slice();
            all.len() - 1
        });
        let Some((_, health)) = all.get_mut(index) else { return };
        let (server_error, gateway_error) = match outcome {
            Outcome::Status(status) => ((500..600).contains(&status), matches!(status, 502..=504)),
            Outcome::Failed => (true, true),
        };
        health.consecutive_5xx = if server_error { health.consecutive_5xx + 1 } else { 0 };
        health.consecutive_gateway = if gateway_error { health.consecutive_gateway + 1 } else { 0 };
        let tripped = outlier.consecutive_5xx.is_some_and(|n| health.consecutive_5xx >= n)
            || outlier.consecutive_gateway.is_some_and(|n| health.consecutive_gateway >= n);
        if tripped {
            health.ejections += 1;
            let ejection = outlier.base_ejection.checked_mul(health.ejections.min(10)).unwrap_or(Duration::MAX);
            // An ejection too long to represent lasts as long as one can.
            health.ejected_until =
                Instant::now().checked_add(ejection).or(Some(Instant::now() + Duration::from_secs(86_400 * 365)));
            health.consecutive_5xx = 0;
            health.consecutive_gateway = 0;
            tracing::info!(endpoint = %address, ejections = health.ejections, "endpoint ejected (outlier detection)");
        }
    }
}

/// Every cluster's state, by cluster; a compile takes the state a cluster had. Keyed by a 64-bit hash of the
/// cluster's name and limits rather than the name itself: a name held per cluster with state (every subset
/// of a rule with limits) cost more than the state. Two of a configuration's clusters would share state only
/// on a hash collision (for 100k clusters, a chance of about 1 in 3.7 billion).
#[derive(Debug, Default)]
pub struct ClusterStates {
    states: Mutex<HashMap<u64, Arc<ClusterState>>>,
}

/// A `Hasher` written to as text: a name's hash without the name written out.
struct HashWriter<H>(H);

impl<H: std::hash::Hasher> std::fmt::Write for HashWriter<H> {
    fn write_str(&mut self, text: &str) -> std::fmt::Result {
        self.0.write(text.as_bytes());
        Ok(())
    }
}

impl ClusterStates {
    /// State for a cluster that keeps none: no limits, outlier detection or retry budget (its round-robin cursor
    /// is its own). One, shared.
    pub fn none(&self) -> Arc<ClusterState> {
        static NONE: std::sync::LazyLock<Arc<ClusterState>> =
            std::sync::LazyLock::new(|| Arc::new(ClusterState::new(None)));
        NONE.clone()
    }

    /// The state of the cluster named `name` with `limits` (new limits make new state); states no compiled
    /// cluster holds any more are dropped.
    pub fn get(&self, name: impl std::fmt::Display, limits: Option<(usize, usize)>) -> Arc<ClusterState> {
        let mut hasher = HashWriter(foldhash::fast::FixedState::with_seed(HASH_SEED).build_hasher());
        // Writing to a hasher cannot fail.
        let _ = std::fmt::Write::write_fmt(&mut hasher, format_args!("{name}"));
        limits.hash(&mut hasher.0);
        let key = std::hash::Hasher::finish(&hasher.0);
        let mut states = self.states.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if states.len() > 1024 {
            states.retain(|_, state| Arc::strong_count(state) > 1);
        }
        states.entry(key).or_insert_with(|| Arc::new(ClusterState::new(limits))).clone()
    }
}

/// The endpoints of `endpoints` whose labels include every one of `labels`.
pub fn with_labels(endpoints: &[Endpoint], labels: &BTreeMap<String, String>) -> Vec<Endpoint> {
    endpoints.iter().filter(|e| labels.iter().all(|(k, v)| e.labels.get(k) == Some(v))).cloned().collect()
}

#[cfg(test)]
mod tests;
