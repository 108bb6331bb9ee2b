//! Tests of the decisions: by the registry, by the mesh's and the Gateways' tls and tcp routes.

use std::{collections::BTreeMap, sync::Arc};

use super::*;
use crate::{
    config::{resolver::Resolved, Snapshot},
    policy::{
        bindings::bind,
        routes::{proxy_policy, ProxySettings},
        sidecars::SidecarModes,
    },
};

/// The policy of an egress gateway (`istio=egressgateway`, its own Service the seeds' name) on `yaml` under
/// REGISTRY_ONLY, with `resolved`'s name resolving to its address.
fn as_egress_gateway(yaml: &str, (name, address): (&str, &str)) -> ProxyPolicy {
    let snapshot = Snapshot::from_yaml(yaml);
    let resolved = Resolved::from([(name.to_owned(), vec![address.parse().unwrap()])]);
    let sidecars = Arc::new(SidecarModes::compile(&snapshot, OutboundMode::RegistryOnly));
    let settings = ProxySettings {
        own_services: vec!["istio-egressgateway.istio-system.svc.cluster.local".into()],
        ..ProxySettings::default()
    };
    let labels = BTreeMap::from([("istio".to_owned(), "egressgateway".to_owned())]);
    proxy_policy(&snapshot, &resolved, &bind(&snapshot, &labels), sidecars, &settings, &Default::default())
}

mod addressed {
    use super::*;

    const REGISTRY: &str = "
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: stripe, namespace: egress}
spec:
  hosts: [api.stripe.com]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: google, namespace: egress}
spec:
  hosts: ['*.googleapis.com']
  ports: [{number: 443, name: https, protocol: HTTPS}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: legacy, namespace: egress}
spec:
  hosts: [legacy.internal]
  addresses: [198.51.100.0/24]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: NONE
