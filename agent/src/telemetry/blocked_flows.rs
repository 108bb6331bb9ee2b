//! Reads the kernel's blocked-flow events: each is counted, and logged at a bounded rate.
#![expect(
    unsafe_code,
    reason = "the ring buffer's descriptor is registered with tokio's reactor, which tokio can only take on trust"
)]

use std::time::{Duration, Instant};

use aya::maps::{MapData, RingBuf};
use prometheus_client::metrics::counter::Counter;
use tokio::io::unix::AsyncFd;

use crate::datapath::{protocol_name, BlockedFlow};

/// Log lines per second at most; the rest are counted and summarised.
const LOGS_PER_SECOND: u32 = 20;

/// Drains `events` until the task is dropped.
pub async fn watch(events: RingBuf<MapData>, total: Counter) {
    // SAFETY: the ring buffer owns its descriptor, which stays open and unchanged for as long as the AsyncFd
    // holds it.
    let mut events = match unsafe { AsyncFd::register_with_interest(events, tokio::io::Interest::READABLE) } {
        Ok(events) => events,
        Err(error) => {
            let error = error.to_string();
            tracing::warn!(%error, "cannot watch blocked-flow events; they are still counted per destination");
            return;
        }
    };
    let mut window = Instant::now();
    let (mut logged, mut suppressed) = (0u32, 0u64);
    loop {
        let Ok(mut guard) = events.readable_mut().await else { return };
        let ring = guard.get_inner_mut();
        while let Some(record) = ring.next() {
            let Some(flow) = BlockedFlow::decode(&record) else { continue };
            total.inc();
            if window.elapsed() >= Duration::from_secs(1) {
                if suppressed > 0 {
                    tracing::info!(suppressed, "blocked flows not logged (rate limit)");
                }
                window = Instant::now();
                (logged, suppressed) = (0, 0);
            }
            if logged < LOGS_PER_SECOND {
                logged += 1;
                tracing::info!(
                    src = %flow.source,
                    dst = %flow.destination,
                    protocol = protocol_name(flow.protocol),
                    verdict = "blackholed",
                    "blocked flow"
                );
            } else {
                suppressed += 1;
            }
        }
        guard.clear_ready();
    }
}
