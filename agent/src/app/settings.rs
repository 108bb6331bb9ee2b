//! The flags of `sluice run`: what the node tells the agent (interfaces, ports, modes, limits).

use std::{net::SocketAddr, path::PathBuf};

use ipnet::IpNet;

use crate::{
    datapath::{self, InterfaceSpec},
    policy::{self, routes::HostVerify, BlackholeAction, L4Rule, OutboundMode},
    proxy,
    telemetry::requests::AccessLogFormat,
};

#[derive(clap::Args)]
#[command(after_long_help = RUN_HELP)]
pub struct RunSettings {
    /// Interface whose incoming traffic is egress to police (pod veths, a tunnel device, or the NIC that
    /// routed traffic arrives on), a pattern of names (`'vxlan*'`, `'veth?'`), or `default-route` (the interfaces
    /// the main table's default routes leave through, followed as they change). Repeatable. Interfaces are
    /// followed as they come and go: one that appears (or is re-created) gets the classifier within a second. A
    /// name given here must exist at start (see --wait-for-interfaces); a pattern may select nothing yet.
    #[arg(long = "intercept", value_name = "IFACE", required = true)]
    pub intercept: Vec<InterfaceSpec>,
    /// Start although an interface --intercept names exactly does not exist yet (readiness is 503 until it
    /// appears); otherwise a missing one stops the agent at start.
    #[arg(long)]
    pub wait_for_interfaces: bool,
    /// Istio configuration: YAML (multi-document) or JSON files, or directories of them. Repeatable.
    #[arg(long = "config", value_name = "PATH")]
    pub config: Vec<PathBuf>,
    /// Start although a --config path does not exist, holds nothing Sluice reads, or has every resource
    /// rejected (otherwise each stops the agent at start: an operator's typo must not enforce nothing).
    #[arg(long)]
    pub allow_empty_config: bool,
    /// What happens to traffic no rule allows: passes (ALLOW_ANY) or is blackholed in the kernel
    /// (REGISTRY_ONLY). Overrides the mesh config's outboundTrafficPolicy.mode; Istio's default is ALLOW_ANY.
    #[arg(long, value_enum, value_name = "MODE")]
    pub outbound_traffic_policy: Option<OutboundMode>,
    /// What the kernel does with blackholed packets: drop them (clients time out) or reject them (TCP RST,
    /// ICMP administratively prohibited: clients fail at once).
    #[arg(long, value_enum, default_value = "drop")]
    pub blackhole: BlackholeAction,
    /// A destination allowed at L4: ADDR[/LEN]:PORT/PROTO, e.g. 203.0.113.10:443/tcp or [2001:db8::/64]:53/udp.
    /// Repeatable.
    #[arg(long = "allow", value_name = "ADDR[/LEN]:PORT/PROTO")]
    pub allow: Vec<L4Rule>,
    /// A range always allowed, any protocol and port (cluster pod and service ranges, DNS servers). Repeatable.
    #[arg(long = "allow-cidr", value_name = "CIDR", value_parser = parse_cidr)]
    pub allow_cidr: Vec<IpNet>,
    /// A TCP port whose traffic, to any destination not allowed above, is handed to the proxy, besides those the
    /// configuration names: ServiceEntry ports with protocol HTTP, HTTP2, GRPC or GRPC-WEB (decided by Host),
    /// HTTPS or TLS and the mesh's `tls` routes' ports (decided by the ClientHello's server name), and TCP ports
    /// that need a route. Repeatable.
    #[arg(long = "intercept-port", value_name = "PORT")]
    pub intercept_port: Vec<u16>,
    /// The transparent proxy's listener port; 0 turns interception off (every port is then decided by address in
    /// the kernel, and HTTP and TLS ports are not enforced by name).
    #[arg(long, value_name = "PORT", default_value_t = proxy::transparent_listener::DEFAULT_PORT)]
    pub proxy_port: u16,
    /// Where Prometheus scrapes `/stats/prometheus`.
    #[arg(long, value_name = "ADDR:PORT", default_value = "0.0.0.0:15090")]
    pub metrics_addr: SocketAddr,
    /// Also read the Istio configuration from Kubernetes (in-cluster config, or KUBECONFIG): watchers on
    /// ServiceEntry, VirtualService, Gateway, DestinationRule, Sidecar and the `istio` mesh ConfigMap.
    #[arg(long)]
    pub kube: bool,
    /// With --kube: how long the API server may take to answer at start before the agent stops, saying so.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = crate::config::fields::parse_duration)]
    pub kube_connect_timeout: std::time::Duration,
    /// With --kube: only this namespace's Istio resources (all namespaces by default).
    #[arg(long, value_name = "NAMESPACE")]
    pub namespace: Option<String>,
    /// With --kube: the namespace of the `istio` ConfigMap.
    #[arg(long, value_name = "NAMESPACE", default_value = "istio-system")]
    pub mesh_namespace: String,
    /// This agent's labels, for Gateway selectors (`k=v,k=v`; in a cluster, the pod's labels).
    #[arg(long, value_name = "K=V,...", value_parser = parse_labels, default_value = "istio=egressgateway")]
    pub gateway_labels: std::collections::BTreeMap<String, String>,
    /// DNS server for ServiceEntries resolved by DNS (port 53). Repeatable; the system's resolvers by default.
    #[arg(long = "dns-server", value_name = "IP")]
    pub dns_server: Vec<std::net::IpAddr>,
    /// Where `/healthz/ready` answers: 200 once the datapath is attached and, with --kube, Kubernetes is synced.
    #[arg(long, value_name = "ADDR:PORT", default_value = "0.0.0.0:15021")]
    pub readiness_addr: SocketAddr,
    /// Where the admin endpoints (`/config_dump`, `/ready`) listen; keep it on loopback.
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    /// Directory on a bpf filesystem where the maps, program and links are pinned.
    #[arg(long, value_name = "DIR", default_value = datapath::DEFAULT_PIN_DIR)]
    pub bpffs: PathBuf,
    /// On exit, remove everything from the kernel (by default the last policy stays enforced: fail closed).
    #[arg(long)]
    pub cleanup_on_exit: bool,
    /// This gateway's own Service (its FQDN), as the workloads' mesh routes name it: a route to it continues in
    /// the gateway context in process (two-hop egress on one node). Repeatable.
    #[arg(
        long = "gateway-service",
        value_name = "HOST",
        default_value = "istio-egressgateway.istio-system.svc.cluster.local"
    )]
    pub gateway_service: Vec<String>,
    /// The namespace this gateway runs in (in a cluster, its pod's): on its Gateway ports it sees what is
    /// exported there (ServiceEntries, VirtualServices, DestinationRules), as an Istio gateway does. Unset: all.
    #[arg(long, value_name = "NAMESPACE", env = "POD_NAMESPACE")]
    pub gateway_namespace: Option<String>,
    /// Where the `credentialName`s of Gateway servers are read from outside Kubernetes: a directory holding one
    /// directory per name with the files a Secret's keys would be (`tls.crt`, `tls.key`, `ca.crt`). Re-read
    /// whenever the configuration is.
    #[arg(long, value_name = "DIR")]
    pub credentials_dir: Option<std::path::PathBuf>,
    /// The mesh's workload certificate for `ISTIO_MUTUAL` Gateway servers, as Istio mounts it for file-based
    /// gateways: `cert-chain.pem`, `key.pem`, `root-cert.pem`. Re-read whenever the configuration is.
    #[arg(long, value_name = "DIR", default_value = "/etc/certs")]
    pub istio_certs_dir: std::path::PathBuf,
    /// What becomes of an intercepted HTTP request whose Host is registered at other addresses than the one the
    /// client connected to (domain fronting): refused (421), routed to the host's own addresses, or trusted.
    #[arg(long, value_enum, default_value = "strict")]
    pub host_verify: HostVerify,
    /// Worker threads for the proxy and the agent's tasks (Envoy's --concurrency): by default the CPUs the
    /// agent may run on (its affinity and cgroup CPU limit). With one, the agent's tasks and the proxy share one
    /// thread (a policy being written to the kernel holds requests back while it is written).
    #[arg(long, value_name = "N")]
    pub concurrency: Option<usize>,
    /// A port for clients that name the proxy in HTTP_PROXY / HTTPS_PROXY: absolute-form HTTP requests are routed
    /// as intercepted ones, and `CONNECT host:port` tunnels are admitted by the same registry (e.g. 3128).
    #[arg(long, value_name = "PORT")]
    pub forward_proxy_port: Option<u16>,
    /// The address the proxy's upstream connections leave from (one per IP family; the node's fixed egress IP,
    /// as firewalls outside the cluster expect). Repeatable.
    #[arg(long = "upstream-source-address", value_name = "IP")]
    pub upstream_source_address: Vec<std::net::IpAddr>,
    /// An HTTP/1.1 upgrade the proxy forwards (Envoy's upgrade_configs; Istio's gateways configure websocket).
    /// A request asking for another gets 403, except h2c, which is dropped (the request is served as HTTP/1.1)
    /// as Envoy does. Repeatable; giving it replaces the default.
    #[arg(long = "allow-upgrade", value_name = "PROTOCOL", default_value = "websocket")]
    pub allow_upgrade: Vec<String>,
    /// A range the proxy may connect to although it is the gateway node's own (loopback, link-local such as a
    /// metadata service at 169.254.169.254, the node's addresses), which it otherwise refuses in every context:
    /// 403 for HTTP, a reset for TCP. Repeatable.
    #[arg(long = "allow-local-destination", value_name = "CIDR", value_parser = parse_cidr)]
    pub allow_local_destination: Vec<IpNet>,
    /// Client connections the proxy holds open at once (intercepted and on Gateway ports); more are reset.
    #[arg(long, value_name = "N", default_value_t = 16384)]
    pub max_connections: usize,
    /// How long a client may take to send a request's headers before its connection is closed.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = crate::config::fields::parse_duration)]
    pub request_headers_timeout: std::time::Duration,
    /// How long a request's body, a CONNECT tunnel or an upgraded (WebSocket) connection may go without a byte
    /// either way before it is closed (Envoy's stream_idle_timeout).
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = crate::config::fields::parse_duration)]
    pub stream_idle_timeout: std::time::Duration,
    /// The resident memory past which the proxy sheds new work — requests answered 503 (flag OM), new relayed
    /// connections and TLS handshakes reset — until it is below 95% of it again (Envoy's overload manager). A
    /// size (`512Mi`, `2Gi`, bytes); `0` turns it off. By default 90% of the agent's cgroup memory limit (the
    /// pod's), if it has one.
    #[arg(long, value_name = "SIZE", value_parser = proxy::overload::parse_size)]
    pub max_memory: Option<u64>,
    /// After SIGTERM (or once a successor agent is ready to take over), how long the proxy's listeners go on accepting while
    /// `/healthz/ready` answers 503, HTTP/1.1 responses carry `Connection: close` and HTTP/2 clients are sent
    /// GOAWAY, so that load balancers and clients move on before the listeners close (Istio's
    /// terminationDrainDuration).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = crate::config::fields::parse_duration)]
    pub drain_delay: std::time::Duration,
    /// Once the listeners are closed, how long connections with a request or a relay in flight have to finish
    /// before the agent exits (the pod's terminationGracePeriodSeconds must cover both).
    #[arg(long, value_name = "DURATION", default_value = "20s", value_parser = crate::config::fields::parse_duration)]
    pub drain_timeout: std::time::Duration,
    /// How long a client connection may stay open with no request in progress, and an opaque TCP relay without a
    /// byte (Envoy's idle_timeout).
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = crate::config::fields::parse_duration)]
    pub idle_timeout: std::time::Duration,
    /// How the bytes of decided TLS and TCP connections and CONNECT tunnels are relayed: spliced through a pipe in
    /// the kernel (splice(2)), copied by the proxy, or handed from socket to socket by an eBPF stream verdict
    /// (kernel; falls back to splice where the kernel cannot load it).
    #[arg(long, value_enum, default_value = "splice")]
    pub relay_engine: crate::proxy::relay::Engine,
    /// What speaks HTTP/1.1 to upstreams: Sluice's own connection code, each exchange driven in its request's
    /// task, or hyper's client (a task per connection, channels per request), kept for comparison. Upgrades
    /// (WebSocket) always take hyper's, HTTP/2 is hyper's either way.
    #[arg(long, value_enum, default_value = "native")]
    pub upstream_http1: crate::proxy::upstreams::Http1Client,
    /// How many destinations passed through unregistered (ALLOW_ANY: a Host, or an address and port) get Istio
    /// metric series of their own; requests to others are counted under PassthroughCluster alone, so that clients
    /// sending random Hosts cannot grow the metrics without bound.
    #[arg(long, value_name = "N", default_value_t = crate::telemetry::passthrough::DEFAULT_PASSTHROUGH_LIMIT)]
    pub max_passthrough_series: usize,
    /// The access log, overriding the mesh config's `accessLogEncoding`/`accessLogFormat`: Envoy's default text
    /// line or one JSON object per request (to the mesh config's `accessLogFile`, else standard output), or none.
    /// Unset: as the mesh config says (Istio's default: none).
    #[arg(long, value_enum)]
    pub access_log_format: Option<AccessLogFormat>,
}

