//! RX, VNP/UDP -> guest: the RX half of [`PairWorker`].
//!
//! One round: one `recvmmsg` into vnpd's own buffers (UDP GRO: a message may be a train of
//! datagrams, `rx_gro`); the receive checks run per datagram on those buffers, with the token
//! computed once per (pair, expiry) and batch (`rx_check::TokenCache`); the inner packets that
//! passed are planned into frames (one per packet, or for a guest that takes them, coalesced
//! runs of one TCP flow, `rx_coalesce`) and copied into the guest's RX buffers, headers first;
//! the frames are committed to the used ring. Nothing reaches guest memory before its checks
//! passed, so rejected bytes are never visible to the guest. Frames the guest had no buffers
//! for wait in vnpd (one batch at most) and go first when it adds buffers.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::ops::Range;

use vhost_user_backend::VringT;
use virtio_queue::QueueT;
use vnp_protocol::wire::options::ReturnToken;
use vnp_protocol::wire::HEADER_LEN;

use super::frame::{ETHERTYPE_IPV4, ETH_HLEN};
use super::moved_hint::MovedHint;
use super::nat_hook::nat_inbound;
use super::port::unix_now;
use super::rx_check::{check_datagram_cached, parse_options, Datagram, TokenCache, MIN_INNER};
use super::rx_coalesce::{emit_coalesced_headers, plan_frames, rx_vnet_header, Planned};
use super::rx_gro::{segment_ranges, RecvBatch};
use super::rx_stall::{unseen_verdict, GuestMark, Unseen, RESIGNAL_AFTER};
use super::worker::{PairWorker, Side, RX_BATCH};
use crate::metrics::counters::DropReason;
use crate::ring::memory::with_ring_mem;
use crate::ring::vring::{event_idx_marks, notify};
use crate::ring::{GuestView, Vring};

/// Fewest messages a `recvmmsg` is prepared for.
pub(super) const MIN_RX_SLOTS: usize = 4;
/// Longest option trailer we read from a datagram.
const MAX_OPTIONS: usize = 512;
/// Frames given buffers at once.
const FRAMES_PER_ASSIGN: usize = 64;
/// Room for the virtio-net, Ethernet, IPv4 and TCP headers of a frame.
const MAX_FRAME_HEAD: usize = 12 + ETH_HLEN + 60 + 60;

/// A return token carried by an accepted datagram: the sender's VM, the sender's underlay
/// address, the token.
pub(super) type Learned = (Ipv4Addr, SocketAddrV4, ReturnToken);

/// The RX state of one pair: receive buffers and what the last batch left to deliver.
#[derive(Debug)]
pub(super) struct RxState {
    recv: RecvBatch,
    tokens: TokenCache,
    /// The inner packets of the datagrams that passed, as ranges of `recv`'s buffer.
    packets: Vec<Range<usize>>,
    /// Where each of `packets` came from (an inbound NAT flow records its gateway).
    sources: Vec<SocketAddrV4>,
    /// Frames planned from `packets`; `frames[next_frame..]` wait for guest buffers.
    frames: Vec<Planned>,
    next_frame: usize,
    learned: Vec<Learned>,
    /// How many messages to receive next: follows the arrival rate, so that a wake-up for one
    /// datagram does not touch 32 buffers.
    hint: usize,
    /// Whether the guest may still be asked to kick when it adds RX buffers (the ring's state
    /// after a reset, and after a round that ran out of buffers): only then does a wake-up
    /// need to turn kicks off, which costs the ring's lock and a store into guest memory.
    pub(super) kicks_on: bool,
    /// Packets and bytes written into the guest and not counted yet.
    delivered: (u64, u64),
}

impl RxState {
    pub(super) fn new() -> Self {
        Self {
            recv: RecvBatch::new(RX_BATCH),
            tokens: TokenCache::new(),
            packets: Vec::with_capacity(RX_BATCH),
            sources: Vec::with_capacity(RX_BATCH),
            frames: Vec::with_capacity(RX_BATCH),
            next_frame: 0,
            learned: Vec::new(),
            hint: MIN_RX_SLOTS,
            kicks_on: true,
            delivered: (0, 0),
        }
    }

