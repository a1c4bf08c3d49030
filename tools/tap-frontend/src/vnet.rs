//! The few virtio-net header fields the fixture itself looks at: `flags` and `gso_type` (to
//! count offloaded frames and refuse offloads that were not negotiated) and `num_buffers`
//! (to join mergeable RX buffers). Everything else passes between the TAP and vnpd as is: the
//! TAP and vnpd validate the offload fields themselves.

use vnp_protocol::wire::virtio_net;

use crate::memory::GuestRam;
use crate::tap::VNET_HDR_LEN;

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`.
pub const F_NEEDS_CSUM: u8 = virtio_net::flags::NEEDS_CSUM;
/// `VIRTIO_NET_HDR_GSO_ECN`, a flag bit of `gso_type`.
pub const GSO_ECN: u8 = virtio_net::gso::ECN;

/// The fields read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// `flags`.
    pub flags: u8,
    /// `gso_type` (ECN bit included).
    pub gso_type: u8,
}

/// An RX header asks for an offload the fixture did not negotiate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderFault;

impl Header {
    /// From the first bytes of a header.
    pub fn parse(bytes: &[u8; VNET_HDR_LEN]) -> Header {
        let view = virtio_net::Header::new_unchecked(&bytes[..]);
        Header {
            flags: view.flags(),
            gso_type: view.gso_type(),
        }
    }

    /// Whether this is a segmentation-offload frame.
    pub fn is_gso(&self) -> bool {
        self.gso_type & !GSO_ECN != 0
    }

    /// Whether vnpd may hand the fixture this frame, given the guest offloads it acked.
    pub fn check_rx(&self, guest_csum: bool, guest_tso: bool) -> Result<(), HeaderFault> {
        if self.flags & F_NEEDS_CSUM != 0 && !guest_csum {
            return Err(HeaderFault);
        }
        if self.is_gso() && !guest_tso {
            return Err(HeaderFault);
        }
        Ok(())
    }
}

/// The header of the frame whose first buffer is at `gpa`.
pub fn read_header(ram: &GuestRam, gpa: u64) -> Header {
    let mut bytes = [0u8; VNET_HDR_LEN];
    ram.read(gpa, &mut bytes)
        .expect("header inside guest memory");
    Header::parse(&bytes)
}

/// `num_buffers` of the RX frame whose first buffer is at `gpa`.
pub fn num_buffers(ram: &GuestRam, gpa: u64) -> u16 {
    let mut bytes = [0u8; VNET_HDR_LEN];
    ram.read(gpa, &mut bytes)
        .expect("header inside guest memory");
    virtio_net::Header::new_unchecked(&bytes[..]).num_buffers()
}

/// Makes the header the TAP wrote at `gpa` a driver's transmit header: only `NEEDS_CSUM`
/// may be set in `flags` (the TAP may add `DATA_VALID`, which a driver must not send), and
/// `num_buffers`, which the TAP skips, is 0. Returns the header.
pub fn prepare_tx_header(ram: &GuestRam, gpa: u64) -> Header {
    let mut header = read_header(ram, gpa);
    if header.flags & !F_NEEDS_CSUM != 0 {
        header.flags &= F_NEEDS_CSUM;
        ram.write(gpa, &[header.flags]);
    }
    ram.write(gpa + 10, &[0, 0]);
    header
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rx_offloads_must_have_been_negotiated() {
        let plain = Header {
            flags: 0,
            gso_type: 0,
        };
        assert!(plain.check_rx(false, false).is_ok());
        let csum = Header { flags: 1, ..plain };
        assert!(csum.check_rx(false, false).is_err());
        assert!(csum.check_rx(true, false).is_ok());
        let tso = Header {
            flags: 1,
            gso_type: 1,
        };
        assert!(tso.is_gso());
        assert!(tso.check_rx(true, false).is_err());
        assert!(tso.check_rx(true, true).is_ok());
        let ecn_only = Header {
            flags: 0,
            gso_type: GSO_ECN,
        };
        assert!(!ecn_only.is_gso());
    }

    #[test]
    fn tx_headers_lose_data_valid_and_num_buffers() {
        let ram = GuestRam::new(4096).unwrap();
        // flags NEEDS_CSUM|DATA_VALID, gso TCPV4, ..., num_buffers garbage.
        ram.write(64, &[3, 1, 54, 0, 0xa8, 5, 34, 0, 16, 0, 0xff, 0xff]);
        let h = prepare_tx_header(&ram, 64);
        assert_eq!(
            h,
            Header {
                flags: 1,
                gso_type: 1
            }
        );
        let mut out = [0u8; 12];
        ram.read(64, &mut out).unwrap();
        assert_eq!(out, [1, 1, 54, 0, 0xa8, 5, 34, 0, 16, 0, 0, 0]);
        assert_eq!(num_buffers(&ram, 64), 0);
    }
}
