//! Boots the real test guest under TCG and drives it: commands, network status, QMP, shutdown,
//! and the error paths (missing socket, QEMU exiting early, a guest that never comes up).

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use qemu_launch::{BootFiles, Error, Guest, NetStatus};

#[test]
fn boots_runs_commands_reports_network_and_quits_over_qmp() {
    let img = image();
    let spec = test_spec("boot");
    let name = spec.name.clone();
    let mut guest = Guest::launch(spec).unwrap();
    let dir = guest.work_dir().to_path_buf();
    guest.wait_ready(BOOT_TIMEOUT).unwrap();

    // stdout, stderr and exit status come back separately and exactly.
    let out = guest
        .run(
            "echo hello; echo oops >&2; printf 'no newline'; exit 7",
            CMD_TIMEOUT,
        )
        .unwrap();
    assert_eq!(out.status, 7);
    assert_eq!(out.stdout, "hello\nno newline");
    assert_eq!(out.stderr, "oops\n");

    // The guest runs the kernel the image was built from, and its hostname is the guest name.
    let kver = img
        .manifest
        .lines()
        .find_map(|l| l.strip_prefix("kernel_version="))
        .unwrap()
        .to_string();
    assert_eq!(guest.run_ok("uname -r", CMD_TIMEOUT).unwrap().trim(), kver);

    // Larger binary-ish output survives the base64 framing intact.
    let out = guest
        .run_ok(
            "head -c 20000 /dev/zero | tr '\\0' 'x'; echo; seq 1 2000 | sha256sum",
            CMD_TIMEOUT,
        )
        .unwrap();
    let mut lines = out.lines();
    assert_eq!(lines.next().unwrap(), "x".repeat(20000));
    let expected: String = (1..=2000).map(|i| format!("{i}\n")).collect();
    assert!(lines
        .next()
        .unwrap()
        .starts_with(&sha256_hex(expected.as_bytes())));

    // A command that outlives its timeout is killed in the guest, and the channel stays usable.
    let out = guest.run("sleep 30", Duration::from_secs(1)).unwrap();
    assert_eq!(out.status, 137, "killed by the guest-side timeout");
    assert_eq!(
        guest.run_ok("echo still-here", CMD_TIMEOUT).unwrap(),
        "still-here\n"
    );

    // A background process that keeps writing does not corrupt later replies.
    guest
        .run_ok(
            "(while true; do echo noise; sleep 0.2; done) &",
            CMD_TIMEOUT,
        )
        .unwrap();
    assert_eq!(
        guest.run_ok("sleep 1; echo clean", CMD_TIMEOUT).unwrap(),
        "clean\n"
    );

    // QEMU's user-mode DHCP server leases 10.0.2.15; the init reports it.
    match guest.wait_network(Duration::from_secs(60)).unwrap() {
        NetStatus::Bound { address, mtu, .. } => {
            assert_eq!(address, "10.0.2.15/24");
            assert_eq!(mtu, 1500);
        }
        other => panic!("expected a DHCP lease, got {other:?}"),
    }
    let mac = guest.spec().mac.to_string();
    assert!(guest
        .run_ok("ip link show eth0", CMD_TIMEOUT)
        .unwrap()
        .contains(&mac));

    let st = guest.status().unwrap();
    assert!(st.running);
    assert_eq!(st.status, "running");
    let version = guest.qmp().unwrap().version.clone();
    assert!(version.starts_with("10."), "QEMU {version}");

    // QMP stop/cont round trip is visible in the status.
    guest.qmp_execute("stop", None).unwrap();
    assert_eq!(guest.status().unwrap().status, "paused");
    guest.qmp_execute("cont", None).unwrap();
    assert!(guest.status().unwrap().running);
    // An unknown command is a clear error, not a hang.
    let err = guest
        .qmp_execute("no-such-command", None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("CommandNotFound"), "{err}");

    let status = guest.quit().unwrap();
    assert!(status.success(), "{status}");
    drop(guest);
    assert_no_stray_qemu(&name);
    assert!(!dir.exists(), "work dir {} removed on drop", dir.display());
}

