//! The descriptor-chain target: a hostile guest's split virtqueue, walked by vnpd's ring engine
//! (`vnpd::ring`) exactly as the TX and RX paths walk it: pop a chain, check the ring-wide faults
//! (`ring::park`: `avail->idx` jump, head out of range), collect the chain (`TxChain::collect`,
//! `collect_rx_chain`) or let the RX pool take chains, assign them to frames, accept some and
//! commit them to the used ring (`RxPool`).
//!
//! Guest memory is three `GuestMemoryMmap` regions, reused from input to input: two adjacent ones
//! (a range may straddle their boundary and must be split into two host pieces) and one after a
//! 4 KiB gap (a range into the gap is outside guest memory). The queue's descriptor table, avail
//! ring, used ring and an area for indirect tables are written from the input; everything the
//! input does not give is zero, so every input replays the same way.
//!
//! Input (little endian): `mode`, `size_log2` (queue size `1 << (size_log2 % 9)`, 1 to 256),
//! `next_avail: u16` (the device's position; the used ring starts there too), `pending` (the
//! driver's `avail->idx` is `next_avail + pending`, or `next_avail - pending` with [`BEHIND`]),
//! `heads` (how many avail entries follow), `descs` (how many descriptors follow), `frames`,
//! `frame_bytes: u16` (RX pool only), then `heads` avail entries (`u16`, from position
//! `next_avail`; the rest of the avail ring holds each position's own index), `descs` raw
//! 16-byte descriptors (table entries from 0; the rest are zero), and the remaining bytes as the
//! indirect area at [`INDIRECT_AT`].
//!
//! Invariants asserted: nothing panics; a collected chain's segments lie inside guest memory, add
//! up to its length, and its iovecs (host pieces) cover exactly that length inside vnpd's mapping
//! of guest memory; a TX chain has at most `MAX_TX_DESCRIPTORS` descriptors, an RX buffer at most
//! `MAX_RX_SEGS` segments from at most `MAX_RX_DESCRIPTORS` descriptors; whether a chain is
//! accepted, and its segments, agree with a model of the virtio walk (`model`), in particular an
//! indirect table is followed only when `VIRTIO_RING_F_INDIRECT_DESC` was negotiated; a ring
//! whose `avail->idx` jumped is reported (once, nothing popped) and so is a head out of range,
//! the parked ring stays parked until the driver resets it; every chain popped is given back in
//! the used ring exactly once, with no more bytes than its buffer holds.

use std::num::Wrapping;
use std::ops::Range;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vnpd::ring::chain::{collect_rx_chain, RxBuf, MAX_RX_SEGS, MAX_TX_DESCRIPTORS};
use vnpd::ring::park::{avail_index_jump, head_out_of_range};
use vnpd::ring::{ChainError, DescTable, GuestMem, GuestSeg, GuestView, ParkedRing, RingFault};
use vnpd::ring::{RxPool, TxChain};

use crate::chain_model::{self as model, Expect, Walk};

/// Mode bit: the RX side (device-writable buffers); otherwise TX.
pub const RX: u8 = 0x01;
/// Mode bit: `VIRTIO_RING_F_INDIRECT_DESC` was negotiated.
pub const INDIRECT: u8 = 0x02;
/// Mode bit (RX): chains go through the RX pool (assign, accept, commit) rather than one by one.
pub const POOL: u8 = 0x04;
/// Mode bit (RX pool): `VIRTIO_NET_F_MRG_RXBUF`, a frame may span several chains.
pub const MERGEABLE: u8 = 0x08;
/// Mode bit: descriptor addresses are folded into guest memory (plus the gap and a little
/// beyond) and lengths below 16 KiB, so that most descriptors point at real memory.
pub const FOLD: u8 = 0x10;
/// Mode bit: the descriptor table straddles the boundary of the two adjacent regions.
pub const STRADDLE: u8 = 0x20;
/// Mode bit: the driver's `avail->idx` is *behind* the device's position.
pub const BEHIND: u8 = 0x40;

