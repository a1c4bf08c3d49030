//! The packet layer: zero-copy typed views over packet bytes, in the style of smoltcp's `wire`
//! module, and the one Internet checksum implementation. No I/O.
//!
//! - [`ethernet`], [`arp`], [`ipv4`], [`udp`], [`tcp`], [`icmpv4`]: a `Packet<T: AsRef<[u8]>>`
//!   (a `Frame` for Ethernet) per protocol, with its field ranges as constants, `new_unchecked` /
//!   `new_checked`, accessors, and setters when `T: AsMut<[u8]>`. `new_checked` checks that the
//!   *header* fits, not that the payload is there: the data path sees only the first bytes of a
//!   guest's descriptor chain. Where a length field must be checked against the real length,
//!   a separate `check_len` does it.
//! - [`virtio_net`]: the virtio-net header in front of every guest frame, and the validation of
//!   its guest-controlled offload fields against the packet.
//! - [`checksum`]: ones' complement sum, fold, combine, pseudo header and RFC 1624's incremental
//!   update.
//! - This module and [`options`]: the VNP datagram itself (the UDP payload between two hosts).
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |    version    |     flags     |           reserved            |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                          network id                           |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                        token (64 bits)                        |
//! +                                                               +
//! |                                                               |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                     expiry (Unix seconds)                     |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |      inner IPv4 packet (its own total-length field) ...       |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |      option TLVs, present only when flags bit 0 is set ...    |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```
//!
//! The header has a fixed size so that a receiver can scatter a datagram with one `recvmsg`:
//! the header into a local buffer and the inner packet straight into the guest's receive buffers.
//! Options trail the inner packet (as in the patent's FIG. 5) for the same reason: their presence
//! must not move the inner packet.

pub mod arp;
pub mod checksum;
pub mod ethernet;
pub mod icmpv4;
pub mod ipv4;
pub mod options;
pub mod tcp;
pub mod udp;
pub mod virtio_net;

use thiserror::Error;

use crate::token::{Expiry, Token, TOKEN_LEN};

/// The version this crate writes and accepts.
pub const VERSION: u8 = 1;
/// Size of the fixed VNP header in bytes.
pub const HEADER_LEN: usize = 20;
/// Outer IPv4 header (no options) + UDP header + VNP header: what encapsulation adds.
pub const ENCAP_OVERHEAD: usize = 20 + 8 + HEADER_LEN;
/// Flags bit 0: option TLVs follow the inner packet.
pub const FLAG_OPTIONS: u8 = 0x01;
/// Flags this version defines; a receiver drops datagrams with any other bit set.
pub const KNOWN_FLAGS: u8 = FLAG_OPTIONS;

mod field {
    use core::ops::Range;
    pub const VERSION: usize = 0;
    pub const FLAGS: usize = 1;
    pub const RESERVED: Range<usize> = 2..4;
    pub const NETWORK_ID: Range<usize> = 4..8;
    pub const TOKEN: Range<usize> = 8..16;
    pub const EXPIRY: Range<usize> = 16..20;
}

/// Why bytes are not a well-formed VNP datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum WireError {
    /// Fewer bytes than the fixed header, or than the inner packet claims.
    #[error("datagram truncated")]
    Truncated,
    /// A version this implementation does not speak.
    #[error("unsupported VNP version {0}")]
    Version(u8),
    /// Reserved bits or unknown flags set.
    #[error("reserved bits set")]
    Reserved,
    /// The inner packet is not a well-formed IPv4 header.
    #[error("inner packet is not IPv4")]
    NotIpv4,
    /// Bytes follow the inner packet but the options flag is clear, or an option overruns.
    #[error("malformed options")]
    Options,
    /// A header field is inconsistent (a length shorter than the header it covers, ...).
    #[error("malformed header")]
    Malformed,
}

/// A read (and, for mutable buffers, write) view of a VNP header.
#[derive(Debug, Clone, Copy)]
pub struct VnpHeader<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> VnpHeader<T> {
    /// Wraps a buffer without checking it; accessors may panic if it is shorter than
    /// [`HEADER_LEN`]. Prefer [`VnpHeader::new_checked`].
    pub const fn new_unchecked(buffer: T) -> Self {
        Self { buffer }
    }

    /// Wraps a buffer after checking length, version and reserved bits.
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        let header = Self::new_unchecked(buffer);
        header.check()?;
        Ok(header)
    }

    fn check(&self) -> Result<(), WireError> {
        let data = self.buffer.as_ref();
        if data.len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        if data[field::VERSION] != VERSION {
            return Err(WireError::Version(data[field::VERSION]));
        }
        if data[field::FLAGS] & !KNOWN_FLAGS != 0 || data[field::RESERVED] != [0, 0] {
            return Err(WireError::Reserved);
        }
        Ok(())
    }

    /// Releases the buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// Protocol version (1).
    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[field::VERSION]
    }

    /// Flag bits; see [`FLAG_OPTIONS`].
    pub fn flags(&self) -> u8 {
        self.buffer.as_ref()[field::FLAGS]
    }

    /// Whether option TLVs follow the inner packet.
    pub fn has_options(&self) -> bool {
        self.flags() & FLAG_OPTIONS != 0
    }

    /// Numeric id of the virtual network; covered by the token.
    pub fn network_id(&self) -> u32 {
        u32::from_be_bytes(array(&self.buffer.as_ref()[field::NETWORK_ID]))
    }

    /// The token `T_a_b`.
    pub fn token(&self) -> Token {
        Token::from_bytes(array::<TOKEN_LEN>(&self.buffer.as_ref()[field::TOKEN]))
    }

    /// The token's expiry `expiry_a_b`.
    pub fn expiry(&self) -> Expiry {
        Expiry(u32::from_be_bytes(array(
            &self.buffer.as_ref()[field::EXPIRY],
        )))
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> VnpHeader<T> {
    /// Writes every header field (reserved bytes as zero).
    pub fn emit(&mut self, repr: &VnpRepr) {
        let data = self.buffer.as_mut();
        data[field::VERSION] = VERSION;
        data[field::FLAGS] = if repr.has_options { FLAG_OPTIONS } else { 0 };
        data[field::RESERVED].copy_from_slice(&[0, 0]);
        data[field::NETWORK_ID].copy_from_slice(&repr.network_id.to_be_bytes());
        data[field::TOKEN].copy_from_slice(repr.token.as_bytes());
        data[field::EXPIRY].copy_from_slice(&repr.expiry.0.to_be_bytes());
    }
}

fn array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(bytes);
    out
}

