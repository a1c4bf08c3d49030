//! The NAT target: vnpd's per-VM NAT (`vnpd::nat`: [`NatTable`], the header rewrites of
//! `nat::packet`, the exhaustion answers of `nat::answer`) driven the way
//! `datapath::nat_hook` drives it: hostile guest packets through the outbound rewrite (on a
//! copy of at most `NAT_HEAD_MAX` header bytes, as `nat_outbound` reads them), hostile packets
//! from the gateway through the inbound rewrite (`nat_inbound`: only sources outside the
//! network, at most `needed_len` bytes), with the table swept once per clock second as
//! `NatState::table_at` does. The clock is a counter the input advances.
//!
//! Input: a mode byte, then operations `[op] [dt] [len] [len bytes]`. Mode: the VM's first
//! port block has `1 + (mode & 0x0f)` ports from 40000, a second block `mode >> 4` ports from
//! 50000 (small, so that exhaustion and port reuse are reachable). `dt` advances the clock (by
//! `dt` seconds, or by `(dt - 249) * 1000` from 250 on, past every flow timeout). `op & 7`:
//! 0 a guest packet out, 1 a packet in from the gateway, 2 a reply to the last rewritten
//! outbound packet (its bytes: TCP flags, then payload), 3 an ICMP error about it (type, code,
//! whether the gateway already put the VM's address in the quote, extra quoted bytes), 4 new
//! port blocks (3 bytes each: first port, length), 5 the guest's ICMP error about the last
//! reply it was given (type, code, extra quoted bytes; `nat::packet::outbound_error`), other
//! values a guest packet out. Operations after the first [`MAX_OPS`] are ignored.
//! Bit 3 ([`FIX`]) makes a raw packet (ops 0, 1) well formed first: version, header length,
//! total length, no fragment bits, a NATed protocol, addresses on the right sides, UDP
//! length, and every checksum filled. Bit 4 ([`NEEDS_CSUM`]): the outbound frame has a partial
//! checksum (virtio-net `NEEDS_CSUM`).
//!
//! Invariants asserted (a shadow of every mapping handed out is kept):
//! - an outbound rewrite changes only the source port (echo identifier) and the L4 checksum;
//!   a live flow keeps its port; a new flow gets a port of the VM's current blocks that no live
//!   flow holds; no two live flows share a key;
//! - checksums that verified before a rewrite (outbound, inbound, ICMP error: outer and quoted)
//!   verify after it; a `NEEDS_CSUM` frame's checksum field is left alone;
//! - an inbound rewrite restores the port of the flow the shadow says owns the mapped port,
//!   and only for that flow's remote; a reply to a live mapped flow is always accepted and
//!   maps back to the original tuple; an ICMP error about one always is, its quote then names
//!   the VM's address and port;
//! - "ports exhausted" only when every port of the blocks is held by a live flow; its answer
//!   goes to the VM's MAC with a valid IPv4 checksum;
//! - a guest's ICMP error about a live mapped flow is translated: only its quoted port (to the
//!   mapped one, with the quoted UDP/ICMP checksum) and the ICMP checksum change, and that
//!   checksum verifies when it did before;
//! - mapped flows never outnumber the ports ever in the blocks; inbound flows stay under
//!   `MAX_INBOUND_FLOWS`.
//!
//! Cost: every check asks the table about the one port or flow the operation names
//! (`NatTable::lookup_mapped`, `NatTable::mapped_port`, before the operation); the scan of every
//! live flow (no key twice, each on the port the shadow says it was given) runs every
//! [`FULL_CHECK_EVERY`] operations and after the last one, not after each (it made the target
//! quadratic in the input's length).

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;

