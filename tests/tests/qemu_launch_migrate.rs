//! `qemu-launch migrate`, the one-command migration between two vnpd hosts, through the real
//! binary with real QEMU guests: a migration whose destination QEMU dies during pre-copy, one
//! cancelled during pre-copy (SIGINT to qemu-launch, which sends QMP `migrate_cancel`), and one
//! whose incoming attach the destination vnpd refuses, each exit with status 2, and afterwards the registry still has the VM on the source host
//! with no migration under way, the destination vnpd has no incoming VM left, and the guest
//! still talks from the source: it pings a peer on the other host and accepts a TCP connection
//! from it. Then a migration of the same VM succeeds, its JSON checked against the registry.
//!
//! Needs root (network namespaces), QEMU 10 and the guest image (`scripts/setup`).
//! Run: `cargo test -p vnp-e2e --test qemu_launch_migrate -- --nocapture`.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use qemu_launch::Guest;
use vnp_e2e::cluster::{assert_nothing_left, wait_dhcp, Cluster, ClusterOptions};
use vnp_e2e::migration::{endpoint_of, QemuLaunchMigrate, QemuLaunchOutcome};
use vnp_testkit::process::processes_matching;
use vnpd_admin_api::AttachmentInfo;

const CMD: Duration = Duration::from_secs(60);
/// qemu-launch's status for a migration that failed or was cancelled with everything put back.
const EXIT_NOT_MIGRATED: i32 = 2;
/// A slow pre-copy (QEMU's `max-bandwidth`, bytes/s): about 85 MB to send take over a minute,
/// so the test fails or cancels the migration while it is surely still in pre-copy.
const SLOW: &str = "1000000";
/// How long into the pre-copy the test breaks the migration.
const INTO_PRECOPY: Duration = Duration::from_secs(3);
const RUN_WITHIN: Duration = Duration::from_secs(400);

fn step(what: &str) {
    eprintln!("[qemu_launch_migrate] {what}");
}

/// The guest command (`--after`) that shows the guest still talks where it runs: it pings
/// `peer`, then waits for one TCP connection on `port` and prints what it received.
fn talk_check(peer: Ipv4Addr, port: u16) -> String {
    format!(
        "ping -c 3 -W 5 {peer}; (sleep 60 | nc -l -p {port} > /tmp/in-{port} &); i=0; \
         while [ ! -s /tmp/in-{port} ] && [ $i -lt 300 ]; do usleep 100000; i=$((i+1)); done; \
         cat /tmp/in-{port}"
    )
}

/// Starts, in the peer guest, a loop that connects to `ip:port` until a connection succeeds
/// and sends `hello-from-peer-N` on it.
fn connect_until_accepted(peer: &mut Guest, ip: Ipv4Addr, port: u16) {
    peer.run_ok(
        &format!(
            "(i=0; while [ $i -lt 600 ]; do echo hello-from-peer-$i | nc -w 2 {ip} {port} \
             2>/dev/null && break; i=$((i+1)); usleep 500000; done) > /dev/null 2>&1 &"
        ),
        CMD,
    )
    .unwrap();
}

/// The guest qemu-launch migrates and its peer guest.
struct Pair<'a> {
    att: &'a AttachmentInfo,
    ip: Ipv4Addr,
    peer_ip: Ipv4Addr,
    dir: &'a Path,
}

/// Starts `qemu-launch migrate` of `vms.att` from host 0 to host 1 (with `extra` arguments), a
/// probe to the peer and [`talk_check`] on `port` as `--after`, and the peer's connection loop
/// to `port`.
fn spawn_talking(
    c: &Cluster,
    peer: &mut Guest,
    vms: &Pair,
    port: u16,
    extra: &[&str],
) -> QemuLaunchMigrate {
    connect_until_accepted(peer, vms.ip, port);
    let after = talk_check(vms.peer_ip, port);
    let peer_ip = vms.peer_ip.to_string();
    let mut args = vec![
        "--after",
        &after,
        "--probe",
        &peer_ip,
        "--probe-interval-ms",
        "10",
    ];
    args.extend_from_slice(extra);
    let work = vms.dir.join(format!("guest-{}", vms.att.vm_id));
    QemuLaunchMigrate::spawn(c, vms.att, 1, &work, &args).expect("qemu-launch")
}

