//! What a guest looks like: [`GuestSpec`] and its validation (pure, no I/O).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::error::{Error, Result};

/// Longest unix socket path the kernel accepts (sun_path is 108 bytes with the NUL).
pub const MAX_SOCKET_PATH: usize = 107;
/// virtio-net allows up to 0x8000 queue pairs; vnpd and sane guests use a handful.
pub const MAX_QUEUE_PAIRS: u16 = 16;

/// An Ethernet MAC address, unicast and non-zero (a guest NIC's address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MacParseError {
    #[error("MAC {0:?} is not six colon-separated hex octets")]
    Syntax(String),
    #[error("MAC {0} is a multicast address; a NIC needs a unicast one")]
    Multicast(String),
    #[error("MAC 00:00:00:00:00:00 is not a usable address")]
    Zero,
}

impl MacAddr {
    /// A locally administered unicast MAC derived from a name, for tests and ad-hoc guests
    /// (operators pass the registry's MAC instead).
    pub fn local_from_name(name: &str) -> Self {
        // FNV-1a: stable across runs and platforms, which a std Hasher is not.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        let b = h.to_be_bytes();
        MacAddr([0x02, b[3], b[4], b[5], b[6], b[7]])
    }
}

impl FromStr for MacAddr {
    type Err = MacParseError;

    fn from_str(s: &str) -> Result<Self, MacParseError> {
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for byte in out.iter_mut() {
            let part = parts
                .next()
                .ok_or_else(|| MacParseError::Syntax(s.to_string()))?;
            if part.len() != 2 {
                return Err(MacParseError::Syntax(s.to_string()));
            }
            *byte =
                u8::from_str_radix(part, 16).map_err(|_| MacParseError::Syntax(s.to_string()))?;
        }
        if parts.next().is_some() {
            return Err(MacParseError::Syntax(s.to_string()));
        }
        if out == [0; 6] {
            return Err(MacParseError::Zero);
        }
        if out[0] & 1 == 1 {
            return Err(MacParseError::Multicast(s.to_string()));
        }
        Ok(MacAddr(out))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// A NIC that needs no vnpd, for tests of qemu-launch itself and for migration tests before a
/// vhost-user backend is available.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestNetdev {
    /// QEMU user-mode networking with `restrict=on`: the guest gets a DHCP lease from QEMU
    /// and can reach nothing outside the QEMU process.
    UserIsolated,
}

/// How QEMU runs guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accel {
    /// Software emulation: works everywhere, about 6 s to boot the test guest.
    #[default]
    Tcg,
    /// Hardware virtualization (`/dev/kvm`), with `-cpu host`.
    Kvm,
}

impl FromStr for Accel {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tcg" => Ok(Accel::Tcg),
            "kvm" => Ok(Accel::Kvm),
            other => Err(format!(
                "unknown accelerator {other:?} (expected tcg or kvm)"
            )),
        }
    }
}

/// Everything needed to start one guest.
///
/// Build one with [`GuestSpec::new`] and adjust fields; `..GuestSpec::new(..)` works too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestSpec {
    /// Guest name: `[A-Za-z0-9_.-]`, at most 48 characters. Used for QEMU's `-name`, the
    /// guest hostname and default file names.
    pub name: String,
    /// MAC of the guest NIC (from the registry for a VM on vnpd).
    pub mac: MacAddr,
    /// vnpd's vhost-user socket for this VM. vnpd is the server; QEMU connects and reconnects
    /// when vnpd restarts.
    pub vhost_user_socket: Option<PathBuf>,
    /// Queue pairs of the vhost-user NIC (virtio-net `mq`).
    pub queue_pairs: u16,
    pub memory_mib: u32,
    pub cpus: u16,
    /// Directory for the console log, QEMU's stderr and the QMP and command sockets.
    /// `None`: a fresh directory under the system temp dir, removed when the guest is dropped.
    pub work_dir: Option<PathBuf>,
    /// A QEMU-only NIC instead of vhost-user (mutually exclusive with `vhost_user_socket`).
    pub test_netdev: Option<TestNetdev>,
    /// Extra kernel command line words (e.g. `vnp.nonet`).
    pub extra_kernel_args: Vec<String>,
    /// QEMU binary (default `qemu-system-x86_64` from `PATH`).
    pub qemu_binary: PathBuf,
    pub accel: Accel,
    /// How long QEMU gets to answer QMP after it starts. With vhost-user, QEMU does not answer
    /// until it has connected to vnpd, so this bounds the wait for an unresponsive vnpd.
    pub start_timeout: Duration,
    /// Extra QEMU arguments appended as given (debugging: `-trace`, `-d`). The environment
    /// variable `QEMU_LAUNCH_EXTRA_ARGS` (whitespace-separated) adds more to every guest.
    pub extra_qemu_args: Vec<String>,
}

