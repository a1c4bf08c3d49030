//! The guest edge: what a VM sees of the network besides its own IPv4 traffic.
//!
//! The virtual network is layer 3 (like GCE's): the only other station on a VM's link is a
//! virtual router that vnpd plays. It answers ARP for every address with [`ROUTER_MAC`], so the
//! guest hands every packet to the router, and it serves DHCP with the VM's address from the
//! registry, so a stock guest (busybox `udhcpc`, systemd-networkd, dhclient) configures itself:
//! address and prefix, router, MTU (underlay MTU minus the VNP encapsulation), hostname, lease
//! and DNS when one is configured.
//!
//! Everything here is pure: no I/O, no clocks, no allocation on the answer path. The data path
//! calls [`classify`] on the start of every frame the guest sends; plain IPv4 goes to the
//! tunnel, ARP and DHCP go to [`respond`], which writes the reply frame (Ethernet header
//! included, no virtio-net header) into a buffer the data path then delivers to the guest's
//! receive queue. Whatever the guest writes, `respond` returns a reply, nothing, or an
//! [`EdgeDrop`] reason to count; it never panics (a property test feeds it random frames).
//!
//! Modules: [`wire`] (Ethernet/IPv4/UDP views, checksum, reply writer), [`arp`], [`dhcp`].

pub mod arp;
pub mod dhcp;
pub mod wire;

use std::net::Ipv4Addr;

pub use dhcp::MAX_REPLY_LEN;

use wire::{EthernetFrame, ETHERTYPE_ARP, ETHERTYPE_IPV4};

/// The virtual router's MAC: locally administered (bit 1 of the first byte), unicast, the same
/// on every host so that a migrated guest's ARP cache stays valid. Bytes 2..5 spell "vnp".
pub const ROUTER_MAC: [u8; 6] = [0x02, 0x00, 0x76, 0x6e, 0x70, 0x01];

/// Default DHCP lease. Leases cost nothing here (the address is the VM's for as long as it is
/// attached), so the lease only bounds how long a guest keeps a stale configuration.
pub const DEFAULT_LEASE_SECS: u32 = 24 * 60 * 60;

/// How many bytes of a frame [`classify`] needs to tell DHCP from other IPv4: Ethernet, an
/// IPv4 header with the most options, and the UDP ports.
pub const CLASSIFY_PREFIX_LEN: usize = wire::ETH_HEADER_LEN + wire::IPV4_MAX_HEADER_LEN + 4;

/// What the edge needs to know about one attached VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeConfig {
    /// The VM's MAC (from the registry; the only client the edge serves).
    pub vm_mac: [u8; 6],
    /// The VM's address.
    pub vm_ip: Ipv4Addr,
    /// Prefix length of the VM's network (subnet mask option).
    pub prefix_len: u8,
    /// The virtual router's address: DHCP server identifier and default gateway.
    pub router_ip: Ipv4Addr,
    /// The virtual router's MAC, normally [`ROUTER_MAC`].
    pub router_mac: [u8; 6],
    /// Interface MTU offered to the guest (underlay MTU minus the VNP encapsulation overhead).
    pub mtu: u16,
    /// Hostname offered to the guest (empty: no hostname option).
    pub hostname: String,
    /// Lease time in seconds (`u32::MAX`: infinite).
    pub lease_secs: u32,
    /// DNS server to offer, if any.
    pub dns: Option<Ipv4Addr>,
}

/// Why an [`EdgeConfig`] cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EdgeConfigError {
    /// Prefix length outside 1..=32.
    #[error("prefix length {0} is not in 1..=32")]
    PrefixLen(u8),
    /// MTU below the IPv4 minimum of 68 (RFC 2132 option 26).
    #[error("MTU {0} is below the IPv4 minimum of 68")]
    Mtu(u16),
    /// A MAC that is multicast/broadcast or all zeros.
    #[error("{which} MAC {mac:02x?} is not a unicast address")]
    Mac {
        /// "VM" or "router".
        which: &'static str,
        /// The offending MAC.
        mac: [u8; 6],
    },
    /// Hostname longer than one DHCP option holds, or with characters a hostname cannot have.
    #[error("hostname {0:?} is longer than 255 bytes or not [A-Za-z0-9.-]")]
    Hostname(String),
    /// VM and router share an address.
    #[error("VM and router both have address {0}")]
    SameAddress(Ipv4Addr),
}

