//! Decisions on a vring as a whole: is it running, does the driver want an interrupt.

use std::sync::atomic::{fence, Ordering};

use vhost_user_backend::VringT;
use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::QueueT;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::Vring;

/// Whether the driver enabled the ring and its queue is set up.
pub fn is_live(vring: &Vring) -> bool {
    let state = vring.get_ref();
    state.is_enabled() && state.get_queue().ready()
}

/// Whether the driver wants an interrupt for the used entries just added. With EVENT_IDX this
/// is virtio-queue's `used_event` check; without it, virtio-queue ignores the driver's
/// `VRING_AVAIL_F_NO_INTERRUPT` flag, which polling drivers (DPDK) set: honouring it saves an
/// eventfd write per batch.
pub fn should_signal<B: Bitmap + 'static>(vring: &Vring, mem: &GuestMemoryMmap<B>) -> bool {
    let mut state = vring.get_mut();
    let queue = state.get_queue_mut();
    if queue.event_idx_enabled() {
        return queue.needs_notification(mem).unwrap_or(true);
    }
    // The used ring writes must be visible before we read the driver's flag.
    fence(Ordering::SeqCst);
    let flags: u16 = mem
        .load(GuestAddress(queue.avail_ring()), Ordering::Acquire)
        .map(u16::from_le)
        .unwrap_or(0);
    flags & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0
}

/// Signals the driver if it wants to be told about new used entries.
pub fn notify<B: Bitmap + 'static>(vring: &Vring, mem: &GuestMemoryMmap<B>) {
    if should_signal(vring, mem) {
        let _ = vring.signal_used_queue();
    }
}

/// The driver's side of a ring with `VIRTIO_RING_F_EVENT_IDX`, read from guest memory:
/// `(avail->idx, used_event, the device's next used index, queue size)`. `None` without
/// EVENT_IDX or when the ring cannot be read.
pub fn event_idx_marks<B: Bitmap + 'static>(
    vring: &Vring,
    mem: &GuestMemoryMmap<B>,
) -> Option<(u16, u16, u16, u16)> {
    let state = vring.get_ref();
    let queue = state.get_queue();
    if !queue.event_idx_enabled() || !queue.ready() {
        return None;
    }
    let avail = queue.avail_idx(mem, Ordering::Acquire).ok()?.0;
    // `used_event` follows the available ring's `size` entries (virtio 1.x, 2.7.10).
    let at = queue
        .avail_ring()
        .checked_add(4 + 2 * u64::from(queue.size()))?;
    let used_event = mem
        .load(GuestAddress(at), Ordering::Acquire)
        .map(u16::from_le)
        .ok()?;
    Some((avail, used_event, queue.next_used(), queue.size()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::test_memory;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryAtomic;

    #[test]
    fn interrupts_follow_the_drivers_no_interrupt_flag() {
        let mem = test_memory();
        let vq = MockSplitQueue::new(&*mem, 16);
        let vring = Vring::new(GuestMemoryAtomic::from(mem.clone()), 16).unwrap();
        assert!(!is_live(&vring), "not set up yet");
        vring.set_queue_size(16);
        vring
            .set_queue_info(vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0)
            .unwrap();
        vring.set_queue_ready(true);
        assert!(!is_live(&vring), "not enabled yet");
        vring.set_enabled(true);
        assert!(is_live(&vring));
        assert!(should_signal(&vring, &mem));
        // A polling driver (DPDK) asks for no interrupts.
        mem.write_obj((VRING_AVAIL_F_NO_INTERRUPT as u16).to_le(), vq.avail_addr())
            .unwrap();
        assert!(!should_signal(&vring, &mem));
    }
}
