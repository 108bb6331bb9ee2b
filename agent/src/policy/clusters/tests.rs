//! Tests of clusters: load balancing, limits, outlier detection, what a DestinationRule's traffic policy
//! compiles to.

use super::*;

fn cluster(addresses: &[&str], policy: ClusterPolicy) -> Cluster {
    let endpoints = addresses.iter().map(|a| ClusterEndpoint { address: a.parse().unwrap(), port: 80 }).collect();
    let state = Arc::new(ClusterState::new(policy.limits));
    Cluster::new((80, None), endpoints, Arc::new(policy), state)
}

#[test]
fn a_cluster_is_a_cache_line_and_holds_a_lone_endpoint_in_place() {
    assert_eq!(std::mem::size_of::<Cluster>(), 64);
    let one = cluster(&["192.0.2.1"], ClusterPolicy::default());
    assert!(matches!(one.endpoints, ClusterEndpoints::One(_)));
    assert_eq!(one.endpoints.len(), 1);
    assert!(one.is_of(80, None) && !one.is_of(80, Some("v1")) && !one.is_of(443, None));
    let two = cluster(&["192.0.2.1", "192.0.2.2"], ClusterPolicy::default());
    assert_eq!(two.endpoints.iter().map(|e| e.address.to_string()).collect::<Vec<_>>(), ["192.0.2.1", "192.0.2.2"]);
    assert!(cluster(&[], ClusterPolicy::default()).endpoints.is_empty());
}

#[test]
fn a_consistent_hash_keeps_each_key_on_one_endpoint_and_moves_only_a_removed_endpoints_keys() {
    let policy = ClusterPolicy { hash: Some(HashKey::SourceIp), ..Default::default() };
    let four = cluster(&["192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4"], policy.clone());
    let three = cluster(&["192.0.2.1", "192.0.2.2", "192.0.2.3"], policy);
    let keys: Vec<u64> = (0..400u32).map(|i| fixed_hash(i.to_be_bytes())).collect();
    let picks: Vec<IpAddr> = keys.iter().map(|&k| four.pick(Some(k)).unwrap()).collect();
    assert!(keys.iter().zip(&picks).all(|(&k, &p)| four.pick(Some(k)) == Some(p)), "the same key, the same endpoint");
    for endpoint in four.endpoints.iter() {
        let share = picks.iter().filter(|&&p| p == endpoint.address).count();
        assert!((60..140).contains(&share), "keys spread over the endpoints: {share} of 400");
    }
    let removed: IpAddr = "192.0.2.4".parse().unwrap();
    for (&key, &pick) in keys.iter().zip(&picks) {
        let now = three.pick(Some(key)).unwrap();
        assert!(pick == removed || now == pick, "only the removed endpoint's keys move");
    }
}

#[test]
fn hash_keys_are_read_from_headers_cookies_the_source_and_the_query() {
    let mut headers = HeaderMap::new();
    headers.insert("x-user", "alice".parse().unwrap());
    headers.append(header::COOKIE, "theme=dark; session=s1".parse().unwrap());
    let uri: Uri = "/cart?item=1&user=bob".parse().unwrap();
    let peer: IpAddr = "10.0.0.7".parse().unwrap();
    let key = |key: HashKey| key.hash(&headers, &uri, peer);
    assert_eq!(key(HashKey::Header(HeaderName::from_static("x-user"))), Some(fixed_hash(b"alice".as_slice())));
    assert_eq!(key(HashKey::Cookie("session".into())), Some(fixed_hash(b"s1".as_slice())));
    assert_eq!(key(HashKey::QueryParameter("user".into())), Some(fixed_hash(b"bob".as_slice())));
    assert_eq!(key(HashKey::SourceIp), Some(fixed_hash(peer)));
    assert_eq!(key(HashKey::Header(HeaderName::from_static("x-absent"))), None, "no key: round robin");
    assert_eq!(key(HashKey::Cookie("absent".into())), None);
    assert_eq!(key(HashKey::QueryParameter("absent".into())), None);
}

#[test]
fn consecutive_errors_eject_an_endpoint_and_the_others_take_its_share() {
    let outlier = Outlier {
        consecutive_5xx: None,
        consecutive_gateway: Some(2),
        base_ejection: Duration::from_secs(30),
        max_ejection_percent: 50,
    };
    let cluster =
        cluster(&["192.0.2.1", "192.0.2.2"], ClusterPolicy { outlier: Some(outlier.clone()), ..Default::default() });
    let bad: IpAddr = "192.0.2.1".parse().unwrap();
    cluster.state.report(bad, Outcome::Status(503), &outlier);
    cluster.state.report(bad, Outcome::Status(200), &outlier);
    cluster.state.report(bad, Outcome::Failed, &outlier);
    assert!((0..4).map(|_| cluster.pick(None).unwrap()).any(|a| a == bad), "a success resets the count");
    cluster.state.report(bad, Outcome::Status(502), &outlier);
    assert!((0..4).all(|_| cluster.pick(None).unwrap() != bad), "two gateway errors in a row eject it");
}

