//! The kernel relay's maps: a decided connection's two sockets join them — each under its socket cookie, with the
//! direction of the bytes that arrive on it — the proxy tells the stream verdict how much of what it was left has
//! been written on, and both sockets leave when the relay ends.

use std::{os::fd::AsRawFd, sync::Mutex};

use aya::maps::{HashMap, MapData, MapError, SockHash};
use sluice_common::{names, RelayDirection};

/// One socket joining the relay: its cookie, and how many bytes its peer had acknowledged before.
pub struct Joining<'a, S: AsRawFd> {
    pub socket: &'a S,
    pub cookie: u64,
    pub bytes_acked: u64,
}

pub struct RelayMaps {
    maps: Mutex<Maps>,
}

struct Maps {
    sockets: SockHash<MapData, u64>,
    directions: HashMap<MapData, u64, RelayDirection>,
    written: HashMap<MapData, u64, u64>,
}

impl RelayMaps {
    pub(super) fn new(
        sockets: SockHash<MapData, u64>,
        directions: HashMap<MapData, u64, RelayDirection>,
        written: HashMap<MapData, u64, u64>,
    ) -> RelayMaps {
        RelayMaps { maps: Mutex::new(Maps { sockets, directions, written }) }
    }

    /// Joins two sockets: from here the stream verdict sees every segment arriving on either. Both directions are
    /// written before either socket is in the map, so the verdict never sees a socket whose peer it cannot find.
    pub fn join<S: AsRawFd>(&self, first: &Joining<'_, S>, second: &Joining<'_, S>) -> Result<(), MapError> {
        let mut maps = self.maps.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let joined = (|| {
            for (arriving, peer) in [(first, second), (second, first)] {
                let direction =
                    RelayDirection { peer: peer.cookie, acked_base: peer.bytes_acked, ..Default::default() };
                maps.directions.insert(arriving.cookie, direction, 0)?;
                maps.written.insert(arriving.cookie, 0, 0)?;
            }
            maps.sockets.insert(second.cookie, second.socket.as_raw_fd(), 0)?;
            maps.sockets.insert(first.cookie, first.socket.as_raw_fd(), 0)
        })();
        if joined.is_err() {
            maps.leave([first.cookie, second.cookie]);
        }
        joined
    }

    /// What the verdict counted for the bytes arriving on the socket of `cookie`.
    pub fn direction(&self, cookie: u64) -> Option<RelayDirection> {
        let maps = self.maps.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        maps.directions.get(&cookie, 0).ok()
    }

    /// The proxy has written on `bytes` of those the verdict left it, arriving on the socket of `cookie`.
    pub fn written(&self, cookie: u64, bytes: u64) -> Result<(), MapError> {
        let mut maps = self.maps.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        maps.written.insert(cookie, bytes, 0)
    }

    /// Both sockets leave (closing a socket takes it out of the socket map too, but not its direction).
    pub fn leave(&self, cookies: [u64; 2]) {
        self.maps.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).leave(cookies);
    }
}

impl Maps {
    fn leave(&mut self, cookies: [u64; 2]) {
        for cookie in cookies {
            let _ = self.sockets.remove(&cookie);
            let _ = self.directions.remove(&cookie);
            let _ = self.written.remove(&cookie);
        }
    }
}

/// Loads the relay's stream verdict and attaches it to its socket map.
pub(super) fn load(ebpf: &mut aya::Ebpf) -> Result<RelayMaps, super::DatapathError> {
    use super::DatapathError;
    use aya::programs::{ProgramError, SkSkb};
    let map = |ebpf: &mut aya::Ebpf, name: &'static str| super::take_map(ebpf, name);
    let sockets: SockHash<MapData, u64> = map(ebpf, names::RELAY_SOCKETS)?
        .try_into()
        .map_err(|source| DatapathError::Map { map: names::RELAY_SOCKETS, source })?;
    let directions = map(ebpf, names::RELAY_DIRECTIONS)?
        .try_into()
        .map_err(|source| DatapathError::Map { map: names::RELAY_DIRECTIONS, source })?;
    let written = map(ebpf, names::RELAY_WRITTEN)?
        .try_into()
        .map_err(|source| DatapathError::Map { map: names::RELAY_WRITTEN, source })?;
    let program: &mut SkSkb = ebpf
        .program_mut(names::RELAY_PROGRAM)
        .ok_or(DatapathError::Missing { kind: "program", name: names::RELAY_PROGRAM })?
        .try_into()
        .map_err(|source| DatapathError::Program { program: names::RELAY_PROGRAM, source })?;
    program.load().map_err(|source| match source {
        ProgramError::LoadError { io_error, verifier_log } => {
            DatapathError::Verifier { program: names::RELAY_PROGRAM, error: io_error, log: verifier_log.to_string() }
        }
        source => DatapathError::Program { program: names::RELAY_PROGRAM, source },
    })?;
    program.attach(sockets.fd()).map_err(|source| DatapathError::Program { program: names::RELAY_PROGRAM, source })?;
    Ok(RelayMaps::new(sockets, directions, written))
}
