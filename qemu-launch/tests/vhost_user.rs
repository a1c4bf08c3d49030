//! The vhost-user wiring against a real vhost-user backend that is not vnpd: DPDK's vhost PMD
//! (`dpdk-testpmd --vdev net_vhost0,iface=SOCK`, the server side, like vnpd). The guest's
//! frames must reach the backend, and a live migration from one backend's socket to another's
//! must complete (DPDK's vhost library does dirty logging) with the guest's traffic arriving at
//! the destination backend afterwards.
//!
//! Needs QEMU 10, dpdk-testpmd (package `dpdk`) and the guest image: `scripts/setup`. Traffic
//! goes only to the backend, which drops it (rxonly).

mod common;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use qemu_launch::{migrate, Guest, MigrateOptions};
use vnp_testkit::process::{ChildGuard, TempDir};

/// A dpdk-testpmd vhost-user server that counts and drops what the guest sends.
struct VhostBackend {
    guard: ChildGuard,
    tag: String,
    socket: PathBuf,
    stats: PathBuf,
}

fn runtime_prefix(tag: &str) -> String {
    format!("ql-{tag}-{}", std::process::id())
}

/// DPDK's EAL keeps a runtime directory per file prefix even with --in-memory.
fn runtime_dir(tag: &str) -> PathBuf {
    PathBuf::from("/var/run/dpdk").join(runtime_prefix(tag))
}

impl Drop for VhostBackend {
    fn drop(&mut self) {
        let _ = self.guard.kill();
        let _ = std::fs::remove_dir_all(runtime_dir(&self.tag));
    }
}

impl VhostBackend {
    fn start(dir: &Path, tag: &str) -> VhostBackend {
        Self::start_at(dir, tag, &dir.join(format!("{tag}.sock")))
    }

    fn start_at(dir: &Path, tag: &str, socket: &Path) -> VhostBackend {
        let socket = socket.to_path_buf();
        let stats = dir.join(format!("{tag}.stats"));
        let mut cmd = Command::new("dpdk-testpmd");
        cmd.args([
            "-l",
            "0,1",
            "--no-pci",
            "--no-huge",
            "-m",
            "512",
            "--log-level",
            "lib.eal:error",
        ])
        .arg(format!("--file-prefix=ql-{tag}-{}", std::process::id()))
        .arg(format!(
            "--vdev=net_vhost0,iface={},queues=1",
            socket.display()
        ))
        .args([
            "--",
            "--forward-mode=rxonly",
            "--stats-period=1",
            "--nb-cores=1",
            "--total-num-mbufs=4096",
        ])
        .stdin(Stdio::null())
        .stdout(File::create(&stats).unwrap());
        let mut guard = ChildGuard::spawn(&format!("testpmd-{tag}"), &mut cmd, None)
            .expect("dpdk-testpmd is required (package dpdk; run scripts/setup)");
        guard
            .wait_for_path(&socket, Duration::from_secs(30))
            .unwrap();
        VhostBackend {
            guard,
            tag: tag.to_string(),
            socket,
            stats,
        }
    }

    /// Frames received from the guest so far (testpmd's periodic port statistics).
    fn rx_packets(&self) -> u64 {
        let text = std::fs::read_to_string(&self.stats).unwrap_or_default();
        text.lines()
            .filter_map(|l| l.trim().strip_prefix("RX-packets:"))
            .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
            .next_back()
            .unwrap_or(0)
    }

    /// The backend's count once it has stopped moving: testpmd prints its statistics once a
    /// second, so a reading can be up to a period old. Two equal readings three periods apart
    /// mean the count has settled (the caller has made sure nothing sends any more).
    fn settled_rx_packets(&self, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        let mut last = self.rx_packets();
        loop {
            std::thread::sleep(Duration::from_secs(3));
            let now = self.rx_packets();
            if now == last {
                return now;
            }
            assert!(
                Instant::now() < deadline,
                "backend {} still counting ({last} -> {now})",
                self.socket.display()
            );
            last = now;
        }
    }

