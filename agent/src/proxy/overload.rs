//! Envoy's overload manager, in spirit: past a resident-memory threshold (`--max-memory`, by default 90% of the
//! agent's cgroup limit) the proxy sheds new work rather than grow until the kernel kills it — requests are
//! answered 503 with the flag `OM`, new relayed connections and TLS handshakes are reset — and takes work again
//! once below 95% of the threshold. Before shedding, the allocator is asked to return what it has freed (Envoy's
//! `shrink_heap`). The kernel's enforcement is not touched: it holds no per-connection memory of the agent's.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use prometheus_client::metrics::gauge::Gauge;

/// How often resident memory is read: far from the threshold, near it (past half), and close to it (past 80%),
/// where a burst of new connections could cross it between two reads (one read costs a few microseconds).
const EVERY: [Duration; 3] = [Duration::from_millis(250), Duration::from_millis(50), Duration::from_millis(10)];
/// Work is taken again below this share of the threshold (so that shedding does not flap).
const RESUME_AT: f64 = 0.95;
/// The default threshold's share of the cgroup's memory limit.
const SHARE_OF_LIMIT: f64 = 0.9;

/// Whether the proxy sheds new work now.
#[derive(Debug, Default)]
pub struct Overload {
    shedding: AtomicBool,
}

impl Overload {
    pub fn is_shedding(&self) -> bool {
        self.shedding.load(Ordering::Relaxed)
    }

    /// Reads resident memory (the more often the closer it is to `threshold` bytes) and sheds past it; `active`
    /// shows it (1 while shedding).
    pub async fn watch(&self, threshold: u64, active: Gauge) {
        let mut next_read = EVERY[0];
        loop {
            tokio::time::sleep(next_read).await;
            let Some(mut resident) = resident_bytes() else { continue };
            next_read = read_interval(resident, threshold);
            let resume_at = (threshold as f64 * RESUME_AT) as u64;
            if resident >= resume_at {
                // What the allocator holds freed goes back first: shed only if that is not enough, and take work
                // again as soon as what was freed is given back.
                crate::allocator::release_freed_memory();
                resident = resident_bytes().unwrap_or(resident);
            }
            let shedding = self.is_shedding();
            let now = if shedding { resident >= resume_at } else { resident >= threshold };
            if now != shedding {
                self.shedding.store(now, Ordering::Relaxed);
                active.set(i64::from(now));
                if now {
                    tracing::warn!(resident, threshold, "overloaded: new requests get 503 (OM), new relays are reset");
                } else {
                    tracing::info!(resident, threshold, "no longer overloaded: taking new work again");
                }
            }
        }
    }
}

/// How long until resident memory is read again, when it is `resident` bytes.
fn read_interval(resident: u64, threshold: u64) -> Duration {
    let share = resident as f64 / threshold.max(1) as f64;
    match share {
        share if share >= 0.8 => EVERY[2],
        share if share >= 0.5 => EVERY[1],
        _ => EVERY[0],
    }
}

/// The agent's resident memory, in bytes.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_size())
}

fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok().flatten().map_or(4096, |size| size as u64)
}

/// The default threshold: 90% of the memory limit of the agent's cgroup (a pod's `resources.limits.memory`),
/// `None` without one.
pub fn default_threshold() -> Option<u64> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    cgroup_limit(&cgroups, |path| std::fs::read_to_string(path).ok())
        .map(|limit| (limit as f64 * SHARE_OF_LIMIT) as u64)
}

/// The memory limit `/proc/self/cgroup` (`cgroups`) leads to: cgroup v2's `memory.max`, else v1's
/// `memory.limit_in_bytes`; `None` when unlimited or unreadable. `read` reads a file.
fn cgroup_limit(cgroups: &str, read: impl Fn(&str) -> Option<String>) -> Option<u64> {
    let mut candidates = Vec::new();
    for line in cgroups.lines() {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        let path = path.trim_end_matches('/');
        if controllers.is_empty() {
            candidates.push(format!("/sys/fs/cgroup{path}/memory.max"));
            candidates.push(format!("/sys/fs/cgroup/unified{path}/memory.max"));
        } else if controllers.split(',').any(|controller| controller == "memory") {
            candidates.push(format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"));
        }
    }
    candidates.iter().find_map(|path| {
        let text = read(path)?;
        let limit: u64 = text.trim().parse().ok()?;
        // v1 writes "no limit" as the largest page-aligned number.
        (limit < 1 << 60).then_some(limit)
    })
}

/// A size as Kubernetes writes quantities: `512Mi`, `2Gi`, `500M`, or bytes; `0` turns shedding off.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let units: [(&str, u64); 8] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("K", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
    ];
    let (number, unit) = units
        .iter()
        .find_map(|(suffix, unit)| text.strip_suffix(suffix).map(|number| (number, *unit)))
        .unwrap_or((text, 1));
    let number: u64 = number.parse().map_err(|_| format!("'{text}' is not a size (e.g. 512Mi, 2Gi, 1000000)"))?;
    number.checked_mul(unit).ok_or_else(|| format!("'{text}' is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_read_more_often_the_closer_it_is_to_the_threshold() {
        let threshold = 1000 << 20;
        assert_eq!(read_interval(100 << 20, threshold), Duration::from_millis(250));
        assert_eq!(read_interval(600 << 20, threshold), Duration::from_millis(50));
        assert_eq!(read_interval(900 << 20, threshold), Duration::from_millis(10));
        assert_eq!(read_interval(2000 << 20, threshold), Duration::from_millis(10), "past it: while shedding");
        assert_eq!(read_interval(1, 0), Duration::from_millis(10), "a threshold of nothing is always near");
    }

    #[test]
    fn sizes_read_as_kubernetes_quantities() {
        assert_eq!(parse_size("512Mi"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2_000_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("0"), Ok(0));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999Ti").is_err());
    }

    #[test]
    fn the_cgroup_limit_is_found_for_v2_and_v1_and_unlimited_is_none() {
        let files = |path: &str| match path {
            "/sys/fs/cgroup/kubepods/pod1/memory.max" => Some("268435456\n".to_owned()),
            "/sys/fs/cgroup/memory/kubepods/pod2/memory.limit_in_bytes" => Some("134217728\n".to_owned()),
            "/sys/fs/cgroup/memory/memory.limit_in_bytes" => Some("9223372036854771712\n".to_owned()),
            "/sys/fs/cgroup/memory.max" => Some("max\n".to_owned()),
            _ => None,
        };
        assert_eq!(cgroup_limit("0::/kubepods/pod1\n", files), Some(268435456));
        assert_eq!(cgroup_limit("4:memory:/kubepods/pod2\n0::/\n", files), Some(134217728));
        assert_eq!(cgroup_limit("4:memory:/\n0::/\n", files), None, "unlimited");
    }
}
