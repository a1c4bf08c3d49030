//! vnpd's data path driven by a real vhost-user frontend written for tests (see
//! `dataplane_frontend`): memfd guest memory shared over the socket, split virtqueues written by
//! hand. Two `VmPort`s on loopback with known secrets; tokens minted like the registry does.
//!
//! Covers: config space and feature negotiation, TX/RX headers, return tokens (the reply needs no
//! token request), every kind of broken guest chain costing only its own packet, ARP/DHCP from
//! the edge, policy refusals, multiqueue, frontend reconnects, RX backlog while the guest has no
//! buffers, oversize datagrams, and the order of a new flow's first packets. Needs nothing but
//! loopback.

mod dataplane_common;
mod dataplane_frontend;

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use dataplane_common::*;
use dataplane_frontend::{arp_request, ethernet, Desc, Next, TestFrontend, VNET_HDR};
use vnp_protocol::token::Expiry;
use vnpd::datapath::VmPort;
use vnpd::edge::ROUTER_MAC;
use vnpd::metrics::counters::DropReason;

const T: Duration = Duration::from_secs(5);

fn ip_frame(from: &Vm, to: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    ethernet(
        ROUTER_MAC,
        from.mac,
        0x0800,
        &ipv4_udp(from.ip, to, payload),
    )
}

#[test]
fn config_space_and_negotiated_features() {
    let control = MintingControl::new();
    let a = start_vm(&control, "cfg", 2, 2);
    let mut fa = TestFrontend::connect(&a.socket, 2);
    let c = fa.config();
    assert_eq!(&c[0..6], &a.mac);
    assert_eq!(u16::from_le_bytes([c[6], c[7]]), 1, "link up");
    assert_eq!(u16::from_le_bytes([c[8], c[9]]), 2, "queue pairs");
    assert_eq!(u16::from_le_bytes([c[10], c[11]]), MTU);
    for bit in [32, 5, 3, 16, 15, 29, 22] {
        assert!(
            fa.features & (1 << bit) != 0,
            "feature bit {bit} not negotiated"
        );
    }
}

#[test]
fn ping_and_reply_with_return_token_and_correct_headers() {
    let control = MintingControl::new();
    let a = start_vm(&control, "pa", 2, 1);
    let b = start_vm(&control, "pb", 3, 1);
    let mut fa = TestFrontend::connect(&a.socket, 1);
    let mut fb = TestFrontend::connect(&b.socket, 1);
    fa.post_rx(0, 32, 2048);
    fb.post_rx(0, 32, 2048);

    let ping = ipv4_udp(a.ip, b.ip, b"ping");
    fa.send(0, &ethernet(ROUTER_MAC, a.mac, 0x0800, &ping));
    let got = fb.recv(0, 1, T);
    assert_eq!(got.len(), 1, "B received {got:?}");
    let (_, len, data) = &got[0];
    assert_eq!(*len as usize, VNET_HDR + 14 + ping.len());
    assert_eq!(&data[..10], &[0u8; 10], "no checksum/GSO fields");
    assert_eq!(u16::from_le_bytes([data[10], data[11]]), 1, "num_buffers");
    let eth = &data[VNET_HDR..];
    assert_eq!(&eth[0..6], &b.mac);
    assert_eq!(&eth[6..12], &ROUTER_MAC);
    assert_eq!(&eth[12..14], &[0x08, 0x00]);
    assert_eq!(&eth[14..], &ping[..]);

    // B answers from the return token A's first packet carried: no token request for B->A.
    let pong = ipv4_udp(b.ip, a.ip, b"pong");
    fb.send(0, &ethernet(ROUTER_MAC, b.mac, 0x0800, &pong));
    let got = fa.recv(0, 1, T);
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0].2[VNET_HDR + 14..], &pong[..]);
    assert_eq!(
        control.requests.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "only A->B asked the control plane"
    );
    let (sa, sb) = (a.port.counters().snapshot(), b.port.counters().snapshot());
    assert_eq!((sa.tx_packets, sa.rx_packets), (1, 1));
    assert_eq!((sb.tx_packets, sb.rx_packets), (1, 1));
    assert_eq!(sb.return_tokens_learned, 1);
    assert_eq!(sa.total_drops() + sb.total_drops(), 0, "{sa:?} {sb:?}");
    // Every TX chain came back.
    fa.wait_tx_completed(0, 1, T);
    fb.wait_tx_completed(0, 1, T);
}

