//! The TUN device towards the public side: layer-3 packets both ways on one file descriptor.
//!
//! Why TUN: the gateway's public side is IP, not Ethernet, and the host's kernel already does
//! everything around it (routing to the next hop, ARP, firewalling, fragmentation of what it
//! forwards). A raw socket could send NATed packets but cannot receive packets addressed to a
//! non-local public address without AF_PACKET sniffing and filtering every frame; a TUN device
//! gets exactly the packets the kernel routes to it (`ip route add PUBLIC/32 dev vnpgw0` on the
//! host or its upstream router), is pollable with epoll, and a persistent one (`ip tuntap add`)
//! keeps its routes across gateway restarts.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;

/// `TUNSETIFF` from `<linux/if_tun.h>`: `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// Opens (or attaches to the persistent) TUN device `name`, no packet-info header,
/// non-blocking.
pub fn open(name: &str) -> io::Result<File> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("TUN name {name:?}: 1-15 bytes"),
        ));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    // struct ifreq: ifr_name[IFNAMSIZ], then ifr_flags (short); 40 bytes in all.
    let mut ifreq = [0u8; 40];
    ifreq[..name.len()].copy_from_slice(name.as_bytes());
    let flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    ifreq[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq; `ifreq` is 40 bytes, its full size,
    // and outlives the call; the descriptor is the open /dev/net/tun.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, ifreq.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    set_nonblocking(&file)?;
    Ok(file)
}

fn set_nonblocking(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL on a descriptor we own takes no pointer.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL with an int argument on a descriptor we own.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
