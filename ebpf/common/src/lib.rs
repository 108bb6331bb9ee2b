//! Map keys, values and constants shared by the eBPF classifier and the agent: the one contract between them.
//!
//! Policy maps hold two generations side by side: every key carries the generation it belongs to. The agent
//! writes the inactive generation whole, switches `SLUICE_ACTIVE` to it, waits until no packet can still be
//! using the old one, then deletes the old generation's keys. Packets never see a half-written policy.
#![no_std]

/// Names of the maps and programs in the eBPF object (kernel-visible names stay within 15 bytes).
pub mod names {
    pub const PROGRAM: &str = "sluice_ingress";
    pub const ACTIVE: &str = "SLUICE_ACTIVE";
    pub const CONFIG: &str = "SLUICE_CONFIG";
    pub const EXACT_V4: &str = "SLUICE_EXACT4";
    pub const EXACT_V6: &str = "SLUICE_EXACT6";
    pub const CIDR_V4: &str = "SLUICE_CIDR4";
    pub const CIDR_V6: &str = "SLUICE_CIDR6";
    pub const ALLOW_V4: &str = "SLUICE_ALLOW4";
    pub const ALLOW_V6: &str = "SLUICE_ALLOW6";
    pub const PORTS: &str = "SLUICE_PORTS";
    pub const COUNTERS: &str = "SLUICE_COUNTERS";
    pub const BLACKHOLED: &str = "SLUICE_BLACKHOL";
    pub const FLOWS: &str = "SLUICE_FLOWS";
    pub const EVENTS: &str = "SLUICE_EVENTS";
    pub const FRAGMENTS: &str = "SLUICE_FRAGS";
    pub const SOURCES: &str = "SLUICE_SOURCES";
    /// One u32: non-zero while `SOURCES` holds entries, so that packets look it up only then.
    pub const SOURCES_IN_USE: &str = "SLUICE_SRCUSED";
    pub const DENY_V4: &str = "SLUICE_DENY4";
    pub const DENY_V6: &str = "SLUICE_DENY6";
    pub const DENY_SOURCES_V4: &str = "SLUICE_DENYSRC4";
    pub const DENY_SOURCES_V6: &str = "SLUICE_DENYSRC6";
    /// The kernel relay's stream verdict and its maps (not pinned: their sockets end with the agent).
    pub const RELAY_PROGRAM: &str = "sluice_relay";
    pub const RELAY_SOCKETS: &str = "SLUICE_RSOCKS";
    pub const RELAY_DIRECTIONS: &str = "SLUICE_RDIRS";
    pub const RELAY_WRITTEN: &str = "SLUICE_RWRITTEN";
    /// The relay's globals: where `bytes_acked` and `copied_seq` lie in the kernel's `struct tcp_sock`.
    pub const RELAY_BYTES_ACKED_AT: &str = "SLUICE_TCP_BYTES_ACKED_AT";
    pub const RELAY_COPIED_SEQ_AT: &str = "SLUICE_TCP_COPIED_SEQ_AT";
    /// Every map, for pinning and cleanup.
    pub const MAPS: [&str; 20] = [
        ACTIVE,
        CONFIG,
        EXACT_V4,
        EXACT_V6,
        CIDR_V4,
        CIDR_V6,
        ALLOW_V4,
        ALLOW_V6,
        PORTS,
        COUNTERS,
        BLACKHOLED,
        FLOWS,
        EVENTS,
        FRAGMENTS,
        SOURCES,
        SOURCES_IN_USE,
        DENY_V4,
        DENY_V6,
        DENY_SOURCES_V4,
        DENY_SOURCES_V6,
    ];
}

/// Policy entries one generation may hold in each map; maps are sized for two generations.
pub const MAX_RULES: u32 = 131_072;
/// Destinations tracked in the blackholed-destinations map (least recently seen are evicted).
pub const MAX_BLACKHOLED: u32 = 4096;
/// Flows remembered to tell a flow's first blocked packet from the rest (least recently seen are evicted).
pub const MAX_FLOWS: u32 = 65_536;
/// Fragmented datagrams whose first fragment was allowed, remembered so their later fragments (which carry no
/// ports) are allowed too (least recently seen are evicted).
pub const MAX_FRAGMENTED: u32 = 16_384;
/// Workloads whose own outbound traffic policy (a Sidecar's) differs from the policy's mode.
pub const MAX_SOURCES: u32 = 65_536;
/// Bytes of the blocked-flow event ring buffer.
pub const EVENTS_BYTES: u32 = 256 * 1024;

