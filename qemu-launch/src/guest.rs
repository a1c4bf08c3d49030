//! A running QEMU guest: launch, readiness, commands, QMP, shutdown, and cleanup on drop.

use std::fs::File;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::channel::{ChannelError, CmdOutput, CommandChannel};
use crate::cmdline::{qemu_args, BootFiles, GuestFiles};
use crate::error::{Diagnostics, Error, Result};
use crate::image::GuestImage;
use crate::qmp::{Qmp, QmpError, VmStatus};
use crate::spawn::spawn_tied_to_process;
use crate::spec::{check_socket_path_len, GuestSpec};

/// Default timeout of a single QMP command.
pub const QMP_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(50);
/// How long a broken socket may precede QEMU's exit becoming visible to waitpid.
const EXIT_GRACE: Duration = Duration::from_secs(3);

static NEXT_DIR: AtomicU32 = AtomicU32::new(0);

/// State of the guest's network as its init reports it (`/run/vnp/net`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetStatus {
    /// A DHCP lease was applied: "bound IP/PREFIX router R mtu M".
    Bound {
        address: String,
        router: String,
        mtu: u32,
    },
    /// No DHCP answer yet (udhcpc keeps trying in the background).
    Failed,
    /// No NIC in the guest.
    NoInterface,
    /// `vnp.nonet` on the kernel command line.
    Disabled,
}

/// Parses `/run/vnp/net` content; `None` while DHCP is still pending.
pub fn parse_net_status(s: &str) -> Option<NetStatus> {
    let words: Vec<&str> = s.split_whitespace().collect();
    match words.as_slice() {
        ["bound", addr, "router", router, "mtu", mtu] => Some(NetStatus::Bound {
            address: addr.to_string(),
            router: router.to_string(),
            mtu: mtu.parse().ok()?,
        }),
        // udhcpc gave no router.
        ["bound", addr, "router", "mtu", mtu] => Some(NetStatus::Bound {
            address: addr.to_string(),
            router: String::new(),
            mtu: mtu.parse().ok()?,
        }),
        ["failed"] => Some(NetStatus::Failed),
        ["no-interface"] => Some(NetStatus::NoInterface),
        ["disabled"] => Some(NetStatus::Disabled),
        _ => None,
    }
}

/// A QEMU process running the test guest. Dropping it kills QEMU's process group and removes
/// the guest's files (set `VNP_KEEP_GUEST_FILES=1` to keep them for debugging).
#[derive(Debug)]
pub struct Guest {
    spec: GuestSpec,
    boot: BootFiles,
    dir: PathBuf,
    owns_dir: bool,
    files: GuestFiles,
    child: Option<Child>,
    qmp: Option<Qmp>,
    channel: Option<CommandChannel>,
}

impl Guest {
    /// Builds/locates the guest image and starts QEMU; returns once QMP answers. Use
    /// [`Guest::wait_ready`] to wait for the guest's init.
    pub fn launch(spec: GuestSpec) -> Result<Guest> {
        let image = GuestImage::ensure()?;
        Self::launch_with(spec, &image.boot_files(), false)
    }

    /// Starts a migration destination (`-incoming defer`) booting the same files as the source.
    pub fn launch_incoming(spec: GuestSpec, boot: &BootFiles) -> Result<Guest> {
        Self::launch_with(spec, boot, true)
    }

    /// Starts QEMU with explicit boot files.
    pub fn launch_with(spec: GuestSpec, boot: &BootFiles, incoming_defer: bool) -> Result<Guest> {
        spec.validate()?;
        if let Some(sock) = &spec.vhost_user_socket {
            let is_socket = std::fs::metadata(sock)
                .map(|m| m.file_type().is_socket())
                .unwrap_or(false);
            if !is_socket {
                return Err(Error::MissingSocket(sock.clone()));
            }
        }
        let (dir, owns_dir) = match &spec.work_dir {
            Some(d) => (d.clone(), false),
            None => {
                let n = NEXT_DIR.fetch_add(1, Ordering::Relaxed);
                (
                    std::env::temp_dir().join(format!(
                        "qemu-launch-{}-{}-{n}",
                        spec.name,
                        std::process::id()
                    )),
                    true,
                )
            }
        };
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let files = GuestFiles::in_dir(&dir);
        check_socket_path_len(&files.qmp_socket)?;
        check_socket_path_len(&files.command_socket)?;
        for f in [
            &files.console_log,
            &files.qemu_log,
            &files.qmp_socket,
            &files.command_socket,
        ] {
            // Leftovers of an earlier run in a caller-provided dir would confuse the readiness checks.
            let _ = std::fs::remove_file(f);
        }

        let mut guest = Guest {
            spec,
            boot: boot.clone(),
            dir,
            owns_dir,
            files,
            child: None,
            qmp: None,
            channel: None,
        };
        // From here on, `guest`'s Drop cleans up whatever happens.
        guest.spawn(incoming_defer)?;
        guest.connect_qmp()?;
        guest.connect_channel()?;
        Ok(guest)
    }

