//! The TLS ClientHello at the start of an intercepted connection, read without terminating TLS: its
//! `server_name` (SNI) says which host the client wants, as Envoy's `tls_inspector` reads it. The hello is
//! reassembled from as many records (and TCP segments) as it spans, and bounded in size.
//!
//! Written here rather than taken from a TLS library: rustls's `Acceptor` refuses hellos a server may well
//! accept (legacy versions, extensions it does not know the shape of) and says nothing of how many bytes it has
//! taken, and parsers of whole TLS streams do not reassemble a handshake message across records. What is needed
//! is one message's framing and one extension, each length checked against what holds it.

use std::borrow::Cow;

/// The largest ClientHello read, records and all (Envoy's `tls_inspector` default): past it the connection is
/// refused. Post-quantum key shares make hellos of 2–3 KiB; padding and ECH can take them to 16 KiB and more.
pub const MAX_CLIENT_HELLO: usize = 64 * 1024;

/// A TLS record's header: content type, version, length.
const RECORD_HEADER: usize = 5;
const HANDSHAKE_RECORD: u8 = 0x16;
const CLIENT_HELLO: u8 = 0x01;
/// The largest record plaintext TLS allows (2^14), and the slack TLS 1.2 allows a compressed one.
const MAX_RECORD: usize = (1 << 14) + 2048;
const SERVER_NAME: u16 = 0;
const HOST_NAME: u8 = 0;

/// What the bytes at the start of a connection hold.
#[derive(Debug, PartialEq, Eq)]
pub enum Hello {
    /// More bytes are needed to tell.
    Incomplete,
    /// A whole ClientHello; `len`: the bytes of the records that carry it, all of which are to be replayed.
    Complete { server_name: Option<String>, len: usize },
    /// Not a TLS handshake at all: decided as other TCP is.
    NotTls,
    /// A TLS handshake that breaks its own framing, or a hello past `MAX_CLIENT_HELLO`: refused.
    Malformed(&'static str),
}

/// Reads `bytes` (everything the client has sent so far) as the start of a TLS handshake.
pub fn parse(bytes: &[u8]) -> Hello {
    match bytes.first() {
        None => return Hello::Incomplete,
        Some(&HANDSHAKE_RECORD) => {}
        Some(_) => return Hello::NotTls,
    }
    // The handshake message, reassembled from the records' fragments (borrowed from the first while it is whole
    // there, as it nearly always is).
    let mut message: Cow<'_, [u8]> = Cow::Borrowed(&[]);
    let mut at = 0;
    loop {
        let Some(header) = bytes.get(at..at + RECORD_HEADER) else { return incomplete(bytes) };
        if header[0] != HANDSHAKE_RECORD {
            return Hello::Malformed("a record inside the ClientHello is not a handshake record");
        }
        // 3.0 (SSLv3) to 3.4: TLS 1.0 clients write 3.0 or 3.1 in the first record; TLS 1.3's is 3.1 too.
        if header[1] != 3 || header[2] > 4 {
            return Hello::Malformed("the record's version is not a TLS version");
        }
        let length = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if length == 0 || length > MAX_RECORD {
            return Hello::Malformed("a handshake record is empty or longer than TLS allows");
        }
        let Some(fragment) = bytes.get(at + RECORD_HEADER..at + RECORD_HEADER + length) else {
            return incomplete(bytes);
        };
        at += RECORD_HEADER + length;
        if message.is_empty() && fragment[0] != CLIENT_HELLO {
            return Hello::Malformed("the first handshake message is not a ClientHello");
        }
        if message.is_empty() {
            message = Cow::Borrowed(fragment);
        } else {
            message.to_mut().extend_from_slice(fragment);
        }
        if message.len() < 4 {
            continue;
        }
        let body_length = usize::from(message[1]) << 16 | usize::from(message[2]) << 8 | usize::from(message[3]);
        if 4 + body_length > MAX_CLIENT_HELLO {
            return Hello::Malformed("the ClientHello is larger than the gateway reads");
        }
        if message.len() < 4 + body_length {
            continue;
        }
        return match server_name(&message[4..4 + body_length]) {
            Ok(server_name) => Hello::Complete { server_name, len: at },
            Err(reason) => Hello::Malformed(reason),
        };
    }
}

fn incomplete(bytes: &[u8]) -> Hello {
    if bytes.len() >= MAX_CLIENT_HELLO {
        Hello::Malformed("the ClientHello is larger than the gateway reads")
    } else {
        Hello::Incomplete
    }
}

/// A cursor over a message that checks every length against what is left.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        if self.0.len() < n {
            return Err("a length in the ClientHello runs past its end");
        }
        let (taken, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(taken)
    }

    fn u8(&mut self) -> Result<u8, &'static str> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, &'static str> {
        let bytes = self.take(2)?;
        Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    /// A vector with a one- or two-byte length in front.
    fn vector(&mut self, length_bytes: usize) -> Result<Reader<'a>, &'static str> {
        let length = if length_bytes == 1 { usize::from(self.u8()?) } else { usize::from(self.u16()?) };
        Ok(Reader(self.take(length)?))
    }
}