/// `DatapathConfig::mode`: unmatched traffic passes (Istio's PassthroughCluster).
pub const MODE_ALLOW_ANY: u32 = 0;
/// `DatapathConfig::mode`: unmatched traffic is blackholed in the kernel.
pub const MODE_REGISTRY_ONLY: u32 = 1;

/// `DatapathConfig::blackhole`: drop silently.
pub const BLACKHOLE_DROP: u32 = 0;
/// `DatapathConfig::blackhole`: answer TCP with a RST, other protocols with ICMP administratively prohibited.
pub const BLACKHOLE_REJECT: u32 = 1;

/// What the classifier does with what no rule matches, and where intercepted flows go. One per generation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DatapathConfig {
    pub mode: u32,
    pub blackhole: u32,
    /// The transparent proxy listener's port, in host byte order; 0 when there is none.
    pub proxy_port: u16,
    /// `FLAG_*` bits.
    pub flags: u16,
    /// The mark set on intercepted packets, which the agent's policy routing delivers locally.
    pub mark: u32,
    /// `TABLE_*` bits of the maps that hold entries in this generation: empty ones are not looked up.
    pub tables: u32,
    /// How many prefix lengths `cidr_lengths_v4` and `cidr_lengths_v6` hold.
    pub cidr_count_v4: u8,
    pub cidr_count_v6: u8,
    pub _pad2: [u8; 2],
    /// The prefix lengths of the IPv4 CIDR entries, longest first: only those are looked up.
    pub cidr_lengths_v4: [u8; MAX_CIDR_LENGTHS],
    /// The prefix lengths of the IPv6 CIDR entries, longest first.
    pub cidr_lengths_v6: [u8; MAX_CIDR_LENGTHS],
}

/// Distinct CIDR prefix lengths a policy may use per address family (one hash lookup each, at most).
pub const MAX_CIDR_LENGTHS: usize = 12;

pub const TABLE_EXACT_V4: u32 = 1 << 0;
pub const TABLE_EXACT_V6: u32 = 1 << 1;
pub const TABLE_CIDR_V4: u32 = 1 << 2;
pub const TABLE_CIDR_V6: u32 = 1 << 3;
pub const TABLE_ALLOW_V4: u32 = 1 << 4;
pub const TABLE_ALLOW_V6: u32 = 1 << 5;
pub const TABLE_PORTS: u32 = 1 << 6;
pub const TABLE_DENY_V4: u32 = 1 << 7;
pub const TABLE_DENY_V6: u32 = 1 << 8;

/// `DatapathConfig::flags`: TCP that no entry matches goes to the proxy rather than through (ALLOW_ANY), so that
/// the AuthorizationPolicies governing the workloads decide it.
pub const FLAG_UNMATCHED_TCP_TO_PROXY: u16 = 1 << 0;

/// `Rule::action`: forward in the kernel.
pub const ACTION_PASS: u32 = 1;
/// `Rule::action`: hand to the agent's transparent proxy.
pub const ACTION_INTERCEPT: u32 = 2;

/// The value of a policy entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    pub action: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns()` after which the entry no longer matches (entries learnt from DNS); 0 = never.
    pub expires_ns: u64,
}

/// Bits of an always-allowed key that precede the address: generation and padding.
pub const ALLOW_KEY_HEADER_BITS: u32 = 32;

/// Key of an exact IPv4 destination entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct L4V4 {
    pub proto: u8,
    pub generation: u8,
    /// Destination port in network byte order.
    pub port: [u8; 2],
    pub addr: [u8; 4],
}

