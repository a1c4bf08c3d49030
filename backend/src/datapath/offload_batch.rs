//! The messages of one `sendmmsg` for frames that asked for an offload: each message is a list
//! of local blocks (VNP header + inner headers, made by vnpd) and guest iovecs (the payload,
//! never copied), optionally with a `UDP_SEGMENT` control message so that the kernel cuts it
//! into datagrams of one segment size (UDP GSO).
//!
//! A TSO frame's message looks like `[VNP|IP|TCP] [payload 0] [VNP|IP|TCP] [payload 1] ...`:
//! each segment's own headers sit at every segment-size boundary, so the kernel replicates
//! only the outer IPv4/UDP headers. As in [`crate::ring::batch::MsgBatch`], pointers into the
//! batch are only filled in by [`OffloadBatch::prepare`], right before the system call.
//!
//! Also here: [`sum_guest`], the ones' complement sum of payload bytes read where they lie in
//! guest memory.

use std::mem::size_of;

use vnp_protocol::wire::{checksum, HEADER_LEN};

use super::tso::MAX_INNER_HEADERS;
use super::udp::GsoControl;

/// Largest local block: a VNP header and the longest inner headers.
pub const BLOCK_LEN: usize = HEADER_LEN + MAX_INNER_HEADERS;

/// One message of the batch.
#[derive(Debug, Clone, Copy)]
pub struct OffloadMsg {
    /// Where to send.
    pub name: libc::sockaddr_in,
    /// UDP GSO segment size; 0: one datagram.
    pub segment_size: u16,
    /// Inner packets the message carries.
    pub packets: u32,
    /// Inner bytes the message carries.
    pub bytes: usize,
    iov_start: usize,
    iov_end: usize,
}

/// Where a batch stood before a frame was added, to take the frame back out.
#[derive(Debug, Clone, Copy)]
pub struct Mark {
    msgs: usize,
    iovs: usize,
    blocks: usize,
    locals: usize,
}

/// A batch of offloaded messages for one `sendmmsg`.
#[derive(Default)]
pub struct OffloadBatch {
    msgs: Vec<OffloadMsg>,
    iovs: Vec<libc::iovec>,
    blocks: Vec<[u8; BLOCK_LEN]>,
    /// (iovec index, block index) of every local block.
    locals: Vec<(usize, usize)>,
    controls: Vec<GsoControl>,
    mmsgs: Vec<libc::mmsghdr>,
}

impl std::fmt::Debug for OffloadBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OffloadBatch")
            .field("msgs", &self.msgs.len())
            .field("iovs", &self.iovs.len())
            .finish()
    }
}

// SAFETY: as for `MsgBatch`: the raw pointers in `iovs`/`mmsgs` are only dereferenced by the
// system call that follows `prepare` on the same thread, and `prepare` rewrites every pointer
// into the batch itself.
unsafe impl Send for OffloadBatch {}

impl OffloadBatch {
    /// Empties the batch (keeping its allocations).
    pub fn clear(&mut self) {
        self.msgs.clear();
        self.iovs.clear();
        self.blocks.clear();
        self.locals.clear();
        self.mmsgs.clear();
    }

    /// Whether the batch has no message.
    pub fn is_empty(&self) -> bool {
        self.msgs.is_empty()
    }

    /// Every message.
    pub fn msgs(&self) -> &[OffloadMsg] {
        &self.msgs
    }

    /// The current state, for [`OffloadBatch::rewind`].
    pub fn mark(&self) -> Mark {
        Mark {
            msgs: self.msgs.len(),
            iovs: self.iovs.len(),
            blocks: self.blocks.len(),
            locals: self.locals.len(),
        }
    }

    /// Takes back everything added since `mark`.
    pub fn rewind(&mut self, mark: Mark) {
        self.msgs.truncate(mark.msgs);
        self.iovs.truncate(mark.iovs);
        self.blocks.truncate(mark.blocks);
        self.locals.truncate(mark.locals);
    }

    /// Starts a message to `name`, cut into datagrams of `segment_size` bytes by the kernel
    /// (0: one datagram).
    pub fn open(&mut self, name: libc::sockaddr_in, segment_size: u16) {
        let at = self.iovs.len();
        self.msgs.push(OffloadMsg {
            name,
            segment_size,
            packets: 0,
            bytes: 0,
            iov_start: at,
            iov_end: at,
        });
    }

