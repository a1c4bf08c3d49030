//! Walking guest descriptor chains safely.
//!
//! Everything a guest puts in its rings is untrusted. These helpers turn a
//! [`DescriptorChain`] into a short list of [`GuestSeg`]s whose whole range has been checked
//! against guest memory, and classify every way a chain can be broken ([`ChainError`]), so that
//! the data path can drop that one packet (counted) and carry on. Nothing here panics on guest
//! input, and nothing reads or writes outside the guest's memory regions.

use std::ops::Deref;

use thiserror::Error;
use virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Most descriptors a TX chain may have. Linux uses at most MAX_SKB_FRAGS + 2 (19); DPDK one or
/// two. A longer chain is a broken or hostile guest.
pub const MAX_TX_DESCRIPTORS: usize = 64;
/// Most descriptors an RX chain may have. A guest without mergeable buffers posts large
/// receive chains of about 19 descriptors (Linux: MAX_SKB_FRAGS + 2); anything much longer is
/// a broken or hostile guest making the device walk its table for nothing.
pub const MAX_RX_DESCRIPTORS: usize = 64;
/// Writable segments of one RX chain that we use; further segments are left unused (a device
/// may use less than the whole buffer).
pub const MAX_RX_SEGS: usize = 8;

/// A guest buffer piece whose whole range lies inside guest memory (checked when collected).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GuestSeg {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// Why a descriptor chain is unusable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ChainError {
    /// No descriptor at all (head index out of range, or unreadable descriptor table).
    #[error("empty descriptor chain")]
    Empty,
    /// The chain ended on a descriptor that says another one follows: a loop (more descriptors
    /// than the queue size), a next index out of range, or a bad indirect table.
    #[error("broken descriptor chain (loop, bad next index or bad indirect table)")]
    Broken,
    /// A buffer of the wrong direction (device-writable in TX, device-readable in RX).
    #[error("descriptor of the wrong direction")]
    WrongDirection,
    /// A descriptor's range is not inside guest memory.
    #[error("descriptor points outside guest memory")]
    OutsideMemory,
    /// More descriptors than [`MAX_TX_DESCRIPTORS`] (TX) or [`MAX_RX_DESCRIPTORS`] (RX).
    #[error("descriptor chain too long")]
    TooLong,
    /// A descriptor refers to an indirect table, but `VIRTIO_RING_F_INDIRECT_DESC` was not
    /// negotiated (virtio-queue follows indirect tables regardless).
    #[error("indirect descriptor table without VIRTIO_RING_F_INDIRECT_DESC")]
    Indirect,
    /// No usable bytes.
    #[error("descriptor chain has no usable bytes")]
    NoBytes,
}

/// A ring's descriptor table, to look at the flags virtio-queue's chain iterator hides: it
/// follows a descriptor that refers to an indirect table without yielding it, whether or not
/// `VIRTIO_RING_F_INDIRECT_DESC` was negotiated.
#[derive(Debug, Clone, Copy)]
pub struct DescTable {
    addr: GuestAddress,
    size: u16,
    indirect_allowed: bool,
}

impl DescTable {
    /// The table of `queue`; `indirect_allowed`: the driver negotiated indirect descriptors.
    pub fn of(queue: &Queue, indirect_allowed: bool) -> Self {
        Self {
            addr: GuestAddress(queue.desc_table()),
            size: queue.size(),
            indirect_allowed,
        }
    }

    /// Whether descriptor `index` of the table may not be used: it refers to an indirect table
    /// that was not negotiated. (An index out of range is the iterator's to refuse.)
    fn forbids<B: Bitmap + 'static>(&self, mem: &GuestMemoryMmap<B>, index: u16) -> bool {
        if self.indirect_allowed || index >= self.size {
            return false;
        }
        // The flags are bytes 12..14 of the 16-byte descriptor.
        let Some(at) = self.addr.0.checked_add(u64::from(index) * 16 + 12) else {
            return false;
        };
        mem.read_obj::<u16>(GuestAddress(at))
            .is_ok_and(|flags| u16::from_le(flags) & VRING_DESC_F_INDIRECT as u16 != 0)
    }
}

