//! The policy lookup: always-allowed ranges, then exact destinations, then CIDRs, then port-wide entries, all
//! in the active generation. Each lookup costs the same whatever the number of entries.

use aya_ebpf::{helpers::bpf_ktime_get_ns, maps::lpm_trie::Key};
use sluice_common::{
    AllowV4, AllowV6, DatapathConfig, PortKey, Rule, Verdict, ACTION_INTERCEPT, ACTION_PASS, ALLOW_KEY_HEADER_BITS,
    FAMILY_V4, L4V4, L4V6, L4_KEY_HEADER_BITS, MODE_REGISTRY_ONLY,
};

use crate::{maps, parse::Flow};

// A function of its own (a BPF subprogram): its keys do not add to the callers' stack frames.
#[inline(never)]
pub fn decide(flow: &Flow, generation: u8, config: &DatapathConfig) -> Verdict {
    let port = flow.dst_port.to_be_bytes();
    let (allowed, rule) = if flow.family == FAMILY_V4 {
        let mut addr = [0u8; 4];
        addr.copy_from_slice(&flow.dst[..4]);
        let allowed =
            maps::ALLOW_V4.get(Key::new(ALLOW_KEY_HEADER_BITS + 32, AllowV4 { generation, _pad: [0; 3], addr }));
        let key = L4V4 { proto: flow.proto, generation, port, addr };
        // SAFETY: the value is copied out at once; entries of the active generation are never deleted.
        let rule = unsafe { maps::EXACT_V4.get(key) }
            .and_then(live)
            .or_else(|| maps::CIDR_V4.get(Key::new(L4_KEY_HEADER_BITS + 32, key)).and_then(live));
        (allowed.is_some(), rule)
    } else {
        let addr = flow.dst;
        let allowed =
            maps::ALLOW_V6.get(Key::new(ALLOW_KEY_HEADER_BITS + 128, AllowV6 { generation, _pad: [0; 3], addr }));
        let key = L4V6 { proto: flow.proto, generation, port, addr };
        // SAFETY: as above.
        let rule = unsafe { maps::EXACT_V6.get(key) }
            .and_then(live)
            .or_else(|| maps::CIDR_V6.get(Key::new(L4_KEY_HEADER_BITS + 128, key)).and_then(live));
        (allowed.is_some(), rule)
    };
    if allowed {
        return Verdict::Allowed;
    }
    // SAFETY: as above.
    let rule =
        rule.or_else(|| unsafe { maps::PORTS.get(PortKey { proto: flow.proto, generation, port }) }.and_then(live));
    match rule.map(|rule| rule.action) {
        Some(ACTION_PASS) => Verdict::Allowed,
        Some(ACTION_INTERCEPT) => Verdict::Intercepted,
        _ if config.mode == MODE_REGISTRY_ONLY => Verdict::Blackholed,
        _ => Verdict::Passthrough,
    }
}

/// The entry, unless it has expired.
#[inline(always)]
fn live(rule: &Rule) -> Option<&Rule> {
    // SAFETY: a helper with no arguments.
    if rule.expires_ns != 0 && unsafe { bpf_ktime_get_ns() } > rule.expires_ns {
        return None;
    }
    Some(rule)
}
