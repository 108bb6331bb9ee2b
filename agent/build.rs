//! Finds the eBPF object that `cargo xtask build` makes, so the agent can embed it.

use std::path::PathBuf;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(sluice_ebpf_missing)");
    println!("cargo::rerun-if-env-changed=SLUICE_EBPF_OBJECT");
    let object = match std::env::var_os("SLUICE_EBPF_OBJECT") {
        Some(path) => PathBuf::from(path),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/ebpf/bpfel-unknown-none/release/sluice"),
    };
    println!("cargo::rerun-if-changed={}", object.display());
    if object.is_file() {
        println!("cargo::rustc-env=SLUICE_EBPF_OBJECT={}", object.display());
    } else {
        // src/datapath/object.rs turns this into one compile error that says what to run.
        println!("cargo::rustc-cfg=sluice_ebpf_missing");
        println!("cargo::warning=eBPF object not found at {}: run `cargo xtask build`", object.display());
    }
}
