//! Tests of upstreams.

use std::sync::atomic::{AtomicUsize, Ordering};

use http_body_util::{BodyExt, Empty};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{pool::PoolKey, *};
use crate::policy::clusters::Keepalive;

/// The test servers listen on loopback, which the proxy refuses unless allowed.
fn to_loopback() -> UpstreamSockets {
    let local = crate::proxy::local_destinations::LocalDestinations::new(
        vec!["127.0.0.0/8".parse().unwrap()],
        Default::default(),
    );
    UpstreamSockets::new(tcp::SourceAddresses::default(), Arc::new(local))
}

#[test]
fn a_response_moved_through_the_tries_is_its_head_and_a_pointer_to_its_body() {
    assert_eq!(std::mem::size_of::<UpstreamBody>(), 16);
    assert!(std::mem::size_of::<Response<UpstreamBody>>() <= 128);
}

/// What a test server answers each request with.
#[derive(Clone, Copy)]
enum Answer {
    /// `ok`, then the connection closes when `close` says so (as a server whose keep-alive timeout is short).
    Ok { close: bool },
    /// The request's head as it arrived.
    Head,
}

/// An HTTP/1.1 server on loopback answering every request as `answer` says. Counts connections.
async fn server(answer: Answer) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buffer = Vec::new();
                let mut chunk = [0u8; 1024];
                while let Ok(n) = stream.read(&mut chunk).await {
                    if n == 0 {
                        return;
                    }
                    buffer.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head: Vec<u8> = buffer.drain(..end + 4).collect();
                        let reply = match answer {
                            Answer::Ok { .. } => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
                            Answer::Head => {
                                let status = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", head.len());
                                [status.as_bytes(), &head].concat()
                            }
                        };
                        let _ = stream.write_all(&reply).await;
                        if let Answer::Ok { close: true } = answer {
                            return;
                        }
                    }
                }
            });
        }
    });
    (address, accepted)
}

#[test]
fn pooled_tls_connections_are_keyed_by_the_configuration_itself_not_its_address() {
    let config = || {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        Arc::new(config)
    };
    let server_name = Arc::new(rustls::pki_types::ServerName::try_from("api.example").unwrap());
    let address: SocketAddr = "203.0.113.10:443".parse().unwrap();
    let old = UpstreamTls { config: config(), server_name: server_name.clone() };
    let key = PoolKey::new(address, Some(&old));
    assert_eq!(key, PoolKey::new(address, Some(&old.clone())), "the same configuration finds its connections");

    let old_config = Arc::downgrade(&old.config);
    drop(old);
    assert!(old_config.upgrade().is_some(), "a pooled connection's key keeps its configuration alive");
    let new = UpstreamTls { config: config(), server_name };
    assert_ne!(key, PoolKey::new(address, Some(&new)), "a reloaded configuration never reuses the old connections");
    assert_ne!(key, PoolKey::new(address, None));
}

#[tokio::test]
async fn the_host_sent_is_the_authority_once_whatever_host_headers_the_client_sent() {
    let upstreams = Upstreams::new(to_loopback(), Http1Client::Native);
    let (address, _) = server(Answer::Head).await;
    let cases: [(&[&str], &str); 4] = [
        (&["pool.test"], "pool.test"),
        (&["other.test"], "pool.test"),
        (&["pool.test", "evil.test"], "pool.test"),
        (&[], "pool.test"),
    ];
    for (sent, expected) in cases {
        let mut headers = HeaderMap::new();
        for host in sent {
            headers.append(header::HOST, HeaderValue::from_str(host).unwrap());
        }
        let head = get(&upstreams, address, headers).await.to_ascii_lowercase();
        let hosts: Vec<&str> = head.lines().filter_map(|line| line.strip_prefix("host: ")).collect();
        assert_eq!(hosts, [expected], "client sent {sent:?}; upstream received {head}");
    }
}

