//! Guest RX buffers between the avail ring and the used ring.
//!
//! The pool takes RX chains from the avail ring as frames need them and keeps them in order
//! (`held`). A batch of frames is *assigned* buffers from the front of `held` (one chain per
//! frame, or with `VIRTIO_NET_F_MRG_RXBUF` as many as one frame needs); the caller fills them
//! (`recvmmsg`), checks what arrived, and *accepts* the frames that passed. Only accepted frames
//! are *committed* to the used ring; the buffers of rejected frames stay at the front of `held`
//! for the next frame, so a datagram that fails its checks never becomes visible to the guest.
//!
//! Host addresses of held buffers are cached for the snapshot of guest memory they were
//! resolved in; the pool keeps that snapshot alive, and forgets the addresses when the
//! frontend remaps memory.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::Bitmap;
use vm_memory::GuestMemoryMmap;

use super::chain::{collect_rx_chain, push_piece_iovecs, write_pieces, DescTable, GuestSeg, RxBuf};
use super::memory::{with_ring_mem, GuestView};
use super::park::{avail_index_jump, head_out_of_range, RingFault};
use super::used::UsedRing;
use super::GuestMem;

/// RX buffers taken from the avail ring and not yet used.
#[derive(Debug, Default)]
pub struct RxPool {
    held: VecDeque<RxBuf>,
    /// The snapshot the cached host addresses of `held` point into.
    snapshot: Option<Arc<GuestMem>>,
    mergeable: bool,
    /// `VIRTIO_RING_F_INDIRECT_DESC` negotiated: chains may use indirect tables.
    indirect_allowed: bool,
    /// `accepted[i]`: `held[i]` goes to the used ring at the next commit.
    accepted: Vec<bool>,
    /// Used entries (head, bytes written) of the next commit, in order.
    used: Vec<(u16, u32)>,
}

/// What [`RxPool::assign`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Assigned {
    /// Frames that got buffers.
    pub frames: usize,
    /// Broken chains met on the way: returned to the driver unused (length 0).
    pub bad_chains: usize,
    /// The ring itself is broken: the caller parks it (see `ring::park`).
    pub fault: Option<RingFault>,
}

impl RxPool {
    /// An empty pool.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a frame may span several chains (`VIRTIO_NET_F_MRG_RXBUF` acked).
    pub fn set_mergeable(&mut self, mergeable: bool) {
        self.mergeable = mergeable;
    }

    /// Whether chains may use indirect tables (`VIRTIO_RING_F_INDIRECT_DESC` acked).
    pub fn set_indirect_allowed(&mut self, allowed: bool) {
        self.indirect_allowed = allowed;
    }

    /// Buffers held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether no buffer is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Makes `view`'s snapshot the one cached addresses refer to; when guest memory was
    /// remapped, forgets every cached address (resolved again on use).
    pub fn sync(&mut self, view: GuestView<'_>) {
        if self.snapshot.as_ref().is_some_and(|s| view.is_snapshot(s)) {
            return;
        }
        for b in self.held.iter_mut() {
            b.unresolve();
        }
        self.snapshot = Some(view.snapshot().clone());
    }

    /// Forgets every buffer (device reset: the rings are gone).
    pub fn clear(&mut self) {
        self.held.clear();
        self.snapshot = None;
        self.accepted.clear();
        self.used.clear();
    }

    /// Empties the pool and returns the heads of every held buffer, in order: the ring is
    /// stopping, and the caller completes them with length 0 so the driver gets them back.
    pub fn take_all(&mut self) -> Vec<u16> {
        self.accepted.clear();
        self.used.clear();
        self.held.drain(..).map(|b| b.head).collect()
    }

