//! A blackholed UDP flood across the sandbox topology, dropped on the gateway either by Sluice's classifier at
//! TC ingress or by an nftables set lookup in the forward hook, with the same 10k-entry allowlist.

use std::{
    io::Write,
    net::{SocketAddr, UdpSocket},
    process::Stdio,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use sluice_agent::{datapath::Datapath, policy::DatapathPolicy};
use sluice_tests::{agent::Bpffs, topology::GATEWAY_WORKLOAD_IFACE, Netns, Topology};

const SENDERS: usize = 2;
const DURATION: Duration = Duration::from_secs(3);
const TARGET: &str = "203.0.113.99:9";

/// Packets per second the gateway dropped.
pub struct Rate {
    pub sent: u64,
    pub dropped: u64,
    pub per_second: f64,
}

/// The flood against Sluice's classifier, with `policy` (which does not allow the target) in force.
pub fn sluice(policy: &DatapathPolicy) -> anyhow::Result<Rate> {
    let topology = Topology::new()?;
    let bpffs = Bpffs::mount()?;
    let mut datapath = topology.gateway.enter(|| -> anyhow::Result<Datapath> {
        let mut datapath = Datapath::load(&bpffs.pin_dir())?;
        datapath.apply(policy)?;
        datapath.attach(GATEWAY_WORKLOAD_IFACE)?;
        Ok(datapath)
    })??;
    let blackholed = || {
        datapath.counters().read().iter().find(|t| t.verdict.label() == "blackholed").map(|t| t.packets).unwrap_or(0)
    };
    let before = blackholed();
    let (sent, elapsed) = flood(&topology.workload)?;
    let dropped = blackholed() - before;
    datapath.apply(&DatapathPolicy::default())?;
    Ok(Rate { sent, dropped, per_second: dropped as f64 / elapsed.as_secs_f64() })
}

/// The same flood against nftables: `ip daddr . udp dport` looked up in a set of the allowed pairs.
pub fn nftables(policy: &DatapathPolicy) -> anyhow::Result<Rate> {
    let topology = Topology::new()?;
    let elements: Vec<String> = policy
        .rules
        .iter()
        .filter(|rule| rule.net.prefix_len() == 32)
        .map(|rule| format!("{} . {}", rule.net.addr(), rule.port))
        .collect();
    let ruleset = format!(
        "table inet sluice_bench {{\n  set allowed {{ type ipv4_addr . inet_service; elements = {{ {} }} }}\n  \
         chain forward {{ type filter hook forward priority 0; policy accept;\n    \
         ip daddr . udp dport != @allowed counter drop\n  }}\n}}\n",
        elements.join(", ")
    );
    load_ruleset(&topology.gateway, &ruleset)?;
    let dropped_by_nft = || -> anyhow::Result<u64> {
        let output =
            topology.gateway.command("nft").args(["list", "chain", "inet", "sluice_bench", "forward"]).output()?;
        let text = String::from_utf8_lossy(&output.stdout);
        text.split_whitespace()
            .skip_while(|word| *word != "packets")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .context("reading the nftables drop counter")
    };
    let before = dropped_by_nft()?;
    let (sent, elapsed) = flood(&topology.workload)?;
    let dropped = dropped_by_nft()? - before;
    Ok(Rate { sent, dropped, per_second: dropped as f64 / elapsed.as_secs_f64() })
}

/// Sends small UDP datagrams to the blocked target from `SENDERS` threads for `DURATION`.
fn flood(workload: &Netns) -> anyhow::Result<(u64, Duration)> {
    let target: SocketAddr = TARGET.parse().expect("constant address");
    let sockets = (0..SENDERS)
        .map(|_| workload.enter(|| UdpSocket::bind("0.0.0.0:0"))?.context("binding a flood socket"))
        .collect::<anyhow::Result<Vec<UdpSocket>>>()?;
    let (stop, sent) = (AtomicBool::new(false), AtomicU64::new(0));
    let started = Instant::now();
    std::thread::scope(|scope| {
        for socket in &sockets {
            scope.spawn(|| {
                let payload = [0u8; 18];
                let mut count = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..256 {
                        if socket.send_to(&payload, target).is_ok() {
                            count += 1;
                        }
                    }
                }
                sent.fetch_add(count, Ordering::Relaxed);
            });
        }
        std::thread::sleep(DURATION);
        stop.store(true, Ordering::Relaxed);
    });
    Ok((sent.load(Ordering::Relaxed), started.elapsed()))
}

/// Loads `ruleset` into `netns` with `nft -f -`.
fn load_ruleset(netns: &Netns, ruleset: &str) -> anyhow::Result<()> {
    let mut child = netns
        .command("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft (is nftables installed? `cargo xtask deps` installs it)")?;
    child.stdin.take().context("nft's stdin")?.write_all(ruleset.as_bytes())?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!("nft -f: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(())
}
