//! Feature negotiation (pure): which virtio-net features the fixture asks vnpd for, which of
//! them it keeps given what vnpd offers, and which TAP offloads follow from the result.
//!
//! The TAP's offload flags (`TUNSETOFFLOAD`) say what the namespace kernel may hand the fixture
//! on reads: a checksum left partial (`TUN_F_CSUM`), a TCP segment larger than the MTU
//! (`TUN_F_TSO4`, `TUN_F_TSO_ECN`). Those frames go to vnpd's TX ring unchanged, so the kernel
//! may only produce what vnpd accepted: the *host* features (`CSUM`, `HOST_TSO4`, `HOST_ECN`).
//! The *guest* features (`GUEST_CSUM`, `GUEST_TSO4`, `GUEST_ECN`) let vnpd write such frames
//! into the RX ring; a TAP accepts them on writes whatever its offload flags.

/// `VIRTIO_NET_F_CSUM`: the device (vnpd) accepts frames with a partial checksum.
pub const F_CSUM: u64 = 1 << 0;
/// `VIRTIO_NET_F_GUEST_CSUM`: the driver (this fixture) accepts frames with a partial checksum.
pub const F_GUEST_CSUM: u64 = 1 << 1;
/// `VIRTIO_NET_F_GUEST_TSO4`: the driver accepts coalesced TCP/IPv4 segments.
pub const F_GUEST_TSO4: u64 = 1 << 7;
/// `VIRTIO_NET_F_GUEST_ECN`: ... with the ECN (CWR) bit.
pub const F_GUEST_ECN: u64 = 1 << 9;
/// `VIRTIO_NET_F_HOST_TSO4`: the device accepts TCP/IPv4 segments larger than the MTU.
pub const F_HOST_TSO4: u64 = 1 << 11;
/// `VIRTIO_NET_F_HOST_ECN`: ... with the ECN (CWR) bit.
pub const F_HOST_ECN: u64 = 1 << 13;
/// `VIRTIO_NET_F_MRG_RXBUF`: a received frame may span several RX buffers (`num_buffers`).
pub const F_MRG_RXBUF: u64 = 1 << 15;
/// `VHOST_USER_F_PROTOCOL_FEATURES`.
pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// `VIRTIO_F_VERSION_1`.
pub const F_VERSION_1: u64 = 1 << 32;

/// The offload features, all of which `--no-offloads` leaves out.
pub const OFFLOADS: u64 =
    F_CSUM | F_GUEST_CSUM | F_HOST_TSO4 | F_GUEST_TSO4 | F_HOST_ECN | F_GUEST_ECN;

/// `TUN_F_CSUM` (linux/if_tun.h).
pub const TUN_F_CSUM: u32 = 0x01;
/// `TUN_F_TSO4`.
pub const TUN_F_TSO4: u32 = 0x02;
/// `TUN_F_TSO_ECN`.
pub const TUN_F_TSO_ECN: u32 = 0x08;

/// Features the fixture cannot work without.
pub const REQUIRED: u64 = F_VERSION_1 | F_MRG_RXBUF | F_PROTOCOL_FEATURES;

/// Why negotiation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NegotiationError {
    /// vnpd does not offer something the fixture needs.
    #[error("the backend does not offer required features {missing:#x} (offered {offered:#x})")]
    Missing {
        /// Required bits not offered.
        missing: u64,
        /// What was offered.
        offered: u64,
    },
}

/// What the fixture asks for: the required features, plus the offloads when `offloads`.
pub fn wanted(offloads: bool) -> u64 {
    if offloads {
        REQUIRED | OFFLOADS
    } else {
        REQUIRED
    }
}

/// The features to acknowledge: what is wanted and offered, minus any feature whose virtio
/// dependency did not make it (TSO needs the matching checksum feature, ECN needs TSO).
pub fn negotiate(offered: u64, offloads: bool) -> Result<u64, NegotiationError> {
    if offered & REQUIRED != REQUIRED {
        return Err(NegotiationError::Missing {
            missing: REQUIRED & !offered,
            offered,
        });
    }
    let mut acked = offered & wanted(offloads);
    // Virtio 1.x, 5.1.3.1: HOST_TSO4 requires CSUM, HOST_ECN requires HOST_TSO4 (the only TSO
    // variant asked for); the same on the guest side.
    for (feature, needs) in [
        (F_HOST_TSO4, F_CSUM),
        (F_HOST_ECN, F_HOST_TSO4),
        (F_GUEST_TSO4, F_GUEST_CSUM),
        (F_GUEST_ECN, F_GUEST_TSO4),
    ] {
        if acked & needs == 0 {
            acked &= !feature;
        }
    }
    Ok(acked)
}

