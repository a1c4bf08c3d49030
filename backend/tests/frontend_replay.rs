//! Real frontends' vhost-user conversations replayed message by message against vnpd's socket
//! (`replay_frontend`; the sequences and where they come from are in `docs/frontends.md`):
//! QEMU 10 (captured), cloud-hypervisor (from its source), DPDK 22.11 virtio-user (captured).
//! Each must leave a device that carries traffic both ways, and cloud-hypervisor's and QEMU's
//! reconnects must bring it back after vnpd restarts. Needs nothing but loopback.

mod dataplane_common;
// Its `FileExt` re-export serves other tests.
#[allow(unused_imports)]
mod dataplane_frontend;
mod replay_frontend;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use dataplane_common::*;
use dataplane_frontend::{ethernet, TestFrontend, VNET_HDR};
use replay_frontend::conversations::{self as conv, CLOUD_HYPERVISOR, DPDK_22_11, QEMU_10};
use replay_frontend::{Guest, Msg, Profile, Replay, Step};
use vhost::vhost_user::message::FrontendReq;
use vnp_protocol::token::VmSecret;
use vnpd::datapath::VmPort;
use vnpd::edge::ROUTER_MAC;

const T: Duration = Duration::from_secs(10);

struct Vm {
    port: Option<Arc<VmPort>>,
    name: String,
    octet: u8,
    vm_ip: Ipv4Addr,
    mac: [u8; 6],
    socket: PathBuf,
    udp_port: u16,
    secret: VmSecret,
}

impl Vm {
    fn start(control: &Arc<MintingControl>, name: &str, octet: u8) -> Vm {
        let (att, secret) = vm(name, octet, octet.wrapping_mul(29), 1);
        let mut vm = Vm {
            port: None,
            name: name.to_string(),
            octet,
            vm_ip: att.vm_ip,
            mac: att.mac,
            socket: att.socket_path.clone(),
            udp_port: 0,
            secret,
        };
        vm.up(control);
        vm
    }

    /// Starts (or restarts) the VM's port on the same socket and UDP port, as a restarted vnpd
    /// does from its attachment.
    fn up(&mut self, control: &Arc<MintingControl>) {
        let (mut att, _) = vm(&self.name, self.octet, self.octet.wrapping_mul(29), 1);
        att.socket_path = self.socket.clone();
        att.udp_port = self.udp_port;
        let port = Arc::new(VmPort::start(att, control.clone()).expect("start port"));
        self.udp_port = port.udp_addr().port();
        control.register(&port, self.vm_ip, &self.secret);
        self.port = Some(port);
    }

    /// Stops the port (vnpd going away): its frontend connection is closed.
    fn down(&mut self) {
        let port = self.port.take().expect("running");
        match Arc::try_unwrap(port) {
            Ok(port) => port.stop(),
            Err(_) => panic!("only the test holds the port"),
        }
    }

    fn socket(&self) -> PathBuf {
        self.socket.clone()
    }

    fn frame_to(&self, to: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
        let ip = ipv4_udp(self.vm_ip, to, payload);
        ethernet(ROUTER_MAC, self.mac, 0x0800, &ip)
    }
}

/// Posts four RX buffers on each side, sends one datagram each way between `a` (driven by
/// `fa`) and `b` and checks both arrive intact. Returns the descriptor A received into.
fn exchange(a: &Vm, fa: &mut TestFrontend, b: &Vm, fb: &mut TestFrontend, tag: &[u8]) -> u16 {
    fa.post_rx(0, 4, 2048);
    fb.post_rx(0, 4, 2048);
    let there = [tag, b" a->b"].concat();
    fa.send(0, &a.frame_to(b.vm_ip, &there));
    let got = fb.recv(0, 1, T);
    assert_eq!(got.len(), 1, "{tag:?}: B received {got:?}");
    assert!(
        got[0].2[VNET_HDR..].ends_with(&there),
        "{tag:?}: A->B payload"
    );
    let back = [tag, b" b->a"].concat();
    fb.send(0, &b.frame_to(a.vm_ip, &back));
    let got = fa.recv(0, 1, T);
    assert_eq!(got.len(), 1, "{tag:?}: A received {got:?}");
    assert!(
        got[0].2[VNET_HDR..].ends_with(&back),
        "{tag:?}: B->A payload"
    );
    got[0].0
}