    /// Assigns buffers to up to `frames` frames of at most `frame_bytes` each: frame `i` gets
    /// `held[slots[i]]`. Takes chains from the avail ring when `held` runs out.
    pub fn assign(
        &mut self,
        queue: &mut Queue,
        view: GuestView<'_>,
        frames: usize,
        frame_bytes: usize,
        slots: &mut Vec<Range<usize>>,
    ) -> Assigned {
        self.assign_sized(queue, view, frames, |_| frame_bytes, slots)
    }

    /// Like [`RxPool::assign`], with frame `i` of `frame_bytes(i)` bytes: with
    /// `VIRTIO_NET_F_MRG_RXBUF` each frame gets as many chains as it needs (a coalesced
    /// 64 KiB segment spans dozens), without it one chain each (the caller checks that the
    /// frame fits, [`RxPool::capacity`]). A frame the ring cannot complete yet gets no slot;
    /// the chains taken for it stay held, first in line.
    pub fn assign_sized(
        &mut self,
        queue: &mut Queue,
        view: GuestView<'_>,
        frames: usize,
        frame_bytes: impl Fn(usize) -> usize,
        slots: &mut Vec<Range<usize>>,
    ) -> Assigned {
        with_ring_mem!(view, |mem| self.assign_in(
            queue,
            view,
            mem,
            frames,
            &frame_bytes,
            slots
        ))
    }

