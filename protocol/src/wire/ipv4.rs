//! IPv4 headers (RFC 791), viewed on as few bytes as the header itself: the data path sees only
//! the first bytes of a guest's descriptor chain, so [`Packet::new_checked`] checks that the
//! *header* is there and consistent, and [`Packet::check_len`] separately checks the total
//! length against how long the packet really is.
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |Version|  IHL  |   DSCP/ECN    |          Total Length         |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |         Identification        |Flags|     Fragment Offset     |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |  Time to Live |    Protocol   |         Header Checksum       |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                       Source Address                          |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                    Destination Address                        |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                    Options (IHL > 5) ...                      |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```

use std::net::Ipv4Addr;

use super::arp::ipv4;
use super::{checksum, field_u16, set_field_u16, WireError};

/// Smallest header (no options).
pub const MIN_HEADER_LEN: usize = 20;
/// Largest header (IHL 15).
pub const MAX_HEADER_LEN: usize = 60;
/// Default TTL of packets vnp generates.
pub const DEFAULT_TTL: u8 = 64;

/// IP protocol numbers vnp looks at.
pub mod protocol {
    /// ICMP.
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
}
/// IP protocol number of TCP (alias of [`protocol::TCP`]).
pub const PROTO_TCP: u8 = protocol::TCP;
/// IP protocol number of UDP (alias of [`protocol::UDP`]).
pub const PROTO_UDP: u8 = protocol::UDP;
/// IP protocol number of ICMP (alias of [`protocol::ICMP`]).
pub const PROTO_ICMP: u8 = protocol::ICMP;

/// The one checksum implementation, re-exported where IPv4 users look for it.
pub use super::checksum::checksum;

mod field {
    use core::ops::Range;
    pub const VER_IHL: usize = 0;
    pub const DSCP_ECN: usize = 1;
    pub const LENGTH: Range<usize> = 2..4;
    pub const IDENT: Range<usize> = 4..6;
    pub const FLG_OFF: Range<usize> = 6..8;
    pub const TTL: usize = 8;
    pub const PROTOCOL: usize = 9;
    pub const CHECKSUM: Range<usize> = 10..12;
    pub const SRC_ADDR: Range<usize> = 12..16;
    pub const DST_ADDR: Range<usize> = 16..20;
}

/// Flags field: don't fragment.
const FLAG_DF: u16 = 0x4000;
/// Flags field: more fragments.
const FLAG_MF: u16 = 0x2000;
/// Fragment offset (in 8-byte units) mask.
const OFFSET_MASK: u16 = 0x1fff;

/// A view of an IPv4 packet, or of a prefix holding at least its header.
#[derive(Debug, Clone, Copy)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps a buffer without checking it; accessors panic if it is shorter than
    /// [`MIN_HEADER_LEN`] (or than the header length for options and payload).
    pub const fn new_unchecked(buffer: T) -> Self {
        Self { buffer }
    }

    /// Wraps a buffer after checking the header: at least 20 bytes, version 4, IHL at least 5,
    /// the whole header (options included) present, and a total length that covers the header.
    /// The payload may be missing (a header-only prefix): see [`Packet::check_len`].
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        let packet = Self::new_unchecked(buffer);
        let len = packet.buffer.as_ref().len();
        if len < MIN_HEADER_LEN {
            return Err(WireError::Truncated);
        }
        let header_len = packet.header_len();
        if packet.version() != 4 || header_len < MIN_HEADER_LEN || packet.total_len() < header_len {
            return Err(WireError::NotIpv4);
        }
        if len < header_len {
            return Err(WireError::Truncated);
        }
        Ok(packet)
    }

    /// Checks that a packet `available` bytes long (the prefix may be shorter) holds the whole
    /// total length. Bytes beyond it (Ethernet padding, VNP options) are not the packet's.
    pub fn check_len(&self, available: usize) -> Result<(), WireError> {
        if self.total_len() > available {
            return Err(WireError::Truncated);
        }
        Ok(())
    }

    /// Releases the buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// Version (4).
    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[field::VER_IHL] >> 4
    }

    /// Header length in bytes (IHL × 4).
    pub fn header_len(&self) -> usize {
        usize::from(self.buffer.as_ref()[field::VER_IHL] & 0x0f) * 4
    }

    /// DSCP and ECN (the old type-of-service byte).
    pub fn dscp_ecn(&self) -> u8 {
        self.buffer.as_ref()[field::DSCP_ECN]
    }

    /// Total length of the packet in bytes, header included.
    pub fn total_len(&self) -> usize {
        usize::from(field_u16(self.buffer.as_ref(), field::LENGTH))
    }

    /// Identification (groups the fragments of one datagram).
    pub fn ident(&self) -> u16 {
        field_u16(self.buffer.as_ref(), field::IDENT)
    }

    fn flags_offset(&self) -> u16 {
        field_u16(self.buffer.as_ref(), field::FLG_OFF)
    }

    /// Don't-fragment flag: a router must not fragment it, and answers an oversize one with
    /// ICMP "fragmentation needed" instead.
    pub fn dont_frag(&self) -> bool {
        self.flags_offset() & FLAG_DF != 0
    }

    /// More-fragments flag.
    pub fn more_frags(&self) -> bool {
        self.flags_offset() & FLAG_MF != 0
    }

    /// Fragment offset in bytes.
    pub fn frag_offset(&self) -> usize {
        usize::from(self.flags_offset() & OFFSET_MASK) * 8
    }

    /// Whether this is a fragment at all (more fragments follow, or not the first).
    pub fn is_fragment(&self) -> bool {
        self.more_frags() || self.frag_offset() != 0
    }

    /// Whether this is a fragment other than the first (no transport header in it).
    pub fn is_later_fragment(&self) -> bool {
        self.frag_offset() != 0
    }

    /// Time to live.
    pub fn ttl(&self) -> u8 {
        self.buffer.as_ref()[field::TTL]
    }

    /// The transport protocol number (see [`protocol`]).
    pub fn protocol(&self) -> u8 {
        self.buffer.as_ref()[field::PROTOCOL]
    }

    /// The header checksum field as written.
    pub fn header_checksum(&self) -> u16 {
        field_u16(self.buffer.as_ref(), field::CHECKSUM)
    }

    /// Source address.
    pub fn src_addr(&self) -> Ipv4Addr {
        ipv4(&self.buffer.as_ref()[field::SRC_ADDR])
    }

    /// Destination address.
    pub fn dst_addr(&self) -> Ipv4Addr {
        ipv4(&self.buffer.as_ref()[field::DST_ADDR])
    }

    /// The header bytes, options included.
    pub fn header(&self) -> &[u8] {
        &self.buffer.as_ref()[..self.header_len()]
    }

    /// Whether the header checksum is right.
    pub fn verify_checksum(&self) -> bool {
        checksum::checksum(self.header()) == 0
    }

    /// The bytes after the header, up to the total length or the end of the buffer, whichever
    /// comes first (a prefix yields the start of the payload).
    pub fn payload(&self) -> &[u8] {
        let data = self.buffer.as_ref();
        let end = self.total_len().min(data.len());
        &data[self.header_len()..end.max(self.header_len())]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Sets version 4 and the header length in bytes (a multiple of 4, 20..=60).
    pub fn set_version_and_header_len(&mut self, header_len: usize) {
        self.buffer.as_mut()[field::VER_IHL] = 0x40 | ((header_len / 4) as u8 & 0x0f);
    }

    /// Sets DSCP and ECN.
    pub fn set_dscp_ecn(&mut self, value: u8) {
        self.buffer.as_mut()[field::DSCP_ECN] = value;
    }

    /// Sets the total length.
    pub fn set_total_len(&mut self, len: u16) {
        set_field_u16(self.buffer.as_mut(), field::LENGTH, len);
    }

    /// Sets the identification.
    pub fn set_ident(&mut self, ident: u16) {
        set_field_u16(self.buffer.as_mut(), field::IDENT, ident);
    }

    /// Sets the flags and fragment offset: don't fragment or not, no fragmentation.
    pub fn set_unfragmented(&mut self, dont_frag: bool) {
        let value = if dont_frag { FLAG_DF } else { 0 };
        set_field_u16(self.buffer.as_mut(), field::FLG_OFF, value);
    }

    /// Sets the time to live.
    pub fn set_ttl(&mut self, ttl: u8) {
        self.buffer.as_mut()[field::TTL] = ttl;
    }

    /// Sets the transport protocol.
    pub fn set_protocol(&mut self, protocol: u8) {
        self.buffer.as_mut()[field::PROTOCOL] = protocol;
    }

    /// Sets the header checksum field.
    pub fn set_header_checksum(&mut self, value: u16) {
        set_field_u16(self.buffer.as_mut(), field::CHECKSUM, value);
    }

    /// Sets the source address.
    pub fn set_src_addr(&mut self, addr: Ipv4Addr) {
        self.buffer.as_mut()[field::SRC_ADDR].copy_from_slice(&addr.octets());
    }

    /// Sets the destination address.
    pub fn set_dst_addr(&mut self, addr: Ipv4Addr) {
        self.buffer.as_mut()[field::DST_ADDR].copy_from_slice(&addr.octets());
    }

    /// Computes and writes the header checksum.
    pub fn fill_checksum(&mut self) {
        self.set_header_checksum(0);
        let value = checksum::checksum(self.header());
        self.set_header_checksum(value);
    }

    /// The payload (as [`Packet::payload`]), mutable.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let header_len = self.header_len();
        let end = self.total_len().min(self.buffer.as_ref().len());
        &mut self.buffer.as_mut()[header_len..end.max(header_len)]
    }
}

/// The fields of an option-less IPv4 header vnp writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr {
    /// Source address.
    pub src_addr: Ipv4Addr,
    /// Destination address.
    pub dst_addr: Ipv4Addr,
    /// Transport protocol.
    pub protocol: u8,
    /// Payload length (the total length is 20 more).
    pub payload_len: usize,
    /// Time to live.
    pub ttl: u8,
}

impl Repr {
    /// Writes a 20-byte header (identification 0, not fragmented, DF clear) with its checksum
    /// into the start of `buffer` (at least 20 bytes).
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut Packet<T>) {
        packet.set_version_and_header_len(MIN_HEADER_LEN);
        packet.set_dscp_ecn(0);
        packet.set_total_len((MIN_HEADER_LEN + self.payload_len) as u16);
        packet.set_ident(0);
        packet.set_unfragmented(false);
        packet.set_ttl(self.ttl);
        packet.set_protocol(self.protocol);
        packet.set_src_addr(self.src_addr);
        packet.set_dst_addr(self.dst_addr);
        packet.fill_checksum();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A 28-byte ICMP echo request from 10.1.0.2 to 10.1.0.3 (header checksum filled).
    pub(crate) fn ping() -> Vec<u8> {
        let mut p = vec![
            0x45, 0x00, 0x00, 0x1c, 0x12, 0x34, 0x40, 0x00, 0x40, 0x01, 0x00, 0x00, 10, 1, 0, 2,
            10, 1, 0, 3, 8, 0, 0xf7, 0xfe, 0x00, 0x01, 0x00, 0x00,
        ];
        Packet::new_unchecked(&mut p[..]).fill_checksum();
        p
    }

    #[test]
    fn reads_fields() {
        let p = ping();
        let v = Packet::new_checked(&p[..]).expect("valid");
        assert_eq!(v.header_len(), 20);
        assert_eq!(v.total_len(), 28);
        assert_eq!(v.protocol(), protocol::ICMP);
        assert_eq!(v.src_addr(), Ipv4Addr::new(10, 1, 0, 2));
        assert_eq!(v.dst_addr(), Ipv4Addr::new(10, 1, 0, 3));
        assert_eq!(v.ident(), 0x1234);
        assert_eq!(v.ttl(), 64);
        assert!(v.dont_frag() && !v.more_frags() && !v.is_fragment());
        assert_eq!(v.payload().len(), 8);
        assert!(v.verify_checksum());
        assert_eq!(v.check_len(28), Ok(()));
        assert_eq!(v.check_len(27), Err(WireError::Truncated));
    }

    #[test]
    fn header_only_prefix_is_enough() {
        let mut p = ping();
        p[2..4].copy_from_slice(&1400u16.to_be_bytes());
        // Only the header and 4 payload bytes are in hand: still a valid header.
        let v = Packet::new_checked(&p[..24]).expect("header fits");
        assert_eq!(v.total_len(), 1400);
        assert_eq!(v.payload(), &p[20..24]);
        assert_eq!(v.check_len(1399), Err(WireError::Truncated));
        assert_eq!(v.check_len(1400), Ok(()));
    }

    #[test]
    fn rejects_malformed() {
        let p = ping();
        assert_eq!(
            Packet::new_checked(&p[..19]).err(),
            Some(WireError::Truncated)
        );
        let mut v6 = p.clone();
        v6[0] = 0x65;
        assert_eq!(Packet::new_checked(&v6[..]).err(), Some(WireError::NotIpv4));
        let mut short_ihl = p.clone();
        short_ihl[0] = 0x44;
        assert_eq!(
            Packet::new_checked(&short_ihl[..]).err(),
            Some(WireError::NotIpv4)
        );
        let mut options = p.clone();
        options[0] = 0x47; // 28-byte header: in the buffer, but the total length is 28
        assert!(Packet::new_checked(&options[..]).is_ok());
        assert_eq!(
            Packet::new_checked(&options[..24]).err(),
            Some(WireError::Truncated)
        );
        let mut short_total = p;
        short_total[2..4].copy_from_slice(&10u16.to_be_bytes());
        assert_eq!(
            Packet::new_checked(&short_total[..]).err(),
            Some(WireError::NotIpv4)
        );
    }

    #[test]
    fn fragments() {
        let mut p = ping();
        p[6..8].copy_from_slice(&0x2000u16.to_be_bytes());
        let v = Packet::new_checked(&p[..]).unwrap();
        assert!(v.is_fragment() && v.more_frags() && !v.is_later_fragment());
        p[6..8].copy_from_slice(&0x0001u16.to_be_bytes());
        let v = Packet::new_checked(&p[..]).unwrap();
        assert!(v.is_later_fragment() && !v.dont_frag());
        assert_eq!(v.frag_offset(), 8);
    }

    #[test]
    fn repr_emits_a_valid_header() {
        let mut buf = [0u8; 28];
        let repr = Repr {
            src_addr: Ipv4Addr::new(10, 0, 0, 1),
            dst_addr: Ipv4Addr::new(10, 0, 0, 2),
            protocol: protocol::UDP,
            payload_len: 8,
            ttl: DEFAULT_TTL,
        };
        repr.emit(&mut Packet::new_unchecked(&mut buf[..]));
        let v = Packet::new_checked(&buf[..]).unwrap();
        assert!(v.verify_checksum());
        assert_eq!(
            (v.src_addr(), v.dst_addr(), v.protocol(), v.total_len()),
            (repr.src_addr, repr.dst_addr, 17, 28)
        );
        assert!(!v.dont_frag());
    }
}