/// Starts a slow `qemu-launch migrate` of `vms.att` from host 0 to host 1 with a probe to the
/// peer and [`talk_check`] on `port` as `--after`, and the peer's connection loop to `port`.
/// Returns once the pre-copy has run for [`INTO_PRECOPY`], with the destination QEMU's pid.
fn migration_in_precopy(
    c: &Cluster,
    peer: &mut Guest,
    vms: &Pair,
    port: u16,
) -> (QemuLaunchMigrate, u32) {
    let mut run = spawn_talking(c, peer, vms, port, &["--max-bandwidth", SLOW]);
    let needle = format!("guest={}-dst,", vms.att.vm_id);
    let deadline = Instant::now() + Duration::from_secs(300);
    let pid = loop {
        if let Some((pid, _)) = processes_matching(&needle).into_iter().next() {
            break pid;
        }
        assert!(
            run.running(),
            "qemu-launch ended before migrating\n{}",
            c.logs()
        );
        assert!(
            Instant::now() < deadline,
            "no destination QEMU\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(INTO_PRECOPY);
    assert!(run.running(), "qemu-launch ended during the pre-copy");
    (run, pid)
}

fn signal(pid: u32, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).unwrap();
    // SAFETY: kill(2) has no memory-safety preconditions; `pid` is a live child of this test
    // (qemu-launch) or of that child (its destination QEMU), not yet reaped.
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig})");
}

/// What must hold after a migration of `att.vm_id` from host 0 to host 1 did not happen:
/// nothing moved (see [`what_moved`]), qemu-launch said so (status 2, the reason, the network
/// undone), and the guest talked from the source afterwards.
fn assert_source_kept(c: &Cluster, att: &AttachmentInfo, out: &QemuLaunchOutcome) {
    let context = format!("{out:?}\n{}", c.logs());
    let moved = what_moved(c, &att.vm_id);
    assert!(moved.is_empty(), "{}\n{context}", moved.join("\n"));
    assert_eq!(out.code, Some(EXIT_NOT_MIGRATED), "{context}");
    assert_eq!(out.json["migration"], serde_json::Value::Null, "{context}");
    assert_eq!(out.json["network_undone"], true, "{context}");
    assert_eq!(out.json["source_running"], true, "{context}");
    let after = out.json["after"]["stdout"].as_str().unwrap_or_default();
    assert!(
        after.contains("3 packets received"),
        "the source guest's pings after the failure: {after}\n{context}"
    );
    assert!(
        after.contains("hello-from-peer-"),
        "the peer's connection to the source guest after the failure: {after}\n{context}"
    );
    let (sent, answered) = (
        out.json["probe"]["sent"].as_u64().unwrap_or(0),
        out.json["probe"]["answered"].as_u64().unwrap_or(0),
    );
    assert!(
        answered >= 100 && sent.saturating_sub(answered) * 10 <= sent,
        "the probe across the failure: {context}"
    );
}

/// Everything that says `vm` is not simply on host 0 any more: a migration under way in the
/// registry, an endpoint elsewhere, host 1's vnpd holding it, host 0's not, a QEMU left.
fn what_moved(c: &Cluster, vm: &str) -> Vec<String> {
    let mut moved = Vec::new();
    let id = vm.to_string();
    let record = c.registry(move |r| r.get_vm(&id)).unwrap();
    if let Some(incoming) = &record.incoming {
        moved.push(format!(
            "the registry still has a migration under way: {incoming:?}"
        ));
    }
    let ep = record.endpoint.expect("an endpoint");
    if ep.host_addr != c.host(0).addr {
        moved.push(format!("the endpoint is not on host 0: {ep:?}"));
    }
    let on_1 = c.host(1).admin().list().unwrap();
    if on_1.iter().any(|a| a.vm_id == vm) {
        moved.push(format!(
            "host 1's vnpd still has the incoming {vm}: {on_1:?}"
        ));
    }
    let on_0 = c.host(0).admin().list().unwrap();
    if !on_0.iter().any(|a| a.vm_id == vm && a.udp_port == ep.port) {
        moved.push(format!(
            "host 0's vnpd does not serve {vm} on {}: {on_0:?}",
            ep.port
        ));
    }
    let left = processes_matching(&format!("guest={vm}"));
    if !left.is_empty() {
        moved.push(format!("a QEMU of {vm} outlived qemu-launch: {left:?}"));
    }
    moved
}