/// The guest memory regions `(start, len)`: two adjacent, then one after a gap.
pub const REGIONS: [(u64, usize); 3] = [(0, 0x8000), (0x8000, 0x8000), (0x1_1000, 0x3000)];
/// Where the descriptor table lies (unless [`STRADDLE`]).
pub const DESC_TABLE_AT: u64 = 0;
/// Where the avail ring lies.
pub const AVAIL_AT: u64 = 0x1000;
/// Where the used ring lies.
pub const USED_AT: u64 = 0x2000;
/// Where the indirect area (the input's tail) lies.
pub const INDIRECT_AT: u64 = 0x3000;
/// Size of the indirect area.
pub const INDIRECT_LEN: usize = 0x1000;
/// The end of the straddling descriptor table's neighbourhood, zeroed with the rest.
const STRADDLE_AREA: Range<u64> = 0x7000..0x9000;
/// Folded addresses fall below this (guest memory, the gap, and 4 KiB beyond the end).
const FOLD_SPAN: u64 = 0x1_5000;
/// Folded lengths fall below this.
const FOLD_LEN: u32 = 0x4000;
/// Largest queue size (the device's maximum).
const MAX_QUEUE: u16 = 256;
/// Bytes before the avail entries.
const HEADER_LEN: usize = 10;

/// The parsed input header.
#[derive(Debug, Clone, Copy)]
struct Setup {
    mode: u8,
    size: u16,
    next_avail: u16,
    avail_idx: u16,
    heads: usize,
    descs: usize,
    frames: usize,
    frame_bytes: usize,
}

impl Setup {
    fn parse(data: &[u8]) -> Option<Self> {
        let h = data.get(..HEADER_LEN)?;
        let mode = h[0];
        let size = 1u16 << (h[1] % 9);
        let next_avail = u16::from_le_bytes([h[2], h[3]]);
        let pending = u16::from(h[4]);
        let avail_idx = if mode & BEHIND != 0 {
            next_avail.wrapping_sub(pending)
        } else {
            next_avail.wrapping_add(pending)
        };
        Some(Self {
            mode,
            size,
            next_avail,
            avail_idx,
            heads: usize::from(h[5]),
            descs: usize::from(h[6]).min(usize::from(size)),
            frames: usize::from(h[7] % 64) + 1,
            frame_bytes: usize::from(u16::from_le_bytes([h[8], h[9]])),
        })
    }

    fn has(&self, bit: u8) -> bool {
        self.mode & bit != 0
    }

    fn desc_table(&self) -> u64 {
        if self.has(STRADDLE) && self.size > 1 {
            // Half the table on each side of the boundary at 0x8000 (16-byte aligned).
            0x8000 - u64::from(self.size) * 8
        } else {
            DESC_TABLE_AT
        }
    }

    /// Whether the driver published more than a ring's worth of chains (a broken ring).
    fn jumped(&self) -> bool {
        (Wrapping(self.avail_idx) - Wrapping(self.next_avail)).0 > self.size
    }

