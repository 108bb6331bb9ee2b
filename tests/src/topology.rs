//! The egress topology: a workload namespace routes through a gateway namespace (where the agent runs) to an
//! internet namespace holding the external servers.
//!
//! ```text
//!  workload            gateway                       internet
//!  wl0 10.240.1.2 ── gw-wl 10.240.1.1                (servers 203.0.113.10, .20 and 2001:db8:113::10, ::20)
//!                      gw-net 10.240.2.1 ────────── inet0 10.240.2.2
//! ```

use crate::netns::Netns;

/// `host` (one of the addresses below) on `port`.
pub fn addr(host: &str, port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::new(host.parse().expect("an address"), port)
}

pub const WORKLOAD_ADDR: &str = "10.240.1.2";
pub const GATEWAY_WORKLOAD_ADDR: &str = "10.240.1.1";
pub const GATEWAY_INTERNET_ADDR: &str = "10.240.2.1";
pub const INTERNET_ADDR: &str = "10.240.2.2";
/// The gateway's interface facing the workloads: where the classifier is attached.
pub const GATEWAY_WORKLOAD_IFACE: &str = "gw-wl";
/// Addresses of the external servers, all held by the internet namespace.
pub const SERVER_A: &str = "203.0.113.10";
pub const SERVER_B: &str = "203.0.113.20";
pub const SERVER_A_V6: &str = "2001:db8:113::10";
pub const SERVER_B_V6: &str = "2001:db8:113::20";

#[derive(Debug)]
pub struct Topology {
    pub workload: Netns,
    pub gateway: Netns,
    pub internet: Netns,
}

impl Topology {
    /// A topology with unique namespace names, for a test.
    pub fn new() -> anyhow::Result<Topology> {
        Topology::wire(Netns::new("wl")?, Netns::new("gw")?, Netns::new("inet")?)
    }

    /// A topology with fixed names `PREFIX-workload`, `PREFIX-gateway`, `PREFIX-internet` (the sandbox).
    pub fn named(prefix: &str) -> anyhow::Result<Topology> {
        Topology::wire(
            Netns::named(&format!("{prefix}-workload"))?,
            Netns::named(&format!("{prefix}-gateway"))?,
            Netns::named(&format!("{prefix}-internet"))?,
        )
    }

    fn wire(workload: Netns, gateway: Netns, internet: Netns) -> anyhow::Result<Topology> {
        // Links are created inside the namespaces, never in the root namespace.
        link_workload(&workload, &gateway)?;
        gateway.ip(&[
            "link",
            "add",
            "name",
            "gw-net",
            "type",
            "veth",
            "peer",
            "name",
            "inet0",
            "netns",
            internet.name(),
        ])?;

        gateway.ip(&["addr", "add", &format!("{GATEWAY_INTERNET_ADDR}/24"), "dev", "gw-net"])?;
        gateway.ip(&["addr", "add", "fd00:240:2::1/64", "dev", "gw-net", "nodad"])?;
        gateway.ip(&["link", "set", "dev", "gw-net", "up"])?;
        gateway.ip(&["route", "add", "203.0.113.0/24", "via", INTERNET_ADDR])?;
        gateway.ip(&["-6", "route", "add", "2001:db8:113::/64", "via", "fd00:240:2::2"])?;
        gateway.sysctl("net.ipv4.ip_forward", "1")?;
        gateway.sysctl("net.ipv6.conf.all.forwarding", "1")?;

        internet.ip(&["addr", "add", &format!("{INTERNET_ADDR}/24"), "dev", "inet0"])?;
        internet.ip(&["addr", "add", "fd00:240:2::2/64", "dev", "inet0", "nodad"])?;
        for server in [SERVER_A, SERVER_B] {
            internet.ip(&["addr", "add", &format!("{server}/32"), "dev", "lo"])?;
        }
        for server in [SERVER_A_V6, SERVER_B_V6] {
            internet.ip(&["addr", "add", &format!("{server}/128"), "dev", "lo"])?;
        }
        internet.ip(&["link", "set", "dev", "inet0", "up"])?;
        internet.ip(&["route", "add", "default", "via", GATEWAY_INTERNET_ADDR])?;
        internet.ip(&["-6", "route", "add", "default", "via", "fd00:240:2::1"])?;

        // Until the kernel's link watcher marks a link operationally up (up to a second after carrier), it
        // drops what is sent on it: wait for that, so the first packet of a test is not lost.
        for (netns, interface) in
            [(&workload, "wl0"), (&gateway, GATEWAY_WORKLOAD_IFACE), (&gateway, "gw-net"), (&internet, "inet0")]
        {
            wait_operationally_up(netns, interface)?;
        }
        Ok(Topology { workload, gateway, internet })
    }

    /// Deletes the link between the workload and the gateway (both ends), as a CNI restart or a re-plumbed veth
    /// does.
    pub fn remove_workload_link(&self) -> anyhow::Result<()> {
        self.gateway.ip(&["link", "del", "dev", GATEWAY_WORKLOAD_IFACE])
    }

    /// Creates the link between the workload and the gateway again, as it was (a new interface, a new index).
    pub fn add_workload_link(&self) -> anyhow::Result<()> {
        link_workload(&self.workload, &self.gateway)?;
        wait_operationally_up(&self.workload, "wl0")?;
        wait_operationally_up(&self.gateway, GATEWAY_WORKLOAD_IFACE)
    }
}

/// The veth pair `wl0` (workload) – `gw-wl` (gateway), addressed, routed and set up (not yet operational).
fn link_workload(workload: &Netns, gateway: &Netns) -> anyhow::Result<()> {
    workload.ip(&[
        "link",
        "add",
        "name",
        "wl0",
        "type",
        "veth",
        "peer",
        "name",
        GATEWAY_WORKLOAD_IFACE,
        "netns",
        gateway.name(),
    ])?;
    workload.ip(&["addr", "add", &format!("{WORKLOAD_ADDR}/24"), "dev", "wl0"])?;
    workload.ip(&["addr", "add", "fd00:240:1::2/64", "dev", "wl0", "nodad"])?;
    workload.ip(&["link", "set", "dev", "wl0", "up"])?;
    workload.ip(&["route", "add", "default", "via", GATEWAY_WORKLOAD_ADDR])?;
    workload.ip(&["-6", "route", "add", "default", "via", "fd00:240:1::1"])?;
    gateway.ip(&["addr", "add", &format!("{GATEWAY_WORKLOAD_ADDR}/24"), "dev", GATEWAY_WORKLOAD_IFACE])?;
    gateway.ip(&["addr", "add", "fd00:240:1::1/64", "dev", GATEWAY_WORKLOAD_IFACE, "nodad"])?;
    gateway.ip(&["link", "set", "dev", GATEWAY_WORKLOAD_IFACE, "up"])
}

fn wait_operationally_up(netns: &Netns, interface: &str) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let output =
            std::process::Command::new("ip").args(["-n", netns.name(), "link", "show", "dev", interface]).output()?;
        if String::from_utf8_lossy(&output.stdout).contains("state UP") {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!("{interface} in {} is not operationally up after 5 s", netns.name());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
