//! The classifier run by the kernel on crafted packets (`BPF_PROG_TEST_RUN`): every parsing path, every verdict,
//! the counters, and the answers reject mode writes.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
};

use sluice_agent::{
    datapath::{BlockedFlow, Datapath},
    policy::{authorization::KernelDenial, BlackholeAction, DatapathPolicy, OutboundMode},
};
use sluice_common::{names, DestinationStats, Verdict, MAX_FRAGMENTED};
use sluice_tests::{agent::Bpffs, packets::*, require_root};

const CONTINUE: i32 = -1;
const DROP: i32 = 2;
const REDIRECT: i32 = 7;

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 240, 1, 2);
const ALLOWED: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const BLOCKED: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 99);
const IN_CIDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x240, 1, 0, 0, 0, 0, 2);
const ALLOWED_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
const BLOCKED_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x99);

struct Classifier {
    datapath: Datapath,
    _bpffs: Bpffs,
}

impl Classifier {
    fn load(mode: OutboundMode, blackhole: BlackholeAction) -> Classifier {
        require_root();
        let bpffs = Bpffs::mount().unwrap();
        let mut datapath = Datapath::load(&bpffs.pin_dir()).unwrap();
        datapath.apply(&policy(mode, blackhole)).unwrap();
        Classifier { datapath, _bpffs: bpffs }
    }

    /// Runs the classifier once on `frame`: the action, and the one verdict whose counter moved.
    fn run(&mut self, frame: &[u8]) -> (i32, Verdict, Vec<u8>) {
        let before = self.datapath.counters().read();
        let run = self.datapath.run_on(frame, 1).unwrap();
        let after = self.datapath.counters().read();
        let moved: Vec<Verdict> =
            before.iter().zip(&after).filter(|(b, a)| a.packets != b.packets).map(|(_, a)| a.verdict).collect();
        assert_eq!(moved.len(), 1, "exactly one verdict is counted per packet: {moved:?}");
        let counted = after.iter().find(|t| t.verdict == moved[0]).unwrap();
        let was = before.iter().find(|t| t.verdict == moved[0]).unwrap();
        assert_eq!(counted.bytes - was.bytes, frame.len() as u64, "the packet's bytes are counted");
        (run.action, moved[0], run.output)
    }
}

/// The policy the tests start from: entries of each kind, always-allowed ranges, an intercepted port.
fn policy(mode: OutboundMode, blackhole: BlackholeAction) -> DatapathPolicy {
    DatapathPolicy {
        mode,
        blackhole,
        allow_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
        rules: [
            "203.0.113.10:80/tcp",
            "198.51.100.0/24:53/udp",
            "192.0.0.0/16:53/udp",
            "[2001:db8::10]:443/tcp",
            "[2001:db8:1::/48]:53/udp",
            "[2001:db8:2::/64]:53/udp",
        ]
        .iter()
        .map(|rule| rule.parse().unwrap())
        .collect(),
        intercept_ports: vec![8080],
        denials: Vec::new(),
        unmatched_tcp_to_proxy: false,
        proxy_port: 15001,
    }
}

fn v4(dst: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
    ethernet(0x0800, &[], &ipv4(CLIENT, dst, proto, &[], 0, l4))
}

fn v6(dst: Ipv6Addr, proto: u8, extensions: &[(u8, Vec<u8>)], l4: &[u8]) -> Vec<u8> {
    ethernet(0x86dd, &[], &ipv6(CLIENT_V6, dst, proto, extensions, l4))
}

