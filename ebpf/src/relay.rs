//! The kernel relay: a stream verdict on the sockets of decided connections hands each arriving segment to the
//! peer socket (`bpf_sk_redirect_hash`), so that the bytes never reach the proxy — as long as the peer keeps up.
//! The kernel queues a redirected segment in front of the peer without a bound and reopens the sender's window at
//! once, so the program bounds it itself: a direction may have `RELAY_UNACKED_LIMIT` bytes handed on that the far
//! end has not acknowledged (read from the peer's `tcp_sock`); past that, segments are left in the arriving socket
//! (SK_PASS), where they close the sender's window until the proxy moves them. Once any segment was left, every
//! later one is too until the proxy has written all of them on, so nothing overtakes what the proxy holds.
//!
//! The kernel hands the verdict whole queued segments, and TCP queues a retransmission that partly overlaps bytes
//! already received whole (readers skip the overlap by sequence number; the verdict's caller does not). So the
//! program follows each direction's sequence numbers and cuts from a segment's front what the stream already
//! carried — without it, a retransmission under loss would deliver its overlap twice.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{sk_action, BPF_F_NO_PREALLOC},
    helpers::{bpf_get_socket_cookie, bpf_map_lookup_elem, bpf_sk_release, bpf_skc_to_tcp_sock},
    macros::{map, stream_verdict},
    maps::{HashMap, SockHash},
    programs::SkBuffContext,
};
use sluice_common::{RelayDirection, MAX_RELAYED_SOCKETS, RELAY_UNACKED_LIMIT};

/// The relayed sockets, each under its own cookie.
#[map(name = "SLUICE_RSOCKS")]
static SOCKETS: SockHash<u64> = SockHash::with_max_entries(MAX_RELAYED_SOCKETS, 0);
/// Each relayed socket's direction (the bytes arriving on it), under its cookie.
#[map(name = "SLUICE_RDIRS")]
static DIRECTIONS: HashMap<u64, RelayDirection> = HashMap::with_max_entries(MAX_RELAYED_SOCKETS, BPF_F_NO_PREALLOC);
/// Bytes of the passed ones the proxy has written on, per arriving socket's cookie: the agent's to write.
#[map(name = "SLUICE_RWRITTEN")]
static WRITTEN: HashMap<u64, u64> = HashMap::with_max_entries(MAX_RELAYED_SOCKETS, BPF_F_NO_PREALLOC);

/// Where `bytes_acked` lies in the running kernel's `struct tcp_sock` (from its BTF, set when the agent loads the
/// program); 0 when it could not be found, and then every segment is left to the proxy.
#[unsafe(no_mangle)]
static SLUICE_TCP_BYTES_ACKED_AT: u32 = 0;
/// Where `copied_seq` (the next byte a reader takes) lies in `struct tcp_sock`: where a direction's stream stood
/// when the socket joined. The agent does not load the relay without it.
#[unsafe(no_mangle)]
static SLUICE_TCP_COPIED_SEQ_AT: u32 = 0;

/// The most a segment's front can be cut by: the helper cuts up to 4,095 bytes a call, and a segment the kernel
/// queued whole is at most 64 KiB.
const TRIM_STEP: u32 = 4095;
const TRIM_STEPS: usize = 16;

#[stream_verdict]
pub fn sluice_relay(ctx: SkBuffContext) -> u32 {
    verdict(&ctx)
}

fn verdict(ctx: &SkBuffContext) -> u32 {
    let len = u64::from(ctx.len());
    // A bare FIN: the socket's own state tells the proxy the stream ended; handed on, it would break the peer's queue.
    if len == 0 {
        return sk_action::SK_DROP;
    }
    // SAFETY: the helper reads the socket cookie of the skb's socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb as *mut c_void) };
    let Some(direction) = DIRECTIONS.get_ptr_mut(&cookie) else { return sk_action::SK_PASS };
    // SAFETY: the entry is this socket's, and the verdict runs for one socket's segments at a time.
    let direction = unsafe { &mut *direction };
    let len = match unseen(ctx, cookie, direction) {
        Some(0) => return sk_action::SK_DROP,
        Some(unseen) => u64::from(unseen),
        None => {
            direction.broken = 1;
            return sk_action::SK_DROP;
        }
    };
    // SAFETY: copied out at once.
    let written = unsafe { WRITTEN.get(&cookie) }.copied().unwrap_or(0);
    if direction.passed != written || !peer_has_room(direction, written, len) {
        direction.passed += len;
        return sk_action::SK_PASS;
    }
    direction.redirected += len;
    let mut peer = direction.peer;
    SOCKETS.redirect_skb(ctx, &mut peer, 0) as u32
}

