//! The per-queue-pair worker: TX (guest -> UDP) and RX (UDP -> guest) for one virtqueue pair and
//! its UDP socket. Runs on the vhost-user-backend worker thread of that pair.
//!
//! TX: pop a batch of chains, check them, build one `mmsghdr` per packet whose iovecs are
//! `[VNP header (local)] [inner packet (guest memory)] [options (local)]`, `sendmmsg`, then return
//! the chains. The payload is never copied, except into the pending queue when no token exists.
//!
//! RX: reserve guest RX buffers for a batch, `recvmmsg` with iovecs
//! `[VNP header (local)] [guest buffers, after room for the virtio-net + Ethernet headers]`, run
//! the receive checks on local copies of the headers, and only then write the virtio-net and
//! Ethernet headers and publish the used entries. Failed datagrams leave their buffers unpublished
//! (kept for the next datagram).

use std::collections::VecDeque;
use std::mem::size_of;
use std::net::SocketAddrV4;
use std::sync::Arc;
use std::time::Instant;

use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap};
use vnp_protocol::token::{Expiry, TokenFields};
use vnp_protocol::wire::options::ReturnToken;
use vnp_protocol::wire::{VnpRepr, HEADER_LEN};

use super::frame::{classify_tx, TxClass, CLASSIFY_PREFIX, ETHERTYPE_IPV4, ETH_HLEN};
use super::peers::{Enqueued, SendInfo};
use super::port::{unix_now, PortCore};
use super::rx_check::{check_datagram, parse_options};
use super::udp;
use crate::device::chain::{
    collect_rx_chain, collect_tx_chain, mark_dirty, push_iovecs, push_piece_iovecs, read_segs,
    write_segs, GuestSeg, HostPiece, RxBuf, MAX_RX_SEGS, MAX_TX_DESCRIPTORS,
};
use crate::device::features::rx_vnet_header;
use crate::metrics::counters::DropReason;

/// Guest memory as vnpd maps it: dirty-page logging ready for migration.
pub type GuestMem = GuestMemoryMmap<BitmapMmapRegion>;
/// A vring of the device.
pub type Vring = VringRwLock<GuestMemoryAtomic<GuestMem>>;

/// Packets per `sendmmsg`.
pub const TX_BATCH: usize = 32;
/// Datagrams per `recvmmsg`.
pub const RX_BATCH: usize = 32;
/// Per-round vectors of the RX path, kept between rounds (plain data only: no pointers).
#[derive(Debug, Default)]
struct RxScratch {
    slots: Vec<(usize, usize)>,
    bad_heads: Vec<u16>,
    segs: Vec<GuestSeg>,
    slot_segs: Vec<(usize, usize)>,
    headers: Vec<[u8; HEADER_LEN]>,
    names: Vec<libc::sockaddr_in>,
    iov_ranges: Vec<(usize, usize)>,
    payload_caps: Vec<usize>,
    used: Vec<bool>,
    publish: Vec<(u16, u32)>,
}

/// Fewest datagrams a `recvmmsg` is prepared for.
const MIN_RX_SLOTS: usize = 4;
/// Return tokens we mint are valid this long.
pub const RETURN_TOKEN_TTL_SECS: u32 = 600;
/// Longest option trailer we read from a datagram.
const MAX_OPTIONS: usize = 512;
/// Largest ARP/DHCP frame handed to the edge.
const MAX_EDGE_FRAME: usize = 1514;

struct TxMsg {
    header: [u8; HEADER_LEN],
    options: [u8; ReturnToken::WIRE_LEN],
    options_len: usize,
    name: libc::sockaddr_in,
    iov_start: usize,
    iov_end: usize,
    inner_len: usize,
}

/// State of one queue pair's worker.
pub struct PairWorker {
    core: Arc<PortCore>,
    pair: usize,
    vnet_hdr_len: usize,
    mrg_rxbuf: bool,
    /// The driver acked VHOST_F_LOG_ALL (migration in progress): log every guest write.
    log_dirty: bool,
    /// RX buffers taken from the avail ring but not used yet (returned on stop).
    held: VecDeque<RxBuf>,
    /// The socket had data but the guest had no buffers: resume when it adds some.
    rx_backlog: bool,
    /// A clone of the RX vring, to give held buffers back when the ring stops.
    rx_vring: Option<Vring>,
    tx_segs: Vec<GuestSeg>,
    tx_pieces: Vec<HostPiece>,
    tx_heads: Vec<u16>,
    tx_msgs: Vec<TxMsg>,
    tx_last_peer: Option<(std::net::Ipv4Addr, SendInfo)>,
    /// How many datagrams to prepare guest buffers for in the next `recvmmsg`: follows the
    /// recent arrival rate, so that a wake-up for one datagram does not map 32 buffers.
    rx_hint: usize,
    /// The guest memory snapshot the cached host addresses of `held` buffers point into; kept
    /// alive here so those addresses stay mapped.
    cached_mem: Option<Arc<GuestMem>>,
    rx_scratch: RxScratch,
}

