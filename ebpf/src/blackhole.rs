//! Blackholing: every blocked packet is recorded against its destination, a flow's first blocked packet is
//! reported to the agent, and the packet is dropped or, in reject mode, answered (TCP RST, ICMP
//! administratively prohibited) so that the client fails at once instead of timing out. A flow an
//! AuthorizationPolicy denies is reported and always answered, as the proxy refuses what it denies.

use aya_ebpf::{
    bindings::{TC_ACT_REDIRECT, TC_ACT_SHOT},
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_redirect},
    programs::TcContext,
};
use sluice_common::{
    BlockedFlowEvent, DatapathConfig, DestinationKey, DestinationStats, FlowKey, Verdict, BLACKHOLE_REJECT, FAMILY_V4,
};

use crate::{
    maps,
    parse::{load_be16, Flow, IPPROTO_TCP},
};

/// A flow blocked again after this long is reported again.
const REPORT_AGAIN_NS: u64 = 60_000_000_000;
/// The same flow's report time is looked at again after this many ticks: 60 s at the lowest tick rate (100 Hz),
/// 6 s at the highest (1000 Hz).
const CHECK_AGAIN_JIFFIES: u64 = 6_000;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

#[inline(never)]
pub fn act(ctx: &TcContext, flow: &Flow, config: &DatapathConfig) -> i32 {
    record(flow);
    if config.blackhole == BLACKHOLE_REJECT {
        return answer(ctx, flow);
    }
    TC_ACT_SHOT as i32
}

/// A denied flow: reported (not recorded as blackholed) and refused.
#[inline(never)]
pub fn deny(ctx: &TcContext, flow: &Flow) -> i32 {
    report_denied(flow);
    answer(ctx, flow)
}

// A subprogram of its own, so that its keys are not on the stack while the answer is built.
#[inline(never)]
fn report_denied(flow: &Flow) {
    // SAFETY: a helper with no arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    report(flow, now, Verdict::Denied);
}

/// Sends the packet back as its refusal; dropped when it cannot be answered.
#[inline(always)]
fn answer(ctx: &TcContext, flow: &Flow) -> i32 {
    if reject(ctx, flow).is_ok() {
        // SAFETY: the program's own skb; redirecting to the interface it arrived on sends the answer back.
        let ifindex = unsafe { (*ctx.skb.skb).ifindex };
        // SAFETY: a helper taking plain integers.
        unsafe { bpf_redirect(ifindex, 0) };
        return TC_ACT_REDIRECT as i32;
    }
    TC_ACT_SHOT as i32
}

#[inline(never)]
fn record(flow: &Flow) {
    // SAFETY: a helper with no arguments, inlined by the verifier (a load of `jiffies`).
    let jiffies = unsafe { bpf_jiffies64() };
    let destination =
        DestinationKey { addr: flow.dst, family: flow.family, proto: flow.proto, port: flow.dst_port.to_be_bytes() };
    let src_port = flow.src_port.to_be_bytes();
    // The clock, read once and only when needed.
    let mut now = None;
    let stats = match maps::BLACKHOLED.get_ptr_mut(destination) {
        Some(stats) => {
            // SAFETY: a map value; concurrent updates from other CPUs may lose a count, never corrupt.
            let stats = unsafe { &mut *stats };
            stats.packets += 1;
            stats.last_seen_jiffies = jiffies;
            // The usual case under a flood: the same flow again, reported a moment ago.
            if stats.reported_src_port == src_port && stats.reported_src == flow.src {
                if jiffies.wrapping_sub(stats.checked_jiffies) < CHECK_AGAIN_JIFFIES {
                    return;
                }
                // SAFETY: a helper with no arguments.
                let at = *now.insert(unsafe { bpf_ktime_get_coarse_ns() });
                if at.saturating_sub(stats.reported_ns) < REPORT_AGAIN_NS {
                    stats.checked_jiffies = jiffies;
                    return;
                }
            }
            Some(stats)
        }
        None => {
            let first = DestinationStats { packets: 1, last_seen_jiffies: jiffies, ..DestinationStats::default() };
            let _ = maps::BLACKHOLED.insert(destination, first, 0);
            None
        }
    };
    // SAFETY: as above.
    let now = now.unwrap_or_else(|| unsafe { bpf_ktime_get_coarse_ns() });
    let reported_ns = report(flow, now, Verdict::Blackholed);
    if let Some(stats) = stats {
        stats.reported_src = flow.src;
        stats.reported_src_port = src_port;
        stats.reported_ns = reported_ns;
        stats.checked_jiffies = jiffies;
    }
}

/// Reports the flow to the agent unless it was reported in the last minute; returns when it last was.
#[inline(always)]
fn report(flow: &Flow, now: u64, verdict: Verdict) -> u64 {
    let key = FlowKey {
        src: flow.src,
        dst: flow.dst,
        src_port: flow.src_port.to_be_bytes(),
        dst_port: flow.dst_port.to_be_bytes(),
        family: flow.family,
        proto: flow.proto,
        _pad: [0; 2],
    };
    // SAFETY: the value is copied out at once.
    match unsafe { maps::FLOWS.get(key) }.copied() {
        Some(at) if now.saturating_sub(at) < REPORT_AGAIN_NS => at,
        _ => {
            let _ = maps::FLOWS.insert(key, now, 0);
            let event = BlockedFlowEvent { flow: key, timestamp_ns: now, verdict: verdict as u32, _pad: 0 };
            let _ = maps::EVENTS.output(event, 0);
            now
        }
    }
}