#[test]
fn limits_admit_then_queue_then_overflow() {
    let cluster = cluster(&["192.0.2.1"], ClusterPolicy { limits: Some((1, 1)), ..Default::default() });
    let first = cluster.state.admit();
    assert!(matches!(first, Admission::Now(Some(_))));
    assert!(matches!(cluster.state.admit(), Admission::Wait(_)));
    cluster.state.waiting.fetch_add(1, Ordering::Relaxed);
    assert!(matches!(cluster.state.admit(), Admission::Overflow));
    drop(first);
    cluster.state.waiting.fetch_sub(1, Ordering::Relaxed);
    assert!(matches!(cluster.state.admit(), Admission::Now(Some(_))));
}

#[test]
fn tls_origination_is_made_ready_at_compile_time_or_refuses() {
    let tls = |json: serde_json::Value| -> Option<TlsOrigination> {
        TlsOrigination::compile(&serde_json::from_value(json).unwrap(), false, &CredentialSource::default())
    };
    assert!(tls(serde_json::json!({"mode": "DISABLE"})).is_none());
    assert!(tls(serde_json::json!({"mode": "ISTIO_MUTUAL"})).is_none(), "the sidecar's hop, made in process");
    match tls(serde_json::json!({"mode": "SIMPLE", "sni": "api.example"})) {
        Some(TlsOrigination::Ready { config, sni }) => {
            assert_eq!(sni.map(|sni| sni.to_str().into_owned()).as_deref(), Some("api.example"));
            assert_eq!(config.alpn_protocols, [b"http/1.1".to_vec()]);
        }
        other => panic!("the system's roots: {other:?}"),
    }
    let unusable = |json| match tls(json) {
        Some(TlsOrigination::Unusable(reason)) => reason,
        other => panic!("{other:?}"),
    };
    assert!(unusable(serde_json::json!({"mode": "SIMPLE", "caCertificates": "/nonexistent/ca.pem"}))
        .contains("/nonexistent/ca.pem"));
    assert!(unusable(serde_json::json!({"mode": "SIMPLE", "credentialName": "api-ca"})).contains("credentialName"));
    assert!(unusable(serde_json::json!({"mode": "MUTUAL"})).contains("clientCertificate"));
    assert!(unusable(serde_json::json!({"mode": "SIMPLE", "sni": "not a name"})).contains("sni \"not a name\""));
}

#[test]
fn connection_pool_fields_become_limits() {
    let settings: PolicySettings = serde_json::from_value(serde_json::json!({
        "connectionPool": {
            "tcp": {"maxConnections": 10, "connectTimeout": "250ms"},
            "http": {"http1MaxPendingRequests": 5, "http2MaxRequests": 50}
        },
        "loadBalancer": {"simple": "RANDOM"}
    }))
    .unwrap();
    assert_eq!(ClusterPolicy::compile(&settings, (false, false), &CredentialSource::default()).limits, Some((10, 5)));
    assert_eq!(ClusterPolicy::compile(&settings, (true, false), &CredentialSource::default()).limits, Some((50, 5)));
    assert_eq!(ClusterPolicy::compile(&settings, (false, false), &CredentialSource::default()).lb, LoadBalance::Random);
    assert_eq!(
        ClusterPolicy::compile(&settings, (false, false), &CredentialSource::default()).connect_timeout,
        Some(Duration::from_millis(250))
    );
    assert_eq!(
        ClusterPolicy::compile(&PolicySettings::default(), (false, false), &CredentialSource::default()),
        ClusterPolicy::default()
    );
    // HTTP/1.1 connection reuse: requests per connection (0: no limit) and the idle timeout (0s: Istio's hour).
    let reuse = |http: serde_json::Value| {
        let settings: PolicySettings =
            serde_json::from_value(serde_json::json!({"connectionPool": {"http": http}})).unwrap();
        let policy = ClusterPolicy::compile(&settings, (false, false), &CredentialSource::default());
        (policy.max_requests_per_connection, policy.http_idle_timeout)
    };
    let given = reuse(serde_json::json!({"maxRequestsPerConnection": 1, "idleTimeout": "30s"}));
    assert_eq!(given, (Some(1), Some(Duration::from_secs(30))));
    let off = reuse(serde_json::json!({"maxRequestsPerConnection": 0, "idleTimeout": "0s"}));
    assert_eq!(off, (None, Some(Duration::from_secs(3600))));
    // A TCP idle timeout; `0s` turns it off (kept as a century).
    let idle = |timeout: &str| {
        let settings: PolicySettings =
            serde_json::from_value(serde_json::json!({"connectionPool": {"tcp": {"idleTimeout": timeout}}})).unwrap();
        ClusterPolicy::compile(&settings, (false, false), &CredentialSource::default()).tcp_idle_timeout
    };
    assert_eq!(idle("90s"), Some(Duration::from_secs(90)));
    assert!(idle("0s").is_some_and(|never| never.as_secs() > 3_000_000_000));
}

