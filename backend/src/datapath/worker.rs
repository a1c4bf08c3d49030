//! [`PairWorker`]: the data path of one virtqueue pair and its UDP socket, the device's
//! [`QueuePairHandler`] for that pair. Runs on the pair's worker thread only, so every packet of
//! a flow is handled start to end on one thread.
//!
//! What wakes it ([`PairWorker::handle`], the one dispatch point):
//! - a TX kick: send what the guest queued (`tx.rs`);
//! - an RX kick or the socket: move datagrams into the guest (`rx.rs`);
//! - its hand-off eventfd: send packets that waited for a token (`handoff.rs`);
//! - its RX timer: RX that no event would resume (`rx_timer.rs`).
//!
//! Frames answered locally (ARP, DHCP: the edge) are written into the guest's RX queue by
//! [`PairWorker::deliver_frame`], the one place an edge reply enters the guest.

use std::net::Ipv4Addr;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost_user_backend::VringT;
use vnp_protocol::wire::options::ReturnToken;
use vnp_protocol::wire::{VnpRepr, HEADER_LEN};

use super::frame::ETH_HLEN;
use super::handoff::HandedOff;
use super::offload_batch::OffloadBatch;
use super::peers::SendInfo;
use super::port::{unix_now, PortCore};
use crate::device::features::rx_vnet_header;
use crate::device::{BrokenRings, Negotiated, PairEvent, QueuePairHandler};
use crate::metrics::counters::DropReason;
use crate::ring::batch::MsgBatch;
use crate::ring::memory::with_ring_mem;
use crate::ring::vring::{is_live, notify};
use crate::ring::{
    GuestMem, GuestSeg, GuestView, ParkedRing, PlainShadow, RingFault, RxPool, TxChain, Vring,
};

/// Packets per `sendmmsg`.
pub const TX_BATCH: usize = 32;
/// Datagrams per `recvmmsg`.
pub const RX_BATCH: usize = 32;
/// The pair's UDP socket (number for [`crate::device::NetBackend::external_event_id`]).
pub const SOCKET_EVENT: u64 = 0;
/// The pair's hand-off eventfd.
pub const HANDOFF_EVENT: u64 = 1;
/// The pair's RX timer.
pub const RX_TIMER_EVENT: u64 = 2;
/// Least time between two log lines about broken rings from one worker: a guest can break and
/// reset its rings in a loop, the log must not follow it.
const RING_FAULT_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Which ring of the pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Side {
    Rx,
    Tx,
}

/// A VNP datagram being sent: VNP header, guest packet, return-token option.
pub(super) type TxBatch = MsgBatch<HEADER_LEN, { ReturnToken::WIRE_LEN }>;

/// State of one queue pair's worker.
pub struct PairWorker {
    pub(super) core: Arc<PortCore>,
    pub(super) pair: usize,
    pub(super) features: Negotiated,
    /// RX buffers taken from the guest and not used yet.
    pub(super) pool: RxPool,
    /// Guest memory without dirty bitmap, for ring accesses while nothing is logged.
    shadow: Option<PlainShadow>,
    /// The socket had data but the guest had no buffers: resume when it adds some.
    pub(super) rx_backlog: bool,
    /// How long the guest has taken no RX buffers while datagrams waited.
    pub(super) rx_stall: super::rx_stall::RxStall,
    /// Wakes RX when no event will (`rx_timer`).
    pub(super) rx_timer: super::rx_timer::RxTimer,
    /// The driver's marks when the unseen-entries watch began (EVENT_IDX rings only).
    pub(super) rx_unseen: Option<super::rx_stall::GuestMark>,
    /// Interrupts sent again in the current unseen-entries watch.
    pub(super) rx_unseen_resent: u32,
    /// A clone of the RX vring, to give held buffers back when the ring stops.
    rx_vring: Option<Vring>,
    /// The RX ring, parked after the guest broke it (see `ring::park`).
    rx_parked: Option<ParkedRing>,
    /// The TX ring, parked likewise.
    tx_parked: Option<ParkedRing>,
    /// When this worker last logged a ring fault.
    last_fault_log: Option<Instant>,
    /// Rings parked since the device last asked (it tells the frontend).
    newly_broken: BrokenRings,
    // Per-batch scratch, reused so that a wake-up costs no allocation.
    pub(super) tx_chain: TxChain,
    pub(super) tx_heads: Vec<u16>,
    pub(super) tx_batch: TxBatch,
    /// Offloaded frames (checksum completed, TSO segments), sent in their own `sendmmsg`.
    pub(super) tx_offload: OffloadBatch,
    /// Send TSO segments with UDP GSO (off when the kernel lacks or refuses it).
    pub(super) udp_gso: bool,
    pub(super) tx_edge: Vec<Vec<u8>>,
    /// The last destination of this TX batch and its send parameters (consecutive packets
    /// mostly go to the same peer).
    pub(super) tx_last_peer: Option<(Ipv4Addr, SendInfo)>,
    /// Receive buffers and the frames of the last batch that wait for guest buffers.
    pub(super) rx: super::rx::RxState,
    pub(super) rx_slots: Vec<Range<usize>>,
    pub(super) rx_segs: Vec<GuestSeg>,
    handed_off: Vec<HandedOff>,
    /// NAT header copies of this TX batch and answers for the guest.
    pub(super) nat_scratch: super::nat_hook::NatScratch,
}