";

    fn policy(mode: OutboundMode, host_verify: HostVerify) -> ProxyPolicy {
        let snapshot = Snapshot::from_yaml(REGISTRY);
        let resolved = Resolved::from([("api.stripe.com".to_owned(), vec!["203.0.113.10".parse().unwrap()])]);
        let sidecars = Arc::new(SidecarModes::compile(&snapshot, mode));
        let settings = ProxySettings { host_verify, ..ProxySettings::default() };
        proxy_policy(&snapshot, &resolved, &bind(&snapshot, &BTreeMap::new()), sidecars, &settings, &Default::default())
    }

    fn to(address: &str) -> SocketAddr {
        SocketAddr::new(address.parse().unwrap(), 443)
    }

    fn forwarded(verdict: &Verdict) -> Option<(SocketAddr, String)> {
        match verdict {
            Verdict::Forward { address, labels, .. } => Some((*address, labels.name().as_str().to_owned())),
            Verdict::Refuse { .. } | Verdict::Resolve { .. } => None,
        }
    }

    #[test]
    fn a_registered_name_at_its_own_address_is_relayed_and_elsewhere_refused_as_fronting() {
        let policy = policy(OutboundMode::RegistryOnly, HostVerify::Strict);
        let (verdict, mismatch) =
            decide_tls(&policy, Some("api.stripe.com"), to("203.0.113.10"), None, Arrival::Intercepted, 0);
        assert_eq!(forwarded(&verdict), Some((to("203.0.113.10"), "api.stripe.com".into())));
        assert_eq!(mismatch, None);
        // The name of a registered host, sent to an address that is not its own (a CDN's other tenant).
        let (verdict, mismatch) =
            decide_tls(&policy, Some("api.stripe.com"), to("192.0.2.66"), None, Arrival::Intercepted, 0);
        assert!(matches!(verdict, Verdict::Refuse { reason: "fronted", .. }), "{verdict:?}");
        assert_eq!(mismatch, Some("refused"));

        let routed = super::addressed::policy(OutboundMode::RegistryOnly, HostVerify::Route);
        let (verdict, mismatch) =
            decide_tls(&routed, Some("api.stripe.com"), to("192.0.2.66"), None, Arrival::Intercepted, 0);
        assert_eq!(forwarded(&verdict), Some((to("203.0.113.10"), "api.stripe.com".into())), "sent to its own");
        assert_eq!(mismatch, Some("routed"));
    }

    #[test]
    fn registry_only_refuses_an_unregistered_name_even_at_a_registered_address() {
        let policy = policy(OutboundMode::RegistryOnly, HostVerify::Strict);
        let (verdict, _) = decide_tls(&policy, Some("evil.example"), to("203.0.113.10"), None, Arrival::Intercepted, 0);
        let Verdict::Refuse { labels, flag, reason } = verdict else { panic!("{verdict:?}") };
        assert_eq!(
            (labels.name().as_str(), flag, reason),
            ("BlackHoleCluster", ResponseFlag::NoHealthyUpstream, "unregistered_server_name")
        );

        let allow_any = super::addressed::policy(OutboundMode::AllowAny, HostVerify::Strict);
        let (verdict, _) = decide_tls(&allow_any, Some("evil.example"), to("192.0.2.7"), None, Arrival::Intercepted, 0);
        assert_eq!(forwarded(&verdict).map(|(address, _)| address), Some(to("192.0.2.7")), "passed through");
    }

    #[test]
    fn wildcard_names_registered_at_no_address_are_checked_by_dns() {
        let policy = policy(OutboundMode::RegistryOnly, HostVerify::Strict);
        let (verdict, _) =
            decide_tls(&policy, Some("storage.googleapis.com"), to("192.0.2.9"), None, Arrival::Intercepted, 0);
        let Verdict::Forward { address, labels, verify, .. } = verdict else { panic!("{verdict:?}") };
        assert_eq!((address, verify.as_deref()), (to("192.0.2.9"), Some("storage.googleapis.com")));
        assert_eq!(labels.name().as_str().to_owned(), "*.googleapis.com");
        let (verdict, _) = decide_tls(&policy, Some("googleapis.com"), to("192.0.2.9"), None, Arrival::Intercepted, 0);
        assert!(matches!(verdict, Verdict::Refuse { .. }), "the wildcard does not take the bare domain");

        let trusting = super::addressed::policy(OutboundMode::RegistryOnly, HostVerify::Off);
        let (verdict, _) =
            decide_tls(&trusting, Some("storage.googleapis.com"), to("192.0.2.9"), None, Arrival::Intercepted, 0);
        assert!(matches!(verdict, Verdict::Forward { verify: None, .. }), "--host-verify off trusts it");
    }

    #[test]
    fn a_hello_without_a_name_is_decided_by_the_dialled_address() {
        let policy = policy(OutboundMode::RegistryOnly, HostVerify::Strict);
        let (verdict, _) = decide_tls(&policy, None, to("198.51.100.20"), None, Arrival::Intercepted, 0);
        assert_eq!(forwarded(&verdict), Some((to("198.51.100.20"), "legacy.internal".into())), "in its range");
        let (verdict, _) = decide_tls(&policy, None, to("203.0.113.10"), None, Arrival::Intercepted, 0);
        assert_eq!(forwarded(&verdict).map(|(_, name)| name), Some("api.stripe.com".into()), "resolved there");
        let (verdict, _) = decide_tls(&policy, None, to("192.0.2.1"), None, Arrival::Intercepted, 0);
        assert!(matches!(verdict, Verdict::Refuse { reason: "unregistered_address", .. }), "{verdict:?}");
        let (verdict, _) = decide_tls(
            &policy,
            None,
            SocketAddr::new("198.51.100.20".parse().unwrap(), 8443),
            None,
            Arrival::Intercepted,
            0,
        );
        assert!(matches!(verdict, Verdict::Refuse { .. }), "registered on 443 only");
    }
}

mod tls_routed {
    use super::*;

    /// The seeds' "Egress Gateway with SNI" (Pattern 3).
    fn policy() -> ProxyPolicy {
        let seed = include_str!("../../../../../deploy/examples/seeds/egress-gateway-sni.yaml");
        as_egress_gateway(seed, ("www.googleapis.com", "203.0.113.30"))
    }

    fn at(port: u16) -> SocketAddr {
        SocketAddr::new("10.240.1.1".parse().unwrap(), port)
    }

