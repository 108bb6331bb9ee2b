//! `cargo xtask bench`: the classifier's per-packet cost, measured in the kernel with BPF_PROG_TEST_RUN, for
//! policies of 10 to 100k entries; and a blackholed flood dropped by Sluice and by nftables, side by side.
#![expect(unsafe_code, reason = "the bench counts the heap through a global allocator, unsafe by contract")]

mod compile;
mod flood;
mod http;
mod https;
mod relay;
mod tls;
mod topology;

use std::net::Ipv4Addr;

use anyhow::Context;
use ipnet::{IpNet, Ipv4Net};
use sluice_agent::{
    datapath::Datapath,
    policy::{DatapathPolicy, L4Rule, OutboundMode, Protocol},
};
use sluice_tests::{agent::Bpffs, packets};

/// Counts the heap bytes in use, so memory figures are exact rather than read off the resident size (which the
/// allocator keeps and reuses).
struct CountingAllocator;

static LIVE_BYTES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

// SAFETY: every call is passed to the system allocator unchanged; only a counter is updated besides.
unsafe impl std::alloc::GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size(), std::sync::atomic::Ordering::Relaxed);
        // SAFETY: the caller's layout, as the system allocator requires.
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        LIVE_BYTES.fetch_sub(layout.size(), std::sync::atomic::Ordering::Relaxed);
        // SAFETY: a block this allocator returned, with its layout.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(new_size, std::sync::atomic::Ordering::Relaxed);
        LIVE_BYTES.fetch_sub(layout.size(), std::sync::atomic::Ordering::Relaxed);
        // SAFETY: as in dealloc and alloc.
        unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Heap bytes in use now.
pub fn live_bytes() -> usize {
    LIVE_BYTES.load(std::sync::atomic::Ordering::Relaxed)
}

const SIZES: [usize; 3] = [10, 10_000, 100_000];
/// Hosts the agent itself is run on, for its resident memory per host: what each host past the first 2,000
/// adds (the first configuration loaded also pages in code and sets up what any configuration needs, once).
const AGENT_ENTRIES: [usize; 3] = [0, 2_000, 20_000];
const REPEAT: u32 = 1_000_000;
/// Each figure is the best of this many runs of `REPEAT`: the machine's noise only ever adds time.
const TRIALS: usize = 3;

#[derive(Clone, Copy)]
enum Kind {
    Exact,
    Cidr,
}

fn main() -> anyhow::Result<()> {
    sluice_tests::require_root();
    // The agent runs as deployed, as `cargo xtask bench` runs it, also when this is run by hand: the harness's
    // default (`debug`, for the tests) writes log lines per connection and raises Sluice's figures.
    if std::env::var_os("SLUICE_AGENT_LOG").is_none() {
        std::env::set_var("SLUICE_AGENT_LOG", "info");
    }
    // `sluice-bench http`, `config`, `classifier` and `flood` run one part alone.
    match std::env::args().nth(1).as_deref() {
        Some("http") => return http_comparison(&std::env::args().skip(2).collect::<Vec<_>>()),
        Some("config") => return configuration(),
        Some("classifier") => return classifier_costs(),
        Some("flood") => return flood_comparison(),
        Some("tls") => return tls_comparison(&std::env::args().skip(2).collect::<Vec<_>>()),
        Some("https") => return https_comparison(&std::env::args().skip(2).collect::<Vec<_>>()),
        Some("relay") => return relay_comparison(&std::env::args().skip(2).collect::<Vec<_>>()),
        _ => configuration()?,
    }
    classifier_costs()?;
    flood_comparison()?;
    println!();
    http_comparison(&[])?;
    println!();
    tls_comparison(&[])?;
    println!();
    https_comparison(&[])?;
    println!();
    relay_comparison(&[])
}

fn relay_comparison(only: &[String]) -> anyhow::Result<()> {
    let runs = relay::compare(only)?;
    relay::print(&runs);
    Ok(())
}

fn tls_comparison(only: &[String]) -> anyhow::Result<()> {
    let runs = tls::compare(only)?;
    tls::print(&runs);
    Ok(())
}

fn https_comparison(only: &[String]) -> anyhow::Result<()> {
    let runs = https::compare(only)?;
    https::print(&runs);
    Ok(())
}

