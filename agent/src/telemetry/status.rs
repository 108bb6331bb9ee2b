//! `/status` and `/routes` on the admin port, which `sluice status` and `sluice routes` print: what the running agent enforces now — readiness,
//! the classifier and the interfaces it is on, the policy's size, the proxy's listeners, rejected resources and
//! DNS answers — gathered when asked for.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
};

use serde_json::{json, Value};
use tokio::sync::watch;

use super::{config_dump::Dump, server::Readiness};
use crate::{
    config::{resolver::Answer, resolver::Answers, workloads::KnownWorkloads},
    datapath::Datapath,
    policy::routes::ProxyPolicy,
    proxy::{
        l4::Arrival,
        routing::{
            explain::{explain, explain_connection, ConnectionQuestion, Question},
            Listener,
        },
    },
};

/// What the admin endpoint reads of the running agent, when asked.
#[derive(Clone)]
pub struct AgentState {
    pub dump: watch::Receiver<Arc<Dump>>,
    pub readiness: watch::Receiver<Readiness>,
    pub datapath: Arc<Mutex<Datapath>>,
    pub forward_proxy_port: Option<u16>,
    /// The proxy's policy in force and the workloads it knows, for `/routes`.
    pub routes: Arc<arc_swap::ArcSwap<ProxyPolicy>>,
    pub workloads: Arc<KnownWorkloads>,
    /// What the last DNS lookups said of each name: the TTLs left, or why a name keeps its previous addresses.
    pub dns_answers: Arc<arc_swap::ArcSwap<Answers>>,
    /// The flows decided, for `/observe`.
    pub flows: super::flows::FlowStream,
}

impl AgentState {
    pub fn render(&self) -> String {
        let readiness = self.readiness.borrow().clone();
        let (program_id, attached, link_programs) = {
            let datapath = self.datapath.lock().unwrap_or_else(PoisonError::into_inner);
            let attached = datapath.attached().map(str::to_owned).collect::<Vec<_>>();
            (datapath.program_id(), attached, datapath.link_programs())
        };
        let mut status = self.dump.borrow().summary();
        let unenforced: Vec<Value> =
            readiness.unenforced.iter().map(|(name, why)| json!({"interface": name, "why": why})).collect();
        status["ready"] = json!(readiness.not_ready_because().is_none());
        status["notReadyBecause"] = json!(readiness.not_ready_because());
        // Each link's program, which is `programId` unless another agent's classifier runs there.
        status["datapath"] = json!({"programId": program_id, "attached": attached, "linkPrograms": link_programs,
                                    "unenforced": unenforced});
        status["forwardProxyPort"] = json!(self.forward_proxy_port);
        let now = std::time::SystemTime::now();
        let answers: serde_json::Map<String, Value> = self
            .dns_answers
            .load()
            .iter()
            .map(|(name, answer)| {
                let answer = match answer {
                    Answer::Valid { until } => {
                        json!({"ttlSeconds": until.duration_since(now).unwrap_or_default().as_secs()})
                    }
                    Answer::Failed { error } => json!({"error": error}),
                };
                (name.clone(), answer)
            })
            .collect();
        status["dnsAnswers"] = Value::Object(answers);
        serde_json::to_string_pretty(&status).unwrap_or_else(|_| "{}".into())
    }

    /// `/routes?host=H[:P]&path=/p&address=IP:PORT&gateway=PORT&source=IP&protocol=http|tls|tcp`: what such a
    /// request (or TLS or TCP connection) would get now.
    pub fn route(&self, query: &str) -> Result<String, String> {
        let fields: std::collections::HashMap<String, String> =
            form_urlencoded::parse(query.as_bytes()).into_owned().collect();
        let protocol = fields.get("protocol").map_or("http", String::as_str);
        let tls = match protocol {
            "http" => false,
            "tls" => true,
            "tcp" => false,
            other => return Err(format!("protocol: {other:?} is not http, tls or tcp")),
        };
        let authority = fields.get("host").cloned().unwrap_or_default();
        if authority.is_empty() && protocol != "tcp" {
            return Err("host is required".into());
        }
        let path = fields.get("path").cloned().unwrap_or_else(|| "/".into());
        let listener = match fields.get("gateway") {
            Some(port) => Listener::Gateway(port.parse().map_err(|_| format!("gateway: {port:?} is not a port"))?),
            None => Listener::Mesh,
        };
        let (host, named_port) = match authority
            .rsplit_once(':')
            .filter(|(host, _)| !host.contains(':') || host.ends_with(']'))
            .and_then(|(host, port)| Some((host, port.parse::<u16>().ok()?)))
        {
            Some((host, port)) => (host.to_owned(), Some(port)),
            None => (authority.clone(), None),
        };
        let port = match listener {
            Listener::Gateway(port) => port,
            _ => named_port.unwrap_or(if tls { 443 } else { 80 }),
        };
        let address = match fields.get("address") {
            Some(address) => address
                .parse::<SocketAddr>()
                .or_else(|_| address.parse::<std::net::IpAddr>().map(|ip| SocketAddr::new(ip, port)))
                .map_err(|_| format!("address: {address:?} is not an IP address"))?,
            None => SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), port),
        };
        let source_ip = match fields.get("source") {
            Some(ip) => {
                Some(ip.parse::<std::net::IpAddr>().map_err(|_| format!("source: {ip:?} is not an IP address"))?)
            }
            None => None,
        };
        let workloads = self.workloads.load();
        let source = source_ip.and_then(|ip| workloads.get(ip)).map(|workload| &**workload);
        let policy = self.routes.load();
        let mut answer = if protocol == "http" {
            explain(&policy, &Question { authority, path, listener, address }, source)
        } else {
            if !tls && listener == Listener::Mesh && !fields.contains_key("address") {
                return Err("address is required for tcp: an intercepted TCP connection is decided by where it was \
                            sent"
                    .into());
            }
            let arrival = match listener {
                Listener::Gateway(port) => Arrival::Gateway(port),
                _ => Arrival::Intercepted,
            };
            let server_name = (tls && !host.is_empty()).then_some(host);
            explain_connection(&policy, &ConnectionQuestion { server_name, tls, address, arrival }, source)
        };
        answer["source"] = json!(source.map(|workload| format!("{}/{}", workload.namespace, workload.name)));
        Ok(serde_json::to_string_pretty(&answer).unwrap_or_else(|_| "{}".into()))
    }
}

