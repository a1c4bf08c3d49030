//! Per-VM data-path counters: packets, bytes and drops by reason.
//!
//! Plain relaxed atomics: the data path bumps them from its worker threads, readers (admin API,
//! Prometheus exporter) take a [`CounterSnapshot`]. Relaxed ordering is enough because each counter
//! is independent and only ever grows.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! drop_reasons {
    ($( $(#[$doc:meta])* $variant:ident => $name:literal, )+) => {
        /// Why the data path dropped a packet. The snake_case names are stable: they are the
        /// `reason` label of the Prometheus drop counter and what `vnpctl` prints.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(usize)]
        pub enum DropReason {
            $( $(#[$doc])* $variant, )+
        }

        impl DropReason {
            /// Every reason, in declaration order.
            pub const ALL: &'static [DropReason] = &[ $( DropReason::$variant, )+ ];
            /// Number of reasons.
            pub const COUNT: usize = Self::ALL.len();

            /// The stable snake_case name.
            pub const fn as_str(self) -> &'static str {
                match self { $( DropReason::$variant => $name, )+ }
            }
        }
    };
}

drop_reasons! {
    /// TX: descriptor chain empty, looping, pointing outside guest memory, too long or
    /// containing device-writable descriptors.
    TxBadChain => "tx_bad_chain",
    /// TX: shorter than the 12-byte virtio-net header plus an Ethernet header.
    TxTruncatedHeader => "tx_truncated_header",
    /// TX: IPv4 header malformed or the frame shorter than its total length.
    TxMalformedIpv4 => "tx_malformed_ipv4",
    /// TX: inner packet larger than the guest MTU.
    TxOversize => "tx_oversize",
    /// TX: an Ethernet type the virtual network does not carry (not IPv4, ARP or DHCP).
    TxNonIpv4 => "tx_non_ipv4",
    /// TX: IPv4 to a broadcast, multicast or otherwise non-unicast destination.
    TxNonUnicast => "tx_non_unicast",
    /// TX: IPv4 source address is not the VM's own (spoofing).
    TxSpoofedSource => "tx_spoofed_source",
    /// TX: ARP, DHCP or ICMP the local edge refused to answer.
    TxEdgeRefused => "tx_edge_refused",
    /// TX: IPv4 to the virtual router's address that it does not answer (not DHCP, not an
    /// ICMP echo request): a router does not forward what is addressed to itself.
    TxToRouter => "tx_to_router",
    /// TX: no token yet and the per-destination pending queue was full.
    TxNoTokenQueueFull => "tx_no_token_queue_full",
    /// TX: the registry refused the pair (policy deny).
    TxPolicyRefused => "tx_policy_refused",
    /// TX: the registry does not know the destination address.
    TxUnknownDestination => "tx_unknown_destination",
    /// TX: the registry could not be reached in time.
    TxRegistryUnavailable => "tx_registry_unavailable",
    /// TX: the kernel refused the datagram (sendmmsg error).
    TxSendError => "tx_send_error",
    /// TX: the port stopped or the peer was forgotten while packets waited for a token.
    TxPendingDiscarded => "tx_pending_discarded",
    /// TX: a packet to the metadata address that the service bridge could not take (no
    /// bridge on the port, or its queue full: the guest floods it).
    TxBridgeRefused => "tx_bridge_refused",
    /// RX: datagram shorter than the VNP header or than its inner packet claims.
    RxTruncated => "rx_truncated",
    /// RX: unknown version, reserved bits, inner packet not IPv4, or malformed options.
    RxMalformed => "rx_malformed",
    /// RX: larger than the guest's receive buffers (or than the guest MTU allows).
    RxOversize => "rx_oversize",
    /// RX: token expired (beyond the allowed clock skew).
    RxExpired => "rx_expired",
    /// RX: token expiry further ahead than any token the registry mints.
    RxExpiryTooFar => "rx_expiry_too_far",
    /// RX: inner destination is not the VM this port serves.
    RxWrongVm => "rx_wrong_vm",
    /// RX: network id is not this VM's network.
    RxWrongNetwork => "rx_wrong_network",
    /// RX: token MAC does not match.
    RxBadToken => "rx_bad_token",
    /// RX: the guest's receive descriptor chain was unusable (returned unused).
    RxBadChain => "rx_bad_chain",
    /// RX: a locally generated frame (ARP/DHCP reply) found no guest receive buffer.
    RxNoBuffer => "rx_no_buffer",
    /// RX: the guest broke its whole RX ring (`avail->idx` more than the queue size ahead, or
    /// a head index out of range); the ring is parked until the driver resets it. Counted once
    /// per fault, not per packet.
    RxRingBroken => "rx_ring_broken",
    /// TX: the same for the TX ring.
    TxRingBroken => "tx_ring_broken",
    /// TX: the virtio-net header asks for a checksum or segmentation offload the driver did not
    /// negotiate (all of them when vnpd's `offloads` is off).
    TxOffloadRequested => "tx_offload_requested",
    /// TX: unknown virtio-net header `flags` bits, or `DATA_VALID` (RX only).
    TxBadVnetFlags => "tx_bad_vnet_flags",
    /// TX: `gso_type` other than NONE or TCPV4 (UFO, USO, IPv6, unknown; ECN without TCP), or
    /// GSO without NEEDS_CSUM.
    TxBadGsoType => "tx_bad_gso_type",
    /// TX: an offload request on a packet that is not an unfragmented IPv4 TCP/UDP packet with
    /// all its headers (TCP for GSO), or whose IPv4 length is not the frame's.
    TxBadOffloadHeaders => "tx_bad_offload_headers",
    /// TX: `csum_start` is not where the packet's transport header starts.
    TxBadCsumStart => "tx_bad_csum_start",
    /// TX: `csum_offset` is not the transport's checksum field.
    TxBadCsumOffset => "tx_bad_csum_offset",
    /// TX: `gso_size` zero, a segment larger than the MTU, or nothing to segment.
    TxBadGsoSize => "tx_bad_gso_size",
    /// TX: `hdr_len` beyond the frame.
    TxBadHdrLen => "tx_bad_hdr_len",
    /// TX: a new flow to the outside found no free port in the VM's NAT blocks (the guest got
    /// a TCP RST or an ICMP unreachable).
    TxNatPortsExhausted => "tx_nat_ports_exhausted",
    /// TX: a TCP segment to the outside that is not a SYN and belongs to no flow.
    TxNatNoFlow => "tx_nat_no_flow",
    /// TX: a new flow to the outside while a migrated VM's NAT flows are still on their way
    /// from its source (`migrate_state`; at most its bounded wait).
    TxNatAwaitingState => "tx_nat_awaiting_state",
    /// TX: a fragment to the outside (fragments carry no ports to map).
    TxNatFragment => "tx_nat_fragment",
    /// TX: to the outside, a protocol or ICMP type NAT does not translate (not TCP, UDP or
    /// ICMP echo; an ICMP echo reply or error about no inbound flow).
    TxNatUnsupported => "tx_nat_unsupported",
    /// TX: headers too short for what NAT must read.
    TxNatMalformed => "tx_nat_malformed",
    /// RX: from the outside, a packet (or an ICMP error) for a mapped port with no flow, or
    /// not from the flow's remote.
    RxNatUnknownMapping => "rx_nat_unknown_mapping",
    /// RX: too many inbound (port-forwarded) flows.
    RxNatInboundFull => "rx_nat_inbound_full",
    /// RX: an endpoint-moved hint (`datapath::moved_hint`): never delivered; counted here
    /// whether it led to a registry lookup or not.
    RxMovedHint => "rx_moved_hint",
    /// RX: a fragment from the outside.
    RxNatFragment => "rx_nat_fragment",
    /// RX: from the outside, a protocol or ICMP type NAT does not translate.
    RxNatUnsupported => "rx_nat_unsupported",
    /// RX: from the outside, headers too short for what NAT must read.
    RxNatMalformed => "rx_nat_malformed",
}

/// Counters of one attached VM. Shared (`Arc`) between the data-path workers and readers.
#[derive(Debug)]
pub struct VmCounters {
    tx_packets: AtomicU64,
    tx_bytes: AtomicU64,
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    edge_replies: AtomicU64,
    icmp_echo_replies: AtomicU64,
    icmp_frag_needed: AtomicU64,
    icmp_rate_limited: AtomicU64,
    token_requests: AtomicU64,
    token_requests_throttled: AtomicU64,
    return_tokens_learned: AtomicU64,
    tx_csum_frames: AtomicU64,
    tx_tso_frames: AtomicU64,
    hairpin_forwarded: AtomicU64,
    moved_hints_sent: AtomicU64,
    moved_hint_rechecks: AtomicU64,
    drops: DropCounts,
    nat: NatGauges,
}

/// One counter per [`DropReason`] (`Default` by hand: arrays derive it only up to 32).
#[derive(Debug)]
struct DropCounts([AtomicU64; DropReason::COUNT]);

impl Default for DropCounts {
    fn default() -> Self {
        Self(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

/// NAT gauges of one VM, set by the data path whenever its NAT table changes.
#[derive(Debug, Default)]
struct NatGauges {
    mapped: [AtomicU64; 3],
    inbound: AtomicU64,
    ports: AtomicU64,
}

/// NAT gauges in a [`CounterSnapshot`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NatGaugeSnapshot {
    /// Mapped (outbound) flows: TCP, UDP, ICMP echo (each its own port space).
    pub mapped_flows: [u64; 3],
    /// Inbound (port-forwarded) flows.
    pub inbound_flows: u64,
    /// Ports in the VM's NAT blocks (per protocol).
    pub ports: u64,
}

/// A point-in-time copy of [`VmCounters`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CounterSnapshot {
    /// Inner packets sent to the underlay (after encapsulation).
    pub tx_packets: u64,
    /// Inner bytes (IPv4 total length) sent.
    pub tx_bytes: u64,
    /// Inner packets delivered to the guest.
    pub rx_packets: u64,
    /// Inner bytes delivered to the guest.
    pub rx_bytes: u64,
    /// ARP, DHCP and ICMP replies generated locally and delivered to the guest.
    pub edge_replies: u64,
    /// ICMP echo replies the virtual router generated (pings of the router address).
    pub icmp_echo_replies: u64,
    /// ICMP "fragmentation needed" the virtual router generated for oversize DF packets.
    pub icmp_frag_needed: u64,
    /// ICMP replies not generated because the VM's rate limit was reached.
    pub icmp_rate_limited: u64,
    /// Token requests handed to the control plane.
    pub token_requests: u64,
    /// Registry requests for new destinations that waited for the VM's request rate
    /// (`[token_requests]` in vnpd's config): a guest asking for many destinations at once.
    pub token_requests_throttled: u64,
    /// Return tokens accepted from peers' first packets.
    pub return_tokens_learned: u64,
    /// TX frames whose partial checksum vnpd completed (virtio-net `NEEDS_CSUM`).
    pub tx_csum_frames: u64,
    /// TX TCP super-packets (TSO, `GSO_TCPV4`) vnpd cut into segments.
    pub tx_tso_frames: u64,
    /// Datagrams for this VM forwarded to its new host after it migrated away.
    pub hairpin_forwarded: u64,
    /// Endpoint-moved hints sent to senders of such datagrams.
    pub moved_hints_sent: u64,
    /// Registry lookups that endpoint-moved hints caused.
    pub moved_hint_rechecks: u64,
    /// Drops by reason, indexed like [`DropReason::ALL`].
    pub drops: Vec<(DropReason, u64)>,
    /// NAT gauges.
    pub nat: NatGaugeSnapshot,
}

impl CounterSnapshot {
    /// Drops for one reason.
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, n)| *n)
    }

    /// Sum of all drops.
    pub fn total_drops(&self) -> u64 {
        self.drops.iter().map(|(_, n)| n).sum()
    }
}

