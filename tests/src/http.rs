//! HTTP through the proxy for the end-to-end tests: a workload's request by curl, what nginx reflects of each
//! request, and an upstream that accepts and never answers.

use std::{io::Read, net::TcpListener};

use crate::{peers::curl, Topology};

/// `curl` from the workload, with `host` resolved to `address`: the status line's code and the body.
pub fn get(topology: &Topology, host: &str, address: &str, path: &str, extra: &[&str]) -> (u16, String) {
    let url = format!("http://{host}{path}");
    let resolve = format!("{host}:80:{address}");
    let mut args = vec!["--resolve", resolve.as_str(), "-w", "\n%{http_code}"];
    args.extend_from_slice(extra);
    args.push(&url);
    let output = curl(&topology.workload, &args).unwrap();
    let (body, code) = output.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap(), body.to_owned())
}

/// What nginx reflects of each request it receives.
pub const ECHO: &str =
    "$server_addr host=$host uri=$request_uri added=$http_x_added xff=$http_x_forwarded_for id=$http_x_request_id";

/// Accepts TCP connections on `addr` in the internet namespace and never answers them.
pub fn silent_server(topology: &Topology, addr: std::net::SocketAddr) -> TcpListener {
    let listener = topology.internet.enter(|| TcpListener::bind(addr)).unwrap().unwrap();
    let accepting = listener.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        while let Ok((mut stream, _)) = accepting.accept() {
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf);
            held.push(stream);
        }
    });
    listener
}
