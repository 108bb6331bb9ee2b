//! The TC ingress classifier: parse, decide, act, count. Every packet entering an intercepted interface gets
//! one verdict.
#![no_std]
#![no_main]

mod blackhole;
mod fragments;
mod intercept;
mod maps;
mod parse;
mod policy;
mod relay;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC},
    macros::classifier,
    programs::TcContext,
};
use sluice_common::{DatapathConfig, Verdict, FLAG_UNMATCHED_TCP_TO_PROXY, MODE_REGISTRY_ONLY};

use intercept::NotHanded;
use parse::{Malformed, Packet, IPPROTO_TCP};

#[classifier]
pub fn sluice_ingress(ctx: TcContext) -> i32 {
    let len = ctx.len();
    let (verdict, action) = classify(&ctx);
    maps::count(verdict, len);
    action
}

/// The verdict and the TC action that carries it out.
fn classify(ctx: &TcContext) -> (Verdict, i32) {
    let Some((generation, config)) = maps::active() else {
        // No policy written yet: stay out of the way.
        return (Verdict::Ignored, TC_ACT_UNSPEC);
    };
    let flow = match parse::packet(ctx) {
        Ok(Packet::Ip(flow)) => flow,
        // Continue rather than accept, so other TC programs on the interface (a CNI's) still run.
        Ok(Packet::Other) => return (Verdict::Ignored, TC_ACT_UNSPEC),
        Err(Malformed) if config.mode == MODE_REGISTRY_ONLY => return (Verdict::Malformed, TC_ACT_SHOT as i32),
        Err(Malformed) => return (Verdict::Malformed, TC_ACT_UNSPEC),
    };
    let verdict = if let Some(verdict) = policy::denied(&flow, generation, config.tables) {
        verdict
    } else if flow.fragmented {
        fragments::decide(&flow, generation, config)
    } else {
        policy::decide(&flow, generation, config)
    };
    match verdict {
        Verdict::Intercepted => match intercept::to_proxy(ctx, &flow, config) {
            Ok(()) => (Verdict::Intercepted, TC_ACT_OK as i32),
            Err(NotHanded::NoProxy) => between_agents(),
            Err(NotHanded::NotForTheProxy) => unmatched(ctx, &flow, config),
        },
        // Unmatched: the source's own mode (a Sidecar's), else the policy's, says which.
        Verdict::Blackholed | Verdict::Passthrough => unmatched(ctx, &flow, config),
        Verdict::Denied => (Verdict::Denied, blackhole::deny(ctx, &flow)),
        verdict => (verdict, TC_ACT_UNSPEC),
    }
}

fn unmatched(ctx: &TcContext, flow: &parse::Flow, config: &DatapathConfig) -> (Verdict, i32) {
    if maps::mode_for(flow.family, &flow.src, config) != MODE_REGISTRY_ONLY {
        // AuthorizationPolicies govern the workloads: the proxy decides what would pass unseen.
        let to_proxy = config.flags & FLAG_UNMATCHED_TCP_TO_PROXY != 0 && flow.proto == IPPROTO_TCP;
        if to_proxy {
            match intercept::to_proxy(ctx, flow, config) {
                Ok(()) => return (Verdict::Intercepted, TC_ACT_OK as i32),
                Err(NotHanded::NoProxy) => return between_agents(),
                Err(NotHanded::NotForTheProxy) => {}
            }
        }
        return (Verdict::Passthrough, TC_ACT_UNSPEC);
    }
    (Verdict::Blackholed, blackhole::act(ctx, flow, config))
}

/// A flow the proxy must decide while no agent listens (one is restarting or being replaced): dropped, never passed
/// by undecided, so that the client's TCP sends again (a SYN a second later) and meets the next agent.
fn between_agents() -> (Verdict, i32) {
    (Verdict::Blackholed, TC_ACT_SHOT as i32)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
