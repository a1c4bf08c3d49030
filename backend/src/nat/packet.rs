//! NAT on packet headers: the guest's source port (echo identifier) out, the destination port
//! back in, and the packet quoted by an ICMP error (inbound: about a packet the guest sent;
//! outbound: one the guest sends about a packet it received). Pure: works on a *local copy* of the
//! IPv4 header and the first bytes of the transport header (the guest owns the original
//! bytes and can change them at any time); the payload is never looked at.
//!
//! Checksums are updated incrementally ([`checksum::update_u16`], RFC 1624), never recomputed:
//! the payload they cover is not in the copy. A frame whose virtio-net header says
//! `NEEDS_CSUM` carries in its L4 checksum field only the pseudo-header sum, which does not
//! cover ports: its checksum is left alone (`needs_csum`), whoever completes it later sums the
//! rewritten port. A UDP checksum of 0 means "none" and stays 0; an updated one that comes out
//! 0 is sent as 0xffff (RFC 768).

use std::net::{Ipv4Addr, SocketAddrV4};

use vnp_protocol::wire::checksum::{self, update_u16, update_u32};
use vnp_protocol::wire::icmpv4::{self, msg_type};
use vnp_protocol::wire::ipv4::{self, protocol};

use super::flow::{FlowKey, Proto};
use super::table::{Inbound, NatRefusal, NatTable, Outbound};

/// Bytes of an ICMP error's quote NAT reads: the quoted IPv4 header and 8 bytes of its payload
/// (RFC 792's minimum, all a router must send).
const QUOTED_L4: usize = 8;
/// Offset of the TCP checksum.
const TCP_CSUM: usize = 16;
/// Offset of the UDP checksum.
const UDP_CSUM: usize = 6;
/// Offset of the ICMP checksum.
const ICMP_CSUM: usize = 2;
/// Offset of the echo identifier.
const ICMP_IDENT: usize = 4;

/// Why NAT dropped a packet (each is a counted drop reason of the data path).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatDrop {
    /// The table refused it.
    Refused(NatRefusal),
    /// A fragment: only unfragmented packets carry the ports of their flow.
    Fragment,
    /// A protocol or ICMP type NAT does not translate.
    Unsupported,
    /// The copy is too short for the headers it claims.
    Malformed,
}

/// Bytes of a packet (from its IPv4 header) NAT needs in its copy: the IPv4 header plus 20
/// bytes of TCP or 8 of UDP/ICMP; for an ICMP error also the quoted IPv4 header and 8 bytes.
/// `None` when `prefix` does not even hold the IPv4 header.
pub fn needed_len(prefix: &[u8]) -> Option<usize> {
    let ip = ipv4::Packet::new_checked(prefix).ok()?;
    let hl = ip.header_len();
    Some(match ip.protocol() {
        protocol::TCP => hl + 20,
        protocol::ICMP => {
            let is_error = prefix.get(hl).is_some_and(|t| msg_type::is_error(*t));
            let quoted_hl = prefix
                .get(hl + icmpv4::HEADER_LEN)
                .map_or(ipv4::MIN_HEADER_LEN, |b| usize::from(b & 0x0f) * 4);
            if is_error {
                hl + icmpv4::HEADER_LEN + quoted_hl.max(ipv4::MIN_HEADER_LEN) + QUOTED_L4
            } else {
                hl + icmpv4::HEADER_LEN
            }
        }
        _ => hl + 8,
    })
}

/// What NAT did to an outbound packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboundDone {
    /// The source port (echo identifier) was rewritten in the copy.
    Rewritten,
    /// A reply on an inbound flow: unchanged.
    Unchanged,
}

/// Rewrites the outbound packet whose headers are in `head` (see [`needed_len`]).
pub fn outbound(
    table: &mut NatTable,
    head: &mut [u8],
    needs_csum: bool,
    now: u64,
) -> Result<OutboundDone, NatDrop> {
    outbound_via(table, head, needs_csum, now).map(|(done, _)| done)
}