/// Rewrites the packet into its answer, in place. Err leaves the packet to be dropped.
fn reject(ctx: &TcContext, flow: &Flow) -> Result<(), ()> {
    if !flow.first_fragment {
        return Err(());
    }
    if flow.proto == IPPROTO_TCP {
        let flags: u8 = ctx.load(flow.l4 + 13).map_err(|_| ())?;
        if flags & TCP_RST != 0 {
            return Err(());
        }
        if flow.family == FAMILY_V4 {
            tcp_reset_v4(ctx, flow, flags)
        } else {
            tcp_reset_v6(ctx, flow, flags)
        }
    } else if flow.family == FAMILY_V4 {
        unreachable_v4(ctx, flow)
    } else {
        unreachable_v6(ctx, flow)
    }
}

/// The RST's sequence and acknowledgement numbers and flags, as RFC 793 answers a segment with no socket.
fn reset_numbers(ctx: &TcContext, flow: &Flow, flags: u8, payload_len: u32) -> Result<([u8; 4], [u8; 4], u8), ()> {
    let seq: [u8; 4] = ctx.load(flow.l4 + 4).map_err(|_| ())?;
    let ack: [u8; 4] = ctx.load(flow.l4 + 8).map_err(|_| ())?;
    if flags & TCP_ACK != 0 {
        return Ok((ack, [0; 4], TCP_RST));
    }
    let mut consumed = payload_len;
    if flags & TCP_SYN != 0 {
        consumed += 1;
    }
    if flags & TCP_FIN != 0 {
        consumed += 1;
    }
    let ack = u32::from_be_bytes(seq).wrapping_add(consumed).to_be_bytes();
    Ok(([0; 4], ack, TCP_RST | TCP_ACK))
}

fn tcp_header(flow: &Flow, seq: [u8; 4], ack: [u8; 4], flags: u8) -> [u8; 20] {
    let sport = flow.dst_port.to_be_bytes();
    let dport = flow.src_port.to_be_bytes();
    [
        sport[0],
        sport[1],
        dport[0],
        dport[1],
        seq[0],
        seq[1],
        seq[2],
        seq[3],
        ack[0],
        ack[1],
        ack[2],
        ack[3],
        5 << 4,
        flags,
        0,
        0,
        0,
        0,
        0,
        0,
    ]
}

#[inline(never)]
fn tcp_reset_v4(ctx: &TcContext, flow: &Flow, flags: u8) -> Result<(), ()> {
    if flow.l4 != flow.l3 + 20 {
        return Err(());
    }
    let total_len = u32::from(load_be16(ctx, flow.l3 + 2).map_err(|_| ())?);
    let data_offset: u8 = ctx.load(flow.l4 + 12).map_err(|_| ())?;
    let payload_len = total_len.saturating_sub(20 + u32::from(data_offset >> 4) * 4);
    let (seq, ack, reply_flags) = reset_numbers(ctx, flow, flags, payload_len)?;
    let mut tcp = tcp_header(flow, seq, ack, reply_flags);
    let ip = ipv4_header(flow, 40, IPPROTO_TCP);
    let pseudo = pseudo_v4(&ip, 20);
    let sum = checksum(&tcp, checksum(&pseudo, 0));
    tcp[16..18].copy_from_slice(&fold(sum).to_be_bytes());
    resize(ctx, flow.l3 + 40)?;
    swap_macs(ctx)?;
    ctx.store(flow.l3, &ip, 0).map_err(|_| ())?;
    ctx.store(flow.l4, &tcp, 0).map_err(|_| ())
}

#[inline(never)]
fn tcp_reset_v6(ctx: &TcContext, flow: &Flow, flags: u8) -> Result<(), ()> {
    if flow.l4 != flow.l3 + 40 {
        return Err(());
    }
    let payload = u32::from(load_be16(ctx, flow.l3 + 4).map_err(|_| ())?);
    let data_offset: u8 = ctx.load(flow.l4 + 12).map_err(|_| ())?;
    let payload_len = payload.saturating_sub(u32::from(data_offset >> 4) * 4);
    let (seq, ack, reply_flags) = reset_numbers(ctx, flow, flags, payload_len)?;
    let mut tcp = tcp_header(flow, seq, ack, reply_flags);
    let ip = ipv6_header(flow, 20, IPPROTO_TCP);
    let sum = checksum(&tcp, pseudo_v6_sum(flow, 20, IPPROTO_TCP));
    tcp[16..18].copy_from_slice(&fold(sum).to_be_bytes());
    resize(ctx, flow.l3 + 60)?;
    swap_macs(ctx)?;
    ctx.store(flow.l3, &ip, 0).map_err(|_| ())?;
    ctx.store(flow.l4, &tcp, 0).map_err(|_| ())
}

