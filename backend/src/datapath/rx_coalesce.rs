//! Coalescing received inner TCP segments into one large segment for the guest (receive
//! offload), for a guest that negotiated `GUEST_TSO4`, `GUEST_CSUM` and `MRG_RXBUF`. Pure: the
//! caller hands in the accepted inner packets of one receive batch, in arrival order.
//!
//! A *run* is in-order segments of one TCP flow: every header byte equal except the IPv4 total
//! length, identification and checksum and the TCP sequence number, flags and checksum (so the
//! same addresses, ports, TOS/ECN, TTL, ack, window and TCP options); each sequence number
//! follows the previous segment's end; flags ACK, with PSH only on the last segment; every
//! segment but the last of the run's first size. Anything else ends the run: SYN, FIN, RST,
//! URG, ECE, CWR, IPv4 options, fragments, a segment without payload, a bad IPv4 or TCP
//! checksum (such a packet is handed over alone, as it came, for the guest to judge).
//!
//! A run of more than one segment becomes one frame: the first segment's headers with the
//! IPv4 total length and header checksum fixed, then every segment's payload, and a virtio-net
//! header with `gso_type` TCPV4, `gso_size` = the first segment's payload, and `NEEDS_CSUM`
//! with the TCP checksum field holding the pseudo-header sum. `NEEDS_CSUM` because the virtio
//! spec asks a device that sets a `gso_type` to set it too (5.1.6.4.1), and it is what Linux
//! itself hands a guest for a GRO'd segment (`tcp_gro_complete`); every segment's checksum was
//! verified here first, which is what the flag promises for the bytes it covers.

use std::net::Ipv4Addr;

use vnp_protocol::wire::ipv4::{self, protocol};
use vnp_protocol::wire::virtio_net::{self, flags as vnet_flags, gso as vnet_gso};
use vnp_protocol::wire::{checksum, tcp};

/// Largest coalesced packet: the IPv4 total length field.
pub const MAX_COALESCED_LEN: usize = 65535;
/// Ethernet header length (the frame the guest sees starts with it).
const ETH_HLEN: usize = 14;
/// Where the checksum sits in the TCP header.
const TCP_CSUM_OFFSET: u16 = 16;

/// An inner packet that may be part of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSeg {
    /// IPv4 header length (always 20: packets with IPv4 options are not coalesced).
    pub ip_hlen: usize,
    /// IPv4 + TCP header length.
    pub hdr_len: usize,
    /// TCP payload bytes.
    pub payload_len: usize,
    /// Sequence number.
    pub seq: u32,
    /// PSH set: the run ends with this segment.
    pub psh: bool,
}

impl TcpSeg {
    /// The segment in `packet` (exactly the inner packet, `total_len` bytes), when it may be
    /// coalesced: plain IPv4 without options, not a fragment, TCP with flags ACK or ACK|PSH,
    /// a payload, and both checksums right.
    pub fn parse(packet: &[u8]) -> Option<TcpSeg> {
        let ip = ipv4::Packet::new_checked(packet).ok()?;
        if ip.header_len() != ipv4::MIN_HEADER_LEN
            || ip.total_len() != packet.len()
            || ip.is_fragment()
            || ip.protocol() != protocol::TCP
            || !ip.verify_checksum()
        {
            return None;
        }
        let segment = &packet[ipv4::MIN_HEADER_LEN..];
        let t = tcp::Packet::new_checked(segment).ok()?;
        let flags = t.flags();
        if flags & !(tcp::flags::ACK | tcp::flags::PSH) != 0 || flags & tcp::flags::ACK == 0 {
            return None;
        }
        let payload_len = segment.len() - t.header_len();
        if payload_len == 0 || !t.verify_checksum(ip.src_addr(), ip.dst_addr()) {
            return None;
        }
        Some(TcpSeg {
            ip_hlen: ipv4::MIN_HEADER_LEN,
            hdr_len: ipv4::MIN_HEADER_LEN + t.header_len(),
            payload_len,
            seq: t.seq_number(),
            psh: flags & tcp::flags::PSH != 0,
        })
    }
}

