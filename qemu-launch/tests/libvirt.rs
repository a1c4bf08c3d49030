//! The libvirt XML qemu-launch prints is valid against libvirt's own domain schema
//! (`virt-xml-validate` from libvirt-clients; no libvirtd needed). Running it under a real
//! libvirtd, on vnpd, is `tests/tests/libvirt.rs` in vnp-e2e.

use std::path::Path;
use std::process::Command;

use qemu_launch::cmdline::{libvirt_domain_xml, BootFiles, GuestFiles};
use qemu_launch::{GuestSpec, MacAddr};

#[test]
fn printed_domain_validates_against_libvirts_schema() {
    let mut spec = GuestSpec::new("vm-a", "02:00:00:00:00:0a".parse::<MacAddr>().unwrap());
    spec.vhost_user_socket = Some("/run/vnp/vm-a.sock".into());
    spec.queue_pairs = 2;
    let boot = BootFiles {
        kernel: "/g/vmlinuz".into(),
        initramfs: "/g/initramfs.img".into(),
    };
    let xml = libvirt_domain_xml(
        &spec,
        &boot,
        &GuestFiles::in_dir(Path::new("/var/lib/vnp/vm-a")),
    );
    let path = std::env::temp_dir().join(format!(
        "qemu-launch-test-domain-{}.xml",
        std::process::id()
    ));
    std::fs::write(&path, &xml).unwrap();
    let out = Command::new("virt-xml-validate")
        .arg(&path)
        .arg("domain")
        .output();
    std::fs::remove_file(&path).unwrap();
    let out = out.expect(
        "virt-xml-validate is required (libvirt-clients + libxml2-utils; run scripts/setup)",
    );
    assert!(
        out.status.success(),
        "libvirt rejects the domain:\n{xml}\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // And it really is checking: a broken interface is rejected.
    let bad = xml.replace("mode='client'", "mode='sideways'");
    let path = std::env::temp_dir().join(format!(
        "qemu-launch-test-domain-bad-{}.xml",
        std::process::id()
    ));
    std::fs::write(&path, &bad).unwrap();
    let out = Command::new("virt-xml-validate")
        .arg(&path)
        .arg("domain")
        .output()
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    assert!(
        !out.status.success(),
        "an invalid source mode must fail validation"
    );
}