impl Default for VmCounters {
    fn default() -> Self {
        Self::new()
    }
}

impl VmCounters {
    /// All counters at zero.
    pub fn new() -> Self {
        Self {
            tx_packets: AtomicU64::new(0),
            tx_bytes: AtomicU64::new(0),
            rx_packets: AtomicU64::new(0),
            rx_bytes: AtomicU64::new(0),
            edge_replies: AtomicU64::new(0),
            icmp_echo_replies: AtomicU64::new(0),
            icmp_frag_needed: AtomicU64::new(0),
            icmp_rate_limited: AtomicU64::new(0),
            token_requests: AtomicU64::new(0),
            token_requests_throttled: AtomicU64::new(0),
            return_tokens_learned: AtomicU64::new(0),
            tx_csum_frames: AtomicU64::new(0),
            tx_tso_frames: AtomicU64::new(0),
            hairpin_forwarded: AtomicU64::new(0),
            moved_hints_sent: AtomicU64::new(0),
            moved_hint_rechecks: AtomicU64::new(0),
            drops: DropCounts::default(),
            nat: NatGauges::default(),
        }
    }

    /// Counts one packet sent.
    #[inline]
    pub fn tx(&self, bytes: usize) {
        self.tx_packets.fetch_add(1, Ordering::Relaxed);
        self.tx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Counts `packets` inner packets of `bytes` in all that left (segments of one frame).
    #[inline]
    pub fn tx_many(&self, packets: u64, bytes: u64) {
        self.tx_packets.fetch_add(packets, Ordering::Relaxed);
        self.tx_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts one packet delivered to the guest.
    #[inline]
    pub fn rx(&self, bytes: usize) {
        self.rx_packets.fetch_add(1, Ordering::Relaxed);
        self.rx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Counts `packets` packets of `bytes` in all delivered to the guest (one round's).
    #[inline]
    pub fn rx_many(&self, packets: u64, bytes: u64) {
        if packets > 0 {
            self.rx_packets.fetch_add(packets, Ordering::Relaxed);
            self.rx_bytes.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// Counts one drop.
    #[inline]
    pub fn drop_packet(&self, reason: DropReason) {
        self.drop_packets(reason, 1);
    }

    /// Counts `n` drops for the same reason.
    #[inline]
    pub fn drop_packets(&self, reason: DropReason, n: u64) {
        self.drops.0[reason as usize].fetch_add(n, Ordering::Relaxed);
    }

    /// Counts one locally generated edge reply.
    pub fn edge_reply(&self) {
        self.edge_replies.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one ICMP echo reply generated.
    pub fn icmp_echo_reply(&self) {
        self.icmp_echo_replies.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one ICMP "fragmentation needed" generated.
    pub fn icmp_frag_needed(&self) {
        self.icmp_frag_needed.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one ICMP reply suppressed by the rate limit.
    pub fn icmp_rate_limited(&self) {
        self.icmp_rate_limited.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one token request to the control plane.
    pub fn token_request(&self) {
        self.token_requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one registry request that has to wait for the VM's request rate.
    pub fn token_request_throttled(&self) {
        self.token_requests_throttled
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one accepted return token.
    pub fn return_token_learned(&self) {
        self.return_tokens_learned.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one TX frame whose checksum was completed.
    pub fn tx_csum_frame(&self) {
        self.tx_csum_frames.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one TX super-packet cut into segments.
    pub fn tx_tso_frame(&self) {
        self.tx_tso_frames.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one datagram forwarded to the VM's new host (live migration).
    pub fn hairpin_forwarded(&self) {
        self.hairpin_forwarded.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one endpoint-moved hint sent to a straggler's sender.
    pub fn moved_hint_sent(&self) {
        self.moved_hints_sent.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one registry lookup an endpoint-moved hint caused.
    pub fn moved_hint_recheck(&self) {
        self.moved_hint_rechecks.fetch_add(1, Ordering::Relaxed);
    }

    /// Sets the NAT gauges: mapped flows per protocol (TCP, UDP, ICMP), inbound flows, ports
    /// in the blocks.
    pub fn set_nat(&self, mapped: [usize; 3], inbound: usize, ports: usize) {
        for (g, v) in self.nat.mapped.iter().zip(mapped) {
            g.store(v as u64, Ordering::Relaxed);
        }
        self.nat.inbound.store(inbound as u64, Ordering::Relaxed);
        self.nat.ports.store(ports as u64, Ordering::Relaxed);
    }

    /// Drops for one reason so far.
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops.0[reason as usize].load(Ordering::Relaxed)
    }

    /// A copy of every counter.
    pub fn snapshot(&self) -> CounterSnapshot {
        CounterSnapshot {
            tx_packets: self.tx_packets.load(Ordering::Relaxed),
            tx_bytes: self.tx_bytes.load(Ordering::Relaxed),
            rx_packets: self.rx_packets.load(Ordering::Relaxed),
            rx_bytes: self.rx_bytes.load(Ordering::Relaxed),
            edge_replies: self.edge_replies.load(Ordering::Relaxed),
            icmp_echo_replies: self.icmp_echo_replies.load(Ordering::Relaxed),
            icmp_frag_needed: self.icmp_frag_needed.load(Ordering::Relaxed),
            icmp_rate_limited: self.icmp_rate_limited.load(Ordering::Relaxed),
            token_requests: self.token_requests.load(Ordering::Relaxed),
            token_requests_throttled: self.token_requests_throttled.load(Ordering::Relaxed),
            return_tokens_learned: self.return_tokens_learned.load(Ordering::Relaxed),
            tx_csum_frames: self.tx_csum_frames.load(Ordering::Relaxed),
            tx_tso_frames: self.tx_tso_frames.load(Ordering::Relaxed),
            hairpin_forwarded: self.hairpin_forwarded.load(Ordering::Relaxed),
            moved_hints_sent: self.moved_hints_sent.load(Ordering::Relaxed),
            moved_hint_rechecks: self.moved_hint_rechecks.load(Ordering::Relaxed),
            drops: DropReason::ALL
                .iter()
                .map(|r| (*r, self.drops(*r)))
                .collect(),
            nat: NatGaugeSnapshot {
                mapped_flows: std::array::from_fn(|i| self.nat.mapped[i].load(Ordering::Relaxed)),
                inbound_flows: self.nat.inbound.load(Ordering::Relaxed),
                ports: self.nat.ports.load(Ordering::Relaxed),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn names_are_unique_snake_case_and_prefixed() {
        let mut seen = HashSet::new();
        for r in DropReason::ALL {
            let name = r.as_str();
            assert!(seen.insert(name), "duplicate {name}");
            assert!(name.starts_with("tx_") || name.starts_with("rx_"), "{name}");
            assert!(name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'));
        }
        assert_eq!(seen.len(), DropReason::COUNT);
    }

    #[test]
    fn counts_by_reason() {
        let c = VmCounters::new();
        c.drop_packet(DropReason::RxBadToken);
        c.drop_packets(DropReason::RxExpired, 3);
        c.tx(100);
        c.rx(40);
        let s = c.snapshot();
        assert_eq!(s.drops(DropReason::RxBadToken), 1);
        assert_eq!(s.drops(DropReason::RxExpired), 3);
        assert_eq!(s.drops(DropReason::RxWrongVm), 0);
        assert_eq!(s.total_drops(), 4);
        assert_eq!(
            (s.tx_packets, s.tx_bytes, s.rx_packets, s.rx_bytes),
            (1, 100, 1, 40)
        );
    }
}
