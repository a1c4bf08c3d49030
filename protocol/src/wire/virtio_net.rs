//! The virtio-net header (virtio 1.2, 5.1.6 "Device Operation"): the one view of it, for the
//! TX path (which must validate what a guest wrote) and the RX path (which writes it).
//!
//! ```text
//! +-------+----------+-----------+-----------+--------------+---------------+---------------+
//! | flags | gso_type |  hdr_len  | gso_size  |  csum_start  |  csum_offset  |  num_buffers  |
//! |  (1)  |   (1)    | (2, LE)   | (2, LE)   |   (2, LE)    |    (2, LE)    |    (2, LE)    |
//! +-------+----------+-----------+-----------+--------------+---------------+---------------+
//! ```
//!
//! All multi-byte fields are little endian (VERSION_1). `num_buffers` is present with
//! VERSION_1 or MRG_RXBUF (12 bytes), absent for a legacy driver without either (10 bytes).
//!
//! Every field of a TX header is chosen by the guest. [`TxOffload::validate`] checks each of
//! them against the packet's own parsed Ethernet/IPv4/TCP (or UDP) headers before anything
//! uses them: DPDK's CVE-2024-11614 came from trusting `csum_start`. The only network vnp
//! carries is IPv4, so only `GSO_TCPV4` (with or without the ECN bit) is accepted; UDP
//! fragmentation offload (UFO), USO and the IPv6 types are refused (never negotiated).

use thiserror::Error;

use super::ethernet::{self, ethertype};
use super::ipv4::{self, protocol};
use super::{tcp, udp, WireError};

/// Header length with `num_buffers` (VERSION_1 or MRG_RXBUF).
pub const HEADER_LEN: usize = 12;
/// Header length of a legacy driver without VERSION_1 or MRG_RXBUF.
pub const LEGACY_HEADER_LEN: usize = 10;
/// Most segments one super-packet may be cut into: 64 KB at an MSS of 64 bytes. A tiny
/// `gso_size` would otherwise let one descriptor chain make the device send 65 535 datagrams.
pub const MAX_TSO_SEGMENTS: usize = 1024;

/// Bits of the `flags` field.
pub mod flags {
    /// The checksum from `csum_start` to the end is left for the device to complete and store
    /// at `csum_start + csum_offset`.
    pub const NEEDS_CSUM: u8 = 1;
    /// RX only: the device checked the checksums (the driver must not set it on TX).
    pub const DATA_VALID: u8 = 2;
}

/// Values of the `gso_type` field.
pub mod gso {
    /// Not a GSO frame.
    pub const NONE: u8 = 0;
    /// A TCP/IPv4 super-packet (TSO).
    pub const TCPV4: u8 = 1;
    /// UDP fragmentation offload (refused: Linux no longer emits it).
    pub const UDP: u8 = 3;
    /// A TCP/IPv6 super-packet (refused: the network carries IPv4 only).
    pub const TCPV6: u8 = 4;
    /// UDP segmentation offload, USO (refused: not negotiated).
    pub const UDP_L4: u8 = 5;
    /// Bit set on top of a TCP type: the super-packet's TCP header has CWR set (ECN).
    pub const ECN: u8 = 0x80;
}

mod field {
    use core::ops::Range;
    pub const FLAGS: usize = 0;
    pub const GSO_TYPE: usize = 1;
    pub const HDR_LEN: Range<usize> = 2..4;
    pub const GSO_SIZE: Range<usize> = 4..6;
    pub const CSUM_START: Range<usize> = 6..8;
    pub const CSUM_OFFSET: Range<usize> = 8..10;
    pub const NUM_BUFFERS: Range<usize> = 10..12;
}

fn le16(data: &[u8], range: core::ops::Range<usize>) -> u16 {
    u16::from_le_bytes([data[range.start], data[range.start + 1]])
}

fn set_le16(data: &mut [u8], range: core::ops::Range<usize>, value: u16) {
    data[range].copy_from_slice(&value.to_le_bytes());
}

