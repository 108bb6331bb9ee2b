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

#[derive(Debug)]
pub struct Agent<'a> {
    netns: &'a Netns,
    process: Process,
}

impl<'a> Agent<'a> {
    /// Starts `sluice run ARGS… --metrics-addr 127.0.0.1:15090` in `netns` and waits until it is attached.
    pub fn start(netns: &'a Netns, args: &[&str]) -> anyhow::Result<Agent<'a>> {
        let mut command = netns.command(binary().to_str().context("agent path is not UTF-8")?);
        command.arg("run").args(args).args(["--metrics-addr", METRICS_ADDR]);
        command.env("SLUICE_LOG", "debug");
        let process = Process::spawn("sluice", command)?;
        let mut agent = Agent { netns, process };
        agent.wait_ready()?;
        Ok(agent)
    }

    /// Runs `sluice ARGS…` in `netns` to completion: its exit status and everything it printed.
    pub fn run_to_end(netns: &Netns, args: &[&str]) -> anyhow::Result<(ExitStatus, String)> {
        let output = netns.command(binary().to_str().context("agent path is not UTF-8")?).args(args).output()?;
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
        fetch_metrics(self.netns, METRICS_ADDR.parse().expect("constant address"))
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
}

/// GETs `/stats/prometheus` from `addr` inside `netns`. It answers once the agent has attached its datapath.
pub fn fetch_metrics(netns: &Netns, addr: SocketAddr) -> anyhow::Result<String> {
    netns.enter(|| -> anyhow::Result<String> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(b"GET /stats/prometheus HTTP/1.0\r\nHost: sluice\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        match response.split_once("\r\n\r\n") {
            Some((head, body)) if head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200") => {
                Ok(body.to_owned())
            }
            _ => bail!("unexpected metrics response: {response}"),
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
