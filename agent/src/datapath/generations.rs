//! Writes a policy into the classifier's maps as a new generation and switches to it: every key carries its
//! generation, `SLUICE_ACTIVE` says which one is in force, and the old generation is deleted only once no
//! packet can still be using it.
#![expect(unsafe_code, reason = "membarrier(2) has no safe wrapper in nix")]

use std::collections::{BTreeMap, BTreeSet};

use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData, MapError},
    Ebpf, Pod,
};
use ipnet::IpNet;
use sluice_common::{
    names, AllowV4, AllowV6, CidrV4, CidrV6, DatapathConfig, DenySourceV4, DenySourceV6, DenyV4, DenyV6, PortKey, Rule,
    ACTION_INTERCEPT, ACTION_PASS, ALLOW_KEY_HEADER_BITS, BLACKHOLE_DROP, BLACKHOLE_REJECT, DENY_ANY_SOURCE,
    DENY_KEY_HEADER_BITS, FLAG_UNMATCHED_TCP_TO_PROXY, L4V4, L4V6, MAX_CIDR_LENGTHS, MAX_RULES, MODE_ALLOW_ANY,
    MODE_REGISTRY_ONLY, TABLE_ALLOW_V4, TABLE_ALLOW_V6, TABLE_CIDR_V4, TABLE_CIDR_V6, TABLE_DENY_V4, TABLE_DENY_V6,
    TABLE_EXACT_V4, TABLE_EXACT_V6, TABLE_PORTS,
};

use super::{routing::MARK, take_map, DatapathError};
use crate::policy::{authorization::KernelDenial, BlackholeAction, DatapathPolicy, OutboundMode, Protocol};

pub(super) struct PolicyMaps {
    active: Array<MapData, u32>,
    config: Array<MapData, DatapathConfig>,
    exact_v4: HashMap<MapData, L4V4, Rule>,
    exact_v6: HashMap<MapData, L4V6, Rule>,
    cidr_v4: HashMap<MapData, CidrV4, Rule>,
    cidr_v6: HashMap<MapData, CidrV6, Rule>,
    allow_v4: LpmTrie<MapData, AllowV4, u32>,
    allow_v6: LpmTrie<MapData, AllowV6, u32>,
    deny_v4: LpmTrie<MapData, DenyV4, u32>,
    deny_v6: LpmTrie<MapData, DenyV6, u32>,
    deny_sources_v4: LpmTrie<MapData, DenySourceV4, u32>,
    deny_sources_v6: LpmTrie<MapData, DenySourceV6, u32>,
    ports: HashMap<MapData, PortKey, Rule>,
    /// Whether the inactive generation is known to be empty (not so for maps adopted from a previous agent).
    inactive_empty: bool,
}

/// One generation's entries, built before any map is touched.
#[derive(Default)]
struct Entries {
    exact_v4: Vec<(L4V4, Rule)>,
    exact_v6: Vec<(L4V6, Rule)>,
    cidr_v4: Vec<(CidrV4, Rule)>,
    cidr_v6: Vec<(CidrV6, Rule)>,
    allow_v4: Vec<(Key<AllowV4>, u32)>,
    allow_v6: Vec<(Key<AllowV6>, u32)>,
    deny_v4: Vec<(Key<DenyV4>, u32)>,
    deny_v6: Vec<(Key<DenyV6>, u32)>,
    deny_sources_v4: Vec<(Key<DenySourceV4>, u32)>,
    deny_sources_v6: Vec<(Key<DenySourceV6>, u32)>,
    /// Distinct source sets the deny entries name (ids are 16 bits in the keys).
    deny_source_sets: usize,
    ports: Vec<(PortKey, Rule)>,
}

