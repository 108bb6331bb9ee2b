//! Idle HTTP/1.1 upstream connections kept for reuse, per address and TLS identity: a request takes the one given
//! back last; those closed, or idle for longer than a minute, are dropped (closed).

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::{atomic::AtomicUsize, Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use super::UpstreamTls;

/// How often (in connections given back) the pool drops what closed or idled too long at every address, not
/// only at the one in use: passthrough traffic reaches many addresses once each.
const SWEEP_EVERY: usize = 1024;

/// What a pooled connection is for: its address, and the TLS it speaks (configuration and server name).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct PoolKey {
    pub(super) address: SocketAddr,
    tls: Option<(TlsIdentity, Arc<rustls::pki_types::ServerName<'static>>)>,
}

impl PoolKey {
    pub(super) fn new(address: SocketAddr, tls: Option<&UpstreamTls>) -> PoolKey {
        let tls = tls.map(|tls| (TlsIdentity(tls.config.clone()), tls.server_name.clone()));
        PoolKey { address, tls }
    }
}

/// One TLS client configuration, the same only as itself: a connection made under one CA or client certificate
/// is never reused under another. The key holds the configuration, so its address cannot be freed and taken by a
/// new one while a connection made under it is pooled.
#[derive(Clone, Debug)]
struct TlsIdentity(Arc<rustls::ClientConfig>);

impl PartialEq for TlsIdentity {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for TlsIdentity {}

impl std::hash::Hash for TlsIdentity {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        std::ptr::hash(Arc::as_ptr(&self.0), state);
    }
}

/// A connection that can wait in the pool.
pub(super) trait Reusable {
    /// Whether the upstream has not closed it (nor sent anything unasked), as far as is known without waiting.
    fn is_open(&mut self) -> bool;
}

/// The idle connections, newest at the back of each address's queue.
pub(super) struct IdlePool<C> {
    idle: Mutex<HashMap<PoolKey, VecDeque<Idle<C>>, foldhash::fast::RandomState>>,
    /// Connections given back, so that every `SWEEP_EVERY`th sweeps the whole pool.
    given_back: AtomicUsize,
}

struct Idle<C> {
    connection: C,
    /// When it was given back, on the coarse clock.
    since: Duration,
    /// How long it may wait.
    keep_for: Duration,
}

impl<C> Idle<C> {
    fn expired(&self, now: Duration) -> bool {
        now.saturating_sub(self.since) >= self.keep_for
    }
}

/// Monotonic time at the kernel's tick (a few milliseconds), read without the fine clock's cost: enough to tell
/// a connection idle for a minute, and read twice per request.
fn coarse_now() -> Duration {
    super::super::idle::coarse_now()
}

impl<C: Reusable> IdlePool<C> {
    pub(super) fn new() -> IdlePool<C> {
        IdlePool { idle: Mutex::default(), given_back: AtomicUsize::new(0) }
    }

    /// The connection for `key` given back last, if one is open and has not idled too long.
    pub(super) fn take(&self, key: &PoolKey) -> Option<C> {
        let mut idle = self.lock();
        let connections = idle.get_mut(key)?;
        let mut taken = None;
        let now = coarse_now();
        while let Some(mut idle) = connections.pop_back() {
            if !idle.expired(now) && idle.connection.is_open() {
                taken = Some(idle.connection);
                break;
            }
        }
        if connections.is_empty() {
            idle.remove(key);
        }
        taken
    }

    /// Keeps `connection` for reuse for at most `keep_for`.
    pub(super) fn give_back(&self, key: PoolKey, connection: C, keep_for: Duration) {
        let now = coarse_now();
        let sweep = self.given_back.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % SWEEP_EVERY == 0;
        let mut idle = self.lock();
        if sweep {
            idle.retain(|_, connections| {
                connections.retain_mut(|c| !c.expired(now) && c.connection.is_open());
                !connections.is_empty()
            });
        }
        let connections = idle.entry(key).or_default();
        // The oldest are at the front: those idle too long are closed (by dropping them).
        while connections.front().is_some_and(|oldest| oldest.expired(now)) {
            connections.pop_front();
        }
        connections.push_back(Idle { connection, since: now, keep_for });
    }

    #[cfg(test)]
    pub(super) fn idle_count(&self, key: &PoolKey) -> usize {
        self.lock().get(key).map_or(0, VecDeque::len)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<PoolKey, VecDeque<Idle<C>>, foldhash::fast::RandomState>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