#[test]
fn every_parsing_path_gets_the_verdict_its_destination_deserves() {
    let mut classifier = Classifier::load(OutboundMode::RegistryOnly, BlackholeAction::Drop);
    let syn = |port| tcp(40000, port, TCP_SYN, 1000);
    let cases: Vec<(&str, Vec<u8>, i32, Verdict)> = vec![
        ("ipv4 tcp to an exact entry", v4(ALLOWED, TCP, &syn(80)), CONTINUE, Verdict::Allowed),
        ("ipv4 tcp, entry's address, other port", v4(ALLOWED, TCP, &syn(81)), DROP, Verdict::Blackholed),
        ("ipv4 udp, entry's port, other protocol", v4(ALLOWED, UDP, &udp(5, 80, b"x")), DROP, Verdict::Blackholed),
        ("ipv4 udp into a CIDR entry", v4(IN_CIDR, UDP, &udp(5, 53, b"q")), CONTINUE, Verdict::Allowed),
        (
            "ipv4 udp into a CIDR entry of another prefix length",
            v4(Ipv4Addr::new(192, 0, 5, 5), UDP, &udp(5, 53, b"q")),
            CONTINUE,
            Verdict::Allowed,
        ),
        (
            "ipv4 udp just outside both CIDRs",
            v4(Ipv4Addr::new(192, 1, 0, 1), UDP, &udp(5, 53, b"q")),
            DROP,
            Verdict::Blackholed,
        ),
        ("ipv4 to an always-allowed range", v4(Ipv4Addr::new(10, 1, 2, 3), TCP, &syn(9)), CONTINUE, Verdict::Allowed),
        ("ipv4 unlisted", v4(BLOCKED, TCP, &syn(80)), DROP, Verdict::Blackholed),
        ("ipv4 icmp unlisted", v4(BLOCKED, ICMP, &[8, 0, 0, 0, 0, 1, 0, 1]), DROP, Verdict::Blackholed),
        (
            "ipv4 with options",
            ethernet(0x0800, &[], &ipv4(CLIENT, ALLOWED, TCP, &[1, 1, 1, 0, 0x94, 4, 0, 0], 0, &syn(80))),
            CONTINUE,
            Verdict::Allowed,
        ),
        (
            "ipv4 first fragment",
            ethernet(0x0800, &[], &ipv4(CLIENT, ALLOWED, TCP, &[], 0x2000, &syn(80))),
            CONTINUE,
            Verdict::Allowed,
        ),
        (
            "ipv4 later fragment of a datagram whose first fragment was not allowed",
            with_ipv4_id(ethernet(0x0800, &[], &ipv4(CLIENT, ALLOWED, TCP, &[], 0x0010, &[0; 16])), 0x777),
            DROP,
            Verdict::Blackholed,
        ),
        (
            "vlan tagged",
            ethernet(0x0800, &[7], &ipv4(CLIENT, ALLOWED, TCP, &[], 0, &syn(80))),
            CONTINUE,
            Verdict::Allowed,
        ),
        (
            "q-in-q",
            ethernet(0x0800, &[7, 8], &ipv4(CLIENT, ALLOWED, TCP, &[], 0, &syn(80))),
            CONTINUE,
            Verdict::Allowed,
        ),
        ("ipv6 tcp to an exact entry", v6(ALLOWED_V6, TCP, &[], &syn(443)), CONTINUE, Verdict::Allowed),
        ("ipv6 unlisted", v6(BLOCKED_V6, TCP, &[], &syn(443)), DROP, Verdict::Blackholed),
        (
            "ipv6 udp into a CIDR entry",
            v6("2001:db8:1:2::5".parse().unwrap(), UDP, &[], &udp(5, 53, b"q")),
            CONTINUE,
            Verdict::Allowed,
        ),
        (
            "ipv6 udp into a CIDR entry of another prefix length",
            v6("2001:db8:2::9".parse().unwrap(), UDP, &[], &udp(5, 53, b"q")),
            CONTINUE,
            Verdict::Allowed,
        ),
        (
            "ipv6 udp just outside the /64",
            v6("2001:db8:2:1::9".parse().unwrap(), UDP, &[], &udp(5, 53, b"q")),
            DROP,
            Verdict::Blackholed,
        ),
        (
            "ipv6 behind hop-by-hop, routing and destination options",
            v6(ALLOWED_V6, TCP, &[(0, extension(8)), (43, extension(24)), (60, extension(16))], &syn(443)),
            CONTINUE,
            Verdict::Allowed,
        ),
        (
            "ipv6 first fragment",
            v6(ALLOWED_V6, TCP, &[(44, fragment_header(0, true, 1))], &syn(443)),
            CONTINUE,
            Verdict::Allowed,
        ),
        (
            "ipv6 later fragment of a datagram whose first fragment was not allowed",
            v6(ALLOWED_V6, TCP, &[(44, fragment_header(3, false, 2))], &[0; 16]),
            DROP,
            Verdict::Blackholed,
        ),
        ("ipv6 unknown extension header is unmatched", v6(ALLOWED_V6, 253, &[], &[0; 16]), DROP, Verdict::Blackholed),
        (
            "ipv6 more extension headers than are skipped",
            v6(ALLOWED_V6, TCP, &vec![(60, extension(8)); 7], &syn(443)),
            DROP,
            Verdict::Blackholed,
        ),
        (
            "ipv6 neighbour solicitation to the solicited-node multicast address",
            v6("ff02::1:ff00:99".parse().unwrap(), ICMPV6, &[], &[135, 0, 0, 0, 0, 0, 0, 0]),
            CONTINUE,
            Verdict::Ignored,
        ),
        (
            "ipv6 neighbour advertisement to a link-local address",
            v6("fe80::1".parse().unwrap(), ICMPV6, &[], &[136, 0, 0, 0, 0, 0, 0, 0]),
            CONTINUE,
            Verdict::Ignored,
        ),
        (
            "ipv6 multicast listener report",
            v6("ff02::16".parse().unwrap(), ICMPV6, &[], &[143, 0, 0, 0, 0, 0, 0, 0]),
            CONTINUE,
            Verdict::Ignored,
        ),
        (
            "ipv6 neighbour solicitation to a global address is policed like any packet",
            v6(BLOCKED_V6, ICMPV6, &[], &[135, 0, 0, 0, 0, 0, 0, 0]),
            DROP,
            Verdict::Blackholed,
        ),
        (
            "ipv6 router advertisement to a global address is policed like any packet",
            v6(BLOCKED_V6, ICMPV6, &[], &[134, 0, 0, 0, 0, 0, 0, 0]),
            DROP,
            Verdict::Blackholed,
        ),
        (
            "a third vlan tag",
            ethernet(
                0x8100,
                &[7, 8],
                &[[0, 9, 0x08, 0x00].as_slice(), &ipv4(CLIENT, BLOCKED, TCP, &[], 0, &syn(80))].concat(),
            ),
            DROP,
            Verdict::Malformed,
        ),
        (
            "802.1ad inside 802.1q",
            ethernet(
                0x88a8,
                &[7],
                &[[0, 9, 0x08, 0x00].as_slice(), &ipv4(CLIENT, BLOCKED, TCP, &[], 0, &syn(80))].concat(),
            ),
            DROP,
            Verdict::Malformed,
        ),
        (
            "pre-standard q-in-q",
            ethernet(
                0x9100,
                &[],
                &[[0, 9, 0x08, 0x00].as_slice(), &ipv4(CLIENT, BLOCKED, TCP, &[], 0, &syn(80))].concat(),
            ),
            DROP,
            Verdict::Malformed,
        ),
        (
            "mpls",
            ethernet(
                0x8847,
                &[],
                &[[0, 0, 0x11, 0x40].as_slice(), &ipv4(CLIENT, BLOCKED, TCP, &[], 0, &syn(80))].concat(),
            ),
            DROP,
            Verdict::Malformed,
        ),
        (
            "pppoe session",
            ethernet(
                0x8864,
                &[],
                &[[0x11, 0, 0, 1, 0, 42, 0, 0x21].as_slice(), &ipv4(CLIENT, BLOCKED, TCP, &[], 0, &syn(80))].concat(),
            ),
            DROP,
            Verdict::Malformed,
        ),
        ("lldp", ethernet(0x88cc, &[], &[0; 32]), CONTINUE, Verdict::Ignored),
        (
            "ipv6 echo request unlisted",
            v6(BLOCKED_V6, ICMPV6, &[], &[128, 0, 0, 0, 0, 1, 0, 1]),
            DROP,
            Verdict::Blackholed,
        ),
        ("arp", ethernet(0x0806, &[], &[0; 28]), CONTINUE, Verdict::Ignored),
        ("intercepted port with no proxy socket", v4(BLOCKED, TCP, &syn(8080)), DROP, Verdict::Blackholed),
        // (Frames whose IP header itself is cut short are refused by BPF_PROG_TEST_RUN; the same load checks
        // cover them.)
        (
            "ipv4 total length under the header's",
            {
                let mut f = v4(ALLOWED, TCP, &syn(80));
                f[16..18].copy_from_slice(&[0, 8]);
                f
            },
            DROP,
            Verdict::Malformed,
        ),
        ("ipv4 tcp header cut short", v4(ALLOWED, TCP, &syn(80)[..1]), DROP, Verdict::Malformed),
        (
            "ipv4 header length under 20",
            {
                let mut f = v4(ALLOWED, TCP, &syn(80));
                f[14] = 0x44;
                f
            },
            DROP,
            Verdict::Malformed,
        ),
        (
            "ip version 5 in an ipv4 frame",
            {
                let mut f = v4(ALLOWED, TCP, &syn(80));
                f[14] = 0x55;
                f
            },
            DROP,
            Verdict::Malformed,
        ),
        ("ipv6 tcp header cut short", v6(ALLOWED_V6, TCP, &[], &syn(443)[..2]), DROP, Verdict::Malformed),
    ];
    for (name, frame, action, verdict) in cases {
        let (got_action, got_verdict, _) = classifier.run(&frame);
        assert_eq!((got_action, got_verdict), (action, verdict), "{name}");
    }
}