impl PolicyMaps {
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Self, DatapathError> {
        fn typed<T: TryFrom<aya::maps::Map, Error = MapError>>(
            ebpf: &mut Ebpf,
            name: &'static str,
        ) -> Result<T, DatapathError> {
            T::try_from(take_map(ebpf, name)?).map_err(|source| DatapathError::Map { map: name, source })
        }
        Ok(PolicyMaps {
            active: typed(ebpf, names::ACTIVE)?,
            config: typed(ebpf, names::CONFIG)?,
            exact_v4: typed(ebpf, names::EXACT_V4)?,
            exact_v6: typed(ebpf, names::EXACT_V6)?,
            cidr_v4: typed(ebpf, names::CIDR_V4)?,
            cidr_v6: typed(ebpf, names::CIDR_V6)?,
            allow_v4: typed(ebpf, names::ALLOW_V4)?,
            allow_v6: typed(ebpf, names::ALLOW_V6)?,
            deny_v4: typed(ebpf, names::DENY_V4)?,
            deny_v6: typed(ebpf, names::DENY_V6)?,
            deny_sources_v4: typed(ebpf, names::DENY_SOURCES_V4)?,
            deny_sources_v6: typed(ebpf, names::DENY_SOURCES_V6)?,
            ports: typed(ebpf, names::PORTS)?,
            inactive_empty: false,
        })
    }

    pub(super) fn write(&mut self, policy: &DatapathPolicy) -> Result<(), DatapathError> {
        let current = self.active.get(&0, 0).map_err(|source| DatapathError::Map { map: names::ACTIVE, source })? & 1;
        let next = current ^ 1;
        let entries = Entries::build(policy, next as u8);
        entries.check_capacity()?;
        if !self.inactive_empty {
            self.delete_generation(next as u8)?;
        }
        self.insert(&entries)?;
        self.config
            .set(next, config(policy, &entries), 0)
            .map_err(|source| DatapathError::Map { map: names::CONFIG, source })?;
        self.active.set(0, next, 0).map_err(|source| DatapathError::Map { map: names::ACTIVE, source })?;
        wait_for_running_programs();
        self.delete_generation(current as u8)?;
        self.inactive_empty = true;
        Ok(())
    }

    fn insert(&mut self, entries: &Entries) -> Result<(), DatapathError> {
        let fail = |map| move |source| DatapathError::Map { map, source };
        for (key, rule) in &entries.exact_v4 {
            self.exact_v4.insert(key, rule, 0).map_err(fail(names::EXACT_V4))?;
        }
        for (key, rule) in &entries.exact_v6 {
            self.exact_v6.insert(key, rule, 0).map_err(fail(names::EXACT_V6))?;
        }
        for (key, rule) in &entries.cidr_v4 {
            self.cidr_v4.insert(key, rule, 0).map_err(fail(names::CIDR_V4))?;
        }
        for (key, rule) in &entries.cidr_v6 {
            self.cidr_v6.insert(key, rule, 0).map_err(fail(names::CIDR_V6))?;
        }
        for (key, value) in &entries.allow_v4 {
            self.allow_v4.insert(key, value, 0).map_err(fail(names::ALLOW_V4))?;
        }
        for (key, value) in &entries.allow_v6 {
            self.allow_v6.insert(key, value, 0).map_err(fail(names::ALLOW_V6))?;
        }
        for (key, value) in &entries.deny_v4 {
            self.deny_v4.insert(key, value, 0).map_err(fail(names::DENY_V4))?;
        }
        for (key, value) in &entries.deny_v6 {
            self.deny_v6.insert(key, value, 0).map_err(fail(names::DENY_V6))?;
        }
        for (key, value) in &entries.deny_sources_v4 {
            self.deny_sources_v4.insert(key, value, 0).map_err(fail(names::DENY_SOURCES_V4))?;
        }
        for (key, value) in &entries.deny_sources_v6 {
            self.deny_sources_v6.insert(key, value, 0).map_err(fail(names::DENY_SOURCES_V6))?;
        }
        for (key, rule) in &entries.ports {
            self.ports.insert(key, rule, 0).map_err(fail(names::PORTS))?;
        }
        Ok(())
    }

