//! libvirt for real: a private `libvirtd` (Debian's libvirt 11 from bookworm-backports, QEMU
//! 10) boots the test guest from qemu-launch's domain XML (`<interface type='vhostuser'>` on
//! vnpd's socket, memfd shared memory) with `virsh define`/`virsh start`; the guest gets its
//! address by DHCP from vnpd and pings a peer on another vnpd host. Then a second libvirtd
//! (own mount namespace, own host UUID, QEMU as `libvirt-qemu` instead of root) takes the
//! guest over with `virsh migrate --live` onto the other vnpd host's socket, the guest keeps
//! talking, survives a restart of that vnpd (libvirt's QEMU reconnects), and `virsh destroy`
//! ends it. One cluster, two guest boots, about 1.5 minutes.
//!
//! Needs root (network and mount namespaces), QEMU 10, libvirt 11 and the guest image
//! (`scripts/setup`). Run: `cargo test -p vnp-e2e --test libvirt -- --nocapture`.

use std::path::Path;
use std::time::{Duration, Instant};

use qemu_launch::{GuestImage, GuestSpec, LibvirtDomain, MacAddr, NetStatus, Virsh};
use vnp_e2e::cluster::{assert_nothing_left, wait_dhcp, Cluster, ClusterOptions, GUEST_MTU};
use vnp_e2e::migration::{begin_migration, ping_counts};
use vnp_testkit::libvirtd::Libvirtd;
use vnpd_admin_api::AttachmentInfo;

const CMD: Duration = Duration::from_secs(60);
/// Distinct host UUIDs: libvirt refuses a migration between daemons that share one.
const HOST_UUID_A: &str = "5f0c3e2a-7b1d-4c6e-9a8f-00000000000a";
const HOST_UUID_B: &str = "5f0c3e2a-7b1d-4c6e-9a8f-00000000000b";
/// The user (and group) Debian's libvirt runs QEMU as by default; the migration destination
/// runs it so.
const QEMU_USER: &str = "libvirt-qemu";

fn step(what: &str) {
    eprintln!("[libvirt] {what}");
}

fn ping(domain: &mut LibvirtDomain, dst: std::net::Ipv4Addr) -> String {
    let out = domain
        .run(&format!("ping -c 3 -W 5 {dst}"), CMD)
        .unwrap_or_else(|e| panic!("ping from {}: {e}", domain.name()));
    format!("{}{}", out.stdout, out.stderr)
}

/// The test guest's spec for an attachment, its files in `work`.
fn domain_spec(att: &AttachmentInfo, work: &Path) -> GuestSpec {
    let mac: MacAddr = att.mac.parse().expect("registry MAC");
    let mut spec = GuestSpec::new(att.vm_id.clone(), mac);
    spec.vhost_user_socket = Some(att.socket_path.clone());
    spec.queue_pairs = att.queue_pairs;
    std::fs::create_dir_all(work).unwrap();
    spec.work_dir = Some(work.to_path_buf());
    spec
}

fn virsh_for(daemon: &Libvirtd) -> Virsh {
    Virsh::new(Some(daemon.uri())).with_qemu_log_dir(daemon.qemu_log_dir())
}

/// Command lines of the QEMUs a daemon runs.
fn qemus_of(daemon: &Libvirtd) -> Vec<(u32, String)> {
    daemon
        .processes()
        .into_iter()
        .filter_map(|pid| {
            let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let line = String::from_utf8_lossy(&raw).replace('\0', " ");
            line.contains("qemu-system").then_some((pid, line))
        })
        .collect()
}

/// Uid QEMU runs as (from /proc/PID/status).
fn uid_of(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// `id FLAG NAME` (`-u`: uid, `-g`: primary gid).
fn id_of(flag: &str, name: &str) -> u32 {
    let out = std::process::Command::new("id")
        .args([flag, name])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "no user {name}: run scripts/setup (libvirt-daemon)"
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// The id of group `name` (`getent group`; the user `libvirt-qemu`'s primary group differs).
fn group_id(name: &str) -> u32 {
    let out = std::process::Command::new("getent")
        .args(["group", name])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split(':')
        .nth(2)
        .and_then(|g| g.trim().parse().ok())
        .unwrap_or_else(|| panic!("no group {name}: run scripts/setup (libvirt-daemon)"))
}

/// The socket vnpd created: its mode and group (what lets `libvirt-qemu`'s QEMU connect:
/// connecting to a unix socket needs write permission).
fn socket_access(path: &Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).unwrap();
    (m.mode() & 0o777, m.gid())
}

/// (inode, change time) of a socket, to tell a recreated one from the old (the inode number
/// alone may be reused); `None` while absent.
fn socket_identity(path: &Path) -> Option<(u64, i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.ino(), m.ctime(), m.ctime_nsec()))
}

