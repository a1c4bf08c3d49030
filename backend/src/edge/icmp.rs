//! ICMP from the virtual router (RFC 792, RFC 1191, RFC 1812): echo replies to pings of the
//! router address, and "fragmentation needed" for packets larger than the network's MTU that
//! must not be fragmented, so that path-MTU discovery works for guests that did not take the
//! MTU from DHCP or `VIRTIO_NET_F_MTU` (or moved to a host with a smaller underlay MTU).
//!
//! Both builders are pure. Replies are rate-limited per VM by a [`TokenBucket`] that the caller
//! drives with its clock.

use std::time::{Duration, Instant};

use vnp_protocol::wire::ethernet::Frame;
use vnp_protocol::wire::icmpv4::{self, msg_type, CODE_FRAG_NEEDED};
use vnp_protocol::wire::ipv4::{self, protocol};

use super::reply::{ipv4_reply, ReplyHeaders};
use super::{EdgeConfig, EdgeDrop};

/// Bytes of the offending packet's payload an ICMP error quotes after its IPv4 header (RFC 792:
/// "the first 64 bits of the original datagram's data").
pub const QUOTED_PAYLOAD_LEN: usize = 8;
/// Sustained ICMP replies per second one VM can get from its router.
pub const RATE_PER_SEC: u32 = 100;
/// Replies one VM can get in a burst before the rate applies.
pub const BURST: u32 = 50;

/// Answers an ICMP echo request to the router with an echo reply carrying the same identifier,
/// sequence number and data. The request's checksum must verify.
pub fn echo_reply(cfg: &EdgeConfig, frame: &[u8], out: &mut [u8]) -> Result<usize, EdgeDrop> {
    let eth = Frame::new_checked(frame).map_err(|_| EdgeDrop::Truncated)?;
    let ip = ipv4::Packet::new_checked(eth.payload()).map_err(|_| EdgeDrop::BadLength)?;
    ip.check_len(eth.payload().len())
        .map_err(|_| EdgeDrop::Truncated)?;
    if ip.protocol() != protocol::ICMP || ip.dst_addr() != cfg.router_ip {
        return Err(EdgeDrop::NotEdgeTraffic);
    }
    if ip.is_fragment() {
        return Err(EdgeDrop::Fragmented);
    }
    let request = icmpv4::Packet::new_checked(ip.payload()).map_err(|_| EdgeDrop::Truncated)?;
    if request.msg_type() != msg_type::ECHO_REQUEST || request.msg_code() != 0 {
        return Err(EdgeDrop::NotEdgeTraffic);
    }
    if !request.verify_checksum() {
        return Err(EdgeDrop::BadChecksum);
    }
    let message = ip.payload();
    let headers = ReplyHeaders {
        dst_mac: eth.src_addr(),
        dst_ip: ip.src_addr(),
        protocol: protocol::ICMP,
        payload_len: message.len(),
    };
    let (len, payload) = ipv4_reply(cfg, &headers, out)?;
    payload.copy_from_slice(message);
    let mut reply = icmpv4::Packet::new_unchecked(payload);
    reply.set_msg_type(msg_type::ECHO_REPLY);
    reply.fill_checksum();
    Ok(len)
}

/// Answers a packet larger than `cfg.mtu` with DF set with ICMP destination unreachable,
/// fragmentation needed (type 3 code 4), carrying `cfg.mtu` as the next-hop MTU and quoting the
/// packet's IPv4 header and first 8 payload bytes. `prefix` needs only those bytes (after the
/// Ethernet header), not the whole packet.
pub fn frag_needed(cfg: &EdgeConfig, prefix: &[u8], out: &mut [u8]) -> Result<usize, EdgeDrop> {
    let eth = Frame::new_checked(prefix).map_err(|_| EdgeDrop::Truncated)?;
    let ip = ipv4::Packet::new_checked(eth.payload()).map_err(|_| EdgeDrop::BadLength)?;
    let oversize = ip.total_len() > usize::from(cfg.mtu);
    if !oversize || !ip.dont_frag() || ip.src_addr() != cfg.vm_ip || ip.is_later_fragment() {
        return Err(EdgeDrop::NotEdgeTraffic);
    }
    let quoted_payload = &ip.payload()[..ip.payload().len().min(QUOTED_PAYLOAD_LEN)];
    // Never an error about an error (RFC 1812 4.3.2.7): a loop between two routers otherwise.
    if ip.protocol() == protocol::ICMP
        && quoted_payload
            .first()
            .is_some_and(|t| msg_type::is_error(*t))
    {
        return Err(EdgeDrop::NotEdgeTraffic);
    }
    let quote_len = ip.header_len() + quoted_payload.len();
    let headers = ReplyHeaders {
        dst_mac: eth.src_addr(),
        dst_ip: ip.src_addr(),
        protocol: protocol::ICMP,
        payload_len: icmpv4::HEADER_LEN + quote_len,
    };
    let (len, payload) = ipv4_reply(cfg, &headers, out)?;
    let mut reply = icmpv4::Packet::new_unchecked(payload);
    reply.set_msg_type(msg_type::DST_UNREACHABLE);
    reply.set_msg_code(CODE_FRAG_NEEDED);
    reply.set_next_hop_mtu(cfg.mtu);
    reply.data_mut()[..ip.header_len()].copy_from_slice(ip.header());
    reply.data_mut()[ip.header_len()..].copy_from_slice(quoted_payload);
    reply.fill_checksum();
    Ok(len)
}

