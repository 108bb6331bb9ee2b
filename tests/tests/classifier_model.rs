//! The classifier checked against a model: random policies (with AuthorizationPolicy denials the kernel enforces)
//! and random packets (IPv4 and IPv6, options and
//! extension headers, VLAN tags, fragments, truncations, encapsulations it must refuse), each run by the kernel
//! (`BPF_PROG_TEST_RUN`) and decided by a plain Rust statement of docs/datapath.md's decision order; the two
//! must agree on the verdict and the action for every packet. `SLUICE_MODEL_SEED` replays a run; the seed is
//! printed.

use std::{
    collections::{BTreeMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::IpNet;
use sluice_agent::{
    datapath::Datapath,
    policy::{authorization::KernelDenial, BlackholeAction, DatapathPolicy, L4Rule, OutboundMode, Protocol},
};
use sluice_common::Verdict;
use sluice_tests::{agent::Bpffs, require_root};

const CONTINUE: i32 = -1;
const DROP: i32 = 2;
const REDIRECT: i32 = 7;
const POLICIES: usize = 20;
const PACKETS_PER_POLICY: usize = 400;

const TCP: u8 = 6;
const UDP: u8 = 17;
const SCTP: u8 = 132;
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;
const GRE: u8 = 47;

/// The addresses packets go to and policies name: a few, so that entries are hit often.
fn destinations_v4() -> [Ipv4Addr; 6] {
    [[203, 0, 113, 10], [203, 0, 113, 99], [198, 51, 100, 7], [198, 51, 100, 200], [10, 1, 2, 3], [192, 0, 2, 1]]
        .map(Ipv4Addr::from)
}

fn destinations_v6() -> [Ipv6Addr; 6] {
    ["2001:db8::10", "2001:db8::99", "2001:db8:a::7", "2001:db8:a:1::8", "fd00:1::3", "2001:db8:ff::1"]
        .map(|a| a.parse().unwrap())
}

fn clients() -> [IpAddr; 4] {
    ["10.240.1.2", "10.240.1.3", "fd00:240:1::2", "fd00:240:1::3"].map(|a| a.parse().unwrap())
}

const PORTS: [u16; 6] = [53, 80, 443, 5432, 8080, 40000];

/// A random policy over the pools.
fn random_policy(rng: &mut fastrand::Rng) -> (DatapathPolicy, BTreeMap<IpAddr, OutboundMode>) {
    let mode = if rng.bool() { OutboundMode::RegistryOnly } else { OutboundMode::AllowAny };
    let blackhole = if rng.u8(..4) == 0 { BlackholeAction::Reject } else { BlackholeAction::Drop };
    let (mut allow_cidrs, mut rules, mut intercept_ports) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rng.usize(..3) {
        let exact = rng.u8(..3) == 0;
        allow_cidrs.push(random_net(rng, exact));
    }
    for _ in 0..rng.usize(..8) {
        let exact = rng.bool();
        let net = random_net(rng, exact);
        let port = PORTS[rng.usize(..PORTS.len())];
        rules.push(L4Rule { net, port, protocol: [Protocol::Tcp, Protocol::Udp, Protocol::Sctp][rng.usize(..3)] });
    }
    for _ in 0..rng.usize(..3) {
        intercept_ports.push(PORTS[rng.usize(..PORTS.len())]);
    }
    // A DENY of the root namespace by addresses and ports: on one port or every one (0), from anyone or from
    // some sources (an exact client, the clients' network, a network no client is in).
    let mut denials = Vec::new();
    if rng.u8(..3) != 0 {
        for _ in 0..1 + rng.usize(..3) {
            let exact = rng.bool();
            let port = if rng.u8(..4) == 0 { 0 } else { PORTS[rng.usize(..PORTS.len())] };
            let source_pool =
                ["10.240.1.2/32", "10.240.1.0/24", "192.0.2.0/24", "fd00:240:1::3/128", "fd00:240:1::/64"];
            let sources =
                (0..rng.usize(..3)).map(|_| source_pool[rng.usize(..source_pool.len())].parse().unwrap()).collect();
            denials.push(KernelDenial {
                net: random_net(rng, exact),
                port,
                sources,
                policy: "istio-system/deny".into(),
            });
        }
    }
    let policy = DatapathPolicy {
        mode,
        blackhole,
        allow_cidrs,
        rules,
        intercept_ports,
        denials,
        unmatched_tcp_to_proxy: rng.bool(),
        // No proxy listens here: a flow for it is dropped (or, with no port, never sent to it).
        proxy_port: if rng.bool() { 15001 } else { 0 },
    };
    let mut modes = BTreeMap::new();
    for client in clients() {
        if rng.u8(..3) == 0 {
            modes.insert(client, if rng.bool() { OutboundMode::RegistryOnly } else { OutboundMode::AllowAny });
        }
    }
    (policy, modes)
}

/// A network over a pool address: the address itself when `exact`, else a prefix holding it.
fn random_net(rng: &mut fastrand::Rng, exact: bool) -> IpNet {
    if rng.bool() {
        let addr = destinations_v4()[rng.usize(..6)];
        let len = if exact { 32 } else { [8, 16, 24, 30][rng.usize(..4)] };
        IpNet::new(addr.into(), len).unwrap().trunc()
    } else {
        let addr = destinations_v6()[rng.usize(..6)];
        let len = if exact { 128 } else { [32, 48, 64, 120][rng.usize(..4)] };
        IpNet::new(addr.into(), len).unwrap().trunc()
    }
}

/// A random frame over the pools, and how it was made (for a failure's message).
fn random_frame(rng: &mut fastrand::Rng) -> Vec<u8> {
    let v6 = rng.bool();
    let proto = match rng.u8(..20) {
        0..=7 => TCP,
        8..=13 => UDP,
        14 => SCTP,
        15..=17 if v6 => ICMPV6,
        15..=17 => ICMP,
        _ => GRE,
    };
    let (src_port, dst_port) = (rng.u16(1024..), PORTS[rng.usize(..PORTS.len())]);
    let l4: Vec<u8> = match proto {
        TCP => [&src_port.to_be_bytes()[..], &dst_port.to_be_bytes(), &[0; 8], &[0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]]
            .concat(),
        UDP | SCTP => [&src_port.to_be_bytes()[..], &dst_port.to_be_bytes(), &[0, 8, 0, 0, 0, 0, 0, 0]].concat(),
        // Neighbour discovery and MLD types among others.
        ICMPV6 => vec![[128, 133, 135, 136, 143, 1][rng.usize(..6)], 0, 0, 0, 0, 0, 0, 0],
        _ => vec![8, 0, 0, 0, 0, 1, 0, 1],
    };
    let id = rng.u32(..4);
    // Fragments: none mostly; else the first, or a later one (which carries no L4 header).
    let fragment = match rng.u8(..10) {
        0 => Some((0u16, true)),
        1 => Some((1 + rng.u16(..100), rng.bool())),
        _ => None,
    };
    let payload = match fragment {
        Some((offset, _)) if offset > 0 => vec![0xab; 16],
        _ => l4,
    };
    let client = clients()[if v6 { 2 } else { 0 } + rng.usize(..2)];
    let (ethertype, mut ip) = if v6 {
        let IpAddr::V6(src) = client else { unreachable!() };
        let dst = match rng.u8(..8) {
            0 => "ff02::1".parse().unwrap(),
            1 => "fe80::1".parse().unwrap(),
            _ => destinations_v6()[rng.usize(..6)],
        };
        (0x86dd, ipv6(rng, src, dst, proto, fragment.map(|(offset, more)| (offset, more, id)), &payload))
    } else {
        let IpAddr::V4(src) = client else { unreachable!() };
        let dst = destinations_v4()[rng.usize(..6)];
        let options = vec![1u8; 4 * rng.usize(..4)];
        let field = fragment.map_or(0, |(offset, more)| offset | if more { 0x2000 } else { 0 });
        (0x0800, ipv4(src, dst, proto, &options, field, id as u16, &payload))
    };
    // Now and then a header that breaks its own rules.
    match rng.u8(..40) {
        0 => ip[0] = (ip[0] & 0x0f) | 0x50,
        1 if !v6 => ip[0] = 0x44,
        2 if !v6 => ip[2..4].copy_from_slice(&[0, 10]),
        _ => {}
    }
    let tags: &[u16] = match rng.u8(..30) {
        0..=2 => &[0x8100],
        3..=4 => &[0x88a8, 0x8100],
        5 => &[0x8100, 0x8100],
        6 => &[0x88a8, 0x88a8],
        7 => &[0x8100, 0x8100, 0x8100],
        8 => &[0x9100],
        _ => &[],
    };
    let ethertype = match rng.u8(..40) {
        0 => 0x8847,
        1 => 0x8864,
        2 => 0x0806,
        _ => ethertype,
    };
    let mut frame = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
    for tag in tags {
        frame.extend(tag.to_be_bytes());
        frame.extend([0, 7]);
    }
    frame.extend(u16::to_be_bytes(ethertype));
    frame.extend(ip);
    if rng.u8(..10) == 0 {
        frame.truncate(rng.usize(14..frame.len()));
    }
    frame
}

fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, options: &[u8], fragment: u16, id: u16, payload: &[u8]) -> Vec<u8> {
    let header_len = 20 + options.len();
    let mut packet = vec![0x40 | (header_len / 4) as u8, 0];
    packet.extend(((header_len + payload.len()) as u16).to_be_bytes());
    packet.extend(id.to_be_bytes());
    packet.extend(fragment.to_be_bytes());
    packet.extend([64, proto, 0, 0]);
    packet.extend(src.octets());
    packet.extend(dst.octets());
    packet.extend(options);
    packet.extend(payload);
    packet
}

/// IPv6 with up to seven extension headers (more than the classifier skips), and a fragment header when given.
fn ipv6(
    rng: &mut fastrand::Rng,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    proto: u8,
    fragment: Option<(u16, bool, u32)>,
    payload: &[u8],
) -> Vec<u8> {
    let mut headers: Vec<(u8, Vec<u8>)> = (0..[0, 0, 0, 1, 2, 7][rng.usize(..6)])
        .map(|_| match rng.u8(..4) {
            0 => (0, vec![0; 8]),
            1 => (43, vec![0; 8 * (1 + rng.usize(..3))]),
            2 => (60, vec![0; 16]),
            _ => (51, vec![0; 12]),
        })
        .collect();
    if let Some((offset, more, id)) = fragment {
        let mut header = vec![0; 8];
        header[2..4].copy_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
        header[4..8].copy_from_slice(&id.to_be_bytes());
        headers.insert(rng.usize(..=headers.len()), (44, header));
    }
    // Each header's length field, as its kind counts it (the next-header fields are chained by `packets::ipv6`).
    for (kind, header) in &mut headers {
        header[1] = match kind {
            44 => 0,
            51 => (header.len() / 4 - 2) as u8,
            _ => (header.len() / 8 - 1) as u8,
        };
    }
    sluice_tests::packets::ipv6(src, dst, proto, &headers, payload)
}

/// What the model reads of a packet.
#[derive(Debug)]
struct Flow {
    v6: bool,
    proto: u8,
    src: IpAddr,
    dst: IpAddr,
    dst_port: u16,
    first_fragment: bool,
    fragmented: bool,
    id: u32,
}

enum Parsed {
    Ip(Flow),
    /// Not IP (ARP…), or IPv6 link control to a link-scope address.
    Other,
    Malformed,
}

fn be16(frame: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(frame.get(at..at + 2)?.try_into().ok()?))
}

