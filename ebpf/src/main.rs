//! The TC ingress classifier: parse, decide, count. Every packet entering an intercepted interface gets one verdict.
#![no_std]
#![no_main]

mod parse;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    macros::{classifier, map},
    maps::{lpm_trie::Key, Array, LpmTrie, PerCpuArray},
    programs::TcContext,
};
use sluice_common::{
    Counter, DatapathConfig, Rule, Verdict, ACTION_PASS, L4V4, L4V6, L4_KEY_HEADER_BITS, MAX_RULES, MODE_REGISTRY_ONLY,
    VERDICT_COUNT,
};

use parse::{Destination, Malformed, Packet};

#[map(name = "SLUICE_CONFIG")]
static CONFIG: Array<DatapathConfig> = Array::with_max_entries(1, 0);

#[map(name = "SLUICE_L4_V4")]
static L4_V4: LpmTrie<L4V4, Rule> = LpmTrie::with_max_entries(MAX_RULES, 0);

#[map(name = "SLUICE_L4_V6")]
static L4_V6: LpmTrie<L4V6, Rule> = LpmTrie::with_max_entries(MAX_RULES, 0);

#[map(name = "SLUICE_ALLOW_V4")]
static ALLOW_V4: LpmTrie<[u8; 4], u32> = LpmTrie::with_max_entries(MAX_RULES, 0);

#[map(name = "SLUICE_ALLOW_V6")]
static ALLOW_V6: LpmTrie<[u8; 16], u32> = LpmTrie::with_max_entries(MAX_RULES, 0);

#[map(name = "SLUICE_COUNTERS")]
static COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(VERDICT_COUNT, 0);

#[classifier]
pub fn sluice_ingress(ctx: TcContext) -> i32 {
    let verdict = match parse::packet(&ctx) {
        Ok(Packet::Ip(dst)) => decide(&dst),
        Ok(Packet::Other) => Verdict::Ignored,
        Err(Malformed) => Verdict::Malformed,
    };
    count(verdict, ctx.len());
    match verdict {
        Verdict::Blackholed => TC_ACT_SHOT as i32,
        // Continue rather than accept, so other TC programs on the interface (a CNI's) still run.
        _ => TC_ACT_UNSPEC,
    }
}

fn decide(dst: &Destination) -> Verdict {
    let allowed = match dst {
        Destination::V4 { addr, proto, port } => {
            ALLOW_V4.get(Key::new(32, *addr)).is_some()
                || port_rule(L4_V4.get(Key::new(
                    L4_KEY_HEADER_BITS + 32,
                    L4V4 { proto: *proto, _pad: 0, port: port.to_be_bytes(), addr: *addr },
                )))
        }
        Destination::V6 { addr, proto, port } => {
            ALLOW_V6.get(Key::new(128, *addr)).is_some()
                || port_rule(L4_V6.get(Key::new(
                    L4_KEY_HEADER_BITS + 128,
                    L4V6 { proto: *proto, _pad: 0, port: port.to_be_bytes(), addr: *addr },
                )))
        }
    };
    if allowed {
        return Verdict::Allowed;
    }
    match CONFIG.get(0) {
        Some(config) if config.mode == MODE_REGISTRY_ONLY => Verdict::Blackholed,
        _ => Verdict::Passthrough,
    }
}

#[inline(always)]
fn port_rule(rule: Option<&Rule>) -> bool {
    matches!(rule, Some(rule) if rule.action == ACTION_PASS)
}

#[inline(always)]
fn count(verdict: Verdict, len: u32) {
    if let Some(counter) = COUNTERS.get_ptr_mut(verdict as u32) {
        // SAFETY: a per-CPU slot, written only by this CPU while this program runs.
        let counter = unsafe { &mut *counter };
        counter.packets += 1;
        counter.bytes += u64::from(len);
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
