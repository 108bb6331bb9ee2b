//! Writes the L4 allowlist and the always-allowed ranges into the classifier's LPM tries.

use std::collections::HashSet;

use aya::{
    maps::{lpm_trie::Key, LpmTrie, MapData, MapError},
    Ebpf, Pod,
};
use ipnet::IpNet;
use sluice_common::{names, Rule, ACTION_PASS, L4V4, L4V6, L4_KEY_HEADER_BITS, MAX_RULES};

use super::{take_map, DatapathError};
use crate::policy::DatapathPolicy;

pub(super) struct PolicyMaps {
    l4_v4: Trie<L4V4, Rule>,
    l4_v6: Trie<L4V6, Rule>,
    allow_v4: Trie<[u8; 4], u32>,
    allow_v6: Trie<[u8; 16], u32>,
}

/// One LPM trie and the keys this agent wrote to it, so that a new policy removes what it no longer holds.
struct Trie<K, V> {
    name: &'static str,
    map: LpmTrie<MapData, K, V>,
    written: HashSet<Vec<u8>>,
}

impl PolicyMaps {
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Self, DatapathError> {
        Ok(PolicyMaps {
            l4_v4: Trie::take(ebpf, names::L4_V4)?,
            l4_v6: Trie::take(ebpf, names::L4_V6)?,
            allow_v4: Trie::take(ebpf, names::ALLOW_V4)?,
            allow_v6: Trie::take(ebpf, names::ALLOW_V6)?,
        })
    }

    pub(super) fn write(&mut self, policy: &DatapathPolicy) -> Result<(), DatapathError> {
        let pass = Rule { action: ACTION_PASS };
        let (mut l4_v4, mut l4_v6) = (Vec::new(), Vec::new());
        for rule in &policy.rules {
            match rule.net {
                IpNet::V4(net) => l4_v4.push((
                    l4_key(
                        net.prefix_len(),
                        L4V4 {
                            proto: rule.protocol.number(),
                            _pad: 0,
                            port: rule.port.to_be_bytes(),
                            addr: net.network().octets(),
                        },
                    ),
                    pass,
                )),
                IpNet::V6(net) => l4_v6.push((
                    l4_key(
                        net.prefix_len(),
                        L4V6 {
                            proto: rule.protocol.number(),
                            _pad: 0,
                            port: rule.port.to_be_bytes(),
                            addr: net.network().octets(),
                        },
                    ),
                    pass,
                )),
            }
        }
        let (mut allow_v4, mut allow_v6) = (Vec::new(), Vec::new());
        for net in &policy.allow_cidrs {
            match net {
                IpNet::V4(net) => allow_v4.push((Key::new(net.prefix_len().into(), net.network().octets()), 1)),
                IpNet::V6(net) => allow_v6.push((Key::new(net.prefix_len().into(), net.network().octets()), 1)),
            }
        }
        // Additions first, removals after: a destination in both the old and new policy never blinks.
        self.l4_v4.replace(&l4_v4)?;
        self.l4_v6.replace(&l4_v6)?;
        self.allow_v4.replace(&allow_v4)?;
        self.allow_v6.replace(&allow_v6)
    }
}

fn l4_key<K: Pod>(prefix_len: u8, data: K) -> Key<K> {
    Key::new(L4_KEY_HEADER_BITS + u32::from(prefix_len), data)
}

impl<K: Pod, V: Pod> Trie<K, V> {
    fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<Self, DatapathError> {
        let map =
            LpmTrie::try_from(take_map(ebpf, name)?).map_err(|source| DatapathError::Map { map: name, source })?;
        Ok(Trie { name, map, written: HashSet::new() })
    }

    fn replace(&mut self, entries: &[(Key<K>, V)]) -> Result<(), DatapathError> {
        if entries.len() > MAX_RULES as usize {
            return Err(DatapathError::Capacity { map: self.name, count: entries.len(), capacity: MAX_RULES });
        }
        let fail = |name, source: MapError| DatapathError::Map { map: name, source };
        let mut wanted = HashSet::with_capacity(entries.len());
        for (key, value) in entries {
            self.map.insert(key, value, 0).map_err(|e| fail(self.name, e))?;
            wanted.insert(bytes_of(key));
            self.written.insert(bytes_of(key));
        }
        let stale: Vec<Vec<u8>> = self.written.difference(&wanted).cloned().collect();
        for key in stale {
            // SAFETY: `key` holds the bytes of a Key<K> that this map was written with.
            let key: Key<K> = unsafe { std::ptr::read_unaligned(key.as_ptr().cast()) };
            match self.map.remove(&key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(fail(self.name, e)),
            }
        }
        self.written = wanted;
        Ok(())
    }
}

fn bytes_of<T: Pod>(value: &T) -> Vec<u8> {
    // SAFETY: Pod types are plain bytes with no padding of undefined value (padding is spelled out).
    unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
}