/// A view of a virtio-net header of [`LEGACY_HEADER_LEN`] or [`HEADER_LEN`] bytes.
#[derive(Debug, Clone, Copy)]
pub struct Header<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Header<T> {
    /// Wraps a buffer without checking it; accessors panic if it is shorter than
    /// [`LEGACY_HEADER_LEN`].
    pub const fn new_unchecked(buffer: T) -> Self {
        Self { buffer }
    }

    /// Wraps a buffer of at least [`LEGACY_HEADER_LEN`] bytes.
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        if buffer.as_ref().len() < LEGACY_HEADER_LEN {
            return Err(WireError::Truncated);
        }
        Ok(Self::new_unchecked(buffer))
    }

    /// The `flags` byte (see [`flags`]).
    pub fn flags(&self) -> u8 {
        self.buffer.as_ref()[field::FLAGS]
    }

    /// The `gso_type` byte (see [`gso`]).
    pub fn gso_type(&self) -> u8 {
        self.buffer.as_ref()[field::GSO_TYPE]
    }

    /// `hdr_len`: a hint of the length of the headers (Linux writes its linear length).
    pub fn hdr_len(&self) -> u16 {
        le16(self.buffer.as_ref(), field::HDR_LEN)
    }

    /// `gso_size`: the payload bytes per segment (the MSS) of a GSO frame.
    pub fn gso_size(&self) -> u16 {
        le16(self.buffer.as_ref(), field::GSO_SIZE)
    }

    /// `csum_start`: offset from the start of the frame where checksumming starts.
    pub fn csum_start(&self) -> u16 {
        le16(self.buffer.as_ref(), field::CSUM_START)
    }

    /// `csum_offset`: where, from `csum_start`, the checksum goes.
    pub fn csum_offset(&self) -> u16 {
        le16(self.buffer.as_ref(), field::CSUM_OFFSET)
    }

    /// `num_buffers` (1 when the header has no such field).
    pub fn num_buffers(&self) -> u16 {
        let data = self.buffer.as_ref();
        if data.len() >= HEADER_LEN {
            le16(data, field::NUM_BUFFERS)
        } else {
            1
        }
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Header<T> {
    /// Writes every field (`num_buffers` only when the buffer has room for it).
    pub fn emit(&mut self, repr: &Repr) {
        let data = self.buffer.as_mut();
        data[field::FLAGS] = repr.flags;
        data[field::GSO_TYPE] = repr.gso_type;
        set_le16(data, field::HDR_LEN, repr.hdr_len);
        set_le16(data, field::GSO_SIZE, repr.gso_size);
        set_le16(data, field::CSUM_START, repr.csum_start);
        set_le16(data, field::CSUM_OFFSET, repr.csum_offset);
        if data.len() >= HEADER_LEN {
            set_le16(data, field::NUM_BUFFERS, repr.num_buffers);
        }
    }
}

/// The header's fields as plain values, unvalidated (see [`TxOffload::validate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Repr {
    /// `flags` bits.
    pub flags: u8,
    /// `gso_type`, ECN bit included.
    pub gso_type: u8,
    /// `hdr_len`.
    pub hdr_len: u16,
    /// `gso_size`.
    pub gso_size: u16,
    /// `csum_start`.
    pub csum_start: u16,
    /// `csum_offset`.
    pub csum_offset: u16,
    /// `num_buffers`.
    pub num_buffers: u16,
}

impl Repr {
    /// Reads every field of a checked header.
    pub fn parse<T: AsRef<[u8]>>(header: &Header<T>) -> Self {
        Self {
            flags: header.flags(),
            gso_type: header.gso_type(),
            hdr_len: header.hdr_len(),
            gso_size: header.gso_size(),
            csum_start: header.csum_start(),
            csum_offset: header.csum_offset(),
            num_buffers: header.num_buffers(),
        }
    }

