//! DNS for ServiceEntries resolved by DNS: their hosts' addresses, refreshed as the answers' TTLs run out
//! (within bounds), so the kernel admits exactly the addresses the names have now.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use hickory_resolver::{
    config::{NameServerConfig, ResolverConfig},
    net::runtime::TokioRuntimeProvider,
    TokioResolver,
};

use super::{
    service_entry::{Resolution, ServiceEntry},
    Snapshot, Spec,
};

/// Answers are refreshed no sooner than this, however short their TTL…
pub const MIN_REFRESH: Duration = Duration::from_secs(5);
/// …and no later than this, however long.
pub const MAX_REFRESH: Duration = Duration::from_secs(300);
/// How long one lookup may take…
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// …and a round of them, all names together: names not answered by then keep their addresses until the next
/// round, so that a DNS server that answers slowly or not at all delays the policy by this much at most.
const ROUND_TIMEOUT: Duration = Duration::from_secs(10);
/// Lookups made at once: thousands of names are resolved in about the time of one (answers the resolver holds
/// come from its cache).
const LOOKUPS_IN_FLIGHT: usize = 128;

/// Host → the addresses it resolved to. A host whose lookup failed keeps its previous addresses.
pub type Resolved = BTreeMap<String, Vec<IpAddr>>;

/// What the last round of lookups said of each name, for `sluice status`: until when its answer holds (its TTL),
/// or why it failed (its previous addresses kept).
pub type Answers = BTreeMap<String, Answer>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    Valid { until: std::time::SystemTime },
    Failed { error: String },
}

/// The names to resolve: hosts of ServiceEntries with DNS resolution and no endpoints (wildcards cannot be
/// resolved), and endpoint addresses that are names.
pub fn names(snapshot: &Snapshot) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for resource in &snapshot.resources {
        if let Spec::ServiceEntry(entry) = &resource.spec {
            names.extend(entry_names(entry));
        }
    }
    names
}

/// The names `entry` needs resolved (see [`names`]).
pub fn entry_names(entry: &ServiceEntry) -> Vec<String> {
    if !matches!(entry.resolution(), Resolution::Dns | Resolution::DnsRoundRobin) {
        return Vec::new();
    }
    if entry.endpoints.is_empty() {
        return entry.hosts.iter().filter(|host| !host.starts_with('*')).cloned().collect();
    }
    entry
        .endpoints
        .iter()
        .filter(|endpoint| endpoint.address.parse::<IpAddr>().is_err() && !endpoint.address.starts_with("unix://"))
        .map(|endpoint| endpoint.address.clone())
        .collect()
}

pub struct DnsResolver {
    resolver: TokioResolver,
}

impl DnsResolver {
    /// Queries `servers` (port 53), or the system's resolvers (`/etc/resolv.conf`) when none are given.
    pub fn new(servers: &[IpAddr]) -> Result<DnsResolver, String> {
        let builder = if servers.is_empty() {
            TokioResolver::builder_tokio().unwrap_or_else(|error| {
                // Without resolvers every lookup fails, and hosts resolved by DNS admit nothing at L4.
                tracing::warn!(%error, "no usable system DNS configuration (see --dns-server)");
                TokioResolver::builder_with_config(
                    ResolverConfig::from_name_servers(Vec::new()),
                    TokioRuntimeProvider::default(),
                )
            })
        } else {
            let config = ResolverConfig::from_name_servers(
                servers.iter().map(|&ip| NameServerConfig::udp_and_tcp(ip)).collect(),
            );
            TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
        };
        let resolver = builder.build().map_err(|e| format!("starting the DNS resolver: {e}"))?;
        Ok(DnsResolver { resolver })
    }

    /// One address of `name` (from the resolver's cache while its TTL lasts), IPv4 first.
    pub async fn lookup(&self, name: &str) -> Result<IpAddr, String> {
        let query = if name.ends_with('.') { name.to_owned() } else { format!("{name}.") };
        let answer = tokio::time::timeout(LOOKUP_TIMEOUT, self.resolver.lookup_ip(query.as_str()))
            .await
            .map_err(|_| format!("looking up {name}: timed out"))?
            .map_err(|error| format!("looking up {name}: {error}"))?;
        let addresses: Vec<IpAddr> = answer.iter().collect();
        addresses
            .iter()
            .find(|address| address.is_ipv4())
            .or(addresses.first())
            .copied()
            .ok_or_else(|| format!("looking up {name}: no address"))
    }

