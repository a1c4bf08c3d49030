//! Ethernet II frames (IEEE 802.3 with an EtherType; no VLAN tag handling: a tagged frame shows
//! EtherType 0x8100).
//!
//! ```text
//! +----------------+----------------+-----------+-------------------
//! | destination(6) |   source (6)   | type (2)  | payload ...
//! +----------------+----------------+-----------+-------------------
//! ```

use super::{field_u16, set_field_u16, WireError};

/// Length of the header.
pub const HEADER_LEN: usize = 14;
/// Shortest frame on the wire without FCS; shorter frames are zero-padded to it.
pub const MIN_FRAME_LEN: usize = 60;
/// The broadcast address.
pub const BROADCAST: [u8; 6] = [0xff; 6];

/// EtherType values vnp handles.
pub mod ethertype {
    /// IPv4.
    pub const IPV4: u16 = 0x0800;
    /// ARP.
    pub const ARP: u16 = 0x0806;
    /// IPv6 (dropped by the virtual network, named for the tests).
    pub const IPV6: u16 = 0x86dd;
}

mod field {
    use core::ops::Range;
    pub const DESTINATION: Range<usize> = 0..6;
    pub const SOURCE: Range<usize> = 6..12;
    pub const ETHERTYPE: Range<usize> = 12..14;
    pub const PAYLOAD: usize = 14;
}

/// A view of an Ethernet II frame (or of its first bytes).
#[derive(Debug, Clone, Copy)]
pub struct Frame<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Frame<T> {
    /// Wraps a buffer without checking it; accessors panic if it is shorter than
    /// [`HEADER_LEN`].
    pub const fn new_unchecked(buffer: T) -> Self {
        Self { buffer }
    }

    /// Wraps a buffer that holds at least the 14-byte header.
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        if buffer.as_ref().len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        Ok(Self { buffer })
    }

    /// Releases the buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// Destination MAC.
    pub fn dst_addr(&self) -> [u8; 6] {
        mac(&self.buffer.as_ref()[field::DESTINATION])
    }

    /// Source MAC.
    pub fn src_addr(&self) -> [u8; 6] {
        mac(&self.buffer.as_ref()[field::SOURCE])
    }

    /// EtherType of the payload.
    pub fn ethertype(&self) -> u16 {
        field_u16(self.buffer.as_ref(), field::ETHERTYPE)
    }

    /// Everything after the header (may include Ethernet padding, or be only a prefix).
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[field::PAYLOAD..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Frame<T> {
    /// Sets the destination MAC.
    pub fn set_dst_addr(&mut self, addr: [u8; 6]) {
        self.buffer.as_mut()[field::DESTINATION].copy_from_slice(&addr);
    }

    /// Sets the source MAC.
    pub fn set_src_addr(&mut self, addr: [u8; 6]) {
        self.buffer.as_mut()[field::SOURCE].copy_from_slice(&addr);
    }

    /// Sets the EtherType.
    pub fn set_ethertype(&mut self, value: u16) {
        set_field_u16(self.buffer.as_mut(), field::ETHERTYPE, value);
    }

    /// The payload, mutable.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[field::PAYLOAD..]
    }
}

/// A MAC address from 6 bytes.
pub(crate) fn mac(bytes: &[u8]) -> [u8; 6] {
    let mut out = [0u8; 6];
    out.copy_from_slice(&bytes[..6]);
    out
}

/// The 14-byte header `dst, src, ethertype`.
pub fn header(dst: [u8; 6], src: [u8; 6], ethertype: u16) -> [u8; HEADER_LEN] {
    let mut out = [0u8; HEADER_LEN];
    let mut frame = Frame::new_unchecked(&mut out[..]);
    frame.set_dst_addr(dst);
    frame.set_src_addr(src);
    frame.set_ethertype(ethertype);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let h = header([1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12], ethertype::ARP);
        assert_eq!(&h[12..], &[0x08, 0x06]);
        let f = Frame::new_checked(&h[..]).unwrap();
        assert_eq!(f.dst_addr(), [1, 2, 3, 4, 5, 6]);
        assert_eq!(f.src_addr(), [7, 8, 9, 10, 11, 12]);
        assert_eq!(f.ethertype(), ethertype::ARP);
        assert!(f.payload().is_empty());
        assert_eq!(
            Frame::new_checked(&h[..13]).err(),
            Some(WireError::Truncated)
        );
    }
}
