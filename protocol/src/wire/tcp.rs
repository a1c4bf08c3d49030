//! TCP headers (RFC 9293), viewed on a prefix: the data path and NAT read and rewrite ports and
//! the checksum, never the stream.
//!
//! ```text
//! +---------------+---------------+-------------------------------+
//! |  src port (2) |  dst port (2) |        sequence number (4)    |
//! +---------------+---------------+-------------------------------+
//! |     acknowledgment number (4) |off|rsv|flags| window (2)      |
//! +-------------------------------+-------------------------------+
//! |     checksum (2) | urgent pointer (2) | options ... | data ...  |
//! +-------------------------------+-------------------------------+
//! ```

use std::net::Ipv4Addr;

use super::ipv4::protocol;
use super::{checksum, field_u16, field_u32, set_field_u16, WireError};

/// Smallest header (no options).
pub const MIN_HEADER_LEN: usize = 20;

/// Flag bits of the flags byte.
pub mod flags {
    /// No more data from sender.
    pub const FIN: u8 = 0x01;
    /// Synchronize sequence numbers.
    pub const SYN: u8 = 0x02;
    /// Reset the connection.
    pub const RST: u8 = 0x04;
    /// Push.
    pub const PSH: u8 = 0x08;
    /// Acknowledgment field significant.
    pub const ACK: u8 = 0x10;
    /// Urgent pointer field significant.
    pub const URG: u8 = 0x20;
    /// ECN-Echo (RFC 3168).
    pub const ECE: u8 = 0x40;
    /// Congestion Window Reduced (RFC 3168).
    pub const CWR: u8 = 0x80;
}

mod field {
    use core::ops::Range;
    pub const SRC_PORT: Range<usize> = 0..2;
    pub const DST_PORT: Range<usize> = 2..4;
    pub const SEQ_NUM: Range<usize> = 4..8;
    pub const ACK_NUM: Range<usize> = 8..12;
    pub const DATA_OFF: usize = 12;
    pub const FLAGS: usize = 13;
    pub const WIN_SIZE: Range<usize> = 14..16;
    pub const CHECKSUM: Range<usize> = 16..18;
    pub const URGENT: Range<usize> = 18..20;
}

