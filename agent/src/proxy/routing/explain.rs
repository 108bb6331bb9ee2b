//! What a request would get, without sending it: the routing decision for a described request, as `sluice routes`
//! shows it (in the spirit of `istioctl x describe` and `istioctl proxy-config routes`).

use std::net::SocketAddr;

use serde_json::{json, Value};

use super::{decide, Decision, Listener};
use crate::{config::workloads::Workload, policy::routes::ProxyPolicy};

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
            let address = if destination.address.ip().is_unspecified() {
                format!("the address dialled, port {}", destination.address.port())
            } else {
                destination.address.to_string()
            };
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
    if answer["hostMismatch"] == true {
        lines.push("Note:         the Host is registered at other addresses than the one it was sent to".into());
    }
    lines.push(format!("Source:       {}", answer["source"].as_str().unwrap_or("unknown workload")));
    lines.join("\n") + "\n"
}
