//! What a guest frame is, from its first bytes (Ethernet header + IPv4 header + 8 bytes): the
//! one classification of guest frames. Pure.
//!
//! [`classify`] decides, in this order: ARP goes to the edge; anything but IPv4 is dropped; a
//! malformed IPv4 header is dropped; DHCP to the server port goes to the edge; a packet larger
//! than the MTU is dropped, and answered with ICMP "fragmentation needed" when it has DF set
//! (the virtual router does not fragment); a spoofed source is dropped; ICMP echo to the router
//! goes to the edge, other traffic to the router is dropped; non-unicast destinations are
//! dropped; everything else is tunnelled. The edge ([`super::edge_link`]) runs the same
//! function to know which answer a frame wants, so the two can never disagree.

use std::net::Ipv4Addr;

use vnp_protocol::wire::ethernet::{self, ethertype, Frame};
use vnp_protocol::wire::icmpv4::{self, msg_type};
use vnp_protocol::wire::ipv4::{self, protocol};
use vnp_protocol::wire::udp;

use crate::edge::dhcp::SERVER_PORT as DHCP_SERVER_PORT;
pub use crate::edge::EdgeKind;
use crate::metrics::counters::DropReason;

/// Ethernet header length.
pub const ETH_HLEN: usize = ethernet::HEADER_LEN;
/// Ethertype of IPv4.
pub const ETHERTYPE_IPV4: u16 = ethertype::IPV4;
/// Ethertype of ARP.
pub const ETHERTYPE_ARP: u16 = ethertype::ARP;
/// Bytes of a frame the classifier looks at: Ethernet, the longest IPv4 header and 8 bytes of
/// transport header (UDP ports, ICMP type) — also what an ICMP error quotes of a packet.
pub const CLASSIFY_PREFIX: usize = ETH_HLEN + ipv4::MAX_HEADER_LEN + 8;

/// The virtual network as one guest sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestNet {
    /// The guest's address.
    pub vm_ip: Ipv4Addr,
    /// Its prefix length.
    pub prefix_len: u8,
    /// The virtual router (DHCP server, default gateway).
    pub router_ip: Ipv4Addr,
    /// Largest inner IPv4 packet (underlay MTU minus encapsulation).
    pub mtu: u16,
}

/// What to do with a frame the guest sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxClass {
    /// An IPv4 unicast packet to encapsulate: `total_len` bytes starting after the Ethernet
    /// header, for the VM at `dst`.
    Ipv4 {
        /// Inner destination.
        dst: Ipv4Addr,
        /// Inner packet length (its IPv4 total length; Ethernet padding excluded).
        total_len: usize,
    },
    /// ARP, DHCP or ICMP echo to the router: the whole frame goes to the edge, which answers.
    Edge,
    /// Larger than the MTU with DF set: dropped as `tx_oversize`, and its first
    /// [`CLASSIFY_PREFIX`] bytes go to the edge, which answers with ICMP "fragmentation
    /// needed" quoting them.
    TooBig,
    /// Dropped and counted.
    Drop(DropReason),
    /// To the metadata address: a copy of the `total_len`-byte IPv4 packet goes to the VM's
    /// service bridge (`crate::bridge`), which answers it off the data path.
    Bridge {
        /// Inner packet length.
        total_len: usize,
    },
}

/// Where a guest frame goes: [`classify`]'s answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// To the tunnel: an IPv4 unicast packet of `total_len` bytes for `dst`.
    Tunnel {
        /// Inner destination.
        dst: Ipv4Addr,
        /// Inner packet length.
        total_len: usize,
    },
    /// To the edge, which answers it.
    Edge(EdgeKind),
}

/// Whether `dst` is an address one VM may send a unicast packet to.
pub fn is_unicast_destination(net: &GuestNet, dst: Ipv4Addr) -> bool {
    if dst.is_broadcast()
        || dst.is_multicast()
        || dst.is_unspecified()
        || dst.is_loopback()
        || dst == net.vm_ip
    {
        return false;
    }
    // The subnet's directed broadcast address.
    if (1..=30).contains(&net.prefix_len) {
        let host_mask = u32::MAX >> net.prefix_len;
        let net_bits = u32::from(net.vm_ip) & !host_mask;
        if u32::from(dst) == net_bits | host_mask {
            return false;
        }
    }
    true
}

/// Classifies a guest frame from `prefix` (its first bytes, up to [`CLASSIFY_PREFIX`]) and its
/// full length `frame_len` (virtio-net header excluded).
pub fn classify_tx(net: &GuestNet, prefix: &[u8], frame_len: usize) -> TxClass {
    match classify(net, prefix, frame_len) {
        // Service-bridge hook: the metadata address is served on this host, never tunnelled.
        Ok(Route::Tunnel { dst, total_len }) if dst == crate::bridge::METADATA_IP => {
            TxClass::Bridge { total_len }
        }
        Ok(Route::Tunnel { dst, total_len }) => TxClass::Ipv4 { dst, total_len },
        Ok(Route::Edge(EdgeKind::FragNeeded)) => TxClass::TooBig,
        Ok(Route::Edge(_)) => TxClass::Edge,
        Err(reason) => TxClass::Drop(reason),
    }
}