    /// [`RxPool::assign_sized`] with ring accesses through `mem` (`view`'s snapshot, with or
    /// without dirty bitmap).
    fn assign_in<B: Bitmap + 'static>(
        &mut self,
        queue: &mut Queue,
        view: GuestView<'_>,
        mem: &GuestMemoryMmap<B>,
        frames: usize,
        frame_bytes: &impl Fn(usize) -> usize,
        slots: &mut Vec<Range<usize>>,
    ) -> Assigned {
        slots.clear();
        let mut out = Assigned::default();
        let cache = self.snapshot.as_ref().is_some_and(|s| view.is_snapshot(s));
        let table = DescTable::of(queue, self.indirect_allowed, mem);
        let mut next = 0usize;
        'frames: while slots.len() < frames {
            let start = next;
            let want = frame_bytes(slots.len());
            let mut cap = 0usize;
            loop {
                if next == self.held.len() {
                    let Some(chain) = queue.pop_descriptor_chain(mem) else {
                        out.fault = avail_index_jump(queue, mem);
                        break 'frames;
                    };
                    let head = chain.head_index();
                    if let Some(fault) = head_out_of_range(queue, head) {
                        out.fault = Some(fault);
                        break 'frames;
                    }
                    match collect_rx_chain(chain, table, mem) {
                        Ok(mut b) => {
                            if cache {
                                b.resolve(mem);
                            }
                            self.held.push_back(b);
                        }
                        Err(e) => {
                            log::debug!("rx chain {head} unusable: {e}");
                            let _ = queue.add_used(mem, head, 0);
                            out.bad_chains += 1;
                            continue;
                        }
                    }
                }
                cap += self.held[next].cap as usize;
                next += 1;
                if !self.mergeable || cap >= want {
                    break;
                }
            }
            slots.push(start..next);
        }
        out.frames = slots.len();
        out
    }

    /// Writable bytes of the buffers in `slot`.
    pub fn capacity(&self, slot: &Range<usize>) -> usize {
        self.held.range(slot.clone()).map(|b| b.cap as usize).sum()
    }

    /// Appends the guest segments of the buffers in `slot` to `out`.
    pub fn segs(&self, slot: &Range<usize>, out: &mut Vec<GuestSeg>) {
        for b in self.held.range(slot.clone()) {
            out.extend_from_slice(b.segs());
        }
    }

    /// Writes `data` at byte `offset` of the buffers in `slot`; returns the bytes written.
    /// Through the cached host addresses when they belong to `view`'s snapshot and no dirty
    /// log is kept (a wake-up's fixed cost: vm-memory's accessors take a region lookup, a
    /// bitmap clone and the bitmap's lock per call); through vm-memory, which logs, otherwise.
    pub fn write(
        &self,
        slot: &Range<usize>,
        view: GuestView<'_>,
        offset: usize,
        data: &[u8],
    ) -> usize {
        let fast =
            !view.logs_writes() && self.snapshot.as_ref().is_some_and(|s| view.is_snapshot(s));
        let (mut skip, mut written) = (offset, 0usize);
        for b in self.held.range(slot.clone()) {
            let cap = b.cap as usize;
            if skip >= cap {
                skip -= cap;
                continue;
            }
            let part = &data[written..data.len().min(written + cap - skip)];
            let got = match b.pieces().filter(|_| fast) {
                // SAFETY: the pieces were resolved in `self.snapshot`, which this pool keeps
                // alive and which is `view`'s (checked above), so they are mapped and
                // writable.
                Some(pieces) => unsafe { write_pieces(pieces, skip, part) },
                None => view.write(b.segs(), skip, part),
            };
            written += got;
            skip = 0;
            if got < part.len() || written == data.len() {
                break;
            }
        }
        written
    }

    /// Appends iovecs for the bytes after `skip` of the buffers in `slot`, at most `max_iovs`
    /// in `iovs` in total; returns the bytes covered. Uses the cached host addresses when they
    /// belong to `view`'s snapshot.
    pub fn push_iovecs(
        &self,
        slot: &Range<usize>,
        mut skip: usize,
        view: GuestView<'_>,
        iovs: &mut Vec<libc::iovec>,
        max_iovs: usize,
    ) -> usize {
        let cached = self.snapshot.as_ref().is_some_and(|s| view.is_snapshot(s));
        let mut covered = 0usize;
        for b in self.held.range(slot.clone()) {
            let cap = b.cap as usize;
            if skip >= cap {
                skip -= cap;
                continue;
            }
            let want = cap - skip;
            let got = match b.pieces().filter(|_| cached) {
                Some(pieces) if iovs.len() + pieces.len() <= max_iovs => {
                    push_piece_iovecs(pieces, skip, want, iovs)
                }
                _ => view.push_iovecs(b.segs(), skip, want, iovs, max_iovs),
            };
            covered += got;
            skip = 0;
            if got < want {
                break;
            }
        }
        covered
    }

    /// Accepts a frame of `frame_len` bytes written into `slot`: its buffers, filled in order,
    /// go to the used ring at the next [`RxPool::commit`]. Buffers of the slot the frame does
    /// not reach stay held. Returns how many buffers the frame spans (virtio-net `num_buffers`).
    pub fn accept(&mut self, slot: &Range<usize>, frame_len: usize) -> u16 {
        if self.accepted.len() < slot.end {
            self.accepted.resize(slot.end, false);
        }
        let mut left = frame_len;
        let mut spans = 0u16;
        for i in slot.clone() {
            if left == 0 {
                break;
            }
            let take = left.min(self.held[i].cap as usize);
            self.used.push((self.held[i].head, take as u32));
            self.accepted[i] = true;
            left -= take;
            spans += 1;
        }
        spans
    }

    /// How many buffers of `slot` a frame of `frame_len` bytes spans.
    pub fn spans(&self, slot: &Range<usize>, frame_len: usize) -> u16 {
        let mut left = frame_len;
        let mut spans = 0u16;
        for b in self.held.range(slot.clone()) {
            if left == 0 {
                break;
            }
            left -= left.min(b.cap as usize);
            spans += 1;
        }
        spans
    }

    /// Adds the accepted frames' used entries to the ring and drops their buffers from `held`;
    /// the rest stay, in order. Returns the used entries added.
    pub fn commit(&mut self, queue: &mut Queue, view: GuestView<'_>) -> usize {
        let n = self.used.len();
        match view.plain().and_then(|plain| UsedRing::of(queue, plain)) {
            Some(ring) => {
                ring.add(queue, self.used.drain(..));
            }
            None => with_ring_mem!(view, |mem| for (head, len) in self.used.drain(..) {
                let _ = queue.add_used(mem, head, len);
            }),
        }
        let accepted = &self.accepted;
        let prefix = accepted.iter().take_while(|a| **a).count();
        if accepted[prefix..].iter().any(|a| *a) {
            let mut i = 0usize;
            self.held.retain(|_| {
                let keep = !accepted.get(i).copied().unwrap_or(false);
                i += 1;
                keep
            });
        } else {
            self.held.drain(..prefix);
        }
        self.accepted.clear();
        n
    }

    /// Whether accepted frames wait for [`RxPool::commit`].
    pub fn has_accepted(&self) -> bool {
        !self.used.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::test_memory;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    fn writable(addr: u64, len: u32) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(
            addr,
            len,
            VRING_DESC_F_WRITE as u16,
            0,
        ))
    }

    fn used_idx(vq: &MockSplitQueue<'_, GuestMem>) -> u16 {
        u16::from_le(vq.used().idx().load())
    }

    fn used_entry(vq: &MockSplitQueue<'_, GuestMem>, i: usize) -> (u32, u32) {
        let e = vq.used().ring().ref_at(i).unwrap().load();
        (u32::from_le(e.id()), u32::from_le(e.len()))
    }

    /// A queue with `n` single-descriptor RX chains of `len` bytes each (heads 0..n).
    fn rx_queue(mem: &GuestMem, n: u16, len: u32) -> (MockSplitQueue<'_, GuestMem>, Queue) {
        let vq = MockSplitQueue::new(mem, 16);
        let descs: Vec<_> = (0..n)
            .map(|i| writable(0x1_0000 + u64::from(i) * 0x1000, len))
            .collect();
        vq.add_desc_chains(&descs, 0).unwrap();
        let q = vq.create_queue().unwrap();
        (vq, q)
    }

    #[test]
    fn rejected_frames_keep_their_buffers_for_the_next_frame() {
        let mem = test_memory();
        let view = GuestView::new(&mem, false);
        let (vq, mut q) = rx_queue(&mem, 4, 2048);
        let mut pool = RxPool::new();
        pool.sync(view);
        let mut slots = Vec::new();
        let a = pool.assign(&mut q, view, 3, 1500, &mut slots);
        assert_eq!(
            a,
            Assigned {
                frames: 3,
                bad_chains: 0,
                fault: None
            }
        );
        assert_eq!(slots, vec![0..1, 1..2, 2..3]);
        // Frame 0 fails its checks, frames 1 and 2 pass.
        assert_eq!(pool.accept(&slots[1], 100), 1);
        assert_eq!(pool.accept(&slots[2], 200), 1);
        assert_eq!(pool.commit(&mut q, view), 2);
        assert_eq!(used_idx(&vq), 2);
        assert_eq!(used_entry(&vq, 0), (1, 100));
        assert_eq!(used_entry(&vq, 1), (2, 200));
        // The rejected frame's buffer (head 0) is first in line, then head 3 from the ring.
        assert_eq!(pool.len(), 1);
        pool.assign(&mut q, view, 2, 1500, &mut slots);
        assert_eq!(slots, vec![0..1, 1..2]);
        pool.accept(&slots[0], 60);
        pool.commit(&mut q, view);
        assert_eq!(used_entry(&vq, 2), (0, 60));
        assert_eq!(pool.len(), 1);
    }

    #[test]
    fn mergeable_frames_span_buffers_and_unused_tail_stays() {
        let mem = test_memory();
        // Ring accesses through the shadow without dirty bitmap, as the workers make them.
        let shadow = crate::ring::memory::PlainShadow::of(&mem);
        let view = GuestView::new(&mem, false).with_shadow(shadow.as_ref());
        assert!(view.plain().is_some());
        let (vq, mut q) = rx_queue(&mem, 4, 1000);
        let mut pool = RxPool::new();
        pool.set_mergeable(true);
        let mut slots = Vec::new();
        pool.assign(&mut q, view, 1, 2500, &mut slots);
        assert_eq!(slots, vec![0..3]);
        assert_eq!(pool.capacity(&slots[0]), 3000);
        // A short frame uses only the first buffer of its slot.
        assert_eq!(pool.spans(&slots[0], 1200), 2);
        assert_eq!(pool.accept(&slots[0], 1200), 2);
        pool.commit(&mut q, view);
        assert_eq!(used_entry(&vq, 0), (0, 1000));
        assert_eq!(used_entry(&vq, 1), (1, 200));
        assert_eq!(pool.len(), 1, "the third buffer is kept");
    }

    #[test]
    fn mergeable_frames_of_different_sizes_take_what_each_needs() {
        let mem = test_memory();
        let view = GuestView::new(&mem, false);
        let (vq, mut q) = rx_queue(&mem, 10, 1000);
        let mut pool = RxPool::new();
        pool.set_mergeable(true);
        let mut slots = Vec::new();
        let sizes = [3000usize, 100, 5000, 2500];
        let a = pool.assign_sized(&mut q, view, sizes.len(), |i| sizes[i], &mut slots);
        // 3 + 1 + 5 chains; the last frame would need 3 more than the ring has: no slot, and
        // the one chain taken for it stays first in line.
        assert_eq!(a.frames, 3);
        assert_eq!(slots, vec![0..3, 3..4, 4..9]);
        assert_eq!(pool.len(), 10);
        for (slot, size) in slots.iter().zip(sizes) {
            pool.accept(slot, size);
        }
        assert_eq!(pool.commit(&mut q, view), 9);
        assert_eq!(used_entry(&vq, 2), (2, 1000));
        assert_eq!(used_entry(&vq, 3), (3, 100));
        assert_eq!(used_entry(&vq, 8), (8, 1000));
        assert_eq!(pool.len(), 1);
        // Without MRG_RXBUF: one chain per frame, whatever the size.
        let (_vq, mut q) = rx_queue(&mem, 3, 1000);
        let mut pool = RxPool::new();
        pool.assign_sized(&mut q, view, 3, |i| sizes[i], &mut slots);
        assert_eq!(slots, vec![0..1, 1..2, 2..3]);
        assert_eq!(pool.capacity(&slots[0]), 1000);
    }

    #[test]
    fn broken_chains_are_returned_and_skipped() {
        let mem = test_memory();
        let view = GuestView::new(&mem, false);
        let vq = MockSplitQueue::new(&*mem, 16);
        let descs = [
            // Readable: wrong direction for RX.
            RawDescriptor::from(SplitDescriptor::new(0x1_0000, 100, 0, 0)),
            writable(0x2_0000, 100),
            // Outside guest memory.
            writable(0x100_0000, 100),
        ];
        vq.add_desc_chains(&descs, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let mut pool = RxPool::new();
        let mut slots = Vec::new();
        let a = pool.assign(&mut q, view, 4, 100, &mut slots);
        assert_eq!(
            a,
            Assigned {
                frames: 1,
                bad_chains: 2,
                fault: None
            }
        );
        assert_eq!(used_idx(&vq), 2);
        assert_eq!(used_entry(&vq, 0), (0, 0));
        assert_eq!(used_entry(&vq, 1), (2, 0));
    }

    #[test]
    fn ring_faults_are_reported_not_popped_past() {
        let mem = test_memory();
        let view = GuestView::new(&mem, false);
        let (vq, mut q) = rx_queue(&mem, 2, 2048);
        let mut pool = RxPool::new();
        let mut slots = Vec::new();
        // A head out of range after the two good chains.
        vq.avail().ring().ref_at(2).unwrap().store(16u16.to_le());
        vq.avail().idx().store(3u16.to_le());
        let a = pool.assign(&mut q, view, 4, 1500, &mut slots);
        assert_eq!(a.frames, 2);
        assert!(matches!(
            a.fault,
            Some(RingFault::HeadOutOfRange { head: 16, size: 16 })
        ));
        assert_eq!(used_idx(&vq), 0, "nothing returned for the bad head");
        // An index jump: nothing popped, the fault reported.
        let mut pool = RxPool::new();
        let (vq, mut q) = rx_queue(&mem, 1, 2048);
        vq.avail().idx().store(40u16.to_le());
        let a = pool.assign(&mut q, view, 4, 1500, &mut slots);
        assert_eq!(a.frames, 0);
        assert!(matches!(a.fault, Some(RingFault::AvailIndexJump { .. })));
    }

    #[test]
    fn writes_straddle_buffers_through_cached_addresses_or_vm_memory() {
        let mem = test_memory();
        let data: Vec<u8> = (0..1500u32).map(|i| (i % 251) as u8).collect();
        // Fast path (synced pool, no dirty log), logged path, and a pool that never cached.
        for (sync, log) in [(true, false), (true, true), (false, false)] {
            let view = GuestView::new(&mem, log);
            let (_vq, mut q) = rx_queue(&mem, 3, 1000);
            let mut pool = RxPool::new();
            pool.set_mergeable(true);
            if sync {
                pool.sync(view);
            }
            let mut slots = Vec::new();
            pool.assign(&mut q, view, 1, 2500, &mut slots);
            assert_eq!(slots, vec![0..3]);
            // Bytes 800..2300 of the slot: the tail of buffer 0, all of 1, the head of 2.
            assert_eq!(pool.write(&slots[0], view, 800, &data), 1500);
            let mut back = vec![0u8; 1000];
            mem.read_slice(&mut back[..200], GuestAddress(0x1_0000 + 800))
                .unwrap();
            assert_eq!(&back[..200], &data[..200], "sync {sync} log {log}");
            mem.read_slice(&mut back, GuestAddress(0x1_1000)).unwrap();
            assert_eq!(&back[..], &data[200..1200], "sync {sync} log {log}");
            mem.read_slice(&mut back[..300], GuestAddress(0x1_2000))
                .unwrap();
            assert_eq!(&back[..300], &data[1200..], "sync {sync} log {log}");
            // Past the slot's capacity: what fits.
            assert_eq!(pool.write(&slots[0], view, 2900, &data), 100);
            mem.write_slice(&[0u8; 0x3000], GuestAddress(0x1_0000))
                .unwrap();
        }
    }

    #[test]
    fn iovecs_skip_the_header_room_and_use_cached_addresses() {
        let mem = test_memory();
        let view = GuestView::new(&mem, false);
        let vq = MockSplitQueue::new(&*mem, 16);
        let chain = [
            RawDescriptor::from(SplitDescriptor::new(
                0x3_0000,
                10,
                (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16,
                1,
            )),
            writable(0x4_0000, 90),
        ];
        vq.add_desc_chains(&chain, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let mut pool = RxPool::new();
        pool.sync(view);
        let mut slots = Vec::new();
        pool.assign(&mut q, view, 1, 100, &mut slots);
        let mut iovs = Vec::new();
        assert_eq!(pool.push_iovecs(&slots[0], 26, view, &mut iovs, 8), 74);
        assert_eq!(iovs.len(), 1);
        let host =
            vm_memory::GuestMemoryBackend::get_host_address(&*mem, GuestAddress(0x4_0000 + 16))
                .unwrap();
        assert_eq!(iovs[0].iov_base as usize, host as usize);
        let mut segs = Vec::new();
        pool.segs(&slots[0], &mut segs);
        assert_eq!(segs.len(), 2);
        // Given back on stop.
        assert_eq!(pool.take_all(), vec![0]);
        assert!(pool.is_empty());
    }
}