    /// Appends a local block of `len` bytes to the open message; returns its index, for
    /// [`OffloadBatch::block_mut`] (it may be written until `prepare`).
    pub fn push_block(&mut self, len: usize) -> usize {
        let index = self.blocks.len();
        self.blocks.push([0; BLOCK_LEN]);
        self.locals.push((self.iovs.len(), index));
        self.iovs.push(libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: len.min(BLOCK_LEN),
        });
        self.extend_open();
        index
    }

    /// Local block `index`.
    pub fn block_mut(&mut self, index: usize) -> &mut [u8; BLOCK_LEN] {
        &mut self.blocks[index]
    }

    /// The iovecs, for the caller to append guest iovecs to the open message (then
    /// [`OffloadBatch::guest_added`]).
    pub fn iovecs(&mut self) -> &mut Vec<libc::iovec> {
        &mut self.iovs
    }

    /// The iovecs from `start` on (to sum what was just appended).
    pub fn iovecs_from(&self, start: usize) -> &[libc::iovec] {
        &self.iovs[start..]
    }

    /// Takes the iovecs appended since the last block into the open message.
    pub fn guest_added(&mut self) {
        self.extend_open();
    }

    /// Counts an inner packet of `bytes` into the open message.
    pub fn count_packet(&mut self, bytes: usize) {
        if let Some(m) = self.msgs.last_mut() {
            m.packets += 1;
            m.bytes += bytes;
        }
    }

    fn extend_open(&mut self) {
        if let Some(m) = self.msgs.last_mut() {
            m.iov_end = self.iovs.len();
        }
    }

    /// Points every `mmsghdr` at its message's address, iovecs and control message, and the
    /// local iovecs at their blocks; returns the headers for the system call. Nothing of the
    /// batch may change between this call and the system call (the borrow ensures it).
    pub fn prepare(&mut self) -> &mut [libc::mmsghdr] {
        for &(iov, block) in &self.locals {
            self.iovs[iov].iov_base = self.blocks[block].as_mut_ptr().cast();
        }
        self.mmsgs.clear();
        self.controls.clear();
        self.controls.resize(self.msgs.len(), GsoControl::default());
        for (m, control) in self.msgs.iter_mut().zip(self.controls.iter_mut()) {
            // SAFETY: mmsghdr is a plain C struct for which all-zero bytes is a valid value.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_name = (&mut m.name as *mut libc::sockaddr_in).cast();
            h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_hdr.msg_iov = self.iovs[m.iov_start..].as_mut_ptr();
            h.msg_hdr.msg_iovlen = m.iov_end - m.iov_start;
            if m.segment_size > 0 {
                control.attach(&mut h.msg_hdr, m.segment_size);
            }
            self.mmsgs.push(h);
        }
        &mut self.mmsgs
    }

    /// After the system call: whether message `i` was sent.
    pub fn sent(&self, i: usize) -> bool {
        self.mmsgs.get(i).is_some_and(|h| h.msg_len > 0)
    }
}

/// The ones' complement sum (as [`checksum::sum`]) of the bytes the iovecs cover, in order,
/// read where they lie.
///
/// # Safety
/// Every iovec must cover memory valid for reads for the duration of the call (guest memory in
/// a snapshot the caller keeps alive, each range checked when its chain was collected).
pub unsafe fn sum_guest(iovs: &[libc::iovec]) -> u16 {
    let mut total = 0u16;
    let mut odd = false;
    for iov in iovs {
        // SAFETY: the caller's guarantee for this iovec.
        let s = unsafe { sum_volatile(iov.iov_base as *const u8, iov.iov_len) };
        // A piece starting at an odd offset sums with its bytes swapped (RFC 1071, 2.B).
        total = checksum::combine(&[total, if odd { s.swap_bytes() } else { s }]);
        odd ^= iov.iov_len % 2 == 1;
    }
    total
}

/// [`checksum::sum`] of `len` bytes at `ptr`, read with volatile loads: the guest may write
/// them at any time (its own packet's checksum is then wrong, nothing else), so they are never
/// turned into a Rust slice.
///
/// # Safety
/// `ptr..ptr + len` must be valid for reads during the call.
unsafe fn sum_volatile(ptr: *const u8, len: usize) -> u16 {
    let head = ptr.align_offset(8).min(len);
    let words = (len - head) / 8;
    let tail = len - head - words * 8;
    let mut small = [0u8; 8];
    for (i, b) in small.iter_mut().enumerate().take(head) {
        // SAFETY: i < head <= len: inside the caller's range.
        *b = unsafe { std::ptr::read_volatile(ptr.wrapping_add(i)) };
    }
    let head_sum = checksum::sum(&small[..head]);
    // 8-aligned (or head == len and words == 0).
    let aligned = ptr.wrapping_add(head).cast::<u64>();
    let mut acc: u64 = 0;
    for i in 0..words {
        // SAFETY: word i lies inside ptr..ptr + len, 8-aligned.
        let w = unsafe { std::ptr::read_volatile(aligned.wrapping_add(i)) };
        // Two native-endian 32-bit halves: at most 2^33 per word, 2^13 words per 64 KiB.
        acc += (w & 0xffff_ffff) + (w >> 32);
    }
    // The sum of native-endian words is the byte-swapped sum of big-endian ones on a
    // little-endian machine (RFC 1071, 2.B): `from_be` swaps exactly there.
    let mid_sum = u16::from_be(checksum::fold(acc));
    let tail_at = head + words * 8;
    for (i, b) in small.iter_mut().enumerate().take(tail) {
        // SAFETY: tail_at + i < len: inside the caller's range.
        *b = unsafe { std::ptr::read_volatile(ptr.wrapping_add(tail_at + i)) };
    }
    let tail_sum = checksum::sum(&small[..tail]);
    let shift = |s: u16| if head % 2 == 1 { s.swap_bytes() } else { s };
    checksum::combine(&[head_sum, shift(mid_sum), shift(tail_sum)])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn iov(data: &[u8]) -> libc::iovec {
        libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        }
    }

    proptest! {
        /// Any bytes, any alignment, cut into any pieces: the same sum as `checksum::sum`.
        #[test]
        fn guest_sum_equals_checksum_sum(
            data in proptest::collection::vec(any::<u8>(), 0..300),
            skip in 0usize..8,
            cuts in proptest::collection::vec(any::<usize>(), 0..5),
        ) {
            let skip = skip.min(data.len());
            let data = &data[skip..];
            let mut at: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
            at.push(0);
            at.push(data.len());
            at.sort_unstable();
            let iovs: Vec<libc::iovec> = at.windows(2).map(|w| iov(&data[w[0]..w[1]])).collect();
            // SAFETY: the iovecs cover `data`, alive during the call.
            let got = unsafe { sum_guest(&iovs) };
            prop_assert_eq!(checksum::fold(u64::from(got)), checksum::sum(data));
        }
    }
}