/// The one classification of guest frames; see the module documentation for the order.
pub fn classify(net: &GuestNet, prefix: &[u8], frame_len: usize) -> Result<Route, DropReason> {
    let eth = Frame::new_checked(prefix).map_err(|_| DropReason::TxTruncatedHeader)?;
    if frame_len < ETH_HLEN {
        return Err(DropReason::TxTruncatedHeader);
    }
    match eth.ethertype() {
        ETHERTYPE_ARP => return Ok(Route::Edge(EdgeKind::Arp)),
        ETHERTYPE_IPV4 => {}
        _ => return Err(DropReason::TxNonIpv4),
    }
    let ip = ipv4::Packet::new_checked(eth.payload()).map_err(|_| DropReason::TxMalformedIpv4)?;
    let ip_len = frame_len - ETH_HLEN;
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    let transport = Transport::of(&ip);
    if transport.udp_dst_port == Some(DHCP_SERVER_PORT)
        && ip.total_len() <= ip_len
        && (dst.is_broadcast() || dst == net.router_ip || src.is_unspecified())
    {
        return Ok(Route::Edge(EdgeKind::Dhcp));
    }
    // Before the length check: the header alone decides, so the edge can classify the prefix
    // the data path hands it and come to the same answer.
    if ip.total_len() > usize::from(net.mtu) {
        return too_big(net, &ip, &transport);
    }
    ip.check_len(ip_len)
        .map_err(|_| DropReason::TxMalformedIpv4)?;
    if src != net.vm_ip {
        return Err(DropReason::TxSpoofedSource);
    }
    if dst == net.router_ip {
        return match transport.icmp_type {
            Some(msg_type::ECHO_REQUEST) => Ok(Route::Edge(EdgeKind::Echo)),
            _ => Err(DropReason::TxToRouter),
        };
    }
    if !is_unicast_destination(net, dst) {
        return Err(DropReason::TxNonUnicast);
    }
    Ok(Route::Tunnel {
        dst,
        total_len: ip.total_len(),
    })
}

/// An oversize packet: ICMP "fragmentation needed" when a router would send one (DF set, from
/// the VM, the first fragment, not itself an ICMP error: RFC 1812 4.3.2.7), else a plain drop.
fn too_big(
    net: &GuestNet,
    ip: &ipv4::Packet<&[u8]>,
    transport: &Transport,
) -> Result<Route, DropReason> {
    let answerable = ip.dont_frag()
        && ip.src_addr() == net.vm_ip
        && !ip.is_later_fragment()
        && !transport.icmp_type.is_some_and(msg_type::is_error);
    if answerable {
        Ok(Route::Edge(EdgeKind::FragNeeded))
    } else {
        Err(DropReason::TxOversize)
    }
}

/// What the classifier reads of the transport header, when the prefix holds it.
struct Transport {
    udp_dst_port: Option<u16>,
    icmp_type: Option<u8>,
}

