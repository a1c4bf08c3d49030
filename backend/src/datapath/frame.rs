//! What a guest frame is, from its first bytes (Ethernet header + IPv4 header). Pure.

use std::net::Ipv4Addr;

use crate::metrics::counters::DropReason;

/// Ethernet header length.
pub const ETH_HLEN: usize = 14;
/// Ethertype of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// Ethertype of ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// Bytes of a frame the classifier looks at: Ethernet, the longest IPv4 header, a UDP header.
pub const CLASSIFY_PREFIX: usize = ETH_HLEN + 60 + 8;

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
    /// ARP or DHCP: answered locally by the edge.
    Edge,
    /// Dropped and counted.
    Drop(DropReason),
}

fn is_dhcp_to_server(ip: &[u8], frame_ip_len: usize) -> bool {
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    ip[9] == 17 // UDP
        && frame_ip_len >= ihl + 8
        && ip.len() >= ihl + 4
        && u16::from_be_bytes([ip[ihl + 2], ip[ihl + 3]]) == 67
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
    if prefix.len() < ETH_HLEN || frame_len < ETH_HLEN {
        return TxClass::Drop(DropReason::TxTruncatedHeader);
    }
    match u16::from_be_bytes([prefix[12], prefix[13]]) {
        ETHERTYPE_ARP => return TxClass::Edge,
        ETHERTYPE_IPV4 => {}
        _ => return TxClass::Drop(DropReason::TxNonIpv4),
    }
    let ip = &prefix[ETH_HLEN..];
    let ip_len = frame_len - ETH_HLEN;
    if ip.len() < 20 || ip[0] >> 4 != 4 {
        return TxClass::Drop(DropReason::TxMalformedIpv4);
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if ihl < 20 || total_len < ihl || total_len > ip_len || ip.len() < ihl.min(ip_len) {
        return TxClass::Drop(DropReason::TxMalformedIpv4);
    }
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    if is_dhcp_to_server(ip, ip_len)
        && (dst.is_broadcast() || dst == net.router_ip || src.is_unspecified())
    {
        return TxClass::Edge;
    }
    if total_len > usize::from(net.mtu) {
        return TxClass::Drop(DropReason::TxOversize);
    }
    if src != net.vm_ip {
        return TxClass::Drop(DropReason::TxSpoofedSource);
    }
    if !is_unicast_destination(net, dst) {
        return TxClass::Drop(DropReason::TxNonUnicast);
    }
    TxClass::Ipv4 { dst, total_len }
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
}