/// The parse docs/datapath.md describes: up to two tags (802.1ad or 802.1Q, then 802.1Q), IPv4 with options,
/// IPv6 with up to six extension headers, ports of TCP, UDP and SCTP first fragments. What it cannot read, and
/// encapsulations that could hide IP, are malformed.
fn parse(frame: &[u8]) -> Parsed {
    let malformed = Parsed::Malformed;
    let Some(mut ethertype) = be16(frame, 12) else { return malformed };
    let mut offset = 12;
    if matches!(ethertype, 0x88a8 | 0x8100) {
        offset += 4;
        let Some(next) = be16(frame, offset) else { return malformed };
        ethertype = next;
    }
    if ethertype == 0x8100 {
        offset += 4;
        let Some(next) = be16(frame, offset) else { return malformed };
        ethertype = next;
    }
    let l3 = offset + 2;
    let flow = match ethertype {
        0x0800 => parse_v4(frame, l3),
        0x86dd => parse_v6(frame, l3),
        0x8100 | 0x88a8 | 0x9100 | 0x8847 | 0x8848 | 0x8863 | 0x8864 => None,
        _ => return Parsed::Other,
    };
    match flow {
        Some(Some((flow, l4))) => {
            if flow.first_fragment && matches!(flow.proto, TCP | UDP | SCTP) {
                let Some(port) = be16(frame, l4 + 2) else { return malformed };
                return Parsed::Ip(Flow { dst_port: port, ..flow });
            }
            Parsed::Ip(flow)
        }
        Some(None) => Parsed::Other,
        None => malformed,
    }
}

