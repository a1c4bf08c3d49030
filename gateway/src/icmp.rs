//! ICMP errors about NATed or forwarded flows, from the public side (port unreachable,
//! fragmentation needed, time exceeded): the packet they quote left with the public address as
//! its source, so they are found by the quoted source port (or echo identifier) and
//! translated back — outer destination and quoted source become the VM's address (and, for a
//! forwarding rule, the quoted source port the VM's port) — so the guest's stack matches them
//! to its socket and path-MTU discovery works through NAT.

use crate::table::{NatTable, VmIndex};
use crate::translate::{l4_of, port, set_addr, set_port, L4};
use crate::DropReason;
use vnp_protocol::wire::checksum::update_u32;
use vnp_protocol::wire::{icmpv4, ipv4};

/// Translates an inbound ICMP error in place; returns the VM it is for.
pub fn inbound_error(table: &NatTable, packet: &mut [u8]) -> Result<VmIndex, DropReason> {
    let outer_hl = ipv4::Packet::new_unchecked(&*packet).header_len();
    let quoted_at = outer_hl + icmpv4::HEADER_LEN;
    let quoted = packet.get(quoted_at..).ok_or(DropReason::Malformed)?;
    let q = ipv4::Packet::new_checked(quoted).map_err(|_| DropReason::Malformed)?;
    if q.src_addr() != table.public_addr {
        return Err(DropReason::NoMapping);
    }
    let q_hl = q.header_len();
    let q_payload = quoted.get(q_hl..).ok_or(DropReason::Malformed)?;
    // RFC 792: the quote holds at least the first 8 bytes of the L4 header (the ports).
    if q_payload.len() < 8 {
        return Err(DropReason::Malformed);
    }
    let l4 = match l4_of(q.protocol(), q_payload) {
        Ok(l4) => l4,
        // A quoted TCP header is usually cut short: 8 bytes hold its ports all the same.
        Err(DropReason::Malformed) if q.protocol() == ipv4::PROTO_TCP => L4::Tcp,
        Err(e) => return Err(e),
    };
    let sport = port(l4, q_payload, true);
    let (vm, vm_port) = match (l4, table.forward_in(q.protocol(), sport)) {
        (L4::Tcp | L4::Udp, Some(f)) => (f.vm, Some(f.vm_port)),
        _ => (table.nat_owner(sport).ok_or(DropReason::NoMapping)?, None),
    };
    let vm_ip = table.vms[vm].ip;
    {
        let quoted = &mut packet[quoted_at..];
        if let Some(p) = vm_port {
            set_port(&mut quoted[q_hl..], l4, true, p);
        }
        quote_set_src(quoted, l4, vm_ip);
    }
    let mut icmp = icmpv4::Packet::new_unchecked(&mut packet[outer_hl..]);
    icmp.fill_checksum();
    set_addr(packet, L4::IcmpEcho, false, vm_ip);
    Ok(vm)
}