#[test]
fn later_fragments_follow_the_verdict_of_their_first_fragment() {
    let mut classifier = Classifier::load(OutboundMode::RegistryOnly, BlackholeAction::Drop);
    let first = with_ipv4_id(v4_fragment(ALLOWED, 0x2000, &udp(5, 53, &[0; 32])), 0x101);
    let later = with_ipv4_id(v4_fragment(ALLOWED, 0x0005, &[0; 32]), 0x101);
    let stranger = with_ipv4_id(v4_fragment(ALLOWED, 0x0005, &[0; 32]), 0x102);
    // 203.0.113.10 allows TCP 80 only: a UDP datagram to it is blocked, first fragment and later ones alike.
    assert_eq!(classifier.run(&first).1, Verdict::Blackholed);
    assert_eq!(classifier.run(&later).1, Verdict::Blackholed);

    let first = with_ipv4_id(v4_fragment(IN_CIDR, 0x2000, &udp(5, 53, &[0; 32])), 0x103);
    let later = with_ipv4_id(v4_fragment(IN_CIDR, 0x0005, &[0; 32]), 0x103);
    let last = with_ipv4_id(v4_fragment(IN_CIDR, 0x000a, &[0; 32]), 0x103);
    assert_eq!(classifier.run(&first).1, Verdict::Allowed);
    assert_eq!(classifier.run(&later).1, Verdict::Allowed, "same datagram as an allowed first fragment");
    assert_eq!(classifier.run(&last).1, Verdict::Allowed);
    let other = with_ipv4_id(v4_fragment(IN_CIDR, 0x0005, &[0; 32]), 0x104);
    assert_eq!(classifier.run(&other).1, Verdict::Blackholed, "another datagram's later fragment");
    assert_eq!(classifier.run(&stranger).1, Verdict::Blackholed);

    let dst: Ipv6Addr = "2001:db8:1::53".parse().unwrap();
    let first = v6(dst, UDP, &[(44, fragment_header(0, true, 9))], &udp(5, 53, &[0; 32]));
    let later = v6(dst, UDP, &[(44, fragment_header(5, false, 9))], &[0; 32]);
    let other = v6(dst, UDP, &[(44, fragment_header(5, false, 10))], &[0; 32]);
    assert_eq!(classifier.run(&first).1, Verdict::Allowed);
    assert_eq!(classifier.run(&later).1, Verdict::Allowed);
    assert_eq!(classifier.run(&other).1, Verdict::Blackholed);
}