    /// Frames received and checked that no guest buffer took yet.
    pub(super) fn waiting(&self) -> usize {
        self.frames.len() - self.next_frame
    }

    /// Forgets the waiting frames (device reset); returns how many packets they held.
    pub(super) fn discard_waiting(&mut self) -> usize {
        let n = self.frames[self.next_frame..].iter().map(|f| f.count).sum();
        self.frames.clear();
        self.next_frame = 0;
        n
    }
}

impl PairWorker {
    /// Handles socket readiness or an RX kick: moves datagrams into the guest while both the
    /// socket has data and the guest has buffers.
    pub(super) fn run_rx(&mut self, view: GuestView<'_>, rx: &Vring) {
        loop {
            if !self.in_service(Side::Rx, rx, view.mem()) {
                // Datagrams stay in the socket buffer until the ring is enabled (or set up
                // again after the guest broke it). vhost-user-backend 0.24 hands the worker a
                // kick event for every ring it registers as live (`register_event`), which
                // runs this again.
                self.rx_backlog = true;
                return;
            }
            if std::mem::take(&mut self.rx.kicks_on) {
                let _ = rx.disable_notification();
            }
            if self.rx_rounds(view, rx) {
                self.rx_backlog = false;
                self.rx_stall.progress();
                return;
            }
            // Out of guest buffers with data left: ask the guest to kick when it adds some.
            self.rx_backlog = true;
            if self.is_parked(Side::Rx) {
                // A broken ring always "has work": re-enabling would loop forever.
                return;
            }
            self.rx.kicks_on = true;
            match rx.enable_notification() {
                Ok(true) => {
                    self.rx_stall.progress();
                    continue;
                }
                _ => {
                    self.interrupt_if_stalled(rx);
                    // No datagram may arrive to run this again (the socket is edge-triggered).
                    self.rx_timer.arm_within(super::rx_stall::RESIGNAL_AFTER);
                    return;
                }
            }
        }
    }

    /// The guest has taken no buffers for a while with datagrams waiting: it may have missed
    /// an interrupt (`rx_stall`), so it gets one whatever its driver asked for.
    fn interrupt_if_stalled(&mut self, rx: &Vring) {
        let Some(n) = self.rx_stall.out_of_buffers(std::time::Instant::now()) else {
            return;
        };
        let _ = rx.signal_used_queue();
        if n == 1 {
            log::info!(
                "vm {} pair {}: the guest took no RX buffers for {} ms with datagrams waiting; \
                 interrupting it again",
                self.core.vm_id,
                self.pair,
                super::rx_stall::RESIGNAL_AFTER.as_millis()
            );
        }
    }

    /// Receives rounds until the socket is empty (returns true) or the guest runs out of
    /// buffers (returns false).
    fn rx_rounds(&mut self, view: GuestView<'_>, rx: &Vring) -> bool {
        loop {
            // What an earlier round could not place goes first; nothing new is read before.
            if !self.deliver_frames(view, rx) {
                return false;
            }
            let wanted = self.rx.hint;
            let received = self.receive(wanted);
            if received == 0 {
                return true;
            }
            // One clock read per round, for the token expiries and the learned tokens.
            let now = unix_now();
            self.check_batch(now);
            let coalesce = self.coalesce_rx();
            let state = &mut self.rx;
            let (recv, packets) = (&state.recv, &state.packets);
            plan_frames(
                packets.len(),
                |i| recv.bytes(packets[i].clone()),
                coalesce,
                &mut state.frames,
            );
            state.next_frame = 0;
            let delivered = self.deliver_frames(view, rx);
            for (src_vm, from, rt) in self.rx.learned.drain(..) {
                self.core.learn_return_token(src_vm, from, rt, now);
            }
            // Prepare for twice what arrived: grows fast under load, shrinks when idle.
            self.rx.hint = (received * 2).clamp(MIN_RX_SLOTS, RX_BATCH);
            if !delivered {
                return false;
            }
            if received < wanted {
                return true;
            }
        }
    }