fn sha256_hex(data: &[u8]) -> String {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn shutdown_powers_the_guest_off_cleanly_without_network() {
    let mut spec = test_spec("shutdown");
    // No NIC at all: the command channel must still come up and the init must say so.
    spec.test_netdev = None;
    let name = spec.name.clone();
    let mut guest = Guest::launch(spec).unwrap();
    guest.wait_ready(BOOT_TIMEOUT).unwrap();
    assert_eq!(
        guest.wait_network(Duration::from_secs(60)).unwrap(),
        NetStatus::NoInterface
    );
    let status = guest.shutdown(Duration::from_secs(60)).unwrap();
    assert!(
        status.success(),
        "QEMU exit status after guest power-off: {status}"
    );
    assert!(!guest.is_running());
    assert!(guest.console().contains("vnp-guest: init starting"));
    drop(guest);
    assert_no_stray_qemu(&name);
}

#[test]
fn missing_vhost_user_socket_is_a_clear_error_and_starts_nothing() {
    let mut spec = test_spec("nosock");
    spec.test_netdev = None;
    let sock = PathBuf::from(format!(
        "/tmp/qemu-launch-test-missing-{}.sock",
        std::process::id()
    ));
    spec.vhost_user_socket = Some(sock.clone());
    let name = spec.name.clone();
    let err = Guest::launch(spec).unwrap_err();
    assert!(
        matches!(err, Error::MissingSocket(ref p) if *p == sock),
        "{err}"
    );
    assert!(err.to_string().contains("is vnpd running"), "{err}");
    assert_no_stray_qemu(&name);
}

#[test]
fn stale_vhost_user_socket_times_out_with_qemus_complaint_in_the_error() {
    // A socket file nobody listens on (vnpd died without cleaning up). QEMU keeps retrying
    // (reconnect-ms, so a restarting vnpd is picked up) and does not answer QMP meanwhile.
    let sock = PathBuf::from(format!(
        "/tmp/qemu-launch-test-stale-{}.sock",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&sock);
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let mut spec = test_spec("stale");
    spec.test_netdev = None;
    spec.vhost_user_socket = Some(sock.clone());
    spec.start_timeout = Duration::from_secs(5);
    let name = spec.name.clone();
    let err = Guest::launch(spec).unwrap_err();
    std::fs::remove_file(&sock).unwrap();
    let msg = err.to_string();
    assert!(matches!(err, Error::Timeout { .. }), "{msg}");
    assert!(msg.contains("is vnpd serving it?"), "{msg}");
    assert!(
        msg.contains("Connection refused"),
        "QEMU's stderr tail is in the error: {msg}"
    );
    assert_no_stray_qemu(&name);
}

#[test]
fn qemu_exiting_early_reports_its_stderr() {
    let img = image();
    let spec = test_spec("badkernel");
    let name = spec.name.clone();
    let boot = BootFiles {
        kernel: PathBuf::from("/nonexistent/vmlinuz"),
        initramfs: img.initramfs.clone(),
    };
    let err = Guest::launch_with(spec, &boot, false).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::QemuExited { .. }), "{msg}");
    assert!(
        msg.contains("/nonexistent/vmlinuz"),
        "QEMU's complaint is quoted: {msg}"
    );
    assert_no_stray_qemu(&name);
}

#[test]
fn guest_that_never_comes_up_reports_the_console_tail() {
    let img = image();
    let spec = test_spec("panic");
    let name = spec.name.clone();
    // A garbage initramfs: the kernel finds no init and panics; panic=-1 + -no-reboot end QEMU.
    let dir =
        std::env::temp_dir().join(format!("qemu-launch-test-badinitrd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("initramfs.img");
    std::fs::write(&bad, vec![0x5a; 4096]).unwrap();
    let boot = BootFiles {
        kernel: img.kernel.clone(),
        initramfs: bad,
    };
    let mut guest = Guest::launch_with(spec, &boot, false).unwrap();
    let err = guest.wait_ready(BOOT_TIMEOUT).unwrap_err();
    drop(guest);
    std::fs::remove_dir_all(&dir).unwrap();
    let msg = err.to_string();
    assert!(matches!(err, Error::QemuExited { .. }), "{msg}");
    assert!(
        msg.contains("Kernel panic"),
        "console tail is in the error: {msg}"
    );
    assert_no_stray_qemu(&name);
}

#[test]
fn dropping_a_running_guest_kills_qemu_and_removes_its_files() {
    let spec = test_spec("drop");
    let name = spec.name.clone();
    let guest = Guest::launch(spec).unwrap();
    let dir = guest.work_dir().to_path_buf();
    assert_eq!(qemu_pids_for(&name), vec![guest.pid().unwrap()]);
    drop(guest);
    assert_no_stray_qemu(&name);
    assert!(!dir.exists());
}

#[test]
fn qemu_dies_with_a_killed_launcher() {
    // No destructor runs on SIGKILL (e.g. a CI timeout): QEMU must still go away.
    let name = unique_name("orphan");
    let dir = std::env::temp_dir().join(format!("qemu-launch-test-orphan-{}", std::process::id()));
    let mut cli = std::process::Command::new(env!("CARGO_BIN_EXE_qemu-launch"))
        .args([
            "run",
            "--name",
            &name,
            "--test-netdev",
            "user",
            "--mac",
            "02:00:00:00:01:01",
            "--work-dir",
        ])
        .arg(&dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while qemu_pids_for(&name).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the launcher never started QEMU"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    cli.kill().unwrap();
    cli.wait().unwrap();
    assert_no_stray_qemu(&name);
    std::fs::remove_dir_all(&dir).unwrap();
}