/// Whether two packets' headers (`hdr_len` bytes each, IPv4 without options then TCP) belong
/// to one run: equal but for the fields a run may change (see the module doc).
fn same_flow(a: &[u8], b: &[u8], hdr_len: usize) -> bool {
    if a.len() < hdr_len || b.len() < hdr_len {
        return false;
    }
    let t = ipv4::MIN_HEADER_LEN;
    // IPv4: version/IHL, TOS; flags/fragment, TTL, protocol; addresses.
    a[0..2] == b[0..2]
        && a[6..10] == b[6..10]
        && a[12..20] == b[12..20]
        // TCP: ports; ack and data offset; window; urgent pointer and options.
        && a[t..t + 4] == b[t..t + 4]
        && a[t + 8..t + 13] == b[t + 8..t + 13]
        && a[t + 14..t + 16] == b[t + 14..t + 16]
        && a[t + 18..hdr_len] == b[t + 18..hdr_len]
}

/// How a run of several segments is handed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gso {
    /// IPv4 header length.
    pub ip_hlen: usize,
    /// IPv4 + TCP header length.
    pub hdr_len: usize,
    /// The first segment's payload (virtio-net `gso_size`, the MSS).
    pub gso_size: u16,
    /// Payload bytes of the whole run.
    pub payload_len: usize,
    /// The last segment had PSH.
    pub psh: bool,
}

impl Gso {
    /// Total length of the coalesced IPv4 packet.
    pub fn packet_len(&self) -> usize {
        self.hdr_len + self.payload_len
    }
}

/// One frame for the guest: `count` packets from `first` (in the caller's numbering), one
/// packet as it came (`gso: None`) or a coalesced run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Planned {
    /// First packet.
    pub first: usize,
    /// Packets in the frame.
    pub count: usize,
    /// Set for a coalesced run of two or more segments.
    pub gso: Option<Gso>,
}

/// The run being built.
struct Run {
    first: usize,
    count: usize,
    seg: TcpSeg,
    next_seq: u32,
    payload_len: usize,
    psh: bool,
    /// No further segment may join (PSH, or a segment shorter than the first).
    closed: bool,
}

impl Run {
    fn start(first: usize, seg: TcpSeg) -> Self {
        Self {
            first,
            count: 1,
            seg,
            next_seq: seg.seq.wrapping_add(seg.payload_len as u32),
            payload_len: seg.payload_len,
            psh: seg.psh,
            closed: seg.psh,
        }
    }

    /// Whether `seg` (with headers `bytes`) continues this run; `first_bytes` are the run's
    /// first packet.
    fn admits(&self, seg: &TcpSeg, first_bytes: &[u8], bytes: &[u8]) -> bool {
        !self.closed
            && seg.hdr_len == self.seg.hdr_len
            && seg.seq == self.next_seq
            && seg.payload_len <= self.seg.payload_len
            && self.seg.hdr_len + self.payload_len + seg.payload_len <= MAX_COALESCED_LEN
            && same_flow(first_bytes, bytes, seg.hdr_len)
    }

    fn push(&mut self, seg: &TcpSeg) {
        self.count += 1;
        self.next_seq = seg.seq.wrapping_add(seg.payload_len as u32);
        self.payload_len += seg.payload_len;
        self.psh = seg.psh;
        self.closed = seg.psh || seg.payload_len < self.seg.payload_len;
    }

    fn finish(&self) -> Planned {
        let gso = (self.count > 1).then_some(Gso {
            ip_hlen: self.seg.ip_hlen,
            hdr_len: self.seg.hdr_len,
            gso_size: self.seg.payload_len as u16,
            payload_len: self.payload_len,
            psh: self.psh,
        });
        Planned {
            first: self.first,
            count: self.count,
            gso,
        }
    }
}