const RUN_HELP: &str = "\
Running on a real node:
  Sluice runs as root (CAP_BPF and CAP_NET_ADMIN) on each gateway node, usually as a DaemonSet with
  hostNetwork. Name every interface that egress traffic enters the node on with --intercept; the classifier
  is attached to its TC ingress hook (TCX, ahead of a CNI's own programs, which still run for the traffic
  Sluice passes). In REGISTRY_ONLY, list traffic to the node itself and to in-cluster ranges with --allow-cidr.

  sluice run --intercept eth1 --outbound-traffic-policy REGISTRY_ONLY \\
      --allow-cidr 10.0.0.0/8 --allow 203.0.113.10:443/tcp --config /etc/sluice/istio/

  The ports the configuration declares HTTP, HTTPS, TLS or routed TCP go to the proxy by themselves
  (--intercept-port adds others). A --config path that does not exist, holds nothing or has every
  resource rejected, or an --intercept interface that does not exist, stops the agent at start.

  The maps, program and links are pinned under --bpffs: when the agent stops or dies, the kernel keeps
  enforcing the last policy, and the next agent adopts the pins without a gap. `sluice cleanup` (or
  --cleanup-on-exit) removes them, and the policy routing for intercepted traffic with them.";

fn parse_labels(text: &str) -> Result<std::collections::BTreeMap<String, String>, String> {
    text.split(',')
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
            _ => Err(format!("'{pair}' is not a label (expected key=value)")),
        })
        .collect()
}

fn parse_cidr(text: &str) -> Result<IpNet, String> {
    policy::l4::parse_net(text).ok_or_else(|| format!("'{text}' is not an IP address or CIDR"))
}
