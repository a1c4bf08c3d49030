//! TX, guest -> VNP/UDP: the TX half of [`PairWorker`].
//!
//! On a TX kick the worker pops up to [`TX_BATCH`] chains; per chain it reads the first bytes
//! of the frame into a local buffer, classifies it ([`classify_tx`], the one place a TX frame's
//! class is dispatched) and either encapsulates it (a message of the batch whose iovecs are
//! `[VNP header (local)] [inner packet (guest memory)] [return-token option (local)]`: the
//! payload is never copied), copies it into the destination's pending queue (no token yet),
//! keeps a copy for the edge (ARP, DHCP) or drops it (counted). Then: packets handed to this
//! worker go first, one `sendmmsg` sends the batch, the chains go back to the guest, and the
//! edge replies are delivered.

use std::net::Ipv4Addr;
use std::time::Instant;

use vhost_user_backend::VringT;
use virtio_queue::QueueT;
use vm_memory::bitmap::Bitmap;
use vm_memory::GuestMemoryMmap;
use vnp_protocol::wire::options::ReturnToken;
use vnp_protocol::wire::VnpRepr;

use super::frame::{classify_tx, TxClass, CLASSIFY_PREFIX, ETH_HLEN};
use super::nat_hook::{is_outside, NatHead, OUTSIDE};
use super::peers::{Enqueued, SendInfo};
use super::port::unix_now;
use super::udp;
use super::worker::{PairWorker, Side, TX_BATCH};
use crate::metrics::counters::DropReason;
use crate::ring::memory::with_ring_mem;
use crate::ring::park::{avail_index_jump, head_out_of_range};
use crate::ring::vring::notify;
use crate::ring::{DescTable, GuestView, UsedRing, Vring};

/// Largest ARP/DHCP frame handed to the edge.
const MAX_EDGE_FRAME: usize = 1514;

/// The clocks of one batch.
#[derive(Debug, Clone, Copy)]
pub(super) struct Now {
    /// Unix seconds (token expiries).
    pub(super) unix: u32,
    /// Monotonic (pending-queue retries).
    pub(super) mono: Instant,
}

impl PairWorker {
    /// Handles a TX kick: sends everything the guest queued.
    pub(super) fn run_tx(&mut self, view: GuestView<'_>, rx: &Vring, tx: &Vring) {
        loop {
            if !self.in_service(Side::Tx, tx, view.mem()) {
                return;
            }
            let _ = tx.disable_notification();
            while self.tx_batch(view, rx, tx) {}
            if self.is_parked(Side::Tx) {
                // A broken ring always "has work": re-enabling would loop forever.
                return;
            }
            match tx.enable_notification() {
                Ok(true) => continue,
                _ => return,
            }
        }
    }

    /// One batch; returns true when the batch was full (more may be waiting).
    fn tx_batch(&mut self, view: GuestView<'_>, rx: &Vring, tx: &Vring) -> bool {
        let now = Now {
            unix: unix_now(),
            mono: Instant::now(),
        };
        self.tx_heads.clear();
        self.tx_batch.clear();
        self.tx_edge.clear();
        self.nat_scratch.clear_batch();
        self.tx_last_peer = None;
        self.pop_tx_chains(view, tx, now);
        if self.tx_heads.is_empty() {
            return false;
        }
        // Packets that waited for a token leave before anything of this batch (see handoff).
        self.send_handed_off(false);
        // At most one of the two holds messages: adding to one flushes the other (order).
        self.send_tx_batch();
        self.send_offload_batch();
        with_ring_mem!(view, |mem| {
            let mut state = tx.get_mut();
            let queue = state.get_queue_mut();
            let heads = self.tx_heads.iter().map(|head| (*head, 0));
            match view.plain().and_then(|plain| UsedRing::of(queue, plain)) {
                Some(ring) => {
                    ring.add(queue, heads);
                }
                None => heads.for_each(|(head, len)| {
                    let _ = queue.add_used(mem, head, len);
                }),
            }
            drop(state);
            notify(tx, mem);
        });
        let mut edge = std::mem::take(&mut self.tx_edge);
        for frame in edge.drain(..) {
            self.answer_edge(view, rx, &frame);
        }
        self.tx_edge = edge;
        self.deliver_nat_answers(view, rx);
        self.tx_heads.len() == TX_BATCH
    }

    /// Pops up to a batch of chains and handles each frame; parks the ring when the guest
    /// broke it.
    fn pop_tx_chains(&mut self, view: GuestView<'_>, tx: &Vring, now: Now) {
        with_ring_mem!(view, |mem| self.pop_tx_chains_in(view, mem, tx, now));
    }

