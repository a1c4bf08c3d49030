//! The gateway target: the pure library of `vnp-gateway` (`rx::check_datagram` with the
//! `OUTSIDE` rule, `table::NatTable` built from a `GatewayConfig`, the rewrites of
//! `translate`, the ICMP error translation of `icmp`) driven as the daemon's data plane drives
//! it: a VNP datagram from a VM's host is checked, and its inner packet rewritten to the public
//! address; a packet from the public side is looked up by port block or forwarding rule and
//! rewritten to the VM.
//!
//! Input: a mode byte, then operations `[op] [len] [len bytes]` (operations after the first
//! [`MAX_OPS`] are ignored: a load-balancing operation rebuilds the Maglev tables twice, so
//! an unbounded input costs milliseconds and the campaign crawls). Mode bit 0 ([`CUSTOM`]): the
//! first operation's bytes are a configuration (up to 4 VMs with up to 2 blocks each, egress,
//! and up to 4 forwarding rules; overlapping blocks and rules are allowed) instead of the
//! default one. `op & 3`: 0 a datagram from the VMs' host, 1 a packet from the public side,
//! 2 the remote's reply to the last packet that left (its bytes: TCP flags, payload), 3 an ICMP
//! error about it (type, code, extra quoted bytes). Random bytes never carry a valid MAC, so op
//! bits make a datagram authentic, as the `vnp_datagram` target does: bit 2 ([`FORGE_TOKEN`])
//! mints its token with the gateway's secret over the fields it claims, bit 3 ([`FIX_HEADER`])
//! makes version, flags, network id and expiry acceptable, bit 4 ([`FIX_INNER`]) makes the
//! inner packet (or the public side's packet) well formed: header, lengths, no fragment, a
//! translated protocol, a VM's address (chosen by the source's last byte) and an outside one,
//! checksums filled.
//!
//! Invariants asserted:
//! - an accepted datagram's inner packet lies within it, goes outside the network, in the
//!   gateway's network; one that is not a probe answer or a service reply and goes to the
//!   gateway's own address is refused before NAT (`own_address`), and only such a one;
//! - an outbound rewrite gives the public address as the source and changes nothing but the
//!   source address, the source port (only through a forwarding rule) and the checksums, which
//!   verify after when they did before; it passes only ports the VM owns (with egress) or a
//!   forwarding rule of it; a refusal's reason is true of the packet;
//! - an inbound rewrite delivers to the owner of the destination port's block, or to the
//!   forwarding rule's VM and port, with checksums that verified still verifying; an ICMP
//!   error's quote names the VM;
//! - with a consistent configuration (disjoint blocks, rule ports outside every block, no two
//!   rules for one port), the reply to a packet that left, and an ICMP error about it, reach the
//!   VM and port that sent it; the port-block lookup agrees with a scan of every VM's blocks.

use std::net::{Ipv4Addr, SocketAddrV4};

use vnp_gateway::rx::{check_datagram, check_not_own_address, ExpiryPolicy, RxContext};
use vnp_gateway::table::{NatTable, VmIndex};
use vnp_gateway::translate::{inbound, outbound};
use vnp_gateway::DropReason;
use vnp_protocol::token::{Expiry, TokenFields, TokenMinter, VmSecret};
use vnp_protocol::wire::icmpv4::{self, msg_type};
use vnp_protocol::wire::ipv4::{self, protocol};
use vnp_protocol::wire::{checksum, VnpHeader, HEADER_LEN, KNOWN_FLAGS, VERSION};
use vnp_protocol::OUTSIDE;
use vnp_registry_client::api::GatewayConfig;

use crate::gateway_lb::{Lb, LB_OP};
use crate::nat::l4_valid;

#[path = "gateway_config.rs"]
mod config;
pub use config::default_config;
use config::{be16, consistent, custom_config, fix_packet, icmp_error_about, make_probe, reply_to};

/// Mode bit: the first operation is a configuration.
pub const CUSTOM: u8 = 0x01;
/// Op bit: mint the datagram's token with the gateway's secret.
pub const FORGE_TOKEN: u8 = 0x04;
/// Op bit: make the VNP header's checked fields acceptable.
pub const FIX_HEADER: u8 = 0x08;
/// Op bit: make the (inner) packet well formed, checksums filled.
pub const FIX_INNER: u8 = 0x10;

/// Operations run per input; the rest of a longer input is ignored.
pub const MAX_OPS: usize = 128;

