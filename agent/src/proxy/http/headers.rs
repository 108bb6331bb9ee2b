//! The headers the proxy takes away and adds: hop-by-hop ones, `x-forwarded-for`, `x-request-id`,
//! `x-envoy-upstream-service-time`.

use super::*;

/// Headers that describe one hop, never forwarded (RFC 9110, 7.6.1). `Trailer` is end to end: it announces the
/// trailer fields, and an HTTP/1.1 client is sent only those.
pub(super) const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::UPGRADE,
    // An h2c upgrade's settings are the connection's (RFC 9113 §3.2).
    HeaderName::from_static("http2-settings"),
];

/// `x-envoy-upstream-service-time` for `ms`: the values below a second made once, and shared.
pub(super) fn service_time_value(ms: u64) -> HeaderValue {
    static BELOW_A_SECOND: std::sync::LazyLock<Box<[HeaderValue]>> =
        std::sync::LazyLock::new(|| (0..1000u64).map(HeaderValue::from).collect());
    usize::try_from(ms).ok().and_then(|ms| BELOW_A_SECOND.get(ms)).cloned().unwrap_or_else(|| HeaderValue::from(ms))
}

/// The first value of each of `names` in `headers`, found in one pass over them: a hashed lookup per name costs
/// more than comparing the handful of names most requests carry (a standard name against a custom one is one
/// comparison of tags).
pub(super) fn first_values<const N: usize>(headers: &HeaderMap, names: [&HeaderName; N]) -> [Option<HeaderValue>; N] {
    let mut found = [const { None }; N];
    for (name, value) in headers {
        if let Some(slot) = names.iter().position(|wanted| *wanted == name).and_then(|i| found.get_mut(i)) {
            slot.get_or_insert_with(|| value.clone());
        }
    }
    found
}

pub(super) fn header_text(headers: &HeaderMap, name: impl header::AsHeaderName) -> Option<String> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names finds which are present (most messages carry none, or only `Connection`), so only
    // those are removed.
    let mut present = 0u8;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|hop| hop == name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    // Headers the Connection header names are hop-by-hop too. Its usual options (`close`, `keep-alive`) name none
    // that is not removed anyway: a Connection header of one of them alone, most messages', is not split.
    let names_nothing = |option: &[u8]| {
        option.eq_ignore_ascii_case(b"close")
            || HOP_BY_HOP.iter().any(|hop| hop.as_str().as_bytes().eq_ignore_ascii_case(option))
    };
    if !headers.get_all(header::CONNECTION).iter().all(|value| names_nothing(value.as_bytes())) {
        let named: SmallVec<[HeaderName; 2]> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|option| !names_nothing(option.as_bytes()))
            .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for (i, hop) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(hop);
        }
    }
}

/// Whether the client says it accepts trailers (`TE: trailers`).
pub(super) fn accepts_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|coding| coding.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("trailers"))
}

pub(super) fn append_forwarded_for(headers: &mut HeaderMap, peer: SocketAddr) {
    let mut address = SmallVec::new();
    write_ip(&mut address, peer.ip());
    // Made to its exact length, the bytes become the header's without a copy or a second allocation; the entry
    // hashes the name once for the read and the write.
    let appended = |existing: &[u8]| {
        let separator: &[u8] = if existing.is_empty() { b"" } else { b", " };
        HeaderValue::from_maybe_shared(Bytes::from([existing, separator, &address].concat())).ok()
    };
    match headers.entry(X_FORWARDED_FOR) {
        http::header::Entry::Occupied(mut entry) => {
            let existing = entry.get().to_str().map_or(&b""[..], str::as_bytes);
            if let Some(value) = appended(existing) {
                entry.insert(value);
            }
        }
        http::header::Entry::Vacant(entry) => {
            if let Some(value) = appended(b"") {
                entry.insert(value);
            }
        }
    }
}

/// `ip` as text. An IPv4 address is written digit by digit: through `fmt` its four numbers cost 1.3k of the 40k
/// instructions a terminated HTTPS request takes (bench/README.md).
fn write_ip(into: &mut SmallVec<[u8; 40]>, ip: std::net::IpAddr) {
    match ip {
        std::net::IpAddr::V4(v4) => {
            for (index, octet) in v4.octets().into_iter().enumerate() {
                if index > 0 {
                    into.push(b'.');
                }
                if octet >= 100 {
                    into.push(b'0' + octet / 100);
                }
                if octet >= 10 {
                    into.push(b'0' + octet / 10 % 10);
                }
                into.push(b'0' + octet % 10);
            }
        }
        std::net::IpAddr::V6(v6) => into.extend_from_slice(v6.to_string().as_bytes()),
    }
}

