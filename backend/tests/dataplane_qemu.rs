//! Two real QEMU 10 guests (TCG, busybox initramfs from `qemu-launch`) on two in-process vnpd
//! ports: DHCP from vnpd's edge, ping both ways, and a 10 MiB TCP transfer whose sha256 must
//! match, the guests using the checksum and TSO offloads QEMU negotiates by default. Then guests
//! whose vnpd has `offloads` off, alone and paired with an offloading guest (both directions).
//! The control plane is the test's minting double; the registry is not under test here.
//!
//! Needs root, QEMU 10 (`scripts/setup`) and the test guest image (`scripts/build-guest`).
//! Never skips itself.

mod dataplane_common;

use std::sync::Arc;
use std::time::Duration;

use dataplane_common::*;
use qemu_launch::{tcp_transfer, Guest, GuestSpec, MacAddr, NetStatus, TcpTransferSpec};
use vnpd::datapath::{DataPathTuning, VmPort};
use vnpd::metrics::counters::DropReason;

const CMD: Duration = Duration::from_secs(60);

fn boot(name: &str, mac: [u8; 6], socket: &std::path::Path) -> Guest {
    let mut spec = GuestSpec::new(name, MacAddr(mac));
    spec.vhost_user_socket = Some(socket.to_path_buf());
    spec.queue_pairs = 1;
    let mut g = Guest::launch(spec).expect("launch guest");
    g.wait_ready(Duration::from_secs(180)).expect("guest ready");
    g
}

#[test]
fn two_qemu_guests_get_dhcp_ping_and_move_10_mib_over_tcp() {
    let control = MintingControl::new();
    let (att_a, secret_a) = vm("qa", 2, 0x1a, 1);
    let (att_b, secret_b) = vm("qb", 3, 0x2b, 1);
    let (ip_a, ip_b, mac_a, mac_b) = (att_a.vm_ip, att_b.vm_ip, att_a.mac, att_b.mac);
    let (sock_a, sock_b) = (att_a.socket_path.clone(), att_b.socket_path.clone());
    let port_a = Arc::new(VmPort::start(att_a, control.clone()).expect("port A"));
    let port_b = Arc::new(VmPort::start(att_b, control.clone()).expect("port B"));
    control.register(&port_a, ip_a, &secret_a);
    control.register(&port_b, ip_b, &secret_b);

    let mut ga = boot("dp-qa", mac_a, &sock_a);
    let mut gb = boot("dp-qb", mac_b, &sock_b);
    for (g, ip) in [(&mut ga, ip_a), (&mut gb, ip_b)] {
        match g
            .wait_network(Duration::from_secs(90))
            .expect("network status")
        {
            NetStatus::Bound { address, mtu, .. } => {
                assert_eq!(address, format!("{ip}/24"), "DHCP address");
                assert_eq!(mtu, u32::from(MTU), "DHCP MTU");
            }
            other => panic!("no DHCP lease: {other:?}\n{}", g.console()),
        }
    }

    let out = ga.run(&format!("ping -c 3 -W 5 {ip_b}"), CMD).unwrap();
    assert!(out.success(), "A -> B ping failed: {}", out.stdout);
    let out = gb.run(&format!("ping -c 3 -W 5 {ip_a}"), CMD).unwrap();
    assert!(out.success(), "B -> A ping failed: {}", out.stdout);

    let transfer = tcp_transfer(&mut ga, &mut gb, ip_b, TcpTransferSpec::default()).unwrap();
    eprintln!("{transfer} ({:.1} MiB/s)", transfer.mib_per_sec());
    let (a, b) = (port_a.counters().snapshot(), port_b.counters().snapshot());
    assert!(transfer.intact(), "{transfer}\nA {a:?}\nB {b:?}");
    // QEMU negotiated the offloads: A's kernel handed vnpd TSO super-packets, B's ACKs had
    // their checksums left to vnpd, and nothing was refused.
    eprintln!(
        "A: {} TSO frames, {} checksum frames, {} packets; B: {} checksum frames",
        a.tx_tso_frames, a.tx_csum_frames, a.tx_packets, b.tx_csum_frames
    );
    assert!(a.tx_tso_frames > 0, "no TSO frame from A: {a:?}");
    assert!(b.tx_csum_frames > 0, "no checksum offload from B: {b:?}");
    for s in [&a, &b] {
        assert_eq!(offload_drops(s), 0, "{s:?}");
    }
}

