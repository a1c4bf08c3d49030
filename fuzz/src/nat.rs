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
use vnp_protocol::wire::{checksum, tcp, udp};
use vnpd::datapath::frame::GuestNet;
use vnpd::datapath::nat_hook::{is_outside, rx_drop_reason, tx_drop_reason, NAT_HEAD_MAX};
use vnpd::nat::answer::{exhaustion_answer, AnswerAddrs};
use vnpd::nat::packet::{self, needed_len, OutboundDone};
use vnpd::nat::table::MAX_INBOUND_FLOWS;
use vnpd::nat::{FlowKey, NatDrop, NatRefusal, NatTable, PortBlock, Proto};

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

fn verify_header(h: &[u8]) -> bool {
    checksum::checksum(h) == 0
}

/// The IPv4 header length a packet claims (`None`: no first byte).
fn claimed_hl(p: &[u8]) -> Option<usize> {
    Some(usize::from(p.first()? & 0x0f) * 4)
}

/// Whether an inbound packet is an ICMP error (its port is in the quote).
fn named_in_quote(p: &[u8]) -> bool {
    let icmp_type = claimed_hl(p).and_then(|hl| p.get(hl));
    p.get(9) == Some(&protocol::ICMP) && icmp_type.is_some_and(|t| msg_type::is_error(*t))
}

/// The mapped port an inbound packet names, as `check_inbound` reads it once NAT accepted the
/// packet: the destination port (echo identifier), or for an ICMP error the quoted source
/// port (identifier). Read before NAT runs, so the table is asked what was live then.
fn named_port(p: &[u8]) -> Option<(Proto, u16)> {
    let hl = claimed_hl(p)?;
    let proto = Proto::from_ip(*p.get(9)?)?;
    let l4 = p.get(hl..)?;
    if named_in_quote(p) {
        let q = l4.get(icmpv4::HEADER_LEN..)?;
        let qhl = claimed_hl(q)?;
        let qproto = Proto::from_ip(*q.get(9)?)?;
        let at = if qproto == Proto::Icmp { 4 } else { 0 };
        return Some((qproto, be16(q.get(qhl..qhl + at + 2)?, at)));
    }
    let (at, _) = port_fields(proto, false);
    Some((proto, be16(l4.get(..at + 2)?, at)))
}

/// The flow an outbound ICMP error of a translated type is about, as
/// `nat::packet::outbound_error` reads it: the quote is a packet the VM received (from the
/// remote the error goes to), its destination port (identifier) the VM's.
fn quoted_flow(head: &[u8]) -> Option<FlowKey> {
    let hl = claimed_hl(head)?;
    if head.get(9) != Some(&protocol::ICMP) {
        return None;
    }
    let icmp = head.get(hl..)?;
    let translated = [
        msg_type::DST_UNREACHABLE,
        msg_type::TIME_EXCEEDED,
        msg_type::PARAM_PROBLEM,
    ];
    if !translated.contains(icmp.first()?) {
        return None;
    }
    let q = icmp.get(icmpv4::HEADER_LEN..)?;
    let qhl = claimed_hl(q)?;
    let proto = Proto::from_ip(*q.get(9)?)?;
    let ql4 = q.get(qhl..qhl + 8)?;
    let remote = Ipv4Addr::new(q[12], q[13], q[14], q[15]);
    let (local_port, remote_port) = match proto {
        Proto::Icmp => (be16(ql4, 4), 0),
        _ => (be16(ql4, 2), be16(ql4, 0)),
    };
    (remote == Ipv4Addr::new(head[16], head[17], head[18], head[19])).then_some(FlowKey {
        proto,
        local_port,
        remote,
        remote_port,
    })
}

/// The checks of the guest's ICMP error about `flow`, translated from `before` into `after`:
/// only the quoted port (now `mapped`), its checksum when quoted and the ICMP checksum changed,
/// and the ICMP checksum verifies when it did before and covers what was rewritten.
fn check_guest_error(flow: FlowKey, mapped: u16, before: &[u8], after: &[u8]) {
    let hl = ipv4::Packet::new_unchecked(before).header_len();
    let q_at = hl + icmpv4::HEADER_LEN;
    let qhl = ipv4::Packet::new_unchecked(&before[q_at..]).header_len();
    let port_at = q_at + qhl + if flow.proto == Proto::Icmp { 4 } else { 2 };
    // The quoted transport checksum (UDP, ICMP: within the 8 quoted bytes) follows the port.
    let csum = port_fields(flow.proto, true).1;
    let csum_at = if csum + 2 <= 8 {
        q_at + qhl + csum
    } else {
        port_at
    };
    for (i, (a, b)) in before.iter().zip(after).enumerate() {
        let allowed = [hl + 2, hl + 3, port_at, port_at + 1, csum_at, csum_at + 1].contains(&i);
        assert!(a == b || allowed, "the guest's ICMP error changed byte {i}");
    }
    assert_eq!(be16(after, port_at), mapped, "quoted port mapped");
    let total = ipv4::Packet::new_unchecked(before).total_len();
    if total >= q_at + qhl + 8 && l4_valid(before) == Some(true) {
        assert_eq!(
            l4_valid(after),
            Some(true),
            "the guest's ICMP error's checksum"
        );
    }
}

