//! The least an HTTP/1.1 proxy built on Sluice's stack can do: hyper's server and client on one tokio thread,
//! with Sluice's allocator, forwarding every request as it came to one origin over kept-alive connections.
//! No routing, registry, headers, retries or telemetry. The bench runs it beside Sluice to tell what the stack
//! costs from what Sluice adds.
//!
//! `hyper-forwarder LISTEN ORIGIN [CERT KEY]` (two socket addresses; with a certificate chain and its key, PEM
//! files, TLS is terminated first with rustls, configured as Sluice's Gateway servers are: TLS 1.3 and 1.2, one
//! session ticket per handshake).

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt};
use hyper::{
    body::{Body, Frame, Incoming, SizeHint},
    client::conn::http1::SendRequest,
    Request, Response,
};
use hyper_util::rt::{TokioIo, TokioTimer};

#[global_allocator]
static ALLOCATOR: sluice_agent::allocator::Allocator = sluice_agent::allocator::Allocator;

type Error = Box<dyn std::error::Error + Send + Sync>;
type Forwarded = BoxBody<Bytes, Error>;

/// Idle connections to the origin: a request takes the last given back.
struct Pool {
    origin: SocketAddr,
    idle: Mutex<Vec<SendRequest<Incoming>>>,
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1).map(|arg| arg.parse::<SocketAddr>());
    let (Some(Ok(listen)), Some(Ok(origin))) = (args.next(), args.next()) else {
        anyhow::bail!("usage: hyper-forwarder LISTEN ORIGIN [CERT KEY] (socket addresses, PEM files)");
    };
    let files: Vec<String> = std::env::args().skip(3).collect();
    let tls = match files.as_slice() {
        [] => None,
        [cert, key] => Some(tokio_rustls::TlsAcceptor::from(Arc::new(server_config(cert, key)?))),
        _ => anyhow::bail!("usage: hyper-forwarder LISTEN ORIGIN [CERT KEY] (socket addresses, PEM files)"),
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("listening on {listen}"))?;
        let pool = Arc::new(Pool { origin, idle: Mutex::default() });
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let (pool, tls) = (pool.clone(), tls.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let pool = pool.clone();
                    async move {
                        let response = pool.forward(request).await.unwrap_or_else(|_| {
                            let mut failed = Response::new(http_body_util::Empty::new().map_err(Error::from).boxed());
                            *failed.status_mut() = hyper::StatusCode::BAD_GATEWAY;
                            failed
                        });
                        Ok::<_, std::convert::Infallible>(response)
                    }
                });
                let server = hyper::server::conn::http1::Builder::new().writev(false).timer(TokioTimer::new()).clone();
                let _ = match tls {
                    None => server.serve_connection(TokioIo::new(stream), service).await,
                    Some(tls) => match tls.accept(stream).await {
                        Ok(stream) => server.serve_connection(TokioIo::new(stream), service).await,
                        Err(_) => return,
                    },
                };
            });
        }
    })
}

/// A server configuration as Sluice's Gateway servers have (`policy/tls_servers.rs`): the chain and key, sessions
/// resumed from tickets, one ticket per handshake.
fn server_config(cert: &str, key: &str) -> anyhow::Result<rustls::ServerConfig> {
    use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(key)?;
    let mut config =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
    config.ignore_client_order = true;
    config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()?;
    config.send_tls13_tickets = 1;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

impl Pool {
    async fn forward(self: Arc<Self>, request: Request<Incoming>) -> anyhow::Result<Response<Forwarded>> {
        let taken = self.idle.lock().unwrap_or_else(PoisonError::into_inner).pop();
        let mut sender = match taken {
            Some(sender) if !sender.is_closed() => sender,
            _ => {
                let stream = tokio::net::TcpStream::connect(self.origin).await?;
                let _ = stream.set_nodelay(true);
                let (sender, connection) =
                    hyper::client::conn::http1::Builder::new().writev(false).handshake(TokioIo::new(stream)).await?;
                tokio::spawn(connection);
                sender
            }
        };
        sender.ready().await?;
        let response = sender.send_request(request).await?;
        let (parts, body) = response.into_parts();
        let body = Returning { body, sender: Some(sender), pool: self };
        Ok(Response::from_parts(parts, body.boxed()))
    }
}

/// A response body that gives its connection back to the pool once read to the end.
struct Returning {
    body: Incoming,
    sender: Option<SendRequest<Incoming>>,
    pool: Arc<Pool>,
}

impl Body for Returning {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let polled = Pin::new(&mut self.body)
            .poll_frame(cx)
            .map(|frame| frame.map(|frame| frame.map_err(|error| Box::new(error) as Error)));
        if self.body.is_end_stream() {
            if let Some(sender) = self.sender.take() {
                self.pool.idle.lock().unwrap_or_else(PoisonError::into_inner).push(sender);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