/// The device-readable buffers of one TX descriptor chain, as guest segments and as host
/// addresses in one guest-memory snapshot. Reused from chain to chain (no allocation per packet).
#[derive(Debug, Default)]
pub struct TxChain {
    head: u16,
    len: usize,
    segs: Vec<GuestSeg>,
    pieces: Vec<HostPiece>,
}

impl TxChain {
    /// An empty chain with room for [`MAX_TX_DESCRIPTORS`] descriptors.
    pub fn new() -> Self {
        Self {
            head: 0,
            len: 0,
            segs: Vec::with_capacity(MAX_TX_DESCRIPTORS),
            pieces: Vec::with_capacity(MAX_TX_DESCRIPTORS),
        }
    }

    /// Head index (what goes back in the used ring).
    pub fn head(&self) -> u16 {
        self.head
    }

    /// Total readable bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the chain holds no bytes (never true after a successful [`TxChain::collect`]).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The readable segments, in order.
    pub fn segs(&self) -> &[GuestSeg] {
        &self.segs
    }

    /// Appends iovecs for bytes `offset..offset + len` of the chain (host addresses in the
    /// snapshot the chain was collected from); returns the bytes covered.
    pub fn push_iovecs(&self, offset: usize, len: usize, iovs: &mut Vec<libc::iovec>) -> usize {
        push_piece_iovecs(&self.pieces, offset, len, iovs)
    }

    /// Walks `chain`, replacing what this value held. Every range is checked against `mem`;
    /// the host addresses stay valid while the caller keeps that snapshot alive.
    pub fn collect<M, B>(
        &mut self,
        chain: DescriptorChain<M>,
        table: DescTable,
        mem: &GuestMemoryMmap<B>,
    ) -> Result<usize, ChainError>
    where
        M: Deref,
        M::Target: vm_memory::GuestMemory,
        B: Bitmap + 'static,
    {
        self.head = chain.head_index();
        self.len = 0;
        self.segs.clear();
        self.pieces.clear();
        let mut count = 0usize;
        let mut last_has_next = true;
        let mut index = chain.head_index();
        for desc in chain {
            count += 1;
            if count > MAX_TX_DESCRIPTORS {
                return Err(ChainError::TooLong);
            }
            if table.forbids(mem, index) {
                return Err(ChainError::Indirect);
            }
            index = desc.next();
            last_has_next = desc.has_next();
            if desc.is_write_only() {
                return Err(ChainError::WrongDirection);
            }
            if desc.len() > 0 {
                self.add_segment(mem, desc.addr(), desc.len())?;
            }
        }
        if count == 0 {
            return Err(ChainError::Empty);
        }
        if last_has_next {
            // The iterator stopped although the descriptor asked for a successor.
            return Err(ChainError::Broken);
        }
        if self.len == 0 {
            return Err(ChainError::NoBytes);
        }
        Ok(self.len)
    }

    fn add_segment<B: Bitmap + 'static>(
        &mut self,
        mem: &GuestMemoryMmap<B>,
        addr: GuestAddress,
        len: u32,
    ) -> Result<(), ChainError> {
        // Resolving the range checks it: any part outside guest memory is an error.
        let mut covered = 0usize;
        for slice in GuestMemoryBackend::get_slices(mem, addr, len as usize) {
            let Ok(slice) = slice else {
                return Err(ChainError::OutsideMemory);
            };
            self.pieces.push(HostPiece {
                addr: slice.ptr_guard().as_ptr() as usize,
                len: slice.len() as u32,
            });
            covered += slice.len();
        }
        if covered != len as usize {
            return Err(ChainError::OutsideMemory);
        }
        self.segs.push(GuestSeg { addr, len });
        self.len += len as usize;
        Ok(())
    }
}

