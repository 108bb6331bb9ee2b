//! The agent under test: started inside a namespace, ready once its metrics answer, stopped on drop.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::ExitStatus,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

use crate::{netns::Netns, process::Process};

/// Where the agent's metrics listen inside its namespace.
pub const METRICS_ADDR: &str = "127.0.0.1:15090";
/// Where the agent's admin endpoints listen inside its namespace.
pub const ADMIN_ADDR: &str = "127.0.0.1:15000";
/// Where the agent's readiness endpoint listens inside its namespace.
pub const READINESS_ADDR: &str = "127.0.0.1:15021";

/// The value given to `flag` in `args`, or `default`, which is then added to `args`.
fn address_argument<'a>(args: &mut Vec<&'a str>, flag: &'a str, default: &'a str) -> anyhow::Result<SocketAddr> {
    match args.iter().position(|a| *a == flag) {
        Some(i) => Ok(args.get(i + 1).with_context(|| format!("{flag} without a value"))?.parse()?),
        None => {
            args.extend([flag, default]);
            Ok(default.parse().expect("constant address"))
        }
    }
}

/// The `sluice` binary: `$SLUICE_AGENT_BIN`, else the workspace's debug build.
pub fn binary() -> PathBuf {
    let path = std::env::var_os("SLUICE_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/sluice"));
    assert!(
        path.is_file(),
        "the agent binary is missing at {}: run `cargo xtask test` (or `cargo xtask build` and \
         `cargo build -p sluice-agent`)",
        path.display()
    );
    path
}

/// A bpf filesystem mounted on a temporary directory (outside /sys, so that it is the same one inside
/// `ip netns exec`), for one test's pins; unmounted on drop, which releases whatever is still pinned there.
#[derive(Debug)]
pub struct Bpffs {
    dir: tempfile::TempDir,
}

impl Bpffs {
    pub fn mount() -> anyhow::Result<Bpffs> {
        let dir = tempfile::Builder::new().prefix("sluice-bpffs-").tempdir().context("creating a bpffs mount point")?;
        nix::mount::mount(Some("bpf"), dir.path(), Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
            .with_context(|| format!("mounting a bpf filesystem on {}", dir.path().display()))?;
        crate::teardown::hold(crate::teardown::Held::Mount(dir.path().to_owned()));
        Ok(Bpffs { dir })
    }

    /// The agent's pin directory on this filesystem.
    pub fn pin_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("sluice")
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.dir.path(), nix::mount::MntFlags::MNT_DETACH);
        crate::teardown::release(&crate::teardown::Held::Mount(self.dir.path().to_owned()));
    }
}

#[derive(Debug)]
pub struct Agent<'a> {
    netns: &'a Netns,
    process: Process,
    metrics: SocketAddr,
    admin: SocketAddr,
    readiness: SocketAddr,
    _bpffs: Option<Bpffs>,
}