impl std::fmt::Debug for PairWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PairWorker")
            .field("pair", &self.pair)
            .field("held", &self.pool.len())
            .field("rx_backlog", &self.rx_backlog)
            .finish()
    }
}

impl QueuePairHandler for PairWorker {
    fn set_features(&mut self, negotiated: Negotiated) {
        self.features = negotiated;
        self.pool.set_mergeable(negotiated.mrg_rxbuf);
        self.pool.set_indirect_allowed(negotiated.indirect_desc);
    }

    fn reset(&mut self) {
        self.pool.clear();
        self.shadow = None;
        let lost = self.rx.discard_waiting();
        if lost > 0 {
            // Received and checked, but the guest that had no room for them is gone.
            self.core
                .counters
                .drop_packets(DropReason::RxNoBuffer, lost as u64);
        }
        self.rx_backlog = false;
        self.rx_stall.progress();
        self.rx_unseen = None;
        // A ring set up again starts with kicks on.
        self.rx.kicks_on = true;
        self.rx_vring = None;
        self.rx_parked = None;
        self.tx_parked = None;
    }

    fn stop_tx(&mut self) {
        self.tx_parked = None;
    }

    fn stop_rx(&mut self) {
        self.rx_parked = None;
        self.rx.kicks_on = true;
        let heads = self.pool.take_all();
        let Some(rx) = self.rx_vring.clone() else {
            return;
        };
        if heads.is_empty() {
            return;
        }
        {
            let mut state = rx.get_mut();
            for head in heads {
                let _ = state.add_used(head, 0);
            }
        }
        let _ = rx.signal_used_queue();
    }

    fn handle(&mut self, event: PairEvent, view: GuestView<'_>, rx: &Vring, tx: &Vring) {
        self.rx_vring.get_or_insert_with(|| rx.clone());
        self.pool.sync(view);
        PlainShadow::sync(&mut self.shadow, view);
        // Taken out for the pass, so that the view can borrow it while `self` is mutable.
        let shadow = self.shadow.take();
        let view = view.with_shadow(shadow.as_ref());
        self.dispatch(event, view, rx, tx);
        self.shadow = shadow;
    }

    fn take_broken(&mut self) -> BrokenRings {
        std::mem::take(&mut self.newly_broken)
    }
}

impl PairWorker {
    /// Runs the half of the pair `event` is for.
    fn dispatch(&mut self, event: PairEvent, view: GuestView<'_>, rx: &Vring, tx: &Vring) {
        match event {
            PairEvent::TxKick => self.run_tx(view, rx, tx),
            PairEvent::RxKick => {
                self.rx_stall.progress();
                self.run_rx(view, rx);
            }
            PairEvent::External(SOCKET_EVENT) => self.run_rx(view, rx),
            PairEvent::External(HANDOFF_EVENT) => {
                self.send_handed_off(true);
                self.deliver_local_frames(view, rx);
            }
            PairEvent::External(RX_TIMER_EVENT) => self.on_rx_timer(view, rx),
            PairEvent::External(n) => log::debug!("vm {}: unknown event {n}", self.core.vm_id),
        }
    }

