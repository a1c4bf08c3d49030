//! The RX half's own clock: a non-blocking timerfd in the pair's epoll.
//!
//! The worker is woken by events (kicks, the edge-triggered socket, hand-offs). Two RX states
//! need a wake-up that no event brings:
//! - the ring is out of buffers with datagrams waiting and none arrive any more (the socket is
//!   full, or the burst is over): the stall net (`rx_stall`) must still interrupt the guest
//!   again;
//! - entries published that the guest never looked at (`rx_stall::unseen_verdict`).
//!
//! (A ring that goes live needs no timer: vhost-user-backend 0.24 gives the worker a kick event
//! for each ring it registers, and that runs RX.)
//!
//! One timer serves both: [`RxTimer::arm_within`] keeps the earliest deadline asked for.
//! A wake-up costs a `read` on a timerfd; arming costs one `timerfd_settime`, at most once per
//! deadline, never per packet.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// A one-shot timer with the earliest deadline asked for since it last fired.
#[derive(Debug)]
pub(super) struct RxTimer {
    fd: OwnedFd,
    deadline: Option<Instant>,
}

impl RxTimer {
    pub(super) fn new() -> io::Result<Self> {
        // SAFETY: timerfd_create takes no pointers; the result is checked before use.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a descriptor just created and owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd, deadline: None })
    }

    /// The descriptor to watch (level-triggered: readable while an expiry is unread).
    pub(super) fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Fires within `after` from now; an earlier deadline already set stands.
    pub(super) fn arm_within(&mut self, after: Duration) {
        let at = Instant::now() + after;
        if self.deadline.is_some_and(|d| d <= at) {
            return;
        }
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: after.as_secs() as libc::time_t,
                // At least 1 ns: a zero value would disarm the timer.
                tv_nsec: libc::c_long::from(after.subsec_nanos().max(1)),
            },
        };
        // SAFETY: `spec` is a live itimerspec; a null old value is allowed.
        let rc =
            unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if rc == 0 {
            self.deadline = Some(at);
        } else {
            log::warn!("rx timer: timerfd_settime: {}", io::Error::last_os_error());
        }
    }

    /// The timer's wake-up: reads the expiry (nothing to read after a re-arm is fine, the
    /// descriptor is non-blocking) and forgets the deadline.
    pub(super) fn consume(&mut self) {
        let mut expirations = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a live 8-byte buffer.
        let _ = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                expirations.as_mut_ptr().cast(),
                expirations.len(),
            )
        };
        if self.deadline.is_some_and(|d| d <= Instant::now()) {
            self.deadline = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readable(fd: RawFd, wait_ms: i32) -> bool {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd.
        unsafe { libc::poll(&mut p, 1, wait_ms) == 1 }
    }

    #[test]
    fn the_timer_fires_once_at_the_earliest_deadline_asked_for() {
        let mut t = RxTimer::new().unwrap();
        assert!(!readable(t.raw_fd(), 0), "not armed yet");
        t.arm_within(Duration::from_secs(5));
        t.arm_within(Duration::from_millis(10));
        t.arm_within(Duration::from_secs(5));
        assert!(readable(t.raw_fd(), 1000), "the 10 ms deadline stands");
        t.consume();
        assert!(!readable(t.raw_fd(), 50), "one shot");
        // Consuming with nothing to read does not block.
        t.consume();
        t.arm_within(Duration::from_millis(1));
        assert!(readable(t.raw_fd(), 1000), "armed again after firing");
    }
}
