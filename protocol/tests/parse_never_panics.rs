//! Datagrams come from the network: whatever the bytes, parsing returns a value or an error.

use proptest::prelude::*;
use vnp_protocol::wire::options::OptionsIter;
use vnp_protocol::wire::{VnpDatagram, VnpRepr, HEADER_LEN};

proptest! {
    #[test]
    fn arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(d) = VnpDatagram::parse(&bytes) {
            // Whatever parsed accounts for every byte.
            prop_assert_eq!(HEADER_LEN + d.inner.len() + d.options.len(), bytes.len());
        }
        for _ in OptionsIter::new(&bytes) {}
    }

    #[test]
    fn header_with_random_tail(network_id: u32, token: [u8; 8], expiry: u32,
                               tail in proptest::collection::vec(any::<u8>(), 0..100)) {
        let repr = VnpRepr {
            network_id,
            token: vnp_protocol::token::Token::from_bytes(token),
            expiry: vnp_protocol::token::Expiry(expiry),
            has_options: true,
        };
        let mut bytes = repr.to_bytes().to_vec();
        bytes.extend_from_slice(&tail);
        if let Ok(d) = VnpDatagram::parse(&bytes) {
            prop_assert_eq!(d.header, repr);
        }
    }
}

/// Every view, on any bytes: `new_checked` either refuses or gives a view whose every accessor
/// works (the data path hands them guest-controlled prefixes).
fn read_every_field(bytes: &[u8]) {
    use vnp_protocol::wire::{arp, ethernet, icmpv4, ipv4, tcp, udp};
    if let Ok(f) = ethernet::Frame::new_checked(bytes) {
        let _ = (f.dst_addr(), f.src_addr(), f.ethertype(), f.payload().len());
    }
    if let Ok(p) = arp::Packet::new_checked(bytes) {
        let _ = (
            p.is_ethernet_ipv4(),
            p.operation(),
            p.sender_hardware_addr(),
        );
        let _ = (
            p.sender_protocol_addr(),
            p.target_hardware_addr(),
            p.target_protocol_addr(),
        );
    }
    if let Ok(p) = ipv4::Packet::new_checked(bytes) {
        let _ = (
            p.version(),
            p.header_len(),
            p.dscp_ecn(),
            p.total_len(),
            p.ident(),
        );
        let _ = (
            p.dont_frag(),
            p.is_fragment(),
            p.frag_offset(),
            p.ttl(),
            p.protocol(),
        );
        let _ = (
            p.header_checksum(),
            p.src_addr(),
            p.dst_addr(),
            p.verify_checksum(),
        );
        let _ = (p.payload().len(), p.check_len(bytes.len()));
    }
    if let Ok(p) = udp::Packet::new_checked(bytes) {
        let _ = (p.src_port(), p.dst_port(), p.len(), p.payload().len());
        let _ = (p.check_len(bytes.len()), p.stored_checksum());
        let any = std::net::Ipv4Addr::LOCALHOST;
        let _ = p.verify_checksum(any, any);
    }
    if let Ok(p) = tcp::Packet::new_checked(bytes) {
        let _ = (
            p.src_port(),
            p.dst_port(),
            p.seq_number(),
            p.ack_number(),
            p.flags(),
        );
        let _ = (
            p.window_len(),
            p.urgent_at(),
            p.options().len(),
            p.payload().len(),
        );
    }
    if let Ok(p) = icmpv4::Packet::new_checked(bytes) {
        let _ = (p.msg_type(), p.msg_code(), p.echo_ident(), p.echo_seq_no());
        let _ = (p.next_hop_mtu(), p.data().len(), p.verify_checksum());
    }
}

proptest! {
    #[test]
    fn packet_views_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
        read_every_field(&bytes);
        // An IPv4 header start makes the IPv4 checks reach their later branches.
        let mut ip = bytes.clone();
        if let Some(first) = ip.first_mut() {
            *first = 0x40 | (*first & 0x0f);
        }
        read_every_field(&ip);
    }
}