#[test]
fn qemu_launch_migrate_undoes_a_failed_or_cancelled_migration() {
    let opts = ClusterOptions {
        prefix: "vnpq".into(),
        ..ClusterOptions::default()
    };
    let c = Cluster::start(&opts).expect("cluster");
    let dir = c.dir().to_path_buf();
    let namespaces = c.namespace_names();

    step("vm-b on host 1 (the peer), vm-c attached on host 0 (qemu-launch boots it)");
    let rec_b = c.create_vm("vm-b", 1, &[]).unwrap();
    let rec_c = c.create_vm("vm-c", 0, &[]).unwrap();
    let att_b = c.attach(1, "vm-b").unwrap();
    let att_c = c.attach(0, "vm-c").unwrap();
    let mut gb = c.launch_guest(&att_b).unwrap();
    wait_dhcp(&mut gb).unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    let peer = rec_b.ip.to_string();
    let vms = Pair {
        att: &att_c,
        ip: rec_c.ip,
        peer_ip: rec_b.ip,
        dir: &dir,
    };

    step("(a) the destination QEMU dies during the pre-copy");
    let (run, dst_qemu) = migration_in_precopy(&c, &mut gb, &vms, 5002);
    signal(dst_qemu, libc::SIGKILL);
    let out = run.wait(RUN_WITHIN).unwrap();
    eprintln!("  qemu-launch: {}\n  stderr: {}", out.json, out.stderr);
    assert!(
        out.json["error"]
            .as_str()
            .is_some_and(|e| e.contains("destination QEMU exited")),
        "{out:?}"
    );
    assert_eq!(out.json["cancelled"], false, "{out:?}");
    assert_source_kept(&c, &att_c, &out);

    step("(b) SIGINT to qemu-launch during the pre-copy: QMP migrate_cancel");
    let (run, _) = migration_in_precopy(&c, &mut gb, &vms, 5003);
    signal(run.pid(), libc::SIGINT);
    let out = run.wait(RUN_WITHIN).unwrap();
    eprintln!("  qemu-launch: {}\n  stderr: {}", out.json, out.stderr);
    assert_eq!(out.json["cancelled"], true, "{out:?}");
    assert_source_kept(&c, &att_c, &out);

    step("(c) the destination vnpd refuses the incoming attach");
    refused_attach(&c, &mut gb, &vms, 5004);

    step("a migration of vm-c afterwards succeeds");
    migrates_after_all(&c, &att_c, &peer, &dir);

    drop(gb);
    drop(c);
    assert_nothing_left(&dir, &namespaces);
}

/// A regular file where host 1's vnpd would put vm-c's socket (an operator's leftover) makes
/// it refuse the incoming attach: qemu-launch cancels the registry's move, asks QEMU for
/// nothing, and reports it like any migration that did not happen, with the source serving.
fn refused_attach(c: &Cluster, peer: &mut Guest, vms: &Pair, port: u16) {
    let sockets = c.host(1).admin_socket.parent().unwrap().join("sockets");
    std::fs::create_dir_all(&sockets).unwrap();
    let squatter = sockets.join(format!("{}.sock", vms.att.vm_id));
    std::fs::write(&squatter, b"not a socket").unwrap();
    let out = spawn_talking(c, peer, vms, port, &[])
        .wait(RUN_WITHIN)
        .unwrap();
    std::fs::remove_file(&squatter).unwrap();
    eprintln!("  qemu-launch: {}\n  stderr: {}", out.json, out.stderr);
    assert!(
        out.json["error"]
            .as_str()
            .is_some_and(|e| e.contains("could not be prepared") && e.contains("not a socket")),
        "{out:?}"
    );
    assert!(
        !out.stderr.contains(&format!("guest {}-dst", vms.att.vm_id)),
        "a destination QEMU was started: {out:?}"
    );
    assert_source_kept(c, vms.att, &out);
}

/// `qemu-launch migrate` with the network steps and a probe to `peer_ip` every 10 ms; the test
/// checks the JSON against the registry and vnpd.
fn migrates_after_all(c: &Cluster, att: &AttachmentInfo, peer_ip: &str, dir: &Path) {
    let args = ["--probe", peer_ip, "--probe-interval-ms", "10"];
    let out = QemuLaunchMigrate::spawn(c, att, 1, &dir.join("guest-vm-c"), &args)
        .expect("qemu-launch")
        .wait(RUN_WITHIN)
        .unwrap();
    assert_eq!(out.code, Some(0), "{out:?}\n{}", c.logs());
    let json = &out.json;
    eprintln!("  qemu-launch migrate: {json}");
    let num = |path: &[&str]| -> u64 {
        path.iter()
            .fold(json, |v, k| &v[*k])
            .as_u64()
            .unwrap_or_else(|| panic!("{path:?} in {json}"))
    };
    assert!(num(&["migration", "total_ms"]) > 0, "{json}");
    num(&["migration", "downtime_ms"]);
    num(&["network_prepare_ms"]);
    let (sent, answered, lost) = (
        num(&["probe", "sent"]),
        num(&["probe", "answered"]),
        num(&["probe", "lost"]),
    );
    assert_eq!(sent, answered + lost, "{json}");
    // 3 s before and after at 100/s: at least half a second of answered echoes each side.
    assert!(answered >= 100 && lost * 10 <= sent, "{json}");
    assert!(num(&["probe", "blackout_ms"]) < 5_000, "{json}");
    let ep = endpoint_of(c, &att.vm_id).unwrap().expect("an endpoint");
    assert_eq!(ep.host_addr, c.host(1).addr, "{ep:?}");
    let on_1 = c.host(1).admin().list().unwrap();
    assert!(
        on_1.iter()
            .any(|a| a.vm_id == att.vm_id && a.udp_port == ep.port),
        "{on_1:?}"
    );
}