/// [`outbound`], and for a reply on an inbound flow the gateway endpoint that flow last came
/// in from (where the reply goes, `nat::gateways::reply_route`).
pub fn outbound_via(
    table: &mut NatTable,
    head: &mut [u8],
    needs_csum: bool,
    now: u64,
) -> Result<(OutboundDone, Option<SocketAddrV4>), NatDrop> {
    let (hl, proto, dst) = transport_of(head, 20)?;
    let l4 = &mut head[hl..];
    let (key, tcp_flags) = match proto {
        Proto::Icmp => {
            let t = l4[0];
            if msg_type::is_error(t) {
                return outbound_error(table, l4, dst, now).map(|done| (done, None));
            }
            let id = be16(l4, ICMP_IDENT);
            let key = icmp_key(id, dst);
            if t == msg_type::ECHO_REPLY && l4[1] == 0 && table.is_inbound_flow(&key, now) {
                // A reply to a ping that came in through a forward rule.
                return Ok((OutboundDone::Unchanged, table.inbound_gateway(&key, now)));
            }
            if t != msg_type::ECHO_REQUEST || l4[1] != 0 {
                return Err(NatDrop::Unsupported);
            }
            (key, 0)
        }
        _ => (port_key(proto, l4, dst, false), tcp_flags(proto, l4)),
    };
    match table
        .outbound(key, tcp_flags, now)
        .map_err(NatDrop::Refused)?
    {
        Outbound::InboundReply => Ok((OutboundDone::Unchanged, table.inbound_gateway(&key, now))),
        Outbound::Mapped(port) => {
            let at = if proto == Proto::Icmp { ICMP_IDENT } else { 0 };
            set_port(proto, l4, at, port, !needs_csum);
            Ok((OutboundDone::Rewritten, None))
        }
    }
}

/// Rewrites the inbound packet (addressed to `vm_ip`, from a gateway) whose headers are in
/// `head` (see [`needed_len`]): the destination port of a reply, or the quote of an ICMP error
/// about a mapped flow. Traffic of inbound flows passes unchanged.
pub fn inbound(
    table: &mut NatTable,
    head: &mut [u8],
    vm_ip: Ipv4Addr,
    now: u64,
) -> Result<(), NatDrop> {
    inbound_via(table, head, vm_ip, None, now)
}

/// [`inbound`] for a packet whose datagram came from the gateway endpoint `via` and passed the
/// receive checks: an inbound flow records it (its replies go back through that gateway).
pub fn inbound_via(
    table: &mut NatTable,
    head: &mut [u8],
    vm_ip: Ipv4Addr,
    via: Option<SocketAddrV4>,
    now: u64,
) -> Result<(), NatDrop> {
    let (hl, proto, src) = {
        let (hl, proto, _) = transport_of(head, 20)?;
        (hl, proto, ipv4::Packet::new_unchecked(&head[..]).src_addr())
    };
    let l4 = &mut head[hl..];
    if proto == Proto::Icmp {
        return inbound_icmp(table, l4, (src, via), vm_ip, now);
    }
    let key = port_key(proto, l4, src, true);
    let flags = tcp_flags(proto, l4);
    let remote = (src, key.remote_port);
    match table
        .inbound_via(proto, key.local_port, remote, flags, via, now)
        .map_err(NatDrop::Refused)?
    {
        Inbound::Forwarded => {}
        Inbound::Mapped(port) => set_port(proto, l4, 2, port, true),
    }
    Ok(())
}

fn inbound_icmp(
    table: &mut NatTable,
    icmp: &mut [u8],
    (src, via): (Ipv4Addr, Option<SocketAddrV4>),
    vm_ip: Ipv4Addr,
    now: u64,
) -> Result<(), NatDrop> {
    let (t, code) = (icmp[0], icmp[1]);
    if msg_type::is_error(t) {
        return match t {
            msg_type::DST_UNREACHABLE | msg_type::TIME_EXCEEDED | msg_type::PARAM_PROBLEM => {
                translate_quote(table, icmp, vm_ip, now)
            }
            _ => Err(NatDrop::Unsupported),
        };
    }
    if code != 0 || !matches!(t, msg_type::ECHO_REPLY | msg_type::ECHO_REQUEST) {
        return Err(NatDrop::Unsupported);
    }
    let id = be16(icmp, ICMP_IDENT);
    if t == msg_type::ECHO_REQUEST && table.in_blocks(id) {
        // A ping "to" a mapped identifier is not a reply to anything.
        return Err(NatDrop::Refused(NatRefusal::UnknownMapping));
    }
    match table
        .inbound_via(Proto::Icmp, id, (src, 0), 0, via, now)
        .map_err(NatDrop::Refused)?
    {
        Inbound::Mapped(_) if t == msg_type::ECHO_REQUEST => Err(NatDrop::Unsupported),
        Inbound::Mapped(orig) => {
            set_port(Proto::Icmp, icmp, ICMP_IDENT, orig, true);
            Ok(())
        }
        Inbound::Forwarded if t == msg_type::ECHO_REQUEST => Ok(()),
        Inbound::Forwarded => Err(NatDrop::Refused(NatRefusal::UnknownMapping)),
    }
}

