//! The steps every live-migration test takes around the data plane: the registry's migration
//! to another host with that host's incoming attach, and waiting for the destination to
//! register the VM's endpoint after the resume (`migration_hairpin`, `migration_state`,
//! `live_migration`, `libvirt`); the real `qemu-launch migrate` between two hosts
//! ([`QemuLaunchMigrate`], `qemu_launch_migrate`); and reading a busybox ping summary.

use crate::cluster::Cluster;
use anyhow::{anyhow, bail, Result};
use std::time::{Duration, Instant};
use vnp_registry_client::{Endpoint, StartMigration};
use vnpd_admin_api::AttachmentInfo;

/// `vm` begins migrating to host `to` at the registry (the source stays the owner), and host
/// `to`'s vnpd attaches it as incoming: the socket the destination QEMU or frontend opens.
pub fn begin_migration(c: &Cluster, vm: &str, to: usize) -> Result<AttachmentInfo> {
    let host = c.host(to).id.clone();
    let id = vm.to_string();
    c.registry(move |r| {
        r.start_migration(
            &id,
            &StartMigration {
                host,
                host_port: None,
            },
        )
    })?;
    c.host(to)
        .admin()
        .attach_with(vm, None, None, true)
        .map_err(|e| anyhow!("incoming attach of {vm} on host {to}: {e}"))
}

/// `vm`'s endpoint as the registry has it.
pub fn endpoint_of(c: &Cluster, vm: &str) -> Result<Option<Endpoint>> {
    let id = vm.to_string();
    Ok(c.registry(move |r| r.get_vm(&id))?.endpoint)
}

/// Waits up to `timeout` for host `host` to register `vm`'s endpoint (its device start after
/// the resume); the endpoint.
pub fn wait_endpoint_on(c: &Cluster, vm: &str, host: usize, timeout: Duration) -> Result<Endpoint> {
    let addr = c.host(host).addr;
    let deadline = Instant::now() + timeout;
    loop {
        match endpoint_of(c, vm)? {
            Some(ep) if ep.host_addr == addr => return Ok(ep),
            ep if Instant::now() >= deadline => {
                bail!("host {host} did not register {vm} within {timeout:?} (endpoint {ep:?})")
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// The destination QEMU's spec for `src` on `socket` (a destination vnpd's incoming
/// attachment), named `name`, with its files in `dir/guest-NAME`.
pub fn destination_spec(
    src: &qemu_launch::Guest,
    socket: &std::path::Path,
    name: &str,
    dir: &std::path::Path,
) -> Result<qemu_launch::GuestSpec> {
    let mut spec = src.spec().clone();
    spec.name = name.into();
    spec.vhost_user_socket = Some(socket.to_path_buf());
    let work = dir.join(format!("guest-{name}"));
    std::fs::create_dir_all(&work)?;
    spec.work_dir = Some(work);
    Ok(spec)
}

/// Pre-copy speed of [`cancel_slow_migration`], bytes/s: a guest's RAM takes over a minute.
pub const SLOW_PRECOPY: u64 = 1_000_000;
/// How long into the pre-copy [`cancel_slow_migration`] cancels.
pub const CANCEL_AFTER: Duration = Duration::from_secs(2);

/// Migrates `src` to a destination QEMU of `dst` with the pre-copy slowed to [`SLOW_PRECOPY`]
/// and cancels it after [`CANCEL_AFTER`] (QMP `migrate_cancel`); fails unless QEMU reports it
/// cancelled. The source keeps the guest; the network steps are the caller's.
pub fn cancel_slow_migration(
    src: &mut qemu_launch::Guest,
    dst: qemu_launch::GuestSpec,
) -> Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&cancel);
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(CANCEL_AFTER);
        flag.store(true, Ordering::Relaxed);
    });
    let opts = qemu_launch::MigrateOptions {
        max_bandwidth: Some(SLOW_PRECOPY),
        cancel: Some(cancel),
        ..qemu_launch::MigrateOptions::default()
    };
    let outcome = qemu_launch::migrate(src, dst, &opts).map(|(_, report)| report);
    let _ = canceller.join();
    match outcome {
        Err(e) if e.to_string().contains(qemu_launch::migration::CANCELLED) => Ok(()),
        Err(e) => bail!("the migration failed otherwise: {e}"),
        Ok(report) => bail!("the slow migration completed before the cancel: {report:?}"),
    }
}

