//! Used-ring entries written through the ring's host address, published with one index store
//! per batch.
//!
//! virtio-queue's `add_used` makes two checked vm-memory accesses per entry (the element, then
//! the index; each one a region lookup and a slice iterator) and stores the index once per
//! entry. A batch of 32 packets pays that 32 times on each side. [`UsedRing`] resolves the
//! ring's host address once per batch, writes the elements straight into it and stores the
//! index once, with the same release ordering virtio-queue uses, so the driver never sees an
//! index before the elements it covers.
//!
//! It is used only where it changes nothing else:
//! - not while migration logs dirty pages (the caller passes the [`super::PlainMem`] shadow,
//!   which exists only then; logged writes go through vm-memory);
//! - not with `VIRTIO_RING_F_EVENT_IDX`: virtio-queue decides whether to interrupt from a count
//!   of the entries its own `add_used` added, which entries written here would not be part of
//!   (and other paths of the device still add through virtio-queue);
//! - only when the whole ring lies in one piece of the mapping and is 4-byte aligned (as the
//!   virtio spec requires); anything else (a hostile or odd driver) takes virtio-queue's path,
//!   which checks every access.

use std::num::Wrapping;
use std::sync::atomic::{AtomicU16, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::PlainMem;

/// Bytes before the first element: `flags` and `idx`, two `u16` each.
const HEADER: usize = 4;
/// Bytes of one element: `id` and `len`, two `u32` each.
const ELEM: usize = 8;

/// The used ring of one queue in one snapshot of guest memory, by host address.
#[derive(Debug, Clone, Copy)]
pub struct UsedRing {
    /// Host address of the ring (its `flags` field), 4-byte aligned.
    host: usize,
    size: u16,
}

impl UsedRing {
    /// The used ring of `queue` in `mem`, when its entries may bypass virtio-queue (see the
    /// module comment); `None` otherwise. The caller keeps `mem`'s snapshot alive while it
    /// uses the value (in the data path: within the pass that made it).
    pub fn of(queue: &Queue, mem: &PlainMem) -> Option<Self> {
        if queue.event_idx_enabled() || queue.size() == 0 {
            return None;
        }
        let len = HEADER + usize::from(queue.size()) * ELEM;
        let mut slices = mem.get_slices(GuestAddress(queue.used_ring()), len);
        let (Some(Ok(slice)), None) = (slices.next(), slices.next()) else {
            return None;
        };
        let host = slice.ptr_guard_mut().as_ptr() as usize;
        (slice.len() == len && host % 4 == 0).then_some(Self {
            host,
            size: queue.size(),
        })
    }

    /// Adds `entries` (head, bytes written) to the used ring in order, then publishes them
    /// with one store of the index, and advances `queue`'s next used index to match. A head
    /// out of range is skipped, as virtio-queue's `add_used` refuses it. Returns the entries
    /// added.
    pub fn add(&self, queue: &mut Queue, entries: impl IntoIterator<Item = (u16, u32)>) -> usize {
        let start = Wrapping(queue.next_used());
        let mut next = start;
        for (head, len) in entries {
            if head >= self.size {
                log::error!("used ring: head {head} out of range (size {})", self.size);
                continue;
            }
            let at = self.host + HEADER + usize::from(next.0 % self.size) * ELEM;
            // SAFETY: `of` checked that `HEADER + size * ELEM` bytes from `host` lie in one
            // piece of the snapshot's mapping, which the caller keeps alive; `next % size`
            // keeps the element inside; `host` is 4-byte aligned, so is every element. The
            // guest may write its ring concurrently: volatile stores, as vm-memory makes.
            unsafe { std::ptr::write_volatile(at as *mut u32, u32::from(head).to_le()) };
            // SAFETY: as above, the element's second word.
            unsafe { std::ptr::write_volatile((at + 4) as *mut u32, len.to_le()) };
            next += Wrapping(1);
        }
        if next != start {
            // SAFETY: `host + 2` is the ring's `idx` field, inside the checked range and 2-byte
            // aligned; an atomic view of guest memory the guest reads concurrently.
            let idx = unsafe { AtomicU16::from_ptr((self.host + 2) as *mut u16) };
            // Release: the elements are visible before the index that covers them.
            idx.store(next.0.to_le(), Ordering::Release);
            queue.set_next_used(next.0);
        }
        usize::from((next - start).0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::{test_memory, PlainShadow};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes};

    /// A ready queue of `size` entries over fresh test memory (leaked: the mock queue borrows
    /// it for the test's duration), and the memory's plain shadow.
    fn ready(
        size: u16,
    ) -> (
        Queue,
        MockSplitQueue<'static, crate::ring::GuestMem>,
        PlainShadow,
    ) {
        let mem: &'static _ = Box::leak(Box::new(test_memory()));
        let vq = MockSplitQueue::new(&**mem, size);
        let queue: Queue = vq.create_queue().unwrap();
        let shadow = PlainShadow::of(mem).unwrap();
        (queue, vq, shadow)
    }

    #[test]
    fn entries_match_what_virtio_queue_writes_also_across_the_index_wrap() {
        for start in [0u16, 5, 65533] {
            let (mut ours, vq, shadow) = ready(16);
            let (mut theirs, vq2, shadow2) = ready(16);
            ours.set_next_used(start);
            theirs.set_next_used(start);
            let entries = [(3u16, 100u32), (7, 0), (15, 1500), (0, 64), (9, 9)];
            let used = UsedRing::of(&ours, shadow.plain()).expect("plain ring");
            assert_eq!(used.add(&mut ours, entries), 5);
            for (head, len) in entries {
                theirs.add_used(shadow2.plain(), head, len).unwrap();
            }
            assert_eq!(ours.next_used(), start.wrapping_add(5));
            assert_eq!(ours.next_used(), theirs.next_used());
            let len = HEADER + 16 * ELEM;
            let (mut a, mut b) = (vec![0u8; len], vec![0u8; len]);
            shadow.plain().read_slice(&mut a, vq.used_addr()).unwrap();
            shadow2.plain().read_slice(&mut b, vq2.used_addr()).unwrap();
            assert_eq!(a, b, "start {start}");
            let idx: u16 = shadow
                .plain()
                .read_obj(vq.used_addr().unchecked_add(2))
                .unwrap();
            assert_eq!(u16::from_le(idx), start.wrapping_add(5));
        }
    }

    #[test]
    fn out_of_range_heads_are_skipped_and_nothing_added_stores_nothing() {
        let (mut queue, vq, shadow) = ready(8);
        let used = UsedRing::of(&queue, shadow.plain()).unwrap();
        assert_eq!(used.add(&mut queue, [(8u16, 1u32), (u16::MAX, 2)]), 0);
        assert_eq!(queue.next_used(), 0);
        // Write a marker into idx: an empty add leaves it alone.
        let idx_addr = vq.used_addr().unchecked_add(2);
        shadow.plain().write_obj(0x1234u16, idx_addr).unwrap();
        assert_eq!(used.add(&mut queue, []), 0);
        assert_eq!(shadow.plain().read_obj::<u16>(idx_addr).unwrap(), 0x1234);
        assert_eq!(used.add(&mut queue, [(9u16, 1u32), (2, 60)]), 1);
        assert_eq!(u16::from_le(shadow.plain().read_obj(idx_addr).unwrap()), 1);
        let id: u32 = shadow
            .plain()
            .read_obj(vq.used_addr().unchecked_add(4))
            .unwrap();
        assert_eq!(u32::from_le(id), 2);
    }

    #[test]
    fn event_idx_odd_and_broken_rings_take_virtio_queues_path() {
        let (mut queue, _vq, shadow) = ready(16);
        queue.set_event_idx(true);
        assert!(UsedRing::of(&queue, shadow.plain()).is_none(), "EVENT_IDX");
        queue.set_event_idx(false);
        assert!(UsedRing::of(&queue, shadow.plain()).is_some());
        // (A misaligned used ring never gets this far: virtio-queue refuses its address.)
        // Past the end of guest memory (1 MiB), or straddling it.
        queue.set_used_ring_address(Some(0x20_0000), None);
        assert!(UsedRing::of(&queue, shadow.plain()).is_none(), "outside");
        queue.set_used_ring_address(Some(0x10_0000 - 40), None);
        assert!(UsedRing::of(&queue, shadow.plain()).is_none(), "straddles");
    }
}
