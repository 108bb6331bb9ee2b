//! TLS terminated at the gateway, for Gateway servers with `tls.mode` SIMPLE or MUTUAL: the ClientHello is read
//! (as for TLS passed through, bounded by size and by the request headers timeout), its server name picks the
//! server — its certificate, whether a client certificate is required and which names it must carry — the
//! handshake completes within the same deadline, and the server's HTTP routes serve the requests inside. A name no
//! terminating server takes goes to the port's PASSTHROUGH servers, if it has any, as Envoy's filter chains do.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Instant, SystemTime},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    time::timeout_at,
};

use super::{
    detect::HttpVersion,
    http::{Connection, HttpProxy},
    l4, tcp,
};
use crate::{
    policy::tls_servers::{choose, one_of, subject_alt_names},
    telemetry::requests::{ConnectionSecurity, Principal},
};

/// Serves a connection accepted on a Gateway port with servers terminating TLS.
pub async fn serve(mut stream: TcpStream, connection: Connection, proxy: Arc<HttpProxy>) {
    // Past --max-memory no handshake is begun.
    if proxy.sheds("connection") {
        super::tcp::reset(&stream);
        return;
    }
    let clock = (SystemTime::now(), Instant::now());
    let deadline = tokio::time::Instant::now() + proxy.request_headers_timeout();
    let port = connection.local.port();
    let telemetry = proxy.telemetry();
    let mut hello = Vec::new();
    let server_name = match l4::read_client_hello(&mut stream, proxy.request_headers_timeout(), &mut hello).await {
        Ok(server_name) => server_name,
        Err(refused) => {
            telemetry.tls_handshake_failed(refused.label());
            tcp::reset(&stream);
            return;
        }
    };
    let (config, mutual, required_names, pins, opaque) = {
        let policy = proxy.policy();
        let Some(server) = choose(policy.tls_servers_on(port), server_name.as_deref()) else {
            if policy.tls_gateways_on(port).next().is_some() {
                drop(policy);
                let (peer, local) = (connection.peer, connection.local);
                let arrival = l4::Arrival::Gateway(port);
                l4::serve_tls_read(stream, (peer, local), (&hello, server_name), arrival, &proxy, clock).await;
                return;
            }
            tracing::debug!(peer = %connection.peer, port, sni = server_name.as_deref().unwrap_or("-"), "no Gateway server takes the name");
            telemetry.tls_handshake_failed("no_server");
            tcp::reset(&stream);
            return;
        };
        match &server.config {
            Ok(config) => {
                let names = server.subject_alt_names.clone();
                (config.clone(), server.mutual, names, server.pins.clone(), server.opaque)
            }
            Err(reason) => {
                tracing::warn!(server = %server.name, %reason, "a Gateway server's TLS settings cannot be used: its connections are closed");
                telemetry.tls_handshake_failed("unusable_server");
                tcp::reset(&stream);
                return;
            }
        }
    };
    let accepting = tokio_rustls::TlsAcceptor::from(config).accept(Replayed::new(hello, stream));
    let tls = match timeout_at(deadline, accepting).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            let reason = handshake_failure(&error);
            tracing::debug!(peer = %connection.peer, port, %error, reason, "TLS handshake failed");
            telemetry.tls_handshake_failed(reason);
            return;
        }
        Err(_) => {
            telemetry.tls_handshake_failed("timeout");
            return;
        }
    };
    let session = tls.get_ref().1;
    let leaf = session.peer_certificates().and_then(|chain| chain.first());
    // The names the client's certificate is issued for, read once: for subjectAltNames and the principal.
    let names = leaf.map(subject_alt_names).unwrap_or_default();
    if mutual && (leaf.is_none() || !one_of(&required_names, &names)) {
        tracing::debug!(peer = %connection.peer, port, "the client certificate carries none of the server's subjectAltNames");
        telemetry.tls_handshake_failed("client_certificate_name");
        return;
    }
    // Pinned: a certificate that was presented must be one of them (OPTIONAL_MUTUAL's absent one is let be).
    if leaf.is_some_and(|leaf| !pins.admit(leaf)) {
        tracing::debug!(peer = %connection.peer, port, "the client certificate matches none of the server's pins");
        telemetry.tls_handshake_failed("client_certificate_pin");
        return;
    }
    if opaque {
        // A TLS server: the bytes inside go where the Gateway's tcp routes say, decided knowing who the client is.
        let (peer, local) = (connection.peer, connection.local);
        let principal = Principal::from_names(&names);
        let client = l4::Terminated { principal: principal.as_ref(), server_name: server_name.as_deref() };
        l4::serve_tcp(tls, (peer, local), l4::Arrival::Gateway(port), &proxy, client).await;
        return;
    }
    let http2 = matches!(session.alpn_protocol(), Some(b"h2" | b"istio-h2"));
    let version = if http2 { HttpVersion::Http2 } else { HttpVersion::Http1 };
    let security = if leaf.is_some() { ConnectionSecurity::MutualTls } else { ConnectionSecurity::Tls };
    let principal = Principal::from_names(&names).map(Arc::new);
    let server_name = server_name.map(Arc::from);
    proxy.serve_connection(tls, Connection { security, principal, server_name, ..connection }, version).await;
}

/// Why a handshake failed, as a label: the client's certificate missing or refused, else the handshake itself.
fn handshake_failure(error: &io::Error) -> &'static str {
    match error.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::NoCertificatesPresented) => "no_client_certificate",
        Some(rustls::Error::InvalidCertificate(_)) => "bad_client_certificate",
        _ => "handshake",
    }
}

impl l4::ClientStream for tokio_rustls::server::TlsStream<Replayed> {
    fn reset(&self) {
        tcp::reset(&self.get_ref().0.stream);
    }
}

/// A stream whose first bytes — the ClientHello, read to choose the server — are given back before the socket's.
struct Replayed {
    read: Vec<u8>,
    /// How much of `read` has been given back.
    given: usize,
    stream: TcpStream,
}

impl Replayed {
    fn new(read: Vec<u8>, stream: TcpStream) -> Replayed {
        Replayed { read, given: 0, stream }
    }
}

impl AsyncRead for Replayed {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.given < self.read.len() {
            let left = &self.read[self.given..];
            let n = left.len().min(buf.remaining());
            buf.put_slice(&left[..n]);
            self.given += n;
            if self.given == self.read.len() {
                self.read = Vec::new();
                self.given = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Replayed {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    // rustls hands over each TLS record as a buffer of its own: written together, a handshake's flight (server
    // hello, certificate, finished) is one system call and one segment, not one per record.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
