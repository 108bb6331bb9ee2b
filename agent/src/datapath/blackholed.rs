//! What the kernel blackholed: the per-destination map (for metrics) and blocked-flow events (for logs).
#![expect(unsafe_code, reason = "blocked-flow events are read from the ring buffer as the classifier wrote them")]

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
};

use aya::{
    maps::{HashMap, MapData},
    Ebpf,
};
use sluice_common::{names, BlockedFlowEvent, DestinationKey, DestinationStats, Verdict, FAMILY_V4};

use super::{take_map, DatapathError};

/// One destination the kernel blackholed, with how many packets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlackholedDestination {
    pub destination: SocketAddr,
    pub protocol: u8,
    pub packets: u64,
}

/// A shared handle on the blackholed-destinations map; read at scrape time.
#[derive(Clone)]
pub struct BlackholedDestinations {
    map: Arc<Mutex<HashMap<MapData, DestinationKey, DestinationStats>>>,
}

impl std::fmt::Debug for BlackholedDestinations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BlackholedDestinations")
    }
}

impl BlackholedDestinations {
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Self, DatapathError> {
        let map = HashMap::try_from(take_map(ebpf, names::BLACKHOLED)?)
            .map_err(|source| DatapathError::Map { map: names::BLACKHOLED, source })?;
        Ok(BlackholedDestinations { map: Arc::new(Mutex::new(map)) })
    }

    pub fn read(&self) -> Vec<BlackholedDestination> {
        let Ok(map) = self.map.lock() else { return Vec::new() };
        map.iter()
            .filter_map(Result::ok)
            .map(|(key, stats)| BlackholedDestination {
                destination: SocketAddr::new(address(key.family, &key.addr), u16::from_be_bytes(key.port)),
                protocol: key.proto,
                packets: stats.packets,
            })
            .collect()
    }
}

/// The first blocked packet of a flow, as the kernel reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockedFlow {
    pub source: SocketAddr,
    pub destination: SocketAddr,
    pub protocol: u8,
    /// Denied by an AuthorizationPolicy, rather than blackholed.
    pub denied: bool,
}

impl BlockedFlow {
    /// Decodes one ring buffer record; None for a record of the wrong size.
    pub fn decode(bytes: &[u8]) -> Option<BlockedFlow> {
        if bytes.len() < size_of::<BlockedFlowEvent>() {
            return None;
        }
        // SAFETY: the record holds a BlockedFlowEvent written by the classifier; read unaligned.
        let event: BlockedFlowEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        let flow = event.flow;
        Some(BlockedFlow {
            source: SocketAddr::new(address(flow.family, &flow.src), u16::from_be_bytes(flow.src_port)),
            destination: SocketAddr::new(address(flow.family, &flow.dst), u16::from_be_bytes(flow.dst_port)),
            protocol: flow.proto,
            denied: event.verdict == Verdict::Denied as u32,
        })
    }
}

fn address(family: u8, bytes: &[u8; 16]) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*bytes))
    }
}

/// The name of an IP protocol number, for labels and logs.
pub fn protocol_name(protocol: u8) -> &'static str {
    match protocol {
        1 => "icmp",
        6 => "tcp",
        17 => "udp",
        58 => "icmpv6",
        132 => "sctp",
        _ => "other",
    }
}
