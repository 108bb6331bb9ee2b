use super::*;

fn service(yaml: &str) -> VirtualService {
    serde_yaml_ng::from_str(yaml).unwrap_or_else(|e| panic!("{yaml}: {e}"))
}

#[test]
fn what_istio_accepts_is_accepted() {
    let cases = [
        // The seeds' two-hop egress route.
        "hosts: [httpbin.org]\ngateways: [egress-demo, mesh]\nhttp:\n- match: [{gateways: [mesh], port: 80}]\n  route: [{destination: {host: egress-demo.smm-demo.svc.cluster.local, port: {number: 80}}}]\n- match: [{gateways: [egress-demo], port: 80}]\n  route: [{destination: {host: httpbin.org, port: {number: 80}}}]",
        // Weights share by their total: they need not add up to 100, and one may pass 100.
        "hosts: ['*']\ngateways: [istio-system/egress]\nhttp: [{route: [{destination: {host: a.example}, weight: 60}, {destination: {host: b.example}, weight: 30}]}]",
        "hosts: [a.example]\nhttp: [{route: [{destination: {host: a.example}, weight: 200}]}]",
        "hosts: [api.example]\nhttp:\n- match: [{uri: {regex: '^/v[0-9]+/.*'}, headers: {X-User: {exact: tester}}}]\n  redirect: {uri: /new, redirectCode: 301}\n- directResponse: {status: 503, body: {string: down}}",
        "hosts: [api.example]\nhttp: [{route: [{destination: {host: api.example}}], timeout: 0.5s, retries: {attempts: 3, perTryTimeout: 2s, retryOn: 'gateway-error,connect-failure,503'}, fault: {abort: {httpStatus: 503, percentage: {value: 10}}}}]",
        "hosts: [api.example]\ntls: [{match: [{sniHosts: [api.example], port: 443}], route: [{destination: {host: api.example, port: {number: 443}}}]}]",
        "hosts: [db.example]\ntcp: [{match: [{port: 5432, destinationSubnets: [203.0.113.0/24]}], route: [{destination: {host: db.example}}]}]",
        // A trailing dot, port 0 (unset), presence by `regex: "*"`, RE2's quoting.
        "hosts: [api.example.com.]\nhttp: [{match: [{port: 0, withoutHeaders: {x-debug: {regex: '*'}}, uri: {regex: '\\Q/v1.0\\E/.*'}}], route: [{destination: {host: api.example.com.}}]}]",
        // A delegate (no hosts) and a root that delegates to it.
        "http: [{match: [{uri: {prefix: /a}}], route: [{destination: {host: a.example}}]}]",
        "hosts: [a.example]\nhttp: [{match: [{uri: {prefix: /}}], delegate: {name: child, namespace: team}}]",
        // An empty URI prefix matches every path; a header match with no form tests presence.
        "hosts: [a.example]\nhttp: [{match: [{uri: {prefix: ''}, headers: {x-a: {}}}], route: [{destination: {host: a.example}}]}]",
        "hosts: [a.example]\nhttp: [{route: [{destination: {host: a.example}}], headers: {request: {set: {':authority': b.example, x-a: '%HOSTNAME%'}}}}]",
    ];
    for yaml in cases {
        assert_eq!(service(yaml).validate(), vec![], "{yaml}");
    }
}