/// The flow and where its L4 header starts; `Some(None)`: link control; `None`: malformed.
fn parse_v4(frame: &[u8], l3: usize) -> Option<Option<(Flow, usize)>> {
    let header = frame.get(l3..l3 + 20)?;
    let header_len = usize::from(header[0] & 0x0f) * 4;
    if header[0] >> 4 != 4 || header_len < 20 || usize::from(be16(header, 2)?) < header_len {
        return None;
    }
    let fragment = be16(header, 6)?;
    let addr = |at: usize| IpAddr::from(<[u8; 4]>::try_from(&header[at..at + 4]).unwrap());
    let flow = Flow {
        v6: false,
        proto: header[9],
        src: addr(12),
        dst: addr(16),
        dst_port: 0,
        first_fragment: fragment & 0x1fff == 0,
        fragmented: fragment & 0x3fff != 0,
        id: u32::from(be16(header, 4)?),
    };
    Some(Some((flow, l3 + header_len)))
}

fn parse_v6(frame: &[u8], l3: usize) -> Option<Option<(Flow, usize)>> {
    let header = frame.get(l3..l3 + 40)?;
    if header[0] >> 4 != 6 {
        return None;
    }
    let addr = |at: usize| IpAddr::from(<[u8; 16]>::try_from(&header[at..at + 16]).unwrap());
    let (mut next, mut l4) = (header[6], l3 + 40);
    let (mut first_fragment, mut fragmented, mut id) = (true, false, 0);
    for _ in 0..6 {
        if !matches!(next, 0 | 43 | 44 | 51 | 60) {
            break;
        }
        let extension = frame.get(l4..l4 + 4)?;
        let len = match next {
            44 => {
                first_fragment = be16(extension, 2)? & 0xfff8 == 0;
                fragmented = true;
                id = u32::from_be_bytes(frame.get(l4 + 4..l4 + 8)?.try_into().ok()?);
                8
            }
            51 => (usize::from(extension[1]) + 2) * 4,
            _ => (usize::from(extension[1]) + 1) * 8,
        };
        next = extension[0];
        l4 += len;
    }
    let dst = addr(24);
    if next == ICMPV6 && first_fragment {
        let kind = *frame.get(l4)?;
        let link_scope =
            matches!(dst, IpAddr::V6(d) if d.segments()[0] & 0xff00 == 0xff00 || d.segments()[0] & 0xffc0 == 0xfe80);
        if matches!(kind, 130..=137 | 143) && link_scope {
            return Some(None);
        }
    }
    let flow = Flow { v6: true, proto: next, src: addr(8), dst, dst_port: 0, first_fragment, fragmented, id };
    Some(Some((flow, l4)))
}

