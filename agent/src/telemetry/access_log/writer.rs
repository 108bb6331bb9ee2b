//! Where access-log lines are written: standard output, or a file kept open and reopened when the configuration
//! names another, when SIGHUP asks (logrotate's `postrotate`), or when the path no longer leads to the open file
//! (renamed or removed by a rotation: checked at most once a second). Lines are written in batches, off the
//! requests' path; one that cannot be written is counted, never retried forever.

use std::{
    fs::OpenOptions,
    io::{BufWriter, Write},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use super::REOPEN;

/// How often the path is looked at to see whether the open file was rotated away.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// The writer's current output.
pub struct Sink {
    path: Option<PathBuf>,
    out: Option<BufWriter<Box<dyn Write + Send>>>,
    /// The open file's device and inode, to tell when the path leads elsewhere.
    identity: Option<(u64, u64)>,
    checked: Instant,
    /// The last open failed: tried again once `CHECK_EVERY` has passed, not for every line.
    failed: bool,
}

impl Default for Sink {
    fn default() -> Self {
        Sink { path: None, out: None, identity: None, checked: Instant::now(), failed: false }
    }
}

impl Sink {
    /// Makes the output the one `wanted` names, reopening as needed; `false` if there is none to write to.
    pub fn ready(&mut self, wanted: Option<&Path>) -> bool {
        let Some(wanted) = wanted else {
            self.close();
            return false;
        };
        let retry = self.out.is_none() && !(self.failed && self.checked.elapsed() < CHECK_EVERY);
        let reopen =
            REOPEN.swap(false, Ordering::Relaxed) || self.path.as_deref() != Some(wanted) || retry || self.rotated();
        if reopen {
            self.open(wanted);
        }
        self.out.is_some()
    }

    pub fn write(&mut self, line: &str) -> std::io::Result<()> {
        match &mut self.out {
            Some(out) => out.write_all(line.as_bytes()),
            None => Ok(()),
        }
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.out {
            Some(out) => out.flush(),
            None => Ok(()),
        }
    }

    /// Whether the path now leads to another file than the open one (or to none).
    fn rotated(&mut self) -> bool {
        let (Some(path), Some(identity)) = (&self.path, self.identity) else { return false };
        if self.checked.elapsed() < CHECK_EVERY {
            return false;
        }
        self.checked = Instant::now();
        std::fs::metadata(path).map_or(true, |metadata| (metadata.dev(), metadata.ino()) != identity)
    }

    fn open(&mut self, wanted: &Path) {
        self.close();
        self.path = Some(wanted.to_owned());
        self.checked = Instant::now();
        self.failed = false;
        if wanted == Path::new("/dev/stdout") {
            self.out = Some(BufWriter::with_capacity(64 * 1024, Box::new(std::io::stdout())));
            return;
        }
        match OpenOptions::new().create(true).append(true).open(wanted) {
            Ok(file) => {
                self.identity = file.metadata().ok().map(|metadata| (metadata.dev(), metadata.ino()));
                self.out = Some(BufWriter::with_capacity(64 * 1024, Box::new(file) as Box<dyn Write + Send>));
            }
            Err(error) => {
                self.failed = true;
                tracing::error!(path = %wanted.display(), %error, "cannot open the access log; its lines are dropped until it can be");
            }
        }
    }

    fn close(&mut self) {
        if let Some(mut out) = self.out.take() {
            let _ = out.flush();
        }
        self.identity = None;
    }
}