impl std::fmt::Debug for PairWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PairWorker")
            .field("pair", &self.pair)
            .field("held", &self.held.len())
            .field("rx_backlog", &self.rx_backlog)
            .finish()
    }
}

impl PairWorker {
    /// A worker for queue pair `pair`.
    pub fn new(core: Arc<PortCore>, pair: usize) -> Self {
        Self {
            core,
            pair,
            vnet_hdr_len: 12,
            mrg_rxbuf: false,
            log_dirty: false,
            held: VecDeque::new(),
            rx_backlog: false,
            rx_vring: None,
            tx_segs: Vec::with_capacity(MAX_TX_DESCRIPTORS),
            tx_pieces: Vec::with_capacity(MAX_TX_DESCRIPTORS),
            tx_heads: Vec::with_capacity(TX_BATCH),
            tx_msgs: Vec::with_capacity(TX_BATCH),
            tx_last_peer: None,
            rx_hint: MIN_RX_SLOTS,
            cached_mem: None,
            rx_scratch: RxScratch::default(),
        }
    }

    /// Applies the features the driver acked.
    pub fn set_features(&mut self, vnet_hdr_len: usize, mrg_rxbuf: bool, log_dirty: bool) {
        self.vnet_hdr_len = vnet_hdr_len;
        self.mrg_rxbuf = mrg_rxbuf;
        self.log_dirty = log_dirty;
    }

    /// Makes `mem` the snapshot cached host addresses refer to; when guest memory was remapped,
    /// forgets every cached address (they are resolved again on use).
    pub fn sync_memory(&mut self, mem: &GuestMemoryLoadGuard<GuestMem>) {
        let current: *const GuestMem = &**mem;
        if self
            .cached_mem
            .as_ref()
            .is_some_and(|c| std::ptr::eq(Arc::as_ptr(c), current))
        {
            return;
        }
        for b in self.held.iter_mut() {
            b.unresolve();
        }
        self.cached_mem = Some(mem.clone().into_inner());
    }

    /// Forgets held buffers (device reset: the rings are gone).
    pub fn reset(&mut self) {
        self.held.clear();
        self.cached_mem = None;
        self.rx_backlog = false;
        self.rx_vring = None;
    }

    /// The RX ring is stopping (GET_VRING_BASE): complete held buffers with length 0 so the
    /// driver gets every buffer back.
    pub fn release_held(&mut self) {
        let Some(rx) = self.rx_vring.clone() else {
            self.held.clear();
            return;
        };
        if self.held.is_empty() {
            return;
        }
        {
            let mut state = rx.get_mut();
            for b in self.held.drain(..) {
                let _ = state.add_used(b.head, 0);
            }
        }
        let _ = rx.signal_used_queue();
    }

    /// Whether `mem` is the snapshot cached host addresses may point into.
    fn cached_is(&self, mem: &GuestMem) -> bool {
        self.cached_mem
            .as_ref()
            .is_some_and(|c| std::ptr::eq(Arc::as_ptr(c), mem))
    }

    fn socket(&self) -> &std::net::UdpSocket {
        &self.core.sockets[self.pair % self.core.sockets.len()]
    }

    fn ring_live(vring: &Vring) -> bool {
        let state = vring.get_ref();
        state.is_enabled() && state.get_queue().ready()
    }

    // ---------------------------------------------------------------- TX

    /// Handles a TX kick: sends everything the guest queued.
    pub fn run_tx(&mut self, mem: &GuestMem, rx: &Vring, tx: &Vring) {
        self.rx_vring.get_or_insert_with(|| rx.clone());
        loop {
            if !Self::ring_live(tx) {
                return;
            }
            let _ = tx.disable_notification();
            while self.tx_batch(mem, rx, tx) {}
            match tx.enable_notification() {
                Ok(true) => continue,
                _ => return,
            }
        }
    }

