//! The kernel relay: a stream verdict on the sockets of decided connections hands each arriving segment to the
//! peer socket (`bpf_sk_redirect_hash`), so that the bytes never reach the proxy — as long as the peer keeps up.
//! The kernel queues a redirected segment in front of the peer without a bound and reopens the sender's window at
//! once, so the program bounds it itself: a direction may have `RELAY_UNACKED_LIMIT` bytes handed on that the far
//! end has not acknowledged (read from the peer's `tcp_sock`); past that, segments are left in the arriving socket
//! (SK_PASS), where they close the sender's window until the proxy moves them. Once any segment was left, every
//! later one is too until the proxy has written all of them on, so nothing overtakes what the proxy holds.

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

/// Whether `len` more bytes handed to the peer keep what it has not had acknowledged within the limit.
#[inline(always)]
fn peer_has_room(direction: &RelayDirection, written: u64, len: u64) -> bool {
    // SAFETY: a read-only global, set before the program was loaded.
    let at = unsafe { core::ptr::read_volatile(&SLUICE_TCP_BYTES_ACKED_AT) };
    if at == 0 {
        return false;
    }
    let map = &SOCKETS as *const SockHash<u64> as *mut c_void;
    // SAFETY: a lookup in a socket map returns a referenced socket, released below.
    let peer = unsafe { bpf_map_lookup_elem(map, &direction.peer as *const u64 as *const c_void) };
    if peer.is_null() {
        return false;
    }
    // SAFETY: `peer` is a socket; the cast answers null for one that is not TCP.
    let tcp = unsafe { bpf_skc_to_tcp_sock(peer) };
    let acked = if tcp.is_null() {
        None
    } else {
        // SAFETY: `at` is the field's offset in this kernel's tcp_sock (its BTF); the verifier checks the access.
        Some(unsafe { *((tcp as *const u8).add(at as usize) as *const u64) })
    };
    // SAFETY: the reference taken by the lookup.
    unsafe { bpf_sk_release(peer) };
    let Some(acked) = acked else { return false };
    let handed = direction.redirected + written;
    let unacknowledged = handed.saturating_sub(acked.saturating_sub(direction.acked_base));
    unacknowledged + len <= RELAY_UNACKED_LIMIT
}