    /// Whether received TCP segments are coalesced for this guest: it negotiated receive
    /// segmentation offload for IPv4 TCP, partial checksums and mergeable RX buffers.
    fn coalesce_rx(&self) -> bool {
        let f = &self.features;
        f.mrg_rxbuf && f.guest_tso4 && f.guest_csum
    }

    /// One `recvmmsg` of up to `n` messages; returns how many arrived.
    fn receive(&mut self, n: usize) -> usize {
        let socket = &self.core.sockets[self.pair % self.core.sockets.len()];
        match self.rx.recv.receive(socket, n) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("vm {}: recvmmsg: {e}", self.core.vm_id);
                0
            }
        }
    }

    /// Splits every received message into its datagrams and checks each; the inner packets of
    /// those that passed go to `rx.packets`, the others are counted by reason.
    fn check_batch(&mut self, now: u32) {
        self.rx.packets.clear();
        self.rx.sources.clear();
        self.rx.tokens.clear();
        let mtu = usize::from(self.core.net.mtu);
        for i in 0..self.rx.recv.len() {
            let m = self.rx.recv.message(i);
            if m.truncated {
                self.core.counters.drop_packet(DropReason::RxOversize);
                continue;
            }
            if m.data.is_empty() {
                // An empty datagram has no segment to check.
                self.core.counters.drop_packet(DropReason::RxTruncated);
                continue;
            }
            let Some(src) = m.src else {
                self.core.counters.drop_packet(DropReason::RxMalformed);
                continue;
            };
            let base = RecvBatch::offset_of(i);
            for r in segment_ranges(m.data.len(), m.gso_size) {
                let datagram = &m.data[r.clone()];
                let core = &*self.core;
                match check_one(core, &mut self.rx.tokens, datagram, src, now, mtu) {
                    Ok((inner_len, learned)) => {
                        let start = base + r.start + HEADER_LEN;
                        self.rx.packets.push(start..start + inner_len);
                        self.rx.sources.push(src);
                        self.rx.learned.extend(learned);
                    }
                    Err(reason) => core.counters.drop_packet(reason),
                }
            }
        }
        self.nat_inbound_batch();
    }

    /// Reverse NAT for the accepted packets from outside the network (through a gateway), in
    /// vnpd's buffer before they are planned into frames; a refused one is dropped and counted.
    fn nat_inbound_batch(&mut self) {
        let core = &*self.core;
        let state = &mut self.rx;
        let (recv, packets) = (&mut state.recv, &mut state.packets);
        let mut sources = state.sources.iter();
        // `retain` visits in order: `sources` stays in step with `packets`.
        packets.retain(|r| {
            let Some(&from) = sources.next() else {
                return true;
            };
            match nat_inbound(core, recv.bytes_mut(r.clone()), from) {
                Ok(()) => true,
                Err(reason) => {
                    core.counters.drop_packet(reason);
                    false
                }
            }
        });
    }

    /// Copies the waiting frames into guest buffers and commits them; returns false when the
    /// guest ran out of buffers with frames left.
    fn deliver_frames(&mut self, view: GuestView<'_>, rx: &Vring) -> bool {
        let done = self.deliver_waiting(view, rx);
        let (packets, bytes) = std::mem::take(&mut self.rx.delivered);
        self.core.counters.rx_many(packets, bytes);
        done
    }

    /// [`Self::deliver_frames`] without counting.
    fn deliver_waiting(&mut self, view: GuestView<'_>, rx: &Vring) -> bool {
        while self.rx.waiting() > 0 {
            let want = self.rx.waiting().min(FRAMES_PER_ASSIGN);
            let head = self.inner_offset();
            let mut slots = std::mem::take(&mut self.rx_slots);
            let (assigned, stuck) = {
                let mut state = rx.get_mut();
                let queue = state.get_queue_mut();
                let (frames, first) = (&self.rx.frames, self.rx.next_frame);
                let a = self.pool.assign_sized(
                    queue,
                    view,
                    want,
                    |k| head + frame_packet_len(&frames[first + k], &self.rx.packets),
                    &mut slots,
                );
                if let Some(fault) = a.fault {
                    self.park(Side::Rx, fault, queue);
                }
                // A frame larger than every buffer the ring can ever hold would wait forever.
                let stuck = a.frames == 0 && self.pool.len() >= usize::from(queue.size());
                (a, stuck)
            };
            self.count_bad_rx_chains(assigned.bad_chains);
            for (k, slot) in slots.iter().enumerate() {
                let frame = self.rx.frames[self.rx.next_frame + k];
                self.write_frame(view, slot, &frame);
            }
            self.rx.next_frame += slots.len();
            self.rx_slots = slots;
            if stuck {
                let frame = self.rx.frames[self.rx.next_frame];
                self.core
                    .counters
                    .drop_packets(DropReason::RxOversize, frame.count as u64);
                self.rx.next_frame += 1;
            }
            self.publish_rx(view, rx, assigned.bad_chains > 0);
            if assigned.frames < want && !stuck {
                return false;
            }
        }
        true
    }

    /// Writes one frame (virtio-net and Ethernet headers, then the packet or the coalesced
    /// run) into the buffers of `slot` and accepts it; a frame larger than a buffer of a guest
    /// without mergeable buffers is dropped (`rx_oversize`) and the buffer stays.
    fn write_frame(&mut self, view: GuestView<'_>, slot: &Range<usize>, frame: &Planned) {
        let hdr = self.features.vnet_hdr_len;
        let off = self.inner_offset();
        let first = self.rx.packets[frame.first].clone();
        let frame_len = off + frame_packet_len(frame, &self.rx.packets);
        if self.pool.capacity(slot) < frame_len {
            self.core
                .counters
                .drop_packets(DropReason::RxOversize, frame.count as u64);
            return;
        }
        let spans = self.pool.spans(slot, frame_len);
        let mut head = [0u8; MAX_FRAME_HEAD];
        head[..hdr].copy_from_slice(&rx_vnet_header(frame.gso.as_ref(), spans)[..hdr]);
        head[hdr..hdr + 6].copy_from_slice(&self.core.mac);
        head[hdr + 6..hdr + 12].copy_from_slice(&self.core.router_mac);
        head[hdr + 12..hdr + 14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        let (recv, pool) = (&self.rx.recv, &self.pool);
        let written = match &frame.gso {
            None => {
                pool.write(slot, view, 0, &head[..off])
                    + pool.write(slot, view, off, recv.bytes(first))
            }
            Some(gso) => {
                let end = off + gso.hdr_len;
                emit_coalesced_headers(recv.bytes(first), gso, &mut head[off..end]);
                let mut at = pool.write(slot, view, 0, &head[..end]);
                for p in &self.rx.packets[frame.first..frame.first + frame.count] {
                    at += pool.write(slot, view, at, recv.bytes(p.start + gso.hdr_len..p.end));
                }
                at
            }
        };
        if written != frame_len {
            // The buffers were checked against guest memory when collected; a remap in
            // between is the only way here. The frame is lost, the buffers stay.
            self.core
                .counters
                .drop_packets(DropReason::RxBadChain, frame.count as u64);
            return;
        }
        self.pool.accept(slot, frame_len);
        // Counted per inner packet, coalesced or not; added to the shared counters once per
        // round (`deliver_frames`).
        for p in &self.rx.packets[frame.first..frame.first + frame.count] {
            self.rx.delivered.0 += 1;
            self.rx.delivered.1 += p.len() as u64;
        }
    }

    /// Commits the accepted frames to the used ring and tells the guest (also when only
    /// broken chains were returned: `returned`).
    fn publish_rx(&mut self, view: GuestView<'_>, rx: &Vring, returned: bool) {
        if self.pool.has_accepted() {
            let mut state = rx.get_mut();
            self.pool.commit(state.get_queue_mut(), view);
        } else if !returned {
            return;
        }
        with_ring_mem!(view, |mem| notify(rx, mem));
        self.watch_unseen(view, rx);
    }

    /// After entries were published on an EVENT_IDX ring: starts the unseen-entries watch
    /// unless one runs (one read of the driver's marks and one timer arm per watch). Called
    /// per published batch: without EVENT_IDX or with a watch running it costs two loads.
    pub(super) fn watch_unseen(&mut self, view: GuestView<'_>, rx: &Vring) {
        if !self.features.event_idx || self.rx_unseen.is_some() {
            return;
        }
        let Some((avail, used_event, _, _)) = with_ring_mem!(view, |mem| event_idx_marks(rx, mem))
        else {
            return;
        };
        self.rx_unseen = Some(GuestMark { avail, used_event });
        self.rx_unseen_resent = 0;
        self.rx_timer.arm_within(RESIGNAL_AFTER);
    }

    /// The RX timer fired: RX that waited for a live ring or for buffers is tried again, and
    /// a driver that left published entries unread is interrupted again.
    pub(super) fn on_rx_timer(&mut self, view: GuestView<'_>, rx: &Vring) {
        self.rx_timer.consume();
        if self.rx_backlog {
            self.run_rx(view, rx);
        }
        let Some(then) = self.rx_unseen else {
            return;
        };
        let Some((avail, used_event, next_used, size)) =
            with_ring_mem!(view, |mem| event_idx_marks(rx, mem))
        else {
            self.rx_unseen = None;
            return;
        };
        let now = GuestMark { avail, used_event };
        match unseen_verdict(then, now, next_used, size) {
            Unseen::Idle => self.rx_unseen = None,
            Unseen::Watch => {
                self.rx_unseen = Some(now);
                self.rx_timer.arm_within(RESIGNAL_AFTER);
            }
            Unseen::Resignal => {
                let _ = rx.signal_used_queue();
                self.rx_unseen_resent += 1;
                if self.rx_unseen_resent == 1 {
                    log::info!(
                        "vm {} pair {}: the guest left {} RX entries unread for {} ms; \
                         interrupting it again",
                        self.core.vm_id,
                        self.pair,
                        next_used.wrapping_sub(used_event),
                        RESIGNAL_AFTER.as_millis()
                    );
                }
                self.rx_timer.arm_within(RESIGNAL_AFTER);
            }
        }
    }
}