    fn delete_generation(&mut self, generation: u8) -> Result<(), DatapathError> {
        delete_hash(&mut self.exact_v4, names::EXACT_V4, |k| k.generation == generation)?;
        delete_hash(&mut self.exact_v6, names::EXACT_V6, |k| k.generation == generation)?;
        delete_hash(&mut self.ports, names::PORTS, |k| k.generation == generation)?;
        delete_hash(&mut self.cidr_v4, names::CIDR_V4, |k| k.generation == generation)?;
        delete_hash(&mut self.cidr_v6, names::CIDR_V6, |k| k.generation == generation)?;
        delete_trie(&mut self.allow_v4, names::ALLOW_V4, |k| k.generation == generation)?;
        delete_trie(&mut self.allow_v6, names::ALLOW_V6, |k| k.generation == generation)?;
        delete_trie(&mut self.deny_v4, names::DENY_V4, |k| k.generation == generation)?;
        delete_trie(&mut self.deny_v6, names::DENY_V6, |k| k.generation == generation)?;
        delete_trie(&mut self.deny_sources_v4, names::DENY_SOURCES_V4, |k| k.generation == generation)?;
        delete_trie(&mut self.deny_sources_v6, names::DENY_SOURCES_V6, |k| k.generation == generation)
    }
}

impl Entries {
    fn build(policy: &DatapathPolicy, generation: u8) -> Entries {
        let mut entries = Entries::default();
        let pass = Rule { action: ACTION_PASS, ..Rule::default() };
        for rule in &policy.rules {
            let (proto, port) = (rule.protocol.number(), rule.port.to_be_bytes());
            match rule.net {
                IpNet::V4(net) => {
                    let key = L4V4 { proto, generation, port, addr: net.network().octets() };
                    if net.prefix_len() == 32 {
                        entries.exact_v4.push((key, pass));
                    } else {
                        let (prefix_len, addr) = (net.prefix_len(), net.network().octets());
                        let key = CidrV4 { proto, generation, port, prefix_len, _pad: [0; 3], addr };
                        entries.cidr_v4.push((key, pass));
                    }
                }
                IpNet::V6(net) => {
                    let key = L4V6 { proto, generation, port, addr: net.network().octets() };
                    if net.prefix_len() == 128 {
                        entries.exact_v6.push((key, pass));
                    } else {
                        let (prefix_len, addr) = (net.prefix_len(), net.network().octets());
                        let key = CidrV6 { proto, generation, port, prefix_len, _pad: [0; 3], addr };
                        entries.cidr_v6.push((key, pass));
                    }
                }
            }
        }
        for net in &policy.allow_cidrs {
            let bits = ALLOW_KEY_HEADER_BITS + u32::from(net.prefix_len());
            match net {
                IpNet::V4(net) => entries
                    .allow_v4
                    .push((Key::new(bits, AllowV4 { generation, _pad: [0; 3], addr: net.network().octets() }), 1)),
                IpNet::V6(net) => entries
                    .allow_v6
                    .push((Key::new(bits, AllowV6 { generation, _pad: [0; 3], addr: net.network().octets() }), 1)),
            }
        }
        entries.add_denials(&policy.denials, generation);
        if policy.proxy_port != 0 {
            let intercept = Rule { action: ACTION_INTERCEPT, ..Rule::default() };
            for port in &policy.intercept_ports {
                let key = PortKey { proto: Protocol::Tcp.number(), generation, port: port.to_be_bytes() };
                entries.ports.push((key, intercept));
            }
        }
        entries
    }

