//! The guest edge: what a VM sees of the network besides its own IPv4 traffic.
//!
//! The virtual network is layer 3 (like GCE's): the only other station on a VM's link is a
//! virtual router that vnpd plays. It answers ARP for every address with [`ROUTER_MAC`], so the
//! guest hands every packet to the router, and it serves DHCP with the VM's address from the
//! registry, so a stock guest (busybox `udhcpc`, systemd-networkd, dhclient) configures itself:
//! address and prefix, router, MTU (underlay MTU minus the VNP encapsulation), hostname, lease
//! and DNS when one is configured.
//!
//! It also behaves like a router towards the guest: it answers ICMP echo to its own address,
//! and answers an IPv4 packet larger than the network's MTU with DF set with ICMP
//! "fragmentation needed" carrying the MTU, so path-MTU discovery works.
//!
//! Everything here is pure: no I/O, no clocks. The data path classifies every frame the guest
//! sends once (`datapath::frame::classify`); plain IPv4 goes to the tunnel, what the router
//! answers goes to [`respond`] with its [`EdgeKind`], which writes the reply frame (Ethernet
//! header included, no virtio-net header) into a buffer the data path then delivers to the
//! guest's receive queue. Whatever the guest writes, `respond` returns a reply, nothing, or an
//! [`EdgeDrop`] reason to count; it never panics (a property test feeds it random frames).
//!
//! Packets are read and written with the views of `vnp_protocol::wire`; DHCP messages are
//! decoded and encoded by the `dhcproto` crate. Modules: [`arp`], [`dhcp`], [`icmp`] (echo,
//! fragmentation needed, the rate limiter), [`reply`] (Ethernet + IPv4 reply headers).

pub mod arp;
pub mod dhcp;
pub mod icmp;
pub mod reply;

use std::net::Ipv4Addr;

pub use dhcp::MAX_REPLY_LEN;

use vnp_protocol::wire::ethernet::{ethertype, Frame};

/// The virtual router's MAC: locally administered (bit 1 of the first byte), unicast, the same
/// on every host so that a migrated guest's ARP cache stays valid. Bytes 2..5 spell "vnp".
pub const ROUTER_MAC: [u8; 6] = [0x02, 0x00, 0x76, 0x6e, 0x70, 0x01];

/// Default DHCP lease. Leases cost nothing here (the address is the VM's for as long as it is
/// attached), so the lease only bounds how long a guest keeps a stale configuration.
pub const DEFAULT_LEASE_SECS: u32 = 24 * 60 * 60;

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

/// Which answer a guest frame wants from the edge. The data path's one classification
/// (`datapath::frame::classify`) decides; [`respond`] checks again only what it relies on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EdgeKind {
    /// ARP: answered with the router's MAC.
    Arp,
    /// DHCP to the server port: answered with the VM's configuration.
    Dhcp,
    /// ICMP echo request to the router address: answered with an echo reply.
    Echo,
    /// IPv4 larger than the MTU with DF set: answered with ICMP "fragmentation needed". The
    /// frame may be only its first bytes (Ethernet, IPv4 header, 8 bytes).
    FragNeeded,
}

impl EdgeKind {
    /// Whether the answer is an ICMP message (rate-limited per VM).
    pub const fn is_icmp(self) -> bool {
        matches!(self, EdgeKind::Echo | EdgeKind::FragNeeded)
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
    /// An ICMP echo request whose checksum does not verify.
    #[error("bad checksum")]
    BadChecksum,
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
        EdgeDrop::BadChecksum,
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
            EdgeDrop::BadChecksum => "bad_checksum",
        }
    }
}

