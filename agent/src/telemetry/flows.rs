//! Flow decisions as they happen, for `sluice observe` (in the spirit of `hubble observe`): the flows the kernel
//! blocked, the requests the proxy answered or forwarded, the connections it relayed or refused. Nothing is built
//! while nobody watches; a watcher that reads too slowly loses flows (and is told how many), never holds memory.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::SystemTime,
};

use serde::Serialize;
use tokio::sync::broadcast;

use super::{connections::ConnectionRecord, requests::RequestRecord, response_flags::ResponseFlag};
use crate::config::workloads::KnownWorkloads;

/// Flows held for watchers that have not read them yet; a watcher further behind loses the oldest.
const BACKLOG: usize = 4096;
/// Watchers at once: each holds a connection to the admin endpoint.
pub const MAX_WATCHERS: usize = 8;

/// What became of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Sent on to its destination (or to the upstream a route chose).
    Forwarded,
    /// Answered or closed by the proxy itself: unregistered (502, BlackHoleCluster), no route, a redirect, a fault,
    /// an upstream that could not be reached.
    Refused,
    /// Denied by an AuthorizationPolicy, in the kernel or the proxy.
    Denied,
    /// Dropped or rejected in the kernel: neither registered nor handed to the proxy, in REGISTRY_ONLY.
    Blackholed,
}

impl Verdict {
    pub fn parse(text: &str) -> Option<Verdict> {
        [Verdict::Forwarded, Verdict::Refused, Verdict::Denied, Verdict::Blackholed]
            .into_iter()
            .find(|verdict| verdict.as_str().eq_ignore_ascii_case(text))
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Forwarded => "forwarded",
            Verdict::Refused => "refused",
            Verdict::Denied => "denied",
            Verdict::Blackholed => "blackholed",
        }
    }
}

/// One flow decision, as `sluice observe -o json` prints it.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Flow {
    /// RFC 3339, milliseconds.
    pub time: String,
    pub verdict: Verdict,
    /// Who decided: `kernel` or `proxy`.
    pub by: &'static str,
    /// `tcp`, `udp`, … for the kernel; `http/1.1`, `http/2`, `tls`, `tcp` for the proxy.
    pub protocol: &'static str,
    pub source: Option<SocketAddr>,
    /// The source workload (`namespace/name`), when the pod watcher or the request's telemetry knows it.
    pub source_workload: Option<String>,
    /// Where the client sent it (the original destination; on a Gateway port, the listener).
    pub destination: Option<SocketAddr>,
    /// The request's Host, or the ClientHello's server name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_code: Option<u16>,
    /// Envoy's response flag (`-` for none), for the proxy's flows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_flags: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<SocketAddr>,
    /// The AuthorizationPolicy that denied it, or Envoy's response code details.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Flow {
    /// A request the proxy ended.
    pub fn request(record: &RequestRecord) -> Flow {
        let details = record.response_code_details.as_deref();
        let verdict = if details.is_some_and(|details| details.starts_with("rbac_access_denied")) {
            Verdict::Denied
        } else if record.upstream_host.is_some() && !record.response_flags.connect_failed() {
            Verdict::Forwarded
        } else {
            Verdict::Refused
        };
        let workload = match (&record.source_workload_namespace, &record.source_workload) {
            (Some(namespace), Some(name)) => Some(format!("{}/{}", namespace.as_str(), name.as_str())),
            _ => None,
        };
        Flow {
            time: super::requests::rfc3339_millis(record.start.unwrap_or_else(SystemTime::now)),
            verdict,
            by: "proxy",
            protocol: record.protocol,
            source: record.downstream_remote,
            source_workload: workload,
            destination: record.downstream_local,
            host: Some(record.authority().to_owned()).filter(|host| !host.is_empty()),
            // Empty when the request began before anyone watched: its details were not kept.
            method: Some(record.method().to_owned()).filter(|method| !method.is_empty()),
            path: Some(record.path().to_owned()).filter(|path| !path.is_empty()),
            response_code: Some(record.response_code),
            response_flags: Some(record.response_flags.text()),
            cluster: Some(record.upstream_cluster()),
            upstream: record.upstream_host,
            reason: details.map(str::to_owned),
        }
    }

    /// A TLS or TCP connection the proxy relayed or refused, once it has ended.
    pub fn connection(record: &ConnectionRecord<'_>) -> Flow {
        let verdict = match (record.upstream, record.refused_because) {
            (_, Some(reason)) if reason.starts_with("rbac_access_denied") => Verdict::Denied,
            // An upstream is named too when it could not be reached.
            (Some(_), _) if record.flag != ResponseFlag::UpstreamConnectionFailure => Verdict::Forwarded,
            _ => Verdict::Refused,
        };
        Flow {
            time: super::requests::rfc3339_millis(record.start),
            verdict,
            by: "proxy",
            protocol: if record.server_name.is_some() { "tls" } else { "tcp" },
            source: Some(record.remote),
            source_workload: None,
            destination: Some(record.local),
            host: record.server_name.map(str::to_owned),
            method: None,
            path: None,
            response_code: None,
            response_flags: Some(record.flag.text()),
            cluster: Some(record.destination.cluster().to_string()),
            upstream: record.upstream,
            reason: record.refused_because.map(str::to_owned),
        }
    }

    /// A flow the kernel blackholed, or `denied` (for `policy`, where it is known).
    pub fn blocked(
        (source, destination): (SocketAddr, SocketAddr),
        protocol: &'static str,
        denied: bool,
        policy: Option<&str>,
    ) -> Flow {
        Flow {
            time: super::requests::rfc3339_millis(SystemTime::now()),
            verdict: if denied { Verdict::Denied } else { Verdict::Blackholed },
            by: "kernel",
            protocol,
            source: Some(source),
            source_workload: None,
            destination: Some(destination),
            host: None,
            method: None,
            path: None,
            response_code: None,
            response_flags: None,
            cluster: None,
            upstream: None,
            reason: policy.map(str::to_owned),
        }
    }
}

