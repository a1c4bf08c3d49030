//! Hand-made VNP datagrams for the bad-input tests: what an attacker on the underlay could send
//! from a plain UDP socket.

use std::net::Ipv4Addr;
use vnp_protocol::token::{Expiry, Token};
use vnp_protocol::wire::{icmpv4, ipv4, udp, VnpRepr};

/// An IPv4 ICMP echo request from `src` to `dst` with `payload_len` bytes of payload.
pub fn icmp_echo(src: Ipv4Addr, dst: Ipv4Addr, payload_len: usize) -> Vec<u8> {
    let icmp_len = icmpv4::HEADER_LEN + payload_len;
    let mut p = vec![0u8; ipv4::MIN_HEADER_LEN + icmp_len];
    let mut ip = ipv4::Packet::new_unchecked(&mut p[..]);
    ipv4::Repr {
        src_addr: src,
        dst_addr: dst,
        protocol: ipv4::protocol::ICMP,
        payload_len: icmp_len,
        ttl: 64,
    }
    .emit(&mut ip);
    ip.set_ident(0x1234);
    ip.fill_checksum();
    let mut icmp = icmpv4::Packet::new_unchecked(ip.payload_mut());
    icmp.set_msg_type(icmpv4::msg_type::ECHO_REQUEST);
    icmp.set_echo_ident(0x4242);
    icmp.set_echo_seq_no(1);
    for (i, b) in icmp.data_mut().iter_mut().enumerate() {
        *b = i as u8;
    }
    icmp.fill_checksum();
    p
}

/// An IPv4 UDP packet from `src:sport` to `dst:dport` carrying `payload`, checksums filled.
pub fn udp_packet(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let udp_len = udp::HEADER_LEN + payload.len();
    let mut p = vec![0u8; ipv4::MIN_HEADER_LEN + udp_len];
    let mut ip = ipv4::Packet::new_unchecked(&mut p[..]);
    ipv4::Repr {
        src_addr: src,
        dst_addr: dst,
        protocol: ipv4::protocol::UDP,
        payload_len: udp_len,
        ttl: 64,
    }
    .emit(&mut ip);
    let mut u = udp::Packet::new_unchecked(ip.payload_mut());
    u.set_src_port(sport);
    u.set_dst_port(dport);
    u.set_len(udp_len as u16);
    u.payload_mut().copy_from_slice(payload);
    u.fill_checksum(src, dst);
    p
}

/// A VNP datagram (UDP payload) carrying `inner` with the given header values and no options.
pub fn datagram(network_id: u32, token: Token, expiry: Expiry, inner: &[u8]) -> Vec<u8> {
    let repr = VnpRepr {
        network_id,
        token,
        expiry,
        has_options: false,
    };
    let mut out = repr.to_bytes().to_vec();
    out.extend_from_slice(inner);
    out
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn icmp_checksums_verify() {
        let p = icmp_echo(Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 3), 33);
        let ip = ipv4::Packet::new_checked(&p[..]).unwrap();
        assert!(ip.verify_checksum());
        assert!(icmpv4::Packet::new_checked(ip.payload())
            .unwrap()
            .verify_checksum());
        assert_eq!(p.len(), 61);
    }

    #[test]
    fn datagram_starts_with_a_version_1_header() {
        let d = datagram(7, Token::from_bytes([1; 8]), Expiry(100), &[0x45, 0, 0, 20]);
        assert_eq!(d[0], 1);
        assert_eq!(&d[4..8], &7u32.to_be_bytes());
        assert_eq!(&d[8..16], &[1; 8]);
        assert_eq!(&d[16..20], &100u32.to_be_bytes());
        assert_eq!(d.len(), 24);
    }
}
