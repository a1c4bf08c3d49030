//! Where the data path meets NAT (`crate::nat`): off-network traffic to the gateway.
//!
//! - TX: a packet to a destination outside the VM's network is NATed on a *local copy* of its
//!   IPv4 and transport headers ([`NatHead`]); the message sent is `[VNP header] [that copy]
//!   [the rest straight from guest memory]`, so the guest's bytes are never written and the
//!   payload is never copied. It goes to the gateway with the VM's one cached (VM, gateway)
//!   grant, kept in the peer table under [`OUTSIDE`]: a new outside peer costs no registry
//!   request. Refused packets are counted; a new flow refused for want of ports gets a TCP RST
//!   or an ICMP unreachable (`nat::answer`), delivered after the batch.
//! - RX: a datagram whose inner source is outside the network passed the receive checks with
//!   the OUTSIDE rule (`rx_check`); its headers are translated back here and written into the
//!   guest's buffer, or it is dropped (counted) when no flow knows it. An inbound (forwarded or
//!   load-balanced) flow records the gateway endpoint the datagram came from.
//! - Replies on an inbound flow go to the gateway it last came in through, with that gateway's
//!   token learned from its return-token option, else to the assigned gateway
//!   (`nat::gateways::reply_route`).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use vnp_protocol::wire::options::ReturnToken;

use crate::metrics::counters::{DropReason, VmCounters};
use crate::nat::answer::{exhaustion_answer, AnswerAddrs};
use crate::nat::gateways::{reply_route, GatewayTokens, ReplyRoute};
use crate::nat::{self, packet, NatDrop, NatRefusal, NatTable, PortBlock};
use crate::ring::GuestView;

use super::frame::GuestNet;
use super::peers::{SendInfo, RETURN_TOKEN_TTL_SECS};
use super::port::PortCore;
use super::worker::{PairWorker, TX_BATCH};

pub use crate::nat::OUTSIDE;

/// Longest header copy NAT rewrites on TX: a 60-byte IPv4 header and 20 bytes of TCP.
pub const NAT_HEAD_MAX: usize = 80;

/// How often (seconds) the TX path sweeps expired flows.
const SWEEP_SECS: u64 = 1;

/// One VM's NAT state, shared by its pair workers (a flow's replies may arrive on another
/// pair's socket than its packets left from).
#[derive(Debug)]
pub struct NatState {
    table: Mutex<Swept>,
    epoch: Instant,
    /// Tokens for gateways other than the assigned one (`nat::gateways`).
    gateways: Mutex<GatewayTokens>,
}

#[derive(Debug, Default)]
struct Swept {
    table: NatTable,
    last_sweep: u64,
}

impl Default for NatState {
    fn default() -> Self {
        Self {
            table: Mutex::new(Swept::default()),
            epoch: Instant::now(),
            gateways: Mutex::new(GatewayTokens::default()),
        }
    }
}

impl NatState {
    /// Seconds of the NAT clock (monotonic, from [`crate::nat::CLOCK_START`]).
    pub fn now(&self) -> u64 {
        crate::nat::CLOCK_START + self.epoch.elapsed().as_secs()
    }

    fn lock(&self) -> MutexGuard<'_, Swept> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes the table's numbers as the VM's NAT gauges.
    fn publish(table: &NatTable, counters: &VmCounters) {
        let s = table.stats();
        counters.set_nat(s.mapped, s.inbound, s.ports_total);
    }

