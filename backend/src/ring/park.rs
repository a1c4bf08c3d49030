//! Rings a guest broke beyond one chain, and parking them.
//!
//! Two faults make a whole split ring unusable, not just one chain: an `avail->idx` more than
//! the queue size ahead of the device (virtio-queue then refuses every pop, while
//! `enable_notification` keeps reporting work, so a worker that trusted it would spin forever),
//! and a head index out of range (no descriptor to return: the used ring cannot be kept in
//! step). The device cannot repair either; the virtio spec has it stop using the ring until the
//! driver resets it. So the worker *parks* the ring: it no longer pops from it or re-enables its
//! notifications, counts the fault once and tells the frontend. The ring comes back when the
//! frontend re-initialises it (a driver reset: `GET_VRING_BASE`, then new `SET_VRING_ADDR` /
//! `SET_VRING_BASE`), which [`ParkedRing::still_parked`] notices, or with a new connection.

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use thiserror::Error;
use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::Bitmap;
use vm_memory::GuestMemoryMmap;

use super::GuestMem;

/// Why a ring as a whole is unusable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum RingFault {
    /// `avail->idx` moved more than the queue size ahead of the device.
    #[error("avail index {avail} is more than the queue size {size} ahead of {next}")]
    AvailIndexJump {
        /// The driver's `avail->idx`.
        avail: u16,
        /// The device's next avail position.
        next: u16,
        /// Queue size.
        size: u16,
    },
    /// An avail ring entry names a descriptor beyond the queue size.
    #[error("head index {head} out of range (queue size {size})")]
    HeadOutOfRange {
        /// The head index the driver published.
        head: u16,
        /// Queue size.
        size: u16,
    },
}

/// The avail-index fault, if the driver's `avail->idx` is more than the queue size ahead of the
/// device. Checked only when a pop found nothing (virtio-queue returns nothing for this fault
/// too), so the hot path pays nothing.
pub fn avail_index_jump<B: Bitmap + 'static>(
    queue: &Queue,
    mem: &GuestMemoryMmap<B>,
) -> Option<RingFault> {
    let avail = queue.avail_idx(mem, Ordering::Acquire).ok()?;
    let next = Wrapping(queue.next_avail());
    let size = queue.size();
    ((avail - next).0 > size).then_some(RingFault::AvailIndexJump {
        avail: avail.0,
        next: next.0,
        size,
    })
}

/// The head-index fault for a chain whose head is `head`.
pub fn head_out_of_range(queue: &Queue, head: u16) -> Option<RingFault> {
    let size = queue.size();
    (head >= size).then_some(RingFault::HeadOutOfRange { head, size })
}

/// What identifies one set-up of a ring: the frontend changes some of it whenever it
/// re-initialises the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RingSetup {
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
    size: u16,
    next_avail: u16,
    next_used: u16,
}

impl RingSetup {
    fn of(queue: &Queue) -> Self {
        Self {
            desc_table: queue.desc_table(),
            avail_ring: queue.avail_ring(),
            used_ring: queue.used_ring(),
            size: queue.size(),
            next_avail: queue.next_avail(),
            next_used: queue.next_used(),
        }
    }
}

/// A ring parked after a [`RingFault`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParkedRing {
    fault: RingFault,
    setup: RingSetup,
}

impl ParkedRing {
    /// Parks the ring of `queue` for `fault`.
    pub fn new(fault: RingFault, queue: &Queue) -> Self {
        Self {
            fault,
            setup: RingSetup::of(queue),
        }
    }

    /// The fault that parked the ring.
    pub fn fault(&self) -> RingFault {
        self.fault
    }

    /// Whether the ring must stay parked. While parked the device neither pops nor adds used
    /// entries, so its positions and addresses change only when the frontend re-initialises
    /// the ring (`SET_VRING_ADDR`, `SET_VRING_BASE`). An index jump that the driver has since
    /// taken back (its driver reset rewrote `avail->idx`) also ends it.
    pub fn still_parked(&self, queue: &Queue, mem: &GuestMem) -> bool {
        if RingSetup::of(queue) != self.setup {
            return false;
        }
        match self.fault {
            RingFault::AvailIndexJump { .. } => avail_index_jump(queue, mem).is_some(),
            RingFault::HeadOutOfRange { .. } => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::test_memory;
    use virtio_queue::mock::MockSplitQueue;

    #[test]
    fn index_jump_is_detected_and_ends_when_taken_back_or_re_set_up() {
        let mem = test_memory();
        let vq = MockSplitQueue::new(&*mem, 16);
        let mut q: Queue = vq.create_queue().unwrap();
        vq.avail().idx().store(16u16.to_le());
        assert_eq!(avail_index_jump(&q, &mem), None, "a full ring is fine");
        vq.avail().idx().store(17u16.to_le());
        let fault = avail_index_jump(&q, &mem).expect("jump");
        assert!(matches!(fault, RingFault::AvailIndexJump { avail: 17, .. }));
        let parked = ParkedRing::new(fault, &q);
        assert!(parked.still_parked(&q, &mem));
        // The driver takes it back.
        vq.avail().idx().store(0u16.to_le());
        assert!(!parked.still_parked(&q, &mem));
        // Or the frontend sets the ring up again (SET_VRING_BASE).
        vq.avail().idx().store(17u16.to_le());
        q.set_next_avail(3);
        assert!(!parked.still_parked(&q, &mem));
    }

    #[test]
    fn head_out_of_range_stays_parked_until_re_set_up() {
        let mem = test_memory();
        let vq = MockSplitQueue::new(&*mem, 16);
        let mut q: Queue = vq.create_queue().unwrap();
        assert_eq!(head_out_of_range(&q, 15), None);
        let fault = head_out_of_range(&q, 16).expect("out of range");
        let parked = ParkedRing::new(fault, &q);
        assert!(parked.still_parked(&q, &mem));
        q.set_next_used(0);
        assert!(parked.still_parked(&q, &mem), "same set-up");
        q.set_desc_table_address(Some(0x8000), None);
        assert!(!parked.still_parked(&q, &mem));
    }
}
