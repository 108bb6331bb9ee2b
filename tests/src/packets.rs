//! Crafted Ethernet frames for running the classifier on exact bytes (`BPF_PROG_TEST_RUN`).

use std::net::{Ipv4Addr, Ipv6Addr};

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_RST: u8 = 0x04;

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const GATEWAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// An Ethernet frame from the client to the gateway, with `vlans` 802.1Q tags (the outer one 802.1ad when
/// there are two).
pub fn ethernet(ethertype: u16, vlans: &[u16], payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(14 + 4 * vlans.len() + payload.len());
    frame.extend(GATEWAY_MAC);
    frame.extend(CLIENT_MAC);
    for (i, vlan) in vlans.iter().enumerate() {
        let tpid: u16 = if vlans.len() == 2 && i == 0 { 0x88a8 } else { 0x8100 };
        frame.extend(tpid.to_be_bytes());
        frame.extend(vlan.to_be_bytes());
    }
    frame.extend(ethertype.to_be_bytes());
    frame.extend(payload);
    frame
}

/// An IPv4 packet with `options` (a multiple of 4 bytes) and the fragment field `fragment` (flags and offset).
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, options: &[u8], fragment: u16, payload: &[u8]) -> Vec<u8> {
    let header_len = 20 + options.len();
    let total = (header_len + payload.len()) as u16;
    let mut packet = vec![0x40 | (header_len / 4) as u8, 0];
    packet.extend(total.to_be_bytes());
    packet.extend([0x12, 0x34]);
    packet.extend(fragment.to_be_bytes());
    packet.extend([64, proto, 0, 0]);
    packet.extend(src.octets());
    packet.extend(dst.octets());
    packet.extend(options);
    let sum = checksum(&packet, 0);
    packet[10..12].copy_from_slice(&sum.to_be_bytes());
    packet.extend(payload);
    packet
}

/// An IPv6 packet; `extensions` are (next header value of the extension, its bytes) in order.
pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, extensions: &[(u8, Vec<u8>)], payload: &[u8]) -> Vec<u8> {
    let mut chain = Vec::new();
    let first = extensions.first().map(|(kind, _)| *kind).unwrap_or(proto);
    for (i, (_, bytes)) in extensions.iter().enumerate() {
        let next = extensions.get(i + 1).map(|(kind, _)| *kind).unwrap_or(proto);
        let mut header = bytes.clone();
        header[0] = next;
        chain.extend(header);
    }
    let mut packet = vec![0x60, 0, 0, 0];
    packet.extend(((chain.len() + payload.len()) as u16).to_be_bytes());
    packet.extend([first, 64]);
    packet.extend(src.octets());
    packet.extend(dst.octets());
    packet.extend(chain);
    packet.extend(payload);
    packet
}

/// An IPv6 extension header of `len` bytes (a multiple of 8) with its length field set; byte 0 is filled in by
/// [`ipv6`].
pub fn extension(len: usize) -> Vec<u8> {
    let mut header = vec![0u8; len];
    header[1] = (len / 8 - 1) as u8;
    header
}

/// An IPv6 fragment header with the given offset (in 8-byte units), more-fragments flag and identification.
pub fn fragment_header(offset: u16, more: bool, id: u32) -> Vec<u8> {
    let mut header = vec![0u8; 8];
    header[2..4].copy_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
    header[4..8].copy_from_slice(&id.to_be_bytes());
    header
}

/// `frame` (Ethernet + IPv4, untagged) with its IP identification set to `id` and the header checksum redone.
pub fn with_ipv4_id(mut frame: Vec<u8>, id: u16) -> Vec<u8> {
    frame[18..20].copy_from_slice(&id.to_be_bytes());
    frame[24..26].copy_from_slice(&[0, 0]);
    let header_len = usize::from(frame[14] & 0x0f) * 4;
    let sum = checksum(&frame[14..14 + header_len], 0);
    frame[24..26].copy_from_slice(&sum.to_be_bytes());
    frame
}

pub fn tcp(src_port: u16, dst_port: u16, flags: u8, seq: u32) -> Vec<u8> {
    let mut segment = Vec::with_capacity(20);
    segment.extend(src_port.to_be_bytes());
    segment.extend(dst_port.to_be_bytes());
    segment.extend(seq.to_be_bytes());
    segment.extend(0u32.to_be_bytes());
    segment.extend([5 << 4, flags, 0xff, 0xff, 0, 0, 0, 0]);
    segment
}

pub fn udp(src_port: u16, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let mut datagram = Vec::with_capacity(8 + payload.len());
    datagram.extend(src_port.to_be_bytes());
    datagram.extend(dst_port.to_be_bytes());
    datagram.extend(((8 + payload.len()) as u16).to_be_bytes());
    datagram.extend([0, 0]);
    datagram.extend(payload);
    datagram
}

/// The Internet checksum of `bytes`, starting from a partial sum.
pub fn checksum(bytes: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    for chunk in bytes.chunks(2) {
        sum += u32::from(u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The partial sum of an IPv4 pseudo-header.
pub fn pseudo_v4(src: &[u8], dst: &[u8], proto: u8, len: usize) -> u32 {
    let mut header = Vec::with_capacity(12);
    header.extend(src);
    header.extend(dst);
    header.extend([0, proto]);
    header.extend((len as u16).to_be_bytes());
    u32::from(!checksum(&header, 0))
}

/// The partial sum of an IPv6 pseudo-header.
pub fn pseudo_v6(src: &[u8], dst: &[u8], next: u8, len: usize) -> u32 {
    let mut header = Vec::with_capacity(40);
    header.extend(src);
    header.extend(dst);
    header.extend((len as u32).to_be_bytes());
    header.extend([0, 0, 0, next]);
    u32::from(!checksum(&header, 0))
}