    /// The table, expired flows swept at most every [`SWEEP_SECS`].
    fn table_at(&self, now: u64) -> MutexGuard<'_, Swept> {
        let mut g = self.lock();
        if now >= g.last_sweep + SWEEP_SECS {
            g.table.expire(now);
            g.last_sweep = now;
        }
        g
    }

    /// The VM's NAT port blocks (the registry's, growing at run time).
    pub fn set_blocks(&self, blocks: &[PortBlock], counters: &VmCounters) {
        let mut g = self.lock();
        g.table.set_blocks(blocks);
        Self::publish(&g.table, counters);
    }

    /// Runs `f` on the table with the NAT clock's now, then publishes the gauges (live
    /// migration's export and import, `datapath::port::migrate`).
    pub fn with_table<R>(
        &self,
        counters: &VmCounters,
        f: impl FnOnce(&mut NatTable, u64) -> R,
    ) -> R {
        let now = self.now();
        let mut g = self.lock();
        let r = f(&mut g.table, now);
        Self::publish(&g.table, counters);
        r
    }

    /// A copy of the table (admin view, metrics).
    pub fn snapshot(&self) -> NatTable {
        self.lock().table.clone()
    }

    /// Keeps the return token a gateway at `from` sent on an accepted datagram (Unix `now`),
    /// its expiry capped at `now + RETURN_TOKEN_TTL_SECS` and the receive checks' maximum TTL;
    /// false when refused (see `GatewayTokens::learn`).
    pub fn learn_gateway_token(
        &self,
        from: SocketAddrV4,
        rt: ReturnToken,
        now: u32,
        max_ttl: u32,
    ) -> bool {
        let cap = max_ttl.min(RETURN_TOKEN_TTL_SECS);
        self.gateways
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .learn(from, rt.token, rt.expiry, now, cap)
    }

    /// Where a reply of an inbound flow that last came in from `via` goes at Unix `now`:
    /// `Some` for a gateway other than the assigned one (`assigned`) whose token vnpd holds,
    /// `None` for the usual path (the assigned gateway's grant).
    pub fn reply_gateway(
        &self,
        via: Option<SocketAddrV4>,
        assigned: Option<SocketAddrV4>,
        now: u32,
    ) -> Option<SendInfo> {
        let via_ep = via?;
        let learned = self
            .gateways
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(via_ep, now);
        match reply_route(via, assigned, learned) {
            ReplyRoute::Assigned => None,
            ReplyRoute::Gateway(t) => Some(SendInfo {
                endpoint: t.endpoint,
                token: t.token,
                expiry: t.expiry,
            }),
        }
    }
}

/// Whether the data path sends `dst` to the gateway rather than to a VM.
pub fn is_outside(net: &GuestNet, dst: Ipv4Addr) -> bool {
    !nat::in_network(net.vm_ip, net.prefix_len, dst)
}

/// The NATed copy of a packet's headers, sent in front of the rest of the packet.
#[derive(Debug, Clone, Copy)]
pub struct NatHead {
    /// The rewritten headers.
    pub bytes: [u8; NAT_HEAD_MAX],
    /// How many of them.
    pub len: usize,
    /// A reply on an inbound flow: the gateway endpoint that flow last came in from.
    pub via: Option<SocketAddrV4>,
}

impl NatHead {
    /// The header bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// The worker's NAT scratch: header copies of this batch (their addresses go into iovecs, so
/// they live in a box that never moves or grows) and answers for the guest.
#[derive(Debug)]
pub struct NatScratch {
    heads: Box<[NatHead; TX_BATCH]>,
    used: usize,
    answers: Vec<Vec<u8>>,
}

impl Default for NatScratch {
    fn default() -> Self {
        Self {
            heads: Box::new(
                [NatHead {
                    bytes: [0; NAT_HEAD_MAX],
                    len: 0,
                    via: None,
                }; TX_BATCH],
            ),
            used: 0,
            answers: Vec::new(),
        }
    }
}

impl NatScratch {
    /// Forgets the previous batch's header copies.
    pub fn clear_batch(&mut self) {
        self.used = 0;
    }

