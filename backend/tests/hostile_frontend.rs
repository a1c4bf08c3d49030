//! vnpd against a hostile vhost-user frontend (issue 8, items 1-3 and 9): the test frontend of
//! `dataplane_frontend` (the `vhost` crate's frontend side, rings written by hand) posts every
//! class of malformed chain and virtio-net header, breaks whole rings, and reads the guest
//! memory vnpd wrote. After each attack vnpd must have counted it by reason and still carry a
//! good packet; a broken ring is parked (no CPU burnt, the frontend told through its error
//! eventfd) until the driver resets it, then carries again. Loopback only.

mod dataplane_common;
mod dataplane_frontend;
mod replay_frontend;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dataplane_common::*;
use dataplane_frontend::{ethernet, Desc, Next, TestFrontend, QUEUE_SIZE, VNET_HDR};
use replay_frontend::conversations::{self as conv, DPDK_22_11};
use replay_frontend::{Guest, Replay};
use vnp_protocol::token::{Expiry, Token};
use vnp_protocol::wire::options::ReturnToken;
use vnpd::datapath::DataPathTuning;
use vnpd::edge::ROUTER_MAC;
use vnpd::metrics::counters::DropReason;

const T: Duration = Duration::from_secs(10);
const RX_Q: usize = 0;
const TX_Q: usize = 1;
const MEM_END: u64 = 8 << 20;

impl Vm {
    fn drops(&self, r: DropReason) -> u64 {
        self.port.counters().snapshot().drops(r)
    }

    fn frame_to(&self, to: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
        ethernet(
            ROUTER_MAC,
            self.mac,
            0x0800,
            &ipv4_udp(self.ip, to, payload),
        )
    }
}

fn d(addr: u64, len: u32, write: bool, next: Next) -> Desc {
    Desc {
        addr,
        len,
        write,
        next,
    }
}

/// A sender and a receiver VM, both connected, the receiver with buffers posted, and one packet
/// carried (so the token is in place).
struct Pair {
    _control: Arc<MintingControl>,
    a: Vm,
    b: Vm,
    fa: TestFrontend,
    fb: TestFrontend,
    sent: u16,
}

impl Pair {
    fn new(tag: &str) -> Pair {
        Self::acking(tag, 0)
    }

    /// A pair whose sender's frontend also acks the feature bits `extra`.
    fn acking(tag: &str, extra: u64) -> Pair {
        Self::acking_with(tag, extra, DataPathTuning::default())
    }

    /// [`Pair::acking`], the sender's port started with `tuning`.
    fn acking_with(tag: &str, extra: u64, tuning: DataPathTuning) -> Pair {
        let control = MintingControl::new();
        let a = start_vm_with(&control, &format!("{tag}a"), 2, 1, tuning);
        let b = start_vm(&control, &format!("{tag}b"), 3, 1);
        let fa = TestFrontend::connect_acking(&a.socket, 1, extra);
        let mut fb = TestFrontend::connect(&b.socket, 1);
        fb.post_rx(0, 200, 2048);
        let mut p = Pair {
            _control: control,
            a,
            b,
            fa,
            fb,
            sent: 0,
        };
        p.carries("first");
        p
    }

    /// Sends a chain of A's (counted as one TX chain handed to vnpd).
    fn send_chain(&mut self, descs: &[Desc]) {
        self.fa.send_chain(0, descs);
        self.sent += 1;
    }

    /// A good packet from A reaches B.
    fn carries(&mut self, what: &str) {
        let payload = format!("good packet after {what}");
        let frame = self.a.frame_to(self.b.ip, payload.as_bytes());
        self.fa.send(0, &frame);
        self.sent += 1;
        let got = self.fb.recv(0, 1, T);
        assert_eq!(got.len(), 1, "after {what}: B received {got:?}");
        assert_eq!(&got[0].2[VNET_HDR + 14..], &frame[14..], "after {what}");
        self.fa.wait_tx_completed(0, self.sent, T);
    }
}

/// Per thread of this process named `name`: CPU time used so far, in clock ticks.
fn thread_cpu_ticks(name: &str) -> HashMap<String, u64> {
    let mut out = HashMap::new();
    for entry in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if &stat[open + 1..close] != name {
            continue;
        }
        // After the name: state (field 3), ... utime (14), stime (15).
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        out.insert(entry.file_name().to_string_lossy().into_owned(), ticks);
    }
    out
}

/// The most CPU time any one vhost-user worker thread of the process used during `window`.
fn busiest_worker_cpu(window: Duration) -> Duration {
    let before = thread_cpu_ticks("vring_worker");
    std::thread::sleep(window);
    let after = thread_cpu_ticks("vring_worker");
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let most = after
        .iter()
        .map(|(tid, t)| t - before.get(tid).copied().unwrap_or(0))
        .max()
        .unwrap_or(0);
    Duration::from_millis(most * 1000 / hz)
}

/// Waits until counter `r` of `vm` reached `n`, and checks it stays there a moment.
fn counted(vm: &Vm, r: DropReason, n: u64) {
    wait_for(&format!("{r:?} = {n}"), T, || vm.drops(r) >= n);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(vm.drops(r), n, "{r:?}");
}

fn assert_no_cpu_burnt(what: &str) {
    let busiest = busiest_worker_cpu(Duration::from_secs(3));
    assert!(
        busiest < Duration::from_millis(300),
        "{what}: a worker used {busiest:?} of CPU in 3 s"
    );
}

