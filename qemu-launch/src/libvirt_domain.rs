//! A guest that a libvirt daemon runs: defined and started with `virsh` (the real client,
//! unmodified) from [`libvirt_domain_xml`], driven over qemu-launch's command channel (the
//! domain's second serial port), live-migrated with `virsh migrate --live`, destroyed and
//! undefined on drop.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::channel::{ChannelError, CmdOutput, CommandChannel};
use crate::cmdline::{BootFiles, GuestFiles};
use crate::error::{Diagnostics, Error, Result};
use crate::guest::{parse_net_status, NetStatus};
use crate::libvirt::{libvirt_domain_xml, xml_escape};
use crate::spec::{check_socket_path_len, GuestSpec};

/// The `virsh` client for one libvirt daemon.
#[derive(Debug, Clone)]
pub struct Virsh {
    connect: Option<String>,
    qemu_log_dir: Option<PathBuf>,
}

impl Virsh {
    /// `connect` is the URI for `virsh -c` (e.g. `qemu:///system?socket=/path/libvirt-sock`);
    /// `None` uses virsh's default (`LIBVIRT_DEFAULT_URI`, then `qemu:///system`).
    pub fn new(connect: Option<String>) -> Self {
        Self {
            connect,
            qemu_log_dir: None,
        }
    }