/// Answers a frame from the guest that [`EdgeKind`] says the edge serves (`frame`: Ethernet
/// header onwards, no virtio-net header), writing the reply frame into `out`.
///
/// `Ok(Some(len))`: deliver `out[..len]` to the guest. `Ok(None)`: a valid frame that needs no
/// answer (gratuitous ARP, DHCP RELEASE, ...). `Err(reason)`: drop and count. An `out` of
/// [`MAX_REPLY_LEN`] bytes, or of the frame's length if longer, is always large enough.
pub fn respond(
    cfg: &EdgeConfig,
    kind: EdgeKind,
    frame: &[u8],
    out: &mut [u8],
) -> Result<Option<usize>, EdgeDrop> {
    let eth = Frame::new_checked(frame).map_err(|_| EdgeDrop::Truncated)?;
    if eth.src_addr() != cfg.vm_mac {
        return Err(EdgeDrop::ForeignSourceMac);
    }
    let wanted = match kind {
        EdgeKind::Arp => ethertype::ARP,
        EdgeKind::Dhcp | EdgeKind::Echo | EdgeKind::FragNeeded => ethertype::IPV4,
    };
    if eth.ethertype() != wanted {
        return Err(EdgeDrop::UnsupportedEtherType);
    }
    match kind {
        EdgeKind::Arp => arp::respond(cfg, eth.payload(), out),
        EdgeKind::Dhcp => dhcp::respond(cfg, eth.payload(), out),
        EdgeKind::Echo => icmp::echo_reply(cfg, frame, out).map(Some),
        EdgeKind::FragNeeded => icmp::frag_needed(cfg, frame, out).map(Some),
    }
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

    pub(crate) fn ipv4_udp_frame(dst_port: u16) -> Vec<u8> {
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
    fn respond_refuses_what_is_not_edge_traffic() {
        let cfg = test_config();
        let mut out = [0u8; MAX_REPLY_LEN];
        assert_eq!(
            respond(&cfg, EdgeKind::Dhcp, &ipv4_udp_frame(53), &mut out),
            Err(EdgeDrop::NotEdgeTraffic)
        );
        let mut ipv6 = ipv4_udp_frame(67);
        ipv6[12..14].copy_from_slice(&[0x86, 0xdd]);
        assert_eq!(
            respond(&cfg, EdgeKind::Dhcp, &ipv6, &mut out),
            Err(EdgeDrop::UnsupportedEtherType)
        );
        let mut foreign = ipv4_udp_frame(67);
        foreign[11] ^= 1;
        assert_eq!(
            respond(&cfg, EdgeKind::Dhcp, &foreign, &mut out),
            Err(EdgeDrop::ForeignSourceMac)
        );
        assert_eq!(
            respond(&cfg, EdgeKind::Arp, &[0; 10], &mut out),
            Err(EdgeDrop::Truncated)
        );
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

    /// A ping of the router from the VM.
    fn echo_request_frame(cfg: &EdgeConfig) -> Vec<u8> {
        use vnp_protocol::wire::{ethernet, icmpv4, ipv4};
        let mut f = ethernet::header(cfg.router_mac, cfg.vm_mac, ethertype::IPV4).to_vec();
        f.resize(14 + 20 + 16, 0);
        let mut ip = ipv4::Packet::new_unchecked(&mut f[14..]);
        ipv4::Repr {
            src_addr: cfg.vm_ip,
            dst_addr: cfg.router_ip,
            protocol: ipv4::protocol::ICMP,
            payload_len: 16,
            ttl: 64,
        }
        .emit(&mut ip);
        let mut icmp = icmpv4::Packet::new_unchecked(ip.payload_mut());
        icmp.set_msg_type(icmpv4::msg_type::ECHO_REQUEST);
        icmp.fill_checksum();
        f
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
            echo_request_frame(&cfg),
        ]
    }

    /// respond (as every kind) on arbitrary input: never panic, and a reply always fits the
    /// buffer and is a well-formed frame from the router.
    fn check_total(frame: &[u8], out_len: usize) {
        let cfg = test_config();
        let kinds = [
            EdgeKind::Arp,
            EdgeKind::Dhcp,
            EdgeKind::Echo,
            EdgeKind::FragNeeded,
        ];
        for kind in kinds {
            let mut out = vec![0u8; out_len];
            if let Ok(Some(len)) = respond(&cfg, kind, frame, &mut out) {
                check_reply(&cfg, kind, &out[..len]);
            }
        }
    }

    fn check_reply(cfg: &EdgeConfig, kind: EdgeKind, reply: &[u8]) {
        use vnp_protocol::wire::{ethernet, icmpv4, ipv4, udp};
        assert!(reply.len() >= ethernet::MIN_FRAME_LEN);
        let eth = Frame::new_checked(reply).unwrap();
        assert_eq!(eth.src_addr(), ROUTER_MAC);
        if kind == EdgeKind::Arp {
            assert_eq!(eth.ethertype(), ethertype::ARP);
            return;
        }
        assert_eq!(eth.ethertype(), ethertype::IPV4);
        // Consistent lengths and valid checksums.
        let ip = ipv4::Packet::new_checked(eth.payload()).unwrap();
        ip.check_len(eth.payload().len()).unwrap();
        assert!(ip.verify_checksum());
        assert_eq!(ip.src_addr(), cfg.router_ip);
        if kind == EdgeKind::Dhcp {
            let datagram = udp::Packet::new_checked(ip.payload()).unwrap();
            assert_eq!((datagram.src_port(), datagram.dst_port()), (67, 68));
            assert!(datagram.verify_checksum(ip.src_addr(), ip.dst_addr()));
        } else {
            assert!(icmpv4::Packet::new_checked(ip.payload())
                .unwrap()
                .verify_checksum());
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
            seed in 0usize..5,
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
