//! The TAP device: opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` in the network namespace the
//! fixture entered, with a 12-byte virtio-net header (the `VERSION_1` layout, `num_buffers`
//! included) in front of every frame read or written, and the offloads vnpd acked.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// `TUNSETIFF` = `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `TUNSETOFFLOAD` = `_IOW('T', 208, unsigned int)`.
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
/// `TUNSETVNETHDRSZ` = `_IOW('T', 216, int)`.
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
/// `TUNSETVNETLE` = `_IOW('T', 220, int)`: virtio 1.x headers are little endian.
const TUNSETVNETLE: libc::c_ulong = 0x4004_54dc;
/// `IFF_VNET_HDR` (linux/if_tun.h).
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// Size of `struct ifreq`.
const IFREQ_LEN: usize = 40;

/// The virtio-net header length with `VERSION_1` (`struct virtio_net_hdr_v1`).
pub const VNET_HDR_LEN: usize = 12;

/// An error naming the step that failed.
#[derive(Debug, thiserror::Error)]
#[error("{step}: {source}")]
pub struct TapError {
    /// What was being done.
    pub step: String,
    /// Underlying error.
    pub source: io::Error,
}

fn step(what: impl Into<String>) -> impl FnOnce(io::Error) -> TapError {
    let step = what.into();
    move |source| TapError { step, source }
}

/// Moves the calling thread (the whole process, if it has one thread) into a network
/// namespace: an `ip netns` name or a path such as `/proc/PID/ns/net`.
pub fn enter_netns(name_or_path: &str) -> Result<(), TapError> {
    let path = if name_or_path.contains('/') {
        Path::new(name_or_path).to_path_buf()
    } else {
        Path::new("/run/netns").join(name_or_path)
    };
    let file = File::open(&path).map_err(step(format!("opening {}", path.display())))?;
    // SAFETY: setns(2) only reads the descriptor, which `file` keeps open for the call.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(step(format!("setns {}", path.display()))(
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

fn ifreq(name: &str) -> Result<[u8; IFREQ_LEN], TapError> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', ' ', '\0']) {
        return Err(step("interface name")(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a valid interface name (1-15 bytes)"),
        )));
    }
    let mut req = [0u8; IFREQ_LEN];
    req[..name.len()].copy_from_slice(name.as_bytes());
    Ok(req)
}

fn ioctl(
    fd: RawFd,
    request: libc::c_ulong,
    arg: *mut libc::c_void,
    what: &str,
) -> Result<(), TapError> {
    // SAFETY: every caller passes the argument type its request expects (an ifreq buffer of
    // full size or a c_int/c_uint), alive for the call.
    let rc = unsafe { libc::ioctl(fd, request, arg) };
    if rc < 0 {
        return Err(step(what)(io::Error::last_os_error()));
    }
    Ok(())
}

