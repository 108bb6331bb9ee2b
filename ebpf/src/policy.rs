//! The policy lookup, in the active generation: where AuthorizationPolicies deny in the kernel, always-allowed
//! ranges and then denied destinations come first (`denied`); then an exact destination that passes decides at once;
//! otherwise always-allowed ranges, then the exact entry's other action, then CIDRs, then port-wide entries. Maps
//! the generation leaves empty are skipped. Each lookup costs the same whatever the number of entries.

use aya_ebpf::{helpers::bpf_ktime_get_ns, maps::lpm_trie::Key};
use sluice_common::{
    mask_v4, mask_v6, AllowV4, AllowV6, CidrV4, CidrV6, DatapathConfig, DenySourceV4, DenySourceV6, DenyV4, DenyV6,
    PortKey, Rule, Verdict, ACTION_INTERCEPT, ACTION_PASS, ALLOW_KEY_HEADER_BITS, DENY_ANY_SOURCE,
    DENY_KEY_HEADER_BITS, FAMILY_V4, L4V4, L4V6, MAX_CIDR_LENGTHS, MODE_REGISTRY_ONLY, TABLE_ALLOW_V4, TABLE_ALLOW_V6,
    TABLE_CIDR_V4, TABLE_CIDR_V6, TABLE_DENY_V4, TABLE_DENY_V6, TABLE_EXACT_V4, TABLE_EXACT_V6, TABLE_PORTS,
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
        exact.or_else(|| if tables & TABLE_CIDR_V4 == 0 { None } else { cidr_v4(flow, generation, addr, config) })
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
        exact.or_else(|| if tables & TABLE_CIDR_V6 == 0 { None } else { cidr_v6(flow, generation, config) })
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

/// Where DENY rules are in the kernel (looked up before anything else, fragments included): `Allowed` for an
/// always-allowed range (the cluster's own traffic, which an egress policy does not govern), `Denied` for a
/// destination a rule denies on this port or on every port.
#[inline(never)]
pub fn denied(flow: &Flow, generation: u8, tables: u32) -> Option<Verdict> {
    if tables & (TABLE_DENY_V4 | TABLE_DENY_V6) == 0 {
        return None;
    }
    let ports = [flow.dst_port.to_be_bytes(), [0, 0]];
    if flow.family == FAMILY_V4 {
        let mut addr = [0u8; 4];
        addr.copy_from_slice(&flow.dst[..4]);
        let allow = Key::new(ALLOW_KEY_HEADER_BITS + 32, AllowV4 { generation, _pad: [0; 3], addr });
        if tables & TABLE_ALLOW_V4 != 0 && maps::ALLOW_V4.get(allow).is_some() {
            return Some(Verdict::Allowed);
        }
        if tables & TABLE_DENY_V4 != 0 {
            for port in ports {
                let key = Key::new(DENY_KEY_HEADER_BITS + 32, DenyV4 { generation, _pad: 0, port, addr });
                if maps::DENY_V4.get(key).is_some_and(|&sources| from_v4(flow, generation, sources)) {
                    return Some(Verdict::Denied);
                }
            }
        }
    } else {
        let addr = flow.dst;
        let allow = Key::new(ALLOW_KEY_HEADER_BITS + 128, AllowV6 { generation, _pad: [0; 3], addr });
        if tables & TABLE_ALLOW_V6 != 0 && maps::ALLOW_V6.get(allow).is_some() {
            return Some(Verdict::Allowed);
        }
        if tables & TABLE_DENY_V6 != 0 {
            for port in ports {
                let key = Key::new(DENY_KEY_HEADER_BITS + 128, DenyV6 { generation, _pad: 0, port, addr });
                if maps::DENY_V6.get(key).is_some_and(|&sources| from_v6(flow, generation, sources)) {
                    return Some(Verdict::Denied);
                }
            }
        }
    }
    None
}

/// Whether a deny entry's `sources` hold the flow's source: any source, or a range of the set it names.
#[inline(never)]
fn from_v4(flow: &Flow, generation: u8, sources: u32) -> bool {
    if sources == DENY_ANY_SOURCE {
        return true;
    }
    let mut addr = [0u8; 4];
    addr.copy_from_slice(&flow.src[..4]);
    let set = (sources as u16).to_be_bytes();
    let key = Key::new(DENY_KEY_HEADER_BITS + 32, DenySourceV4 { generation, _pad: 0, set, addr });
    maps::DENY_SOURCES_V4.get(key).is_some()
}

#[inline(never)]
fn from_v6(flow: &Flow, generation: u8, sources: u32) -> bool {
    if sources == DENY_ANY_SOURCE {
        return true;
    }
    let set = (sources as u16).to_be_bytes();
    let key = Key::new(DENY_KEY_HEADER_BITS + 128, DenySourceV6 { generation, _pad: 0, set, addr: flow.src });
    maps::DENY_SOURCES_V6.get(key).is_some()
}

/// The longest CIDR entry holding the destination: one hash lookup per prefix length the policy uses, longest
/// first, so the cost depends on how many lengths there are, not on how many entries.
#[inline(never)]
fn cidr_v4(flow: &Flow, generation: u8, addr: [u8; 4], config: &DatapathConfig) -> Option<&'static Rule> {
    let mut key = CidrV4 { proto: flow.proto, generation, port: flow.dst_port.to_be_bytes(), ..CidrV4::default() };
    for i in 0..MAX_CIDR_LENGTHS {
        if i >= usize::from(config.cidr_count_v4) {
            break;
        }
        key.prefix_len = config.cidr_lengths_v4[i];
        key.addr = mask_v4(addr, u32::from(key.prefix_len));
        // SAFETY: the value is copied out at once; entries of the active generation are never deleted.
        if let Some(rule) = unsafe { maps::CIDR_V4.get(key) }.and_then(live) {
            return Some(rule);
        }
    }
    None
}

#[inline(never)]
fn cidr_v6(flow: &Flow, generation: u8, config: &DatapathConfig) -> Option<&'static Rule> {
    let mut key = CidrV6 { proto: flow.proto, generation, port: flow.dst_port.to_be_bytes(), ..CidrV6::default() };
    for i in 0..MAX_CIDR_LENGTHS {
        if i >= usize::from(config.cidr_count_v6) {
            break;
        }
        key.prefix_len = config.cidr_lengths_v6[i];
        key.addr = mask_v6(flow.dst, u32::from(key.prefix_len));
        // SAFETY: as above.
        if let Some(rule) = unsafe { maps::CIDR_V6.get(key) }.and_then(live) {
            return Some(rule);
        }
    }
    None
}

/// The entry, unless it has expired.
#[inline(always)]
fn live<'a>(rule: &'a Rule) -> Option<&'a Rule> {
    // SAFETY: a helper with no arguments.
    if rule.expires_ns != 0 && unsafe { bpf_ktime_get_ns() } > rule.expires_ns {
        return None;
    }
    Some(rule)
}
