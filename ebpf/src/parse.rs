//! Packet parsing: Ethernet (with up to two VLAN tags), IPv4 with options, IPv6 with extension headers, L4 ports.

use aya_ebpf::programs::TcContext;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_DSTOPTS: u8 = 60;
const IPPROTO_SCTP: u8 = 132;

/// How many IPv6 extension headers are skipped before the packet counts as malformed.
const MAX_IPV6_EXTENSIONS: usize = 4;

/// The packet could not be parsed far enough to classify it.
pub struct Malformed;

/// Where an IP packet is going. `port` is 0 where the protocol has none or the packet carries no L4 header
/// (non-first fragments).
pub enum Destination {
    V4 { addr: [u8; 4], proto: u8, port: u16 },
    V6 { addr: [u8; 16], proto: u8, port: u16 },
}

pub enum Packet {
    Ip(Destination),
    /// Not IP, or IPv6 link control (neighbour discovery, MLD) that must always flow.
    Other,
}

#[inline(always)]
fn load<T>(ctx: &TcContext, offset: usize) -> Result<T, Malformed> {
    ctx.load::<T>(offset).map_err(|_| Malformed)
}

#[inline(always)]
fn load_be16(ctx: &TcContext, offset: usize) -> Result<u16, Malformed> {
    Ok(u16::from_be_bytes(load::<[u8; 2]>(ctx, offset)?))
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
        _ => Ok(Packet::Other),
    }
}

fn ipv4(ctx: &TcContext, l3: usize) -> Result<Packet, Malformed> {
    let version_ihl: u8 = load(ctx, l3)?;
    let header_len = usize::from(version_ihl & 0x0f) * 4;
    if version_ihl >> 4 != 4 || header_len < 20 {
        return Err(Malformed);
    }
    let fragment = load_be16(ctx, l3 + 6)?;
    let proto: u8 = load(ctx, l3 + 9)?;
    let addr: [u8; 4] = load(ctx, l3 + 16)?;
    let first_fragment = fragment & 0x1fff == 0;
    let port = if first_fragment { dst_port(ctx, proto, l3 + header_len)? } else { 0 };
    Ok(Packet::Ip(Destination::V4 { addr, proto, port }))
}

fn ipv6(ctx: &TcContext, l3: usize) -> Result<Packet, Malformed> {
    let version: u8 = load(ctx, l3)?;
    if version >> 4 != 6 {
        return Err(Malformed);
    }
    let mut next: u8 = load(ctx, l3 + 6)?;
    let addr: [u8; 16] = load(ctx, l3 + 24)?;
    let mut offset = l3 + 40;
    let mut first_fragment = true;
    for _ in 0..MAX_IPV6_EXTENSIONS {
        let header_len = match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => (usize::from(load::<u8>(ctx, offset + 1)?) + 1) * 8,
            IPPROTO_FRAGMENT => {
                first_fragment = load_be16(ctx, offset + 2)? & 0xfff8 == 0;
                8
            }
            IPPROTO_AH => (usize::from(load::<u8>(ctx, offset + 1)?) + 2) * 4,
            _ => break,
        };
        next = load(ctx, offset)?;
        offset += header_len;
    }
    if matches!(next, IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_FRAGMENT | IPPROTO_AH) {
        return Err(Malformed);
    }
    if next == IPPROTO_ICMPV6 && first_fragment {
        // Router/neighbour discovery and multicast listener messages keep the link working.
        let icmp_type: u8 = load(ctx, offset)?;
        if matches!(icmp_type, 130..=137 | 143) {
            return Ok(Packet::Other);
        }
    }
    let port = if first_fragment { dst_port(ctx, next, offset)? } else { 0 };
    Ok(Packet::Ip(Destination::V6 { addr, proto: next, port }))
}

#[inline(always)]
fn dst_port(ctx: &TcContext, proto: u8, l4: usize) -> Result<u16, Malformed> {
    match proto {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => load_be16(ctx, l4 + 2),
        _ => Ok(0),
    }
}