/// An open TAP queue.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Creates (or attaches to) TAP `name` in the current namespace, non-blocking, with a
    /// 12-byte little-endian virtio-net header and no offloads yet.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(step("opening /dev/net/tun"))?;
        let mut req = ifreq(name)?;
        let flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short | IFF_VNET_HDR;
        req[16..18].copy_from_slice(&flags.to_ne_bytes());
        let fd = file.as_raw_fd();
        ioctl(fd, TUNSETIFF, req.as_mut_ptr().cast(), "TUNSETIFF")?;
        let mut hdr_len = VNET_HDR_LEN as libc::c_int;
        ioctl(
            fd,
            TUNSETVNETHDRSZ,
            (&raw mut hdr_len).cast(),
            "TUNSETVNETHDRSZ",
        )?;
        let mut le: libc::c_int = 1;
        ioctl(fd, TUNSETVNETLE, (&raw mut le).cast(), "TUNSETVNETLE")?;
        let tap = Tap {
            file,
            name: name.to_string(),
        };
        tap.set_offloads(0)?;
        Ok(tap)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `TUNSETOFFLOAD`: what the kernel may hand over on reads (see [`crate::features`]).
    pub fn set_offloads(&self, tun_flags: u32) -> Result<(), TapError> {
        // TUNSETOFFLOAD takes the flags by value, not by pointer.
        // SAFETY: the request reads its argument as an integer; nothing is dereferenced.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNSETOFFLOAD,
                libc::c_ulong::from(tun_flags),
            )
        };
        if rc < 0 {
            return Err(step(format!("TUNSETOFFLOAD {tun_flags:#x}"))(
                io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// Sets the interface's MAC address, optionally its MTU, its transmit queue length
    /// (frames the namespace kernel may queue for the fixture before the TAP drops them), and
    /// brings it up.
    pub fn configure(
        &self,
        mac: Option<[u8; 6]>,
        mtu: Option<u32>,
        txqueuelen: Option<u32>,
    ) -> Result<(), TapError> {
        // SAFETY: socket(2) with constant arguments; the result is checked.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(step("control socket")(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(raw) };
        let fd = sock.as_raw_fd();
        if let Some(mac) = mac {
            let mut req = ifreq(&self.name)?;
            req[16..18].copy_from_slice(&libc::ARPHRD_ETHER.to_ne_bytes());
            req[18..24].copy_from_slice(&mac);
            ioctl(
                fd,
                libc::SIOCSIFHWADDR,
                req.as_mut_ptr().cast(),
                "setting the MAC",
            )?;
        }
        if let Some(mtu) = mtu {
            let mut req = ifreq(&self.name)?;
            let mtu = libc::c_int::try_from(mtu).unwrap_or(libc::c_int::MAX);
            req[16..20].copy_from_slice(&mtu.to_ne_bytes());
            ioctl(
                fd,
                libc::SIOCSIFMTU,
                req.as_mut_ptr().cast(),
                "setting the MTU",
            )?;
        }
        if let Some(qlen) = txqueuelen {
            let mut req = ifreq(&self.name)?;
            let qlen = libc::c_int::try_from(qlen).unwrap_or(libc::c_int::MAX);
            req[16..20].copy_from_slice(&qlen.to_ne_bytes());
            ioctl(
                fd,
                libc::SIOCSIFTXQLEN,
                req.as_mut_ptr().cast(),
                "setting the transmit queue length",
            )?;
        }
        let mut req = ifreq(&self.name)?;
        ioctl(
            fd,
            libc::SIOCGIFFLAGS,
            req.as_mut_ptr().cast(),
            "reading interface flags",
        )?;
        let flags =
            libc::c_short::from_ne_bytes([req[16], req[17]]) | libc::IFF_UP as libc::c_short;
        req[16..18].copy_from_slice(&flags.to_ne_bytes());
        ioctl(
            fd,
            libc::SIOCSIFFLAGS,
            req.as_mut_ptr().cast(),
            "bringing the interface up",
        )
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts
            .next()
            .ok_or_else(|| format!("{text:?}: too few bytes"))?;
        if part.len() != 2 {
            return Err(format!("{text:?}: {part:?} is not two hex digits"));
        }
        *byte = u8::from_str_radix(part, 16).map_err(|e| format!("{text:?}: {e}"))?;
    }
    if parts.next().is_some() {
        return Err(format!("{text:?}: too many bytes"));
    }
    if mac[0] & 1 != 0 {
        return Err(format!("{text:?} is a multicast address"));
    }
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("52:54:00:12:34:56").unwrap(),
            [0x52, 0x54, 0, 0x12, 0x34, 0x56]
        );
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "5:54:00:12:34:56",
            "zz:54:00:12:34:56",
            "01:00:5e:00:00:01",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn interface_names_are_checked() {
        assert!(ifreq("vg0").is_ok());
        assert!(ifreq("").is_err());
        assert!(ifreq("a-name-of-16-byt").is_err());
        assert!(ifreq("a/b").is_err());
    }
}