/// Runs `conversation` on a fresh connection to `vm`'s socket.
fn replay(vm: &Vm, profile: Profile, guest: &Guest, conversation: &[Msg]) -> Replay {
    let mut r = Replay::connect(&vm.socket(), profile);
    r.run(guest, conversation);
    r
}

fn acked(r: &Replay, request: FrontendReq) -> usize {
    r.acks.iter().filter(|(q, _)| *q == request).count()
}

#[test]
fn qemu_10_boot_conversation_carries_traffic() {
    let control = MintingControl::new();
    let a = Vm::start(&control, "rq", 2);
    let b = Vm::start(&control, "rqb", 3);
    let guest = Guest::new(2);
    let r = replay(&a, QEMU_10, &guest, &conv::qemu_boot());
    assert_eq!(r.acked, 0x1_6060_8000, "QEMU's SET_FEATURES as captured");
    assert_eq!(
        r.acked_protocol, 0xb,
        "QEMU's SET_PROTOCOL_FEATURES as captured"
    );
    assert_eq!(r.queue_num, Some(2));
    // The ten early enables asked for replies and got them (from vnpd's relay), as did the two
    // after SET_FEATURES (from the backend).
    assert_eq!(acked(&r, FrontendReq::SET_VRING_ENABLE), 12);
    assert_eq!(acked(&r, FrontendReq::SET_MEM_TABLE), 1);
    let mut fa = guest.driver(&r);
    let mut fb = TestFrontend::connect(&b.socket(), 1);
    exchange(&a, &mut fa, &b, &mut fb, b"qemu");
}

#[test]
fn qemu_10_incoming_migration_conversation_carries_traffic() {
    let control = MintingControl::new();
    let a = Vm::start(&control, "rm", 2);
    let b = Vm::start(&control, "rmb", 3);
    let guest = Guest::new(2);
    let r = replay(&a, QEMU_10, &guest, &conv::qemu_incoming_migration());
    // Only early enables, all answered by the relay; the rings run because it replayed them.
    assert_eq!(acked(&r, FrontendReq::SET_VRING_ENABLE), 10);
    let mut fa = guest.driver(&r);
    let mut fb = TestFrontend::connect(&b.socket(), 1);
    exchange(&a, &mut fa, &b, &mut fb, b"migrated");
}

#[test]
fn qemu_10_reconnect_after_vnpd_restart_carries_traffic() {
    let control = MintingControl::new();
    let mut a = Vm::start(&control, "rr", 2);
    let b = Vm::start(&control, "rrb", 3);
    let guest = Guest::new(2);
    let first = replay(&a, QEMU_10, &guest, &conv::qemu_boot());
    let mut fa = guest.driver(&first);
    let mut fb = TestFrontend::connect(&b.socket(), 1);
    exchange(&a, &mut fa, &b, &mut fb, b"before");
    // RX buffers the guest posted that vnpd has not used yet: QEMU restarts the rings from the
    // used index, so vnpd must fill these after the restart.
    fa.post_rx(0, 2, 2048);

    a.down();
    first.wait_for_hang_up(T);
    a.up(&control);
    let again = replay(&a, QEMU_10, &guest, &conv::qemu_reconnect());
    // The only enables of this connection came before SET_FEATURES: the relay held them and
    // replayed them, or the rings would stay disabled and nothing below would arrive.
    assert_eq!(acked(&again, FrontendReq::SET_VRING_ENABLE), 2);
    let payload = b"after restart, into an old buffer";
    fb.send(0, &b.frame_to(a.vm_ip, payload));
    let got = fa.recv(0, 1, T);
    assert_eq!(got.len(), 1, "A received {got:?}");
    assert!(got[0].2[VNET_HDR..].ends_with(payload));
    // Descriptors 0-3 were posted before, 0 used; the ring restarted at used index 1.
    assert_eq!(
        got[0].0, 1,
        "the first unused buffer from before the restart"
    );
    exchange(&a, &mut fa, &b, &mut fb, b"after");
    drop(again);
}

