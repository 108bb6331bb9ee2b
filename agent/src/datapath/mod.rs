//! The kernel side: loads the classifier (adopting the maps and links a previous agent pinned), writes the
//! policy into its maps a generation at a time, attaches it to the intercepted interfaces, and reads what it
//! counted.

mod blackholed;
mod counters;
mod generations;
mod object;
mod pins;
mod routing;
mod sources;

use std::{io, path::Path};

use aya::{
    maps::{MapData, MapError, RingBuf},
    programs::{
        links::{FdLink, LinkError, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions, TcAttachType, TcError},
        LinkOrder, ProgramError, SchedClassifier, TestRun, TestRunOptions,
    },
    Ebpf, EbpfError, EbpfLoader,
};
use sluice_common::names;

pub use blackholed::{protocol_name, BlackholedDestination, BlackholedDestinations, BlockedFlow};
pub use counters::{VerdictCounters, VerdictTotals};
pub use pins::{cleanup, DEFAULT_PIN_DIR};
pub use routing::{InterceptRouting, MARK, MARK_MASK, ROUTE_TABLE, RULE_PRIORITY};

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
    #[error("adopting the pinned link {path}")]
    Adopt {
        path: String,
        #[source]
        source: LinkError,
    },
    #[error("map {map}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("the policy has {count} entries for map {map}, which holds {capacity} per generation")]
    Capacity { map: &'static str, count: usize, capacity: u32 },
    #[error("the policy's {family} CIDRs use {count} distinct prefix lengths; the datapath looks up at most {limit}")]
    PrefixLengths { family: &'static str, count: usize, limit: usize },
    #[error("{what} {path}: {error}")]
    Pin { what: &'static str, path: String, error: String },
    #[error("{0}")]
    Bpffs(String),
}

/// The loaded classifier and its maps. Dropping it leaves the program attached and the policy in force:
/// pinned links and maps outlive the agent, so the kernel keeps enforcing (fail closed) until `cleanup`.
pub struct Datapath {
    ebpf: Ebpf,
    pins: pins::PinDir,
    policy: generations::PolicyMaps,
    counters: VerdictCounters,
    blackholed: BlackholedDestinations,
    sources: sources::SourceModes,
    events: Option<RingBuf<MapData>>,
    attached: Vec<String>,
    adopted: Vec<String>,
}

impl Datapath {
    /// Loads the embedded object, reusing the maps pinned under `pin_dir` (created, on a bpf filesystem mounted
    /// if need be, when absent), and loads its program into the kernel; nothing is attached yet.
    pub fn load(pin_dir: &Path) -> Result<Self, DatapathError> {
        let pins = pins::PinDir::prepare(pin_dir)?;
        let replaced = pins.unpin_incompatible_maps(object::OBJECT)?;
        if !replaced.is_empty() {
            tracing::warn!(
                maps = ?replaced,
                "pinned maps of another layout (an earlier version's) are replaced: their counts start again"
            );
        }
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pins.path())
            .load(object::OBJECT)
            .map_err(DatapathError::Load)?;
        let program = program(&mut ebpf)?;
        program.load().map_err(|source| match source {
            ProgramError::LoadError { io_error, verifier_log } => {
                DatapathError::Verifier { program: names::PROGRAM, error: io_error, log: verifier_log.to_string() }
            }
            source => DatapathError::Program { program: names::PROGRAM, source },
        })?;
        pins.pin_program(program)?;
        let policy = generations::PolicyMaps::take(&mut ebpf)?;
        let counters = VerdictCounters::take(&mut ebpf)?;
        let blackholed = BlackholedDestinations::take(&mut ebpf)?;
        let sources = sources::SourceModes::take(&mut ebpf)?;
        let events = RingBuf::try_from(take_map(&mut ebpf, names::EVENTS)?)
            .map_err(|source| DatapathError::Map { map: names::EVENTS, source })?;
        Ok(Datapath {
            ebpf,
            pins,
            policy,
            counters,
            blackholed,
            sources,
            events: Some(events),
            attached: Vec::new(),
            adopted: Vec::new(),
        })
    }

    /// Makes `policy` the one in force, atomically: packets see the old policy or the new, never a mix, and
    /// none still sees the old one once this returns.
    pub fn apply(&mut self, policy: &DatapathPolicy) -> Result<(), DatapathError> {
        self.policy.write(policy)
    }

    /// Makes `modes` the modes of the workloads (by address) whose own outbound traffic policy differs from the
    /// policy's: what no rule matches from them is blackholed or passed by theirs.
    pub fn set_source_modes(
        &mut self,
        modes: &std::collections::BTreeMap<std::net::IpAddr, crate::policy::OutboundMode>,
    ) -> Result<(), DatapathError> {
        self.sources.write(modes)
    }

    /// Fails, naming the first, if any of `interfaces` does not exist: checked before anything is loaded, so a
    /// mistyped --intercept leaves nothing half set up.
    pub fn check_interfaces(interfaces: &[String]) -> Result<(), DatapathError> {
        match interfaces.iter().find(|name| nix::net::if_::if_nametoindex(name.as_str()).is_err()) {
            Some(name) => Err(DatapathError::InterfaceNotFound { interface: name.clone() }),
            None => Ok(()),
        }
    }

    /// Attaches the classifier to `interface`'s TC ingress (TCX, ahead of other programs) and pins the link. A
    /// link pinned by a previous agent is taken over in place: the new program replaces the old atomically.
    pub fn attach(&mut self, interface: &str) -> Result<(), DatapathError> {
        let link_path = self.pins.link(interface);
        let program = program(&mut self.ebpf)?;
        let attach_error = |source| match source {
            ProgramError::TcError(TcError::IoError(error)) if error.raw_os_error() == Some(nix::libc::ENODEV) => {
                DatapathError::InterfaceNotFound { interface: interface.to_owned() }
            }
            source => DatapathError::Attach { interface: interface.to_owned(), source },
        };
        let pinned = match PinnedLink::from_pin(&link_path) {
            Ok(pinned) => Some(pinned),
            Err(LinkError::SyscallError(error)) if error.io_error.kind() == io::ErrorKind::NotFound => None,
            Err(source) => return Err(DatapathError::Adopt { path: link_path.display().to_string(), source }),
        };
        let adopted = pinned.is_some();
        let link_id = match pinned {
            Some(pinned) => {
                let link = SchedClassifierLink::try_from(FdLink::from(pinned))
                    .map_err(|source| DatapathError::Adopt { path: link_path.display().to_string(), source })?;
                program.attach_to_link(link).map_err(attach_error)?
            }
            None => program
                .attach_with_options(interface, TcAttachType::Ingress, TcAttachOptions::TcxOrder(LinkOrder::first()))
                .map_err(attach_error)?,
        };
        let link = program.take_link(link_id).map_err(attach_error)?;
        self.pins.pin_link(link, &link_path)?;
        self.attached.push(interface.to_owned());
        if adopted {
            self.adopted.push(interface.to_owned());
        }
        Ok(())
    }

    /// Detaches the interfaces a previous agent attached and this one was not asked to.
    pub fn detach_others(&mut self) -> Result<Vec<String>, DatapathError> {
        self.pins.unpin_links_except(&self.attached)
    }

    pub fn attached(&self) -> &[String] {
        &self.attached
    }

    /// Interfaces whose pinned link was taken over from a previous agent.
    pub fn adopted(&self) -> &[String] {
        &self.adopted
    }

    /// A reader of the per-verdict counters, for metrics.
    pub fn counters(&self) -> VerdictCounters {
        self.counters.clone()
    }

    /// A reader of the blackholed-destinations map, for metrics.
    pub fn blackholed(&self) -> BlackholedDestinations {
        self.blackholed.clone()
    }

    /// The blocked-flow event ring buffer (once).
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }
}

/// One run of the classifier on a packet, in the kernel (`BPF_PROG_TEST_RUN`).
#[derive(Debug)]
pub struct ClassifierRun {
    /// The TC action returned (-1 continue, 0 accept, 2 drop, 7 redirect).
    pub action: i32,
    /// Mean time per run.
    pub per_run: std::time::Duration,
    /// The packet as the program left it.
    pub output: Vec<u8>,
}

impl Datapath {
    /// Runs the classifier on `packet` (an Ethernet frame) `repeat` times with the policy in force: for
    /// program-level tests and the per-packet cost in the bench. Counters count these runs too.
    pub fn run_on(&mut self, packet: &[u8], repeat: u32) -> Result<ClassifierRun, DatapathError> {
        let program = program(&mut self.ebpf)?;
        let mut output = vec![0u8; packet.len() + 256];
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut output),
                repeat: repeat.max(1),
                ..TestRunOptions::default()
            })
            .map_err(|source| DatapathError::Program { program: names::PROGRAM, source })?;
        output.truncate(result.data_size_out as usize);
        Ok(ClassifierRun { action: result.return_value as i32, per_run: result.duration, output })
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
