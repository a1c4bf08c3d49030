//! Moving frames: TAP reads into TX buffers, used RX buffers written to the TAP.
//!
//! No byte of a frame is copied here. A TAP read lands in a TX buffer in guest memory
//! (virtio-net header first, as the TAP writes it with `IFF_VNET_HDR`), and the buffers of a
//! received frame go to the TAP with one `writev` over guest memory. What this code touches is
//! ring entries and the 12-byte headers.

use std::io;
use std::os::fd::RawFd;

use crate::features::{F_GUEST_CSUM, F_GUEST_TSO4};
use crate::layout::Layout;
use crate::memory::GuestRam;
use crate::ring::{BadUsed, SplitRing, Used, DESC_F_WRITE};
use crate::tap::VNET_HDR_LEN;
use crate::vnet::{self, HeaderFault};

/// Shortest frame worth sending: a virtio-net header and an Ethernet header.
const MIN_TX_READ: usize = VNET_HDR_LEN + 14;
/// TX buffers published to vnpd at most between two publications, so that vnpd starts on a
/// long burst before the TAP is drained.
const TX_PUBLISH_BATCH: u32 = 64;

/// Counters, printed when the fixture stops (`key=value`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Frames read from the TAP and posted on the TX ring.
    pub tx_frames: u64,
    /// Their bytes (virtio-net header excluded).
    pub tx_bytes: u64,
    /// Of them, TSO frames (`gso_type` set).
    pub tx_gso_frames: u64,
    /// Times the TX ring was full and the TAP was left to queue.
    pub tx_ring_full: u64,
    /// TAP reads shorter than a header pair, dropped.
    pub tx_drop_runt: u64,
    /// TAP read errors other than "nothing to read".
    pub tx_read_errors: u64,
    /// Frames written to the TAP.
    pub rx_frames: u64,
    /// Their bytes (virtio-net header excluded).
    pub rx_bytes: u64,
    /// Of them, coalesced frames (`gso_type` set).
    pub rx_gso_frames: u64,
    /// RX buffers used by vnpd (a mergeable frame uses several).
    pub rx_buffers: u64,
    /// Frames dropped: `num_buffers` 0 or larger than the ring.
    pub rx_drop_num_buffers: u64,
    /// Frames dropped: a used length shorter than the header or longer than the buffer.
    pub rx_drop_length: u64,
    /// Frames dropped: an offload in the header that was not negotiated.
    pub rx_drop_offload: u64,
    /// Frames the TAP refused (`writev` failed, e.g. an invalid GSO header or a down link).
    pub rx_drop_tap: u64,
}

impl Stats {
    /// One line of `key=value` pairs.
    pub fn line(&self) -> String {
        let s = self;
        format!(
            "tx_frames={} tx_bytes={} tx_gso_frames={} tx_ring_full={} tx_drop_runt={} \
             tx_read_errors={} rx_frames={} rx_bytes={} rx_gso_frames={} rx_buffers={} \
             rx_drop_num_buffers={} rx_drop_length={} rx_drop_offload={} rx_drop_tap={}",
            s.tx_frames,
            s.tx_bytes,
            s.tx_gso_frames,
            s.tx_ring_full,
            s.tx_drop_runt,
            s.tx_read_errors,
            s.rx_frames,
            s.rx_bytes,
            s.rx_gso_frames,
            s.rx_buffers,
            s.rx_drop_num_buffers,
            s.rx_drop_length,
            s.rx_drop_offload,
            s.rx_drop_tap
        )
    }
}

/// What a TX pass ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxState {
    /// The TAP has nothing more to read.
    Drained,
    /// No free TX buffer: stop reading the TAP until vnpd returns some.
    RingFull,
}

/// Both queues' driver state for one device session.
#[derive(Debug)]
pub struct Datapath<'a> {
    ram: &'a GuestRam,
    layout: Layout,
    acked: u64,
    rx: SplitRing,
    tx: SplitRing,
    tx_free: Vec<u16>,
    rx_frame: Vec<Used>,
    iov: Vec<libc::iovec>,
    /// Counters (kept across sessions by the caller).
    pub stats: Stats,
}

