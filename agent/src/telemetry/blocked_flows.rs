//! Reads the kernel's blocked-flow events: each is counted (a blackholed flow in `sluice_blocked_flows`, one an
//! AuthorizationPolicy denied as that policy's decision), and logged at a bounded rate.
#![expect(
    unsafe_code,
    reason = "the ring buffer's descriptor is registered with tokio's reactor, which tokio can only take on trust"
)]

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use aya::maps::{MapData, RingBuf};
use prometheus_client::metrics::counter::Counter;
use tokio::io::unix::AsyncFd;

use super::requests::RequestTelemetry;
use crate::{
    config::authorization_policy::Action,
    datapath::{protocol_name, BlockedFlow},
    policy::{authorization, routes::ProxyPolicy},
};

/// Log lines per second at most; the rest are counted and summarised.
const LOGS_PER_SECOND: u32 = 20;

/// Drains `events` until the task is dropped.
pub async fn watch(
    events: RingBuf<MapData>,
    total: Counter,
    routes: Arc<ArcSwap<ProxyPolicy>>,
    telemetry: RequestTelemetry,
) {
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
            let denied_by = flow.denied.then(|| {
                let routes = routes.load();
                let policy =
                    routes.authorization.denied_in_kernel(flow.source.ip(), flow.destination, flow.protocol).cloned();
                if let Some(policy) = &policy {
                    let verdict = authorization::Verdict {
                        denied: true,
                        policy: Some((policy.clone(), Action::Deny)),
                        governed: true,
                        reported: Vec::new(),
                    };
                    telemetry.authorization(&verdict);
                }
                policy
            });
            if denied_by.is_none() {
                total.inc();
            }
            if window.elapsed() >= Duration::from_secs(1) {
                if suppressed > 0 {
                    tracing::info!(suppressed, "blocked flows not logged (rate limit)");
                }
                window = Instant::now();
                (logged, suppressed) = (0, 0);
            }
            let policy = denied_by.flatten();
            let protocol = protocol_name(flow.protocol);
            telemetry.flows().publish(|| {
                super::flows::Flow::blocked((flow.source, flow.destination), protocol, flow.denied, policy.as_deref())
            });
            if logged < LOGS_PER_SECOND {
                logged += 1;
                tracing::info!(
                    src = %flow.source,
                    dst = %flow.destination,
                    protocol,
                    verdict = if flow.denied { "denied" } else { "blackholed" },
                    policy = policy.as_deref().unwrap_or("-"),
                    "blocked flow"
                );
            } else {
                suppressed += 1;
            }
        }
        guard.clear_ready();
    }
}