impl GuestSpec {
    /// A 1-vCPU, 256 MiB guest with no NIC; set `vhost_user_socket` or `test_netdev`.
    pub fn new(name: impl Into<String>, mac: MacAddr) -> Self {
        Self {
            name: name.into(),
            mac,
            vhost_user_socket: None,
            queue_pairs: 1,
            memory_mib: 256,
            cpus: 1,
            work_dir: None,
            test_netdev: None,
            extra_kernel_args: Vec::new(),
            qemu_binary: PathBuf::from("qemu-system-x86_64"),
            accel: Accel::Tcg,
            start_timeout: Duration::from_secs(30),
            extra_qemu_args: Vec::new(),
        }
    }

    /// Checks everything that can be checked without touching the system.
    pub fn validate(&self) -> Result<()> {
        validate_name(&self.name)?;
        if !(1..=MAX_QUEUE_PAIRS).contains(&self.queue_pairs) {
            return Err(Error::InvalidSpec(format!(
                "queue_pairs must be 1..={MAX_QUEUE_PAIRS}, got {}",
                self.queue_pairs
            )));
        }
        if !(64..=65536).contains(&self.memory_mib) {
            return Err(Error::InvalidSpec(format!(
                "memory_mib must be 64..=65536, got {}",
                self.memory_mib
            )));
        }
        if !(1..=64).contains(&self.cpus) {
            return Err(Error::InvalidSpec(format!(
                "cpus must be 1..=64, got {}",
                self.cpus
            )));
        }
        if self.vhost_user_socket.is_some() && self.test_netdev.is_some() {
            return Err(Error::InvalidSpec(
                "vhost_user_socket and test_netdev are mutually exclusive".into(),
            ));
        }
        if let Some(sock) = &self.vhost_user_socket {
            check_socket_path_len(sock)?;
        }
        for arg in &self.extra_kernel_args {
            if arg.is_empty() || arg.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(Error::InvalidSpec(format!(
                    "kernel argument {arg:?} must be one non-empty word"
                )));
            }
        }
        Ok(())
    }
}

/// Guest names end up in file names, QEMU options and the guest hostname: keep them plain.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 48
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidSpec(format!(
            "guest name {name:?} must be 1-48 characters of [A-Za-z0-9_.-], not starting with '.' or '-'"
        )))
    }
}

pub(crate) fn check_socket_path_len(path: &std::path::Path) -> Result<()> {
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(Error::InvalidSpec(format!(
            "unix socket path {} is {len} bytes; the limit is {MAX_SOCKET_PATH}",
            path.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trips_and_rejects_bad_input() {
        let mac: MacAddr = "02:AB:cd:00:11:ff".parse().unwrap();
        assert_eq!(mac.0, [0x02, 0xab, 0xcd, 0x00, 0x11, 0xff]);
        assert_eq!(mac.to_string(), "02:ab:cd:00:11:ff");
        assert_eq!("02-00-00-00-00-01".parse::<MacAddr>().unwrap().0[5], 1);
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:00:00",
            "02:00:00:00:00:0g",
            "2:0:0:0:0:1",
        ] {
            assert!(
                matches!(bad.parse::<MacAddr>(), Err(MacParseError::Syntax(_))),
                "{bad}"
            );
        }
        assert_eq!(
            "00:00:00:00:00:00".parse::<MacAddr>(),
            Err(MacParseError::Zero)
        );
        assert!(matches!(
            "01:00:5e:00:00:01".parse::<MacAddr>(),
            Err(MacParseError::Multicast(_))
        ));
    }

    #[test]
    fn derived_mac_is_stable_local_unicast() {
        let a = MacAddr::local_from_name("vm-a");
        assert_eq!(a, MacAddr::local_from_name("vm-a"));
        assert_ne!(a, MacAddr::local_from_name("vm-b"));
        assert_eq!(a.0[0], 0x02);
        assert_eq!(a.to_string().parse::<MacAddr>().unwrap(), a);
    }

    #[test]
    fn spec_validation() {
        let mac = MacAddr::local_from_name("x");
        let good = GuestSpec::new("vm-a.1_x", mac);
        good.validate().unwrap();
        for name in ["", "-x", ".x", "a b", "a/b", &"x".repeat(49)] {
            assert!(GuestSpec::new(name, mac).validate().is_err(), "{name:?}");
        }
        let mut s = good.clone();
        s.queue_pairs = 0;
        assert!(s.validate().is_err());
        s.queue_pairs = MAX_QUEUE_PAIRS + 1;
        assert!(s.validate().is_err());
        let mut s = good.clone();
        s.memory_mib = 32;
        assert!(s.validate().is_err());
        let mut s = good.clone();
        s.vhost_user_socket = Some("/run/vnp/a.sock".into());
        s.test_netdev = Some(TestNetdev::UserIsolated);
        assert!(s.validate().is_err());
        let mut s = good.clone();
        s.vhost_user_socket = Some(PathBuf::from(format!("/{}", "s".repeat(120))));
        assert!(s
            .validate()
            .unwrap_err()
            .to_string()
            .contains("limit is 107"));
        let mut s = good;
        s.extra_kernel_args = vec!["a b".into()];
        assert!(s.validate().is_err());
    }
}
