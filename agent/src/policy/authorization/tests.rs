use super::*;

fn authorization(yaml: &str, gateway_namespace: Option<&str>) -> Authorization {
    let snapshot = Snapshot::from_yaml(yaml);
    let labels = BTreeMap::from([("istio".to_owned(), "egressgateway".to_owned())]);
    Authorization::compile(&snapshot, &labels, gateway_namespace)
}

fn request<'a>(headers: &'a http::HeaderMap, host: &'a str, method: &'a str, path: &'a str, port: u16) -> Subject<'a> {
    Subject {
        http: Some(HttpRequest { method, path, host, headers }),
        sni: None,
        source_ip: "10.1.0.5".parse().unwrap(),
        source_namespace: None,
        principal: None,
        destination_ip: "203.0.113.10".parse().unwrap(),
        destination_port: port,
    }
}

fn connection(sni: Option<&str>, port: u16) -> Subject<'_> {
    Subject {
        http: None,
        sni,
        source_ip: "10.1.0.5".parse().unwrap(),
        source_namespace: None,
        principal: None,
        destination_ip: "203.0.113.10".parse().unwrap(),
        destination_port: port,
    }
}

const RESTRICT_EGRESS: &str = "apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: restrict-egress, namespace: default}
spec:
  selector: {matchLabels: {istio: egressgateway}}
  action: ALLOW
  rules:
  - to:
    - operation:
        hosts: [api.trusted-service.com, '*.internal.company.com']
        ports: ['443', '8443']
";

#[test]
fn the_seeds_restrict_egress_allows_its_hosts_and_ports_and_denies_the_rest() {
    let authorization = authorization(RESTRICT_EGRESS, None);
    let headers = http::HeaderMap::new();
    let decide = |subject: &Subject<'_>| authorization.decide(Scope::Gateway, subject);
    let allowed = decide(&request(&headers, "api.trusted-service.com:443", "GET", "/", 443));
    assert!(!allowed.denied);
    assert_eq!(allowed.policy, Some(("default/restrict-egress".into(), Action::Allow)));
    assert!(!decide(&request(&headers, "DB.internal.company.com", "GET", "/", 8443)).denied, "suffix, any case");
    assert!(decide(&request(&headers, "api.trusted-service.com", "GET", "/", 80)).denied, "another port");
    let denied = decide(&request(&headers, "evil.example", "GET", "/", 443));
    assert!(denied.denied && denied.policy.is_none(), "an ALLOW policy applies and none matches");
    // A TLS connection is matched by its server name.
    assert!(!decide(&connection(Some("api.trusted-service.com"), 443)).denied);
    assert!(decide(&connection(Some("evil.example"), 443)).denied);
    assert!(decide(&connection(None, 443)).denied, "no name: hosts cannot be met in an ALLOW rule");
    // Intercepted traffic is the source workload's: the gateway's policy is not its.
    assert!(!authorization.decide(Scope::Workload(None), &connection(None, 443)).denied);
}

#[test]
fn deny_wins_and_applies_to_tcp_even_for_http_only_fields() {
    let yaml = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: istio-system}
spec:
  action: DENY
  rules:
  - to: [{operation: {paths: ['/admin/*'], ports: ['8080']}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: all, namespace: istio-system}
spec:
  rules: [{}]
";
    let authorization = authorization(yaml, Some("istio-system"));
    let headers = http::HeaderMap::new();
    let decide = |subject: &Subject<'_>| authorization.decide(Scope::Gateway, subject);
    let denied = decide(&request(&headers, "a.example", "GET", "/admin/users", 8080));
    assert_eq!((denied.denied, denied.policy), (true, Some(("istio-system/no-admin".into(), Action::Deny))));
    assert!(!decide(&request(&headers, "a.example", "GET", "/public", 8080)).denied);
    assert!(decide(&connection(None, 8080)).denied, "a DENY's HTTP-only field holds on TCP: the port is denied");
    assert!(!decide(&connection(None, 5432)).denied);
}

#[test]
fn sources_namespaces_principals_and_conditions_are_matched() {
    let yaml = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: payments-only, namespace: istio-system}
spec:
  rules:
  - from: [{source: {namespaces: [payments]}}]
    when: [{key: 'request.headers[x-team]', values: ['pay*']}]
  - from: [{source: {principals: ['cluster.local/ns/billing/sa/*'], notIpBlocks: [10.9.0.0/16]}}]
  - to: [{operation: {paths: ['/api/{*}/health', '/static/{**}']}}]
";
    let authorization = authorization(yaml, None);
    let mut headers = http::HeaderMap::new();
    headers.insert("x-team", "payments".parse().unwrap());
    let empty = http::HeaderMap::new();
    let decide = |subject: Subject<'_>| authorization.decide(Scope::Gateway, &subject).denied;
    let from = |namespace: Option<&'static str>, headers| Subject {
        source_namespace: namespace,
        ..request(headers, "a.example", "GET", "/x", 80)
    };
    assert!(!decide(from(Some("payments"), &headers)));
    assert!(decide(from(Some("payments"), &empty)), "the when condition fails");
    assert!(decide(from(Some("web"), &headers)));
    assert!(decide(from(None, &headers)), "an unknown namespace meets no namespace entry");
    let principal =
        Subject { principal: Some("cluster.local/ns/billing/sa/worker"), ..request(&empty, "a", "GET", "/x", 80) };
    assert!(!decide(principal));
    let excluded = Subject { source_ip: "10.9.1.1".parse().unwrap(), ..principal };
    assert!(decide(excluded), "notIpBlocks");
    assert!(!decide(request(&empty, "a", "GET", "/api/v1/health", 80)), "{{*}} is one segment");
    assert!(decide(request(&empty, "a", "GET", "/api/v1/x/health", 80)));
    assert!(!decide(request(&empty, "a", "GET", "/static/css/site.css", 80)), "{{**}} is the rest");
}

