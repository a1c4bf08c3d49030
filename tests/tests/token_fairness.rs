//! Token requests are served fairly: guests scanning addresses (each keeping vnpd's 256
//! pending destinations full) do not delay another VM's first packet. Real registry, real vnpd
//! processes in network namespaces, and hand-driven vhost-user frontends in place of guests
//! (they send exactly the frames the test wants, as fast as it wants).
//!
//! Also checks that vnpd creates every vhost-user socket with its configured mode (0660,
//! root:root by default), not the umask's.
//!
//! Needs root. Run: `cargo test -p vnp-e2e --test token_fairness -- --nocapture`.

#[path = "../../backend/tests/dataplane_common/mod.rs"]
mod common;
// Shared with the backend's tests, which use all of it.
#[allow(unused_imports)]
#[path = "../../backend/tests/dataplane_frontend/mod.rs"]
mod frontend;

use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use frontend::{ethernet, TestFrontend};
use vnp_e2e::cluster::{assert_nothing_left, Cluster, ClusterOptions};
use vnpd_admin_api::AttachmentInfo;

/// Scanning guests on host a; with their 250 destinations each, an unfair queue puts 2000
/// registry requests ahead of the normal VM's.
const SCANNERS: usize = 8;
const SCAN_DESTINATIONS: usize = 240;

fn mac(att: &AttachmentInfo) -> [u8; 6] {
    let mut out = [0u8; 6];
    for (o, part) in out.iter_mut().zip(att.mac.split(':')) {
        *o = u8::from_str_radix(part, 16).unwrap();
    }
    out
}

/// A UDP frame from the attachment's VM to `dst`.
fn udp_frame(att: &AttachmentInfo, dst: Ipv4Addr, tag: &[u8]) -> Vec<u8> {
    let packet = common::ipv4_udp(att.vm_ip, dst, tag);
    // vnpd routes by IPv4 destination; the Ethernet destination is the router's in a guest.
    ethernet([0x02, 0, 0, 0, 0, 1], mac(att), 0x0800, &packet)
}

/// Sends one frame from `from` to `to`'s VM and waits until `to_fe` receives it; returns how
/// long that took (the first packet of a pair: a registry round trip included).
fn first_packet_latency(
    from_fe: &mut TestFrontend,
    from: &AttachmentInfo,
    to_fe: &mut TestFrontend,
    to: &AttachmentInfo,
) -> Duration {
    let tag = format!("first {} -> {}", from.vm_id, to.vm_id);
    let sent = Instant::now();
    from_fe.send(0, &udp_frame(from, to.vm_ip, tag.as_bytes()));
    let got = to_fe.recv(0, 1, Duration::from_secs(60));
    let took = sent.elapsed();
    assert_eq!(got.len(), 1, "{tag}: not delivered within 60 s");
    let bytes = &got[0].2;
    assert!(
        bytes.windows(tag.len()).any(|w| w == tag.as_bytes()),
        "{tag}: got something else"
    );
    took
}

fn stat_counter(c: &Cluster, vm: &str, name: &str) -> u64 {
    let stats = c.host(0).admin().stats(Some(vm)).unwrap();
    let s = &stats[0];
    s.counters
        .get(name)
        .or_else(|| s.drops.get(name))
        .copied()
        .unwrap_or(0)
}

