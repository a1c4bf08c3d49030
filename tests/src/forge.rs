//! Hand-made VNP datagrams for the bad-input tests: what an attacker on the underlay could send
//! from a plain UDP socket.

use std::net::Ipv4Addr;
use vnp_protocol::token::{Expiry, Token};
use vnp_protocol::wire::VnpRepr;

/// One's-complement checksum of `data` (IPv4 header, ICMP).
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 ICMP echo request from `src` to `dst` with `payload_len` bytes of payload.
pub fn icmp_echo(src: Ipv4Addr, dst: Ipv4Addr, payload_len: usize) -> Vec<u8> {
    let total = 20 + 8 + payload_len;
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
    p[8] = 64; // TTL
    p[9] = 1; // ICMP
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let c = checksum(&p[..20]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p[20] = 8; // echo request
    p[24..26].copy_from_slice(&0x4242u16.to_be_bytes());
    p[26..28].copy_from_slice(&1u16.to_be_bytes());
    for (i, b) in p[28..].iter_mut().enumerate() {
        *b = i as u8;
    }
    let c = checksum(&p[20..]);
    p[22..24].copy_from_slice(&c.to_be_bytes());
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
        assert_eq!(checksum(&p[..20]), 0);
        assert_eq!(checksum(&p[20..]), 0);
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
