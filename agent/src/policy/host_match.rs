//! Host tables in Envoy's order: an exact host first, then the longest wildcard suffix (`*.example.com`), then
//! `*`. Case-insensitive; a port in the Host or authority is ignored. Built once per configuration; a lookup
//! costs one hash probe per label of the host, whatever the number of entries.

use std::hash::BuildHasher;

use hashbrown::HashTable;

/// Hosts → values, laid out for lookups among many hosts: the hash table holds only each host's place in a
/// dense list of slots (4 bytes a bucket: a table is at most 7/8 full and grows by doubling, so most of its
/// buckets would otherwise hold a whole slot, or nothing), each slot the host's place in one string of hosts back
/// to back and its value. A probe reads the table, the slot and the host's bytes from three dense arrays rather
/// than a key allocated apart (which, over 100k hosts, costs a TLB miss of its own). Hosts hash with foldhash
/// (seeded per process).
#[derive(Clone)]
struct Hosts<T> {
    index: HashTable<u32>,
    slots: Vec<Slot<T>>,
    text: String,
    hasher: foldhash::fast::RandomState,
}

#[derive(Clone)]
struct Slot<T> {
    start: u32,
    end: u32,
    value: T,
}

impl<T> Default for Hosts<T> {
    fn default() -> Self {
        Hosts {
            index: HashTable::new(),
            slots: Vec::new(),
            text: String::new(),
            hasher: foldhash::fast::RandomState::default(),
        }
    }
}

impl<T> Hosts<T> {
    /// The host of the slot at `at`.
    fn host<'a>(text: &'a str, slots: &[Slot<T>], at: u32) -> &'a str {
        let slot = &slots[at as usize];
        &text[slot.start as usize..slot.end as usize]
    }

    fn get(&self, host: &str) -> Option<&T> {
        let hash = self.hasher.hash_one(host);
        let at = self.index.find(hash, |&at| Self::host(&self.text, &self.slots, at) == host)?;
        Some(&self.slots[*at as usize].value)
    }

    /// Adds `host` unless it is there already (the first value stays).
    fn insert(&mut self, host: &str, value: T) {
        let Hosts { index, slots, text, hasher } = self;
        let hash = hasher.hash_one(host);
        let rehash = |&at: &u32| hasher.hash_one(Self::host(text, slots, at));
        let entry = index.entry(hash, |&at| Self::host(text, slots, at) == host, rehash);
        if let hashbrown::hash_table::Entry::Vacant(vacant) = entry {
            vacant.insert(slots.len() as u32);
            let start = text.len() as u32;
            text.push_str(host);
            slots.push(Slot { start, end: text.len() as u32, value });
        }
    }

    /// The same hosts, each with `f` of its value (in the same places: the table is the same).
    fn map<U>(&self, mut f: impl FnMut(&T) -> U) -> Hosts<U> {
        let slots = self.slots.iter().map(|slot| Slot { start: slot.start, end: slot.end, value: f(&slot.value) });
        Hosts {
            index: self.index.clone(),
            slots: slots.collect(),
            text: self.text.clone(),
            hasher: self.hasher.clone(),
        }
    }

    fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    fn shrink_to_fit(&mut self) {
        let Hosts { index, slots, text, hasher } = self;
        index.shrink_to_fit(|&at| hasher.hash_one(Self::host(text, slots, at)));
        slots.shrink_to_fit();
        text.shrink_to_fit();
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Hosts<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let host = |slot: &Slot<T>| &self.text[slot.start as usize..slot.end as usize];
        f.debug_map().entries(self.slots.iter().map(|slot| (host(slot), &slot.value))).finish()
    }
}

#[derive(Clone, Debug)]
pub struct HostTable<T> {
    exact: Hosts<T>,
    /// `*.example.com` → key `.example.com`: matched at label boundaries.
    suffixes: Hosts<T>,
    /// `*example.com` (no dot, as Istio accepts): matched anywhere, longest first. Rare, so a list.
    loose_suffixes: Vec<(String, T)>,
    any: Option<T>,
}

