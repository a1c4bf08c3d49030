//! `Libvirtd`: a private libvirt daemon (the distribution's `libvirtd`, unmodified) for one
//! test, in its own mount namespace so that it shares no state with the system or with a
//! second daemon of the same test (which live migration between two "hosts" needs).
//!
//! Inside the namespace, `/run`, `/var/lib/libvirt` and `/var/cache/libvirt` are fresh tmpfs
//! mounts, and `/etc/libvirt` and `/var/log/libvirt` are bind mounts of directories under the
//! fixture's `dir`; nothing is written to the system's libvirt paths. The daemon listens on
//! `dir/sock/libvirt-sock` (outside the namespace, so `virsh -c` reaches it), has its own
//! host UUID (libvirt refuses to migrate between two daemons with the same UUID), and runs
//! QEMU as the user the test chooses, without a security driver or cgroups (see
//! [`qemu_conf`]).
//!
//! The daemon also gets its own PID namespace, whose init is the shell that started it: libvirt
//! daemonises its QEMUs out of libvirtd's process group, and the kernel kills every process
//! of a PID namespace when its init exits. So when libvirtd stops, or the test process dies
//! (even by SIGKILL: `unshare --kill-child` and a parent-death signal), its QEMUs die too.
//!
//! On drop: every domain is destroyed, libvirtd is stopped, and anything still in its
//! namespaces is killed. Only the caller's `dir` remains.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::process::{ChildGuard, ProcessError};

/// The QEMU driver's configuration for QEMU running as `user` (and that user's group).
/// libvirt opens the domain's console file and binds its serial sockets itself and hands QEMU
/// the descriptors; the one path QEMU opens as `user` is the vhost-user socket, which it
/// connects to (and reconnects to after a vnpd restart), so `user` must be allowed to connect
/// to vnpd's socket. No security driver (no AppArmor/SELinux here), no ownership changes of
/// the test's files, no cgroups (no systemd in the test machine), no private /dev per domain,
/// QEMU's log to a plain file instead of virtlogd.
///
/// libvirt refuses loopback addresses for `migration_host` and `migration_address`, so a
/// migration between two of these daemons passes them to `virsh migrate` instead
/// (`--migrateuri tcp://127.0.0.1 --listen-address 127.0.0.1`).
pub fn qemu_conf(user: &str) -> String {
    format!(
        "user = \"{user}\"\n\
         group = \"{user}\"\n\
         dynamic_ownership = 0\n\
         remember_owner = 0\n\
         security_driver = \"none\"\n\
         cgroup_controllers = [ ]\n\
         namespaces = [ ]\n\
         stdio_handler = \"file\"\n"
    )
}

/// Mounts the private state directories and runs libvirtd. `$1` is the fixture's directory.
/// No `exec`: the shell stays the PID namespace's init and reaps the QEMU helpers libvirt
/// orphans (libvirtd as init would leave them as zombies it then fails to kill).
const START_SCRIPT: &str = r#"set -e
mount -t tmpfs vnp-libvirtd /run
mount -t tmpfs vnp-libvirtd /var/lib/libvirt
mount -t tmpfs vnp-libvirtd /var/cache/libvirt
mount --bind "$1/log" /var/log/libvirt
mount --bind "$1/etc" /etc/libvirt
libvirtd --config /etc/libvirt/libvirtd.conf --pid-file "$1/libvirtd.pid"
"#;

/// How long libvirtd gets to answer (it probes QEMU's capabilities at start: seconds).
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// Errors of the libvirtd fixture.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtdError {
    /// Preparing the daemon's files.
    #[error("libvirtd fixture: {context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// Starting or waiting for the daemon.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// A `virsh` command failed.
    #[error("virsh {args}: {detail}")]
    Virsh {
        /// The arguments.
        args: String,
        /// virsh's stderr.
        detail: String,
    },
}

/// A running private libvirtd.
#[derive(Debug)]
pub struct Libvirtd {
    dir: PathBuf,
    daemon: Option<ChildGuard>,
    mount_namespace: Option<String>,
}

impl Libvirtd {
    /// Starts a daemon with its files under `dir` (created; the caller removes it), host
    /// UUID `host_uuid` and its QEMUs running as `qemu_user` (`root`, or libvirt's usual
    /// `libvirt-qemu`), and waits until `virsh version` answers.
    pub fn start(dir: &Path, host_uuid: &str, qemu_user: &str) -> Result<Self, LibvirtdError> {
        write_config(dir, host_uuid, qemu_user)?;
        let daemon = ChildGuard::spawn(
            "libvirtd",
            die_with_parent(&mut Command::new("unshare"))
                .args(["--mount", "--propagation", "private"])
                .args(["--pid", "--fork", "--kill-child", "--mount-proc"])
                .args(["--", "sh", "-c"])
                .arg(START_SCRIPT)
                .arg("libvirtd-start")
                .arg(dir)
                .stdout(std::process::Stdio::null()),
            Some(&dir.join("libvirtd.log")),
        )?;
        let mount_namespace = namespace_of(daemon.pid());
        let mut me = Self {
            dir: dir.to_path_buf(),
            daemon: Some(daemon),
            mount_namespace,
        };
        let virsh = me.uri();
        me.daemon_mut()
            .wait_until("libvirtd to answer virsh", START_TIMEOUT, || {
                virsh_at(&virsh, &["version"]).ok().map(|_| ())
            })?;
        // Read again: right after the spawn, unshare may not have entered the namespace yet.
        me.mount_namespace = namespace_of(me.daemon_mut().pid());
        Ok(me)
    }

