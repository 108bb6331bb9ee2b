//! `cargo xtask run`: the agent on its embedded default, in a local sandbox of network namespaces.
#![expect(unsafe_code, reason = "the Ctrl-C handler is installed with sigaction(2)")]

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{bail, Context};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use sluice_tests::{
    peers::{Dnsmasq, Nginx},
    process::Process,
    topology::{
        GATEWAY_WORKLOAD_ADDR, GATEWAY_WORKLOAD_IFACE, INTERNET_ADDR, SERVER_A, SERVER_A_V6, SERVER_B, SERVER_B_V6,
    },
    Topology,
};

use crate::build::{self, Profile};

const PREFIX: &str = "sluice-sb";
const ALLOWED_HOST: &str = "httpbin.org";
const BLOCKED_HOST: &str = "edition.cnn.com";

/// What the first build took from clean on this project's 2-core machines: the eBPF object 26 s, the agent's debug
/// build 2 min 13 s (its release build, fat LTO: 9 min 42 s).
const FIRST_BUILD_MINUTES: u32 = 3;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn request_stop(_: nix::libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

pub fn run() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("cargo xtask run needs root: it creates network namespaces and loads eBPF (run it as root)");
    }
    crate::deps::install()?;
    // The debug build `cargo xtask test` uses too: one build serves both commands, and it is made in a fraction of
    // the release build's time (fat LTO, one codegen unit), which only the bench needs.
    if !build::agent_binary(Profile::Debug).exists() {
        eprintln!(
            "xtask: building the agent (debug, as the tests use it): the first build takes about \
             {FIRST_BUILD_MINUTES} minutes on 2 cores; later ones only rebuild what changed"
        );
    }
    build::all(Profile::Debug)?;
    let handler = SigAction::new(SigHandler::Handler(request_stop), SaFlags::empty(), SigSet::empty());
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { sigaction(signal, &handler) }.context("installing the Ctrl-C handler")?;
    }

    let mut sandbox = Sandbox::up()?;
    print_guide();
    let ended = loop {
        if STOP.load(Ordering::SeqCst) {
            break None;
        }
        if let Some(status) = sandbox.agent.exited() {
            break Some(status);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("\nxtask: tearing the sandbox down");
    drop(sandbox);
    let left: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|dir| dir.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    let left: Vec<&String> = left.iter().filter(|name| name.starts_with(PREFIX)).collect();
    if !left.is_empty() {
        bail!("namespaces left behind: {left:?} (remove them with `ip netns del NAME`)");
    }
    eprintln!("xtask: sandbox removed: no namespaces, links, routes or programs of it remain");
    match ended {
        Some(status) => bail!("the agent exited with {status}"),
        None => Ok(()),
    }
}

/// Everything the sandbox holds; dropped in field order: the agent first, so it detaches while links exist.
struct Sandbox {
    agent: Process,
    _servers: (Nginx, Nginx, Dnsmasq),
    _resolv: ResolvConf,
    _topology: Topology,
}

impl Sandbox {
    fn up() -> anyhow::Result<Sandbox> {
        let topology = Topology::named(PREFIX)?;
        let addr = |host: &str, port: u16| -> SocketAddr {
            let host = if host.contains(':') { format!("[{host}]") } else { host.to_owned() };
            format!("{host}:{port}").parse().expect("sandbox address")
        };
        let allowed = Nginx::start(
            &topology.internet,
            &[addr(SERVER_A, 80), addr(SERVER_A, 8080), addr(SERVER_A_V6, 80)],
            &format!("hello from {ALLOWED_HOST} (sandbox server {SERVER_A})"),
        )?;
        let blocked = Nginx::start(
            &topology.internet,
            &[addr(SERVER_B, 80), addr(SERVER_B_V6, 80)],
            &format!("hello from {BLOCKED_HOST} (sandbox server {SERVER_B})"),
        )?;
        let dns = Dnsmasq::start(
            &topology.internet,
            INTERNET_ADDR,
            &[
                (ALLOWED_HOST, SERVER_A),
                (ALLOWED_HOST, SERVER_A_V6),
                (BLOCKED_HOST, SERVER_B),
                (BLOCKED_HOST, SERVER_B_V6),
            ],
        )?;
        let resolv = ResolvConf::write(topology.workload.name(), INTERNET_ADDR)?;

        let binary = build::agent_binary(Profile::Debug);
        let mut command = topology.gateway.command(binary.to_str().context("agent path is not UTF-8")?);
        // The mesh config (REGISTRY_ONLY) and the ServiceEntries come from deploy/examples/sandbox.
        command.args(["run", "--intercept", GATEWAY_WORKLOAD_IFACE, "--config"]);
        command.arg(crate::root().join("deploy/examples/sandbox"));
        // The sandbox leaves nothing behind: the agent removes its pins and routing when it stops.
        command.arg("--cleanup-on-exit");
        // The DNS server and the gateway itself are always reachable.
        command.args(["--allow-cidr", INTERNET_ADDR, "--allow-cidr", GATEWAY_WORKLOAD_ADDR]);
        // No --intercept-port: the ServiceEntry declares port 80 HTTP, so the proxy takes it, routes it by the
        // VirtualServices and checks its Host.
        let mut agent = Process::spawn_in_view("sluice", command)?;
        wait_attached(&topology, &mut agent)?;
        Ok(Sandbox { agent, _servers: (allowed, blocked, dns), _resolv: resolv, _topology: topology })
    }
}

/// Waits until the agent's metrics answer, which they do once the datapath is attached.
fn wait_attached(topology: &Topology, agent: &mut Process) -> anyhow::Result<()> {
    let metrics: SocketAddr = "127.0.0.1:15090".parse().expect("constant");
    for _ in 0..200 {
        if sluice_tests::agent::fetch_metrics(&topology.gateway, metrics).is_ok() {
            return Ok(());
        }
        if let Some(status) = agent.exited() {
            bail!("the agent exited with {status} before attaching");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("the agent did not attach within 20 s")
}

/// `/etc/netns/NAME/resolv.conf`, which `ip netns exec NAME` shows as /etc/resolv.conf; removed on drop.
struct ResolvConf {
    dir: PathBuf,
}

impl ResolvConf {
    fn write(netns: &str, nameserver: &str) -> anyhow::Result<ResolvConf> {
        let dir = PathBuf::from("/etc/netns").join(netns);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let guard = ResolvConf { dir };
        std::fs::write(guard.dir.join("resolv.conf"), format!("nameserver {nameserver}\n"))
            .with_context(|| format!("writing {}/resolv.conf", guard.dir.display()))?;
        Ok(guard)
    }
}

impl Drop for ResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        // /etc/netns itself goes too when the sandbox was its only user.
        let _ = std::fs::remove_dir("/etc/netns");
    }
}

fn print_guide() {
    let workload = format!("ip netns exec {PREFIX}-workload");
    let gateway = format!("ip netns exec {PREFIX}-gateway");
    eprintln!(
        "
Sluice sandbox is up. The agent runs in {PREFIX}-gateway, policing what {PREFIX}-workload sends to
{PREFIX}-internet, in REGISTRY_ONLY mode with {ALLOWED_HOST}:80 registered.

Try, in another terminal:
  {workload} curl -sS -i http://{ALLOWED_HOST}/
      -> 200, x-sluice-route: httpbin, hello from {ALLOWED_HOST} ...   (proxied; an access-log line here)
  {workload} curl -sS http://{ALLOWED_HOST}/status/418
      -> I'm a teapot                              (a VirtualService's directResponse)
  {workload} curl -sS -o /dev/null -w '%{{http_code}}\\n' http://{BLOCKED_HOST}/
      -> 502                                       (unregistered host: Istio's BlackHoleCluster)
  {workload} curl -sS --max-time 3 http://{ALLOWED_HOST}:8080/
      -> curl: (28) ... timed out                  (port not registered: blackholed in the kernel)
  {gateway} curl -sS http://127.0.0.1:15090/stats/prometheus
      -> istio_requests_total{{...destination_service_name=\"BlackHoleCluster\"...}} and the kernel's
         sluice_datapath_packets_total{{verdict=...}}
  {gateway} curl -sS http://127.0.0.1:15000/config_dump
      -> the configuration in force and the policy compiled from it (JSON)

Edit deploy/examples/sandbox/*.yaml while it runs: the agent reloads it.

Press Ctrl-C to tear everything down.
"
    );
}