    fn pending(&self) -> u16 {
        (Wrapping(self.avail_idx) - Wrapping(self.next_avail)).0
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let Some(setup) = Setup::parse(data) else {
        return;
    };
    MEMORY.with(|mem| {
        let mut queue = lay_out(mem, &setup, &data[HEADER_LEN..]);
        let view = GuestView::new(mem, false);
        if setup.has(RX) && setup.has(POOL) {
            walk_pool(view, &mut queue, &setup);
        } else {
            walk_one_by_one(view, &mut queue, &setup);
        }
    });
}

thread_local! {
    static MEMORY: Arc<GuestMem> = Arc::new(
        GuestMemoryMmap::from_ranges(
            &REGIONS.map(|(start, len)| (GuestAddress(start), len)),
        )
        .expect("guest memory"),
    );
}

/// Whether `addr..addr + len` lies inside guest memory (the two adjacent regions count as one
/// range). The target's own oracle, independent of vm-memory's region lookups.
pub fn in_guest_memory(addr: u64, len: u64) -> bool {
    let Some(end) = addr.checked_add(len) else {
        return false;
    };
    let (first, second, third) = (REGIONS[0], REGIONS[1], REGIONS[2]);
    let adjacent_end = second.0 + second.1 as u64;
    debug_assert_eq!(first.0 + first.1 as u64, second.0);
    (addr >= first.0 && end <= adjacent_end) || (addr >= third.0 && end <= third.0 + third.1 as u64)
}

/// Zeroes the queue area and writes the rings and tables from `rest`; returns the device's
/// queue, set up as the frontend's `SET_VRING_*` messages would.
fn lay_out(mem: &GuestMem, setup: &Setup, rest: &[u8]) -> Queue {
    static ZERO: [u8; 0x4000] = [0; 0x4000];
    mem.write_slice(&ZERO, GuestAddress(0)).expect("zero");
    mem.write_slice(
        &ZERO[..(STRADDLE_AREA.end - STRADDLE_AREA.start) as usize],
        GuestAddress(STRADDLE_AREA.start),
    )
    .expect("zero");
    let size = setup.size;
    let (heads, rest) = rest.split_at((setup.heads * 2).min(rest.len()));
    // The avail ring: every position holds its own index unless the input says otherwise.
    for pos in 0..size {
        put_u16(mem, AVAIL_AT + 4 + 2 * u64::from(pos), pos);
    }
    for (k, head) in heads.chunks_exact(2).enumerate() {
        let pos = (usize::from(setup.next_avail) + k) % usize::from(size);
        let head = u16::from_le_bytes([head[0], head[1]]);
        put_u16(mem, AVAIL_AT + 4 + 2 * pos as u64, head);
    }
    put_u16(mem, AVAIL_AT + 2, setup.avail_idx);
    put_u16(mem, USED_AT + 2, setup.next_avail);
    let (descs, indirect) = rest.split_at((setup.descs * 16).min(rest.len()));
    write_descs(mem, setup, setup.desc_table(), descs);
    let indirect = &indirect[..indirect.len().min(INDIRECT_LEN)];
    write_descs(mem, setup, INDIRECT_AT, indirect);
    queue(mem, setup)
}

/// Writes raw descriptors at `at`, folded when the mode says so; a partial last one as is.
fn write_descs(mem: &GuestMem, setup: &Setup, at: u64, bytes: &[u8]) {
    for (i, raw) in bytes.chunks(16).enumerate() {
        let mut d = [0u8; 16];
        d[..raw.len()].copy_from_slice(raw);
        if setup.has(FOLD) && raw.len() == 16 {
            let addr = u64::from_le_bytes(d[..8].try_into().expect("8 bytes")) % FOLD_SPAN;
            let len = u32::from_le_bytes(d[8..12].try_into().expect("4 bytes")) % FOLD_LEN;
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
        }
        mem.write_slice(&d[..raw.len()], GuestAddress(at + 16 * i as u64))
            .expect("inside guest memory");
    }
}

fn put_u16(mem: &GuestMem, at: u64, value: u16) {
    mem.write_obj(value.to_le(), GuestAddress(at))
        .expect("inside guest memory");
}

fn get_u16(mem: &GuestMem, at: u64) -> u16 {
    u16::from_le(mem.read_obj(GuestAddress(at)).expect("inside guest memory"))
}

fn queue(mem: &GuestMem, setup: &Setup) -> Queue {
    let mut q = Queue::new(MAX_QUEUE).expect("queue");
    q.set_size(setup.size);
    let table = setup.desc_table();
    q.set_desc_table_address(Some(table as u32), Some((table >> 32) as u32));
    q.set_avail_ring_address(Some(AVAIL_AT as u32), Some(0));
    q.set_used_ring_address(Some(USED_AT as u32), Some(0));
    q.set_next_avail(setup.next_avail);
    q.set_next_used(setup.next_avail);
    q.set_ready(true);
    assert!(q.is_valid(mem), "the target's own queue layout is valid");
    q
}

/// What the walk saw, for the ring-level checks.
#[derive(Debug, Default)]
struct Popped {
    chains: u16,
    /// Chains given back in the used ring (each popped chain with a head in range).
    used: u16,
    fault: Option<RingFault>,
}

/// The TX path (`pop_tx_chains`), or RX one chain at a time: pop, check the ring, collect.
fn walk_one_by_one(view: GuestView<'_>, queue: &mut Queue, setup: &Setup) {
    let mem = view.mem();
    let table = DescTable::of(queue, setup.has(INDIRECT), mem);
    let mut tx = TxChain::new();
    let mut seen = Popped::default();
    loop {
        let position = queue.next_avail();
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            seen.fault = avail_index_jump(queue, mem);
            break;
        };
        seen.chains += 1;
        assert!(
            seen.chains <= setup.size,
            "more chains popped than the ring holds"
        );
        let head = chain.head_index();
        let slot = AVAIL_AT + 4 + 2 * u64::from(position % setup.size);
        assert_eq!(head, get_u16(mem, slot), "the head the driver published");
        if let Some(fault) = head_out_of_range(queue, head) {
            seen.fault = Some(fault);
            break;
        }
        assert!(head < setup.size, "head {head} in range");
        let walk = Walk::of(mem, setup.desc_table(), setup.size, head);
        if setup.has(RX) {
            let got = collect_rx_chain(chain, table, mem);
            check_rx(mem, &walk, setup, got);
        } else {
            let got = tx.collect(chain, table, mem);
            check_tx(&walk, setup, got, &tx);
        }
        // TX gives every chain back with length 0; RX one by one does the same for the test.
        queue.add_used(mem, head, 0).expect("used ring");
        seen.used += 1;
    }
    check_ring(view, queue, setup, &seen);
}