/// `method` `/` for `pool.test` at `address`, with `headers` and no body.
async fn send(
    upstreams: &Upstreams,
    address: SocketAddr,
    http2: bool,
    method: Method,
    headers: HeaderMap,
) -> Result<Response<UpstreamBody>, SendError> {
    send_reusing(upstreams, address, http2, method, headers, Reuse::default()).await
}

/// As `send`, the connection reused as `reuse` says.
async fn send_reusing(
    upstreams: &Upstreams,
    address: SocketAddr,
    http2: bool,
    method: Method,
    headers: HeaderMap,
    reuse: Reuse,
) -> Result<Response<UpstreamBody>, SendError> {
    let outgoing = Outgoing {
        address,
        http2,
        authority: "pool.test",
        path_and_query: PathAndQuery::from_static("/"),
        method,
        headers,
        connect: Connect { within: Duration::from_secs(1), keepalive: None },
        tls: None,
        reuse,
    };
    upstreams.send(outgoing, Empty::new().map_err(|never| match never {}).boxed()).await
}

/// A GET of `/` for `pool.test` over HTTP/1.1 with `headers`: the response's body.
async fn get(upstreams: &Upstreams, address: SocketAddr, headers: HeaderMap) -> String {
    let response = send(upstreams, address, false, Method::GET, headers).await.expect("a response");
    String::from_utf8_lossy(&response.into_body().collect().await.unwrap().to_bytes()).into_owned()
}

#[tokio::test]
async fn an_http2_stream_the_upstream_refuses_is_told_from_other_failures() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (socket, _) = listener.accept().await.unwrap();
        let mut connection = h2::server::handshake(socket).await.unwrap();
        // The first stream is refused, the second reset as a failure after it was taken.
        for reason in [h2::Reason::REFUSED_STREAM, h2::Reason::INTERNAL_ERROR] {
            let Some(Ok((_, mut respond))) = connection.accept().await else { return };
            respond.send_reset(reason);
        }
        while connection.accept().await.is_some() {}
    });
    let upstreams = Upstreams::new(to_loopback(), Http1Client::Native);
    let mut outcomes = Vec::new();
    for _ in 0..2 {
        outcomes.push(match send(&upstreams, address, true, Method::POST, HeaderMap::new()).await {
            Err(SendError::Refused(_)) => "refused",
            Err(SendError::Request(_) | SendError::Protocol(_)) => "failed",
            Err(SendError::Connect(_) | SendError::LocalDestination(_)) => "not connected",
            Ok(_) => "answered",
        });
    }
    assert_eq!(outcomes, ["refused", "failed"]);
}

#[tokio::test]
async fn a_connection_is_reused_once_its_response_is_read_and_a_closed_one_is_passed_over() {
    for client in [Http1Client::Native, Http1Client::Hyper] {
        reused_and_passed_over(client).await;
    }
}

