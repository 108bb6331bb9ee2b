//! Sluice's own HTTP/1.1 upstream connections against origins that answer in every framing HTTP/1.1 has, against
//! one that breaks each framing rule (a compromised or buggy origin, or a workload's own server reached through
//! passthrough), and against HAProxy as an origin: what reaches the client, what is refused (502 `UPE`, as Envoy
//! refuses it), and that a connection is reused only when nothing of an exchange is left on it.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use sluice_tests::{
    http::get,
    istio::{self, HTTPBIN, MESH_REGISTRY_ONLY},
    metrics::total,
    peers::{curl, wait_for_tcp},
    process::Process,
    require_root,
    topology::{addr, GATEWAY_WORKLOAD_IFACE, SERVER_A},
    Agent, Netns, Topology,
};

/// What the origin does once it has written an answer.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Then {
    KeepOpen,
    Close,
    /// Waits, then writes these bytes too (a response nobody asked for), and keeps the connection open.
    Later(&'static [u8]),
}

/// An origin answering each request line (`METHOD PATH`) with scripted bytes. `POST /echo` answers how many body
/// bytes arrived (by Content-Length or chunked). Counts connections and records request lines.
struct RawOrigin {
    connections: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl RawOrigin {
    fn start(netns: &Netns, at: SocketAddr, answers: Vec<(&'static str, Vec<u8>, Then)>) -> RawOrigin {
        let listener = netns.enter(|| std::net::TcpListener::bind(at)).unwrap().unwrap();
        listener.set_nonblocking(true).unwrap();
        let (connections, requests, stop) = Default::default();
        let origin = RawOrigin { connections, requests, stop };
        let (counted, recorded, stopped) = (origin.connections.clone(), origin.requests.clone(), origin.stop.clone());
        let answers = Arc::new(answers);
        std::thread::spawn(move || {
            while !stopped.load(Ordering::SeqCst) {
                let Ok((stream, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let connection = counted.fetch_add(1, Ordering::SeqCst) + 1;
                let (answers, recorded) = (answers.clone(), recorded.clone());
                std::thread::spawn(move || serve(stream, connection, &answers, &recorded));
            }
        });
        origin
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Each request line received, with the number of the connection it came on.
    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for RawOrigin {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn serve(
    mut stream: TcpStream,
    connection: usize,
    answers: &[(&'static str, Vec<u8>, Then)],
    recorded: &Mutex<Vec<String>>,
) {
    stream.set_nonblocking(false).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buffer = Vec::new();
    loop {
        let Some(end) = read_until(&mut stream, &mut buffer, b"\r\n\r\n") else { return };
        let head = String::from_utf8_lossy(&buffer[..end]).into_owned();
        buffer.drain(..end + 4);
        let line = head.lines().next().unwrap_or_default().to_owned();
        let header = |name: &str| {
            head.lines().skip(1).find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
            })
        };
        let mut body = 0;
        if let Some(length) = header("content-length").and_then(|l| l.parse::<usize>().ok()) {
            while buffer.len() < length {
                if !fill(&mut stream, &mut buffer) {
                    return;
                }
            }
            buffer.drain(..length);
            body = length;
        } else if header("transfer-encoding").is_some_and(|te| te.eq_ignore_ascii_case("chunked")) {
            let Some(end) = read_until(&mut stream, &mut buffer, b"0\r\n\r\n") else { return };
            body = decode_chunked_length(&buffer[..end + 5]);
            buffer.drain(..end + 5);
        }
        recorded.lock().unwrap().push(format!("{connection} {line}"));
        let method_and_path: String = line.split(' ').take(2).collect::<Vec<_>>().join(" ");
        let (answer, then) = if method_and_path == "POST /echo" {
            let text = format!("received {body}");
            (format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{text}", text.len()).into_bytes(), Then::KeepOpen)
        } else {
            answers
                .iter()
                .find(|(request, _, _)| *request == method_and_path)
                .map(|(_, answer, then)| (answer.clone(), *then))
                .unwrap_or((b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".to_vec(), Then::KeepOpen))
        };
        if stream.write_all(&answer).is_err() {
            return;
        }
        match then {
            Then::KeepOpen => {}
            Then::Close => return,
            Then::Later(more) => {
                std::thread::sleep(Duration::from_millis(200));
                let _ = stream.write_all(more);
            }
        }
    }
}

/// Reads until `buffer` holds `marker`: where it starts; `None` when the stream ends first.
fn read_until(stream: &mut TcpStream, buffer: &mut Vec<u8>, marker: &[u8]) -> Option<usize> {
    loop {
        if let Some(at) = buffer.windows(marker.len()).position(|w| w == marker) {
            return Some(at);
        }
        if !fill(stream, buffer) {
            return None;
        }
    }
}

fn fill(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 16 * 1024];
    match stream.read(&mut chunk) {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buffer.extend_from_slice(&chunk[..n]);
            true
        }
    }
}

/// The data length of a chunked body (sizes in hex, each line then its data).
fn decode_chunked_length(mut bytes: &[u8]) -> usize {
    let mut total = 0;
    while let Some(line_end) = bytes.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&bytes[..line_end]).unwrap().split(';').next().unwrap();
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        if size == 0 {
            break;
        }
        total += size;
        bytes = &bytes[line_end + 2 + size + 2..];
    }
    total
}

fn response(head: &str, body: &[u8]) -> Vec<u8> {
    [head.replace('\n', "\r\n").as_bytes(), b"\r\n", body].concat()
}

fn agent_for<'a>(topology: &'a Topology, config: &std::path::Path) -> Agent<'a> {
    istio::write(config, &[MESH_REGISTRY_ONLY, HTTPBIN]).unwrap();
    let args = format!("--intercept {GATEWAY_WORKLOAD_IFACE} --access-log-format text --config {}", config.display());
    Agent::start(&topology.gateway, &args).unwrap()
}

#[test]
fn every_response_framing_reaches_the_client_whole_and_one_connection_carries_the_exchanges() {
    require_root();
    let topology = Topology::new().unwrap();
    let big: Vec<u8> = (0..2 * 1024 * 1024).map(|i| b'a' + (i % 26) as u8).collect();
    let answers = vec![
        ("GET /length", response("HTTP/1.1 200 OK\ncontent-length: 5\n", b"hello"), Then::KeepOpen),
        ("HEAD /length", response("HTTP/1.1 200 OK\ncontent-length: 5\n", b""), Then::KeepOpen),
        (
            "GET /chunked",
            response(
                "HTTP/1.1 200 OK\ntransfer-encoding: chunked\ntrailer: x-checksum\n",
                b"4;name=value\r\nWiki\r\n5\r\npedia\r\n0\r\nx-checksum: abc\r\n\r\n",
            ),
            Then::KeepOpen,
        ),
        (
            "GET /continue",
            response("HTTP/1.1 100 Continue\n\nHTTP/1.1 200 OK\ncontent-length: 2\n", b"ok"),
            Then::KeepOpen,
        ),
        ("GET /nocontent", response("HTTP/1.1 204 No Content\n", b""), Then::KeepOpen),
        ("GET /notmodified", response("HTTP/1.1 304 Not Modified\ncontent-length: 10\n", b""), Then::KeepOpen),
        ("GET /reason", response("HTTP/1.1 200 Everything Fine\ncontent-length: 0\n", b""), Then::KeepOpen),
        (
            "GET /both-lengths",
            response("HTTP/1.1 200 OK\ntransfer-encoding: chunked\ncontent-length: 100\n", b"5\r\nhello\r\n0\r\n\r\n"),
            Then::KeepOpen,
        ),
        ("GET /big", response(&format!("HTTP/1.1 200 OK\ncontent-length: {}\n", big.len()), &big), Then::KeepOpen),
        ("GET /until-close", response("HTTP/1.1 200 OK\n", b"until the end"), Then::Close),
    ];
    let origin = RawOrigin::start(&topology.internet, addr(SERVER_A, 80), answers);
    let config = tempfile::tempdir().unwrap();
    let agent = agent_for(&topology, config.path());
    let fetch = |path: &str| get(&topology, "httpbin.org", SERVER_A, path, &[]);

    assert_eq!(fetch("/length"), (200, "hello".into()), "{}", agent.log());
    let head = curl(
        &topology.workload,
        &["-I", "--resolve", &format!("httpbin.org:80:{SERVER_A}"), "http://httpbin.org/length"],
    )
    .unwrap();
    assert!(head.to_ascii_lowercase().contains("content-length: 5"), "HEAD's length is the GET's: {head}");
    let chunked = curl(
        &topology.workload,
        &["-i", "--raw", "--resolve", &format!("httpbin.org:80:{SERVER_A}"), "http://httpbin.org/chunked"],
    )
    .unwrap();
    assert!(chunked.contains("Wiki") && chunked.contains("pedia"), "{chunked}");
    assert_eq!(fetch("/chunked").1, "Wikipedia");
    assert_eq!(fetch("/continue"), (200, "ok".into()), "a 100 Continue is passed over");
    assert_eq!(fetch("/nocontent"), (204, String::new()));
    assert_eq!(fetch("/notmodified"), (304, String::new()), "a 304's length names no body");
    let reason = curl(
        &topology.workload,
        &["-i", "--resolve", &format!("httpbin.org:80:{SERVER_A}"), "http://httpbin.org/reason"],
    )
    .unwrap();
    assert!(reason.starts_with("HTTP/1.1 200 Everything Fine\r\n"), "the origin's reason phrase goes on: {reason}");
    assert_eq!(fetch("/both-lengths"), (200, "hello".into()), "Transfer-Encoding overrides Content-Length");
    let (code, body) = fetch("/big");
    assert_eq!((code, body.len()), (200, big.len()));
    assert!(body.as_bytes() == big.as_slice(), "the 2 MiB body arrives unchanged");
    // Request bodies: one small enough to be kept for retries (sent with its length), one streamed with its
    // length, one streamed in chunks.
    let resolve = format!("httpbin.org:80:{SERVER_A}");
    let post = |data: &str, extra: &[&str]| {
        let mut args = vec!["--resolve", resolve.as_str(), "--data-binary", data];
        args.extend_from_slice(extra);
        args.push("http://httpbin.org/echo");
        curl(&topology.workload, &args).unwrap()
    };
    assert_eq!(post(&"x".repeat(1000), &[]), "received 1000");
    let large = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(large.path(), vec![b'y'; 300_000]).unwrap();
    let file = format!("@{}", large.path().display());
    assert_eq!(post(&file, &[]), "received 300000");
    assert_eq!(post(&file, &["-H", "Transfer-Encoding: chunked"]), "received 300000");
    assert_eq!(origin.connections(), 1, "every exchange so far on one connection: {:?}", origin.requests());

    assert_eq!(fetch("/until-close"), (200, "until the end".into()), "a body delimited by the connection's end");
    assert_eq!(fetch("/length"), (200, "hello".into()));
    assert_eq!(origin.connections(), 2, "the closed connection is not reused: {:?}", origin.requests());
    let metrics = agent.metrics().unwrap();
    assert_eq!(total(&metrics, "istio_requests_total", &[("response_code", "200")]), 13, "{metrics}");
}

/// Envoy's answer to an upstream response it cannot parse.
const PROTOCOL_ERROR: &str = "upstream connect error or disconnect/reset before headers. reset reason: protocol error";

#[test]
fn an_origin_that_breaks_http_framing_gets_502_upe_and_nothing_it_sends_past_a_response_reaches_a_client() {
    require_root();
    let topology = Topology::new().unwrap();
    let many_headers: String = (0..101).map(|i| format!("x-h{i}: v\n")).collect();
    let huge_head = format!("x-big: {}\n", "b".repeat(70 * 1024));
    let broken_heads: Vec<(&'static str, Vec<u8>)> = vec![
        ("GET /two-lengths", response("HTTP/1.1 200 OK\ncontent-length: 5\ncontent-length: 6\n", b"hello!")),
        ("GET /signed-length", response("HTTP/1.1 200 OK\ncontent-length: +5\n", b"hello")),
        ("GET /obs-fold", response("HTTP/1.1 200 OK\nx-folded: a\n b\ncontent-length: 0\n", b"")),
        ("GET /space-before-colon", response("HTTP/1.1 200 OK\nx-bad : b\ncontent-length: 0\n", b"")),
        ("GET /bare-cr", b"HTTP/1.1 200 OK\r\nx-bad: a\rb\r\ncontent-length: 0\r\n\r\n".to_vec()),
        ("GET /te-in-http10", response("HTTP/1.0 200 OK\ntransfer-encoding: chunked\n", b"0\r\n\r\n")),
        ("GET /status-99", response("HTTP/1.1 099 Low\ncontent-length: 0\n", b"")),
        (
            "GET /unasked-switch",
            response("HTTP/1.1 101 Switching Protocols\nupgrade: websocket\nconnection: upgrade\n", b""),
        ),
        ("GET /too-many-headers", response(&format!("HTTP/1.1 200 OK\n{many_headers}content-length: 0\n"), b"")),
        ("GET /huge-head", response(&format!("HTTP/1.1 200 OK\n{huge_head}content-length: 0\n"), b"")),
    ];
    let mut answers: Vec<_> = broken_heads.iter().map(|(r, a)| (*r, a.clone(), Then::KeepOpen)).collect();
    let smuggled = b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nsmuggled";
    answers.extend([
        ("GET /length", response("HTTP/1.1 200 OK\ncontent-length: 5\n", b"hello"), Then::KeepOpen),
        (
            "GET /bad-chunk-size",
            response("HTTP/1.1 200 OK\ntransfer-encoding: chunked\n", b"zz\r\nhello\r\n0\r\n\r\n"),
            Then::KeepOpen,
        ),
        (
            "GET /chunk-without-crlf",
            response("HTTP/1.1 200 OK\ntransfer-encoding: chunked\n", b"5\r\nhelloX0\r\n\r\n"),
            Then::KeepOpen,
        ),
        ("GET /short-body", response("HTTP/1.1 200 OK\ncontent-length: 10\n", b"hello"), Then::Close),
        (
            "GET /smuggle-after-length",
            [response("HTTP/1.1 200 OK\ncontent-length: 5\n", b"hello").as_slice(), smuggled].concat(),
            Then::KeepOpen,
        ),
        ("GET /smuggle-later", response("HTTP/1.1 200 OK\ncontent-length: 5\n", b"hello"), Then::Later(smuggled)),
    ]);
    let origin = RawOrigin::start(&topology.internet, addr(SERVER_A, 80), answers);
    let config = tempfile::tempdir().unwrap();
    let agent = agent_for(&topology, config.path());
    let resolve = format!("httpbin.org:80:{SERVER_A}");

    for (request, _) in &broken_heads {
        let path = request.split(' ').nth(1).unwrap();
        let answer = get(&topology, "httpbin.org", SERVER_A, path, &[]);
        assert_eq!(answer, (502, PROTOCOL_ERROR.to_owned()), "{path}: {}", agent.log());
    }
    // A broken body is found after the head has gone to the client: its response is cut off, never completed.
    for path in ["/bad-chunk-size", "/chunk-without-crlf", "/short-body"] {
        let url = format!("http://httpbin.org{path}");
        let outcome = curl(&topology.workload, &["--resolve", &resolve, &url]);
        assert!(outcome.is_err(), "{path}: the client sees the response fail: {outcome:?}");
    }
    // Bytes past a response, at once or a moment later, never answer the next request.
    for path in ["/smuggle-after-length", "/smuggle-later"] {
        assert_eq!(get(&topology, "httpbin.org", SERVER_A, path, &[]), (200, "hello".into()));
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(get(&topology, "httpbin.org", SERVER_A, "/length", &[]), (200, "hello".into()), "{path}");
        let requests = origin.requests();
        let connection = |line: &String| line.split(' ').next().unwrap().to_owned();
        let [.., smuggling, next] = requests.as_slice() else { panic!("{requests:?}") };
        assert_ne!(connection(smuggling), connection(next), "{path}: a new connection: {requests:?}");
    }
    let metrics = agent.metrics().unwrap();
    let refused = [("response_code", "502"), ("response_flags", "UPE")];
    assert_eq!(total(&metrics, "istio_requests_total", &refused), broken_heads.len() as u64, "{metrics}");
    assert!(agent.log().contains(" 502 UPE "), "the access log shows the flag: {}", agent.log());
    // Every broken exchange cost its connection: none was reused after a response refused or cut off.
    let requests = origin.requests();
    let reused_after_break = requests.windows(2).any(|pair| {
        let broken = |line: &str| {
            broken_heads.iter().any(|(r, _)| line.contains(r)) || line.contains("chunk") || line.contains("short")
        };
        broken(&pair[0]) && pair[0].split(' ').next() == pair[1].split(' ').next()
    });
    assert!(!reused_after_break, "{requests:?}");
}

#[test]
fn haproxy_as_an_origin_answers_through_reused_connections() {
    require_root();
    let topology = Topology::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let listen = addr(SERVER_A, 80);
    let config = format!(
        "global\n  nbthread 1\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  timeout server \
         30s\nfrontend origin\n  bind {listen}\n  http-request return status 200 content-type text/plain string \
         \"from haproxy\" if {{ path /hello }}\n  http-request return status 201 content-type text/plain string \
         \"created\" if {{ method POST }}\n  http-request deny deny_status 404\n"
    );
    let path = dir.path().join("haproxy.cfg");
    std::fs::write(&path, config).unwrap();
    let mut command = topology.internet.command("haproxy");
    command.args(["-db", "-f"]).arg(&path);
    let mut haproxy = Process::spawn("haproxy", command).unwrap();
    wait_for_tcp(&topology.internet, listen, &mut haproxy).unwrap();
    let config = tempfile::tempdir().unwrap();
    let agent = agent_for(&topology, config.path());

    for _ in 0..5 {
        assert_eq!(
            get(&topology, "httpbin.org", SERVER_A, "/hello", &[]),
            (200, "from haproxy".into()),
            "{}",
            agent.log()
        );
    }
    // One connection carried the five (HAProxy keeps it open between requests).
    let sockets = topology.internet.command("ss").args(["-Htn", "state", "established"]).output().unwrap();
    let sockets = String::from_utf8_lossy(&sockets.stdout).into_owned();
    let established = sockets.lines().filter(|line| line.contains(&format!("{SERVER_A}:80 "))).count();
    assert_eq!(established, 1, "one upstream connection, kept alive: {sockets}");
    assert_eq!(get(&topology, "httpbin.org", SERVER_A, "/missing", &[]).0, 404);
    let posted = get(&topology, "httpbin.org", SERVER_A, "/items", &["--data-binary", "payload"]);
    assert_eq!(posted, (201, "created".into()));
    let metrics = agent.metrics().unwrap();
    assert_eq!(total(&metrics, "istio_requests_total", &[]), 7, "{metrics}");
}