fn v4_fragment(dst: Ipv4Addr, fragment: u16, payload: &[u8]) -> Vec<u8> {
    ethernet(0x0800, &[], &ipv4(CLIENT, dst, UDP, &[], fragment, payload))
}

#[test]
fn a_policy_with_more_prefix_lengths_than_the_datapath_walks_is_refused_whole() {
    let mut classifier = Classifier::load(OutboundMode::RegistryOnly, BlackholeAction::Drop);
    let rules = (8..=20).map(|len| format!("10.0.0.0/{len}:53/udp").parse().unwrap()).collect();
    let policy = DatapathPolicy { mode: OutboundMode::RegistryOnly, rules, ..DatapathPolicy::default() };

    let error = classifier.datapath.apply(&policy).expect_err("13 distinct lengths").to_string();

    assert!(error.contains("IPv4 CIDRs use 13 distinct prefix lengths; the datapath looks up at most 12"), "{error}");
    let (_, verdict, _) = classifier.run(&v4(ALLOWED, TCP, &tcp(40000, 80, TCP_SYN, 1)));
    assert_eq!(verdict, Verdict::Allowed, "the policy in force stays in force");
}

#[test]
fn denied_destinations_are_refused_before_any_entry_and_reported_as_denied() {
    let mut classifier = Classifier::load(OutboundMode::AllowAny, BlackholeAction::Drop);
    let mut events = classifier.datapath.take_events().unwrap();
    let denial = |net: &str, port, sources: &[&str]| KernelDenial {
        net: net.parse().unwrap(),
        port,
        sources: sources.iter().map(|source| source.parse().unwrap()).collect(),
        policy: "istio-system/p".into(),
    };
    let denials = vec![
        // The client's subnet is denied port 80 everywhere; the longer entry for server A's range names another
        // subnet only, and must not shadow the broader one.
        denial("0.0.0.0/0", 80, &["10.240.1.0/24"]),
        denial("203.0.113.0/24", 80, &["192.0.2.0/24"]),
        denial("198.51.100.0/24", 53, &["10.99.0.0/16"]),
        denial("2001:db8::/32", 0, &[]),
        denial("0.0.0.0/0", 5432, &[]),
    ];
    let policy = DatapathPolicy { denials, ..policy(OutboundMode::AllowAny, BlackholeAction::Drop) };
    classifier.datapath.apply(&policy).unwrap();

    let syn = |port| tcp(40000, port, TCP_SYN, 1000);
    let cases: Vec<(&str, Vec<u8>, i32, Verdict)> = vec![
        ("an exact entry's destination, denied on its port", v4(ALLOWED, TCP, &syn(80)), REDIRECT, Verdict::Denied),
        ("the denied range, another port", v4(ALLOWED, TCP, &syn(81)), CONTINUE, Verdict::Passthrough),
        ("denied from another subnet only", v4(IN_CIDR, UDP, &udp(5, 53, b"q")), CONTINUE, Verdict::Allowed),
        ("a port denied everywhere, over UDP", v4(BLOCKED, UDP, &udp(5, 5432, b"q")), REDIRECT, Verdict::Denied),
        (
            "a port denied everywhere, in an always-allowed range",
            v4(Ipv4Addr::new(10, 1, 2, 3), TCP, &syn(5432)),
            CONTINUE,
            Verdict::Allowed,
        ),
        ("ipv6, every port of a range", v6(ALLOWED_V6, TCP, &[], &syn(443)), REDIRECT, Verdict::Denied),
    ];
    for (name, frame, action, verdict) in cases {
        let (got_action, got_verdict, output) = classifier.run(&frame);
        assert_eq!((got_action, got_verdict), (action, verdict), "{name}");
        if got_verdict == Verdict::Denied {
            assert_ne!(output, frame, "{name}: answered (RST, ICMP prohibited), not forwarded");
        }
    }
    let mut reported = Vec::new();
    while let Some(record) = events.next() {
        let flow = BlockedFlow::decode(&record).unwrap();
        reported.push((flow.destination.to_string(), flow.denied));
    }
    let expected =
        [(format!("{ALLOWED}:80"), true), (format!("{BLOCKED}:5432"), true), (format!("[{ALLOWED_V6}]:443"), true)];
    assert_eq!(reported, expected, "each denied flow reported once, as denied");
    assert!(classifier.datapath.blackholed().read().is_empty(), "denied is not blackholed");
}

