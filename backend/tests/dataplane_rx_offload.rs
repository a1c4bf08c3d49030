//! Receive offload through a real vnpd port: a peer host sends the segments of one TCP flow as
//! one UDP GSO train (so vnpd's socket gets them as one GRO message); a guest that negotiated
//! `GUEST_TSO4`, `GUEST_CSUM` and `MRG_RXBUF` gets them as one coalesced segment spread over
//! mergeable buffers, a guest without them one frame per segment. Loopback only.

mod dataplane_common;
mod dataplane_frontend;

use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

use dataplane_common::*;
use dataplane_frontend::{TestFrontend, VNET_HDR};
use virtio_bindings::virtio_net::{VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4};
use vnp_protocol::token::Expiry;
use vnp_protocol::wire::virtio_net::{flags, gso};
use vnp_protocol::wire::{ipv4, tcp};

const T: Duration = Duration::from_secs(5);
const MSS: usize = 1000;
const SEGMENTS: usize = 8;
const RX_OFFLOADS: u64 = 1 << VIRTIO_NET_F_GUEST_CSUM | 1 << VIRTIO_NET_F_GUEST_TSO4;

/// Segment `i` of the flow src:4000 -> dst:5000 (ACK, payload bytes from the stream offset).
fn tcp_segment(src: Ipv4Addr, dst: Ipv4Addr, i: usize) -> Vec<u8> {
    let total = 40 + MSS;
    let mut p = vec![0u8; total];
    for (k, b) in p[40..].iter_mut().enumerate() {
        *b = ((i * MSS + k) % 251) as u8;
    }
    {
        let mut ip = ipv4::Packet::new_unchecked(&mut p[..]);
        ip.set_version_and_header_len(20);
        ip.set_total_len(total as u16);
        ip.set_ident(i as u16);
        ip.set_unfragmented(true);
        ip.set_ttl(64);
        ip.set_protocol(ipv4::protocol::TCP);
        ip.set_src_addr(src);
        ip.set_dst_addr(dst);
        ip.fill_checksum();
    }
    let mut t = tcp::Packet::new_unchecked(&mut p[20..]);
    t.set_src_port(4000);
    t.set_dst_port(5000);
    t.set_seq_number(1_000_000 + (i * MSS) as u32);
    t.set_ack_number(42);
    t.set_header_len(20);
    t.set_flags(tcp::flags::ACK);
    t.set_window_len(1000);
    t.fill_checksum(src, dst);
    p
}

/// Sends `SEGMENTS` segments to VM `b` from a plain socket as one UDP GSO train; returns them.
fn send_train(b: &Vm) -> Vec<Vec<u8>> {
    let (raw, raw_addr) = raw_peer();
    let to = b.port.udp_addr();
    let src_vm = Ipv4Addr::new(10, 77, 0, 40);
    let e = Expiry(now() + 300);
    let token = token_for(raw_addr, src_vm, to, b.ip, &b.secret, NETWORK, e);
    let segments: Vec<Vec<u8>> = (0..SEGMENTS)
        .map(|i| tcp_segment(src_vm, b.ip, i))
        .collect();
    let datagrams: Vec<Vec<u8>> = segments
        .iter()
        .map(|s| datagram(NETWORK, token, e, s, None))
        .collect();
    set_udp_segment(&raw, datagrams[0].len());
    raw.send_to(&datagrams.concat(), to).unwrap();
    segments
}

fn set_udp_segment(s: &UdpSocket, size: usize) {
    let v = size as libc::c_int;
    // SAFETY: setsockopt on a socket we own with a pointer to a live c_int and its size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_UDP,
            libc::UDP_SEGMENT,
            (&v as *const libc::c_int).cast(),
            4,
        )
    };
    assert_eq!(rc, 0, "UDP_SEGMENT");
}

