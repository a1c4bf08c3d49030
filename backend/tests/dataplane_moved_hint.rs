//! The endpoint-moved hint at a receiving port (`vnpd::datapath::moved_hint`), through a real
//! `VmPort` on loopback with a hand-driven frontend: a hint is never delivered, only the one
//! from the endpoint the port sends the moved VM's traffic to leads to a registry lookup, at
//! most once per interval, and the hint never moves the peer itself (the next packet still
//! goes to the old endpoint with the old token until the control plane installs a new one).

mod dataplane_common;
// Shared fixture: this test uses part of it.
#[allow(unused_imports)]
mod dataplane_frontend;

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dataplane_common::*;
use dataplane_frontend::{ethernet, TestFrontend};
use vnp_protocol::token::{Expiry, Token};
use vnp_protocol::wire::VnpDatagram;
use vnpd::datapath::moved_hint::{MovedHint, RECHECK_INTERVAL};
use vnpd::datapath::{ControlPlane, PeerToken, VmPort};
use vnpd::edge::ROUTER_MAC;
use vnpd::metrics::counters::DropReason;

const T: Duration = Duration::from_secs(5);

/// Counts what the port asks of the control plane and answers nothing.
#[derive(Default)]
struct Counting {
    requests: AtomicUsize,
    rechecks: AtomicUsize,
}

impl ControlPlane for Counting {
    fn request_token(&self, _src_vm: &str, _dst: Ipv4Addr) {
        self.requests.fetch_add(1, Ordering::SeqCst);
    }

    fn recheck_token(&self, _src_vm: &str, _dst: Ipv4Addr) {
        self.rechecks.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn only_a_hint_from_the_peers_endpoint_leads_to_a_rate_limited_lookup() {
    let control = Arc::new(Counting::default());
    let (att, _) = vm("mh", 2, 9, 1);
    let (ip, mac, socket) = (att.vm_ip, att.mac, att.socket_path.clone());
    let port = VmPort::start(att, control.clone()).expect("port");
    let mut f = TestFrontend::connect(&socket, 1);
    f.post_rx(0, 8, 2048);
    let target = port.udp_addr();

    // The port sends the peer's traffic to `old` with a token from the "registry".
    let peer = Ipv4Addr::new(10, 77, 0, 3);
    let (old, old_addr) = raw_peer();
    old.set_read_timeout(Some(T)).unwrap();
    let token = Token::from_bytes([7; 8]);
    port.install_token(
        peer,
        PeerToken {
            dst_host: *old_addr.ip(),
            dst_port: old_addr.port(),
            token,
            expiry: Expiry(now() + 600),
        },
    );
    let hint = MovedHint {
        network_id: NETWORK,
        moved_vm: peer,
        to_vm: ip,
        generation: 5,
    }
    .to_bytes();
    let hints_seen = || port.counters().snapshot().drops(DropReason::RxMovedHint);

    // From anywhere else: counted, nothing else.
    let (forger, _) = raw_peer();
    for _ in 0..5 {
        forger.send_to(&hint, target).unwrap();
    }
    wait_for("5 forged hints counted", T, || hints_seen() == 5);
    assert_eq!(control.rechecks.load(Ordering::SeqCst), 0);

    // From the peer's endpoint: one lookup for ten hints.
    for _ in 0..10 {
        old.send_to(&hint, target).unwrap();
    }
    wait_for("15 hints counted", T, || hints_seen() == 15);
    assert_eq!(control.rechecks.load(Ordering::SeqCst), 1);
    assert_eq!(port.counters().snapshot().moved_hint_rechecks, 1);
    assert_eq!(
        port.counters().snapshot().rx_packets,
        0,
        "a hint reached the guest"
    );

    // The peer did not move: the guest's next packet goes to the old endpoint, old token.
    let packet = ipv4_udp(ip, peer, b"still here?");
    f.send(0, &ethernet(ROUTER_MAC, mac, 0x0800, &packet));
    let mut buf = [0u8; 2048];
    let (n, _) = old
        .recv_from(&mut buf)
        .expect("the packet at the old endpoint");
    let d = VnpDatagram::parse(&buf[..n]).unwrap();
    assert_eq!(d.header.token, token);
    assert_eq!(control.requests.load(Ordering::SeqCst), 0);

    // After the interval, the next hint may ask again.
    std::thread::sleep(RECHECK_INTERVAL);
    old.send_to(&hint, target).unwrap();
    wait_for("16 hints counted", T, || hints_seen() == 16);
    assert_eq!(control.rechecks.load(Ordering::SeqCst), 2);

    drop(f);
    port.stop();
}
