//! The policy lookup, in the active generation: an exact destination that passes decides at once; otherwise
//! always-allowed ranges, then the exact entry's other action, then CIDRs, then port-wide entries. Maps the
//! generation leaves empty are skipped. Each lookup costs the same whatever the number of entries.

use aya_ebpf::{helpers::bpf_ktime_get_ns, maps::lpm_trie::Key};
use sluice_common::{
    AllowV4, AllowV6, DatapathConfig, PortKey, Rule, Verdict, ACTION_INTERCEPT, ACTION_PASS, ALLOW_KEY_HEADER_BITS,
    FAMILY_V4, L4V4, L4V6, L4_KEY_HEADER_BITS, MODE_REGISTRY_ONLY, TABLE_ALLOW_V4, TABLE_ALLOW_V6, TABLE_CIDR_V4,
    TABLE_CIDR_V6, TABLE_EXACT_V4, TABLE_EXACT_V6, TABLE_PORTS,
};

use crate::{maps, parse::Flow};

// A function of its own (a BPF subprogram): its keys do not add to the callers' stack frames.
#[inline(never)]
pub fn decide(flow: &Flow, generation: u8, config: &DatapathConfig) -> Verdict {
    let tables = config.tables;
    let port = flow.dst_port.to_be_bytes();
    let rule = if flow.family == FAMILY_V4 {
        let mut addr = [0u8; 4];
        addr.copy_from_slice(&flow.dst[..4]);
        let key = L4V4 { proto: flow.proto, generation, port, addr };
        // SAFETY: the value is copied out at once; entries of the active generation are never deleted.
        let exact = if tables & TABLE_EXACT_V4 != 0 { unsafe { maps::EXACT_V4.get(key) }.and_then(live) } else { None };
        if exact.is_some_and(|rule| rule.action == ACTION_PASS) {
            return Verdict::Allowed;
        }
        if tables & TABLE_ALLOW_V4 != 0
            && maps::ALLOW_V4
                .get(Key::new(ALLOW_KEY_HEADER_BITS + 32, AllowV4 { generation, _pad: [0; 3], addr }))
                .is_some()
        {
            return Verdict::Allowed;
        }
        exact.or_else(|| {
            if tables & TABLE_CIDR_V4 == 0 {
                return None;
            }
            maps::CIDR_V4.get(Key::new(L4_KEY_HEADER_BITS + 32, key)).and_then(live)
        })
    } else {
        let addr = flow.dst;
        let key = L4V6 { proto: flow.proto, generation, port, addr };
        // SAFETY: as above.
        let exact = if tables & TABLE_EXACT_V6 != 0 { unsafe { maps::EXACT_V6.get(key) }.and_then(live) } else { None };
        if exact.is_some_and(|rule| rule.action == ACTION_PASS) {
            return Verdict::Allowed;
        }
        if tables & TABLE_ALLOW_V6 != 0
            && maps::ALLOW_V6
                .get(Key::new(ALLOW_KEY_HEADER_BITS + 128, AllowV6 { generation, _pad: [0; 3], addr }))
                .is_some()
        {
            return Verdict::Allowed;
        }
        exact.or_else(|| {
            if tables & TABLE_CIDR_V6 == 0 {
                return None;
            }
            maps::CIDR_V6.get(Key::new(L4_KEY_HEADER_BITS + 128, key)).and_then(live)
        })
    };
    let rule = rule.or_else(|| {
        if tables & TABLE_PORTS == 0 {
            return None;
        }
        // SAFETY: as above.
        unsafe { maps::PORTS.get(PortKey { proto: flow.proto, generation, port }) }.and_then(live)
    });
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