/// A TX chain agrees with the model, and an accepted one is inside guest memory.
fn check_tx(walk: &Walk, setup: &Setup, got: Result<usize, ChainError>, tx: &TxChain) {
    let expect = model::tx(walk, setup.has(INDIRECT));
    match (&expect, got) {
        (Expect::Ok(segs), Ok(len)) => {
            assert_eq!(tx.segs(), &segs[..], "TX segments");
            assert!(tx.segs().len() <= MAX_TX_DESCRIPTORS);
            let total: u64 = segs.iter().map(|s| u64::from(s.len)).sum();
            assert_eq!(len as u64, total, "TX length is the sum of its segments");
            assert_eq!(tx.len(), len);
            let mut iovs = Vec::new();
            assert_eq!(
                tx.push_iovecs(0, len, &mut iovs),
                len,
                "iovecs cover the chain"
            );
            check_iovecs(&iovs, len);
        }
        (Expect::Err(want), Err(e)) => assert_eq!(*want, e, "TX error (walk {walk:?})"),
        (_, got) => panic!("TX chain: {got:?}, model: {expect:?} (walk {walk:?})"),
    }
}

/// An RX chain agrees with the model, and an accepted one is inside guest memory.
fn check_rx(mem: &GuestMem, walk: &Walk, setup: &Setup, got: Result<RxBuf, ChainError>) {
    let expect = model::rx(walk, setup.has(INDIRECT));
    match (&expect, got) {
        (Expect::Ok(segs), Ok(mut buf)) => {
            assert_eq!(buf.segs(), &segs[..], "RX segments");
            check_rx_buf(mem, &mut buf);
        }
        (Expect::Err(want), Err(e)) => assert_eq!(*want, e, "RX error (walk {walk:?})"),
        (_, got) => panic!("RX chain: {got:?}, model: {expect:?} (walk {walk:?})"),
    }
}

/// An RX buffer's segments are inside guest memory, within the caps, and its cached host
/// pieces (when it has them) cover exactly its capacity inside the mapping.
fn check_rx_buf(mem: &GuestMem, buf: &mut RxBuf) {
    assert!(buf.segs().len() <= MAX_RX_SEGS);
    assert!(!buf.segs().is_empty());
    check_segs(buf.segs());
    let total: u64 = buf.segs().iter().map(|s| u64::from(s.len)).sum();
    assert_eq!(
        u64::from(buf.cap),
        total,
        "RX capacity is the sum of its segments"
    );
    buf.resolve(mem);
    if let Some(pieces) = buf.pieces() {
        let covered: u64 = pieces.iter().map(|p| u64::from(p.len)).sum();
        assert_eq!(covered, total, "host pieces cover the buffer");
        for p in pieces {
            assert!(in_host_mapping(mem, p.addr, p.len as usize), "piece {p:?}");
        }
    }
}

fn check_segs(segs: &[GuestSeg]) {
    for s in segs {
        assert!(s.len > 0, "empty segment {s:?}");
        assert!(
            in_guest_memory(s.addr.0, u64::from(s.len)),
            "segment {s:?} outside guest memory"
        );
    }
}

