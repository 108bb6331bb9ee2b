//! Reads the classifier's per-CPU, per-verdict packet and byte counters.

use std::sync::Arc;

use aya::{
    maps::{MapData, PerCpuArray},
    Ebpf,
};
use sluice_common::{names, Counter, Verdict};

use super::{take_map, DatapathError};

/// A shared handle on the counters map; reading it is a syscall per verdict, done at scrape time only.
#[derive(Clone)]
pub struct VerdictCounters {
    map: Arc<PerCpuArray<MapData, Counter>>,
}

impl std::fmt::Debug for VerdictCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VerdictCounters")
    }
}

/// Packets and bytes of one verdict, summed over CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerdictTotals {
    pub verdict: Verdict,
    pub packets: u64,
    pub bytes: u64,
}

impl VerdictCounters {
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Self, DatapathError> {
        let map = PerCpuArray::try_from(take_map(ebpf, names::COUNTERS)?)
            .map_err(|source| DatapathError::Map { map: names::COUNTERS, source })?;
        Ok(VerdictCounters { map: Arc::new(map) })
    }

    /// Totals for every verdict; a verdict whose slot cannot be read counts as zero.
    pub fn read(&self) -> Vec<VerdictTotals> {
        Verdict::ALL
            .iter()
            .map(|&verdict| {
                let per_cpu = self.map.get(&(verdict as u32), 0);
                let (packets, bytes) = per_cpu
                    .map(|values| values.iter().fold((0, 0), |(p, b), c| (p + c.packets, b + c.bytes)))
                    .unwrap_or_default();
                VerdictTotals { verdict, packets, bytes }
            })
            .collect()
    }
}
