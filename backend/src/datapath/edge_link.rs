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
            dns: None,
        };
        cfg.validate()?;
        let net = GuestNet {
            vm_ip: att.vm_ip,
            prefix_len: att.prefix_len,
            router_ip: att.router_ip,
            mtu: att.guest_mtu,
        };
        Ok(Self {
            cfg,
            net,
            icmp_budget: Mutex::new(TokenBucket::for_icmp(Instant::now())),
        })
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