/// The flow key NAT derives from an outbound packet's headers (`None`: not TCP/UDP/ICMP).
fn outbound_key(head: &[u8]) -> Option<FlowKey> {
    let ip = ipv4::Packet::new_checked(head).ok()?;
    let proto = Proto::from_ip(ip.protocol())?;
    let l4 = head.get(ip.header_len()..)?;
    let (local_port, remote_port) = match proto {
        Proto::Icmp => (be16(l4, 4), 0),
        _ => (be16(l4, 0), be16(l4, 2)),
    };
    Some(FlowKey {
        proto,
        local_port,
        remote: ip.dst_addr(),
        remote_port,
    })
}

/// Offsets of the VM's port (outbound: source; inbound: destination) and the checksum.
fn port_fields(proto: Proto, outbound: bool) -> (usize, usize) {
    match (proto, outbound) {
        (Proto::Icmp, _) => (4, 2),
        (Proto::Tcp, o) => (if o { 0 } else { 2 }, 16),
        (Proto::Udp, o) => (if o { 0 } else { 2 }, 6),
    }
}

/// Whether the packet's L4 checksum verifies (`None`: the packet does not hold the header).
pub(crate) fn l4_valid(p: &[u8]) -> Option<bool> {
    let ip = ipv4::Packet::new_checked(p).ok()?;
    ip.check_len(p.len()).ok()?;
    let (s, d, payload) = (ip.src_addr(), ip.dst_addr(), ip.payload());
    match ip.protocol() {
        protocol::TCP if payload.len() >= tcp::MIN_HEADER_LEN => {
            Some(tcp::Packet::new_unchecked(payload).verify_checksum(s, d))
        }
        protocol::UDP => {
            let u = udp::Packet::new_checked(payload).ok()?;
            u.check_len(payload.len()).ok()?;
            Some(u.verify_checksum(s, d))
        }
        protocol::ICMP if payload.len() >= icmpv4::HEADER_LEN => {
            Some(icmpv4::Packet::new_unchecked(payload).verify_checksum())
        }
        _ => None,
    }
}

/// Makes raw bytes a well-formed packet from the VM (`outbound`) or to it, checksums filled.
fn fix_packet(p: &mut Vec<u8>, outbound: bool) {
    if p.len() < 28 {
        p.resize(28, 0);
    }
    let ihl = usize::from(p[0] & 0x0f).clamp(5, 15).min(p.len() / 4 - 2);
    p[0] = 0x40 | ihl as u8;
    let proto = match p[9] {
        protocol::TCP | protocol::UDP | protocol::ICMP => p[9],
        b => [protocol::TCP, protocol::UDP, protocol::ICMP][usize::from(b % 3)],
    };
    let hl = ihl * 4;
    if proto == protocol::TCP && p.len() < hl + tcp::MIN_HEADER_LEN {
        p.resize(hl + tcp::MIN_HEADER_LEN, 0);
    }
    p.truncate(usize::from(u16::MAX));
    let len = p.len();
    let mut ip = ipv4::Packet::new_unchecked(&mut p[..]);
    ip.set_total_len(len as u16);
    ip.set_unfragmented(false);
    ip.set_protocol(proto);
    let (mut src, mut dst) = (ip.src_addr(), ip.dst_addr());
    let outside = |a: Ipv4Addr| {
        if is_outside(&net(), a) {
            a
        } else {
            let o = a.octets();
            Ipv4Addr::new(198, 51, o[2], o[3])
        }
    };
    if outbound {
        (src, dst) = (VM_IP, outside(dst));
    } else {
        (src, dst) = (outside(src), VM_IP);
    }
    ip.set_src_addr(src);
    ip.set_dst_addr(dst);
    fill_checksums(p);
}

/// Fills the IPv4 header checksum and the L4 checksum (UDP: also the length field).
pub(crate) fn fill_checksums(p: &mut [u8]) {
    let mut ip = ipv4::Packet::new_unchecked(&mut *p);
    ip.fill_checksum();
    let (s, d, proto) = (ip.src_addr(), ip.dst_addr(), ip.protocol());
    let payload = ip.payload_mut();
    let len = payload.len();
    match proto {
        protocol::TCP if len >= tcp::MIN_HEADER_LEN => {
            tcp::Packet::new_unchecked(payload).fill_checksum(s, d)
        }
        protocol::UDP if len >= udp::HEADER_LEN => {
            let mut u = udp::Packet::new_unchecked(payload);
            u.set_len(len as u16);
            u.fill_checksum(s, d);
        }
        protocol::ICMP if len >= icmpv4::HEADER_LEN => {
            icmpv4::Packet::new_unchecked(payload).fill_checksum()
        }
        _ => {}
    }
}

