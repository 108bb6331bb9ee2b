//! A child process owned by a guard: terminated (SIGTERM, then SIGKILL) and reaped on drop, its output kept
//! in a log file for failure messages.

use std::{
    fs::File,
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context;
use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};

#[derive(Debug)]
pub struct Process {
    name: String,
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Process {
    /// Starts `command` with stdout and stderr going to a log file.
    pub fn spawn(name: &str, mut command: Command) -> anyhow::Result<Process> {
        let dir = tempfile::Builder::new().prefix("sluice-proc-").tempdir().context("creating a log directory")?;
        let log = dir.path().join(format!("{name}.log"));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone().context("duplicating the log file")?;
        let child = command
            // Its own process group: a Ctrl-C meant for the harness does not reach it before teardown.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name}: {command:?}"))?;
        Ok(Process { name: name.to_owned(), child, log, _dir: dir })
    }

    /// Starts `command` with its output on this process's terminal (for the sandbox, where a person reads it).
    pub fn spawn_in_view(name: &str, mut command: Command) -> anyhow::Result<Process> {
        let dir = tempfile::Builder::new().prefix("sluice-proc-").tempdir().context("creating a log directory")?;
        let log = dir.path().join(format!("{name}.log"));
        let child = command
            .process_group(0)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {name}: {command:?}"))?;
        Ok(Process { name: name.to_owned(), child, log, _dir: dir })
    }

    /// What the process printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the process has ended.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends SIGTERM and waits up to `grace` for the process to end, then kills it.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.exited() {
            return Some(status);
        }
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}
