//! One pass's view of guest memory.
//!
//! The device takes one snapshot of guest memory per event (one atomic load of the
//! `GuestMemoryAtomic`) and hands the data path a [`GuestView`] over it; every guest-memory
//! access of that pass goes through the view. It also carries the dirty-logging policy: while
//! the driver has acked `VHOST_F_LOG_ALL` (live migration), bytes the kernel wrote straight into
//! guest memory (`recvmmsg`) must be marked dirty by hand, since they bypassed vm-memory's
//! accessors, which log by themselves.
//!
//! While nothing is logged, the ring structures (avail ring, descriptors, used ring) are read
//! and written through a [`PlainShadow`]: the same mappings without the dirty bitmap, whose
//! accessors take no lock and clone no `Arc` per access (vhost-user-backend's bitmap does both
//! on every access, even with no log set up: a few percent of a 64-byte packet's cost).

use std::sync::Arc;

use vm_memory::bitmap::Bitmap;
use vm_memory::mmap::MmapRegion;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

use super::chain::{for_each_range, GuestSeg};
use super::GuestMem;

/// Guest memory with no dirty bitmap (see [`PlainShadow`]).
pub type PlainMem = GuestMemoryMmap<()>;

/// The regions of one guest-memory snapshot seen again as [`PlainMem`]: same host addresses,
/// no dirty bitmap. Keeps its snapshot alive, so the aliased mappings outlive it.
#[derive(Debug)]
pub struct PlainShadow {
    // Declared first: dropped before the snapshot whose mappings it aliases.
    plain: PlainMem,
    source: Arc<GuestMem>,
}

impl PlainShadow {
    /// The shadow of `source`; `None` when it has no regions (no memory table yet).
    pub fn of(source: &Arc<GuestMem>) -> Option<Self> {
        let mut regions = Vec::new();
        for region in source.iter() {
            let size = usize::try_from(region.len()).ok()?;
            // SAFETY: `region.as_ptr()..+size` is a live mapping of `source`, which this value
            // keeps alive (field `source`) for as long as `plain` exists; a raw region does not
            // unmap on drop.
            let mapping = unsafe {
                MmapRegion::<()>::build_raw(region.as_ptr(), size, region.prot(), region.flags())
            }
            .ok()?;
            regions.push(GuestRegionMmap::new(mapping, region.start_addr())?);
        }
        if regions.is_empty() {
            return None;
        }
        let plain = GuestMemoryMmap::from_regions(regions).ok()?;
        Some(Self {
            plain,
            source: source.clone(),
        })
    }

    /// The shadow memory itself.
    pub fn plain(&self) -> &PlainMem {
        &self.plain
    }

    /// Whether this is the shadow of `snapshot`.
    pub fn is_of(&self, snapshot: &Arc<GuestMem>) -> bool {
        Arc::ptr_eq(&self.source, snapshot)
    }

    /// Keeps `shadow` the shadow of `view`'s snapshot: rebuilt after the frontend remapped
    /// memory, dropped when the snapshot has no regions.
    pub fn sync(shadow: &mut Option<Self>, view: GuestView<'_>) {
        if shadow.as_ref().is_some_and(|s| s.is_of(view.mem)) {
            return;
        }
        *shadow = Self::of(view.mem);
    }
}

/// Runs `$body` with `$mem` bound to the memory the view's ring accesses go through: the
/// [`PlainShadow`] while nothing is logged, the logged memory otherwise (two instances of
/// `$body`, one per memory type).
macro_rules! with_ring_mem {
    ($view:expr, |$mem:ident| $body:expr) => {
        match $view.plain() {
            Some($mem) => $body,
            None => {
                let $mem = $view.mem();
                $body
            }
        }
    };
}
pub(crate) use with_ring_mem;

/// Guest memory for one pass of a worker, with its dirty-logging policy.
#[derive(Debug, Clone, Copy)]
pub struct GuestView<'m> {
    mem: &'m Arc<GuestMem>,
    log_kernel_writes: bool,
    /// The same snapshot without dirty bitmap, for ring accesses while nothing is logged.
    plain: Option<&'m PlainMem>,
}