impl EdgeConfig {
    /// The subnet mask for [`EdgeConfig::prefix_len`] (clamped to 32).
    pub fn netmask(&self) -> Ipv4Addr {
        let len = u32::from(self.prefix_len.min(32));
        Ipv4Addr::from(u32::MAX.checked_shl(32 - len).unwrap_or(0))
    }

    /// Checks what would otherwise produce a guest configuration that cannot work. Attach time
    /// is the place to refuse; [`respond`] copes with an unvalidated config without panicking.
    pub fn validate(&self) -> Result<(), EdgeConfigError> {
        if !(1..=32).contains(&self.prefix_len) {
            return Err(EdgeConfigError::PrefixLen(self.prefix_len));
        }
        if self.mtu < 68 {
            return Err(EdgeConfigError::Mtu(self.mtu));
        }
        for (which, mac) in [("VM", self.vm_mac), ("router", self.router_mac)] {
            if mac[0] & 1 != 0 || mac == [0; 6] {
                return Err(EdgeConfigError::Mac { which, mac });
            }
        }
        let hostname_ok = self.hostname.len() <= 255
            && self
                .hostname
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        if !hostname_ok {
            return Err(EdgeConfigError::Hostname(self.hostname.clone()));
        }
        if self.vm_ip == self.router_ip {
            return Err(EdgeConfigError::SameAddress(self.vm_ip));
        }
        Ok(())
    }
}

/// What kind of frame the guest sent, judged from its first [`CLASSIFY_PREFIX_LEN`] bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// IPv4 that is not DHCP: the data path's business (it validates the header itself).
    Ipv4,
    /// ARP: give it to [`respond`].
    Arp,
    /// IPv4/UDP to port 67: give it to [`respond`].
    Dhcp,
    /// Anything else (IPv6, VLAN tags, LLDP, runts): a counted drop.
    Other,
}

/// Classifies a frame from its first bytes, without validating more than it needs to look at:
/// an IPv4 frame whose header is too short or inconsistent to find the UDP ports is `Ipv4`, and
/// the data path's own checks drop it.
pub fn classify(frame_prefix: &[u8]) -> FrameKind {
    let Ok(eth) = EthernetFrame::parse(frame_prefix) else {
        return FrameKind::Other;
    };
    match eth.ethertype() {
        ETHERTYPE_ARP => FrameKind::Arp,
        ETHERTYPE_IPV4 => {
            let ip = eth.payload();
            let Some(&version_ihl) = ip.first() else {
                return FrameKind::Ipv4;
            };
            let header_len = usize::from(version_ihl & 0x0f) * 4;
            let is_udp = ip.get(9) == Some(&wire::IPPROTO_UDP);
            // Only a first (or only) fragment starts with the UDP header.
            let first_fragment = ip
                .get(6..8)
                .is_some_and(|b| u16::from_be_bytes([b[0], b[1]]) & 0x1fff == 0);
            let dst_port = ip
                .get(header_len + 2..header_len + 4)
                .map(|b| u16::from_be_bytes([b[0], b[1]]));
            if version_ihl >> 4 == 4
                && header_len >= wire::IPV4_MIN_HEADER_LEN
                && is_udp
                && first_fragment
                && dst_port == Some(dhcp::SERVER_PORT)
            {
                FrameKind::Dhcp
            } else {
                FrameKind::Ipv4
            }
        }
        _ => FrameKind::Other,
    }
}