use vnp_protocol::wire::ethernet::Frame;
use vnp_protocol::wire::icmpv4::{self, msg_type};
use vnp_protocol::wire::ipv4::{self, protocol};
use vnp_protocol::wire::tcp;
use vnpd::datapath::frame::GuestNet;
use vnpd::datapath::nat_hook::{is_outside, rx_drop_reason, tx_drop_reason, NAT_HEAD_MAX};
use vnpd::nat::answer::{exhaustion_answer, AnswerAddrs};
use vnpd::nat::packet::{self, needed_len, OutboundDone};
use vnpd::nat::table::MAX_INBOUND_FLOWS;
use vnpd::nat::{FlowKey, NatDrop, NatRefusal, NatTable, PortBlock, Proto};

#[path = "nat_packets.rs"]
mod packets;
use packets::{
    be16, check_guest_error, fix_packet, icmp_error_about, icmp_error_from_guest, named_in_quote,
    named_port, outbound_key, port_fields, quoted_flow, reply_to, verify_header,
};
pub(crate) use packets::{fill_checksums, l4_valid};

/// Operations of one input after these are ignored: the longest inputs a campaign keeps would
/// otherwise cost milliseconds each while reaching nothing a shorter input does not.
pub const MAX_OPS: usize = 256;
/// The full scan of the live flows runs every this many operations (and after the last).
pub const FULL_CHECK_EVERY: usize = 16;

/// Op bit: make a raw packet well formed, checksums filled.
pub const FIX: u8 = 0x08;
/// Op bit: the outbound frame's L4 checksum is partial (`NEEDS_CSUM`).
pub const NEEDS_CSUM: u8 = 0x10;

/// The VM.
pub const VM_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
/// Its prefix length.
pub const PREFIX_LEN: u8 = 24;
/// The gateway's public address (the source of the VM's packets outside).
pub const PUBLIC: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// A router on the way that sends ICMP errors.
pub const ROUTER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const VM_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 2];
const ROUTER_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];
/// The clock's start (seconds of NAT's monotonic clock).
const START: u64 = 100;

fn net() -> GuestNet {
    GuestNet {
        vm_ip: VM_IP,
        prefix_len: PREFIX_LEN,
        router_ip: Ipv4Addr::new(10, 0, 0, 1),
        mtu: 1400,
    }
}

/// The last outbound packet NAT rewrote: as it left, and the flow it belongs to.
struct Sent {
    packet: Vec<u8>,
    key: FlowKey,
}

struct Run {
    table: NatTable,
    now: u64,
    last_sweep: u64,
    /// Every port ever in the blocks.
    ever: HashSet<u16>,
    /// Mapped port -> the flow it was last handed out to.
    shadow: HashMap<(Proto, u16), FlowKey>,
    last: Option<Sent>,
    /// The last packet delivered to the VM on a mapped flow, as the VM got it.
    delivered: Option<Sent>,
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let (mode, mut rest) = crate::split_mode(data);
    let mut blocks = vec![PortBlock::new(40000, 40000 + u16::from(mode & 0x0f)).expect("block")];
    if mode >> 4 != 0 {
        blocks.push(PortBlock::new(50000, 50000 + u16::from(mode >> 4) - 1).expect("block"));
    }
    let mut r = Run {
        table: NatTable::new(&blocks),
        now: START,
        last_sweep: START,
        ever: HashSet::new(),
        shadow: HashMap::new(),
        last: None,
        delivered: None,
    };
    r.note_blocks(&blocks);
    let mut ops = 0;
    while let [op, dt, len, tail @ ..] = rest {
        if ops == MAX_OPS {
            break;
        }
        let n = usize::from(*len).min(tail.len());
        let (bytes, next) = tail.split_at(n);
        rest = next;
        r.advance(*dt);
        r.op(*op, bytes);
        r.check_table();
        ops += 1;
        if ops % FULL_CHECK_EVERY == 0 {
            r.check_live();
        }
    }
    r.check_live();
}

impl Run {
    fn note_blocks(&mut self, blocks: &[PortBlock]) {
        for b in blocks {
            self.ever.extend(b.first..=b.last);
        }
    }

    fn advance(&mut self, dt: u8) {
        self.now += match dt {
            0..=249 => u64::from(dt),
            _ => u64::from(dt - 249) * 1000,
        };
        // `NatState::table_at`: a sweep at most once per clock second.
        if self.now > self.last_sweep {
            self.table.expire(self.now);
            self.last_sweep = self.now;
        }
    }