async fn reused_and_passed_over(client: Http1Client) {
    let upstreams = Upstreams::new(to_loopback(), client);
    let (address, accepted) = server(Answer::Ok { close: false }).await;
    for _ in 0..3 {
        assert_eq!(get(&upstreams, address, HeaderMap::new()).await, "ok");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "one connection carries every request in turn");

    let (address, accepted) = server(Answer::Ok { close: true }).await;
    for _ in 0..3 {
        assert_eq!(get(&upstreams, address, HeaderMap::new()).await, "ok");
        // The server's close reaches the pooled connection.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 3, "a connection the server closed is not used again");
    let key = PoolKey::new(address, None);
    let idle = upstreams.http1.idle.idle_count(&key) + upstreams.hyper_http1.idle.idle_count(&key);
    assert!(idle <= 1, "{client:?}: {idle} idle connections to a server that closes each");
}

#[tokio::test]
async fn a_destination_rules_connection_pool_limits_requests_per_connection_and_idle_time() {
    let upstreams = Upstreams::new(to_loopback(), Http1Client::Native);
    let (address, accepted) = server(Answer::Ok { close: false }).await;
    let get_reusing = |reuse: Reuse| {
        let upstreams = &upstreams;
        async move {
            let response = send_reusing(upstreams, address, false, Method::GET, HeaderMap::new(), reuse).await;
            let body = response.expect("a response").into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, "ok");
        }
    };
    // maxRequestsPerConnection: 2 — five requests take three connections.
    let two = Reuse { max_requests: Some(2), ..Reuse::default() };
    for _ in 0..5 {
        get_reusing(two).await;
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
    // maxRequestsPerConnection: 1 — none is given back: the first takes the one left idle above and closes it, the
    // second opens one of its own.
    let one = Reuse { max_requests: Some(1), ..Reuse::default() };
    for _ in 0..2 {
        get_reusing(one).await;
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 4);
    // idleTimeout: 50ms — a connection idle for longer is not reused (one idle for less is).
    let brief = Reuse { idle_timeout: Duration::from_millis(50), ..Reuse::default() };
    get_reusing(brief).await;
    get_reusing(brief).await;
    assert_eq!(accepted.load(Ordering::SeqCst), 5, "reused within its idle timeout");
    tokio::time::sleep(Duration::from_millis(200)).await;
    get_reusing(brief).await;
    assert_eq!(accepted.load(Ordering::SeqCst), 6, "not reused past its idle timeout");
    // maxConnectionDuration: 400ms — reused while it is younger, never after (however recently it was used).
    // (The connection left idle above opened at its request, 200 ms after the one before.)
    let short_lived = Reuse { lifetime: Some(Duration::from_millis(400)), ..Reuse::default() };
    for _ in 0..3 {
        get_reusing(short_lived).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 6, "reused within its lifetime");
    tokio::time::sleep(Duration::from_millis(300)).await;
    get_reusing(short_lived).await;
    assert_eq!(accepted.load(Ordering::SeqCst), 7, "not reused past its lifetime");
}

#[tokio::test]
async fn an_http2_connection_past_its_lifetime_takes_no_new_stream() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = accepted.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let Ok(mut connection) = h2::server::handshake(socket).await else { return };
                while let Some(Ok((_, mut respond))) = connection.accept().await {
                    let _ = respond.send_response(http::Response::new(()), true);
                }
            });
        }
    });
    let upstreams = Upstreams::new(to_loopback(), Http1Client::Native);
    let reuse = Reuse { lifetime: Some(Duration::from_millis(300)), ..Reuse::default() };
    let ask = || send_reusing(&upstreams, address, true, Method::GET, HeaderMap::new(), reuse);
    for _ in 0..3 {
        assert_eq!(ask().await.expect("an answer").status(), 200);
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "one connection multiplexes them");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(ask().await.expect("an answer").status(), 200);
    assert_eq!(accepted.load(Ordering::SeqCst), 2, "a new connection past the first's lifetime");
}

#[tokio::test]
async fn upstream_sockets_keep_alive_as_the_settings_say() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let keepalive =
        Keepalive { time: Some(Duration::from_secs(7)), interval: Some(Duration::from_secs(3)), probes: Some(4) };
    let within = Duration::from_secs(1);
    let kept = tcp::connect(address, &to_loopback(), Connect { within, keepalive: Some(keepalive) }).await.unwrap();
    let socket = socket2::SockRef::from(&kept);
    assert!(socket.keepalive().unwrap());
    let read = (socket.tcp_keepalive_time().unwrap(), socket.tcp_keepalive_interval().unwrap());
    assert_eq!(read, (Duration::from_secs(7), Duration::from_secs(3)));
    assert_eq!(socket.tcp_keepalive_retries().unwrap(), 4);
    // Unset, the socket keeps the kernel's default: no keepalive.
    let plain = tcp::connect(address, &to_loopback(), Connect { within, keepalive: None }).await.unwrap();
    assert!(!socket2::SockRef::from(&plain).keepalive().unwrap());
}
