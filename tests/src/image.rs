//! The agent as an OCI image (`cargo xtask image`, and the test that unpacks it): the binary and the shared
//! libraries it links, nothing else — no shell, no package manager — in one layer, written as an OCI image layout
//! and as an archive of it (`oci-archive:`), which skopeo, umoci, podman and `ctr image import` read.
//! The binary is stripped of its debug information (`strip`, Debian's binutils). Reproducible: the same binary
//! gives the same digests. Every time, owner and order the build machine would put
//! in a tar or gzip header is fixed (GNU tar's `--sort`, `--mtime`, `--owner`; `gzip -n`), and the image's
//! creation time is the epoch.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, ensure, Context};
use serde_json::{json, Value};

/// The image's name; its tag is the agent's version.
pub const NAME: &str = "sluice";
/// Where the binary is in the image (the DaemonSet's `args` follow this entrypoint).
pub const ENTRYPOINT: &str = "/usr/local/bin/sluice";
const EPOCH: &str = "1970-01-01T00:00:00Z";

/// An image written by [`build`].
#[derive(Debug)]
pub struct Image {
    /// `sluice:VERSION`, as the DaemonSet names it.
    pub reference: String,
    /// The OCI image layout directory (`oci:DIR:VERSION`).
    pub layout: PathBuf,
    /// The same as one tar file (`oci-archive:FILE`).
    pub archive: PathBuf,
    /// The manifest's digest (`sha256:…`): the image's identity.
    pub digest: String,
    /// What the layer holds, by path in the image.
    pub files: Vec<String>,
}

/// The image's tag: the agent's version.
pub fn tag() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// Writes the image of `binary` under `out` (`out/oci/`, `out/sluice-VERSION.oci.tar`), replacing what was there.
pub fn build(binary: &Path, out: &Path) -> anyhow::Result<Image> {
    ensure!(binary.is_file(), "no agent binary at {}", binary.display());
    let work = out.join("work");
    let (rootfs, layout) = (work.join("rootfs"), out.join("oci"));
    for stale in [&work, &layout] {
        if stale.exists() {
            fs::remove_dir_all(stale).with_context(|| format!("removing {}", stale.display()))?;
        }
    }
    let files = stage(binary, &rootfs)?;

    let layer_tar = work.join("layer.tar");
    let top: Vec<String> = sorted_entries(&rootfs)?;
    tar(&rootfs, &top, &layer_tar)?;
    let gzip = Command::new("gzip")
        .args(["-n", "-6", "-c"])
        .arg(&layer_tar)
        .output()
        .context("running gzip (Debian's gzip package)")?;
    ensure!(gzip.status.success(), "gzip failed: {}", String::from_utf8_lossy(&gzip.stderr));
    let layer = gzip.stdout;
    let diff_id = sha256(&fs::read(&layer_tar)?);

    let blobs = layout.join("blobs/sha256");
    fs::create_dir_all(&blobs)?;
    let layer_descriptor = blob(&blobs, "application/vnd.oci.image.layer.v1.tar+gzip", &layer)?;
    let config = json!({
        "architecture": architecture()?,
        "os": "linux",
        "created": EPOCH,
        "config": {
            "Entrypoint": [ENTRYPOINT],
            "Cmd": ["run"],
            "Env": ["PATH=/usr/local/bin"],
            "Labels": {
                "org.opencontainers.image.title": NAME,
                "org.opencontainers.image.version": tag(),
                "org.opencontainers.image.description": "Sluice: an eBPF-accelerated egress gateway node agent",
            },
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": EPOCH, "created_by": "cargo xtask image"}],
    });
    let config_descriptor = blob(&blobs, "application/vnd.oci.image.config.v1+json", &to_bytes(&config))?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_descriptor,
        "layers": [layer_descriptor],
    });
    let mut manifest_descriptor = blob(&blobs, "application/vnd.oci.image.manifest.v1+json", &to_bytes(&manifest))?;
    let reference = format!("{NAME}:{}", tag());
    manifest_descriptor["annotations"] = json!({
        // The tag, as skopeo (`oci:DIR:TAG`) and umoci (`--image DIR:TAG`) look it up…
        "org.opencontainers.image.ref.name": tag(),
        // …and the whole name, as containerd's `ctr image import` names what it imports.
        "io.containerd.image.name": format!("docker.io/library/{reference}"),
    });
    let digest = manifest_descriptor["digest"].as_str().unwrap_or_default().to_owned();
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [manifest_descriptor],
    });
    fs::write(layout.join("index.json"), to_bytes(&index))?;
    fs::write(layout.join("oci-layout"), to_bytes(&json!({"imageLayoutVersion": "1.0.0"})))?;

    let archive = out.join(format!("{NAME}-{}.oci.tar", tag()));
    tar(&layout, &sorted_entries(&layout)?, &archive)?;
    fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    Ok(Image { reference, layout, archive, digest, files })
}