/// The gateway's secret (a fixed test value).
pub const SECRET: [u8; 32] = [0x6b; 32];
/// "Now" (Unix seconds).
pub const NOW: u32 = 1_800_000_000;
const NETWORK_ID: u32 = 7;
/// The gateway's underlay address.
pub const LOCAL_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 9);
/// The gateway's VNP address.
pub const LOCAL: SocketAddrV4 = SocketAddrV4::new(LOCAL_IP, 6081);
/// The VMs' host.
pub const HOST: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 40000);
/// The public address.
pub const PUBLIC: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const ROUTER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

/// The last packet that left: as it left, its VM, and the VM's port.
struct Sent {
    packet: Vec<u8>,
    vm: VmIndex,
    vm_port: u16,
}

struct Run {
    cfg: GatewayConfig,
    table: NatTable,
    lb: Lb,
    consistent: bool,
    minter: TokenMinter,
    last: Option<Sent>,
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let (mode, mut rest) = crate::split_mode(data);
    let mut cfg = default_config();
    let mut first = true;
    let mut r: Option<Run> = None;
    let mut ops = 0;
    while let [op, len, tail @ ..] = rest {
        if ops == MAX_OPS {
            break;
        }
        ops += 1;
        let n = usize::from(*len).min(tail.len());
        let (bytes, next) = tail.split_at(n);
        rest = next;
        if first && mode & CUSTOM != 0 {
            cfg = custom_config(bytes);
            first = false;
            continue;
        }
        first = false;
        let run = r.get_or_insert_with(|| Run::new(&cfg));
        run.op(*op, bytes);
    }
}

impl Run {
    fn new(cfg: &GatewayConfig) -> Self {
        let table = NatTable::from_config(cfg);
        let consistent = consistent(cfg);
        if consistent {
            for port in [
                0u16, 1, 1023, 1024, 1535, 1536, 2047, 2048, 3071, 3072, 65535,
            ] {
                let scan = table
                    .vms
                    .iter()
                    .position(|v| v.nat_ports.iter().any(|b| b.contains(port)));
                assert_eq!(table.nat_owner(port), scan, "owner of port {port}");
            }
        }
        Run {
            cfg: cfg.clone(),
            lb: Lb::new(cfg, &table),
            table,
            consistent,
            minter: TokenMinter::new(&VmSecret::from_bytes(SECRET)),
            last: None,
        }
    }

    fn op(&mut self, op: u8, bytes: &[u8]) {
        match op & 3 {
            0 if op & LB_OP != 0 => self.lb.health(&self.cfg, &self.table, bytes),
            0 => self.on_datagram(op, bytes),
            1 => {
                let mut p = bytes.to_vec();
                if op & FIX_INNER != 0 {
                    fix_packet(&mut p, None);
                    if op & LB_OP != 0 {
                        make_probe(&mut p, &self.table);
                    }
                }
                self.on_public_packet(p, None);
            }
            2 if op & LB_OP != 0 => {
                if let Some((inner, _vm)) = self.lb.reply_to_last(bytes) {
                    let mut d = vec![0u8; HEADER_LEN];
                    d.extend_from_slice(&inner);
                    self.assist(FORGE_TOKEN | FIX_HEADER, &mut d);
                    let checked = check_datagram(&self.context(), &self.minter, &d, HOST, NOW);
                    let range = checked.expect("the VM's reply passes the receive checks");
                    self.on_inner(d[range].to_vec(), true);
                }
            }
            2 => {
                let p = self.last.as_ref().and_then(|s| reply_to(s, bytes));
                if let Some(p) = p {
                    self.on_public_packet(p, self.last_expected());
                }
            }
            _ => {
                let p = self.last.as_ref().and_then(|s| icmp_error_about(s, bytes));
                if let Some(p) = p {
                    self.on_public_packet(p, self.last_expected());
                }
            }
        }
    }

    /// The VM and port a reply to the last packet must reach (consistent configurations).
    fn last_expected(&self) -> Option<(VmIndex, u16)> {
        let s = self.last.as_ref().filter(|_| self.consistent)?;
        Some((s.vm, s.vm_port))
    }

    fn context(&self) -> RxContext {
        RxContext {
            local: LOCAL,
            network_id: self.table.network_id,
            network_cidr: self.table.network_cidr,
            expiry: ExpiryPolicy::default(),
        }
    }