/// An ICMP error the guest sends about a packet it received from the outside: a reply on a
/// mapped flow (its socket is gone: port unreachable), or traffic of a port-forwarded flow.
/// The quote holds that packet as the guest got it (source: the remote, destination: the
/// guest's port). For a mapped flow the quoted destination port becomes the mapped one again,
/// so the remote gets an error about the packet it sent (the gateway puts back the public
/// address); an inbound flow's error leaves unchanged. Only errors sent back to the quoted
/// packet's source, about a flow the VM has, leave: a guest cannot send errors about other
/// flows or into other VMs' ports.
fn outbound_error(
    table: &NatTable,
    icmp: &mut [u8],
    dst: Ipv4Addr,
    now: u64,
) -> Result<OutboundDone, NatDrop> {
    if !matches!(
        icmp[0],
        msg_type::DST_UNREACHABLE | msg_type::TIME_EXCEEDED | msg_type::PARAM_PROBLEM
    ) {
        return Err(NatDrop::Unsupported);
    }
    let quote_at = icmpv4::HEADER_LEN;
    let (qhl, qproto, _) = transport_of(&icmp[quote_at..], QUOTED_L4)?;
    let qsrc = ipv4::Packet::new_unchecked(&icmp[quote_at..]).src_addr();
    if qsrc != dst {
        return Err(NatDrop::Refused(NatRefusal::UnknownMapping));
    }
    let region = quote_at..quote_at + qhl + QUOTED_L4;
    let before = checksum::sum(icmp.get(region.clone()).ok_or(NatDrop::Malformed)?);
    let ql4 = &mut icmp[quote_at + qhl..];
    let (local_port, remote_port, at) = match qproto {
        Proto::Icmp => (be16(ql4, ICMP_IDENT), 0, ICMP_IDENT),
        _ => (be16(ql4, 2), be16(ql4, 0), 2),
    };
    let key = FlowKey {
        proto: qproto,
        local_port,
        remote: qsrc,
        remote_port,
    };
    if table.is_inbound_flow(&key, now) {
        return Ok(OutboundDone::Unchanged);
    }
    let mapped = table
        .mapped_port(&key, now)
        .ok_or(NatDrop::Refused(NatRefusal::UnknownMapping))?;
    let has_csum = l4_csum_at(qproto).is_some_and(|o| o + 2 <= QUOTED_L4);
    set_port(qproto, ql4, at, mapped, has_csum);
    let after = checksum::sum(&icmp[region]);
    let c = be16(icmp, ICMP_CSUM);
    put16(icmp, ICMP_CSUM, update_u16(c, before, after));
    Ok(OutboundDone::Rewritten)
}

/// An ICMP error about a packet the VM sent through NAT: the quote holds that packet as the
/// outside saw it (source: the public address or the VM, source port: the mapped one). Puts
/// back the VM's address and port in the quote, with the quote's IPv4 and L4 checksums, and
/// updates the ICMP checksum over what changed.
fn translate_quote(
    table: &NatTable,
    icmp: &mut [u8],
    vm_ip: Ipv4Addr,
    now: u64,
) -> Result<(), NatDrop> {
    let quote_at = icmpv4::HEADER_LEN;
    let (qhl, qproto, qdst) = transport_of(&icmp[quote_at..], QUOTED_L4)?;
    let region = quote_at..quote_at + qhl + QUOTED_L4;
    let before = checksum::sum(icmp.get(region.clone()).ok_or(NatDrop::Malformed)?);
    let quote = &mut icmp[quote_at..];
    let qsrc = ipv4::Packet::new_unchecked(&quote[..]).src_addr();
    let ql4 = &mut quote[qhl..];
    let (mapped, remote_port, at) = match qproto {
        Proto::Icmp => (be16(ql4, ICMP_IDENT), 0, ICMP_IDENT),
        _ => (be16(ql4, 0), be16(ql4, 2), 0),
    };
    let key = match table.lookup_mapped(qproto, mapped, now) {
        Some(k) if k.remote == qdst && k.remote_port == remote_port => k,
        _ => {
            let inbound = FlowKey {
                proto: qproto,
                local_port: mapped,
                remote: qdst,
                remote_port,
            };
            if !table.is_inbound_flow(&inbound, now) {
                return Err(NatDrop::Refused(NatRefusal::UnknownMapping));
            }
            inbound
        }
    };
    if qsrc != vm_ip {
        // Only UDP's checksum lies in the 8 quoted bytes (and covers the address through its
        // pseudo header); ICMP's does not cover addresses.
        if qproto == Proto::Udp {
            let c = be16(ql4, UDP_CSUM);
            if c != 0 {
                put16(
                    ql4,
                    UDP_CSUM,
                    udp_nonzero(update_u32(c, qsrc.into(), vm_ip.into())),
                );
            }
        }
        let mut qip = ipv4::Packet::new_unchecked(&mut quote[..qhl]);
        let c = qip.header_checksum();
        qip.set_src_addr(vm_ip);
        qip.set_header_checksum(update_u32(c, qsrc.into(), vm_ip.into()));
    }
    if key.local_port != mapped {
        let has_csum = l4_csum_at(qproto).is_some_and(|o| o + 2 <= QUOTED_L4);
        set_port(qproto, &mut quote[qhl..], at, key.local_port, has_csum);
    }
    let after = checksum::sum(&icmp[region]);
    let c = be16(icmp, ICMP_CSUM);
    put16(icmp, ICMP_CSUM, update_u16(c, before, after));
    Ok(())
}