/// The ClientHello body's `server_name`, when it has one.
fn server_name(body: &[u8]) -> Result<Option<String>, &'static str> {
    let mut hello = Reader(body);
    let _legacy_version = hello.u16()?;
    let _random = hello.take(32)?;
    if hello.vector(1)?.0.len() > 32 {
        return Err("the ClientHello's session id is longer than 32 bytes");
    }
    let suites = hello.vector(2)?;
    if suites.0.is_empty() || suites.0.len() % 2 != 0 {
        return Err("the ClientHello's cipher suites are not a list of suites");
    }
    if hello.vector(1)?.0.is_empty() {
        return Err("the ClientHello lists no compression method");
    }
    // A hello without extensions (TLS 1.0 clients may send one) names no server.
    if hello.0.is_empty() {
        return Ok(None);
    }
    let mut extensions = hello.vector(2)?;
    if !hello.0.is_empty() {
        return Err("bytes follow the ClientHello's extensions");
    }
    let mut found = None;
    // Told apart by sorting (a hello of 16 KiB may list thousands: no scan per extension).
    let mut kinds = Vec::with_capacity(32);
    while !extensions.0.is_empty() {
        let kind = extensions.u16()?;
        let mut data = extensions.vector(2)?;
        kinds.push(kind);
        if kind == SERVER_NAME {
            found = host_name(&mut data)?;
        }
    }
    kinds.sort_unstable();
    if kinds.windows(2).any(|pair| pair[0] == pair[1]) {
        return Err("the ClientHello repeats an extension");
    }
    Ok(found)
}