    /// A datagram from the host: the receive checks, then the outbound rewrite.
    fn on_datagram(&mut self, op: u8, bytes: &[u8]) {
        let mut d = bytes.to_vec();
        self.assist(op, &mut d);
        let Ok(range) = check_datagram(&self.context(), &self.minter, &d, HOST, NOW) else {
            return;
        };
        assert!(range.start == HEADER_LEN && range.end <= d.len());
        self.on_inner(d[range].to_vec(), false);
    }

    /// An accepted inner packet: a probe answer or a service's reply, else NAT and forwarding.
    /// `reply`: it answers the last balanced packet.
    fn on_inner(&mut self, before: Vec<u8>, reply: bool) {
        if self.lb.vm_packet(&self.table, &before, reply).is_some() {
            return;
        }
        let ip = ipv4::Packet::new_checked(&before[..]).expect("accepted inner packet");
        // `dataplane.rs`: before NAT, not before the probe answers (they go to this address).
        if check_not_own_address(LOCAL_IP, &before).is_err() {
            assert_eq!(ip.dst_addr(), LOCAL_IP, "OwnAddress");
            return;
        }
        assert_eq!(ip.total_len(), before.len());
        assert!(!self.table.network_cidr.contains(ip.dst_addr()));
        let mut after = before.clone();
        let error = is_icmp_error(&before);
        match outbound(&self.table, &mut after) {
            Ok(vm) if error => self.check_outbound_error(vm, &before, &after),
            Ok(vm) => self.check_outbound(vm, &before, &after),
            // An error's port is in its quote: only an accepted one is checked.
            Err(_) if error => {}
            Err(why) => self.check_refusal(why, &before),
        }
    }

    /// An ICMP error a guest sends about a packet it received: the quoted packet's
    /// destination port (echo id) is the VM's, and leaves as the public port of its forward
    /// rule or unchanged from the VM's NAT block.
    fn check_outbound_error(&self, vm: VmIndex, before: &[u8], after: &[u8]) {
        let ip = ipv4::Packet::new_unchecked(before);
        assert_eq!(self.table.vms[vm].ip, ip.src_addr(), "error from the VM");
        let out = ipv4::Packet::new_unchecked(after);
        assert_eq!(out.src_addr(), PUBLIC, "error source");
        let quote = ip.header_len() + 8;
        let proto = before[quote + 9];
        let l4 = quote + usize::from(before[quote] & 0x0f) * 4;
        let at = l4 + if proto == protocol::ICMP { 4 } else { 2 };
        let (port, public) = (be16(before, at), be16(after, at));
        let rule = (proto != protocol::ICMP)
            .then(|| self.table.forward_out(vm, proto, port))
            .flatten();
        match rule {
            Some(f) => assert_eq!(public, f.public_port, "quoted port of a forward rule"),
            None => {
                assert_eq!(
                    self.table.nat_owner(port),
                    Some(vm),
                    "quoted port not the VM's"
                );
                assert_eq!(public, port, "quoted NAT port kept");
            }
        }
    }

    fn check_outbound(&mut self, vm: VmIndex, before: &[u8], after: &[u8]) {
        let ip = ipv4::Packet::new_unchecked(before);
        let (hl, proto) = (ip.header_len(), ip.protocol());
        let out = ipv4::Packet::new_unchecked(after);
        let entry = &self.table.vms[vm];
        assert_eq!(entry.ip, ip.src_addr(), "outbound VM");
        assert_eq!(out.src_addr(), PUBLIC, "outbound source");
        assert!(
            out.verify_checksum() || !ip.verify_checksum(),
            "IPv4 checksum"
        );
        if l4_valid(before) == Some(true) {
            assert_eq!(l4_valid(after), Some(true), "outbound L4 checksum");
        }
        let at = if proto == protocol::ICMP { 4 } else { 0 };
        let (sport, public) = (be16(before, hl + at), be16(after, hl + at));
        let owned = self.table.nat_owner(sport) == Some(vm) && entry.egress;
        if owned {
            assert_eq!(sport, public, "an owned port is kept");
        } else {
            let f = self.table.forward_out(vm, proto, sport).expect("a rule");
            assert_eq!(public, f.public_port, "the rule's public port");
        }
        let csum = match proto {
            protocol::TCP => 16,
            protocol::UDP => 6,
            _ => 2,
        };
        for (i, (a, b)) in before.iter().zip(after).enumerate() {
            let changed_ok = matches!(i, 10..=15)
                || i.checked_sub(hl)
                    .is_some_and(|l| [at, at + 1, csum, csum + 1].contains(&l));
            assert!(a == b || changed_ok, "outbound changed byte {i}");
        }
        self.last = Some(Sent {
            packet: after.to_vec(),
            vm,
            vm_port: sport,
        });
    }
}