    /// One batch; returns true when the batch was full (more may be waiting).
    fn tx_batch(&mut self, mem: &GuestMem, rx: &Vring, tx: &Vring) -> bool {
        let now = unix_now();
        let mono = Instant::now();
        // Reused between batches (plain data); the last destination's send parameters are
        // remembered for this batch only (consecutive packets mostly go to the same peer).
        let mut heads = std::mem::take(&mut self.tx_heads);
        heads.clear();
        let mut msgs = std::mem::take(&mut self.tx_msgs);
        msgs.clear();
        self.tx_last_peer = None;
        let mut iovs: Vec<libc::iovec> = Vec::with_capacity(TX_BATCH * 4);
        let mut edge_frames: Vec<Vec<u8>> = Vec::new();
        {
            let mut state = tx.get_mut();
            let queue = state.get_queue_mut();
            while heads.len() < TX_BATCH {
                let Some(chain) = queue.pop_descriptor_chain(mem) else {
                    break;
                };
                heads.push(chain.head_index());
                match collect_tx_chain(chain, mem, &mut self.tx_segs, &mut self.tx_pieces) {
                    Ok(total) => self.tx_frame(
                        mem,
                        total,
                        now,
                        mono,
                        &mut msgs,
                        &mut iovs,
                        &mut edge_frames,
                    ),
                    Err(e) => {
                        log::debug!("vm {}: tx chain dropped: {e}", self.core.vm_id);
                        self.core.counters.drop_packet(DropReason::TxBadChain);
                    }
                }
            }
        }
        if heads.is_empty() {
            self.tx_heads = heads;
            self.tx_msgs = msgs;
            return false;
        }
        self.send_msgs(&mut msgs, &mut iovs);
        {
            let mut state = tx.get_mut();
            for head in &heads {
                let _ = state.add_used(*head, 0);
            }
        }
        if should_signal(tx, mem) {
            let _ = tx.signal_used_queue();
        }
        for frame in edge_frames {
            self.answer_edge(mem, rx, &frame);
        }
        let full = heads.len() == TX_BATCH;
        self.tx_heads = heads;
        self.tx_msgs = msgs;
        full
    }

