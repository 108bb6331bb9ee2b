//! Fragmented datagrams: only the first fragment carries the ports, so its verdict is remembered (by addresses,
//! protocol and identification) and given to the later fragments, which would otherwise match no L4 entry.

use sluice_common::{DatapathConfig, FragmentKey, Verdict};

use crate::{maps, parse::Flow, policy};

const ALLOWED: u32 = 1;

#[inline(never)]
pub fn decide(flow: &Flow, generation: u8, config: &DatapathConfig) -> Verdict {
    let key = FragmentKey {
        src: flow.src,
        dst: flow.dst,
        id: flow.fragment_id,
        family: flow.family,
        proto: flow.proto,
        _pad: [0; 2],
    };
    if flow.first_fragment {
        let verdict = policy::decide(flow, generation, config);
        if verdict == Verdict::Allowed {
            let _ = maps::FRAGMENTS.insert(key, ALLOWED, 0);
        }
        return verdict;
    }
    // SAFETY: the value is copied out at once.
    if unsafe { maps::FRAGMENTS.get(key) }.is_some_and(|&verdict| verdict == ALLOWED) {
        return Verdict::Allowed;
    }
    policy::decide(flow, generation, config)
}
