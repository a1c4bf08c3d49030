//! What the vhost-user-net device offers: virtio features, vhost-user protocol features and the
//! virtio-net config space. Pure values, unit-tested.

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_ANNOUNCE, VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vnp_protocol::wire::virtio_net::TxAllowed;

/// `VHOST_F_LOG_ALL`: the backend can log its writes to guest memory (live migration).
/// QEMU refuses to migrate a vhost-user device that does not offer it.
pub const VHOST_F_LOG_ALL: u32 = 26;

/// Size of the virtio-net config space we expose: mac (6), status (2), max_virtqueue_pairs (2),
/// mtu (2).
pub const CONFIG_LEN: usize = 12;

/// The checksum and segmentation offloads offered when they are on (`offloads = true` in
/// vnpd's configuration, the default): partial checksums and TCP/IPv4 super-packets (with ECN)
/// in both directions. Never UFO (Linux no longer emits it), USO (guest kernels from 6.2 only)
/// or the IPv6 variants (`HOST_TSO6`, `GUEST_TSO6`): a vnp network carries only IPv4.
pub const OFFLOAD_FEATURES: [u32; 6] = [
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_HOST_ECN,
    VIRTIO_NET_F_GUEST_ECN,
];

/// Virtio features the device offers; with `offloads`, also [`OFFLOAD_FEATURES`].
///
/// Without offloads the guest hands us complete IPv4 packets and we hand it complete ones, so
/// no virtio-net header field needs interpreting beyond `num_buffers`. With them, every TX
/// header is validated against its packet (`vnp_protocol::wire::virtio_net`).
/// `GUEST_ANNOUNCE` and `MQ` rely on a control queue that the frontend (QEMU, virtio-user)
/// emulates itself; the backend never sees it.
pub fn device_features(offloads: bool) -> u64 {
    let offload_bits = if offloads {
        OFFLOAD_FEATURES
            .iter()
            .fold(0u64, |acc, bit| acc | 1u64 << bit)
    } else {
        0
    };
    offload_bits
        | 1u64 << VIRTIO_F_VERSION_1
        | 1u64 << VIRTIO_NET_F_MAC
        | 1u64 << VIRTIO_NET_F_MTU
        | 1u64 << VIRTIO_NET_F_STATUS
        | 1u64 << VIRTIO_NET_F_MRG_RXBUF
        | 1u64 << VIRTIO_RING_F_EVENT_IDX
        | 1u64 << VIRTIO_NET_F_GUEST_ANNOUNCE
        | 1u64 << VIRTIO_NET_F_MQ
        | 1u64 << VHOST_F_LOG_ALL
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
}

/// vhost-user protocol features the device offers. Never `RARP` or `MTU` (NET_SET_MTU): the
/// vhost crate cannot parse those messages, and a frontend that negotiated them would send one.
pub fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::LOG_SHMFD
}

/// Whether `features` (as acked by the driver) include feature bit `bit`.
pub fn has_feature(features: u64, bit: u32) -> bool {
    features & (1u64 << bit) != 0
}

/// The TX offloads a driver's acked `features` allow its headers to ask for.
pub fn tx_allowed(features: u64) -> TxAllowed {
    TxAllowed {
        csum: has_feature(features, VIRTIO_NET_F_CSUM),
        tso4: has_feature(features, VIRTIO_NET_F_HOST_TSO4),
        ecn: has_feature(features, VIRTIO_NET_F_HOST_ECN),
    }
}

/// Length of the virtio-net header the driver expects in front of every frame: 12 bytes with
/// VERSION_1 or MRG_RXBUF, 10 for a legacy driver without either.
pub fn vnet_header_len(acked: u64) -> usize {
    if has_feature(acked, VIRTIO_F_VERSION_1) || has_feature(acked, VIRTIO_NET_F_MRG_RXBUF) {
        12
    } else {
        10
    }
}

/// The virtio-net config space (little endian, as VERSION_1 requires).
pub fn config_space(mac: [u8; 6], queue_pairs: u16, mtu: u16) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    c[0..6].copy_from_slice(&mac);
    c[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
    c[8..10].copy_from_slice(&queue_pairs.to_le_bytes());
    c[10..12].copy_from_slice(&mtu.to_le_bytes());
    c
}