    /// The deny entries: one per destination and port, whose value names the sources it is denied from. The
    /// classifier finds the longest destination prefix only, so each entry's sources include those of every
    /// broader entry on its port; a source set repeated is written once.
    fn add_denials(&mut self, denials: &[KernelDenial], generation: u8) {
        let mut sets: BTreeMap<Vec<IpNet>, u32> = BTreeMap::new();
        let keys: BTreeSet<(IpNet, u16)> = denials.iter().map(|denial| (denial.net, denial.port)).collect();
        for (net, port) in keys {
            let covering = denials.iter().filter(|d| d.port == port && d.net.contains(&net));
            let mut sources = BTreeSet::new();
            let mut from_anyone = false;
            for denial in covering {
                from_anyone |= denial.sources.is_empty();
                sources.extend(denial.sources.iter().copied());
            }
            let value = if from_anyone {
                DENY_ANY_SOURCE
            } else {
                let next = sets.len() as u32 + 1;
                *sets.entry(sources.into_iter().collect()).or_insert(next)
            };
            let (port, bits) = (port.to_be_bytes(), DENY_KEY_HEADER_BITS + u32::from(net.prefix_len()));
            match net {
                IpNet::V4(net) => {
                    let key = DenyV4 { generation, _pad: 0, port, addr: net.network().octets() };
                    self.deny_v4.push((Key::new(bits, key), value));
                }
                IpNet::V6(net) => {
                    let key = DenyV6 { generation, _pad: 0, port, addr: net.network().octets() };
                    self.deny_v6.push((Key::new(bits, key), value));
                }
            }
        }
        self.deny_source_sets = sets.len();
        for (sources, id) in sets {
            let set = (id as u16).to_be_bytes();
            for source in sources {
                let bits = DENY_KEY_HEADER_BITS + u32::from(source.prefix_len());
                match source {
                    IpNet::V4(net) => {
                        let key = DenySourceV4 { generation, _pad: 0, set, addr: net.network().octets() };
                        self.deny_sources_v4.push((Key::new(bits, key), 1));
                    }
                    IpNet::V6(net) => {
                        let key = DenySourceV6 { generation, _pad: 0, set, addr: net.network().octets() };
                        self.deny_sources_v6.push((Key::new(bits, key), 1));
                    }
                }
            }
        }
    }

    /// The distinct prefix lengths of `keys`, longest first, as the classifier walks them.
    fn lengths(keys: impl Iterator<Item = u8>) -> Vec<u8> {
        let mut lengths: Vec<u8> = keys.collect();
        lengths.sort_unstable_by(|a, b| b.cmp(a));
        lengths.dedup();
        lengths
    }

    fn cidr_lengths_v4(&self) -> Vec<u8> {
        Entries::lengths(self.cidr_v4.iter().map(|(key, _)| key.prefix_len))
    }

    fn cidr_lengths_v6(&self) -> Vec<u8> {
        Entries::lengths(self.cidr_v6.iter().map(|(key, _)| key.prefix_len))
    }

    /// The `TABLE_*` bits of the maps this generation puts entries in.
    fn tables(&self) -> u32 {
        let present = [
            (!self.exact_v4.is_empty(), TABLE_EXACT_V4),
            (!self.exact_v6.is_empty(), TABLE_EXACT_V6),
            (!self.cidr_v4.is_empty(), TABLE_CIDR_V4),
            (!self.cidr_v6.is_empty(), TABLE_CIDR_V6),
            (!self.allow_v4.is_empty(), TABLE_ALLOW_V4),
            (!self.allow_v6.is_empty(), TABLE_ALLOW_V6),
            (!self.ports.is_empty(), TABLE_PORTS),
            (!self.deny_v4.is_empty(), TABLE_DENY_V4),
            (!self.deny_v6.is_empty(), TABLE_DENY_V6),
        ];
        present.iter().filter(|(present, _)| *present).fold(0, |bits, (_, bit)| bits | bit)
    }