fn classifier_costs() -> anyhow::Result<()> {
    let bpffs = Bpffs::mount()?;
    let mut datapath = Datapath::load(&bpffs.pin_dir()).context("loading the classifier")?;
    println!("Classifier cost per packet (BPF_PROG_TEST_RUN: mean ns/packet over {REPEAT} runs, best of {TRIALS})");
    println!("{:<8} {:>9} {:>14} {:>16} {:>12}", "entries", "kind", "hit (allowed)", "miss (blackhole)", "load (ms)");
    let mut hits = Vec::new();
    for kind in [Kind::Exact, Kind::Cidr] {
        for size in SIZES {
            let policy = policy(kind, size);
            let started = std::time::Instant::now();
            datapath.apply(&policy).context("writing the policy")?;
            let load_ms = started.elapsed().as_secs_f64() * 1000.0;
            let hit = frame(address(kind, size / 2));
            let miss = frame(Ipv4Addr::new(192, 0, 2, 1));
            let hit_ns = best_of(&mut datapath, &hit)?;
            let miss_ns = best_of(&mut datapath, &miss)?;
            let label = match kind {
                Kind::Exact => "exact",
                Kind::Cidr => "cidr /28",
            };
            println!("{size:<8} {label:>9} {hit_ns:>14} {miss_ns:>16} {load_ms:>12.1}");
            hits.push((label, size, hit_ns));
        }
    }
    for label in ["exact", "cidr /28"] {
        let of = |size| hits.iter().find(|(l, s, _)| *l == label && *s == size).map(|h| h.2 as f64).unwrap_or(0.0);
        println!("{label}: cost at 100k entries / cost at 10 entries = {:.2}", of(100_000) / of(10).max(1.0));
    }
    Ok(())
}

fn flood_comparison() -> anyhow::Result<()> {
    println!();
    println!("Blackholed UDP flood, workload -> gateway (10k allowed exact destinations, target not among them)");
    let allowlist = policy(Kind::Exact, 10_000);
    let sluice = flood::sluice(&allowlist).context("flooding through Sluice")?;
    let nft = flood::nftables(&allowlist).context("flooding through nftables")?;
    println!(
        "(sender on CPU 0; the gateway receives in its own NAPI thread on CPU 1, whose CPU time per drop is measured)"
    );
    println!(
        "{:<28} {:>12} {:>12} {:>12} {:>18} {:>22}",
        "dropped by", "sent", "dropped", "dropped/s", "gateway ns/packet", "drops/s per gateway CPU"
    );
    for (name, rate) in [("sluice (TC ingress, eBPF)", &sluice), ("nftables (forward, set)", &nft)] {
        let capacity = 1e9 / rate.gateway_ns_per_packet.max(1.0);
        println!(
            "{name:<28} {:>12} {:>12} {:>12.0} {:>18.0} {:>22.0}",
            rate.sent, rate.dropped, rate.per_second, rate.gateway_ns_per_packet, capacity
        );
    }
    println!(
        "sluice / nftables drop rate per gateway CPU = {:.2} (as flooded here, dropped/s: {:.2})",
        nft.gateway_ns_per_packet / sluice.gateway_ns_per_packet.max(1.0),
        sluice.per_second / nft.per_second.max(1.0)
    );
    Ok(())
}

