//! The data path's link to [`crate::edge`]: ARP and DHCP frames from the guest are answered
//! locally by the pure edge functions; this adapter builds their configuration from the
//! attachment and maps their refusals to counted drops.

use super::VmAttachment;
use crate::edge::{self, EdgeConfig, EdgeConfigError, EdgeDrop};

/// MAC address of the virtual gateway the guest talks to.
pub const ROUTER_MAC: [u8; 6] = edge::ROUTER_MAC;

/// The edge configuration of one VM.
#[derive(Debug, Clone)]
pub struct EdgeLink {
    cfg: EdgeConfig,
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
        Ok(Self { cfg })
    }
}

/// The reply frame to an ARP or DHCP frame, `Ok(None)` when nothing needs answering (e.g. a
/// gratuitous ARP), `Err` with the edge's reason when it refuses the frame.
pub fn reply(edge: &EdgeLink, frame: &[u8]) -> Result<Option<Vec<u8>>, EdgeDrop> {
    let mut out = vec![0u8; edge::MAX_REPLY_LEN];
    match edge::respond(&edge.cfg, frame, &mut out)? {
        Some(n) => {
            out.truncate(n);
            Ok(Some(out))
        }
        None => Ok(None),
    }
}