    fn check_capacity(&self) -> Result<(), DatapathError> {
        let sizes = [
            (names::EXACT_V4, self.exact_v4.len()),
            (names::EXACT_V6, self.exact_v6.len()),
            (names::CIDR_V4, self.cidr_v4.len()),
            (names::CIDR_V6, self.cidr_v6.len()),
            (names::ALLOW_V4, self.allow_v4.len()),
            (names::ALLOW_V6, self.allow_v6.len()),
            (names::DENY_V4, self.deny_v4.len()),
            (names::DENY_V6, self.deny_v6.len()),
            (names::DENY_SOURCES_V4, self.deny_sources_v4.len()),
            (names::DENY_SOURCES_V6, self.deny_sources_v6.len()),
        ];
        if let Some((map, count)) = sizes.into_iter().find(|(_, count)| *count > MAX_RULES as usize) {
            return Err(DatapathError::Capacity { map, count, capacity: MAX_RULES });
        }
        if self.deny_source_sets > usize::from(u16::MAX) {
            let (map, count, capacity) = (names::DENY_SOURCES_V4, self.deny_source_sets, u32::from(u16::MAX));
            return Err(DatapathError::Capacity { map, count, capacity });
        }
        for (family, lengths) in [("IPv4", self.cidr_lengths_v4()), ("IPv6", self.cidr_lengths_v6())] {
            if lengths.len() > MAX_CIDR_LENGTHS {
                return Err(DatapathError::PrefixLengths { family, count: lengths.len(), limit: MAX_CIDR_LENGTHS });
            }
        }
        Ok(())
    }
}

/// The config of a generation; `entries` passed `check_capacity`.
fn config(policy: &DatapathPolicy, entries: &Entries) -> DatapathConfig {
    let (v4, v6) = (entries.cidr_lengths_v4(), entries.cidr_lengths_v6());
    let padded = |lengths: &[u8]| {
        let mut out = [0u8; MAX_CIDR_LENGTHS];
        out[..lengths.len()].copy_from_slice(lengths);
        out
    };
    DatapathConfig {
        mode: match policy.mode {
            OutboundMode::AllowAny => MODE_ALLOW_ANY,
            OutboundMode::RegistryOnly => MODE_REGISTRY_ONLY,
        },
        blackhole: match policy.blackhole {
            BlackholeAction::Drop => BLACKHOLE_DROP,
            BlackholeAction::Reject => BLACKHOLE_REJECT,
        },
        proxy_port: policy.proxy_port,
        flags: if policy.unmatched_tcp_to_proxy { FLAG_UNMATCHED_TCP_TO_PROXY } else { 0 },
        mark: MARK,
        tables: entries.tables(),
        cidr_count_v4: v4.len() as u8,
        cidr_count_v6: v6.len() as u8,
        _pad2: [0; 2],
        cidr_lengths_v4: padded(&v4),
        cidr_lengths_v6: padded(&v6),
    }
}

fn delete_hash<K: Pod, V: Pod>(
    map: &mut HashMap<MapData, K, V>,
    name: &'static str,
    doomed: impl Fn(&K) -> bool,
) -> Result<(), DatapathError> {
    let keys: Vec<K> = map.keys().filter_map(Result::ok).filter(|k| doomed(k)).collect();
    for key in keys {
        match map.remove(&key) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(source) => return Err(DatapathError::Map { map: name, source }),
        }
    }
    Ok(())
}

fn delete_trie<K: Pod, V: Pod>(
    map: &mut LpmTrie<MapData, K, V>,
    name: &'static str,
    doomed: impl Fn(&K) -> bool,
) -> Result<(), DatapathError> {
    let keys: Vec<Key<K>> = map.keys().filter_map(Result::ok).filter(|k| doomed(&k.data())).collect();
    for key in keys {
        match map.remove(&key) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(source) => return Err(DatapathError::Map { map: name, source }),
        }
    }
    Ok(())
}

/// Returns once every classifier run that may have read the previous generation has finished: TC programs run
/// inside RCU read-side sections, and `membarrier(MEMBARRIER_CMD_GLOBAL)` waits for an RCU grace period.
fn wait_for_running_programs() {
    const MEMBARRIER_CMD_GLOBAL: nix::libc::c_int = 1;
    // SAFETY: membarrier takes two integers and touches no memory of ours.
    let result = unsafe { nix::libc::syscall(nix::libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if result != 0 {
        // Kernels with nohz_full CPUs refuse it; a classifier run takes microseconds.
        tracing::debug!(error = %std::io::Error::last_os_error(), "membarrier unavailable; waiting 10 ms instead");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