/// Key of an exact IPv6 destination entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct L4V6 {
    pub proto: u8,
    pub generation: u8,
    pub port: [u8; 2],
    pub addr: [u8; 16],
}

/// Key of an IPv4 CIDR entry: looked up once per prefix length present, with the address masked to it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CidrV4 {
    pub proto: u8,
    pub generation: u8,
    /// Destination port in network byte order.
    pub port: [u8; 2],
    pub prefix_len: u8,
    pub _pad: [u8; 3],
    pub addr: [u8; 4],
}

/// Key of an IPv6 CIDR entry (see [`CidrV4`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CidrV6 {
    pub proto: u8,
    pub generation: u8,
    pub port: [u8; 2],
    pub prefix_len: u8,
    pub _pad: [u8; 3],
    pub addr: [u8; 16],
}

/// `addr` with the bits past `prefix_len` cleared (IPv4).
#[inline(always)]
pub fn mask_v4(addr: [u8; 4], prefix_len: u32) -> [u8; 4] {
    let mask = if prefix_len == 0 { 0 } else { u32::MAX << (32 - prefix_len.min(32)) };
    (u32::from_be_bytes(addr) & mask).to_be_bytes()
}

/// `addr` with the bits past `prefix_len` cleared (IPv6).
#[inline(always)]
pub fn mask_v6(addr: [u8; 16], prefix_len: u32) -> [u8; 16] {
    let prefix_len = prefix_len.min(128);
    let mut high = [0u8; 8];
    let mut low = [0u8; 8];
    high.copy_from_slice(&addr[..8]);
    low.copy_from_slice(&addr[8..]);
    let high_mask = if prefix_len == 0 {
        0
    } else if prefix_len >= 64 {
        u64::MAX
    } else {
        u64::MAX << (64 - prefix_len)
    };
    let low_mask = if prefix_len <= 64 { 0 } else { u64::MAX << (128 - prefix_len) };
    let high = (u64::from_be_bytes(high) & high_mask).to_be_bytes();
    let low = (u64::from_be_bytes(low) & low_mask).to_be_bytes();
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&high);
    out[8..].copy_from_slice(&low);
    out
}

/// LPM key data of an IPv4 always-allowed range; prefix length `ALLOW_KEY_HEADER_BITS + the address prefix`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AllowV4 {
    pub generation: u8,
    pub _pad: [u8; 3],
    pub addr: [u8; 4],
}

/// LPM key data of an IPv6 always-allowed range (see [`AllowV4`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AllowV6 {
    pub generation: u8,
    pub _pad: [u8; 3],
    pub addr: [u8; 16],
}

/// Bits of a deny key that precede the address: generation, padding and port.
pub const DENY_KEY_HEADER_BITS: u32 = 32;

/// LPM key data of an IPv4 denied destination (an AuthorizationPolicy DENY rule that needs only addresses and
/// ports); prefix length `DENY_KEY_HEADER_BITS + the address prefix`. Port 0: every port and protocol. The value
/// says from which sources: `DENY_ANY_SOURCE`, or the id of a set of source ranges (`DenySourceV4`/`V6` keys).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DenyV4 {
    pub generation: u8,
    pub _pad: u8,
    /// Destination port in network byte order; 0 for any.
    pub port: [u8; 2],
    pub addr: [u8; 4],
}

/// LPM key data of an IPv6 denied destination (see [`DenyV4`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DenyV6 {
    pub generation: u8,
    pub _pad: u8,
    pub port: [u8; 2],
    pub addr: [u8; 16],
}

/// A denied destination's value: from every source.
pub const DENY_ANY_SOURCE: u32 = 0;

/// LPM key data of an IPv4 source range in a deny entry's source set; prefix length `DENY_KEY_HEADER_BITS + the
/// address prefix`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DenySourceV4 {
    pub generation: u8,
    pub _pad: u8,
    /// The set's id, in network byte order (the trie compares it byte by byte).
    pub set: [u8; 2],
    pub addr: [u8; 4],
}

/// LPM key data of an IPv6 source range in a deny entry's source set (see [`DenySourceV4`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DenySourceV6 {
    pub generation: u8,
    pub _pad: u8,
    pub set: [u8; 2],
    pub addr: [u8; 16],
}