#[test]
fn tx_avail_index_jump_parks_the_ring_until_the_driver_resets_it() {
    let mut p = Pair::new("hj");
    let err = p.fa.set_err_fd(TX_Q);
    p.fa.jump_avail_idx(TX_Q, QUEUE_SIZE + 1);
    assert_no_cpu_burnt("TX avail index jump");
    counted(&p.a, DropReason::TxRingBroken, 1);
    assert!(
        err.read().is_ok(),
        "the frontend was told on its error eventfd"
    );
    // More kicks on the parked ring: no more counts, no CPU.
    for _ in 0..20 {
        p.fa.kick(TX_Q);
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(p.a.drops(DropReason::TxRingBroken), 1, "counted once");
    assert!(err.read().is_err(), "told once");
    // A driver reset brings the ring back.
    p.fa.reset_queue(TX_Q);
    p.sent = 0;
    p.carries("a TX driver reset");
}

#[test]
fn tx_head_out_of_range_parks_the_ring_until_the_driver_resets_it() {
    let mut p = Pair::new("hh");
    p.fa.publish(TX_Q, QUEUE_SIZE + 7);
    counted(&p.a, DropReason::TxRingBroken, 1);
    assert_no_cpu_burnt("TX head out of range");
    // Packets posted behind it are not taken while parked.
    let frame = p.a.frame_to(p.b.ip, b"behind a broken ring");
    p.fa.send(0, &frame);
    assert!(p.fb.recv(0, 1, Duration::from_millis(500)).is_empty());
    p.fa.reset_queue(TX_Q);
    p.sent = 0;
    p.carries("a TX driver reset");
    assert_eq!(p.a.drops(DropReason::TxRingBroken), 1);
}

#[test]
fn rx_ring_faults_park_the_ring_until_the_driver_resets_it() {
    let mut p = Pair::new("hr");
    let err = p.fb.set_err_fd(RX_Q);
    // Both RX faults, one after the other, each ended by a driver reset.
    for fault in ["avail index jump", "head out of range"] {
        let before = p.b.drops(DropReason::RxRingBroken);
        p.fb.reset_queue(RX_Q);
        match fault {
            "avail index jump" => p.fb.jump_avail_idx(RX_Q, QUEUE_SIZE + 1),
            _ => p.fb.publish(RX_Q, u16::MAX),
        }
        // A datagram makes vnpd look for buffers.
        let frame = p.a.frame_to(p.b.ip, b"into a broken ring");
        p.fa.send(0, &frame);
        p.sent += 1;
        counted(&p.b, DropReason::RxRingBroken, before + 1);
        assert_no_cpu_burnt(fault);
        assert!(err.read().is_ok(), "{fault}: the frontend was told");
        // Reset with fresh buffers: the datagram that waited in the socket arrives.
        p.fb.reset_queue(RX_Q);
        p.fb.post_rx(0, 32, 2048);
        let got = p.fb.recv(0, 1, T);
        assert_eq!(
            got.len(),
            1,
            "{fault}: the waiting datagram after the reset"
        );
        assert_eq!(&got[0].2[VNET_HDR + 14..], &frame[14..]);
        p.carries(fault);
    }
}

#[test]
fn reconnect_brings_a_broken_ring_back() {
    let Pair {
        _control,
        a,
        b,
        mut fa,
        mut fb,
        ..
    } = Pair::new("hc");
    fa.jump_avail_idx(TX_Q, QUEUE_SIZE + 1);
    counted(&a, DropReason::TxRingBroken, 1);
    drop(fa);
    let mut fa = TestFrontend::connect(&a.socket, 1);
    let frame = a.frame_to(b.ip, b"after a reconnect");
    fa.send(0, &frame);
    let got = fb.recv(0, 1, T);
    assert_eq!(got.len(), 1, "B received {got:?}");
    assert_eq!(&got[0].2[VNET_HDR + 14..], &frame[14..]);
}

#[test]
fn malformed_tx_chains_and_headers_are_counted_and_the_ring_keeps_serving() {
    let mut p = Pair::new("ht");
    let s0 = p.fa.scratch(0);
    let s1 = p.fa.scratch(1);
    let good = p.a.frame_to(p.b.ip, b"x");
    let mut body = vec![0u8; VNET_HDR];
    body.extend_from_slice(&good);
    p.fa.write(s0, &body);
    p.fa.write(s1, &body);
    let n = body.len() as u32;
    type Attack = (&'static str, DropReason, Vec<Desc>);
    let attacks: Vec<Attack> = vec![
        (
            "beyond guest memory",
            DropReason::TxBadChain,
            vec![d(1 << 40, n, false, Next::End)],
        ),
        (
            "straddling the end",
            DropReason::TxBadChain,
            vec![d(MEM_END - 10, n, false, Next::End)],
        ),
        (
            "wrapping address",
            DropReason::TxBadChain,
            vec![d(u64::MAX - 10, n, false, Next::End)],
        ),
        (
            "zero length",
            DropReason::TxBadChain,
            vec![d(s0, 0, false, Next::End)],
        ),
        (
            "huge length",
            DropReason::TxBadChain,
            vec![d(s0, u32::MAX, false, Next::End)],
        ),
        (
            "loop",
            DropReason::TxBadChain,
            vec![d(s0, 8, false, Next::Rel(1)), d(s0, 8, false, Next::Rel(0))],
        ),
        (
            "next out of range",
            DropReason::TxBadChain,
            vec![d(s0, n, false, Next::Abs(9999))],
        ),
        (
            "device-writable",
            DropReason::TxBadChain,
            vec![d(s0, n, true, Next::End)],
        ),
        (
            "short header",
            DropReason::TxTruncatedHeader,
            vec![d(s0, 5, false, Next::End)],
        ),
        (
            "header without Ethernet",
            DropReason::TxTruncatedHeader,
            vec![d(s0, VNET_HDR as u32 + 4, false, Next::End)],
        ),
    ];
    for (what, reason, chain) in attacks {
        let before = p.a.drops(reason);
        p.send_chain(&chain);
        counted(&p.a, reason, before + 1);
        p.carries(what);
    }
    // Indirect tables: never negotiated, so refused, well-formed or not.
    let table = p.fa.scratch(10);
    let indirect: [(&str, Vec<Desc>); 3] = [
        ("good indirect table", vec![d(s0, n, false, Next::End)]),
        (
            "indirect table with a loop",
            vec![d(s0, 8, false, Next::Abs(1)), d(s1, 8, false, Next::Abs(0))],
        ),
        (
            "indirect table beyond memory",
            vec![d(1 << 40, n, false, Next::End)],
        ),
    ];
    for (what, entries) in indirect {
        let before = p.a.drops(DropReason::TxBadChain);
        p.fa.send_indirect(0, table, &entries);
        p.sent += 1;
        counted(&p.a, DropReason::TxBadChain, before + 1);
        p.carries(what);
    }
    // Checksum and segmentation requests in the virtio-net header: no offload negotiated.
    let mut csum = [0u8; VNET_HDR];
    csum[0] = 1; // VIRTIO_NET_HDR_F_NEEDS_CSUM
    let mut gso = [0u8; VNET_HDR];
    gso[1] = 1; // VIRTIO_NET_HDR_GSO_TCPV4
    for (what, header) in [("NEEDS_CSUM", csum), ("GSO_TCPV4", gso)] {
        let before = p.a.drops(DropReason::TxOffloadRequested);
        p.fa.send_with_header(0, header, &good);
        p.sent += 1;
        counted(&p.a, DropReason::TxOffloadRequested, before + 1);
        p.carries(what);
    }
    assert_eq!(p.a.drops(DropReason::TxRingBroken), 0);
}

/// Feature bits CSUM (0), HOST_TSO4 (11) and HOST_ECN (13).
const TX_OFFLOADS: u64 = 1 << 0 | 1 << 11 | 1 << 13;

/// An Ethernet frame of A holding a TCP/IPv4 packet to `to` with 12 option bytes and
/// `payload`, its checksum field holding the pseudo-header sum (a partial checksum, as Linux
/// leaves it), flags ACK|PSH.
fn tcp_frame(a: &Vm, to: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    use vnp_protocol::wire::{checksum, ipv4, tcp};
    let total = 20 + 32 + payload.len();
    let mut p = vec![0u8; total];
    {
        let mut ip = ipv4::Packet::new_unchecked(&mut p[..20]);
        ip.set_version_and_header_len(20);
        ip.set_total_len(total as u16);
        ip.set_ident(100);
        ip.set_unfragmented(true);
        ip.set_ttl(64);
        ip.set_protocol(6);
        ip.set_src_addr(a.ip);
        ip.set_dst_addr(to);
        ip.fill_checksum();
    }
    let mut t = tcp::Packet::new_unchecked(&mut p[20..52]);
    t.set_src_port(40000);
    t.set_dst_port(5201);
    t.set_seq_number(1_000_000);
    t.set_ack_number(1);
    t.set_header_len(32);
    t.set_flags(tcp::flags::ACK | tcp::flags::PSH);
    t.set_window_len(500);
    t.set_stored_checksum(checksum::pseudo_header(
        a.ip,
        to,
        6,
        (32 + payload.len()) as u16,
    ));
    p[40..52].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
    p[52..].copy_from_slice(payload);
    ethernet(ROUTER_MAC, a.mac, 0x0800, &p)
}

/// A virtio-net header asking for a TCP checksum (and, with `mss`, TSO).
fn offload_header(mss: Option<u16>) -> vnp_protocol::wire::virtio_net::Repr {
    use vnp_protocol::wire::virtio_net::{flags, gso, Repr};
    Repr {
        flags: flags::NEEDS_CSUM,
        gso_type: if mss.is_some() { gso::TCPV4 } else { gso::NONE },
        hdr_len: 66,
        gso_size: mss.unwrap_or(0),
        csum_start: 34,
        csum_offset: 16,
        num_buffers: 0,
    }
}

/// The inner TCP segments B received (after the virtio-net and Ethernet headers), each with
/// complete, valid IPv4 and TCP checksums.
fn tcp_segments(got: &[(u16, u32, Vec<u8>)], src: Ipv4Addr, dst: Ipv4Addr) -> Vec<Vec<u8>> {
    use vnp_protocol::wire::{checksum, ipv4, tcp};
    got.iter()
        .map(|(_, len, data)| {
            let inner = &data[VNET_HDR + 14..*len as usize];
            let ip = ipv4::Packet::new_checked(inner).unwrap();
            assert_eq!(ip.total_len(), inner.len());
            assert_eq!(checksum::checksum(&inner[..20]), 0, "IPv4 checksum");
            let t = tcp::Packet::new_checked(&inner[20..]).unwrap();
            assert!(t.verify_checksum(src, dst), "TCP checksum");
            inner.to_vec()
        })
        .collect()
}

#[test]
fn offloaded_frames_leave_complete_and_bad_offload_headers_are_counted() {
    use vnp_protocol::wire::tcp;
    use vnp_protocol::wire::virtio_net::{flags, gso, Repr};
    let mut p = Pair::acking("ho", TX_OFFLOADS);
    assert_eq!(p.fa.features & TX_OFFLOADS, TX_OFFLOADS, "vnpd offers them");
    let payload: Vec<u8> = (0..3001u32).map(|i| (i * 7 + 1) as u8).collect();
    let frame = tcp_frame(&p.a, p.b.ip, &payload);

    // A partial checksum, the frame spread over descriptors cut at odd offsets: completed.
    let (s0, s1, s2) = (p.fa.scratch(40), p.fa.scratch(43), p.fa.scratch(47));
    let small = tcp_frame(&p.a, p.b.ip, &payload[..1001]);
    p.fa.write(s0, &offload_header(None).to_bytes());
    p.fa.write(s1, &small[..101]);
    p.fa.write(s2, &small[101..]);
    p.send_chain(&[
        d(s0, VNET_HDR as u32, false, Next::Rel(1)),
        d(s1, 101, false, Next::Rel(2)),
        d(s2, (small.len() - 101) as u32, false, Next::End),
    ]);
    let got = p.fb.recv(0, 1, T);
    let segs = tcp_segments(&got, p.a.ip, p.b.ip);
    assert_eq!(segs.len(), 1);
    assert_eq!(
        &segs[0][..36],
        &small[14..50],
        "headers but the checksum unchanged"
    );
    assert_eq!(&segs[0][52..], &payload[..1001], "payload unchanged");
    assert_eq!(p.a.drops(DropReason::TxOversize), 0);

    // TSO: MTU-sized segments, each with its own headers, in order.
    p.fa.write(s0, &offload_header(Some(1000)).to_bytes());
    p.fa.write(s1, &frame[..101]);
    p.fa.write(s2, &frame[101..]);
    p.send_chain(&[
        d(s0, VNET_HDR as u32, false, Next::Rel(1)),
        d(s1, 101, false, Next::Rel(2)),
        d(s2, (frame.len() - 101) as u32, false, Next::End),
    ]);
    let got = p.fb.recv(0, 4, T);
    let segs = tcp_segments(&got, p.a.ip, p.b.ip);
    assert_eq!(segs.len(), 4);
    let mut joined = Vec::new();
    for (i, s) in segs.iter().enumerate() {
        let t = tcp::Packet::new_checked(&s[20..]).unwrap();
        assert_eq!(t.seq_number(), 1_000_000 + 1000 * i as u32);
        assert_eq!(
            t.flags() & tcp::flags::PSH != 0,
            i == 3,
            "PSH on the last only"
        );
        assert_eq!(u16::from_be_bytes([s[4], s[5]]), 100 + i as u16, "IP id");
        joined.extend_from_slice(t.payload());
    }
    assert_eq!(joined, payload);
    p.fa.wait_tx_completed(0, p.sent, T);
    let c = p.a.port.counters().snapshot();
    assert_eq!((c.tx_csum_frames, c.tx_tso_frames), (1, 1));

    // Every guest-controlled field that does not fit the packet: counted, dropped.
    let tso = offload_header(Some(1000));
    let attacks: Vec<(&str, DropReason, Repr)> = vec![
        (
            "DATA_VALID on TX",
            DropReason::TxBadVnetFlags,
            Repr {
                flags: flags::NEEDS_CSUM | flags::DATA_VALID,
                ..tso
            },
        ),
        (
            "unknown flag",
            DropReason::TxBadVnetFlags,
            Repr { flags: 0x81, ..tso },
        ),
        (
            "GSO_UDP (UFO)",
            DropReason::TxBadGsoType,
            Repr {
                gso_type: gso::UDP,
                ..tso
            },
        ),
        (
            "GSO_TCPV6",
            DropReason::TxBadGsoType,
            Repr {
                gso_type: gso::TCPV6,
                ..tso
            },
        ),
        (
            "GSO_UDP_L4",
            DropReason::TxBadGsoType,
            Repr {
                gso_type: gso::UDP_L4,
                ..tso
            },
        ),
        (
            "GSO without NEEDS_CSUM",
            DropReason::TxBadGsoType,
            Repr { flags: 0, ..tso },
        ),
        (
            "csum_start beyond the frame",
            DropReason::TxBadCsumStart,
            Repr {
                csum_start: 0xfff0,
                ..tso
            },
        ),
        (
            "csum_start in the IP header",
            DropReason::TxBadCsumStart,
            Repr {
                csum_start: 14,
                ..tso
            },
        ),
        (
            "csum_start in the payload",
            DropReason::TxBadCsumStart,
            Repr {
                csum_start: 70,
                ..tso
            },
        ),
        (
            "csum_offset beyond the frame",
            DropReason::TxBadCsumOffset,
            Repr {
                csum_offset: 0xfff0,
                ..tso
            },
        ),
        (
            "csum_offset not the TCP field",
            DropReason::TxBadCsumOffset,
            Repr {
                csum_offset: 6,
                ..tso
            },
        ),
        (
            "gso_size 0",
            DropReason::TxBadGsoSize,
            Repr { gso_size: 0, ..tso },
        ),
        (
            "gso_size 1: 3000 segments",
            DropReason::TxBadGsoSize,
            Repr { gso_size: 1, ..tso },
        ),
        (
            "gso_size beyond the MTU",
            DropReason::TxBadGsoSize,
            Repr {
                gso_size: 1401,
                ..tso
            },
        ),
        (
            "hdr_len beyond the frame",
            DropReason::TxBadHdrLen,
            Repr {
                hdr_len: 0xffff,
                ..tso
            },
        ),
    ];
    for (what, reason, header) in attacks {
        let before = p.a.drops(reason);
        p.fa.send_with_header(0, header.to_bytes(), &frame);
        p.sent += 1;
        counted(&p.a, reason, before + 1);
        p.carries(what);
    }
    // A checksum request on a packet that is not TCP/UDP (ICMP), or whose IPv4 length lies.
    let mut icmp = frame.clone();
    icmp[14 + 9] = 1;
    let mut lying = frame.clone();
    lying[14 + 2..14 + 4].copy_from_slice(&2000u16.to_be_bytes());
    for (what, bad) in [("ICMP", icmp), ("IPv4 length", lying)] {
        let before = p.a.drops(DropReason::TxBadOffloadHeaders);
        p.fa.send_with_header(0, tso.to_bytes(), &bad);
        p.sent += 1;
        counted(&p.a, DropReason::TxBadOffloadHeaders, before + 1);
        p.carries(what);
    }
    assert_eq!(p.a.drops(DropReason::TxRingBroken), 0);
}

/// A 64 KB TSO frame: with UDP GSO two messages of one `sendmmsg` (44 + 2 segments, each
/// message under 64 KB), without it (as on a kernel before 4.18) one datagram per segment. The
/// receiver sees the same 46 complete segments either way.
#[test]
fn a_64_kb_tso_frame_arrives_as_46_segments_with_and_without_udp_gso() {
    use vnp_protocol::wire::tcp;
    for udp_gso in [true, false] {
        let tuning = DataPathTuning {
            udp_gso,
            ..DataPathTuning::default()
        };
        let tag = if udp_gso { "hg" } else { "hn" };
        let mut p = Pair::acking_with(tag, TX_OFFLOADS, tuning);
        let payload: Vec<u8> = (0..64000u32).map(|i| (i * 11 + 5) as u8).collect();
        let frame = tcp_frame(&p.a, p.b.ip, &payload);
        p.fa.send_with_header(0, offload_header(Some(1400)).to_bytes(), &frame);
        p.sent += 1;
        let got = p.fb.recv(0, 46, T);
        let segs = tcp_segments(&got, p.a.ip, p.b.ip);
        assert_eq!(segs.len(), 46, "udp_gso {udp_gso}");
        let joined: Vec<u8> = segs
            .iter()
            .flat_map(|s| {
                tcp::Packet::new_checked(&s[20..])
                    .unwrap()
                    .payload()
                    .to_vec()
            })
            .collect();
        assert_eq!(joined, payload, "udp_gso {udp_gso}");
        let c = p.a.port.counters().snapshot();
        assert_eq!(
            (c.tx_tso_frames, c.tx_packets),
            (1, 1 + 46),
            "udp_gso {udp_gso}"
        );
        assert_eq!(c.drops(DropReason::TxSendError), 0);
        p.carries("a 64 KB TSO frame");
    }
}

/// A datagram from `raw` for `to` with a valid token.
fn good_datagram(raw: SocketAddrV4, to: &Vm, inner: &[u8]) -> Vec<u8> {
    let src_vm = Ipv4Addr::new(10, 77, 0, 50);
    let expiry = Expiry(now() + 300);
    let token = token_for(
        raw,
        src_vm,
        to.port.udp_addr(),
        to.ip,
        &to.secret,
        NETWORK,
        expiry,
    );
    datagram(NETWORK, token, expiry, inner, None)
}

#[test]
fn malformed_rx_chains_are_counted_and_the_ring_keeps_serving() {
    let control = MintingControl::new();
    let a = start_vm(&control, "hx", 2, 1);
    let mut fa = TestFrontend::connect(&a.socket, 1);
    let (raw, raw_addr) = raw_peer();
    let src_vm = Ipv4Addr::new(10, 77, 0, 50);
    let s = |i| fa.scratch(i);
    let (s0, s1, table) = (s(0), s(1), s(10));
    let long: Vec<Desc> = (0..65)
        .map(|i| d(s0 + i * 32, 32, true, Next::Rel(i as u16 + 1)))
        .collect();
    let mut long = long;
    long.last_mut().unwrap().next = Next::End;
    let attacks: Vec<(&str, Vec<Desc>)> = vec![
        ("readable descriptor", vec![d(s0, 2048, false, Next::End)]),
        (
            "beyond guest memory",
            vec![d(1 << 40, 2048, true, Next::End)],
        ),
        (
            "wrapping address",
            vec![d(u64::MAX - 10, 2048, true, Next::End)],
        ),
        ("zero length", vec![d(s0, 0, true, Next::End)]),
        (
            "loop",
            vec![d(s0, 64, true, Next::Rel(1)), d(s1, 64, true, Next::Rel(0))],
        ),
        ("next out of range", vec![d(s0, 64, true, Next::Abs(9999))]),
        ("65 descriptors", long),
    ];
    let mut delivered = 0u16;
    for (what, chain) in attacks {
        let before = a.drops(DropReason::RxBadChain);
        fa.post_rx_chain(0, &chain);
        fa.post_rx(0, 1, 2048);
        let inner = ipv4_udp(src_vm, a.ip, what.as_bytes());
        raw.send_to(&good_datagram(raw_addr, &a, &inner), a.port.udp_addr())
            .unwrap();
        let got = fa.recv(0, 2, T);
        delivered += 1;
        counted(&a, DropReason::RxBadChain, before + 1);
        let data: Vec<_> = got.iter().filter(|g| g.1 > 0).collect();
        assert_eq!(data.len(), 1, "{what}: {got:?}");
        assert_eq!(&data[0].2[VNET_HDR + 14..], &inner[..], "{what}");
    }
    // Indirect RX tables: never negotiated.
    let before = a.drops(DropReason::RxBadChain);
    fa.post_rx_indirect(0, table, &[d(s0, 2048, true, Next::End)]);
    fa.post_rx(0, 1, 2048);
    let inner = ipv4_udp(src_vm, a.ip, b"after an indirect RX table");
    raw.send_to(&good_datagram(raw_addr, &a, &inner), a.port.udp_addr())
        .unwrap();
    let got = fa.recv(0, 2, T);
    counted(&a, DropReason::RxBadChain, before + 1);
    assert!(got
        .iter()
        .any(|g| g.1 > 0 && g.2[VNET_HDR + 14..] == inner[..]));
    delivered += 1;
    assert_eq!(
        a.port.counters().snapshot().rx_packets,
        u64::from(delivered)
    );
    // A long chain within the cap (19 descriptors, as guests without mergeable buffers post;
    // the first 8 hold a full frame).
    let chain: Vec<Desc> = (0..19u64)
        .map(|i| {
            d(
                s0 + i * 256,
                256,
                true,
                if i < 18 {
                    Next::Rel(i as u16 + 1)
                } else {
                    Next::End
                },
            )
        })
        .collect();
    fa.post_rx_chain(0, &chain);
    let inner = ipv4_udp(src_vm, a.ip, b"into nineteen descriptors");
    raw.send_to(&good_datagram(raw_addr, &a, &inner), a.port.udp_addr())
        .unwrap();
    let got = fa.recv(0, 1, T);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].1 as usize, VNET_HDR + 14 + inner.len());
    assert_eq!(a.drops(DropReason::RxBadChain), before + 1);
}