#[test]
fn broken_tx_chains_cost_only_their_own_packet() {
    let control = MintingControl::new();
    let a = start_vm(&control, "ba", 2, 1);
    let b = start_vm(&control, "bb", 3, 1);
    let mut fa = TestFrontend::connect(&a.socket, 1);
    let mut fb = TestFrontend::connect(&b.socket, 1);
    fb.post_rx(0, 32, 2048);

    let mem_end = 8u64 << 20;
    let d = |addr, len, write, next| Desc {
        addr,
        len,
        write,
        next,
    };
    // Outside guest memory, and straddling its end.
    fa.send_chain(0, &[d(1 << 40, 100, false, Next::End)]);
    fa.send_chain(0, &[d(mem_end - 10, 100, false, Next::End)]);
    // A loop, and a next index beyond the queue.
    let s0 = fa.scratch(0);
    fa.send_chain(
        0,
        &[
            d(s0, 50, false, Next::Rel(1)),
            d(s0, 50, false, Next::Rel(0)),
        ],
    );
    fa.send_chain(0, &[d(s0, 50, false, Next::Abs(1000))]);
    // A device-writable descriptor in TX, and a zero-length chain.
    fa.send_chain(0, &[d(s0, 100, true, Next::End)]);
    fa.send_chain(0, &[d(s0, 0, false, Next::End)]);
    // A truncated virtio-net header.
    fa.send_chain(0, &[d(s0, 5, false, Next::End)]);
    // A good packet split over three descriptors: vnet header | Ethernet | IPv4.
    let split = ipv4_udp(a.ip, b.ip, b"split over three descriptors");
    let (h, e, p) = (fa.scratch(1), fa.scratch(2), fa.scratch(3));
    fa.write(h, &[0u8; VNET_HDR]);
    let eth = ethernet(ROUTER_MAC, a.mac, 0x0800, &[]);
    fa.write(e, &eth);
    fa.write(p, &split);
    fa.send_chain(
        0,
        &[
            d(h, VNET_HDR as u32, false, Next::Rel(1)),
            d(e, 14, false, Next::Rel(2)),
            d(p, split.len() as u32, false, Next::End),
        ],
    );
    // And an ordinary one.
    fa.send(0, &ip_frame(&a, b.ip, b"after the garbage"));

    fa.wait_tx_completed(0, 9, T);
    let got = fb.recv(0, 2, T);
    assert_eq!(got.len(), 2, "B received {got:?}");
    assert_eq!(&got[0].2[VNET_HDR + 14..], &split[..]);
    let s = a.port.counters().snapshot();
    assert_eq!(s.drops(DropReason::TxBadChain), 6, "{s:?}");
    assert_eq!(s.drops(DropReason::TxTruncatedHeader), 1, "{s:?}");
    assert_eq!(s.tx_packets, 2);
}