/// Length of the IPv4 packet a frame hands the guest.
fn frame_packet_len(frame: &Planned, packets: &[Range<usize>]) -> usize {
    match &frame.gso {
        Some(g) => g.packet_len(),
        None => packets[frame.first].len(),
    }
}

/// The receive checks of one datagram (in vnpd's buffer, which the guest cannot write); on
/// success the inner length and the return token it carried.
fn check_one(
    core: &super::port::PortCore,
    tokens: &mut TokenCache,
    datagram: &[u8],
    src: SocketAddrV4,
    now: u32,
    mtu: usize,
) -> Result<(usize, Option<Learned>), DropReason> {
    let Some((header, rest)) = datagram.split_first_chunk::<HEADER_LEN>() else {
        return Err(DropReason::RxTruncated);
    };
    // Live migration: a peer's VM moved away (never delivered; at most a registry lookup).
    if let Some(hint) = MovedHint::parse(datagram) {
        core.on_moved_hint(&hint, src);
        return Err(DropReason::RxMovedHint);
    }
    let d = Datagram {
        header,
        len: datagram.len(),
        inner_prefix: &rest[..rest.len().min(MIN_INNER)],
        src,
        prefix_len: core.net.prefix_len,
    };
    let acc = check_datagram_cached(&core.rx_ctx, &core.minter, tokens, &d, now)?;
    if acc.inner_len > mtu {
        return Err(DropReason::RxOversize);
    }
    if acc.options_len == 0 {
        return Ok((acc.inner_len, None));
    }
    if acc.options_len > MAX_OPTIONS {
        return Err(DropReason::RxMalformed);
    }
    let learned = parse_options(&rest[acc.inner_len..])?.map(|t| (acc.src_vm, src, t));
    Ok((acc.inner_len, learned))
}
