//! ARP (RFC 826) for Ethernet/IPv4, answered by the virtual router.
//!
//! The virtual network is layer 3: no other machine shares the guest's link, so the router
//! answers a request for *any* address with its own MAC and every packet leaves the guest
//! addressed to the router, wherever its IPv4 destination is. Requests for the guest's own
//! address (duplicate address detection) and gratuitous announcements get no answer, so the
//! guest never believes its address is taken.

use std::net::Ipv4Addr;

use super::wire::{self, EthernetFrame, Writer, ETHERTYPE_ARP, ETHERTYPE_IPV4, ETH_MIN_FRAME_LEN};
use super::{EdgeConfig, EdgeDrop};

/// An Ethernet/IPv4 ARP packet: hardware type (2), protocol type (2), hardware length (1),
/// protocol length (1), operation (2), sender MAC (6), sender IPv4 (4), target MAC (6),
/// target IPv4 (4).
pub const ARP_PACKET_LEN: usize = 28;
/// ARP hardware type of Ethernet.
const HTYPE_ETHERNET: u16 = 1;
/// ARP operation: request.
pub const OP_REQUEST: u16 = 1;
/// ARP operation: reply.
pub const OP_REPLY: u16 = 2;

/// A checked view of an Ethernet/IPv4 ARP packet.
#[derive(Debug, Clone, Copy)]
pub struct ArpPacket<'a> {
    bytes: &'a [u8],
}

impl<'a> ArpPacket<'a> {
    /// Checks the length and that it is Ethernet/IPv4 ARP (the only kind a guest needs).
    pub fn parse(bytes: &'a [u8]) -> Result<Self, EdgeDrop> {
        if bytes.len() < ARP_PACKET_LEN {
            return Err(EdgeDrop::Truncated);
        }
        let htype = u16::from_be_bytes([bytes[0], bytes[1]]);
        let ptype = u16::from_be_bytes([bytes[2], bytes[3]]);
        if htype != HTYPE_ETHERNET || ptype != ETHERTYPE_IPV4 || bytes[4] != 6 || bytes[5] != 4 {
            return Err(EdgeDrop::ArpUnsupported);
        }
        Ok(ArpPacket { bytes })
    }

    /// Operation (1 request, 2 reply, others are RARP/InARP).
    pub fn operation(&self) -> u16 {
        u16::from_be_bytes([self.bytes[6], self.bytes[7]])
    }

    /// Sender hardware address.
    pub fn sender_mac(&self) -> [u8; 6] {
        wire::mac_at(self.bytes, 8)
    }

    /// Sender protocol address (0.0.0.0 in an RFC 5227 probe).
    pub fn sender_ip(&self) -> Ipv4Addr {
        wire::ipv4_at(self.bytes, 14)
    }

    /// Target hardware address (ignored in requests).
    pub fn target_mac(&self) -> [u8; 6] {
        wire::mac_at(self.bytes, 18)
    }

    /// Target protocol address: whose MAC the sender wants.
    pub fn target_ip(&self) -> Ipv4Addr {
        wire::ipv4_at(self.bytes, 24)
    }
}

