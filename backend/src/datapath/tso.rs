//! TX offloads, the pure part: completing a packet's partial transport checksum and cutting a
//! TCP/IPv4 super-packet (TSO) into segments of at most the network MTU.
//!
//! Only headers are handled here, always in a local copy ([`InnerHeaders`]; NAT rewrites them
//! there): the payload stays in guest memory, and the caller hands in its ones' complement sum
//! (`checksum::sum` semantics), read where it lies. Each segment gets what Linux's own
//! `tcp_gso_segment` gives it: its IPv4 total length and an identification incremented per
//! segment, its TCP sequence number advanced by the payload before it, FIN and PSH on the last
//! segment only, CWR on the first only, and complete IPv4 and TCP checksums.

use std::net::Ipv4Addr;

use vnp_protocol::wire::checksum;
use vnp_protocol::wire::ipv4::{self, protocol};
use vnp_protocol::wire::tcp::{self, flags};

/// Longest inner header block: the longest IPv4 header and the longest TCP header.
pub const MAX_INNER_HEADERS: usize = ipv4::MAX_HEADER_LEN + 60;
/// Most segments the kernel takes in one UDP GSO message (`UDP_MAX_SEGMENTS`).
pub const MAX_GSO_SEGMENTS: usize = 64;
/// Largest UDP payload of one message: a 65535-byte IPv4 packet minus its IPv4 and UDP headers.
pub const MAX_UDP_PAYLOAD: usize = 65535 - 20 - 8;

/// A local copy of a packet's IPv4 and transport headers.
#[derive(Debug, Clone, Copy)]
pub struct InnerHeaders {
    bytes: [u8; MAX_INNER_HEADERS],
    ip_len: usize,
    len: usize,
}

impl InnerHeaders {
    /// Copies the first `ip_len + l4_len` bytes of `packet` (an IPv4 packet's start); `None`
    /// when they are not all there or exceed [`MAX_INNER_HEADERS`].
    pub fn copy(packet: &[u8], ip_len: usize, l4_len: usize) -> Option<Self> {
        let len = ip_len.checked_add(l4_len)?;
        if len > MAX_INNER_HEADERS || len > packet.len() || ip_len < ipv4::MIN_HEADER_LEN {
            return None;
        }
        let mut bytes = [0u8; MAX_INNER_HEADERS];
        bytes[..len].copy_from_slice(&packet[..len]);
        Some(Self { bytes, ip_len, len })
    }

    /// The headers' bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    /// The headers' bytes, to rewrite (NAT).
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.bytes[..self.len]
    }

    /// IPv4 header length.
    pub fn ip_len(&self) -> usize {
        self.ip_len
    }

    /// IPv4 plus transport header length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: there is at least an IPv4 header.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn addresses(&self) -> (Ipv4Addr, Ipv4Addr) {
        let ip = ipv4::Packet::new_unchecked(&self.bytes[..self.ip_len]);
        (ip.src_addr(), ip.dst_addr())
    }

    /// Fills in the transport checksum of a packet made of these headers and `payload_len`
    /// bytes of payload whose sum is `payload_sum`, computed afresh over the pseudo header
    /// (the guest's partial value in the field is not used). UDP's zero becomes 0xffff.
    pub fn complete_checksum(&mut self, proto: u8, payload_len: usize, payload_sum: u16) {
        let (src, dst) = self.addresses();
        let field = if proto == protocol::TCP { 16 } else { 6 };
        let at = self.ip_len + field;
        self.bytes[at..at + 2].fill(0);
        let l4 = &self.bytes[self.ip_len..self.len];
        let l4_total = (l4.len() + payload_len) as u16;
        let sum = checksum::combine(&[
            checksum::pseudo_header(src, dst, proto, l4_total),
            checksum::sum(l4),
            payload_sum,
        ]);
        let mut value = !sum;
        if proto == protocol::UDP && value == 0 {
            value = 0xffff;
        }
        self.bytes[at..at + 2].copy_from_slice(&value.to_be_bytes());
    }
}

/// How a super-packet's payload is cut: `mss` bytes per segment, the last one shorter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TsoPlan {
    mss: usize,
    payload_len: usize,
}

impl TsoPlan {
    /// A plan for `payload_len` payload bytes in segments of `mss` (`mss > 0`, checked by the
    /// header validation).
    pub fn new(mss: usize, payload_len: usize) -> Self {
        Self {
            mss: mss.max(1),
            payload_len,
        }
    }

    /// Number of segments (at least one).
    pub fn segments(&self) -> usize {
        self.payload_len.div_ceil(self.mss).max(1)
    }

    /// Payload bytes per full segment.
    pub fn mss(&self) -> usize {
        self.mss
    }