impl Transport {
    fn of(ip: &ipv4::Packet<&[u8]>) -> Self {
        let mut out = Transport {
            udp_dst_port: None,
            icmp_type: None,
        };
        // Only a first (or only) fragment starts with the transport header.
        if ip.is_later_fragment() {
            return out;
        }
        let payload = ip.payload();
        match ip.protocol() {
            protocol::UDP => {
                out.udp_dst_port = udp::Packet::new_checked(payload).ok().map(|u| u.dst_port())
            }
            protocol::ICMP => {
                out.icmp_type = icmpv4::Packet::new_checked(payload)
                    .ok()
                    .map(|i| i.msg_type())
            }
            _ => {}
        }
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const NET: GuestNet = GuestNet {
        vm_ip: Ipv4Addr::new(10, 0, 0, 2),
        prefix_len: 24,
        router_ip: Ipv4Addr::new(10, 0, 0, 1),
        mtu: 1452,
    };

    /// Ethernet + IPv4 header + 8 bytes of UDP header, total_len = 20 + 8 + payload.
    pub(crate) fn ipv4_frame(src: Ipv4Addr, dst: Ipv4Addr, dport: u16, payload: usize) -> Vec<u8> {
        let total = 28 + payload;
        let mut f = vec![0u8; ETH_HLEN + total];
        f[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        let ip = &mut f[ETH_HLEN..];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        ip[8] = 64;
        ip[9] = 17;
        ip[12..16].copy_from_slice(&src.octets());
        ip[16..20].copy_from_slice(&dst.octets());
        ip[22..24].copy_from_slice(&dport.to_be_bytes());
        f
    }

    fn classify(f: &[u8]) -> TxClass {
        classify_tx(&NET, &f[..f.len().min(CLASSIFY_PREFIX)], f.len())
    }

    #[test]
    fn unicast_ipv4() {
        let f = ipv4_frame(NET.vm_ip, Ipv4Addr::new(10, 0, 0, 3), 5000, 100);
        assert_eq!(
            classify(&f),
            TxClass::Ipv4 {
                dst: Ipv4Addr::new(10, 0, 0, 3),
                total_len: 128
            }
        );
        // Ethernet padding after the packet is not part of it.
        let mut padded = ipv4_frame(NET.vm_ip, Ipv4Addr::new(10, 0, 0, 3), 5000, 0);
        padded.resize(60, 0);
        assert_eq!(
            classify(&padded),
            TxClass::Ipv4 {
                dst: Ipv4Addr::new(10, 0, 0, 3),
                total_len: 28
            }
        );
    }

    #[test]
    fn the_metadata_address_goes_to_the_bridge() {
        let md = crate::bridge::METADATA_IP;
        let f = ipv4_frame(NET.vm_ip, md, 53, 40);
        assert_eq!(classify(&f), TxClass::Bridge { total_len: 68 });
        // Spoofed, it is dropped like any spoofed packet: the bridge never sees it.
        let spoof = ipv4_frame(Ipv4Addr::new(10, 0, 0, 9), md, 53, 40);
        assert_eq!(classify(&spoof), TxClass::Drop(DropReason::TxSpoofedSource));
    }

    #[test]
    fn dhcp_and_arp_go_to_edge() {
        let f = ipv4_frame(Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST, 67, 300);
        assert_eq!(classify(&f), TxClass::Edge);
        // A renewal goes to the router by unicast.
        let renew = ipv4_frame(NET.vm_ip, NET.router_ip, 67, 300);
        assert_eq!(classify(&renew), TxClass::Edge);
        let mut arp = vec![0u8; 42];
        arp[12..14].copy_from_slice(&ETHERTYPE_ARP.to_be_bytes());
        assert_eq!(classify(&arp), TxClass::Edge);
    }

    #[test]
    fn drops() {
        let mut v6 = vec![0u8; 60];
        v6[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
        assert_eq!(classify(&v6), TxClass::Drop(DropReason::TxNonIpv4));
        assert_eq!(
            classify(&[0u8; 10]),
            TxClass::Drop(DropReason::TxTruncatedHeader)
        );
        let bcast = ipv4_frame(NET.vm_ip, Ipv4Addr::new(10, 0, 0, 255), 9, 10);
        assert_eq!(classify(&bcast), TxClass::Drop(DropReason::TxNonUnicast));
        let mcast = ipv4_frame(NET.vm_ip, Ipv4Addr::new(224, 0, 0, 1), 9, 10);
        assert_eq!(classify(&mcast), TxClass::Drop(DropReason::TxNonUnicast));
        let spoof = ipv4_frame(
            Ipv4Addr::new(10, 0, 0, 77),
            Ipv4Addr::new(10, 0, 0, 3),
            9,
            10,
        );
        assert_eq!(classify(&spoof), TxClass::Drop(DropReason::TxSpoofedSource));
        let big = ipv4_frame(NET.vm_ip, Ipv4Addr::new(10, 0, 0, 3), 9, 1500);
        assert_eq!(classify(&big), TxClass::Drop(DropReason::TxOversize));
        // total length larger than the frame
        let mut short = ipv4_frame(NET.vm_ip, Ipv4Addr::new(10, 0, 0, 3), 9, 100);
        short.truncate(80);
        assert_eq!(classify(&short), TxClass::Drop(DropReason::TxMalformedIpv4));
        // bad IHL
        let mut ihl = ipv4_frame(NET.vm_ip, Ipv4Addr::new(10, 0, 0, 3), 9, 100);
        ihl[ETH_HLEN] = 0x43;
        assert_eq!(classify(&ihl), TxClass::Drop(DropReason::TxMalformedIpv4));
    }

    /// An ICMP message of `icmp_type` from `src` to `dst` in a frame, `total` bytes of IPv4,
    /// flags word `flags`.
    fn icmp_frame(
        src: Ipv4Addr,
        dst: Ipv4Addr,
        icmp_type: u8,
        flags: u16,
        total: usize,
    ) -> Vec<u8> {
        let mut f = ipv4_frame(src, dst, 0, total - 28);
        let ip = &mut f[ETH_HLEN..];
        ip[6..8].copy_from_slice(&flags.to_be_bytes());
        ip[9] = protocol::ICMP;
        ip[20..28].fill(0);
        ip[20] = icmp_type;
        f
    }

    const DF: u16 = 0x4000;

    #[test]
    fn echo_to_the_router_goes_to_the_edge_other_router_traffic_is_dropped() {
        let echo = icmp_frame(NET.vm_ip, NET.router_ip, msg_type::ECHO_REQUEST, 0, 84);
        assert_eq!(classify(&echo), TxClass::Edge);
        assert_eq!(
            super::classify(&NET, &echo, echo.len()),
            Ok(Route::Edge(EdgeKind::Echo))
        );
        let reply = icmp_frame(NET.vm_ip, NET.router_ip, msg_type::ECHO_REPLY, 0, 84);
        assert_eq!(classify(&reply), TxClass::Drop(DropReason::TxToRouter));
        let udp = ipv4_frame(NET.vm_ip, NET.router_ip, 53, 10);
        assert_eq!(classify(&udp), TxClass::Drop(DropReason::TxToRouter));
        // A ping of another VM is tunnelled like any packet.
        let peer = icmp_frame(NET.vm_ip, Ipv4Addr::new(10, 0, 0, 3), 8, 0, 84);
        assert!(matches!(
            classify(&peer),
            TxClass::Ipv4 { total_len: 84, .. }
        ));
    }

    #[test]
    fn oversize_with_df_is_too_big_and_the_prefix_alone_says_so() {
        let dst = Ipv4Addr::new(10, 0, 0, 3);
        let mut big = ipv4_frame(NET.vm_ip, dst, 9, 1500);
        big[ETH_HLEN + 6] = 0x40; // DF
        assert_eq!(classify(&big), TxClass::TooBig);
        // What the edge gets is only the prefix: same answer.
        let prefix = &big[..CLASSIFY_PREFIX];
        assert_eq!(
            super::classify(&NET, prefix, prefix.len()),
            Ok(Route::Edge(EdgeKind::FragNeeded))
        );
        // Exactly the MTU is fine.
        let mut at_mtu = ipv4_frame(NET.vm_ip, dst, 9, usize::from(NET.mtu) - 28);
        at_mtu[ETH_HLEN + 6] = 0x40;
        assert!(matches!(classify(&at_mtu), TxClass::Ipv4 { .. }));
        // Not answered: without DF, spoofed, a later fragment, an ICMP error.
        let no_df = ipv4_frame(NET.vm_ip, dst, 9, 1500);
        assert_eq!(classify(&no_df), TxClass::Drop(DropReason::TxOversize));
        let mut spoofed = big.clone();
        spoofed[ETH_HLEN + 15] = 99;
        assert_eq!(classify(&spoofed), TxClass::Drop(DropReason::TxOversize));
        let mut later = big.clone();
        later[ETH_HLEN + 7] = 1;
        assert_eq!(classify(&later), TxClass::Drop(DropReason::TxOversize));
        let error = icmp_frame(NET.vm_ip, dst, msg_type::DST_UNREACHABLE, DF, 1500);
        assert_eq!(classify(&error), TxClass::Drop(DropReason::TxOversize));
        let echo = icmp_frame(NET.vm_ip, dst, msg_type::ECHO_REQUEST, DF, 1500);
        assert_eq!(classify(&echo), TxClass::TooBig);
    }

    /// What `edge::classify` (now gone) decided, checked against the one classification: only
    /// a first fragment to UDP port 67 is DHCP, from any prefix that holds the ports.
    #[test]
    fn dhcp_needs_the_udp_port_of_a_first_fragment() {
        let dhcp = ipv4_frame(Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST, 67, 300);
        assert_eq!(classify(&dhcp), TxClass::Edge);
        assert_eq!(
            classify_tx(&NET, &dhcp[..ETH_HLEN + 28], dhcp.len()),
            TxClass::Edge
        );
        let mut other_port = dhcp.clone();
        other_port[ETH_HLEN + 23] = 53;
        // From 0.0.0.0 and not DHCP: a spoofed source.
        assert_eq!(
            classify(&other_port),
            TxClass::Drop(DropReason::TxSpoofedSource)
        );
        let mut tcp = dhcp.clone();
        tcp[ETH_HLEN + 9] = protocol::TCP;
        assert_eq!(classify(&tcp), TxClass::Drop(DropReason::TxSpoofedSource));
        let mut later_fragment = dhcp.clone();
        later_fragment[ETH_HLEN + 7] = 1; // fragment offset 8 bytes
        assert_eq!(
            classify(&later_fragment),
            TxClass::Drop(DropReason::TxSpoofedSource)
        );
        // Too short to see the ports: not DHCP (and here, malformed).
        assert_eq!(
            classify_tx(&NET, &dhcp[..30], 30),
            TxClass::Drop(DropReason::TxMalformedIpv4)
        );
    }
}