/// Why the edge refused a frame. Each is a counted drop; the names are stable (log and metric
/// labels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum EdgeDrop {
    /// Shorter than its headers or length fields say.
    #[error("truncated frame")]
    Truncated,
    /// IPv4 or UDP length fields inconsistent with each other (or IPv4 version/IHL invalid).
    #[error("inconsistent IPv4/UDP lengths")]
    BadLength,
    /// An IPv4 fragment (DHCP is never fragmented; the edge does not reassemble).
    #[error("IPv4 fragment")]
    Fragmented,
    /// Neither ARP nor IPv4 (IPv6, VLAN-tagged, LLDP, ...).
    #[error("EtherType not served by the edge")]
    UnsupportedEtherType,
    /// IPv4 that is not DHCP to the server port: the data path's, not the edge's.
    #[error("IPv4 that is not DHCP")]
    NotEdgeTraffic,
    /// Ethernet source, ARP sender or DHCP client MAC is not the VM's.
    #[error("source MAC is not the VM's")]
    ForeignSourceMac,
    /// ARP for other than Ethernet/IPv4, or an operation other than request/reply.
    #[error("unsupported ARP")]
    ArpUnsupported,
    /// Not a DHCP message (bad hardware type/length, no magic cookie, options overrunning).
    #[error("malformed DHCP message")]
    DhcpMalformed,
    /// DHCP message without a message type option.
    #[error("DHCP message without a message type")]
    DhcpNoMessageType,
    /// A server message (BOOTREPLY, OFFER, ACK, NAK) or an unknown message type from the guest.
    #[error("DHCP message a client does not send")]
    DhcpUnexpectedMessage,
    /// The reply buffer is too small ([`MAX_REPLY_LEN`] always suffices).
    #[error("reply buffer too small")]
    ReplyBufferTooSmall,
}

impl EdgeDrop {
    /// Every reason, in declaration order.
    pub const ALL: &'static [EdgeDrop] = &[
        EdgeDrop::Truncated,
        EdgeDrop::BadLength,
        EdgeDrop::Fragmented,
        EdgeDrop::UnsupportedEtherType,
        EdgeDrop::NotEdgeTraffic,
        EdgeDrop::ForeignSourceMac,
        EdgeDrop::ArpUnsupported,
        EdgeDrop::DhcpMalformed,
        EdgeDrop::DhcpNoMessageType,
        EdgeDrop::DhcpUnexpectedMessage,
        EdgeDrop::ReplyBufferTooSmall,
    ];

    /// Stable snake_case name.
    pub const fn as_str(self) -> &'static str {
        match self {
            EdgeDrop::Truncated => "truncated",
            EdgeDrop::BadLength => "bad_length",
            EdgeDrop::Fragmented => "fragmented",
            EdgeDrop::UnsupportedEtherType => "unsupported_ethertype",
            EdgeDrop::NotEdgeTraffic => "not_edge_traffic",
            EdgeDrop::ForeignSourceMac => "foreign_source_mac",
            EdgeDrop::ArpUnsupported => "arp_unsupported",
            EdgeDrop::DhcpMalformed => "dhcp_malformed",
            EdgeDrop::DhcpNoMessageType => "dhcp_no_message_type",
            EdgeDrop::DhcpUnexpectedMessage => "dhcp_unexpected_message",
            EdgeDrop::ReplyBufferTooSmall => "reply_buffer_too_small",
        }
    }
}

/// Answers an ARP or DHCP frame from the guest (`frame`: Ethernet header onwards, no
/// virtio-net header), writing the reply frame into `out`.
///
/// `Ok(Some(len))`: deliver `out[..len]` to the guest. `Ok(None)`: a valid frame that needs no
/// answer (gratuitous ARP, DHCP RELEASE, ...). `Err(reason)`: drop and count. An `out` of
/// [`MAX_REPLY_LEN`] bytes is always large enough.
pub fn respond(cfg: &EdgeConfig, frame: &[u8], out: &mut [u8]) -> Result<Option<usize>, EdgeDrop> {
    let eth = EthernetFrame::parse(frame)?;
    if eth.src() != cfg.vm_mac {
        return Err(EdgeDrop::ForeignSourceMac);
    }
    match eth.ethertype() {
        ETHERTYPE_ARP => arp::respond(cfg, &eth, out),
        ETHERTYPE_IPV4 => {
            let datagram = wire::Ipv4Udp::parse(eth.payload())?;
            if datagram.dst_port != dhcp::SERVER_PORT {
                return Err(EdgeDrop::NotEdgeTraffic);
            }
            dhcp::respond(cfg, &datagram, out)
        }
        _ => Err(EdgeDrop::UnsupportedEtherType),
    }
}

