//! Drop reasons, packet counters, NAT port use, and their Prometheus text. Counters are
//! relaxed atomics (the data path bumps them, the metrics thread reads them).

use crate::table::NatTable;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

/// Why a packet was dropped. Each has a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// VNP: shorter than its header or its inner packet.
    RxTruncated,
    /// VNP: bad version, flags, reserved bits, options or inner header.
    RxMalformed,
    RxExpired,
    RxExpiryTooFar,
    RxWrongNetwork,
    /// The token does not verify with the gateway's secret (forged, another pair's, replayed
    /// from another host).
    RxBadToken,
    /// The inner destination is inside the network: not a gateway's business.
    InsideDestination,
    /// A VM's packet to the gateway's own underlay address (its kernel and services are not
    /// the public network).
    OwnAddress,
    /// The inner source is no VM of the network.
    UnknownVm,
    /// The source port is in no NAT block of the sending VM and no forwarding rule of it.
    PortNotOwned,
    /// The port is the VM's, but policy denies it outside connections.
    EgressDenied,
    /// Inner packet: headers cut short or inconsistent.
    Malformed,
    /// A non-first fragment: no ports to translate by.
    Fragment,
    /// Not TCP, UDP, ICMP echo or an ICMP error.
    UnsupportedProtocol,
    /// Public side: destination is not this gateway's public address.
    NotPublicAddress,
    /// Public side: no NAT block and no forwarding rule for the destination port.
    NoMapping,
    /// The VM is on no host.
    NoLocation,
    /// No token towards the VM yet (asked the registry; later packets pass).
    NoToken,
    /// A socket or TUN write failed.
    SendFailed,
    /// Public side: a load-balanced service with no healthy member (in this gateway's view).
    NoBackend,
}

impl DropReason {
    /// Every reason, in counter order.
    pub const ALL: [DropReason; 20] = [
        DropReason::RxTruncated,
        DropReason::RxMalformed,
        DropReason::RxExpired,
        DropReason::RxExpiryTooFar,
        DropReason::RxWrongNetwork,
        DropReason::RxBadToken,
        DropReason::InsideDestination,
        DropReason::OwnAddress,
        DropReason::UnknownVm,
        DropReason::PortNotOwned,
        DropReason::EgressDenied,
        DropReason::Malformed,
        DropReason::Fragment,
        DropReason::UnsupportedProtocol,
        DropReason::NotPublicAddress,
        DropReason::NoMapping,
        DropReason::NoLocation,
        DropReason::NoToken,
        DropReason::SendFailed,
        DropReason::NoBackend,
    ];

    /// The `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::RxTruncated => "rx_truncated",
            DropReason::RxMalformed => "rx_malformed",
            DropReason::RxExpired => "rx_expired",
            DropReason::RxExpiryTooFar => "rx_expiry_too_far",
            DropReason::RxWrongNetwork => "rx_wrong_network",
            DropReason::RxBadToken => "rx_bad_token",
            DropReason::InsideDestination => "inside_destination",
            DropReason::OwnAddress => "own_address",
            DropReason::UnknownVm => "unknown_vm",
            DropReason::PortNotOwned => "port_not_owned",
            DropReason::EgressDenied => "egress_denied",
            DropReason::Malformed => "malformed",
            DropReason::Fragment => "fragment",
            DropReason::UnsupportedProtocol => "unsupported_protocol",
            DropReason::NotPublicAddress => "not_public_address",
            DropReason::NoMapping => "no_mapping",
            DropReason::NoLocation => "no_location",
            DropReason::NoToken => "no_token",
            DropReason::SendFailed => "send_failed",
            DropReason::NoBackend => "no_backend",
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// How long a NAT port counts as in use after its last outbound packet.
pub const PORT_ACTIVE_SECS: u32 = 60;

/// The gateway's counters.
#[derive(Debug)]
pub struct Metrics {
    drops: [AtomicU64; DropReason::ALL.len()],
    pub outbound_packets: AtomicU64,
    pub inbound_packets: AtomicU64,
    pub forwarded_in_packets: AtomicU64,
    /// Unix seconds of the last outbound packet per public port (0: never).
    port_seen: Box<[AtomicU32]>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            drops: std::array::from_fn(|_| AtomicU64::new(0)),
            outbound_packets: AtomicU64::new(0),
            inbound_packets: AtomicU64::new(0),
            forwarded_in_packets: AtomicU64::new(0),
            port_seen: (0..=u16::MAX).map(|_| AtomicU32::new(0)).collect(),
        }
    }
}

impl Metrics {
    pub fn drop(&self, why: DropReason) {
        self.drops[why.index()].fetch_add(1, Relaxed);
    }