/// Most host pieces (segments split at memory-region boundaries) cached per RX buffer.
pub const MAX_RX_PIECES: usize = 8;

/// A piece of a guest buffer as a host virtual address in vnpd's mapping of guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HostPiece {
    /// Host address (kept as an integer: it is only turned back into a pointer for a system
    /// call, while the mapping it came from is known to be alive).
    pub addr: usize,
    /// Length in bytes.
    pub len: u32,
}

/// The device-writable buffers of one RX descriptor chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxBuf {
    /// Head index, returned in the used ring.
    pub head: u16,
    nsegs: u8,
    segs: [GuestSeg; MAX_RX_SEGS],
    /// Total writable bytes of the segments kept.
    pub cap: u32,
    npieces: u8,
    pieces: [HostPiece; MAX_RX_PIECES],
}

impl RxBuf {
    /// The writable segments, in order.
    pub fn segs(&self) -> &[GuestSeg] {
        &self.segs[..usize::from(self.nsegs)]
    }

    /// The cached host pieces covering all segments, if resolved (see [`RxBuf::resolve`]).
    pub fn pieces(&self) -> Option<&[HostPiece]> {
        (self.npieces > 0).then(|| &self.pieces[..usize::from(self.npieces)])
    }

    /// Forgets the cached host pieces (guest memory was remapped).
    pub fn unresolve(&mut self) {
        self.npieces = 0;
    }

    /// Caches the host addresses of the segments in `mem`'s mapping, so that later receives
    /// need no region lookups. The caller must only use them while that same mapping is alive.
    /// Leaves the buffer unresolved when it needs more than [`MAX_RX_PIECES`] pieces.
    pub fn resolve<B: Bitmap + 'static>(&mut self, mem: &GuestMemoryMmap<B>) {
        self.npieces = 0;
        let mut n = 0usize;
        for seg in &self.segs[..usize::from(self.nsegs)] {
            for slice in GuestMemoryBackend::get_slices(mem, seg.addr, seg.len as usize) {
                let Ok(slice) = slice else { return };
                if n == MAX_RX_PIECES {
                    return;
                }
                self.pieces[n] = HostPiece {
                    addr: slice.ptr_guard_mut().as_ptr() as usize,
                    len: slice.len() as u32,
                };
                n += 1;
            }
        }
        self.npieces = n as u8;
    }
}

/// Collects the device-writable buffers of an RX chain. Segments beyond [`MAX_RX_SEGS`] are not
/// used (the device may fill less than the whole chain).
pub fn collect_rx_chain<M, B>(
    chain: DescriptorChain<M>,
    table: DescTable,
    mem: &GuestMemoryMmap<B>,
) -> Result<RxBuf, ChainError>
where
    M: Deref,
    M::Target: vm_memory::GuestMemory,
    B: Bitmap + 'static,
{
    let head = chain.head_index();
    let mut buf = RxBuf {
        head,
        nsegs: 0,
        segs: [GuestSeg::default(); MAX_RX_SEGS],
        cap: 0,
        npieces: 0,
        pieces: [HostPiece::default(); MAX_RX_PIECES],
    };
    let mut count = 0usize;
    let mut last_has_next = true;
    let mut index = head;
    for desc in chain {
        count += 1;
        if count > MAX_RX_DESCRIPTORS {
            return Err(ChainError::TooLong);
        }
        if table.forbids(mem, index) {
            return Err(ChainError::Indirect);
        }
        index = desc.next();
        last_has_next = desc.has_next();
        if !desc.is_write_only() {
            return Err(ChainError::WrongDirection);
        }
        let len = desc.len();
        if len == 0 || usize::from(buf.nsegs) == MAX_RX_SEGS {
            if !desc.has_next() {
                break;
            }
            continue;
        }
        if !GuestMemoryBackend::check_range(mem, desc.addr(), len as usize) {
            return Err(ChainError::OutsideMemory);
        }
        buf.segs[usize::from(buf.nsegs)] = GuestSeg {
            addr: desc.addr(),
            len,
        };
        buf.nsegs += 1;
        buf.cap = buf.cap.saturating_add(len);
    }
    if count == 0 {
        return Err(ChainError::Empty);
    }
    if last_has_next {
        return Err(ChainError::Broken);
    }
    if buf.cap == 0 {
        return Err(ChainError::NoBytes);
    }
    Ok(buf)
}