/// The `host_name` of a `server_name` extension: lowercased, a trailing dot dropped.
fn host_name(data: &mut Reader<'_>) -> Result<Option<String>, &'static str> {
    let mut names = data.vector(2)?;
    if !data.0.is_empty() {
        return Err("bytes follow the server_name list");
    }
    let mut host = None;
    while !names.0.is_empty() {
        let kind = names.u8()?;
        let name = names.vector(2)?.0;
        if kind != HOST_NAME {
            continue;
        }
        if host.is_some() {
            return Err("the server_name extension names two hosts");
        }
        let name = name.strip_suffix(b".").unwrap_or(name);
        let valid = |byte: &u8| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_');
        if name.is_empty() || name.len() > 253 || !name.iter().all(valid) {
            return Err("the server_name is not a host name");
        }
        host = Some(String::from_utf8_lossy(name).to_ascii_lowercase());
    }
    Ok(host)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// A ClientHello as rustls sends it, for `server_name`.
    fn client_hello(server_name: &str) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(server_name.to_owned()).unwrap();
        let mut client = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut bytes = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut bytes).unwrap();
        }
        bytes
    }

    /// The handshake message of a single-record hello, sent again as records of at most `size` bytes each.
    fn refragmented(hello: &[u8], size: usize) -> Vec<u8> {
        let message = &hello[RECORD_HEADER..];
        let mut out = Vec::new();
        for fragment in message.chunks(size) {
            out.extend_from_slice(&[HANDSHAKE_RECORD, 3, 1]);
            out.extend_from_slice(&(fragment.len() as u16).to_be_bytes());
            out.extend_from_slice(fragment);
        }
        out
    }

    /// A hello built by hand: the given extensions after a minimal body.
    fn hello_with_extensions(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.push(0);
        body.extend_from_slice(&[0, 2, 0x13, 0x01]);
        body.extend_from_slice(&[1, 0]);
        let mut list = Vec::new();
        for (kind, data) in extensions {
            list.extend_from_slice(&kind.to_be_bytes());
            list.extend_from_slice(&(data.len() as u16).to_be_bytes());
            list.extend_from_slice(data);
        }
        body.extend_from_slice(&(list.len() as u16).to_be_bytes());
        body.extend_from_slice(&list);
        let mut message = vec![CLIENT_HELLO];
        message.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        message.extend_from_slice(&body);
        let mut record = vec![HANDSHAKE_RECORD, 3, 1];
        record.extend_from_slice(&(message.len() as u16).to_be_bytes());
        record.extend_from_slice(&message);
        record
    }

    fn sni(name: &[u8]) -> Vec<u8> {
        let mut entry = vec![HOST_NAME];
        entry.extend_from_slice(&(name.len() as u16).to_be_bytes());
        entry.extend_from_slice(name);
        let mut data = (entry.len() as u16).to_be_bytes().to_vec();
        data.extend_from_slice(&entry);
        data
    }

    #[test]
    fn a_real_client_hello_names_its_server_and_every_shorter_prefix_asks_for_more() {
        let hello = client_hello("API.Example.com");
        let expected = Hello::Complete { server_name: Some("api.example.com".into()), len: hello.len() };
        assert_eq!(parse(&hello), expected);
        for end in 0..hello.len() {
            assert_eq!(parse(&hello[..end]), Hello::Incomplete, "{end} of {} bytes", hello.len());
        }
        let mut followed = hello.clone();
        followed.extend_from_slice(b"early data the upstream gets too");
        assert_eq!(parse(&followed), expected, "bytes after the hello are not the hello's");
    }

    #[test]
    fn a_hello_split_over_many_records_is_reassembled() {
        let hello = client_hello("api.example.com");
        for size in [1, 2, 3, 4, 5, 50, 200] {
            let split = refragmented(&hello, size);
            let expected = Hello::Complete { server_name: Some("api.example.com".into()), len: split.len() };
            assert_eq!(parse(&split), expected, "records of {size} bytes");
        }
        let split = refragmented(&hello, 7);
        for end in 0..split.len() {
            assert_eq!(parse(&split[..end]), Hello::Incomplete);
        }
    }

    #[test]
    fn a_hello_of_twenty_kilobytes_spans_two_records_and_is_read() {
        let padding = (21u16, vec![0; 20_000]);
        let hello = hello_with_extensions(&[(SERVER_NAME, sni(b"big.example.com")), padding.clone()]);
        // One record cannot hold it: sent as two, as a client must.
        let split = refragmented(&hello, 16_384);
        assert_eq!(parse(&split), Hello::Complete { server_name: Some("big.example.com".into()), len: split.len() });
        let huge = refragmented(&hello_with_extensions(&[(21, vec![0; 65_000]), padding]), 16_384);
        assert!(matches!(parse(&huge), Hello::Malformed(_)), "past the bound");
        assert!(matches!(parse(&huge[..16_389 * 2]), Hello::Malformed(_)), "known too large from its header");
    }

    #[test]
    fn hellos_without_a_server_name_and_streams_that_are_not_tls() {
        let none = hello_with_extensions(&[(10, vec![0, 2, 0, 29])]);
        assert_eq!(parse(&none), Hello::Complete { server_name: None, len: none.len() });
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Hello::NotTls);
        assert_eq!(parse(b"SSH-2.0-OpenSSH_9.2\r\n"), Hello::NotTls);
        // An SSLv2-compatible hello has no extensions, so no name: decided by address, as other TCP.
        assert_eq!(parse(&[0x80, 0x2e, 0x01, 0x03, 0x01]), Hello::NotTls);
        assert_eq!(parse(b""), Hello::Incomplete);
    }

    #[test]
    fn old_and_odd_hellos_are_read_as_tls_reads_them() {
        // A TLS 1.0 client's hello: record version 3.0, legacy version 3.1, and no extensions block at all.
        let mut body = vec![3, 1];
        body.extend_from_slice(&[9; 32]);
        body.extend_from_slice(&[0, 0, 2, 0x00, 0x2f, 1, 0]);
        let mut record = vec![HANDSHAKE_RECORD, 3, 0, 0, (4 + body.len()) as u8, CLIENT_HELLO, 0, 0, body.len() as u8];
        record.extend_from_slice(&body);
        assert_eq!(parse(&record), Hello::Complete { server_name: None, len: record.len() });
        // TLS 1.3 writes 3.1 in its first record too; a record claiming 3.4 is still TLS's framing.
        let mut newer = hello_with_extensions(&[(SERVER_NAME, sni(b"new.example.com"))]);
        newer[2] = 4;
        assert_eq!(parse(&newer), Hello::Complete { server_name: Some("new.example.com".into()), len: newer.len() });
        // Unknown extensions (ECH's outer hello, GREASE values) pass; the outer server_name is the one read.
        let ech = [(0xfe0d, vec![0; 200]), (0x0a0a, vec![]), (SERVER_NAME, sni(b"public.example.com"))];
        let outer = hello_with_extensions(&ech);
        assert_eq!(parse(&outer), Hello::Complete { server_name: Some("public.example.com".into()), len: outer.len() });
    }

    #[test]
    fn hellos_that_break_their_framing_are_malformed() {
        let good = hello_with_extensions(&[(SERVER_NAME, sni(b"a.example.com"))]);
        let malformed = |bytes: &[u8]| matches!(parse(bytes), Hello::Malformed(_));
        let mut alert_inside = refragmented(&good, 10);
        alert_inside[15] = 0x15;
        assert!(malformed(&alert_inside), "another record type inside the hello");
        let mut not_hello = good.clone();
        not_hello[5] = 2;
        assert!(malformed(&not_hello), "a ServerHello first");
        let mut version = good.clone();
        version[1] = 2;
        assert!(malformed(&version));
        let mut empty_record = good.clone();
        empty_record[3..5].copy_from_slice(&[0, 0]);
        assert!(malformed(&empty_record));
        assert!(malformed(&hello_with_extensions(&[(SERVER_NAME, sni(b"a b"))])), "not a host name");
        assert!(malformed(&hello_with_extensions(&[(SERVER_NAME, sni(b""))])));
        assert!(malformed(&hello_with_extensions(&[(SERVER_NAME, sni(b"a\0.example.com"))])));
        let twice = [(SERVER_NAME, sni(b"a.example.com")), (SERVER_NAME, sni(b"b.example.com"))];
        assert!(malformed(&hello_with_extensions(&twice)), "two server_name extensions");
        let repeated = [(10, vec![0, 2, 0, 29]), (SERVER_NAME, sni(b"a.example.com")), (10, vec![0, 2, 0, 23])];
        let repeated = hello_with_extensions(&repeated);
        assert_eq!(parse(&repeated), Hello::Malformed("the ClientHello repeats an extension"));
        // Thousands of distinct extensions (of types no one has registered) are no repetition.
        let mut many: Vec<(u16, Vec<u8>)> = (0..3000).map(|i| (0x4000 + i, vec![])).collect();
        many.push((SERVER_NAME, sni(b"many.example.com")));
        let many = refragmented(&hello_with_extensions(&many), 16_384);
        assert_eq!(parse(&many), Hello::Complete { server_name: Some("many.example.com".into()), len: many.len() });
        let mut overrun = sni(b"a.example.com");
        overrun[1] += 1;
        assert!(malformed(&hello_with_extensions(&[(SERVER_NAME, overrun)])), "a list longer than its extension");
        let trailing_dot = hello_with_extensions(&[(SERVER_NAME, sni(b"trailing.example.com."))]);
        assert_eq!(
            parse(&trailing_dot),
            Hello::Complete { server_name: Some("trailing.example.com".into()), len: trailing_dot.len() }
        );
    }

    #[test]
    fn no_bytes_make_it_panic() {
        let hello = client_hello("api.example.com");
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..20_000 {
            let mut bytes = hello.clone();
            for _ in 0..rng.usize(1..8) {
                let at = rng.usize(..bytes.len());
                bytes[at] = rng.u8(..);
            }
            bytes.truncate(rng.usize(..=bytes.len()));
            let _ = parse(&bytes);
            let mut noise = vec![HANDSHAKE_RECORD];
            noise.extend((0..rng.usize(..600)).map(|_| rng.u8(..)));
            let _ = parse(&noise);
        }
    }
}
