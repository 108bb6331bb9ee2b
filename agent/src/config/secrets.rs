//! The Secrets of the gateway's namespace (with `--kube`), which `credentialName`s name: kept current by their
//! watcher, read when the configuration is compiled, and a change to them compiles it again (a rotated
//! certificate is served to new handshakes).

use std::{collections::BTreeMap, sync::Arc};

use arc_swap::ArcSwap;
use tokio::sync::Notify;

/// A Secret's data: its keys (`tls.crt`, `tls.key`, `ca.crt`, or a generic Secret's `cert`, `key`, `cacert`) and
/// their decoded bytes.
pub type SecretData = BTreeMap<String, Vec<u8>>;

/// The Secrets as their watcher last published them, by name; whoever waits on `changed` (the control loop) hears
/// of each new set.
#[derive(Debug, Default)]
pub struct KnownSecrets {
    current: ArcSwap<BTreeMap<String, Arc<SecretData>>>,
    changed: Notify,
}

impl KnownSecrets {
    /// Replaces the Secrets and tells the waiter.
    pub fn publish(&self, secrets: BTreeMap<String, Arc<SecretData>>) {
        tracing::debug!(secrets = secrets.len(), "secrets updated");
        self.current.store(Arc::new(secrets));
        self.changed.notify_one();
    }

    pub fn get(&self, name: &str) -> Option<Arc<SecretData>> {
        self.current.load().get(name).cloned()
    }

    /// Completes after the next `publish` (at once if one came since the last wait).
    pub async fn changed(&self) {
        self.changed.notified().await
    }
}