/// Frames as the guest driver sees them: each the used entries its `num_buffers` says, joined.
fn frames(entries: &[(u16, u32, Vec<u8>)]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < entries.len() {
        let d = &entries[i].2;
        let n = usize::from(u16::from_le_bytes([d[10], d[11]])).max(1);
        assert!(i + n <= entries.len(), "frame of {n} buffers incomplete");
        out.push(entries[i..i + n].iter().flat_map(|e| e.2.clone()).collect());
        i += n;
    }
    out
}

#[test]
fn an_offloading_guest_gets_one_coalesced_segment_over_mergeable_buffers() {
    let control = MintingControl::new();
    let b = start_vm(&control, "rxo", 3, 1);
    let mut fb = TestFrontend::connect_acking(&b.socket, 1, RX_OFFLOADS);
    assert_eq!(fb.features & RX_OFFLOADS, RX_OFFLOADS, "vnpd offers them");
    // Small buffers, as a guest's mergeable buffers can be: the frame must span several.
    fb.post_rx(0, 64, 1024);
    let segments = send_train(&b);
    let want_len = VNET_HDR + 14 + 40 + SEGMENTS * MSS;
    let entries = fb.recv(0, want_len.div_ceil(1024), T);
    let got = frames(&entries);
    assert_eq!(
        got.len(),
        1,
        "one coalesced frame, got {} frames; port counters: {:?}",
        got.len(),
        b.port.counters().snapshot()
    );
    let f = &got[0];
    assert_eq!(f.len(), want_len);
    // virtio-net header: NEEDS_CSUM, TCPV4, hdr_len, gso_size, csum_start/offset.
    assert_eq!(f[0], flags::NEEDS_CSUM);
    assert_eq!(f[1], gso::TCPV4);
    let le = |at: usize| u16::from_le_bytes([f[at], f[at + 1]]);
    assert_eq!(le(2), 14 + 40, "hdr_len");
    assert_eq!(usize::from(le(4)), MSS, "gso_size");
    assert_eq!((le(6), le(8)), (14 + 20, 16), "csum_start, csum_offset");
    assert_eq!(usize::from(le(10)), want_len.div_ceil(1024), "num_buffers");
    let packet = &f[VNET_HDR + 14..];
    let ip = ipv4::Packet::new_checked(packet).unwrap();
    assert_eq!(ip.total_len(), 40 + SEGMENTS * MSS);
    assert!(ip.verify_checksum(), "IPv4 header checksum fixed");
    // The payload is the segments' payloads in order.
    let payload: Vec<u8> = segments.iter().flat_map(|s| s[40..].to_vec()).collect();
    assert_eq!(&packet[40..], &payload[..]);
    // Completing the partial checksum as the guest does gives a valid segment.
    let mut seg = packet[20..].to_vec();
    let partial = vnp_protocol::wire::checksum::sum(&seg);
    seg[16..18].copy_from_slice(&(!partial).to_be_bytes());
    assert!(tcp::Packet::new_checked(&seg[..])
        .unwrap()
        .verify_checksum(ip.src_addr(), ip.dst_addr()));
    let s = b.port.counters().snapshot();
    assert_eq!(s.rx_packets, SEGMENTS as u64, "{s:?}");
}

#[test]
fn a_guest_without_receive_offloads_gets_the_segments_one_by_one() {
    let control = MintingControl::new();
    let b = start_vm(&control, "rxn", 3, 1);
    let mut fb = TestFrontend::connect(&b.socket, 1);
    assert_eq!(fb.features & RX_OFFLOADS, 0);
    fb.post_rx(0, 64, 2048);
    let segments = send_train(&b);
    let got = frames(&fb.recv(0, SEGMENTS, T));
    assert_eq!(
        got.len(),
        SEGMENTS,
        "frames; port counters: {:?}",
        b.port.counters().snapshot()
    );
    for (f, s) in got.iter().zip(&segments) {
        assert_eq!(&f[..10], &[0u8; 10], "no offload fields");
        assert_eq!(&f[VNET_HDR + 14..], &s[..], "the segment as sent");
    }
    assert_eq!(b.port.counters().snapshot().rx_packets, SEGMENTS as u64);
}