/// Calls `f(addr, len)` for the pieces of `segs` covering the byte range
/// `offset..offset + len` of their concatenation. Returns the bytes covered (less than `len`
/// when the segments are shorter).
pub fn for_each_range(
    segs: &[GuestSeg],
    mut offset: usize,
    len: usize,
    mut f: impl FnMut(GuestAddress, usize) -> bool,
) -> usize {
    let mut done = 0usize;
    for seg in segs {
        if done == len {
            break;
        }
        let seg_len = seg.len as usize;
        if offset >= seg_len {
            offset -= seg_len;
            continue;
        }
        let take = (seg_len - offset).min(len - done);
        // Cannot overflow: check_range validated addr + seg_len when the segment was collected.
        let addr = GuestAddress(seg.addr.0 + offset as u64);
        if !f(addr, take) {
            break;
        }
        done += take;
        offset = 0;
    }
    done
}

/// Appends iovecs for bytes `offset..offset + len` of `pieces`; returns the bytes covered.
pub fn push_piece_iovecs(
    pieces: &[HostPiece],
    mut offset: usize,
    len: usize,
    iovs: &mut Vec<libc::iovec>,
) -> usize {
    let mut done = 0usize;
    for p in pieces {
        if done == len {
            break;
        }
        let plen = p.len as usize;
        if offset >= plen {
            offset -= plen;
            continue;
        }
        let take = (plen - offset).min(len - done);
        iovs.push(libc::iovec {
            iov_base: (p.addr + offset) as *mut libc::c_void,
            iov_len: take,
        });
        done += take;
        offset = 0;
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT, QueueT};

    const MEM_SIZE: u64 = 0x10_0000;

    fn memory() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
    }

    fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
    }

    /// Builds a queue holding exactly the given descriptor table (starting at index 0) with one
    /// available chain whose head is descriptor 0.
    fn queue_with(mem: &GuestMemoryMmap<()>, descs: &[RawDescriptor]) -> Queue {
        let vq = MockSplitQueue::new(mem, 16);
        for (i, d) in descs.iter().enumerate() {
            vq.desc_table().store(i as u16, *d).unwrap();
        }
        vq.avail().ring().ref_at(0).unwrap().store(0u16.to_le());
        vq.avail().idx().store(1u16.to_le());
        vq.create_queue().unwrap()
    }

    fn tx(descs: &[RawDescriptor]) -> Result<(usize, Vec<GuestSeg>), ChainError> {
        let mem = memory();
        let mut q = queue_with(&mem, descs);
        let table = DescTable::of(&q, false);
        let chain = q.pop_descriptor_chain(&mem).unwrap();
        let mut tx = TxChain::new();
        let r = tx
            .collect(chain, table, &mem)
            .map(|n| (n, tx.segs().to_vec()));
        if let Ok((n, _)) = &r {
            let mut iovs = Vec::new();
            assert_eq!(tx.push_iovecs(0, *n, &mut iovs), *n);
            assert_eq!(tx.len(), *n);
        }
        r
    }

    fn rx(descs: &[RawDescriptor]) -> Result<RxBuf, ChainError> {
        let mem = memory();
        let mut q = queue_with(&mem, descs);
        let table = DescTable::of(&q, false);
        let chain = q.iter(&mem).unwrap().next().unwrap();
        collect_rx_chain(chain, table, &mem)
    }

    #[test]
    fn tx_good_chain_of_two() {
        let (n, segs) = tx(&[
            desc(0x2000, 12, VRING_DESC_F_NEXT, 1),
            desc(0x3000, 100, 0, 0),
        ])
        .unwrap();
        assert_eq!(n, 112);
        assert_eq!(segs.len(), 2);
        assert_eq!(segs[1].addr, GuestAddress(0x3000));
    }

    #[test]
    fn tx_loop_is_broken() {
        assert_eq!(
            tx(&[
                desc(0x2000, 12, VRING_DESC_F_NEXT, 1),
                desc(0x3000, 100, VRING_DESC_F_NEXT, 0),
            ]),
            Err(ChainError::Broken)
        );
    }

    #[test]
    fn tx_next_out_of_range_is_broken() {
        assert_eq!(
            tx(&[desc(0x2000, 12, VRING_DESC_F_NEXT, 200)]),
            Err(ChainError::Broken)
        );
    }

    #[test]
    fn tx_outside_memory() {
        assert_eq!(
            tx(&[desc(MEM_SIZE - 8, 64, 0, 0)]),
            Err(ChainError::OutsideMemory)
        );
        assert_eq!(
            tx(&[desc(u64::MAX - 4, 64, 0, 0)]),
            Err(ChainError::OutsideMemory)
        );
    }

    #[test]
    fn tx_writable_descriptor_is_wrong_direction() {
        assert_eq!(
            tx(&[desc(0x2000, 64, VRING_DESC_F_WRITE, 0)]),
            Err(ChainError::WrongDirection)
        );
    }

    #[test]
    fn tx_zero_length_chain_has_no_bytes() {
        assert_eq!(tx(&[desc(0x2000, 0, 0, 0)]), Err(ChainError::NoBytes));
    }

    #[test]
    fn tx_empty_chain() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        // Head index beyond the queue size: the chain yields nothing.
        vq.avail().ring().ref_at(0).unwrap().store(40u16.to_le());
        vq.avail().idx().store(1u16.to_le());
        let mut q: Queue = vq.create_queue().unwrap();
        let table = DescTable::of(&q, false);
        let chain = q.pop_descriptor_chain(&mem).unwrap();
        assert_eq!(
            TxChain::new().collect(chain, table, &mem),
            Err(ChainError::Empty)
        );
    }

    #[test]
    fn tx_too_long() {
        // A 256-entry queue with one chain of 100 descriptors.
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 256);
        for i in 0..100u16 {
            let flags = if i < 99 { VRING_DESC_F_NEXT } else { 0 };
            vq.desc_table()
                .store(i, desc(0x8000 + u64::from(i) * 16, 16, flags, i + 1))
                .unwrap();
        }
        vq.avail().ring().ref_at(0).unwrap().store(0u16.to_le());
        vq.avail().idx().store(1u16.to_le());
        let mut q: Queue = vq.create_queue().unwrap();
        let table = DescTable::of(&q, false);
        let chain = q.pop_descriptor_chain(&mem).unwrap();
        assert_eq!(
            TxChain::new().collect(chain, table, &mem),
            Err(ChainError::TooLong)
        );
    }

    /// A 256-entry queue with one chain of `n` descriptors of `flags` (plus NEXT).
    fn long_chain(mem: &GuestMemoryMmap<()>, n: u16, flags: u32) -> Queue {
        let vq = MockSplitQueue::new(mem, 256);
        for i in 0..n {
            let next = if i + 1 < n { VRING_DESC_F_NEXT } else { 0 };
            vq.desc_table()
                .store(i, desc(0x8000 + u64::from(i) * 16, 16, flags | next, i + 1))
                .unwrap();
        }
        vq.avail().ring().ref_at(0).unwrap().store(0u16.to_le());
        vq.avail().idx().store(1u16.to_le());
        vq.create_queue().unwrap()
    }

    #[test]
    fn rx_chains_are_capped_above_what_guests_without_mergeable_buffers_post() {
        let mem = memory();
        for (n, ok) in [(19u16, true), (64, true), (65, false), (200, false)] {
            let mut q = long_chain(&mem, n, VRING_DESC_F_WRITE);
            let table = DescTable::of(&q, false);
            let chain = q.pop_descriptor_chain(&mem).unwrap();
            let got = collect_rx_chain(chain, table, &mem);
            if ok {
                assert_eq!(got.unwrap().cap, 16 * MAX_RX_SEGS as u32, "{n} descriptors");
            } else {
                assert_eq!(got, Err(ChainError::TooLong), "{n} descriptors");
            }
        }
    }

    #[test]
    fn indirect_tables_only_when_negotiated() {
        let mem = memory();
        // Head -> an indirect table of two readable descriptors at 0x9000.
        let indirect = [
            desc(0x2000, 12, VRING_DESC_F_NEXT, 1),
            desc(0x3000, 100, 0, 0),
        ];
        for (i, d) in indirect.iter().enumerate() {
            mem.write_obj(*d, GuestAddress(0x9000 + i as u64 * 16))
                .unwrap();
        }
        let head = desc(0x9000, 32, VRING_DESC_F_INDIRECT, 0);
        for allowed in [false, true] {
            let mut q = queue_with(&mem, &[head]);
            let table = DescTable::of(&q, allowed);
            let chain = q.pop_descriptor_chain(&mem).unwrap();
            let got = TxChain::new().collect(chain, table, &mem);
            if allowed {
                assert_eq!(got, Ok(112));
            } else {
                assert_eq!(got, Err(ChainError::Indirect));
            }
        }
        // Also behind a first, ordinary descriptor, and on RX.
        let mut q = queue_with(
            &mem,
            &[
                desc(0x2000, 64, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1),
                desc(0x9000, 32, VRING_DESC_F_INDIRECT, 0),
            ],
        );
        let table = DescTable::of(&q, false);
        let chain = q.pop_descriptor_chain(&mem).unwrap();
        assert_eq!(
            collect_rx_chain(chain, table, &mem),
            Err(ChainError::Indirect)
        );
    }

    #[test]
    fn rx_good_chain_resolves_to_host_pieces() {
        let buf = rx(&[
            desc(0x4000, 10, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1),
            desc(0x5000, 30, VRING_DESC_F_WRITE, 0),
        ])
        .unwrap();
        assert_eq!(buf.cap, 40);
        assert_eq!(buf.segs().len(), 2);
        assert!(buf.pieces().is_none(), "not resolved yet");
        let mem = memory();
        let mut resolved = buf;
        resolved.resolve(&mem);
        let pieces = resolved.pieces().unwrap();
        assert_eq!(pieces.len(), 2);
        assert_eq!(
            pieces[1].addr,
            mem.get_host_address(GuestAddress(0x5000)).unwrap() as usize
        );
        // Bytes 8..40 of the buffer: the last 2 of the first segment, all of the second.
        let mut iovs = Vec::new();
        assert_eq!(push_piece_iovecs(pieces, 8, 100, &mut iovs), 32);
        assert_eq!((iovs[0].iov_len, iovs[1].iov_len), (2, 30));
        resolved.unresolve();
        assert!(resolved.pieces().is_none());
    }

    #[test]
    fn rx_readable_descriptor_is_wrong_direction() {
        assert_eq!(
            rx(&[desc(0x4000, 64, 0, 0)]),
            Err(ChainError::WrongDirection)
        );
    }

    #[test]
    fn rx_outside_memory_and_loop() {
        assert_eq!(
            rx(&[desc(MEM_SIZE, 64, VRING_DESC_F_WRITE, 0)]),
            Err(ChainError::OutsideMemory)
        );
        assert_eq!(
            rx(&[desc(0x4000, 64, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 0)]),
            Err(ChainError::Broken)
        );
    }
}
