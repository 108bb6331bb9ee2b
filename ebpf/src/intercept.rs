//! Transparent hand-off to the agent's proxy: the packet is assigned to the proxy's socket (the flow's own
//! accepted socket once there is one, else the listener) and marked, so policy routing delivers it locally
//! with its original destination intact.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{bpf_sock_tuple, BPF_F_CURRENT_NETNS},
    helpers::{bpf_sk_assign, bpf_sk_release, bpf_skc_lookup_tcp},
    programs::TcContext,
};
use sluice_common::{DatapathConfig, FAMILY_V4};

use crate::parse::{Flow, IPPROTO_TCP};

const BPF_TCP_LISTEN: u32 = 10;

/// Why a packet was not handed to the proxy.
pub enum NotHanded {
    /// Not a packet the proxy takes (not TCP, a later fragment, or interception is off).
    NotForTheProxy,
    /// No proxy socket: no agent listens (it is restarting or being replaced).
    NoProxy,
}

#[inline(never)]
pub fn to_proxy(ctx: &TcContext, flow: &Flow, config: &DatapathConfig) -> Result<(), NotHanded> {
    if flow.proto != IPPROTO_TCP || config.proxy_port == 0 || !flow.first_fragment {
        return Err(NotHanded::NotForTheProxy);
    }
    // SAFETY: zeroed bytes are a valid tuple.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let tuple_size = fill(&mut tuple, flow, flow.dst_port);
    // An established (or in-handshake) socket of this very flow, accepted earlier by the proxy.
    if assign(ctx, &mut tuple, tuple_size, false).is_ok() {
        ctx.set_mark(config.mark);
        return Ok(());
    }
    // Otherwise the listener, which is bound to the wildcard address on the proxy's port.
    // SAFETY: as above.
    tuple = unsafe { core::mem::zeroed() };
    let tuple_size = fill(&mut tuple, flow, config.proxy_port);
    if flow.family == FAMILY_V4 {
        tuple.__bindgen_anon_1.ipv4.daddr = 0;
    } else {
        tuple.__bindgen_anon_1.ipv6.daddr = [0; 4];
    }
    assign(ctx, &mut tuple, tuple_size, true).map_err(|()| NotHanded::NoProxy)?;
    ctx.set_mark(config.mark);
    Ok(())
}

/// Fills `tuple` with the flow's addresses and ports (destination port `dst_port`); returns its size.
#[inline(always)]
fn fill(tuple: &mut bpf_sock_tuple, flow: &Flow, dst_port: u16) -> u32 {
    // SAFETY: writing plain integers into the union variant of the flow's family.
    unsafe {
        if flow.family == FAMILY_V4 {
            let v4 = &mut tuple.__bindgen_anon_1.ipv4;
            v4.saddr = u32::from_ne_bytes([flow.src[0], flow.src[1], flow.src[2], flow.src[3]]);
            v4.daddr = u32::from_ne_bytes([flow.dst[0], flow.dst[1], flow.dst[2], flow.dst[3]]);
            v4.sport = flow.src_port.to_be();
            v4.dport = dst_port.to_be();
            size_of::<aya_ebpf::bindings::bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>() as u32
        } else {
            let v6 = &mut tuple.__bindgen_anon_1.ipv6;
            v6.saddr = words(&flow.src);
            v6.daddr = words(&flow.dst);
            v6.sport = flow.src_port.to_be();
            v6.dport = dst_port.to_be();
            size_of::<aya_ebpf::bindings::bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2>() as u32
        }
    }
}

#[inline(always)]
fn words(addr: &[u8; 16]) -> [u32; 4] {
    let mut out = [0u32; 4];
    let mut i = 0;
    while i < 4 {
        out[i] = u32::from_ne_bytes([addr[4 * i], addr[4 * i + 1], addr[4 * i + 2], addr[4 * i + 3]]);
        i += 1;
    }
    out
}

/// Looks the socket up and assigns the packet to it: a listener only when `listener`, any other state only
/// when not.
#[inline(always)]
fn assign(ctx: &TcContext, tuple: &mut bpf_sock_tuple, size: u32, listener: bool) -> Result<(), ()> {
    let skb = ctx.skb.skb.cast();
    // SAFETY: the helpers get the program's own skb and a tuple of the size given; the socket reference is
    // released on every path.
    unsafe {
        let sk = bpf_skc_lookup_tcp(skb, tuple, size, BPF_F_CURRENT_NETNS as u64, 0);
        if sk.is_null() {
            return Err(());
        }
        let is_listener = (*sk).state == BPF_TCP_LISTEN;
        let result = if is_listener == listener { bpf_sk_assign(skb, sk.cast(), 0) } else { -1 };
        bpf_sk_release(sk.cast());
        if result == 0 {
            Ok(())
        } else {
            Err(())
        }
    }
}
