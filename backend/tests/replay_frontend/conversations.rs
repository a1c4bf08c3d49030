//! The conversations of three real vhost-user-net frontends with vnpd, one queue pair (rings 0
//! RX, 1 TX). `docs/frontends.md` explains each and where it comes from.
//!
//! - QEMU 10.0.2 (Debian bookworm-backports `1:10.0.2+ds-2+deb13u1~bpo12+1`) booting the test
//!   guest: captured from vnpd's relay debug log, not reconstructed.
//! - DPDK 22.11.11 `net_virtio_user` in `dpdk-testpmd`: captured the same way.
//! - cloud-hypervisor: read from its source (`virtio-devices/src/vhost_user/vu_common_ctrl.rs`
//!   `negotiate_features_vhost_user`, `setup_vhost_user`, `reinitialize_vhost_user`,
//!   `reset_vhost_user`; `net.rs` `Net::new`, `activate`; `mod.rs`
//!   `VhostUserEpollHandler::reconnect`), at the commits named in `docs/frontends.md`. It runs
//!   only with KVM, so it was not observed here.
#![allow(dead_code)]

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};

use super::{BaseFrom, Msg, Profile, Step};

const PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
const VERSION_1: u64 = 1 << 32;
const MRG_RXBUF: u64 = 1 << 15;
const EVENT_IDX: u64 = 1 << 29;
const MQ: u64 = 1 << 22;
const GUEST_ANNOUNCE: u64 = 1 << 21;
const CTRL_VQ: u64 = 1 << 17;
/// CSUM, GUEST_CSUM, GUEST_TSO4/6, GUEST_ECN, GUEST_UFO, HOST_TSO4/6, HOST_ECN, HOST_UFO.
const CH_OFFLOADS: u64 = 0b11 | (0xff << 7);

fn m(step: Step) -> Msg {
    Msg {
        step,
        need_reply: false,
    }
}

fn r(step: Step) -> Msg {
    Msg {
        step,
        need_reply: true,
    }
}

use Step::*;

/// QEMU 10: what its `vhost-user` netdev asks for, seen as `SET_FEATURES 0x160608000` and
/// `SET_PROTOCOL_FEATURES 0xb` against vnpd's offer (the guest driver's choice among them).
pub const QEMU_10: Profile = Profile {
    name: "QEMU 10.0.2",
    features: VERSION_1 | PROTOCOL_FEATURES | EVENT_IDX | MQ | GUEST_ANNOUNCE | MRG_RXBUF,
    protocol: VhostUserProtocolFeatures::MQ
        .union(VhostUserProtocolFeatures::LOG_SHMFD)
        .union(VhostUserProtocolFeatures::REPLY_ACK),
    base_from: BaseFrom::UsedIdx,
};

/// The enables QEMU sends before `SET_FEATURES`: one `(RX on, TX on)` pair per
/// `peer_attach`; the test guest's driver causes five at boot, one after a reconnect.
fn qemu_early_enables(rounds: usize) -> Vec<Msg> {
    (0..rounds)
        .flat_map(|_| [r(SetVringEnable(0, true)), r(SetVringEnable(1, true))])
        .collect()
}

/// QEMU's vhost-user handshake at chardev connect (`vhost_user_backend_init`), then
/// `vhost_dev_init` (SET_OWNER, GET_FEATURES, masked call notifiers and error fds), the guest
/// driver's early enables, and `vhost_net_start` at DRIVER_OK.
fn qemu_conversation(early_rounds: usize, final_enables: bool) -> Vec<Msg> {
    let mut c = vec![
        m(GetFeatures),
        m(GetProtocolFeatures),
        m(SetProtocolFeatures),
        m(GetQueueNum),
        m(SetOwner),
        m(GetFeatures),
        m(SetVringCall(0)),
        m(SetVringErr(0)),
        m(SetVringCall(1)),
        m(SetVringErr(1)),
    ];
    c.extend(qemu_early_enables(early_rounds));
    c.extend([m(SetFeatures), r(SetMemTable)]);
    for q in 0..2 {
        c.extend([
            m(SetVringNum(q)),
            m(SetVringBase(q)),
            m(SetVringAddr(q)),
            m(SetVringKick(q)),
            m(SetVringCall(q)),
        ]);
    }
    if final_enables {
        c.extend([r(SetVringEnable(0, true)), r(SetVringEnable(1, true))]);
    }
    c
}

/// QEMU 10 booting the test guest, as captured.
pub fn qemu_boot() -> Vec<Msg> {
    qemu_conversation(5, true)
}

/// QEMU 10 reconnecting (`reconnect-ms`) after vnpd restarted, as captured: the whole handshake
/// again, one early enable round, the rings restarted from the used index, and no enable after
/// `SET_FEATURES` (the device never stopped, so the early enables are the only ones).
pub fn qemu_reconnect() -> Vec<Msg> {
    qemu_conversation(1, false)
}

/// QEMU 10 on an incoming live migration (from an strace of the destination's socket, in
/// `docs/qemu-launch.md`): the boot handshake with its early enables while the device state
/// loads, and no enable after `SET_FEATURES` (the device was already running on the source).
pub fn qemu_incoming_migration() -> Vec<Msg> {
    qemu_conversation(5, false)
}

