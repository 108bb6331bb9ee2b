//! Watches the configuration files and directories, and says when they have changed and settled.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use notify_debouncer_mini::{new_debouncer, notify::RecursiveMode, DebounceEventResult, Debouncer};
use tokio::sync::mpsc;

/// Changes closer together than this are one reload.
const SETTLE: Duration = Duration::from_millis(250);

/// The watch; dropping it stops watching.
pub struct Watch {
    _debouncer: Debouncer<notify_debouncer_mini::notify::RecommendedWatcher>,
}

/// Starts watching `paths` (a file through its directory, since editors replace files rather than write them).
/// Every settled batch of changes sends one message on the returned channel.
pub fn watch(paths: &[PathBuf]) -> Result<(Watch, mpsc::Receiver<()>), String> {
    let (tx, rx) = mpsc::channel(1);
    let mut debouncer = new_debouncer(SETTLE, move |result: DebounceEventResult| {
        if result.is_ok() {
            // A full channel already holds a pending reload, which will read these changes too.
            let _ = tx.try_send(());
        }
    })
    .map_err(|e| format!("starting the file watcher: {e}"))?;
    for path in paths {
        let (target, mode) = if path.is_dir() {
            (path.as_path(), RecursiveMode::Recursive)
        } else {
            (path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")), RecursiveMode::NonRecursive)
        };
        debouncer.watcher().watch(target, mode).map_err(|e| format!("watching {}: {e}", target.display()))?;
    }
    Ok((Watch { _debouncer: debouncer }, rx))
}