/// Whether `packet` is an ICMP destination-unreachable, time-exceeded or parameter-problem
/// message.
fn is_icmp_error(packet: &[u8]) -> bool {
    let ip = ipv4::Packet::new_unchecked(packet);
    ip.protocol() == protocol::ICMP
        && packet
            .get(ip.header_len())
            .is_some_and(|t| matches!(t, 3 | 11 | 12))
}

impl Run {
    fn check_refusal(&self, why: DropReason, before: &[u8]) {
        let Ok(ip) = ipv4::Packet::new_checked(before) else {
            return;
        };
        let Some(vm) = self.table.vm_by_ip(ip.src_addr()) else {
            return;
        };
        let hl = ip.header_len();
        let at = if ip.protocol() == protocol::ICMP {
            4
        } else {
            0
        };
        let Some(sport) = before.get(hl + at..hl + at + 2).map(|b| be16(b, 0)) else {
            return;
        };
        let owned = self.table.nat_owner(sport) == Some(vm);
        let rule = ip.protocol() != protocol::ICMP
            && self.table.forward_out(vm, ip.protocol(), sport).is_some();
        match why {
            DropReason::PortNotOwned => assert!(!owned && !rule, "PortNotOwned for {sport}"),
            DropReason::EgressDenied => {
                assert!(owned && !rule && !self.table.vms[vm].egress, "EgressDenied")
            }
            _ => {}
        }
    }

    /// A packet from the public side; `expect`: it answers the last packet that left, so it
    /// must reach that VM and port.
    fn on_public_packet(&mut self, before: Vec<u8>, expect: Option<(VmIndex, u16)>) {
        if self.lb.public(&self.table, &before).is_some() {
            assert!(
                expect.is_none(),
                "the answer to {expect:?} taken by a service"
            );
            return;
        }
        let mut after = before.clone();
        let result = inbound(&self.table, &mut after);
        let vm = match result {
            Ok(vm) => vm,
            Err(why) => {
                assert!(expect.is_none(), "answer to {expect:?} refused: {why:?}");
                return;
            }
        };
        let ip = ipv4::Packet::new_unchecked(&before[..]);
        let (hl, proto) = (ip.header_len(), ip.protocol());
        let out = ipv4::Packet::new_unchecked(&after[..]);
        let vm_ip = self.table.vms[vm].ip;
        assert_eq!(out.dst_addr(), vm_ip, "inbound destination");
        assert!(
            out.verify_checksum() || !ip.verify_checksum(),
            "IPv4 checksum"
        );
        let whole = ip.total_len() == before.len();
        let t = before[hl];
        let port = if proto == protocol::ICMP && msg_type::is_error(t) {
            self.check_icmp_error(vm_ip, hl, &before, &after, whole)
        } else {
            if l4_valid(&before) == Some(true) {
                assert_eq!(l4_valid(&after), Some(true), "inbound L4 checksum");
            }
            let at = if proto == protocol::ICMP { 4 } else { 2 };
            let (dport, now) = (be16(&before, hl + at), be16(&after, hl + at));
            match self.table.forward_in(proto, dport).filter(|_| at == 2) {
                Some(f) => assert_eq!((f.vm, f.vm_port), (vm, now), "forwarded"),
                None => {
                    assert_eq!(self.table.nat_owner(dport), Some(vm), "block owner");
                    assert_eq!(dport, now);
                }
            }
            now
        };
        if let Some(e) = expect {
            assert_eq!((vm, port), e, "the answer reached another VM or port");
        }
    }

