//! Reading, validating and compiling N ServiceEntries (a third each with an exact address, a CIDR, or a DNS host),
//! and the agent memory they take.

use std::time::Instant;

use serde_json::json;
use sluice_agent::{
    config::{resolver::Resolved, sources::files::Loaded},
    policy::compile::{datapath_policy, NodeSettings},
};

pub struct Figures {
    pub entries: usize,
    pub read_ms: f64,
    pub compile_ms: f64,
    pub rules: usize,
    /// None below 1000 entries, where the resident size moves in steps larger than the growth.
    pub bytes_per_entry: Option<f64>,
}

pub fn measure(entries: usize) -> Figures {
    let documents: Vec<serde_json::Value> = (0..entries).map(document).collect();
    let rss_before = resident_bytes();
    let started = Instant::now();
    let mut loaded = Loaded::default();
    for document in documents {
        loaded.add("bench", document);
    }
    let read_ms = started.elapsed().as_secs_f64() * 1e3;
    assert!(loaded.errors.is_empty(), "the generated resources are valid: {:?}", loaded.errors.first());
    let started = Instant::now();
    let policy = datapath_policy(&loaded.snapshot, &Resolved::new(), &NodeSettings::default());
    let compile_ms = started.elapsed().as_secs_f64() * 1e3;
    let bytes = resident_bytes().saturating_sub(rss_before) as f64;
    let figures = Figures {
        entries,
        read_ms,
        compile_ms,
        rules: policy.rules.len(),
        bytes_per_entry: (entries >= 1000).then(|| bytes / entries as f64),
    };
    drop((loaded, policy));
    figures
}

fn document(i: usize) -> serde_json::Value {
    let (a, b) = ((i >> 8) & 0xff, i & 0xff);
    let spec = match i % 3 {
        0 => json!({"hosts": [format!("svc-{i}.example.com")], "addresses": [format!("100.64.{a}.{b}")],
                    "ports": [{"number": 443, "name": "tls", "protocol": "TLS"}], "resolution": "NONE"}),
        1 => {
            json!({"hosts": [format!("net-{i}.example.com")], "addresses": [format!("10.{}.{}.{}/28", (i >> 12) & 0xff, (i >> 4) & 0xff, (i & 0xf) << 4)],
                    "ports": [{"number": 5432, "name": "pg", "protocol": "TCP"}], "resolution": "NONE"})
        }
        _ => json!({"hosts": [format!("api-{i}.example.com")],
                    "ports": [{"number": 443, "name": "https", "protocol": "HTTPS"}], "resolution": "DNS"}),
    };
    json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
           "metadata": {"name": format!("entry-{i}"), "namespace": "default"}, "spec": spec})
}

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    pages * 4096
}