    fn spawn(&mut self, incoming_defer: bool) -> Result<()> {
        let mut args = qemu_args(&self.spec, &self.boot, &self.files, incoming_defer);
        if let Ok(extra) = std::env::var("QEMU_LAUNCH_EXTRA_ARGS") {
            args.extend(extra.split_whitespace().map(String::from));
        }
        let log = File::create(&self.files.qemu_log)
            .map_err(|e| Error::io(format!("creating {}", self.files.qemu_log.display()), e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| Error::io("duplicating the QEMU log fd", e))?;
        log::debug!("{} {}", self.spec.qemu_binary.display(), args.join(" "));
        let mut cmd = Command::new(&self.spec.qemu_binary);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Own process group: Drop kills QEMU and anything it started, never the caller.
            .process_group(0);
        let child = spawn_tied_to_process(cmd).map_err(|source| Error::Spawn {
            program: self.spec.qemu_binary.display().to_string(),
            source,
        })?;
        log::info!(
            "guest {}: QEMU pid {} in {}",
            self.spec.name,
            child.id(),
            self.dir.display()
        );
        self.child = Some(child);
        Ok(())
    }

    fn connect_qmp(&mut self) -> Result<()> {
        let start_timeout = self.spec.start_timeout;
        let deadline = Instant::now() + start_timeout;
        loop {
            self.check_alive()?;
            if self.files.qmp_socket.exists() {
                let left = deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(100));
                match Qmp::connect(&self.files.qmp_socket, left) {
                    Ok(q) => {
                        self.qmp = Some(q);
                        return Ok(());
                    }
                    Err(QmpError::Connect { .. }) => {}
                    Err(e) => {
                        if let Some(exited) = self.exited_within_grace() {
                            return Err(exited);
                        }
                        let hint = match &self.spec.vhost_user_socket {
                            Some(s) => format!(
                                " (QEMU waits for the vhost-user backend at {} before it answers QMP; is vnpd serving it?)",
                                s.display()
                            ),
                            None => String::new(),
                        };
                        return Err(Error::Timeout {
                            name: self.spec.name.clone(),
                            what: format!("QMP greeting ({e}){hint}"),
                            timeout: start_timeout,
                            diagnostics: Box::new(self.diagnostics()),
                        });
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    name: self.spec.name.clone(),
                    what: "QMP socket creation".into(),
                    timeout: start_timeout,
                    diagnostics: Box::new(self.diagnostics()),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    fn connect_channel(&mut self) -> Result<()> {
        let stream =
            UnixStream::connect(&self.files.command_socket).map_err(|e| Error::Channel {
                name: self.spec.name.clone(),
                reason: format!("connecting {}: {e}", self.files.command_socket.display()),
                diagnostics: Box::new(self.diagnostics()),
            })?;
        self.channel = Some(CommandChannel::new(stream));
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn spec(&self) -> &GuestSpec {
        &self.spec
    }

    pub fn files(&self) -> &GuestFiles {
        &self.files
    }

    pub fn boot_files(&self) -> &BootFiles {
        &self.boot
    }

    pub fn work_dir(&self) -> &Path {
        &self.dir
    }

    /// QEMU's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Console and QEMU stderr tails, as every error carries them.
    pub fn diagnostics(&self) -> Diagnostics {
        Diagnostics::collect(&self.files.console_log, &self.files.qemu_log)
    }

    /// The whole console log so far.
    pub fn console(&self) -> String {
        std::fs::read(&self.files.console_log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// `Err(QemuExited)` when QEMU is gone.
    fn check_alive(&mut self) -> Result<()> {
        let exited = match self.child.as_mut() {
            None => Some("not running".to_string()),
            Some(c) => match c.try_wait() {
                Ok(Some(status)) => Some(status.to_string()),
                Ok(None) => None,
                Err(e) => Some(format!("wait failed: {e}")),
            },
        };
        match exited {
            None => Ok(()),
            Some(status) => Err(Error::QemuExited {
                name: self.spec.name.clone(),
                status,
                diagnostics: Box::new(self.diagnostics()),
            }),
        }
    }

    /// After a broken connection: QEMU may be exiting (sockets close before the process is
    /// reaped), so give it a moment and report the exit rather than the symptom.
    fn exited_within_grace(&mut self) -> Option<Error> {
        self.wait_exit(EXIT_GRACE)?;
        self.check_alive().err()
    }

    /// Whether QEMU is still running.
    pub fn is_running(&mut self) -> bool {
        self.check_alive().is_ok()
    }

    /// Waits until the guest's command channel answers.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            let channel = self.channel.as_mut().ok_or_else(|| Error::Channel {
                name: self.spec.name.clone(),
                reason: "not connected".into(),
                diagnostics: Box::new(Diagnostics::default()),
            })?;
            // Short reply deadline: until init reaches the loop, requests go unanswered.
            match channel.run_with_reply_deadline(
                "echo vnp-ready",
                Duration::from_secs(5),
                Duration::from_secs(2),
            ) {
                Ok(out) if out.stdout.trim() == "vnp-ready" => return Ok(()),
                Ok(_) | Err(ChannelError::Timeout(_)) | Err(ChannelError::Reply(_)) => {}
                Err(e) => return Err(self.channel_error(e)),
            }
            if Instant::now() >= deadline {
                self.check_alive()?;
                return Err(Error::Timeout {
                    name: self.spec.name.clone(),
                    what: "command channel answering (guest boot)".into(),
                    timeout,
                    diagnostics: Box::new(self.diagnostics()),
                });
            }
        }
    }

    fn channel_error(&mut self, e: ChannelError) -> Error {
        if let Some(exited) = self.exited_within_grace() {
            return exited;
        }
        Error::Channel {
            name: self.spec.name.clone(),
            reason: e.to_string(),
            diagnostics: Box::new(self.diagnostics()),
        }
    }

    /// Runs `cmd` with `sh` in the guest; the guest kills it after `timeout`.
    pub fn run(&mut self, cmd: &str, timeout: Duration) -> Result<CmdOutput> {
        self.check_alive()?;
        let Some(channel) = self.channel.as_mut() else {
            return Err(self.channel_error(ChannelError::Connection("not connected".into())));
        };
        match channel.run(cmd, timeout) {
            Ok(out) => Ok(out),
            Err(ChannelError::Timeout(t)) => {
                self.check_alive()?;
                Err(Error::Timeout {
                    name: self.spec.name.clone(),
                    what: format!("reply to command {cmd:?}"),
                    timeout: t,
                    diagnostics: Box::new(self.diagnostics()),
                })
            }
            Err(e) => Err(self.channel_error(e)),
        }
    }

    /// Like [`Guest::run`], but a non-zero exit status is an error (with stderr in it).
    pub fn run_ok(&mut self, cmd: &str, timeout: Duration) -> Result<String> {
        let out = self.run(cmd, timeout)?;
        if out.success() {
            Ok(out.stdout)
        } else {
            Err(Error::Channel {
                name: self.spec.name.clone(),
                reason: format!(
                    "command {cmd:?} exited with status {}\nstdout: {}\nstderr: {}",
                    out.status,
                    out.stdout.trim_end(),
                    out.stderr.trim_end()
                ),
                diagnostics: Box::new(self.diagnostics()),
            })
        }
    }

    /// Waits until the guest's DHCP client reports a result (bound, failed, no NIC, disabled).
    pub fn wait_network(&mut self, timeout: Duration) -> Result<NetStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.run(
                "cat /run/vnp/net 2>/dev/null || echo pending",
                Duration::from_secs(5),
            )?;
            if let Some(st) = parse_net_status(&out.stdout) {
                return Ok(st);
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    name: self.spec.name.clone(),
                    what: format!("DHCP result (last: {:?})", out.stdout.trim()),
                    timeout,
                    diagnostics: Box::new(self.diagnostics()),
                });
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Waits until the guest holds a DHCP lease. A `failed` report is waited out (udhcpc keeps
    /// trying in the background); a guest without a NIC or with its network disabled is an
    /// error at once, as is no lease within `timeout`.
    pub fn wait_lease(&mut self, timeout: Duration) -> Result<NetStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let status = self.wait_network(left)?;
            match status {
                NetStatus::Bound { .. } => return Ok(status),
                NetStatus::Failed if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(500));
                }
                other => {
                    return Err(Error::Timeout {
                        name: self.spec.name.clone(),
                        what: format!("a DHCP lease (the guest reports {other:?})"),
                        timeout,
                        diagnostics: Box::new(self.diagnostics()),
                    });
                }
            }
        }
    }