impl<'a> Agent<'a> {
    /// Starts `sluice run ARGS… --cleanup-on-exit` in `netns` (ARGS split at spaces), with pins on a bpffs of
    /// its own and metrics on 127.0.0.1:15090 unless ARGS say otherwise, and waits until it is attached.
    pub fn start(netns: &'a Netns, args: &str) -> anyhow::Result<Agent<'a>> {
        Agent::start_with_env(netns, args, &[])
    }

    /// As `start`, with `env` set for the agent (e.g. KUBECONFIG).
    pub fn start_with_env(netns: &'a Netns, args: &str, env: &[(&str, &str)]) -> anyhow::Result<Agent<'a>> {
        let bpffs = Bpffs::mount()?;
        let mut agent = Agent::spawn(netns, &bpffs, &format!("{args} --cleanup-on-exit"), env, &[])?;
        agent._bpffs = Some(bpffs);
        Ok(agent)
    }

    /// As `start`, with no capabilities but `capabilities` (`BPF`, `NET_ADMIN`…, as a pod's securityContext names
    /// them): the agent runs under `setpriv` with that bounding set, as root in a container would.
    pub fn start_with_capabilities(netns: &'a Netns, capabilities: &[&str], args: &str) -> anyhow::Result<Agent<'a>> {
        let bpffs = Bpffs::mount()?;
        let wrapper = setpriv(capabilities);
        let mut agent = Agent::spawn(netns, &bpffs, &format!("{args} --cleanup-on-exit"), &[], &wrapper)?;
        agent._bpffs = Some(bpffs);
        Ok(agent)
    }

    /// Starts `sluice run ARGS…` pinning under `bpffs`, which outlives the agent (restarts, crashes).
    pub fn start_pinned(netns: &'a Netns, bpffs: &Bpffs, args: &str) -> anyhow::Result<Agent<'a>> {
        Agent::spawn(netns, bpffs, args, &[], &[])
    }

    fn spawn(
        netns: &'a Netns,
        bpffs: &Bpffs,
        args: &str,
        env: &[(&str, &str)],
        wrapper: &[String],
    ) -> anyhow::Result<Agent<'a>> {
        let agent = binary();
        let agent = agent.to_str().context("agent path is not UTF-8")?;
        let mut command = match wrapper.split_first() {
            Some((program, wrapper_args)) => {
                let mut command = netns.command(program);
                command.args(wrapper_args).arg(agent);
                command
            }
            None => netns.command(agent),
        };
        command.envs(env.iter().copied());
        let mut args: Vec<&str> = args.split_whitespace().collect();
        let metrics = address_argument(&mut args, "--metrics-addr", METRICS_ADDR)?;
        let admin = address_argument(&mut args, "--admin-addr", ADMIN_ADDR)?;
        let readiness = address_argument(&mut args, "--readiness-addr", READINESS_ADDR)?;
        command.arg("run").args(&args);
        command.arg("--bpffs").arg(bpffs.pin_dir());
        // Tests stop agents at once, unless they are about the drain.
        if !args.contains(&"--drain-delay") {
            command.args(["--drain-delay", "0s", "--drain-timeout", "1s"]);
        }
        // Tests read the agent's debug events; the benchmarks run it as deployed (SLUICE_AGENT_LOG=info).
        command.env("SLUICE_LOG", std::env::var("SLUICE_AGENT_LOG").unwrap_or_else(|_| "debug".into()));
        let process = Process::spawn("sluice", command)?;
        let mut agent = Agent { netns, process, metrics, admin, readiness, _bpffs: None };
        agent.wait_ready()?;
        Ok(agent)
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Kills the agent outright (SIGKILL), as a crash would.
    pub fn kill(mut self) -> String {
        let _ =
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.process.pid() as i32), nix::sys::signal::SIGKILL);
        self.process.stop(std::time::Duration::from_secs(5));
        self.process.log()
    }

    /// The agent's resident memory (`VmRSS`), in KiB; `None` once it has gone.
    pub fn resident_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        status.lines().find_map(|line| line.strip_prefix("VmRSS:"))?.split_whitespace().next()?.parse().ok()
    }

    /// Sends SIGTERM and returns at once: the agent drains (see `wait_for_exit`).
    pub fn terminate(&self) {
        let pid = nix::unistd::Pid::from_raw(self.process.pid() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::SIGTERM);
    }

    /// Waits up to `timeout` for the agent to exit by itself: its status (`None` if it had not) and log.
    pub fn wait_for_exit(mut self, timeout: Duration) -> (Option<ExitStatus>, String) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.process.exited() {
                return (Some(status), self.process.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        (None, self.process.log())
    }

    /// Runs `sluice ARGS…` in `netns` to completion: its exit status and everything it printed.
    pub fn run_to_end(netns: &Netns, args: &str) -> anyhow::Result<(ExitStatus, String)> {
        let output = netns
            .command(binary().to_str().context("agent path is not UTF-8")?)
            .args(args.split_whitespace())
            .output()?;
        let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        Ok((output.status, text))
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.metrics().is_ok() {
                return Ok(());
            }
            if let Some(status) = self.process.exited() {
                bail!("the agent exited with {status} before it was ready:\n{}", self.process.log());
            }
            if Instant::now() > deadline {
                bail!("the agent was not ready after 20 s:\n{}", self.process.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The Prometheus text the agent serves.
    pub fn metrics(&self) -> anyhow::Result<String> {
        fetch_metrics(self.netns, self.metrics)
    }

    /// What `/healthz/ready` answers (the body of a 200; an error otherwise).
    pub fn readiness(&self) -> anyhow::Result<String> {
        http_get(self.netns, self.readiness, "/healthz/ready")
    }

    /// The JSON the admin endpoint `/config_dump` serves.
    pub fn config_dump(&self) -> anyhow::Result<String> {
        http_get(self.netns, self.admin, "/config_dump")
    }

    /// The JSON the admin endpoint `/status` serves (what `sluice status -o json` prints).
    pub fn status(&self) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_str(&http_get(self.netns, self.admin, "/status")?)?)
    }

    /// The value of one series, e.g. `sluice_datapath_packets_total{verdict="allowed"}`; 0 when absent.
    pub fn sample(&self, series: &str) -> anyhow::Result<u64> {
        let metrics = self.metrics()?;
        Ok(sample(&metrics, series).unwrap_or(0))
    }

    /// Stops the agent with SIGTERM and returns its exit status and log.
    pub fn stop(mut self) -> (Option<ExitStatus>, String) {
        let status = self.process.stop(Duration::from_secs(10));
        (status, self.process.log())
    }

    pub fn log(&self) -> String {
        self.process.log()
    }

    /// Waits up to 10 s for the agent's log to hold `text` `count` times; the log is in the error otherwise.
    pub fn wait_for_log(&self, text: &str, count: usize) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self.log().matches(text).count() < count {
            if std::time::Instant::now() > deadline {
                bail!("the agent did not log {text:?} {count} times in 10 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

/// GETs `/stats/prometheus` from `addr` inside `netns`. It answers once the agent has attached its datapath.
pub fn fetch_metrics(netns: &Netns, addr: SocketAddr) -> anyhow::Result<String> {
    http_get(netns, addr, "/stats/prometheus")
}

/// GETs `path` from `addr` inside `netns`; the body of a 200 answer.
pub fn http_get(netns: &Netns, addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    netns.enter(|| -> anyhow::Result<String> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: sluice\r\n\r\n").as_bytes())?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        match response.split_once("\r\n\r\n") {
            Some((head, body)) if head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200") => {
                Ok(body.to_owned())
            }
            _ => bail!("unexpected response to GET {path}: {response}"),
        }
    })?
}

/// The value of `series` in Prometheus text.
pub fn sample(text: &str, series: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.trim().parse::<f64>().ok().map(|v| v as u64)
    })
}

/// `setpriv` leaving root only `capabilities` (as a pod's securityContext names them: `BPF`, `NET_ADMIN`…), the
/// program to run to follow.
pub fn setpriv(capabilities: &[&str]) -> Vec<String> {
    let kept: String = capabilities.iter().map(|name| format!(",+{}", name.to_lowercase())).collect();
    vec!["setpriv".into(), format!("--bounding-set=-all{kept}"), "--inh-caps=-all".into()]
}