fn dhcp_discover(mac: [u8; 6]) -> Vec<u8> {
    let mut bootp = vec![0u8; 240];
    bootp[0] = 1; // BOOTREQUEST
    bootp[1] = 1;
    bootp[2] = 6;
    bootp[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    bootp[28..34].copy_from_slice(&mac);
    bootp[236..240].copy_from_slice(&[99, 130, 83, 99]);
    bootp.extend_from_slice(&[53, 1, 1, 255]);
    let udp_len = 8 + bootp.len();
    let total = 20 + udp_len;
    let mut ip = vec![0u8; total];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[16..20].copy_from_slice(&[255; 4]);
    let sum = vnp_protocol::wire::ipv4::checksum(&ip[..20]);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    ip[20..22].copy_from_slice(&68u16.to_be_bytes());
    ip[22..24].copy_from_slice(&67u16.to_be_bytes());
    ip[24..26].copy_from_slice(&(udp_len as u16).to_be_bytes());
    ip[28..].copy_from_slice(&bootp);
    ethernet([0xff; 6], mac, 0x0800, &ip)
}

#[test]
fn arp_and_dhcp_are_answered_by_the_edge_and_other_ethertypes_dropped() {
    let control = MintingControl::new();
    let a = start_vm(&control, "ea", 2, 1);
    let mut fa = TestFrontend::connect(&a.socket, 1);
    fa.post_rx(0, 8, 2048);

    fa.send(0, &arp_request(a.mac, a.ip, ROUTER));
    let got = fa.recv(0, 1, T);
    assert_eq!(got.len(), 1, "no ARP reply");
    let eth = &got[0].2[VNET_HDR..];
    assert_eq!(&eth[0..6], &a.mac);
    assert_eq!(&eth[6..12], &ROUTER_MAC);
    assert_eq!(&eth[12..14], &[0x08, 0x06]);
    let arp = &eth[14..];
    assert_eq!(&arp[6..8], &[0, 2], "ARP reply");
    assert_eq!(&arp[8..14], &ROUTER_MAC);
    assert_eq!(&arp[14..18], &ROUTER.octets());

    fa.send(0, &dhcp_discover(a.mac));
    let got = fa.recv(0, 1, T);
    assert_eq!(got.len(), 1, "no DHCP offer");
    let eth = &got[0].2[VNET_HDR..];
    assert_eq!(&eth[12..14], &[0x08, 0x00]);
    let bootp = &eth[14 + 20 + 8..];
    assert_eq!(bootp[0], 2, "BOOTREPLY");
    assert_eq!(&bootp[16..20], &a.ip.octets(), "offered address");
    assert!(bootp.windows(3).any(|w| w == [53, 1, 2]), "DHCPOFFER");

    // IPv6 is not carried.
    fa.send(0, &ethernet(ROUTER_MAC, a.mac, 0x86dd, &[0u8; 40]));
    fa.wait_tx_completed(0, 3, T);
    let s = a.port.counters().snapshot();
    assert_eq!(s.edge_replies, 2);
    assert_eq!(s.drops(DropReason::TxNonIpv4), 1);
    assert_eq!(s.tx_packets, 0);
}

#[test]
fn refused_and_unknown_destinations_are_counted_drops() {
    let control = MintingControl::new();
    let a = start_vm(&control, "ra", 2, 1);
    let b = start_vm(&control, "rb", 3, 1);
    control.deny(a.port.vm_id(), b.ip);
    let mut fa = TestFrontend::connect(&a.socket, 1);
    let mut fb = TestFrontend::connect(&b.socket, 1);
    fb.post_rx(0, 8, 2048);
    fa.send(0, &ip_frame(&a, b.ip, b"denied"));
    fa.send(0, &ip_frame(&a, Ipv4Addr::new(10, 77, 0, 200), b"nobody"));
    let counters = a.port.counters();
    wait_for("refusals counted", T, || {
        let s = counters.snapshot();
        s.drops(DropReason::TxPolicyRefused) == 1 && s.drops(DropReason::TxUnknownDestination) == 1
    });
    // While the refusal is held, further packets are dropped without asking again.
    let asked = control.requests.load(std::sync::atomic::Ordering::Relaxed);
    fa.send(0, &ip_frame(&a, b.ip, b"denied again"));
    fa.wait_tx_completed(0, 3, T);
    assert_eq!(counters.snapshot().drops(DropReason::TxPolicyRefused), 2);
    assert_eq!(
        control.requests.load(std::sync::atomic::Ordering::Relaxed),
        asked
    );
    assert!(fb.recv(0, 1, Duration::from_millis(300)).is_empty());
    assert_eq!(b.port.counters().snapshot().rx_packets, 0);
}

#[test]
fn multiqueue_pairs_carry_traffic() {
    let control = MintingControl::new();
    let a = start_vm(&control, "ma", 2, 2);
    let b = start_vm(&control, "mb", 3, 1);
    let mut fa = TestFrontend::connect(&a.socket, 2);
    let mut fb = TestFrontend::connect(&b.socket, 1);
    fa.post_rx(0, 16, 2048);
    fa.post_rx(1, 16, 2048);
    fb.post_rx(0, 16, 2048);
    fa.send(0, &ip_frame(&a, b.ip, b"on pair 0"));
    fa.send(1, &ip_frame(&a, b.ip, b"on pair 1"));
    let got = fb.recv(0, 2, T);
    assert_eq!(got.len(), 2);
    fb.send(0, &ip_frame(&b, a.ip, b"back"));
    // The reply lands on whichever pair's socket the kernel picked.
    let mut n = 0;
    for _ in 0..50 {
        n += fa.recv(0, 0, Duration::ZERO).len() + fa.recv(1, 0, Duration::ZERO).len();
        if n > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(n, 1);
    fa.wait_tx_completed(0, 1, T);
    fa.wait_tx_completed(1, 1, T);
}

#[test]
fn a_reconnecting_frontend_gets_a_fresh_device() {
    let control = MintingControl::new();
    let a = start_vm(&control, "ca", 2, 1);
    let b = start_vm(&control, "cb", 3, 1);
    let mut fb = TestFrontend::connect(&b.socket, 1);
    fb.post_rx(0, 16, 2048);
    for round in 0..3u8 {
        let mut fa = TestFrontend::connect(&a.socket, 1);
        fa.send(0, &ip_frame(&a, b.ip, &[round; 8]));
        let got = fb.recv(0, 1, T);
        assert_eq!(got.len(), 1, "round {round}");
        drop(fa);
    }
    assert_eq!(a.port.counters().snapshot().tx_packets, 3);
}

#[test]
fn unusable_rx_chains_are_returned_and_counted() {
    let control = MintingControl::new();
    let a = start_vm(&control, "ua", 2, 1);
    let b = start_vm(&control, "ub", 3, 1);
    let mut fa = TestFrontend::connect(&a.socket, 1);
    let mut fb = TestFrontend::connect(&b.socket, 1);
    let s = fb.scratch(0);
    // Device-readable RX buffer, and one outside guest memory.
    fb.post_rx_chain(
        0,
        &[Desc {
            addr: s,
            len: 2048,
            write: false,
            next: Next::End,
        }],
    );
    fb.post_rx_chain(
        0,
        &[Desc {
            addr: 1 << 40,
            len: 2048,
            write: true,
            next: Next::End,
        }],
    );
    fb.post_rx(0, 4, 2048);
    fa.send(0, &ip_frame(&a, b.ip, b"lands in a good buffer"));
    let got = fb.recv(0, 3, T);
    assert_eq!(got.len(), 3, "{got:?}");
    assert_eq!(got.iter().filter(|(_, len, _)| *len == 0).count(), 2);
    assert_eq!(
        b.port.counters().snapshot().drops(DropReason::RxBadChain),
        2
    );
    assert_eq!(b.port.counters().snapshot().rx_packets, 1);
}

#[test]
fn datagrams_wait_in_the_socket_until_the_guest_posts_buffers() {
    let control = MintingControl::new();
    let a = start_vm(&control, "wa", 2, 1);
    let b = start_vm(&control, "wb", 3, 1);
    let mut fa = TestFrontend::connect(&a.socket, 1);
    let mut fb = TestFrontend::connect(&b.socket, 1);
    for i in 0..5u8 {
        fa.send(0, &ip_frame(&a, b.ip, &[i; 16]));
    }
    fa.wait_tx_completed(0, 5, T);
    wait_for("A sent", T, || a.port.counters().snapshot().tx_packets == 5);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(b.port.counters().snapshot().rx_packets, 0);
    fb.post_rx(0, 8, 2048);
    let got = fb.recv(0, 5, T);
    assert_eq!(got.len(), 5);
    for (i, (_, _, data)) in got.iter().enumerate() {
        assert_eq!(data[data.len() - 1], i as u8, "in order");
    }
}

#[test]
fn oversize_datagram_is_dropped_not_truncated_into_the_guest() {
    let control = MintingControl::new();
    let b = start_vm(&control, "ob", 3, 1);
    let mut fb = TestFrontend::connect(&b.socket, 1);
    fb.post_rx(0, 8, 2048);
    let (raw, raw_addr) = raw_peer();
    let to = b.port.udp_addr();
    let src_vm = Ipv4Addr::new(10, 77, 0, 40);
    let e = Expiry(now() + 300);
    let token = token_for(raw_addr, src_vm, to, b.ip, &b.secret, NETWORK, e);
    let big = ipv4_udp(src_vm, b.ip, &[7u8; 3000]);
    raw.send_to(&datagram(NETWORK, token, e, &big, None), to)
        .unwrap();
    let small = ipv4_udp(src_vm, b.ip, b"fits");
    raw.send_to(&datagram(NETWORK, token, e, &small, None), to)
        .unwrap();
    let got = fb.recv(0, 1, T);
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0].2[VNET_HDR + 14..], &small[..]);
    let s = b.port.counters().snapshot();
    assert_eq!(s.drops(DropReason::RxOversize), 1, "{s:?}");
    assert_eq!(s.rx_packets, 1);
}

