//! Zero-copy views of the Ethernet, IPv4 and UDP headers the edge reads, and the writer it
//! builds replies with. Every accessor is bounds-checked up front by the `parse` functions, so
//! nothing here can index out of range on guest-controlled bytes.

use std::net::Ipv4Addr;

use super::EdgeDrop;

/// Ethernet II header: destination MAC (6), source MAC (6), EtherType (2).
pub const ETH_HEADER_LEN: usize = 14;
/// Shortest Ethernet frame on the wire without FCS; short replies are zero-padded to it.
pub const ETH_MIN_FRAME_LEN: usize = 60;
/// EtherType of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// EtherType of ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// The Ethernet broadcast address.
pub const BROADCAST_MAC: [u8; 6] = [0xff; 6];
/// IPv4 header without options.
pub const IPV4_MIN_HEADER_LEN: usize = 20;
/// IPv4 header with the most options IHL can express (15 * 4 bytes).
pub const IPV4_MAX_HEADER_LEN: usize = 60;
/// IP protocol number of UDP.
pub const IPPROTO_UDP: u8 = 17;
/// UDP header: source port, destination port, length, checksum (2 bytes each).
pub const UDP_HEADER_LEN: usize = 8;
/// TTL of locally generated packets.
const REPLY_TTL: u8 = 64;

/// An Ethernet II frame: `dst[0..6] src[6..12] ethertype[12..14] payload[14..]`.
#[derive(Debug, Clone, Copy)]
pub struct EthernetFrame<'a> {
    bytes: &'a [u8],
}

impl<'a> EthernetFrame<'a> {
    /// Checks that the 14-byte header is there.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, EdgeDrop> {
        if bytes.len() < ETH_HEADER_LEN {
            return Err(EdgeDrop::Truncated);
        }
        Ok(EthernetFrame { bytes })
    }

    /// Destination MAC.
    pub fn dst(&self) -> [u8; 6] {
        mac_at(self.bytes, 0)
    }

    /// Source MAC.
    pub fn src(&self) -> [u8; 6] {
        mac_at(self.bytes, 6)
    }

    /// EtherType (no VLAN tag handling: a tagged frame shows 0x8100 here).
    pub fn ethertype(&self) -> u16 {
        u16::from_be_bytes([self.bytes[12], self.bytes[13]])
    }

    /// Everything after the header (may include Ethernet padding).
    pub fn payload(&self) -> &'a [u8] {
        &self.bytes[ETH_HEADER_LEN..]
    }
}

/// An unfragmented IPv4 packet carrying UDP, with its lengths checked against each other:
/// the IPv4 total length fits in the frame (Ethernet padding after it is ignored), the UDP
/// length fits in the IPv4 payload. Checksums are not verified: a guest using checksum offload
/// legitimately leaves the UDP checksum partial, and a wrong one costs only a wrong DHCP answer
/// to the guest that wrote it.
#[derive(Debug, Clone, Copy)]
pub struct Ipv4Udp<'a> {
    /// IPv4 source address.
    pub src_ip: Ipv4Addr,
    /// IPv4 destination address.
    pub dst_ip: Ipv4Addr,
    /// UDP source port.
    pub src_port: u16,
    /// UDP destination port.
    pub dst_port: u16,
    /// UDP payload, exactly as long as the UDP length field says.
    pub payload: &'a [u8],
}

