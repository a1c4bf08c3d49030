//! Helpers shared by qemu-launch's integration tests. These tests boot real guests under TCG:
//! they need root-free QEMU 10 (`qemu-system-x86_64`) and the guest image (`scripts/setup` or
//! `scripts/build-guest`); they fail, never skip, when those are missing.

#![allow(dead_code)]

use std::time::Duration;

use qemu_launch::{GuestImage, GuestSpec, MacAddr, TestNetdev};

/// Generous: two cores shared with parallel builds and other TCG guests.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
pub const CMD_TIMEOUT: Duration = Duration::from_secs(30);

/// A test-unique guest name (tests run in parallel, and several test binaries at once).
pub fn unique_name(test: &str) -> String {
    format!("t-{test}-{}", std::process::id())
}

/// A guest with the isolated QEMU-only NIC (no vnpd needed).
pub fn test_spec(test: &str) -> GuestSpec {
    let name = unique_name(test);
    let mut spec = GuestSpec::new(name.clone(), MacAddr::local_from_name(&name));
    spec.test_netdev = Some(TestNetdev::UserIsolated);
    spec
}

pub fn image() -> GuestImage {
    match GuestImage::ensure() {
        Ok(img) => img,
        Err(e) => panic!("the test guest image is required (run scripts/setup as root): {e}"),
    }
}

/// Pids of live QEMU processes whose command line names guest `name`. A test asserts this is
/// empty once its guests are gone: no stray QEMU.
pub fn qemu_pids_for(name: &str) -> Vec<u32> {
    let needle = format!("guest={name},");
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        // Zombies have an empty cmdline; only live QEMUs count.
        if cmdline.contains("qemu-system") && cmdline.contains(&needle) {
            pids.push(pid);
        }
    }
    pids
}

/// Asserts no QEMU for `name` is left, allowing a moment for the kernel to tear it down.
pub fn assert_no_stray_qemu(name: &str) {
    for _ in 0..50 {
        if qemu_pids_for(name).is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "stray QEMU processes for guest {name}: {:?}",
        qemu_pids_for(name)
    );
}
