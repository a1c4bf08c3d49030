//! ARP (RFC 826) for Ethernet and IPv4, the only kind a guest of the virtual network speaks.
//!
//! ```text
//! +---------+---------+----+----+---------+----------------+-------------+----------------+-------------+
//! | htype 2 | ptype 2 |hlen|plen| oper 2  | sender MAC (6) | sender IPv4 | target MAC (6) | target IPv4 |
//! +---------+---------+----+----+---------+----------------+-------------+----------------+-------------+
//! ```

use std::net::Ipv4Addr;

use super::ethernet::{ethertype, mac};
use super::{field_u16, set_field_u16, WireError};

/// Length of an Ethernet/IPv4 ARP packet.
pub const PACKET_LEN: usize = 28;
/// Hardware type of Ethernet.
pub const HTYPE_ETHERNET: u16 = 1;
/// Operation: request.
pub const OP_REQUEST: u16 = 1;
/// Operation: reply.
pub const OP_REPLY: u16 = 2;

mod field {
    use core::ops::Range;
    pub const HTYPE: Range<usize> = 0..2;
    pub const PTYPE: Range<usize> = 2..4;
    pub const HLEN: usize = 4;
    pub const PLEN: usize = 5;
    pub const OPER: Range<usize> = 6..8;
    pub const SHA: Range<usize> = 8..14;
    pub const SPA: Range<usize> = 14..18;
    pub const THA: Range<usize> = 18..24;
    pub const TPA: Range<usize> = 24..28;
}

/// A view of an ARP packet laid out for Ethernet/IPv4 (check [`Packet::is_ethernet_ipv4`]
/// before trusting the address accessors).
#[derive(Debug, Clone, Copy)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps a buffer without checking it; accessors panic if it is shorter than
    /// [`PACKET_LEN`].
    pub const fn new_unchecked(buffer: T) -> Self {
        Self { buffer }
    }

    /// Wraps a buffer that holds the 28 bytes of an Ethernet/IPv4 ARP packet.
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        if buffer.as_ref().len() < PACKET_LEN {
            return Err(WireError::Truncated);
        }
        Ok(Self { buffer })
    }

    /// Hardware type (1: Ethernet).
    pub fn hardware_type(&self) -> u16 {
        field_u16(self.buffer.as_ref(), field::HTYPE)
    }

    /// Protocol type (an EtherType; 0x0800: IPv4).
    pub fn protocol_type(&self) -> u16 {
        field_u16(self.buffer.as_ref(), field::PTYPE)
    }

    /// Hardware address length (6 for Ethernet).
    pub fn hardware_len(&self) -> u8 {
        self.buffer.as_ref()[field::HLEN]
    }

    /// Protocol address length (4 for IPv4).
    pub fn protocol_len(&self) -> u8 {
        self.buffer.as_ref()[field::PLEN]
    }

    /// Whether this is Ethernet/IPv4 ARP, the layout the address accessors assume.
    pub fn is_ethernet_ipv4(&self) -> bool {
        self.hardware_type() == HTYPE_ETHERNET
            && self.protocol_type() == ethertype::IPV4
            && self.hardware_len() == 6
            && self.protocol_len() == 4
    }

    /// Operation (1 request, 2 reply; others are RARP/InARP).
    pub fn operation(&self) -> u16 {
        field_u16(self.buffer.as_ref(), field::OPER)
    }

    /// Sender hardware address.
    pub fn sender_hardware_addr(&self) -> [u8; 6] {
        mac(&self.buffer.as_ref()[field::SHA])
    }

    /// Sender protocol address (0.0.0.0 in an RFC 5227 probe).
    pub fn sender_protocol_addr(&self) -> Ipv4Addr {
        ipv4(&self.buffer.as_ref()[field::SPA])
    }

    /// Target hardware address (ignored in requests).
    pub fn target_hardware_addr(&self) -> [u8; 6] {
        mac(&self.buffer.as_ref()[field::THA])
    }

    /// Target protocol address: whose MAC the sender wants.
    pub fn target_protocol_addr(&self) -> Ipv4Addr {
        ipv4(&self.buffer.as_ref()[field::TPA])
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Writes hardware/protocol type and lengths for Ethernet/IPv4.
    pub fn set_ethernet_ipv4(&mut self) {
        let data = self.buffer.as_mut();
        set_field_u16(data, field::HTYPE, HTYPE_ETHERNET);
        set_field_u16(data, field::PTYPE, ethertype::IPV4);
        data[field::HLEN] = 6;
        data[field::PLEN] = 4;
    }

    /// Sets the operation.
    pub fn set_operation(&mut self, op: u16) {
        set_field_u16(self.buffer.as_mut(), field::OPER, op);
    }

    /// Sets the sender hardware address.
    pub fn set_sender_hardware_addr(&mut self, addr: [u8; 6]) {
        self.buffer.as_mut()[field::SHA].copy_from_slice(&addr);
    }

    /// Sets the sender protocol address.
    pub fn set_sender_protocol_addr(&mut self, addr: Ipv4Addr) {
        self.buffer.as_mut()[field::SPA].copy_from_slice(&addr.octets());
    }

    /// Sets the target hardware address.
    pub fn set_target_hardware_addr(&mut self, addr: [u8; 6]) {
        self.buffer.as_mut()[field::THA].copy_from_slice(&addr);
    }

    /// Sets the target protocol address.
    pub fn set_target_protocol_addr(&mut self, addr: Ipv4Addr) {
        self.buffer.as_mut()[field::TPA].copy_from_slice(&addr.octets());
    }
}

pub(crate) fn ipv4(bytes: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut buf = [0u8; PACKET_LEN];
        let mut p = Packet::new_checked(&mut buf[..]).unwrap();
        p.set_ethernet_ipv4();
        p.set_operation(OP_REQUEST);
        p.set_sender_hardware_addr([2, 0, 0, 0, 0, 1]);
        p.set_sender_protocol_addr(Ipv4Addr::new(10, 0, 0, 2));
        p.set_target_hardware_addr([0; 6]);
        p.set_target_protocol_addr(Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(&buf[..8], &[0, 1, 8, 0, 6, 4, 0, 1]);
        let p = Packet::new_checked(&buf[..]).unwrap();
        assert!(p.is_ethernet_ipv4());
        assert_eq!(p.sender_hardware_addr(), [2, 0, 0, 0, 0, 1]);
        assert_eq!(p.sender_protocol_addr(), Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(p.target_protocol_addr(), Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(
            Packet::new_checked(&buf[..27]).err(),
            Some(WireError::Truncated)
        );
    }
}
