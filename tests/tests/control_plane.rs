//! vnpd's control plane against the real registry, without guests: attach (record, secret,
//! endpoint registration), refusals, persistence across a restart, detach, metrics; and the
//! registry keeping the ports public traffic reaches on VMs out of NAT blocks, through the real
//! `vnpctl`.
//!
//! Needs root (network namespaces). Run: `cargo test -p vnp-e2e --test control_plane`.

use vnp_e2e::cluster::{assert_nothing_left, Cluster, ClusterOptions, NETWORK};
use vnpd_admin_api::{AdminClientError, AdminErrorCode};

#[test]
fn attach_persist_restart_detach() {
    let opts = ClusterOptions {
        prefix: "vnpcp".into(),
        ..ClusterOptions::default()
    };
    let mut c = Cluster::start(&opts).expect("cluster");
    let dir = c.dir().to_path_buf();
    let namespaces = c.namespace_names();

    let rec_a = c.create_vm("vm-a", 0, &[]).unwrap();
    c.create_vm("vm-b", 1, &[]).unwrap();

    // Attach: the answer is what the registry says, not what anyone claims.
    let att_a = c
        .attach(0, "vm-a")
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    assert_eq!(att_a.vm_ip, rec_a.ip);
    assert_eq!(att_a.network_id, rec_a.vni);
    assert_eq!(att_a.mac, rec_a.mac.to_string());
    assert_eq!(Some(att_a.udp_port), rec_a.host_port);
    assert_eq!(att_a.host_addr, c.host(0).addr);
    assert_eq!(att_a.guest_mtu, 1452);
    assert!(att_a.socket_path.exists(), "vhost-user socket not created");
    c.attach(1, "vm-b").unwrap();

    // The endpoint is registered at the registry.
    let after = c.registry(|r| r.get_vm("vm-a")).unwrap();
    let ep = after.endpoint.expect("endpoint registered");
    assert_eq!((ep.host_addr, ep.port), (att_a.host_addr, att_a.udp_port));

    // Attaching again with the same parameters is a no-op; a VM of another host is refused.
    assert_eq!(c.attach(0, "vm-a").unwrap(), att_a);
    match c.host(0).admin().attach("vm-b", None, None) {
        // Refused by vnpd (assigned elsewhere) or by the registry (not this host's VM).
        Err(AdminClientError::Refused(f)) => {
            assert!(
                matches!(f.code, AdminErrorCode::Conflict | AdminErrorCode::Registry),
                "{f:?}"
            );
            assert!(f.message.contains("vm-b"), "{}", f.message);
        }
        other => panic!("attaching another host's VM: {other:?}"),
    }
    match c.host(0).admin().attach("no-such-vm", None, None) {
        Err(AdminClientError::Refused(f)) => assert_eq!(f.code, AdminErrorCode::Registry),
        other => panic!("attaching an unknown VM: {other:?}"),
    }
    match c.host(0).admin().attach("../etc", None, None) {
        Err(AdminClientError::Refused(f)) => assert_eq!(f.code, AdminErrorCode::BadRequest),
        other => panic!("attaching a bad id: {other:?}"),
    }

    // Metrics list the VM with every drop reason at zero.
    let text = c.scrape(0).unwrap();
    assert!(
        text.contains("vnpd_drops_total{vm=\"vm-a\",reason=\"rx_bad_token\"} 0"),
        "{text}"
    );
    assert_eq!(
        c.metric(0, "vnpd_attached_vms", &[("host", "h-a")])
            .unwrap(),
        1
    );

    // The operator's view: `vnpctl vnpd list` and `stats --json` over the same socket.
    let vnpctl = vnp_e2e::bins::bins().unwrap().vnpctl;
    let out = std::process::Command::new(&vnpctl)
        .args(["vnpd", "--admin-socket"])
        .arg(&c.host(0).admin_socket)
        .arg("list")
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("vm-a ") && l.contains(&att_a.vm_ip.to_string())),
        "{table}"
    );
    let out = std::process::Command::new(&vnpctl)
        .args(["vnpd", "--json", "--admin-socket"])
        .arg(&c.host(0).admin_socket)
        .args(["stats", "vm-a"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stats[0]["vm_id"], "vm-a");
    assert_eq!(stats[0]["drops"]["rx_bad_token"], 0);

    // Restart host a's vnpd: the attachment comes back from the state dir.
    c.stop_vnpd(0).unwrap();
    assert!(!att_a.socket_path.exists(), "socket left after stop");
    c.start_vnpd(0).unwrap();
    let list = c.host(0).admin().list().unwrap();
    assert_eq!(list.len(), 1, "attachment not restored: {}", c.logs());
    assert_eq!(list[0].vm_id, "vm-a");
    assert_eq!(list[0].udp_port, att_a.udp_port);
    assert!(att_a.socket_path.exists());

    // Detach: socket gone, not restored after another restart.
    c.host(0).admin().detach("vm-a").unwrap();
    assert!(!att_a.socket_path.exists());
    match c.host(0).admin().detach("vm-a") {
        Err(AdminClientError::Refused(f)) => assert_eq!(f.code, AdminErrorCode::NotAttached),
        other => panic!("second detach: {other:?}"),
    }
    c.stop_vnpd(0).unwrap();
    c.start_vnpd(0).unwrap();
    assert!(c.host(0).admin().list().unwrap().is_empty());

    drop(c);
    assert_nothing_left(&dir, &namespaces);
}