/// Key of a port-wide entry: every destination on this protocol and port (the proxy's HTTP ports).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortKey {
    pub proto: u8,
    pub generation: u8,
    pub port: [u8; 2],
}

/// What the classifier decided for one packet; indexes the counters.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed at L4 by an entry or an always-allowed range; forwarded by the kernel.
    Allowed = 0,
    /// Unmatched in ALLOW_ANY; forwarded by the kernel (PassthroughCluster).
    Passthrough = 1,
    /// Handed to the agent's transparent proxy.
    Intercepted = 2,
    /// Unmatched in REGISTRY_ONLY; dropped or rejected in the kernel (BlackHoleCluster).
    Blackholed = 3,
    /// Not IP, or link control (neighbour discovery, MLD); left to the rest of the stack.
    Ignored = 4,
    /// Too short or inconsistent to classify: dropped in REGISTRY_ONLY, left to the stack in ALLOW_ANY.
    Malformed = 5,
    /// Denied by an AuthorizationPolicy compiled into the kernel; refused (TCP RST, ICMP prohibited).
    Denied = 6,
}

pub const VERDICT_COUNT: u32 = 7;

impl Verdict {
    pub const ALL: [Verdict; VERDICT_COUNT as usize] = [
        Verdict::Allowed,
        Verdict::Passthrough,
        Verdict::Intercepted,
        Verdict::Blackholed,
        Verdict::Ignored,
        Verdict::Malformed,
        Verdict::Denied,
    ];

    /// The label the agent exports for this verdict.
    pub const fn label(self) -> &'static str {
        match self {
            Verdict::Allowed => "allowed",
            Verdict::Passthrough => "passthrough",
            Verdict::Intercepted => "intercepted",
            Verdict::Blackholed => "blackholed",
            Verdict::Ignored => "ignored",
            Verdict::Malformed => "malformed",
            Verdict::Denied => "denied",
        }
    }
}

/// Per-CPU packet and byte counts of one verdict.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// `family` of keys and events that hold either address family in 16 bytes.
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// A blackholed destination. IPv4 addresses sit in the first 4 bytes of `addr`, the rest zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DestinationKey {
    pub addr: [u8; 16],
    pub family: u8,
    pub proto: u8,
    /// Destination port in network byte order.
    pub port: [u8; 2],
}

/// How often a destination was blackholed, and when last.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DestinationStats {
    pub packets: u64,
    /// `bpf_jiffies64()` of the last packet (the kernel's tick count, cheap enough to read per packet).
    pub last_seen_jiffies: u64,
    /// The source address and port of the flow to this destination reported last, `bpf_ktime_get_coarse_ns()`
    /// when it was, and `bpf_jiffies64()` when that was last checked: while packets of that flow keep coming,
    /// neither the flows map nor the clock is consulted.
    pub reported_src: [u8; 16],
    pub reported_src_port: [u8; 2],
    pub _pad: [u8; 6],
    pub reported_ns: u64,
    pub checked_jiffies: u64,
}

/// A workload's address, whose traffic that no rule matches follows its own mode (`MODE_*`, the value) rather
/// than the generation's: a Sidecar's `outboundTrafficPolicy`. IPv4 addresses in the first 4 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SourceKey {
    pub addr: [u8; 16],
    pub family: u8,
    pub _pad: [u8; 3],
}

/// Sockets the kernel relay may hold at once (two per relayed connection).
pub const MAX_RELAYED_SOCKETS: u32 = 65_536;
/// Bytes a relayed direction may have handed to its peer socket that the far end has not acknowledged yet: past
/// it, segments are left to the proxy, whose socket then closes the sender's window (the kernel's own queue in
/// front of the peer does not push back).
pub const RELAY_UNACKED_LIMIT: u64 = 4 << 20;