/// What the model expects: the verdict counted and the action (Blackholed in reject mode: answered or, when
/// the packet cannot be answered, dropped).
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Action {
    Continue,
    Drop,
    DropOrAnswer,
}

/// The classifier's model: the decision order of docs/datapath.md.
struct Model {
    policy: DatapathPolicy,
    modes: BTreeMap<IpAddr, OutboundMode>,
    /// The datagrams whose first fragment was allowed (their later fragments follow it).
    allowed_datagrams: HashSet<(bool, IpAddr, IpAddr, u32, u8)>,
}

impl Model {
    fn decide(&mut self, frame: &[u8]) -> (Verdict, Action) {
        let registry_only = self.policy.mode == OutboundMode::RegistryOnly;
        let flow = match parse(frame) {
            Parsed::Other => return (Verdict::Ignored, Action::Continue),
            Parsed::Malformed if registry_only => return (Verdict::Malformed, Action::Drop),
            Parsed::Malformed => return (Verdict::Malformed, Action::Continue),
            Parsed::Ip(flow) => flow,
        };
        // Denials come first (fragments included), where the always-allowed ranges still pass.
        if !self.policy.denials.is_empty() {
            if self.policy.allow_cidrs.iter().any(|net| net.contains(&flow.dst)) {
                return (Verdict::Allowed, Action::Continue);
            }
            let denies = |denial: &KernelDenial| {
                (denial.port == 0 || denial.port == flow.dst_port)
                    && denial.net.contains(&flow.dst)
                    && (denial.sources.is_empty() || denial.sources.iter().any(|source| source.contains(&flow.src)))
            };
            if self.policy.denials.iter().any(denies) {
                return (Verdict::Denied, Action::DropOrAnswer);
            }
        }
        let datagram = (flow.v6, flow.src, flow.dst, flow.id, flow.proto);
        if flow.fragmented && !flow.first_fragment && self.allowed_datagrams.contains(&datagram) {
            return (Verdict::Allowed, Action::Continue);
        }
        let verdict = self.entries(&flow);
        if flow.fragmented && flow.first_fragment && verdict == Some(Verdict::Allowed) {
            self.allowed_datagrams.insert(datagram);
        }
        match verdict {
            Some(Verdict::Allowed) => (Verdict::Allowed, Action::Continue),
            Some(_) => self.to_proxy(&flow).unwrap_or_else(|| self.unmatched(&flow)),
            None => self.unmatched(&flow),
        }
    }

