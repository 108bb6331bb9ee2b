//! Workloads whose own outbound traffic policy (a Sidecar's) differs from the policy's mode: by source address,
//! the mode the kernel applies to what of theirs no rule matches.

use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
};

use aya::{
    maps::{Array, HashMap, MapData, MapError},
    Ebpf,
};
use sluice_common::{names, SourceKey, FAMILY_V4, FAMILY_V6, MAX_SOURCES, MODE_ALLOW_ANY, MODE_REGISTRY_ONLY};

use super::{take_map, DatapathError};
use crate::policy::OutboundMode;

pub(super) struct SourceModes {
    map: HashMap<MapData, SourceKey, u32>,
    in_use: Array<MapData, u32>,
}

impl SourceModes {
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Self, DatapathError> {
        let map = HashMap::try_from(take_map(ebpf, names::SOURCES)?)
            .map_err(|source| DatapathError::Map { map: names::SOURCES, source })?;
        let in_use = Array::try_from(take_map(ebpf, names::SOURCES_IN_USE)?)
            .map_err(|source| DatapathError::Map { map: names::SOURCES_IN_USE, source })?;
        Ok(SourceModes { map, in_use })
    }

    /// Makes `modes` the per-source modes in force: entries written one by one (each whole), then the ones no
    /// longer wanted removed. Packets look the map up while it is marked in use: marked after the first entries
    /// are written, unmarked before the last are removed.
    pub(super) fn write(&mut self, modes: &BTreeMap<IpAddr, OutboundMode>) -> Result<(), DatapathError> {
        if modes.len() > MAX_SOURCES as usize {
            return Err(DatapathError::Capacity { map: names::SOURCES, count: modes.len(), capacity: MAX_SOURCES });
        }
        let error = |source| DatapathError::Map { map: names::SOURCES, source };
        let mark = |in_use: &mut Array<MapData, u32>, value: u32| {
            in_use.set(0, value, 0).map_err(|source| DatapathError::Map { map: names::SOURCES_IN_USE, source })
        };
        if modes.is_empty() {
            mark(&mut self.in_use, 0)?;
        }
        let wanted: HashSet<SourceKey> = modes.keys().map(|address| key(*address)).collect();
        for (address, mode) in modes {
            let mode = match mode {
                OutboundMode::AllowAny => MODE_ALLOW_ANY,
                OutboundMode::RegistryOnly => MODE_REGISTRY_ONLY,
            };
            self.map.insert(key(*address), mode, 0).map_err(error)?;
        }
        let stale: Vec<SourceKey> = self.map.keys().filter_map(Result::ok).filter(|k| !wanted.contains(k)).collect();
        for key in stale {
            match self.map.remove(&key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(source) => return Err(error(source)),
            }
        }
        if !modes.is_empty() {
            mark(&mut self.in_use, 1)?;
        }
        Ok(())
    }
}

fn key(address: IpAddr) -> SourceKey {
    let mut key = SourceKey::default();
    match address {
        IpAddr::V4(v4) => {
            key.family = FAMILY_V4;
            key.addr[..4].copy_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            key.family = FAMILY_V6;
            key.addr = v6.octets();
        }
    }
    key
}
