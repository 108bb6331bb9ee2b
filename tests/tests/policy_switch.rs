//! Policy replacement under continuous traffic: once `Datapath::apply` returns, no packet reaches a
//! destination the new policy removed.

use std::{
    net::{SocketAddr, UdpSocket},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use sluice_agent::{
    datapath::{Datapath, InterfaceSpec},
    policy::{DatapathPolicy, OutboundMode},
};
use sluice_tests::{
    agent::Bpffs,
    require_root,
    topology::{GATEWAY_WORKLOAD_IFACE, SERVER_A},
    Topology,
};

const ROUNDS: usize = 20;

#[test]
fn a_policy_change_under_traffic_never_lets_a_packet_through_after_it_returns() {
    require_root();
    let topology = Topology::new().unwrap();
    let bpffs = Bpffs::mount().unwrap();
    let target: SocketAddr = format!("{SERVER_A}:6000").parse().unwrap();
    let allow = DatapathPolicy {
        mode: OutboundMode::RegistryOnly,
        rules: vec![format!("{target}/udp").parse().unwrap()],
        ..DatapathPolicy::default()
    };
    let deny = DatapathPolicy { mode: OutboundMode::RegistryOnly, ..DatapathPolicy::default() };

    let receiver = topology.internet.enter(|| UdpSocket::bind(target)).unwrap().unwrap();
    receiver.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let sender = topology.workload.enter(|| UdpSocket::bind("0.0.0.0:0")).unwrap().unwrap();
    let (stop, sent, received) =
        (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)), Arc::new(Mutex::new(Vec::new())));

    let windows = std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                // Published before the send: a sequence number read after apply() returned was sent after it.
                sent.store(seq, Ordering::SeqCst);
                let _ = sender.send_to(&seq.to_be_bytes(), target);
                std::thread::sleep(Duration::from_micros(100));
            }
        });
        scope.spawn(|| {
            let mut buf = [0u8; 8];
            while !stop.load(Ordering::Relaxed) {
                if let Ok(8) = receiver.recv(&mut buf) {
                    received.lock().unwrap().push(u64::from_be_bytes(buf));
                }
            }
        });
        let windows = topology
            .gateway
            .enter(|| {
                let mut datapath = Datapath::load(&bpffs.pin_dir()).unwrap();
                datapath.apply(&deny).unwrap();
                datapath.reconcile_interfaces(&[InterfaceSpec::Name(GATEWAY_WORKLOAD_IFACE.into())], &[]).unwrap();
                let mut windows = Vec::new();
                for _ in 0..ROUNDS {
                    datapath.apply(&allow).unwrap();
                    std::thread::sleep(Duration::from_millis(20));
                    datapath.apply(&deny).unwrap();
                    let denied_from = sent.load(Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(30));
                    windows.push((denied_from, sent.load(Ordering::SeqCst)));
                    // Whatever was sent in the window has been classified long before the next allow.
                    std::thread::sleep(Duration::from_millis(30));
                }
                windows
            })
            .unwrap();
        std::thread::sleep(Duration::from_millis(150));
        stop.store(true, Ordering::Relaxed);
        windows
    });

    let received = received.lock().unwrap();
    assert!(received.len() > ROUNDS * 20, "traffic flowed while allowed: {} datagrams", received.len());
    for (from, to) in windows {
        let leaked: Vec<&u64> = received.iter().filter(|&&seq| seq > from && seq <= to).collect();
        assert!(leaked.is_empty(), "sent after the removal returned (after #{from}) yet delivered: {leaked:?}");
    }
}