/// Translates an ICMP error a guest sends (VM `vm`, already identified by its source address)
/// about a packet it received from the public side, in place: the quoted packet was addressed
/// to the VM's port, which must be the VM's (a NAT port of a VM allowed egress, or the VM port
/// of a forwarding rule: the quote then gets the public port back). The outer source and the
/// quoted destination become the public address, so the public sender's stack matches the
/// error to its socket. The error must go back to the quoted packet's source.
pub fn outbound_error(
    table: &NatTable,
    packet: &mut [u8],
    vm: VmIndex,
) -> Result<VmIndex, DropReason> {
    let outer = ipv4::Packet::new_unchecked(&*packet);
    let (outer_hl, outer_dst) = (outer.header_len(), outer.dst_addr());
    if !matches!(
        packet.get(outer_hl).copied(),
        Some(icmpv4::msg_type::DST_UNREACHABLE)
            | Some(icmpv4::msg_type::TIME_EXCEEDED)
            | Some(icmpv4::msg_type::PARAM_PROBLEM)
    ) {
        return Err(DropReason::UnsupportedProtocol);
    }
    let quoted_at = outer_hl + icmpv4::HEADER_LEN;
    let (l4, q_hl, proto) = quoted_l4(packet.get(quoted_at..).ok_or(DropReason::Malformed)?)?;
    let q = ipv4::Packet::new_unchecked(&packet[quoted_at..]);
    if q.dst_addr() != table.vms[vm].ip || q.src_addr() != outer_dst {
        return Err(DropReason::PortNotOwned);
    }
    let dport = port(l4, &packet[quoted_at + q_hl..], false);
    let forward = match l4 {
        L4::Tcp | L4::Udp => table.forward_out(vm, proto, dport),
        L4::IcmpEcho => None,
    };
    let owned = table.nat_owner(dport) == Some(vm);
    match (forward, owned, table.vms[vm].egress) {
        (Some(f), _, _) => set_port(&mut packet[quoted_at + q_hl..], l4, false, f.public_port),
        (None, true, true) => {}
        (None, true, false) => return Err(DropReason::EgressDenied),
        (None, false, _) => return Err(DropReason::PortNotOwned),
    }
    quote_set_addr(&mut packet[quoted_at..], l4, false, table.public_addr);
    icmpv4::Packet::new_unchecked(&mut packet[outer_hl..]).fill_checksum();
    set_addr(packet, L4::IcmpEcho, true, table.public_addr);
    Ok(vm)
}

/// The quoted packet's L4 kind, header length and protocol; the quote must hold 8 bytes of
/// its L4 header (RFC 792), which carry the ports (a cut TCP header too).
fn quoted_l4(quoted: &[u8]) -> Result<(L4, usize, u8), DropReason> {
    let q = ipv4::Packet::new_checked(quoted).map_err(|_| DropReason::Malformed)?;
    let q_hl = q.header_len();
    let q_payload = quoted.get(q_hl..).ok_or(DropReason::Malformed)?;
    if q_payload.len() < 8 {
        return Err(DropReason::Malformed);
    }
    let l4 = match l4_of(q.protocol(), q_payload) {
        Ok(l4) => l4,
        Err(DropReason::Malformed) if q.protocol() == ipv4::PROTO_TCP => L4::Tcp,
        Err(e) => return Err(e),
    };
    Ok((l4, q_hl, q.protocol()))
}

/// Rewrites the quoted packet's source address: its header checksum and, where the quote
/// holds it, its L4 checksum (the guest's stack may check neither, but it must see what it
/// sent).
fn quote_set_src(quoted: &mut [u8], l4: L4, new: std::net::Ipv4Addr) {
    quote_set_addr(quoted, l4, true, new);
}

