//! A network namespace owned by a guard: created with a unique name, deleted (with its processes, links,
//! qdiscs, routes and rules) on drop.

use std::{
    fs::File,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{bail, Context};
use nix::sched::{setns, CloneFlags};

use crate::teardown::{self, Held};

static NEXT: AtomicU32 = AtomicU32::new(0);

#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// A new namespace named `sluice-ROLE-PID-N`, unique among concurrently running tests.
    pub fn new(role: &str) -> anyhow::Result<Netns> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        Netns::create(format!("sluice-{role}-{}-{n}", std::process::id()))
    }

    /// A namespace with a fixed name; one left behind by an earlier run is removed first.
    pub fn named(name: &str) -> anyhow::Result<Netns> {
        if std::path::Path::new("/run/netns").join(name).exists() {
            drop(Netns { name: name.to_owned() });
        }
        Netns::create(name.to_owned())
    }

    fn create(name: String) -> anyhow::Result<Netns> {
        run(Command::new("ip").args(["netns", "add", &name]))
            .with_context(|| format!("creating network namespace {name}"))?;
        teardown::hold(Held::Netns(name.clone()));
        let netns = Netns { name };
        netns.ip(&["link", "set", "dev", "lo", "up"])?;
        // No duplicate address detection: link-local addresses are usable at once.
        for scope in ["all", "default"] {
            netns.sysctl(&format!("net.ipv6.conf.{scope}.accept_dad"), "0")?;
        }
        Ok(netns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `program` to be run inside this namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }

    /// Runs `ip -n NAME ARGS…` and fails with its stderr if it fails.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        run(Command::new("ip").args(["-n", &self.name]).args(args))
            .with_context(|| format!("in namespace {}: ip {}", self.name, args.join(" ")))?;
        Ok(())
    }

    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        run(self.command("sysctl").args(["-qw", &format!("{key}={value}")]))
            .with_context(|| format!("in namespace {}: sysctl {key}={value}", self.name))?;
        Ok(())
    }

    /// Runs `f` on a thread that has entered this namespace. Sockets it creates stay in the namespace and can
    /// be used from any thread afterwards.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
        let path = format!("/run/netns/{}", self.name);
        let file = File::open(&path).with_context(|| format!("opening {path}"))?;
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    setns(&file, CloneFlags::CLONE_NEWNET).with_context(|| format!("entering {path}"))?;
                    Ok(f())
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        delete(&self.name);
        teardown::release(&Held::Netns(self.name.clone()));
    }
}

/// Deletes the namespace `name` and ends the processes in it (which would keep it alive after its name is gone).
pub(crate) fn delete(name: &str) {
    if let Ok(output) = Command::new("ip").args(["netns", "pids", name]).output() {
        for pid in String::from_utf8_lossy(&output.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
            }
        }
    }
    let _ = Command::new("ip").args(["netns", "del", name]).status();
}

/// Runs `command`, failing with its stderr when it exits non-zero.
pub fn run(command: &mut Command) -> anyhow::Result<Output> {
    let output = command.output().with_context(|| format!("running {command:?}"))?;
    if !output.status.success() {
        bail!("{command:?} exited with {}: {}", output.status, String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(output)
}