/// Whether `needle` occurs in guest memory `start..start + len`.
fn guest_memory_contains(f: &TestFrontend, start: u64, len: u64, needle: &[u8]) -> bool {
    use vm_memory::{Bytes, GuestAddress};
    let mut bytes = vec![0u8; len as usize];
    f.mem.read_slice(&mut bytes, GuestAddress(start)).unwrap();
    bytes.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn rejected_datagrams_leave_nothing_in_guest_memory() {
    let control = MintingControl::new();
    let a = start_vm(&control, "hs", 2, 1);
    let mut fa = TestFrontend::connect(&a.socket, 1);
    fa.post_rx(0, 8, 2048);
    let (raw, raw_addr) = raw_peer();
    let to = a.port.udp_addr();
    let src_vm = Ipv4Addr::new(10, 77, 0, 50);
    let (start_addr, len) = fa.rx_buffer_area(0);
    // Traffic for another VM (its inner destination is not A).
    let secret_for_another_vm = b"SECRET-FOR-VM-10.77.0.9";
    let other = ipv4_udp(src_vm, Ipv4Addr::new(10, 77, 0, 9), secret_for_another_vm);
    let expiry = Expiry(now() + 300);
    raw.send_to(
        &datagram(NETWORK, Token::from_bytes([1; 8]), expiry, &other, None),
        to,
    )
    .unwrap();
    counted(&a, DropReason::RxWrongVm, 1);
    // (Checked now: the next datagram lands in the same buffer, which stays first in line.)
    assert!(
        !guest_memory_contains(&fa, start_addr, len, secret_for_another_vm),
        "another VM's traffic left in the guest's receive buffers"
    );
    // A forged datagram whose return-token option must not be seen either.
    let forged = ipv4_udp(src_vm, a.ip, b"FORGED-PAYLOAD-0123456789");
    let planted = ReturnToken {
        token: Token::from_bytes(*b"PLANTED!"),
        expiry: Expiry(now() + 3000),
    };
    raw.send_to(
        &datagram(
            NETWORK,
            Token::from_bytes([2; 8]),
            expiry,
            &forged,
            Some(planted),
        ),
        to,
    )
    .unwrap();
    counted(&a, DropReason::RxBadToken, 1);
    for needle in [&b"FORGED-PAYLOAD"[..], b"PLANTED!"] {
        assert!(
            !guest_memory_contains(&fa, start_addr, len, needle),
            "{:?} left in the guest's receive buffers",
            String::from_utf8_lossy(needle)
        );
    }
    // The buffers still serve a genuine datagram; the return-token option it carries is
    // vnpd's business and is not left behind the frame either.
    let inner = ipv4_udp(src_vm, a.ip, b"genuine");
    let expiry = Expiry(now() + 300);
    let token = token_for(raw_addr, src_vm, to, a.ip, &a.secret, NETWORK, expiry);
    let option = ReturnToken {
        token: Token::from_bytes(*b"RETTOKEN"),
        expiry: Expiry(now() + 600),
    };
    raw.send_to(&datagram(NETWORK, token, expiry, &inner, Some(option)), to)
        .unwrap();
    let got = fa.recv(0, 1, T);
    assert_eq!(got.len(), 1, "{:?}", a.port.counters().snapshot());
    assert_eq!(&got[0].2[VNET_HDR + 14..], &inner[..]);
    assert_eq!(a.port.counters().snapshot().return_tokens_learned, 1);
    assert!(
        !guest_memory_contains(&fa, start_addr, len, b"RETTOKEN"),
        "the return-token option left in the guest's buffer"
    );
}

#[test]
fn a_stopped_rx_ring_is_not_written() {
    let control = MintingControl::new();
    let a = start_vm(&control, "hp", 2, 1);
    let mut fa = TestFrontend::connect(&a.socket, 1);
    fa.post_rx(0, 8, 2048);
    let (raw, raw_addr): (UdpSocket, _) = raw_peer();
    let to = a.port.udp_addr();
    let src_vm = Ipv4Addr::new(10, 77, 0, 50);
    let inner = ipv4_udp(src_vm, a.ip, b"before the stop");
    raw.send_to(&good_datagram(raw_addr, &a, &inner), to)
        .unwrap();
    assert_eq!(fa.recv(0, 1, T).len(), 1);
    // DPDK's stop sequence: disabled, then GET_VRING_BASE. Held buffers come back (length 0)
    // before the answer; after it, nothing may touch the ring.
    fa.stop_queue(RX_Q);
    fa.stop_queue(TX_Q);
    let used = fa.rx_used(0);
    let late = ipv4_udp(src_vm, a.ip, b"AFTER-THE-STOP");
    let started = Instant::now();
    raw.send_to(&good_datagram(raw_addr, &a, &late), to)
        .unwrap();
    while started.elapsed() < Duration::from_secs(1) {
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(fa.rx_used(0), used, "the stopped ring's used index moved");
    }
    let (start_addr, len) = fa.rx_buffer_area(0);
    assert!(!guest_memory_contains(
        &fa,
        start_addr,
        len,
        b"AFTER-THE-STOP"
    ));
    assert_eq!(a.port.counters().snapshot().rx_packets, 1);
}

#[test]
fn after_dpdks_stop_sequence_no_datagram_enters_the_ring() {
    let control = MintingControl::new();
    let a = start_vm(&control, "hd", 2, 1);
    let b = start_vm(&control, "hdb", 3, 1);
    let guest = Guest::new(2);
    let mut r = Replay::connect(&a.socket, DPDK_22_11);
    r.run(&guest, &conv::dpdk_start());
    let mut fa = guest.driver(&r);
    let mut fb = TestFrontend::connect(&b.socket, 1);
    fa.post_rx(0, 8, 2048);
    fb.post_rx(0, 8, 2048);
    // Traffic both ways, so that each side has the other's token.
    fa.send(0, &a.frame_to(b.ip, b"a->b"));
    assert_eq!(fb.recv(0, 1, T).len(), 1);
    fb.send(0, &b.frame_to(a.ip, b"b->a"));
    assert_eq!(fa.recv(0, 1, T).len(), 1);
    fa.wait_tx_completed(0, 1, T);
    // testpmd's port stop: both rings disabled, then GET_VRING_BASE for both.
    r.run(&guest, &conv::dpdk_stop());
    let used = fa.rx_used(0);
    for i in 0..5 {
        fb.send(
            0,
            &b.frame_to(a.ip, format!("AFTER-THE-STOP-{i}").as_bytes()),
        );
    }
    fb.wait_tx_completed(0, 6, T);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(1) {
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(fa.rx_used(0), used, "the stopped ring's used index moved");
    }
    let (start_addr, len) = fa.rx_buffer_area(0);
    assert!(!guest_memory_contains(
        &fa,
        start_addr,
        len,
        b"AFTER-THE-STOP"
    ));
    assert_eq!(a.port.counters().snapshot().rx_packets, 1);
}

/// A guest that takes no RX buffers while datagrams wait, as one that missed its interrupt
/// does (here its driver asks for none), is interrupted again once the ring has been out of
/// buffers for a while (`datapath::rx_stall`), and then gets the datagrams that waited.
#[test]
fn a_guest_that_takes_no_rx_buffers_is_interrupted_again() {
    let control = MintingControl::new();
    let a = start_vm(&control, "hi", 2, 1);
    let mut fa = TestFrontend::connect(&a.socket, 1);
    fa.set_no_interrupt(RX_Q, true);
    fa.post_rx(0, 4, 2048);
    let (raw, raw_addr): (UdpSocket, _) = raw_peer();
    let to = a.port.udp_addr();
    let src_vm = Ipv4Addr::new(10, 77, 0, 50);
    let send = |i: u32| {
        let inner = ipv4_udp(src_vm, a.ip, format!("datagram {i}").as_bytes());
        raw.send_to(&good_datagram(raw_addr, &a, &inner), to)
            .unwrap();
    };
    for i in 0..4 {
        send(i);
    }
    assert_eq!(fa.recv(0, 4, T).len(), 4);
    // The one interrupt a device start owes (`device::call_watch`) is not what is tested.
    fa.take_interrupts(RX_Q);
    let started = Instant::now();
    let mut i = 4;
    while fa.take_interrupts(RX_Q) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "the guest was never interrupted again ({} datagrams waiting)",
            i - 4
        );
        send(i);
        i += 1;
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        started.elapsed() >= Duration::from_millis(40),
        "interrupted after {:?}, before the ring had stalled",
        started.elapsed()
    );
    fa.post_rx(0, 16, 2048);
    let got = fa.recv(0, 1, T);
    assert!(
        !got.is_empty(),
        "the datagrams that waited were not delivered"
    );
}

