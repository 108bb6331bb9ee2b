//! Packet parsing: Ethernet (with up to two VLAN tags: 802.1Q, or 802.1ad outside 802.1Q), IPv4 with options and
//! fragments, IPv6 with extension headers, and the L4 ports. Every read is bounds-checked by the kernel
//! (`bpf_skb_load_bytes`). Encapsulations it does not read — a third tag, other tag orders, MPLS, PPPoE — could
//! carry IP past the policy, so they are malformed (blackholed in REGISTRY_ONLY); other non-IP frames (ARP, LLDP)
//! go on.

use aya_ebpf::programs::TcContext;
use sluice_common::{FAMILY_V4, FAMILY_V6};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
/// The pre-standard QinQ tag.
const ETH_P_QINQ: u16 = 0x9100;
const ETH_P_MPLS_UC: u16 = 0x8847;
const ETH_P_MPLS_MC: u16 = 0x8848;
const ETH_P_PPP_DISC: u16 = 0x8863;
const ETH_P_PPP_SES: u16 = 0x8864;

const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_DSTOPTS: u8 = 60;
const IPPROTO_SCTP: u8 = 132;

/// IPv6 extension headers skipped before the rest counts as an unknown protocol.
const MAX_IPV6_EXTENSIONS: usize = 6;

/// The packet could not be parsed far enough to classify it.
pub struct Malformed;

/// One IP packet's flow. IPv4 addresses sit in the first 4 bytes of `src` and `dst`, the rest zero. Ports are
/// in host byte order, 0 where the protocol has none or the packet carries no L4 header (non-first fragments).
pub struct Flow {
    pub family: u8,
    pub proto: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
    /// Offset of the IP header.
    pub l3: usize,
    /// Offset of the L4 header; meaningful only when `first_fragment`.
    pub l4: usize,
    pub first_fragment: bool,
    /// Whether the packet is one fragment of a datagram (first or later), and the datagram's identification.
    pub fragmented: bool,
    pub fragment_id: u32,
}

pub enum Packet {
    Ip(Flow),
    /// Not IP, or IPv6 link control (neighbour discovery, MLD) that must always flow.
    Other,
}

#[inline(always)]
fn load<T>(ctx: &TcContext, offset: usize) -> Result<T, Malformed> {
    ctx.load::<T>(offset).map_err(|_| Malformed)
}

/// Reads a header of `N` (at least 2) bytes at `offset`: straight from the packet when it lies in the linear
/// part, with no helper call, else through `bpf_skb_load_bytes`, which also reaches paged data.
#[inline(always)]
fn read_header<const N: usize>(ctx: &TcContext, offset: usize) -> Result<[u8; N], Malformed> {
    let start = ctx.data();
    let end = ctx.data_end();
    if offset < 4096 && start + offset + N <= end {
        // SAFETY: the read lies within the packet's linear data, checked just above.
        return Ok(unsafe { core::ptr::read_unaligned((start + offset) as *const [u8; N]) });
    }
    load(ctx, offset)
}

#[inline(always)]
pub fn load_be16(ctx: &TcContext, offset: usize) -> Result<u16, Malformed> {
    Ok(u16::from_be_bytes(read_header::<2>(ctx, offset)?))
}

pub fn packet(ctx: &TcContext) -> Result<Packet, Malformed> {
    let mut offset = 12;
    let mut ethertype = load_be16(ctx, offset)?;
    // Up to two tags (802.1ad outer, 802.1Q inner).
    if ethertype == ETH_P_8021AD || ethertype == ETH_P_8021Q {
        offset += 4;
        ethertype = load_be16(ctx, offset)?;
    }
    if ethertype == ETH_P_8021Q {
        offset += 4;
        ethertype = load_be16(ctx, offset)?;
    }
    let l3 = offset + 2;
    match ethertype {
        ETH_P_IP => ipv4(ctx, l3),
        ETH_P_IPV6 => ipv6(ctx, l3),
        ETH_P_8021Q | ETH_P_8021AD | ETH_P_QINQ | ETH_P_MPLS_UC | ETH_P_MPLS_MC | ETH_P_PPP_DISC | ETH_P_PPP_SES => {
            Err(Malformed)
        }
        _ => Ok(Packet::Other),
    }
}

