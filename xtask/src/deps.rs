//! Installs, idempotently, what building and testing Sluice need on a Debian machine.

use std::{path::Path, process::Command};

use anyhow::{bail, Context};

/// Debian's Rust with a prebuilt `core` for the BPF targets, and the LLVM bpf-linker links against.
const BPF_TOOLCHAIN_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
];
/// Programs the tests and the sandbox run, and the package of each.
const PEERS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("sysctl", "procps"),
    ("curl", "curl"),
    ("nginx", "nginx-light"),
    ("dnsmasq", "dnsmasq-base"),
    ("nft", "nftables"),
    ("prometheus", "prometheus"),
    ("h2load", "nghttp2-client"),
    ("openssl", "openssl"),
    ("psql", "postgresql-client"),
    // An origin the HTTP/1.1 upstream tests reuse connections to (and a peer the bench compares with).
    ("haproxy", "haproxy"),
    // `kubectl kustomize` renders deploy/ for the manifests' test.
    ("kubectl", "kubernetes-client"),
    // Unpacks the agent's OCI image for the image's test, as a runtime would; `strip` takes the debug information
    // out of the binary it holds.
    ("umoci", "umoci"),
    ("strip", "binutils"),
];
/// The Kubernetes API's schemas, bundled, for validating the rendered manifests offline (PyPI).
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";
/// Istio's CRD schemas, compiled (npm), and a YAML reader, for validating the examples against what Istio's API
/// server accepts (tests/tools/validate-istio.mjs).
const ISTIO_SCHEMAS: &[&str] = &["@kubernetes-models/istio@3.0.1", "yaml@2.9.1"];
/// The PostgreSQL server the TCP tests relay psql to: not on `PATH` (Debian keeps it under
/// `/usr/lib/postgresql/VERSION/bin`).
const POSTGRES_SERVER: (&str, &str) = ("/usr/lib/postgresql", "postgresql");
/// The load generator and the proxies `cargo xtask bench` compares Sluice with, besides HAProxy (a test peer).
const BENCH_PEERS: &[(&str, &str)] =
    &[("wrk", "wrk"), ("squid", "squid"), ("taskset", "util-linux"), ("ethtool", "ethtool"), ("iperf3", "iperf3")];
/// nginx's stream module (TLS passed through by `ssl_preread`), which the bench loads: a file, not a program.
const NGINX_STREAM_MODULE: (&str, &str) = ("/usr/lib/nginx/modules/ngx_stream_module.so", "libnginx-mod-stream");
const BPF_LINKER_VERSION: &str = "0.13.0";
pub const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
pub const DEBIAN_CARGO: &str = "/usr/bin/cargo";

pub fn install() -> anyhow::Result<()> {
    let mut packages: Vec<&str> = Vec::new();
    if !Path::new(DEBIAN_RUSTC).is_file() || !Path::new("/usr/lib/rustlib/bpfel-unknown-none").is_dir() {
        packages.extend(BPF_TOOLCHAIN_PACKAGES);
    }
    for (program, package) in PEERS {
        if !on_path(program) && !Path::new("/usr/sbin").join(program).is_file() {
            packages.push(package);
        }
    }
    if !postgres_installed() {
        packages.push(POSTGRES_SERVER.1);
    }
    if !packages.is_empty() {
        apt_install(&packages)?;
    }
    if !bpf_linker_ok() {
        install_bpf_linker()?;
    }
    install_python_tools()?;
    install_node_tools()
}

/// The npm packages, in the workspace's own directory (not the machine's global one).
fn install_node_tools() -> anyhow::Result<()> {
    let tools = sluice_tests::node_tools();
    if tools.join("node_modules/@kubernetes-models/istio").is_dir() && tools.join("node_modules/yaml").is_dir() {
        return Ok(());
    }
    if !on_path("npm") {
        apt_install(&["nodejs", "npm"])?;
    }
    eprintln!("xtask: installing {} from npm into {}", ISTIO_SCHEMAS.join(" "), tools.display());
    std::fs::create_dir_all(&tools)?;
    std::fs::write(tools.join("package.json"), "{\"private\": true}\n")?;
    let by_hand = format!("npm install --prefix {} {}", tools.display(), ISTIO_SCHEMAS.join(" "));
    crate::run(
        Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--loglevel=error", "--prefix"])
            .arg(&tools)
            .args(ISTIO_SCHEMAS),
    )
    .with_context(|| format!("installing Istio's schemas (is the npm registry reachable?); by hand: {by_hand}"))
}

/// The PyPI tools, in the workspace's own virtual environment.
fn install_python_tools() -> anyhow::Result<()> {
    let venv = sluice_tests::python_tools();
    if venv.join("bin/kubernetes-validate").is_file() {
        return Ok(());
    }
    eprintln!("xtask: installing {KUBERNETES_VALIDATE} from PyPI into {}", venv.display());
    let by_hand = format!("python3 -m venv {0} && {0}/bin/pip install {KUBERNETES_VALIDATE}", venv.display());
    crate::run(Command::new("python3").args(["-m", "venv"]).arg(&venv))
        .and_then(|()| crate::run(Command::new(venv.join("bin/pip")).args(["install", "--quiet", KUBERNETES_VALIDATE])))
        .with_context(|| format!("installing {KUBERNETES_VALIDATE} (is PyPI reachable?); by hand: {by_hand}"))
}

/// What the benchmarks run besides the test peers.
pub fn install_bench_peers() -> anyhow::Result<()> {
    let mut packages: Vec<&str> = BENCH_PEERS
        .iter()
        .filter(|(program, _)| !on_path(program) && !Path::new("/usr/sbin").join(program).is_file())
        .map(|(_, package)| *package)
        .collect();
    if !Path::new(NGINX_STREAM_MODULE.0).is_file() {
        packages.push(NGINX_STREAM_MODULE.1);
    }
    if packages.is_empty() {
        Ok(())
    } else {
        apt_install(&packages)
    }
}

fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    let by_hand = format!("apt-get update && apt-get install -y {}", packages.join(" "));
    if !nix::unistd::geteuid().is_root() {
        bail!("missing Debian packages {}: installing them needs root; run by hand: {by_hand}", packages.join(", "));
    }
    eprintln!("xtask: installing Debian packages: {}", packages.join(" "));
    let update = crate::run(Command::new("apt-get").args(["update", "-q"]));
    let install = update.and_then(|()| {
        crate::run(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(packages)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    });
    install
        .with_context(|| format!("installing Debian packages (is the package registry reachable?); by hand: {by_hand}"))
}

fn bpf_linker_ok() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success() && String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION))
}

fn install_bpf_linker() -> anyhow::Result<()> {
    let llvm = "/usr/lib/llvm-22";
    let path = format!("{llvm}/bin:{}", std::env::var("PATH").unwrap_or_default());
    let by_hand = format!(
        "PATH={llvm}/bin:$PATH LLVM_PREFIX={llvm} cargo install bpf-linker --version {BPF_LINKER_VERSION} \
         --no-default-features --features llvm-22"
    );
    eprintln!("xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)");
    crate::run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("PATH", path)
            .env("LLVM_PREFIX", llvm),
    )
    .with_context(|| format!("installing bpf-linker; by hand: {by_hand}"))
}

fn postgres_installed() -> bool {
    std::fs::read_dir(POSTGRES_SERVER.0)
        .is_ok_and(|versions| versions.flatten().any(|version| version.path().join("bin/postgres").is_file()))
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}
