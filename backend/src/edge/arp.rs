//! ARP (RFC 826) for Ethernet/IPv4, answered by the virtual router.
//!
//! The virtual network is layer 3: no other machine shares the guest's link, so the router
//! answers a request for *any* address with its own MAC and every packet leaves the guest
//! addressed to the router, wherever its IPv4 destination is. Requests for the guest's own
//! address (duplicate address detection) and gratuitous announcements get no answer, so the
//! guest never believes its address is taken.

use vnp_protocol::wire::arp::{self, Packet};
pub use vnp_protocol::wire::arp::{OP_REPLY, OP_REQUEST};
use vnp_protocol::wire::ethernet::{self, ethertype, Frame};

use super::{EdgeConfig, EdgeDrop};

/// Length of an Ethernet/IPv4 ARP packet.
pub const ARP_PACKET_LEN: usize = arp::PACKET_LEN;

/// Answers an ARP packet (`payload`: the Ethernet payload) from the guest; see the module
/// documentation for the policy.
pub fn respond(
    cfg: &EdgeConfig,
    payload: &[u8],
    out: &mut [u8],
) -> Result<Option<usize>, EdgeDrop> {
    let request = Packet::new_checked(payload).map_err(|_| EdgeDrop::Truncated)?;
    if !request.is_ethernet_ipv4() {
        return Err(EdgeDrop::ArpUnsupported);
    }
    match request.operation() {
        OP_REQUEST => {}
        // The guest answering someone: nobody asks it anything, nothing to do.
        OP_REPLY => return Ok(None),
        _ => return Err(EdgeDrop::ArpUnsupported),
    }
    if request.sender_hardware_addr() != cfg.vm_mac {
        return Err(EdgeDrop::ForeignSourceMac);
    }
    let target = request.target_protocol_addr();
    // Gratuitous ARP (sender == target) announces, and a request for the guest's own address
    // checks for a duplicate: in both cases silence is the right answer.
    if target == request.sender_protocol_addr() || target == cfg.vm_ip {
        return Ok(None);
    }
    let frame = out
        .get_mut(..ethernet::MIN_FRAME_LEN)
        .ok_or(EdgeDrop::ReplyBufferTooSmall)?;
    frame.fill(0);
    let mut eth = Frame::new_unchecked(&mut frame[..]);
    eth.set_dst_addr(request.sender_hardware_addr());
    eth.set_src_addr(cfg.router_mac);
    eth.set_ethertype(ethertype::ARP);
    let mut reply = Packet::new_unchecked(eth.payload_mut());
    reply.set_ethernet_ipv4();
    reply.set_operation(OP_REPLY);
    reply.set_sender_hardware_addr(cfg.router_mac);
    reply.set_sender_protocol_addr(target);
    reply.set_target_hardware_addr(request.sender_hardware_addr());
    reply.set_target_protocol_addr(request.sender_protocol_addr());
    Ok(Some(ethernet::MIN_FRAME_LEN))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::tests::test_config;
    use super::super::{EdgeKind, ROUTER_MAC};
    use super::*;
    use std::net::Ipv4Addr;
    use vnp_protocol::wire::ethernet::MIN_FRAME_LEN as ETH_MIN_FRAME_LEN;

    /// The edge's answer to an ARP frame.
    fn edge_respond(
        cfg: &EdgeConfig,
        frame: &[u8],
        out: &mut [u8],
    ) -> Result<Option<usize>, EdgeDrop> {
        super::super::respond(cfg, EdgeKind::Arp, frame, out)
    }

    /// The reply's Ethernet frame and ARP packet.
    fn parse(reply: &[u8]) -> (Frame<&[u8]>, Packet<&[u8]>) {
        let eth = Frame::new_checked(reply).unwrap();
        let arp = Packet::new_checked(&reply[14..]).unwrap();
        (eth, arp)
    }

    /// An ARP frame from `sender` (MAC, IP) asking for `target`.
    pub(crate) fn arp_frame(op: u16, mac: [u8; 6], sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&ethernet::BROADCAST);
        f.extend_from_slice(&mac);
        f.extend_from_slice(&ethertype::ARP.to_be_bytes());
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
        let (eth, reply) = parse(&out[..len]);
        assert_eq!(eth.dst_addr(), cfg.vm_mac);
        assert_eq!(eth.src_addr(), ROUTER_MAC);
        assert_eq!(eth.ethertype(), ethertype::ARP);
        assert_eq!(reply.operation(), OP_REPLY);
        assert_eq!(reply.sender_hardware_addr(), ROUTER_MAC);
        assert_eq!(reply.sender_protocol_addr(), cfg.router_ip);
        assert_eq!(reply.target_hardware_addr(), cfg.vm_mac);
        assert_eq!(reply.target_protocol_addr(), cfg.vm_ip);
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
            let (_, reply) = parse(&out[..len]);
            assert_eq!(
                (reply.sender_hardware_addr(), reply.sender_protocol_addr()),
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