/// cloud-hypervisor's `vhost-user-net` (`Net::new` offers CSUM/TSO/UFO/ECN, MRG_RXBUF, CTRL_VQ,
/// EVENT_IDX, VERSION_1, PROTOCOL_FEATURES; vnpd takes MRG_RXBUF, EVENT_IDX, VERSION_1 and the
/// IPv4 checksum/TSO/ECN offloads of those, never UFO or the IPv6 ones; MAC is masked out and
/// MQ only asked for with more than one pair).
pub const CLOUD_HYPERVISOR: Profile = Profile {
    name: "cloud-hypervisor",
    features: VERSION_1 | PROTOCOL_FEATURES | EVENT_IDX | MRG_RXBUF | CH_OFFLOADS | CTRL_VQ,
    protocol: VhostUserProtocolFeatures::MQ
        .union(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS)
        .union(VhostUserProtocolFeatures::REPLY_ACK)
        .union(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
        .union(VhostUserProtocolFeatures::LOG_SHMFD),
    base_from: BaseFrom::AvailIdx,
};

/// `setup_vhost_user`: every message carries NEED_REPLY once REPLY_ACK is acked
/// (`set_hdr_flags`). Features at activation; all ring sizes first; then per ring address,
/// base, call, kick; then the enables. No INFLIGHT (vnpd does not offer it), no backend channel.
fn cloud_hypervisor_setup() -> Vec<Msg> {
    let mut c = vec![r(SetFeatures), r(SetMemTable)];
    c.extend((0..2).map(|q| r(SetVringNum(q))));
    for q in 0..2 {
        c.extend([
            r(SetVringAddr(q)),
            r(SetVringBase(q)),
            r(SetVringCall(q)),
            r(SetVringKick(q)),
        ]);
    }
    c.extend((0..2).map(|q| r(SetVringEnable(q, true))));
    c
}

/// cloud-hypervisor from `Net::new` (at VM creation) to `activate` (guest DRIVER_OK).
pub fn cloud_hypervisor_boot() -> Vec<Msg> {
    let mut c = vec![
        m(SetOwner),
        m(GetFeatures),
        m(GetProtocolFeatures),
        m(SetProtocolFeatures),
        r(GetQueueNum),
    ];
    c.extend(cloud_hypervisor_setup());
    c
}

/// Memory hotplug without CONFIGURE_MEM_SLOTS (vnpd does not offer it): `update_mem_table`
/// resends the whole table.
pub fn cloud_hypervisor_memory_update() -> Vec<Msg> {
    vec![r(SetMemTable)]
}

/// `VhostUserEpollHandler::reconnect` after the socket hung up: connect (retrying every
/// 100 ms), `set_protocol_features_vhost_user` (no GET_PROTOCOL_FEATURES, no GET_QUEUE_NUM),
/// then `setup_vhost_user` again with the rings' current avail indices as bases.
pub fn cloud_hypervisor_reconnect() -> Vec<Msg> {
    let mut c = vec![m(SetOwner), m(GetFeatures), m(SetProtocolFeatures)];
    c.extend(cloud_hypervisor_setup());
    c
}

/// `reset_vhost_user` (guest driver reset): per ring, disable then GET_VRING_BASE.
pub fn cloud_hypervisor_reset() -> Vec<Msg> {
    (0..2)
        .flat_map(|q| [r(SetVringEnable(q, false)), r(GetVringBase(q))])
        .collect()
}

/// DPDK 22.11 `net_virtio_user`: asks only for MRG_RXBUF, VERSION_1, PROTOCOL_FEATURES and the
/// MQ and REPLY_ACK protocol features (`SET_FEATURES 0x140008000`, `SET_PROTOCOL_FEATURES 0x9`).
pub const DPDK_22_11: Profile = Profile {
    name: "DPDK 22.11.11 virtio-user",
    features: VERSION_1 | PROTOCOL_FEATURES | MRG_RXBUF,
    protocol: VhostUserProtocolFeatures::MQ.union(VhostUserProtocolFeatures::REPLY_ACK),
    base_from: BaseFrom::AvailIdx,
};

/// `virtio_user_dev_init` then `virtio_user_start_device` (testpmd's port start): call fds are
/// set before SET_FEATURES, kick fds with the ring addresses, enables without replies; only
/// SET_MEM_TABLE asks for an ack.
pub fn dpdk_start() -> Vec<Msg> {
    let mut c = vec![
        m(SetOwner),
        m(GetFeatures),
        m(GetProtocolFeatures),
        m(SetProtocolFeatures),
        m(SetVringCall(0)),
        m(SetVringCall(1)),
        m(SetFeatures),
        r(SetMemTable),
    ];
    for q in 0..2 {
        c.extend([
            m(SetVringNum(q)),
            m(SetVringBase(q)),
            m(SetVringAddr(q)),
            m(SetVringKick(q)),
        ]);
    }
    c.extend([m(SetVringEnable(0, true)), m(SetVringEnable(1, true))]);
    c
}

/// `virtio_user_stop_device` (testpmd's port stop or exit), as captured.
pub fn dpdk_stop() -> Vec<Msg> {
    vec![
        m(SetVringEnable(0, false)),
        m(SetVringEnable(1, false)),
        m(GetVringBase(0)),
        m(GetVringBase(1)),
    ]
}