    /// Keeps `head` for the batch being built and returns an iovec of it (valid until the
    /// next [`NatScratch::clear_batch`]: the box never moves); `None` when the batch already
    /// has [`TX_BATCH`] of them.
    pub fn keep(&mut self, head: &NatHead) -> Option<libc::iovec> {
        let slot = self.heads.get_mut(self.used)?;
        *slot = *head;
        self.used += 1;
        Some(libc::iovec {
            iov_base: slot.bytes.as_mut_ptr().cast(),
            iov_len: slot.len,
        })
    }
}

/// The drop reason of a NAT refusal on TX.
pub fn tx_drop_reason(d: NatDrop) -> DropReason {
    match d {
        NatDrop::Refused(NatRefusal::Exhausted) => DropReason::TxNatPortsExhausted,
        NatDrop::Refused(NatRefusal::AwaitingState) => DropReason::TxNatAwaitingState,
        NatDrop::Refused(_) => DropReason::TxNatNoFlow,
        NatDrop::Fragment => DropReason::TxNatFragment,
        NatDrop::Unsupported => DropReason::TxNatUnsupported,
        NatDrop::Malformed => DropReason::TxNatMalformed,
    }
}

/// The drop reason of a NAT refusal on RX.
pub fn rx_drop_reason(d: NatDrop) -> DropReason {
    match d {
        NatDrop::Refused(NatRefusal::InboundFull) => DropReason::RxNatInboundFull,
        NatDrop::Refused(_) => DropReason::RxNatUnknownMapping,
        NatDrop::Fragment => DropReason::RxNatFragment,
        NatDrop::Unsupported => DropReason::RxNatUnsupported,
        NatDrop::Malformed => DropReason::RxNatMalformed,
    }
}

impl PairWorker {
    /// NAT for the outbound packet of `total_len` bytes at `inner` in the TX chain: the
    /// rewritten header copy, or `None` when the packet was dropped (counted; answered when
    /// the VM is out of ports).
    pub(super) fn nat_outbound(
        &mut self,
        view: GuestView<'_>,
        inner: usize,
        total_len: usize,
    ) -> Option<NatHead> {
        let mut head = NatHead {
            bytes: [0; NAT_HEAD_MAX],
            len: 0,
            via: None,
        };
        let want = total_len.min(NAT_HEAD_MAX);
        let got = view.read(self.tx_chain.segs(), inner, &mut head.bytes[..want]);
        let need = packet::needed_len(&head.bytes[..got]).filter(|n| *n <= got);
        let Some(need) = need else {
            self.core.counters.drop_packet(DropReason::TxNatMalformed);
            return None;
        };
        head.len = need;
        // The checksum rule of NEEDS_CSUM frames (see `nat::packet`): frames with a checksum
        // offload take the other path (`tx_offload`), so every frame here is complete.
        let via = self.nat_in_place(&mut head.bytes[..need], false)?;
        head.via = via;
        Some(head)
    }

    /// NAT on a local copy of a packet's IPv4 and transport headers (at least what
    /// `packet::needed_len` asks for); `None` when refused (counted; a new flow refused for
    /// want of ports gets its answer queued for the guest), else `Some` of the gateway endpoint
    /// an inbound flow last came in from (for its replies). `needs_csum`: the L4 checksum is
    /// not a complete one (it is recomputed later), so the port change must not adjust it.
    pub(super) fn nat_in_place(
        &mut self,
        head: &mut [u8],
        needs_csum: bool,
    ) -> Option<Option<SocketAddrV4>> {
        let core = &*self.core;
        let now = core.nat.now();
        let result = {
            let mut g = core.nat.table_at(now);
            let r = packet::outbound_via(&mut g.table, head, needs_csum, now);
            NatState::publish(&g.table, &core.counters);
            r
        };
        match result {
            Ok((_, via)) => Some(via),
            Err(d) => {
                core.counters.drop_packet(tx_drop_reason(d));
                if d == NatDrop::Refused(NatRefusal::Exhausted) {
                    let addrs = AnswerAddrs {
                        vm_mac: core.mac,
                        router_mac: core.router_mac,
                        router_ip: core.net.router_ip,
                    };
                    self.nat_scratch
                        .answers
                        .extend(exhaustion_answer(&addrs, head));
                }
                None
            }
        }
    }