/// Where flows are published, and watched from.
#[derive(Clone)]
pub struct FlowStream {
    sender: broadcast::Sender<Arc<Flow>>,
    watchers: Arc<AtomicUsize>,
}

impl Default for FlowStream {
    fn default() -> FlowStream {
        FlowStream { sender: broadcast::channel(BACKLOG).0, watchers: Arc::default() }
    }
}

impl FlowStream {
    /// Whether anyone watches.
    pub fn watched(&self) -> bool {
        self.watchers.load(Ordering::Relaxed) > 0
    }

    /// Publishes the flow `make` builds, if anyone watches (else `make` is not called: one atomic read).
    pub fn publish(&self, make: impl FnOnce() -> Flow) {
        if self.watched() {
            let _ = self.sender.send(Arc::new(make()));
        }
    }

    /// A new watcher of the flows `filter` selects; `None` when MAX_WATCHERS already watch.
    pub fn watch(&self, filter: Filter) -> Option<Watcher> {
        let taken = self.watchers.fetch_update(Ordering::AcqRel, Ordering::Acquire, |watching| {
            (watching < MAX_WATCHERS).then_some(watching + 1)
        });
        taken.ok()?;
        Some(Watcher { flows: self.sender.subscribe(), watchers: self.watchers.clone(), filter })
    }
}

/// One `sluice observe`: its flows, filtered.
pub struct Watcher {
    flows: broadcast::Receiver<Arc<Flow>>,
    watchers: Arc<AtomicUsize>,
    filter: Filter,
}

/// What a watcher is given next.
pub enum Next {
    Flow(Arc<Flow>),
    /// The watcher fell behind and this many flows were lost to it.
    Lost(u64),
    /// The agent stopped publishing.
    Closed,
}