/// The remote's answer to the last rewritten packet, through the gateway (destination: the
/// VM), with `bytes[0]` as its TCP flags and the rest as payload.
fn reply_to(sent: &Sent, bytes: &[u8]) -> Option<Vec<u8>> {
    let out = ipv4::Packet::new_checked(&sent.packet[..]).ok()?;
    let hl = out.header_len();
    let l4 = sent.packet.get(hl..)?;
    let (mut head, data): (Vec<u8>, &[u8]) = match sent.key.proto {
        Proto::Tcp => (l4.get(..20)?.to_vec(), bytes.get(1..).unwrap_or(&[])),
        _ => (l4.get(..8)?.to_vec(), bytes.get(1..).unwrap_or(&[])),
    };
    match sent.key.proto {
        Proto::Icmp => {
            head[0] = msg_type::ECHO_REPLY;
            head[1] = 0;
        }
        proto => {
            let (s, d) = ([head[0], head[1]], [head[2], head[3]]);
            head[..2].copy_from_slice(&d);
            head[2..4].copy_from_slice(&s);
            if proto == Proto::Tcp {
                head[12] = 0x50;
                head[13] = bytes.first().copied().unwrap_or(0x12);
            }
        }
    }
    head.extend_from_slice(data);
    let proto = ipv4::Packet::new_unchecked(&sent.packet[..]).protocol();
    let mut p = crate::seeds::ip_packet(sent.key.remote, VM_IP, proto, &head);
    fill_checksums(&mut p);
    Some(p)
}

/// An ICMP error from a router about the last rewritten packet: `bytes` pick the type, the
/// code, whether the gateway already put the VM's address in the quote (else the public one),
/// and how many bytes beyond the RFC 792 minimum are quoted. With it, whether NAT translates
/// that type (destination unreachable, time exceeded, parameter problem).
fn icmp_error_about(sent: &Sent, bytes: &[u8]) -> Option<(Vec<u8>, bool)> {
    let b = |i: usize| bytes.get(i).copied().unwrap_or(0);
    let types = [
        msg_type::DST_UNREACHABLE,
        msg_type::TIME_EXCEEDED,
        msg_type::PARAM_PROBLEM,
        msg_type::SOURCE_QUENCH,
        msg_type::REDIRECT,
    ];
    let t = types[usize::from(b(0)) % types.len()];
    let hl = ipv4::Packet::new_checked(&sent.packet[..])
        .ok()?
        .header_len();
    let quoted = (hl + 8 + usize::from(b(3) % 64)).min(sent.packet.len());
    let mut quote = sent.packet.get(..quoted)?.to_vec();
    if b(2) & 1 == 0 {
        // As the outside saw it: the gateway's public address as the source.
        let mut q = ipv4::Packet::new_unchecked(&mut quote[..]);
        let c = q.header_checksum();
        q.set_src_addr(PUBLIC);
        q.set_header_checksum(checksum::update_u32(c, VM_IP.into(), PUBLIC.into()));
        if sent.key.proto == Proto::Udp {
            let c = be16(&quote[hl..], 6);
            if c != 0 {
                let n = checksum::update_u32(c, VM_IP.into(), PUBLIC.into());
                quote[hl + 6..hl + 8].copy_from_slice(&n.to_be_bytes());
            }
        }
    }
    let mut m = vec![t, b(1), 0, 0, 0, 0, 0, 0];
    m.extend_from_slice(&quote);
    let mut p = crate::seeds::ip_packet(ROUTER, VM_IP, protocol::ICMP, &m);
    fill_checksums(&mut p);
    Some((p, usize::from(b(0)) % types.len() < 3))
}

/// The guest's ICMP error about the last packet delivered to it on a mapped flow, to that
/// packet's source: `bytes` pick the type (the three NAT translates, then two it does not),
/// the code and how many bytes beyond the RFC 792 minimum are quoted. With it, whether NAT
/// translates that type.
fn icmp_error_from_guest(got: &Sent, bytes: &[u8]) -> Option<(Vec<u8>, bool)> {
    let b = |i: usize| bytes.get(i).copied().unwrap_or(0);
    let types = [
        msg_type::DST_UNREACHABLE,
        msg_type::TIME_EXCEEDED,
        msg_type::PARAM_PROBLEM,
        msg_type::SOURCE_QUENCH,
        msg_type::REDIRECT,
    ];
    let pick = usize::from(b(0)) % types.len();
    let ip = ipv4::Packet::new_checked(&got.packet[..]).ok()?;
    let quoted = (ip.header_len() + 8 + usize::from(b(2) % 64)).min(got.packet.len());
    let mut m = vec![types[pick], b(1), 0, 0, 0, 0, 0, 0];
    m.extend_from_slice(got.packet.get(..quoted)?);
    let mut p = crate::seeds::ip_packet(VM_IP, ip.src_addr(), protocol::ICMP, &m);
    fill_checksums(&mut p);
    Some((p, pick < 3))
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
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