impl<'a> Ipv4Udp<'a> {
    /// Parses `packet` (an Ethernet payload) as IPv4 + UDP.
    pub fn parse(packet: &'a [u8]) -> Result<Self, EdgeDrop> {
        if packet.len() < IPV4_MIN_HEADER_LEN {
            return Err(EdgeDrop::Truncated);
        }
        let version = packet[0] >> 4;
        let header_len = usize::from(packet[0] & 0x0f) * 4;
        if version != 4 || header_len < IPV4_MIN_HEADER_LEN {
            return Err(EdgeDrop::BadLength);
        }
        let total_len = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
        if total_len < header_len {
            return Err(EdgeDrop::BadLength);
        }
        if total_len > packet.len() {
            return Err(EdgeDrop::Truncated);
        }
        let flags_fragment = u16::from_be_bytes([packet[6], packet[7]]);
        // More-fragments set or a non-zero offset: a fragment, which the edge never reassembles.
        if flags_fragment & 0x3fff != 0 {
            return Err(EdgeDrop::Fragmented);
        }
        if packet[9] != IPPROTO_UDP {
            return Err(EdgeDrop::NotEdgeTraffic);
        }
        let src_ip = ipv4_at(packet, 12);
        let dst_ip = ipv4_at(packet, 16);
        let ip_payload = &packet[header_len..total_len];
        if ip_payload.len() < UDP_HEADER_LEN {
            return Err(EdgeDrop::Truncated);
        }
        let src_port = u16::from_be_bytes([ip_payload[0], ip_payload[1]]);
        let dst_port = u16::from_be_bytes([ip_payload[2], ip_payload[3]]);
        let udp_len = usize::from(u16::from_be_bytes([ip_payload[4], ip_payload[5]]));
        if udp_len < UDP_HEADER_LEN || udp_len > ip_payload.len() {
            return Err(EdgeDrop::BadLength);
        }
        Ok(Ipv4Udp {
            src_ip,
            dst_ip,
            src_port,
            dst_port,
            payload: &ip_payload[UDP_HEADER_LEN..udp_len],
        })
    }
}

/// The MAC at `bytes[at..at + 6]`; callers have checked the length.
pub fn mac_at(bytes: &[u8], at: usize) -> [u8; 6] {
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&bytes[at..at + 6]);
    mac
}

/// The IPv4 address at `bytes[at..at + 4]`; callers have checked the length.
pub fn ipv4_at(bytes: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3])
}