/// The Ethernet header of a packet the router delivers to the guest: to the VM's MAC, from the
/// router's, IPv4.
pub fn guest_ethernet_header(cfg: &EdgeConfig) -> [u8; 14] {
    let mut header = [0u8; 14];
    header[0..6].copy_from_slice(&cfg.vm_mac);
    header[6..12].copy_from_slice(&cfg.router_mac);
    header[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    header
}

#[cfg(test)]
pub(crate) mod tests {
    use super::dhcp::tests::client_frame;
    use super::dhcp::MessageType;
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn test_config() -> EdgeConfig {
        EdgeConfig {
            vm_mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
            vm_ip: Ipv4Addr::new(10, 1, 0, 10),
            prefix_len: 24,
            router_ip: Ipv4Addr::new(10, 1, 0, 1),
            router_mac: ROUTER_MAC,
            mtu: 1452,
            hostname: "vm-a".to_string(),
            lease_secs: 3600,
            dns: Some(Ipv4Addr::new(10, 1, 0, 53)),
        }
    }

    fn ipv4_udp_frame(dst_port: u16) -> Vec<u8> {
        let cfg = test_config();
        let mut frame = client_frame(
            cfg.vm_mac,
            MessageType::Discover,
            0,
            Ipv4Addr::UNSPECIFIED,
            &[],
        );
        frame[36..38].copy_from_slice(&dst_port.to_be_bytes());
        frame
    }

    #[test]
    fn classifies_by_ethertype_and_udp_port() {
        let dhcp = ipv4_udp_frame(67);
        assert_eq!(classify(&dhcp), FrameKind::Dhcp);
        assert_eq!(classify(&dhcp[..CLASSIFY_PREFIX_LEN]), FrameKind::Dhcp);
        assert_eq!(classify(&ipv4_udp_frame(53)), FrameKind::Ipv4);
        let mut tcp = ipv4_udp_frame(67);
        tcp[23] = 6;
        assert_eq!(classify(&tcp), FrameKind::Ipv4);
        let mut later_fragment = dhcp.clone();
        later_fragment[21] = 1; // fragment offset 8 bytes
        assert_eq!(classify(&later_fragment), FrameKind::Ipv4);
        // Too short to see the ports: IPv4, left to the data path's checks.
        assert_eq!(classify(&dhcp[..30]), FrameKind::Ipv4);
        let mut arp = dhcp.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(classify(&arp), FrameKind::Arp);
        let mut ipv6 = dhcp.clone();
        ipv6[12..14].copy_from_slice(&[0x86, 0xdd]);
        assert_eq!(classify(&ipv6), FrameKind::Other);
        assert_eq!(classify(&dhcp[..13]), FrameKind::Other);
        assert_eq!(classify(&[]), FrameKind::Other);
    }

    #[test]
    fn respond_refuses_what_is_not_edge_traffic() {
        let cfg = test_config();
        let mut out = [0u8; MAX_REPLY_LEN];
        assert_eq!(
            respond(&cfg, &ipv4_udp_frame(53), &mut out),
            Err(EdgeDrop::NotEdgeTraffic)
        );
        let mut ipv6 = ipv4_udp_frame(67);
        ipv6[12..14].copy_from_slice(&[0x86, 0xdd]);
        assert_eq!(
            respond(&cfg, &ipv6, &mut out),
            Err(EdgeDrop::UnsupportedEtherType)
        );
        let mut foreign = ipv4_udp_frame(67);
        foreign[11] ^= 1;
        assert_eq!(
            respond(&cfg, &foreign, &mut out),
            Err(EdgeDrop::ForeignSourceMac)
        );
        assert_eq!(respond(&cfg, &[0; 10], &mut out), Err(EdgeDrop::Truncated));
    }

    #[test]
    fn guest_header_is_router_to_vm() {
        let cfg = test_config();
        let h = guest_ethernet_header(&cfg);
        assert_eq!(&h[0..6], &cfg.vm_mac);
        assert_eq!(&h[6..12], &ROUTER_MAC);
        assert_eq!(&h[12..14], &[0x08, 0x00]);
    }

    #[test]
    fn netmask_from_prefix() {
        let mut cfg = test_config();
        for (len, mask) in [
            (1, [128, 0, 0, 0]),
            (24, [255, 255, 255, 0]),
            (31, [255, 255, 255, 254]),
            (32, [255; 4]),
            (0, [0; 4]),
            (40, [255; 4]),
        ] {
            cfg.prefix_len = len;
            assert_eq!(cfg.netmask(), Ipv4Addr::from(mask), "/{len}");
        }
    }

    #[test]
    fn config_validation() {
        assert_eq!(test_config().validate(), Ok(()));
        let mut c = test_config();
        c.prefix_len = 0;
        assert_eq!(c.validate(), Err(EdgeConfigError::PrefixLen(0)));
        let mut c = test_config();
        c.mtu = 67;
        assert_eq!(c.validate(), Err(EdgeConfigError::Mtu(67)));
        let mut c = test_config();
        c.vm_mac = [0x01, 0, 0x5e, 0, 0, 1];
        assert!(matches!(
            c.validate(),
            Err(EdgeConfigError::Mac { which: "VM", .. })
        ));
        let mut c = test_config();
        c.router_mac = [0; 6];
        assert!(matches!(
            c.validate(),
            Err(EdgeConfigError::Mac {
                which: "router",
                ..
            })
        ));
        let mut c = test_config();
        c.hostname = "a b".into();
        assert!(matches!(c.validate(), Err(EdgeConfigError::Hostname(_))));
        c.hostname = "x".repeat(256);
        assert!(matches!(c.validate(), Err(EdgeConfigError::Hostname(_))));
        let mut c = test_config();
        c.router_ip = c.vm_ip;
        assert!(matches!(c.validate(), Err(EdgeConfigError::SameAddress(_))));
    }

    #[test]
    fn drop_names_are_unique_snake_case() {
        let mut names: Vec<_> = EdgeDrop::ALL.iter().map(|d| d.as_str()).collect();
        assert!(names
            .iter()
            .all(|n| n.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')));
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), EdgeDrop::ALL.len());
    }

    /// Valid frames the fuzzer mutates, so that it gets past the first checks.
    fn seed_frames() -> Vec<Vec<u8>> {
        let cfg = test_config();
        let mut request_options = vec![50, 4];
        request_options.extend_from_slice(&cfg.vm_ip.octets());
        vec![
            client_frame(
                cfg.vm_mac,
                MessageType::Discover,
                0,
                Ipv4Addr::UNSPECIFIED,
                &[],
            ),
            client_frame(
                cfg.vm_mac,
                MessageType::Request,
                0x8000,
                Ipv4Addr::UNSPECIFIED,
                &request_options,
            ),
            client_frame(cfg.vm_mac, MessageType::Request, 0, cfg.vm_ip, &[]),
            super::arp::tests::arp_frame(arp::OP_REQUEST, cfg.vm_mac, cfg.vm_ip, cfg.router_ip),
        ]
    }

    /// respond + classify on arbitrary input: never panic, and a reply always fits the buffer
    /// and is a well-formed frame.
    fn check_total(frame: &[u8], out_len: usize) {
        let cfg = test_config();
        let _ = classify(frame);
        let mut out = vec![0u8; out_len];
        if let Ok(Some(len)) = respond(&cfg, frame, &mut out) {
            assert!(len <= out_len);
            assert!(len >= wire::ETH_MIN_FRAME_LEN);
            let reply = EthernetFrame::parse(&out[..len]).unwrap();
            assert_eq!(reply.src(), ROUTER_MAC);
            if reply.ethertype() == ETHERTYPE_IPV4 {
                // A DHCP reply: consistent lengths and a valid IPv4 header checksum.
                let datagram = wire::Ipv4Udp::parse(reply.payload()).unwrap();
                assert_eq!((datagram.src_port, datagram.dst_port), (67, 68));
                assert_eq!(wire::internet_checksum(&[&reply.payload()[..20]]), 0);
            } else {
                assert_eq!(reply.ethertype(), ETHERTYPE_ARP);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn random_bytes_never_panic(frame in proptest::collection::vec(any::<u8>(), 0..700), out_len in 0usize..700) {
            check_total(&frame, out_len);
        }

        #[test]
        fn mutated_valid_frames_never_panic(
            seed in 0usize..4,
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
            cut in any::<usize>(),
        ) {
            let mut frame = seed_frames().swap_remove(seed);
            // Keep the VM's MAC often enough that mutations reach the DHCP/ARP parsers.
            for (at, value) in flips {
                let at = 12 + at % (frame.len() - 12);
                frame[at] = value;
            }
            let cut = cut % (frame.len() + 1);
            check_total(&frame[..cut], MAX_REPLY_LEN);
            check_total(&frame, MAX_REPLY_LEN);
        }
    }
}
