//! The guest's interrupt eventfds arrive after its rings start.
//!
//! QEMU's `vhost_virtqueue_start` sends `VHOST_USER_SET_VRING_KICK` before
//! `VHOST_USER_SET_VRING_CALL`, and vhost-user-backend 0.24 starts a ring on its kick alone, so a
//! worker can fill RX buffers before the ring has a call eventfd; the library's
//! `signal_used_queue` then does nothing. On a live-migration destination that window is not
//! empty: datagrams waited in the VM's socket, and the source's hairpin sends its held
//! stragglers the moment it hears of the resume. A guest that never hears of those buffers
//! never refills its RX ring and never kicks: its receive path stays dead while it still
//! transmits (seen in `migration_blackout`: 256 RX packets, the ring's size, then the VM's UDP
//! socket full with 8 MB). So after each device start, on the first event of a queue pair that
//! finds both its rings with a call eventfd, the device interrupts the guest once on both: a
//! spurious interrupt costs the guest one look at its used rings.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use vhost_user_backend::VringT;

use crate::ring::Vring;

/// Per queue pair: the one interrupt after a start is still owed.
#[derive(Debug, Default)]
pub(crate) struct CallWatch {
    owed: Vec<AtomicBool>,
    /// Events handled while the interrupt was owed and a call eventfd was missing.
    early: Vec<AtomicU32>,
}

impl CallWatch {
    /// A watch over `pairs` queue pairs, nothing owed.
    pub(crate) fn new(pairs: usize) -> Self {
        Self {
            owed: (0..pairs).map(|_| AtomicBool::new(false)).collect(),
            early: (0..pairs).map(|_| AtomicU32::new(0)).collect(),
        }
    }

    /// The device started: each pair owes the guest one interrupt once its eventfds are there.
    pub(crate) fn start(&self) {
        for (owed, early) in self.owed.iter().zip(&self.early) {
            early.store(0, Ordering::Relaxed);
            owed.store(true, Ordering::Release);
        }
    }

    /// After an event of `pair` was handled: pays the owed interrupt if both rings now have a
    /// call eventfd. One relaxed load once paid. Returns whether it interrupted.
    pub(crate) fn settle(&self, pair: usize, rx: &Vring, tx: &Vring) -> bool {
        let Some(owed) = self.owed.get(pair) else {
            return false;
        };
        if !owed.load(Ordering::Relaxed) {
            return false;
        }
        let has_call = |v: &Vring| v.get_ref().get_call().is_some();
        if !(has_call(rx) && has_call(tx)) {
            self.early[pair].fetch_add(1, Ordering::Relaxed);
            return false;
        }
        if !owed.swap(false, Ordering::AcqRel) {
            return false;
        }
        let (r, t) = (rx.signal_used_queue(), tx.signal_used_queue());
        if let Err(e) = r.and(t) {
            log::warn!("device: pair {pair}: interrupting the guest: {e}");
        }
        let early = self.early[pair].load(Ordering::Relaxed);
        if early > 0 {
            log::info!(
                "device: pair {pair}: {early} event(s) came before the guest's interrupt \
                 eventfds; guest interrupted once they were there"
            );
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::GuestMem;
    use std::fs::File;
    use std::os::fd::{FromRawFd, IntoRawFd};
    use vm_memory::GuestMemoryAtomic;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    fn vring() -> Vring {
        Vring::new(GuestMemoryAtomic::new(GuestMem::new()), 16).unwrap()
    }

    /// Gives `v` a call eventfd; returns our end of it.
    fn give_call(v: &Vring) -> EventFd {
        let ours = EventFd::new(EFD_NONBLOCK).unwrap();
        let theirs = ours.try_clone().unwrap();
        // SAFETY: `into_raw_fd` hands over sole ownership of a fresh, open descriptor.
        let file = unsafe { File::from_raw_fd(theirs.into_raw_fd()) };
        v.set_call(Some(file));
        ours
    }

    fn interrupted(e: &EventFd) -> bool {
        e.read().is_ok()
    }

    #[test]
    fn the_guest_is_interrupted_once_its_eventfds_arrive_after_a_start() {
        let (rx, tx) = (vring(), vring());
        let watch = CallWatch::new(1);
        watch.start();
        // Events before SET_VRING_CALL: nothing to signal with yet; still owed.
        assert!(!watch.settle(0, &rx, &tx));
        let rx_call = give_call(&rx);
        assert!(!watch.settle(0, &rx, &tx), "not before both rings have one");
        let tx_call = give_call(&tx);
        assert!(watch.settle(0, &rx, &tx));
        assert!(interrupted(&rx_call) && interrupted(&tx_call));
        // Paid: later events interrupt nothing (the data path signals as usual).
        assert!(!watch.settle(0, &rx, &tx));
        assert!(!interrupted(&rx_call) && !interrupted(&tx_call));
        // The next start owes one again.
        watch.start();
        assert!(watch.settle(0, &rx, &tx));
        assert!(interrupted(&rx_call));
    }

    #[test]
    fn nothing_is_owed_before_a_start_or_for_an_unknown_pair() {
        let (rx, tx) = (vring(), vring());
        let _calls = (give_call(&rx), give_call(&tx));
        let watch = CallWatch::new(1);
        assert!(!watch.settle(0, &rx, &tx));
        watch.start();
        assert!(!watch.settle(5, &rx, &tx));
    }
}
