//! Decisions on a vring as a whole: is it running, does the driver want an interrupt.

use std::sync::atomic::{fence, Ordering};

use vhost_user_backend::VringT;
use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use super::{GuestMem, Vring};

/// Whether the driver enabled the ring and its queue is set up.
pub fn is_live(vring: &Vring) -> bool {
    let state = vring.get_ref();
    state.is_enabled() && state.get_queue().ready()
}

/// Whether the driver wants an interrupt for the used entries just added. With EVENT_IDX this
/// is virtio-queue's `used_event` check; without it, virtio-queue ignores the driver's
/// `VRING_AVAIL_F_NO_INTERRUPT` flag, which polling drivers (DPDK) set: honouring it saves an
/// eventfd write per batch.
pub fn should_signal(vring: &Vring, mem: &GuestMem) -> bool {
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
pub fn notify(vring: &Vring, mem: &GuestMem) {
    if should_signal(vring, mem) {
        let _ = vring.signal_used_queue();
    }
}