fn configuration() -> anyhow::Result<()> {
    println!(
        "Configuration: N ServiceEntries (exact, CIDR, DNS, wildcard hosts) and N VirtualServices: read + validate, \
         compile (datapath; proxy routes and registry), heap held per host (counted by the allocator), one request's host lookups"
    );
    println!(
        "{:<8} {:>10} {:>14} {:>12} {:>9} {:>11} {:>12} {:>15} {:>18} {:>14}",
        "entries",
        "read (ms)",
        "datapath (ms)",
        "routes (ms)",
        "L4 rules",
        "bytes/host",
        "(in store)",
        "lookup ns exact",
        "lookup ns wildcard",
        "(8 hot hosts)"
    );
    let mut lookups = Vec::new();
    for entries in [10, 1_000, 10_000, 100_000] {
        let f = compile::measure(entries);
        let shown = |b: Option<f64>| b.map(|b| format!("{b:.0}")).unwrap_or_else(|| "-".into());
        println!(
            "{:<8} {:>10.1} {:>14.1} {:>12.1} {:>9} {:>11} {:>12} {:>15.0} {:>18.0} {:>14.0}",
            f.entries,
            f.read_ms,
            f.compile_ms,
            f.routes_ms,
            f.rules,
            shown(f.bytes_per_entry),
            shown(f.read_bytes_per_entry),
            f.lookup_exact_ns,
            f.lookup_wildcard_ns,
            f.lookup_hot_ns
        );
        lookups.push((f.lookup_exact_ns, f.lookup_wildcard_ns, f.lookup_hot_ns));
    }
    let (first, last) = (lookups[0], lookups[lookups.len() - 1]);
    println!(
        "host lookup at 100k / at 10: exact {:.2}, wildcard {:.2}; among 8 hot hosts {:.2}",
        last.0 / first.0.max(1.0),
        last.1 / first.1.max(1.0),
        last.2 / first.2.max(1.0)
    );
    for shape in compile::Shape::ALL {
        agent_memory(shape)?;
    }
    println!();
    Ok(())
}

/// The agent's resident memory on `AGENT_ENTRIES` hosts of `shape`, and per host.
fn agent_memory(shape: compile::Shape) -> anyhow::Result<()> {
    let resident = compile::agent_resident(&AGENT_ENTRIES, shape).context("running the agent on the entries")?;
    let ([none, fewer, more], &[empty, small, large]) = (AGENT_ENTRIES, resident.as_slice()) else {
        anyhow::bail!("the agent was run on {} configurations, not 3", resident.len());
    };
    println!("{}:", shape.describe());
    let (stored, datapath, routes) = compile::heap_by_part(10_000, shape);
    println!(
        "heap per entry at 10000 (counted by the allocator): configuration store {stored:.0}, kernel policy as \
         compiled {datapath:.0}, proxy routes and registry {routes:.0}"
    );
    // Per host, not per entry: a `Subsets` entry registers three.
    let per_host = |from: u64, to: u64, entries: usize| {
        to.saturating_sub(from) as f64 * 1024.0 / (entries * shape.hosts_per_entry()) as f64
    };
    let mib = |r: compile::Resident| {
        format!(
            "{:.1} MiB ({:.1} not file-backed; at most {:.1} while reading)",
            r.all as f64 / 1024.0,
            r.anonymous as f64 / 1024.0,
            r.peak as f64 / 1024.0
        )
    };
    println!(
        "the agent itself with {none} / {fewer} / {more} ServiceEntries and VirtualServices: RSS {} / {} / {}",
        mib(empty),
        mib(small),
        mib(large)
    );
    println!(
        "agent memory per host, from {fewer} to {more} entries ({} hosts each): {:.0} resident bytes ({:.0} not \
         file-backed); the first {fewer} with what any configuration sets up once: {:.0} ({:.0})",
        shape.hosts_per_entry(),
        per_host(small.all, large.all, more - fewer),
        per_host(small.anonymous, large.anonymous, more - fewer),
        per_host(empty.all, small.all, fewer - none),
        per_host(empty.anonymous, small.anonymous, fewer - none)
    );
    Ok(())
}