/// A view of a TCP segment, or of a prefix holding at least its header.
#[derive(Debug, Clone, Copy)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps a buffer without checking it; accessors panic if it is shorter than
    /// [`MIN_HEADER_LEN`] (or the header length, for options and payload).
    pub const fn new_unchecked(buffer: T) -> Self {
        Self { buffer }
    }

    /// Wraps a buffer that holds the whole header (options included) with a data offset of at
    /// least 5 words. The payload may be missing.
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        let packet = Self::new_unchecked(buffer);
        let len = packet.buffer.as_ref().len();
        if len < MIN_HEADER_LEN {
            return Err(WireError::Truncated);
        }
        if packet.header_len() < MIN_HEADER_LEN {
            return Err(WireError::Malformed);
        }
        if len < packet.header_len() {
            return Err(WireError::Truncated);
        }
        Ok(packet)
    }

    /// Source port.
    pub fn src_port(&self) -> u16 {
        field_u16(self.buffer.as_ref(), field::SRC_PORT)
    }

    /// Destination port.
    pub fn dst_port(&self) -> u16 {
        field_u16(self.buffer.as_ref(), field::DST_PORT)
    }

    /// Sequence number.
    pub fn seq_number(&self) -> u32 {
        field_u32(self.buffer.as_ref(), field::SEQ_NUM)
    }

    /// Acknowledgment number.
    pub fn ack_number(&self) -> u32 {
        field_u32(self.buffer.as_ref(), field::ACK_NUM)
    }

    /// Header length in bytes (data offset × 4).
    pub fn header_len(&self) -> usize {
        usize::from(self.buffer.as_ref()[field::DATA_OFF] >> 4) * 4
    }

    /// The flags byte (see [`flags`]).
    pub fn flags(&self) -> u8 {
        self.buffer.as_ref()[field::FLAGS]
    }

    /// Receive window.
    pub fn window_len(&self) -> u16 {
        field_u16(self.buffer.as_ref(), field::WIN_SIZE)
    }

    /// The checksum field.
    pub fn stored_checksum(&self) -> u16 {
        field_u16(self.buffer.as_ref(), field::CHECKSUM)
    }

    /// Urgent pointer.
    pub fn urgent_at(&self) -> u16 {
        field_u16(self.buffer.as_ref(), field::URGENT)
    }

    /// Option bytes.
    pub fn options(&self) -> &[u8] {
        &self.buffer.as_ref()[MIN_HEADER_LEN..self.header_len()]
    }

    /// The bytes after the header that are in the buffer.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[self.header_len()..]
    }

    /// Whether the checksum over the pseudo header and the whole segment (the entire buffer)
    /// verifies.
    pub fn verify_checksum(&self, src: Ipv4Addr, dst: Ipv4Addr) -> bool {
        let data = self.buffer.as_ref();
        let pseudo = checksum::pseudo_header(src, dst, protocol::TCP, data.len() as u16);
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

    /// Sets the sequence number.
    pub fn set_seq_number(&mut self, value: u32) {
        self.buffer.as_mut()[field::SEQ_NUM].copy_from_slice(&value.to_be_bytes());
    }

    /// Sets the acknowledgment number.
    pub fn set_ack_number(&mut self, value: u32) {
        self.buffer.as_mut()[field::ACK_NUM].copy_from_slice(&value.to_be_bytes());
    }

    /// Sets the header length in bytes (a multiple of 4, 20..=60).
    pub fn set_header_len(&mut self, len: usize) {
        self.buffer.as_mut()[field::DATA_OFF] = ((len / 4) as u8) << 4;
    }

    /// Sets the flags byte.
    pub fn set_flags(&mut self, value: u8) {
        self.buffer.as_mut()[field::FLAGS] = value;
    }

    /// Sets the receive window.
    pub fn set_window_len(&mut self, value: u16) {
        set_field_u16(self.buffer.as_mut(), field::WIN_SIZE, value);
    }

    /// Sets the checksum field.
    pub fn set_stored_checksum(&mut self, value: u16) {
        set_field_u16(self.buffer.as_mut(), field::CHECKSUM, value);
    }

    /// Sets the urgent pointer.
    pub fn set_urgent_at(&mut self, value: u16) {
        set_field_u16(self.buffer.as_mut(), field::URGENT, value);
    }

    /// Computes the checksum over the pseudo header and the whole buffer (the segment) and
    /// writes it.
    pub fn fill_checksum(&mut self, src: Ipv4Addr, dst: Ipv4Addr) {
        self.set_stored_checksum(0);
        let data = self.buffer.as_ref();
        let pseudo = checksum::pseudo_header(src, dst, protocol::TCP, data.len() as u16);
        let value = !checksum::combine(&[pseudo, checksum::sum(data)]);
        self.set_stored_checksum(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::checksum::update_u16;

    fn syn() -> Vec<u8> {
        let mut buf = vec![0u8; 24];
        let mut p = Packet::new_unchecked(&mut buf[..]);
        p.set_src_port(40000);
        p.set_dst_port(80);
        p.set_seq_number(0x0102_0304);
        p.set_ack_number(0);
        p.set_header_len(24);
        p.set_flags(flags::SYN);
        p.set_window_len(64240);
        p.set_urgent_at(0);
        buf[20..24].copy_from_slice(&[2, 4, 0x05, 0xb4]); // MSS 1460
        buf
    }

    #[test]
    fn round_trip_and_nat_style_port_rewrite() {
        let src = Ipv4Addr::new(10, 0, 0, 2);
        let dst = Ipv4Addr::new(10, 0, 0, 3);
        let mut buf = syn();
        Packet::new_unchecked(&mut buf[..]).fill_checksum(src, dst);
        let p = Packet::new_checked(&buf[..]).unwrap();
        assert_eq!((p.src_port(), p.dst_port()), (40000, 80));
        assert_eq!(p.seq_number(), 0x0102_0304);
        assert_eq!(p.header_len(), 24);
        assert_eq!(p.options(), &[2, 4, 0x05, 0xb4]);
        assert_eq!(p.flags(), flags::SYN);
        assert_eq!(p.window_len(), 64240);
        assert!(p.payload().is_empty());
        assert!(p.verify_checksum(src, dst));
        // Rewrite the source port the way NAT will: incremental checksum update.
        let old = p.stored_checksum();
        let mut p = Packet::new_unchecked(&mut buf[..]);
        p.set_src_port(61000);
        p.set_stored_checksum(update_u16(old, 40000, 61000));
        assert!(Packet::new_checked(&buf[..])
            .unwrap()
            .verify_checksum(src, dst));
    }

    #[test]
    fn rejects_bad_offsets() {
        let buf = syn();
        assert_eq!(
            Packet::new_checked(&buf[..22]).err(),
            Some(WireError::Truncated)
        );
        let mut short = buf.clone();
        short[12] = 0x40;
        assert_eq!(
            Packet::new_checked(&short[..]).err(),
            Some(WireError::Malformed)
        );
    }
}