/// The bytes `offset..offset + size` of `config`, zero-filled beyond its end (the frontend may
/// ask for the full `virtio_net_config`; fields we do not implement read as zero).
pub fn config_window(config: &[u8], offset: u32, size: u32) -> Vec<u8> {
    let size = (size as usize).min(256);
    let mut out = vec![0u8; size];
    let start = offset as usize;
    if start < config.len() {
        let n = (config.len() - start).min(size);
        out[..n].copy_from_slice(&config[start..start + n]);
    }
    out
}

/// Header the device writes in front of a received frame: no checksum or GSO information,
/// `num_buffers` = how many descriptor chains the frame spans (1 without MRG_RXBUF).
pub fn rx_vnet_header(num_buffers: u16) -> [u8; 12] {
    let mut h = [0u8; 12];
    h[10..12].copy_from_slice(&num_buffers.to_le_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_offers_rarp_or_net_set_mtu() {
        let p = protocol_features();
        assert!(!p.contains(VhostUserProtocolFeatures::RARP));
        assert!(!p.contains(VhostUserProtocolFeatures::MTU));
        assert!(p.contains(VhostUserProtocolFeatures::LOG_SHMFD));
    }

    #[test]
    fn offers_required_features() {
        let f = device_features(true);
        for bit in [
            VIRTIO_F_VERSION_1,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_MTU,
            VIRTIO_NET_F_STATUS,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_NET_F_GUEST_ANNOUNCE,
        ] {
            assert!(has_feature(f, bit), "bit {bit}");
        }
        for bit in OFFLOAD_FEATURES {
            assert!(has_feature(f, bit), "offload bit {bit}");
        }
        // IPv4 only: no IPv6, UFO or USO offloads, ever.
        use virtio_bindings::virtio_net as n;
        for bit in [
            n::VIRTIO_NET_F_HOST_TSO6,
            n::VIRTIO_NET_F_GUEST_TSO6,
            n::VIRTIO_NET_F_HOST_UFO,
            n::VIRTIO_NET_F_GUEST_UFO,
        ] {
            assert!(!has_feature(f, bit), "bit {bit}");
        }
        // Offloads off: guests must send complete packets.
        let off = device_features(false);
        for bit in OFFLOAD_FEATURES {
            assert!(!has_feature(off, bit), "offload bit {bit}");
        }
        assert_eq!(off | (f & !off), f);
        assert!(has_feature(off, VIRTIO_NET_F_MRG_RXBUF));
        assert_eq!(tx_allowed(off), TxAllowed::default());
        assert_eq!(
            tx_allowed(f),
            TxAllowed {
                csum: true,
                tso4: true,
                ecn: true
            }
        );
    }

    #[test]
    fn config_layout() {
        let c = config_space([2, 0, 0, 0, 0, 7], 4, 1452);
        assert_eq!(&c[0..6], &[2, 0, 0, 0, 0, 7]);
        assert_eq!(u16::from_le_bytes([c[6], c[7]]), 1);
        assert_eq!(u16::from_le_bytes([c[8], c[9]]), 4);
        assert_eq!(u16::from_le_bytes([c[10], c[11]]), 1452);
        assert_eq!(config_window(&c, 6, 2), vec![1, 0]);
        assert_eq!(config_window(&c, 10, 8), vec![0xac, 0x05, 0, 0, 0, 0, 0, 0]);
        assert_eq!(config_window(&c, 100, 4), vec![0; 4]);
        assert_eq!(config_window(&c, u32::MAX, 4), vec![0; 4]);
    }

    #[test]
    fn header_lengths() {
        assert_eq!(vnet_header_len(1 << VIRTIO_F_VERSION_1), 12);
        assert_eq!(vnet_header_len(1 << VIRTIO_NET_F_MRG_RXBUF), 12);
        assert_eq!(vnet_header_len(0), 10);
        assert_eq!(rx_vnet_header(3)[10..], [3, 0]);
    }
}
