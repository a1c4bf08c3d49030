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
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

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
///
/// Made once per batch, for one snapshot of guest memory: it keeps the table's host address
/// when the whole table lies in one piece of that snapshot's mapping, so that looking at a
/// descriptor's flags costs one load, not a region lookup.
#[derive(Debug, Clone, Copy)]
pub struct DescTable {
    addr: GuestAddress,
    size: u16,
    indirect_allowed: bool,
    /// Host address of the whole table in the snapshot, 2-byte aligned; 0 when unknown.
    host: usize,
}

impl DescTable {
    /// The table of `queue` in `mem` (the pass's snapshot, which must stay alive while this
    /// value is used); `indirect_allowed`: the driver negotiated indirect descriptors.
    pub fn of<B: Bitmap + 'static>(
        queue: &Queue,
        indirect_allowed: bool,
        mem: &GuestMemoryMmap<B>,
    ) -> Self {
        let addr = GuestAddress(queue.desc_table());
        let size = queue.size();
        let len = usize::from(size) * 16;
        let mut host = 0usize;
        if !indirect_allowed && len > 0 {
            let mut slices = GuestMemoryBackend::get_slices(mem, addr, len);
            if let (Some(Ok(slice)), None) = (slices.next(), slices.next()) {
                let at = slice.ptr_guard().as_ptr() as usize;
                // A misaligned table (a hostile driver) is read through vm-memory instead.
                if slice.len() == len && at % 2 == 0 {
                    host = at;
                }
            }
        }
        Self {
            addr,
            size,
            indirect_allowed,
            host,
        }
    }

    /// Whether descriptor `index` of the table may not be used: it refers to an indirect table
    /// that was not negotiated. (An index out of range is the iterator's to refuse.)
    fn forbids<B: Bitmap + 'static>(&self, mem: &GuestMemoryMmap<B>, index: u16) -> bool {
        if self.indirect_allowed || index >= self.size {
            return false;
        }
        // The flags are bytes 12..14 of the 16-byte descriptor.
        let offset = usize::from(index) * 16 + 12;
        let flags = if self.host != 0 {
            // SAFETY: `host` is the start of the whole table (`size` descriptors) in one piece
            // of the snapshot's mapping, checked in `of`; the caller keeps that snapshot alive
            // while it uses this value; `index < size`, so the two bytes lie inside the table;
            // `host` is 2-byte aligned and `offset` even. A volatile load, because the guest
            // may write its table at any time (as vm-memory's own accessors do).
            unsafe { std::ptr::read_volatile((self.host + offset) as *const u16) }
        } else {
            let Some(at) = self.addr.0.checked_add(offset as u64) else {
                return false;
            };
            match mem.read_obj::<u16>(GuestAddress(at)) {
                Ok(flags) => flags,
                Err(_) => return false,
            }
        };
        u16::from_le(flags) & VRING_DESC_F_INDIRECT as u16 != 0
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

    /// Copies bytes `offset..offset + out.len()` of the chain into `out` through the host
    /// addresses (no region lookup); returns the bytes copied.
    ///
    /// # Safety
    /// The snapshot of guest memory the chain was last collected from must still be alive
    /// (in the data path: collected in this same pass, from the pass's `GuestView`).
    pub unsafe fn read_host(&self, offset: usize, out: &mut [u8]) -> usize {
        // SAFETY: `collect` checked every piece against that snapshot's mapping, which the
        // caller keeps alive.
        unsafe { read_pieces(&self.pieces, offset, out) }
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
        if let Some(host) = one_piece(mem, addr, len as usize) {
            self.pieces.push(HostPiece { addr: host, len });
            self.segs.push(GuestSeg { addr, len });
            self.len += len as usize;
            return Ok(());
        }
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

/// The host address of `len > 0` bytes at `addr` when they lie inside one memory region: one
/// region lookup and a bounds check, where vm-memory's slice iterator (what a range that spans
/// regions needs) costs several calls per range. `None` for anything else, which the caller
/// then resolves, or refuses, through the iterator.
pub fn one_piece<B: Bitmap + 'static>(
    mem: &GuestMemoryMmap<B>,
    addr: GuestAddress,
    len: usize,
) -> Option<usize> {
    if len == 0 {
        return None;
    }
    let (region, offset) = mem.to_region_addr(addr)?;
    let end = offset.raw_value().checked_add(len as u64)?;
    if end > region.len() {
        return None;
    }
    Some(region.as_ptr() as usize + usize::try_from(offset.raw_value()).ok()?)
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
            if let Some(host) = one_piece(mem, seg.addr, seg.len as usize) {
                if n == MAX_RX_PIECES {
                    return;
                }
                self.pieces[n] = HostPiece {
                    addr: host,
                    len: seg.len,
                };
                n += 1;
                continue;
            }
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
        if one_piece(mem, desc.addr(), len as usize).is_none()
            && !GuestMemoryBackend::check_range(mem, desc.addr(), len as usize)
        {
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
    offset: usize,
    len: usize,
    iovs: &mut Vec<libc::iovec>,
) -> usize {
    for_each_piece(pieces, offset, len, |addr, _, take| {
        iovs.push(libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: take,
        });
    })
}

/// Calls `f(host address, bytes done before, length)` for each piece of bytes
/// `offset..offset + len` of `pieces`, in order; returns the bytes covered.
fn for_each_piece(
    pieces: &[HostPiece],
    mut offset: usize,
    len: usize,
    mut f: impl FnMut(usize, usize, usize),
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
        f(p.addr + offset, done, take);
        done += take;
        offset = 0;
    }
    done
}

/// Copies `data` into the bytes from `offset` on of `pieces`; returns the bytes written. The
/// fast path of a write into guest memory: no region lookup, no bitmap slice per call (what
/// vm-memory's accessors cost), and no dirty logging, which is the caller's business.
///
/// # Safety
/// Every piece must be a writable range of a guest-memory mapping that stays alive for the
/// call (a snapshot the caller holds), as [`RxBuf::resolve`] made them.
pub unsafe fn write_pieces(pieces: &[HostPiece], offset: usize, data: &[u8]) -> usize {
    for_each_piece(pieces, offset, data.len(), |addr, done, take| {
        let src = data[done..done + take].as_ptr();
        // SAFETY: `addr..addr + take` lies in one piece, mapped and writable (the caller's
        // contract); `data[done..done + take]` is in bounds (the walk covers at most
        // `data.len()` bytes). Guest memory never overlaps vnpd's own `data`. The guest may
        // touch the bytes concurrently, as with the kernel's writes: raw bytes, no reference.
        unsafe { std::ptr::copy_nonoverlapping(src, addr as *mut u8, take) }
    })
}

/// Copies bytes from `offset` on of `pieces` into `out`; returns the bytes read.
///
/// # Safety
/// Every piece must be a readable range of a guest-memory mapping that stays alive for the
/// call, as [`TxChain::collect`] made them.
pub unsafe fn read_pieces(pieces: &[HostPiece], offset: usize, out: &mut [u8]) -> usize {
    for_each_piece(pieces, offset, out.len(), |addr, done, take| {
        let dst = out[done..done + take].as_mut_ptr();
        // SAFETY: as in `write_pieces`, the other way round: `addr..addr + take` is mapped
        // (the caller's contract) and `out[done..done + take]` in bounds. What the guest
        // changes meanwhile lands in a local copy, checked after.
        unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, dst, take) }
    })
}

#[cfg(test)]
mod tests;