// Headers are read whole, one helper call each: the calls, not the bytes, are what a packet costs.
#[inline(never)]
fn ipv4(ctx: &TcContext, l3: usize) -> Result<Packet, Malformed> {
    let header: [u8; 20] = read_header(ctx, l3)?;
    let header_len = usize::from(header[0] & 0x0f) * 4;
    if header[0] >> 4 != 4 || header_len < 20 {
        return Err(Malformed);
    }
    if usize::from(u16::from_be_bytes([header[2], header[3]])) < header_len {
        return Err(Malformed);
    }
    let fragment = u16::from_be_bytes([header[6], header[7]]);
    let mut flow = Flow {
        family: FAMILY_V4,
        proto: header[9],
        src: [0; 16],
        dst: [0; 16],
        src_port: 0,
        dst_port: 0,
        l3,
        l4: l3 + header_len,
        first_fragment: fragment & 0x1fff == 0,
        // More fragments follow, or this is not the first.
        fragmented: fragment & 0x3fff != 0,
        fragment_id: u32::from(u16::from_be_bytes([header[4], header[5]])),
    };
    flow.src[..4].copy_from_slice(&header[12..16]);
    flow.dst[..4].copy_from_slice(&header[16..20]);
    ports(ctx, &mut flow)?;
    Ok(Packet::Ip(flow))
}

#[inline(never)]
fn ipv6(ctx: &TcContext, l3: usize) -> Result<Packet, Malformed> {
    let header: [u8; 40] = read_header(ctx, l3)?;
    if header[0] >> 4 != 6 {
        return Err(Malformed);
    }
    let mut next = header[6];
    let mut flow = Flow {
        family: FAMILY_V6,
        proto: 0,
        src: [0; 16],
        dst: [0; 16],
        src_port: 0,
        dst_port: 0,
        l3,
        l4: l3 + 40,
        first_fragment: true,
        fragmented: false,
        fragment_id: 0,
    };
    flow.src.copy_from_slice(&header[8..24]);
    flow.dst.copy_from_slice(&header[24..40]);
    for _ in 0..MAX_IPV6_EXTENSIONS {
        if !matches!(next, IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_FRAGMENT | IPPROTO_AH) {
            break;
        }
        let extension: [u8; 4] = read_header(ctx, flow.l4)?;
        let header_len = match next {
            IPPROTO_FRAGMENT => {
                flow.first_fragment = u16::from_be_bytes([extension[2], extension[3]]) & 0xfff8 == 0;
                flow.fragmented = true;
                flow.fragment_id = u32::from_be_bytes(read_header::<4>(ctx, flow.l4 + 4)?);
                8
            }
            IPPROTO_AH => (usize::from(extension[1]) + 2) * 4,
            _ => (usize::from(extension[1]) + 1) * 8,
        };
        next = extension[0];
        flow.l4 += header_len;
    }
    // More extension headers than are skipped leave an extension header as the protocol: it matches no L4
    // entry, so the packet is treated as unmatched.
    flow.proto = next;
    if next == IPPROTO_ICMPV6 && flow.first_fragment {
        // Router/neighbour discovery and multicast listener messages keep the link working: to link-local and
        // multicast destinations only, so that the types carry nothing past the policy to anywhere else.
        let icmp_type: u8 = load(ctx, flow.l4)?;
        if matches!(icmp_type, 130..=137 | 143) && is_link_scope(load_be16(ctx, l3 + 24)?) {
            return Ok(Packet::Other);
        }
    }
    ports(ctx, &mut flow)?;
    Ok(Packet::Ip(flow))
}

/// Whether an IPv6 address whose first 16 bits are `prefix` is link-local unicast (fe80::/10) or multicast
/// (ff00::/8): where link control goes. (The bits are read again from the packet rather than taken from the
/// flow's copy, so that the verifier learns nothing of the destination the lookups later use.)
#[inline(always)]
fn is_link_scope(prefix: u16) -> bool {
    prefix & 0xff00 == 0xff00 || prefix & 0xffc0 == 0xfe80
}

#[inline(always)]
fn ports(ctx: &TcContext, flow: &mut Flow) -> Result<(), Malformed> {
    if flow.first_fragment && matches!(flow.proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP) {
        let ports: [u8; 4] = read_header(ctx, flow.l4)?;
        flow.src_port = u16::from_be_bytes([ports[0], ports[1]]);
        flow.dst_port = u16::from_be_bytes([ports[2], ports[3]]);
    }
    Ok(())
}