/// One direction of a connection the kernel relays, keyed by the socket cookie of the socket it arrives on.
/// `peer`, `acked_base` are the agent's, written before the socket joins the relay; the counts are the stream
/// verdict's alone (it runs for one socket at a time).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayDirection {
    /// The cookie of the socket the bytes go out on.
    pub peer: u64,
    /// The peer's `tcpi_bytes_acked` when the relay began.
    pub acked_base: u64,
    /// Bytes handed to the peer in the kernel.
    pub redirected: u64,
    /// Bytes left to the proxy (it reads them from the socket and writes them on).
    pub passed: u64,
    /// Bytes the verdict cut from the front of segments because the stream had already carried them: a
    /// retransmission that overlaps what arrived before is queued whole, and the kernel hands it whole.
    pub trimmed: u64,
    /// The sequence number of the next byte of the stream (the end of the last segment seen); valid once
    /// `sequenced` is 1 — the verdict takes it from the socket's `copied_seq` at its first segment.
    pub next_seq: u32,
    pub sequenced: u32,
    /// Segments that began past `next_seq` (a gap the receive queue should never hold): counted, not trimmed.
    pub gaps: u32,
    /// 1 once the verdict met a segment it could not trim and dropped it: the agent resets the connection.
    pub broken: u32,
}

/// A flow (5-tuple); IPv4 addresses in the first 4 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub src_port: [u8; 2],
    pub dst_port: [u8; 2],
    pub family: u8,
    pub proto: u8,
    pub _pad: [u8; 2],
}

/// A fragmented datagram: addresses, protocol and IP identification; IPv4 addresses in the first 4 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragmentKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub id: u32,
    pub family: u8,
    pub proto: u8,
    pub _pad: [u8; 2],
}

/// The first blocked packet of a flow, sent to the agent through the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockedFlowEvent {
    pub flow: FlowKey,
    pub timestamp_ns: u64,
    /// `Verdict::Blackholed` or `Verdict::Denied`, as a number.
    pub verdict: u32,
    pub _pad: u32,
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: plain #[repr(C)] data with explicit padding and no invalid bit patterns.
    unsafe impl aya::Pod for DatapathConfig {}
    unsafe impl aya::Pod for Rule {}
    unsafe impl aya::Pod for L4V4 {}
    unsafe impl aya::Pod for L4V6 {}
    unsafe impl aya::Pod for AllowV4 {}
    unsafe impl aya::Pod for AllowV6 {}
    unsafe impl aya::Pod for PortKey {}
    unsafe impl aya::Pod for Counter {}
    unsafe impl aya::Pod for DestinationKey {}
    unsafe impl aya::Pod for DestinationStats {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for BlockedFlowEvent {}
    unsafe impl aya::Pod for FragmentKey {}
    unsafe impl aya::Pod for SourceKey {}
    unsafe impl aya::Pod for CidrV4 {}
    unsafe impl aya::Pod for CidrV6 {}
    unsafe impl aya::Pod for DenyV4 {}
    unsafe impl aya::Pod for DenyV6 {}
    unsafe impl aya::Pod for DenySourceV4 {}
    unsafe impl aya::Pod for DenySourceV6 {}
    unsafe impl aya::Pod for RelayDirection {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_clear_the_bits_past_the_prefix() {
        assert_eq!(mask_v4([203, 0, 113, 77], 24), [203, 0, 113, 0]);
        assert_eq!(mask_v4([203, 0, 113, 77], 28), [203, 0, 113, 64]);
        assert_eq!(mask_v4([203, 0, 113, 77], 32), [203, 0, 113, 77]);
        assert_eq!(mask_v4([203, 0, 113, 77], 0), [0, 0, 0, 0]);
        let addr = [0x20, 0x01, 0x0d, 0xb8, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];
        assert_eq!(mask_v6(addr, 0), [0; 16]);
        assert_eq!(mask_v6(addr, 32), [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(mask_v6(addr, 64), [0x20, 0x01, 0x0d, 0xb8, 1, 2, 3, 4, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(mask_v6(addr, 68), [0x20, 0x01, 0x0d, 0xb8, 1, 2, 3, 4, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(mask_v6(addr, 72), [0x20, 0x01, 0x0d, 0xb8, 1, 2, 3, 4, 5, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(mask_v6(addr, 128), addr);
    }
}
