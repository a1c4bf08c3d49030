//! Logs, once per device start (`SET_FEATURES`), how long after it the first TX kick, RX kick
//! and socket event came: on a live-migration destination these are the guest's first
//! transmit, its first fresh receive buffers and the first datagram after the resume, the
//! events a migration's network blackout is made of (`docs/benchmarks.md`, migration).

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use super::backend::PairEvent;

/// What was seen since the last start, one bit per event kind.
const TX: u8 = 1;
const RX: u8 = 2;
const SOCKET: u8 = 4;
const ALL: u8 = TX | RX | SOCKET;

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_us() -> u64 {
    u64::try_from(epoch().elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// The first events after a device start. Costs one relaxed load per event once all three
/// were seen.
#[derive(Debug, Default)]
pub(crate) struct StartTrace {
    /// Microseconds since [`epoch`] of the last start.
    started_us: AtomicU64,
    seen: AtomicU8,
}

impl StartTrace {
    /// The device started (the frontend acked its features).
    pub(crate) fn start(&self) {
        self.started_us.store(now_us(), Ordering::Relaxed);
        self.seen.store(0, Ordering::Relaxed);
    }

    /// Notes `event` of queue pair `pair`; logs it if it is its kind's first since the start.
    pub(crate) fn note(&self, event: &PairEvent, pair: usize) {
        if self.seen.load(Ordering::Relaxed) == ALL {
            return;
        }
        let (bit, what) = match event {
            PairEvent::TxKick => (TX, "TX kick (the guest transmits)"),
            PairEvent::RxKick => (RX, "RX kick (the guest adds buffers)"),
            PairEvent::External(_) => (SOCKET, "socket event"),
        };
        if self.seen.fetch_or(bit, Ordering::Relaxed) & bit == 0 {
            let since = now_us().saturating_sub(self.started_us.load(Ordering::Relaxed));
            log::info!(
                "device: first {what} on pair {pair} {:.1} ms after the start",
                since as f64 / 1000.0
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_is_first_once_per_start() {
        let t = StartTrace::default();
        t.start();
        t.note(&PairEvent::TxKick, 0);
        assert_eq!(t.seen.load(Ordering::Relaxed), TX);
        t.note(&PairEvent::TxKick, 0);
        t.note(&PairEvent::External(0), 0);
        t.note(&PairEvent::RxKick, 0);
        assert_eq!(t.seen.load(Ordering::Relaxed), ALL);
        t.start();
        assert_eq!(t.seen.load(Ordering::Relaxed), 0, "a new start re-arms");
    }
}
