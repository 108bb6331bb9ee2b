//! Watches the certificate and key files the configuration names (Gateway servers' `serverCertificate`,
//! `privateKey`, `caCertificates`; DestinationRules' `clientCertificate`, …), wherever they are: a file rotated in
//! place is read again for new handshakes, as Istio's agent reloads the file-mounted certificates it serves. The
//! files change with the configuration, so the watch follows them.

use std::path::PathBuf;

use tokio::sync::mpsc;

use crate::config::sources::watch as file_watch;

pub struct CertificateWatch {
    /// The files watched: those the configuration names whose directory exists.
    files: Vec<PathBuf>,
    _watch: Option<file_watch::Watch>,
    changes: mpsc::Receiver<()>,
}

impl CertificateWatch {
    /// Watching `files`.
    pub fn new(files: Vec<PathBuf>) -> CertificateWatch {
        let mut watch = CertificateWatch { files: Vec::new(), _watch: None, changes: mpsc::channel(1).1 };
        watch.follow(files);
        watch
    }

    /// Watches `files` from now on, if they are not the files watched already. A file is watched through its
    /// directory (a Secret volume swaps a link there); one in no directory that exists yet cannot be read either
    /// (the configuration's compile says so), and is watched once a later reload finds its directory.
    pub fn follow(&mut self, mut files: Vec<PathBuf>) {
        // A relative name is read from the agent's working directory.
        files.retain(|file| file.parent().is_some_and(|dir| dir.as_os_str().is_empty() || dir.is_dir()));
        if files == self.files {
            return;
        }
        (self._watch, self.changes) = match files.is_empty() {
            true => (None, mpsc::channel(1).1),
            false => match file_watch::watch(&files) {
                Ok((watch, changes)) => (Some(watch), changes),
                Err(error) => {
                    tracing::warn!(%error, "the certificate files are read again only when the configuration changes");
                    (None, mpsc::channel(1).1)
                }
            },
        };
        self.files = files;
    }

    /// When one of the files has changed (and settled); never while none is watched.
    pub async fn changed(&mut self) {
        if self.changes.recv().await.is_none() {
            std::future::pending::<()>().await;
        }
    }
}
