//! The bench's network: the tests' three namespaces, with the TCP congestion control every row runs under set
//! explicitly. Namespaces inherit the host's, and how a host is tuned moved every bulk figure by a factor: on a
//! host defaulting to BBR without the `fq` qdisc, TCP paces itself with timers, and one connection across the
//! veth pairs ran at a third of its speed under the kernel's default, cubic. The bench runs under cubic unless
//! `SLUICE_BENCH_CONGESTION` names another (`bbr`, to measure what such a host does).

use sluice_tests::Topology;

const DEFAULT_CONGESTION_CONTROL: &str = "cubic";

/// The TCP congestion control the bench's namespaces use.
pub fn congestion_control() -> String {
    std::env::var("SLUICE_BENCH_CONGESTION").unwrap_or_else(|_| DEFAULT_CONGESTION_CONTROL.to_owned())
}

/// A fresh topology whose namespaces all use `congestion_control()`.
pub fn new() -> anyhow::Result<Topology> {
    let topology = Topology::new()?;
    let algorithm = congestion_control();
    for netns in [&topology.workload, &topology.gateway, &topology.internet] {
        netns.sysctl("net.ipv4.tcp_congestion_control", &algorithm)?;
    }
    Ok(topology)
}
