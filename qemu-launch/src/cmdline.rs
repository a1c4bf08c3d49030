//! Command lines for a guest attached to vnpd: QEMU (what qemu-launch runs), and the
//! cloud-hypervisor equivalent operators use. Pure functions: no I/O. libvirt's XML is in
//! [`crate::libvirt`] (re-exported here for existing callers).

use std::path::{Path, PathBuf};

pub use crate::libvirt::{libvirt_domain_xml, libvirt_interface_xml};
use crate::spec::{Accel, GuestSpec, TestNetdev};

/// The kernel and initramfs a guest boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootFiles {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

/// Host-side files of one running guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestFiles {
    pub console_log: PathBuf,
    pub qemu_log: PathBuf,
    pub qmp_socket: PathBuf,
    pub command_socket: PathBuf,
}

impl GuestFiles {
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            console_log: dir.join("console.log"),
            qemu_log: dir.join("qemu.log"),
            qmp_socket: dir.join("qmp.sock"),
            command_socket: dir.join("cmd.sock"),
        }
    }
}

/// How long QEMU waits before reconnecting to a vnpd that went away (vnpd restart).
pub const RECONNECT_MS: u32 = 1000;
/// Virtqueue size used on every NIC (QEMU's default; stated so all three line up).
pub const QUEUE_SIZE: u16 = 256;

/// QEMU's option syntax uses ',' as separator; a literal comma is written twice.
pub fn qemu_escape(value: &str) -> String {
    value.replace(',', ",,")
}

fn path_opt(path: &Path) -> String {
    qemu_escape(&path.to_string_lossy())
}

/// The guest kernel's command line. Console on ttyS0; panic=-1 plus QEMU's -no-reboot turn a
/// guest panic into a QEMU exit, which launch reports with the console tail.
pub fn kernel_cmdline(spec: &GuestSpec) -> String {
    let mut words = vec![
        "console=ttyS0".to_string(),
        "panic=-1".to_string(),
        "loglevel=4".to_string(),
        format!("vnp.hostname={}", spec.name),
    ];
    words.extend(spec.extra_kernel_args.iter().cloned());
    words.join(" ")
}

/// Arguments (without the program) for QEMU. `incoming_defer` starts a migration destination
/// that waits for `migrate-incoming` over QMP.
pub fn qemu_args(
    spec: &GuestSpec,
    boot: &BootFiles,
    files: &GuestFiles,
    incoming_defer: bool,
) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    let mem = format!("{}M", spec.memory_mib);
    let accel = match spec.accel {
        Accel::Tcg => "tcg",
        Accel::Kvm => "kvm",
    };
    push(&["-name", &format!("guest={},debug-threads=on", spec.name)]);
    // vhost-user needs guest RAM in a shareable fd: memfd with share=on.
    push(&["-machine", &format!("q35,accel={accel},memory-backend=mem")]);
    if spec.accel == Accel::Kvm {
        push(&["-cpu", "host"]);
    }
    push(&["-m", &mem]);
    push(&[
        "-object",
        &format!("memory-backend-memfd,id=mem,size={mem},share=on"),
    ]);
    push(&["-smp", &spec.cpus.to_string()]);
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ]);
    push(&["-kernel", &boot.kernel.to_string_lossy()]);
    push(&["-initrd", &boot.initramfs.to_string_lossy()]);
    push(&["-append", &kernel_cmdline(spec)]);
    // ttyS0: console to a file. ttyS1: the command channel (QEMU listens, the host connects).
    push(&[
        "-chardev",
        &format!("file,id=console,path={}", path_opt(&files.console_log)),
    ]);
    push(&["-serial", "chardev:console"]);
    push(&[
        "-chardev",
        &format!(
            "socket,id=cmdchan,path={},server=on,wait=off",
            path_opt(&files.command_socket)
        ),
    ]);
    push(&["-serial", "chardev:cmdchan"]);
    push(&[
        "-chardev",
        &format!(
            "socket,id=qmp,path={},server=on,wait=off",
            path_opt(&files.qmp_socket)
        ),
    ]);
    push(&["-mon", "chardev=qmp,mode=control"]);
    if let Some(sock) = &spec.vhost_user_socket {
        let q = spec.queue_pairs;
        push(&[
            "-chardev",
            &format!(
                "socket,id=vnp0,path={},reconnect-ms={RECONNECT_MS}",
                path_opt(sock)
            ),
        ]);
        push(&[
            "-netdev",
            &format!("vhost-user,id=net0,chardev=vnp0,queues={q}"),
        ]);
        push(&[
            "-device",
            &format!(
                "virtio-net-pci,netdev=net0,mac={},mq=on,vectors={},rx_queue_size={QUEUE_SIZE},tx_queue_size={QUEUE_SIZE}",
                spec.mac,
                2 * u32::from(q) + 2
            ),
        ]);
    } else if let Some(TestNetdev::UserIsolated) = spec.test_netdev {
        push(&["-netdev", "user,id=net0,restrict=on"]);
        push(&[
            "-device",
            &format!("virtio-net-pci,netdev=net0,mac={}", spec.mac),
        ]);
    }
    if incoming_defer {
        push(&["-incoming", "defer"]);
    }
    a.extend(spec.extra_qemu_args.iter().cloned());
    a
}

