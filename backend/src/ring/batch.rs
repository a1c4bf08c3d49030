//! The messages of one `sendmmsg` or `recvmmsg`, with the buffers they point at.
//!
//! Each message is `[head (local, HEAD bytes)] [guest memory ...] [tail (local, 0..=TAIL
//! bytes)]` plus a peer address: on TX the head is the encapsulation header, the middle the
//! guest's packet, the tail options; on RX the kernel writes the header into the head, the
//! payload straight into guest buffers and the sender into the address. The batch owns the
//! heads, tails, addresses, iovecs and `mmsghdr`s and reuses them from batch to batch; the
//! pointers between them are only filled in by [`MsgBatch::prepare`], once nothing moves any
//! more, right before the system call.

use std::mem::size_of;

/// One message of a batch.
#[derive(Clone, Copy)]
pub struct Msg<const HEAD: usize, const TAIL: usize> {
    /// Local bytes before the guest bytes.
    pub head: [u8; HEAD],
    /// Local bytes after the guest bytes (`tail_len` of them are sent).
    pub tail: [u8; TAIL],
    /// How many tail bytes the message carries.
    pub tail_len: usize,
    /// The peer: where to send, or who sent.
    pub name: libc::sockaddr_in,
    /// Guest bytes the message's iovecs cover.
    pub guest_len: usize,
    /// Free for the caller (e.g. the packet length to count once it is sent).
    pub tag: usize,
    iov_start: usize,
    iov_end: usize,
}

impl<const HEAD: usize, const TAIL: usize> std::fmt::Debug for Msg<HEAD, TAIL> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Msg")
            .field("tail_len", &self.tail_len)
            .field("guest_len", &self.guest_len)
            .field("tag", &self.tag)
            .finish_non_exhaustive()
    }
}

/// A batch of messages for one `sendmmsg`/`recvmmsg`.
pub struct MsgBatch<const HEAD: usize, const TAIL: usize> {
    msgs: Vec<Msg<HEAD, TAIL>>,
    iovs: Vec<libc::iovec>,
    mmsgs: Vec<libc::mmsghdr>,
    /// A message is being built (between `open` and `close`).
    open: bool,
}

impl<const HEAD: usize, const TAIL: usize> std::fmt::Debug for MsgBatch<HEAD, TAIL> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MsgBatch")
            .field("msgs", &self.msgs.len())
            .field("iovs", &self.iovs.len())
            .finish()
    }
}

// SAFETY: the raw pointers inside `iovs`/`mmsgs` are only dereferenced by the system call
// that follows `prepare` on the same thread, and `prepare` rewrites every pointer into the
// batch itself; guest-memory pointers stay valid wherever the batch lives as long as the
// caller keeps the snapshot alive. Moving the batch to another thread (a worker handler is
// created on the serve thread) therefore dereferences nothing across threads.
unsafe impl<const HEAD: usize, const TAIL: usize> Send for MsgBatch<HEAD, TAIL> {}

impl<const HEAD: usize, const TAIL: usize> MsgBatch<HEAD, TAIL> {
    /// An empty batch with room for `capacity` messages of `iovs_per_msg` iovecs.
    pub fn with_capacity(capacity: usize, iovs_per_msg: usize) -> Self {
        Self {
            msgs: Vec::with_capacity(capacity),
            iovs: Vec::with_capacity(capacity * iovs_per_msg),
            mmsgs: Vec::with_capacity(capacity),
            open: false,
        }
    }

    /// Empties the batch (keeping its allocations).
    pub fn clear(&mut self) {
        self.msgs.clear();
        self.iovs.clear();
        self.mmsgs.clear();
        self.open = false;
    }

    /// Messages in the batch.
    pub fn len(&self) -> usize {
        self.msgs.len()
    }

    /// Whether the batch has no message.
    pub fn is_empty(&self) -> bool {
        self.msgs.is_empty()
    }

