//! The fast failure a guest gets when its NAT ports are used up, instead of a silent drop it
//! would retry for a minute: a TCP SYN is answered with a RST (as if the remote refused it:
//! `connect()` fails at once with ECONNREFUSED), UDP and ICMP echo with ICMP "destination
//! unreachable, communication administratively prohibited" (type 3 code 13, RFC 1812 5.2.7.1)
//! from the virtual router, quoting the packet's header (a connected UDP socket gets
//! EHOSTUNREACH). Pure: builds the Ethernet frame for the guest from the copy of the packet's
//! headers.

use std::net::Ipv4Addr;

use vnp_protocol::wire::ethernet::{self, ethertype, Frame};
use vnp_protocol::wire::icmpv4::{self, msg_type};
use vnp_protocol::wire::ipv4::{self, protocol, Repr, DEFAULT_TTL};
use vnp_protocol::wire::tcp::{self, flags};

/// ICMP destination unreachable code: communication administratively prohibited.
pub const CODE_ADMIN_PROHIBITED: u8 = 13;
/// Bytes of the packet's payload the ICMP answer quotes.
const QUOTED_PAYLOAD: usize = 8;

/// Who the answer comes from and goes to.
#[derive(Debug, Clone, Copy)]
pub struct AnswerAddrs {
    /// The guest's MAC.
    pub vm_mac: [u8; 6],
    /// The virtual router's MAC.
    pub router_mac: [u8; 6],
    /// The virtual router's address (source of the ICMP answer).
    pub router_ip: Ipv4Addr,
}

/// The frame answering the refused packet whose headers are in `head` (IPv4 header and at least
/// 20 bytes of TCP or 8 of UDP/ICMP). `None` for a packet that gets no answer: a TCP segment
/// other than a SYN (RFC 9293: never answer a RST), an ICMP error (RFC 1812 4.3.2.7).
pub fn exhaustion_answer(addrs: &AnswerAddrs, head: &[u8]) -> Option<Vec<u8>> {
    let ip = ipv4::Packet::new_checked(head).ok()?;
    let hl = ip.header_len();
    let l4 = head.get(hl..)?;
    match ip.protocol() {
        protocol::TCP => {
            // The copy holds the fixed 20 bytes only; a real SYN's options (MSS, SACK,
            // timestamps: a 40-byte header) lie beyond it, so the header length is read from
            // its field but not required to be in the copy.
            let seg = tcp::Packet::new_unchecked(l4.get(..tcp::MIN_HEADER_LEN)?);
            if seg.header_len() < tcp::MIN_HEADER_LEN {
                return None;
            }
            if seg.flags() & flags::SYN == 0 || seg.flags() & (flags::RST | flags::ACK) != 0 {
                return None;
            }
            let seg_len = ip.total_len().checked_sub(hl + seg.header_len())?;
            Some(rst(addrs, &ip, &seg, seg_len))
        }
        protocol::UDP => Some(unreachable(addrs, &ip, head)),
        protocol::ICMP => {
            let t = *l4.first()?;
            (t == msg_type::ECHO_REQUEST).then(|| unreachable(addrs, &ip, head))
        }
        _ => None,
    }
}

/// RST+ACK from the remote to the guest acknowledging the SYN (RFC 9293 3.10.7.1: a segment
/// without ACK is answered with SEQ 0 and ACK = its SEQ + its length, the SYN counting one).
fn rst(
    addrs: &AnswerAddrs,
    ip: &ipv4::Packet<&[u8]>,
    syn: &tcp::Packet<&[u8]>,
    payload_len: usize,
) -> Vec<u8> {
    let (mut frame, at) = frame_with_ip(
        addrs,
        ip.dst_addr(),
        ip.src_addr(),
        protocol::TCP,
        tcp::MIN_HEADER_LEN,
    );
    let mut seg = tcp::Packet::new_unchecked(&mut frame[at..at + tcp::MIN_HEADER_LEN]);
    seg.set_src_port(syn.dst_port());
    seg.set_dst_port(syn.src_port());
    seg.set_seq_number(0);
    seg.set_ack_number(syn.seq_number().wrapping_add(1 + payload_len as u32));
    seg.set_header_len(tcp::MIN_HEADER_LEN);
    seg.set_flags(flags::RST | flags::ACK);
    seg.set_window_len(0);
    seg.set_urgent_at(0);
    seg.fill_checksum(ip.dst_addr(), ip.src_addr());
    frame
}

/// ICMP type 3 code 13 from the router, quoting the IPv4 header and 8 payload bytes.
fn unreachable(addrs: &AnswerAddrs, ip: &ipv4::Packet<&[u8]>, head: &[u8]) -> Vec<u8> {
    let quote_len = (ip.header_len() + QUOTED_PAYLOAD).min(head.len());
    let len = icmpv4::HEADER_LEN + quote_len;
    let (mut frame, at) = frame_with_ip(addrs, addrs.router_ip, ip.src_addr(), protocol::ICMP, len);
    let mut msg = icmpv4::Packet::new_unchecked(&mut frame[at..at + len]);
    msg.set_msg_type(msg_type::DST_UNREACHABLE);
    msg.set_msg_code(CODE_ADMIN_PROHIBITED);
    msg.data_mut()[..quote_len].copy_from_slice(&head[..quote_len]);
    msg.fill_checksum();
    frame
}

