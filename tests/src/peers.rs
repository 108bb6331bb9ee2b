//! Real servers from Debian's packages, run inside a namespace: nginx for HTTP, dnsmasq for DNS, PostgreSQL for a
//! database clients reach over plain TCP.

use std::{
    fmt::Write as _,
    net::{SocketAddr, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

use crate::{netns::Netns, process::Process};

/// nginx answering `200 <body>` on every address it listens on.
#[derive(Debug)]
pub struct Nginx {
    /// Stopped on drop.
    process: Process,
    _dir: tempfile::TempDir,
}

impl Nginx {
    pub fn start(netns: &Netns, listen: &[SocketAddr], body: &str) -> anyhow::Result<Nginx> {
        let mut listens = String::new();
        for addr in listen {
            let _ = writeln!(listens, "    listen {addr};");
        }
        let server = format!(
            "server {{\n{listens}    location / {{ default_type text/plain; return 200 \"{body}\\n\"; }}\n  }}\n"
        );
        Nginx::start_with(netns, &server, listen)
    }

    /// nginx answering `body` in HTTP/2 alone (prior knowledge in the clear, h2c) on `listen`: an HTTP/1.1 request
    /// gets no answer there.
    pub fn start_h2c(netns: &Netns, listen: SocketAddr, body: &str) -> anyhow::Result<Nginx> {
        let server = format!(
            "server {{\n    listen {listen} http2;\n    location / {{ default_type text/plain; return 200 \"{body}\\n\"; }}\n  }}\n"
        );
        Nginx::start_with(netns, &server, &[listen])
    }

    /// nginx with `http_config` inside its `http {}` block (servers, upstreams), ready once it accepts on every
    /// address of `listen`.
    pub fn start_with(netns: &Netns, http_config: &str, listen: &[SocketAddr]) -> anyhow::Result<Nginx> {
        let dir = tempfile::Builder::new().prefix("sluice-nginx-").tempdir().context("creating nginx's directory")?;
        let root = dir.path().display();
        let conf = format!(
            "daemon off;\nworker_processes 1;\npid {root}/nginx.pid;\nerror_log {root}/error.log;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {root}/body;\n  proxy_temp_path {root}/proxy;\n\
             fastcgi_temp_path {root}/fastcgi;\n  uwsgi_temp_path {root}/uwsgi;\n  scgi_temp_path {root}/scgi;\n\
             {http_config}}}\n"
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).context("writing nginx.conf")?;
        let mut command = netns.command("nginx");
        command.args(["-e", &format!("{root}/error.log"), "-p", &root.to_string(), "-c"]).arg(&conf_path);
        let mut process = Process::spawn("nginx", command)?;
        for addr in listen {
            wait_for_tcp(netns, *addr, &mut process)?;
        }
        Ok(Nginx { process, _dir: dir })
    }

    /// nginx's master process (its worker is a child).
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }
}

/// dnsmasq answering A and AAAA records for the given names, and nothing else (no upstream, no hosts file).
#[derive(Debug)]
pub struct Dnsmasq {
    /// Held for its drop, which stops dnsmasq.
    _process: Process,
}

impl Dnsmasq {
    pub fn start(netns: &Netns, listen: &str, records: &[(&str, &str)]) -> anyhow::Result<Dnsmasq> {
        Dnsmasq::start_forwarding(netns, listen, records, &[])
    }

    /// As `start`, and names under each `(domain, server)` forwarded to that server (`ADDR#PORT`).
    pub fn start_forwarding(
        netns: &Netns,
        listen: &str,
        records: &[(&str, &str)],
        forward: &[(&str, &str)],
    ) -> anyhow::Result<Dnsmasq> {
        let mut command = netns.command("dnsmasq");
        command.args([
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            "--bind-interfaces",
            "--user=root",
            "--pid-file=",
            "--log-queries",
            "--log-facility=-",
            // Answers live one second, so a test can change them and see resolvers follow.
            "--local-ttl=1",
        ]);
        command.arg(format!("--listen-address={listen}"));
        for (name, addr) in records {
            command.arg(format!("--host-record={name},{addr}"));
        }
        for (domain, server) in forward {
            command.arg(format!("--server=/{domain}/{server}"));
        }
        let mut process = Process::spawn("dnsmasq", command)?;
        let addr: SocketAddr = format!("{listen}:53").parse().context("dnsmasq's listen address")?;
        wait_for_tcp(netns, addr, &mut process)?;
        Ok(Dnsmasq { _process: process })
    }
}

/// A PostgreSQL server (Debian's `postgresql`) with a database cluster of its own in a temporary directory, run as
/// the `postgres` user (it refuses root), trusting every client: `psql -h ADDR -U postgres` gets in.
pub struct Postgres {
    /// Stopped on drop, before its directory goes.
    _process: Process,
    _dir: tempfile::TempDir,
}

impl Postgres {
    /// Starts it listening on `addresses`, port `port`, in `netns`; ready once it accepts on each.
    pub fn start(netns: &Netns, addresses: &[&str], port: u16) -> anyhow::Result<Postgres> {
        let bin = postgres_bin()?;
        let dir = tempfile::Builder::new().prefix("sluice-postgres-").tempdir().context("creating its directory")?;
        let user =
            nix::unistd::User::from_name("postgres")?.context("no postgres user: is Debian's postgresql installed?")?;
        std::os::unix::fs::chown(dir.path(), Some(user.uid.as_raw()), Some(user.gid.as_raw()))?;
        let data = dir.path().join("data");
        let as_postgres = |program: &str| {
            let mut command = netns.command("setpriv");
            command.args(["--reuid=postgres", "--regid=postgres", "--clear-groups"]).arg(bin.join(program));
            command
        };
        let initdb = as_postgres("initdb")
            .args(["--auth=trust", "--username=postgres", "--no-sync", "--no-instructions", "-D"])
            .arg(&data)
            .output()
            .context("running initdb")?;
        anyhow::ensure!(initdb.status.success(), "initdb: {}", String::from_utf8_lossy(&initdb.stderr));
        let mut hba = std::fs::OpenOptions::new().append(true).open(data.join("pg_hba.conf"))?;
        std::io::Write::write_all(&mut hba, b"host all all 0.0.0.0/0 trust\nhost all all ::/0 trust\n")?;
        let mut command = as_postgres("postgres");
        command
            .arg("-D")
            .arg(&data)
            .arg("-k")
            .arg(dir.path())
            .args(["-c", &format!("listen_addresses={}", addresses.join(",")), "-p", &port.to_string()])
            .args(["-c", "fsync=off", "-c", "log_connections=on"]);
        let mut process = Process::spawn("postgres", command)?;
        for address in addresses {
            wait_for_tcp(netns, SocketAddr::new(address.parse()?, port), &mut process)?;
        }
        Ok(Postgres { _process: process, _dir: dir })
    }
}

/// The programs of the newest PostgreSQL installed (`/usr/lib/postgresql/VERSION/bin`).
fn postgres_bin() -> anyhow::Result<std::path::PathBuf> {
    let mut versions: Vec<(u32, std::path::PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context("/usr/lib/postgresql: is Debian's postgresql installed?")?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("postgres").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).context("no PostgreSQL server under /usr/lib/postgresql")
}

/// Waits until something accepts TCP connections on `addr` inside `netns`.
pub fn wait_for_tcp(netns: &Netns, addr: SocketAddr, process: &mut Process) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if netns.enter(|| TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok())? {
            return Ok(());
        }
        if let Some(status) = process.exited() {
            bail!("{} exited with {status} before listening on {addr}:\n{}", process.name(), process.log());
        }
        if Instant::now() > deadline {
            bail!("{} is not listening on {addr} after 10 s:\n{}", process.name(), process.log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The HTTP status `curl` gets for `url` from inside `netns`, or None when it gets no response in time.
pub fn http_status(netns: &Netns, url: &str, timeout: Duration) -> Option<u16> {
    let output = netns_curl(netns, url, timeout).ok()?;
    String::from_utf8_lossy(&output.stdout).trim().parse().ok().filter(|&code| code != 0)
}

/// The body `curl` gets for `url` from inside `netns`, or None when the request fails.
pub fn http_body(netns: &Netns, url: &str, timeout: Duration) -> Option<String> {
    let mut command: Command = netns.command("curl");
    command.args(["-s", "--fail", "--max-time"]).arg(format!("{:.1}", timeout.as_secs_f64())).arg(url);
    let output = command.output().ok()?;
    output.status.success().then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs `curl -sS ARGS…` inside `netns` (at most `--max-time 10`): its standard output, or an error with what
/// it printed.
pub fn curl(netns: &Netns, args: &[&str]) -> anyhow::Result<String> {
    let output = netns.command("curl").args(["-sS", "--max-time", "10"]).args(args).output()?;
    anyhow::ensure!(
        output.status.success(),
        "curl {args:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn netns_curl(netns: &Netns, url: &str, timeout: Duration) -> std::io::Result<std::process::Output> {
    let mut command: Command = netns.command("curl");
    command
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time"])
        .arg(format!("{:.1}", timeout.as_secs_f64()))
        .arg(url);
    command.output()
}

/// A UDP socket bound inside a namespace that counts the datagrams reaching it.
#[derive(Debug)]
pub struct UdpSink {
    socket: std::net::UdpSocket,
}

impl UdpSink {
    pub fn bind(netns: &Netns, addr: SocketAddr) -> anyhow::Result<UdpSink> {
        let socket = netns
            .enter(|| std::net::UdpSocket::bind(addr))?
            .with_context(|| format!("binding UDP {addr} in {}", netns.name()))?;
        socket.set_read_timeout(Some(Duration::from_millis(300)))?;
        Ok(UdpSink { socket })
    }

    /// Datagrams received until none arrives for 300 ms.
    pub fn drain(&self) -> usize {
        let mut buf = [0u8; 2048];
        let mut count = 0;
        while self.socket.recv(&mut buf).is_ok() {
            count += 1;
        }
        count
    }
}

/// Sends `count` datagrams of `payload` bytes from inside `netns` to `dst`.
pub fn send_udp(netns: &Netns, dst: SocketAddr, count: usize, payload: usize) -> anyhow::Result<()> {
    let bind: SocketAddr = if dst.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("constant");
    let socket = netns.enter(|| std::net::UdpSocket::bind(bind))??;
    let data = vec![0x5a; payload];
    for _ in 0..count {
        socket.send_to(&data, dst).with_context(|| format!("sending UDP to {dst}"))?;
        // Paced, so no datagram is lost to a full queue: the counts must be exact.
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// Reads from `stream` up to the end of a request's head (or the end of what it sends): the head, without the
/// blank line.
pub fn read_head(stream: &mut impl std::io::Read) -> String {
    let mut request = Vec::new();
    let mut buf = [0u8; 4096];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&request).split("\r\n\r\n").next().unwrap_or("").to_owned()
}

/// An HTTP/1.1 upstream whose answers a test scripts: the n-th request gets the n-th status of the script (200
/// once it runs out), each with `Connection: close`; a request asking for an upgrade gets `101 Switching
/// Protocols` and then an echo of every byte it sends. It records every request's head. Stops on drop.
#[derive(Debug)]
pub struct ScriptedServer {
    heads: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    addr: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl ScriptedServer {
    /// Answers each request with the next status of `script` (0: closes the connection without an answer), then
    /// with 200.
    pub fn start(netns: &Netns, addr: SocketAddr, script: &[u16]) -> anyhow::Result<ScriptedServer> {
        use std::io::{Read, Write};
        let listener = netns
            .enter(|| std::net::TcpListener::bind(addr))?
            .with_context(|| format!("binding {addr} in {}", netns.name()))?;
        listener.set_nonblocking(true)?;
        let heads = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (recorded, stopped) = (heads.clone(), stop.clone());
        let mut script = std::collections::VecDeque::from(script.to_vec());
        std::thread::spawn(move || {
            while !stopped.load(std::sync::atomic::Ordering::SeqCst) {
                let Ok((mut stream, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let head = read_head(&mut stream);
                let upgrade = head.lines().find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("upgrade").then(|| value.trim().to_owned())
                });
                if let Some(protocol) = upgrade {
                    recorded.lock().expect("not poisoned").push(head);
                    let switching = format!(
                        "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: {protocol}\r\n\r\n"
                    );
                    let _ = stream.write_all(switching.as_bytes());
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 4096];
                        while let Ok(n) = stream.read(&mut buf) {
                            if n == 0 || stream.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    });
                    continue;
                }
                let status = script.pop_front().unwrap_or(200);
                if status == 0 {
                    // Scripted 0: the request is read, then the connection closed without an answer.
                    recorded.lock().expect("not poisoned").push(head);
                    continue;
                }
                let body = format!("scripted {status}\n");
                let response = format!(
                    "HTTP/1.1 {status} Scripted\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                recorded.lock().expect("not poisoned").push(head);
                let _ = stream.write_all(response.as_bytes());
            }
        });
        Ok(ScriptedServer { heads, addr, stop })
    }

    /// The heads (request line and headers) of the requests received so far.
    pub fn heads(&self) -> Vec<String> {
        self.heads.lock().expect("not poisoned").clone()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for ScriptedServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Prometheus scraping one target every second, its query API on 127.0.0.1:9090 inside `netns`.
#[derive(Debug)]
pub struct Prometheus<'a> {
    netns: &'a Netns,
    _process: Process,
    _dir: tempfile::TempDir,
}

impl<'a> Prometheus<'a> {
    pub const ADDR: &'static str = "127.0.0.1:9090";

    /// Scrapes `target` (`host:port`) at `path` as job `job`.
    pub fn start(netns: &'a Netns, job: &str, target: &str, path: &str) -> anyhow::Result<Prometheus<'a>> {
        let dir = tempfile::Builder::new().prefix("sluice-prometheus-").tempdir().context("creating a directory")?;
        let config = format!(
            "global: {{scrape_interval: 1s, scrape_timeout: 1s}}\nscrape_configs:\n- job_name: {job}\n  \
             metrics_path: {path}\n  static_configs: [{{targets: ['{target}']}}]\n"
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).context("writing prometheus.yml")?;
        let mut command = netns.command("prometheus");
        command
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={}", Self::ADDR));
        let mut process = Process::spawn("prometheus", command)?;
        wait_for_tcp(netns, Self::ADDR.parse().expect("constant"), &mut process)?;
        Ok(Prometheus { netns, _process: process, _dir: dir })
    }

    /// The JSON answer of the query API for the PromQL `query`.
    pub fn query(&self, query: &str) -> anyhow::Result<String> {
        self.api("query", &format!("query={query}"))
    }

    /// The JSON answer of `/api/v1/ENDPOINT` with one URL-encoded `name=value` argument.
    pub fn api(&self, endpoint: &str, argument: &str) -> anyhow::Result<String> {
        let output = self
            .netns
            .command("curl")
            .args(["-sS", "--max-time", "5", "-G", &format!("http://{}/api/v1/{endpoint}", Self::ADDR)])
            .arg("--data-urlencode")
            .arg(argument)
            .output()?;
        anyhow::ensure!(output.status.success(), "querying Prometheus: {}", String::from_utf8_lossy(&output.stderr));
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}
