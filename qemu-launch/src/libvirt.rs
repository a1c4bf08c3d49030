//! libvirt's view of a guest on vnpd: the `<interface type='vhostuser'>` and shared-memory
//! fragments an operator pastes into a domain, and a complete domain for the test guest. Pure
//! functions: no I/O ([`crate::libvirt_domain`] runs them with `virsh`).

use crate::cmdline::{kernel_cmdline, BootFiles, GuestFiles, QUEUE_SIZE, RECONNECT_MS};
use crate::spec::{Accel, GuestSpec};

/// A libvirt domain XML fragment: the shared-memory backing vhost-user needs, and the
/// `<interface type='vhostuser'>` for vnpd's socket (QEMU is the client and reconnects).
pub fn libvirt_interface_xml(spec: &GuestSpec) -> String {
    let sock = spec
        .vhost_user_socket
        .as_deref()
        .map(|p| xml_escape(&p.to_string_lossy()))
        .unwrap_or_else(|| "/run/vnp/VM.sock".to_string());
    format!(
        "<!-- inside <domain>: guest RAM must be shareable with vnpd -->
<memoryBacking>
  <source type='memfd'/>
  <access mode='shared'/>
</memoryBacking>
<!-- inside <devices> -->
<interface type='vhostuser'>
  <mac address='{mac}'/>
  <source type='unix' path='{sock}' mode='client'>
    <reconnect enabled='yes' timeout='{reconnect_s}'/>
  </source>
  <model type='virtio'/>
  <driver queues='{queues}' rx_queue_size='{qs}' tx_queue_size='{qs}'/>
</interface>
",
        mac = spec.mac,
        queues = spec.queue_pairs,
        reconnect_s = RECONNECT_MS.div_ceil(1000),
        qs = QUEUE_SIZE,
    )
}

/// A complete libvirt domain for the test guest on vnpd, for `virsh define`: kernel +
/// initramfs boot, the console (ttyS0) to a file, qemu-launch's command channel (ttyS1) on a
/// unix socket QEMU listens on, and the vhost-user NIC. No USB controller and no balloon: the
/// guest needs neither, and under TCG every device costs boot time.
pub fn libvirt_domain_xml(spec: &GuestSpec, boot: &BootFiles, files: &GuestFiles) -> String {
    let interface = libvirt_interface_xml(spec);
    let (backing, nic) = match interface.find("<interface") {
        Some(i) => (&interface[..i], &interface[i..]),
        None => (interface.as_str(), ""),
    };
    let nic = if spec.vhost_user_socket.is_some() {
        indent(nic, 4)
    } else {
        String::new()
    };
    let domain_type = match spec.accel {
        Accel::Tcg => "qemu",
        Accel::Kvm => "kvm",
    };
    format!(
        "<domain type='{domain_type}'>
  <name>{name}</name>
  <memory unit='MiB'>{mem}</memory>
  <vcpu>{cpus}</vcpu>
{backing}  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <features><acpi/></features>
  <on_reboot>destroy</on_reboot>
  <devices>
    <serial type='file'>
      <source path='{console}'/>
      <target port='0'/>
    </serial>
    <serial type='unix'>
      <source mode='bind' path='{command}'/>
      <target port='1'/>
    </serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
{nic}  </devices>
</domain>
",
        name = xml_escape(&spec.name),
        mem = spec.memory_mib,
        cpus = spec.cpus,
        backing = indent(backing, 2),
        kernel = xml_escape(&boot.kernel.to_string_lossy()),
        initrd = xml_escape(&boot.initramfs.to_string_lossy()),
        cmdline = xml_escape(&kernel_cmdline(spec)),
        console = xml_escape(&files.console_log.to_string_lossy()),
        command = xml_escape(&files.command_socket.to_string_lossy()),
    )
}

/// Indents every line by `n` spaces, dropping the fragment's explanatory comments.
fn indent(s: &str, n: usize) -> String {
    s.lines()
        .filter(|l| !l.trim_start().starts_with("<!--"))
        .map(|l| format!("{}{l}\n", " ".repeat(n)))
        .collect()
}

/// Escapes text for an XML attribute or element.
pub fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::MacAddr;
    use std::path::Path;

    fn spec() -> GuestSpec {
        let mut s = GuestSpec::new("vm-a", "02:00:00:00:00:0a".parse::<MacAddr>().unwrap());
        s.vhost_user_socket = Some("/run/vnp/vm-a.sock".into());
        s.queue_pairs = 2;
        s
    }

    fn boot() -> BootFiles {
        BootFiles {
            kernel: "/g/vmlinuz".into(),
            initramfs: "/g/initramfs.img".into(),
        }
    }

    #[test]
    fn libvirt_snippet() {
        let x = libvirt_interface_xml(&spec());
        assert!(x.contains("<interface type='vhostuser'>"));
        assert!(x.contains("<mac address='02:00:00:00:00:0a'/>"));
        assert!(x.contains("<source type='unix' path='/run/vnp/vm-a.sock' mode='client'>"));
        assert!(x.contains("<driver queues='2'"));
        assert!(x.contains("<access mode='shared'/>"));
        let mut s = spec();
        s.vhost_user_socket = Some("/run/a'<b>.sock".into());
        assert!(libvirt_interface_xml(&s).contains("path='/run/a&apos;&lt;b&gt;.sock'"));
    }

    #[test]
    fn libvirt_domain_embeds_the_interface_and_shared_memory() {
        let files = GuestFiles::in_dir(Path::new("/w"));
        let x = libvirt_domain_xml(&spec(), &boot(), &files);
        assert!(x.starts_with("<domain type='qemu'>"));
        assert!(x.contains("    <interface type='vhostuser'>"));
        assert!(x.contains("  <memoryBacking>"));
        assert!(x.contains("<kernel>/g/vmlinuz</kernel>"));
        assert!(x.contains("<source path='/w/console.log'/>"));
        assert!(!x.contains("<!--"));
        let mut s = spec();
        s.vhost_user_socket = None;
        assert!(!libvirt_domain_xml(&s, &boot(), &files).contains("<interface"));
    }

    #[test]
    fn libvirt_domain_offers_the_command_channel_on_the_second_serial_port() {
        let files = GuestFiles::in_dir(Path::new("/w"));
        let x = libvirt_domain_xml(&spec(), &boot(), &files);
        let console = x.find("<target port='0'/>").unwrap();
        let command = x.find("<source mode='bind' path='/w/cmd.sock'/>").unwrap();
        assert!(console < command);
        assert!(x[command..]
            .starts_with("<source mode='bind' path='/w/cmd.sock'/>\n      <target port='1'/>"));
    }
}