    /// The raw QMP session, for commands without a wrapper here.
    pub fn qmp(&mut self) -> Result<&mut Qmp> {
        if self.qmp.is_none() {
            return Err(Error::Qmp {
                name: self.spec.name.clone(),
                source: QmpError::Protocol("QMP session closed".into()),
                diagnostics: Box::new(self.diagnostics()),
            });
        }
        Ok(self.qmp.as_mut().expect("checked above"))
    }

    /// Runs a QMP command; errors carry the guest's diagnostics.
    pub fn qmp_execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let res = self.qmp()?.execute(command, arguments, QMP_TIMEOUT);
        res.map_err(|source| self.qmp_error(source))
    }

    pub(crate) fn qmp_error(&mut self, source: QmpError) -> Error {
        if let Some(exited) = self.exited_within_grace() {
            return exited;
        }
        Error::Qmp {
            name: self.spec.name.clone(),
            source,
            diagnostics: Box::new(self.diagnostics()),
        }
    }

    /// `query-status`.
    pub fn status(&mut self) -> Result<VmStatus> {
        let res = self.qmp()?.query_status(QMP_TIMEOUT);
        res.map_err(|source| self.qmp_error(source))
    }

    /// Stops QEMU at once with QMP `quit` (no guest shutdown) and waits for it to exit.
    pub fn quit(&mut self) -> Result<ExitStatus> {
        let res = self.qmp()?.quit(QMP_TIMEOUT);
        res.map_err(|source| self.qmp_error(source))?;
        self.qmp = None;
        self.wait_exit(Duration::from_secs(10))
            .ok_or_else(|| Error::Timeout {
                name: self.spec.name.clone(),
                what: "QEMU exit after QMP quit".into(),
                timeout: Duration::from_secs(10),
                diagnostics: Box::new(self.diagnostics()),
            })
    }

    /// Clean shutdown: the guest syncs and powers off, QEMU exits. If the guest does not power
    /// off within `timeout`, QEMU is stopped with QMP `quit` (then killed) and an error says so.
    pub fn shutdown(&mut self, timeout: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.wait_exit(Duration::ZERO) {
            return Ok(status);
        }
        let sent = self
            .channel
            .as_mut()
            .map(|c| c.send_only("sync; poweroff -f"))
            .transpose();
        // Only wait for a power-off that was actually requested.
        let exited = match sent {
            Ok(Some(())) => self.wait_exit(timeout),
            _ => None,
        };
        if let Some(status) = exited {
            self.qmp = None;
            return Ok(status);
        }
        let diagnostics = Box::new(self.diagnostics());
        if let Some(q) = self.qmp.as_mut() {
            let _ = q.quit(Duration::from_secs(2));
        }
        self.qmp = None;
        if self.wait_exit(Duration::from_secs(5)).is_none() {
            self.kill();
        }
        Err(Error::Timeout {
            name: self.spec.name.clone(),
            what: "guest power-off".into(),
            timeout,
            diagnostics,
        })
    }

    /// Waits up to `timeout` for QEMU to exit; `Some(status)` if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut()?;
            if let Ok(Some(status)) = child.try_wait() {
                self.channel = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(POLL);
        }
    }

    /// Kills QEMU's process group and reaps QEMU.
    pub fn kill(&mut self) {
        self.qmp = None;
        self.channel = None;
        if let Some(mut child) = self.child.take() {
            if let Ok(None) = child.try_wait() {
                kill_process_group(child.id());
            }
            let _ = child.wait();
        }
    }

    /// Reconnects the command channel (after a migration made this guest the live one).
    pub(crate) fn reconnect_channel(&mut self) -> Result<()> {
        self.channel = None;
        self.connect_channel()
    }
}