    /// Offset and length of segment `i`'s payload in the super-packet's payload.
    pub fn range(&self, i: usize) -> (usize, usize) {
        let start = (i * self.mss).min(self.payload_len);
        (start, self.mss.min(self.payload_len - start))
    }

    /// Segments per UDP GSO message when each segment is `seg_wire_len` bytes of UDP payload
    /// (VNP header, inner headers, `mss` bytes): as many as fit [`MAX_UDP_PAYLOAD`], at most
    /// [`MAX_GSO_SEGMENTS`]. A 64 KB super-packet thus needs two messages.
    pub fn segments_per_message(seg_wire_len: usize) -> usize {
        (MAX_UDP_PAYLOAD / seg_wire_len.max(1)).clamp(1, MAX_GSO_SEGMENTS)
    }

    /// Writes segment `i`'s IPv4 and TCP headers into `out` (of `template.len()` bytes), made
    /// from the super-packet's headers `template`; `payload_sum` is the sum of that segment's
    /// payload.
    pub fn segment_headers(
        &self,
        template: &InnerHeaders,
        i: usize,
        payload_sum: u16,
        out: &mut InnerHeaders,
    ) {
        *out = *template;
        let (offset, len) = self.range(i);
        let last = i + 1 == self.segments();
        let ip_len = template.ip_len;
        let total = (template.len + len) as u16;
        {
            let mut ip = ipv4::Packet::new_unchecked(&mut out.bytes[..ip_len]);
            ip.set_total_len(total);
            let ident = ipv4::Packet::new_unchecked(&template.bytes[..ip_len]).ident();
            ip.set_ident(ident.wrapping_add(i as u16));
            ip.fill_checksum();
        }
        {
            let mut tcp = tcp::Packet::new_unchecked(&mut out.bytes[ip_len..template.len]);
            let seq =
                tcp::Packet::new_unchecked(&template.bytes[ip_len..template.len]).seq_number();
            tcp.set_seq_number(seq.wrapping_add(offset as u32));
            let mut f = tcp::Packet::new_unchecked(&template.bytes[ip_len..template.len]).flags();
            if !last {
                f &= !(flags::FIN | flags::PSH);
            }
            if i != 0 {
                f &= !flags::CWR;
            }
            tcp.set_flags(f);
        }
        out.complete_checksum(protocol::TCP, len, payload_sum);
    }
}

/// Software segmentation of a whole super-packet held in `packet` (a local copy): the complete
/// packets, each of IPv4 + TCP headers (`ip_len + tcp_len` bytes) and at most `mss` bytes of
/// payload. For packets that must wait for a token (they are copied anyway).
pub fn segment_copy(packet: &[u8], ip_len: usize, tcp_len: usize, mss: usize) -> Vec<Vec<u8>> {
    let Some(template) = InnerHeaders::copy(packet, ip_len, tcp_len) else {
        return Vec::new();
    };
    let payload = &packet[template.len()..];
    let plan = TsoPlan::new(mss, payload.len());
    let mut headers = template;
    (0..plan.segments())
        .map(|i| {
            let (offset, len) = plan.range(i);
            let data = &payload[offset..offset + len];
            plan.segment_headers(&template, i, checksum::sum(data), &mut headers);
            let mut out = Vec::with_capacity(headers.len() + len);
            out.extend_from_slice(headers.bytes());
            out.extend_from_slice(data);
            out
        })
        .collect()
}