impl<T> Default for HostTable<T> {
    fn default() -> Self {
        HostTable { exact: Hosts::default(), suffixes: Hosts::default(), loose_suffixes: Vec::new(), any: None }
    }
}

impl<T> HostTable<T> {
    /// Adds `host` (exact, `*.suffix`, `*suffix` or `*`); the first value given for a host is kept, as Istio
    /// keeps the first VirtualService for a host.
    pub fn insert(&mut self, host: &str, value: T) {
        let host = host.to_ascii_lowercase();
        if host == "*" {
            self.any.get_or_insert(value);
        } else if let Some(suffix) = host.strip_prefix("*.") {
            self.suffixes.insert(&format!(".{suffix}"), value);
        } else if let Some(suffix) = host.strip_prefix('*') {
            if !self.loose_suffixes.iter().any(|(s, _)| *s == suffix) {
                self.loose_suffixes.push((suffix.to_owned(), value));
                self.loose_suffixes.sort_by_key(|(suffix, _)| std::cmp::Reverse(suffix.len()));
            }
        } else {
            self.exact.insert(&host, value);
        }
    }

    /// The entry for `authority` (a Host header, an SNI name or an `:authority`), by Envoy's precedence.
    pub fn get(&self, authority: &str) -> Option<&T> {
        self.find(authority, Some)
    }

    /// What `pick` takes from the first entry for `authority` it takes anything from, by Envoy's precedence:
    /// entries `pick` passes over are as if absent (one table serves lookups of different things per host).
    pub fn find<'a, R>(&'a self, authority: &str, mut pick: impl FnMut(&'a T) -> Option<R>) -> Option<R> {
        let host = strip_port(authority).trim_end_matches('.');
        // Per request: allocate only for the rare host that is not already lowercase.
        let lowered;
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            lowered = host.to_ascii_lowercase();
            lowered.as_str()
        } else {
            host
        };
        if let Some(found) = self.exact.get(host).and_then(&mut pick) {
            return Some(found);
        }
        // Longest suffix first: ".b.example.com" before ".example.com"; a wildcard needs at least one label.
        let mut dotted = None;
        let mut rest = host;
        while let Some(dot) = rest.find('.') {
            let key = &rest[dot..];
            if let Some(found) = self.suffixes.get(key).and_then(&mut pick) {
                dotted = Some((key.len(), found));
                break;
            }
            rest = &rest[dot + 1..];
        }
        let loose = self
            .loose_suffixes
            .iter()
            .filter(|(suffix, _)| host.len() > suffix.len() && host.ends_with(suffix.as_str()))
            .find_map(|(suffix, value)| pick(value).map(|found| (suffix.len(), found)));
        match (dotted, loose) {
            // Both match: the longer pattern is the more specific.
            (Some(dotted), Some(loose)) => Some(if loose.0 > dotted.0 { loose.1 } else { dotted.1 }),
            (dotted, loose) => dotted.or(loose).map(|(_, found)| found).or_else(|| self.any.as_ref().and_then(pick)),
        }
    }

    /// The same hosts, each value mapped by `f`.
    pub fn map<U>(&self, mut f: impl FnMut(&T) -> U) -> HostTable<U> {
        HostTable {
            exact: self.exact.map(&mut f),
            suffixes: self.suffixes.map(&mut f),
            loose_suffixes: self.loose_suffixes.iter().map(|(suffix, value)| (suffix.clone(), f(value))).collect(),
            any: self.any.as_ref().map(f),
        }
    }

    /// Gives up the room left for more hosts (a table is built once, then only read).
    pub fn shrink_to_fit(&mut self) {
        self.exact.shrink_to_fit();
        self.suffixes.shrink_to_fit();
        self.loose_suffixes.shrink_to_fit();
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.suffixes.is_empty() && self.loose_suffixes.is_empty() && self.any.is_none()
    }
}

