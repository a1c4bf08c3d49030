//! Address translation of inner IPv4 packets, in place, with incremental checksum updates
//! (`vnp_protocol::wire::checksum`, RFC 1624).
//!
//! - **Outbound** (a VM's packet, its source port already in the VM's NAT blocks by vnpd): the
//!   source port must be one of the VM's (NAT block with egress allowed, or the VM port of a
//!   forwarding rule: a reply) — a guest can never use another VM's ports — then the source
//!   address becomes the public address (and, for a forwarding reply, the source port the
//!   public port).
//! - **Inbound** (a packet to the public address): by destination port, a forwarding rule
//!   (destination address and port rewritten) or a NAT block (return traffic: only the
//!   destination address, ports untouched; vnpd reverses its port mapping). ICMP errors about
//!   such flows are translated inside too ([`crate::icmp`]).

use crate::table::{NatTable, VmIndex};
use crate::DropReason;
use std::net::Ipv4Addr;
use vnp_protocol::wire::checksum::{update_u16, update_u32};
use vnp_protocol::wire::{icmpv4, ipv4, tcp, udp};

/// The L4 "port" a flow is keyed on: TCP/UDP port, or the ICMP echo identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum L4 {
    Tcp,
    Udp,
    IcmpEcho,
}

pub(crate) fn l4_of(proto: u8, payload: &[u8]) -> Result<L4, DropReason> {
    match proto {
        ipv4::PROTO_TCP if payload.len() >= tcp::MIN_HEADER_LEN => Ok(L4::Tcp),
        ipv4::PROTO_UDP if payload.len() >= udp::HEADER_LEN => Ok(L4::Udp),
        ipv4::PROTO_ICMP if payload.len() >= icmpv4::HEADER_LEN => Ok(L4::IcmpEcho),
        ipv4::PROTO_TCP | ipv4::PROTO_UDP | ipv4::PROTO_ICMP => Err(DropReason::Malformed),
        _ => Err(DropReason::UnsupportedProtocol),
    }
}

/// Source (`src = true`) or destination port of an L4 header (echo identifier for ICMP).
pub(crate) fn port(l4: L4, payload: &[u8], src: bool) -> u16 {
    match (l4, src) {
        (L4::IcmpEcho, _) => u16::from_be_bytes([payload[4], payload[5]]),
        (_, true) => u16::from_be_bytes([payload[0], payload[1]]),
        (_, false) => u16::from_be_bytes([payload[2], payload[3]]),
    }
}

/// Offset of the L4 checksum field, and whether 0 means "none" (UDP).
fn checksum_at(l4: L4) -> (usize, bool) {
    match l4 {
        L4::Tcp => (16, false),
        L4::Udp => (6, true),
        L4::IcmpEcho => (2, false),
    }
}

/// Applies `f` to the L4 checksum stored at its offset in `payload`, if the payload holds it
/// (a truncated copy inside an ICMP error may not) and it is in use.
pub(crate) fn update_l4_checksum(l4: L4, payload: &mut [u8], f: impl FnOnce(u16) -> u16) {
    let (at, zero_is_none) = checksum_at(l4);
    let Some(field) = payload.get_mut(at..at + 2) else {
        return;
    };
    let old = u16::from_be_bytes([field[0], field[1]]);
    if zero_is_none && old == 0 {
        return;
    }
    let mut new = f(old);
    if zero_is_none && new == 0 {
        new = 0xffff;
    }
    field.copy_from_slice(&new.to_be_bytes());
}

/// Rewrites the source (`src = true`) or destination address of an IPv4 packet, fixing the
/// header checksum and the L4 checksum (TCP and UDP cover the address in the pseudo header;
/// ICMP does not).
pub(crate) fn set_addr(packet: &mut [u8], l4: L4, src: bool, new: Ipv4Addr) {
    let mut ip = ipv4::Packet::new_unchecked(&mut *packet);
    let old = if src { ip.src_addr() } else { ip.dst_addr() };
    if src {
        ip.set_src_addr(new);
    } else {
        ip.set_dst_addr(new);
    }
    let hc = update_u32(ip.header_checksum(), u32::from(old), u32::from(new));
    ip.set_header_checksum(hc);
    if l4 != L4::IcmpEcho {
        let payload = ip.payload_mut();
        update_l4_checksum(l4, payload, |c| {
            update_u32(c, u32::from(old), u32::from(new))
        });
    }
}

