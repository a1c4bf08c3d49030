//! The packet-view target: every view of `vnp_protocol::wire` (Ethernet, ARP, IPv4, UDP, TCP,
//! ICMPv4) over arbitrary bytes, each accessor and setter, the checksum module, and the data
//! path's one classification of guest frames (`vnpd::datapath::frame::classify`).
//!
//! Input: a mode byte, then bytes. Every view is tried on the bytes themselves, and the bytes
//! are also walked as a guest frame (Ethernet, then IPv4, then its transport). Mode bit 0 makes
//! the classifier see the bytes as the first [`CLASSIFY_PREFIX`] bytes of a longer frame (the
//! oversize path), bit 1 fills the IPv4 header checksum before the walk.
//!
//! Invariants asserted: a setter's value reads back; a filled checksum verifies; RFC 1624's
//! incremental update of an address agrees with a full recompute (what `checksum` documents).

use std::net::Ipv4Addr;

use vnp_protocol::wire::{arp, checksum, ethernet, icmpv4, ipv4, tcp, udp};
use vnpd::datapath::frame::{classify, classify_tx, GuestNet, CLASSIFY_PREFIX};

/// Mode bit: classify as the prefix of a frame longer than the MTU.
pub const OVERSIZE: u8 = 0x01;
/// Mode bit: fill the IPv4 header checksum before the walk.
pub const FILL_IP_CHECKSUM: u8 = 0x02;

/// The guest's network the classifier judges against.
pub const NET: GuestNet = GuestNet {
    vm_ip: Ipv4Addr::new(10, 1, 0, 10),
    prefix_len: 24,
    router_ip: Ipv4Addr::new(10, 1, 0, 1),
    mtu: 1452,
};

/// Runs one input.
pub fn run(data: &[u8]) {
    let (mode, bytes) = crate::split_mode(data);
    every_view(bytes);
    let mut frame = bytes.to_vec();
    if mode & FILL_IP_CHECKSUM != 0 && frame.len() > ethernet::HEADER_LEN {
        if let Ok(mut ip) = ipv4::Packet::new_checked(&mut frame[ethernet::HEADER_LEN..]) {
            ip.fill_checksum();
        }
    }
    walk_frame(&frame);
    let (prefix, frame_len) = if mode & OVERSIZE != 0 {
        (
            &frame[..frame.len().min(CLASSIFY_PREFIX)],
            frame.len() + 2000,
        )
    } else {
        (&frame[..], frame.len())
    };
    let _ = classify(&NET, prefix, frame_len);
    let _ = classify_tx(&NET, prefix, frame_len);
    let _ = checksum::checksum(bytes);
}

/// Each view directly on `bytes`.
fn every_view(bytes: &[u8]) {
    ethernet_view(bytes);
    arp_view(bytes);
    ipv4_view(bytes);
    udp_view(
        bytes,
        Ipv4Addr::new(10, 1, 0, 10),
        Ipv4Addr::new(10, 1, 0, 1),
    );
    tcp_view(
        bytes,
        Ipv4Addr::new(10, 1, 0, 10),
        Ipv4Addr::new(10, 1, 0, 2),
    );
    icmp_view(bytes);
}

/// Ethernet, then what its ethertype says, then what the IPv4 protocol says.
fn walk_frame(bytes: &[u8]) {
    let Ok(eth) = ethernet::Frame::new_checked(bytes) else {
        return;
    };
    match eth.ethertype() {
        ethernet::ethertype::ARP => arp_view(eth.payload()),
        ethernet::ethertype::IPV4 => {
            let Ok(ip) = ipv4::Packet::new_checked(eth.payload()) else {
                return;
            };
            let (src, dst) = (ip.src_addr(), ip.dst_addr());
            match ip.protocol() {
                ipv4::protocol::UDP => udp_view(ip.payload(), src, dst),
                ipv4::protocol::TCP => tcp_view(ip.payload(), src, dst),
                ipv4::protocol::ICMP => icmp_view(ip.payload()),
                _ => {}
            }
        }
        _ => {}
    }
}

fn ethernet_view(bytes: &[u8]) {
    let Ok(eth) = ethernet::Frame::new_checked(bytes) else {
        return;
    };
    let _ = (
        eth.dst_addr(),
        eth.src_addr(),
        eth.ethertype(),
        eth.payload(),
    );
    let mut copy = ethernet::Frame::new_checked(bytes.to_vec()).expect("checked above");
    copy.set_dst_addr(eth.src_addr());
    copy.set_src_addr(eth.dst_addr());
    copy.set_ethertype(!eth.ethertype());
    assert_eq!(copy.ethertype(), !eth.ethertype());
    assert_eq!(copy.payload_mut().len(), eth.payload().len());
}

fn arp_view(bytes: &[u8]) {
    let Ok(p) = arp::Packet::new_checked(bytes) else {
        return;
    };
    let _ = (p.hardware_type(), p.protocol_type(), p.hardware_len());
    let _ = (p.protocol_len(), p.is_ethernet_ipv4(), p.operation());
    let _ = (p.sender_hardware_addr(), p.sender_protocol_addr());
    let _ = (p.target_hardware_addr(), p.target_protocol_addr());
    let mut copy = arp::Packet::new_checked(bytes.to_vec()).expect("checked above");
    copy.set_ethernet_ipv4();
    assert!(copy.is_ethernet_ipv4());
    copy.set_operation(arp::OP_REPLY);
    copy.set_sender_hardware_addr(p.target_hardware_addr());
    copy.set_sender_protocol_addr(p.target_protocol_addr());
    copy.set_target_hardware_addr(p.sender_hardware_addr());
    copy.set_target_protocol_addr(p.sender_protocol_addr());
    assert_eq!(copy.target_protocol_addr(), p.sender_protocol_addr());
}

