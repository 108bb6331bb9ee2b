//! The workloads behind the gateway, by pod IP: what a request's source is, for `sourceLabels` and
//! `sourceNamespace` matches and for Istio's `source_workload*` labels. Filled from Kubernetes (`--kube`).

use std::{collections::BTreeMap, collections::HashMap, net::IpAddr, sync::Arc};

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

impl Workloads {
    pub fn from_pods(pods: impl IntoIterator<Item = (Vec<IpAddr>, Workload)>) -> Workloads {
        let mut by_address = HashMap::new();
        for (addresses, workload) in pods {
            let workload = Arc::new(workload);
            for address in addresses {
                by_address.insert(address, workload.clone());
            }
        }
        Workloads { by_address }
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
