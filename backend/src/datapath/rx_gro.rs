//! Receiving VNP datagrams with UDP GRO into vnpd's own buffers.
//!
//! With `UDP_GRO` on the socket the kernel hands one `recvmmsg` message per *train* of
//! datagrams of one sender: up to 64 KiB of equal-sized datagrams back to back (the last may
//! be shorter), with a `UDP_GRO` control message giving the size. Each message lands in a
//! 64 KiB slot of a host buffer owned by the worker (a smaller buffer would make the kernel
//! truncate the train and lose its tail), and [`segment_ranges`] splits it back into its VNP
//! datagrams. Nothing is written to guest memory before the receive checks passed: the
//! datagrams are copied into the guest's RX buffers afterwards (see `rx.rs`), so a rejected
//! datagram is never visible to the guest, not even while it is being checked.

use std::io;
use std::mem::size_of;
use std::net::{SocketAddrV4, UdpSocket};
use std::ops::Range;
use std::os::fd::AsRawFd;

use super::udp;

/// Bytes of one message slot: the largest UDP payload (a GRO train is capped by the UDP
/// length field), rounded up.
pub const SLOT_BYTES: usize = 64 * 1024;
/// Room for the control messages of one message (`UDP_GRO`: one `int`), 8-byte aligned.
const CONTROL_WORDS: usize = 8;

/// Turns on UDP GRO for `socket`. Best effort: on a kernel without it (before 5.0) every
/// message is one datagram, which the receive path handles the same way.
pub fn enable_gro(socket: &UdpSocket) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: a plain setsockopt on a socket we own, with a pointer to a live c_int and its
    // size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_UDP,
            libc::UDP_GRO,
            (&on as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The byte ranges of the datagrams in a received message of `len` bytes that the kernel
/// coalesced with segment size `gso_size` (0: not coalesced, one datagram).
pub fn segment_ranges(len: usize, gso_size: usize) -> impl Iterator<Item = Range<usize>> {
    let step = if gso_size == 0 { len.max(1) } else { gso_size };
    (0..len)
        .step_by(step)
        .map(move |start| start..(start + step).min(len))
}

/// One received message.
#[derive(Debug, Clone, Copy)]
pub struct Received<'a> {
    /// The sender (the kernel's `msg_name`), when it is an IPv4 address.
    pub src: Option<SocketAddrV4>,
    /// The bytes: one datagram, or a GRO train of them.
    pub data: &'a [u8],
    /// The train's segment size (0: one datagram).
    pub gso_size: usize,
    /// The kernel truncated the message (larger than a slot).
    pub truncated: bool,
}

/// The host buffers, addresses, control buffers and headers of one `recvmmsg`, reused from
/// batch to batch.
pub struct RecvBatch {
    data: Vec<u8>,
    names: Vec<libc::sockaddr_in>,
    control: Vec<[u64; CONTROL_WORDS]>,
    iovs: Vec<libc::iovec>,
    mmsgs: Vec<libc::mmsghdr>,
    received: usize,
}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch")
            .field("slots", &self.names.len())
            .field("received", &self.received)
            .finish()
    }
}

// SAFETY: the raw pointers in `iovs`/`mmsgs` point into this value's own vectors and are
// rewritten by `receive` right before the system call on the calling thread; nothing is
// dereferenced across threads.
unsafe impl Send for RecvBatch {}

impl RecvBatch {
    /// Buffers for up to `slots` messages. The memory is only touched (made resident) as
    /// messages arrive.
    pub fn new(slots: usize) -> Self {
        Self {
            data: vec![0; slots * SLOT_BYTES],
            // SAFETY: sockaddr_in is a plain C struct; all-zero is a valid value.
            names: vec![unsafe { std::mem::zeroed() }; slots],
            control: vec![[0; CONTROL_WORDS]; slots],
            iovs: Vec::with_capacity(slots),
            // SAFETY: mmsghdr is a plain C struct; all-zero is a valid value.
            mmsgs: vec![unsafe { std::mem::zeroed() }; slots],
            received: 0,
        }
    }

    /// Messages the last [`RecvBatch::receive`] got.
    pub fn len(&self) -> usize {
        self.received
    }

    /// Whether the last receive got nothing.
    pub fn is_empty(&self) -> bool {
        self.received == 0
    }

    /// Receives up to `n` messages (at most the slot count) without blocking.
    pub fn receive(&mut self, socket: &UdpSocket, n: usize) -> io::Result<usize> {
        let n = n.min(self.names.len());
        self.received = 0;
        self.iovs.clear();
        let base = self.data.as_mut_ptr();
        for i in 0..n {
            self.iovs.push(libc::iovec {
                // SAFETY: `i < slots`, so the slot lies inside `data`.
                iov_base: unsafe { base.add(i * SLOT_BYTES) }.cast(),
                iov_len: SLOT_BYTES,
            });
        }
        for i in 0..n {
            let h = &mut self.mmsgs[i];
            // SAFETY: mmsghdr is a plain C struct; all-zero is a valid value.
            *h = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_name = (&mut self.names[i] as *mut libc::sockaddr_in).cast();
            h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_hdr.msg_iov = &mut self.iovs[i];
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = self.control[i].as_mut_ptr().cast();
            h.msg_hdr.msg_controllen = CONTROL_WORDS * 8;
        }
        // SAFETY: every header points at this batch's own slots, addresses and control
        // buffers, all alive and not otherwise borrowed during the call.
        let got = unsafe { udp::recv_batch(socket, &mut self.mmsgs[..n]) }?;
        self.received = got;
        Ok(got)
    }

