//! The data path's link to [`crate::edge`]: frames the one classification
//! ([`super::frame::classify`]) routes to the edge are answered locally by the pure edge
//! functions. This adapter builds their configuration from the attachment, rate-limits the
//! ICMP answers per VM, counts them, and maps refusals to counted drops.

use std::sync::Mutex;
use std::time::Instant;

use super::frame::{classify, GuestNet, Route, CLASSIFY_PREFIX};
use super::VmAttachment;
use crate::edge::icmp::TokenBucket;
use crate::edge::{self, EdgeConfig, EdgeConfigError, EdgeDrop, EdgeKind};
use crate::metrics::counters::VmCounters;

/// MAC address of the virtual gateway the guest talks to.
pub const ROUTER_MAC: [u8; 6] = edge::ROUTER_MAC;

/// The edge configuration of one VM and the state of its ICMP rate limit.
#[derive(Debug)]
pub struct EdgeLink {
    cfg: EdgeConfig,
    net: GuestNet,
    /// Shared by the VM's queue-pair workers; taken only for ICMP answers (a slow path).
    icmp_budget: Mutex<TokenBucket>,
}

impl EdgeLink {
    /// The edge configuration of `att`'s VM, validated.
    pub fn new(att: &VmAttachment) -> Result<Self, EdgeConfigError> {
        let cfg = EdgeConfig {
            vm_mac: att.mac,
            vm_ip: att.vm_ip,
            prefix_len: att.prefix_len,
            router_ip: att.router_ip,
            router_mac: ROUTER_MAC,
            mtu: att.guest_mtu,
            hostname: att.hostname.clone(),
            lease_secs: edge::DEFAULT_LEASE_SECS,
            // The service bridge answers DNS at the metadata address, as GCE's does.
            dns: Some(crate::bridge::METADATA_IP),
        };
        Self::from_config(cfg)
    }

    /// The link for a configuration, validated.
    fn from_config(cfg: EdgeConfig) -> Result<Self, EdgeConfigError> {
        cfg.validate()?;
        let net = GuestNet {
            vm_ip: cfg.vm_ip,
            prefix_len: cfg.prefix_len,
            router_ip: cfg.router_ip,
            mtu: cfg.mtu,
        };
        Ok(Self {
            cfg,
            net,
            icmp_budget: Mutex::new(TokenBucket::for_icmp(Instant::now())),
        })
    }

    /// The hostname DHCP hands out.
    pub fn hostname(&self) -> &str {
        &self.cfg.hostname
    }

    /// Whether the VM's ICMP budget allows one more answer now.
    fn icmp_allowed(&self) -> bool {
        let mut bucket = self.icmp_budget.lock().unwrap_or_else(|e| e.into_inner());
        bucket.try_take(Instant::now())
    }
}

/// The reply frame to a frame the data path routed to the edge (the whole frame, or for an
/// oversize packet its first [`CLASSIFY_PREFIX`] bytes): `Ok(None)` when nothing needs
/// answering (e.g. a gratuitous ARP) or the VM's ICMP budget is spent (counted), `Err` with the
/// edge's reason when it refuses the frame. ICMP answers are counted here.
pub fn reply(
    edge: &EdgeLink,
    frame: &[u8],
    counters: &VmCounters,
) -> Result<Option<Vec<u8>>, EdgeDrop> {
    // The same classification the data path ran: it comes to the same answer on the prefix of
    // an oversize packet, since the MTU check looks at the header alone.
    let prefix = &frame[..frame.len().min(CLASSIFY_PREFIX)];
    let kind = match classify(&edge.net, prefix, frame.len()) {
        Ok(Route::Edge(kind)) => kind,
        Ok(Route::Tunnel { .. }) | Err(_) => return Err(EdgeDrop::NotEdgeTraffic),
    };
    if kind.is_icmp() && !edge.icmp_allowed() {
        counters.icmp_rate_limited();
        return Ok(None);
    }
    // An echo reply is as long as the request; everything else fits MAX_REPLY_LEN.
    let mut out = vec![0u8; edge::MAX_REPLY_LEN.max(frame.len())];
    let Some(len) = edge::respond(&edge.cfg, kind, frame, &mut out)? else {
        return Ok(None);
    };
    match kind {
        EdgeKind::Echo => counters.icmp_echo_reply(),
        EdgeKind::FragNeeded => counters.icmp_frag_needed(),
        EdgeKind::Arp | EdgeKind::Dhcp => {}
    }
    out.truncate(len);
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edge::icmp::BURST;
    use crate::edge::tests::{ipv4_udp_frame, test_config};

    fn link() -> EdgeLink {
        EdgeLink::from_config(test_config()).unwrap()
    }

    /// A ping of the router from the VM, built like the guest's kernel would.
    fn echo_request() -> Vec<u8> {
        use vnp_protocol::wire::{ethernet, icmpv4, ipv4};
        let cfg = test_config();
        let mut f =
            ethernet::header(cfg.router_mac, cfg.vm_mac, ethernet::ethertype::IPV4).to_vec();
        f.resize(14 + 20 + 64, 0);
        let mut ip = ipv4::Packet::new_unchecked(&mut f[14..]);
        ipv4::Repr {
            src_addr: cfg.vm_ip,
            dst_addr: cfg.router_ip,
            protocol: ipv4::protocol::ICMP,
            payload_len: 64,
            ttl: 64,
        }
        .emit(&mut ip);
        let mut icmp = icmpv4::Packet::new_unchecked(ip.payload_mut());
        icmp.set_msg_type(icmpv4::msg_type::ECHO_REQUEST);
        icmp.fill_checksum();
        f
    }

    #[test]
    fn echo_replies_are_counted_and_rate_limited() {
        let link = link();
        let counters = VmCounters::new();
        let frame = echo_request();
        let total = BURST as usize + 20;
        let answered = (0..total)
            .filter(|_| reply(&link, &frame, &counters).unwrap().is_some())
            .count();
        let s = counters.snapshot();
        // The burst, plus what the rate refilled while the loop ran (a few ms at most).
        assert!(
            (BURST as usize..BURST as usize + 5).contains(&answered),
            "{answered}"
        );
        assert_eq!(s.icmp_echo_replies, answered as u64);
        assert_eq!(s.icmp_rate_limited, (total - answered) as u64);
    }

    #[test]
    fn arp_and_dhcp_are_not_rate_limited_and_what_is_not_edge_traffic_is_refused() {
        let link = link();
        let counters = VmCounters::new();
        let dhcp = ipv4_udp_frame(67);
        for _ in 0..BURST + 10 {
            assert!(reply(&link, &dhcp, &counters).unwrap().is_some());
        }
        assert_eq!(counters.snapshot().icmp_rate_limited, 0);
        // Port 53 to the broadcast address: the classification drops it, the edge refuses it.
        assert_eq!(
            reply(&link, &ipv4_udp_frame(53), &counters),
            Err(EdgeDrop::NotEdgeTraffic)
        );
    }
}