/// Cuts from the segment's front the bytes the stream already carried; the bytes left, or None when it could not
/// (the connection cannot go on intact: the caller drops the segment and marks the direction broken).
#[inline(always)]
fn unseen(ctx: &SkBuffContext, cookie: u64, direction: &mut RelayDirection) -> Option<u32> {
    // SAFETY: `cb[0]` of a stream verdict's skb is the first word of its TCP control block: the segment's
    // sequence number (the kernel's `TCP_SKB_CB(skb)->seq`, left in place for the verdict).
    let seq = unsafe { (*ctx.skb.skb).cb[0] };
    let len = ctx.len();
    if direction.sequenced == 0 {
        direction.next_seq = copied_seq(cookie)?;
        direction.sequenced = 1;
    }
    let end = seq.wrapping_add(len);
    let seen = direction.next_seq.wrapping_sub(seq) as i32;
    if seen <= 0 {
        if seen < 0 {
            direction.gaps += 1;
        }
        direction.next_seq = end;
        return Some(len);
    }
    let seen = seen as u32;
    if seen >= len {
        direction.trimmed += u64::from(len);
        return Some(0);
    }
    let mut left = seen;
    for _ in 0..TRIM_STEPS {
        if left == 0 {
            break;
        }
        let step = if left < TRIM_STEP { left } else { TRIM_STEP };
        ctx.adjust_room(-(step as i32), 0, 0).ok()?;
        left -= step;
    }
    if left != 0 {
        return None;
    }
    direction.trimmed += u64::from(seen);
    direction.next_seq = end;
    Some(len - seen)
}

/// The socket's `copied_seq`, read through its entry in the socket map.
#[inline(always)]
fn copied_seq(cookie: u64) -> Option<u32> {
    // SAFETY: a read-only global, set before the program was loaded.
    let at = unsafe { core::ptr::read_volatile(&SLUICE_TCP_COPIED_SEQ_AT) };
    if at == 0 {
        return None;
    }
    with_tcp_sock(cookie, |tcp| {
        // SAFETY: `at` is the field's offset in this kernel's tcp_sock (its BTF); the verifier checks the access.
        unsafe { *(tcp.add(at as usize) as *const u32) }
    })
}

/// `read` applied to the `tcp_sock` of the socket the socket map holds under `cookie`, if it is TCP.
#[inline(always)]
fn with_tcp_sock<T>(cookie: u64, read: impl FnOnce(*const u8) -> T) -> Option<T> {
    let map = &SOCKETS as *const SockHash<u64> as *mut c_void;
    // SAFETY: a lookup in a socket map returns a referenced socket, released below.
    let socket = unsafe { bpf_map_lookup_elem(map, &cookie as *const u64 as *const c_void) };
    if socket.is_null() {
        return None;
    }
    // SAFETY: `socket` is a socket; the cast answers null for one that is not TCP.
    let tcp = unsafe { bpf_skc_to_tcp_sock(socket) };
    let value = if tcp.is_null() { None } else { Some(read(tcp as *const u8)) };
    // SAFETY: the reference taken by the lookup.
    unsafe { bpf_sk_release(socket) };
    value
}

/// Whether `len` more bytes handed to the peer keep what it has not had acknowledged within the limit.
#[inline(always)]
fn peer_has_room(direction: &RelayDirection, written: u64, len: u64) -> bool {
    // SAFETY: a read-only global, set before the program was loaded.
    let at = unsafe { core::ptr::read_volatile(&SLUICE_TCP_BYTES_ACKED_AT) };
    if at == 0 {
        return false;
    }
    let acked = with_tcp_sock(direction.peer, |tcp| {
        // SAFETY: `at` is the field's offset in this kernel's tcp_sock (its BTF); the verifier checks the access.
        unsafe { *(tcp.add(at as usize) as *const u64) }
    });
    let Some(acked) = acked else { return false };
    let handed = direction.redirected + written;
    let unacknowledged = handed.saturating_sub(acked.saturating_sub(direction.acked_base));
    unacknowledged + len <= RELAY_UNACKED_LIMIT
}