#[test]
fn libvirt_boots_a_guest_on_vnpd_and_migrates_it_live() {
    // vnpd gives its vhost-user sockets to libvirt's QEMU user group, as an operator would.
    let opts = ClusterOptions {
        prefix: "vnplv".into(),
        vnpd_config_tables: format!(
            "[vhost_user]\nsocket_group = \"{QEMU_USER}\"\nsocket_mode = 0o660\n"
        ),
        ..ClusterOptions::default()
    };
    let mut c = Cluster::start(&opts).expect("cluster");
    let dir = c.dir().to_path_buf();
    let namespaces = c.namespace_names();

    step("vm-a on host 0 (libvirt), vm-b on host 1 (qemu-launch)");
    let rec_a = c.create_vm("vm-a", 0, &[]).unwrap();
    let rec_b = c.create_vm("vm-b", 1, &[]).unwrap();
    let att_a = c.attach(0, "vm-a").unwrap();
    let att_b = c.attach(1, "vm-b").unwrap();

    step("starting libvirtd a");
    let started = Instant::now();
    let lv_a = Libvirtd::start(&dir.join("libvirt-a"), HOST_UUID_A, "root").expect("libvirtd a");
    eprintln!(
        "  libvirtd answered in {} ms",
        started.elapsed().as_millis()
    );

    step("virsh define + start vm-a from qemu-launch's domain XML");
    let image = GuestImage::ensure().unwrap();
    let spec_a = domain_spec(&att_a, &dir.join("libvirt-vm-a"));
    let started = Instant::now();
    let mut da = LibvirtDomain::define_and_start(virsh_for(&lv_a), &spec_a, &image.boot_files())
        .unwrap_or_else(|e| panic!("{e}\nlibvirtd:\n{}", lv_a.stderr_tail()));
    let defined_and_started = started.elapsed();
    da.wait_ready(Duration::from_secs(180)).unwrap();
    eprintln!(
        "  virsh define + start: {} ms; command channel answering: {} ms after virsh define",
        defined_and_started.as_millis(),
        started.elapsed().as_millis()
    );
    assert_eq!(da.state().unwrap(), "running");
    let mut gb = c.launch_guest(&att_b).unwrap();

    step("libvirt's QEMU: vhost-user on vnpd's socket, memfd shared memory, runs as root");
    let qemus = qemus_of(&lv_a);
    assert_eq!(qemus.len(), 1, "{qemus:?}");
    let (qemu_pid, qemu_line) = &qemus[0];
    let socket = att_a.socket_path.to_string_lossy();
    assert!(qemu_line.contains(&*socket), "{qemu_line}");
    assert!(qemu_line.contains("memory-backend-memfd"), "{qemu_line}");
    assert!(qemu_line.contains("\"share\":true"), "{qemu_line}");
    assert_eq!(uid_of(*qemu_pid), 0, "qemu.conf user = root");

    step("DHCP from vnpd");
    let lease = match da.wait_network(Duration::from_secs(90)).unwrap() {
        NetStatus::Bound {
            address,
            router,
            mtu,
        } => (address, router, mtu),
        other => panic!("vm-a: no lease: {other:?}\n{}", c.logs()),
    };
    eprintln!("  vm-a: {lease:?}");
    assert_eq!(
        lease,
        (
            format!("{}/24", rec_a.ip),
            "10.77.0.1".into(),
            u32::from(GUEST_MTU)
        )
    );
    wait_dhcp(&mut gb).unwrap();

    step("ping across hosts, both ways");
    let out = ping(&mut da, rec_b.ip);
    assert_eq!(
        ping_counts(&out).map(|p| p.1),
        Some(3),
        "a -> b:\n{out}\n{}",
        c.logs()
    );
    let out = gb
        .run(&format!("ping -c 3 -W 5 {}", rec_a.ip), CMD)
        .unwrap();
    assert_eq!(
        ping_counts(&out.stdout).map(|p| p.1),
        Some(3),
        "b -> a:\n{}\n{}",
        out.stdout,
        c.logs()
    );

    step("starting libvirtd b (own mount namespace, own host UUID, QEMU as libvirt-qemu)");
    let lv_b = Libvirtd::start(&dir.join("libvirt-b"), HOST_UUID_B, QEMU_USER).expect("libvirtd b");

    step("vm-b pings vm-a (5/s) across the migration");
    gb.run_ok(
        &format!(
            "ping -i 0.2 -c 150 -W 1 {} > /tmp/ping.log 2>&1 &",
            rec_a.ip
        ),
        CMD,
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));

    step("registry: vm-a migrates to host 1; host 1 attaches it as incoming");
    let att_a2 = begin_migration(&c, "vm-a", 1).unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    let qemu_gid = group_id(QEMU_USER);
    assert_eq!(socket_access(&att_a2.socket_path), (0o660, qemu_gid));

    step("virsh migrate --live to libvirtd b, onto host 1's socket");
    let dest_dir = dir.join("libvirt-vm-a-b");
    std::fs::create_dir_all(&dest_dir).unwrap();
    let started = Instant::now();
    let mut da2 = da
        .migrate_live(
            virsh_for(&lv_b),
            &att_a2.socket_path,
            &dest_dir,
            Some("127.0.0.1"),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", lv_a.stderr_tail(), lv_b.stderr_tail()));
    eprintln!("  virsh migrate took {} ms", started.elapsed().as_millis());
    if let Ok(info) = lv_a.virsh(&["domjobinfo", "--completed", "vm-a"]) {
        eprintln!("  source's job info:\n{info}");
    }
    assert_eq!(da.state().unwrap(), "shut off");
    assert_eq!(da2.state().unwrap(), "running");
    assert!(qemus_of(&lv_a).is_empty(), "source QEMU still runs");
    let dest_qemus = qemus_of(&lv_b);
    assert_eq!(dest_qemus.len(), 1, "{dest_qemus:?}");
    let (dest_pid, dest_line) = &dest_qemus[0];
    assert!(dest_line.contains(&*att_a2.socket_path.to_string_lossy()));
    assert_eq!(uid_of(*dest_pid), id_of("-u", QEMU_USER), "qemu.conf user");
    c.host(0).admin().detach("vm-a").unwrap();

    step("after the move");
    da2.wait_ready(Duration::from_secs(60)).unwrap();
    let out = ping(&mut da2, rec_b.ip);
    if ping_counts(&out).map(|p| p.1) != Some(3) {
        // What the guest's driver saw: a ring it marked broken, or counters that did not move.
        let guest = da2
            .run(
                "dmesg | tail -30; cat /sys/class/net/eth0/statistics/rx_packets",
                CMD,
            )
            .map(|o| o.stdout)
            .unwrap_or_else(|e| e.to_string());
        panic!("a -> b after:\n{out}\nguest:\n{guest}\n{}", c.logs());
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    let log = loop {
        let o = gb.run("cat /tmp/ping.log", CMD).unwrap();
        if o.stdout.contains("packets transmitted") || Instant::now() > deadline {
            break o.stdout;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    let (tx, rx) = ping_counts(&log).unwrap_or_else(|| panic!("no ping summary:\n{log}"));
    eprintln!("  pings across the libvirt migration: {tx} sent, {rx} received");
    assert!(rx > 0 && rx <= tx, "{log}");

    step("vnpd restart on host 1: libvirt's QEMU reconnects to the recreated socket");
    // <reconnect enabled='yes' timeout='1'/> becomes QEMU's reconnect-ms on the chardev.
    let chardev = dest_line
        .split(' ')
        .find(|arg| arg.contains(&*att_a2.socket_path.to_string_lossy()))
        .unwrap_or_default();
    eprintln!("  libvirt's vhost-user chardev: {chardev}");
    assert!(chardev.contains("reconnect-ms=1000"), "{dest_line}");
    let before_restart = socket_identity(&att_a2.socket_path);
    c.stop_vnpd(1).unwrap();
    c.start_vnpd(1).unwrap();
    let restarted = Instant::now();
    // vnpd creates the socket again, with the configured group and mode from the start.
    loop {
        let now = socket_identity(&att_a2.socket_path);
        if now.is_some() && now != before_restart {
            break;
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(30),
            "vnpd did not recreate the socket"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(socket_access(&att_a2.socket_path), (0o660, qemu_gid));
    let answered = (0..30).any(|_| {
        let out = da2
            .run(&format!("ping -c 1 -W 2 {}", rec_b.ip), CMD)
            .unwrap();
        out.success()
    });
    assert!(answered, "no traffic after the vnpd restart\n{}", c.logs());
    eprintln!(
        "  traffic again {} ms after vnpd was restarted",
        restarted.elapsed().as_millis()
    );
    let out = ping(&mut da2, rec_b.ip);
    assert_eq!(
        ping_counts(&out).map(|p| p.1),
        Some(3),
        "after restart:\n{out}\n{}",
        c.logs()
    );

    step("virsh destroy");
    da2.destroy().unwrap();
    assert!(qemus_of(&lv_b).is_empty(), "QEMU survives virsh destroy");

    drop(da2);
    drop(lv_b);
    drop(da);
    drop(lv_a);
    drop(gb);
    drop(c);
    assert_nothing_left(&dir, &namespaces);
}