/// ICMP destination unreachable, communication administratively prohibited (type 3, code 13), quoting the
/// original IP header and the first 8 bytes after it.
#[inline(never)]
fn unreachable_v4(ctx: &TcContext, flow: &Flow) -> Result<(), ()> {
    if flow.l4 != flow.l3 + 20 {
        return Err(());
    }
    let quoted: [u8; 28] = ctx.load(flow.l3).map_err(|_| ())?;
    let ip = ipv4_header(flow, 20 + 8 + 28, 1);
    let mut icmp = [3u8, 13, 0, 0, 0, 0, 0, 0];
    let sum = checksum(&quoted, checksum(&icmp, 0));
    icmp[2..4].copy_from_slice(&fold(sum).to_be_bytes());
    resize(ctx, flow.l3 + 20 + 8 + 28)?;
    swap_macs(ctx)?;
    ctx.store(flow.l3, &ip, 0).map_err(|_| ())?;
    ctx.store(flow.l3 + 20, &icmp, 0).map_err(|_| ())?;
    ctx.store(flow.l3 + 28, &quoted, 0).map_err(|_| ())
}

/// ICMPv6 destination unreachable, communication administratively prohibited (type 1, code 1).
#[inline(never)]
fn unreachable_v6(ctx: &TcContext, flow: &Flow) -> Result<(), ()> {
    let quoted: [u8; 48] = ctx.load(flow.l3).map_err(|_| ())?;
    let length = 8 + 48;
    let ip = ipv6_header(flow, length, 58);
    let mut icmp = [1u8, 1, 0, 0, 0, 0, 0, 0];
    let sum = checksum(&quoted, checksum(&icmp, pseudo_v6_sum(flow, u32::from(length), 58)));
    icmp[2..4].copy_from_slice(&fold(sum).to_be_bytes());
    resize(ctx, flow.l3 + 40 + usize::from(length))?;
    swap_macs(ctx)?;
    ctx.store(flow.l3, &ip, 0).map_err(|_| ())?;
    ctx.store(flow.l3 + 40, &icmp, 0).map_err(|_| ())?;
    ctx.store(flow.l3 + 48, &quoted, 0).map_err(|_| ())
}

/// An IPv4 header from the original destination back to the source, checksum filled in.
fn ipv4_header(flow: &Flow, total_len: u16, proto: u8) -> [u8; 20] {
    let len = total_len.to_be_bytes();
    let (s, d) = (&flow.dst, &flow.src);
    let mut ip =
        [0x45, 0, len[0], len[1], 0, 0, 0x40, 0, 64, proto, 0, 0, s[0], s[1], s[2], s[3], d[0], d[1], d[2], d[3]];
    let sum = fold(checksum(&ip, 0));
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    ip
}

fn pseudo_v4(ip: &[u8; 20], l4_len: u16) -> [u8; 12] {
    let len = l4_len.to_be_bytes();
    [ip[12], ip[13], ip[14], ip[15], ip[16], ip[17], ip[18], ip[19], 0, ip[9], len[0], len[1]]
}

/// An IPv6 header from the original destination back to the source.
fn ipv6_header(flow: &Flow, payload_len: u16, next: u8) -> [u8; 40] {
    let mut ip = [0u8; 40];
    ip[0] = 0x60;
    ip[4..6].copy_from_slice(&payload_len.to_be_bytes());
    ip[6] = next;
    ip[7] = 64;
    ip[8..24].copy_from_slice(&flow.dst);
    ip[24..40].copy_from_slice(&flow.src);
    ip
}

/// The partial sum of the IPv6 pseudo-header of the answer (source and destination swapped).
fn pseudo_v6_sum(flow: &Flow, l4_len: u32, next: u8) -> u32 {
    let sum = checksum(&flow.dst, checksum(&flow.src, 0));
    let tail = [(l4_len >> 24) as u8, (l4_len >> 16) as u8, (l4_len >> 8) as u8, l4_len as u8, 0, 0, 0, next];
    checksum(&tail, sum)
}

#[inline(always)]
fn checksum<const N: usize>(bytes: &[u8; N], mut sum: u32) -> u32 {
    let mut i = 0;
    while i + 1 < N {
        sum += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    if N % 2 == 1 {
        sum += u32::from(bytes[N - 1]) << 8;
    }
    sum
}

#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

fn resize(ctx: &TcContext, len: usize) -> Result<(), ()> {
    // SAFETY: the program's own skb.
    let result = unsafe { aya_ebpf::helpers::bpf_skb_change_tail(ctx.skb.skb, len as u32, 0) };
    if result == 0 {
        Ok(())
    } else {
        Err(())
    }
}

fn swap_macs(ctx: &TcContext) -> Result<(), ()> {
    let macs: [u8; 12] = ctx.load(0).map_err(|_| ())?;
    let swapped =
        [macs[6], macs[7], macs[8], macs[9], macs[10], macs[11], macs[0], macs[1], macs[2], macs[3], macs[4], macs[5]];
    ctx.store(0, &swapped, 0).map_err(|_| ())
}