/// Every iovec lies inside one region's host mapping, and together they cover `len` bytes.
fn check_iovecs(iovs: &[libc::iovec], len: usize) {
    MEMORY.with(|mem| {
        for iov in iovs {
            assert!(
                in_host_mapping(mem, iov.iov_base as usize, iov.iov_len),
                "iovec outside the mapping of guest memory"
            );
        }
    });
    assert_eq!(iovs.iter().map(|i| i.iov_len).sum::<usize>(), len);
}

fn in_host_mapping(mem: &GuestMem, addr: usize, len: usize) -> bool {
    REGIONS.iter().any(|(start, size)| {
        let base = mem
            .get_host_address(GuestAddress(*start))
            .expect("region start") as usize;
        addr >= base && addr.checked_add(len).is_some_and(|end| end <= base + size)
    })
}

/// The ring-level outcome: a jump is reported with nothing popped, a head out of range is
/// reported, otherwise every published chain was popped; the used ring holds one entry per
/// chain given back; a parked ring stays parked until the driver resets it.
fn check_ring(view: GuestView<'_>, queue: &mut Queue, setup: &Setup, seen: &Popped) {
    let mem = view.mem();
    match seen.fault {
        Some(RingFault::AvailIndexJump { avail, next, size }) => {
            assert!(setup.jumped(), "jump reported for a sane ring");
            assert_eq!(
                (avail, next, size),
                (setup.avail_idx, setup.next_avail, setup.size)
            );
            assert_eq!(seen.chains, 0, "chains popped past an index jump");
        }
        Some(RingFault::HeadOutOfRange { head, size }) => {
            assert!(head >= size && size == setup.size);
        }
        None => {
            assert!(!setup.jumped(), "index jump not reported");
            assert_eq!(seen.chains, setup.pending(), "every published chain popped");
        }
    }
    let used_idx = get_u16(mem, USED_AT + 2);
    assert_eq!(
        used_idx,
        setup.next_avail.wrapping_add(seen.used),
        "used index"
    );
    if let Some(fault) = seen.fault {
        let parked = ParkedRing::new(fault, queue);
        assert!(
            parked.still_parked(queue, mem),
            "parked ring unparked itself"
        );
        assert_eq!(parked.fault(), fault);
        // A driver reset (new positions from SET_VRING_BASE) brings the ring back.
        queue.set_next_avail(setup.avail_idx);
        queue.set_next_used(setup.avail_idx);
        assert!(!parked.still_parked(queue, mem), "reset ring still parked");
    }
}

/// The RX path through the pool: assign buffers to frames, accept every other frame, commit,
/// assign again (held buffers first), give everything back.
fn walk_pool(view: GuestView<'_>, queue: &mut Queue, setup: &Setup) {
    let mem = view.mem();
    let mut pool = RxPool::new();
    pool.set_mergeable(setup.has(MERGEABLE));
    pool.set_indirect_allowed(setup.has(INDIRECT));
    pool.sync(view);
    let mut slots = Vec::new();
    let mut used = 0u16;
    let mut popped = 0u16;
    for round in 0..2 {
        let before = pool.len();
        let start = queue.next_avail();
        let out = pool.assign(queue, view, setup.frames, setup.frame_bytes, &mut slots);
        let taken = queue.next_avail().wrapping_sub(start);
        popped += taken;
        // Each chain taken is held or went back in the used ring (the pool keeps no count of
        // heads out of range: the ring is parked then, and the chain is not given back).
        let bad_head = matches!(out.fault, Some(RingFault::HeadOutOfRange { .. }));
        let held_new = pool.len() - before;
        assert_eq!(
            usize::from(taken),
            held_new + out.bad_chains + usize::from(bad_head),
            "chains taken = held + returned (+ the bad head)"
        );
        used += out.bad_chains as u16;
        check_slots(view, &pool, setup, &slots, out.frames);
        if out.fault.is_some() || round == 1 {
            check_pool_fault(queue, mem, setup, out.fault, popped);
            break;
        }
        used += accept_some(&mut pool, queue, view, setup, &slots);
        let used_idx = get_u16(mem, USED_AT + 2);
        assert_eq!(used_idx, setup.next_avail.wrapping_add(used), "used index");
    }
    for head in pool.take_all() {
        assert!(head < setup.size, "held head {head} in range");
    }
}