/// Answers an ARP frame from the guest; see the module documentation for the policy.
pub fn respond(
    cfg: &EdgeConfig,
    eth: &EthernetFrame<'_>,
    out: &mut [u8],
) -> Result<Option<usize>, EdgeDrop> {
    let arp = ArpPacket::parse(eth.payload())?;
    match arp.operation() {
        OP_REQUEST => {}
        // The guest answering someone: nobody asks it anything, nothing to do.
        OP_REPLY => return Ok(None),
        _ => return Err(EdgeDrop::ArpUnsupported),
    }
    if arp.sender_mac() != cfg.vm_mac {
        return Err(EdgeDrop::ForeignSourceMac);
    }
    let target = arp.target_ip();
    // Gratuitous ARP (sender == target) announces, and a request for the guest's own address
    // checks for a duplicate: in both cases silence is the right answer.
    if target == arp.sender_ip() || target == cfg.vm_ip {
        return Ok(None);
    }
    let mut w = Writer::new(out);
    wire::put_ethernet(&mut w, arp.sender_mac(), cfg.router_mac, ETHERTYPE_ARP)?;
    w.put(&HTYPE_ETHERNET.to_be_bytes())?;
    w.put(&ETHERTYPE_IPV4.to_be_bytes())?;
    w.put(&[6, 4])?;
    w.put(&OP_REPLY.to_be_bytes())?;
    w.put(&cfg.router_mac)?;
    w.put(&target.octets())?;
    w.put(&arp.sender_mac())?;
    w.put(&arp.sender_ip().octets())?;
    w.pad_to(ETH_MIN_FRAME_LEN)?;
    Ok(Some(w.len()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::tests::test_config;
    use super::super::{respond as edge_respond, ROUTER_MAC};
    use super::*;

    /// An ARP frame from `sender` (MAC, IP) asking for `target`.
    pub(crate) fn arp_frame(op: u16, mac: [u8; 6], sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&wire::BROADCAST_MAC);
        f.extend_from_slice(&mac);
        f.extend_from_slice(&ETHERTYPE_ARP.to_be_bytes());
        f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4]);
        f.extend_from_slice(&op.to_be_bytes());
        f.extend_from_slice(&mac);
        f.extend_from_slice(&sender.octets());
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&target.octets());
        f
    }

    #[test]
    fn request_for_the_gateway_is_answered_with_the_router_mac() {
        let cfg = test_config();
        let frame = arp_frame(OP_REQUEST, cfg.vm_mac, cfg.vm_ip, cfg.router_ip);
        let mut out = [0u8; 128];
        let len = edge_respond(&cfg, &frame, &mut out).unwrap().unwrap();
        assert_eq!(len, ETH_MIN_FRAME_LEN);
        let eth = EthernetFrame::parse(&out[..len]).unwrap();
        assert_eq!(eth.dst(), cfg.vm_mac);
        assert_eq!(eth.src(), ROUTER_MAC);
        assert_eq!(eth.ethertype(), ETHERTYPE_ARP);
        let reply = ArpPacket::parse(eth.payload()).unwrap();
        assert_eq!(reply.operation(), OP_REPLY);
        assert_eq!(reply.sender_mac(), ROUTER_MAC);
        assert_eq!(reply.sender_ip(), cfg.router_ip);
        assert_eq!(reply.target_mac(), cfg.vm_mac);
        assert_eq!(reply.target_ip(), cfg.vm_ip);
        assert!(
            out[14 + ARP_PACKET_LEN..len].iter().all(|b| *b == 0),
            "zero padding"
        );
    }

    #[test]
    fn any_other_address_is_the_router_too() {
        let cfg = test_config();
        for target in [Ipv4Addr::new(10, 1, 2, 77), Ipv4Addr::new(192, 0, 2, 1)] {
            let frame = arp_frame(OP_REQUEST, cfg.vm_mac, cfg.vm_ip, target);
            let mut out = [0u8; 60];
            let len = edge_respond(&cfg, &frame, &mut out).unwrap().unwrap();
            let reply = ArpPacket::parse(&out[14..len]).unwrap();
            assert_eq!(
                (reply.sender_mac(), reply.sender_ip()),
                (ROUTER_MAC, target)
            );
        }
    }

    #[test]
    fn gratuitous_and_duplicate_address_probes_get_no_answer() {
        let cfg = test_config();
        let mut out = [0u8; 60];
        // Gratuitous announcement.
        let frame = arp_frame(OP_REQUEST, cfg.vm_mac, cfg.vm_ip, cfg.vm_ip);
        assert_eq!(edge_respond(&cfg, &frame, &mut out), Ok(None));
        // RFC 5227 probe for its own address.
        let frame = arp_frame(OP_REQUEST, cfg.vm_mac, Ipv4Addr::UNSPECIFIED, cfg.vm_ip);
        assert_eq!(edge_respond(&cfg, &frame, &mut out), Ok(None));
        // A reply from the guest.
        let frame = arp_frame(OP_REPLY, cfg.vm_mac, cfg.vm_ip, cfg.router_ip);
        assert_eq!(edge_respond(&cfg, &frame, &mut out), Ok(None));
    }

    #[test]
    fn refusals_have_reasons() {
        let cfg = test_config();
        let mut out = [0u8; 60];
        let good = arp_frame(OP_REQUEST, cfg.vm_mac, cfg.vm_ip, cfg.router_ip);
        // RARP request.
        let mut rarp = good.clone();
        rarp[21] = 3;
        assert_eq!(
            edge_respond(&cfg, &rarp, &mut out),
            Err(EdgeDrop::ArpUnsupported)
        );
        // Not Ethernet/IPv4.
        let mut ipv6 = good.clone();
        ipv6[19] = 6;
        assert_eq!(
            edge_respond(&cfg, &ipv6, &mut out),
            Err(EdgeDrop::ArpUnsupported)
        );
        // Truncated.
        assert_eq!(
            edge_respond(&cfg, &good[..40], &mut out),
            Err(EdgeDrop::Truncated)
        );
        // A MAC that is not the VM's, in the ARP body only.
        let mut foreign = good.clone();
        foreign[22] ^= 0x10;
        assert_eq!(
            edge_respond(&cfg, &foreign, &mut out),
            Err(EdgeDrop::ForeignSourceMac)
        );
        // Reply buffer shorter than a minimum frame.
        let mut small = [0u8; 59];
        assert_eq!(
            edge_respond(&cfg, &good, &mut small),
            Err(EdgeDrop::ReplyBufferTooSmall)
        );
    }
}