#[test]
fn scanning_guests_do_not_delay_another_vms_first_packet() {
    let opts = ClusterOptions {
        prefix: "vnptf".into(),
        vnpd_log: "warn".into(),
        ..ClusterOptions::default()
    };
    let mut c = Cluster::start(&opts).expect("cluster");
    let dir = c.dir().to_path_buf();
    let namespaces = c.namespace_names();

    let scanners: Vec<String> = (0..SCANNERS).map(|i| format!("vm-scan{i}")).collect();
    for s in &scanners {
        c.create_vm(s, 0, &[]).unwrap();
    }
    for (vm, host) in [("vm-norm", 0), ("vm-base", 1), ("vm-peer", 1)] {
        c.create_vm(vm, host, &[]).unwrap();
    }
    let attach = |host, vm: &str| c.attach(host, vm).unwrap_or_else(|e| panic!("{e}"));
    let norm = attach(0, "vm-norm");
    let base = attach(1, "vm-base");
    let peer = attach(1, "vm-peer");
    let scan_atts: Vec<AttachmentInfo> = scanners.iter().map(|s| attach(0, s)).collect();

    // Every socket vnpd created has the configured access (vnpd's default: 0660 root:root).
    for att in [&norm, &base, &peer] {
        let m = std::fs::metadata(&att.socket_path).unwrap();
        assert_eq!(
            (m.mode() & 0o777, m.uid(), m.gid()),
            (0o660, 0, 0),
            "{}",
            att.socket_path.display()
        );
    }

    let mut norm_fe = TestFrontend::connect(&norm.socket_path, 1);
    let mut base_fe = TestFrontend::connect(&base.socket_path, 1);
    let mut peer_fe = TestFrontend::connect(&peer.socket_path, 1);
    base_fe.post_rx(0, 64, 2048);
    peer_fe.post_rx(0, 64, 2048);
    let mut scan_fes: Vec<TestFrontend> = scan_atts
        .iter()
        .map(|a| TestFrontend::connect(&a.socket_path, 1))
        .collect();

    // Without scanners: the normal VM's first packet to a fresh destination.
    let quiet = first_packet_latency(&mut norm_fe, &norm, &mut base_fe, &base);
    eprintln!("first packet, quiet host: {quiet:?}");

    // Every scanner sends to 240 addresses of the network that no VM has: each costs a
    // registry request that ends in a refusal. (Addresses outside the network would not: they
    // all share the one grant towards the network's gateway.)
    let scan_start = Instant::now();
    for (fe, att) in scan_fes.iter_mut().zip(&scan_atts) {
        for n in 0..SCAN_DESTINATIONS {
            let dst = Ipv4Addr::new(10, 77, 0, 14 + n as u8);
            fe.send(0, &udp_frame(att, dst, b"scan"));
        }
    }
    for fe in &scan_fes {
        // vnpd has read every frame: the requests are queued at its control thread.
        fe.wait_tx_completed(0, SCAN_DESTINATIONS as u16, Duration::from_secs(30));
    }
    eprintln!(
        "{} scanning requests posted in {:?}",
        SCANNERS * SCAN_DESTINATIONS,
        scan_start.elapsed()
    );

    let busy = first_packet_latency(&mut norm_fe, &norm, &mut peer_fe, &peer);
    let answered: u64 = scanners
        .iter()
        .map(|s| stat_counter(&c, s, "tx_unknown_destination"))
        .sum();
    eprintln!(
        "first packet while {SCANNERS} guests scan: {busy:?} \
         ({answered} of {} scanning requests answered by then)",
        SCANNERS * SCAN_DESTINATIONS
    );
    // The scan was still going on: the normal VM did not simply wait for it to end.
    assert!(
        answered < (SCANNERS * SCAN_DESTINATIONS) as u64,
        "the scan was over before the normal VM's packet arrived ({busy:?})\n{}",
        c.logs()
    );
    let bound = quiet * 3 + Duration::from_millis(300);
    assert!(
        busy <= bound,
        "first packet took {busy:?} while guests scanned (quiet: {quiet:?}, bound {bound:?})\n{}",
        c.logs()
    );
    // The scanners went beyond their request rate and were counted.
    let throttled: u64 = scanners
        .iter()
        .map(|s| stat_counter(&c, s, "token_requests_throttled"))
        .sum();
    assert!(throttled > 0, "no scanner was throttled\n{}", c.logs());
    assert_eq!(stat_counter(&c, "vm-norm", "token_requests_throttled"), 0);

    drop(scan_fes);
    drop((norm_fe, base_fe, peer_fe));
    c.stop_vnpd(0).unwrap();
    drop(c);
    assert_nothing_left(&dir, &namespaces);
}