/// `host:port` → `host`; `[v6]:port` → `v6`; a bare IPv6 address is left whole.
pub fn strip_port(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    // Most authorities name no port: a name ends in a letter (or a dot), and only a digit or a colon (an empty
    // port) can end a port.
    if !matches!(authority.as_bytes().last(), Some(b'0'..=b'9' | b':')) {
        return authority;
    }
    // By bytes: the port's digits from the end, then one colon, and none before it (a bare IPv6 address keeps
    // its colons). Every request's authority passes here several times.
    let bytes = authority.as_bytes();
    let digits = bytes.iter().rev().take_while(|byte| byte.is_ascii_digit()).count();
    let colon = bytes.len() - digits;
    match colon.checked_sub(1) {
        Some(at) if bytes[at] == b':' && !bytes[..at].contains(&b':') => &authority[..at],
        _ => authority,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_port_is_taken_off_an_authority_in_each_of_its_forms() {
        for (authority, host) in [
            ("example.com", "example.com"),
            ("example.com:8080", "example.com"),
            ("example.com:", "example.com"),
            ("example.com.", "example.com."),
            ("192.0.2.1", "192.0.2.1"),
            ("192.0.2.1:80", "192.0.2.1"),
            ("[2001:db8::1]:443", "2001:db8::1"),
            ("[2001:db8::1]", "2001:db8::1"),
            ("2001:db8::1", "2001:db8::1"),
            ("2001:db8::1:80", "2001:db8::1:80"),
            ("example.com:80a", "example.com:80a"),
            (":80", ""),
            ("", ""),
        ] {
            assert_eq!(strip_port(authority), host, "{authority}");
        }
    }

    #[test]
    fn hosts_match_in_envoys_order() {
        let mut table = HostTable::default();
        for host in ["api.example.com", "*.example.com", "*.b.example.com", "*", "*shop.net", "HTTPBIN.org"] {
            table.insert(host, host.to_owned());
        }
        let cases = [
            ("api.example.com", "api.example.com"),
            ("API.Example.COM:8443", "api.example.com"),
            ("other.example.com", "*.example.com"),
            ("x.y.example.com", "*.example.com"),
            ("c.b.example.com", "*.b.example.com"),
            ("b.example.com", "*.example.com"),
            ("example.com", "*"),
            ("httpbin.org", "HTTPBIN.org"),
            ("httpbin.org.", "HTTPBIN.org"),
            ("myshop.net", "*shop.net"),
            ("shop.net", "*"),
            ("unknown.test", "*"),
            ("[2001:db8::1]:443", "*"),
        ];
        for (authority, expected) in cases {
            assert_eq!(table.get(authority).map(String::as_str), Some(expected), "{authority}");
        }
    }

    #[test]
    fn a_lookup_passes_over_the_entries_that_hold_nothing_of_what_it_looks_for() {
        // (registered service, routes): one table holds both for each host.
        let mut table = HostTable::default();
        table.insert("api.example.com", (Some("api service"), None));
        table.insert("*.example.com", (None, Some("example routes")));
        table.insert("*shop.example.com", (Some("shop service"), None));
        table.insert("*", (Some("any service"), Some("any routes")));
        let services = |authority| table.find(authority, |entry| entry.0);
        let routes = |authority| table.find(authority, |entry| entry.1);
        assert_eq!(routes("api.example.com"), Some("example routes"));
        assert_eq!(services("API.example.com:443"), Some("api service"));
        assert_eq!(services("www.example.com"), Some("any service"));
        assert_eq!(services("myshop.example.com"), Some("shop service"));
        assert_eq!(routes("myshop.example.com"), Some("example routes"));
        assert_eq!(routes("example.org"), Some("any routes"));
        assert_eq!(table.get("api.example.com"), Some(&(Some("api service"), None)));
    }

    #[test]
    fn without_a_catch_all_unknown_hosts_match_nothing_and_the_first_entry_wins() {
        let mut table = HostTable::default();
        table.insert("a.example", 1);
        table.insert("a.example", 2);
        table.insert("*.example", 3);
        assert_eq!(table.get("a.example"), Some(&1));
        assert_eq!(table.get("b.example"), Some(&3));
        assert_eq!(table.get("example"), None);
        assert_eq!(table.get("203.0.113.10:80"), None);
        assert!(HostTable::<u8>::default().is_empty());
    }
}
