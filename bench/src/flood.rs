//! A blackholed UDP flood across the test topology, dropped on the gateway either by Sluice's classifier at
//! TC ingress or by an nftables set lookup in the forward hook, with the same 10k-entry allowlist.
//!
//! The gateway's side is measured apart from the sender's: the gateway interface receives through threaded NAPI
//! (GRO on, `threaded` set), so everything the gateway does with a packet, up to and including dropping it, runs
//! in one kernel thread pinned to its own CPU, whose CPU time per dropped packet is the figure compared. The
//! sender runs on the other CPU.
#![expect(unsafe_code, reason = "the flood is sent with raw packet sockets and sendmmsg(2), which nix does not wrap")]

use std::{
    io::Write,
    net::SocketAddr,
    process::Stdio,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use sluice_agent::{
    datapath::{Datapath, InterfaceSpec},
    policy::DatapathPolicy,
};
use sluice_tests::{
    agent::Bpffs,
    netns::run,
    packets,
    topology::{GATEWAY_WORKLOAD_IFACE, WORKLOAD_ADDR},
    Netns, Topology,
};

const DURATION: Duration = Duration::from_secs(3);
const SENDER_CPU: usize = 0;
const GATEWAY_CPU: &str = "1";
const TARGET: &str = "203.0.113.99:9";

/// What the gateway dropped, and what dropping cost it.
pub struct Rate {
    pub sent: u64,
    pub dropped: u64,
    pub per_second: f64,
    /// CPU time of the gateway's receive thread per dropped packet.
    pub gateway_ns_per_packet: f64,
}

/// Topology with the gateway's receive path in a kernel thread of its own, pinned to `GATEWAY_CPU`.
fn topology() -> anyhow::Result<(Topology, u32)> {
    let topology = crate::topology::new()?;
    // veth hands packets to NAPI (rather than to the sender's backlog) when the receiver has GRO on and the
    // sender segments nothing.
    run(topology.workload.command("ethtool").args(["-K", WORKLOAD_IFACE, "tso", "off", "gso", "off"]))?;
    run(topology.gateway.command("ethtool").args(["-K", GATEWAY_WORKLOAD_IFACE, "gro", "on"]))?;
    let threaded = format!("echo 1 > /sys/class/net/{GATEWAY_WORKLOAD_IFACE}/threaded");
    run(topology.gateway.command("sh").args(["-c", &threaded]))?;
    // The thread is named after the interface; the bench runs one topology at a time.
    let prefix = format!("napi/{GATEWAY_WORKLOAD_IFACE}-");
    let napi = std::fs::read_dir("/proc")?
        .flatten()
        .filter_map(|entry| entry.file_name().to_string_lossy().parse::<u32>().ok())
        .find(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.starts_with(&prefix)))
        .context("no threaded NAPI thread for the gateway interface")?;
    crate::http::pin_tree(napi, GATEWAY_CPU)?;
    Ok((topology, napi))
}

/// The flood against Sluice's classifier, with `policy` (which does not allow the target) in force.
pub fn sluice(policy: &DatapathPolicy) -> anyhow::Result<Rate> {
    let (topology, napi) = topology()?;
    let bpffs = Bpffs::mount()?;
    let mut datapath = topology.gateway.enter(|| -> anyhow::Result<Datapath> {
        let mut datapath = Datapath::load(&bpffs.pin_dir())?;
        datapath.apply(policy)?;
        datapath.reconcile_interfaces(&[InterfaceSpec::Name(GATEWAY_WORKLOAD_IFACE.into())], &[])?;
        Ok(datapath)
    })??;
    let blackholed = || {
        datapath.counters().read().iter().find(|t| t.verdict.label() == "blackholed").map(|t| t.packets).unwrap_or(0)
    };
    let before = blackholed();
    let (sent, elapsed, gateway_cpu) = flood(&topology, napi)?;
    let dropped = blackholed() - before;
    datapath.apply(&DatapathPolicy::default())?;
    Ok(Rate::new(sent, dropped, elapsed, gateway_cpu))
}

/// The same flood against nftables: `ip daddr . udp dport` looked up in a set of the allowed pairs.
pub fn nftables(policy: &DatapathPolicy) -> anyhow::Result<Rate> {
    let (topology, napi) = topology()?;
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
    let (sent, elapsed, gateway_cpu) = flood(&topology, napi)?;
    let dropped = dropped_by_nft()? - before;
    Ok(Rate::new(sent, dropped, elapsed, gateway_cpu))
}

impl Rate {
    fn new(sent: u64, dropped: u64, elapsed: Duration, gateway_cpu: Duration) -> Rate {
        Rate {
            sent,
            dropped,
            per_second: dropped as f64 / elapsed.as_secs_f64(),
            gateway_ns_per_packet: gateway_cpu.as_nanos() as f64 / dropped.max(1) as f64,
        }
    }
}

