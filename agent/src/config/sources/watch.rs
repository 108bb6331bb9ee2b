//! Watches the configuration files and directories, and says when they have changed and settled.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// A change is acted on once no other has followed for this long (a file written in several steps is read once,
/// whole).
const SETTLE: Duration = Duration::from_millis(250);

/// The watch; dropping it stops watching.
pub struct Watch {
    _watcher: Arc<Mutex<RecommendedWatcher>>,
}

/// Starts watching `paths`: a directory recursively, and through its parent, so that one removed and made again
/// (a ConfigMap volume swapped, a directory replaced) is seen coming back and watched again; a file through its
/// directory, since editors (and ConfigMap volumes) replace files rather than write them. Every settled batch of
/// changes sends one message on the returned channel. Reads are not changes: the agent's own reading of the files
/// must not set off another reload.
pub fn watch(paths: &[PathBuf]) -> Result<(Watch, mpsc::Receiver<()>), String> {
    // Absolute, so that the changes reported (under the paths watched) compare with them.
    let paths: Vec<PathBuf> =
        paths.iter().map(|path| std::path::absolute(path).unwrap_or_else(|_| path.clone())).collect();
    let (raw_sender, mut raw) = mpsc::unbounded_channel();
    let files: Vec<PathBuf> = paths.iter().filter(|path| path.is_file()).cloned().collect();
    let watched = paths.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<Event>| {
        if let Ok(event) = event {
            if !matches!(event.kind, EventKind::Access(_)) && event.paths.iter().any(|p| concerns(p, &watched, &files))
            {
                let _ = raw_sender.send(());
            }
        }
    })
    .map_err(|e| format!("starting the file watcher: {e}"))?;
    for path in &paths {
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        if path.is_dir() {
            watcher.watch(path, RecursiveMode::Recursive).map_err(|e| format!("watching {}: {e}", path.display()))?;
            // Best effort: a directory whose parent cannot be watched is still watched itself.
            let _ = watcher.watch(parent, RecursiveMode::NonRecursive);
        } else {
            watcher
                .watch(parent, RecursiveMode::NonRecursive)
                .map_err(|e| format!("watching {}: {e}", parent.display()))?;
        }
    }
    let watcher = Arc::new(Mutex::new(watcher));
    let rearm = (watcher.clone(), paths);
    let (settled, receiver) = mpsc::channel(1);
    tokio::spawn(async move {
        while raw.recv().await.is_some() {
            // Wait for quiet: every further change restarts the wait.
            while let Ok(Some(())) = tokio::time::timeout(SETTLE, raw.recv()).await {}
            // A directory made again is a new inode: watched anew (a directory still watched is left as it is).
            for path in rearm.1.iter().filter(|path| path.is_dir()) {
                let _ = rearm.0.lock().unwrap_or_else(PoisonError::into_inner).watch(path, RecursiveMode::Recursive);
            }
            if settled.send(()).await.is_err() {
                return;
            }
        }
    });
    Ok((Watch { _watcher: watcher }, receiver))
}

/// Whether a change at `changed` can change what the configuration reads: anything under a watched path (or the
/// path itself, removed or made), and for a file, anything beside it (a ConfigMap volume swaps the `..data` link
/// its files resolve through).
fn concerns(changed: &Path, watched: &[PathBuf], files: &[PathBuf]) -> bool {
    watched.iter().any(|path| changed.starts_with(path)) || files.iter().any(|file| changed.parent() == file.parent())
}
