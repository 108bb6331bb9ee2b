//! Reading, validating and compiling N ServiceEntries (exact addresses, CIDRs, DNS hosts and wildcard hosts) with
//! as many VirtualServices, the agent memory they take, and what a request's host lookup costs among them.

use std::{sync::Arc, time::Instant};

use serde_json::json;
use sluice_agent::{
    config::{resolver::Resolved, sources::files::Loaded, store::Store},
    policy::{
        bindings::bind,
        compile::{datapath_policy, NodeSettings},
        routes::{proxy_policy, ProxySettings},
        sidecars::SidecarModes,
        OutboundMode,
    },
};

/// Host lookups timed per figure.
const LOOKUPS: usize = 1_000_000;

pub struct Figures {
    pub entries: usize,
    pub read_ms: f64,
    pub compile_ms: f64,
    /// Binding the VirtualServices and compiling the proxy's route table and registry.
    pub routes_ms: f64,
    pub rules: usize,
    /// One request's lookups (its VirtualService host, then the registry), for exact and wildcard hosts.
    pub lookup_exact_ns: f64,
    pub lookup_wildcard_ns: f64,
    /// The same exact lookups among 8 hosts only (a hot set, in cache): the lookup's own cost, apart from the
    /// memory misses of 1000 hosts spread over a large table.
    pub lookup_hot_ns: f64,
    /// Heap bytes held per host (ServiceEntry and VirtualService), as the agent holds them: the configuration in
    /// its store and the policies compiled from it.
    pub bytes_per_entry: Option<f64>,
    /// Of which the configuration in the store (the resources in force, as read).
    pub read_bytes_per_entry: Option<f64>,
}

pub fn measure(entries: usize) -> Figures {
    // Counted from before the input documents exist: reading consumes them.
    let heap_before = crate::live_bytes();
    let documents = Shape::Mixed.documents(entries);
    let started = Instant::now();
    let store = stored(documents);
    let heap_read = crate::live_bytes().saturating_sub(heap_before);
    let snapshot = store.snapshot();
    let read_ms = started.elapsed().as_secs_f64() * 1e3;
    let started = Instant::now();
    let policy = datapath_policy(&snapshot, &Resolved::new(), &NodeSettings::default());
    let compile_ms = started.elapsed().as_secs_f64() * 1e3;
    let started = Instant::now();
    let labels = Default::default();
    let bindings = bind(&snapshot, &labels);
    let sidecars = Arc::new(SidecarModes::compile(&snapshot, OutboundMode::AllowAny));
    let routes =
        proxy_policy(&snapshot, &Resolved::new(), &bindings, sidecars, &ProxySettings::default(), &Default::default());
    let routes_ms = started.elapsed().as_secs_f64() * 1e3;
    // The typed configuration and the bindings are needed only while compiling.
    drop((bindings, snapshot));
    let heap_all = crate::live_bytes().saturating_sub(heap_before);
    let lookup = |host: &dyn Fn(usize) -> String, spread: usize| {
        let hosts: Vec<String> = (0..spread).map(|k| host(k * entries / spread)).collect();
        let started = Instant::now();
        let mut found = 0usize;
        for k in 0..LOOKUPS {
            let host = std::hint::black_box(hosts[k % hosts.len()].as_str());
            found += usize::from(routes.mesh_routes(host).is_some());
            found += usize::from(routes.registered(host, 443).is_some());
        }
        assert!(found > 0, "the hosts looked up are registered");
        started.elapsed().as_nanos() as f64 / LOOKUPS as f64
    };
    let lookup_exact_ns = lookup(&|i| format!("svc-{}.example.com", i - i % 4), 1000);
    let lookup_wildcard_ns = lookup(&|i| format!("api.w-{}.example.com", i - i % 4 + 3), 1000);
    let lookup_hot_ns = lookup(&|i| format!("svc-{}.example.com", i - i % 4), 8);
    let figures = Figures {
        entries,
        read_ms,
        compile_ms,
        routes_ms,
        rules: policy.rules.len(),
        lookup_exact_ns,
        lookup_wildcard_ns,
        lookup_hot_ns,
        bytes_per_entry: Some(heap_all as f64 / entries as f64),
        read_bytes_per_entry: Some(heap_read as f64 / entries as f64),
    };
    drop((store, policy, routes));
    figures
}