/// Splits packets `0..n` (`packet(i)`: packet `i`'s bytes) into frames: with `coalesce`, runs
/// of one TCP flow become one frame each; everything else (and everything without
/// `coalesce`) one frame per packet. Frames keep the packets' order.
pub fn plan_frames<'a>(
    n: usize,
    packet: impl Fn(usize) -> &'a [u8],
    coalesce: bool,
    out: &mut Vec<Planned>,
) {
    out.clear();
    let mut run: Option<Run> = None;
    for i in 0..n {
        let seg = if coalesce {
            TcpSeg::parse(packet(i))
        } else {
            None
        };
        if let (Some(r), Some(s)) = (run.as_mut(), seg.as_ref()) {
            if r.admits(s, packet(r.first), packet(i)) {
                r.push(s);
                continue;
            }
        }
        if let Some(r) = run.take() {
            out.push(r.finish());
        }
        match seg {
            Some(s) => run = Some(Run::start(i, s)),
            None => out.push(Planned {
                first: i,
                count: 1,
                gso: None,
            }),
        }
    }
    if let Some(r) = run {
        out.push(r.finish());
    }
}

/// Writes the coalesced packet's headers into `out` (at least `gso.hdr_len` bytes) from the
/// run's first packet `first`: IPv4 total length and header checksum fixed, PSH when the last
/// segment had it, and the TCP checksum field holding the pseudo-header sum (`NEEDS_CSUM`: the
/// guest adds the segment's bytes and stores the complement).
pub fn emit_coalesced_headers(first: &[u8], gso: &Gso, out: &mut [u8]) {
    let hdr = &mut out[..gso.hdr_len];
    hdr.copy_from_slice(&first[..gso.hdr_len]);
    let (src, dst) = {
        let mut ip = ipv4::Packet::new_unchecked(&mut hdr[..gso.ip_hlen]);
        ip.set_total_len(gso.packet_len() as u16);
        ip.fill_checksum();
        (ip.src_addr(), ip.dst_addr())
    };
    let mut t = tcp::Packet::new_unchecked(&mut hdr[gso.ip_hlen..]);
    if gso.psh {
        let flags = t.flags();
        t.set_flags(flags | tcp::flags::PSH);
    }
    let tcp_len = (gso.packet_len() - gso.ip_hlen) as u16;
    t.set_stored_checksum(pseudo_sum(src, dst, tcp_len));
}

fn pseudo_sum(src: Ipv4Addr, dst: Ipv4Addr, tcp_len: u16) -> u16 {
    checksum::pseudo_header(src, dst, protocol::TCP, tcp_len)
}