/// Rewrites a source or destination port (TCP/UDP) and the L4 checksum.
pub(crate) fn set_port(payload: &mut [u8], l4: L4, src: bool, new: u16) {
    let at = if src { 0 } else { 2 };
    let old = u16::from_be_bytes([payload[at], payload[at + 1]]);
    payload[at..at + 2].copy_from_slice(&new.to_be_bytes());
    update_l4_checksum(l4, payload, |c| update_u16(c, old, new));
}

/// Parses the inner packet and refuses what the gateway does not translate.
fn parse(packet: &[u8]) -> Result<(ipv4::Packet<&[u8]>, L4), DropReason> {
    let ip = ipv4::Packet::new_checked(packet).map_err(|_| DropReason::Malformed)?;
    ip.check_len(packet.len())
        .map_err(|_| DropReason::Malformed)?;
    if ip.is_later_fragment() {
        // No L4 header to find the flow by.
        return Err(DropReason::Fragment);
    }
    let l4 = l4_of(ip.protocol(), ip.payload())?;
    Ok((ip, l4))
}

/// Translates a VM's packet (already through the receive checks) for the public side.
/// Returns the VM it came from.
pub fn outbound(table: &NatTable, packet: &mut [u8]) -> Result<VmIndex, DropReason> {
    let (ip, l4) = parse(packet)?;
    let vm = table.vm_by_ip(ip.src_addr()).ok_or(DropReason::UnknownVm)?;
    let payload = ip.payload();
    if l4 == L4::IcmpEcho && icmpv4::msg_type::is_error(payload[0]) {
        return crate::icmp::outbound_error(table, packet, vm);
    }
    if l4 == L4::IcmpEcho && payload[0] != icmpv4::msg_type::ECHO_REQUEST {
        // Echo replies from a guest would carry its inner addresses out.
        return Err(DropReason::UnsupportedProtocol);
    }
    let sport = port(l4, payload, true);
    let entry = &table.vms[vm];
    let owned = table.nat_owner(sport) == Some(vm);
    let forward = match l4 {
        L4::Tcp | L4::Udp => table.forward_out(vm, ip.protocol(), sport),
        L4::IcmpEcho => None,
    };
    match (owned, entry.egress, forward) {
        (true, true, _) => {}
        (_, _, Some(f)) => {
            let hl = ip.header_len();
            set_port(&mut packet[hl..], l4, true, f.public_port);
        }
        (true, false, None) => return Err(DropReason::EgressDenied),
        (false, _, None) => return Err(DropReason::PortNotOwned),
    }
    set_addr(packet, l4, true, table.public_addr);
    Ok(vm)
}