    #[test]
    fn the_seeds_sni_egress_goes_mesh_to_gateway_to_host_in_process() {
        let policy = policy();
        assert_eq!(policy.gateway_ports().into_iter().collect::<Vec<_>>(), [443], "the PASSTHROUGH server's port");
        let googleapis = SocketAddr::new("203.0.113.30".parse().unwrap(), 443);
        for (arrival, dialled) in
            [(Arrival::Intercepted, "192.0.2.50:443".parse().unwrap()), (Arrival::Gateway(443), at(443))]
        {
            let (verdict, _) = decide_tls(&policy, Some("storage.googleapis.com"), dialled, None, arrival, 0);
            let Verdict::Forward { address, labels, verify: None, .. } = verdict else {
                panic!("{arrival:?}: {verdict:?}")
            };
            assert_eq!(address, googleapis, "{arrival:?}: the gateway's route, to the registered host's address");
            assert_eq!(labels.name().as_str(), "www.googleapis.com");
        }
    }

    #[test]
    fn a_gateway_port_refuses_names_and_ports_its_routes_do_not_serve() {
        let policy = policy();
        let refused = |name: Option<&str>, port: u16| match decide_tls(
            &policy,
            name,
            at(port),
            None,
            Arrival::Gateway(port),
            0,
        ) {
            (Verdict::Refuse { reason, .. }, _) => reason,
            (verdict, _) => panic!("{verdict:?}"),
        };
        assert_eq!(refused(Some("evil.example"), 443), "no_route");
        assert_eq!(refused(None, 443), "no_server_name");
        assert_eq!(refused(Some("storage.googleapis.com"), 8443), "no_gateway_server");
        // Intercepted, a name no route takes is decided by the registry: here, unregistered.
        let (verdict, _) = decide_tls(&policy, Some("evil.example"), at(443), None, Arrival::Intercepted, 0);
        assert!(matches!(verdict, Verdict::Refuse { reason: "unregistered_server_name", .. }), "{verdict:?}");
    }
}

mod tcp_routed {
    use super::*;

    /// Beside the seed: an HTTP service, and a TCP one known at no address.
    const NEIGHBOURS: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web, namespace: default}
spec:
  hosts: [web.example]
  addresses: [203.0.113.80]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: mysql, namespace: default}
spec:
  hosts: [mysql.example]
  ports: [{number: 3306, name: mysql, protocol: TCP}]
  resolution: NONE
