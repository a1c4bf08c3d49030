//! Live migration of a real guest between two vnpd hosts: QEMU moves from host a's vhost-user
//! socket to host b's while a peer on host b pings it; reports QEMU's downtime and the pings
//! lost across the move.
//!
//! Needs root (network namespaces), QEMU 10 and the guest image (`scripts/setup`).
//! Run: `cargo test -p vnp-e2e --test live_migration -- --nocapture`.

use std::time::{Duration, Instant};

use qemu_launch::{migrate, MigrateOptions};
use vnp_e2e::cluster::{assert_nothing_left, wait_dhcp, Cluster, ClusterOptions};
use vnp_registry_client::MoveVm;

const CMD: Duration = Duration::from_secs(60);

fn step(what: &str) {
    eprintln!("[live_migration] {what}");
}

/// (transmitted, received) from a busybox ping summary.
fn ping_counts(output: &str) -> Option<(u32, u32)> {
    let line = output.lines().find(|l| l.contains("packets transmitted"))?;
    let mut parts = line.split(',');
    let tx = parts.next()?.split_whitespace().next()?.parse().ok()?;
    let rx = parts.next()?.split_whitespace().next()?.parse().ok()?;
    Some((tx, rx))
}

#[test]
fn guest_migrates_between_vnpd_hosts_and_keeps_talking() {
    let opts = ClusterOptions {
        prefix: "vnpm".into(),
        ..ClusterOptions::default()
    };
    let c = Cluster::start(&opts).expect("cluster");
    let dir = c.dir().to_path_buf();
    let namespaces = c.namespace_names();

    step("vm-a on host 0, vm-b on host 1");
    let rec_a = c.create_vm("vm-a", 0, &[]).unwrap();
    let rec_b = c.create_vm("vm-b", 1, &[]).unwrap();
    let att_a = c.attach(0, "vm-a").unwrap();
    let att_b = c.attach(1, "vm-b").unwrap();
    let mut ga = c.launch_guest(&att_a).unwrap();
    let mut gb = c.launch_guest(&att_b).unwrap();
    for g in [&mut ga, &mut gb] {
        wait_dhcp(g).unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    }
    let out = ga
        .run(&format!("ping -c 3 -W 5 {}", rec_b.ip), CMD)
        .unwrap();
    assert_eq!(
        ping_counts(&out.stdout).map(|p| p.1),
        Some(3),
        "a -> b before:\n{}\n{}",
        out.stdout,
        c.logs()
    );

    step("vm-b pings vm-a continuously (5/s) across the migration");
    gb.run_ok(
        &format!(
            "ping -i 0.2 -c 150 -W 1 {} > /tmp/ping.log 2>&1 &",
            rec_a.ip
        ),
        CMD,
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(3));

    step("registry: vm-a moves to host 1; host 1 attaches it");
    let h1 = c.host(1).id.clone();
    c.registry(move |r| {
        r.move_vm(
            "vm-a",
            &MoveVm {
                host: Some(h1),
                host_port: None,
            },
        )
    })
    .unwrap();
    let att_a2 = c
        .attach(1, "vm-a")
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));

    step("migrating QEMU to host 1's socket");
    let mut dst_spec = ga.spec().clone();
    dst_spec.name = "vm-a-dst".into();
    dst_spec.vhost_user_socket = Some(att_a2.socket_path.clone());
    dst_spec.work_dir = Some(dir.join("guest-vm-a-dst"));
    std::fs::create_dir_all(dst_spec.work_dir.as_ref().unwrap()).unwrap();
    let started = Instant::now();
    let (mut ga2, report) = migrate(&mut ga, dst_spec, &MigrateOptions::default())
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    eprintln!(
        "  {report:?} (harness wall {} ms)",
        started.elapsed().as_millis()
    );
    drop(ga);
    c.host(0).admin().detach("vm-a").unwrap();

    step("after the move");
    let out = ga2
        .run(&format!("ping -c 3 -W 5 {}", rec_b.ip), CMD)
        .unwrap();
    assert_eq!(
        ping_counts(&out.stdout).map(|p| p.1),
        Some(3),
        "a -> b after:\n{}\n{}",
        out.stdout,
        c.logs()
    );
    let deadline = Instant::now() + Duration::from_secs(90);
    let log = loop {
        let o = gb.run("cat /tmp/ping.log", CMD).unwrap();
        if o.stdout.contains("packets transmitted") || Instant::now() > deadline {
            break o.stdout;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    let (tx, rx) = ping_counts(&log).unwrap_or_else(|| panic!("no ping summary:\n{log}"));
    eprintln!(
        "  pings across migration: {tx} sent, {rx} received, {} lost; downtime {} ms",
        tx - rx,
        report.downtime_ms
    );
    assert!(rx > 0 && rx <= tx, "{log}");

    drop(ga2);
    drop(gb);
    drop(c);
    assert_nothing_left(&dir, &namespaces);
}