/// A random UUID (version 4), as Envoy generates `x-request-id`, written in place.
pub(super) fn request_id() -> [u8; 36] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bits = (fastrand::u128(..) & !(0xf000 << 64) & !(0xc000 << 48)) | (0x4000 << 64) | (0x8000 << 48);
    let mut id = [b'-'; 36];
    for (byte, places) in bits.to_be_bytes().into_iter().zip(DIGIT_PLACES.chunks_exact(2)) {
        id[places[0] as usize] = HEX[(byte >> 4) as usize];
        id[places[1] as usize] = HEX[(byte & 0xf) as usize];
    }
    id
}

/// Where a UUID's 32 hexadecimal digits stand: every place but the dashes' (8, 13, 18, 23), worked out at compile
/// time rather than per request.
const DIGIT_PLACES: [u8; 32] = {
    let mut places = [0; 32];
    let (mut digit, mut place) = (0, 0);
    while digit < 32 {
        if matches!(place, 8 | 13 | 18 | 23) {
            place += 1;
        }
        places[digit] = place;
        digit += 1;
        place += 1;
    }
    places
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_written_as_their_display_writes_them() {
        let addresses = ["0.0.0.0", "10.0.0.1", "192.168.100.9", "255.255.255.255", "1.20.255.99", "::1", "fd00::5"];
        for address in addresses {
            let ip: std::net::IpAddr = address.parse().unwrap();
            let mut written = SmallVec::new();
            write_ip(&mut written, ip);
            assert_eq!(std::str::from_utf8(&written).unwrap(), ip.to_string());
        }
        for octet in 0..=255u8 {
            let ip = std::net::IpAddr::from([octet, 255 - octet, octet / 3, 7]);
            let mut written = SmallVec::new();
            write_ip(&mut written, ip);
            assert_eq!(std::str::from_utf8(&written).unwrap(), ip.to_string());
        }
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_not_forwarded() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut map = HeaderMap::new();
            for (name, value) in pairs {
                map.append(HeaderName::from_static(name), HeaderValue::from_static(value));
            }
            map
        };
        let mut message = headers(&[
            ("connection", "keep-alive, X-Session-Token"),
            ("connection", "close, Upgrade"),
            ("keep-alive", "timeout=5"),
            ("x-session-token", "secret"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("trailer", "x-checksum"),
            ("x-kept", "1"),
        ]);
        strip_hop_by_hop(&mut message);
        assert_eq!(message, headers(&[("trailer", "x-checksum"), ("x-kept", "1")]));

        // The usual Connection header alone (not split for names) goes, with what it governs.
        let mut message = headers(&[("connection", "Keep-Alive"), ("keep-alive", "timeout=5"), ("x-kept", "1")]);
        strip_hop_by_hop(&mut message);
        assert_eq!(message, headers(&[("x-kept", "1")]));

        let end_to_end = headers(&[("content-type", "text/plain"), ("x-kept", "1"), ("x-kept", "2")]);
        let mut message = end_to_end.clone();
        strip_hop_by_hop(&mut message);
        assert_eq!(message, end_to_end);
    }

    #[test]
    fn request_ids_are_version_4_uuids() {
        let id = String::from_utf8(request_id().to_vec()).unwrap();
        assert_eq!(id.len(), 36);
        assert_eq!(id.matches('-').count(), 4);
        assert!(id.split('-').map(str::len).eq([8, 4, 4, 4, 12]), "{id}");
        assert!(id.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit()), "{id}");
        assert_ne!(request_id(), request_id());
        assert_eq!(&id[14..15], "4", "{id}");
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"), "{id}");
    }

    #[test]
    fn the_first_value_of_each_name_is_found_in_one_pass() {
        let mut headers = HeaderMap::new();
        headers.append(header::HOST, HeaderValue::from_static("api.example.com"));
        headers.append("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        headers.append("x-forwarded-for", HeaderValue::from_static("10.0.0.2"));
        headers.append("x-forwarded-fox", HeaderValue::from_static("not this one"));
        let forwarded = HeaderName::from_static("x-forwarded-for");
        let [user_agent, forwarded_for, host] =
            first_values(&headers, [&header::USER_AGENT, &forwarded, &header::HOST]);
        assert_eq!(user_agent, None);
        assert_eq!(forwarded_for.unwrap(), "10.0.0.1");
        assert_eq!(host.unwrap(), "api.example.com");
    }

    #[test]
    fn upstream_service_times_are_written_in_milliseconds_whatever_their_size() {
        for ms in [0, 7, 999, 1000, 86_400_000] {
            assert_eq!(service_time_value(ms), ms.to_string().as_str());
        }
    }
}