/// Heap bytes per entry of `shape` held by each part of what the agent keeps: the configuration in its store, the
/// kernel's policy as compiled (before it is written to the maps), the proxy's routes and registry.
pub fn heap_by_part(entries: usize, shape: Shape) -> (f64, f64, f64) {
    let before = crate::live_bytes();
    let store = stored(shape.documents(entries));
    let in_store = crate::live_bytes().saturating_sub(before);
    let snapshot = store.snapshot();
    let before_policy = crate::live_bytes();
    let policy = datapath_policy(&snapshot, &Resolved::new(), &NodeSettings::default());
    let datapath = crate::live_bytes().saturating_sub(before_policy);
    let labels = Default::default();
    let bindings = bind(&snapshot, &labels);
    let sidecars = Arc::new(SidecarModes::compile(&snapshot, OutboundMode::AllowAny));
    let before_routes = crate::live_bytes();
    let routes =
        proxy_policy(&snapshot, &Resolved::new(), &bindings, sidecars, &ProxySettings::default(), &Default::default());
    let routes_bytes = crate::live_bytes().saturating_sub(before_routes);
    drop((bindings, snapshot, routes, policy, store));
    let per = |bytes: usize| bytes as f64 / entries as f64;
    (per(in_store), per(datapath), per(routes_bytes))
}

/// `documents` read and validated, and kept as the agent keeps the configuration: in its store, what was read
/// dropped.
fn stored(documents: Vec<serde_json::Value>) -> Store {
    let mut loaded = Loaded::default();
    for document in documents {
        loaded.add("bench", document);
    }
    assert!(loaded.errors.is_empty(), "the generated resources are valid: {:?}", loaded.errors.first());
    let mut store = Store::default();
    store.update(&loaded);
    store
}

/// The agent's resident memory, KiB: all of it, and what no file backs (its heap, without the pages of its code,
/// which a larger configuration runs more of but does not hold per host).
#[derive(Clone, Copy)]
pub struct Resident {
    pub all: u64,
    pub anonymous: u64,
    /// The most it held at any time (while reading and compiling the configuration).
    pub peak: u64,
}

/// The agent itself, run on each of `counts` ServiceEntries and as many VirtualServices (written to a file as
/// they are generated here): its resident memory in each, once its policy is applied.
pub fn agent_resident(counts: &[usize], shape: Shape) -> anyhow::Result<Vec<Resident>> {
    use anyhow::Context;
    use sluice_tests::{
        peers::Dnsmasq,
        topology::{GATEWAY_WORKLOAD_IFACE, INTERNET_ADDR},
        Agent,
    };

    let topology = crate::topology::new()?;
    // Answers no name (at once): the DNS entries resolve to nothing, as where their names are unknown.
    let _dns = Dnsmasq::start(&topology.internet, INTERNET_ADDR, &[])?;
    let rss = |dir: &std::path::Path| -> anyhow::Result<Resident> {
        let args = format!(
            "--intercept {GATEWAY_WORKLOAD_IFACE} --access-log-format off --dns-server {INTERNET_ADDR} \
             --allow-empty-config --config {}",
            dir.display()
        );
        let agent = Agent::start(&topology.gateway, &args)?;
        // Ready once the policy is applied (and what reading took returned to the system).
        std::thread::sleep(std::time::Duration::from_secs(1));
        let pid = agent.pid();
        Ok(Resident {
            all: crate::http::tree_status_kib(pid, "VmRSS"),
            anonymous: crate::http::tree_status_kib(pid, "RssAnon"),
            peak: crate::http::tree_status_kib(pid, "VmHWM"),
        })
    };
    counts
        .iter()
        .map(|&entries| {
            let dir = tempfile::tempdir()?;
            let documents: Vec<String> = shape.documents(entries).iter().map(serde_json::Value::to_string).collect();
            if !documents.is_empty() {
                std::fs::write(dir.path().join("entries.yaml"), documents.join("\n---\n"))
                    .context("writing the entries")?;
            }
            rss(dir.path())
        })
        .collect()
}