    fn op(&mut self, op: u8, bytes: &[u8]) {
        match op & 7 {
            1 => {
                let mut p = bytes.to_vec();
                if op & FIX != 0 {
                    fix_packet(&mut p, false);
                }
                self.inbound(p);
            }
            2 => {
                if let Some(p) = self.last.as_ref().and_then(|s| reply_to(s, bytes)) {
                    let key = self.last.as_ref().map(|s| s.key);
                    self.inbound_expecting(p, key);
                }
            }
            3 => {
                if let Some((p, translated)) =
                    self.last.as_ref().and_then(|s| icmp_error_about(s, bytes))
                {
                    let key = self.last.as_ref().map(|s| s.key).filter(|_| translated);
                    self.inbound_expecting(p, key);
                }
            }
            4 => {
                let blocks: Vec<PortBlock> = bytes
                    .chunks_exact(3)
                    .take(4)
                    .filter_map(|c| {
                        let first = u16::from_be_bytes([c[0], c[1]]).max(1);
                        PortBlock::new(first, first.saturating_add(u16::from(c[2])))
                    })
                    .collect();
                self.table.set_blocks(&blocks);
                self.note_blocks(&blocks);
            }
            5 => {
                if let Some((p, translated)) = self
                    .delivered
                    .as_ref()
                    .and_then(|d| icmp_error_from_guest(d, bytes))
                {
                    self.outbound_expecting(p, false, translated);
                }
            }
            _ => {
                let mut p = bytes.to_vec();
                if op & FIX != 0 {
                    fix_packet(&mut p, true);
                }
                self.outbound(p, op & NEEDS_CSUM != 0);
            }
        }
    }

    /// Every live mapped flow: no key twice, each on the port it was last handed (the shadow),
    /// and found there by its key.
    fn check_live(&self) {
        let mut keys = HashSet::new();
        for f in self.table.flows(self.now) {
            if let Some(m) = f.mapped {
                assert!(keys.insert(f.key), "two live flows for {:?}", f.key);
                assert_eq!(self.shadow.get(&(f.key.proto, m)), Some(&f.key), "shadow");
                assert_eq!(self.table.mapped_port(&f.key, self.now), Some(m), "by key");
            }
        }
    }

    /// The live mapped flow `key`'s port (checked both ways: by key and by port).
    fn live_port(&self, key: &FlowKey) -> Option<u16> {
        let port = self.table.mapped_port(key, self.now)?;
        (self.table.lookup_mapped(key.proto, port, self.now) == Some(*key)).then_some(port)
    }

    /// `nat_hook::nat_outbound` and `nat_in_place`, with the invariants.
    fn outbound(&mut self, packet: Vec<u8>, needs_csum: bool) {
        self.outbound_expecting(packet, needs_csum, false);
    }