#[test]
fn cloud_hypervisor_conversation_carries_traffic_across_a_memory_update() {
    let control = MintingControl::new();
    let a = Vm::start(&control, "rc", 2);
    let b = Vm::start(&control, "rcb", 3);
    let mut guest = Guest::new(2);
    let mut r = replay(&a, CLOUD_HYPERVISOR, &guest, &conv::cloud_hypervisor_boot());
    // vnpd takes MRG_RXBUF, EVENT_IDX, VERSION_1 and PROTOCOL_FEATURES of what it offers, and
    // the IPv4 offloads CSUM (0), GUEST_CSUM (1), GUEST_TSO4 (7), GUEST_ECN (9), HOST_TSO4
    // (11), HOST_ECN (13): never TSO6 (8, 12) or UFO (10, 14).
    let offloads = (1 << 0) | (1 << 1) | (1 << 7) | (1 << 9) | (1 << 11) | (1 << 13);
    assert_eq!(
        r.acked,
        (1 << 15) | (1 << 29) | (1 << 30) | (1 << 32) | offloads
    );
    assert_eq!(r.acked_protocol, 0xb, "MQ, LOG_SHMFD, REPLY_ACK");
    assert_eq!(r.queue_num, Some(2));
    // Every message after SET_PROTOCOL_FEATURES asked for a reply and got a zero ack.
    let setup = conv::cloud_hypervisor_boot()
        .iter()
        .filter(|m| m.need_reply && !matches!(m.step, Step::GetQueueNum))
        .count();
    assert_eq!(r.acks.len(), setup);
    let mut fa = guest.driver(&r);
    let mut fb = TestFrontend::connect(&b.socket(), 1);
    exchange(&a, &mut fa, &b, &mut fb, b"ch");

    // Memory hotplug: the whole table again, now with a second region; vnpd keeps working
    // and can reach the new region (a TX frame placed there arrives).
    guest.hotplug();
    r.run(&guest, &conv::cloud_hypervisor_memory_update());
    exchange(&a, &mut fa, &b, &mut fb, b"ch hotplug");
    let frame = a.frame_to(b.vm_ip, b"from hotplugged memory");
    let mut data = vec![0u8; VNET_HDR];
    data.extend_from_slice(&frame);
    let at = replay_frontend::HOTPLUG_GPA + 0x800;
    vm_memory::Bytes::write_slice(guest.hotplugged_mem(), &data, vm_memory::GuestAddress(at))
        .unwrap();
    fa.send_chain(
        0,
        &[dataplane_frontend::Desc {
            addr: at,
            len: data.len() as u32,
            write: false,
            next: dataplane_frontend::Next::End,
        }],
    );
    let got = fb.recv(0, 1, T);
    assert_eq!(got.len(), 1, "B received {got:?}");
    assert!(got[0].2[VNET_HDR..].ends_with(b"from hotplugged memory"));

    // The guest resets the device: rings disabled, their bases read back.
    r.run(&guest, &conv::cloud_hypervisor_reset());
    assert_eq!(r.vring_bases.len(), 2);
    let (_, tx_base) = r.vring_bases[1];
    assert_eq!(
        tx_base,
        u32::from(fa.tx_completed(0)),
        "TX ring stopped where it was"
    );
}

