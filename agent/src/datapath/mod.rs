//! The kernel side: loads the classifier (adopting the maps and links a previous agent pinned), writes the
//! policy into its maps a generation at a time, attaches it to the intercepted interfaces, and reads what it
//! counted.

mod blackholed;
mod btf;
mod counters;
mod generations;
pub mod interfaces;
mod link_info;
mod link_watch;
mod object;
mod pins;
mod relay_maps;
mod routing;
mod sources;

use std::{collections::BTreeMap, io, path::Path};

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
pub use interfaces::{Interface, InterfaceSpec};
pub use link_watch::LinkEvents;
pub use pins::{cleanup, DEFAULT_PIN_DIR};
pub use relay_maps::{Joining, RelayMaps};
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
    #[error("listing the node's interfaces: {0}")]
    Interfaces(io::Error),
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
    /// The kernel relay's maps, or why it could not be loaded; taken once by the proxy.
    relay: Option<Result<RelayMaps, String>>,
    /// The interfaces the classifier is on, by name: the index of the interface it was attached to.
    attached: BTreeMap<String, u32>,
    /// Every interface name the classifier has been on: one that comes back was re-created.
    known: std::collections::BTreeSet<String>,
    /// Whether the interfaces have been reconciled once: attachments after that mend gaps.
    started: bool,
    /// Whether the maps were taken over whole from a previous agent: its policy is in force in them.
    adopted_policy: bool,
}

/// Why the classifier was attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachReason {
    /// First attached, as the agent starts.
    Started,
    /// The link a previous agent pinned was taken over in place (no gap).
    Adopted,
    /// An interface the specs select appeared.
    Appeared,
    /// The interface was deleted and created again (a new index): the old link went with the old interface.
    Recreated,
    /// The link pinned for the interface was severed (its interface gone) or detached.
    Severed,
    /// The link pinned for this name holds another interface (renamed or re-created while no agent ran).
    Moved,
    /// The pinned link could not be taken over (another program type or version): replaced.
    Incompatible,
}

impl AttachReason {
    pub fn label(self) -> &'static str {
        match self {
            AttachReason::Started => "started",
            AttachReason::Adopted => "adopted",
            AttachReason::Appeared => "appeared",
            AttachReason::Recreated => "recreated",
            AttachReason::Severed => "severed",
            AttachReason::Moved => "moved",
            AttachReason::Incompatible => "incompatible",
        }
    }

    /// Whether this attachment mends a gap (the interface was, or may have been, without the classifier).
    pub fn is_reattachment(self) -> bool {
        !matches!(self, AttachReason::Started | AttachReason::Adopted)
    }
}

/// What one pass over the node's interfaces changed.
#[derive(Debug, Default)]
pub struct InterfacesReconciled {
    /// Interfaces the classifier was attached to, and why.
    pub attached: Vec<(String, AttachReason)>,
    /// Interfaces no longer selected (gone, or renamed to a name no spec selects) whose state was forgotten.
    pub forgotten: Vec<String>,
    /// Interfaces configured and not enforced: names given literally that are not there, and interfaces the
    /// classifier could not be attached to (with why).
    pub unenforced: Vec<(String, String)>,
}

impl Datapath {
    /// Loads the embedded object, reusing the maps pinned under `pin_dir` (created, on a bpf filesystem mounted
    /// if need be, when absent), and loads its program into the kernel; nothing is attached yet.
    pub fn load(pin_dir: &Path) -> Result<Self, DatapathError> {
        Datapath::load_with(pin_dir, false)
    }

    /// As [`Datapath::load`], with the kernel relay's stream verdict loaded too (`--relay-engine kernel`): its maps
    /// are sized for it (otherwise one entry each), and [`Datapath::take_relay`] hands them over.
    pub fn load_with_kernel_relay(pin_dir: &Path) -> Result<Self, DatapathError> {
        Datapath::load_with(pin_dir, true)
    }

