//! What a request would get, without sending it: the routing decision for a described request, as `sluice routes`
//! shows it (in the spirit of `istioctl x describe` and `istioctl proxy-config routes`).

use std::{net::SocketAddr, time::Duration};

use serde_json::{json, Value};

use super::{decide, Decision, Listener};
use crate::{
    config::workloads::Workload,
    policy::routes::ProxyPolicy,
    proxy::l4::{decide_tcp_noting_hop, decide_tls_noting_hop, Arrival, RelayTerms, Verdict},
};

/// A request as `sluice routes` describes it.
#[derive(Debug)]
pub struct Question {
    /// `host[:port]`, as the request's Host.
    pub authority: String,
    pub path: String,
    pub listener: Listener,
    /// Where the request was sent (the original destination); unspecified when not given: the Host alone decides,
    /// and no domain-fronting check is made.
    pub address: SocketAddr,
}

/// The decision for `question` from `source` (a known workload, or none), as JSON.
pub fn explain(policy: &ProxyPolicy, question: &Question, source: Option<&Workload>) -> Value {
    let request = match http::Request::get(question.path.as_str()).body(()) {
        Ok(request) => request,
        Err(error) => return json!({"decision": "not a request", "why": format!("path {:?}: {error}", question.path)}),
    };
    // Without an address, the request is routed as the forward proxy routes it: by its Host alone.
    let listener = match question.listener {
        Listener::Mesh if question.address.ip().is_unspecified() => Listener::Forward,
        listener => listener,
    };
    match decide(policy, &request, &question.authority, listener, question.address, source, 0) {
        Decision::Fail { failure, labels } => json!({
            "decision": "refused by the gateway",
            "status": failure.status().as_u16(),
            "flag": failure.flag().text(),
            "why": failure.body(),
            "cluster": labels.map(|labels| labels.cluster().to_string()),
        }),
        Decision::Respond { route, status, .. } => json!({
            "decision": "answered by the gateway (directResponse)",
            "route": route.name().to_string(),
            "status": status.as_u16(),
        }),
        Decision::Redirect { route, status, location } => json!({
            "decision": "redirected",
            "route": route.name().to_string(),
            "status": status.as_u16(),
            "location": location,
        }),
        Decision::RequireTls { location } => {
            json!({"decision": "redirected to HTTPS", "status": 301, "location": location})
        }
        Decision::Forward { route, target, destination, host_mismatch } => {
            let endpoints = destination.cluster().map(|cluster| {
                cluster.endpoints.iter().map(|endpoint| endpoint.address.to_string()).collect::<Vec<_>>()
            });
            let address = sent_to(destination.address);
            json!({
                "decision": "forwarded",
                "route": route.map(|matched| matched.route.name().to_string()),
                "target": target.map(|target| json!({"host": target.host(), "port": target.port(), "subset": target.subset()})),
                "cluster": destination.labels.cluster().to_string(),
                "destinationService": destination.labels.name().as_str(),
                "address": address,
                "endpoints": endpoints,
                "http2": destination.http2,
                "hostMismatch": host_mismatch,
            })
        }
    }
}

/// A connection the proxy relays without reading it, as `sluice routes --protocol tls|tcp` describes it.
#[derive(Debug)]
pub struct ConnectionQuestion {
    /// The ClientHello's server name, for TLS (`None`: a TCP connection, or a ClientHello without one).
    pub server_name: Option<String>,
    pub tls: bool,
    /// Where the connection was sent (the original destination; on a Gateway port, its port).
    pub address: SocketAddr,
    pub arrival: Arrival,
}