    /// Waits until the backend has counted more than `than` frames.
    fn wait_rx_above(&self, than: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let n = self.rx_packets();
            if n > than {
                return n;
            }
            assert!(
                Instant::now() < deadline,
                "backend {} saw {n} frames, expected more than {than}; stderr: {}",
                self.socket.display(),
                self.guard.stderr_tail()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// Sends a few frames from the guest: ARP requests for an address in the benchmarking range
/// that nothing answers (the backend drops everything).
const SEND_FRAMES: &str = "ip addr add 198.18.250.2/24 dev eth0 2>/dev/null; ip link set eth0 up; ping -c 3 -W 1 198.18.250.1 >/dev/null 2>&1; true";

#[test]
fn guest_on_a_vhost_user_backend_sends_frames_and_migrates_to_another_backend() {
    let dir = TempDir::new("qemu-launch-vhost").unwrap();
    let a = VhostBackend::start(dir.path(), "a");
    let b = VhostBackend::start(dir.path(), "b");

    let mut spec = test_spec("vhu");
    spec.test_netdev = None;
    spec.vhost_user_socket = Some(a.socket.clone());
    spec.extra_kernel_args = vec!["vnp.nonet".into()];
    let mut dst_spec = spec.clone();
    dst_spec.name = unique_name("vhu-dst");
    dst_spec.vhost_user_socket = Some(b.socket.clone());
    let (src_name, dst_name) = (spec.name.clone(), dst_spec.name.clone());

    let mut src = Guest::launch(spec).unwrap();
    src.wait_ready(BOOT_TIMEOUT).unwrap();
    let mac = src.spec().mac.to_string();
    assert!(src
        .run_ok("cat /sys/class/net/eth0/address", CMD_TIMEOUT)
        .unwrap()
        .contains(&mac));
    src.run_ok(SEND_FRAMES, CMD_TIMEOUT).unwrap();
    let on_a = a.wait_rx_above(0, Duration::from_secs(30));
    assert_eq!(
        b.rx_packets(),
        0,
        "nothing reaches the other backend before migrating"
    );

    let (mut dst, report) = migrate(&mut src, dst_spec, &MigrateOptions::default()).unwrap();
    eprintln!("vhost-user migration: {report:?}");
    assert_eq!(report.status, "completed");
    assert!(report.total_ms >= report.downtime_ms);
    drop(src);
    assert_no_stray_qemu(&src_name);

    // The guest now sends through the destination backend, and not through the old one.
    let b_before = b.rx_packets();
    // The source QEMU is gone, so nothing can reach backend a any more; its printed count may
    // still lag by a statistics period (frames the guest sent just before the switchover).
    let a_after_migration = a.settled_rx_packets(Duration::from_secs(30));
    dst.run_ok(SEND_FRAMES, CMD_TIMEOUT).unwrap();
    b.wait_rx_above(b_before, Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        a.rx_packets(),
        a_after_migration,
        "the old backend still receives frames"
    );
    assert!(on_a > 0);

    dst.shutdown(Duration::from_secs(60)).unwrap();
    drop(dst);
    assert_no_stray_qemu(&dst_name);
    drop(a);
    drop(b);
    for tag in ["a", "b"] {
        assert!(
            !runtime_dir(tag).exists(),
            "{} left behind",
            runtime_dir(tag).display()
        );
    }
}

#[test]
fn guest_reconnects_when_the_vhost_user_backend_restarts() {
    // vnpd restarts (upgrade, crash): QEMU's chardev reconnects (reconnect-ms) and the guest's
    // NIC works again without the guest doing anything.
    let dir = TempDir::new("qemu-launch-vhost-rc").unwrap();
    let backend = VhostBackend::start(dir.path(), "rc1");
    let socket = backend.socket.clone();

    let mut spec = test_spec("vhu-rc");
    spec.test_netdev = None;
    spec.vhost_user_socket = Some(socket.clone());
    spec.extra_kernel_args = vec!["vnp.nonet".into()];
    let name = spec.name.clone();
    let mut guest = Guest::launch(spec).unwrap();
    guest.wait_ready(BOOT_TIMEOUT).unwrap();
    guest.run_ok(SEND_FRAMES, CMD_TIMEOUT).unwrap();
    backend.wait_rx_above(0, Duration::from_secs(30));

    drop(backend);
    let _ = std::fs::remove_file(&socket);
    // The guest keeps running while its backend is gone.
    assert_eq!(guest.run_ok("echo alive", CMD_TIMEOUT).unwrap(), "alive\n");

    let restarted = VhostBackend::start_at(dir.path(), "rc2", &socket);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        guest.run_ok(SEND_FRAMES, CMD_TIMEOUT).unwrap();
        if restarted.rx_packets() > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no frames reached the restarted backend; QEMU log:\n{}",
            guest.diagnostics()
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    drop(guest);
    assert_no_stray_qemu(&name);
}
