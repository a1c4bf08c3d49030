//! The edge target: what vnpd answers locally for a guest. ARP, DHCP (through `dhcproto`) and
//! the router's ICMP (echo, fragmentation needed): `vnpd::edge::respond` directly for any kind,
//! and `vnpd::datapath::edge_link::reply`, which classifies the frame first as the data path does
//! and rate-limits ICMP.
//!
//! Input: a mode byte, then an Ethernet frame from the guest. Mode bits 0-1 pick the
//! [`EdgeKind`] handed to `respond`; bit 2 ([`OWN_MAC`]) writes the VM's MAC as the frame's
//! source and as the DHCP client hardware address, which the edge insists on (random bytes
//! would never match six of them); bit 3 ([`EDGE_CASE_CONFIG`]) serves a valid but extreme
//! configuration (/32, MTU 68, no hostname, no DNS, infinite lease).
//!
//! Invariants asserted: a reply fits the buffer `respond` documents as always large enough, comes
//! from the router's MAC and, when IPv4, carries a correct header checksum.

use std::net::Ipv4Addr;

use vnp_protocol::token::VmSecret;
use vnp_protocol::wire::{ethernet, ipv4, udp};
use vnpd::datapath::edge_link::{self, EdgeLink};
use vnpd::datapath::VmAttachment;
use vnpd::edge::{self, EdgeConfig, EdgeKind, MAX_REPLY_LEN, ROUTER_MAC};
use vnpd::metrics::counters::VmCounters;

/// Mode bit: the frame comes from the VM's own MAC (and DHCP's chaddr is it).
pub const OWN_MAC: u8 = 0x04;
/// Mode bit: the extreme configuration.
pub const EDGE_CASE_CONFIG: u8 = 0x08;

/// The VM's MAC.
pub const VM_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// Offset of the DHCP client hardware address in a BOOTP message.
const CHADDR_AT: usize = 28;

/// The usual configuration, or the extreme one.
pub fn config(edge_case: bool) -> EdgeConfig {
    EdgeConfig {
        vm_mac: VM_MAC,
        vm_ip: Ipv4Addr::new(10, 1, 0, 10),
        prefix_len: if edge_case { 32 } else { 24 },
        router_ip: Ipv4Addr::new(10, 1, 0, 1),
        router_mac: ROUTER_MAC,
        mtu: if edge_case { 68 } else { 1452 },
        hostname: if edge_case {
            String::new()
        } else {
            "vm-a".into()
        },
        lease_secs: if edge_case { u32::MAX } else { 3600 },
        dns: (!edge_case).then(|| Ipv4Addr::new(10, 1, 0, 53)),
    }
}

fn attachment(cfg: &EdgeConfig) -> VmAttachment {
    VmAttachment {
        vm_id: "vm-a".into(),
        network_vni: 7,
        vm_ip: cfg.vm_ip,
        prefix_len: cfg.prefix_len,
        router_ip: cfg.router_ip,
        mac: cfg.vm_mac,
        hostname: cfg.hostname.clone(),
        guest_mtu: cfg.mtu,
        secret: VmSecret::from_bytes([1; 32]),
        host_addr: Ipv4Addr::new(198, 18, 0, 1),
        udp_port: 0,
        socket_path: "/nonexistent/vm-a.sock".into(),
        queue_pairs: 1,
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let (mode, frame) = crate::split_mode(data);
    let cfg = config(mode & EDGE_CASE_CONFIG != 0);
    let mut frame = frame.to_vec();
    if mode & OWN_MAC != 0 {
        own_mac(&mut frame);
    }
    let kind = [
        EdgeKind::Arp,
        EdgeKind::Dhcp,
        EdgeKind::Echo,
        EdgeKind::FragNeeded,
    ][usize::from(mode & 3)];
    let mut out = vec![0u8; MAX_REPLY_LEN.max(frame.len())];
    if let Ok(Some(len)) = edge::respond(&cfg, kind, &frame, &mut out) {
        check_reply(&cfg, &out[..len]);
    }
    let link = EdgeLink::new(&attachment(&cfg)).expect("the fixed configurations are valid");
    let counters = VmCounters::new();
    if let Ok(Some(reply)) = edge_link::reply(&link, &frame, &counters) {
        check_reply(&cfg, &reply);
    }
}

/// Writes the VM's MAC where the edge looks for it.
fn own_mac(frame: &mut [u8]) {
    if frame.len() < ethernet::HEADER_LEN {
        return;
    }
    frame[6..12].copy_from_slice(&VM_MAC);
    let Ok(ip) = ipv4::Packet::new_checked(&frame[ethernet::HEADER_LEN..]) else {
        return;
    };
    let at = ethernet::HEADER_LEN + ip.header_len() + udp::HEADER_LEN + CHADDR_AT;
    if let Some(chaddr) = frame.get_mut(at..at + 6) {
        chaddr.copy_from_slice(&VM_MAC);
    }
}

fn check_reply(cfg: &EdgeConfig, reply: &[u8]) {
    let eth = ethernet::Frame::new_checked(reply).expect("a reply is an Ethernet frame");
    assert_eq!(eth.src_addr(), cfg.router_mac, "reply not from the router");
    if eth.ethertype() == ethernet::ethertype::IPV4 {
        let ip = ipv4::Packet::new_checked(eth.payload()).expect("reply IPv4 header");
        assert!(ip.verify_checksum(), "reply IPv4 checksum");
        assert_eq!(ip.src_addr(), cfg.router_ip, "reply not from the router");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed(name: &str) -> Vec<u8> {
        crate::seeds::all()
            .into_iter()
            .find(|s| s.0 == "edge" && s.1 == name)
            .expect("seed")
            .2
    }

    /// The seeds reach the answers: DHCP offers, ARP replies, echo replies.
    #[test]
    fn seeds_get_answers() {
        let cfg = config(false);
        let link = EdgeLink::new(&attachment(&cfg)).expect("valid");
        for name in ["dhcp-discover-0", "arp-request-0", "icmp-echo-0"] {
            let frame = &seed(name)[1..];
            let counters = VmCounters::new();
            let reply = edge_link::reply(&link, frame, &counters).expect(name);
            check_reply(&cfg, &reply.expect(name));
        }
    }

    /// The own-MAC mode rewrites a foreign client's MACs so the edge answers it.
    #[test]
    fn own_mac_mode_reaches_the_dhcp_server() {
        let mut frame = seed("dhcp-discover-0")[1..].to_vec();
        frame[11] ^= 1;
        frame[14 + 20 + 8 + CHADDR_AT + 5] ^= 1;
        let cfg = config(false);
        let mut out = vec![0u8; MAX_REPLY_LEN];
        assert!(edge::respond(&cfg, EdgeKind::Dhcp, &frame, &mut out).is_err());
        own_mac(&mut frame);
        assert!(matches!(
            edge::respond(&cfg, EdgeKind::Dhcp, &frame, &mut out),
            Ok(Some(_))
        ));
    }
}
