//! Packets that waited for a token, on their way back to the worker that queued them.
//!
//! A token is installed by another thread (the control thread, or the RX worker that learned a
//! return token). It must not send the waiting packets itself: a flow's packets all come from
//! one TX queue, so its worker is the one thread that may send them, or a newer packet of the
//! flow could leave before older ones. Instead the installer posts them here, one [`Handoff`]
//! per queue pair (a queue plus an eventfd in that pair's epoll), *before* the token becomes
//! visible (`PeerTable::install`). The worker sends what was handed to it when the eventfd
//! fires, and before each TX batch: a packet that found the token in the batch can only have
//! done so after its predecessors were posted, so they go out first.

use std::collections::VecDeque;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::peers::SendInfo;

/// A packet that waited for a token, with where and how to send it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandedOff {
    /// The destination VM.
    pub dst: Ipv4Addr,
    /// Endpoint and token.
    pub info: SendInfo,
    /// The inner IPv4 packet.
    pub packet: Vec<u8>,
    /// Attach a return token (the first packet to a new peer, when it fits the MTU; claimed
    /// when handed off, since the entry is not visible in the peer table yet).
    pub return_token: bool,
}

/// Most locally made frames (service-bridge replies) waiting for one worker; beyond it the
/// oldest are dropped (TCP retransmits what mattered).
pub const MAX_FRAMES: usize = 512;

/// The hand-off queue of one queue pair's worker.
#[derive(Debug)]
pub struct Handoff {
    queue: Mutex<VecDeque<HandedOff>>,
    /// Ethernet frames made on the host for the guest's RX queue (service-bridge replies),
    /// delivered by the worker when woken (it owns the RX ring).
    frames: Mutex<VecDeque<Vec<u8>>>,
    /// Set on post, cleared on take: lets the TX path skip the lock when nothing waits.
    waiting: AtomicBool,
    wake: EventFd,
}

impl Handoff {
    /// An empty queue with its wake-up eventfd.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            queue: Mutex::new(VecDeque::new()),
            frames: Mutex::new(VecDeque::new()),
            waiting: AtomicBool::new(false),
            wake: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<HandedOff>> {
        // Every update is a single push or drain: a poisoned queue is still consistent.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Posts packets for the worker, oldest first, and wakes it.
    pub fn post(&self, packets: impl IntoIterator<Item = HandedOff>) {
        let mut queue = self.lock();
        let before = queue.len();
        queue.extend(packets);
        if queue.len() == before {
            return;
        }
        self.waiting.store(true, Ordering::Release);
        drop(queue);
        // A failed write leaves the counter saturated, which still wakes the worker.
        let _ = self.wake.write(1);
    }

    /// Whether packets may be waiting (cheap: no lock).
    pub fn has_waiting(&self) -> bool {
        self.waiting.load(Ordering::Acquire)
    }

    /// Moves every waiting packet to `out`, oldest first, and consumes the wake-up (always,
    /// even when nothing waits: a post may have raced with an earlier take).
    pub fn take(&self, out: &mut Vec<HandedOff>) {
        // Consume the wake-up first: a post after this point wakes the worker again.
        let _ = self.wake.read();
        let mut queue = self.lock();
        self.waiting.store(false, Ordering::Release);
        out.extend(queue.drain(..));
    }

    /// Posts frames for the guest's RX queue and wakes the worker; returns how many older
    /// frames were dropped to stay within [`MAX_FRAMES`].
    pub fn post_frames(&self, frames: Vec<Vec<u8>>) -> usize {
        if frames.is_empty() {
            return 0;
        }
        let mut queue = self.frames.lock().unwrap_or_else(|e| e.into_inner());
        queue.extend(frames);
        let dropped = queue.len().saturating_sub(MAX_FRAMES);
        queue.drain(..dropped);
        drop(queue);
        let _ = self.wake.write(1);
        dropped
    }

    /// Moves the frames waiting for the guest to `out` (the wake-up is consumed by `take`).
    pub fn take_frames(&self, out: &mut Vec<Vec<u8>>) {
        let mut queue = self.frames.lock().unwrap_or_else(|e| e.into_inner());
        out.extend(queue.drain(..));
    }

    /// Drops every waiting packet (port stopping); returns how many.
    pub fn discard(&self) -> usize {
        let mut queue = self.lock();
        self.waiting.store(false, Ordering::Release);
        let n = queue.len();
        queue.clear();
        n
    }
}

impl AsRawFd for Handoff {
    /// The eventfd the worker's epoll watches.
    fn as_raw_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddrV4;
    use vnp_protocol::token::{Expiry, Token};

    fn packet(n: u8) -> HandedOff {
        HandedOff {
            dst: Ipv4Addr::new(10, 0, 0, 3),
            info: SendInfo {
                endpoint: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9),
                token: Token::from_bytes([1; 8]),
                expiry: Expiry(100),
            },
            packet: vec![n],
            return_token: n == 1,
        }
    }

    fn readable(fd: RawFd) -> bool {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        unsafe { libc::poll(&mut p, 1, 0) == 1 }
    }

    #[test]
    fn posted_packets_wake_the_worker_and_come_out_in_order() {
        let h = Handoff::new().unwrap();
        assert!(!h.has_waiting());
        assert!(!readable(h.as_raw_fd()));
        h.post([packet(1), packet(2)]);
        h.post([packet(3)]);
        assert!(h.has_waiting());
        assert!(readable(h.as_raw_fd()));
        let mut out = Vec::new();
        h.take(&mut out);
        let order: Vec<u8> = out.iter().map(|p| p.packet[0]).collect();
        assert_eq!(order, vec![1, 2, 3]);
        assert!(!h.has_waiting());
        assert!(!readable(h.as_raw_fd()), "the wake-up was consumed");
        // Posting nothing does not wake.
        h.post([]);
        assert!(!readable(h.as_raw_fd()));
        h.post([packet(4)]);
        assert_eq!(h.discard(), 1);
    }

    #[test]
    fn a_wake_up_without_packets_is_still_consumed() {
        // A post whose wake-up lands after a take already drained its packets leaves the
        // eventfd readable with nothing waiting; the next take must clear it, or the
        // level-triggered epoll would spin.
        let h = Handoff::new().unwrap();
        h.wake.write(1).unwrap();
        assert!(!h.has_waiting());
        let mut out = Vec::new();
        h.take(&mut out);
        assert!(out.is_empty());
        assert!(!readable(h.as_raw_fd()));
    }
}
