//! UDP segmentation offload (`UDP_SEGMENT`) on the sender and receive coalescing (`UDP_GRO`) on
//! the receiver: the kernel's floor for bulk traffic, where one system call moves up to 64
//! datagrams of one flow.
//!
//! On veth and loopback a GSO send is *not* segmented on the way: the device advertises
//! `tx-udp-segmentation`, so the 64 KiB packet crosses the stack whole and a `UDP_GRO` socket
//! receives it as it was sent (the segment size in a control message). That floor contains no
//! segmentation work at all. Turning the feature off on the sending device
//! (`ethtool -K DEV tx-udp-segmentation off`) makes the kernel segment in software at that
//! device, as it would before a NIC without the offload; the receiver then sees what veth's
//! receive path makes of the segments (no GRO without NAPI: one datagram per receive).

use std::io;
use std::os::fd::AsRawFd;

/// `UDP_SEGMENT` (linux/udp.h).
pub const UDP_SEGMENT: libc::c_int = 103;
/// `UDP_GRO` (linux/udp.h).
pub const UDP_GRO: libc::c_int = 104;
/// Most segments one GSO send may carry (`UDP_MAX_SEGMENTS` in kernels before 6.9).
pub const MAX_SEGMENTS: usize = 64;
/// Control-message room per received datagram for the `UDP_GRO` segment size (an `int`).
pub const CMSG_ROOM: usize = 32;

fn set_int(
    socket: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `value` is a c_int that lives across the call; its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes every send on `socket` a GSO send of `segment`-byte datagrams.
pub fn enable_gso(socket: &impl AsRawFd, segment: usize) -> io::Result<()> {
    let segment = libc::c_int::try_from(segment)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "segment size too large"))?;
    set_int(socket, libc::SOL_UDP, UDP_SEGMENT, segment)
}

/// Lets `socket` receive coalesced datagrams, each with its segment size in a control message.
pub fn enable_gro(socket: &impl AsRawFd) -> io::Result<()> {
    set_int(socket, libc::SOL_UDP, UDP_GRO, 1)
}

/// The `UDP_GRO` segment size in a received message's control data, if any.
pub fn gro_segment_size(msg: &libc::msghdr) -> Option<usize> {
    if msg.msg_control.is_null() || msg.msg_controllen == 0 {
        return None;
    }
    // SAFETY: `msg` was filled by recvmmsg: msg_control/msg_controllen describe the control
    // buffer it wrote, and the CMSG_* helpers stay within msg_controllen.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(msg) };
    while !cmsg.is_null() {
        // SAFETY: `cmsg` is non-null and inside the control buffer (CMSG_FIRSTHDR/NXTHDR).
        let header = unsafe { &*cmsg };
        if header.cmsg_level == libc::SOL_UDP && header.cmsg_type == UDP_GRO {
            // SAFETY: `cmsg` is a valid control message header (above).
            let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<libc::c_int>();
            // SAFETY: a UDP_GRO control message carries one int right at CMSG_DATA, inside
            // the control buffer; it may be unaligned.
            let size = unsafe { data.read_unaligned() };
            return usize::try_from(size).ok().filter(|s| *s > 0);
        }
        // SAFETY: as above; NXTHDR returns null past the end.
        cmsg = unsafe { libc::CMSG_NXTHDR(msg, cmsg) };
    }
    None
}

/// How many wire datagrams a received message of `len` bytes stands for: `len / segment`
/// rounded up when it came coalesced, else one.
pub fn segments(len: usize, segment: Option<usize>) -> u64 {
    match segment {
        Some(s) if len > 0 => len.div_ceil(s) as u64,
        _ => 1,
    }
}

/// Checks a GSO send's shape: at most [`MAX_SEGMENTS`] segments, all of them within one UDP
/// datagram's 65507-byte limit.
pub fn check_gso(payload: usize, segments: usize) -> io::Result<()> {
    if segments == 0 || segments > MAX_SEGMENTS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{segments} segments per send is not in 1..={MAX_SEGMENTS}"),
        ));
    }
    if payload
        .checked_mul(segments)
        .is_none_or(|total| total > crate::mmsg::MAX_PAYLOAD)
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{segments} segments of {payload} bytes exceed one UDP datagram ({} bytes)",
                crate::mmsg::MAX_PAYLOAD
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_counts() {
        assert_eq!(segments(1472 * 44, Some(1472)), 44);
        assert_eq!(segments(1472 * 43 + 100, Some(1472)), 44);
        assert_eq!(segments(1472, None), 1);
        assert_eq!(segments(0, Some(1472)), 1);
    }

    #[test]
    fn gso_shapes() {
        assert!(check_gso(1472, 44).is_ok());
        assert!(check_gso(1472, 45).is_err(), "66240 bytes > 65507");
        assert!(check_gso(64, 65).is_err());
        assert!(check_gso(64, 0).is_err());
    }
}
