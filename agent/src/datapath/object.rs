//! The classifier's object file, embedded at build time.

#[cfg(sluice_ebpf_missing)]
compile_error!(
    "the eBPF object is missing: run `cargo xtask build` (it installs the eBPF toolchain with \
     `cargo xtask deps` if needed, then builds the object and the agent)"
);

#[cfg(not(sluice_ebpf_missing))]
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("SLUICE_EBPF_OBJECT"));

#[cfg(sluice_ebpf_missing)]
pub static OBJECT: &[u8] = &[];