/// The virtio-net header of a received frame (12 bytes; a legacy driver reads the first 10):
/// all zero but `num_buffers` for a plain frame; for a coalesced run `NEEDS_CSUM`, TCPV4,
/// `hdr_len`, `gso_size`, `csum_start`/`csum_offset` (from the start of the Ethernet frame).
/// The one place vnpd's RX path chooses the header's fields.
pub fn rx_vnet_header(gso: Option<&Gso>, num_buffers: u16) -> [u8; virtio_net::HEADER_LEN] {
    let mut repr = virtio_net::Repr {
        num_buffers,
        ..Default::default()
    };
    if let Some(g) = gso {
        repr.flags = vnet_flags::NEEDS_CSUM;
        repr.gso_type = vnet_gso::TCPV4;
        repr.hdr_len = (ETH_HLEN + g.hdr_len) as u16;
        repr.gso_size = g.gso_size;
        repr.csum_start = (ETH_HLEN + g.ip_hlen) as u16;
        repr.csum_offset = TCP_CSUM_OFFSET;
    }
    repr.to_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
    const B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);

    /// A segment of the flow A:1000 -> B:80 with a 12-byte timestamp option.
    struct Seg {
        seq: u32,
        payload: usize,
        flags: u8,
        ack: u32,
        window: u16,
        tsval: u32,
        tos: u8,
    }

    /// A change to a segment that must end a run.
    type Change = Box<dyn Fn(&mut Seg)>;

    fn seg(seq: u32, payload: usize) -> Seg {
        Seg {
            seq,
            payload,
            flags: tcp::flags::ACK,
            ack: 7,
            window: 500,
            tsval: 1,
            tos: 0,
        }
    }

    fn bytes(s: &Seg) -> Vec<u8> {
        let tcp_hlen = 32;
        let total = 20 + tcp_hlen + s.payload;
        let mut p = vec![0u8; total];
        for (i, b) in p[20 + tcp_hlen..].iter_mut().enumerate() {
            *b = (s.seq as usize + i) as u8;
        }
        {
            let mut ip = ipv4::Packet::new_unchecked(&mut p[..]);
            ip.set_version_and_header_len(20);
            ip.set_dscp_ecn(s.tos);
            ip.set_total_len(total as u16);
            ip.set_ident(s.seq as u16);
            ip.set_unfragmented(true);
            ip.set_ttl(64);
            ip.set_protocol(protocol::TCP);
            ip.set_src_addr(A);
            ip.set_dst_addr(B);
            ip.fill_checksum();
        }
        {
            let mut t = tcp::Packet::new_unchecked(&mut p[20..]);
            t.set_src_port(1000);
            t.set_dst_port(80);
            t.set_seq_number(s.seq);
            t.set_ack_number(s.ack);
            t.set_header_len(tcp_hlen);
            t.set_flags(s.flags);
            t.set_window_len(s.window);
        }
        // NOP NOP timestamp(10)
        p[40..44].copy_from_slice(&[1, 1, 8, 10]);
        p[44..48].copy_from_slice(&s.tsval.to_be_bytes());
        tcp::Packet::new_unchecked(&mut p[20..]).fill_checksum(A, B);
        p
    }

    fn plan(packets: &[Vec<u8>], coalesce: bool) -> Vec<(usize, usize, bool)> {
        let mut out = Vec::new();
        plan_frames(packets.len(), |i| &packets[i][..], coalesce, &mut out);
        out.iter()
            .map(|p| (p.first, p.count, p.gso.is_some()))
            .collect()
    }

    fn train(n: usize, mss: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| bytes(&seg(1000 + (i * mss) as u32, mss)))
            .collect()
    }

    #[test]
    fn in_order_segments_of_one_flow_make_one_run() {
        let p = train(5, 1400);
        assert_eq!(plan(&p, true), vec![(0, 5, true)]);
        let mut out = Vec::new();
        plan_frames(p.len(), |i| &p[i][..], true, &mut out);
        let g = out[0].gso.unwrap();
        assert_eq!((g.gso_size, g.payload_len, g.hdr_len), (1400, 7000, 52));
        // Without the guest's offloads: one frame per packet.
        assert_eq!(
            plan(&p, false),
            (0..5).map(|i| (i, 1, false)).collect::<Vec<_>>()
        );
    }

    #[test]
    fn anything_out_of_line_ends_the_run() {
        let base = |i: u32| seg(1000 + i * 100, 100);
        let cases: Vec<(&str, Change)> = vec![
            ("gap in sequence", Box::new(|s| s.seq += 1)),
            ("other ack", Box::new(|s| s.ack += 1)),
            ("other window", Box::new(|s| s.window += 1)),
            ("other options", Box::new(|s| s.tsval += 1)),
            ("ECN mark", Box::new(|s| s.tos = 3)),
            ("FIN", Box::new(|s| s.flags |= tcp::flags::FIN)),
            ("SYN", Box::new(|s| s.flags |= tcp::flags::SYN)),
            ("RST", Box::new(|s| s.flags |= tcp::flags::RST)),
            ("URG", Box::new(|s| s.flags |= 0x20)),
            ("ECE", Box::new(|s| s.flags |= tcp::flags::ECE)),
            ("CWR", Box::new(|s| s.flags |= tcp::flags::CWR)),
            ("no ACK", Box::new(|s| s.flags = 0)),
            ("no payload", Box::new(|s| s.payload = 0)),
        ];
        for (what, change) in cases {
            let mut third = base(2);
            change(&mut third);
            let p = vec![bytes(&base(0)), bytes(&base(1)), bytes(&third)];
            let got = plan(&p, true);
            assert_eq!(got[0], (0, 2, true), "{what}");
            assert_eq!(got.len(), 2, "{what}: {got:?}");
            assert_eq!((got[1].0, got[1].1), (2, 1), "{what}");
        }
    }

    #[test]
    fn psh_and_a_short_segment_close_the_run_after_them() {
        let mut p = train(4, 100);
        let mut s = seg(1200, 100);
        s.flags |= tcp::flags::PSH;
        p[2] = bytes(&s);
        assert_eq!(plan(&p, true), vec![(0, 3, true), (3, 1, false)]);
        let mut out = Vec::new();
        plan_frames(p.len(), |i| &p[i][..], true, &mut out);
        assert!(out[0].gso.unwrap().psh);
        // A shorter segment is the run's last; a longer one cannot join.
        let p = vec![
            bytes(&seg(0, 100)),
            bytes(&seg(100, 50)),
            bytes(&seg(150, 100)),
        ];
        assert_eq!(plan(&p, true), vec![(0, 2, true), (2, 1, false)]);
        let p = vec![bytes(&seg(0, 50)), bytes(&seg(50, 100))];
        assert_eq!(plan(&p, true), vec![(0, 1, false), (1, 1, false)]);
    }

    #[test]
    fn bad_checksums_and_oddities_go_alone() {
        let mut p = train(3, 100);
        let last = p[1].len() - 1;
        p[1][last] ^= 0xff; // payload corrupted: TCP checksum fails
        assert_eq!(
            plan(&p, true),
            vec![(0, 1, false), (1, 1, false), (2, 1, false)]
        );
        let mut p = train(2, 100);
        p[1][10] ^= 1; // IPv4 header checksum
        assert_eq!(plan(&p, true), vec![(0, 1, false), (1, 1, false)]);
        let mut p = train(2, 100);
        p[1][9] = protocol::UDP;
        assert_eq!(plan(&p, true), vec![(0, 1, false), (1, 1, false)]);
        // Not even IPv4: one frame, never a panic.
        let p = vec![vec![0u8; 3], vec![]];
        assert_eq!(plan(&p, true), vec![(0, 1, false), (1, 1, false)]);
    }

    #[test]
    fn runs_stop_below_the_ipv4_length_limit() {
        let p = train(50, 1400);
        let got = plan(&p, true);
        let lens: Vec<_> = got.iter().map(|g| g.1).collect();
        // 52 + 46 * 1400 = 64452 fits, 47 would not.
        assert_eq!(lens, vec![46, 4]);
    }

    #[test]
    fn coalesced_headers_and_vnet_header() {
        let p = train(3, 1000);
        let mut out = Vec::new();
        plan_frames(p.len(), |i| &p[i][..], true, &mut out);
        let g = out[0].gso.unwrap();
        let mut packet = vec![0u8; g.packet_len()];
        emit_coalesced_headers(&p[0], &g, &mut packet);
        for (i, s) in p.iter().enumerate() {
            let at = g.hdr_len + i * 1000;
            packet[at..at + 1000].copy_from_slice(&s[g.hdr_len..]);
        }
        let ip = ipv4::Packet::new_checked(&packet[..]).unwrap();
        assert_eq!(ip.total_len(), 52 + 3000);
        assert!(ip.verify_checksum());
        // The guest completes the checksum as NEEDS_CSUM says: the complement of the sum from
        // csum_start, the field holding the pseudo-header sum. The result verifies.
        let start = g.ip_hlen;
        let partial = checksum::sum(&packet[start..]);
        packet[start + 16..start + 18].copy_from_slice(&(!partial).to_be_bytes());
        let t = tcp::Packet::new_checked(&packet[start..]).unwrap();
        assert!(t.verify_checksum(A, B));
        assert_eq!(t.seq_number(), 1000);
        let h = rx_vnet_header(Some(&g), 20);
        assert_eq!(h[0], vnet_flags::NEEDS_CSUM);
        assert_eq!(h[1], vnet_gso::TCPV4);
        assert_eq!(u16::from_le_bytes([h[2], h[3]]), 14 + 52);
        assert_eq!(u16::from_le_bytes([h[4], h[5]]), 1000);
        assert_eq!(u16::from_le_bytes([h[6], h[7]]), 14 + 20);
        assert_eq!(u16::from_le_bytes([h[8], h[9]]), 16);
        assert_eq!(u16::from_le_bytes([h[10], h[11]]), 20);
        assert_eq!(
            rx_vnet_header(None, 3),
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0]
        );
    }
}
