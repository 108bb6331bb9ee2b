//! What stops the agent at start, before it touches the kernel: an operator's mistake that would otherwise leave
//! the node enforcing less than was meant — a `--config` typo read as "no resources" (in ALLOW_ANY, everything
//! passes), an `--intercept` typo that polices no interface, capabilities the pod was not granted. One line each,
//! naming the flag (or the capability) and the way out.

use std::path::{Path, PathBuf};

use anyhow::bail;

use crate::{config::ConfigError, datapath::InterfaceSpec};

/// The `--config` paths and what reading them gave: each must exist, and unless Kubernetes is read as well, they
/// must hold something valid (resources or a mesh config). `--allow-empty-config` lets all of it pass.
pub fn configuration(
    paths: &[PathBuf],
    (accepted, errors): (usize, &[ConfigError]),
    kube: bool,
    allow_empty: bool,
) -> anyhow::Result<()> {
    if allow_empty || paths.is_empty() {
        return Ok(());
    }
    if let Some(missing) = paths.iter().find(|path| !path.exists()) {
        bail!(
            "--config {}: no such file or directory (to start with no configuration there, pass --allow-empty-config)",
            missing.display()
        );
    }
    let from_files: Vec<&ConfigError> =
        errors.iter().filter(|error| paths.iter().any(|path| Path::new(&error.source).starts_with(path))).collect();
    let shown: Vec<String> = paths.iter().map(|path| path.display().to_string()).collect();
    let (named, as_arguments) = (shown.join(", "), shown.join(" "));
    if accepted == 0 {
        if let Some(first) = from_files.first() {
            bail!(
                "--config {named}: every resource was rejected, the first as {first}; `sluice check {as_arguments}` lists all \
                 {} errors (to start without them, pass --allow-empty-config)",
                from_files.len()
            );
        }
        if !kube {
            bail!(
                "--config {named}: no Istio resource or mesh config in it (.yaml, .yml or .json documents of the kinds \
                 Sluice reads); to start with none, pass --allow-empty-config"
            );
        }
    }
    Ok(())
}

/// The capabilities the agent cannot run without, each with what needs it (Linux's numbers): `CAP_SYS_ADMIN`
/// stands in for `CAP_BPF` and `CAP_PERFMON`, as the kernel lets it (and must, before 5.8, which has neither).
const REQUIRED_CAPABILITIES: [(u32, &str, &str); 3] = [
    (39, "CAP_BPF", "loading the classifier and its maps"),
    (38, "CAP_PERFMON", "the verifier refuses the classifier without it"),
    (12, "CAP_NET_ADMIN", "attaching to interfaces, the policy routing and the transparent listener"),
];
const CAP_SYS_ADMIN: u32 = 21;

/// The process must hold the capabilities in `REQUIRED_CAPABILITIES` (effective): without them loading fails deep
/// in the verifier with a bare EPERM, so the missing ones are named here first.
pub fn capabilities() -> anyhow::Result<()> {
    let Some(effective) = effective_capabilities() else { return Ok(()) };
    let holds = |bit: u32| effective & (1u64 << bit) != 0;
    let missing: Vec<&(u32, &str, &str)> = REQUIRED_CAPABILITIES
        .iter()
        .filter(|(bit, name, _)| {
            let stood_in = holds(CAP_SYS_ADMIN) && *name != "CAP_NET_ADMIN";
            !(holds(*bit) || stood_in)
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let named = missing.iter().map(|(_, name, why)| format!("{name} ({why})")).collect::<Vec<_>>().join(", ");
    bail!(
        "missing capabilities: {named}; grant them (in Kubernetes, securityContext.capabilities.add, as \
         deploy/base/daemonset.yaml does) or run as root with all capabilities"
    )
}

/// `CapEff` of /proc/self/status; `None` where it cannot be read (then the kernel says what is missing).
fn effective_capabilities() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find_map(|line| line.strip_prefix("CapEff:"))?;
    u64::from_str_radix(line.trim(), 16).ok()
}

/// Every interface `--intercept` names exactly must exist, unless `--wait-for-interfaces` says it will appear
/// (patterns and `default-route` may select nothing yet: they are followed).
pub fn interfaces(specs: &[InterfaceSpec], wait: bool) -> anyhow::Result<()> {
    if wait {
        return Ok(());
    }
    for spec in specs {
        if let InterfaceSpec::Name(name) = spec {
            if nix::net::if_::if_nametoindex(name.as_str()).is_err() {
                bail!(
                    "--intercept {name}: no such interface (`ip link` lists them); to wait for it to appear, pass \
                     --wait-for-interfaces or name it with a pattern ('{name}*')"
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(source: &str) -> ConfigError {
        ConfigError {
            source: source.into(),
            resource: Some("ServiceEntry default/api".into()),
            path: "spec.ports[0].number".into(),
            reason: "must be 1-65535".into(),
        }
    }

    #[test]
    fn a_missing_path_an_empty_one_and_one_wholly_rejected_stop_the_start_unless_allowed() {
        let dir = std::env::temp_dir();
        let missing = dir.join("sluice-preflight-no-such-path");
        let fault = |paths: &[PathBuf], read, kube| configuration(paths, read, kube, false).unwrap_err().to_string();

        assert!(fault(std::slice::from_ref(&missing), (0, &[]), true).contains("no such file or directory"));
        assert!(fault(std::slice::from_ref(&dir), (0, &[]), false).contains("no Istio resource or mesh config"));
        let rejected = [error(&dir.join("a.yaml").display().to_string())];
        let message = fault(std::slice::from_ref(&dir), (0, &rejected), true);
        assert!(message.contains("every resource was rejected, the first as "), "{message}");
        assert!(message.contains("spec.ports[0].number: must be 1-65535"), "{message}");

        assert!(
            configuration(std::slice::from_ref(&dir), (0, &[]), true, false).is_ok(),
            "Kubernetes may hold the rest"
        );
        assert!(
            configuration(std::slice::from_ref(&dir), (1, &rejected), false, false).is_ok(),
            "one taken: the rest is reported"
        );
        assert!(configuration(&[missing], (0, &[]), false, true).is_ok(), "--allow-empty-config");
        assert!(configuration(&[], (0, &[]), false, false).is_ok(), "no --config: the flags are the policy");
        let elsewhere = [error("kubernetes")];
        assert!(configuration(&[dir], (1, &elsewhere), true, false).is_ok());
    }

    #[test]
    fn a_named_interface_must_exist_unless_waited_for() {
        let name = |text: &str| InterfaceSpec::Name(text.into());
        assert!(interfaces(&[name("lo")], false).is_ok());
        let message = interfaces(&[name("lo"), name("nosuch0")], false).unwrap_err().to_string();
        assert!(message.starts_with("--intercept nosuch0: no such interface"), "{message}");
        assert!(interfaces(&[name("nosuch0")], true).is_ok());
        assert!(interfaces(&[InterfaceSpec::Pattern("nosuch*".into()), InterfaceSpec::DefaultRoute], false).is_ok());
    }
}