    /// An accepted ICMP error: checksums, the quote's source; the quoted source port.
    fn check_icmp_error(
        &self,
        vm_ip: Ipv4Addr,
        hl: usize,
        before: &[u8],
        after: &[u8],
        whole: bool,
    ) -> u16 {
        if whole {
            assert!(icmpv4::Packet::new_unchecked(&after[hl..]).verify_checksum());
        }
        let q = hl + icmpv4::HEADER_LEN;
        let (qb, qa) = (
            ipv4::Packet::new_unchecked(&before[q..]),
            ipv4::Packet::new_unchecked(&after[q..]),
        );
        let qhl = qb.header_len();
        assert_eq!(qa.src_addr(), vm_ip, "the quote names the VM");
        if checksum::checksum(&before[q..q + qhl]) == 0 {
            assert_eq!(checksum::checksum(&after[q..q + qhl]), 0, "quoted checksum");
        }
        let at = if qb.protocol() == protocol::ICMP {
            4
        } else {
            0
        };
        be16(after, q + qhl + at)
    }

    /// Rewrites the datagram per the op bits (see the module documentation).
    fn assist(&self, op: u8, d: &mut Vec<u8>) {
        if op & FIX_INNER != 0 {
            if d.len() < HEADER_LEN {
                d.resize(HEADER_LEN, 0);
            }
            let mut inner = d.split_off(HEADER_LEN);
            let vm = self
                .table
                .vms
                .get(usize::from(inner.get(15).copied().unwrap_or(0)) % 4);
            fix_packet(&mut inner, Some(vm.map_or(OUTSIDE, |v| v.ip)));
            d.extend_from_slice(&inner);
        }
        if d.len() < HEADER_LEN + ipv4::MIN_HEADER_LEN {
            return;
        }
        if op & FIX_HEADER != 0 {
            d[0] = VERSION;
            d[1] &= KNOWN_FLAGS & !vnp_protocol::wire::FLAG_OPTIONS;
            d[2..4].fill(0);
            d[4..8].copy_from_slice(&self.table.network_id.to_be_bytes());
            let offset = u32::from_be_bytes([d[16], d[17], d[18], d[19]]);
            d[16..20].copy_from_slice(&(NOW - 5 + offset % 3600).to_be_bytes());
        }
        if op & FORGE_TOKEN != 0 {
            let header = VnpHeader::new_unchecked(&d[..HEADER_LEN]);
            let fields = TokenFields {
                src_host: *HOST.ip(),
                src_port: HOST.port(),
                src_vm: ipv4::Packet::new_unchecked(&d[HEADER_LEN..]).src_addr(),
                dst_host: *LOCAL.ip(),
                dst_port: LOCAL.port(),
                dst_vm: OUTSIDE,
                network_id: header.network_id(),
                expiry: Expiry(header.expiry().0),
            };
            let token = self.minter.mint(&fields);
            d[8..16].copy_from_slice(token.as_bytes());
        }
    }
}

/// Seed inputs: `(name, bytes with mode byte)`.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let remote = Ipv4Addr::new(198, 51, 100, 7);
    let a = Ipv4Addr::new(10, 1, 0, 2);
    let b = Ipv4Addr::new(10, 1, 0, 3);
    let mut tcp = vec![0u8; 20];
    tcp[..4].copy_from_slice(&[0x04, 0x00, 0, 80]);
    tcp[12] = 0x50;
    tcp[13] = 0x02;
    let mut tcp_b = tcp.clone();
    tcp_b[..2].copy_from_slice(&8443u16.to_be_bytes());
    let udp = [0x08, 0x01, 0, 53, 0, 12, 0, 0, 1, 2, 3, 4];
    let ping = [msg_type::ECHO_REQUEST, 0, 0, 0, 0x04, 0x05, 0, 1];
    let inners = [
        (
            "tcp",
            crate::seeds::ip_packet(a, remote, protocol::TCP, &tcp),
        ),
        (
            "udp",
            crate::seeds::ip_packet(a, remote, protocol::UDP, &udp),
        ),
        (
            "ping",
            crate::seeds::ip_packet(a, remote, protocol::ICMP, &ping),
        ),
        (
            "fwd",
            crate::seeds::ip_packet(b, remote, protocol::TCP, &tcp_b),
        ),
    ];
    let header = vnp_protocol::wire::VnpRepr {
        network_id: NETWORK_ID,
        token: vnp_protocol::token::Token::from_bytes([0; 8]),
        expiry: Expiry(NOW + 600),
        has_options: false,
    }
    .to_bytes();
    let op = |kind: u8, bytes: &[u8]| {
        let mut v = vec![kind, bytes.len() as u8];
        v.extend_from_slice(bytes);
        v
    };
    let mut out = Vec::new();
    for (name, inner) in inners {
        let mut d = header.to_vec();
        d.extend_from_slice(&inner);
        let mut v = vec![0u8];
        v.extend(op(FORGE_TOKEN | FIX_HEADER | FIX_INNER, &d));
        v.extend(op(FORGE_TOKEN, &d));
        v.extend(op(2, &[0x12, 1, 2]));
        v.extend(op(3, &[0, 3, 0]));
        v.extend(op(3, &[1, 0, 20]));
        out.push((name.to_string(), v));
    }
    let mut syn_in = vec![0u8; 20];
    syn_in[..4].copy_from_slice(&[0xc3, 0x50, 0x01, 0xbb]);
    syn_in[12] = 0x50;
    syn_in[13] = 0x02;
    let public = crate::seeds::ip_packet(remote, PUBLIC, protocol::TCP, &syn_in);
    let mut v = vec![CUSTOM];
    v.extend(op(
        0,
        &[2, 1, 1, 0x04, 0x00, 0xff, 0, 1, 0x01, 0xbb, 0, 0x20, 0xfb],
    ));
    v.extend(op(1 | FIX_INNER, &public));
    out.push(("custom-forward".into(), v));
    out.push(("balanced".into(), balanced_seed(remote, &header)));
    out
}