#[test]
fn stopping_a_port_removes_its_socket_and_frees_its_udp_port() {
    let control = MintingControl::new();
    let a = start_vm(&control, "sa", 2, 1);
    let fa = TestFrontend::connect(&a.socket, 1);
    let udp = a.port.udp_addr();
    let socket = a.socket.clone();
    drop(a);
    drop(fa);
    assert!(!socket.exists());
    std::net::UdpSocket::bind(udp).expect("UDP port released");
}

#[test]
fn guest_writes_reach_the_dirty_log_while_migrating() {
    use dataplane_frontend::FileExt;
    let control = MintingControl::new();
    let a = start_vm(&control, "la", 2, 1);
    let b = start_vm(&control, "lb", 3, 1);
    let mut fa = TestFrontend::connect(&a.socket, 1);
    let mut fb = TestFrontend::connect(&b.socket, 1);
    let log = fb.start_dirty_log();
    // One RX buffer straddling a page boundary: the virtio-net and Ethernet headers (written
    // through vm-memory) land on page 0x6ff, the payload (written by the kernel's recvmmsg
    // straight into guest memory) also on page 0x700.
    let page = 0x70_0000u64;
    fb.post_rx_chain(
        0,
        &[Desc {
            addr: page - 64,
            len: 2048,
            write: true,
            next: Next::End,
        }],
    );
    // Let vnpd take the buffer before the log is inspected.
    std::thread::sleep(Duration::from_millis(100));
    log.write_all_at(&[0u8; 4096], 0).unwrap();
    fa.send(0, &ip_frame(&a, b.ip, &[0x42; 400]));
    let counters = b.port.counters();
    wait_for("delivery", T, || counters.snapshot().rx_packets == 1);
    let mut bits = [0u8; 4096];
    log.read_exact_at(&mut bits, 0).unwrap();
    let dirty = |addr: u64| {
        let p = (addr / 4096) as usize;
        bits[p / 8] & (1 << (p % 8)) != 0
    };
    assert!(dirty(page - 64), "header page not logged");
    assert!(dirty(page), "payload page (written by recvmmsg) not logged");
    assert!(dirty(0x1_0000 + 0x2000), "used ring page not logged");
    assert!(!dirty(0x40_0000), "an untouched page is marked dirty");
}

