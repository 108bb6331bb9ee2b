//! The proxy's drain, as Envoy drains before a restart: once it begins, HTTP/2 clients are sent GOAWAY and
//! HTTP/1.1 responses carry `Connection: close`, so clients move to new connections while the listeners still
//! accept them (and a successor agent, listening on the same ports, takes them); once the listeners close, the
//! connections left idle are closed and those with a request in flight finish it.

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

use tokio::sync::watch;

/// Where the drain is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Serving,
    /// Clients are told to move on; the listeners still accept.
    Draining,
    /// The listeners are closed; connections close as soon as nothing is in flight on them.
    Closing,
}

/// The drain's phase, read on every response (an atomic) and awaited by every client connection.
#[derive(Clone)]
pub struct Drain {
    /// Whether the drain has begun: what each HTTP/1.1 response asks.
    draining: Arc<AtomicBool>,
    phase: watch::Sender<Phase>,
}

impl Default for Drain {
    fn default() -> Drain {
        Drain { draining: Arc::new(AtomicBool::new(false)), phase: watch::channel(Phase::Serving).0 }
    }
}

impl Drain {
    /// Clients are told to move to new connections from now on.
    pub fn begin(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.phase.send_if_modified(|phase| advance(phase, Phase::Draining));
    }

    /// The listeners are closed: connections close once nothing is in flight on them.
    pub fn close(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.phase.send_if_modified(|phase| advance(phase, Phase::Closing));
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Completes once the drain has reached `phase` (at once if it has).
    pub fn reached(&self, phase: Phase) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut phases = self.phase.subscribe();
        async move {
            // Ends early only if every sender is gone, and then no drain will come: wait for ever.
            if phases.wait_for(|now| *now >= phase).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

fn advance(phase: &mut Phase, to: Phase) -> bool {
    let later = to > *phase;
    if later {
        *phase = to;
    }
    later
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_phases_only_move_forward_and_waiters_see_them() {
        let drain = Drain::default();
        assert!(!drain.is_draining());
        let waiting = tokio::spawn({
            let drain = drain.clone();
            async move { drain.reached(Phase::Closing).await }
        });
        drain.begin();
        assert!(drain.is_draining());
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "draining is not closing");
        drain.close();
        waiting.await.unwrap();
        drain.begin();
        drain.reached(Phase::Closing).await;
    }
}
