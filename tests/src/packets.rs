//! Crafted Ethernet frames for running the classifier on exact bytes (`BPF_PROG_TEST_RUN`), and TCP segments
//! crafted with a live connection's own sequence numbers, sent into a namespace from a raw socket.

use std::net::{Ipv4Addr, Ipv6Addr};

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;

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

/// The next sequence number `stream` sends and the next it expects, read in TCP repair mode (left at once, without
/// the window probe leaving it would send).
#[expect(unsafe_code, reason = "TCP_REPAIR and TCP_QUEUE_SEQ have no wrapper in nix")]
pub fn sequence_numbers(stream: &std::net::TcpStream) -> (u32, u32) {
    use nix::libc;
    use std::os::fd::AsRawFd;
    // uapi/linux/tcp.h
    const TCP_REPAIR_OFF_NO_WP: libc::c_int = -1;
    const TCP_RECV_QUEUE: libc::c_int = 1;
    const TCP_SEND_QUEUE: libc::c_int = 2;
    let fd = stream.as_raw_fd();
    let set = |name: libc::c_int, value: libc::c_int| {
        // SAFETY: an int option, its size given.
        let done = unsafe { libc::setsockopt(fd, libc::IPPROTO_TCP, name, (&value as *const libc::c_int).cast(), 4) };
        assert_eq!(done, 0, "setsockopt {name}: {}", std::io::Error::last_os_error());
    };
    let queue_seq = |queue: libc::c_int| {
        set(libc::TCP_REPAIR_QUEUE, queue);
        let (mut seq, mut length) = (0u32, 4 as libc::socklen_t);
        // SAFETY: a u32 option, its size given.
        let done = unsafe {
            libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_QUEUE_SEQ, (&mut seq as *mut u32).cast(), &mut length)
        };
        assert_eq!(done, 0, "getsockopt TCP_QUEUE_SEQ: {}", std::io::Error::last_os_error());
        seq
    };
    set(libc::TCP_REPAIR, 1);
    let numbers = (queue_seq(TCP_SEND_QUEUE), queue_seq(TCP_RECV_QUEUE));
    set(libc::TCP_REPAIR, TCP_REPAIR_OFF_NO_WP);
    numbers
}

/// An IPv4 TCP segment (ACK, PSH) from `from` to `to` carrying `payload` at `seq`.
pub fn tcp_data_segment(
    from: std::net::SocketAddr,
    to: std::net::SocketAddr,
    seq: u32,
    ack: u32,
    payload: &[u8],
) -> Vec<u8> {
    let (std::net::IpAddr::V4(source), std::net::IpAddr::V4(destination)) = (from.ip(), to.ip()) else {
        panic!("IPv4 addresses")
    };
    let mut segment = Vec::with_capacity(20 + payload.len());
    segment.extend(from.port().to_be_bytes());
    segment.extend(to.port().to_be_bytes());
    segment.extend(seq.to_be_bytes());
    segment.extend(ack.to_be_bytes());
    segment.extend([5 << 4, TCP_ACK | TCP_PSH, 0xff, 0xff, 0, 0, 0, 0]);
    segment.extend(payload);
    let sum = checksum(&segment, pseudo_v4(&source.octets(), &destination.octets(), TCP, segment.len()));
    segment[16..18].copy_from_slice(&sum.to_be_bytes());
    ipv4(source, destination, TCP, &[], 0x4000, &segment)
}

/// Sends a whole IPv4 packet from a raw socket of the calling thread's namespace.
pub fn send_raw(packet: &[u8], to: std::net::SocketAddr) -> nix::Result<usize> {
    use nix::sys::socket::{sendto, socket, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn};
    let std::net::SocketAddr::V4(to) = to else { panic!("an IPv4 address") };
    let raw = socket(AddressFamily::Inet, SockType::Raw, SockFlag::empty(), SockProtocol::Raw)?;
    sendto(std::os::fd::AsRawFd::as_raw_fd(&raw), packet, &SockaddrIn::from(to), MsgFlags::empty())
}
