//! Protocol detection on intercepted connections: the first bytes tell an HTTP/1.x request line or the HTTP/2
//! prior-knowledge preface from anything else, without consuming them.

use std::time::Duration;

use tokio::net::TcpStream;

/// How long a client that says nothing first (a server-first protocol) is waited for before its connection is
/// treated as plain TCP.
pub const DETECTION_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detected {
    /// HTTP/1.x or HTTP/2 with prior knowledge.
    Http,
    /// Anything else, or nothing within the timeout.
    Opaque,
}

const STARTS: [&[u8]; 10] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
    b"CONNECT ",
    b"PRI * HTTP/2.0\r\n",
];

/// What `bytes` (the start of a stream) are; `None` while more are needed to tell.
pub fn classify(bytes: &[u8]) -> Option<Detected> {
    let mut undecided = false;
    for start in STARTS {
        if bytes.len() >= start.len() {
            if bytes.starts_with(start) {
                return Some(Detected::Http);
            }
        } else if start.starts_with(bytes) {
            undecided = true;
        }
    }
    (!undecided).then_some(Detected::Opaque)
}

/// Peeks at the stream until its first bytes tell what it is, or the timeout passes.
pub async fn detect(stream: &TcpStream, timeout: Duration) -> Detected {
    let sniff = async {
        let mut buf = [0u8; 16];
        loop {
            match stream.peek(&mut buf).await {
                // Closed before saying anything: nothing to proxy, the relay sees the close.
                Ok(0) | Err(_) => return Detected::Opaque,
                Ok(n) => {
                    if let Some(detected) = classify(&buf[..n]) {
                        return detected;
                    }
                    // Part of a request line: the rest is in flight.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        }
    };
    tokio::time::timeout(timeout, sniff).await.unwrap_or(Detected::Opaque)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_and_the_http2_preface_are_http_and_the_rest_is_opaque() {
        let cases: [(&[u8], Option<Detected>); 10] = [
            (b"GET / HTTP/1.1\r\n", Some(Detected::Http)),
            (b"OPTIONS * HTTP/1.1", Some(Detected::Http)),
            (b"PRI * HTTP/2.0\r\n\r\nSM", Some(Detected::Http)),
            (b"\x16\x03\x01\x02\x00", Some(Detected::Opaque)),
            (b"SSH-2.0-OpenSSH", Some(Detected::Opaque)),
            (b"GETX", Some(Detected::Opaque)),
            (b"get / HTTP/1.1", Some(Detected::Opaque)),
            (b"GE", None),
            (b"PRI * HT", None),
            (b"", None),
        ];
        for (bytes, expected) in cases {
            assert_eq!(classify(bytes), expected, "{:?}", String::from_utf8_lossy(bytes));
        }
    }
}