/// A zeroed frame with its Ethernet and IPv4 headers written; returns it and where the IPv4
/// payload starts.
fn frame_with_ip(
    addrs: &AnswerAddrs,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    payload_len: usize,
) -> (Vec<u8>, usize) {
    let at = ethernet::HEADER_LEN + ipv4::MIN_HEADER_LEN;
    let mut frame = vec![0u8; (at + payload_len).max(ethernet::MIN_FRAME_LEN)];
    let mut eth = Frame::new_unchecked(&mut frame[..]);
    eth.set_dst_addr(addrs.vm_mac);
    eth.set_src_addr(addrs.router_mac);
    eth.set_ethertype(ethertype::IPV4);
    let mut ip = ipv4::Packet::new_unchecked(&mut frame[ethernet::HEADER_LEN..at + payload_len]);
    Repr {
        src_addr: src,
        dst_addr: dst,
        protocol: proto,
        payload_len,
        ttl: DEFAULT_TTL,
    }
    .emit(&mut ip);
    (frame, at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vnp_protocol::wire::udp;

    const VM: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
    const REMOTE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
    const ADDRS: AnswerAddrs = AnswerAddrs {
        vm_mac: [2, 0, 0, 0, 0, 2],
        router_mac: [2, 0, 0, 0, 0, 1],
        router_ip: Ipv4Addr::new(10, 0, 0, 1),
    };

    fn packet(proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 20 + l4.len()];
        p[20..].copy_from_slice(l4);
        Repr {
            src_addr: VM,
            dst_addr: REMOTE,
            protocol: proto,
            payload_len: l4.len(),
            ttl: DEFAULT_TTL,
        }
        .emit(&mut ipv4::Packet::new_unchecked(&mut p[..]));
        p
    }

    fn syn(fl: u8) -> Vec<u8> {
        let mut t = [0u8; 20];
        let mut s = tcp::Packet::new_unchecked(&mut t[..]);
        s.set_src_port(33000);
        s.set_dst_port(80);
        s.set_seq_number(0xffff_fffe);
        s.set_header_len(20);
        s.set_flags(fl);
        s.fill_checksum(VM, REMOTE);
        packet(protocol::TCP, &t)
    }

    #[test]
    fn a_syn_gets_a_rst_from_the_remote() {
        let frame = exhaustion_answer(&ADDRS, &syn(flags::SYN)).expect("answered");
        let eth = Frame::new_checked(&frame[..]).unwrap();
        assert_eq!(eth.dst_addr(), ADDRS.vm_mac);
        let ip = ipv4::Packet::new_checked(eth.payload()).unwrap();
        assert!(ip.verify_checksum());
        assert_eq!((ip.src_addr(), ip.dst_addr()), (REMOTE, VM));
        let rst = tcp::Packet::new_checked(ip.payload()).unwrap();
        assert_eq!((rst.src_port(), rst.dst_port()), (80, 33000));
        assert_eq!(rst.flags(), flags::RST | flags::ACK);
        // The SYN counts one; the sequence space wraps.
        assert_eq!(rst.ack_number(), 0xffff_ffff);
        assert!(rst.verify_checksum(REMOTE, VM));
        // Anything but a bare SYN gets no answer.
        assert!(exhaustion_answer(&ADDRS, &syn(flags::ACK)).is_none());
        assert!(exhaustion_answer(&ADDRS, &syn(flags::SYN | flags::ACK)).is_none());
        assert!(exhaustion_answer(&ADDRS, &syn(flags::RST)).is_none());
    }

    #[test]
    fn a_syn_with_options_gets_a_rst_from_the_copy_nat_keeps() {
        // Linux's SYN: a 40-byte header (MSS, SACK, timestamps, window scale); NAT's copy
        // holds the IPv4 header and the first 20 bytes of TCP only.
        let mut t = [0u8; 40];
        let mut s = tcp::Packet::new_unchecked(&mut t[..]);
        s.set_src_port(33000);
        s.set_dst_port(80);
        s.set_seq_number(7);
        s.set_header_len(40);
        s.set_flags(flags::SYN);
        let full = packet(protocol::TCP, &t);
        let frame = exhaustion_answer(&ADDRS, &full[..40]).expect("answered");
        let ip = ipv4::Packet::new_checked(&frame[14..]).unwrap();
        let rst = tcp::Packet::new_checked(ip.payload()).unwrap();
        assert_eq!((rst.src_port(), rst.dst_port()), (80, 33000));
        assert_eq!(rst.flags(), flags::RST | flags::ACK);
        assert_eq!(rst.ack_number(), 8);
        assert!(rst.verify_checksum(REMOTE, VM));
        // A header length below 20 is no TCP segment.
        let mut bad = full.clone();
        bad[20 + 12] = 4 << 4;
        assert!(exhaustion_answer(&ADDRS, &bad[..40]).is_none());
    }

    #[test]
    fn udp_and_ping_get_admin_prohibited_quoting_the_header() {
        let mut u = [0u8; 8];
        udp::Packet::new_unchecked(&mut u[..]).set_src_port(5353);
        let p = packet(protocol::UDP, &u);
        let frame = exhaustion_answer(&ADDRS, &p).expect("answered");
        let ip = ipv4::Packet::new_checked(&frame[14..]).unwrap();
        assert_eq!((ip.src_addr(), ip.dst_addr()), (ADDRS.router_ip, VM));
        let icmp = icmpv4::Packet::new_checked(ip.payload()).unwrap();
        assert_eq!(
            (icmp.msg_type(), icmp.msg_code()),
            (3, CODE_ADMIN_PROHIBITED)
        );
        assert_eq!(&icmp.data()[..28], &p[..28]);
        assert!(icmp.verify_checksum());
        let ping = packet(protocol::ICMP, &[8, 0, 0, 0, 0, 1, 0, 1]);
        assert!(exhaustion_answer(&ADDRS, &ping).is_some());
        let error = packet(protocol::ICMP, &[3, 3, 0, 0, 0, 0, 0, 0]);
        assert!(exhaustion_answer(&ADDRS, &error).is_none());
    }
}