/// What each host's configuration looks like.
#[derive(Clone, Copy, Debug)]
pub enum Shape {
    /// A quarter each of exact-address TLS, CIDR TCP, DNS HTTPS and wildcard HTTPS entries, each with a
    /// VirtualService of three routes (the shape the other figures are taken on).
    Mixed,
    /// As users write them: a ServiceEntry with two ports (HTTP and HTTPS) and a STATIC endpoint, a VirtualService
    /// of three routes with a header match, a rewrite, a regex, a timeout and retries.
    Rich,
    /// Three hosts per ServiceEntry with two labelled endpoints, a DestinationRule with two subsets and a
    /// connection pool, a VirtualService splitting between the subsets.
    Subsets,
}

impl Shape {
    pub const ALL: [Shape; 3] = [Shape::Mixed, Shape::Rich, Shape::Subsets];

    /// The documents of `entries` entries of this shape.
    pub fn documents(self, entries: usize) -> Vec<serde_json::Value> {
        match self {
            Shape::Mixed => (0..entries).map(document).chain((0..entries).map(virtual_service)).collect(),
            Shape::Rich => (0..entries).flat_map(rich).collect(),
            Shape::Subsets => (0..entries).flat_map(with_subsets).collect(),
        }
    }

    /// The hosts one entry registers.
    pub fn hosts_per_entry(self) -> usize {
        match self {
            Shape::Mixed | Shape::Rich => 1,
            Shape::Subsets => 3,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Shape::Mixed => "mixed (exact, CIDR, DNS, wildcard; 3 routes)",
            Shape::Rich => "rich (2 ports, STATIC endpoint; header match, rewrite, regex, timeout, retries)",
            Shape::Subsets => "subsets (3 hosts per entry, 2 endpoints; DestinationRule with 2 subsets)",
        }
    }
}

/// The `Rich` shape's documents for the i-th host.
fn rich(i: usize) -> Vec<serde_json::Value> {
    let host = format!("api-{i}.partner.example.com");
    let address = format!("198.18.{}.{}", (i >> 8) & 0xff, i & 0xff);
    let entry = json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
        "metadata": {"name": format!("partner-{i}"), "namespace": "default"},
        "spec": {"hosts": [host], "location": "MESH_EXTERNAL", "resolution": "STATIC",
                 "ports": [{"number": 80, "name": "http", "protocol": "HTTP"},
                           {"number": 443, "name": "https", "protocol": "HTTPS"}],
                 "endpoints": [{"address": address}]}});
    let routes = json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": format!("partner-{i}"), "namespace": "default"},
        "spec": {"hosts": [host], "http": [
            {"match": [{"headers": {"x-tenant": {"exact": format!("tenant-{i}")}}, "uri": {"prefix": "/v2/"}}],
             "rewrite": {"uri": "/api/v2/"}, "route": [{"destination": {"host": host, "port": {"number": 80}}}],
             "timeout": "10s", "retries": {"attempts": 3, "perTryTimeout": "2s", "retryOn": "5xx,reset"}},
            {"match": [{"uri": {"regex": "/orders/[0-9]+"}}],
             "route": [{"destination": {"host": host, "port": {"number": 80}}}], "timeout": "5s"},
            {"route": [{"destination": {"host": host, "port": {"number": 80}}}]}]}});
    vec![entry, routes]
}

