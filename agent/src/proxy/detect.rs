//! Protocol detection on intercepted connections: the first bytes tell an HTTP/1.x request line, the HTTP/2
//! prior-knowledge preface or a TLS handshake from anything else, without consuming them.
#![expect(
    unsafe_code,
    reason = "peeked bytes are read from socket2's uninitialised buffer once the kernel has written them"
)]

use std::time::Duration;

use tokio::{io::Interest, net::TcpStream};

/// How long a client that says nothing first (a server-first protocol) is waited for before its connection is
/// treated as plain TCP.
pub const DETECTION_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detected {
    Http(HttpVersion),
    /// A TLS handshake record: a ClientHello, decided by its server name.
    Tls,
    /// Anything else.
    Opaque,
}

/// The HTTP a client speaks: its connection is served by that protocol's server alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpVersion {
    /// A request line (HTTP/1.0 or 1.1).
    Http1,
    /// The HTTP/2 prior-knowledge preface.
    Http2,
}

/// A TLS record's first byte when it carries a handshake message: no HTTP method starts with it.
const TLS_HANDSHAKE: u8 = 0x16;
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";
const STARTS: [&[u8]; 10] =
    [b"GET ", b"POST ", b"PUT ", b"DELETE ", b"HEAD ", b"OPTIONS ", b"PATCH ", b"TRACE ", b"CONNECT ", PREFACE];

/// What `bytes` (the start of a stream) are; `None` while more are needed to tell.
pub fn classify(bytes: &[u8]) -> Option<Detected> {
    if bytes.first() == Some(&TLS_HANDSHAKE) {
        return Some(Detected::Tls);
    }
    let mut undecided = false;
    for start in STARTS {
        if bytes.len() >= start.len() {
            if bytes.starts_with(start) {
                let version = if start == PREFACE { HttpVersion::Http2 } else { HttpVersion::Http1 };
                return Some(Detected::Http(version));
            }
        } else if start.starts_with(bytes) {
            undecided = true;
        }
    }
    (!undecided).then_some(Detected::Opaque)
}

/// Peeks at the stream until its first bytes tell what it is; `None` if they have not within `timeout`. Woken
/// only when bytes arrive: a client that sends a request line a byte at a time costs a peek per byte, not a poll
/// every few milliseconds.
pub async fn detect(stream: &TcpStream, timeout: Duration) -> Option<Detected> {
    let sniff = async {
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 16];
        loop {
            if stream.readable().await.is_err() {
                return Detected::Opaque;
            }
            // Bytes that do not decide yet count as "nothing to read": the readiness is cleared, and the next wait
            // lasts until more arrive.
            let peeked = stream.try_io(Interest::READABLE, || {
                let n = socket2::SockRef::from(stream).peek(&mut buf)?;
                // SAFETY: `peek` initialised the first `n` bytes.
                let bytes = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n) };
                match (n, classify(bytes)) {
                    // Closed before saying anything: nothing to proxy, the relay sees the close.
                    (0, _) => Ok(Detected::Opaque),
                    (_, Some(detected)) => Ok(detected),
                    (_, None) => Err(std::io::ErrorKind::WouldBlock.into()),
                }
            });
            match peeked {
                Ok(detected) => return detected,
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => return Detected::Opaque,
            }
        }
    };
    tokio::time::timeout(timeout, sniff).await.ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_line_sent_in_pieces_is_detected_when_its_deciding_bytes_arrive() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        client.write_all(b"GE").await.unwrap();
        let detecting = tokio::spawn(async move { detect(&server, Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!detecting.is_finished(), "two bytes do not decide");
        client.write_all(b"T / HTTP/1.1\r\n").await.unwrap();
        assert_eq!(detecting.await.unwrap(), Some(Detected::Http(HttpVersion::Http1)));

        let mut silent = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        silent.write_all(b"PRI").await.unwrap();
        assert_eq!(detect(&server, Duration::from_millis(100)).await, None, "undecided within the timeout");
    }

    #[test]
    fn request_lines_and_the_http2_preface_are_http_a_handshake_record_tls_and_the_rest_is_opaque() {
        let cases: [(&[u8], Option<Detected>); 10] = [
            (b"GET / HTTP/1.1\r\n", Some(Detected::Http(HttpVersion::Http1))),
            (b"OPTIONS * HTTP/1.1", Some(Detected::Http(HttpVersion::Http1))),
            (b"PRI * HTTP/2.0\r\n\r\nSM", Some(Detected::Http(HttpVersion::Http2))),
            (b"\x16\x03\x01\x02\x00", Some(Detected::Tls)),
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
