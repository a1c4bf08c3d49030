//! Two vnpd data paths in this process, each driven by a real `dpdk-testpmd` virtio-user
//! frontend: testpmd A (txonly) -> vnpd A -> VNP/UDP over loopback -> vnpd B -> testpmd B
//! (rxonly). Then forged, expired, wrong-destination, wrong-network and truncated datagrams from
//! a plain UDP socket are sent to B's port and must be dropped and counted, while a correctly
//! minted one is delivered.
//!
//! Needs root, DPDK (`dpdk-testpmd`) and 2 MiB hugepages mounted on /dev/hugepages (about
//! 256 MiB free). Never skips itself.

mod dataplane_common;

use std::sync::Arc;
use std::time::Duration;

use dataplane_common::*;
use vnp_protocol::token::{Expiry, Token};
use vnp_protocol::wire::options::ReturnToken;
use vnp_testkit::testpmd::{ForwardMode, TestPmd, TestPmdSpec};
use vnpd::datapath::VmPort;
use vnpd::metrics::counters::DropReason;

#[test]
fn testpmd_a_to_testpmd_b_through_two_vnpd_ports_and_forged_datagrams_are_dropped() {
    let control = MintingControl::new();
    let (att_a, secret_a) = vm("a", 2, 0xa1, 1);
    let (att_b, secret_b) = vm("b", 3, 0xb2, 1);
    let (ip_a, ip_b) = (att_a.vm_ip, att_b.vm_ip);
    let (mac_a, mac_b) = (att_a.mac, att_b.mac);
    let (sock_a, sock_b) = (att_a.socket_path.clone(), att_b.socket_path.clone());
    let port_a = Arc::new(VmPort::start(att_a, control.clone()).expect("start port A"));
    let port_b = Arc::new(VmPort::start(att_b, control.clone()).expect("start port B"));
    control.register(&port_a, ip_a, &secret_a);
    control.register(&port_b, ip_b, &secret_b);

    // B: the receiving "VM". Its forwarding loop gets core 0, A's core 1.
    let mut spec_b = TestPmdSpec::virtio_user(&sock_b);
    spec_b.mode = ForwardMode::RxOnly;
    spec_b.mac = Some(mac_b);
    spec_b.main_lcore = Some(1);
    let mut pmd_b = TestPmd::launch(spec_b).expect("launch testpmd B");
    pmd_b
        .wait_link_up(0, Duration::from_secs(30))
        .expect("B link up");

    let mut spec_a = TestPmdSpec::virtio_user(&sock_a);
    spec_a.mode = ForwardMode::TxOnly;
    spec_a.pkt_len = 64;
    spec_a.mac = Some(mac_a);
    spec_a.eth_peer = Some(vnpd::edge::ROUTER_MAC);
    spec_a.tx_ip = Some((ip_a, ip_b));
    let mut pmd_a = TestPmd::launch(spec_a).expect("launch testpmd A");
    pmd_a
        .wait_link_up(0, Duration::from_secs(30))
        .expect("A link up");

    pmd_b.start().unwrap();
    pmd_a.start().unwrap();
    std::thread::sleep(Duration::from_secs(3));
    pmd_a.stop().unwrap();
    // B drains what is still in its socket buffer.
    let counters_b = port_b.counters();
    settle(Duration::from_secs(20), Duration::from_millis(500), || {
        counters_b.snapshot().rx_packets
    });

    let a = port_a.counters().snapshot();
    let b = port_b.counters().snapshot();
    let stats_a = pmd_a.port_stats(0).unwrap();
    eprintln!("testpmd A: {stats_a:?}\nvnpd A: {a:?}\nvnpd B: {b:?}");
    // A sent through vnpd, B's vnpd delivered, and B's testpmd saw them.
    assert!(stats_a.tx_packets > 1000, "testpmd A sent {stats_a:?}");
    assert!(a.tx_packets > 1000, "vnpd A sent {a:?}");
    assert!(b.rx_packets > 1000, "vnpd B delivered {b:?}");
    assert!(b.rx_packets <= a.tx_packets);
    // 64-byte frames: 50-byte inner IPv4 packets.
    assert_eq!(a.tx_bytes, a.tx_packets * 50);
    assert_eq!(b.rx_bytes, b.rx_packets * 50);
    // The data path asked for A->B's token once (maybe a retry), never per packet.
    let requests = control.requests.load(std::sync::atomic::Ordering::Relaxed);
    assert!((1..=3).contains(&requests), "{requests} token requests");
    // No receive check failed on genuine traffic.
    for r in [
        DropReason::RxBadToken,
        DropReason::RxExpired,
        DropReason::RxWrongVm,
        DropReason::RxMalformed,
        DropReason::RxTruncated,
    ] {
        assert_eq!(b.drops(r), 0, "{r:?} on genuine traffic: {b:?}");
    }
    // A's first packet carried a return token: B can answer A without asking the registry.
    assert!(
        port_b
            .tokens_expiring_before(Expiry(u32::MAX - 1))
            .contains(&ip_a),
        "B learned no return token for A"
    );

    // Forged datagrams from a plain socket to B's port.
    let (raw, raw_addr) = raw_peer();
    let to = port_b.udp_addr();
    let src_vm = std::net::Ipv4Addr::new(10, 77, 0, 50);
    let inner = ipv4_udp(src_vm, ip_b, b"hello from a raw socket");
    let good = Expiry(now() + 300);
    let valid = token_for(raw_addr, src_vm, to, ip_b, &secret_b, NETWORK, good);
    let before = port_b.counters().snapshot();
    let send = |d: Vec<u8>| {
        raw.send_to(&d, to).unwrap();
    };
    // forged MAC
    send(datagram(
        NETWORK,
        Token::from_bytes([0x5a; 8]),
        good,
        &inner,
        None,
    ));
    // expired (correctly minted for an expiry long past)
    let old = Expiry(now() - 3600);
    send(datagram(
        NETWORK,
        token_for(raw_addr, src_vm, to, ip_b, &secret_b, NETWORK, old),
        old,
        &inner,
        None,
    ));
    // expiry beyond any TTL the registry mints
    let far = Expiry(now() + 30 * 24 * 3600);
    send(datagram(
        NETWORK,
        token_for(raw_addr, src_vm, to, ip_b, &secret_b, NETWORK, far),
        far,
        &inner,
        None,
    ));
    // wrong destination VM (not hosted behind this port)
    let other = std::net::Ipv4Addr::new(10, 77, 0, 99);
    send(datagram(
        NETWORK,
        token_for(raw_addr, src_vm, to, other, &secret_b, NETWORK, good),
        good,
        &ipv4_udp(src_vm, other, b"x"),
        None,
    ));
    // wrong network
    send(datagram(
        NETWORK + 1,
        token_for(raw_addr, src_vm, to, ip_b, &secret_b, NETWORK + 1, good),
        good,
        &inner,
        None,
    ));
    // truncated: shorter than a VNP header
    send(vec![1, 0, 0, 0, 0, 0]);
    // token stolen from another sender: valid MAC for raw_addr, sent from another socket
    let (thief, _) = raw_peer();
    thief
        .send_to(&datagram(NETWORK, valid, good, &inner, None), to)
        .unwrap();
    // and one genuine datagram, carrying a return token
    let rt = ReturnToken {
        token: Token::from_bytes([0x11; 8]),
        expiry: good,
    };
    send(datagram(NETWORK, valid, good, &inner, Some(rt)));

    let counters = port_b.counters();
    wait_for("forged datagrams counted", Duration::from_secs(5), || {
        counters.snapshot().total_drops() >= before.total_drops() + 7
            && counters.snapshot().rx_packets > before.rx_packets
    });
    std::thread::sleep(Duration::from_millis(200));
    let after = counters.snapshot();
    let delta = |r: DropReason| after.drops(r) - before.drops(r);
    assert_eq!(delta(DropReason::RxBadToken), 2, "{after:?}");
    assert_eq!(delta(DropReason::RxExpired), 1);
    assert_eq!(delta(DropReason::RxExpiryTooFar), 1);
    assert_eq!(delta(DropReason::RxWrongVm), 1);
    assert_eq!(delta(DropReason::RxWrongNetwork), 1);
    assert_eq!(delta(DropReason::RxTruncated), 1);
    assert_eq!(
        after.rx_packets,
        before.rx_packets + 1,
        "only the genuine one"
    );
    assert_eq!(after.rx_bytes, before.rx_bytes + inner.len() as u64);
    // The genuine datagram's return token is now B's token for the raw peer's VM.
    assert!(port_b
        .tokens_expiring_before(Expiry(u32::MAX - 1))
        .contains(&src_vm));

    // testpmd B received what vnpd B delivered (and nothing forged).
    std::thread::sleep(Duration::from_millis(300));
    pmd_b.stop().unwrap();
    let stats_b = pmd_b.port_stats(0).unwrap();
    assert_eq!(
        stats_b.rx_packets, after.rx_packets,
        "testpmd B {stats_b:?} vs vnpd B {after:?}"
    );

    drop(pmd_a);
    drop(pmd_b);
    let sockets = [sock_a, sock_b];
    drop(port_a);
    drop(port_b);
    for s in sockets {
        assert!(!s.exists(), "{} left behind", s.display());
    }
}