    pub fn drops(&self, why: DropReason) -> u64 {
        self.drops[why.index()].load(Relaxed)
    }

    /// Records an outbound packet from public `port` at `now`.
    pub fn port_used(&self, port: u16, now: u32) {
        self.port_seen[usize::from(port)].store(now, Relaxed);
    }

    /// Ports of `blocks` used within [`PORT_ACTIVE_SECS`] of `now`.
    fn active_ports(&self, blocks: &[vnp_registry_client::net::PortRange], now: u32) -> u64 {
        blocks
            .iter()
            .flat_map(|b| b.first..=b.last)
            .filter(|p| {
                let seen = self.port_seen[usize::from(*p)].load(Relaxed);
                seen != 0 && seen.saturating_add(PORT_ACTIVE_SECS) >= now
            })
            .count() as u64
    }

    /// Prometheus text for these counters and `table`'s VMs at `now`.
    pub fn render(&self, table: Option<&NatTable>, tokens: usize, now: u32) -> String {
        let mut out = String::new();
        let o = &mut out;
        family(
            o,
            "vnp_gateway_drops_total",
            "counter",
            "Packets dropped, by reason.",
        );
        for r in DropReason::ALL {
            let _ = writeln!(
                o,
                "vnp_gateway_drops_total{{reason=\"{}\"}} {}",
                r.label(),
                self.drops(r)
            );
        }
        for (name, help, v) in [
            (
                "vnp_gateway_outbound_packets_total",
                "VM packets sent to the public side.",
                &self.outbound_packets,
            ),
            (
                "vnp_gateway_inbound_packets_total",
                "Public packets sent to VMs (NAT return and forwarded).",
                &self.inbound_packets,
            ),
            (
                "vnp_gateway_forwarded_in_packets_total",
                "Public packets matched by a forwarding rule.",
                &self.forwarded_in_packets,
            ),
        ] {
            family(o, name, "counter", help);
            let _ = writeln!(o, "{name} {}", v.load(Relaxed));
        }
        family(o, "vnp_gateway_tokens", "gauge", "Tokens towards VMs held.");
        let _ = writeln!(o, "vnp_gateway_tokens {tokens}");
        let Some(t) = table else {
            return out;
        };
        family(
            o,
            "vnp_gateway_forwarding_rules",
            "gauge",
            "Forwarding rules on the public address.",
        );
        let _ = writeln!(o, "vnp_gateway_forwarding_rules {}", t.forward_count());
        family(
            o,
            "vnp_gateway_nat_ports",
            "gauge",
            "NAT ports allocated to the VM.",
        );
        for v in &t.vms {
            let total: u32 = v.nat_ports.iter().map(|b| b.len()).sum();
            let _ = writeln!(o, "vnp_gateway_nat_ports{{vm=\"{}\"}} {total}", v.id);
        }
        family(
            o,
            "vnp_gateway_nat_ports_active",
            "gauge",
            "NAT ports of the VM with outbound traffic in the last 60 s (its mapped flows as the gateway sees them).",
        );
        for v in &t.vms {
            let used = self.active_ports(&v.nat_ports, now);
            let _ = writeln!(o, "vnp_gateway_nat_ports_active{{vm=\"{}\"}} {used}", v.id);
        }
        out
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::tests::config;

    #[test]
    fn renders_drops_and_port_use() {
        let m = Metrics::default();
        m.drop(DropReason::RxBadToken);
        m.drop(DropReason::RxBadToken);
        m.port_used(1030, 1000);
        m.port_used(1031, 900);
        m.port_used(1600, 1000);
        let t = NatTable::from_config(&config());
        let text = m.render(Some(&t), 2, 1000);
        assert!(
            text.contains("vnp_gateway_drops_total{reason=\"rx_bad_token\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("vnp_gateway_drops_total{reason=\"no_mapping\"} 0\n"));
        assert!(
            text.contains("vnp_gateway_nat_ports{vm=\"a\"} 1024\n"),
            "{text}"
        );
        assert!(
            text.contains("vnp_gateway_nat_ports_active{vm=\"a\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("vnp_gateway_nat_ports_active{vm=\"b\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("vnp_gateway_tokens 2\n"));
        // Every sample follows its family's TYPE line.
        let types = text.lines().filter(|l| l.starts_with("# TYPE")).count();
        assert_eq!(types, 8, "{text}");
        assert!(!text.contains("vnp_gateway_nat_ports_active{vm=\"a\"} 2"));
    }

    #[test]
    fn labels_are_unique() {
        let mut labels: Vec<&str> = DropReason::ALL.iter().map(|r| r.label()).collect();
        labels.sort();
        labels.dedup();
        assert_eq!(labels.len(), DropReason::ALL.len());
    }
}