/// `vnpctl forward add` and `vnpctl lb create` with a VM-side port inside a VM's NAT block are
/// refused by the real registry, and `vnpctl` says which port and which block; `vnpctl vm
/// nat-grow` then hands out a block that skips the service's ports (issue #10).
#[test]
fn vnpctl_keeps_vm_ports_out_of_nat_blocks() {
    let opts = ClusterOptions {
        prefix: "vnpcq".into(),
        hosts: 1,
        ..ClusterOptions::default()
    };
    let c = Cluster::start(&opts).expect("cluster");
    let dir = c.dir().to_path_buf();
    let namespaces = c.namespace_names();
    let vm = c.create_vm("vm-a", 0, &["web"]).unwrap();
    let block = vm.nat_ports[0];
    let public = "203.0.113.7";
    // One vnpctl command line, split at spaces.
    let run = |line: String| {
        let args: Vec<&str> = line.split_whitespace().collect();
        c.vnpctl(&args)
    };
    let refused = |line: String| match run(line.clone()) {
        Ok(out) => panic!("vnpctl {line} was accepted: {out}"),
        Err(e) => e.to_string(),
    };
    run(format!(
        "gateway create gw1 --network {NETWORK} --addr 198.18.77.1 --port 6081 --public-addr {public}"
    ))
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));

    let inside = block.first + 76;
    let why = refused(format!(
        "forward add ssh --public {public}:22 --to vm-a:{inside}"
    ));
    assert!(
        why.contains("409")
            && why.contains(&format!("forward ssh's VM port {inside}"))
            && why.contains(&format!("VM vm-a's NAT block {block}")),
        "{why}"
    );
    let lb = |vm_port: u16, more: &str| {
        format!("lb create web --public {public}:80 --vm-port {vm_port} --member tag:web {more}")
    };
    let why = refused(lb(inside, ""));
    assert!(
        why.contains(&format!("service web's VM port {inside}"))
            && why.contains(&format!("VM vm-a's NAT block {block}")),
        "{why}"
    );
    let listed = c.vnpctl(&["lb", "list"]).unwrap() + &c.vnpctl(&["forward", "list"]).unwrap();
    assert!(
        !listed.contains("web") && !listed.contains("ssh"),
        "{listed}"
    );

    // The health-check port lies in the next free block: vm-a's growth skips that block.
    let next = block.last + 1;
    run(lb(8080, &format!("--check-port {}", next + 10))).unwrap_or_else(|e| panic!("{e}"));
    let grown = c.vnpctl(&["vm", "--json", "nat-grow", "vm-a"]).unwrap();
    let grown: vnp_registry_client::VmRecord = serde_json::from_str(&grown).unwrap();
    let new_block = grown.nat_ports[1];
    assert_eq!(
        new_block.first,
        next + block.last - block.first + 1,
        "{new_block}"
    );

    // A forward on the service's VM port: the gateway could not tell their replies apart.
    let why = refused(format!(
        "forward add admin --public {public}:23 --to vm-a:8080"
    ));
    assert!(
        why.contains("409") && why.contains("forward admin uses VM port 8080/tcp like service web"),
        "{why}"
    );

    drop(c);
    assert_nothing_left(&dir, &namespaces);
}
