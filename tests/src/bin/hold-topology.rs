//! Sets up a topology and a bpf mount, prints their names (namespaces, then the mount point, one line), and holds
//! them until it is interrupted: the harness's teardown on signals is tested with it.

fn main() -> anyhow::Result<()> {
    sluice_tests::require_root();
    let topology = sluice_tests::Topology::new()?;
    let bpffs = sluice_tests::agent::Bpffs::mount()?;
    let names = [&topology.workload, &topology.gateway, &topology.internet].map(|netns| netns.name().to_owned());
    println!("{} {}", names.join(" "), bpffs.pin_dir().parent().expect("a mount point").display());
    loop {
        std::thread::park();
    }
}