    /// Whether `name` resolves (now, or in the resolver's cache while its TTL lasts) to `address`.
    pub async fn resolves_to(&self, name: &str, address: IpAddr) -> Result<bool, String> {
        let query = if name.ends_with('.') { name.to_owned() } else { format!("{name}.") };
        let answer = tokio::time::timeout(LOOKUP_TIMEOUT, self.resolver.lookup_ip(query.as_str()))
            .await
            .map_err(|_| format!("looking up {name}: timed out"))?
            .map_err(|error| format!("looking up {name}: {error}"))?;
        Ok(answer.iter().any(|answered| answered == address))
    }

    /// Resolves `names`, up to LOOKUPS_IN_FLIGHT at once and for no longer than ROUND_TIMEOUT in all; a name
    /// that fails, or is not answered in time, keeps what `previous` had for it. Returns the addresses and when
    /// to look again (the earliest expiry, within MIN_REFRESH and MAX_REFRESH), with what each lookup said.
    pub async fn resolve(&self, names: &BTreeSet<String>, previous: &Resolved) -> (Resolved, Duration, Answers) {
        use futures_util::StreamExt;

        let mut resolved = Resolved::new();
        let mut answers = Answers::new();
        let mut refresh = MAX_REFRESH;
        let mut failed: Vec<(&str, String)> = Vec::new();
        let lookups = futures_util::stream::iter(names.iter().map(|name| async move {
            // Fully qualified: ServiceEntry hosts are looked up as written, not under search domains.
            let query = if name.ends_with('.') { name.clone() } else { format!("{name}.") };
            let answer = match tokio::time::timeout(LOOKUP_TIMEOUT, self.resolver.lookup_ip(query.as_str())).await {
                Ok(Ok(answer)) => Ok(answer),
                Ok(Err(error)) => Err(error.to_string()),
                Err(_) => Err("timed out".to_owned()),
            };
            (name, answer)
        }))
        .buffer_unordered(LOOKUPS_IN_FLIGHT);
        let mut lookups = std::pin::pin!(lookups);
        let deadline = tokio::time::Instant::now() + ROUND_TIMEOUT;
        while let Ok(Some((name, answer))) = tokio::time::timeout_at(deadline, lookups.next()).await {
            match answer {
                Ok(answer) => {
                    let mut addresses: Vec<IpAddr> = answer.iter().collect();
                    addresses.sort();
                    addresses.dedup();
                    let ttl = answer.valid_until().saturating_duration_since(Instant::now());
                    refresh = refresh.min(ttl);
                    answers.insert(name.clone(), Answer::Valid { until: std::time::SystemTime::now() + ttl });
                    resolved.insert(name.clone(), addresses);
                }
                Err(error) => failed.push((name, error)),
            }
        }
        let unanswered = names.len() - resolved.len() - failed.len();
        if !failed.is_empty() || unanswered > 0 {
            refresh = MIN_REFRESH;
            for (name, error) in &failed {
                tracing::debug!(host = %name, %error, "DNS lookup failed");
                answers.insert((*name).to_owned(), Answer::Failed { error: error.clone() });
            }
            let late: Vec<&String> =
                names.iter().filter(|name| !resolved.contains_key(*name) && !answers.contains_key(*name)).collect();
            for name in late {
                answers
                    .insert(name.clone(), Answer::Failed { error: format!("not answered within {ROUND_TIMEOUT:?}") });
            }
            let (host, error) = failed.first().map(|(name, error)| (*name, error.as_str())).unwrap_or(("", ""));
            tracing::warn!(
                failed = failed.len(),
                unanswered,
                resolved = resolved.len(),
                host,
                error,
                "DNS lookups failed or were not answered in time; those hosts keep the addresses they had"
            );
            for (name, addresses) in previous.iter().filter(|(name, _)| names.contains(*name)) {
                resolved.entry(name.clone()).or_insert_with(|| addresses.clone());
            }
        }
        (resolved, refresh.clamp(MIN_REFRESH, MAX_REFRESH), answers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(yaml: &str) -> Snapshot {
        Snapshot::from_yaml(yaml)
    }

    #[test]
    fn only_names_that_dns_resolution_needs_are_looked_up() {
        let snapshot = snapshot(
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: by-dns}
spec: {hosts: [httpbin.org, '*.wildcard.example'], ports: [{number: 80, name: http}], resolution: DNS}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: via-endpoints}
spec:
  hosts: ['*.example.com']
  ports: [{number: 443, name: tls}]
  resolution: DNS
  endpoints: [{address: proxy.example.net}, {address: 203.0.113.9}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: static}
spec: {hosts: [db.example], addresses: [203.0.113.1], ports: [{number: 5432, name: pg}], resolution: NONE}
",
        );
        assert_eq!(names(&snapshot).into_iter().collect::<Vec<_>>(), ["httpbin.org", "proxy.example.net"]);
    }
}