/// The big-endian `u16` at `range` (two bytes) of `data`.
pub(crate) fn field_u16(data: &[u8], range: core::ops::Range<usize>) -> u16 {
    u16::from_be_bytes(array(&data[range]))
}

/// The big-endian `u32` at `range` (four bytes) of `data`.
pub(crate) fn field_u32(data: &[u8], range: core::ops::Range<usize>) -> u32 {
    u32::from_be_bytes(array(&data[range]))
}

/// Writes `value` big-endian at `range` (two bytes) of `data`.
pub(crate) fn set_field_u16(data: &mut [u8], range: core::ops::Range<usize>, value: u16) {
    data[range].copy_from_slice(&value.to_be_bytes());
}

/// The header's contents as plain values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VnpRepr {
    /// Numeric id of the virtual network.
    pub network_id: u32,
    /// The token for this pair and direction.
    pub token: Token,
    /// The token's expiry.
    pub expiry: Expiry,
    /// Whether option TLVs follow the inner packet.
    pub has_options: bool,
}

impl VnpRepr {
    /// Reads a checked header.
    pub fn parse<T: AsRef<[u8]>>(header: &VnpHeader<T>) -> Self {
        Self {
            network_id: header.network_id(),
            token: header.token(),
            expiry: header.expiry(),
            has_options: header.has_options(),
        }
    }

    /// The header as bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        VnpHeader::new_unchecked(&mut out[..]).emit(self);
        out
    }
}

/// A whole datagram split into its three parts, every length checked.
#[derive(Debug, Clone, Copy)]
pub struct VnpDatagram<'a> {
    /// The fixed header.
    pub header: VnpRepr,
    /// The inner IPv4 packet, exactly its total length.
    pub inner: &'a [u8],
    /// The option bytes after the inner packet (empty when the flag is clear).
    pub options: &'a [u8],
}

impl<'a> VnpDatagram<'a> {
    /// Splits and checks a UDP payload. Only framing is checked here: the token, the expiry
    /// and the addresses are policy, for the receiver to judge.
    pub fn parse(payload: &'a [u8]) -> Result<Self, WireError> {
        let header = VnpHeader::new_checked(payload)?;
        let repr = VnpRepr::parse(&header);
        let rest = &payload[HEADER_LEN..];
        let inner = ipv4::Packet::new_checked(rest)?;
        inner.check_len(rest.len())?;
        let inner_len = inner.total_len();
        let (inner, options) = rest.split_at(inner_len);
        split_trailer(repr.has_options, options)?;
        Ok(Self {
            header: repr,
            inner,
            options,
        })
    }
}

/// Checks the bytes after the inner packet against the options flag: none without the flag,
/// well-formed TLVs with it.
pub fn split_trailer(has_options: bool, trailer: &[u8]) -> Result<(), WireError> {
    match (has_options, trailer.is_empty()) {
        (false, true) => Ok(()),
        (false, false) | (true, true) => Err(WireError::Options),
        (true, false) => options::OptionsIter::new(trailer)
            .try_for_each(|o| o.map(drop))
            .map_err(|_| WireError::Options),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repr() -> VnpRepr {
        VnpRepr {
            network_id: 0x0102_0304,
            token: Token::from_bytes([0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7]),
            expiry: Expiry(0x6b49_d200),
            has_options: false,
        }
    }

    #[test]
    fn header_layout() {
        let bytes = repr().to_bytes();
        assert_eq!(
            crate::hex::encode(&bytes),
            "0100000001020304a0a1a2a3a4a5a6a76b49d200"
        );
        let view = VnpHeader::new_checked(&bytes[..]).expect("valid");
        assert_eq!(VnpRepr::parse(&view), repr());
    }

    #[test]
    fn header_rejects_bad_framing() {
        let bytes = repr().to_bytes();
        assert_eq!(
            VnpHeader::new_checked(&bytes[..19]).err(),
            Some(WireError::Truncated)
        );
        let mut v2 = bytes;
        v2[0] = 2;
        assert_eq!(
            VnpHeader::new_checked(&v2[..]).err(),
            Some(WireError::Version(2))
        );
        let mut flags = bytes;
        flags[1] = 0x80;
        assert_eq!(
            VnpHeader::new_checked(&flags[..]).err(),
            Some(WireError::Reserved)
        );
        let mut reserved = bytes;
        reserved[3] = 1;
        assert_eq!(
            VnpHeader::new_checked(&reserved[..]).err(),
            Some(WireError::Reserved)
        );
    }
}