/// The status as `sluice status` prints it: one line a subject, in the spirit of `cilium status`.
pub fn text(status: &Value, admin: std::net::SocketAddr) -> String {
    let list = |value: &Value| -> String {
        let items: Vec<String> = value
            .as_array()
            .into_iter()
            .flatten()
            .map(|item| item.as_str().map_or_else(|| item.to_string(), str::to_owned))
            .collect();
        if items.is_empty() {
            "none".into()
        } else {
            items.join(", ")
        }
    };
    let mut lines = vec![format!("Sluice agent at {admin}")];
    let ready = match status["notReadyBecause"].as_str() {
        None => "yes".to_owned(),
        Some(why) => format!("no: {why}"),
    };
    lines.push(format!("Ready:            {ready}"));
    lines.push(format!(
        "Mode:             {} (blackholed traffic: {}), policy generation {}",
        status["mode"].as_str().unwrap_or("?"),
        status["blackhole"].as_str().unwrap_or("?"),
        status["generation"]
    ));
    let datapath = &status["datapath"];
    let program = datapath["programId"].as_u64().map_or_else(|| "not loaded".to_owned(), |id| format!("program {id}"));
    lines.push(format!("Datapath:         {program} on {}", list(&datapath["attached"])));
    for unenforced in datapath["unenforced"].as_array().into_iter().flatten() {
        lines.push(format!(
            "  NOT ENFORCED:   {} ({})",
            unenforced["interface"].as_str().unwrap_or("?"),
            unenforced["why"].as_str().unwrap_or("?")
        ));
    }
    lines.push(format!(
        "L4 policy:        {} rules, {} always-allowed ranges, {} kernel denials",
        status["l4Rules"], status["allowCidrs"], status["kernelDenials"]
    ));
    let transparent = match status["proxyPort"].as_u64() {
        Some(port) => format!("transparent :{port} for ports {}", list(&status["interceptPorts"])),
        None => "interception off".to_owned(),
    };
    let forward =
        status["forwardProxyPort"].as_u64().map_or_else(String::new, |port| format!("; forward proxy :{port}"));
    lines.push(format!("Proxy:            {transparent}; Gateway ports {}{forward}", list(&status["gatewayPorts"])));
    let kinds: Vec<String> =
        status["resources"].as_object().into_iter().flatten().map(|(kind, count)| format!("{kind} {count}")).collect();
    lines.push(format!("Resources:        {}", if kinds.is_empty() { "none".to_owned() } else { kinds.join(", ") }));
    let rejected = status["rejected"].as_array().cloned().unwrap_or_default();
    lines.push(format!("Rejected:         {}", rejected.len()));
    lines.extend(rejected.iter().map(|error| format!("  {}", error.as_str().unwrap_or("?"))));
    // Every name looked up, with its addresses in force: a name whose every lookup failed has none.
    let mut dns = status["dns"].as_object().cloned().unwrap_or_default();
    for name in status["dnsAnswers"].as_object().into_iter().flat_map(|answers| answers.keys()) {
        dns.entry(name.clone()).or_insert(Value::Array(Vec::new()));
    }
    lines.push(format!("DNS names:        {}", dns.len()));
    lines.extend(dns.iter().map(|(name, addresses)| {
        let answer = &status["dnsAnswers"][name];
        let state = match (answer["ttlSeconds"].as_u64(), answer["error"].as_str()) {
            (Some(ttl), _) => format!(" (TTL {ttl}s left)"),
            (None, Some(error)) => format!(" (last lookup failed: {error}; addresses kept)"),
            (None, None) => String::new(),
        };
        format!("  {name} -> {}{state}", list(addresses))
    }));
    lines.join("\n") + "\n"
}