    /// Where this daemon writes its QEMUs' logs (`NAME.log`; libvirt's default is
    /// `/var/log/libvirt/qemu`), so that errors can quote them.
    pub fn with_qemu_log_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.qemu_log_dir = Some(dir.into());
        self
    }

    /// The URI given to `virsh -c`.
    pub fn connect_uri(&self) -> Option<&str> {
        self.connect.as_deref()
    }

    /// Runs `virsh [-c URI] ARGS`; returns stdout, or an error with virsh's stderr.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new("virsh");
        if let Some(uri) = &self.connect {
            cmd.args(["-c", uri]);
        }
        let out = cmd.args(args).output().map_err(|source| Error::Spawn {
            program: "virsh".into(),
            source,
        })?;
        if !out.status.success() {
            return Err(Error::Libvirt {
                command: format!("virsh {}", args.join(" ")),
                detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn qemu_log(&self, name: &str) -> PathBuf {
        match &self.qemu_log_dir {
            Some(dir) => dir.join(format!("{name}.log")),
            None => PathBuf::from(format!("/var/log/libvirt/qemu/{name}.log")),
        }
    }
}

/// A domain defined and started through libvirt. Dropping it destroys and undefines it.
#[derive(Debug)]
pub struct LibvirtDomain {
    virsh: Virsh,
    name: String,
    files: GuestFiles,
    vhost_user_socket: Option<PathBuf>,
    channel: Option<CommandChannel>,
}

impl LibvirtDomain {
    /// Writes [`libvirt_domain_xml`] to `spec.work_dir` (required) as `domain.xml`, then
    /// `virsh define` and `virsh start`. Returns once libvirt reports the domain started; use
    /// [`LibvirtDomain::wait_ready`] to wait for the guest's init.
    pub fn define_and_start(virsh: Virsh, spec: &GuestSpec, boot: &BootFiles) -> Result<Self> {
        spec.validate()?;
        let dir = spec.work_dir.clone().ok_or_else(|| {
            Error::InvalidSpec("a libvirt domain needs spec.work_dir for its files".into())
        })?;
        let mut files = GuestFiles::in_dir(&dir);
        check_socket_path_len(&files.command_socket)?;
        files.qemu_log = virsh.qemu_log(&spec.name);
        let xml_path = dir.join("domain.xml");
        std::fs::write(&xml_path, libvirt_domain_xml(spec, boot, &files))
            .map_err(|e| Error::io(format!("writing {}", xml_path.display()), e))?;
        virsh.run(&["define", &xml_path.to_string_lossy()])?;
        let domain = Self {
            virsh,
            name: spec.name.clone(),
            files,
            vhost_user_socket: spec.vhost_user_socket.clone(),
            channel: None,
        };
        // On failure the drop undefines what was defined.
        domain.virsh.run(&["start", &domain.name])?;
        Ok(domain)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn files(&self) -> &GuestFiles {
        &self.files
    }

    /// The client of the daemon that runs this domain.
    pub fn virsh(&self) -> &Virsh {
        &self.virsh
    }

    /// `virsh domstate`: `running`, `shut off`, `paused`, ...
    pub fn state(&self) -> Result<String> {
        Ok(self
            .virsh
            .run(&["domstate", &self.name])?
            .trim()
            .to_string())
    }

    /// Console tail and the tail of the QEMU log libvirt keeps.
    pub fn diagnostics(&self) -> Diagnostics {
        Diagnostics::collect(&self.files.console_log, &self.files.qemu_log)
    }

    /// Waits until the guest's command channel answers.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let answered = match self.channel() {
                Ok(ch) => match ch.run_with_reply_deadline(
                    "echo vnp-ready",
                    Duration::from_secs(5),
                    Duration::from_secs(2),
                ) {
                    Ok(out) => out.stdout.trim() == "vnp-ready",
                    Err(ChannelError::Timeout(_)) | Err(ChannelError::Reply(_)) => false,
                    Err(e) => return Err(self.channel_error(e.to_string())),
                },
                // QEMU creates the socket as it starts: keep trying while the domain runs.
                Err(_) => self.expect_running().map(|_| false)?,
            };
            if answered {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.timeout("command channel answering (guest boot)", timeout));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Runs `cmd` with `sh` in the guest; the guest kills it after `timeout`.
    pub fn run(&mut self, cmd: &str, timeout: Duration) -> Result<CmdOutput> {
        let result = self.channel()?.run(cmd, timeout);
        result.map_err(|e| match e {
            ChannelError::Timeout(t) => self.timeout(&format!("reply to command {cmd:?}"), t),
            other => self.channel_error(other.to_string()),
        })
    }

    /// Waits until the guest's DHCP client reports a result (bound, failed, no NIC, disabled).
    pub fn wait_network(&mut self, timeout: Duration) -> Result<NetStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.run(
                "cat /run/vnp/net 2>/dev/null || echo pending",
                Duration::from_secs(5),
            )?;
            if let Some(status) = parse_net_status(&out.stdout) {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let what = format!("DHCP result (last: {:?})", out.stdout.trim());
                return Err(self.timeout(&what, timeout));
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// `virsh migrate --live` to the daemon `dest` (its connect URI is the destination URI).
    /// The destination XML is this domain's `virsh dumpxml --migratable` with the host-side
    /// paths moved: the vhost-user socket to `dest_socket` (the destination vnpd's), console
    /// and command channel to `dest_dir`. `stream_address` is where the destination QEMU
    /// listens for the migration stream (`--listen-address A --migrateuri tcp://A`; both
    /// daemons on one machine need `127.0.0.1`, which libvirt refuses in its configuration);
    /// without it libvirt uses the destination's `migration_host` or hostname. Returns the
    /// domain on `dest`.
    pub fn migrate_live(
        &mut self,
        dest: Virsh,
        dest_socket: &Path,
        dest_dir: &Path,
        stream_address: Option<&str>,
    ) -> Result<LibvirtDomain> {
        let dest_uri = dest.connect_uri().map(str::to_string).ok_or_else(|| {
            Error::InvalidSpec("migration needs the destination daemon's URI".into())
        })?;
        let mut dest_files = GuestFiles::in_dir(dest_dir);
        check_socket_path_len(&dest_files.command_socket)?;
        dest_files.qemu_log = dest.qemu_log(&self.name);
        let xml = self.virsh.run(&["dumpxml", "--migratable", &self.name])?;
        let mut moves = vec![
            (
                self.files.console_log.as_path(),
                dest_files.console_log.as_path(),
            ),
            (
                self.files.command_socket.as_path(),
                dest_files.command_socket.as_path(),
            ),
        ];
        if let Some(src_socket) = &self.vhost_user_socket {
            moves.push((src_socket.as_path(), dest_socket));
        }
        let xml = move_paths(xml, &moves);
        let xml_path = dest_dir.join("domain.xml");
        std::fs::write(&xml_path, xml)
            .map_err(|e| Error::io(format!("writing {}", xml_path.display()), e))?;
        let xml_arg = xml_path.to_string_lossy();
        let stream_uri = stream_address.map(|a| format!("tcp://{a}"));
        let mut args = vec![
            "migrate", "--live", "--xml", &xml_arg, &self.name, &dest_uri,
        ];
        if let (Some(address), Some(uri)) = (stream_address, &stream_uri) {
            args.extend(["--listen-address", address, "--migrateuri", uri]);
        }
        self.channel = None;
        self.virsh.run(&args)?;
        Ok(LibvirtDomain {
            virsh: dest,
            name: self.name.clone(),
            files: dest_files,
            vhost_user_socket: Some(dest_socket.to_path_buf()),
            channel: None,
        })
    }

    /// `virsh destroy` (QEMU is killed; the definition stays until drop).
    pub fn destroy(&mut self) -> Result<()> {
        self.channel = None;
        self.virsh.run(&["destroy", &self.name]).map(|_| ())
    }

    fn channel(&mut self) -> Result<&mut CommandChannel> {
        if self.channel.is_none() {
            let path = &self.files.command_socket;
            let stream = UnixStream::connect(path)
                .map_err(|e| self.channel_error(format!("connecting {}: {e}", path.display())))?;
            self.channel = Some(CommandChannel::new(stream));
        }
        Ok(self.channel.as_mut().expect("connected above"))
    }

    fn expect_running(&self) -> Result<()> {
        match self.state()? {
            s if s == "running" => Ok(()),
            other => Err(self.channel_error(format!("domain is {other}"))),
        }
    }

    fn channel_error(&self, reason: String) -> Error {
        Error::Channel {
            name: self.name.clone(),
            reason,
            diagnostics: Box::new(self.diagnostics()),
        }
    }

    fn timeout(&self, what: &str, timeout: Duration) -> Error {
        Error::Timeout {
            name: self.name.clone(),
            what: what.to_string(),
            timeout,
            diagnostics: Box::new(self.diagnostics()),
        }
    }
}

/// Rewrites host paths in libvirt's XML: each `(from, to)` where `from` is a whole attribute
/// value (libvirt quotes attributes with `'`), so one path never matches inside a longer one.
pub fn move_paths(xml: String, moves: &[(&Path, &Path)]) -> String {
    let quoted = |p: &Path| format!("'{}'", xml_escape(&p.to_string_lossy()));
    moves.iter().fold(xml, |xml, (from, to)| {
        xml.replace(&quoted(from), &quoted(to))
    })
}

impl Drop for LibvirtDomain {
    fn drop(&mut self) {
        // Best effort: the domain may already be off (destroyed, migrated away) or transient
        // (gone once destroyed), and there is nobody to report an error to.
        self.channel = None;
        let _ = self.virsh.run(&["destroy", &self.name]);
        let _ = self.virsh.run(&["undefine", &self.name]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moving_paths_rewrites_whole_attribute_values_only() {
        let xml = "<source path='/a/vm.sock' mode='client'/>\n\
                   <source path='/a/vm.sock.old'/>\n\
                   <source mode='bind' path='/a/cmd.sock'/>\n\
                   <note>/a/vm.sock</note>"
            .to_string();
        let moved = move_paths(
            xml,
            &[
                (Path::new("/a/vm.sock"), Path::new("/b/vm.sock")),
                (Path::new("/a/cmd.sock"), Path::new("/b/it's.sock")),
            ],
        );
        assert!(
            moved.contains("<source path='/b/vm.sock' mode='client'/>"),
            "{moved}"
        );
        assert!(moved.contains("<source path='/a/vm.sock.old'/>"), "{moved}");
        assert!(moved.contains("path='/b/it&apos;s.sock'"), "{moved}");
        assert!(moved.contains("<note>/a/vm.sock</note>"), "{moved}");
    }
}
