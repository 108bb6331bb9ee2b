//! The harness itself: an interrupted run leaves nothing behind on the host.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};
use sluice_tests::require_root;

#[test]
fn an_interrupted_run_removes_its_namespaces_and_bpf_mounts() {
    require_root();
    for signal in [Signal::SIGTERM, Signal::SIGINT] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_hold-topology"))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting hold-topology");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).expect("its names");
        let names: Vec<&str> = line.split_whitespace().collect();
        let (mount, namespaces) = names.split_last().expect("namespaces and a mount point");
        assert_eq!(namespaces.len(), 3, "{line}");
        let _leftovers = Leftovers { namespaces: namespaces.iter().map(|n| n.to_string()).collect(), mount };
        let mounted = || std::fs::read_to_string("/proc/mounts").unwrap().contains(&format!(" {mount} bpf "));
        for name in namespaces {
            assert!(Path::new("/run/netns").join(name).exists(), "{name} is up while held");
        }
        assert!(mounted(), "{mount} is mounted while held");

        kill(Pid::from_raw(child.id() as i32), signal).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "hold-topology did not end on {signal}");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(!status.success(), "an interrupted run does not report success: {status}");
        for name in namespaces {
            assert!(!Path::new("/run/netns").join(name).exists(), "{name} left behind after {signal}");
        }
        assert!(!mounted(), "{mount} still mounted after {signal}");
        assert!(!Path::new(mount).exists(), "the mount point {mount} left behind after {signal}");
    }
}

/// Removes whatever the child left if the teardown under test fails, so that a failing run leaves nothing either.
struct Leftovers<'a> {
    namespaces: Vec<String>,
    mount: &'a str,
}

impl Drop for Leftovers<'_> {
    fn drop(&mut self) {
        for name in &self.namespaces {
            if Path::new("/run/netns").join(name).exists() {
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
        let _ = nix::mount::umount2(self.mount, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(self.mount);
    }
}