/// Slots are consecutive, non-empty, one chain each unless mergeable (then as many as reach
/// the frame's size, but for the last), and their buffers are inside guest memory.
fn check_slots(
    view: GuestView<'_>,
    pool: &RxPool,
    setup: &Setup,
    slots: &[Range<usize>],
    frames: usize,
) {
    assert_eq!(slots.len(), frames);
    assert!(frames <= setup.frames);
    let mut next = 0usize;
    for slot in slots {
        assert_eq!(slot.start, next, "slots are consecutive");
        assert!(slot.end > slot.start && slot.end <= pool.len());
        next = slot.end;
        let cap = pool.capacity(slot);
        if !setup.has(MERGEABLE) {
            assert_eq!(slot.len(), 1);
        } else if slot.len() > 1 {
            let without_last = slot.start..slot.end - 1;
            assert!(
                pool.capacity(&without_last) < setup.frame_bytes,
                "slot too long"
            );
        }
        if setup.has(MERGEABLE) {
            // A slot the ring could not fill is not handed out (its buffers stay held).
            assert!(
                cap >= setup.frame_bytes,
                "mergeable slot {slot:?} short: {cap}"
            );
        }
        let mut segs = Vec::new();
        pool.segs(slot, &mut segs);
        check_segs(&segs);
        let mut iovs = Vec::new();
        let covered = pool.push_iovecs(slot, 0, view, &mut iovs, 4096);
        assert_eq!(covered, cap, "iovecs cover the slot");
        check_iovecs(&iovs, cap);
    }
}

/// Accepts every other frame (frame 0 fails its checks), filled to `frame_bytes` or its
/// capacity, and commits; returns the used entries added.
fn accept_some(
    pool: &mut RxPool,
    queue: &mut Queue,
    view: GuestView<'_>,
    setup: &Setup,
    slots: &[Range<usize>],
) -> u16 {
    let mem = view.mem();
    let used_at = get_u16(mem, USED_AT + 2);
    let held = pool.len();
    let mut spanned = 0usize;
    let mut entries = Vec::new();
    for slot in slots.iter().skip(1).step_by(2) {
        let len = pool.capacity(slot).min(setup.frame_bytes.max(1));
        let spans = pool.spans(slot, len);
        assert_eq!(pool.accept(slot, len), spans);
        assert!(usize::from(spans) <= slot.len());
        spanned += usize::from(spans);
        entries.push(len);
    }
    let added = pool.commit(queue, view);
    assert_eq!(added, spanned, "one used entry per buffer spanned");
    assert_eq!(
        pool.len(),
        held - spanned,
        "accepted buffers leave the pool"
    );
    // The used entries' lengths add up to the accepted frames' lengths.
    let mut sum = 0u64;
    for i in 0..added {
        let at = USED_AT
            + 4
            + 8 * (usize::from(used_at.wrapping_add(i as u16)) % usize::from(setup.size)) as u64;
        let id: u32 = u32::from_le(mem.read_obj(GuestAddress(at)).expect("used"));
        let len: u32 = u32::from_le(mem.read_obj(GuestAddress(at + 4)).expect("used"));
        assert!(id < u32::from(setup.size), "used id {id}");
        sum += u64::from(len);
    }
    assert_eq!(sum, entries.iter().map(|l| *l as u64).sum::<u64>());
    added as u16
}

fn check_pool_fault(
    queue: &mut Queue,
    mem: &GuestMem,
    setup: &Setup,
    fault: Option<RingFault>,
    popped: u16,
) {
    match fault {
        Some(RingFault::AvailIndexJump { .. }) => {
            assert!(setup.jumped() && popped == 0, "jump after {popped} chains");
        }
        Some(RingFault::HeadOutOfRange { head, size }) => assert!(head >= size),
        None => assert!(!setup.jumped(), "index jump not reported"),
    }
    if let Some(fault) = fault {
        let parked = ParkedRing::new(fault, queue);
        assert!(
            parked.still_parked(queue, mem),
            "parked ring unparked itself"
        );
    }
}