impl<'m> GuestView<'m> {
    /// A view of the snapshot `mem`. `log_kernel_writes`: the driver acked `VHOST_F_LOG_ALL`.
    pub fn new(mem: &'m Arc<GuestMem>, log_kernel_writes: bool) -> Self {
        Self {
            mem,
            log_kernel_writes,
            plain: None,
        }
    }

    /// This view, with ring accesses through `shadow` when it is this snapshot's and nothing
    /// is logged.
    pub fn with_shadow<'s>(self, shadow: Option<&'s PlainShadow>) -> GuestView<'s>
    where
        'm: 's,
    {
        let plain = shadow
            .filter(|s| !self.log_kernel_writes && s.is_of(self.mem))
            .map(|s| &s.plain);
        GuestView {
            mem: self.mem,
            log_kernel_writes: self.log_kernel_writes,
            plain,
        }
    }

    /// The memory without dirty bitmap for ring accesses, when they need no logging (see
    /// [`with_ring_mem`]).
    pub fn plain(&self) -> Option<&'m PlainMem> {
        self.plain
    }

    /// Whether writes must reach the dirty log (the driver acked `VHOST_F_LOG_ALL`).
    pub fn logs_writes(&self) -> bool {
        self.log_kernel_writes
    }

    /// The memory itself (for the virtqueue calls that take it).
    pub fn mem(&self) -> &'m GuestMem {
        self.mem
    }

    /// The snapshot, to keep it alive beyond this pass (cached host addresses point into it).
    pub fn snapshot(&self) -> &'m Arc<GuestMem> {
        self.mem
    }

    /// Whether `other` is this same snapshot (and not a remapped one).
    pub fn is_snapshot(&self, other: &Arc<GuestMem>) -> bool {
        Arc::ptr_eq(self.mem, other)
    }

    /// Copies bytes `offset..offset + out.len()` of the segments into `out` (through
    /// vm-memory's checked accessors); returns how many bytes were copied.
    pub fn read(&self, segs: &[GuestSeg], offset: usize, out: &mut [u8]) -> usize {
        let mut copied = 0usize;
        for_each_range(segs, offset, out.len(), |addr, take| {
            let ok = self
                .mem
                .read_slice(&mut out[copied..copied + take], addr)
                .is_ok();
            if ok {
                copied += take;
            }
            ok
        })
    }

    /// Writes `data` at byte `offset` of the segments through vm-memory (which marks the pages
    /// dirty for migration); returns how many bytes were written.
    pub fn write(&self, segs: &[GuestSeg], offset: usize, data: &[u8]) -> usize {
        let mut written = 0usize;
        for_each_range(segs, offset, data.len(), |addr, take| {
            let ok = self
                .mem
                .write_slice(&data[written..written + take], addr)
                .is_ok();
            if ok {
                written += take;
            }
            ok
        })
    }

    /// Appends iovecs for bytes `offset..offset + len` of the segments, at most `max_iovs` in
    /// `iovs` in total. Returns the bytes covered.
    ///
    /// The iovecs point into this snapshot's mapping: valid while the snapshot is alive.
    pub fn push_iovecs(
        &self,
        segs: &[GuestSeg],
        offset: usize,
        len: usize,
        iovs: &mut Vec<libc::iovec>,
        max_iovs: usize,
    ) -> usize {
        for_each_range(segs, offset, len, |addr, take| {
            let mut covered = 0usize;
            for slice in GuestMemoryBackend::get_slices(&**self.mem, addr, take) {
                let Ok(slice) = slice else { return false };
                if iovs.len() == max_iovs {
                    return false;
                }
                iovs.push(libc::iovec {
                    iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                    iov_len: slice.len(),
                });
                covered += slice.len();
            }
            covered == take
        })
    }

    /// Records that the kernel wrote bytes `offset..offset + len` of the segments behind
    /// vm-memory's back: marks them dirty while migration logging is on.
    pub fn kernel_wrote(&self, segs: &[GuestSeg], offset: usize, len: usize) {
        if self.log_kernel_writes {
            self.mark_dirty(segs, offset, len);
        }
    }

    fn mark_dirty(&self, segs: &[GuestSeg], offset: usize, len: usize) {
        for_each_range(segs, offset, len, |addr: GuestAddress, take| {
            for slice in GuestMemoryBackend::get_slices(&**self.mem, addr, take) {
                let Ok(slice) = slice else { return false };
                slice.bitmap().mark_dirty(0, slice.len());
            }
            true
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::test_memory;

    fn segs() -> [GuestSeg; 2] {
        [
            GuestSeg {
                addr: GuestAddress(0x4000),
                len: 10,
            },
            GuestSeg {
                addr: GuestAddress(0x5000),
                len: 30,
            },
        ]
    }

    #[test]
    fn reads_and_writes_straddle_segments() {
        let mem = test_memory();
        let view = GuestView::new(&mem, false);
        let data: Vec<u8> = (0..20).collect();
        assert_eq!(view.write(&segs(), 5, &data), 20);
        let mut back = [0u8; 20];
        assert_eq!(view.read(&segs(), 5, &mut back), 20);
        assert_eq!(&back[..], &data[..]);
        let mut raw = [0u8; 5];
        mem.read_slice(&mut raw, GuestAddress(0x4005)).unwrap();
        assert_eq!(raw, [0, 1, 2, 3, 4]);
        mem.read_slice(&mut raw, GuestAddress(0x5000)).unwrap();
        assert_eq!(raw, [5, 6, 7, 8, 9]);
        // Past the end: nothing.
        assert_eq!(view.read(&segs(), 40, &mut back), 0);
        // Partly past the end: what fits.
        assert_eq!(view.write(&segs(), 30, &data), 10);
    }

    #[test]
    fn iovecs_cover_the_range_and_respect_the_limit() {
        let mem = test_memory();
        let view = GuestView::new(&mem, false);
        let mut iovs = Vec::new();
        assert_eq!(view.push_iovecs(&segs(), 8, 100, &mut iovs, 8), 32);
        assert_eq!((iovs[0].iov_len, iovs[1].iov_len), (2, 30));
        assert_eq!(
            iovs[1].iov_base as usize,
            mem.get_host_address(GuestAddress(0x5000)).unwrap() as usize
        );
        let mut one = Vec::new();
        assert_eq!(view.push_iovecs(&segs(), 0, 40, &mut one, 1), 10);
        assert_eq!(one.len(), 1);
    }

    #[test]
    fn shadow_aliases_the_snapshot_and_is_used_only_without_logging() {
        let mem = test_memory();
        let shadow = PlainShadow::of(&mem).expect("one region");
        assert!(shadow.is_of(&mem));
        shadow
            .plain
            .write_obj(0xabcd_u16, GuestAddress(0x8000))
            .unwrap();
        assert_eq!(mem.read_obj::<u16>(GuestAddress(0x8000)).unwrap(), 0xabcd);
        let view = GuestView::new(&mem, false).with_shadow(Some(&shadow));
        assert!(view.plain().is_some());
        assert!(with_ring_mem!(view, |m| m
            .check_address(GuestAddress(0x8000))
            .is_some()));
        let logged = GuestView::new(&mem, true).with_shadow(Some(&shadow));
        assert!(
            logged.plain().is_none(),
            "logged writes go through the bitmap"
        );
        let other = test_memory();
        let foreign = GuestView::new(&other, false).with_shadow(Some(&shadow));
        assert!(
            foreign.plain().is_none(),
            "another snapshot's shadow is not used"
        );
        let mut slot = None;
        PlainShadow::sync(&mut slot, GuestView::new(&other, false));
        assert!(slot.as_ref().is_some_and(|s| s.is_of(&other)));
        let empty = Arc::new(GuestMem::new());
        PlainShadow::sync(&mut slot, GuestView::new(&empty, false));
        assert!(slot.is_none(), "no regions, no shadow");
    }

    #[test]
    fn same_snapshot_is_recognised() {
        let mem = test_memory();
        let other = test_memory();
        let view = GuestView::new(&mem, false);
        assert!(view.is_snapshot(&mem.clone()));
        assert!(!view.is_snapshot(&other));
    }
}