    /// The URI for `virsh -c` and libvirt clients.
    pub fn uri(&self) -> String {
        format!(
            "qemu:///system?socket={}",
            self.dir.join("sock/libvirt-sock").display()
        )
    }

    /// Where libvirt writes each domain's QEMU log (`NAME.log`).
    pub fn qemu_log_dir(&self) -> PathBuf {
        self.dir.join("log/qemu")
    }

    /// libvirtd's pid.
    pub fn pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(ChildGuard::pid)
    }

    /// Runs `virsh -c URI ARGS` and returns stdout.
    pub fn virsh(&self, args: &[&str]) -> Result<String, LibvirtdError> {
        virsh_at(&self.uri(), args)
    }

    /// pids of every process in the daemon's mount namespace (libvirtd and its QEMUs).
    pub fn processes(&self) -> Vec<u32> {
        match &self.mount_namespace {
            Some(ns) => processes_in_namespace(ns),
            None => Vec::new(),
        }
    }

    /// The last lines libvirtd wrote to stderr.
    pub fn stderr_tail(&self) -> String {
        self.daemon
            .as_ref()
            .map(ChildGuard::stderr_tail)
            .unwrap_or_default()
    }

    /// Destroys every domain, stops libvirtd (SIGTERM) and kills what is left in its mount
    /// namespace. Idempotent; also run on drop.
    pub fn stop(&mut self) {
        if self.daemon.is_none() {
            return;
        }
        if let Ok(names) = self.virsh(&["list", "--name"]) {
            for name in names.lines().filter(|l| !l.trim().is_empty()) {
                let _ = self.virsh(&["destroy", name.trim()]);
            }
        }
        if let Some(mut d) = self.daemon.take() {
            let _ = d.terminate(Duration::from_secs(10));
        }
        // libvirtd's exit ends its PID namespace and with it the QEMUs; this is the backstop
        // for anything that outlived it (found by mount namespace, which QEMU shares).
        for _ in 0..50 {
            let left = self.processes();
            if left.is_empty() {
                break;
            }
            for pid in left {
                kill(pid);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn daemon_mut(&mut self) -> &mut ChildGuard {
        self.daemon.as_mut().expect("daemon running")
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// SIGKILL for the child when the thread that started it dies (the test, however it ends).
fn die_with_parent(cmd: &mut Command) -> &mut Command {
    let set_death_signal = || {
        // SAFETY: PR_SET_PDEATHSIG only sets an attribute of the calling process.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: the closure runs in the forked child before exec and only calls prctl(2), which
    // is async-signal-safe and touches no memory of the parent.
    unsafe { cmd.pre_exec(set_death_signal) }
}

fn write_config(dir: &Path, host_uuid: &str, qemu_user: &str) -> Result<(), LibvirtdError> {
    let io = |context: &str| {
        let context = format!("{context} in {}", dir.display());
        move |source| LibvirtdError::Io { context, source }
    };
    for sub in ["etc/qemu", "log/qemu", "sock"] {
        std::fs::create_dir_all(dir.join(sub)).map_err(io("creating directories"))?;
    }
    // Only root may connect: the socket directory is the test's, not /run/libvirt.
    let conf = format!(
        "unix_sock_dir = \"{sock}\"\n\
         unix_sock_rw_perms = \"0700\"\n\
         auth_unix_rw = \"none\"\n\
         auth_unix_ro = \"none\"\n\
         host_uuid = \"{host_uuid}\"\n\
         log_outputs = \"3:stderr\"\n",
        sock = dir.join("sock").display()
    );
    std::fs::write(dir.join("etc/libvirtd.conf"), conf).map_err(io("writing libvirtd.conf"))?;
    std::fs::write(dir.join("etc/qemu.conf"), qemu_conf(qemu_user))
        .map_err(io("writing qemu.conf"))?;
    Ok(())
}

fn virsh_at(uri: &str, args: &[&str]) -> Result<String, LibvirtdError> {
    let out = Command::new("virsh")
        .args(["-c", uri])
        .args(args)
        .output()
        .map_err(|source| LibvirtdError::Io {
            context: "running virsh (libvirt-clients)".into(),
            source,
        })?;
    if !out.status.success() {
        return Err(LibvirtdError::Virsh {
            args: args.join(" "),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The mount namespace of `pid` (`mnt:[inode]`), if it differs from ours.
fn namespace_of(pid: u32) -> Option<String> {
    let theirs = std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok()?;
    let ours = std::fs::read_link("/proc/self/ns/mnt").ok()?;
    (theirs != ours).then(|| theirs.to_string_lossy().into_owned())
}

fn processes_in_namespace(ns: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
                .map(|l| l.to_string_lossy() == ns)
                .unwrap_or(false)
        })
        .collect()
}

fn kill(pid: u32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) has no memory-safety preconditions. The pid was just seen in the
    // fixture's private mount namespace, which only its own processes can have joined.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}