#[test]
fn allow_any_passes_what_no_entry_matches() {
    let mut classifier = Classifier::load(OutboundMode::AllowAny, BlackholeAction::Drop);
    let (action, verdict, _) = classifier.run(&v4(BLOCKED, TCP, &tcp(40000, 80, TCP_SYN, 1)));
    assert_eq!((action, verdict), (CONTINUE, Verdict::Passthrough));
    let (action, verdict, _) = classifier.run(&v4(BLOCKED, TCP, &[0, 1]));
    assert_eq!((action, verdict), (CONTINUE, Verdict::Malformed), "malformed packets are left to the stack");
    // A port the proxy decides, with no proxy listening (between two agents): not passed by undecided.
    let (action, verdict, _) = classifier.run(&v4(BLOCKED, TCP, &tcp(40000, 8080, TCP_SYN, 1)));
    assert_eq!((action, verdict), (DROP, Verdict::Blackholed), "dropped, for the client to send again");
}

#[test]
fn each_blocked_flow_is_reported_once_and_every_packet_counted() {
    let mut classifier = Classifier::load(OutboundMode::RegistryOnly, BlackholeAction::Drop);
    let mut events = classifier.datapath.take_events().unwrap();
    let other_client = Ipv4Addr::new(10, 240, 1, 3);
    let from = |client: Ipv4Addr, port: u16| {
        ethernet(0x0800, &[], &ipv4(client, BLOCKED, TCP, &[], 0, &tcp(port, 443, TCP_SYN, 1)))
    };
    // Flows interleaved to one destination: the repeated flow is recognised whichever was reported last.
    let sequence = [(CLIENT, 40000, 3), (CLIENT, 40001, 2), (CLIENT, 40000, 2), (other_client, 40000, 1)];
    for (client, port, times) in sequence {
        assert_eq!(classifier.datapath.run_on(&from(client, port), times).unwrap().action, DROP);
    }
    let mut reported = Vec::new();
    while let Some(record) = events.next() {
        let flow = BlockedFlow::decode(&record).unwrap();
        reported.push((flow.source.to_string(), flow.destination.to_string()));
    }
    let expected = ["10.240.1.2:40000", "10.240.1.2:40001", "10.240.1.3:40000"];
    assert_eq!(
        reported,
        expected.map(|source| (source.to_owned(), format!("{BLOCKED}:443"))),
        "one event per flow, in order"
    );
    let destinations = classifier.datapath.blackholed().read();
    assert_eq!(destinations.len(), 1, "{destinations:?}");
    assert_eq!(destinations[0].packets, 8, "every blocked packet is counted against its destination");
}

