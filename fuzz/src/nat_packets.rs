//! The `nat` target's packet helpers: what a check reads from a packet before NAT runs, the
//! check of a guest's translated ICMP error, and the packets the operations build (well-formed
//! packets, the remote's replies, ICMP errors from a router and from the guest).

use std::net::Ipv4Addr;

use vnp_protocol::wire::icmpv4::{self, msg_type};
use vnp_protocol::wire::ipv4::{self, protocol};
use vnp_protocol::wire::{checksum, tcp, udp};
use vnpd::datapath::nat_hook::is_outside;
use vnpd::nat::{FlowKey, Proto};

use super::{net, Sent, PUBLIC, ROUTER, VM_IP};

pub(super) fn verify_header(h: &[u8]) -> bool {
    checksum::checksum(h) == 0
}

/// The IPv4 header length a packet claims (`None`: no first byte).
pub(super) fn claimed_hl(p: &[u8]) -> Option<usize> {
    Some(usize::from(p.first()? & 0x0f) * 4)
}

/// Whether an inbound packet is an ICMP error (its port is in the quote).
pub(super) fn named_in_quote(p: &[u8]) -> bool {
    let icmp_type = claimed_hl(p).and_then(|hl| p.get(hl));
    p.get(9) == Some(&protocol::ICMP) && icmp_type.is_some_and(|t| msg_type::is_error(*t))
}

/// The mapped port an inbound packet names, as `check_inbound` reads it once NAT accepted the
/// packet: the destination port (echo identifier), or for an ICMP error the quoted source
/// port (identifier). Read before NAT runs, so the table is asked what was live then.
pub(super) fn named_port(p: &[u8]) -> Option<(Proto, u16)> {
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
pub(super) fn quoted_flow(head: &[u8]) -> Option<FlowKey> {
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
pub(super) fn check_guest_error(flow: FlowKey, mapped: u16, before: &[u8], after: &[u8]) {
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
pub(super) fn outbound_key(head: &[u8]) -> Option<FlowKey> {
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
pub(super) fn port_fields(proto: Proto, outbound: bool) -> (usize, usize) {
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
pub(super) fn fix_packet(p: &mut Vec<u8>, outbound: bool) {
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
pub(super) fn reply_to(sent: &Sent, bytes: &[u8]) -> Option<Vec<u8>> {
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
pub(super) fn icmp_error_about(sent: &Sent, bytes: &[u8]) -> Option<(Vec<u8>, bool)> {
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
pub(super) fn icmp_error_from_guest(got: &Sent, bytes: &[u8]) -> Option<(Vec<u8>, bool)> {
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

pub(super) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
