//! `cargo xtask image`: the release agent as an OCI image (`sluice_tests::image` writes it: the test that unpacks
//! and runs it uses the same code), its reference and digest printed.

use std::path::PathBuf;

use crate::build::{self, Profile};

/// Builds the release agent (unless `binary` is given) and writes its image under `out` (target/image).
pub fn run(binary: Option<PathBuf>, out: Option<PathBuf>) -> anyhow::Result<()> {
    let binary = match binary {
        Some(binary) => binary,
        None => {
            crate::deps::install()?;
            build::all(Profile::Release)?;
            build::agent_binary(Profile::Release)
        }
    };
    let out = out.unwrap_or_else(|| crate::root().join("target/image"));
    let image = sluice_tests::image::build(&binary, &out)?;
    // The reference first: the DaemonSet names the image by it.
    println!("{}", image.reference);
    println!("digest:  {}", image.digest);
    println!("layout:  {} (oci:{}:{})", image.layout.display(), image.layout.display(), sluice_tests::image::tag());
    println!("archive: {} (oci-archive:)", image.archive.display());
    println!("files:   {}", image.files.join(" "));
    Ok(())
}