/// `qemu-launch migrate` run by a test: the real binary, between two hosts of a cluster.
#[derive(Debug)]
pub struct QemuLaunchMigrate {
    child: vnp_testkit::process::ChildGuard,
    stdout: Option<std::thread::JoinHandle<std::io::Result<String>>>,
}

/// How a `qemu-launch migrate` ended.
#[derive(Debug)]
pub struct QemuLaunchOutcome {
    /// Its exit status (`None`: killed by a signal).
    pub code: Option<i32>,
    /// Its JSON report (`Value::Null` if stdout held none).
    pub json: serde_json::Value,
    /// Its stdout as printed.
    pub stdout: String,
    /// The tail of its stderr.
    pub stderr: String,
}

impl QemuLaunchMigrate {
    /// Starts `qemu-launch migrate` for `vm` (attached on host `from` as `att`): it boots the
    /// guest on `att`'s socket, moves it to host `to` in the registry, attaches it as incoming
    /// there and migrates it. `extra` are further arguments (`--probe`, `--after`, ...).
    pub fn spawn(
        c: &Cluster,
        att: &AttachmentInfo,
        to: usize,
        work: &std::path::Path,
        extra: &[&str],
    ) -> Result<QemuLaunchMigrate> {
        let image = qemu_launch::GuestImage::ensure()?;
        let mut cmd = c.fabric().core().command(&c.bins().qemu_launch);
        cmd.args(["migrate", "--name", &att.vm_id, "--vm", &att.vm_id])
            .args(["--registry", &c.registry_url()])
            .arg("--tls-dir")
            .arg(c.tls_dir())
            .arg("--socket")
            .arg(&att.socket_path)
            .args(["--dst-host", &c.host(to).id])
            .arg("--dst-admin")
            .arg(&c.host(to).admin_socket)
            .arg("--work-dir")
            .arg(work)
            .arg("--guest-dir")
            .arg(&image.dir)
            .args(extra)
            .stdout(std::process::Stdio::piped());
        let mut child = vnp_testkit::process::ChildGuard::spawn("qemu-launch", &mut cmd, None)?;
        let out = child
            .take_stdout()
            .ok_or_else(|| anyhow!("qemu-launch: no stdout"))?;
        let stdout = std::thread::spawn(move || std::io::read_to_string(out));
        Ok(QemuLaunchMigrate {
            child,
            stdout: Some(stdout),
        })
    }

    /// qemu-launch's pid (`ip netns exec` execs it).
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits up to `timeout` for it to end (then kills it: an error).
    pub fn wait(mut self, timeout: Duration) -> Result<QemuLaunchOutcome> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if Instant::now() >= deadline {
                self.child.kill()?;
                bail!(
                    "qemu-launch migrate still ran after {timeout:?}:\n{}",
                    self.child.stderr_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let stdout = match self.stdout.take().map(|h| h.join()) {
            Some(Ok(Ok(text))) => text,
            _ => String::new(),
        };
        Ok(QemuLaunchOutcome {
            code: status.code(),
            json: serde_json::from_str(&stdout).unwrap_or(serde_json::Value::Null),
            stdout,
            stderr: self.child.stderr_tail(),
        })
    }
}

/// (transmitted, received) from a busybox ping summary
/// (`3 packets transmitted, 3 packets received, 0% packet loss`).
pub fn ping_counts(output: &str) -> Option<(u32, u32)> {
    let line = output.lines().find(|l| l.contains("packets transmitted"))?;
    let mut parts = line.split(',');
    let tx = parts.next()?.split_whitespace().next()?.parse().ok()?;
    let rx = parts.next()?.split_whitespace().next()?.parse().ok()?;
    Some((tx, rx))
}

#[cfg(test)]
mod tests {
    use super::ping_counts;

    #[test]
    fn ping_summary() {
        let out =
            "PING 10.77.0.2 (10.77.0.2): 56 data bytes\n\n--- 10.77.0.2 ping statistics ---\n\
                   5 packets transmitted, 3 packets received, 40% packet loss\n";
        assert_eq!(ping_counts(out), Some((5, 3)));
        assert_eq!(ping_counts("PING x\n"), None);
        assert_eq!(
            ping_counts("x packets transmitted, 3 packets received"),
            None
        );
    }
}