    /// A worker for queue pair `pair`; fails only when no timerfd can be created.
    pub fn new(core: Arc<PortCore>, pair: usize) -> std::io::Result<Self> {
        let udp_gso = core.udp_gso;
        Ok(Self {
            core,
            pair,
            features: Negotiated::default(),
            pool: RxPool::new(),
            shadow: None,
            rx_backlog: false,
            rx_stall: Default::default(),
            rx_timer: super::rx_timer::RxTimer::new()?,
            rx_unseen: None,
            rx_unseen_resent: 0,
            rx_vring: None,
            rx_parked: None,
            tx_parked: None,
            last_fault_log: None,
            newly_broken: BrokenRings::default(),
            tx_chain: TxChain::new(),
            tx_heads: Vec::with_capacity(TX_BATCH),
            tx_batch: TxBatch::with_capacity(TX_BATCH, 4),
            tx_offload: OffloadBatch::default(),
            udp_gso,
            tx_edge: Vec::new(),
            tx_last_peer: None,
            rx: super::rx::RxState::new(),
            rx_slots: Vec::with_capacity(RX_BATCH),
            rx_segs: Vec::new(),
            handed_off: Vec::new(),
            nat_scratch: Default::default(),
        })
    }

    /// The RX timer's descriptor, for the pair's epoll.
    pub fn rx_timer_fd(&self) -> std::os::fd::RawFd {
        self.rx_timer.raw_fd()
    }

    /// Whether the socket had data the guest had no room for.
    pub fn rx_backlog(&self) -> bool {
        self.rx_backlog
    }

    /// Whether ring `side` is parked (its fault stands).
    pub(super) fn is_parked(&self, side: Side) -> bool {
        match side {
            Side::Rx => self.rx_parked.is_some(),
            Side::Tx => self.tx_parked.is_some(),
        }
    }

    /// Whether ring `side` may be used: live, and not parked, or parked but set up again by
    /// the frontend since (a driver reset), which ends the parking.
    pub(super) fn in_service(&mut self, side: Side, ring: &Vring, mem: &GuestMem) -> bool {
        if !is_live(ring) {
            return false;
        }
        let parked = match side {
            Side::Rx => &mut self.rx_parked,
            Side::Tx => &mut self.tx_parked,
        };
        let Some(p) = parked else {
            return true;
        };
        if p.still_parked(ring.get_ref().get_queue(), mem) {
            return false;
        }
        log::info!(
            "vm {}: pair {} {side:?} ring set up again, back in service",
            self.core.vm_id,
            self.pair
        );
        *parked = None;
        if side == Side::Rx {
            self.rx.kicks_on = true;
        }
        true
    }

    /// Parks ring `side` of `queue` after `fault`: counted once (`rx_ring_broken`, `tx_ring_broken`), logged at most
    /// every [`RING_FAULT_LOG_INTERVAL`]. The ring is no longer popped nor its notifications
    /// re-enabled until the frontend sets it up again, so a broken ring costs no CPU.
    pub(super) fn park(&mut self, side: Side, fault: RingFault, queue: &virtio_queue::Queue) {
        let parked = ParkedRing::new(fault, queue);
        match side {
            Side::Rx => {
                self.rx_parked = Some(parked);
                self.newly_broken.rx = true;
            }
            Side::Tx => {
                self.tx_parked = Some(parked);
                self.newly_broken.tx = true;
            }
        }
        self.core.counters.drop_packet(match side {
            Side::Rx => DropReason::RxRingBroken,
            Side::Tx => DropReason::TxRingBroken,
        });
        let now = Instant::now();
        if self
            .last_fault_log
            .is_none_or(|t| now.duration_since(t) >= RING_FAULT_LOG_INTERVAL)
        {
            self.last_fault_log = Some(now);
            log::warn!(
                "vm {}: pair {} {side:?} ring broken by the guest ({fault}); parked until the \
                 driver resets it",
                self.core.vm_id,
                self.pair
            );
        }
    }

    pub(super) fn socket(&self) -> &std::net::UdpSocket {
        &self.core.sockets[self.pair % self.core.sockets.len()]
    }

    // ---------------------------------------------------------------- hand-off

    /// Sends the packets that waited for a token and were handed to this worker, oldest first.
    /// Called when the hand-off eventfd fired (`woken`: it must be consumed, or the
    /// level-triggered epoll would report it again at once) and before every TX batch (see
    /// `datapath::handoff`).
    pub(super) fn send_handed_off(&mut self, woken: bool) {
        let handoff = &self.core.handoffs[self.pair % self.core.handoffs.len()];
        if !woken && !handoff.has_waiting() {
            return;
        }
        let mut packets = std::mem::take(&mut self.handed_off);
        handoff.take(&mut packets);
        let now = unix_now();
        for p in packets.drain(..) {
            self.send_copied(p, now);
        }
        self.handed_off = packets;
    }