#[test]
fn a_pinned_map_of_an_earlier_layout_is_replaced_and_used() {
    require_root();
    let bpffs = Bpffs::mount().unwrap();
    let pins = bpffs.pin_dir();
    std::fs::create_dir_all(&pins).unwrap();
    // As an earlier version pinned the blackholed destinations: the same keys, a 16-byte value.
    const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
    let earlier = aya_obj::Map::new_from_params(BPF_MAP_TYPE_LRU_HASH, 20, 16, 4096, 0);
    let path = pins.join(names::BLACKHOLED);
    aya::maps::MapData::create(earlier, names::BLACKHOLED, None).unwrap().pin(&path).unwrap();
    // Another of the same sizes but of another type: a plain hash where an LRU one is wanted.
    const BPF_MAP_TYPE_HASH: u32 = 1;
    let fragments = aya_obj::Map::new_from_params(BPF_MAP_TYPE_HASH, 40, 4, MAX_FRAGMENTED, 0);
    let fragments_path = pins.join(names::FRAGMENTS);
    aya::maps::MapData::create(fragments, names::FRAGMENTS, None).unwrap().pin(&fragments_path).unwrap();

    let mut datapath = Datapath::load(&pins).expect("the classifier loads over the earlier map");
    let pinned = aya::maps::MapInfo::from_pin(&path).unwrap();
    assert_eq!(pinned.value_size() as usize, size_of::<DestinationStats>(), "the pin is this version's map");
    let fragments = aya::maps::MapInfo::from_pin(&fragments_path).unwrap().map_type().unwrap();
    assert_eq!(fragments, aya::maps::MapType::LruHash, "a map of another type is replaced too");
    let policy = DatapathPolicy { mode: OutboundMode::RegistryOnly, ..DatapathPolicy::default() };
    datapath.apply(&policy).unwrap();
    assert_eq!(datapath.run_on(&v4(BLOCKED, TCP, &tcp(40000, 443, TCP_SYN, 1)), 3).unwrap().action, DROP);
    let destinations = datapath.blackholed().read();
    assert_eq!(destinations.iter().map(|d| d.packets).collect::<Vec<_>>(), [3], "and it counts: {destinations:?}");
}

