//! Pacing for `--rate`: how many datagrams the sender may send now, and how long it sleeps
//! before the next ones, to hold a fixed average rate (pure: the caller passes the time).
//!
//! Why: a closed-loop benchmark partner (vnpd behind testpmd) may move far fewer packets per
//! second than the unpaced floor, and a receiver that gets more packets per wake-up pays less
//! per packet. Sending at the partner's rate compares the two at the same packet rate.

use std::time::Duration;

/// Backlog the pacer lets the sender catch up on after it was kept from running (a loaded
/// machine): at most this long a stretch of missed sends; older debt is forgiven, so a stall
/// never turns into a long full-speed burst.
pub const MAX_CATCH_UP: Duration = Duration::from_millis(10);

/// A fixed-rate send schedule: `rate` datagrams per second from time zero.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pacer {
    rate: f64,
    batch: u64,
    /// Datagrams the schedule counts as sent (including forgiven debt).
    credited: u64,
}

/// What the sender does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Send this many datagrams now (1..=batch).
    Send(usize),
    /// Nothing is due yet: sleep this long.
    Sleep(Duration),
}

impl Pacer {
    /// A schedule of `rate` datagrams per second sent in calls of up to `batch`; `None` unless
    /// the rate is a positive finite number and the batch is not zero.
    pub fn new(rate: f64, batch: usize) -> Option<Self> {
        (rate.is_finite() && rate > 0.0 && batch > 0).then_some(Self {
            rate,
            batch: batch as u64,
            credited: 0,
        })
    }

    /// The step at `elapsed` since the start. Datagrams are due once a whole batch is due (so
    /// calls stay full, like the unpaced sender's) or, when less than a batch is due, once the
    /// next datagram's time has come and the previous call has been accounted.
    pub fn step(&mut self, elapsed: Duration) -> Step {
        let due_total = (elapsed.as_secs_f64() * self.rate) as u64;
        let oldest_allowed =
            ((elapsed.saturating_sub(MAX_CATCH_UP)).as_secs_f64() * self.rate) as u64;
        // Forgive debt older than MAX_CATCH_UP.
        self.credited = self.credited.max(oldest_allowed);
        let due = due_total.saturating_sub(self.credited);
        if due >= self.batch {
            return Step::Send(self.batch as usize);
        }
        // Sleep until a whole batch is due.
        let batch_due_at = (self.credited + self.batch) as f64 / self.rate;
        let wait = Duration::from_secs_f64((batch_due_at - elapsed.as_secs_f64()).max(0.0));
        if wait.is_zero() {
            // Rounding: the batch is due now after all.
            return Step::Send(self.batch as usize);
        }
        Step::Sleep(wait)
    }

    /// Records that `sent` datagrams went out (a call may send fewer than asked).
    pub fn sent(&mut self, sent: usize) {
        self.credited += sent as u64;
    }

    /// The rate asked for, datagrams per second.
    pub fn rate(&self) -> f64 {
        self.rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn nonsense_rates_are_refused() {
        for rate in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(Pacer::new(rate, 32).is_none(), "{rate}");
        }
        assert!(Pacer::new(1000.0, 0).is_none());
        assert_eq!(Pacer::new(1000.0, 32).unwrap().rate(), 1000.0);
    }

    #[test]
    fn sends_full_batches_at_the_rate_and_sleeps_between() {
        // 32,000 per second in batches of 32: one batch per millisecond.
        let mut pacer = Pacer::new(32_000.0, 32).unwrap();
        match pacer.step(Duration::ZERO) {
            Step::Sleep(d) => assert!((d.as_secs_f64() - 0.001).abs() < 1e-9, "{d:?}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(pacer.step(ms(1)), Step::Send(32));
        pacer.sent(32);
        match pacer.step(ms(1)) {
            Step::Sleep(d) => assert!((d.as_secs_f64() - 0.001).abs() < 1e-9, "{d:?}"),
            other => panic!("{other:?}"),
        }
        // A simulated second: the sender follows the steps exactly.
        let mut pacer = Pacer::new(32_000.0, 32).unwrap();
        let (mut now, mut total) = (Duration::ZERO, 0usize);
        while now < Duration::from_secs(1) {
            match pacer.step(now) {
                Step::Send(n) => {
                    pacer.sent(n);
                    total += n;
                }
                Step::Sleep(d) => now += d,
            }
        }
        assert!((31_968..=32_032).contains(&total), "{total}");
    }

    #[test]
    fn a_short_sent_call_is_made_up_and_a_stall_is_not_a_long_burst() {
        let mut pacer = Pacer::new(32_000.0, 32).unwrap();
        assert_eq!(pacer.step(ms(2)), Step::Send(32));
        pacer.sent(10);
        // 64 due, 10 sent: still a full batch due.
        assert_eq!(pacer.step(ms(2)), Step::Send(32));
        pacer.sent(32);
        // 22 left due: not a whole batch, wait for it.
        assert!(matches!(pacer.step(ms(2)), Step::Sleep(_)));
        // Stalled for a second: only MAX_CATCH_UP (10 ms = 320 datagrams) is caught up on.
        let mut burst = 0;
        while let Step::Send(n) = pacer.step(ms(1002)) {
            pacer.sent(n);
            burst += n;
        }
        assert_eq!(burst, 320);
    }
}