    /// Allowed by an entry, or `Intercepted` by a port the proxy takes; `None`: no entry.
    fn entries(&self, flow: &Flow) -> Option<Verdict> {
        let protocol = |rule: &L4Rule| match rule.protocol {
            Protocol::Tcp => TCP,
            Protocol::Udp => UDP,
            Protocol::Sctp => SCTP,
        };
        let allowed =
            self.policy.allow_cidrs.iter().any(|net| net.contains(&flow.dst))
                || self.policy.rules.iter().any(|rule| {
                    protocol(rule) == flow.proto && rule.port == flow.dst_port && rule.net.contains(&flow.dst)
                });
        if allowed {
            return Some(Verdict::Allowed);
        }
        let intercepted =
            self.policy.proxy_port != 0 && flow.proto == TCP && self.policy.intercept_ports.contains(&flow.dst_port);
        intercepted.then_some(Verdict::Intercepted)
    }

    /// A flow for the proxy: dropped, since no proxy listens here (`None`: not one the proxy can take).
    fn to_proxy(&self, flow: &Flow) -> Option<(Verdict, Action)> {
        let takes = flow.proto == TCP && self.policy.proxy_port != 0 && flow.first_fragment;
        takes.then_some((Verdict::Blackholed, Action::Drop))
    }

    /// What no entry matches: the source's own mode, else the policy's.
    fn unmatched(&self, flow: &Flow) -> (Verdict, Action) {
        let mode = self.modes.get(&flow.src).copied().unwrap_or(self.policy.mode);
        if mode == OutboundMode::RegistryOnly {
            let action =
                if self.policy.blackhole == BlackholeAction::Reject { Action::DropOrAnswer } else { Action::Drop };
            return (Verdict::Blackholed, action);
        }
        if self.policy.unmatched_tcp_to_proxy {
            if let Some(dropped) = self.to_proxy(flow) {
                return dropped;
            }
        }
        (Verdict::Passthrough, Action::Continue)
    }
}

#[test]
fn the_kernel_agrees_with_the_model_on_every_random_packet_of_every_random_policy() {
    require_root();
    let seed =
        std::env::var("SLUICE_MODEL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| fastrand::u64(..));
    println!("SLUICE_MODEL_SEED={seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let (mut checked, mut refused) = (0, 0);
    let mut by_verdict: BTreeMap<String, usize> = BTreeMap::new();
    for round in 0..POLICIES {
        let (policy, modes) = random_policy(&mut rng);
        let bpffs = Bpffs::mount().unwrap();
        let mut datapath = Datapath::load(&bpffs.pin_dir()).unwrap();
        datapath.apply(&policy).unwrap();
        datapath.set_source_modes(&modes).unwrap();
        let mut model = Model { policy, modes, allowed_datagrams: HashSet::new() };
        for _ in 0..PACKETS_PER_POLICY {
            let frame = random_frame(&mut rng);
            let before = datapath.counters().read();
            // The kernel refuses to run some frames whose IP header is cut short: nothing to compare.
            let Ok(run) = datapath.run_on(&frame, 1) else {
                refused += 1;
                continue;
            };
            let after = datapath.counters().read();
            let moved: Vec<Verdict> =
                before.iter().zip(&after).filter(|(b, a)| a.packets != b.packets).map(|(_, a)| a.verdict).collect();
            let (verdict, action) = model.decide(&frame);
            let acted = match action {
                Action::Continue => run.action == CONTINUE,
                Action::Drop => run.action == DROP,
                Action::DropOrAnswer => run.action == DROP || run.action == REDIRECT,
            };
            assert!(
                moved == [verdict] && acted,
                "seed {seed}, policy {round}: the kernel counted {moved:?} and acted {}, the model says {verdict:?} \
                 and {action:?}\nframe {frame:02x?}\npolicy {:?}\nsource modes {:?}",
                run.action,
                model.policy,
                model.modes
            );
            *by_verdict.entry(format!("{verdict:?}")).or_default() += 1;
            checked += 1;
        }
    }
    println!("{checked} packets agreed ({refused} refused by BPF_PROG_TEST_RUN): {by_verdict:?}");
    // The generator reaches every verdict the model knows.
    for verdict in ["Allowed", "Passthrough", "Blackholed", "Ignored", "Malformed", "Denied"] {
        assert!(by_verdict.get(verdict).copied().unwrap_or(0) > 10, "too few {verdict}: {by_verdict:?}");
    }
    assert!(checked > POLICIES * PACKETS_PER_POLICY * 8 / 10, "{checked} checked, {refused} refused");
}