    /// The send parameters of a reply on an inbound flow that last came in from `via`, when
    /// that is a gateway other than the assigned one and vnpd holds its token; `None`: send
    /// as every off-network packet (to the assigned gateway under the `OUTSIDE` grant).
    pub(super) fn reply_gateway(&self, via: Option<SocketAddrV4>, now: u32) -> Option<SendInfo> {
        via?;
        let core = &*self.core;
        let assigned = core
            .peers
            .view()
            .get(OUTSIDE, now)
            .map(|e| e.send_info().endpoint);
        core.nat.reply_gateway(via, assigned, now)
    }

    /// Delivers the answers NAT made during the batch (after the batch was sent).
    pub(super) fn deliver_nat_answers(&mut self, view: GuestView<'_>, rx: &crate::ring::Vring) {
        let mut answers = std::mem::take(&mut self.nat_scratch.answers);
        for frame in answers.drain(..) {
            if self.deliver_frame(view, rx, &frame) {
                self.core.counters.edge_reply();
            } else {
                self.core.counters.drop_packet(DropReason::RxNoBuffer);
            }
        }
        self.nat_scratch.answers = answers;
    }
}

/// Reverse NAT for an accepted inner packet (in vnpd's receive buffer) whose datagram came
/// from `from`: nothing for traffic from inside the network; for traffic from outside, its
/// headers translated in place (an inbound flow records `from`, the gateway), or the drop
/// reason.
pub(super) fn nat_inbound(
    core: &PortCore,
    packet: &mut [u8],
    from: SocketAddrV4,
) -> Result<(), DropReason> {
    if packet.len() < 20 {
        return Err(DropReason::RxTruncated);
    }
    let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    if !is_outside(&core.net, src) {
        return Ok(());
    }
    let need = packet::needed_len(packet)
        .filter(|n| *n <= packet.len())
        .ok_or(DropReason::RxNatMalformed)?;
    let now = core.nat.now();
    let mut g = core.nat.table_at(now);
    let r = packet::inbound_via(
        &mut g.table,
        &mut packet[..need],
        core.net.vm_ip,
        Some(from),
        now,
    );
    NatState::publish(&g.table, &core.counters);
    r.map_err(rx_drop_reason)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nat::{FlowKey, FlowState, MovedFlow, Proto};

    /// A destination's NAT clock starts at the VM's (incoming) attach, seconds before the
    /// hand-off: flows that arrive with less time left than their timeout keep exactly that
    /// time, not a timer reset to almost the whole timeout.
    #[test]
    fn a_flow_moved_onto_a_clock_just_started_keeps_the_time_it_had_left() {
        let nat = NatState::default();
        let counters = VmCounters::new();
        nat.set_blocks(&[PortBlock::new(40000, 40009).unwrap()], &counters);
        let moved = |local_port, state, remaining_secs| MovedFlow {
            key: FlowKey {
                proto: Proto::Tcp,
                local_port,
                remote: Ipv4Addr::new(203, 0, 113, 10),
                remote_port: 443,
            },
            mapped: Some(40000 + local_port % 10),
            state,
            remaining_secs,
        };
        let flows = [
            moved(5001, FlowState::TcpEstablished, 300),
            moved(5002, FlowState::TcpClosed, 2),
        ];
        let report = nat.with_table(&counters, |t, now| t.import(&flows, now));
        assert_eq!(report.imported, 2);
        let left: Vec<(u16, u64)> = nat
            .with_table(&counters, |t, now| t.flows(now))
            .iter()
            .map(|v| (v.key.local_port, v.expires_in))
            .collect();
        assert_eq!(left, [(5001, 300), (5002, 2)]);
    }
}
