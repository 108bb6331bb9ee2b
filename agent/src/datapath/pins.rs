//! The pins under bpffs that let the kernel keep enforcing without the agent: the maps (by name), the program,
//! and one TCX link per intercepted interface.

use std::{
    io,
    path::{Path, PathBuf},
};

use aya::programs::{links::FdLink, tc::SchedClassifierLink, SchedClassifier};
use sluice_common::names;

use super::DatapathError;

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/sluice";
const BPFFS_MOUNT: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const LINK_PREFIX: &str = "link_";
const PROGRAM_PIN: &str = "prog_sluice_ingress";

pub(super) struct PinDir {
    path: PathBuf,
}

impl PinDir {
    /// Makes sure `path` exists on a bpf filesystem, mounting one at /sys/fs/bpf if that is where it belongs.
    pub(super) fn prepare(path: &Path) -> Result<Self, DatapathError> {
        let parent = path.parent().unwrap_or(Path::new("/"));
        if !is_bpffs(parent) {
            if parent == Path::new(BPFFS_MOUNT) {
                std::fs::create_dir_all(BPFFS_MOUNT)
                    .map_err(|e| DatapathError::Bpffs(format!("creating {BPFFS_MOUNT}: {e}")))?;
                nix::mount::mount(Some("bpf"), BPFFS_MOUNT, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
                    .map_err(|e| {
                        DatapathError::Bpffs(format!(
                            "mounting a bpf filesystem on {BPFFS_MOUNT}: {e} (mount it by hand: mount -t bpf bpf {BPFFS_MOUNT})"
                        ))
                    })?;
                tracing::info!(path = BPFFS_MOUNT, "mounted a bpf filesystem");
            } else {
                return Err(DatapathError::Bpffs(format!(
                    "{} is not on a bpf filesystem: mount one with `mount -t bpf bpf {}` or choose another --bpffs",
                    path.display(),
                    parent.display()
                )));
            }
        }
        std::fs::create_dir_all(path)
            .map_err(|e| DatapathError::Bpffs(format!("creating the pin directory {}: {e}", path.display())))?;
        Ok(PinDir { path: path.to_owned() })
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the pins of maps whose layout (type, key size, value size, entries) is not the one `object`
    /// defines: an earlier version's, which the classifier could not use. New ones are made in their place; the
    /// classifier still attached holds the old maps (and keeps enforcing with them) until this agent's replaces it.
    pub(super) fn unpin_incompatible_maps(&self, object: &[u8]) -> Result<Vec<String>, DatapathError> {
        let object = aya_obj::Object::parse(object)
            .map_err(|e| DatapathError::Bpffs(format!("reading the classifier's maps from its object: {e}")))?;
        let mut replaced = Vec::new();
        for (name, map) in &object.maps {
            let path = self.path.join(name);
            let Ok(pinned) = aya::maps::MapInfo::from_pin(&path) else { continue };
            let pinned_type = pinned.map_type().ok().map(|map_type| map_type as u32);
            if (pinned_type, pinned.key_size(), pinned.value_size(), pinned.max_entries())
                != (Some(map.map_type()), map.key_size(), map.value_size(), map.max_entries())
            {
                remove_pin(&path)?;
                replaced.push(name.clone());
            }
        }
        replaced.sort();
        Ok(replaced)
    }

    /// Whether a map named `name` is pinned here (a previous agent's).
    pub(super) fn has_map(&self, name: &str) -> bool {
        aya::maps::MapInfo::from_pin(self.path.join(name)).is_ok()
    }

    /// Removes the link pinned for `interface`, which detaches the classifier from whatever it holds.
    pub(super) fn unpin_link(&self, interface: &str) -> Result<(), DatapathError> {
        remove_pin(&self.link(interface))
    }

    pub(super) fn link(&self, interface: &str) -> PathBuf {
        self.path.join(format!("{LINK_PREFIX}{interface}"))
    }

    /// Pins the freshly loaded program, replacing the pin of the program it succeeds.
    pub(super) fn pin_program(&self, program: &mut SchedClassifier) -> Result<(), DatapathError> {
        let path = self.path.join(PROGRAM_PIN);
        remove_pin(&path)?;
        program.pin(&path).map_err(|e| pin_error("pinning program", &path, e))
    }

    /// Pins `link` at `path`, replacing whatever was pinned there (the same link, when it was adopted).
    pub(super) fn pin_link(&self, link: SchedClassifierLink, path: &Path) -> Result<(), DatapathError> {
        let link = FdLink::try_from(link).map_err(|e| pin_error("pinning link", path, e))?;
        remove_pin(path)?;
        // The pin holds the link; our descriptor closes when the returned handle drops.
        link.pin(path).map(drop).map_err(|e| pin_error("pinning link", path, e))
    }

    /// Removes the link pins of interfaces not in `keep`, which detaches the classifier from them.
    pub(super) fn unpin_links_except(&self, keep: &[String]) -> Result<Vec<String>, DatapathError> {
        let mut removed = Vec::new();
        for (interface, path) in link_pins(&self.path)? {
            if !keep.contains(&interface) {
                remove_pin(&path)?;
                removed.push(interface);
            }
        }
        Ok(removed)
    }
}

/// Removes every pin under `path` — links first (which detaches the classifier), then the program and the maps
/// — and the directory. Returns what was removed; a missing directory is not an error.
pub fn cleanup(path: &Path) -> Result<Vec<String>, DatapathError> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let mut removed = Vec::new();
    for (interface, pin) in link_pins(path)? {
        remove_pin(&pin)?;
        removed.push(format!("link {interface}"));
    }
    for name in std::iter::once(PROGRAM_PIN).chain(names::MAPS) {
        let pin = path.join(name);
        if pin.exists() {
            remove_pin(&pin)?;
            removed.push(name.to_owned());
        }
    }
    match std::fs::remove_dir(path) {
        Ok(()) => Ok(removed),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(removed),
        Err(e) => Err(DatapathError::Pin { what: "removing", path: path.display().to_string(), error: e.to_string() }),
    }
}

fn link_pins(dir: &Path) -> Result<Vec<(String, PathBuf)>, DatapathError> {
    let entries = std::fs::read_dir(dir).map_err(|e| DatapathError::Pin {
        what: "reading",
        path: dir.display().to_string(),
        error: e.to_string(),
    })?;
    Ok(entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            Some((name.strip_prefix(LINK_PREFIX)?.to_owned(), entry.path()))
        })
        .collect())
}

fn remove_pin(path: &Path) -> Result<(), DatapathError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => {
            Err(DatapathError::Pin { what: "removing pin", path: path.display().to_string(), error: e.to_string() })
        }
    }
}

fn pin_error(what: &'static str, path: &Path, error: impl std::fmt::Display) -> DatapathError {
    DatapathError::Pin { what, path: path.display().to_string(), error: error.to_string() }
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|fs| fs.filesystem_type().0 == BPF_FS_MAGIC)
}