/// Sends minimum-size UDP frames to the blocked target for `DURATION` from the sender CPU, through an AF_PACKET
/// socket that bypasses the qdisc and sends 64 frames per system call; returns what was sent, how long it took,
/// and the CPU time the gateway's receive thread `napi` spent meanwhile.
fn flood(topology: &Topology, napi: u32) -> anyhow::Result<(u64, Duration, Duration)> {
    let frame = frame(topology)?;
    let socket = topology.workload.enter(|| RawSender::open(WORKLOAD_IFACE))??;
    let (stop, sent) = (AtomicBool::new(false), AtomicU64::new(0));
    let ticks_before = crate::http::tree_cpu_ticks(napi);
    let started = Instant::now();
    std::thread::scope(|scope| {
        let (frame, socket, stop, sent) = (&frame, &socket, &stop, &sent);
        scope.spawn(move || {
            let mut cpus = nix::sched::CpuSet::new();
            let _ = cpus.set(SENDER_CPU);
            let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpus);
            let mut count = 0u64;
            while !stop.load(Ordering::Relaxed) {
                count += socket.send_batch(frame);
            }
            sent.store(count, Ordering::Relaxed);
        });
        std::thread::sleep(DURATION);
        stop.store(true, Ordering::Relaxed);
    });
    let elapsed = started.elapsed();
    // What is still queued is dropped within moments.
    std::thread::sleep(Duration::from_millis(100));
    let ticks = crate::http::tree_cpu_ticks(napi).saturating_sub(ticks_before);
    let ticks_per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100);
    let gateway_cpu = Duration::from_secs_f64(ticks as f64 / ticks_per_second as f64);
    Ok((sent.load(Ordering::Relaxed), elapsed, gateway_cpu))
}

const WORKLOAD_IFACE: &str = "wl0";
const BATCH: usize = 64;

/// The flood's frame: workload to the blocked target, addressed to the gateway's MAC, valid IPv4 checksum.
fn frame(topology: &Topology) -> anyhow::Result<Vec<u8>> {
    let mac = |netns: &Netns, interface: &str| -> anyhow::Result<[u8; 6]> {
        let output = netns.command("ip").args(["-o", "link", "show", "dev", interface]).output()?;
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let hex = text.split_whitespace().skip_while(|w| *w != "link/ether").nth(1).context("no MAC address")?;
        let bytes: Vec<u8> = hex.split(':').map(|b| u8::from_str_radix(b, 16)).collect::<Result<_, _>>()?;
        bytes.try_into().map_err(|_| anyhow::anyhow!("malformed MAC address {hex}"))
    };
    let target: SocketAddr = TARGET.parse().expect("constant address");
    let SocketAddr::V4(target) = target else { bail!("the flood target is IPv4") };
    let ip = packets::ipv4(
        WORKLOAD_ADDR.parse().expect("constant address"),
        *target.ip(),
        packets::UDP,
        &[],
        0,
        &packets::udp(40000, target.port(), &[0; 18]),
    );
    let mut frame = Vec::with_capacity(14 + ip.len());
    frame.extend(mac(&topology.gateway, GATEWAY_WORKLOAD_IFACE)?);
    frame.extend(mac(&topology.workload, WORKLOAD_IFACE)?);
    frame.extend(0x0800u16.to_be_bytes());
    frame.extend(ip);
    Ok(frame)
}

/// An AF_PACKET socket bound to one interface, bypassing its qdisc.
struct RawSender {
    fd: std::os::fd::OwnedFd,
}

impl RawSender {
    fn open(interface: &str) -> anyhow::Result<RawSender> {
        use nix::libc;
        use std::os::fd::FromRawFd;
        let ifindex = nix::net::if_::if_nametoindex(interface).with_context(|| format!("no interface {interface}"))?;
        // SAFETY: plain system calls on a descriptor this function owns; the structures are fully initialised.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            if fd < 0 {
                bail!("opening an AF_PACKET socket: {}", std::io::Error::last_os_error());
            }
            let fd = std::os::fd::OwnedFd::from_raw_fd(fd);
            let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
            let one: libc::c_int = 1;
            libc::setsockopt(
                raw,
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                (&one as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as u32,
            );
            let mut address: libc::sockaddr_ll = std::mem::zeroed();
            address.sll_family = libc::AF_PACKET as u16;
            address.sll_ifindex = ifindex as i32;
            address.sll_halen = 6;
            if libc::bind(raw, (&address as *const libc::sockaddr_ll).cast(), size_of::<libc::sockaddr_ll>() as u32)
                != 0
            {
                bail!("binding the AF_PACKET socket to {interface}: {}", std::io::Error::last_os_error());
            }
            Ok(RawSender { fd })
        }
    }

    /// Sends `frame` `BATCH` times in one `sendmmsg`; returns how many went out.
    fn send_batch(&self, frame: &[u8]) -> u64 {
        use nix::libc;
        let mut iov = libc::iovec { iov_base: frame.as_ptr() as *mut libc::c_void, iov_len: frame.len() };
        // SAFETY: every message points at the same live iovec, which points at `frame`; the kernel only reads them.
        unsafe {
            let mut messages: [libc::mmsghdr; BATCH] = std::mem::zeroed();
            for message in messages.iter_mut() {
                message.msg_hdr.msg_iov = &mut iov;
                message.msg_hdr.msg_iovlen = 1;
            }
            let sent =
                libc::sendmmsg(std::os::fd::AsRawFd::as_raw_fd(&self.fd), messages.as_mut_ptr(), BATCH as u32, 0);
            sent.max(0) as u64
        }
    }
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
