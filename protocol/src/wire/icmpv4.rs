//! ICMP for IPv4 (RFC 792, RFC 1191 for the next-hop MTU).
//!
//! ```text
//! +----------+----------+---------------------+
//! | type (1) | code (1) |    checksum (2)     |
//! +----------+----------+---------------------+
//! |   rest of header (4): echo identifier and  |
//! |   sequence number, or unused + next-hop MTU |
//! +--------------------------------------------+
//! |   data: echo payload, or the offending      |
//! |   packet's IPv4 header + first 8 bytes      |
//! +--------------------------------------------+
//! ```

use super::{checksum, field_u16, set_field_u16, WireError};

/// Length of the header (type, code, checksum and the 4 type-specific bytes).
pub const HEADER_LEN: usize = 8;

/// Message types vnp reads or writes.
pub mod msg_type {
    /// Echo reply.
    pub const ECHO_REPLY: u8 = 0;
    /// Destination unreachable.
    pub const DST_UNREACHABLE: u8 = 3;
    /// Source quench (deprecated, still an error message).
    pub const SOURCE_QUENCH: u8 = 4;
    /// Redirect.
    pub const REDIRECT: u8 = 5;
    /// Echo request.
    pub const ECHO_REQUEST: u8 = 8;
    /// Time exceeded.
    pub const TIME_EXCEEDED: u8 = 11;
    /// Parameter problem.
    pub const PARAM_PROBLEM: u8 = 12;

    /// Whether a type is an error message, which must never be answered with another error
    /// (RFC 1812 4.3.2.7).
    pub const fn is_error(t: u8) -> bool {
        matches!(
            t,
            DST_UNREACHABLE | SOURCE_QUENCH | REDIRECT | TIME_EXCEEDED | PARAM_PROBLEM
        )
    }
}

/// Code of destination unreachable: fragmentation needed and DF set.
pub const CODE_FRAG_NEEDED: u8 = 4;

mod field {
    use core::ops::Range;
    pub const TYPE: usize = 0;
    pub const CODE: usize = 1;
    pub const CHECKSUM: Range<usize> = 2..4;
    pub const ECHO_IDENT: Range<usize> = 4..6;
    pub const ECHO_SEQNO: Range<usize> = 6..8;
    pub const UNUSED: Range<usize> = 4..6;
    pub const MTU: Range<usize> = 6..8;
    pub const DATA: usize = 8;
}

/// A view of an ICMP message (the IPv4 payload).
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

    /// Wraps a buffer that holds the 8-byte header.
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        if buffer.as_ref().len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        Ok(Self { buffer })
    }

    /// Message type (see [`msg_type`]).
    pub fn msg_type(&self) -> u8 {
        self.buffer.as_ref()[field::TYPE]
    }

    /// Message code.
    pub fn msg_code(&self) -> u8 {
        self.buffer.as_ref()[field::CODE]
    }

    /// The checksum field.
    pub fn stored_checksum(&self) -> u16 {
        field_u16(self.buffer.as_ref(), field::CHECKSUM)
    }

    /// Echo identifier (echo request/reply).
    pub fn echo_ident(&self) -> u16 {
        field_u16(self.buffer.as_ref(), field::ECHO_IDENT)
    }

    /// Echo sequence number (echo request/reply).
    pub fn echo_seq_no(&self) -> u16 {
        field_u16(self.buffer.as_ref(), field::ECHO_SEQNO)
    }

    /// Next-hop MTU (destination unreachable, fragmentation needed; RFC 1191).
    pub fn next_hop_mtu(&self) -> u16 {
        field_u16(self.buffer.as_ref(), field::MTU)
    }

    /// The data after the header: echo payload, or the quoted packet of an error.
    pub fn data(&self) -> &[u8] {
        &self.buffer.as_ref()[field::DATA..]
    }

    /// Whether the checksum over the whole buffer (the message) verifies.
    pub fn verify_checksum(&self) -> bool {
        checksum::checksum(self.buffer.as_ref()) == 0
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Sets the message type.
    pub fn set_msg_type(&mut self, value: u8) {
        self.buffer.as_mut()[field::TYPE] = value;
    }

    /// Sets the message code.
    pub fn set_msg_code(&mut self, value: u8) {
        self.buffer.as_mut()[field::CODE] = value;
    }

    /// Sets the checksum field.
    pub fn set_stored_checksum(&mut self, value: u16) {
        set_field_u16(self.buffer.as_mut(), field::CHECKSUM, value);
    }

    /// Sets the echo identifier.
    pub fn set_echo_ident(&mut self, value: u16) {
        set_field_u16(self.buffer.as_mut(), field::ECHO_IDENT, value);
    }

    /// Sets the echo sequence number.
    pub fn set_echo_seq_no(&mut self, value: u16) {
        set_field_u16(self.buffer.as_mut(), field::ECHO_SEQNO, value);
    }

    /// Sets the unused word and the next-hop MTU of a "fragmentation needed".
    pub fn set_next_hop_mtu(&mut self, mtu: u16) {
        set_field_u16(self.buffer.as_mut(), field::UNUSED, 0);
        set_field_u16(self.buffer.as_mut(), field::MTU, mtu);
    }

    /// The data, mutable.
    pub fn data_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[field::DATA..]
    }

    /// Computes the checksum over the whole buffer and writes it.
    pub fn fill_checksum(&mut self) {
        self.set_stored_checksum(0);
        let value = checksum::checksum(self.buffer.as_ref());
        self.set_stored_checksum(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_round_trip() {
        let mut buf = [0u8; 12];
        let mut p = Packet::new_checked(&mut buf[..]).unwrap();
        p.set_msg_type(msg_type::ECHO_REQUEST);
        p.set_msg_code(0);
        p.set_echo_ident(0x4242);
        p.set_echo_seq_no(7);
        p.data_mut().copy_from_slice(b"ping");
        p.fill_checksum();
        let p = Packet::new_checked(&buf[..]).unwrap();
        assert_eq!((p.msg_type(), p.msg_code()), (8, 0));
        assert_eq!((p.echo_ident(), p.echo_seq_no()), (0x4242, 7));
        assert_eq!(p.data(), b"ping");
        assert!(p.verify_checksum());
        assert_eq!(
            Packet::new_checked(&buf[..7]).err(),
            Some(WireError::Truncated)
        );
    }

    #[test]
    fn frag_needed_fields() {
        let mut buf = [0xaau8; 8];
        let mut p = Packet::new_unchecked(&mut buf[..]);
        p.set_msg_type(msg_type::DST_UNREACHABLE);
        p.set_msg_code(CODE_FRAG_NEEDED);
        p.set_next_hop_mtu(1452);
        p.fill_checksum();
        assert_eq!(&buf[4..8], &[0, 0, 0x05, 0xac]);
        let p = Packet::new_unchecked(&buf[..]);
        assert_eq!(p.next_hop_mtu(), 1452);
        assert!(p.verify_checksum());
        assert!(msg_type::is_error(p.msg_type()));
        assert!(!msg_type::is_error(msg_type::ECHO_REQUEST));
    }
}
