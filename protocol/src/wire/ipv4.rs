//! A minimal zero-copy view of the inner IPv4 packet: just what encapsulation, the receive
//! checks and NAT need.

use std::net::Ipv4Addr;

use super::WireError;

/// Smallest IPv4 header (no options).
pub const MIN_HEADER_LEN: usize = 20;
/// IP protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;
/// IP protocol number of ICMP.
pub const PROTO_ICMP: u8 = 1;

/// A view over bytes that start with an IPv4 header.
#[derive(Debug, Clone, Copy)]
pub struct Ipv4View<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Ipv4View<T> {
    /// Checks version, header length and that the buffer holds `total_len` bytes (it may hold
    /// more: trailing bytes are not the packet's).
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        let data = buffer.as_ref();
        if data.len() < MIN_HEADER_LEN {
            return Err(WireError::Truncated);
        }
        if data[0] >> 4 != 4 {
            return Err(WireError::NotIpv4);
        }
        let header_len = usize::from(data[0] & 0x0f) * 4;
        let total_len = usize::from(u16::from_be_bytes([data[2], data[3]]));
        if header_len < MIN_HEADER_LEN || total_len < header_len {
            return Err(WireError::NotIpv4);
        }
        if data.len() < total_len {
            return Err(WireError::Truncated);
        }
        Ok(Self { buffer })
    }

    /// Header length in bytes (IHL × 4).
    pub fn header_len(&self) -> usize {
        usize::from(self.buffer.as_ref()[0] & 0x0f) * 4
    }

    /// Total length of the packet in bytes, header included.
    pub fn total_len(&self) -> usize {
        let d = self.buffer.as_ref();
        usize::from(u16::from_be_bytes([d[2], d[3]]))
    }

    /// Time to live.
    pub fn ttl(&self) -> u8 {
        self.buffer.as_ref()[8]
    }

    /// The transport protocol number.
    pub fn protocol(&self) -> u8 {
        self.buffer.as_ref()[9]
    }

    /// Source address.
    pub fn src(&self) -> Ipv4Addr {
        let d = self.buffer.as_ref();
        Ipv4Addr::new(d[12], d[13], d[14], d[15])
    }

    /// Destination address.
    pub fn dst(&self) -> Ipv4Addr {
        let d = self.buffer.as_ref();
        Ipv4Addr::new(d[16], d[17], d[18], d[19])
    }

    /// Whether this packet is a fragment other than the first (no transport header in it).
    pub fn is_later_fragment(&self) -> bool {
        let d = self.buffer.as_ref();
        u16::from_be_bytes([d[6], d[7]]) & 0x1fff != 0
    }

    /// The bytes after the header, up to the total length.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[self.header_len()..self.total_len()]
    }

    /// Whether the header checksum is right.
    pub fn checksum_ok(&self) -> bool {
        checksum(&self.buffer.as_ref()[..self.header_len()]) == 0
    }
}

/// The Internet checksum (RFC 1071) of `data`: the one's complement of the one's complement sum.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 28-byte ICMP echo request from 10.1.0.2 to 10.1.0.3.
    pub(crate) fn ping() -> Vec<u8> {
        let mut p = vec![
            0x45, 0x00, 0x00, 0x1c, 0x12, 0x34, 0x40, 0x00, 0x40, 0x01, 0x00, 0x00, 10, 1, 0, 2,
            10, 1, 0, 3, 8, 0, 0xf7, 0xfe, 0x00, 0x01, 0x00, 0x00,
        ];
        let c = checksum(&p[..20]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p
    }

    #[test]
    fn reads_fields() {
        let p = ping();
        let v = Ipv4View::new_checked(&p[..]).expect("valid");
        assert_eq!(v.header_len(), 20);
        assert_eq!(v.total_len(), 28);
        assert_eq!(v.protocol(), PROTO_ICMP);
        assert_eq!(v.src(), Ipv4Addr::new(10, 1, 0, 2));
        assert_eq!(v.dst(), Ipv4Addr::new(10, 1, 0, 3));
        assert_eq!(v.payload().len(), 8);
        assert!(v.checksum_ok());
        assert!(!v.is_later_fragment());
    }

    #[test]
    fn rejects_malformed() {
        let p = ping();
        assert_eq!(
            Ipv4View::new_checked(&p[..19]).err(),
            Some(WireError::Truncated)
        );
        assert_eq!(
            Ipv4View::new_checked(&p[..27]).err(),
            Some(WireError::Truncated)
        );
        let mut v6 = p.clone();
        v6[0] = 0x65;
        assert_eq!(
            Ipv4View::new_checked(&v6[..]).err(),
            Some(WireError::NotIpv4)
        );
        let mut short_ihl = p.clone();
        short_ihl[0] = 0x44;
        assert_eq!(
            Ipv4View::new_checked(&short_ihl[..]).err(),
            Some(WireError::NotIpv4)
        );
        let mut short_total = p;
        short_total[2..4].copy_from_slice(&10u16.to_be_bytes());
        assert_eq!(
            Ipv4View::new_checked(&short_total[..]).err(),
            Some(WireError::NotIpv4)
        );
    }
}