    /// [`Self::pop_tx_chains`] with ring accesses through `mem` (`view`'s snapshot, with or
    /// without dirty bitmap).
    fn pop_tx_chains_in<B: Bitmap + 'static>(
        &mut self,
        view: GuestView<'_>,
        mem: &GuestMemoryMmap<B>,
        tx: &Vring,
        now: Now,
    ) {
        let mut state = tx.get_mut();
        let queue = state.get_queue_mut();
        let table = DescTable::of(queue, self.features.indirect_desc, mem);
        while self.tx_heads.len() < TX_BATCH {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                if let Some(fault) = avail_index_jump(queue, mem) {
                    self.park(Side::Tx, fault, queue);
                }
                break;
            };
            if let Some(fault) = head_out_of_range(queue, chain.head_index()) {
                // No descriptor to give back: the used ring cannot stay in step.
                self.park(Side::Tx, fault, queue);
                break;
            }
            self.tx_heads.push(chain.head_index());
            match self.tx_chain.collect(chain, table, mem) {
                Ok(_) => self.tx_frame(view, now),
                Err(e) => {
                    log::debug!("vm {}: tx chain dropped: {e}", self.core.vm_id);
                    self.core.counters.drop_packet(DropReason::TxBadChain);
                }
            }
        }
    }

    /// Classifies the frame in `self.tx_chain` and acts on its class.
    fn tx_frame(&mut self, view: GuestView<'_>, now: Now) {
        let hdr = self.features.vnet_hdr_len;
        let total = self.tx_chain.len();
        if total < hdr + ETH_HLEN {
            self.core
                .counters
                .drop_packet(DropReason::TxTruncatedHeader);
            return;
        }
        let frame_len = total - hdr;
        // One read for the virtio-net header and the frame's first bytes (local copies: the
        // guest can change its buffers at any time).
        let mut head = [0u8; 12 + CLASSIFY_PREFIX];
        let want = frame_len.min(CLASSIFY_PREFIX);
        // SAFETY: the chain was collected in this pass from `view`'s snapshot, alive for it.
        let got = unsafe { self.tx_chain.read_host(0, &mut head[..hdr + want]) };
        if got != hdr + want {
            self.core.counters.drop_packet(DropReason::TxBadChain);
            return;
        }
        // flags and gso_type: a checksum left to fill in or a super-packet (validated there).
        if head[0] != 0 || head[1] != 0 {
            self.tx_offloaded(view, frame_len, now);
            return;
        }
        let prefix = &head[hdr..hdr + want];
        match classify_tx(&self.core.net, prefix, frame_len) {
            TxClass::Drop(reason) => self.core.counters.drop_packet(reason),
            TxClass::TooBig => {
                // Not forwarded; the edge answers with ICMP "fragmentation needed", which
                // quotes only the header prefix already in hand.
                self.core.counters.drop_packet(DropReason::TxOversize);
                self.tx_edge.push(prefix.to_vec());
            }
            TxClass::Edge => self.copy_for_edge(view, frame_len),
            TxClass::Bridge { total_len } => self.copy_for_bridge(view, total_len),
            TxClass::Ipv4 { dst, total_len } => self.encapsulate(view, dst, total_len, now),
        }
    }

    /// Keeps a copy of an ARP/DHCP frame, answered after the batch is sent.
    pub(super) fn copy_for_edge(&mut self, view: GuestView<'_>, frame_len: usize) {
        if frame_len > MAX_EDGE_FRAME {
            self.core.counters.drop_packet(DropReason::TxEdgeRefused);
            return;
        }
        let mut frame = vec![0u8; frame_len];
        let hdr = self.features.vnet_hdr_len;
        if view.read(self.tx_chain.segs(), hdr, &mut frame) == frame_len {
            self.tx_edge.push(frame);
        } else {
            self.core.counters.drop_packet(DropReason::TxBadChain);
        }
    }

    /// Hands a copy of a packet to the metadata address to the VM's service bridge.
    pub(super) fn copy_for_bridge(&mut self, view: GuestView<'_>, total_len: usize) {
        let mut packet = vec![0u8; total_len];
        let inner = self.inner_offset();
        if view.read(self.tx_chain.segs(), inner, &mut packet) != total_len {
            self.core.counters.drop_packet(DropReason::TxBadChain);
        } else if !self.core.to_bridge(packet) {
            self.core.counters.drop_packet(DropReason::TxBridgeRefused);
        }
    }

    /// Adds the inner packet (`total_len` bytes after the Ethernet header) to the batch, or
    /// queues a copy when there is no token for `dst` yet.
    fn encapsulate(&mut self, view: GuestView<'_>, dst: Ipv4Addr, total_len: usize, now: Now) {
        let inner = self.features.vnet_hdr_len + ETH_HLEN;
        // Off-network: NAT on a copy of the headers, to the gateway (`nat_hook`).
        let nat = if is_outside(&self.core.net, dst) {
            match self.nat_outbound(view, inner, total_len) {
                Some(head) => Some(head),
                None => return,
            }
        } else {
            None
        };
        let peer = if nat.is_some() { OUTSIDE } else { dst };
        let head = nat.as_ref().map(NatHead::as_slice);
        // A reply on an inbound flow follows the gateway the flow came in through (nat_hook).
        let followed = self.reply_gateway(nat.and_then(|h| h.via), now.unix);
        let found = match followed {
            Some(info) => Some((info, false)),
            None => self.peer_or_queue(view, peer, total_len, now, head),
        };
        let Some((info, with_return)) = found else {
            return;
        };
        // Packets of one TX queue leave in order: offloaded ones added before go first.
        if !self.tx_offload.is_empty() {
            self.send_handed_off(false);
            self.send_offload_batch();
        }
        let core = &*self.core;
        let batch = &mut self.tx_batch;
        let msg = batch.open(udp::sockaddr_in(info.endpoint));
        msg.tag = total_len;
        if with_return {
            msg.tail_len = core
                .return_token(info.endpoint, peer, now.unix)
                .emit(&mut msg.tail)
                .unwrap_or(0);
        }
        msg.head = VnpRepr {
            network_id: core.network_id,
            token: info.token,
            expiry: info.expiry,
            has_options: msg.tail_len > 0,
        }
        .to_bytes();
        let mut covered = 0;
        if let Some(head) = &nat {
            let Some(iov) = self.nat_scratch.keep(head) else {
                batch.abandon();
                core.counters.drop_packet(DropReason::TxBadChain);
                return;
            };
            batch.guest_iovecs().push(iov);
            covered = head.len;
        }
        covered +=
            self.tx_chain
                .push_iovecs(inner + covered, total_len - covered, batch.guest_iovecs());
        if covered == total_len {
            batch.close(total_len);
        } else {
            batch.abandon();
            core.counters.drop_packet(DropReason::TxBadChain);
        }
    }

    /// The send parameters for `dst` and whether this packet carries a return token; `None`
    /// when the packet was queued for a token (or dropped, counted). A queued copy starts with
    /// `nat_head` when NAT rewrote the headers.
    fn peer_or_queue(
        &mut self,
        view: GuestView<'_>,
        dst: Ipv4Addr,
        total_len: usize,
        now: Now,
        nat_head: Option<&[u8]>,
    ) -> Option<(SendInfo, bool)> {
        if let Some(found) = self.known_peer(dst, total_len, true, now) {
            return Some(found);
        }
        let core = &*self.core;
        let inner = self.features.vnet_hdr_len + ETH_HLEN;
        let segs = self.tx_chain.segs();
        let outcome = core.peers.enqueue(dst, self.pair, now.unix, now.mono, || {
            let mut copy = vec![0u8; total_len];
            let got = view.read(segs, inner, &mut copy);
            copy.truncate(got);
            if let Some(h) = nat_head {
                // Never a NATed packet with the guest's own headers (the chain cannot be
                // shorter than when its headers were read; this only guards it).
                match copy.get_mut(..h.len()) {
                    Some(head) => head.copy_from_slice(h),
                    None => copy.clear(),
                }
            }
            copy
        });
        match outcome {
            // A token arrived between the lookup and the enqueue: send now.
            Enqueued::Ready(info) => Some((info, false)),
            other => {
                core.on_enqueued(dst, other);
                None
            }
        }
    }

    /// The send parameters for `dst` if there is a usable token, and whether this packet
    /// carries a return token (only when `may_carry_option` and it fits).
    pub(super) fn known_peer(
        &mut self,
        dst: Ipv4Addr,
        total_len: usize,
        may_carry_option: bool,
        now: Now,
    ) -> Option<(SendInfo, bool)> {
        if let Some((last, info)) = self.tx_last_peer {
            if last == dst {
                return Some((info, false));
            }
        }
        let core = &*self.core;
        // The option must still fit the guest MTU, so the outer datagram fits the underlay.
        let fits =
            may_carry_option && total_len + ReturnToken::WIRE_LEN <= usize::from(core.net.mtu);
        let found = core
            .peers
            .view()
            .get(dst, now.unix)
            .map(|e| (e.send_info(), fits && e.claim_return_token(now.unix)));
        if let Some((info, _)) = found {
            self.tx_last_peer = Some((dst, info));
        }
        found
    }

    /// One `sendmmsg` for the batch; counts what the kernel took and refused.
    pub(super) fn send_tx_batch(&mut self) {
        if self.tx_batch.is_empty() {
            return;
        }
        let socket = &self.core.sockets[self.pair % self.core.sockets.len()];
        let mmsgs = self.tx_batch.prepare();
        // SAFETY: every pointer in `mmsgs` points into `self.tx_batch` (addresses, headers,
        // options, iovec arrays), borrowed for this whole call, into `self.nat_scratch`'s boxed
        // header copies (kept until the next batch clears them; the box never moves), or into
        // guest memory through
        // the iovecs of `self.tx_chain` collections: host addresses in the snapshot the pass's
        // `GuestView` holds alive (the device's guard outlives this call), each range checked
        // against the guest's memory regions when its chain was collected.
        let (_, failed) = unsafe { udp::send_all(socket, mmsgs) };
        // Counted once per batch: two shared atomic additions, not two per packet.
        let (mut packets, mut bytes) = (0u64, 0u64);
        for (i, m) in self.tx_batch.msgs().iter().enumerate() {
            if self.tx_batch.result(i).0 > 0 {
                packets += 1;
                bytes += m.tag as u64;
            }
        }
        if packets > 0 {
            self.core.counters.tx_many(packets, bytes);
        }
        if failed > 0 {
            self.core
                .counters
                .drop_packets(DropReason::TxSendError, failed as u64);
        }
    }
}
