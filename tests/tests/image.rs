//! The agent's OCI image (`cargo xtask image` writes it with `sluice_tests::image`): reproducible, read by umoci
//! (Debian's) as any OCI image, holding the binary and the libraries it links and nothing else, and the binary runs
//! from the unpacked root filesystem. The DaemonSet names it by its reference.

use std::{path::Path, process::Command};

use sluice_tests::{agent::binary, image, require_root};

fn files_under(root: &Path) -> Vec<String> {
    let mut files = Vec::new();
    let mut pending = vec![root.to_owned()];
    while let Some(directory) = pending.pop() {
        for entry in std::fs::read_dir(&directory).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                files.push(format!("/{}", path.strip_prefix(root).unwrap().display()));
            }
        }
    }
    files.sort();
    files
}

#[test]
fn the_image_is_reproducible_holds_only_the_agent_and_runs_from_its_own_root_filesystem() {
    // chroot needs root.
    require_root();
    let (first, second) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let built = image::build(&binary(), first.path()).unwrap();
    let again = image::build(&binary(), second.path()).unwrap();
    assert_eq!(built.reference, format!("sluice:{}", env!("CARGO_PKG_VERSION")));
    assert_eq!(built.digest, again.digest, "the same binary, the same image");
    assert!(
        std::fs::read(&built.archive).unwrap() == std::fs::read(&again.archive).unwrap(),
        "the archives differ byte for byte"
    );

    // umoci reads the layout by its tag, checks every blob's digest, and lays out a runtime bundle.
    let bundle = first.path().join("bundle");
    let layout = format!("{}:{}", built.layout.display(), image::tag());
    let unpacked = Command::new("umoci").args(["unpack", "--image", &layout]).arg(&bundle).output().unwrap();
    assert!(unpacked.status.success(), "umoci unpack: {}", String::from_utf8_lossy(&unpacked.stderr));
    let rootfs = bundle.join("rootfs");
    // The binary and what it links: no shell, no package manager, nothing else.
    let files = files_under(&rootfs);
    assert_eq!(files, built.files, "{files:?}");
    assert!(files.contains(&image::ENTRYPOINT.to_owned()), "{files:?}");
    assert!(files.iter().any(|file| file.contains("libc.so")), "the C library it links is in the image: {files:?}");
    assert!(!rootfs.join("bin/sh").exists());
    let spec: serde_json::Value = serde_json::from_slice(&std::fs::read(bundle.join("config.json")).unwrap()).unwrap();
    assert_eq!(spec["process"]["args"], serde_json::json!([image::ENTRYPOINT, "run"]), "{spec}");

    let chrooted = |args: &[&str]| {
        let output = Command::new("chroot").arg(&rootfs).arg(image::ENTRYPOINT).args(args).output().unwrap();
        let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "sluice {args:?} in the image: {text}");
        text
    };
    assert_eq!(chrooted(&["--version"]), format!("sluice {}\n", env!("CARGO_PKG_VERSION")));
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/seeds");
    let copied = Command::new("cp").arg("-r").arg(&seeds).arg(rootfs.join("tmp/seeds")).status().unwrap();
    assert!(copied.success());
    let checked = chrooted(&["check", "/tmp/seeds"]);
    assert!(checked.contains(" resources valid, 0 errors"), "{checked}");

    // The DaemonSet runs this image.
    let daemonset =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/base/daemonset.yaml")).unwrap();
    assert!(
        daemonset.contains(&format!("image: {}\n", built.reference)),
        "the DaemonSet's image is not {}",
        built.reference
    );
}