/// Drops of frames whose virtio-net header asked for something wrong or not negotiated.
fn offload_drops(s: &vnpd::metrics::counters::CounterSnapshot) -> u64 {
    [
        DropReason::TxOffloadRequested,
        DropReason::TxBadVnetFlags,
        DropReason::TxBadGsoType,
        DropReason::TxBadOffloadHeaders,
        DropReason::TxBadCsumStart,
        DropReason::TxBadCsumOffset,
        DropReason::TxBadGsoSize,
        DropReason::TxBadHdrLen,
    ]
    .iter()
    .map(|r| s.drops(*r))
    .sum()
}

/// Guest A offloads; B and C run on ports with `offloads` off (vnpd's config switch): A -> B
/// and B -> A are mixed pairs, B -> C has no offload on either side. Every transfer arrives
/// intact; B and C never hand vnpd an offloaded frame.
#[test]
fn guests_without_offloads_and_mixed_pairs_move_tcp_intact() {
    let control = MintingControl::new();
    let off = DataPathTuning {
        offloads: false,
        ..DataPathTuning::default()
    };
    let mut ports = Vec::new();
    let mut guests = Vec::new();
    let mut ips = Vec::new();
    for (name, octet, secret, tuning) in [
        ("oa", 2, 0x3a, DataPathTuning::default()),
        ("ob", 3, 0x3b, off),
        ("oc", 4, 0x3c, off),
    ] {
        let (att, sec) = vm(name, octet, secret, 1);
        let (ip, mac, sock) = (att.vm_ip, att.mac, att.socket_path.clone());
        let port = Arc::new(VmPort::start_with(att, control.clone(), tuning).expect("port"));
        control.register(&port, ip, &sec);
        guests.push(boot(&format!("dp-{name}"), mac, &sock));
        ports.push(port);
        ips.push(ip);
    }
    for g in &mut guests {
        let status = g.wait_network(Duration::from_secs(90)).expect("network");
        assert!(
            matches!(status, NetStatus::Bound { .. }),
            "no DHCP lease: {status:?}\n{}",
            g.console()
        );
    }
    let spec = |port| TcpTransferSpec {
        bytes: 4 * 1024 * 1024,
        port,
        ..TcpTransferSpec::default()
    };
    for (from, to, tcp_port) in [(0usize, 1usize, 5101u16), (1, 0, 5102), (1, 2, 5103)] {
        let (lo, hi) = (from.min(to), from.max(to));
        let (left, right) = guests.split_at_mut(hi);
        let (sender, receiver) = if from < to {
            (&mut left[lo], &mut right[0])
        } else {
            (&mut right[0], &mut left[lo])
        };
        let t = tcp_transfer(sender, receiver, ips[to], spec(tcp_port)).unwrap();
        eprintln!("{from} -> {to}: {t} ({:.1} MiB/s)", t.mib_per_sec());
        let snaps: Vec<_> = ports.iter().map(|p| p.counters().snapshot()).collect();
        assert!(t.intact(), "{from} -> {to}: {t}\n{snaps:#?}");
    }
    let snaps: Vec<_> = ports.iter().map(|p| p.counters().snapshot()).collect();
    assert!(snaps[0].tx_tso_frames > 0, "A offloads: {:?}", snaps[0]);
    for s in &snaps[1..] {
        assert_eq!((s.tx_tso_frames, s.tx_csum_frames), (0, 0), "{s:?}");
    }
    for s in &snaps {
        assert_eq!(offload_drops(s), 0, "{s:?}");
    }
}