#[test]
fn a_workloads_own_mode_decides_what_no_entry_matches_from_it() {
    let mut classifier = Classifier::load(OutboundMode::RegistryOnly, BlackholeAction::Drop);
    let syn = tcp(40000, 80, TCP_SYN, 1);
    let other_client = Ipv4Addr::new(10, 240, 1, 3);
    let from = |client: Ipv4Addr| ethernet(0x0800, &[], &ipv4(client, BLOCKED, TCP, &[], 0, &syn));
    let from_v6 = v6(BLOCKED_V6, TCP, &[], &syn);
    let modes = BTreeMap::from([(CLIENT.into(), OutboundMode::AllowAny), (CLIENT_V6.into(), OutboundMode::AllowAny)]);
    classifier.datapath.set_source_modes(&modes).unwrap();
    assert_eq!(classifier.run(&from(CLIENT)).1, Verdict::Passthrough, "its Sidecar says ALLOW_ANY");
    assert_eq!(classifier.run(&from_v6).1, Verdict::Passthrough, "IPv6 sources alike");
    assert_eq!(classifier.run(&from(other_client)).1, Verdict::Blackholed, "the others keep the policy's mode");
    assert_eq!(classifier.run(&v4(ALLOWED, TCP, &syn)).1, Verdict::Allowed, "rules still match first");
    classifier.datapath.set_source_modes(&BTreeMap::from([(CLIENT_V6.into(), OutboundMode::AllowAny)])).unwrap();
    assert_eq!(classifier.run(&from(CLIENT)).1, Verdict::Blackholed, "an entry removed is the policy's mode again");
    assert_eq!(classifier.run(&from_v6).1, Verdict::Passthrough);

    let mut classifier = Classifier::load(OutboundMode::AllowAny, BlackholeAction::Drop);
    classifier.datapath.set_source_modes(&BTreeMap::from([(CLIENT.into(), OutboundMode::RegistryOnly)])).unwrap();
    assert_eq!(classifier.run(&from(CLIENT)).0, DROP, "its Sidecar says REGISTRY_ONLY");
    assert_eq!(classifier.run(&from(other_client)).1, Verdict::Passthrough);
}

#[test]
fn garbage_never_upsets_the_classifier() {
    let mut classifier = Classifier::load(OutboundMode::RegistryOnly, BlackholeAction::Reject);
    let mut seed = 0x2545_f491_u32;
    for len in 14..200 {
        // BPF_PROG_TEST_RUN refuses IP frames shorter than their IP header.
        for ethertype in [0x0800u16, 0x86dd, 0x8100].into_iter().filter(|&t| len >= 14 + minimum_l3(t)) {
            let mut frame: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    seed as u8
                })
                .collect();
            frame[12..14].copy_from_slice(&ethertype.to_be_bytes());
            let (action, _, _) = classifier.run(&frame);
            assert!([CONTINUE, DROP, REDIRECT].contains(&action), "len {len}: action {action}");
        }
    }
}