    #[allow(clippy::too_many_arguments)]
    fn tx_frame(
        &mut self,
        mem: &GuestMem,
        total: usize,
        now: u32,
        mono: Instant,
        msgs: &mut Vec<TxMsg>,
        iovs: &mut Vec<libc::iovec>,
        edge_frames: &mut Vec<Vec<u8>>,
    ) {
        let core = &*self.core;
        let hdr = self.vnet_hdr_len;
        if total < hdr + ETH_HLEN {
            core.counters.drop_packet(DropReason::TxTruncatedHeader);
            return;
        }
        let frame_len = total - hdr;
        let mut prefix = [0u8; CLASSIFY_PREFIX];
        let want = frame_len.min(CLASSIFY_PREFIX);
        if read_segs(mem, &self.tx_segs, hdr, &mut prefix[..want]) != want {
            core.counters.drop_packet(DropReason::TxBadChain);
            return;
        }
        match classify_tx(&core.net, &prefix[..want], frame_len) {
            TxClass::Drop(reason) => core.counters.drop_packet(reason),
            TxClass::TooBig => {
                // Not forwarded; the edge answers with ICMP "fragmentation needed", which
                // quotes only the header prefix already in hand.
                core.counters.drop_packet(DropReason::TxOversize);
                edge_frames.push(prefix[..want].to_vec());
            }
            TxClass::Edge => {
                if frame_len > MAX_EDGE_FRAME {
                    core.counters.drop_packet(DropReason::TxEdgeRefused);
                    return;
                }
                let mut frame = vec![0u8; frame_len];
                if read_segs(mem, &self.tx_segs, hdr, &mut frame) == frame_len {
                    edge_frames.push(frame);
                } else {
                    core.counters.drop_packet(DropReason::TxBadChain);
                }
            }
            TxClass::Ipv4 { dst, total_len } => {
                // NAT hook (later issue): the source-port rewrite into the VM's port range
                // belongs here, before the inner packet is referenced by the iovecs; it will
                // need a private copy of the L4 header (the guest owns the original bytes).
                let inner_off = hdr + ETH_HLEN;
                let fits = total_len + ReturnToken::WIRE_LEN <= usize::from(core.net.mtu);
                let found = match self.tx_last_peer {
                    Some((last, info)) if last == dst => Some((info, false)),
                    _ => {
                        let view = core.peers.view();
                        let found = view
                            .get(dst, now)
                            .map(|e| (e.send_info(), fits && e.claim_return_token(now)));
                        drop(view);
                        found
                    }
                };
                if let Some((info, _)) = found {
                    self.tx_last_peer = Some((dst, info));
                }
                let (info, with_return) = match found {
                    Some(found) => found,
                    None => {
                        let segs = &self.tx_segs;
                        let outcome = core.peers.enqueue(dst, now, mono, || {
                            let mut copy = vec![0u8; total_len];
                            let got = read_segs(mem, segs, inner_off, &mut copy);
                            copy.truncate(got);
                            copy
                        });
                        match outcome {
                            // A token arrived between the lookup and the enqueue: send now.
                            Enqueued::Ready(info) => (info, false),
                            other => {
                                core.on_enqueued(dst, other);
                                return;
                            }
                        }
                    }
                };
                let mut msg = TxMsg {
                    header: [0; HEADER_LEN],
                    options: [0; ReturnToken::WIRE_LEN],
                    options_len: 0,
                    name: udp::sockaddr_in(info.endpoint),
                    iov_start: iovs.len(),
                    iov_end: 0,
                    inner_len: total_len,
                };
                if with_return {
                    msg.options_len = core
                        .return_token(info.endpoint, dst, now)
                        .emit(&mut msg.options)
                        .unwrap_or(0);
                }
                msg.header = VnpRepr {
                    network_id: core.network_id,
                    token: info.token,
                    expiry: info.expiry,
                    has_options: msg.options_len > 0,
                }
                .to_bytes();
                // Placeholder for the header iovec; pointed at msg.header once `msgs` is final.
                iovs.push(libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: HEADER_LEN,
                });
                let covered = push_piece_iovecs(&self.tx_pieces, inner_off, total_len, iovs);
                if covered != total_len {
                    iovs.truncate(msg.iov_start);
                    core.counters.drop_packet(DropReason::TxBadChain);
                    return;
                }
                if msg.options_len > 0 {
                    iovs.push(libc::iovec {
                        iov_base: std::ptr::null_mut(),
                        iov_len: msg.options_len,
                    });
                }
                msg.iov_end = iovs.len();
                msgs.push(msg);
            }
        }
    }

    fn send_msgs(&self, msgs: &mut [TxMsg], iovs: &mut [libc::iovec]) {
        if msgs.is_empty() {
            return;
        }
        let mut mmsgs: Vec<libc::mmsghdr> = Vec::with_capacity(msgs.len());
        for m in msgs.iter_mut() {
            iovs[m.iov_start].iov_base = m.header.as_mut_ptr().cast();
            if m.options_len > 0 {
                iovs[m.iov_end - 1].iov_base = m.options.as_mut_ptr().cast();
            }
            // SAFETY: mmsghdr is a plain C struct for which all-zero bytes is a valid value.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_name = (&mut m.name as *mut libc::sockaddr_in).cast();
            h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_hdr.msg_iov = iovs[m.iov_start..].as_mut_ptr();
            h.msg_hdr.msg_iovlen = m.iov_end - m.iov_start;
            mmsgs.push(h);
        }
        // SAFETY: every msg_name points into `msgs`, every msg_iov into `iovs`, both borrowed
        // for this whole call; the iovec bases point at `msgs` headers/options or into guest
        // memory mapped by `mem`, which the caller keeps alive (its guard outlives this call),
        // and each range was checked against the guest memory regions when collected.
        let (_, failed) = unsafe { udp::send_all(self.socket(), &mut mmsgs) };
        for (h, m) in mmsgs.iter().zip(msgs.iter()) {
            if h.msg_len > 0 {
                self.core.counters.tx(m.inner_len);
            }
        }
        if failed > 0 {
            self.core
                .counters
                .drop_packets(DropReason::TxSendError, failed as u64);
        }
    }

    // ---------------------------------------------------------------- edge

    fn answer_edge(&mut self, mem: &GuestMem, rx: &Vring, frame: &[u8]) {
        match self.core.edge_reply(frame) {
            Ok(Some(reply)) => {
                if self.deliver_frame(mem, rx, &reply) {
                    self.core.counters.edge_reply();
                } else {
                    self.core.counters.drop_packet(DropReason::RxNoBuffer);
                }
            }
            Ok(None) => {}
            Err(()) => self.core.counters.drop_packet(DropReason::TxEdgeRefused),
        }
    }

    /// Takes buffers (held first, then from the avail ring) until `need` bytes fit (one buffer
    /// without MRG_RXBUF). Returns false, keeping what it took in `held`, when there are not
    /// enough.
    fn reserve(
        &mut self,
        mem: &GuestMem,
        queue: &mut virtio_queue::Queue,
        bad_heads: &mut Vec<u16>,
        need: usize,
        out: &mut Vec<RxBuf>,
    ) -> bool {
        let start = out.len();
        let mut cap = 0usize;
        loop {
            let buf = match self.held.pop_front() {
                Some(b) => b,
                None => {
                    let Some(chain) = queue.pop_descriptor_chain(mem) else {
                        break;
                    };
                    let head = chain.head_index();
                    match collect_rx_chain(chain, mem) {
                        Ok(mut b) => {
                            if self.cached_is(mem) {
                                b.resolve(mem);
                            }
                            b
                        }
                        Err(e) => {
                            log::debug!("vm {}: rx chain unusable: {e}", self.core.vm_id);
                            self.core.counters.drop_packet(DropReason::RxBadChain);
                            bad_heads.push(head);
                            continue;
                        }
                    }
                }
            };
            cap += buf.cap as usize;
            out.push(buf);
            if !self.mrg_rxbuf || cap >= need {
                return true;
            }
        }
        for b in out.drain(start..).rev() {
            self.held.push_front(b);
        }
        false
    }

    /// Writes a locally generated Ethernet frame (edge reply) into the guest's RX queue.
    fn deliver_frame(&mut self, mem: &GuestMem, rx: &Vring, frame: &[u8]) -> bool {
        if !Self::ring_live(rx) {
            return false;
        }
        let hdr = self.vnet_hdr_len;
        let need = hdr + frame.len();
        let mut bufs = Vec::new();
        let mut bad = Vec::new();
        let delivered = {
            let mut state = rx.get_mut();
            let ok = self.reserve(mem, state.get_queue_mut(), &mut bad, need, &mut bufs);
            for h in &bad {
                let _ = state.add_used(*h, 0);
            }
            if ok {
                let segs: Vec<GuestSeg> =
                    bufs.iter().flat_map(|b| b.segs().iter().copied()).collect();
                let total_cap: usize = bufs.iter().map(|b| b.cap as usize).sum();
                if total_cap < need {
                    // Without MRG_RXBUF a single buffer must hold the frame.
                    self.held.extend(bufs.drain(..));
                    false
                } else {
                    let used = publish_plan(bufs.iter().map(|b| b.cap), need);
                    let vnet = rx_vnet_header(used.len() as u16);
                    write_segs(mem, &segs, 0, &vnet[..hdr]);
                    write_segs(mem, &segs, hdr, frame);
                    for (i, b) in bufs.iter().enumerate() {
                        match used.get(i) {
                            Some(len) => {
                                let _ = state.add_used(b.head, *len);
                            }
                            None => self.held.push_back(*b),
                        }
                    }
                    true
                }
            } else {
                false
            }
        };
        if (delivered || !bad.is_empty()) && should_signal(rx, mem) {
            let _ = rx.signal_used_queue();
        }
        delivered
    }

    // ---------------------------------------------------------------- RX

    /// Handles socket readiness or an RX kick: moves datagrams into the guest while both the
    /// socket has data and the guest has buffers.
    pub fn run_rx(&mut self, mem: &GuestMem, rx: &Vring) {
        self.rx_vring.get_or_insert_with(|| rx.clone());
        loop {
            if !Self::ring_live(rx) {
                // Datagrams stay in the socket buffer until the ring is enabled.
                self.rx_backlog = true;
                return;
            }
            let _ = rx.disable_notification();
            if self.rx_batches(mem, rx) {
                self.rx_backlog = false;
                return;
            }
            // Out of guest buffers with data left: ask the guest to kick when it adds some.
            self.rx_backlog = true;
            match rx.enable_notification() {
                Ok(true) => continue,
                _ => return,
            }
        }
    }

    /// Whether the socket had data the guest had no room for.
    pub fn rx_backlog(&self) -> bool {
        self.rx_backlog
    }

    /// Receives batches until the socket is empty (returns true) or the guest runs out of
    /// buffers (returns false).
    ///
    /// Buffers are assigned to datagram slots straight from the front of `held` (topped up from
    /// the avail ring), so a buffer that is not used this round stays where it is.
    fn rx_batches(&mut self, mem: &GuestMem, rx: &Vring) -> bool {
        // Scratch vectors are reused across rounds: a wake-up should not cost a dozen
        // allocations.
        let mut sc = std::mem::take(&mut self.rx_scratch);
        let drained = self.rx_rounds(mem, rx, &mut sc);
        self.rx_scratch = sc;
        drained
    }

    fn rx_rounds(&mut self, mem: &GuestMem, rx: &Vring, sc: &mut RxScratch) -> bool {
        let hdr = self.vnet_hdr_len;
        let off = hdr + ETH_HLEN;
        let need = off + usize::from(self.core.net.mtu);
        let cached = self.cached_is(mem);
        loop {
            let now = unix_now();
            // Slot i receives into held[slots[i].0..slots[i].1].
            let slots = &mut sc.slots;
            slots.clear();
            let bad_heads = &mut sc.bad_heads;
            bad_heads.clear();
            {
                let mut state = rx.get_mut();
                let mut next = 0usize;
                'slots: while slots.len() < self.rx_hint {
                    let start = next;
                    let mut cap = 0usize;
                    loop {
                        if next == self.held.len() {
                            let Some(chain) = state.get_queue_mut().pop_descriptor_chain(mem)
                            else {
                                break 'slots;
                            };
                            let head = chain.head_index();
                            match collect_rx_chain(chain, mem) {
                                Ok(mut b) => {
                                    if cached {
                                        b.resolve(mem);
                                    }
                                    self.held.push_back(b);
                                }
                                Err(e) => {
                                    log::debug!("vm {}: rx chain unusable: {e}", self.core.vm_id);
                                    self.core.counters.drop_packet(DropReason::RxBadChain);
                                    bad_heads.push(head);
                                    continue;
                                }
                            }
                        }
                        cap += self.held[next].cap as usize;
                        next += 1;
                        if !self.mrg_rxbuf || cap >= need {
                            break;
                        }
                    }
                    slots.push((start, next));
                }
                for h in bad_heads.iter() {
                    let _ = state.add_used(*h, 0);
                }
            }
            if !bad_heads.is_empty() && should_signal(rx, mem) {
                let _ = rx.signal_used_queue();
            }
            if slots.is_empty() {
                return false;
            }
            let n_slots = slots.len();
            // Flattened segments per slot (for header writes, reads and dirty logging).
            let segs = &mut sc.segs;
            segs.clear();
            let slot_segs = &mut sc.slot_segs;
            slot_segs.clear();
            for (s, e) in slots.iter() {
                let start = segs.len();
                for b in self.held.range(*s..*e) {
                    segs.extend_from_slice(b.segs());
                }
                slot_segs.push((start, segs.len()));
            }
            let headers = &mut sc.headers;
            headers.clear();
            headers.resize(n_slots, [0u8; HEADER_LEN]);
            let names = &mut sc.names;
            names.clear();
            // SAFETY: sockaddr_in is a plain C struct; all-zero is a valid value.
            names.resize(n_slots, unsafe { std::mem::zeroed() });
            let mut iovs: Vec<libc::iovec> = Vec::with_capacity(n_slots * 3);
            let iov_ranges = &mut sc.iov_ranges;
            iov_ranges.clear();
            let payload_caps = &mut sc.payload_caps;
            payload_caps.clear();
            for (i, (s, e)) in slot_segs.iter().enumerate() {
                let start = iovs.len();
                iovs.push(libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: HEADER_LEN,
                });
                let (bs, be) = slots[i];
                let resolved = cached && self.held.range(bs..be).all(|b| b.pieces().is_some());
                let covered = if resolved {
                    push_cached_iovecs(self.held.range(bs..be), off, &mut iovs)
                } else {
                    let cap: usize = segs[*s..*e].iter().map(|g| g.len as usize).sum();
                    let limit = start + 1 + MAX_RX_SEGS * 4;
                    let payload = cap.saturating_sub(off);
                    push_iovecs(mem, &segs[*s..*e], off, payload, &mut iovs, limit)
                };
                payload_caps.push(covered);
                iov_ranges.push((start, iovs.len()));
            }
            let mut mmsgs: Vec<libc::mmsghdr> = Vec::with_capacity(n_slots);
            for i in 0..n_slots {
                let (s, e) = iov_ranges[i];
                iovs[s].iov_base = headers[i].as_mut_ptr().cast();
                // SAFETY: mmsghdr is a plain C struct; all-zero is a valid value.
                let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
                h.msg_hdr.msg_name = (&mut names[i] as *mut libc::sockaddr_in).cast();
                h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
                h.msg_hdr.msg_iov = iovs[s..].as_mut_ptr();
                h.msg_hdr.msg_iovlen = e - s;
                mmsgs.push(h);
            }
            // SAFETY: names, headers and iovs live until after the call; the guest iovecs point
            // into buffers the driver gave the device for writing, checked against guest memory
            // when collected. They were resolved either just now from `mem` (kept alive by the
            // caller's guard) or, for cached pieces, from `cached_mem`, which is the same
            // snapshot (checked by `cached_is`) and is held by this worker.
            let received = match unsafe { udp::recv_batch(self.socket(), &mut mmsgs) } {
                Ok(n) => n,
                Err(e) => {
                    log::warn!("vm {}: recvmmsg: {e}", self.core.vm_id);
                    0
                }
            };

            // Which of the assigned buffers (held[0..assigned]) get published.
            let assigned = slots.last().map_or(0, |s| s.1);
            let used = &mut sc.used;
            used.clear();
            used.resize(assigned, false);
            let publish = &mut sc.publish;
            publish.clear();
            let mut learned = Vec::new();
            for i in 0..received.min(n_slots) {
                let (bs, be) = slots[i];
                let (ss, se) = slot_segs[i];
                let slot_seg = &segs[ss..se];
                let len = mmsgs[i].msg_len as usize;
                let flags = mmsgs[i].msg_hdr.msg_flags;
                if self.log_dirty {
                    // The kernel wrote these bytes behind vm-memory's back: log them for
                    // migration.
                    let written = len.saturating_sub(HEADER_LEN).min(payload_caps[i]);
                    mark_dirty(mem, slot_seg, off, written);
                }
                match self.accept(mem, slot_seg, &headers[i], len, flags, &names[i], now) {
                    Err(reason) => self.core.counters.drop_packet(reason),
                    Ok((inner_len, rt)) => {
                        let caps = self.held.range(bs..be).map(|b| b.cap);
                        let lens = publish_plan(caps, off + inner_len);
                        let mut head = [0u8; 12 + ETH_HLEN];
                        head[..hdr].copy_from_slice(&rx_vnet_header(lens.len() as u16)[..hdr]);
                        head[hdr..hdr + 6].copy_from_slice(&self.core.mac);
                        head[hdr + 6..hdr + 12].copy_from_slice(&self.core.router_mac);
                        head[hdr + 12..hdr + 14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
                        write_segs(mem, slot_seg, 0, &head[..off]);
                        for (j, l) in lens.iter().enumerate() {
                            publish.push((self.held[bs + j].head, *l));
                            used[bs + j] = true;
                        }
                        self.core.counters.rx(inner_len);
                        if let Some(rt) = rt {
                            learned.push(rt);
                        }
                    }
                }
            }
            // Drop the published buffers from `held`; the rest stay, in order.
            let prefix = used.iter().take_while(|u| **u).count();
            if used[prefix..].iter().any(|u| *u) {
                let mut i = 0usize;
                self.held.retain(|_| {
                    let keep = !used.get(i).copied().unwrap_or(false);
                    i += 1;
                    keep
                });
            } else {
                self.held.drain(..prefix);
            }
            if !publish.is_empty() {
                {
                    let mut state = rx.get_mut();
                    for (head, len) in publish.iter() {
                        let _ = state.add_used(*head, *len);
                    }
                }
                if should_signal(rx, mem) {
                    let _ = rx.signal_used_queue();
                }
            }
            for (src_vm, from, rt) in learned {
                self.core.learn_return_token(src_vm, from, rt, now);
            }
            // Prepare for twice what arrived: grows fast under load, shrinks when idle.
            self.rx_hint = (received * 2).clamp(MIN_RX_SLOTS, RX_BATCH);
            if received < n_slots {
                return true;
            }
        }
    }

    /// Checks one received datagram; on success returns the inner length and the return token
    /// it carried (with the sender's VM and underlay address).
    #[allow(clippy::type_complexity, clippy::too_many_arguments)]
    fn accept(
        &self,
        mem: &GuestMem,
        segs: &[GuestSeg],
        header: &[u8; HEADER_LEN],
        len: usize,
        flags: libc::c_int,
        name: &libc::sockaddr_in,
        now: u32,
    ) -> Result<
        (
            usize,
            Option<(std::net::Ipv4Addr, SocketAddrV4, ReturnToken)>,
        ),
        DropReason,
    > {
        if flags & libc::MSG_TRUNC != 0 {
            return Err(DropReason::RxOversize);
        }
        let src = udp::from_sockaddr_in(name).ok_or(DropReason::RxMalformed)?;
        if len < HEADER_LEN {
            return Err(DropReason::RxTruncated);
        }
        let off = self.vnet_hdr_len + ETH_HLEN;
        // Checks run on local copies: the guest can write its RX buffers at any time.
        let mut ip = [0u8; 20];
        let want = (len - HEADER_LEN).min(20);
        let got = read_segs(mem, segs, off, &mut ip[..want]);
        let acc = check_datagram(
            &self.core.rx_ctx,
            &self.core.minter,
            header,
            len,
            &ip[..got],
            src,
            now,
        )?;
        let mut rt = None;
        if acc.options_len > 0 {
            if acc.options_len > MAX_OPTIONS {
                return Err(DropReason::RxMalformed);
            }
            let mut opts = [0u8; MAX_OPTIONS];
            let o = &mut opts[..acc.options_len];
            if read_segs(mem, segs, off + acc.inner_len, o) != acc.options_len {
                return Err(DropReason::RxTruncated);
            }
            rt = parse_options(o)?.map(|t| (acc.src_vm, src, t));
        }
        Ok((acc.inner_len, rt))
    }
}

