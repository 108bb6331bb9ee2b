//! The workloads behind the gateway, by pod IP: what a request's source is, for `sourceLabels` and
//! `sourceNamespace` matches and for Istio's `source_workload*` labels. Filled from Kubernetes (`--kube`).

use std::{collections::BTreeMap, collections::HashMap, net::IpAddr, sync::Arc};

use arc_swap::ArcSwap;
use tokio::sync::Notify;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Workload {
    /// The workload's name as Istio labels it: the pod's `app` label, else the pod's name. Shared: every request
    /// from the workload is labelled with it.
    pub name: Arc<str>,
    pub namespace: Arc<str>,
    pub labels: BTreeMap<String, String>,
}

/// Pod IP → workload.
#[derive(Clone, Debug, Default)]
pub struct Workloads {
    by_address: HashMap<IpAddr, Arc<Workload>>,
}

/// One pod's addresses and workload, and when it was created: when two pods claim an address (a recycled IP
/// whose old pod is still listed), the newest is the one behind it.
#[derive(Clone, Debug)]
pub struct PodAddresses {
    pub addresses: Vec<IpAddr>,
    pub workload: Workload,
    /// Seconds since the epoch.
    pub created: i64,
}

impl Workloads {
    pub fn from_pods(pods: impl IntoIterator<Item = PodAddresses>) -> Workloads {
        let mut claims: HashMap<IpAddr, (Arc<Workload>, i64)> = HashMap::new();
        for pod in pods {
            let workload = Arc::new(pod.workload);
            for address in pod.addresses {
                let claim = (workload.clone(), pod.created);
                let Some((held, held_created)) = claims.get(&address) else {
                    claims.insert(address, claim);
                    continue;
                };
                let newer = pod.created > *held_created;
                let (kept, dropped) = if newer { (&workload, held) } else { (held, &workload) };
                tracing::warn!(
                    %address,
                    kept = %format!("{}/{}", kept.namespace, kept.name),
                    dropped = %format!("{}/{}", dropped.namespace, dropped.name),
                    "two pods hold one address: the newest is taken as its source"
                );
                if newer {
                    claims.insert(address, claim);
                }
            }
        }
        Workloads { by_address: claims.into_iter().map(|(address, (workload, _))| (address, workload)).collect() }
    }

    /// Every address with its workload.
    pub fn iter(&self) -> impl Iterator<Item = (IpAddr, &Workload)> {
        self.by_address.iter().map(|(address, workload)| (*address, &**workload))
    }

    pub fn get(&self, address: IpAddr) -> Option<&Arc<Workload>> {
        self.by_address.get(&address)
    }

    pub fn len(&self) -> usize {
        self.by_address.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_address.is_empty()
    }
}

/// The workloads as the pod watcher last published them, read by the proxy on each connection; whoever waits on
/// `changed` (the control loop: a Sidecar's mode follows its pods) hears of each new set.
#[derive(Default)]
pub struct KnownWorkloads {
    current: ArcSwap<Workloads>,
    changed: Notify,
}

impl KnownWorkloads {
    /// Replaces the workloads and tells the waiter.
    pub fn publish(&self, workloads: Workloads) {
        tracing::debug!(addresses = workloads.len(), "workloads updated");
        self.current.store(Arc::new(workloads));
        self.changed.notify_one();
    }

    pub fn load(&self) -> arc_swap::Guard<Arc<Workloads>> {
        self.current.load()
    }

    /// Completes after the next `publish` (at once if one came since the last wait).
    pub async fn changed(&self) {
        self.changed.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, namespace: &str, address: &str, created: i64) -> PodAddresses {
        let workload = Workload { name: name.into(), namespace: namespace.into(), labels: Default::default() };
        PodAddresses { addresses: vec![address.parse().unwrap()], workload, created }
    }

    #[test]
    fn an_address_two_pods_claim_is_the_newest_pods() {
        for order in [[0, 1], [1, 0]] {
            let pods = [pod("old", "payments", "10.0.0.7", 100), pod("new", "web", "10.0.0.7", 200)];
            let workloads = Workloads::from_pods(order.map(|i| pods[i].clone()));
            let held = workloads.get("10.0.0.7".parse().unwrap()).unwrap();
            assert_eq!((&*held.namespace, &*held.name), ("web", "new"), "{order:?}");
        }
    }
}