/// Translates a packet from the public side for a VM; returns that VM.
pub fn inbound(table: &NatTable, packet: &mut [u8]) -> Result<VmIndex, DropReason> {
    let (ip, l4) = parse(packet)?;
    if ip.dst_addr() != table.public_addr {
        return Err(DropReason::NotPublicAddress);
    }
    let payload = ip.payload();
    if l4 == L4::IcmpEcho {
        return match payload[0] {
            icmpv4::msg_type::ECHO_REPLY => {
                let vm = table
                    .nat_owner(port(l4, payload, false))
                    .ok_or(DropReason::NoMapping)?;
                set_addr(packet, l4, false, table.vms[vm].ip);
                Ok(vm)
            }
            t if icmpv4::msg_type::is_error(t) => crate::icmp::inbound_error(table, packet),
            _ => Err(DropReason::NoMapping),
        };
    }
    let dport = port(l4, payload, false);
    if let Some(f) = table.forward_in(ip.protocol(), dport) {
        let hl = ip.header_len();
        set_port(&mut packet[hl..], l4, false, f.vm_port);
        set_addr(packet, l4, false, table.vms[f.vm].ip);
        return Ok(f.vm);
    }
    let vm = table.nat_owner(dport).ok_or(DropReason::NoMapping)?;
    set_addr(packet, l4, false, table.vms[vm].ip);
    Ok(vm)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::table::tests::{config, A, B, PUBLIC};
    use proptest::prelude::*;

    const SERVER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);

    /// A UDP packet with correct checksums.
    pub fn udp_packet(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
        let mut p = vec![0u8; 20 + 8 + 5];
        {
            let mut ip = ipv4::Packet::new_unchecked(&mut p[..]);
            ip.set_version_and_header_len(20);
            ip.set_total_len(33);
            ip.set_ttl(64);
            ip.set_protocol(ipv4::PROTO_UDP);
            ip.set_src_addr(src);
            ip.set_dst_addr(dst);
            ip.fill_checksum();
        }
        let mut u = udp::Packet::new_unchecked(&mut p[20..]);
        u.set_src_port(sport);
        u.set_dst_port(dport);
        u.set_len(13);
        u.payload_mut().copy_from_slice(b"hello");
        u.fill_checksum(src, dst);
        p
    }

    /// A TCP SYN with correct checksums.
    pub fn tcp_packet(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        {
            let mut ip = ipv4::Packet::new_unchecked(&mut p[..]);
            ip.set_version_and_header_len(20);
            ip.set_total_len(40);
            ip.set_ttl(64);
            ip.set_protocol(ipv4::PROTO_TCP);
            ip.set_src_addr(src);
            ip.set_dst_addr(dst);
            ip.fill_checksum();
        }
        let mut t = tcp::Packet::new_unchecked(&mut p[20..]);
        t.set_src_port(sport);
        t.set_dst_port(dport);
        t.set_header_len(20);
        t.set_flags(tcp::flags::SYN);
        t.set_seq_number(7);
        t.set_window_len(1000);
        t.fill_checksum(src, dst);
        p
    }

    /// Whether every checksum of `p` is right.
    pub fn checksums_ok(p: &[u8]) -> bool {
        let ip = ipv4::Packet::new_checked(p).unwrap();
        let l4_ok = match ip.protocol() {
            ipv4::PROTO_UDP => udp::Packet::new_unchecked(ip.payload())
                .verify_checksum(ip.src_addr(), ip.dst_addr()),
            ipv4::PROTO_TCP => tcp::Packet::new_unchecked(ip.payload())
                .verify_checksum(ip.src_addr(), ip.dst_addr()),
            _ => icmpv4::Packet::new_unchecked(ip.payload()).verify_checksum(),
        };
        ip.verify_checksum() && l4_ok
    }

    fn addrs(p: &[u8]) -> (Ipv4Addr, Ipv4Addr, u16, u16) {
        let ip = ipv4::Packet::new_unchecked(p);
        let pl = ip.payload();
        (
            ip.src_addr(),
            ip.dst_addr(),
            port(L4::Udp, pl, true),
            port(L4::Udp, pl, false),
        )
    }

    #[test]
    fn outbound_rewrites_source_address_only() {
        let t = NatTable::from_config(&config());
        let mut p = udp_packet(A, SERVER, 2100, 53);
        assert_eq!(outbound(&t, &mut p), Ok(0));
        assert_eq!(addrs(&p), (PUBLIC, SERVER, 2100, 53));
        assert!(checksums_ok(&p));
        let mut p = tcp_packet(A, SERVER, 1024, 80);
        assert_eq!(outbound(&t, &mut p), Ok(0));
        assert_eq!(addrs(&p), (PUBLIC, SERVER, 1024, 80));
        assert!(checksums_ok(&p));
    }

    #[test]
    fn outbound_refuses_other_vms_ports_and_denied_egress() {
        let t = NatTable::from_config(&config());
        // a using b's port, a port nobody has, an unknown source.
        for (src, sport, why) in [
            (A, 1600, DropReason::PortNotOwned),
            (A, 40000, DropReason::PortNotOwned),
            (B, 1600, DropReason::EgressDenied),
            (Ipv4Addr::new(10, 1, 0, 99), 1030, DropReason::UnknownVm),
        ] {
            let mut p = udp_packet(src, SERVER, sport, 53);
            let before = p.clone();
            assert_eq!(outbound(&t, &mut p), Err(why), "{src} {sport}");
            assert_eq!(p, before, "a dropped packet is not modified");
        }
    }

    #[test]
    fn forwarding_both_ways() {
        let t = NatTable::from_config(&config());
        let client = Ipv4Addr::new(192, 0, 2, 50);
        let mut p = tcp_packet(client, PUBLIC, 50000, 443);
        assert_eq!(inbound(&t, &mut p), Ok(1));
        assert_eq!(addrs(&p), (client, B, 50000, 8443));
        assert!(checksums_ok(&p));
        // b's reply leaves from the public port, even though b may not start connections.
        let mut r = tcp_packet(B, client, 8443, 50000);
        assert_eq!(outbound(&t, &mut r), Ok(1));
        assert_eq!(addrs(&r), (PUBLIC, client, 443, 50000));
        assert!(checksums_ok(&r));
        // The same port over UDP is not forwarded.
        let mut u = udp_packet(client, PUBLIC, 50000, 443);
        assert_eq!(inbound(&t, &mut u), Err(DropReason::NoMapping));
    }

    #[test]
    fn return_traffic_by_port_block() {
        let t = NatTable::from_config(&config());
        let mut p = udp_packet(SERVER, PUBLIC, 53, 2300);
        assert_eq!(inbound(&t, &mut p), Ok(0));
        assert_eq!(addrs(&p), (SERVER, A, 53, 2300));
        assert!(checksums_ok(&p));
        let mut p = udp_packet(SERVER, PUBLIC, 53, 3000);
        assert_eq!(inbound(&t, &mut p), Err(DropReason::NoMapping));
        let mut p = udp_packet(SERVER, Ipv4Addr::new(203, 0, 113, 2), 53, 1030);
        assert_eq!(inbound(&t, &mut p), Err(DropReason::NotPublicAddress));
    }

    #[test]
    fn malformed_and_fragments() {
        let t = NatTable::from_config(&config());
        let mut p = udp_packet(A, SERVER, 1030, 53);
        p[6] = 0x00;
        p[7] = 0x10; // fragment offset 16 * 8
        assert_eq!(outbound(&t, &mut p), Err(DropReason::Fragment));
        let mut short = udp_packet(A, SERVER, 1030, 53);
        short.truncate(24);
        assert_eq!(outbound(&t, &mut short), Err(DropReason::Malformed));
        let mut gre = udp_packet(A, SERVER, 1030, 53);
        gre[9] = 47;
        assert_eq!(outbound(&t, &mut gre), Err(DropReason::UnsupportedProtocol));
    }

    proptest! {
        /// Incremental updates agree with a full recompute for any addresses, ports, payload.
        #[test]
        fn checksums_stay_valid(
            src in any::<u32>(), dst in any::<u32>(), sport in 1024u16..1536, dport in any::<u16>(),
            payload in proptest::collection::vec(any::<u8>(), 0..64), tcp_or_udp in any::<bool>(),
        ) {
            let t = NatTable::from_config(&config());
            let dst = Ipv4Addr::from(dst);
            prop_assume!(!t.network_cidr.contains(dst));
            let _ = src;
            let mut p = if tcp_or_udp { tcp_packet(A, dst, sport, dport) } else { udp_packet(A, dst, sport, dport) };
            p.extend_from_slice(&payload);
            let len = p.len() as u16;
            {
                let mut ip = ipv4::Packet::new_unchecked(&mut p[..]);
                ip.set_total_len(len);
                ip.fill_checksum();
                let (s, d) = (ip.src_addr(), ip.dst_addr());
                if tcp_or_udp {
                    tcp::Packet::new_unchecked(ip.payload_mut()).fill_checksum(s, d);
                } else {
                    let mut u = udp::Packet::new_unchecked(ip.payload_mut());
                    u.set_len(len - 20);
                    u.fill_checksum(s, d);
                }
            }
            prop_assert_eq!(outbound(&t, &mut p), Ok(0));
            prop_assert!(checksums_ok(&p));
        }
    }
}
