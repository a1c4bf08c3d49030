//! Writing reply frames from the virtual router to the guest: Ethernet and IPv4 headers built
//! with the packet layer's views, refusing (instead of panicking) when the buffer is too small.

use std::net::Ipv4Addr;

use vnp_protocol::wire::ethernet::{self, ethertype, Frame};
use vnp_protocol::wire::ipv4::{self, Repr, DEFAULT_TTL};

use super::{EdgeConfig, EdgeDrop};

/// Where an IPv4 reply goes and what it carries.
#[derive(Debug, Clone, Copy)]
pub struct ReplyHeaders {
    /// Ethernet destination.
    pub dst_mac: [u8; 6],
    /// IPv4 destination.
    pub dst_ip: Ipv4Addr,
    /// IP protocol of the payload.
    pub protocol: u8,
    /// Payload length after the 20-byte IPv4 header.
    pub payload_len: usize,
}

/// Writes the Ethernet header (from the router's MAC) and an option-less IPv4 header (from the
/// router's address, checksum filled) into `out`, zero-pads the frame to the Ethernet minimum,
/// and returns the frame length and the IPv4 payload to fill in.
pub fn ipv4_reply<'a>(
    cfg: &EdgeConfig,
    headers: &ReplyHeaders,
    out: &'a mut [u8],
) -> Result<(usize, &'a mut [u8]), EdgeDrop> {
    let ip_len = ipv4::MIN_HEADER_LEN + headers.payload_len;
    let total_len = u16::try_from(ip_len).map_err(|_| EdgeDrop::ReplyBufferTooSmall)?;
    let frame_len = (ethernet::HEADER_LEN + ip_len).max(ethernet::MIN_FRAME_LEN);
    let frame = out
        .get_mut(..frame_len)
        .ok_or(EdgeDrop::ReplyBufferTooSmall)?;
    frame.fill(0);
    let mut eth = Frame::new_unchecked(&mut frame[..]);
    eth.set_dst_addr(headers.dst_mac);
    eth.set_src_addr(cfg.router_mac);
    eth.set_ethertype(ethertype::IPV4);
    let ip_bytes = &mut eth.payload_mut()[..usize::from(total_len)];
    let mut ip = ipv4::Packet::new_unchecked(ip_bytes);
    Repr {
        src_addr: cfg.router_ip,
        dst_addr: headers.dst_ip,
        protocol: headers.protocol,
        payload_len: headers.payload_len,
        ttl: DEFAULT_TTL,
    }
    .emit(&mut ip);
    let payload_at = ethernet::HEADER_LEN + ipv4::MIN_HEADER_LEN;
    Ok((
        frame_len,
        &mut frame[payload_at..payload_at + headers.payload_len],
    ))
}