    fn load_with(pin_dir: &Path, kernel_relay: bool) -> Result<Self, DatapathError> {
        let pins = pins::PinDir::prepare(pin_dir)?;
        let had_policy = pins.has_map(names::ACTIVE);
        let replaced = pins.unpin_incompatible_maps(object::OBJECT)?;
        if !replaced.is_empty() {
            tracing::warn!(
                maps = ?replaced,
                "pinned maps of another layout (an earlier version's) are replaced: their counts start again"
            );
        }
        // The relay's stream verdict reads the peer's acknowledged bytes and where a joining socket's stream
        // stands where this kernel keeps them; 0 (not found) leaves the relay unloaded.
        let tcp_sock_offset =
            |member| if kernel_relay { btf::member_offset("tcp_sock", member).unwrap_or(0) } else { 0 };
        let (bytes_acked_at, copied_seq_at) = (tcp_sock_offset("bytes_acked"), tcp_sock_offset("copied_seq"));
        let mut loader = EbpfLoader::new();
        loader
            .default_map_pin_directory(pins.path())
            .override_global(names::RELAY_BYTES_ACKED_AT, &bytes_acked_at, true)
            .override_global(names::RELAY_COPIED_SEQ_AT, &copied_seq_at, true);
        if !kernel_relay {
            for map in [names::RELAY_SOCKETS, names::RELAY_DIRECTIONS, names::RELAY_WRITTEN] {
                loader.map_max_entries(map, 1);
            }
        }
        let mut ebpf = loader.load(object::OBJECT).map_err(DatapathError::Load)?;
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
        let relay = if !kernel_relay {
            Err("not loaded (--relay-engine is not kernel)".to_owned())
        } else if bytes_acked_at == 0 || copied_seq_at == 0 {
            Err("the kernel's BTF has no tcp_sock.bytes_acked or tcp_sock.copied_seq".to_owned())
        } else {
            relay_maps::load(&mut ebpf).map_err(|error| format!("{error:#}"))
        };
        Ok(Datapath {
            ebpf,
            pins,
            policy,
            counters,
            blackholed,
            sources,
            events: Some(events),
            relay: Some(relay),
            attached: BTreeMap::new(),
            known: Default::default(),
            started: false,
            adopted_policy: had_policy && replaced.is_empty(),
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

    /// Whether the maps hold a previous agent's policy, taken over whole: attaching at once enforces it.
    pub fn holds_policy(&self) -> bool {
        self.adopted_policy
    }

    /// Puts the classifier on every interface `specs` select now, and forgets those no longer selected; each
    /// interface is checked against the kernel (the link pinned for it must hold it), so an interface that was
    /// re-created, or a link severed, is attached afresh. The new link is attached before the old one's pin goes:
    /// no gap.
    /// `default_route` lists the interfaces (by index) the default routes leave through now, for
    /// `--intercept default-route`.
    pub fn reconcile_interfaces(
        &mut self,
        specs: &[InterfaceSpec],
        default_route: &[u32],
    ) -> Result<InterfacesReconciled, DatapathError> {
        let present = interfaces::present().map_err(DatapathError::Interfaces)?;
        let selected = interfaces::selected(specs, &present, default_route);
        let starting = !std::mem::replace(&mut self.started, true);
        let mut reconciled = InterfacesReconciled::default();
        for interface in &selected {
            let recorded = self.attached.get(&interface.name).copied();
            let holding = link_info::pinned_tcx_interface(&self.pins.link(&interface.name));
            if recorded == Some(interface.index) && matches!(holding, Ok(Some(index)) if index == interface.index) {
                continue;
            }
            let reason = match (&holding, recorded) {
                (_, Some(index)) if index != interface.index => AttachReason::Recreated,
                (Ok(None), _) => AttachReason::Severed,
                (Ok(Some(index)), _) if *index != interface.index => AttachReason::Moved,
                (Ok(Some(_)), _) => AttachReason::Adopted,
                (Err(_), None) if starting => AttachReason::Started,
                (Err(_), None) if self.known.contains(&interface.name) => AttachReason::Recreated,
                (Err(_), None) => AttachReason::Appeared,
                (Err(_), Some(_)) => AttachReason::Severed,
            };
            match self.attach(interface, reason) {
                Ok(reason) => {
                    self.attached.insert(interface.name.clone(), interface.index);
                    self.known.insert(interface.name.clone());
                    reconciled.attached.push((interface.name.clone(), reason));
                }
                Err(error) => {
                    self.attached.remove(&interface.name);
                    reconciled.unenforced.push((interface.name.clone(), format!("{error:#}")));
                }
            }
        }
        let gone: Vec<String> =
            self.attached.keys().filter(|name| !selected.iter().any(|i| &i.name == *name)).cloned().collect();
        for name in gone {
            self.attached.remove(&name);
            self.pins.unpin_link(&name)?;
            reconciled.forgotten.push(name);
        }
        reconciled.unenforced.extend(
            interfaces::missing(specs, &present).into_iter().map(|name| (name, "no such interface".to_owned())),
        );
        Ok(reconciled)
    }

    /// Attaches the classifier to `interface`'s TC ingress (TCX, ahead of other programs) and pins the link. A
    /// link pinned for it that still holds it is taken over in place (the new program replaces the old
    /// atomically); one that holds nothing or another interface, or cannot be taken over, is replaced by a new
    /// link. Returns why it was attached (`Incompatible` when taking over failed).
    fn attach(&mut self, interface: &Interface, reason: AttachReason) -> Result<AttachReason, DatapathError> {
        let name = interface.name.as_str();
        let link_path = self.pins.link(name);
        let program = program(&mut self.ebpf)?;
        let attach_error = |source| match source {
            ProgramError::TcError(TcError::IoError(error)) if error.raw_os_error() == Some(nix::libc::ENODEV) => {
                DatapathError::InterfaceNotFound { interface: name.to_owned() }
            }
            source => DatapathError::Attach { interface: name.to_owned(), source },
        };
        let mut reason = reason;
        let mut link_id = None;
        if reason == AttachReason::Adopted {
            let taken_over = PinnedLink::from_pin(&link_path)
                .and_then(|pinned| SchedClassifierLink::try_from(FdLink::from(pinned)))
                .map_err(|source| DatapathError::Adopt { path: link_path.display().to_string(), source })
                .and_then(|link| program.attach_to_link(link).map_err(attach_error));
            match taken_over {
                Ok(id) => link_id = Some(id),
                Err(error) => {
                    tracing::warn!(interface = name, error = %format!("{error:#}"), "the pinned link cannot be taken over: replacing it");
                    reason = AttachReason::Incompatible;
                }
            }
        }
        let link_id = match link_id {
            Some(id) => id,
            None => program
                .attach_with_options(name, TcAttachType::Ingress, TcAttachOptions::TcxOrder(LinkOrder::first()))
                .map_err(attach_error)?,
        };
        let link = program.take_link(link_id).map_err(attach_error)?;
        self.pins.pin_link(link, &link_path)?;
        Ok(reason)
    }

    /// Puts this agent's classifier back on the links it holds, in place (no gap), and pins it again: a successor
    /// that took them up and went away before it was ready left its own classifier running there — with its own
    /// maps when its layout differed, which this agent's writes would never reach. Returns the interfaces.
    pub fn reclaim(&mut self) -> Result<Vec<String>, DatapathError> {
        let held: Vec<Interface> =
            self.attached.iter().map(|(name, index)| Interface { name: name.clone(), index: *index }).collect();
        let ours = self.program_id();
        let mut reclaimed = Vec::new();
        for interface in held {
            let running = link_info::pinned_link_program(&self.pins.link(&interface.name)).ok();
            if running.is_some() && running == ours {
                continue;
            }
            self.attach(&interface, AttachReason::Adopted)?;
            reclaimed.push(interface.name);
        }
        if !reclaimed.is_empty() {
            self.pins.pin_program(program(&mut self.ebpf)?)?;
        }
        Ok(reclaimed)
    }

    /// The program each held link runs now (this agent's classifier, unless another agent's replaced it).
    pub fn link_programs(&self) -> BTreeMap<String, Option<u32>> {
        let running = |name: &String| link_info::pinned_link_program(&self.pins.link(name)).ok();
        self.attached.keys().map(|name| (name.clone(), running(name))).collect()
    }

    /// Detaches the interfaces a previous agent attached and this one does not select.
    pub fn detach_others(&mut self) -> Result<Vec<String>, DatapathError> {
        let keep: Vec<String> = self.attached.keys().cloned().collect();
        self.pins.unpin_links_except(&keep)
    }

    /// The interfaces the classifier is on.
    pub fn attached(&self) -> impl Iterator<Item = &str> {
        self.attached.keys().map(String::as_str)
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

    /// The kernel relay's maps (its stream verdict loaded and attached), or why this kernel cannot have it.
    pub fn take_relay(&mut self) -> Result<RelayMaps, String> {
        self.relay.take().unwrap_or_else(|| Err("already taken".to_owned()))
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

impl Datapath {
    /// The loaded classifier's id in the kernel (as `bpftool prog` lists it).
    pub fn program_id(&self) -> Option<u32> {
        self.ebpf.program(names::PROGRAM)?.info().ok().map(|info| info.id())
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