";

    /// The seeds' "TCP Egress Gateway" (Pattern 2), with its neighbours.
    fn policy() -> ProxyPolicy {
        let seed = include_str!("../../../../../deploy/examples/seeds/egress-gateway-tcp.yaml");
        as_egress_gateway(&format!("{seed}---\n{NEIGHBOURS}"), ("db.external-service.com", "203.0.113.40"))
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    fn forwarded(verdict: Verdict) -> (SocketAddr, String) {
        match verdict {
            Verdict::Forward { address, labels, verify: None, .. } => (address, labels.name().as_str().to_owned()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_seeds_tcp_egress_goes_mesh_to_gateway_to_host_in_process() {
        let policy = policy();
        let db = (addr("203.0.113.40:5432"), "db.external-service.com".to_owned());
        let intercepted = decide_tcp(&policy, addr("203.0.113.40:5432"), None, Arrival::Intercepted, 0).0;
        assert_eq!(forwarded(intercepted), db, "the mesh route, then the gateway's");
        let at_gateway = decide_tcp(&policy, addr("10.240.1.1:5432"), None, Arrival::Gateway(5432), 0).0;
        assert_eq!(forwarded(at_gateway), db, "the Gateway's TCP server port");
        assert!(policy.gateway_ports().contains(&5432));
    }

    #[test]
    fn tcp_is_decided_by_address_and_http_ports_relay_no_opaque_bytes() {
        let policy = policy();
        let refused = |dialled: &str| match decide_tcp(&policy, addr(dialled), None, Arrival::Intercepted, 0).0 {
            Verdict::Refuse { reason, .. } => reason,
            other => panic!("{other:?}"),
        };
        assert_eq!(refused("192.0.2.1:5432"), "unregistered_address");
        assert_eq!(refused("203.0.113.80:80"), "not_http_on_an_http_port", "bytes that are not HTTP pass no route");
        // A TCP service known at no address has the whole port, as Istio gives it.
        let anywhere = decide_tcp(&policy, addr("198.51.100.7:3306"), None, Arrival::Intercepted, 0).0;
        assert_eq!(forwarded(anywhere), (addr("198.51.100.7:3306"), "mysql.example".to_owned()));
        let no_server = decide_tcp(&policy, addr("10.240.1.1:6379"), None, Arrival::Gateway(6379), 0).0;
        assert!(matches!(no_server, Verdict::Refuse { reason: "no_gateway_server", .. }));
    }
}

mod weighted {
    use super::*;

    /// A name at a virtual IP, split 50/50 between two pools by a mesh `tls` route; a database at a virtual IP
    /// whose endpoints are elsewhere, split between its subsets by a `tcp` route.
    const SPLIT: &str = include_str!("../../../../../tests/corpus/valid/weighted-split.yaml");
    fn policy() -> ProxyPolicy {
        as_egress_gateway(SPLIT, ("unused.example", "192.0.2.1"))
    }

    fn address_of(verdict: Verdict) -> SocketAddr {
        match verdict {
            Verdict::Forward { address, verify: None, .. } => address,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_weighted_tls_route_goes_to_each_destinations_endpoints_by_the_roll() {
        let policy = policy();
        let vip = "198.51.100.1:443".parse().unwrap();
        let decide =
            |roll| address_of(decide_tls(&policy, Some("api.example.com"), vip, None, Arrival::Intercepted, roll).0);
        assert_eq!(decide(0), "203.0.113.10:443".parse().unwrap());
        assert_eq!(decide(49), "203.0.113.10:443".parse().unwrap());
        assert_eq!(decide(50), "203.0.113.20:443".parse().unwrap());
        assert_eq!(decide(99), "203.0.113.20:443".parse().unwrap());
        // The route's destinations are reached at their own endpoints whatever the client dialled: no fronting.
        let elsewhere = "192.0.2.99:443".parse().unwrap();
        let (verdict, _) = decide_tls(&policy, Some("api.example.com"), elsewhere, None, Arrival::Intercepted, 0);
        assert_eq!(address_of(verdict), "203.0.113.10:443".parse().unwrap());
    }

    #[test]
    fn tcp_to_a_virtual_ip_goes_to_an_endpoint_of_the_subset_its_route_picks() {
        let policy = policy();
        let vip = "198.51.100.2:5432".parse().unwrap();
        let decide = |roll| address_of(decide_tcp(&policy, vip, None, Arrival::Intercepted, roll).0);
        assert_eq!(decide(0), "203.0.113.10:5432".parse().unwrap());
        assert_eq!(decide(50), "203.0.113.20:5432".parse().unwrap());
    }

    #[test]
    fn a_virtual_ip_without_a_route_goes_to_an_endpoint_not_to_itself() {
        let yaml = SPLIT.split("---\napiVersion: networking.istio.io/v1\nkind: VirtualService").next().unwrap();
        let db = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: egress}
spec:
  hosts: [db.example]
  addresses: [198.51.100.2]
  ports: [{number: 5432, name: pg, protocol: TCP}]
  endpoints: [{address: 203.0.113.30}]
  resolution: STATIC
";
        let policy = as_egress_gateway(&format!("{yaml}---\n{db}"), ("unused.example", "192.0.2.1"));
        let (verdict, _) = decide_tcp(&policy, "198.51.100.2:5432".parse().unwrap(), None, Arrival::Intercepted, 0);
        assert_eq!(address_of(verdict), "203.0.113.30:5432".parse().unwrap());
        // An endpoint dialled directly is kept.
        let (verdict, _) = decide_tcp(&policy, "203.0.113.30:5432".parse().unwrap(), None, Arrival::Intercepted, 0);
        assert_eq!(address_of(verdict), "203.0.113.30:5432".parse().unwrap());
        // A NONE service at its own address: the address dialled.
        let (verdict, _) = decide_tls(
            &policy,
            Some("api.example.com"),
            "198.51.100.1:443".parse().unwrap(),
            None,
            Arrival::Intercepted,
            0,
        );
        assert_eq!(address_of(verdict), "198.51.100.1:443".parse().unwrap());
    }
}