/// Sends `n` datagrams numbered from `first` to VM `a` from `raw`.
fn send_numbered(raw: &UdpSocket, raw_addr: SocketAddrV4, a: &Vm, first: u32, n: u32) {
    let src_vm = Ipv4Addr::new(10, 77, 0, 50);
    for i in first..first + n {
        let inner = ipv4_udp(src_vm, a.ip, format!("datagram {i}").as_bytes());
        raw.send_to(&good_datagram(raw_addr, a, &inner), a.port.udp_addr())
            .unwrap();
    }
}

/// A VM with a test frontend that posted RX buffers, and a peer socket sending to it.
/// (Fields drop in order: the frontend goes before the VM's port.)
struct RxGuest {
    fe: TestFrontend,
    vm: Vm,
    _control: Arc<MintingControl>,
    raw: UdpSocket,
    raw_addr: SocketAddrV4,
}

impl RxGuest {
    /// VM `name` with `buffers` RX buffers posted.
    fn new(name: &str, buffers: usize) -> RxGuest {
        let control = MintingControl::new();
        let vm = start_vm(&control, name, 2, 1);
        let mut fe = TestFrontend::connect(&vm.socket, 1);
        fe.post_rx(0, buffers, 2048);
        let (raw, raw_addr) = raw_peer();
        RxGuest {
            fe,
            vm,
            _control: control,
            raw,
            raw_addr,
        }
    }