    /// An outbound packet; `error_about_flow`: an ICMP error (of a type NAT translates) about
    /// a flow, which must be translated when that flow is live.
    fn outbound_expecting(&mut self, packet: Vec<u8>, needs_csum: bool, error_about_flow: bool) {
        let Some(a) = packet.get(12..20) else {
            return;
        };
        // The data path drops a spoofed source (`frame::classify_tx`) and sends only outside
        // destinations through NAT.
        let (src, dst) = (
            Ipv4Addr::new(a[0], a[1], a[2], a[3]),
            Ipv4Addr::new(a[4], a[5], a[6], a[7]),
        );
        if src != VM_IP || !is_outside(&net(), dst) {
            return;
        }
        let got = packet.len().min(NAT_HEAD_MAX);
        let mut head = packet[..got].to_vec();
        let Some(need) = needed_len(&head).filter(|n| *n <= got) else {
            return;
        };
        head.truncate(need);
        let key = outbound_key(&head);
        let held = key.and_then(|k| self.live_port(&k));
        let quoted = quoted_flow(&head).filter(|k| !self.table.is_inbound_flow(k, self.now));
        let quoted_port = quoted.and_then(|k| self.live_port(&k));
        let result = packet::outbound(&mut self.table, &mut head, needs_csum, self.now);
        if error_about_flow && quoted_port.is_some() {
            assert_eq!(
                result,
                Ok(OutboundDone::Rewritten),
                "the guest's ICMP error about the live flow {quoted:?}"
            );
        }
        match result {
            Err(d) => {
                tx_drop_reason(d);
                if d == NatDrop::Refused(NatRefusal::Exhausted) {
                    self.exhausted(key, &head);
                }
            }
            Ok(OutboundDone::Unchanged) => assert_eq!(head, packet[..need], "unchanged"),
            Ok(OutboundDone::Rewritten) => {
                let mut out = packet.clone();
                out[..need].copy_from_slice(&head);
                if let Some(q) = quoted {
                    let mapped = quoted_port.expect("an error about a flow NAT does not hold");
                    check_guest_error(q, mapped, &packet, &out);
                    return;
                }
                let key = key.expect("a rewritten packet has a flow key");
                let mapped = self.check_rewrite(key, held, &packet, &out, needs_csum);
                self.shadow.insert((key.proto, mapped), key);
                self.last = Some(Sent { packet: out, key });
            }
        }
    }

    /// The checks of an outbound rewrite of `key`'s packet `before` into `after`; its port.
    fn check_rewrite(
        &self,
        key: FlowKey,
        held: Option<u16>,
        before: &[u8],
        after: &[u8],
        needs_csum: bool,
    ) -> u16 {
        let hl = ipv4::Packet::new_unchecked(before).header_len();
        let (at, csum) = port_fields(key.proto, true);
        let mapped = be16(&after[hl..], at);
        for (i, (a, b)) in before.iter().zip(after).enumerate() {
            let i = i.wrapping_sub(hl);
            let allowed = i == at || i == at + 1 || i == csum || i == csum + 1;
            assert!(
                a == b || allowed,
                "outbound rewrite changed byte {}",
                i + hl
            );
        }
        if needs_csum {
            assert_eq!(
                before[hl + csum..hl + csum + 2],
                after[hl + csum..hl + csum + 2]
            );
        } else if l4_valid(before) == Some(true) {
            assert_eq!(l4_valid(after), Some(true), "outbound checksum broken");
        }
        match held {
            Some(port) => assert_eq!(mapped, port, "a live flow changed its port"),
            None => {
                assert!(
                    self.table.in_blocks(mapped),
                    "port {mapped} outside the blocks"
                );
                // The port's last holder must have let it go: a port handed out twice leaves
                // the old flow's key naming it.
                if let Some(prev) = self.shadow.get(&(key.proto, mapped)) {
                    assert!(
                        *prev == key || self.table.mapped_port(prev, self.now) != Some(mapped),
                        "port {mapped} handed out twice"
                    );
                }
            }
        }
        mapped
    }

    /// "Exhausted": every port of the blocks is held by a live flow; the answer is sane.
    fn exhausted(&self, key: Option<FlowKey>, head: &[u8]) {
        let proto = key.expect("exhaustion of a flow").proto;
        for b in self.table.blocks() {
            for port in b.first..=b.last {
                // The allocation swept first and changed nothing else: what is live now was
                // live when it looked for a free port.
                assert!(
                    self.table.lookup_mapped(proto, port, self.now).is_some(),
                    "exhausted with port {port} free"
                );
            }
        }
        let addrs = AnswerAddrs {
            vm_mac: VM_MAC,
            router_mac: ROUTER_MAC,
            router_ip: net().router_ip,
        };
        if let Some(frame) = exhaustion_answer(&addrs, head) {
            let eth = Frame::new_checked(&frame[..]).expect("answer frame");
            assert_eq!(eth.dst_addr(), VM_MAC);
            let ip = ipv4::Packet::new_checked(eth.payload()).expect("answer packet");
            assert!(ip.verify_checksum(), "answer's IPv4 checksum");
            assert_eq!(ip.dst_addr(), VM_IP);
        }
    }

