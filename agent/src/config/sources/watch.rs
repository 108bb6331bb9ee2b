//! Watches the configuration files and directories, and says when they have changed and settled.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// A change is acted on once no other has followed for this long (a file written in several steps is read once,
/// whole).
const SETTLE: Duration = Duration::from_millis(250);

/// The watch; dropping it stops watching.
pub struct Watch {
    _watcher: RecommendedWatcher,
}

/// Starts watching `paths` (a file through its directory, since editors replace files rather than write them).
/// Every settled batch of changes sends one message on the returned channel. Reads are not changes: the agent's
/// own reading of the files must not set off another reload.
pub fn watch(paths: &[PathBuf]) -> Result<(Watch, mpsc::Receiver<()>), String> {
    let (raw_sender, mut raw) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<Event>| {
        if let Ok(event) = event {
            if !matches!(event.kind, EventKind::Access(_)) {
                let _ = raw_sender.send(());
            }
        }
    })
    .map_err(|e| format!("starting the file watcher: {e}"))?;
    for path in paths {
        let (target, mode) = if path.is_dir() {
            (path.as_path(), RecursiveMode::Recursive)
        } else {
            (path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")), RecursiveMode::NonRecursive)
        };
        watcher.watch(target, mode).map_err(|e| format!("watching {}: {e}", target.display()))?;
    }
    let (settled, receiver) = mpsc::channel(1);
    tokio::spawn(async move {
        while raw.recv().await.is_some() {
            // Wait for quiet: every further change restarts the wait.
            while let Ok(Some(())) = tokio::time::timeout(SETTLE, raw.recv()).await {}
            if settled.send(()).await.is_err() {
                return;
            }
        }
    });
    Ok((Watch { _watcher: watcher }, receiver))
}