#[test]
fn what_istio_refuses_is_refused_with_its_field() {
    let route = "route: [{destination: {host: a.example}}]";
    let cases = [
        ("hosts: ['*']\nhttp: [{route: [{destination: {host: a.example}}]}]".to_owned(), "spec.hosts[0]", "bound to the mesh"),
        ("hosts: [a.example]".into(), "spec", "at least one of http, tls or tcp"),
        ("hosts: [a.example]\nhttp: [{}]".into(), "spec.http[0]", "one of route, redirect, directResponse or delegate"),
        (format!("hosts: [a.example]\nhttp: [{{{route}, redirect: {{uri: /x}}}}]"), "spec.http[0].route", "route and redirect"),
        (format!("hosts: [a.example, '*.example']\nhttp: [{{{route}}}]"), "spec.hosts[1]", "overlaps"),
        (
            "hosts: [a.example]\nhttp: [{route: [{destination: {host: a.example}, weight: 0}, {destination: {host: b.example}, weight: 0}]}]".into(),
            "spec.http[0].route",
            "add up to 0",
        ),
        ("hosts: [a.example]\nhttp: [{route: [{destination: {host: a.example}, weight: -1}]}]".into(), "spec.http[0].route[0].weight", "negative"),
        ("hosts: [a.example]\nhttp: [{route: [{destination: {}}]}]".into(), "spec.http[0].route[0].destination.host", "required"),
        (format!("hosts: [a.example]\nhttp: [{{match: [{{uri: {{regex: '(open'}}}}], {route}}}]"), "spec.http[0].match[0].uri.regex", "invalid regular expression"),
        (format!("hosts: [a.example]\nhttp: [{{match: [{{method: {{prefix: ''}}}}], {route}}}]"), "spec.http[0].match[0].method.prefix", "may not be empty"),
        (format!("hosts: [a.example]\nhttp: [{{match: [{{headers: {{'x user': {{exact: a}}}}}}], {route}}}]"), "spec.http[0].match[0].headers.x user", "not a header name"),
        (format!("hosts: [a.example]\nhttp: [{{{route}, timeout: 0s}}]"), "spec.http[0].timeout", "below 1ms"),
        (format!("hosts: [a.example]\nhttp: [{{{route}, retries: {{attempts: 2, retryOn: 'sometimes'}}}}]"), "spec.http[0].retries.retryOn", "not a retry condition"),
        (format!("hosts: [a.example]\nhttp: [{{{route}, retries: {{attempts: 0, perTryTimeout: 1s}}}}]"), "spec.http[0].retries.attempts", "retries are off"),
        (format!("hosts: [a.example]\nhttp: [{{{route}, fault: {{abort: {{httpStatus: 700}}}}}}]"), "spec.http[0].fault.abort.httpStatus", "not an HTTP status"),
        (format!("hosts: [a.example]\nhttp: [{{{route}, fault: {{abort: {{grpcStatus: NOPE}}}}}}]"), "spec.http[0].fault.abort.grpcStatus", "not a gRPC status"),
        (format!("hosts: [a.example]\nhttp: [{{{route}, fault: {{delay: {{fixedDelay: 1s, percentage: {{value: 0.00001}}}}}}}}]"), "spec.http[0].fault.delay.percentage.value", "fault percentage"),
        ("hosts: [a.example]\nhttp: [{redirect: {redirectCode: 301}}]".into(), "spec.http[0].redirect", "must change"),
        ("hosts: [a.example]\nhttp: [{redirect: {uri: /x, scheme: ftp}}]".into(), "spec.http[0].redirect.scheme", "not http or https"),
        ("hosts: [a.example]\nhttp: [{directResponse: {status: 42}}]".into(), "spec.http[0].directResponse.status", "not an HTTP status"),
        (format!("hosts: [a.example]\nhttp: [{{{route}, rewrite: {{}}}}]"), "spec.http[0].rewrite", "must set"),
        (format!("hosts: [a.example]\nhttp: [{{{route}, rewrite: {{uri: /a, uriRegexRewrite: {{match: a, rewrite: b}}}}}}]"), "spec.http[0].rewrite", "only one of uri"),
        (format!("hosts: [a.example]\nhttp: [{{{route}, rewrite: {{authority: b.example}}, headers: {{request: {{set: {{host: c.example}}}}}}}}]"), "spec.http[0].headers.request", "more than once"),
        (format!("hosts: [a.example]\nhttp: [{{{route}, headers: {{response: {{set: {{':status': '200'}}}}}}}}]"), "spec.http[0].headers.response.set.:status", "pseudo-headers"),
        (format!("hosts: [a.example]\nhttp: [{{{route}, headers: {{request: {{add: {{x-a: '50%'}}}}}}}}]"), "spec.http[0].headers.request.add.x-a", "lone '%'"),
        (format!("hosts: [a.example]\nhttp: [{{{route}, mirror: {{host: b.example}}, mirrors: [{{destination: {{host: c.example}}}}]}}]"), "spec.http[0].mirrors", "mirror and mirrors"),
        (format!("hosts: [a.example]\nhttp: [{{{route}, corsPolicy: {{allowMethods: [FETCH]}}}}]"), "spec.http[0].corsPolicy.allowMethods[0]", "not an HTTP method"),
        (format!("hosts: [a.example]\nhttp: [{{{route}, corsPolicy: {{maxAge: 1.5s}}}}]"), "spec.http[0].corsPolicy.maxAge", "whole seconds"),
        ("hosts: [a.example]\ntls: [{route: [{destination: {host: a.example}}]}]".into(), "spec.tls[0].match", "at least one match"),
        ("hosts: [a.example]\ntls: [{match: [{sniHosts: [b.example]}], route: [{destination: {host: b.example}}]}]".into(), "spec.tls[0].match[0].sniHosts[0]", "not within the VirtualService's hosts"),
        ("hosts: [a.example]\ntcp: [{match: [{port: 5432}]}]".into(), "spec.tcp[0].route", "at least one destination"),
        (
            "hosts: [a.example]\ntcp: [{match: [{destinationSubnets: [nope]}], route: [{destination: {host: a.example}}]}]".into(),
            "spec.tcp[0].match[0].destinationSubnets[0]",
            "not an IP address or CIDR",
        ),
        (format!("hosts: [a.example]\ngateways: [Bad_Name]\nhttp: [{{{route}}}]"), "spec.gateways[0]", "not a gateway name"),
        (format!("gateways: [egress]\nhttp: [{{{route}}}]"), "spec.gateways", "delegate"),
        ("hosts: [a.example]\nhttp: [{delegate: {name: child}, route: [{destination: {host: a.example}}]}]".into(), "spec.http[0].route", "delegates may not also route"),
        (format!("hosts: [a.example]\nhttp: [{{{route}, match: [{{headers: {{'@request.auth.claims.group': {{exact: a}}}}}}]}}]"), "spec.http[0].match[0].headers.@request.auth.claims.group", "only for VirtualServices bound to gateways"),
        ("hosts: [a.example]\nhttp: [{route: [{destination: {host: '*'}}]}]".into(), "spec.http[0].route[0].destination.host", "not a destination host"),
        ("hosts: [a.example]\nhttp: [{route: [{destination: {host: a.example, subset: v_1}}]}]".into(), "spec.http[0].route[0].destination.subset", "not a subset name"),
    ];
    for (yaml, path, reason) in cases {
        let errors = service(&yaml).validate();
        assert!(
            errors.iter().any(|e| e.path == path && e.reason.contains(reason)),
            "{yaml}\nexpected {path}: {reason}\ngot {errors:?}"
        );
    }
}