    /// [`RxGuest::new`], which has then received datagram 0.
    fn with_one_datagram(name: &str, buffers: usize) -> RxGuest {
        let mut g = RxGuest::new(name, buffers);
        g.send(0, 1);
        assert_eq!(g.fe.recv(0, 1, T).len(), 1);
        g
    }

    /// Sends datagrams `first..first + n`.
    fn send(&mut self, first: u32, n: u32) {
        send_numbered(&self.raw, self.raw_addr, &self.vm, first, n);
    }
}

/// Waits up to 3 s for an interrupt on `q`; returns how long it took.
fn wait_interrupt(f: &TestFrontend, q: usize, what: &str) -> Duration {
    let started = Instant::now();
    while f.take_interrupts(q) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "never interrupted again: {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    started.elapsed()
}

/// The stall net without new traffic: a burst larger than the guest's buffers, then nothing.
/// No datagram arrives to wake the worker (the socket is edge-triggered); its RX timer must
/// (`datapath::rx_timer`).
#[test]
fn a_stalled_guest_is_interrupted_again_when_no_more_datagrams_come() {
    let mut g = RxGuest::new("hq", 4);
    g.send(0, 8);
    assert_eq!(g.fe.recv(0, 4, T).len(), 4);
    // Let the worker find the ring empty with four waiting, then drop what came so far.
    std::thread::sleep(Duration::from_millis(20));
    g.fe.take_interrupts(RX_Q);
    wait_interrupt(
        &g.fe,
        RX_Q,
        "ring out of buffers, datagrams waiting, none arriving",
    );
    g.fe.post_rx(0, 16, 2048);
    assert_eq!(g.fe.recv(0, 4, T).len(), 4, "the four that waited");
}