impl Watcher {
    /// The next flow the filter selects, its source workload filled in from `workloads` where the flow did not
    /// know it.
    pub async fn next(&mut self, workloads: &KnownWorkloads) -> Next {
        loop {
            let flow = match self.flows.recv().await {
                Ok(flow) => flow,
                Err(broadcast::error::RecvError::Lagged(lost)) => return Next::Lost(lost),
                Err(broadcast::error::RecvError::Closed) => return Next::Closed,
            };
            let known = workloads.load();
            let flow = match (&flow.source_workload, flow.source.and_then(|source| known.get(source.ip()))) {
                (None, Some(workload)) => {
                    let mut known = (*flow).clone();
                    known.source_workload = Some(format!("{}/{}", workload.namespace, workload.name));
                    Arc::new(known)
                }
                _ => flow,
            };
            if self.filter.selects(&flow) {
                return Next::Flow(flow);
            }
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.watchers.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Which flows a watcher wants: all of the given conditions hold.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Filter {
    pub verdict: Option<Verdict>,
    /// A host (the Host or server name, or the destination's address), exactly or as `*.suffix`.
    pub host: Option<String>,
    /// The source: an address, a workload `namespace/name`, or a namespace `namespace/`.
    pub source: Option<String>,
}

impl Filter {
    /// From `/observe`'s query: `verdict=…&host=…&source=…`.
    pub fn from_query(query: &str) -> Result<Filter, String> {
        let mut filter = Filter::default();
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            let value = value.trim().to_owned();
            match &*key {
                _ if value.is_empty() => {}
                "verdict" => {
                    let verdict = Verdict::parse(&value)
                        .ok_or_else(|| format!("verdict: {value:?} is not forwarded, refused, denied or blackholed"))?;
                    filter.verdict = Some(verdict);
                }
                "host" => filter.host = Some(value.to_ascii_lowercase()),
                "source" => filter.source = Some(value),
                other => return Err(format!("{other}: not a filter (verdict, host, source)")),
            }
        }
        Ok(filter)
    }

    pub fn selects(&self, flow: &Flow) -> bool {
        if self.verdict.is_some_and(|verdict| verdict != flow.verdict) {
            return false;
        }
        if let Some(pattern) = &self.host {
            let address = flow.destination.map(|destination| destination.ip().to_string());
            let named = |name: &str| match pattern.strip_prefix("*.") {
                Some(suffix) => {
                    name.len() > suffix.len() + 1
                        && name.ends_with(suffix)
                        && name.as_bytes()[name.len() - suffix.len() - 1] == b'.'
                }
                None => name.eq_ignore_ascii_case(pattern),
            };
            let host = flow.host.as_deref().map(|host| host_of(host).to_ascii_lowercase());
            if !host.as_deref().is_some_and(named) && !address.as_deref().is_some_and(named) {
                return false;
            }
        }
        if let Some(source) = &self.source {
            let by_address = source.parse::<IpAddr>().ok();
            let matched = match by_address {
                Some(ip) => flow.source.is_some_and(|address| address.ip() == ip),
                None => flow.source_workload.as_deref().is_some_and(|workload| match source.strip_suffix('/') {
                    Some(namespace) => workload.split_once('/').is_some_and(|(ns, _)| ns == namespace),
                    None => workload == source,
                }),
            };
            if !matched {
                return false;
            }
        }
        true
    }
}

/// A Host without its port.
fn host_of(authority: &str) -> &str {
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    }
}

/// A flow as `sluice observe` prints it: one line, in the spirit of `hubble observe`.
pub fn text(flow: &serde_json::Value) -> String {
    let field = |key: &str| flow[key].as_str().map(str::to_owned);
    let time = field("time").unwrap_or_default();
    let source = field("source").unwrap_or_else(|| "?".into());
    let source = match field("sourceWorkload") {
        Some(workload) => format!("{source} ({workload})"),
        None => source,
    };
    let destination = field("destination").unwrap_or_else(|| "?".into());
    let mut line = format!(
        "{time}  {source} -> {destination}  {} {}",
        field("verdict").unwrap_or_default().to_uppercase(),
        field("protocol").unwrap_or_default(),
    );
    if let Some(host) = field("host") {
        line.push_str(&format!(" {host}"));
    }
    if let (Some(method), Some(path)) = (field("method"), field("path")) {
        line.push_str(&format!(" {method} {path}"));
    }
    if let Some(code) = flow["responseCode"].as_u64() {
        line.push_str(&format!(" {code}"));
    }
    if let Some(flag) = field("responseFlags").filter(|flag| flag != "-") {
        line.push_str(&format!(" {flag}"));
    }
    if let Some(cluster) = field("cluster") {
        line.push_str(&format!(" {cluster}"));
    }
    if let Some(upstream) = field("upstream") {
        line.push_str(&format!(" via {upstream}"));
    }
    if let Some(reason) = field("reason") {
        line.push_str(&format!(" ({reason})"));
    }
    if flow["by"] == "kernel" {
        line.push_str(" [kernel]");
    }
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(verdict: Verdict, host: Option<&str>, source: &str, workload: Option<&str>) -> Flow {
        let addresses = (source.parse().unwrap(), "203.0.113.10:443".parse().unwrap());
        let mut flow = Flow::blocked(addresses, "tcp", false, None);
        flow.verdict = verdict;
        flow.host = host.map(str::to_owned);
        flow.source_workload = workload.map(str::to_owned);
        flow
    }

    #[test]
    fn filters_select_by_verdict_host_and_source() {
        let filter = |query: &str| Filter::from_query(query).unwrap();
        let api = flow(Verdict::Forwarded, Some("api.example.com:8443"), "10.1.0.5:40000", Some("shop/cart"));
        let kernel = flow(Verdict::Blackholed, None, "10.1.0.6:40000", None);
        assert!(filter("").selects(&api) && filter("").selects(&kernel));
        assert!(filter("verdict=forwarded").selects(&api) && !filter("verdict=FORWARDED").selects(&kernel));
        assert!(filter("host=api.example.com").selects(&api), "the Host's port aside");
        assert!(filter("host=*.example.com").selects(&api) && !filter("host=*.api.example.com").selects(&api));
        assert!(!filter("host=example.com").selects(&api));
        assert!(filter("host=203.0.113.10").selects(&kernel), "a flow without a name: by its destination's address");
        assert!(filter("source=10.1.0.5").selects(&api) && !filter("source=10.1.0.5").selects(&kernel));
        assert!(filter("source=shop/cart").selects(&api) && filter("source=shop/").selects(&api));
        assert!(!filter("source=shop/other").selects(&api) && !filter("source=sho/").selects(&api));
        assert!(!filter("source=shop/").selects(&kernel), "no workload known");
        assert!(Filter::from_query("verdict=maybe").unwrap_err().contains("verdict: \"maybe\""));
        assert!(Filter::from_query("colour=blue").unwrap_err().contains("colour: not a filter"));
    }

    #[tokio::test]
    async fn nothing_is_built_unwatched_and_a_slow_watcher_is_told_what_it_lost() {
        let stream = FlowStream::default();
        stream.publish(|| unreachable!("no watcher: the flow is not built"));
        let mut watcher = stream.watch(Filter::from_query("verdict=blackholed").unwrap()).unwrap();
        stream.publish(|| flow(Verdict::Forwarded, None, "10.1.0.5:1", None));
        stream.publish(|| flow(Verdict::Blackholed, None, "10.1.0.6:1", None));
        let workloads = KnownWorkloads::default();
        let Next::Flow(first) = watcher.next(&workloads).await else { panic!("a flow") };
        assert_eq!(first.source, Some("10.1.0.6:1".parse().unwrap()), "the forwarded flow is filtered out");
        for _ in 0..BACKLOG + 10 {
            stream.publish(|| flow(Verdict::Blackholed, None, "10.1.0.6:1", None));
        }
        assert!(matches!(watcher.next(&workloads).await, Next::Lost(10)));
        let watchers: Vec<Watcher> = (1..MAX_WATCHERS).filter_map(|_| stream.watch(Filter::default())).collect();
        assert_eq!(watchers.len(), MAX_WATCHERS - 1);
        assert!(stream.watch(Filter::default()).is_none(), "at most {MAX_WATCHERS} watchers");
        drop(watchers);
        assert!(stream.watch(Filter::default()).is_some(), "a watcher gone gives its place back");
    }
}