fn ipv4_view(bytes: &[u8]) {
    let Ok(ip) = ipv4::Packet::new_checked(bytes) else {
        return;
    };
    let _ = (ip.version(), ip.header_len(), ip.dscp_ecn(), ip.total_len());
    let _ = (
        ip.ident(),
        ip.dont_frag(),
        ip.more_frags(),
        ip.frag_offset(),
    );
    let _ = (
        ip.is_fragment(),
        ip.is_later_fragment(),
        ip.ttl(),
        ip.protocol(),
    );
    let _ = (
        ip.header_checksum(),
        ip.src_addr(),
        ip.dst_addr(),
        ip.header(),
    );
    let _ = (
        ip.verify_checksum(),
        ip.payload(),
        ip.check_len(bytes.len()),
    );
    let mut copy = ipv4::Packet::new_checked(bytes.to_vec()).expect("checked above");
    copy.fill_checksum();
    assert!(copy.verify_checksum());
    // RFC 1624: NAT rewrites an address and updates the checksum incrementally.
    let new_src = Ipv4Addr::from(!u32::from(ip.src_addr()));
    let updated = checksum::update_u32(
        copy.header_checksum(),
        u32::from(ip.src_addr()),
        u32::from(new_src),
    );
    copy.set_src_addr(new_src);
    copy.fill_checksum();
    assert_eq!(updated, copy.header_checksum(), "incremental != full");
    copy.set_ttl(ip.ttl().wrapping_sub(1));
    copy.set_protocol(ip.protocol());
    copy.set_ident(ip.ident());
    copy.set_dscp_ecn(ip.dscp_ecn());
    copy.set_dst_addr(ip.src_addr());
    copy.set_total_len(bytes.len().min(usize::from(u16::MAX)) as u16);
    copy.set_unfragmented(true);
    assert!(copy.dont_frag() && !copy.is_fragment());
    let _ = copy.payload_mut().len();
}

fn udp_view(bytes: &[u8], src: Ipv4Addr, dst: Ipv4Addr) {
    let Ok(u) = udp::Packet::new_checked(bytes) else {
        return;
    };
    let _ = (u.src_port(), u.dst_port(), u.len(), u.is_empty());
    let _ = (u.stored_checksum(), u.payload(), u.check_len(bytes.len()));
    let _ = u.verify_checksum(src, dst);
    let mut copy = udp::Packet::new_checked(bytes.to_vec()).expect("checked above");
    copy.set_src_port(u.dst_port());
    copy.set_dst_port(u.src_port());
    assert_eq!(copy.dst_port(), u.src_port());
    if u.check_len(bytes.len()).is_ok() {
        copy.fill_checksum(src, dst);
        assert!(copy.verify_checksum(src, dst), "filled UDP checksum fails");
    }
    copy.set_len(bytes.len().min(usize::from(u16::MAX)) as u16);
    copy.set_stored_checksum(0);
    let _ = copy.payload_mut().len();
}

fn tcp_view(bytes: &[u8], src: Ipv4Addr, dst: Ipv4Addr) {
    let Ok(t) = tcp::Packet::new_checked(bytes) else {
        return;
    };
    let _ = (t.src_port(), t.dst_port(), t.seq_number(), t.ack_number());
    let _ = (
        t.header_len(),
        t.flags(),
        t.window_len(),
        t.stored_checksum(),
    );
    let _ = (
        t.urgent_at(),
        t.options(),
        t.payload(),
        t.verify_checksum(src, dst),
    );
    let mut copy = tcp::Packet::new_checked(bytes.to_vec()).expect("checked above");
    copy.set_src_port(t.dst_port());
    copy.set_dst_port(t.src_port());
    copy.set_seq_number(t.ack_number());
    copy.set_ack_number(t.seq_number());
    copy.set_flags(t.flags());
    copy.set_window_len(t.window_len());
    copy.set_urgent_at(t.urgent_at());
    copy.set_header_len(t.header_len());
    copy.fill_checksum(src, dst);
    assert!(copy.verify_checksum(src, dst), "filled TCP checksum fails");
    copy.set_stored_checksum(0);
}

fn icmp_view(bytes: &[u8]) {
    let Ok(i) = icmpv4::Packet::new_checked(bytes) else {
        return;
    };
    let _ = (
        i.msg_type(),
        i.msg_code(),
        i.stored_checksum(),
        i.echo_ident(),
    );
    let _ = (
        i.echo_seq_no(),
        i.next_hop_mtu(),
        i.data(),
        i.verify_checksum(),
    );
    let mut copy = icmpv4::Packet::new_checked(bytes.to_vec()).expect("checked above");
    copy.set_msg_type(icmpv4::msg_type::ECHO_REPLY);
    copy.set_msg_code(0);
    copy.set_echo_ident(i.echo_ident());
    copy.set_echo_seq_no(i.echo_seq_no());
    copy.set_next_hop_mtu(i.next_hop_mtu());
    copy.fill_checksum();
    assert!(copy.verify_checksum(), "filled ICMP checksum fails");
    copy.set_stored_checksum(0);
    let _ = copy.data_mut().len();
}
