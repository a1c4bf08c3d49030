//! The VM's UDP sockets and the batched system calls on them.
//!
//! Each queue pair gets its own socket bound to the VM's `host_addr:udp_port` with `SO_REUSEPORT`,
//! so the kernel spreads incoming flows over the pairs' workers and each worker sends on its own
//! socket without sharing a lock.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;

use socket2::{Domain, Protocol, Socket, Type};

/// Socket buffer size we ask for: bursts of a fast guest must not overflow the default 208 KiB.
const SOCKET_BUFFER: usize = 4 << 20;

fn bind_one(addr: SocketAddrV4, reuse_port: bool) -> io::Result<UdpSocket> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM.cloexec(), Some(Protocol::UDP))?;
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    // Best effort: the kernel caps these at net.core.{r,w}mem_max.
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// Binds `count` sockets to `addr` (port 0 picks one port for all of them) and returns them with
/// the bound address.
pub fn bind_port_sockets(
    addr: SocketAddrV4,
    count: usize,
) -> io::Result<(Vec<UdpSocket>, SocketAddrV4)> {
    let count = count.max(1);
    let reuse = count > 1;
    let first = bind_one(addr, reuse)?;
    let bound = match first.local_addr()? {
        std::net::SocketAddr::V4(a) => a,
        std::net::SocketAddr::V6(_) => {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "not IPv4"))
        }
    };
    let mut sockets = vec![first];
    for _ in 1..count {
        sockets.push(bind_one(bound, true)?);
    }
    Ok((sockets, bound))
}

/// A `sockaddr_in` for `addr`.
pub fn sockaddr_in(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// The address in a `sockaddr_in` filled by the kernel, if it is one.
pub fn from_sockaddr_in(sa: &libc::sockaddr_in) -> Option<SocketAddrV4> {
    (sa.sin_family == libc::AF_INET as libc::sa_family_t).then(|| {
        SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
            u16::from_be(sa.sin_port),
        )
    })
}

/// Whether the kernel knows UDP GSO (`UDP_SEGMENT`, Linux 4.18) on `socket`.
pub fn supports_gso(socket: &UdpSocket) -> bool {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are live locals of the sizes given; the kernel writes at most
    // `len` bytes into `value`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_UDP,
            libc::UDP_SEGMENT,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    rc == 0
}

/// One `UDP_SEGMENT` control message: the segment size of a UDP GSO send, laid out as the
/// kernel reads it (`cmsghdr`, then the data at `CMSG_ALIGN(sizeof(cmsghdr))`).
#[derive(Clone, Copy)]
#[repr(C)]
pub struct GsoControl {
    hdr: libc::cmsghdr,
    segment_size: u16,
}

impl std::fmt::Debug for GsoControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GsoControl")
            .field("segment_size", &self.segment_size)
            .finish()
    }
}

impl Default for GsoControl {
    fn default() -> Self {
        Self {
            hdr: libc::cmsghdr {
                cmsg_len: 0,
                cmsg_level: 0,
                cmsg_type: 0,
            },
            segment_size: 0,
        }
    }
}

impl GsoControl {
    /// `CMSG_LEN(2)`: the header and two bytes of data.
    const LEN: usize = std::mem::size_of::<libc::cmsghdr>() + 2;

    /// Fills in the control message for segments of `segment_size` bytes and points `hdr` at
    /// it. `self` must not move until the system call that uses `hdr` has returned.
    pub fn attach(&mut self, hdr: &mut libc::msghdr, segment_size: u16) {
        self.hdr.cmsg_len = Self::LEN as _;
        self.hdr.cmsg_level = libc::SOL_UDP;
        self.hdr.cmsg_type = libc::UDP_SEGMENT;
        self.segment_size = segment_size;
        hdr.msg_control = (self as *mut Self).cast();
        hdr.msg_controllen = std::mem::size_of::<Self>() as _;
    }
}