impl<'a> Datapath<'a> {
    /// Fresh rings: every descriptor written, every RX buffer posted (not yet published:
    /// vnpd learns the ring addresses first), every TX buffer free.
    pub fn new(ram: &'a GuestRam, layout: Layout, stats: Stats) -> Datapath<'a> {
        let mut rx = SplitRing::new(layout.rx_ring(), layout.rx_size);
        let mut tx = SplitRing::new(layout.tx_ring(), layout.tx_size);
        rx.reset(ram);
        tx.reset(ram);
        for id in 0..layout.rx_size {
            rx.set_desc(ram, id, layout.rx_buf(id), layout.rx_buf_len, DESC_F_WRITE);
            rx.push_avail(ram, id);
        }
        for id in 0..layout.tx_size {
            tx.set_desc(ram, id, layout.tx_buf(id), 0, 0);
        }
        Datapath {
            ram,
            layout,
            acked: 0,
            rx,
            tx,
            tx_free: (0..layout.tx_size).rev().collect(),
            rx_frame: Vec::new(),
            iov: Vec::new(),
            stats,
        }
    }

    /// The rings, for the device set-up.
    pub fn rings(&self) -> (&SplitRing, &SplitRing) {
        (&self.rx, &self.tx)
    }

    /// Starts forwarding with the features vnpd acked: publishes the RX buffers, turns TX
    /// completion interrupts off (completions are reaped before each TAP read). Returns
    /// whether vnpd wants an RX kick.
    pub fn start(&mut self, acked: u64) -> bool {
        self.acked = acked;
        self.tx.set_interrupts(self.ram, false);
        self.rx.publish(self.ram);
        self.rx.needs_kick(self.ram)
    }

    /// Takes back the TX buffers vnpd has finished with.
    pub fn tx_reclaim(&mut self) -> Result<(), BadUsed> {
        for _ in 0..self.tx.pending(self.ram) {
            let used = self.tx.take_used(self.ram)?;
            self.tx_free.push(used.id);
        }
        Ok(())
    }

    /// Whether TX buffers are free.
    pub fn tx_has_room(&self) -> bool {
        !self.tx_free.is_empty()
    }

    /// Asks vnpd for TX completion interrupts while the ring is full, or stops asking.
    /// After turning them on, reclaim once more: a completion in between raised none.
    pub fn tx_wait_for_room(&mut self, wait: bool) -> Result<(), BadUsed> {
        self.tx.set_interrupts(self.ram, wait);
        if wait {
            self.tx_reclaim()?;
        }
        Ok(())
    }

    /// Reads frames from the TAP into TX buffers until it is empty or the ring is full,
    /// publishing in batches. Returns the state and whether vnpd wants a kick.
    pub fn tx_pass(&mut self, tap: RawFd) -> Result<(TxState, bool), BadUsed> {
        self.tx_reclaim()?;
        let mut unpublished = 0;
        let mut kick = false;
        let state = loop {
            let Some(id) = self.tx_free.pop() else {
                self.stats.tx_ring_full += 1;
                break TxState::RingFull;
            };
            match self.read_frame(tap, id) {
                Ok(Some(len)) => {
                    self.tx.set_desc_len(self.ram, id, len);
                    self.tx.push_avail(self.ram, id);
                    unpublished += 1;
                }
                Ok(None) => self.tx_free.push(id),
                Err(()) => {
                    self.tx_free.push(id);
                    break TxState::Drained;
                }
            }
            if unpublished == TX_PUBLISH_BATCH {
                self.tx.publish(self.ram);
                kick |= self.tx.needs_kick(self.ram);
                unpublished = 0;
            }
        };
        if unpublished > 0 {
            self.tx.publish(self.ram);
            kick |= self.tx.needs_kick(self.ram);
        }
        Ok((state, kick))
    }

    /// One TAP read into TX buffer `id`: `Ok(Some(len))` to post, `Ok(None)` for a dropped
    /// frame, `Err(())` when the TAP is empty (or failed).
    fn read_frame(&mut self, tap: RawFd, id: u16) -> Result<Option<u32>, ()> {
        let gpa = self.layout.tx_buf(id);
        let cap = self.layout.tx_buf_len as usize;
        let ptr = self
            .ram
            .ptr(gpa, cap)
            .expect("TX buffer inside guest memory");
        // SAFETY: `ptr..ptr+cap` is a TX buffer inside the shared mapping; vnpd does not touch
        // it while it is free (not in the available ring). The kernel writes at most `cap`.
        let n = unsafe { libc::read(tap, ptr.cast(), cap) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if !matches!(err.raw_os_error(), Some(libc::EAGAIN | libc::EINTR)) {
                self.stats.tx_read_errors += 1;
            }
            return Err(());
        }
        let n = n as usize;
        if n < MIN_TX_READ {
            self.stats.tx_drop_runt += 1;
            return Ok(None);
        }
        let header = vnet::prepare_tx_header(self.ram, gpa);
        self.stats.tx_frames += 1;
        self.stats.tx_bytes += (n - VNET_HDR_LEN) as u64;
        if header.is_gso() {
            self.stats.tx_gso_frames += 1;
        }
        Ok(Some(n as u32))
    }

    /// Writes every complete frame vnpd has put in the RX ring to the TAP and posts the
    /// buffers again. Returns whether vnpd wants a kick.
    pub fn rx_pass(&mut self, tap: RawFd) -> Result<bool, BadUsed> {
        let mut reposted = 0;
        while self.rx.pending(self.ram) > 0 {
            let used = self.rx.take_used(self.ram)?;
            self.stats.rx_buffers += 1;
            self.rx_frame.push(used);
            let first = self.rx_frame[0];
            let want = vnet::num_buffers(self.ram, self.layout.rx_buf(first.id));
            if want == 0 || want > self.layout.rx_size {
                self.stats.rx_drop_num_buffers += 1;
            } else if self.rx_frame.len() < usize::from(want) {
                continue;
            } else {
                self.deliver(tap);
            }
            for used in self.rx_frame.drain(..) {
                self.rx.push_avail(self.ram, used.id);
                reposted += 1;
            }
        }
        if reposted == 0 {
            return Ok(false);
        }
        self.rx.publish(self.ram);
        Ok(self.rx.needs_kick(self.ram))
    }

    /// Checks the frame in `rx_frame` and writes it to the TAP in one `writev`.
    fn deliver(&mut self, tap: RawFd) {
        let first = self.rx_frame[0];
        let lengths_fit = first.len as usize >= VNET_HDR_LEN
            && self
                .rx_frame
                .iter()
                .all(|u| u.len <= self.layout.rx_buf_len);
        if !lengths_fit {
            self.stats.rx_drop_length += 1;
            return;
        }
        let header = vnet::read_header(self.ram, self.layout.rx_buf(first.id));
        let guest_csum = self.acked & F_GUEST_CSUM != 0;
        let guest_tso = self.acked & F_GUEST_TSO4 != 0;
        if let Err(HeaderFault) = header.check_rx(guest_csum, guest_tso) {
            self.stats.rx_drop_offload += 1;
            return;
        }
        self.iov.clear();
        let mut bytes = 0usize;
        for used in &self.rx_frame {
            let len = used.len as usize;
            let ptr = self
                .ram
                .ptr(self.layout.rx_buf(used.id), len)
                .expect("RX buffer inside guest memory");
            self.iov.push(libc::iovec {
                iov_base: ptr.cast(),
                iov_len: len,
            });
            bytes += len;
        }
        let count = libc::c_int::try_from(self.iov.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: every iovec points into an RX buffer inside the shared mapping, within the
        // buffer's length (checked above); vnpd has handed these buffers back (used ring) and
        // does not write them until they are posted again. The kernel only reads them.
        let n = unsafe { libc::writev(tap, self.iov.as_ptr(), count) };
        if n < 0 {
            self.stats.rx_drop_tap += 1;
            return;
        }
        self.stats.rx_frames += 1;
        self.stats.rx_bytes += (bytes - VNET_HDR_LEN) as u64;
        if header.is_gso() {
            self.stats.rx_gso_frames += 1;
        }
    }
}