/// Appends iovecs for the bytes after `skip` of `bufs` from their cached host pieces; returns
/// the bytes covered.
fn push_cached_iovecs<'a>(
    bufs: impl Iterator<Item = &'a RxBuf>,
    mut skip: usize,
    iovs: &mut Vec<libc::iovec>,
) -> usize {
    let mut covered = 0usize;
    for piece in bufs.flat_map(|b| b.pieces().unwrap_or(&[]).iter()) {
        let len = piece.len as usize;
        if skip >= len {
            skip -= len;
            continue;
        }
        iovs.push(libc::iovec {
            iov_base: (piece.addr + skip) as *mut libc::c_void,
            iov_len: len - skip,
        });
        covered += len - skip;
        skip = 0;
    }
    covered
}

/// Whether the driver wants an interrupt for the used entries just added. With EVENT_IDX this
/// is virtio-queue's `used_event` check; without it, virtio-queue ignores the driver's
/// `VRING_AVAIL_F_NO_INTERRUPT` flag, which polling drivers (DPDK) set: honouring it saves an
/// eventfd write per batch.
fn should_signal(vring: &Vring, mem: &GuestMem) -> bool {
    let mut state = vring.get_mut();
    let queue = state.get_queue_mut();
    if queue.event_idx_enabled() {
        return queue.needs_notification(mem).unwrap_or(true);
    }
    // The used ring writes must be visible before we read the driver's flag.
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    let flags: u16 = mem
        .load(
            GuestAddress(queue.avail_ring()),
            std::sync::atomic::Ordering::Acquire,
        )
        .map(u16::from_le)
        .unwrap_or(0);
    flags & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0
}

/// How many bytes each buffer of a received frame holds: fills buffers in order until `frame`
/// bytes are placed. Buffers beyond the returned length stay unused.
pub fn publish_plan(caps: impl Iterator<Item = u32>, frame: usize) -> Vec<u32> {
    let mut left = frame;
    let mut used = Vec::new();
    for cap in caps {
        if left == 0 {
            break;
        }
        let take = left.min(cap as usize);
        used.push(take as u32);
        left -= take;
    }
    used
}

/// Fields of the return token for packets from peer VM `peer_vm` (behind `peer`) to our VM.
pub fn return_token_fields(
    peer: SocketAddrV4,
    peer_vm: std::net::Ipv4Addr,
    local: SocketAddrV4,
    vm_ip: std::net::Ipv4Addr,
    network_id: u32,
    expiry: Expiry,
) -> TokenFields {
    TokenFields {
        src_host: *peer.ip(),
        src_port: peer.port(),
        src_vm: peer_vm,
        dst_host: *local.ip(),
        dst_port: local.port(),
        dst_vm: vm_ip,
        network_id,
        expiry,
    }
}