fn minimum_l3(ethertype: u16) -> usize {
    match ethertype {
        0x0800 => 20,
        0x86dd => 40,
        _ => 0,
    }
}

#[test]
fn reject_answers_a_tcp_syn_with_a_valid_reset() {
    let mut classifier = Classifier::load(OutboundMode::RegistryOnly, BlackholeAction::Reject);
    let (action, verdict, reply) = classifier.run(&v4(BLOCKED, TCP, &tcp(40000, 443, TCP_SYN, 1000)));
    assert_eq!((action, verdict), (REDIRECT, Verdict::Blackholed));

    assert_eq!(reply.len(), 14 + 20 + 20);
    assert_eq!(&reply[0..6], &[0x02, 0, 0, 0, 0, 0x01], "sent back to the client's MAC");
    let ip = &reply[14..34];
    assert_eq!(checksum(ip, 0), 0, "valid IPv4 header checksum");
    assert_eq!((&ip[12..16], &ip[16..20]), (&BLOCKED.octets()[..], &CLIENT.octets()[..]));
    let tcp_reply = &reply[34..54];
    assert_eq!(u16::from_be_bytes([tcp_reply[0], tcp_reply[1]]), 443);
    assert_eq!(u16::from_be_bytes([tcp_reply[2], tcp_reply[3]]), 40000);
    assert_eq!(u32::from_be_bytes(tcp_reply[8..12].try_into().unwrap()), 1001, "acknowledges the SYN");
    assert_eq!(tcp_reply[13], TCP_RST | TCP_ACK);
    assert_eq!(checksum(tcp_reply, pseudo_v4(&ip[12..16], &ip[16..20], TCP, 20)), 0, "valid TCP checksum");

    let (action, _, reply) = classifier.run(&v6(BLOCKED_V6, TCP, &[], &tcp(40000, 443, TCP_SYN, 7)));
    assert_eq!(action, REDIRECT);
    let ip = &reply[14..54];
    let tcp_reply = &reply[54..74];
    assert_eq!(tcp_reply[13], TCP_RST | TCP_ACK);
    assert_eq!(checksum(tcp_reply, pseudo_v6(&ip[8..24], &ip[24..40], TCP, 20)), 0, "valid TCP checksum over IPv6");

    let (action, _, _) = classifier.run(&v4(BLOCKED, TCP, &tcp(40000, 443, TCP_RST, 1)));
    assert_eq!(action, DROP, "a reset is never answered");
}

#[test]
fn reject_answers_udp_with_icmp_administratively_prohibited() {
    let mut classifier = Classifier::load(OutboundMode::RegistryOnly, BlackholeAction::Reject);
    let request = ipv4(CLIENT, BLOCKED, UDP, &[], 0, &udp(5000, 6000, b"hello"));
    let (action, _, reply) = classifier.run(&ethernet(0x0800, &[], &request));
    assert_eq!(action, REDIRECT);
    let ip = &reply[14..34];
    assert_eq!(checksum(ip, 0), 0);
    assert_eq!(ip[9], ICMP);
    let icmp = &reply[34..];
    assert_eq!((icmp[0], icmp[1]), (3, 13), "destination unreachable, communication administratively prohibited");
    assert_eq!(checksum(icmp, 0), 0, "valid ICMP checksum");
    assert_eq!(&icmp[8..36], &request[..28], "quotes the original header and 8 bytes");

    let request = ipv6(CLIENT_V6, BLOCKED_V6, UDP, &[], &udp(5000, 6000, b"hello"));
    let (action, _, reply) = classifier.run(&ethernet(0x86dd, &[], &request));
    assert_eq!(action, REDIRECT);
    let ip = &reply[14..54];
    let icmp = &reply[54..];
    assert_eq!((ip[6], icmp[0], icmp[1]), (ICMPV6, 1, 1));
    assert_eq!(checksum(icmp, pseudo_v6(&ip[8..24], &ip[24..40], ICMPV6, icmp.len())), 0, "valid ICMPv6 checksum");
}