    /// The header as [`HEADER_LEN`] bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        Header::new_unchecked(&mut out[..]).emit(self);
        out
    }

    /// Whether the header asks for any offload (a checksum to complete or a super-packet).
    pub fn wants_offload(&self) -> bool {
        self.flags != 0 || self.gso_type != gso::NONE
    }
}

/// What the guest negotiated, which bounds what its headers may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TxAllowed {
    /// `VIRTIO_NET_F_CSUM`: partial checksums.
    pub csum: bool,
    /// `VIRTIO_NET_F_HOST_TSO4`: TCP/IPv4 super-packets.
    pub tso4: bool,
    /// `VIRTIO_NET_F_HOST_ECN`: the ECN bit with TSO.
    pub ecn: bool,
}

/// Why a TX virtio-net header does not fit its packet. Each maps to one counted drop reason in
/// vnpd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum OffloadError {
    /// The header asks for an offload that was not negotiated.
    #[error("offload requested but not negotiated")]
    NotNegotiated,
    /// Unknown `flags` bits, or `DATA_VALID` (an RX-only flag) on TX.
    #[error("bad virtio-net flags")]
    Flags,
    /// `gso_type` is not NONE or TCPV4 (UFO, USO, IPv6, unknown), or GSO without NEEDS_CSUM.
    #[error("unsupported gso_type")]
    GsoType,
    /// The packet under a checksum or GSO request is not an unfragmented IPv4 TCP/UDP packet
    /// whose headers are all there (or, for GSO, not TCP).
    #[error("headers do not fit the offload request")]
    Headers,
    /// `csum_start` is not where the transport header starts.
    #[error("csum_start does not point at the transport header")]
    CsumStart,
    /// `csum_offset` is not the transport's checksum field, or lies beyond the frame.
    #[error("csum_offset is not the transport checksum field")]
    CsumOffset,
    /// `gso_size` is zero, or one segment of it would not fit the network MTU, or there is no
    /// payload to segment, or it would make more than [`MAX_TSO_SEGMENTS`] segments.
    #[error("bad gso_size")]
    GsoSize,
    /// `hdr_len` is beyond the frame.
    #[error("hdr_len beyond the frame")]
    HdrLen,
}

/// A TX frame's offload request, validated against its own headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxOffload {
    /// A complete packet: nothing to do.
    None,
    /// The transport checksum is to be completed. Offsets from the start of the Ethernet frame.
    Checksum {
        /// Where the transport header starts (== `csum_start`).
        l4_start: usize,
        /// The IP protocol (TCP or UDP).
        protocol: u8,
    },
    /// A TCP/IPv4 super-packet to cut into segments of `mss` payload bytes.
    TcpSegments {
        /// Where the IPv4 header starts in the frame (the Ethernet header length).
        l3_start: usize,
        /// Where the TCP header starts.
        l4_start: usize,
        /// Where the payload starts (all headers' length).
        payload_start: usize,
        /// Payload bytes per segment (`gso_size`).
        mss: usize,
    },
}

