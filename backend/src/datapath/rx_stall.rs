//! A guest that takes no RX buffers while datagrams wait for it: interrupt it again.
//!
//! The worker interrupts the guest only when the driver asks for it (EVENT_IDX's `used_event`,
//! or no `VRING_AVAIL_F_NO_INTERRUPT`). An interrupt lost on the way leaves a guest that never
//! hears of the buffers vnpd filled: with EVENT_IDX the used index has already passed the
//! driver's `used_event`, so no later entry asks for one, and once the ring is full there is no
//! later entry. The guest still transmits; its receive path is dead (seen after live
//! migrations: 256 datagrams delivered, the ring's size, then the VM's socket full). The known
//! window, a ring started before it has a call eventfd, is closed at the device start
//! (`device::call_watch`); this is the net under it and under any window not known: when the
//! ring has been out of buffers with datagrams waiting for [`RESIGNAL_AFTER`], the worker writes
//! the call eventfd whatever the driver asked, and again each [`RESIGNAL_AFTER`] while it lasts.
//! A spurious interrupt costs the guest one look at its used ring.

use std::time::{Duration, Instant};

/// How long the ring may stay out of buffers, with datagrams waiting, before the guest is
/// interrupted again.
pub(super) const RESIGNAL_AFTER: Duration = Duration::from_millis(50);

/// One RX ring's stall clock.
#[derive(Debug, Default)]
pub(super) struct RxStall {
    /// When the ring was found out of buffers (or the guest last interrupted again).
    since: Option<Instant>,
    /// Interrupts sent again in this stall.
    resent: u32,
}

impl RxStall {
    /// The guest added buffers: whatever it was, the stall is over.
    pub(super) fn progress(&mut self) {
        self.since = None;
        self.resent = 0;
    }

    /// The ring is out of buffers with datagrams waiting at `now`. `Some(n)`: interrupt the
    /// guest again, the `n`th time in this stall.
    pub(super) fn out_of_buffers(&mut self, now: Instant) -> Option<u32> {
        match self.since {
            Some(t) if now.saturating_duration_since(t) >= RESIGNAL_AFTER => {
                self.since = Some(now);
                self.resent += 1;
                Some(self.resent)
            }
            Some(_) => None,
            None => {
                self.since = Some(now);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ring_out_of_buffers_is_interrupted_again_after_the_delay_and_then_each_delay() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut s = RxStall::default();
        assert_eq!(
            s.out_of_buffers(t0),
            None,
            "a ring just found empty is normal"
        );
        assert_eq!(s.out_of_buffers(ms(49)), None);
        assert_eq!(s.out_of_buffers(ms(50)), Some(1));
        assert_eq!(s.out_of_buffers(ms(60)), None, "not again at once");
        assert_eq!(s.out_of_buffers(ms(100)), Some(2));
    }

    #[test]
    fn buffers_added_end_the_stall() {
        let t0 = Instant::now();
        let mut s = RxStall::default();
        assert_eq!(s.out_of_buffers(t0), None);
        s.progress();
        let later = t0 + RESIGNAL_AFTER * 3;
        assert_eq!(
            s.out_of_buffers(later),
            None,
            "a new stall starts its own clock"
        );
        assert_eq!(s.out_of_buffers(later + RESIGNAL_AFTER), Some(1));
    }
}