/// Completes the transport checksum of a whole packet held in `packet` (a local copy) whose
/// transport header of `l4_len` bytes starts at `ip_len`.
pub fn complete_copy(packet: &mut [u8], ip_len: usize, l4_len: usize, proto: u8) {
    let Some(mut headers) = InnerHeaders::copy(packet, ip_len, l4_len) else {
        return;
    };
    let payload = &packet[headers.len()..];
    headers.complete_checksum(proto, payload.len(), checksum::sum(payload));
    let n = headers.len();
    packet[..n].copy_from_slice(headers.bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SRC: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
    const DST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);

    /// An IPv4 + TCP (12 option bytes) super-packet with a partial checksum (the pseudo
    /// header's sum, as Linux leaves it) and `payload`.
    fn super_packet(payload: &[u8], tcp_flags: u8) -> Vec<u8> {
        let total = 20 + 32 + payload.len();
        let mut p = vec![0u8; total];
        {
            let mut ip = ipv4::Packet::new_unchecked(&mut p[..20]);
            ip.set_version_and_header_len(20);
            ip.set_total_len(total as u16);
            ip.set_ident(0xfffe);
            ip.set_unfragmented(true);
            ip.set_ttl(64);
            ip.set_protocol(protocol::TCP);
            ip.set_src_addr(SRC);
            ip.set_dst_addr(DST);
            ip.fill_checksum();
        }
        {
            let mut t = tcp::Packet::new_unchecked(&mut p[20..52]);
            t.set_src_port(40000);
            t.set_dst_port(5201);
            t.set_seq_number(0xffff_ff00);
            t.set_ack_number(7);
            t.set_header_len(32);
            t.set_flags(tcp_flags);
            t.set_window_len(500);
            let partial = checksum::pseudo_header(SRC, DST, 6, (32 + payload.len()) as u16);
            t.set_stored_checksum(partial);
        }
        p[20 + 20..52].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
        p[52..].copy_from_slice(payload);
        p
    }

    fn verify(segment: &[u8]) -> (ipv4::Packet<&[u8]>, tcp::Packet<&[u8]>) {
        let ip = ipv4::Packet::new_checked(segment).unwrap();
        assert_eq!(ip.total_len(), segment.len());
        assert_eq!(checksum::checksum(&segment[..20]), 0, "IPv4 checksum");
        let t = tcp::Packet::new_checked(&segment[20..]).unwrap();
        assert!(t.verify_checksum(SRC, DST), "TCP checksum");
        (ip, t)
    }

    #[test]
    fn segments_carry_their_own_headers_and_flags() {
        let payload: Vec<u8> = (0..3001u32).map(|i| (i * 7 + 3) as u8).collect();
        let all = flags::ACK | flags::PSH | flags::FIN | flags::CWR;
        let p = super_packet(&payload, all);
        let segs = segment_copy(&p, 20, 32, 1000);
        assert_eq!(segs.len(), 4);
        let mut joined = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            let (ip, t) = verify(s);
            assert_eq!(ip.ident(), 0xfffeu16.wrapping_add(i as u16));
            assert_eq!(t.seq_number(), 0xffff_ff00u32.wrapping_add(1000 * i as u32));
            let f = t.flags();
            assert_eq!(f & flags::ACK, flags::ACK);
            assert_eq!(f & (flags::FIN | flags::PSH) != 0, i == 3, "FIN/PSH on {i}");
            assert_eq!(f & flags::CWR != 0, i == 0, "CWR on {i}");
            assert_eq!(t.options(), &p[40..52]);
            joined.extend_from_slice(t.payload());
        }
        assert_eq!(segs[3].len(), 52 + 1);
        assert_eq!(joined, payload);
    }

    #[test]
    fn completed_checksum_equals_full_recompute() {
        let payload: Vec<u8> = (0..777u32).map(|i| (i * 13) as u8).collect();
        let mut p = super_packet(&payload, flags::ACK);
        complete_copy(&mut p, 20, 32, protocol::TCP);
        verify(&p);
        // UDP, and its zero checksum written as 0xffff.
        let mut u = vec![0u8; 28 + 4];
        u[..20].copy_from_slice(&super_packet(&[], 0)[..20]);
        u[9] = protocol::UDP;
        u[24..26].copy_from_slice(&12u16.to_be_bytes());
        complete_copy(&mut u, 20, 8, protocol::UDP);
        let pseudo = checksum::pseudo_header(SRC, DST, 17, 12);
        assert_eq!(
            checksum::combine(&[pseudo, checksum::sum(&u[20..])]),
            0xffff
        );
    }

    #[test]
    fn message_grouping() {
        // 64 KB of 1400-byte segments with 72 header bytes each: 44 + 3 in two messages.
        assert_eq!(TsoPlan::segments_per_message(20 + 52 + 1400), 44);
        assert_eq!(TsoPlan::segments_per_message(100), MAX_GSO_SEGMENTS);
        assert_eq!(TsoPlan::segments_per_message(70000), 1);
        let plan = TsoPlan::new(1400, 65000);
        assert_eq!(plan.segments(), 47);
        assert_eq!(plan.range(46), (64400, 600));
        assert_eq!(TsoPlan::new(1400, 0).segments(), 1);
    }

    proptest! {
        /// Any payload and MSS: the segments' payloads rebuild the original, every checksum
        /// verifies like a full recompute, and every segment fits `mss`.
        #[test]
        fn segmentation_is_lossless_and_checksums_verify(
            payload in proptest::collection::vec(any::<u8>(), 1..5000),
            mss in 1usize..1500,
            tcp_flags in any::<u8>(),
        ) {
            let p = super_packet(&payload, tcp_flags);
            let segs = segment_copy(&p, 20, 32, mss);
            prop_assert_eq!(segs.len(), payload.len().div_ceil(mss));
            let mut joined = Vec::new();
            for s in &segs {
                prop_assert!(s.len() <= 52 + mss);
                let (_, t) = verify(s);
                joined.extend_from_slice(t.payload());
            }
            prop_assert_eq!(joined, payload);
        }
    }
}