/// The Internet checksum (RFC 1071) of the concatenation of `chunks`, each chunk but the last
/// being of even length.
pub fn internet_checksum(chunks: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in chunks {
        let mut pairs = chunk.chunks_exact(2);
        for pair in &mut pairs {
            sum += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
        }
        if let [last] = pairs.remainder() {
            sum += u32::from(u16::from_be_bytes([*last, 0]));
        }
        // Fold early so that no input length can overflow the accumulator.
        sum = (sum & 0xffff) + (sum >> 16);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Appends bytes to an output buffer, refusing (instead of panicking) when it is full.
#[derive(Debug)]
pub struct Writer<'a> {
    out: &'a mut [u8],
    len: usize,
}

impl<'a> Writer<'a> {
    /// An empty writer over `out`.
    pub fn new(out: &'a mut [u8]) -> Self {
        Writer { out, len: 0 }
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing has been written yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `bytes`.
    pub fn put(&mut self, bytes: &[u8]) -> Result<(), EdgeDrop> {
        let end = self
            .len
            .checked_add(bytes.len())
            .filter(|end| *end <= self.out.len())
            .ok_or(EdgeDrop::ReplyBufferTooSmall)?;
        self.out[self.len..end].copy_from_slice(bytes);
        self.len = end;
        Ok(())
    }

    /// Appends `count` zero bytes.
    pub fn zeros(&mut self, count: usize) -> Result<(), EdgeDrop> {
        let end = self
            .len
            .checked_add(count)
            .filter(|end| *end <= self.out.len())
            .ok_or(EdgeDrop::ReplyBufferTooSmall)?;
        self.out[self.len..end].fill(0);
        self.len = end;
        Ok(())
    }

    /// Zero-pads up to `len` bytes in total (no-op when already longer).
    pub fn pad_to(&mut self, len: usize) -> Result<(), EdgeDrop> {
        self.zeros(len.saturating_sub(self.len))
    }

    /// What has been written, mutable (to fill in lengths and checksums afterwards).
    pub fn written_mut(&mut self) -> &mut [u8] {
        &mut self.out[..self.len]
    }
}

/// Writes an Ethernet header.
pub fn put_ethernet(
    w: &mut Writer<'_>,
    dst: [u8; 6],
    src: [u8; 6],
    ethertype: u16,
) -> Result<(), EdgeDrop> {
    w.put(&dst)?;
    w.put(&src)?;
    w.put(&ethertype.to_be_bytes())
}

/// Where the IPv4 and UDP headers of a reply start in its buffer, so that lengths and checksums
/// can be filled in once the payload is written.
#[derive(Debug, Clone, Copy)]
pub struct Ipv4UdpHeaders {
    ip_at: usize,
    src: Ipv4Addr,
    dst: Ipv4Addr,
}

/// Reserves and partly writes IPv4 (no options) and UDP headers; finish with
/// [`finish_ipv4_udp`] after the payload.
pub fn start_ipv4_udp(
    w: &mut Writer<'_>,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    src_port: u16,
    dst_port: u16,
) -> Result<Ipv4UdpHeaders, EdgeDrop> {
    let ip_at = w.len();
    // version 4, IHL 5, DSCP 0, total length (later), id 0, no flags, TTL, UDP, checksum (later)
    w.put(&[0x45, 0, 0, 0, 0, 0, 0, 0, REPLY_TTL, IPPROTO_UDP, 0, 0])?;
    w.put(&src.octets())?;
    w.put(&dst.octets())?;
    w.put(&src_port.to_be_bytes())?;
    w.put(&dst_port.to_be_bytes())?;
    w.zeros(4)?; // length, checksum (later)
    Ok(Ipv4UdpHeaders { ip_at, src, dst })
}

/// Fills in the IPv4 total length and header checksum and the UDP length and checksum, for a
/// datagram whose payload runs to the end of what `w` holds.
pub fn finish_ipv4_udp(w: &mut Writer<'_>, headers: Ipv4UdpHeaders) -> Result<(), EdgeDrop> {
    let packet = &mut w.written_mut()[headers.ip_at..];
    let total_len = u16::try_from(packet.len()).map_err(|_| EdgeDrop::ReplyBufferTooSmall)?;
    let udp_len = total_len - IPV4_MIN_HEADER_LEN as u16;
    packet[2..4].copy_from_slice(&total_len.to_be_bytes());
    let ip_checksum = internet_checksum(&[&packet[..IPV4_MIN_HEADER_LEN]]);
    packet[10..12].copy_from_slice(&ip_checksum.to_be_bytes());

    let udp = &mut packet[IPV4_MIN_HEADER_LEN..];
    udp[4..6].copy_from_slice(&udp_len.to_be_bytes());
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&headers.src.octets());
    pseudo[4..8].copy_from_slice(&headers.dst.octets());
    pseudo[9] = IPPROTO_UDP;
    pseudo[10..12].copy_from_slice(&udp_len.to_be_bytes());
    let mut udp_checksum = internet_checksum(&[&pseudo, udp]);
    // 0 means "no checksum" in UDP over IPv4; a computed 0 is sent as all ones.
    if udp_checksum == 0 {
        udp_checksum = 0xffff;
    }
    udp[6..8].copy_from_slice(&udp_checksum.to_be_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_rfc1071_example() {
        // RFC 1071 section 3: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2, checksum is its complement.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(internet_checksum(&[&data]), !0xddf2);
        // Splitting at an even boundary does not change it; an odd tail is padded.
        assert_eq!(internet_checksum(&[&data[..4], &data[4..]]), !0xddf2);
        assert_eq!(internet_checksum(&[&[0xab]]), !0xab00);
    }

    #[test]
    fn written_headers_parse_back_with_valid_checksums() {
        let mut buf = [0u8; 64];
        let mut w = Writer::new(&mut buf);
        let src = Ipv4Addr::new(10, 0, 0, 1);
        let dst = Ipv4Addr::new(10, 0, 0, 2);
        let h = start_ipv4_udp(&mut w, src, dst, 67, 68).unwrap();
        w.put(b"hello").unwrap();
        finish_ipv4_udp(&mut w, h).unwrap();
        let len = w.len();
        let packet = &buf[..len];
        assert_eq!(
            internet_checksum(&[&packet[..20]]),
            0,
            "IPv4 header checksum verifies"
        );
        let parsed = Ipv4Udp::parse(packet).unwrap();
        assert_eq!((parsed.src_ip, parsed.dst_ip), (src, dst));
        assert_eq!((parsed.src_port, parsed.dst_port), (67, 68));
        assert_eq!(parsed.payload, b"hello");
        let mut pseudo = [0u8; 12];
        pseudo[0..4].copy_from_slice(&src.octets());
        pseudo[4..8].copy_from_slice(&dst.octets());
        pseudo[9] = 17;
        pseudo[10..12].copy_from_slice(&13u16.to_be_bytes());
        assert_eq!(
            internet_checksum(&[&pseudo, &packet[20..]]),
            0,
            "UDP checksum verifies"
        );
    }

    #[test]
    fn writer_refuses_to_overflow() {
        let mut buf = [0u8; 4];
        let mut w = Writer::new(&mut buf);
        w.put(&[1, 2, 3]).unwrap();
        assert_eq!(w.put(&[4, 5]), Err(EdgeDrop::ReplyBufferTooSmall));
        assert_eq!(w.zeros(2), Err(EdgeDrop::ReplyBufferTooSmall));
        w.pad_to(4).unwrap();
        assert_eq!(w.len(), 4);
        assert_eq!(buf, [1, 2, 3, 0]);
    }

    fn udp_packet() -> Vec<u8> {
        let mut buf = [0u8; 64];
        let mut w = Writer::new(&mut buf);
        let h = start_ipv4_udp(&mut w, Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST, 68, 67).unwrap();
        w.put(&[7; 10]).unwrap();
        finish_ipv4_udp(&mut w, h).unwrap();
        let len = w.len();
        buf[..len].to_vec()
    }

    #[test]
    fn inconsistent_lengths_are_refused() {
        let good = udp_packet();
        assert!(Ipv4Udp::parse(&good).is_ok());
        // Ethernet padding after the IPv4 packet is ignored.
        let mut padded = good.clone();
        padded.extend_from_slice(&[0; 10]);
        assert_eq!(Ipv4Udp::parse(&padded).unwrap().payload, &[7; 10]);

        let mut bad = good.clone();
        bad[0] = 0x44; // IHL 4
        assert_eq!(Ipv4Udp::parse(&bad).unwrap_err(), EdgeDrop::BadLength);
        let mut bad = good.clone();
        bad[0] = 0x65; // version 6
        assert_eq!(Ipv4Udp::parse(&bad).unwrap_err(), EdgeDrop::BadLength);
        let mut bad = good.clone();
        bad[3] = bad[3].wrapping_add(1); // total length past the frame
        assert_eq!(Ipv4Udp::parse(&bad).unwrap_err(), EdgeDrop::Truncated);
        let mut bad = good.clone();
        bad[25] = 40; // UDP length past the IPv4 payload
        assert_eq!(Ipv4Udp::parse(&bad).unwrap_err(), EdgeDrop::BadLength);
        let mut bad = good.clone();
        bad[25] = 4; // UDP length shorter than its header
        assert_eq!(Ipv4Udp::parse(&bad).unwrap_err(), EdgeDrop::BadLength);
        let mut bad = good.clone();
        bad[6] = 0x20; // more fragments
        assert_eq!(Ipv4Udp::parse(&bad).unwrap_err(), EdgeDrop::Fragmented);
        let mut bad = good.clone();
        bad[9] = 6; // TCP
        assert_eq!(Ipv4Udp::parse(&bad).unwrap_err(), EdgeDrop::NotEdgeTraffic);
        assert_eq!(
            Ipv4Udp::parse(&good[..27]).unwrap_err(),
            EdgeDrop::Truncated
        );
    }
}