    /// Sends one copied packet (off the hot path: one `send_to`).
    pub(super) fn send_copied(&self, p: HandedOff, now: u32) {
        let core = &*self.core;
        let mut options = [0u8; ReturnToken::WIRE_LEN];
        let mut options_len = 0;
        if p.return_token {
            options_len = core
                .return_token(p.info.endpoint, p.dst, now)
                .emit(&mut options)
                .unwrap_or(0);
        }
        let header = VnpRepr {
            network_id: core.network_id,
            token: p.info.token,
            expiry: p.info.expiry,
            has_options: options_len > 0,
        }
        .to_bytes();
        let mut datagram = Vec::with_capacity(HEADER_LEN + p.packet.len() + options_len);
        datagram.extend_from_slice(&header);
        datagram.extend_from_slice(&p.packet);
        datagram.extend_from_slice(&options[..options_len]);
        match self.socket().send_to(&datagram, p.info.endpoint) {
            Ok(_) => core.counters.tx(p.packet.len()),
            Err(e) => {
                log::debug!("vm {}: send to {}: {e}", core.vm_id, p.info.endpoint);
                core.counters.drop_packet(DropReason::TxSendError);
            }
        }
    }

    // ---------------------------------------------------------------- edge

    /// Hands an ARP or DHCP frame to the edge and delivers its reply to the guest.
    pub(super) fn answer_edge(&mut self, view: GuestView<'_>, rx: &Vring, frame: &[u8]) {
        match self.core.edge_reply(frame) {
            Ok(Some(reply)) => {
                if self.deliver_frame(view, rx, &reply) {
                    self.core.counters.edge_reply();
                } else {
                    self.core.counters.drop_packet(DropReason::RxNoBuffer);
                }
            }
            Ok(None) => {}
            Err(()) => self.core.counters.drop_packet(DropReason::TxEdgeRefused),
        }
    }

    /// Delivers the frames the service bridge made for the guest (see `crate::bridge`).
    fn deliver_local_frames(&mut self, view: GuestView<'_>, rx: &Vring) {
        let handoff = &self.core.handoffs[self.pair % self.core.handoffs.len()];
        let mut frames = Vec::new();
        handoff.take_frames(&mut frames);
        for frame in frames {
            if !self.deliver_frame(view, rx, &frame) {
                self.core.counters.drop_packet(DropReason::RxNoBuffer);
            }
        }
    }

    /// Writes a locally generated Ethernet frame (an edge reply) into the guest's RX queue.
    /// Returns false when the guest has no buffer for it.
    pub(super) fn deliver_frame(&mut self, view: GuestView<'_>, rx: &Vring, frame: &[u8]) -> bool {
        if !self.in_service(Side::Rx, rx, view.mem()) {
            return false;
        }
        let hdr = self.features.vnet_hdr_len;
        let need = hdr + frame.len();
        let mut slots = std::mem::take(&mut self.rx_slots);
        let (delivered, bad_chains) = {
            let mut state = rx.get_mut();
            let queue = state.get_queue_mut();
            let assigned = self.pool.assign(queue, view, 1, need, &mut slots);
            if let Some(fault) = assigned.fault {
                self.park(Side::Rx, fault, queue);
            }
            // Without MRG_RXBUF a single buffer must hold the frame.
            let fits = slots.first().filter(|s| self.pool.capacity(s) >= need);
            let delivered = if let Some(slot) = fits {
                self.rx_segs.clear();
                self.pool.segs(slot, &mut self.rx_segs);
                let spans = self.pool.spans(slot, need);
                view.write(&self.rx_segs, 0, &rx_vnet_header(spans)[..hdr]);
                view.write(&self.rx_segs, hdr, frame);
                self.pool.accept(slot, need);
                self.pool.commit(queue, view);
                true
            } else {
                false
            };
            (delivered, assigned.bad_chains)
        };
        self.rx_slots = slots;
        self.count_bad_rx_chains(bad_chains);
        if delivered || bad_chains > 0 {
            with_ring_mem!(view, |mem| notify(rx, mem));
            self.watch_unseen(view, rx);
        }
        delivered
    }

    pub(super) fn count_bad_rx_chains(&self, n: usize) {
        if n > 0 {
            self.core
                .counters
                .drop_packets(DropReason::RxBadChain, n as u64);
        }
    }

    /// Room for the virtio-net and Ethernet headers before the inner packet in an RX buffer,
    /// and where the inner packet starts in a TX chain.
    pub(super) fn inner_offset(&self) -> usize {
        self.features.vnet_hdr_len + ETH_HLEN
    }
}