/// A driver that misses one interrupt with EVENT_IDX never gets another: its `used_event` is
/// behind, so no later entry asks for one, and with buffers left the ring never runs out.
/// vnpd interrupts it again once it has left entries unread for a while.
#[test]
fn a_guest_that_missed_its_interrupt_with_buffers_left_is_interrupted_again() {
    let mut g = RxGuest::with_one_datagram("hm", 32);
    // From here the driver looks at nothing: the next interrupt is "lost".
    g.fe.rearm_interrupts = false;
    g.send(1, 1);
    wait_interrupt(&g.fe, RX_Q, "the first one, which the driver misses");
    g.send(2, 3);
    std::thread::sleep(Duration::from_millis(20));
    g.fe.take_interrupts(RX_Q);
    // None of these three crossed the driver's `used_event`: only the watch interrupts.
    wait_interrupt(&g.fe, RX_Q, "entries left unread with buffers to spare");
    g.fe.rearm_interrupts = true;
    assert_eq!(g.fe.recv(0, 4, T).len(), 4, "all four were there");
}

/// Datagrams that arrive while the RX ring is disabled wait in the socket; when the frontend
/// enables the ring again without a kick (a migration destination's start, a frontend that
/// enables after posting), they are delivered all the same. (vhost-user-backend 0.24 provides
/// the wake-up: it hands the worker a kick event for each ring it registers as live. This pins
/// that the socket, edge-triggered, does not need a new datagram.)
#[test]
fn datagrams_that_waited_for_a_disabled_ring_are_delivered_once_it_is_enabled() {
    let mut g = RxGuest::with_one_datagram("hd", 16);
    g.fe.set_ring_enabled(RX_Q, false);
    g.send(1, 3);
    assert!(
        g.fe.recv(0, 1, Duration::from_millis(300)).is_empty(),
        "delivered into a disabled ring"
    );
    g.fe.set_ring_enabled(RX_Q, true);
    assert_eq!(
        g.fe.recv(0, 3, T).len(),
        3,
        "the datagrams that waited were not delivered after the enable"
    );
}
