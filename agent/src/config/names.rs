//! Names as Istio's validation reads them: DNS labels, hosts with and without wildcards, `namespace/host` forms
//! of Gateways and Sidecars, gateway references, label maps, selectors and `exportTo`. Each check says what is
//! wrong with the value in words a user can act on; the caller adds the field's path.

use std::{collections::BTreeMap, net::IpAddr};

use super::error::FieldError;

/// A DNS-1123 label as Istio checks it: letters (either case), digits and `-` inside, at most 63 characters.
pub fn is_dns_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

/// A host's first label where a wildcard may stand: `*`, or a label after `*` or `*-` (`*foo`, `*-foo`).
fn is_wildcard_label(label: &str) -> bool {
    if label == "*" {
        return true;
    }
    let rest = label.strip_prefix("*-").or_else(|| label.strip_prefix('*')).unwrap_or(label);
    label.len() <= 63 && is_dns_label(rest)
}

pub fn is_ip(text: &str) -> bool {
    text.parse::<IpAddr>().is_ok()
}

/// Length first, as Istio checks it before the labels.
fn domain_preconditions(domain: &str) -> Result<(), String> {
    if domain.is_empty() {
        return Err("a host may not be empty".into());
    }
    if domain.len() > 255 {
        return Err(format!("'{domain}' is longer than 255 characters"));
    }
    Ok(())
}

/// Dot-separated DNS labels; the top-level one may not be all digits, and one trailing dot is allowed
/// (`api.example.com.`).
fn dns_labels(whole: &str, domain: &str) -> Result<(), String> {
    let labels: Vec<&str> = domain.split('.').collect();
    let top = labels[labels.len() - 1];
    if !top.is_empty() && top.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("'{whole}' is not a valid DNS name (its top-level label '{top}' is all digits)"));
    }
    for (i, label) in labels.iter().enumerate() {
        if i == labels.len() - 1 && label.is_empty() && i > 0 {
            return Ok(());
        }
        if !is_dns_label(label) {
            return Err(format!("'{whole}' is not a valid DNS name (label '{label}')"));
        }
    }
    Ok(())
}

/// A fully qualified name, no wildcard (Istio's `ValidateFQDN`).
pub fn fqdn(name: &str) -> Result<(), String> {
    domain_preconditions(name)?;
    dns_labels(name, name)
}

/// A DNS name whose first label may be a wildcard (`*`, `*.example.com`, `*foo.example.com`), Istio's
/// `ValidateWildcardDomain`. An IP address is not one (its last label is all digits).
pub fn wildcard_domain(domain: &str) -> Result<(), String> {
    domain_preconditions(domain)?;
    let (first, rest) = domain.split_once('.').map_or((domain, None), |(first, rest)| (first, Some(rest)));
    if !is_wildcard_label(first) {
        return Err(format!("'{domain}' is not a valid DNS name (label '{first}')"));
    }
    match rest {
        Some(rest) => dns_labels(domain, rest),
        None => Ok(()),
    }
}

/// A wildcard anywhere but as a whole first label (`*foo.example.com`): Istio warns of it in ServiceEntries and
/// refuses it in Gateway and Sidecar hosts.
pub fn partial_wildcard(host: &str) -> Option<String> {
    (host.contains('*') && host != "*" && !host.starts_with("*."))
        .then(|| format!("partial wildcard '{host}' is not allowed (only '*' or a leading '*.')"))
}

/// Where a `namespace/host` is written: the two differ in what the namespace and host may be.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum HostsOf {
    /// A Gateway server's `hosts`: the namespace may be left out; the host may be an IP address.
    Gateway,
    /// A Sidecar egress listener's `hosts`: the namespace is required and may be `~` (none).
    Sidecar,
}

/// `namespace/host` as Gateway servers and Sidecar egress listeners write it (Istio's
/// `ValidateNamespaceSlashWildcardHostname`).
pub fn namespaced_host(value: &str, of: HostsOf) -> Result<(), String> {
    let Some((namespace, host)) = value.split_once('/') else {
        return match of {
            HostsOf::Gateway => host_part(value, of),
            HostsOf::Sidecar => Err(format!("'{value}' must be namespace/host (like ./{value} or */{value})")),
        };
    };
    if namespace.is_empty() || host.is_empty() {
        return Err(format!("'{value}': the namespace and the host may not be empty"));
    }
    let any_namespace = namespace == "*" || namespace == "." || (of == HostsOf::Sidecar && namespace == "~");
    if !any_namespace && !is_dns_label(namespace) {
        let allowed = if of == HostsOf::Sidecar { "'.', '*' or '~'" } else { "'.' or '*'" };
        return Err(format!("'{namespace}' in '{value}' is not a namespace, {allowed}"));
    }
    host_part(host, of).map_err(|reason| format!("in '{value}': {reason}"))
}