/// `only`: the configurations to run (direct, sluice, nginx, haproxy, squid); all when empty.
fn http_comparison(only: &[String]) -> anyhow::Result<()> {
    println!(
        "HTTP/1.1 keep-alive, small responses (wrk -t1 -c32 -d5s on CPU 0 with the origin; each proxy alone on CPU 1; \
         medians of {} rounds, the configurations in turn in each)",
        http::ROUNDS
    );
    let runs = http::compare(only).context("the HTTP comparison")?;
    println!(
        "{:<30} {:>12} {:>9} {:>9} {:>14} {:>12} {:>10}",
        "through", "requests/s", "p50 ms", "p99 ms", "CPU us/request", "(user space)", "RSS MiB"
    );
    for (_, run) in &runs {
        let tenths = |us: Option<f64>| us.map(|c| format!("{c:.1}")).unwrap_or_else(|| "-".into());
        let rss = run.rss_kib.map(|r| format!("{:.1}", r as f64 / 1024.0)).unwrap_or_else(|| "-".into());
        println!(
            "{:<30} {:>12.0} {:>9.3} {:>9.3} {:>14} {:>12} {:>10}",
            run.name,
            run.requests_per_second,
            run.p50_ms,
            run.p99_ms,
            tenths(run.cpu_us_per_request),
            tenths(run.user_us_per_request),
            rss
        );
    }
    let of = |key: &str| runs.iter().find(|(run_key, _)| *run_key == key).map(|(_, run)| run);
    let cpu = |key: &str| of(key).and_then(|run| run.cpu_us_per_request);
    if let (Some(plain), Some(authorized)) = (cpu("sluice"), cpu("sluice-authz")) {
        println!(
            "with 100 AuthorizationPolicies: CPU per request {:.3} of without ({:+.1} %)",
            authorized / plain,
            (authorized / plain - 1.0) * 100.0
        );
    }
    if !only.is_empty() {
        return Ok(());
    }
    let (Some(direct), Some(sluice)) = (of("direct"), of("sluice")) else { return Ok(()) };
    let direct = direct.requests_per_second.max(1.0);
    let peers = || runs.iter().filter(|(key, _)| http::PEERS.contains(key)).map(|(_, run)| run);
    let best_peer_cpu = peers().filter_map(|r| r.cpu_us_per_request).fold(f64::INFINITY, f64::min);
    let best_peer_p99 = peers().map(|r| r.p99_ms).fold(f64::INFINITY, f64::min);
    println!(
        "sluice / direct requests/s = {:.2}; sluice CPU per request / best peer's = {:.2}; sluice p99 / best peer's = {:.2}",
        sluice.requests_per_second / direct,
        sluice.cpu_us_per_request.unwrap_or(0.0) / best_peer_cpu,
        sluice.p99_ms / best_peer_p99
    );
    if let Some(stack) = of("hyper-forwarder").and_then(|run| run.cpu_us_per_request) {
        println!(
            "hyper forwarder (the stack alone) CPU per request / best peer's = {:.2}; what Sluice adds to it: {:.1} us \
             ({:.1} in user space)",
            stack / best_peer_cpu,
            sluice.cpu_us_per_request.unwrap_or(0.0) - stack,
            sluice.user_us_per_request.unwrap_or(0.0)
                - of("hyper-forwarder").and_then(|run| run.user_us_per_request).unwrap_or(0.0)
        );
    }
    Ok(())
}

fn best_of(datapath: &mut Datapath, frame: &[u8]) -> anyhow::Result<u128> {
    let mut best = u128::MAX;
    for _ in 0..TRIALS {
        best = best.min(datapath.run_on(frame, REPEAT)?.per_run.as_nanos());
    }
    Ok(best)
}

/// The i-th destination of a policy: /32s for exact entries, /28 networks for CIDR entries, in 100.64.0.0/10.
fn address(kind: Kind, i: usize) -> Ipv4Addr {
    let base = u32::from(Ipv4Addr::new(100, 64, 0, 0));
    match kind {
        Kind::Exact => Ipv4Addr::from(base + i as u32),
        Kind::Cidr => Ipv4Addr::from(base + (i as u32) * 16 + 5),
    }
}

fn policy(kind: Kind, size: usize) -> DatapathPolicy {
    let rules = (0..size)
        .map(|i| {
            let prefix = match kind {
                Kind::Exact => 32,
                Kind::Cidr => 28,
            };
            let net = Ipv4Net::new(address(kind, i), prefix).expect("valid prefix").trunc();
            L4Rule { net: IpNet::V4(net), port: 443, protocol: Protocol::Tcp }
        })
        .collect();
    DatapathPolicy { mode: OutboundMode::RegistryOnly, rules, ..DatapathPolicy::default() }
}

fn frame(dst: Ipv4Addr) -> Vec<u8> {
    let segment = packets::tcp(40000, 443, packets::TCP_SYN, 1);
    packets::ethernet(0x0800, &[], &packets::ipv4(Ipv4Addr::new(10, 240, 1, 2), dst, packets::TCP, &[], 0, &segment))
}