#[test]
fn a_connections_lifetime_and_keepalive_are_read_and_keepalive_lays_over_the_meshs() {
    let settings: PolicySettings = serde_json::from_value(serde_json::json!({"connectionPool": {"tcp": {
        "maxConnectionDuration": "90s", "tcpKeepalive": {"time": "30s", "probes": 4}}}}))
    .unwrap();
    let policy = ClusterPolicy::compile(&settings, (false, false), &CredentialSource::default());
    assert_eq!(policy.max_connection_duration(), Some(Duration::from_secs(90)));
    let rule = Keepalive { time: Some(Duration::from_secs(30)), interval: None, probes: Some(4) };
    assert_eq!(policy.keepalive(), Some(rule));
    // Field by field: the rule's where it sets one, the mesh's elsewhere.
    let mesh =
        Keepalive { time: Some(Duration::from_secs(600)), interval: Some(Duration::from_secs(20)), probes: Some(9) };
    let layered =
        Keepalive { time: Some(Duration::from_secs(30)), interval: Some(Duration::from_secs(20)), probes: Some(4) };
    assert_eq!(Keepalive::layered(Some(mesh), Some(rule)), Some(layered));
    assert_eq!(Keepalive::layered(Some(mesh), None), Some(mesh));
    assert_eq!(Keepalive::layered(None, Some(rule)), Some(rule));
    assert_eq!(Keepalive::layered(None, None), None);
    // An empty `tcpKeepalive` still asks for keepalive, at the kernel's settings.
    let empty: PolicySettings =
        serde_json::from_value(serde_json::json!({"connectionPool": {"tcp": {"tcpKeepalive": {}}}})).unwrap();
    assert_eq!(
        ClusterPolicy::compile(&empty, (false, false), &CredentialSource::default()).keepalive(),
        Some(Keepalive::default())
    );
    assert_eq!(
        ClusterPolicy::compile(&PolicySettings::default(), (false, false), &CredentialSource::default()).keepalive(),
        None
    );
}

#[test]
fn max_retries_bounds_retries_in_flight_and_zero_is_no_bound() {
    let max = |n: u64| {
        let settings: PolicySettings =
            serde_json::from_value(serde_json::json!({"connectionPool": {"http": {"maxRetries": n}}})).unwrap();
        ClusterPolicy::compile(&settings, (false, false), &CredentialSource::default()).max_retries()
    };
    assert_eq!((max(3), max(0)), (Some(3), None));
    let state = Arc::new(ClusterState::new(None));
    let places: Vec<RetryPlace> = (0..3).filter_map(|_| state.retry(2)).collect();
    assert_eq!(places.len(), 2, "two in flight at most");
    drop(places);
    assert!(state.retry(2).is_some(), "given back when dropped");
}

#[test]
fn an_h2_upgrade_makes_the_cluster_speak_http2_and_offer_it_by_alpn() {
    let compile = |http: serde_json::Value, mesh_upgrade: bool| {
        let settings: PolicySettings = serde_json::from_value(serde_json::json!({
            "connectionPool": {"http": http}, "tls": {"mode": "SIMPLE"}}))
        .unwrap();
        ClusterPolicy::compile(&settings, (false, mesh_upgrade), &CredentialSource::default())
    };
    let alpn = |policy: &ClusterPolicy| match policy.tls.as_deref() {
        Some(TlsOrigination::Ready { config, .. }) => config.alpn_protocols.clone(),
        other => panic!("{other:?}"),
    };
    let (h2, http1) = (vec![b"h2".to_vec()], vec![b"http/1.1".to_vec()]);
    let upgrade = serde_json::json!({"h2UpgradePolicy": "UPGRADE"});
    let keep = serde_json::json!({"h2UpgradePolicy": "DO_NOT_UPGRADE"});
    let unset = serde_json::json!({});
    let (mesh, no_mesh) =
        (UpstreamDefaults { h2_upgrade: true, ..UpstreamDefaults::default() }, UpstreamDefaults::default());
    // (the rule's policy, the mesh's) → HTTP/2 on an HTTP port, on a TCP port; the ALPN offered.
    for (http, defaults, on_http, on_tcp, offered) in [
        (&upgrade, &no_mesh, true, true, &h2),
        (&upgrade, &mesh, true, true, &h2),
        (&keep, &mesh, false, false, &http1),
        (&unset, &mesh, true, false, &h2),
        (&unset, &no_mesh, false, false, &http1),
    ] {
        let policy = compile(http.clone(), defaults.h2_upgrade);
        let spoken = (defaults.speaks_http2(Some(&policy), true), defaults.speaks_http2(Some(&policy), false));
        assert_eq!(spoken, (on_http, on_tcp), "{http} under {defaults:?}");
        assert_eq!(&alpn(&policy), offered, "{http} under {defaults:?}");
    }
    // No rule: the mesh's alone.
    assert!(mesh.speaks_http2(None, true) && !mesh.speaks_http2(None, false) && !no_mesh.speaks_http2(None, true));
}