/// A control plane that only counts requests: the test installs the token itself, at the
/// moment it chooses.
struct CountingControl(std::sync::atomic::AtomicUsize);

impl vnpd::datapath::ControlPlane for CountingControl {
    fn request_token(&self, _src_vm: &str, _dst: Ipv4Addr) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

#[test]
fn first_packets_of_a_new_flow_arrive_in_order() {
    const WAITING: u32 = 16;
    const SENT: u32 = 200;
    let control = Arc::new(CountingControl(Default::default()));
    let (att_a, _) = vm("qa", 2, 0x21, 1);
    let (att_b, secret_b) = vm("qb", 3, 0x31, 1);
    let (ip_a, mac_a, ip_b) = (att_a.vm_ip, att_a.mac, att_b.vm_ip);
    let (sock_a, sock_b) = (att_a.socket_path.clone(), att_b.socket_path.clone());
    let a = Arc::new(VmPort::start(att_a, control.clone()).expect("port A"));
    let b = VmPort::start(att_b, control.clone()).expect("port B");
    let mut fa = TestFrontend::connect(&sock_a, 1);
    let mut fb = TestFrontend::connect(&sock_b, 1);
    fb.post_rx(0, SENT as usize, 2048);
    let frame = |seq: u32| {
        ethernet(
            ROUTER_MAC,
            mac_a,
            0x0800,
            &ipv4_udp(ip_a, ip_b, &seq.to_be_bytes()),
        )
    };

    // The flow's first packets wait for a token.
    for seq in 0..WAITING {
        fa.send(0, &frame(seq));
    }
    fa.wait_tx_completed(0, WAITING as u16, T);
    let asked = || control.0.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(asked(), 1, "one token request for the burst");
    // The token is installed from another thread while the guest keeps sending: the waiting
    // packets must still leave before the newer ones.
    let expiry = Expiry(now() + 600);
    let token = vnpd::datapath::PeerToken {
        dst_host: *b.udp_addr().ip(),
        dst_port: b.udp_addr().port(),
        token: token_for(
            a.udp_addr(),
            ip_a,
            b.udp_addr(),
            ip_b,
            &secret_b,
            NETWORK,
            expiry,
        ),
        expiry,
    };
    let installer = {
        let a = a.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(2));
            a.install_token(ip_b, token)
        })
    };
    // Paced, so that the guest is still sending when the token arrives.
    for seq in WAITING..SENT {
        fa.send(0, &frame(seq));
        std::thread::sleep(Duration::from_micros(50));
    }
    installer.join().unwrap();
    fa.wait_tx_completed(0, SENT as u16, T);

    // Beyond the pending queue's 32 packets, packets sent before the token came are dropped.
    let queue_full = a
        .counters()
        .snapshot()
        .drops(DropReason::TxNoTokenQueueFull);
    let expected = (SENT as u64 - queue_full) as usize;
    let got = fb.recv(0, expected, T);
    let payload = VNET_HDR + 14 + 28;
    let seqs: Vec<u32> = got
        .iter()
        .map(|(_, _, d)| u32::from_be_bytes(d[payload..payload + 4].try_into().unwrap()))
        .collect();
    assert_eq!(seqs.len(), expected, "received {seqs:?}");
    assert_eq!(
        &seqs[..WAITING as usize],
        &(0..WAITING).collect::<Vec<_>>()[..],
        "the packets that waited arrive first, in order"
    );
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "packets of one flow arrived out of order: {seqs:?}"
    );
    assert_eq!(b.counters().snapshot().total_drops(), 0);
}
