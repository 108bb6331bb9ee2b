//! What the harness set up on the host, undone when the process is interrupted (SIGINT, SIGTERM, SIGHUP) and no
//! guard's drop will run: the network namespaces (with the processes in them) and the bpf filesystems mounted.

use std::{
    path::PathBuf,
    sync::{Mutex, Once, PoisonError},
};

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

/// Something on the host that a guard removes on drop.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Held {
    Netns(String),
    Mount(PathBuf),
}

static HELD: Mutex<Vec<Held>> = Mutex::new(Vec::new());

/// Records `held` until `release`: an interruption before then removes it.
pub(crate) fn hold(held: Held) {
    HELD.lock().unwrap_or_else(PoisonError::into_inner).push(held);
}

/// Forgets `held`, which its guard has removed.
pub(crate) fn release(held: &Held) {
    let mut all = HELD.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(i) = all.iter().rposition(|h| h == held) {
        all.remove(i);
    }
}

/// From now on, an interruption removes everything held, then ends the process as the signal would have.
pub(crate) fn on_signals() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        let mut signals = match signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) {
            Ok(signals) => signals,
            Err(error) => {
                eprintln!("sluice-tests: no teardown on interruption ({error}): guards still clean up on drop");
                return;
            }
        };
        std::thread::spawn(move || {
            if let Some(signal) = signals.forever().next() {
                let held = std::mem::take(&mut *HELD.lock().unwrap_or_else(PoisonError::into_inner));
                for held in held.iter().rev() {
                    match held {
                        Held::Netns(name) => crate::netns::delete(name),
                        Held::Mount(path) => {
                            let _ = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH);
                            // The mount point is a temporary directory whose guard will not run.
                            let _ = std::fs::remove_dir(path);
                        }
                    }
                }
                let _ = signal_hook::low_level::emulate_default_handler(signal);
                std::process::exit(128 + signal);
            }
        });
    });
}