    /// `nat_hook::nat_inbound`.
    fn inbound(&mut self, packet: Vec<u8>) {
        self.inbound_expecting(packet, None);
    }

    /// An inbound packet; `expect`: it answers (or reports an error about) this flow, so it
    /// must be accepted when the flow is live.
    fn inbound_expecting(&mut self, mut packet: Vec<u8>, expect: Option<FlowKey>) {
        if packet.len() < 20 {
            return;
        }
        let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
        if !is_outside(&net(), src) {
            return;
        }
        let Some(need) = needed_len(&packet).filter(|n| *n <= packet.len()) else {
            return;
        };
        let owner = named_port(&packet)
            .and_then(|(proto, port)| self.table.lookup_mapped(proto, port, self.now));
        let expected_live = expect.filter(|k| self.live_port(k).is_some());
        let before = packet.clone();
        let result = packet::inbound(&mut self.table, &mut packet[..need], VM_IP, self.now);
        match result {
            Err(d) => {
                rx_drop_reason(d);
                assert!(
                    expected_live.is_none(),
                    "a packet about the live flow {expected_live:?} was refused: {d:?}"
                );
            }
            Ok(()) => {
                let restored = self.check_inbound(&before, &packet, owner);
                if let Some(k) = expected_live {
                    assert_eq!(restored, Some(k), "did not map back to the original flow");
                }
                if let (Some(key), false) = (restored, named_in_quote(&packet)) {
                    self.delivered = Some(Sent { packet, key });
                }
            }
        }
    }

    /// The checks of an accepted inbound packet; the mapped flow it was restored to.
    fn check_inbound(
        &self,
        before: &[u8],
        after: &[u8],
        owner: Option<FlowKey>,
    ) -> Option<FlowKey> {
        let ip = ipv4::Packet::new_unchecked(before);
        let (hl, src) = (ip.header_len(), ip.src_addr());
        let proto = Proto::from_ip(ip.protocol()).expect("NAT accepted it");
        let t = before[hl];
        if proto == Proto::Icmp && msg_type::is_error(t) {
            return check_icmp_error(before, after, owner);
        }
        if l4_valid(before) == Some(true) {
            assert_eq!(l4_valid(after), Some(true), "inbound checksum broken");
        }
        let (at, _) = port_fields(proto, false);
        let (was, now) = (be16(&before[hl..], at), be16(&after[hl..], at));
        let remote_port = if proto == Proto::Icmp {
            0
        } else {
            be16(&before[hl..], 0)
        };
        let Some(owner) = owner.as_ref() else {
            assert_eq!(was, now, "a port with no flow was rewritten");
            assert!(
                !self.table.in_blocks(was),
                "a port of the blocks without a flow was accepted"
            );
            return None;
        };
        assert_eq!(self.shadow.get(&(proto, was)), Some(owner), "shadow");
        assert_eq!(
            (owner.remote, owner.remote_port),
            (src, remote_port),
            "remote"
        );
        assert_eq!(now, owner.local_port, "restored port");
        Some(*owner)
    }

    fn check_table(&self) {
        let s = self.table.stats();
        for m in s.mapped {
            assert!(
                m <= self.ever.len(),
                "{m} mapped flows, {} ports",
                self.ever.len()
            );
        }
        assert!(s.inbound <= MAX_INBOUND_FLOWS);
    }
}