/// The decision for a TLS or TCP connection from `source`, as JSON: the same fields as a request's, where they
/// apply. Weighted destinations: the first (the draw that picks it).
pub fn explain_connection(policy: &ProxyPolicy, question: &ConnectionQuestion, source: Option<&Workload>) -> Value {
    let mut hop = None;
    let name = question.server_name.as_deref();
    let (verdict, mismatch) = if question.tls {
        decide_tls_noting_hop(policy, name, question.address, source, question.arrival, 0, &mut hop)
    } else {
        decide_tcp_noting_hop(policy, question.address, source, question.arrival, 0, &mut hop)
    };
    let mut answer = match verdict {
        Verdict::Refuse { labels, flag, reason } => json!({
            "decision": "refused by the gateway (the connection is reset)",
            "flag": flag.text(),
            "why": reason,
            "cluster": labels.cluster().to_string(),
        }),
        Verdict::Forward { address, labels, verify, terms } => {
            let mut answer = json!({
                "decision": "forwarded (relayed unread)",
                "cluster": labels.cluster().to_string(),
                "destinationService": labels.name().as_str(),
                "address": sent_to(address),
                "verify": verify.map(|host| format!("only if {host} resolves to the address dialled (--host-verify strict)")),
            });
            with_terms(&mut answer, terms);
            answer
        }
        Verdict::Resolve { host, port, labels, terms } => {
            let mut answer = json!({
                "decision": "forwarded (relayed unread)",
                "cluster": labels.cluster().to_string(),
                "destinationService": labels.name().as_str(),
                "address": format!("what {host} resolves to, port {port}"),
            });
            with_terms(&mut answer, terms);
            answer
        }
    };
    answer["protocol"] = json!(if question.tls { "tls" } else { "tcp" });
    answer["serverName"] = json!(name);
    answer["gatewayHop"] = json!(hop);
    answer["hostMismatch"] = json!(mismatch.is_some());
    answer
}

/// Where a decision sends a request or connection: an address, or (unspecified) the one the client dialled.
/// How a relayed connection is opened and bounded, in `answer`.
fn with_terms(answer: &mut Value, terms: RelayTerms) {
    let shown = |duration: Option<Duration>| duration.map(|duration| format!("{duration:?}"));
    answer["connectTimeout"] = json!(shown(Some(terms.connect.within)));
    answer["idleTimeout"] = json!(shown(terms.idle));
    answer["maxConnectionDuration"] = json!(shown(terms.lifetime));
    answer["tcpKeepalive"] = match terms.connect.keepalive {
        Some(keepalive) => json!({
            "time": shown(keepalive.time),
            "interval": shown(keepalive.interval),
            "probes": keepalive.probes,
        }),
        None => Value::Null,
    };
}

fn sent_to(address: SocketAddr) -> String {
    if address.ip().is_unspecified() {
        format!("the address dialled, port {}", address.port())
    } else {
        address.to_string()
    }
}

/// The decision as `sluice routes` prints it: one line a subject.
pub fn text(answer: &Value) -> String {
    let shown = |value: &Value| value.as_str().map_or_else(|| value.to_string(), str::to_owned);
    let mut lines = vec![format!("Decision:     {}", shown(&answer["decision"]))];
    for (key, title) in [
        ("status", "Status"),
        ("flag", "Flag"),
        ("why", "Why"),
        ("route", "Route"),
        ("location", "Location"),
        ("cluster", "Cluster"),
        ("destinationService", "Service"),
        ("address", "Sent to"),
        ("verify", "Verified"),
        ("connectTimeout", "Connect in"),
        ("idleTimeout", "Idle after"),
        ("maxConnectionDuration", "Lasts at most"),
        ("tcpKeepalive", "Keepalive"),
    ] {
        if !answer[key].is_null() && answer[key] != "" {
            lines.push(format!("{:<14}{}", format!("{title}:"), shown(&answer[key])));
        }
    }
    if let Some(target) = answer["target"].as_object() {
        let port = target.get("port").and_then(Value::as_u64).map_or_else(String::new, |port| format!(":{port}"));
        let subset = target.get("subset").and_then(Value::as_str).map_or_else(String::new, |s| format!(" subset {s}"));
        lines.push(format!("Target:       {}{port}{subset}", target.get("host").map(shown).unwrap_or_default()));
    }
    if let Some(endpoints) = answer["endpoints"].as_array() {
        let endpoints: Vec<String> = endpoints.iter().map(shown).collect();
        lines
            .push(format!("Endpoints:    {}", if endpoints.is_empty() { "none".into() } else { endpoints.join(", ") }));
    }
    if let Some(port) = answer["gatewayHop"].as_u64() {
        lines.push(format!("Note:         routed to this gateway's own Service: decided again on its port {port}"));
    }
    if answer["hostMismatch"] == true {
        let what = if answer["protocol"] == "tls" { "server name" } else { "Host" };
        lines.push(format!("Note:         the {what} is registered at other addresses than the one it was sent to"));
    }
    lines.push(format!("Source:       {}", answer["source"].as_str().unwrap_or("unknown workload")));
    lines.join("\n") + "\n"
}