/// Sends every message of `msgs` with `sendmmsg`, retrying after partial sends. A message the
/// kernel refuses is skipped; returns how many were sent.
///
/// # Safety
/// Every pointer in `msgs` (names, iovec arrays, iovec bases) must be valid for reads of the
/// given lengths for the duration of the call.
pub unsafe fn send_all(socket: &UdpSocket, msgs: &mut [libc::mmsghdr]) -> (usize, usize) {
    // SAFETY: the caller's guarantee, passed on.
    unsafe { send_all_with(socket, msgs, |_, _| {}) }
}

/// [`send_all`], calling `refused(index, error)` for each message the kernel refused.
///
/// # Safety
/// As for [`send_all`].
pub unsafe fn send_all_with(
    socket: &UdpSocket,
    msgs: &mut [libc::mmsghdr],
    mut refused: impl FnMut(usize, &io::Error),
) -> (usize, usize) {
    let fd = socket.as_raw_fd();
    let mut start = 0usize;
    let mut sent = 0usize;
    let mut failed = 0usize;
    while start < msgs.len() {
        let rest = &mut msgs[start..];
        // SAFETY: the caller guarantees the message pointers are valid; `rest` is a live
        // mutable slice of initialised mmsghdr and its length fits in u32 (batches are small).
        let n = unsafe { libc::sendmmsg(fd, rest.as_mut_ptr(), rest.len() as libc::c_uint, 0) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            if err.kind() == io::ErrorKind::WouldBlock {
                // Send buffer full on a blocking socket should not happen; yield and retry.
                std::thread::yield_now();
                continue;
            }
            // This message cannot be sent (e.g. no route): skip it.
            log::debug!("sendmmsg: {err}");
            refused(start, &err);
            failed += 1;
            start += 1;
            continue;
        }
        let n = n as usize;
        sent += n;
        start += n;
    }
    (sent, failed)
}

/// Receives up to `msgs.len()` datagrams without blocking. Returns how many arrived (0 when the
/// socket is empty).
///
/// # Safety
/// Every pointer in `msgs` must be valid for writes of the given lengths for the duration of the
/// call.
pub unsafe fn recv_batch(socket: &UdpSocket, msgs: &mut [libc::mmsghdr]) -> io::Result<usize> {
    loop {
        // SAFETY: the caller guarantees the message pointers are valid for writes; the slice is
        // live and mutable for the kernel to fill msg_len and msg_flags.
        let n = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                msgs.as_mut_ptr(),
                msgs.len() as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => return Ok(0),
            _ => return Err(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuseport_sockets_share_one_port() {
        let (socks, addr) =
            bind_port_sockets(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0), 3).unwrap();
        assert_eq!(socks.len(), 3);
        assert_ne!(addr.port(), 0);
        for s in &socks {
            assert_eq!(s.local_addr().unwrap(), std::net::SocketAddr::V4(addr));
        }
        let sa = sockaddr_in(addr);
        assert_eq!(from_sockaddr_in(&sa), Some(addr));
    }

    #[test]
    fn gso_control_has_the_kernels_layout() {
        // SAFETY: pure arithmetic.
        let space = unsafe { libc::CMSG_SPACE(2) } as usize;
        // SAFETY: pure arithmetic.
        let len = unsafe { libc::CMSG_LEN(2) } as usize;
        assert_eq!(std::mem::size_of::<GsoControl>(), space);
        assert_eq!(GsoControl::LEN, len);
        let mut control = GsoControl::default();
        // SAFETY: msghdr is a plain C struct for which all-zero bytes is a valid value.
        let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
        control.attach(&mut hdr, 1472);
        // SAFETY: `hdr` points at `control`, alive; CMSG_FIRSTHDR only reads the header.
        let first = unsafe { libc::CMSG_FIRSTHDR(&hdr) };
        assert_eq!(first.cast::<GsoControl>(), &mut control as *mut GsoControl);
        // SAFETY: `first` is `control`'s header, alive.
        let data = unsafe { libc::CMSG_DATA(first) };
        assert_eq!(
            data as usize - first as usize,
            std::mem::size_of::<libc::cmsghdr>()
        );
    }
}