fn host_part(host: &str, of: HostsOf) -> Result<(), String> {
    if host != "*" && !host.contains('.') {
        return Err(format!("'{host}' is a short name: hosts here must be fully qualified"));
    }
    if let Err(reason) = wildcard_domain(host) {
        if of == HostsOf::Sidecar || !is_ip(host) {
            return Err(reason);
        }
    }
    partial_wildcard(host).map_or(Ok(()), Err)
}

/// A Gateway as VirtualServices name it: `mesh`, `name`, `name.namespace` (legacy) or `namespace/name`.
pub fn gateway_reference(gateway: &str) -> Result<(), String> {
    let fail = || format!("'{gateway}' is not a gateway name (mesh, name or namespace/name)");
    match gateway.split_once('/') {
        None => fqdn(gateway).map_err(|_| fail()),
        Some((namespace, name)) if is_dns_label(namespace) && is_dns_label(name) => Ok(()),
        Some(_) => Err(fail()),
    }
}

/// Kubernetes label keys (an optional DNS prefix and `/`, then a name) and values, as Istio checks them.
pub fn validate_labels(labels: &BTreeMap<String, String>, path: &str, errors: &mut Vec<FieldError>) {
    for (key, value) in labels {
        if let Err(reason) = label_key(key) {
            errors.push(FieldError::new(format!("{path}.{key}"), reason));
        }
        if !value.is_empty() && !is_qualified_name(value, 63) {
            errors.push(FieldError::new(
                format!("{path}.{key}"),
                format!("'{value}' is not a label value (letters, digits, '-', '_', '.'; 63 at most)"),
            ));
        }
    }
}

fn label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = key.rsplit_once('/').map_or((None, key), |(prefix, name)| (Some(prefix), name));
    let prefix_ok = prefix.is_none_or(|prefix| prefix.len() <= 253 && prefix.split('.').all(is_dns_label));
    if !prefix_ok || !is_qualified_name(name, 63) {
        return Err(format!("'{key}' is not a label key ([prefix/]name, letters, digits, '-', '_', '.')"));
    }
    Ok(())
}

fn is_qualified_name(name: &str, max: usize) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= max
        && bytes.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
}

/// A workload selector's labels: no empty key, no wildcard in keys or values.
pub fn validate_selector(labels: &BTreeMap<String, String>, path: &str, errors: &mut Vec<FieldError>) {
    for (key, value) in labels {
        if key.is_empty() {
            errors.push(FieldError::new(path, format!("an empty key is not supported in a selector ('={value}')")));
        }
        if key.contains('*') || value.contains('*') {
            errors.push(FieldError::new(
                format!("{path}.{key}"),
                format!("a wildcard is not supported in a selector ('{key}={value}')"),
            ));
        }
    }
}

/// Which kind an `exportTo` belongs to: only a ServiceEntry may be exported to no one (`~`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum ExportOf {
    ServiceEntry,
    Other,
}

/// `exportTo` as Istio checks it: `.`, `*`, namespaces (and `~` for ServiceEntries), no entry twice (`.` and the
/// resource's own namespace are the same entry), `*` and `~` alone.
pub fn validate_export_to(
    namespace: &str,
    export_to: &[String],
    of: ExportOf,
    path: &str,
    errors: &mut Vec<FieldError>,
) {
    let mut seen: Vec<&str> = Vec::new();
    for (i, entry) in export_to.iter().enumerate() {
        let path = format!("{path}[{i}]");
        let key = if entry == "." { namespace } else { entry.as_str() };
        if seen.contains(&key) {
            let reason = if key != entry {
                format!("'.' and the resource's own namespace '{namespace}' are the same entry")
            } else {
                format!("'{entry}' is listed twice")
            };
            errors.push(FieldError::new(path, reason));
            continue;
        }
        let valid = match entry.as_str() {
            "." | "*" => true,
            "~" => {
                if of != ExportOf::ServiceEntry {
                    errors.push(FieldError::new(&path, "'~' (exported to no one) is allowed only for ServiceEntries"));
                    continue;
                }
                true
            }
            other => is_dns_label(other),
        };
        if valid {
            seen.push(key);
        } else {
            errors.push(FieldError::new(path, format!("'{entry}' is not '.', '*' or a namespace")));
        }
    }
    if export_to.len() > 1 && seen.contains(&"*") {
        errors.push(FieldError::new(path, "'*' exports to every namespace: no other entry may go with it"));
    }
    if export_to.len() > 1 && seen.contains(&"~") {
        errors.push(FieldError::new(path, "'~' exports to no one: no other entry may go with it"));
    }
}