/// Lays out the image's root filesystem: the binary, the libraries and loader it links (as `ldd` finds them),
/// and the empty directories a runtime mounts over. Returns the files, by path.
fn stage(binary: &Path, rootfs: &Path) -> anyhow::Result<Vec<String>> {
    let mut files = vec![(binary.to_owned(), ENTRYPOINT.to_owned())];
    for library in linked_libraries(binary)? {
        let path = library.to_string_lossy().into_owned();
        files.push((library, path));
    }
    let mut staged = Vec::new();
    for (from, to) in files {
        let target = rootfs.join(to.trim_start_matches('/'));
        fs::create_dir_all(target.parent().expect("a path in the image has a parent"))?;
        // The file itself, never a symlink: the image has nothing else to point at.
        fs::copy(&from, &target).with_context(|| format!("copying {} into the image", from.display()))?;
        fs::set_permissions(&target, fs::Permissions::from_mode(0o755))?;
        staged.push(to);
    }
    // Without its debug information (the release profile keeps it, for profiling on the build machine): 143 MB →
    // 27 MB. Its symbols stay, so a backtrace still names functions.
    let entrypoint = rootfs.join(ENTRYPOINT.trim_start_matches('/'));
    let stripped = Command::new("strip").arg("--strip-debug").arg(&entrypoint).status().context("running strip")?;
    ensure!(stripped.success(), "strip --strip-debug {} failed: {stripped}", entrypoint.display());
    for directory in ["etc", "tmp", "proc", "sys", "dev"] {
        fs::create_dir_all(rootfs.join(directory))?;
    }
    fs::set_permissions(rootfs.join("tmp"), fs::Permissions::from_mode(0o1777))?;
    set_directory_modes(rootfs)?;
    staged.sort();
    Ok(staged)
}

/// The shared libraries and the dynamic loader `binary` needs, by the paths it asks for (`ldd`, from Debian's
/// libc-bin); none for a static binary.
fn linked_libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let output = Command::new("ldd").arg(binary).output().context("running ldd")?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        // A static binary: "not a dynamic executable".
        ensure!(text.contains("not a dynamic") || String::from_utf8_lossy(&output.stderr).contains("not a dynamic"));
        return Ok(Vec::new());
    }
    let mut libraries = Vec::new();
    for line in text.lines().map(str::trim) {
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)`, or the loader: `/lib64/ld-linux-x86-64.so.2 (0x…)`.
        let path = match line.split_once(" => ") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next().filter(|word| word.starts_with('/')),
        };
        match path {
            Some(path) if path.starts_with('/') => libraries.push(PathBuf::from(path)),
            Some(missing) if line.contains("not found") => {
                bail!("{} links {missing}, which is not found", binary.display())
            }
            _ => {} // linux-vdso.so.1: the kernel's.
        }
    }
    Ok(libraries)
}

/// Directories 0755, whatever the umask made them (tmp aside).
fn set_directory_modes(directory: &Path) -> anyhow::Result<()> {
    for entry in fs::read_dir(directory)? {
        let path = entry?.path();
        if path.is_dir() && !path.is_symlink() {
            if path.file_name().is_some_and(|name| name != "tmp") {
                fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
            }
            set_directory_modes(&path)?;
        }
    }
    Ok(())
}

fn sorted_entries(directory: &Path) -> anyhow::Result<Vec<String>> {
    let mut names: Vec<String> = fs::read_dir(directory)?
        .map(|entry| Ok(entry?.file_name().to_string_lossy().into_owned()))
        .collect::<anyhow::Result<_>>()?;
    names.sort();
    Ok(names)
}

/// A tar of `entries` of `directory` that depends on nothing but their contents, names and modes.
fn tar(directory: &Path, entries: &[String], into: &Path) -> anyhow::Result<()> {
    let status = Command::new("tar")
        .args(["--create", "--format=gnu", "--sort=name", "--mtime=@0", "--owner=0", "--group=0", "--numeric-owner"])
        .args(["--no-acls", "--no-xattrs", "--no-selinux", "--file"])
        .arg(into)
        .arg("--directory")
        .arg(directory)
        .args(entries)
        .status()
        .context("running GNU tar")?;
    ensure!(status.success(), "tar of {} failed: {status}", directory.display());
    Ok(())
}

/// Writes `bytes` as a blob of the layout; its descriptor.
fn blob(blobs: &Path, media_type: &str, bytes: &[u8]) -> anyhow::Result<Value> {
    let digest = sha256(bytes);
    fs::write(blobs.join(digest.trim_start_matches("sha256:")), bytes)?;
    Ok(json!({"mediaType": media_type, "digest": digest, "size": bytes.len()}))
}

fn sha256(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let hex: String = digest.as_ref().iter().map(|byte| format!("{byte:02x}")).collect();
    format!("sha256:{hex}")
}

/// JSON with its keys in order (serde_json's maps are sorted), no whitespace: the same bytes every time.
fn to_bytes(value: &Value) -> Vec<u8> {
    serde_json::to_vec(value).expect("JSON values serialize")
}

/// The OCI name of this machine's architecture (the binary's).
fn architecture() -> anyhow::Result<&'static str> {
    Ok(match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => bail!("no OCI architecture name for {other}"),
    })
}
