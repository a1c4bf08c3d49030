//! Live migration of a running guest between two QEMU processes on this machine, with the
//! isolated QEMU-only NIC (the vhost-user variant needs vnpd with dirty-page logging).

mod common;

use std::time::Duration;

use common::*;
use qemu_launch::{migrate, Guest, MigrateOptions};

#[test]
fn running_guest_migrates_keeps_its_state_and_reports_downtime() {
    let src_spec = test_spec("mig-src");
    let mut dst_spec = src_spec.clone();
    dst_spec.name = unique_name("mig-dst");
    let (src_name, dst_name) = (src_spec.name.clone(), dst_spec.name.clone());

    let mut src = Guest::launch(src_spec).unwrap();
    src.wait_ready(BOOT_TIMEOUT).unwrap();
    // State that must survive: a file in the guest's tmpfs, and a process that keeps counting.
    let marker = format!("marker-{}", std::process::id());
    src.run_ok(&format!("echo {marker} > /tmp/marker"), CMD_TIMEOUT)
        .unwrap();
    src.run_ok(
        "(i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done) >/dev/null 2>&1 &",
        CMD_TIMEOUT,
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let before: u64 = src
        .run_ok("cat /tmp/count", CMD_TIMEOUT)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let boot_id = src
        .run_ok("cat /proc/sys/kernel/random/boot_id", CMD_TIMEOUT)
        .unwrap();

    let (mut dst, report) = migrate(&mut src, dst_spec, &MigrateOptions::default()).unwrap();
    eprintln!("migration report: {report:?}");
    assert_eq!(report.status, "completed");
    assert!(
        report.total_ms > 0 && report.total_ms >= report.downtime_ms,
        "{report:?}"
    );
    assert!(
        report.downtime_ms > 0,
        "a stop-and-copy phase always takes some time: {report:?}"
    );
    assert!(report.ram_transferred_bytes > 0, "{report:?}");
    // Guest RAM plus a little device memory (ROMs, VGA-less q35 still has some).
    let ram = 256 * 1024 * 1024;
    assert!(
        (ram..ram + 16 * 1024 * 1024).contains(&report.ram_total_bytes),
        "{report:?}"
    );

    // The source QEMU is gone; the same guest (same boot, same files) runs in the destination.
    assert!(!src.is_running());
    assert_no_stray_qemu(&src_name);
    assert!(dst.status().unwrap().running);
    assert_eq!(
        dst.run_ok("cat /tmp/marker", CMD_TIMEOUT).unwrap().trim(),
        marker
    );
    assert_eq!(
        dst.run_ok("cat /proc/sys/kernel/random/boot_id", CMD_TIMEOUT)
            .unwrap(),
        boot_id
    );
    std::thread::sleep(Duration::from_secs(1));
    let after: u64 = dst
        .run_ok("cat /tmp/count", CMD_TIMEOUT)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        after > before,
        "the counting process kept running across migration ({before} -> {after})"
    );

    dst.shutdown(Duration::from_secs(60)).unwrap();
    drop(dst);
    drop(src);
    assert_no_stray_qemu(&dst_name);
}

#[test]
fn failed_migration_keeps_the_source_running_and_cleans_up_the_destination() {
    let src_spec = test_spec("migfail-src");
    let mut dst_spec = src_spec.clone();
    dst_spec.name = unique_name("migfail-dst");
    let (src_name, dst_name) = (src_spec.name.clone(), dst_spec.name.clone());
    let mut src = Guest::launch(src_spec).unwrap();
    src.wait_ready(BOOT_TIMEOUT).unwrap();

    // Nobody listens at this URI: the destination listens elsewhere, so `migrate` fails.
    let bogus = format!(
        "unix:/tmp/qemu-launch-test-nobody-{}.sock",
        std::process::id()
    );
    // migrate-incoming and migrate must use the same URI; give the destination a URI that
    // it cannot listen on so the failure is on the destination side.
    let opts = MigrateOptions {
        uri: Some(format!("{bogus}/x/y")),
        ..MigrateOptions::default()
    };
    let err = migrate(&mut src, dst_spec, &opts).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("QMP") || msg.contains("migration"), "{msg}");
    assert!(
        msg.contains("console tail"),
        "diagnostics are included: {msg}"
    );
    assert_no_stray_qemu(&dst_name);

    // The source is unharmed and still answers.
    assert!(src.status().unwrap().running);
    assert_eq!(src.run_ok("echo alive", CMD_TIMEOUT).unwrap(), "alive\n");
    drop(src);
    assert_no_stray_qemu(&src_name);
}
