//! The classifier's maps (pinned by name, so a restarted agent adopts them) and the per-verdict counters.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use sluice_common::{
    AllowV4, AllowV6, CidrV4, CidrV6, Counter, DatapathConfig, DenySourceV4, DenySourceV6, DenyV4, DenyV6,
    DestinationKey, DestinationStats, FlowKey, FragmentKey, PortKey, Rule, SourceKey, Verdict, EVENTS_BYTES, L4V4,
    L4V6, MAX_BLACKHOLED, MAX_FLOWS, MAX_FRAGMENTED, MAX_RULES, MAX_SOURCES, VERDICT_COUNT,
};

/// Room for two generations of policy.
const ENTRIES: u32 = 2 * MAX_RULES;

#[map(name = "SLUICE_ACTIVE")]
pub static ACTIVE: Array<u32> = Array::pinned(1, 0);
#[map(name = "SLUICE_CONFIG")]
pub static CONFIG: Array<DatapathConfig> = Array::pinned(2, 0);
#[map(name = "SLUICE_EXACT4")]
pub static EXACT_V4: HashMap<L4V4, Rule> = HashMap::pinned(ENTRIES, BPF_F_NO_PREALLOC);
#[map(name = "SLUICE_EXACT6")]
pub static EXACT_V6: HashMap<L4V6, Rule> = HashMap::pinned(ENTRIES, BPF_F_NO_PREALLOC);
#[map(name = "SLUICE_CIDR4")]
pub static CIDR_V4: HashMap<CidrV4, Rule> = HashMap::pinned(ENTRIES, BPF_F_NO_PREALLOC);
#[map(name = "SLUICE_CIDR6")]
pub static CIDR_V6: HashMap<CidrV6, Rule> = HashMap::pinned(ENTRIES, BPF_F_NO_PREALLOC);
#[map(name = "SLUICE_ALLOW4")]
pub static ALLOW_V4: LpmTrie<AllowV4, u32> = LpmTrie::pinned(ENTRIES, 0);
#[map(name = "SLUICE_ALLOW6")]
pub static ALLOW_V6: LpmTrie<AllowV6, u32> = LpmTrie::pinned(ENTRIES, 0);
#[map(name = "SLUICE_DENY4")]
pub static DENY_V4: LpmTrie<DenyV4, u32> = LpmTrie::pinned(ENTRIES, 0);
#[map(name = "SLUICE_DENY6")]
pub static DENY_V6: LpmTrie<DenyV6, u32> = LpmTrie::pinned(ENTRIES, 0);
#[map(name = "SLUICE_DENYSRC4")]
pub static DENY_SOURCES_V4: LpmTrie<DenySourceV4, u32> = LpmTrie::pinned(ENTRIES, 0);
#[map(name = "SLUICE_DENYSRC6")]
pub static DENY_SOURCES_V6: LpmTrie<DenySourceV6, u32> = LpmTrie::pinned(ENTRIES, 0);
#[map(name = "SLUICE_PORTS")]
pub static PORTS: HashMap<PortKey, Rule> = HashMap::pinned(2 * 65_536, BPF_F_NO_PREALLOC);
#[map(name = "SLUICE_COUNTERS")]
pub static COUNTERS: PerCpuArray<Counter> = PerCpuArray::pinned(VERDICT_COUNT, 0);
#[map(name = "SLUICE_BLACKHOL")]
pub static BLACKHOLED: LruHashMap<DestinationKey, DestinationStats> = LruHashMap::pinned(MAX_BLACKHOLED, 0);
#[map(name = "SLUICE_FLOWS")]
pub static FLOWS: LruHashMap<FlowKey, u64> = LruHashMap::pinned(MAX_FLOWS, 0);
#[map(name = "SLUICE_FRAGS")]
pub static FRAGMENTS: LruHashMap<FragmentKey, u32> = LruHashMap::pinned(MAX_FRAGMENTED, 0);
#[map(name = "SLUICE_SOURCES")]
pub static SOURCES: HashMap<SourceKey, u32> = HashMap::pinned(MAX_SOURCES, BPF_F_NO_PREALLOC);
#[map(name = "SLUICE_SRCUSED")]
pub static SOURCES_IN_USE: Array<u32> = Array::pinned(1, 0);
#[map(name = "SLUICE_EVENTS")]
pub static EVENTS: RingBuf = RingBuf::pinned(EVENTS_BYTES, 0);

/// The generation in force and its config, read once per packet; None before the agent has written a policy.
#[inline(always)]
pub fn active() -> Option<(u8, &'static DatapathConfig)> {
    let generation = *ACTIVE.get(0)? & 1;
    let config = CONFIG.get(generation)?;
    // A config with no mark was never written: the agent always sets one.
    if config.mark == 0 {
        return None;
    }
    Some((generation as u8, config))
}

/// The mode for what no rule matches from `src` (of `family`): its workload's own, else the generation's.
#[inline(always)]
pub fn mode_for(family: u8, src: &[u8; 16], config: &DatapathConfig) -> u32 {
    // No workload has a mode of its own (the usual case): no hash lookup.
    if SOURCES_IN_USE.get(0).is_none_or(|&in_use| in_use == 0) {
        return config.mode;
    }
    let key = SourceKey { addr: *src, family, _pad: [0; 3] };
    // SAFETY: the value is copied out at once; the agent replaces entries whole.
    unsafe { SOURCES.get(&key) }.copied().unwrap_or(config.mode)
}

#[inline(always)]
pub fn count(verdict: Verdict, len: u32) {
    if let Some(counter) = COUNTERS.get_ptr_mut(verdict as u32) {
        // SAFETY: a per-CPU slot, written only by this CPU while this program runs.
        let counter = unsafe { &mut *counter };
        counter.packets += 1;
        counter.bytes += u64::from(len);
    }
}