#[test]
fn cloud_hypervisor_reconnect_after_vnpd_restart_carries_traffic() {
    let control = MintingControl::new();
    let mut a = Vm::start(&control, "rd", 2);
    let b = Vm::start(&control, "rdb", 3);
    let guest = Guest::new(2);
    let first = replay(&a, CLOUD_HYPERVISOR, &guest, &conv::cloud_hypervisor_boot());
    let mut fa = guest.driver(&first);
    let mut fb = TestFrontend::connect(&b.socket(), 1);
    exchange(&a, &mut fa, &b, &mut fb, b"before");
    fa.post_rx(0, 2, 2048);

    a.down();
    first.wait_for_hang_up(T);
    a.up(&control);
    let mut again = Replay::reconnect(&a.socket(), &first);
    again.run(&guest, &conv::cloud_hypervisor_reconnect());
    assert_eq!(
        again.offered_protocol, 0,
        "no GET_PROTOCOL_FEATURES on a reconnect"
    );
    assert_eq!(again.acked_protocol, 0xb, "what the first connection acked");
    assert_eq!(
        again.queue_num, None,
        "a reconnect does not ask for the queue count"
    );
    // cloud-hypervisor restarts the rings at the avail index: descriptors 1-5 posted before
    // the restart are skipped, so traffic needs buffers posted after it (exchange posts 6-9).
    let received_into = exchange(&a, &mut fa, &b, &mut fb, b"after");
    assert_eq!(
        received_into, 6,
        "the first buffer posted after the restart"
    );
    drop(again);
}

#[test]
fn dpdk_virtio_user_conversation_carries_traffic_and_stops_cleanly() {
    let control = MintingControl::new();
    let a = Vm::start(&control, "rp", 2);
    let b = Vm::start(&control, "rpb", 3);
    let guest = Guest::new(2);
    let mut r = replay(&a, DPDK_22_11, &guest, &conv::dpdk_start());
    assert_eq!(r.acked, 0x1_4000_8000, "DPDK's SET_FEATURES as captured");
    assert_eq!(
        r.acked_protocol, 0x9,
        "DPDK's SET_PROTOCOL_FEATURES as captured"
    );
    assert_eq!(r.queue_num, None);
    assert_eq!(r.acks, vec![(FrontendReq::SET_MEM_TABLE, 0)]);
    let mut fa = guest.driver(&r);
    let mut fb = TestFrontend::connect(&b.socket(), 1);
    exchange(&a, &mut fa, &b, &mut fb, b"dpdk");
    fa.wait_tx_completed(0, 1, T);

    r.run(&guest, &conv::dpdk_stop());
    assert_eq!(r.vring_bases.len(), 2);
    assert_eq!(r.vring_bases[1], (1, u32::from(fa.tx_completed(0))));
}

#[test]
fn the_three_conversations_differ_where_documented() {
    let pos = |c: &[Msg], f: &dyn Fn(&Step) -> bool| c.iter().position(|m| f(&m.step));
    let features = |c: &[Msg]| pos(c, &|s| *s == Step::SetFeatures).unwrap();
    let first_enable = |c: &[Msg]| pos(c, &|s| matches!(s, Step::SetVringEnable(..))).unwrap();
    let first_call = |c: &[Msg]| pos(c, &|s| matches!(s, Step::SetVringCall(_))).unwrap();
    let (qemu, ch, dpdk) = (
        conv::qemu_boot(),
        conv::cloud_hypervisor_boot(),
        conv::dpdk_start(),
    );
    // Only QEMU enables rings before SET_FEATURES (what the relay is for).
    assert!(first_enable(&qemu) < features(&qemu));
    assert!(first_enable(&ch) > features(&ch));
    assert!(first_enable(&dpdk) > features(&dpdk));
    // QEMU asks for features before SET_OWNER; the others start with SET_OWNER.
    assert_eq!(qemu[0].step, Step::GetFeatures);
    assert_eq!(ch[0].step, Step::SetOwner);
    assert_eq!(dpdk[0].step, Step::SetOwner);
    // Call fds before SET_FEATURES: QEMU and DPDK; cloud-hypervisor with the ring setup.
    assert!(first_call(&qemu) < features(&qemu));
    assert!(first_call(&dpdk) < features(&dpdk));
    assert!(first_call(&ch) > features(&ch));
    // cloud-hypervisor asks for a reply on everything after SET_PROTOCOL_FEATURES.
    let after = pos(&ch, &|s| *s == Step::SetProtocolFeatures).unwrap();
    assert!(ch[after + 1..].iter().all(|m| m.need_reply));
    assert!(!dpdk.iter().all(|m| m.need_reply));
}