/// A client's flows to the default services, the VM's replies, a health view taking a member
/// out, the clock past the UDP timeout, a health check and its answer.
fn balanced_seed(remote: Ipv4Addr, header: &[u8]) -> Vec<u8> {
    let op = |kind: u8, bytes: &[u8]| {
        let mut v = vec![kind, bytes.len() as u8];
        v.extend_from_slice(bytes);
        v
    };
    let mut syn = vec![0u8; 20];
    syn[..4].copy_from_slice(&[0xc3, 0x51, 0, 80]);
    syn[12] = 0x50;
    syn[13] = 0x02;
    let web = crate::seeds::ip_packet(remote, PUBLIC, protocol::TCP, &syn);
    let dns = crate::seeds::ip_packet(
        remote,
        PUBLIC,
        protocol::UDP,
        &[0xc3, 0x52, 0x14, 0xb4, 0, 12, 0, 0, 1, 2, 3, 4],
    );
    let mut answer = syn.clone();
    answer[..4].copy_from_slice(&[0x14, 0x7d, 0xa0, 0x00]);
    let a = Ipv4Addr::new(10, 1, 0, 2);
    let probe_answer =
        crate::seeds::ip_packet(a, Ipv4Addr::new(1, 1, 100, 9), protocol::TCP, &answer);
    let mut d = header.to_vec();
    d.extend_from_slice(&probe_answer);
    let mut v = vec![0u8];
    v.extend(op(1 | FIX_INNER, &web));
    v.extend(op(2 | LB_OP, &[0x12, b'o', b'k']));
    v.extend(op(1 | FIX_INNER, &dns));
    v.extend(op(2 | LB_OP, &[0, b'o', b'k']));
    v.extend(op(LB_OP, &[10, 0x02, 0x00]));
    v.extend(op(1 | FIX_INNER, &web));
    v.extend(op(LB_OP, &[220, 0x07, 0x03]));
    v.extend(op(1 | FIX_INNER, &web));
    v.extend(op(1 | FIX_INNER, &dns));
    v.extend(op(LB_OP, &[0, 0, 0]));
    v.extend(op(1 | FIX_INNER | LB_OP, &web));
    v.extend(op(FORGE_TOKEN | FIX_HEADER | FIX_INNER, &d));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The forging bits are what get random inputs past the gateway's MAC check: a seed's
    /// datagram as it is is refused for its token, the same bytes forged are accepted.
    #[test]
    fn forged_tokens_pass_the_mac_check() {
        let seed = seeds().into_iter().find(|s| s.0 == "udp").expect("seed").1;
        let len = usize::from(seed[2]);
        let datagram = seed[3..3 + len].to_vec();
        let run = Run::new(&default_config());
        let check = |d: &[u8]| check_datagram(&run.context(), &run.minter, d, HOST, NOW);
        let mut plain = datagram.clone();
        run.assist(FIX_HEADER | FIX_INNER, &mut plain);
        assert_eq!(check(&plain), Err(DropReason::RxBadToken));
        let mut forged = datagram;
        run.assist(FORGE_TOKEN | FIX_HEADER | FIX_INNER, &mut forged);
        assert_eq!(check(&forged), Ok(HEADER_LEN..forged.len()));
    }
}