/// The header length, mapped protocol and destination of the packet in `head`, checking that
/// `head` holds what NAT reads and that the packet is not a fragment.
/// `tcp_bytes`: the bytes of a TCP header required (20 to read the flags and checksum, 8 in
/// an ICMP error's quote).
fn transport_of(head: &[u8], tcp_bytes: usize) -> Result<(usize, Proto, Ipv4Addr), NatDrop> {
    let ip = ipv4::Packet::new_checked(head).map_err(|_| NatDrop::Malformed)?;
    if ip.is_fragment() {
        return Err(NatDrop::Fragment);
    }
    let proto = Proto::from_ip(ip.protocol()).ok_or(NatDrop::Unsupported)?;
    let hl = ip.header_len();
    let need = match proto {
        Proto::Tcp => tcp_bytes,
        _ => 8,
    };
    if head.len() < hl + need {
        return Err(NatDrop::Malformed);
    }
    Ok((hl, proto, ip.dst_addr()))
}

/// The flow key of a TCP/UDP header `l4` towards (`inbound`: from) `remote`.
fn port_key(proto: Proto, l4: &[u8], remote: Ipv4Addr, inbound: bool) -> FlowKey {
    let (src, dst) = (be16(l4, 0), be16(l4, 2));
    let (local_port, remote_port) = if inbound { (dst, src) } else { (src, dst) };
    FlowKey {
        proto,
        local_port,
        remote,
        remote_port,
    }
}

fn icmp_key(id: u16, remote: Ipv4Addr) -> FlowKey {
    FlowKey {
        proto: Proto::Icmp,
        local_port: id,
        remote,
        remote_port: 0,
    }
}

fn tcp_flags(proto: Proto, l4: &[u8]) -> u8 {
    if proto == Proto::Tcp {
        l4[13]
    } else {
        0
    }
}

fn l4_csum_at(proto: Proto) -> Option<usize> {
    match proto {
        Proto::Tcp => Some(TCP_CSUM),
        Proto::Udp => Some(UDP_CSUM),
        Proto::Icmp => Some(ICMP_CSUM),
    }
}

/// Writes `port` at `at` of `l4` and, with `fix_csum`, updates the L4 checksum for it.
fn set_port(proto: Proto, l4: &mut [u8], at: usize, port: u16, fix_csum: bool) {
    let old = be16(l4, at);
    put16(l4, at, port);
    let Some(o) = l4_csum_at(proto).filter(|_| fix_csum) else {
        return;
    };
    let c = be16(l4, o);
    match proto {
        Proto::Udp if c == 0 => {}
        Proto::Udp => put16(l4, o, udp_nonzero(update_u16(c, old, port))),
        // An ICMP message may be all zeros but for its checksum (an echo reply with
        // identifier and sequence 0, no payload), whose checksum is then 0xffff, never the
        // 0x0000 RFC 1624's update gives there; 0xffff also verifies wherever 0x0000 does.
        Proto::Icmp => put16(l4, o, udp_nonzero(update_u16(c, old, port))),
        Proto::Tcp => put16(l4, o, update_u16(c, old, port)),
    }
}

/// A computed UDP checksum of 0 is sent as 0xffff (0 means "no checksum"); for ICMP see
/// [`set_port`].
fn udp_nonzero(c: u16) -> u16 {
    if c == 0 {
        0xffff
    } else {
        c
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

#[cfg(test)]
mod tests;