/// Rewrites the quoted packet's source (`src`) or destination address and its checksums.
fn quote_set_addr(quoted: &mut [u8], l4: L4, src: bool, new: std::net::Ipv4Addr) {
    let mut ip = ipv4::Packet::new_unchecked(&mut *quoted);
    let old = if src { ip.src_addr() } else { ip.dst_addr() };
    if src {
        ip.set_src_addr(new);
    } else {
        ip.set_dst_addr(new);
    }
    let hc = update_u32(ip.header_checksum(), u32::from(old), u32::from(new));
    ip.set_header_checksum(hc);
    if l4 != L4::IcmpEcho {
        let hl = ip.header_len();
        crate::translate::update_l4_checksum(l4, &mut quoted[hl..], |c| {
            update_u32(c, u32::from(old), u32::from(new))
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::tests::{config, A, B, PUBLIC};
    use crate::translate::tests::{checksums_ok, tcp_packet, udp_packet};
    use crate::translate::{inbound, outbound};
    use std::net::Ipv4Addr;

    const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);

    /// An ICMP error of `kind`/`code` from ROUTER quoting the first 28 bytes of `original`.
    fn icmp_error(kind: u8, code: u8, original: &[u8]) -> Vec<u8> {
        let quote = &original[..28];
        let total = 20 + 8 + quote.len();
        let mut p = vec![0u8; total];
        {
            let mut ip = ipv4::Packet::new_unchecked(&mut p[..]);
            ip.set_version_and_header_len(20);
            ip.set_total_len(total as u16);
            ip.set_ttl(64);
            ip.set_protocol(ipv4::PROTO_ICMP);
            ip.set_src_addr(ROUTER);
            ip.set_dst_addr(PUBLIC);
            ip.fill_checksum();
        }
        let mut icmp = icmpv4::Packet::new_unchecked(&mut p[20..]);
        icmp.set_msg_type(kind);
        icmp.set_msg_code(code);
        icmp.set_next_hop_mtu(1280);
        icmp.data_mut().copy_from_slice(quote);
        icmp.fill_checksum();
        p
    }

    #[test]
    fn frag_needed_about_a_nated_flow_reaches_the_vm_as_it_sent_it() {
        let t = NatTable::from_config(&config());
        let sent = udp_packet(A, ROUTER, 1030, 53);
        let mut out = sent.clone();
        outbound(&t, &mut out).unwrap();
        let mut err = icmp_error(
            icmpv4::msg_type::DST_UNREACHABLE,
            icmpv4::CODE_FRAG_NEEDED,
            &out,
        );
        assert_eq!(inbound(&t, &mut err), Ok(0));
        assert!(checksums_ok(&err));
        let ip = ipv4::Packet::new_unchecked(&err[..]);
        assert_eq!(ip.dst_addr(), A);
        let icmp = icmpv4::Packet::new_unchecked(ip.payload());
        assert_eq!(icmp.next_hop_mtu(), 1280);
        // The quote is exactly the first bytes of what the VM sent, checksums included.
        assert_eq!(&icmp.data()[..28], &sent[..28]);
    }

    #[test]
    fn port_unreachable_about_a_forwarded_reply() {
        let t = NatTable::from_config(&config());
        let client = Ipv4Addr::new(192, 0, 2, 50);
        let sent = tcp_packet(B, client, 8443, 50000);
        let mut out = sent.clone();
        outbound(&t, &mut out).unwrap();
        let mut err = icmp_error(icmpv4::msg_type::DST_UNREACHABLE, 3, &out);
        assert_eq!(inbound(&t, &mut err), Ok(1));
        assert!(checksums_ok(&err));
        let ip = ipv4::Packet::new_unchecked(&err[..]);
        assert_eq!(ip.dst_addr(), B);
        let quote = &icmpv4::Packet::new_unchecked(ip.payload()).data()[..28].to_vec();
        assert_eq!(&quote[..], &sent[..28]);
    }

    #[test]
    fn errors_about_nothing_of_ours_are_dropped() {
        let t = NatTable::from_config(&config());
        let foreign = udp_packet(Ipv4Addr::new(192, 0, 2, 9), ROUTER, 1030, 53);
        let mut err = icmp_error(icmpv4::msg_type::DST_UNREACHABLE, 3, &foreign);
        assert_eq!(inbound(&t, &mut err), Err(DropReason::NoMapping));
        let mut unmapped = udp_packet(A, ROUTER, 1030, 53);
        outbound(&t, &mut unmapped).unwrap();
        unmapped[20..22].copy_from_slice(&9000u16.to_be_bytes());
        let mut err = icmp_error(icmpv4::msg_type::TIME_EXCEEDED, 0, &unmapped);
        assert_eq!(inbound(&t, &mut err), Err(DropReason::NoMapping));
        let mut short = icmp_error(icmpv4::msg_type::DST_UNREACHABLE, 3, &unmapped);
        short.truncate(20 + 8 + 24);
        let len = short.len() as u16;
        ipv4::Packet::new_unchecked(&mut short[..]).set_total_len(len);
        assert_eq!(inbound(&t, &mut short), Err(DropReason::Malformed));
    }

    /// An ICMP error of `kind` that guest `from` sends to `to` about `received`.
    fn guest_error(from: Ipv4Addr, to: Ipv4Addr, kind: u8, received: &[u8]) -> Vec<u8> {
        let mut p = icmp_error(kind, 3, received);
        let mut ip = ipv4::Packet::new_unchecked(&mut p[..]);
        ip.set_src_addr(from);
        ip.set_dst_addr(to);
        ip.fill_checksum();
        p
    }

    #[test]
    fn guest_port_unreachable_about_forwarded_and_returned_packets() {
        let t = NatTable::from_config(&config());
        let client = Ipv4Addr::new(192, 0, 2, 50);
        // Through the forwarding rule to b:8443, answered with port unreachable by b.
        let sent = tcp_packet(client, PUBLIC, 50000, 443);
        let mut got = sent.clone();
        assert_eq!(inbound(&t, &mut got), Ok(1));
        let mut err = guest_error(B, client, icmpv4::msg_type::DST_UNREACHABLE, &got);
        assert_eq!(outbound(&t, &mut err), Ok(1));
        assert!(checksums_ok(&err));
        let ip = ipv4::Packet::new_unchecked(&err[..]);
        assert_eq!((ip.src_addr(), ip.dst_addr()), (PUBLIC, client));
        // The client sees an error about exactly the packet it sent.
        assert_eq!(
            &icmpv4::Packet::new_unchecked(ip.payload()).data()[..28],
            &sent[..28]
        );
        // Return traffic of a's NAT flow whose socket is gone.
        let sent = udp_packet(ROUTER, PUBLIC, 53, 1030);
        let mut got = sent.clone();
        assert_eq!(inbound(&t, &mut got), Ok(0));
        let mut err = guest_error(A, ROUTER, icmpv4::msg_type::DST_UNREACHABLE, &got);
        assert_eq!(outbound(&t, &mut err), Ok(0));
        assert!(checksums_ok(&err));
        let ip = ipv4::Packet::new_unchecked(&err[..]);
        assert_eq!(ip.src_addr(), PUBLIC);
        assert_eq!(
            &icmpv4::Packet::new_unchecked(ip.payload()).data()[..28],
            &sent[..28]
        );
    }

    #[test]
    fn guest_errors_about_other_ports_are_dropped() {
        let t = NatTable::from_config(&config());
        let unreach = icmpv4::msg_type::DST_UNREACHABLE;
        // a quoting a packet to b's port; b (no egress) quoting its own NAT port; a quoting a
        // packet to b's address; an error sent to someone else than the quoted source.
        for (from, to, quoted, why) in [
            (
                A,
                ROUTER,
                udp_packet(ROUTER, A, 53, 1600),
                DropReason::PortNotOwned,
            ),
            (
                B,
                ROUTER,
                udp_packet(ROUTER, B, 53, 1600),
                DropReason::EgressDenied,
            ),
            (
                A,
                ROUTER,
                udp_packet(ROUTER, B, 53, 1030),
                DropReason::PortNotOwned,
            ),
            (
                A,
                PUBLIC,
                udp_packet(ROUTER, A, 53, 1030),
                DropReason::PortNotOwned,
            ),
        ] {
            let mut err = guest_error(from, to, unreach, &quoted);
            let before = err.clone();
            assert_eq!(outbound(&t, &mut err), Err(why), "{from} {to}");
            assert_eq!(err, before, "a dropped packet is not modified");
        }
        let quoted = udp_packet(ROUTER, A, 53, 1030);
        let mut redirect = guest_error(A, ROUTER, icmpv4::msg_type::REDIRECT, &quoted);
        assert_eq!(
            outbound(&t, &mut redirect),
            Err(DropReason::UnsupportedProtocol)
        );
    }
}