/// The `Subsets` shape's documents for the i-th entry.
fn with_subsets(i: usize) -> Vec<serde_json::Value> {
    let hosts: Vec<String> = (0..3).map(|h| format!("s{h}-{i}.saas.example.com")).collect();
    let address = |n: usize| format!("198.{}.{}.{}", 19 + n, (i >> 8) & 0xff, i & 0xff);
    let entry = json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
        "metadata": {"name": format!("saas-{i}"), "namespace": "default"},
        "spec": {"hosts": hosts, "location": "MESH_EXTERNAL", "resolution": "STATIC",
                 "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
                 "endpoints": [{"address": address(0), "labels": {"version": "v1"}},
                               {"address": address(1), "labels": {"version": "v2"}}]}});
    let rule = json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
        "metadata": {"name": format!("saas-{i}"), "namespace": "default"},
        "spec": {"host": hosts[0], "trafficPolicy": {"connectionPool": {"tcp": {"maxConnections": 100},
                 "http": {"http1MaxPendingRequests": 10}}},
                 "subsets": [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}]}});
    let routes = json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": format!("saas-{i}"), "namespace": "default"},
        "spec": {"hosts": [hosts[0]], "http": [{"route": [
            {"destination": {"host": hosts[0], "subset": "v1"}, "weight": 90},
            {"destination": {"host": hosts[0], "subset": "v2"}, "weight": 10}]}]}});
    vec![entry, rule, routes]
}

/// The i-th entry's host (the one its VirtualService routes).
fn host(i: usize) -> String {
    match i % 4 {
        0 => format!("svc-{i}.example.com"),
        1 => format!("net-{i}.example.com"),
        2 => format!("api-{i}.example.com"),
        _ => format!("*.w-{i}.example.com"),
    }
}

fn document(i: usize) -> serde_json::Value {
    let (a, b) = ((i >> 8) & 0xff, i & 0xff);
    let spec = match i % 4 {
        0 => json!({"hosts": [host(i)], "addresses": [format!("100.64.{a}.{b}")],
                    "ports": [{"number": 443, "name": "tls", "protocol": "TLS"}], "resolution": "NONE"}),
        1 => {
            json!({"hosts": [host(i)], "addresses": [format!("10.{}.{}.{}/28", (i >> 12) & 0xff, (i >> 4) & 0xff, (i & 0xf) << 4)],
                    "ports": [{"number": 5432, "name": "pg", "protocol": "TCP"}], "resolution": "NONE"})
        }
        2 => json!({"hosts": [host(i)],
                    "ports": [{"number": 443, "name": "https", "protocol": "HTTPS"}], "resolution": "DNS"}),
        _ => json!({"hosts": [host(i)],
                    "ports": [{"number": 443, "name": "https", "protocol": "HTTPS"}], "resolution": "NONE"}),
    };
    json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
           "metadata": {"name": format!("entry-{i}"), "namespace": "default"}, "spec": spec})
}

/// A VirtualService for the i-th entry's host: a prefix route with a header set, a regex-matched canary split
/// by weight, and a default route.
fn virtual_service(i: usize) -> serde_json::Value {
    let hosts = host(i);
    // A wildcard entry's routes name one concrete host under it.
    let host = hosts.replacen('*', "api", 1);
    json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
           "metadata": {"name": format!("routes-{i}"), "namespace": "default"},
           "spec": {"hosts": [hosts], "http": [
               {"match": [{"uri": {"prefix": "/api/"}}], "headers": {"request": {"set": {"x-route": "api"}}},
                "route": [{"destination": {"host": host}}]},
               {"match": [{"headers": {"x-canary": {"regex": "yes|true"}}}],
                "route": [{"destination": {"host": host}, "weight": 90}, {"destination": {"host": host}, "weight": 10}]},
               {"route": [{"destination": {"host": host}}], "timeout": "5s"}]}})
}