impl TxOffload {
    /// Validates `repr` against the frame it precedes. `prefix` holds the frame's first bytes
    /// (at least its Ethernet, IPv4 and transport headers when an offload is requested),
    /// `frame_len` the frame's full length, `mtu` the largest inner IPv4 packet the network
    /// carries. Pure; nothing the guest wrote is used without a check here.
    pub fn validate(
        repr: &Repr,
        allowed: TxAllowed,
        prefix: &[u8],
        frame_len: usize,
        mtu: usize,
    ) -> Result<Self, OffloadError> {
        if !repr.wants_offload() {
            return Ok(Self::None);
        }
        if repr.flags & !flags::NEEDS_CSUM != 0 {
            return Err(OffloadError::Flags);
        }
        let gso_kind = repr.gso_type & !gso::ECN;
        let ecn = repr.gso_type & gso::ECN != 0;
        match gso_kind {
            gso::NONE if ecn => return Err(OffloadError::GsoType),
            gso::NONE | gso::TCPV4 => {}
            _ => return Err(OffloadError::GsoType),
        }
        let segmenting = gso_kind == gso::TCPV4;
        if !allowed.csum || (segmenting && !allowed.tso4) || (ecn && !allowed.ecn) {
            return Err(OffloadError::NotNegotiated);
        }
        // The virtio spec: a GSO frame must also ask for its checksum.
        if repr.flags & flags::NEEDS_CSUM == 0 {
            return Err(OffloadError::GsoType);
        }
        if usize::from(repr.hdr_len) > frame_len {
            return Err(OffloadError::HdrLen);
        }
        let l4 = Transport::parse(prefix, frame_len).ok_or(OffloadError::Headers)?;
        if usize::from(repr.csum_start) != l4.start {
            return Err(OffloadError::CsumStart);
        }
        let field = match l4.protocol {
            protocol::TCP => 16,
            _ => 6,
        };
        if usize::from(repr.csum_offset) != field || l4.start + field + 2 > frame_len {
            return Err(OffloadError::CsumOffset);
        }
        if !segmenting {
            return Ok(Self::Checksum {
                l4_start: l4.start,
                protocol: l4.protocol,
            });
        }
        if l4.protocol != protocol::TCP {
            return Err(OffloadError::Headers);
        }
        let mss = usize::from(repr.gso_size);
        let headers = l4.payload_start - ethernet::HEADER_LEN;
        if mss == 0 || headers + mss > mtu || l4.payload_start >= frame_len {
            return Err(OffloadError::GsoSize);
        }
        if (frame_len - l4.payload_start).div_ceil(mss) > MAX_TSO_SEGMENTS {
            return Err(OffloadError::GsoSize);
        }
        Ok(Self::TcpSegments {
            l3_start: ethernet::HEADER_LEN,
            l4_start: l4.start,
            payload_start: l4.payload_start,
            mss,
        })
    }
}

/// Where a frame's transport header is, from its own parsed headers.
struct Transport {
    protocol: u8,
    start: usize,
    payload_start: usize,
}

