//! Which of the node's interfaces the classifier belongs on: those `--intercept` names, literally, by a
//! pattern or as the default route's, as they are now (interfaces come and go: a CNI re-creates its devices, a veth is re-plumbed).

use std::{fmt, str::FromStr};

/// The kernel's limit on an interface name, without its terminating NUL (`IFNAMSIZ - 1`).
const MAX_NAME: usize = 15;

/// What one `--intercept` names: an interface, a pattern over names (`*` any run of characters, `?` one), or
/// `default-route`: the interfaces the main table's default routes leave through, as they are now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InterfaceSpec {
    Name(String),
    Pattern(String),
    DefaultRoute,
}

/// How `--intercept` names the interfaces of the default route.
const DEFAULT_ROUTE: &str = "default-route";

impl InterfaceSpec {
    /// Whether the spec selects `interface`, given the interfaces the default routes leave through now.
    pub fn matches(&self, interface: &Interface, default_route: &[u32]) -> bool {
        match self {
            InterfaceSpec::Name(own) => *own == interface.name,
            InterfaceSpec::Pattern(pattern) => glob_matches(pattern.as_bytes(), interface.name.as_bytes()),
            InterfaceSpec::DefaultRoute => default_route.contains(&interface.index),
        }
    }
}

impl FromStr for InterfaceSpec {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text == DEFAULT_ROUTE {
            return Ok(InterfaceSpec::DefaultRoute);
        }
        if text.is_empty() || text.len() > MAX_NAME {
            return Err(format!("'{text}' is not an interface name (1 to {MAX_NAME} characters)"));
        }
        if let Some(bad) = text.chars().find(|c| c.is_whitespace() || *c == '/' || *c == ':') {
            return Err(format!("'{text}' is not an interface name ('{bad}' cannot be in one)"));
        }
        Ok(if text.contains(['*', '?']) {
            InterfaceSpec::Pattern(text.to_owned())
        } else {
            InterfaceSpec::Name(text.to_owned())
        })
    }
}

impl fmt::Display for InterfaceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InterfaceSpec::Name(text) | InterfaceSpec::Pattern(text) => f.write_str(text),
            InterfaceSpec::DefaultRoute => f.write_str(DEFAULT_ROUTE),
        }
    }
}

/// An interface as the kernel has it now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub index: u32,
}

/// The interfaces of the agent's network namespace now.
pub fn present() -> std::io::Result<Vec<Interface>> {
    let interfaces = nix::net::if_::if_nameindex()?;
    Ok(interfaces
        .iter()
        .map(|interface| Interface { name: interface.name().to_string_lossy().into_owned(), index: interface.index() })
        .collect())
}

/// Every address of the agent's network namespace's interfaces now.
pub fn node_addresses() -> std::io::Result<Vec<std::net::IpAddr>> {
    let addresses = nix::ifaddrs::getifaddrs()?;
    Ok(addresses
        .filter_map(|interface| {
            let address = interface.address?;
            address
                .as_sockaddr_in()
                .map(|v4| std::net::IpAddr::V4(v4.ip()))
                .or_else(|| address.as_sockaddr_in6().map(|v6| std::net::IpAddr::V6(v6.ip())))
        })
        .collect())
}

/// The interfaces of `present` that `specs` select (`default_route`: the interfaces the default routes leave
/// through).
pub fn selected(specs: &[InterfaceSpec], present: &[Interface], default_route: &[u32]) -> Vec<Interface> {
    present
        .iter()
        .filter(|interface| specs.iter().any(|spec| spec.matches(interface, default_route)))
        .cloned()
        .collect()
}

/// The names `specs` give literally that `present` lacks: interfaces configured and not there to enforce on.
pub fn missing(specs: &[InterfaceSpec], present: &[Interface]) -> Vec<String> {
    specs
        .iter()
        .filter_map(|spec| match spec {
            InterfaceSpec::Name(name) if !present.iter().any(|interface| &interface.name == name) => Some(name.clone()),
            _ => None,
        })
        .collect()
}

/// Shell-style matching of `name` against `pattern` (`*` and `?`), iterative with one backtrack point.
fn glob_matches(pattern: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, n));
                p += 1;
            }
            Some(&c) if c == b'?' || c == name[n] => {
                p += 1;
                n += 1;
            }
            _ => match star {
                Some((star_p, star_n)) => {
                    p = star_p + 1;
                    n = star_n + 1;
                    star = Some((star_p, star_n + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_patterns_select_interfaces_as_a_shell_would() {
        let cases = [
            ("eth1", "eth1", true),
            ("eth1", "eth10", false),
            ("vxlan*", "vxlan.calico", true),
            ("vxlan*", "vxlan", true),
            ("vxlan*", "eth0", false),
            ("lxc*", "lxc_health", true),
            ("veth?", "veth1", true),
            ("veth?", "veth12", false),
            ("*-wl", "gw-wl", true),
            ("*-wl", "gw-net", false),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
        ];
        for (spec, name, expected) in cases {
            let spec: InterfaceSpec = spec.parse().unwrap();
            let interface = Interface { name: name.into(), index: 7 };
            assert_eq!(spec.matches(&interface, &[]), expected, "{spec} against {name}");
        }
    }

    #[test]
    fn what_cannot_name_an_interface_is_refused_saying_why() {
        assert_eq!("eth0".parse(), Ok(InterfaceSpec::Name("eth0".into())));
        assert_eq!("cali*".parse(), Ok(InterfaceSpec::Pattern("cali*".into())));
        let too_long = "a-name-of-16-chr".parse::<InterfaceSpec>().unwrap_err();
        assert!(too_long.contains("1 to 15 characters"), "{too_long}");
        assert!("eth 0".parse::<InterfaceSpec>().unwrap_err().contains("' ' cannot be in one"));
        assert!("".parse::<InterfaceSpec>().is_err());
    }

    #[test]
    fn literal_names_not_present_are_missing_and_patterns_never_are() {
        let specs: Vec<InterfaceSpec> = ["eth1", "eth2", "vx*"].iter().map(|s| s.parse().unwrap()).collect();
        let present = vec![Interface { name: "eth1".into(), index: 3 }, Interface { name: "lo".into(), index: 1 }];
        assert_eq!(missing(&specs, &present), vec!["eth2".to_owned()]);
        assert_eq!(selected(&specs, &present, &[]), vec![Interface { name: "eth1".into(), index: 3 }]);
    }

    #[test]
    fn default_route_selects_the_interfaces_the_default_routes_leave_through() {
        let specs = vec!["default-route".parse::<InterfaceSpec>().unwrap()];
        assert_eq!(specs, vec![InterfaceSpec::DefaultRoute]);
        let present = vec![Interface { name: "eth0".into(), index: 2 }, Interface { name: "eth1".into(), index: 3 }];
        assert_eq!(selected(&specs, &present, &[3]), vec![Interface { name: "eth1".into(), index: 3 }]);
        assert_eq!(selected(&specs, &present, &[]), vec![]);
        assert!(missing(&specs, &present).is_empty(), "no default route is no fault");
    }
}