/// The `TUNSETOFFLOAD` flags that let the namespace kernel hand over only what vnpd acked.
pub fn tun_offloads(acked: u64) -> u32 {
    let mut flags = 0;
    if acked & F_CSUM != 0 {
        flags |= TUN_F_CSUM;
        if acked & F_HOST_TSO4 != 0 {
            flags |= TUN_F_TSO4;
            if acked & F_HOST_ECN != 0 {
                flags |= TUN_F_TSO_ECN;
            }
        }
    }
    flags
}

/// Short names of the offload features in `acked`, for logs.
pub fn describe_offloads(acked: u64) -> String {
    let names: Vec<&str> = [
        (F_CSUM, "CSUM"),
        (F_GUEST_CSUM, "GUEST_CSUM"),
        (F_HOST_TSO4, "HOST_TSO4"),
        (F_GUEST_TSO4, "GUEST_TSO4"),
        (F_HOST_ECN, "HOST_ECN"),
        (F_GUEST_ECN, "GUEST_ECN"),
    ]
    .iter()
    .filter(|(bit, _)| acked & bit != 0)
    .map(|(_, name)| *name)
    .collect();
    if names.is_empty() {
        "none".to_string()
    } else {
        names.join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What vnpd offers today (docs/frontends.md): no offloads.
    const VNPD_TODAY: u64 = 0x1_6461_8028;

    #[test]
    fn todays_vnpd_gets_no_offloads_and_the_tap_none() {
        let acked = negotiate(VNPD_TODAY, true).unwrap();
        assert_eq!(acked, REQUIRED);
        assert_eq!(tun_offloads(acked), 0);
        assert_eq!(describe_offloads(acked), "none");
    }

    #[test]
    fn a_vnpd_with_offloads_gets_them_all_and_the_tap_csum_tso_ecn() {
        let acked = negotiate(VNPD_TODAY | OFFLOADS, true).unwrap();
        assert_eq!(acked, REQUIRED | OFFLOADS);
        assert_eq!(tun_offloads(acked), TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO_ECN);
    }

    #[test]
    fn offloads_off_acks_none_of_them() {
        let acked = negotiate(VNPD_TODAY | OFFLOADS, false).unwrap();
        assert_eq!(acked & OFFLOADS, 0);
        assert_eq!(tun_offloads(acked), 0);
    }

    #[test]
    fn guest_side_only_leaves_the_tap_without_offloads() {
        let offered = VNPD_TODAY | F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_ECN;
        let acked = negotiate(offered, true).unwrap();
        assert_eq!(acked & OFFLOADS, F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_ECN);
        assert_eq!(
            tun_offloads(acked),
            0,
            "the TAP may hand over only host-side offloads"
        );
    }

    #[test]
    fn features_without_their_dependencies_are_dropped() {
        // TSO without CSUM, ECN without TSO: neither may be acked.
        let acked = negotiate(VNPD_TODAY | F_HOST_TSO4 | F_GUEST_ECN, true).unwrap();
        assert_eq!(acked & OFFLOADS, 0);
        let acked = negotiate(VNPD_TODAY | F_CSUM | F_HOST_ECN, true).unwrap();
        assert_eq!(acked & OFFLOADS, F_CSUM);
        assert_eq!(tun_offloads(acked), TUN_F_CSUM);
        let acked = negotiate(VNPD_TODAY | F_CSUM | F_HOST_TSO4, true).unwrap();
        assert_eq!(tun_offloads(acked), TUN_F_CSUM | TUN_F_TSO4);
    }

    #[test]
    fn a_backend_without_mergeable_buffers_is_refused() {
        let err = negotiate(VNPD_TODAY & !F_MRG_RXBUF, true).unwrap_err();
        assert_eq!(
            err,
            NegotiationError::Missing {
                missing: F_MRG_RXBUF,
                offered: VNPD_TODAY & !F_MRG_RXBUF
            }
        );
    }
}