impl Transport {
    /// An unfragmented IPv4 TCP or UDP packet whose headers are all in `prefix` and whose
    /// total length is exactly what the frame holds after the Ethernet header (no padding:
    /// padding would be checksummed as payload).
    fn parse(prefix: &[u8], frame_len: usize) -> Option<Self> {
        let eth = ethernet::Frame::new_checked(prefix).ok()?;
        if eth.ethertype() != ethertype::IPV4 {
            return None;
        }
        let ip = ipv4::Packet::new_checked(eth.payload()).ok()?;
        if ip.total_len() + ethernet::HEADER_LEN != frame_len || ip.is_fragment() {
            return None;
        }
        let start = ethernet::HEADER_LEN + ip.header_len();
        let payload_start = match ip.protocol() {
            protocol::TCP => start + tcp::Packet::new_checked(ip.payload()).ok()?.header_len(),
            protocol::UDP => start + udp::Packet::new_checked(ip.payload()).ok().map(|_| 8)?,
            _ => return None,
        };
        (payload_start <= frame_len).then_some(Self {
            protocol: ip.protocol(),
            start,
            payload_start,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ALL: TxAllowed = TxAllowed {
        csum: true,
        tso4: true,
        ecn: true,
    };
    const MTU: usize = 1452;

    /// Ethernet + IPv4 (20) + TCP with `tcp_opts` option bytes, `payload` bytes of payload.
    fn tcp_frame(tcp_opts: usize, payload: usize) -> Vec<u8> {
        let tcp_len = 20 + tcp_opts;
        let total = 20 + tcp_len + payload;
        let mut f = vec![0u8; 14 + total];
        f[12..14].copy_from_slice(&ethertype::IPV4.to_be_bytes());
        f[14] = 0x45;
        f[16..18].copy_from_slice(&(total as u16).to_be_bytes());
        f[20] = 0x40; // DF
        f[22] = 64;
        f[23] = protocol::TCP;
        f[26..30].copy_from_slice(&[10, 0, 0, 2]);
        f[30..34].copy_from_slice(&[10, 0, 0, 3]);
        f[34 + 12] = ((tcp_len / 4) as u8) << 4;
        f
    }

    fn tso(mss: u16) -> Repr {
        Repr {
            flags: flags::NEEDS_CSUM,
            gso_type: gso::TCPV4,
            hdr_len: 66,
            gso_size: mss,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 0,
        }
    }

    fn check(repr: &Repr, f: &[u8]) -> Result<TxOffload, OffloadError> {
        TxOffload::validate(repr, ALL, &f[..f.len().min(134)], f.len(), MTU)
    }

    #[test]
    fn layout_round_trip() {
        let r = Repr {
            flags: flags::NEEDS_CSUM,
            gso_type: gso::TCPV4 | gso::ECN,
            hdr_len: 0x0102,
            gso_size: 0x0304,
            csum_start: 0x0506,
            csum_offset: 0x0708,
            num_buffers: 0x090a,
        };
        let b = r.to_bytes();
        assert_eq!(b, [1, 0x81, 2, 1, 4, 3, 6, 5, 8, 7, 0x0a, 9]);
        assert_eq!(Repr::parse(&Header::new_checked(&b[..]).unwrap()), r);
        // A legacy header has no num_buffers: it reads as 1 and is not written.
        let mut legacy = [0xffu8; 10];
        Header::new_checked(&mut legacy[..]).unwrap().emit(&r);
        assert_eq!(Header::new_checked(&legacy[..]).unwrap().num_buffers(), 1);
        assert_eq!(
            Header::new_checked(&b[..9]).err(),
            Some(WireError::Truncated)
        );
    }

    #[test]
    fn plain_and_good_requests() {
        let f = tcp_frame(12, 3000);
        assert_eq!(check(&Repr::default(), &f), Ok(TxOffload::None));
        let csum = Repr {
            gso_type: 0,
            ..tso(0)
        };
        assert_eq!(
            check(&csum, &f),
            Ok(TxOffload::Checksum {
                l4_start: 34,
                protocol: protocol::TCP
            })
        );
        assert_eq!(
            check(&tso(1388), &f),
            Ok(TxOffload::TcpSegments {
                l3_start: 14,
                l4_start: 34,
                payload_start: 66,
                mss: 1388
            })
        );
        let ecn = Repr {
            gso_type: gso::TCPV4 | gso::ECN,
            ..tso(1388)
        };
        assert!(check(&ecn, &f).is_ok());
        // UDP checksum: offset 6.
        let mut u = tcp_frame(0, 100);
        u[23] = protocol::UDP;
        let ucsum = Repr {
            gso_type: 0,
            csum_offset: 6,
            ..tso(0)
        };
        assert!(matches!(
            check(&ucsum, &u),
            Ok(TxOffload::Checksum { l4_start: 34, .. })
        ));
    }

    #[test]
    fn every_bad_field_is_refused() {
        let f = tcp_frame(12, 3000);
        let bad = |r: Repr| check(&r, &f).unwrap_err();
        assert_eq!(
            bad(Repr {
                flags: flags::NEEDS_CSUM | flags::DATA_VALID,
                ..tso(1000)
            }),
            OffloadError::Flags
        );
        for t in [gso::UDP, gso::TCPV6, gso::UDP_L4, 2, 0x7f, gso::ECN] {
            assert_eq!(
                bad(Repr {
                    gso_type: t,
                    ..tso(1000)
                }),
                OffloadError::GsoType,
                "{t}"
            );
        }
        assert_eq!(
            bad(Repr {
                flags: 0,
                ..tso(1000)
            }),
            OffloadError::GsoType
        );
        for start in [0, 14, 33, 35, 54, 66, u16::MAX] {
            assert_eq!(
                bad(Repr {
                    csum_start: start,
                    ..tso(1000)
                }),
                OffloadError::CsumStart
            );
        }
        for off in [0, 6, 15, 17, 40000] {
            assert_eq!(
                bad(Repr {
                    csum_offset: off,
                    ..tso(1000)
                }),
                OffloadError::CsumOffset
            );
        }
        assert_eq!(bad(tso(0)), OffloadError::GsoSize);
        // 20 + 32 header bytes + 1401 > 1452.
        assert_eq!(bad(tso(1401)), OffloadError::GsoSize);
        // 3000 bytes in 1-byte segments: more than MAX_TSO_SEGMENTS.
        assert_eq!(bad(tso(1)), OffloadError::GsoSize);
        assert!(check(&tso(3), &f).is_ok(), "1000 segments");
        assert!(check(&tso(1400), &f).is_ok());
        assert_eq!(
            bad(Repr {
                hdr_len: 3067,
                ..tso(1000)
            }),
            OffloadError::HdrLen
        );
        let off = TxAllowed { tso4: false, ..ALL };
        assert_eq!(
            TxOffload::validate(&tso(1000), off, &f[..134], f.len(), MTU),
            Err(OffloadError::NotNegotiated)
        );
    }

    #[test]
    fn headers_must_be_real() {
        let r = tso(1000);
        // Not IPv4.
        let mut f = tcp_frame(0, 3000);
        f[12] = 0x86;
        assert_eq!(check(&r, &f), Err(OffloadError::Headers));
        // A fragment.
        let mut f = tcp_frame(0, 3000);
        f[21] = 1;
        assert_eq!(check(&r, &f), Err(OffloadError::Headers));
        // Total length not the frame's.
        let f = tcp_frame(0, 3000);
        assert_eq!(
            TxOffload::validate(&r, ALL, &f[..134], f.len() + 1, MTU),
            Err(OffloadError::Headers)
        );
        // GSO of UDP; ICMP checksum.
        let mut f = tcp_frame(0, 3000);
        f[23] = protocol::UDP;
        let udp = Repr {
            csum_offset: 6,
            ..r
        };
        assert_eq!(check(&udp, &f), Err(OffloadError::Headers));
        f[23] = protocol::ICMP;
        assert_eq!(check(&udp, &f), Err(OffloadError::Headers));
        // TCP header cut off by the prefix.
        let f = tcp_frame(40, 3000);
        assert_eq!(
            TxOffload::validate(&r, ALL, &f[..60], f.len(), MTU),
            Err(OffloadError::Headers)
        );
        // No payload to segment.
        let f = tcp_frame(0, 0);
        let r = Repr { hdr_len: 54, ..r };
        assert_eq!(check(&r, &f), Err(OffloadError::GsoSize));
    }

    proptest! {
        /// Whatever a guest writes in the header and the frame's first bytes, validation never
        /// panics, and what it accepts points inside the frame at a real transport header.
        #[test]
        fn validation_is_total_and_sound(
            hdr in proptest::array::uniform12(any::<u8>()),
            mut frame in proptest::collection::vec(any::<u8>(), 0..200),
            real in any::<bool>(),
            extra in 0usize..70000,
        ) {
            if real && frame.len() >= 60 {
                let base = tcp_frame(0, frame.len() - 54);
                frame[..54].copy_from_slice(&base[..54]);
            }
            let repr = Repr::parse(&Header::new_checked(&hdr[..]).unwrap());
            let frame_len = frame.len() + extra % 2 * extra;
            match TxOffload::validate(&repr, ALL, &frame[..frame.len().min(134)], frame_len, MTU) {
                Ok(TxOffload::None) => prop_assert!(!repr.wants_offload()),
                Ok(TxOffload::Checksum { l4_start, .. }) => {
                    prop_assert_eq!(l4_start, usize::from(repr.csum_start));
                    prop_assert!(l4_start + usize::from(repr.csum_offset) + 2 <= frame_len);
                }
                Ok(TxOffload::TcpSegments { l4_start, payload_start, mss, .. }) => {
                    prop_assert!(l4_start + 20 <= payload_start && payload_start < frame_len);
                    prop_assert!(mss > 0 && payload_start - 14 + mss <= MTU);
                }
                Err(_) => {}
            }
        }
    }
}