/// The cloud-hypervisor equivalent of [`qemu_args`] for the NIC and memory (program not
/// included). cloud-hypervisor has one serial port, so the command channel is not offered;
/// its `--kernel` wants an uncompressed PVH `vmlinux` (see docs/qemu-launch.md).
pub fn cloud_hypervisor_args(
    spec: &GuestSpec,
    boot: &BootFiles,
    files: &GuestFiles,
    api_socket: &Path,
) -> Vec<String> {
    let mut a = vec![
        "--api-socket".to_string(),
        format!("path={}", api_socket.display()),
        "--cpus".to_string(),
        format!("boot={}", spec.cpus),
        "--memory".to_string(),
        format!("size={}M,shared=on", spec.memory_mib),
        "--kernel".to_string(),
        boot.kernel.display().to_string(),
        "--initramfs".to_string(),
        boot.initramfs.display().to_string(),
        "--cmdline".to_string(),
        kernel_cmdline(spec),
        "--serial".to_string(),
        format!("file={}", files.console_log.display()),
        "--console".to_string(),
        "off".to_string(),
    ];
    if let Some(sock) = &spec.vhost_user_socket {
        a.push("--net".to_string());
        a.push(format!(
            "vhost_user=true,socket={},vhost_mode=client,num_queues={},queue_size={QUEUE_SIZE},mac={}",
            sock.display(),
            2 * u32::from(spec.queue_pairs),
            spec.mac
        ));
    }
    a
}

/// Renders a command for a POSIX shell, quoting only where needed, one option per line.
pub fn shell_command(program: &str, args: &[String]) -> String {
    let mut out = shell_quote(program);
    let mut i = 0;
    while i < args.len() {
        out.push_str(" \\\n    ");
        out.push_str(&shell_quote(&args[i]));
        // Keep "-opt value" pairs on one line.
        if args[i].starts_with('-') && i + 1 < args.len() && !args[i + 1].starts_with('-') {
            out.push(' ');
            out.push_str(&shell_quote(&args[i + 1]));
            i += 1;
        }
        i += 1;
    }
    out
}