#[test]
fn dry_run_and_audit_are_reported_and_never_enforced() {
    let yaml = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: trial, namespace: istio-system, annotations: {istio.io/dry-run: 'true'}}
spec:
  action: DENY
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: watch, namespace: istio-system}
spec:
  action: AUDIT
  rules: [{to: [{operation: {ports: ['443']}}]}]
";
    let authorization = authorization(yaml, None);
    let verdict = authorization.decide(Scope::Gateway, &connection(Some("a.example"), 443));
    assert!(!verdict.denied && !verdict.governed);
    assert_eq!(
        verdict.reported,
        [("istio-system/trial".into(), Action::Deny, true), ("istio-system/watch".into(), Action::Audit, true)]
    );
}

#[test]
fn policies_apply_by_namespace_and_selector() {
    let yaml = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: team-a, namespace: team-a}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules: [{to: [{operation: {ports: ['22']}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: elsewhere, namespace: team-b}
spec:
  action: DENY
  rules: [{}]
";
    let authorization = authorization(yaml, Some("istio-system"));
    let web = Workload {
        name: "web".into(),
        namespace: "team-a".into(),
        labels: BTreeMap::from([("app".into(), "web".into())]),
    };
    let other = Workload { labels: BTreeMap::new(), ..web.clone() };
    let ssh = connection(None, 22);
    assert!(authorization.decide(Scope::Workload(Some(&web)), &ssh).denied);
    assert!(!authorization.decide(Scope::Workload(Some(&other)), &ssh).denied, "the selector does not select it");
    assert!(!authorization.decide(Scope::Workload(None), &ssh).denied, "an unknown source: root policies only");
    assert!(!authorization.decide(Scope::Gateway, &ssh).denied, "neither is the gateway's namespace");
}

#[test]
fn names_of_any_bytes_are_matched_without_splitting_a_character() {
    // A pattern's length may fall inside a multibyte character of a hostile server name: no match, no panic.
    let prefix = Text::compile("ab*", true);
    assert!(!prefix.matches("aé", true) && !prefix.matches("é", true) && prefix.matches("ABc", true));
    let suffix = Text::compile("*b.com", true);
    assert!(!suffix.matches("éb.co", true) && suffix.matches("xB.COM", true));
    let template = Text::compile("/a/{*}", false);
    assert!(template.matches("/a/é", false) && !template.matches("/é/x", false));
    let authorization = authorization(RESTRICT_EGRESS, None);
    for name in ["éinternal.company.com", "api.trusted-servicé.com", "é"] {
        assert!(authorization.decide(Scope::Gateway, &connection(Some(name), 443)).denied, "{name}");
    }
}

#[test]
fn target_refs_attach_a_policy_to_the_gateway_they_name_or_to_traffic_to_a_service() {
    let yaml = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: httpbin, namespace: egress}
spec:
  hosts: [httpbin.org, '*.httpbin.org']
  addresses: [198.51.100.0/24]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: NONE
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: httpbin-from-default, namespace: egress}
spec:
  targetRefs: [{kind: ServiceEntry, group: networking.istio.io, name: httpbin}]
  action: ALLOW
  rules: [{from: [{source: {namespaces: [default]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: istio-system}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: egress}]
  action: DENY
  rules: [{to: [{operation: {paths: [/admin]}}]}]
";
    let snapshot = Snapshot::from_yaml(yaml);
    let labels = |name: &str| BTreeMap::from([(GATEWAY_NAME_LABEL.to_owned(), name.to_owned())]);
    let named = Authorization::compile(&snapshot, &labels("egress"), Some("istio-system"));
    let other = Authorization::compile(&snapshot, &labels("other"), Some("istio-system"));
    let headers = http::HeaderMap::new();
    let admin = request(&headers, "example.com", "GET", "/admin", 80);
    assert!(named.decide(Scope::Gateway, &admin).denied, "the Gateway named: its policy applies");
    assert!(!other.decide(Scope::Gateway, &admin).denied, "another gateway: not attached");
    assert!(!named.decide(Scope::Workload(None), &admin).denied, "not the workloads' own traffic");

    // Traffic to the ServiceEntry, from anywhere: by host, server name or address; only namespace default's.
    let mut from_default = request(&headers, "www.httpbin.org:443", "GET", "/", 443);
    from_default.source_namespace = Some("default");
    let mut from_other = from_default;
    from_other.source_namespace = Some("other");
    for scope in [Scope::Gateway, Scope::Workload(None)] {
        assert!(!named.decide(scope, &from_default).denied, "{scope:?}");
        let verdict = named.decide(scope, &from_other);
        assert!(verdict.denied && verdict.policy.is_none(), "{scope:?}: an ALLOW applies and none matched");
    }
    let tls = Subject { source_namespace: Some("other"), ..connection(Some("HTTPBIN.org"), 443) };
    assert!(named.decide(Scope::Workload(None), &tls).denied, "by server name");
    let by_address = Subject {
        destination_ip: "198.51.100.7".parse().unwrap(),
        source_namespace: Some("other"),
        ..connection(None, 443)
    };
    assert!(named.decide(Scope::Workload(None), &by_address).denied, "by address");
    let elsewhere = request(&headers, "example.com", "GET", "/", 443);
    assert!(!named.decide(Scope::Workload(None), &elsewhere).governed, "traffic to other services: not governed");
}
