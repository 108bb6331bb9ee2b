use super::*;

struct Known;

impl Headers for Known {
    fn request(&self, name: &str) -> Option<&str> {
        request_headers(name)
    }

    fn response(&self, name: &str) -> Option<&str> {
        response_headers(name)
    }
}

fn request_headers(name: &str) -> Option<&'static str> {
    match name {
        ":method" => Some("GET"),
        ":path" => Some("/get?x=1"),
        ":authority" => Some("httpbin.org"),
        "user-agent" => Some("curl/7.88.1"),
        "x-request-id" => Some("4f1c2b9e-0000-4000-8000-000000000001"),
        "x-tenant" => Some("payments-team"),
        _ => None,
    }
}

fn response_headers(name: &str) -> Option<&'static str> {
    match name {
        "x-envoy-upstream-service-time" => Some("3"),
        "content-type" => Some("text/plain"),
        _ => None,
    }
}

fn known() -> Fields<'static> {
    Fields {
        // 2026-11-24T06:01:02.345678901Z
        start: Some(SystemTime::UNIX_EPOCH + Duration::new(1_795_500_062, 345_678_901)),
        headers: Some(&Known),
        response_code: 200,
        response_flags: "-",
        response_code_details: Some("via_upstream"),
        connection_termination_details: None,
        upstream_transport_failure_reason: None,
        bytes_received: 12,
        bytes_sent: 345,
        duration: Duration::from_millis(17),
        // The same as the header's text: either way the line says 3.
        upstream_service_time: Some(Duration::from_micros(3_400)),
        protocol: Some("HTTP/1.1"),
        upstream_host: Some("203.0.113.10:80".parse().unwrap()),
        upstream_cluster: Some(&"outbound|80||httpbin.org"),
        upstream_local: Some("10.240.2.1:40123".parse().unwrap()),
        downstream_local: Some("203.0.113.10:80".parse().unwrap()),
        downstream_remote: Some("10.240.1.2:51234".parse().unwrap()),
        server_name: Some("httpbin.org"),
        route_name: Some(&"default"),
        peer_uri_san: Some("spiffe://cluster.local/ns/apps/sa/client"),
    }
}

fn line(format: &str) -> String {
    Format::parse(format).unwrap_or_else(|e| panic!("{format}: {e}")).to_line(&known())
}

#[test]
fn every_operator_renders_a_known_request() {
    let cases = [
        ("%START_TIME%", "2026-11-24T06:01:02.345Z"),
        ("%START_TIME(%Y/%m/%d %H:%M:%S.%3f %z)%", "2026/11/24 06:01:02.345 +0000"),
        ("%START_TIME(%s.%6f)%", "1795500062.345678"),
        ("%START_TIME(%%%Z)%", "%UTC"),
        ("%REQ(:METHOD)% %REQ(:PATH)% %REQ(:AUTHORITY)%", "GET /get?x=1 httpbin.org"),
        ("%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%", "/get?x=1"),
        ("%REQ(USER-AGENT):4%", "curl"),
        ("%REQ(X-TENANT)% %REQ(X-ABSENT)%", "payments-team -"),
        ("%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% %RESP(CONTENT-TYPE)% %RESP(SERVER)%", "3 text/plain -"),
        ("%RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS%", "200 - via_upstream"),
        ("%CONNECTION_TERMINATION_DETAILS% %UPSTREAM_TRANSPORT_FAILURE_REASON%", "- -"),
        ("%BYTES_RECEIVED% %BYTES_SENT% %DURATION% %PROTOCOL%", "12 345 17 HTTP/1.1"),
        (
            "%UPSTREAM_HOST% %UPSTREAM_CLUSTER% %UPSTREAM_CLUSTER_RAW%",
            "203.0.113.10:80 outbound|80||httpbin.org outbound|80||httpbin.org",
        ),
        ("%UPSTREAM_LOCAL_ADDRESS% %UPSTREAM_LOCAL_ADDRESS_WITHOUT_PORT%", "10.240.2.1:40123 10.240.2.1"),
        ("%DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT%", "203.0.113.10:80 203.0.113.10"),
        ("%DOWNSTREAM_REMOTE_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%", "10.240.1.2:51234 10.240.1.2"),
        ("%DOWNSTREAM_DIRECT_REMOTE_ADDRESS%", "10.240.1.2:51234"),
        (
            "%REQUESTED_SERVER_NAME% %ROUTE_NAME% %DOWNSTREAM_PEER_URI_SAN%",
            "httpbin.org default spiffe://cluster.local/ns/apps/sa/client",
        ),
        ("plain text, no operator", "plain text, no operator"),
    ];
    for (format, expected) in cases {
        assert_eq!(line(format), expected, "{format}");
    }
    assert_eq!(line("%HOSTNAME%"), hostname());
    let istio = line(ISTIO_TEXT);
    assert_eq!(
        istio,
        "[2026-11-24T06:01:02.345Z] \"GET /get?x=1 HTTP/1.1\" 200 - via_upstream - \"-\" 12 345 17 3 \"-\" \
         \"curl/7.88.1\" \"4f1c2b9e-0000-4000-8000-000000000001\" \"httpbin.org\" \"203.0.113.10:80\" \
         outbound|80||httpbin.org 10.240.2.1:40123 203.0.113.10:80 10.240.1.2:51234 httpbin.org default\n"
    );
}

#[test]
fn a_failed_connection_renders_its_reasons() {
    let format =
        Format::parse("%RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% %UPSTREAM_TRANSPORT_FAILURE_REASON%");
    let refused = Fields {
        response_code_details: Some("upstream_reset_before_response_started{remote_connection_failure|delayed_connect_error:_Connection_refused}"),
        upstream_transport_failure_reason: Some("delayed_connect_error:_Connection_refused"),
        ..known()
    };
    assert_eq!(
        format.as_ref().unwrap().to_line(&refused),
        "upstream_reset_before_response_started{remote_connection_failure|delayed_connect_error:_Connection_refused} - \
         delayed_connect_error:_Connection_refused"
    );
    let denied = Fields {
        response_code_details: None,
        connection_termination_details: Some("rbac_access_denied_matched_policy[none]"),
        ..known()
    };
    assert_eq!(format.unwrap().to_line(&denied), "- rbac_access_denied_matched_policy[none] -");
}

#[test]
fn bad_formats_say_what_and_where() {
    let cases = [
        ("[%START_TIME%] %NOPE%", 15, "%NOPE% is not a command operator"),
        ("%REQ()%", 0, "needs a header"),
        ("ok %REQ(A", 3, "opens no command operator"),
        ("%DURATION(x)%", 0, "takes no argument"),
        ("a %% b", 2, "names no command operator"),
        ("%START_TIME(%Q)%", 0, "'%Q' is not a time field"),
        ("%REQ(A:B%", 0, "not closed"),
    ];
    for (format, position, reason) in cases {
        let error = Format::parse(format).expect_err(format);
        assert_eq!(error.position, position, "{format}: {error}");
        assert!(error.reason.contains(reason), "{format}: {error}");
    }
}

#[test]
fn a_format_lists_the_request_headers_it_needs_and_knows_its_numbers() {
    let format = Format::parse("%REQ(X-B)% %REQ(:PATH)% %REQ(X-A?X-B)% %RESP(X-C)%").unwrap();
    assert_eq!(format.request_headers(), ["x-a", "x-b"]);
    assert!(Format::parse("%RESPONSE_CODE%").unwrap().is_number());
    assert!(!Format::parse("%RESPONSE_CODE% ").unwrap().is_number());
    assert!(!Format::parse("%PROTOCOL%").unwrap().is_number());
}