fn kill_process_group(pid: u32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) with a negative pid signals the process group QEMU leads (spawned with
    // process_group(0)); QEMU is not yet reaped, so its pid (and group id) cannot have been reused.
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.kill();
        if std::env::var_os("VNP_KEEP_GUEST_FILES").is_some() {
            log::info!("guest {}: keeping {}", self.spec.name, self.dir.display());
            return;
        }
        if self.owns_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            for f in [
                &self.files.console_log,
                &self.files.qemu_log,
                &self.files.qmp_socket,
                &self.files.command_socket,
            ] {
                let _ = std::fs::remove_file(f);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_status_parsing() {
        assert_eq!(
            parse_net_status("bound 10.0.2.15/24 router 10.0.2.2 mtu 1452\n"),
            Some(NetStatus::Bound {
                address: "10.0.2.15/24".into(),
                router: "10.0.2.2".into(),
                mtu: 1452
            })
        );
        assert_eq!(
            parse_net_status("bound 10.0.2.15/24 router  mtu 1500"),
            Some(NetStatus::Bound {
                address: "10.0.2.15/24".into(),
                router: String::new(),
                mtu: 1500
            })
        );
        assert_eq!(parse_net_status("failed"), Some(NetStatus::Failed));
        assert_eq!(
            parse_net_status("no-interface"),
            Some(NetStatus::NoInterface)
        );
        assert_eq!(parse_net_status("disabled"), Some(NetStatus::Disabled));
        assert_eq!(parse_net_status("pending"), None);
        assert_eq!(parse_net_status("bound x router y mtu zz"), None);
    }
}