    /// Starts a message to or from `name` (an open message not closed yet is dropped) and
    /// returns it for the caller to fill its head and tail.
    pub fn open(&mut self, name: libc::sockaddr_in) -> &mut Msg<HEAD, TAIL> {
        self.abandon();
        let iov_start = self.iovs.len();
        // The head's iovec; its base is set by `prepare`.
        self.iovs.push(libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: HEAD,
        });
        self.msgs.push(Msg {
            head: [0; HEAD],
            tail: [0; TAIL],
            tail_len: 0,
            name,
            guest_len: 0,
            tag: 0,
            iov_start,
            iov_end: iov_start + 1,
        });
        self.open = true;
        let last = self.msgs.len() - 1;
        &mut self.msgs[last]
    }

    /// The batch's iovecs, for the caller to append the open message's guest iovecs.
    pub fn guest_iovecs(&mut self) -> &mut Vec<libc::iovec> {
        debug_assert!(self.open, "no open message");
        &mut self.iovs
    }

    /// Finishes the open message: its iovecs are the head, the guest iovecs appended since
    /// `open` (covering `guest_len` bytes), and the tail when it has bytes.
    pub fn close(&mut self, guest_len: usize) {
        if !self.open {
            return;
        }
        self.open = false;
        let Some(msg) = self.msgs.last_mut() else {
            return;
        };
        msg.guest_len = guest_len;
        if msg.tail_len > 0 {
            self.iovs.push(libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: msg.tail_len.min(TAIL),
            });
        }
        msg.iov_end = self.iovs.len();
    }

    /// Drops the open message, if any, with the iovecs appended for it.
    pub fn abandon(&mut self) {
        if !self.open {
            return;
        }
        self.open = false;
        if let Some(msg) = self.msgs.pop() {
            self.iovs.truncate(msg.iov_start);
        }
    }

    /// Message `i`.
    pub fn msg(&self, i: usize) -> &Msg<HEAD, TAIL> {
        &self.msgs[i]
    }

    /// Every message.
    pub fn msgs(&self) -> &[Msg<HEAD, TAIL>] {
        &self.msgs
    }

    /// Points every `mmsghdr` at its message's address and iovecs, and the head and tail
    /// iovecs at the message's buffers; returns the headers for the system call. Nothing of the
    /// batch may change between this call and the system call (the borrow ensures it).
    pub fn prepare(&mut self) -> &mut [libc::mmsghdr] {
        self.abandon();
        self.mmsgs.clear();
        for m in self.msgs.iter_mut() {
            self.iovs[m.iov_start].iov_base = m.head.as_mut_ptr().cast();
            if m.tail_len > 0 {
                self.iovs[m.iov_end - 1].iov_base = m.tail.as_mut_ptr().cast();
            }
            // SAFETY: mmsghdr is a plain C struct for which all-zero bytes is a valid value.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_name = (&mut m.name as *mut libc::sockaddr_in).cast();
            h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_hdr.msg_iov = self.iovs[m.iov_start..].as_mut_ptr();
            h.msg_hdr.msg_iovlen = m.iov_end - m.iov_start;
            self.mmsgs.push(h);
        }
        &mut self.mmsgs
    }

    /// After the system call: bytes transferred for message `i` and the kernel's flags
    /// (`MSG_TRUNC`, ...). Zero for messages the call did not reach.
    pub fn result(&self, i: usize) -> (usize, libc::c_int) {
        self.mmsgs
            .get(i)
            .map_or((0, 0), |h| (h.msg_len as usize, h.msg_hdr.msg_flags))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{SocketAddrV4, UdpSocket};
    use std::os::fd::AsRawFd;

    fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
        libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: a.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*a.ip()).to_be(),
            },
            sin_zero: [0; 8],
        }
    }

    #[test]
    fn messages_carry_head_middle_and_tail_in_order() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = match rx.local_addr().unwrap() {
            std::net::SocketAddr::V4(a) => a,
            _ => unreachable!(),
        };
        let middle = *b"guest-bytes";
        let mut batch: MsgBatch<4, 3> = MsgBatch::with_capacity(4, 3);
        for i in 0..3u8 {
            let m = batch.open(sockaddr(to));
            m.head = [b'H', i, 0, 0];
            if i == 1 {
                m.tail = *b"TTT";
                m.tail_len = 3;
            }
            batch.guest_iovecs().push(libc::iovec {
                iov_base: middle.as_ptr() as *mut libc::c_void,
                iov_len: middle.len(),
            });
            batch.close(middle.len());
        }
        // An abandoned message leaves nothing behind.
        batch.open(sockaddr(to));
        batch.abandon();
        assert_eq!(batch.len(), 3);
        let fd = tx.as_raw_fd();
        let mmsgs = batch.prepare();
        // SAFETY: the headers point into `batch` and `middle`, both alive and unchanged
        // during the call.
        let n = unsafe { libc::sendmmsg(fd, mmsgs.as_mut_ptr(), mmsgs.len() as u32, 0) };
        assert_eq!(n, 3);
        assert_eq!(batch.result(1).0, 4 + middle.len() + 3);
        let mut buf = [0u8; 64];
        for i in 0..3u8 {
            let got = rx.recv(&mut buf).unwrap();
            let mut want = vec![b'H', i, 0, 0];
            want.extend_from_slice(&middle);
            if i == 1 {
                want.extend_from_slice(b"TTT");
            }
            assert_eq!(&buf[..got], &want[..]);
        }
        batch.clear();
        assert!(batch.is_empty());
    }
}