/// An accepted ICMP error: checksums, the quote's address and port; the flow it was about.
fn check_icmp_error(before: &[u8], after: &[u8], owner: Option<FlowKey>) -> Option<FlowKey> {
    let hl = ipv4::Packet::new_unchecked(before).header_len();
    let icmp_end = ipv4::Packet::new_unchecked(before)
        .total_len()
        .min(before.len());
    let q_at = hl + icmpv4::HEADER_LEN;
    let qhl = ipv4::Packet::new_unchecked(&before[q_at..]).header_len();
    // The ICMP checksum covers the message up to the total length: only when that holds all
    // NAT rewrote (the quoted header and 8 bytes) must it still verify.
    let covered = icmp_end >= q_at + qhl + 8;
    if covered && icmpv4::Packet::new_unchecked(&before[hl..icmp_end]).verify_checksum() {
        assert!(
            icmpv4::Packet::new_unchecked(&after[hl..icmp_end]).verify_checksum(),
            "ICMP checksum broken by the quote's translation"
        );
    }
    let (qb, qa) = (
        ipv4::Packet::new_unchecked(&before[q_at..]),
        ipv4::Packet::new_unchecked(&after[q_at..]),
    );
    if verify_header(&before[q_at..q_at + qhl]) {
        assert!(
            verify_header(&after[q_at..q_at + qhl]),
            "quoted IPv4 checksum"
        );
    }
    assert_eq!(qa.src_addr(), VM_IP, "the quote names the VM");
    let proto = Proto::from_ip(qb.protocol()).expect("NAT translated it");
    let at = if proto == Proto::Icmp { 4 } else { 0 };
    let restored = be16(&after[q_at + qhl..], at);
    let owner = owner?;
    if owner.remote == qb.dst_addr() {
        assert_eq!(restored, owner.local_port, "quoted port restored");
        return Some(owner);
    }
    None
}

/// Seed inputs: `(name, bytes with mode byte)`.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let remote = Ipv4Addr::new(198, 51, 100, 7);
    let udp = {
        let mut u = vec![0x13, 0x88, 0, 53, 0, 12, 0, 0, b'q', b'u', b'e', b'r'];
        u.truncate(12);
        crate::seeds::ip_packet(VM_IP, remote, protocol::UDP, &u)
    };
    let tcp_syn = {
        let mut t = vec![0u8; 20];
        t[..4].copy_from_slice(&[0x80, 0xe8, 0, 80]);
        t[12] = 0x50;
        t[13] = tcp::flags::SYN;
        crate::seeds::ip_packet(VM_IP, remote, protocol::TCP, &t)
    };
    let ping = crate::seeds::ip_packet(
        VM_IP,
        remote,
        protocol::ICMP,
        &[msg_type::ECHO_REQUEST, 0, 0, 0, 0, 9, 0, 1, 1, 2],
    );
    let forwarded = {
        let mut t = vec![0u8; 20];
        t[..4].copy_from_slice(&[0xc7, 0x38, 0x1f, 0x90]);
        t[12] = 0x50;
        t[13] = tcp::flags::SYN;
        crate::seeds::ip_packet(remote, VM_IP, protocol::TCP, &t)
    };
    let op = |kind: u8, dt: u8, bytes: &[u8]| {
        let mut v = vec![kind, dt, bytes.len() as u8];
        v.extend_from_slice(bytes);
        v
    };
    let mut out = Vec::new();
    for (name, first) in [("udp", &udp), ("tcp", &tcp_syn), ("ping", &ping)] {
        for mode in [0x03u8, 0x10] {
            let mut v = vec![mode];
            v.extend(op(FIX, 0, first));
            v.extend(op(2, 1, &[0x12, b'a', b'n']));
            v.extend(op(3, 1, &[0, 3, 0, 8]));
            v.extend(op(3, 1, &[1, 0, 1, 0]));
            v.extend(op(FIX, 2, first));
            v.extend(op(FIX, 40, first));
            v.extend(op(2, 1, &[0x12, b'a', b'n']));
            v.extend(op(5, 1, &[0, 3, 8]));
            out.push((format!("{name}-{mode}"), v));
        }
    }
    let mut v = vec![0x00];
    v.extend(op(1 | FIX, 0, &forwarded));
    v.extend(op(4, 0, &[0x9c, 0x40, 3, 0x9c, 0x42, 4]));
    v.extend(op(FIX | NEEDS_CSUM, 0, &udp));
    v.extend(op(FIX, 0, &tcp_syn));
    v.extend(op(FIX, 0, &ping));
    v.extend(op(2, 255, &[0x11]));
    out.push(("forward-blocks".into(), v));
    out
}