/// A token bucket: `burst` replies at once, then `rate_per_sec` on average. The caller passes
/// the time, so the bucket itself is pure.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate_per_sec: u32,
    burst: u32,
    /// Tokens in millionths, so that slow refill rates do not round to nothing.
    micro_tokens: u64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket at `now`.
    pub fn new(rate_per_sec: u32, burst: u32, now: Instant) -> Self {
        Self {
            rate_per_sec,
            burst,
            micro_tokens: u64::from(burst) * 1_000_000,
            last: now,
        }
    }

    /// The bucket vnpd gives each VM's ICMP replies: [`RATE_PER_SEC`], [`BURST`].
    pub fn for_icmp(now: Instant) -> Self {
        Self::new(RATE_PER_SEC, BURST, now)
    }

    /// Takes one token if there is one (refilling for the time since the last call first).
    pub fn try_take(&mut self, now: Instant) -> bool {
        let elapsed = now
            .saturating_duration_since(self.last)
            .min(Duration::from_secs(3600));
        self.last = self.last.max(now);
        let refill = elapsed.as_micros() as u64 * u64::from(self.rate_per_sec);
        let cap = u64::from(self.burst) * 1_000_000;
        self.micro_tokens = (self.micro_tokens + refill).min(cap);
        if self.micro_tokens >= 1_000_000 {
            self.micro_tokens -= 1_000_000;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::test_config;
    use super::*;
    use std::net::Ipv4Addr;
    use vnp_protocol::wire::ethernet::{self, ethertype};
    use vnp_protocol::wire::ipv4::Repr;

    /// A frame from the VM: IPv4 with `payload` after a 20-byte header, flags word `flags`.
    fn ipv4_frame(
        dst: Ipv4Addr,
        proto: u8,
        flags: u16,
        total_len: usize,
        payload: &[u8],
    ) -> Vec<u8> {
        let cfg = test_config();
        let mut f = ethernet::header(cfg.router_mac, cfg.vm_mac, ethertype::IPV4).to_vec();
        f.resize(14 + 20 + payload.len(), 0);
        let mut ip = ipv4::Packet::new_unchecked(&mut f[14..]);
        Repr {
            src_addr: cfg.vm_ip,
            dst_addr: dst,
            protocol: proto,
            payload_len: total_len - 20,
            ttl: 64,
        }
        .emit(&mut ip);
        ip.set_unfragmented(flags & 0x4000 != 0);
        ip.fill_checksum();
        f[34..].copy_from_slice(payload);
        f
    }

    fn echo_request(data: &[u8]) -> Vec<u8> {
        let mut icmp = vec![0u8; 8 + data.len()];
        let mut p = icmpv4::Packet::new_unchecked(&mut icmp[..]);
        p.set_msg_type(msg_type::ECHO_REQUEST);
        p.set_echo_ident(0x1234);
        p.set_echo_seq_no(9);
        p.data_mut().copy_from_slice(data);
        p.fill_checksum();
        icmp
    }

    #[test]
    fn echo_request_to_the_router_gets_a_reply() {
        let cfg = test_config();
        let icmp = echo_request(b"abcdefgh-ping-data");
        let mut frame = ipv4_frame(
            cfg.router_ip,
            protocol::ICMP,
            0x4000,
            20 + icmp.len(),
            &icmp,
        );
        frame.resize(frame.len() + 6, 0); // Ethernet padding is not echoed
        let mut out = [0u8; 256];
        let len = echo_reply(&cfg, &frame, &mut out).unwrap();
        let eth = Frame::new_checked(&out[..len]).unwrap();
        assert_eq!(
            (eth.dst_addr(), eth.src_addr()),
            (cfg.vm_mac, cfg.router_mac)
        );
        assert_eq!(eth.ethertype(), ethertype::IPV4);
        let ip = ipv4::Packet::new_checked(eth.payload()).unwrap();
        assert!(ip.verify_checksum());
        assert_eq!((ip.src_addr(), ip.dst_addr()), (cfg.router_ip, cfg.vm_ip));
        assert_eq!(ip.total_len(), 20 + icmp.len());
        let reply = icmpv4::Packet::new_checked(ip.payload()).unwrap();
        assert_eq!(
            (reply.msg_type(), reply.msg_code()),
            (msg_type::ECHO_REPLY, 0)
        );
        assert_eq!((reply.echo_ident(), reply.echo_seq_no()), (0x1234, 9));
        assert_eq!(reply.data(), b"abcdefgh-ping-data");
        assert!(reply.verify_checksum());
        // Shortest frames are padded to the Ethernet minimum.
        assert!(len >= ethernet::MIN_FRAME_LEN);
    }

    #[test]
    fn echo_refusals() {
        let cfg = test_config();
        let mut out = [0u8; 256];
        let icmp = echo_request(b"x");
        let good = ipv4_frame(cfg.router_ip, protocol::ICMP, 0, 20 + icmp.len(), &icmp);
        let mut bad_sum = good.clone();
        bad_sum[40] ^= 0xff;
        assert_eq!(
            echo_reply(&cfg, &bad_sum, &mut out),
            Err(EdgeDrop::BadChecksum)
        );
        let mut reply_type = good.clone();
        reply_type[34] = msg_type::ECHO_REPLY;
        assert_eq!(
            echo_reply(&cfg, &reply_type, &mut out),
            Err(EdgeDrop::NotEdgeTraffic)
        );
        let other = ipv4_frame(
            Ipv4Addr::new(10, 1, 0, 7),
            protocol::ICMP,
            0,
            20 + icmp.len(),
            &icmp,
        );
        assert_eq!(
            echo_reply(&cfg, &other, &mut out),
            Err(EdgeDrop::NotEdgeTraffic)
        );
        assert_eq!(
            echo_reply(&cfg, &good[..40], &mut out),
            Err(EdgeDrop::Truncated)
        );
        let mut small = [0u8; 40];
        assert_eq!(
            echo_reply(&cfg, &good, &mut small),
            Err(EdgeDrop::ReplyBufferTooSmall)
        );
    }

    #[test]
    fn oversize_with_df_gets_frag_needed_with_the_mtu() {
        let cfg = test_config();
        // A 1500-byte UDP packet: only its header prefix is handed over.
        let udp = [0x9c, 0x40, 0x00, 0x35, 0x05, 0xc8, 0xab, 0xcd, 1, 2, 3];
        let prefix = ipv4_frame(
            Ipv4Addr::new(10, 1, 0, 7),
            protocol::UDP,
            0x4000,
            1500,
            &udp,
        );
        let mut out = [0u8; 256];
        let len = frag_needed(&cfg, &prefix, &mut out).unwrap();
        let eth = Frame::new_checked(&out[..len]).unwrap();
        assert_eq!(eth.dst_addr(), cfg.vm_mac);
        let ip = ipv4::Packet::new_checked(eth.payload()).unwrap();
        assert!(ip.verify_checksum());
        assert_eq!(
            (ip.src_addr(), ip.dst_addr(), ip.protocol()),
            (cfg.router_ip, cfg.vm_ip, protocol::ICMP)
        );
        let icmp = icmpv4::Packet::new_checked(ip.payload()).unwrap();
        assert_eq!((icmp.msg_type(), icmp.msg_code()), (3, 4));
        assert_eq!(icmp.next_hop_mtu(), cfg.mtu);
        assert!(icmp.verify_checksum());
        // The quote: the original header and its first 8 payload bytes, exactly.
        assert_eq!(icmp.data(), &prefix[14..14 + 28]);
        assert_eq!(ip.total_len(), 20 + 8 + 28);
    }

    #[test]
    fn no_frag_needed_without_df_for_small_packets_or_errors() {
        let cfg = test_config();
        let mut out = [0u8; 256];
        let udp = [0u8; 8];
        let dst = Ipv4Addr::new(10, 1, 0, 7);
        let no_df = ipv4_frame(dst, protocol::UDP, 0, 1500, &udp);
        assert_eq!(
            frag_needed(&cfg, &no_df, &mut out),
            Err(EdgeDrop::NotEdgeTraffic)
        );
        let small = ipv4_frame(dst, protocol::UDP, 0x4000, 28, &udp);
        assert_eq!(
            frag_needed(&cfg, &small, &mut out),
            Err(EdgeDrop::NotEdgeTraffic)
        );
        let error = [msg_type::DST_UNREACHABLE, 1, 0, 0, 0, 0, 0, 0];
        let icmp_error = ipv4_frame(dst, protocol::ICMP, 0x4000, 1500, &error);
        assert_eq!(
            frag_needed(&cfg, &icmp_error, &mut out),
            Err(EdgeDrop::NotEdgeTraffic)
        );
    }

    #[test]
    fn token_bucket_allows_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(10, 3, t0);
        assert!((0..3).all(|_| bucket.try_take(t0)));
        assert!(!bucket.try_take(t0), "burst spent");
        // 10 per second: one token every 100 ms.
        assert!(!bucket.try_take(t0 + Duration::from_millis(50)));
        assert!(bucket.try_take(t0 + Duration::from_millis(100)));
        assert!(!bucket.try_take(t0 + Duration::from_millis(100)));
        // A long pause refills to the burst, not beyond.
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..10).filter(|_| bucket.try_take(later)).count(), 3);
        // Time going backwards (another thread's older timestamp) adds nothing.
        assert!(!bucket.try_take(t0));
    }
}