/// Whether host `a` and host `b` overlap: equal, or one's wildcard covers the other (Istio's `host.Name.Matches`).
pub fn hosts_overlap(a: &str, b: &str) -> bool {
    match (a.strip_prefix('*'), b.strip_prefix('*')) {
        (Some(a), Some(b)) => a.ends_with(b) || b.ends_with(a),
        (Some(a), None) => b.ends_with(a),
        (None, Some(b)) => a.ends_with(b),
        (None, None) => a == b,
    }
}

/// Whether every name `inner` covers is covered by `outer` (Istio's `host.Name.SubsetOf`).
pub fn host_within(inner: &str, outer: &str) -> bool {
    match (inner.strip_prefix('*'), outer.strip_prefix('*')) {
        (Some(inner), Some(outer)) => inner.ends_with(outer),
        (Some(_), None) => false,
        (None, Some(outer)) => inner.ends_with(outer),
        (None, None) => inner == outer,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_read_as_istio_reads_them() {
        for host in
            ["httpbin.org", "*.example.com", "*", "*foo.example.com", "*-foo.example", "api.example.com.", "A.Example"]
        {
            assert_eq!(wildcard_domain(host), Ok(()), "{host}");
        }
        for host in ["", "203.0.113.10", "bad_host.com", "-lead.example", "a..b", "*.*.example.com", "example.123"] {
            assert!(wildcard_domain(host).is_err(), "{host}");
        }
        assert!(fqdn("*.example.com").is_err());
        assert_eq!(fqdn("mesh"), Ok(()));
        assert!(partial_wildcard("*foo.example.com").is_some());
        assert!(partial_wildcard("*.example.com").is_none());
    }

    #[test]
    fn namespaced_hosts_take_the_forms_of_their_kind() {
        for value in ["*/httpbin.org", "./api.example", "istio-system/*", "*.example.com", "*", "10.0.0.1"] {
            assert_eq!(namespaced_host(value, HostsOf::Gateway), Ok(()), "{value}");
        }
        for value in ["Bad_NS/host.example", "ns/bad_host.example", "ns/short", "ns/*foo.example", "/x.example"] {
            assert!(namespaced_host(value, HostsOf::Gateway).is_err(), "{value}");
        }
        for value in ["~/*", "./*", "istio-system/*", "*/api.example.com."] {
            assert_eq!(namespaced_host(value, HostsOf::Sidecar), Ok(()), "{value}");
        }
        for value in ["httpbin.org", "ns/10.0.0.1", "ns/short"] {
            assert!(namespaced_host(value, HostsOf::Sidecar).is_err(), "{value}");
        }
    }

    #[test]
    fn export_to_refuses_duplicates_and_lonely_values_in_company() {
        let check = |entries: &[&str], of| {
            let entries: Vec<String> = entries.iter().map(|e| e.to_string()).collect();
            let mut errors = Vec::new();
            validate_export_to("team", &entries, of, "spec.exportTo", &mut errors);
            errors.into_iter().map(|e| format!("{}: {}", e.path, e.reason)).collect::<Vec<_>>()
        };
        assert!(check(&[".", "istio-system"], ExportOf::Other).is_empty());
        assert!(check(&["~"], ExportOf::ServiceEntry).is_empty());
        assert!(check(&["~"], ExportOf::Other)[0].contains("only for ServiceEntries"));
        assert!(check(&["team", "."], ExportOf::Other)[0].contains("same entry"));
        assert!(check(&["*", "a"], ExportOf::Other)[0].contains("no other entry"));
        assert!(check(&["~", "a"], ExportOf::ServiceEntry)[0].contains("no other entry"));
        assert!(check(&["Bad_NS"], ExportOf::Other)[0].contains("not '.', '*' or a namespace"));
    }

    #[test]
    fn wildcards_overlap_and_contain_as_istio_says() {
        assert!(hosts_overlap("*.foo.com", "*.com"));
        assert!(hosts_overlap("a.foo.com", "*.foo.com"));
        assert!(!hosts_overlap("a.foo.com", "b.foo.com"));
        assert!(host_within("a.foo.com", "*.foo.com"));
        assert!(host_within("*.a.foo.com", "*.foo.com"));
        assert!(!host_within("*.foo.com", "a.foo.com"));
        assert!(host_within("anything.example", "*"));
    }
}
