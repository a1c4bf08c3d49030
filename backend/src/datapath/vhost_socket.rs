//! Creating a VM's vhost-user socket with the owner, group and mode the operator configured.
//!
//! Connecting to a unix socket needs write permission on it, so its mode decides which VMM may
//! attach (libvirt runs QEMU as its own user, e.g. `libvirt-qemu`). The umask must not decide,
//! and there must be no moment when the socket is reachable with wider permissions: it is bound
//! in a fresh directory only root can enter (mode 0700), given its owner, group and mode there,
//! and then renamed onto its final path, which is atomic.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// Who may connect to a vhost-user socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketAccess {
    /// Owner uid (`None`: the user vnpd runs as).
    pub owner: Option<u32>,
    /// Group gid (`None`: vnpd's group).
    pub group: Option<u32>,
    /// Permission bits (at most 0o777).
    pub mode: u32,
}

impl Default for SocketAccess {
    /// Owner and group read-write: the VMM must run as vnpd's user or in its group.
    fn default() -> Self {
        Self {
            owner: None,
            group: None,
            mode: 0o660,
        }
    }
}

/// Binds a listening unix socket at `path` (replacing a file there) with `access` applied
/// before anyone else can reach it.
pub fn bind(path: &Path, access: SocketAccess) -> io::Result<UnixListener> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let staging = StagingDir::create(parent)?;
    let staged = staging.0.join("s");
    let listener = staging.bind("s")?;
    if access.owner.is_some() || access.group.is_some() {
        std::os::unix::fs::chown(&staged, access.owner, access.group).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "giving {} to uid {:?} gid {:?}: {e}",
                    path.display(),
                    access.owner,
                    access.group
                ),
            )
        })?;
    }
    std::fs::set_permissions(
        &staged,
        std::fs::Permissions::from_mode(access.mode & 0o777),
    )?;
    // rename(2) replaces a stale socket file atomically.
    std::fs::rename(&staged, path)?;
    Ok(listener)
}

/// A private directory next to the socket's final path, removed on drop.
struct StagingDir(PathBuf);

impl StagingDir {
    fn create(parent: &Path) -> io::Result<Self> {
        static SERIAL: AtomicU32 = AtomicU32::new(0);
        // Short, because the staged socket's path must fit in sun_path (108 bytes) too.
        let dir = parent.join(format!(
            ".vnpd-{}-{}",
            std::process::id(),
            SERIAL.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        Ok(Self(dir))
    }
}

/// Longest path `bind(2)` takes (`sun_path` holds 108 bytes with the terminating NUL).
const MAX_BIND_PATH: usize = 107;

impl StagingDir {
    /// Binds `name` in the directory. Its path is longer than the final one; when it is too
    /// long for `sun_path`, the socket is bound through `/proc/self/fd`, which names the
    /// directory in a few bytes.
    fn bind(&self, name: &str) -> io::Result<UnixListener> {
        let staged = self.0.join(name);
        if staged.as_os_str().len() <= MAX_BIND_PATH {
            return UnixListener::bind(&staged);
        }
        let dir = std::fs::File::open(&self.0)?;
        let short = format!("/proc/self/fd/{}/{name}", dir.as_raw_fd());
        UnixListener::bind(short)
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.0.join("s"));
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vnp-sock-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn socket_gets_the_configured_owner_group_and_mode() {
        let dir = temp_dir("access");
        let path = dir.join("vm.sock");
        // nobody/nogroup exist on every Debian system; root can give files away.
        let access = SocketAccess {
            owner: Some(65534),
            group: Some(65534),
            mode: 0o660,
        };
        let listener = bind(&path, access).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o660);
        assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
        // The staging directory is gone; the socket accepts connections.
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(left.len(), 1, "{left:?}");
        let _client = std::os::unix::net::UnixStream::connect(&path).unwrap();
        assert!(listener.accept().is_ok());
        // Created again (vnpd restarted): the stale file is replaced, the access applied again.
        drop(listener);
        let _again = bind(
            &path,
            SocketAccess {
                mode: 0o600,
                ..SocketAccess::default()
            },
        )
        .unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_path_near_the_limit_still_binds() {
        let dir = temp_dir("long");
        // A final path of 107 bytes: the staging path next to it is longer than sun_path.
        let base = dir.join("x");
        let pad = 107 - base.as_os_str().len() - "/v.sock".len();
        let deep = PathBuf::from(format!("{}{}", base.display(), "y".repeat(pad)));
        std::fs::create_dir_all(&deep).unwrap();
        let path = deep.join("v.sock");
        assert_eq!(path.as_os_str().len(), 107);
        let listener = bind(&path, SocketAccess::default()).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o660);
        let _client = std::os::unix::net::UnixStream::connect(&path).unwrap();
        assert!(listener.accept().is_ok());
        assert_eq!(std::fs::read_dir(&deep).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
