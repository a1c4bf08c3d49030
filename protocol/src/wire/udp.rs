//! UDP headers (RFC 768).
//!
//! ```text
//! +----------------+----------------+----------------+----------------+
//! | src port (2)   | dst port (2)   | length (2)     | checksum (2)   |  payload ...
//! +----------------+----------------+----------------+----------------+
//! ```

use std::net::Ipv4Addr;

use super::ipv4::protocol;
use super::{checksum, field_u16, set_field_u16, WireError};

/// Length of the header.
pub const HEADER_LEN: usize = 8;

mod field {
    use core::ops::Range;
    pub const SRC_PORT: Range<usize> = 0..2;
    pub const DST_PORT: Range<usize> = 2..4;
    pub const LENGTH: Range<usize> = 4..6;
    pub const CHECKSUM: Range<usize> = 6..8;
}

/// A view of a UDP datagram, or of a prefix holding at least its header.
#[derive(Debug, Clone, Copy)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps a buffer without checking it; accessors panic if it is shorter than
    /// [`HEADER_LEN`].
    pub const fn new_unchecked(buffer: T) -> Self {
        Self { buffer }
    }

    /// Wraps a buffer that holds the 8-byte header (the payload may be missing: see
    /// [`Packet::check_len`]).
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        if buffer.as_ref().len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        Ok(Self { buffer })
    }

    /// Checks the length field against the `available` bytes of the IP payload: it covers the
    /// header and does not run past them.
    pub fn check_len(&self, available: usize) -> Result<(), WireError> {
        let len = self.len();
        if len < HEADER_LEN {
            return Err(WireError::Malformed);
        }
        if len > available {
            return Err(WireError::Truncated);
        }
        Ok(())
    }

    /// Source port.
    pub fn src_port(&self) -> u16 {
        field_u16(self.buffer.as_ref(), field::SRC_PORT)
    }

    /// Destination port.
    pub fn dst_port(&self) -> u16 {
        field_u16(self.buffer.as_ref(), field::DST_PORT)
    }

    /// Length of header and payload.
    pub fn len(&self) -> usize {
        usize::from(field_u16(self.buffer.as_ref(), field::LENGTH))
    }

    /// Whether the length field says there is no payload.
    pub fn is_empty(&self) -> bool {
        self.len() <= HEADER_LEN
    }

    /// The checksum field (0: none was computed).
    pub fn stored_checksum(&self) -> u16 {
        field_u16(self.buffer.as_ref(), field::CHECKSUM)
    }

    /// The payload up to the length field or the end of the buffer, whichever comes first.
    pub fn payload(&self) -> &[u8] {
        let data = self.buffer.as_ref();
        &data[HEADER_LEN..self.len().clamp(HEADER_LEN, data.len())]
    }

    /// Whether the checksum over the pseudo header and the whole datagram verifies (a zero
    /// field means "not computed" and passes). Needs the whole datagram in the buffer.
    pub fn verify_checksum(&self, src: Ipv4Addr, dst: Ipv4Addr) -> bool {
        if self.stored_checksum() == 0 {
            return true;
        }
        let data = &self.buffer.as_ref()[..self.len().min(self.buffer.as_ref().len())];
        let pseudo = checksum::pseudo_header(src, dst, protocol::UDP, self.len() as u16);
        checksum::combine(&[pseudo, checksum::sum(data)]) == 0xffff
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Sets the source port.
    pub fn set_src_port(&mut self, port: u16) {
        set_field_u16(self.buffer.as_mut(), field::SRC_PORT, port);
    }

    /// Sets the destination port.
    pub fn set_dst_port(&mut self, port: u16) {
        set_field_u16(self.buffer.as_mut(), field::DST_PORT, port);
    }

    /// Sets the length field.
    pub fn set_len(&mut self, len: u16) {
        set_field_u16(self.buffer.as_mut(), field::LENGTH, len);
    }

    /// Sets the checksum field.
    pub fn set_stored_checksum(&mut self, value: u16) {
        set_field_u16(self.buffer.as_mut(), field::CHECKSUM, value);
    }

    /// Computes the checksum over the pseudo header and the datagram (`len()` bytes, which
    /// must be in the buffer) and writes it; a computed 0 is sent as `0xffff`, since 0 means
    /// "no checksum" in UDP over IPv4.
    pub fn fill_checksum(&mut self, src: Ipv4Addr, dst: Ipv4Addr) {
        self.set_stored_checksum(0);
        let len = self.len();
        let pseudo = checksum::pseudo_header(src, dst, protocol::UDP, len as u16);
        let value = !checksum::combine(&[pseudo, checksum::sum(&self.buffer.as_ref()[..len])]);
        self.set_stored_checksum(if value == 0 { 0xffff } else { value });
    }

    /// The payload (as [`Packet::payload`]), mutable.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let end = self.len().clamp(HEADER_LEN, self.buffer.as_ref().len());
        &mut self.buffer.as_mut()[HEADER_LEN..end]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_checksum() {
        let src = Ipv4Addr::new(10, 0, 0, 1);
        let dst = Ipv4Addr::new(10, 0, 0, 2);
        let mut buf = [0u8; 13];
        let mut p = Packet::new_checked(&mut buf[..]).unwrap();
        p.set_src_port(67);
        p.set_dst_port(68);
        p.set_len(13);
        p.payload_mut().copy_from_slice(b"hello");
        p.fill_checksum(src, dst);
        let p = Packet::new_checked(&buf[..]).unwrap();
        assert_eq!((p.src_port(), p.dst_port(), p.len()), (67, 68, 13));
        assert_eq!(p.payload(), b"hello");
        assert!(p.verify_checksum(src, dst));
        assert!(!p.verify_checksum(src, Ipv4Addr::new(10, 0, 0, 3)));
        assert_eq!(p.check_len(13), Ok(()));
        assert_eq!(p.check_len(12), Err(WireError::Truncated));
    }

    #[test]
    fn length_checks() {
        let mut buf = [0u8; 8];
        Packet::new_unchecked(&mut buf[..]).set_len(4);
        let p = Packet::new_checked(&buf[..]).unwrap();
        assert_eq!(p.check_len(8), Err(WireError::Malformed));
        assert!(p.payload().is_empty());
        assert_eq!(
            Packet::new_checked(&buf[..7]).err(),
            Some(WireError::Truncated)
        );
    }
}
