//! The kernel side: loads the classifier, writes the policy into its maps, attaches it to the intercepted
//! interfaces and reads its counters.

mod counters;
mod object;
mod policy_maps;

use std::io;

use aya::{
    maps::{Array, MapData, MapError},
    programs::{tc::TcAttachType, ProgramError, SchedClassifier},
    Ebpf, EbpfError,
};
use sluice_common::names;

pub use counters::{VerdictCounters, VerdictTotals};
use policy_maps::PolicyMaps;

use crate::policy::DatapathPolicy;

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the eBPF object: {0} (is this root, with CAP_BPF and CAP_NET_ADMIN?)")]
    Load(EbpfError),
    #[error("the eBPF object has no {kind} '{name}' (was it built from another version? run `cargo xtask build`)")]
    Missing { kind: &'static str, name: &'static str },
    #[error("the kernel's verifier rejected program {program}: {error}\nverifier log:\n{log}")]
    Verifier { program: &'static str, error: io::Error, log: String },
    #[error("loading program {program}")]
    Program {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("attaching TC ingress to {interface}: interface not found (is --intercept right?)")]
    InterfaceNotFound { interface: String },
    #[error("attaching TC ingress to {interface}")]
    Attach {
        interface: String,
        #[source]
        source: ProgramError,
    },
    #[error("writing map {map}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("the policy has {count} entries for map {map}, which holds {capacity}")]
    Capacity { map: &'static str, count: usize, capacity: u32 },
}

/// The loaded classifier. Dropping it detaches the program from every interface it was attached to.
pub struct Datapath {
    ebpf: Ebpf,
    config: Array<MapData, sluice_common::DatapathConfig>,
    policy: PolicyMaps,
    counters: VerdictCounters,
    attached: Vec<String>,
}

impl Datapath {
    /// Loads the embedded object and its program into the kernel; nothing is attached yet.
    pub fn load() -> Result<Self, DatapathError> {
        let mut ebpf = Ebpf::load(object::OBJECT).map_err(DatapathError::Load)?;
        let program: &mut SchedClassifier = program(&mut ebpf)?;
        program.load().map_err(|source| match source {
            ProgramError::LoadError { io_error, verifier_log } => {
                DatapathError::Verifier { program: names::PROGRAM, error: io_error, log: verifier_log.to_string() }
            }
            source => DatapathError::Program { program: names::PROGRAM, source },
        })?;
        let config = Array::try_from(take_map(&mut ebpf, names::CONFIG)?)
            .map_err(|source| DatapathError::Map { map: names::CONFIG, source })?;
        let policy = PolicyMaps::take(&mut ebpf)?;
        let counters = VerdictCounters::take(&mut ebpf)?;
        Ok(Datapath { ebpf, config, policy, counters, attached: Vec::new() })
    }

    /// Writes `policy` into the maps, replacing what was there.
    pub fn apply(&mut self, policy: &DatapathPolicy) -> Result<(), DatapathError> {
        self.policy.write(policy)?;
        let config = sluice_common::DatapathConfig {
            mode: match policy.mode {
                crate::policy::OutboundMode::AllowAny => sluice_common::MODE_ALLOW_ANY,
                crate::policy::OutboundMode::RegistryOnly => sluice_common::MODE_REGISTRY_ONLY,
            },
            blackhole: sluice_common::BLACKHOLE_DROP,
        };
        self.config.set(0, config, 0).map_err(|source| DatapathError::Map { map: names::CONFIG, source })
    }

    /// Attaches the classifier to `interface`'s ingress (TCX where the kernel has it, clsact otherwise).
    pub fn attach(&mut self, interface: &str) -> Result<(), DatapathError> {
        let program = program(&mut self.ebpf)?;
        program.attach(interface, TcAttachType::Ingress).map_err(|source| match source {
            ProgramError::TcError(aya::programs::tc::TcError::IoError(error))
                if error.raw_os_error() == Some(nix::errno::Errno::ENODEV as i32) =>
            {
                DatapathError::InterfaceNotFound { interface: interface.to_owned() }
            }
            source => DatapathError::Attach { interface: interface.to_owned(), source },
        })?;
        self.attached.push(interface.to_owned());
        Ok(())
    }

    pub fn attached(&self) -> &[String] {
        &self.attached
    }

    /// A reader of the per-verdict counters, for metrics.
    pub fn counters(&self) -> VerdictCounters {
        self.counters.clone()
    }
}

fn program(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier, DatapathError> {
    let missing = DatapathError::Missing { kind: "program", name: names::PROGRAM };
    ebpf.program_mut(names::PROGRAM)
        .ok_or(missing)?
        .try_into()
        .map_err(|source| DatapathError::Program { program: names::PROGRAM, source })
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, DatapathError> {
    ebpf.take_map(name).ok_or(DatapathError::Missing { kind: "map", name })
}
