//! Cost of vnpd's per-VM NAT (`vnpd::nat`) per packet, single thread, no I/O, no lock:
//! `cargo run --release -p vnpd --example nat_table`.
//!
//! One VM with one 512-port block (the default) and 500 live TCP flows (almost full). Measured,
//! each as the median of 7 runs of 2 million packets, in ns per packet:
//! - `outbound, existing flow`: `nat::packet::outbound` on a 40-byte header copy of a flow's
//!   segment (flow lookup by key, TCP state update, source port rewrite, incremental checksum);
//! - `inbound, reply`: `nat::packet::inbound` on a reply's header copy (reverse lookup by
//!   mapped port, remote check, destination port rewrite);
//! - `new flow + expiry`: a SYN on a new key when the oldest flow has just expired (the
//!   allocation sweeps it and takes its port), the worst case of a full table.

use std::hint::black_box;
use std::net::Ipv4Addr;
use std::time::Instant;

use vnp_protocol::wire::ipv4::{self, protocol, Repr, DEFAULT_TTL};
use vnp_protocol::wire::tcp::{self, flags};
use vnpd::nat::packet::{inbound, outbound};
use vnpd::nat::{NatTable, PortBlock};

const VM: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const REMOTE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const FLOWS: u16 = 500;
const N: u32 = 2_000_000;

fn segment(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, fl: u8) -> Vec<u8> {
    let mut p = vec![0u8; 40];
    Repr {
        src_addr: src,
        dst_addr: dst,
        protocol: protocol::TCP,
        payload_len: 20,
        ttl: DEFAULT_TTL,
    }
    .emit(&mut ipv4::Packet::new_unchecked(&mut p[..]));
    let mut t = tcp::Packet::new_unchecked(&mut p[20..]);
    t.set_src_port(sport);
    t.set_dst_port(dport);
    t.set_header_len(20);
    t.set_flags(fl);
    t.fill_checksum(src, dst);
    p
}

/// A table with FLOWS established flows from guest ports 30000.. to REMOTE:443; returns the
/// mapped port of each.
fn full_table() -> (NatTable, Vec<u16>) {
    let mut t = NatTable::new(&[PortBlock::new(1024, 1535).unwrap()]);
    let mut mapped = Vec::new();
    for i in 0..FLOWS {
        let mut syn = segment(VM, 30000 + i, REMOTE, 443, flags::SYN);
        outbound(&mut t, &mut syn, false, 0).unwrap();
        let port = u16::from_be_bytes([syn[20], syn[21]]);
        let mut synack = segment(REMOTE, 443, VM, port, flags::SYN | flags::ACK);
        inbound(&mut t, &mut synack, VM, 0).unwrap();
        mapped.push(port);
    }
    (t, mapped)
}

fn median_ns(mut f: impl FnMut(u32)) -> f64 {
    let mut runs: Vec<f64> = (0..7)
        .map(|_| {
            let t = Instant::now();
            for i in 0..N {
                f(i);
            }
            t.elapsed().as_nanos() as f64 / f64::from(N)
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    runs[3]
}

fn main() {
    let (mut t, mapped) = full_table();
    let outs: Vec<Vec<u8>> = (0..FLOWS)
        .map(|i| segment(VM, 30000 + i, REMOTE, 443, flags::ACK))
        .collect();
    let mut buf = [0u8; 40];
    let out_ns = median_ns(|i| {
        buf.copy_from_slice(&outs[(i % u32::from(FLOWS)) as usize]);
        black_box(outbound(&mut t, &mut buf, false, 1).unwrap());
    });
    let ins: Vec<Vec<u8>> = mapped
        .iter()
        .map(|&p| segment(REMOTE, 443, VM, p, flags::ACK))
        .collect();
    let in_ns = median_ns(|i| {
        buf.copy_from_slice(&ins[(i % u32::from(FLOWS)) as usize]);
        inbound(&mut t, &mut buf, VM, 1).unwrap();
        black_box(&buf);
    });
    // New flows on UDP, whose flows expire after 30 s: every packet a new key, its clock 31 s
    // after the previous one's, so each allocation finds the oldest flow expired.
    let mut u = NatTable::new(&[PortBlock::new(1024, 1535).unwrap()]);
    let mut udp = vec![0u8; 28];
    Repr {
        src_addr: VM,
        dst_addr: REMOTE,
        protocol: protocol::UDP,
        payload_len: 8,
        ttl: DEFAULT_TTL,
    }
    .emit(&mut ipv4::Packet::new_unchecked(&mut udp[..]));
    udp[22..24].copy_from_slice(&53u16.to_be_bytes());
    let mut clock = 0u64;
    let new_ns = median_ns(|i| {
        udp[20..22].copy_from_slice(&(i as u16 | 1).to_be_bytes());
        clock += 31;
        black_box(outbound(&mut u, &mut udp, false, clock).unwrap());
    });
    println!("| operation | ns per packet |");
    println!("|---|---|");
    println!("| `nat::packet::outbound`, existing TCP flow (500 live flows) | {out_ns:.1} |");
    println!("| `nat::packet::inbound`, reply on a mapped TCP flow | {in_ns:.1} |");
    println!("| `nat::packet::outbound`, new UDP flow, previous one expired | {new_ns:.1} |");
}
