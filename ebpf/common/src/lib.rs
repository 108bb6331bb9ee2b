//! Map keys, values and constants shared by the eBPF classifier and the agent: the one contract between them.
#![no_std]

/// Names of the maps and programs in the eBPF object (kernel-visible names stay within 15 bytes).
pub mod names {
    pub const PROGRAM: &str = "sluice_ingress";
    pub const CONFIG: &str = "SLUICE_CONFIG";
    pub const L4_V4: &str = "SLUICE_L4_V4";
    pub const L4_V6: &str = "SLUICE_L4_V6";
    pub const ALLOW_V4: &str = "SLUICE_ALLOW_V4";
    pub const ALLOW_V6: &str = "SLUICE_ALLOW_V6";
    pub const COUNTERS: &str = "SLUICE_COUNTERS";
}

/// Capacity of each policy map; the agent rejects a policy that does not fit.
pub const MAX_RULES: u32 = 131_072;

/// `DatapathConfig::mode`: unmatched traffic passes (Istio's PassthroughCluster).
pub const MODE_ALLOW_ANY: u32 = 0;
/// `DatapathConfig::mode`: unmatched traffic is blackholed in the kernel.
pub const MODE_REGISTRY_ONLY: u32 = 1;

/// `DatapathConfig::blackhole`: drop silently.
pub const BLACKHOLE_DROP: u32 = 0;

/// The one entry of the config array: what the classifier does with what no rule matches.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DatapathConfig {
    pub mode: u32,
    pub blackhole: u32,
}

/// `Rule::action`: forward in the kernel.
pub const ACTION_PASS: u32 = 1;

/// The value of an L4 rule.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    pub action: u32,
}

/// Bits of an L4 key that precede the address: protocol, padding and port.
pub const L4_KEY_HEADER_BITS: u32 = 32;

/// LPM key data of an IPv4 L4 rule: protocol and port are matched exactly, the address by prefix.
/// The prefix length of such a key is `L4_KEY_HEADER_BITS + address prefix`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct L4V4 {
    pub proto: u8,
    pub _pad: u8,
    /// Destination port in network byte order.
    pub port: [u8; 2],
    pub addr: [u8; 4],
}

/// LPM key data of an IPv6 L4 rule (see [`L4V4`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct L4V6 {
    pub proto: u8,
    pub _pad: u8,
    pub port: [u8; 2],
    pub addr: [u8; 16],
}

/// What the classifier decided for one packet; indexes the counters.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed at L4 by a rule or an always-allowed range; forwarded by the kernel.
    Allowed = 0,
    /// Unmatched in ALLOW_ANY; forwarded by the kernel (PassthroughCluster).
    Passthrough = 1,
    /// Unmatched in REGISTRY_ONLY; dropped in the kernel (BlackHoleCluster).
    Blackholed = 2,
    /// Not IP, or link-local control traffic (neighbour discovery); left to the rest of the stack.
    Ignored = 3,
    /// Too short or malformed to classify; left to the rest of the stack, which drops what it cannot parse.
    Malformed = 4,
}

pub const VERDICT_COUNT: u32 = 5;

impl Verdict {
    pub const ALL: [Verdict; VERDICT_COUNT as usize] =
        [Verdict::Allowed, Verdict::Passthrough, Verdict::Blackholed, Verdict::Ignored, Verdict::Malformed];

    /// The label the agent exports for this verdict.
    pub const fn label(self) -> &'static str {
        match self {
            Verdict::Allowed => "allowed",
            Verdict::Passthrough => "passthrough",
            Verdict::Blackholed => "blackholed",
            Verdict::Ignored => "ignored",
            Verdict::Malformed => "malformed",
        }
    }
}

/// Per-CPU packet and byte counts of one verdict.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: plain #[repr(C)] data with explicit padding and no invalid bit patterns.
    unsafe impl aya::Pod for DatapathConfig {}
    unsafe impl aya::Pod for Rule {}
    unsafe impl aya::Pod for L4V4 {}
    unsafe impl aya::Pod for L4V6 {}
    unsafe impl aya::Pod for Counter {}
}