pub fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=,:@+%".contains(c));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::MacAddr;

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

    fn has_pair(args: &[String], opt: &str, value: &str) -> bool {
        args.windows(2).any(|w| w[0] == opt && w[1] == value)
    }

    #[test]
    fn qemu_vhost_user_wiring() {
        let files = GuestFiles::in_dir(Path::new("/w"));
        let a = qemu_args(&spec(), &boot(), &files, false);
        assert!(has_pair(&a, "-machine", "q35,accel=tcg,memory-backend=mem"));
        assert!(has_pair(
            &a,
            "-object",
            "memory-backend-memfd,id=mem,size=256M,share=on"
        ));
        assert!(has_pair(
            &a,
            "-chardev",
            "socket,id=vnp0,path=/run/vnp/vm-a.sock,reconnect-ms=1000"
        ));
        assert!(has_pair(
            &a,
            "-netdev",
            "vhost-user,id=net0,chardev=vnp0,queues=2"
        ));
        assert!(has_pair(
            &a,
            "-device",
            "virtio-net-pci,netdev=net0,mac=02:00:00:00:00:0a,mq=on,vectors=6,rx_queue_size=256,tx_queue_size=256"
        ));
        assert!(has_pair(
            &a,
            "-chardev",
            "file,id=console,path=/w/console.log"
        ));
        assert!(has_pair(
            &a,
            "-chardev",
            "socket,id=qmp,path=/w/qmp.sock,server=on,wait=off"
        ));
        assert!(has_pair(&a, "-mon", "chardev=qmp,mode=control"));
        assert!(has_pair(
            &a,
            "-append",
            "console=ttyS0 panic=-1 loglevel=4 vnp.hostname=vm-a"
        ));
        assert!(!a.contains(&"-incoming".to_string()));
        let mut s = spec();
        s.extra_qemu_args = vec!["-trace".into(), "vhost_user_*".into()];
        let b = qemu_args(&s, &boot(), &files, false);
        assert_eq!(&b[b.len() - 2..], ["-trace", "vhost_user_*"]);
        // The console must be the first serial port (ttyS0), the command channel the second.
        let serials: Vec<_> = a
            .windows(2)
            .filter(|w| w[0] == "-serial")
            .map(|w| w[1].clone())
            .collect();
        assert_eq!(serials, ["chardev:console", "chardev:cmdchan"]);
    }

    #[test]
    fn qemu_test_netdev_incoming_kvm_and_escaping() {
        let mut s = spec();
        s.vhost_user_socket = None;
        s.test_netdev = Some(TestNetdev::UserIsolated);
        s.accel = Accel::Kvm;
        let files = GuestFiles::in_dir(Path::new("/w,x"));
        let a = qemu_args(&s, &boot(), &files, true);
        assert!(has_pair(&a, "-netdev", "user,id=net0,restrict=on"));
        assert!(has_pair(&a, "-incoming", "defer"));
        assert!(has_pair(&a, "-cpu", "host"));
        assert!(has_pair(
            &a,
            "-chardev",
            "file,id=console,path=/w,,x/console.log"
        ));
        assert!(!a.iter().any(|x| x.contains("vhost-user")));
    }

    #[test]
    fn no_nic_without_socket_or_test_netdev() {
        let mut s = spec();
        s.vhost_user_socket = None;
        let a = qemu_args(&s, &boot(), &GuestFiles::in_dir(Path::new("/w")), false);
        assert!(!a.iter().any(|x| x.contains("virtio-net")));
    }

    #[test]
    fn cloud_hypervisor_line() {
        let a = cloud_hypervisor_args(
            &spec(),
            &boot(),
            &GuestFiles::in_dir(Path::new("/w")),
            Path::new("/w/ch.sock"),
        );
        assert!(has_pair(&a, "--memory", "size=256M,shared=on"));
        assert!(has_pair(
            &a,
            "--net",
            "vhost_user=true,socket=/run/vnp/vm-a.sock,vhost_mode=client,num_queues=4,queue_size=256,mac=02:00:00:00:00:0a"
        ));
        assert!(has_pair(&a, "--serial", "file=/w/console.log"));
    }

    #[test]
    fn shell_rendering_quotes_what_needs_it() {
        assert_eq!(shell_quote("a,b=c"), "a,b=c");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote(""), "''");
        let s = shell_command("qemu", &["-m".into(), "256M".into(), "-no-reboot".into()]);
        assert_eq!(s, "qemu \\\n    -m 256M \\\n    -no-reboot");
    }
}