    /// Message `i` of the last receive (`i < len()`).
    pub fn message(&self, i: usize) -> Received<'_> {
        let h = &self.mmsgs[i];
        let len = (h.msg_len as usize).min(SLOT_BYTES);
        let start = i * SLOT_BYTES;
        Received {
            src: udp::from_sockaddr_in(&self.names[i]),
            data: &self.data[start..start + len],
            gso_size: gro_segment_size(&h.msg_hdr),
            truncated: h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
        }
    }

    /// The bytes at `range` of the flat buffer (`range` from [`RecvBatch::offset_of`] plus
    /// lengths inside one message).
    pub fn bytes(&self, range: Range<usize>) -> &[u8] {
        &self.data[range]
    }

    /// The bytes at `range`, writable: vnpd's own buffer, so rewriting an accepted packet's
    /// headers (reverse NAT) never touches guest memory.
    pub fn bytes_mut(&mut self, range: Range<usize>) -> &mut [u8] {
        &mut self.data[range]
    }

    /// Where message `i` starts in the flat buffer.
    pub fn offset_of(i: usize) -> usize {
        i * SLOT_BYTES
    }
}

/// The `UDP_GRO` segment size in a received message's control data (0 when absent).
fn gro_segment_size(hdr: &libc::msghdr) -> usize {
    if hdr.msg_control.is_null() || hdr.msg_controllen == 0 {
        return 0;
    }
    // The kernel filled `msg_control` (our own 8-byte aligned buffer of `CONTROL_WORDS * 8`
    // bytes) and set `msg_controllen` to what it wrote; the CMSG macros stay inside that
    // length.
    // SAFETY: `hdr` is a live msghdr whose control buffer is as described above.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(hdr) };
    while !c.is_null() {
        // SAFETY: a non-null header from CMSG_FIRSTHDR/CMSG_NXTHDR lies inside the buffer.
        let cmsg = unsafe { std::ptr::read_unaligned(c) };
        let want = size_of::<libc::c_int>() as u32;
        // SAFETY: CMSG_LEN is a pure size computation.
        let min_len = unsafe { libc::CMSG_LEN(want) } as usize;
        if cmsg.cmsg_level == libc::SOL_UDP
            && cmsg.cmsg_type == libc::UDP_GRO
            && cmsg.cmsg_len as usize >= min_len
        {
            // SAFETY: CMSG_DATA only offsets the header pointer.
            let data = unsafe { libc::CMSG_DATA(c) }.cast::<libc::c_int>();
            // SAFETY: the header says its data holds at least one c_int, inside the buffer.
            let v = unsafe { std::ptr::read_unaligned(data) };
            return usize::try_from(v).unwrap_or(0);
        }
        // SAFETY: `c` is a header inside `hdr`'s control buffer; NXTHDR checks the bounds.
        c = unsafe { libc::CMSG_NXTHDR(hdr, c) };
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn trains_split_at_the_segment_size() {
        let r: Vec<_> = segment_ranges(3000, 1400).collect();
        assert_eq!(r, vec![0..1400, 1400..2800, 2800..3000]);
        let r: Vec<_> = segment_ranges(2800, 1400).collect();
        assert_eq!(r, vec![0..1400, 1400..2800]);
        assert_eq!(segment_ranges(90, 0).collect::<Vec<_>>(), vec![0..90]);
        // A segment size larger than the message: one datagram.
        assert_eq!(segment_ranges(90, 1400).collect::<Vec<_>>(), vec![0..90]);
        assert_eq!(segment_ranges(0, 0).count(), 0);
    }

    /// A real GSO send on loopback reaches a GRO socket as one train, which splits back into
    /// the datagrams that were sent.
    #[test]
    fn gso_train_arrives_coalesced_and_splits_back() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        enable_gro(&rx).unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let seg: u16 = 1000;
        let v: libc::c_int = seg.into();
        // SAFETY: plain setsockopt with a pointer to a live c_int.
        let rc = unsafe {
            libc::setsockopt(
                tx.as_raw_fd(),
                libc::SOL_UDP,
                libc::UDP_SEGMENT,
                (&v as *const libc::c_int).cast(),
                4,
            )
        };
        assert_eq!(rc, 0);
        let payload: Vec<u8> = (0..2500u32).map(|i| (i / 1000) as u8 + 1).collect();
        tx.send_to(&payload, rx.local_addr().unwrap()).unwrap();
        rx.set_nonblocking(true).unwrap();
        let mut batch = RecvBatch::new(4);
        let mut got = 0;
        for _ in 0..100 {
            got = batch.receive(&rx, 4).unwrap();
            if got > 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(got, 1, "one train");
        let m = batch.message(0);
        assert_eq!(m.data.len(), 2500);
        assert_eq!(m.gso_size, 1000);
        assert!(!m.truncated);
        assert_eq!(m.src.map(|a| *a.ip()), Some(Ipv4Addr::LOCALHOST));
        let parts: Vec<_> = segment_ranges(m.data.len(), m.gso_size)
            .map(|r| m.data[r].to_vec())
            .collect();
        assert_eq!(parts.len(), 3);
        for (i, p) in parts.iter().enumerate() {
            assert!(p.iter().all(|b| usize::from(*b) == i + 1), "segment {i}");
        }
    }
}
