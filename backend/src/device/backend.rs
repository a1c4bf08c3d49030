//! The vhost-user-net device: [`VhostUserBackend`] for one attached VM and one frontend
//! connection.
//!
//! Worker thread `i` serves queue pair `i` (RX queue `2i`, TX queue `2i+1`) through its own
//! [`QueuePairHandler`]; the data path implements that trait, so this module never names it.
//! Each event takes one snapshot of guest memory and hands it to the handler as a
//! [`GuestView`]. A handler may watch file descriptors of its own (a socket, an eventfd) in
//! the pair's epoll under [`NetBackend::external_event_id`].

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
#[cfg(test)]
use std::os::fd::IntoRawFd;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::VhostUserBackend;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_MRG_RXBUF,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vnp_protocol::wire::virtio_net::TxAllowed;

use super::features::{
    config_space, config_window, device_features, has_feature, protocol_features, tx_allowed,
    vnet_header_len, CONFIG_LEN, VHOST_F_LOG_ALL,
};
use crate::ring::{GuestMem, GuestView, Vring};

/// What the driver negotiated that the handlers need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// Length of the virtio-net header in front of every frame (10 or 12).
    pub vnet_hdr_len: usize,
    /// `VIRTIO_NET_F_MRG_RXBUF`: a received frame may span several RX chains.
    pub mrg_rxbuf: bool,
    /// `VHOST_F_LOG_ALL`: migration in progress, every guest write must reach the dirty log.
    pub log_all: bool,
    /// `VIRTIO_RING_F_INDIRECT_DESC`: chains may refer to indirect descriptor tables. Never
    /// offered today, so always false; chains that use one anyway are dropped.
    pub indirect_desc: bool,
    /// `VIRTIO_RING_F_EVENT_IDX`: the driver says with `used_event` where it wants its next
    /// interrupt.
    pub event_idx: bool,
    /// What TX headers may ask for (`CSUM`, `HOST_TSO4`, `HOST_ECN`).
    pub tx_offload: TxAllowed,
    /// `VIRTIO_NET_F_GUEST_CSUM`: the driver accepts frames with a partial checksum or
    /// `DATA_VALID`.
    pub guest_csum: bool,
    /// `VIRTIO_NET_F_GUEST_TSO4`: the driver accepts TCP/IPv4 super-packets.
    pub guest_tso4: bool,
    /// `VIRTIO_NET_F_GUEST_ECN`: ... with the ECN bit.
    pub guest_ecn: bool,
}

impl Default for Negotiated {
    fn default() -> Self {
        Self {
            vnet_hdr_len: 12,
            mrg_rxbuf: false,
            log_all: false,
            indirect_desc: false,
            event_idx: false,
            tx_offload: TxAllowed::default(),
            guest_csum: false,
            guest_tso4: false,
            guest_ecn: false,
        }
    }
}

/// Why a handler is called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairEvent {
    /// The driver kicked the RX queue (new buffers).
    RxKick,
    /// The driver kicked the TX queue (new packets).
    TxKick,
    /// One of the handler's own file descriptors is ready (`n` as in
    /// [`NetBackend::external_event_id`]).
    External(u64),
}

/// Which rings of a pair broke since the device last asked (see `ring::park`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BrokenRings {
    /// The RX ring (queue `2i`).
    pub rx: bool,
    /// The TX ring (queue `2i + 1`).
    pub tx: bool,
}

/// The error eventfds the frontend gave per ring (`VHOST_USER_SET_VRING_ERR`). The
/// vhost-user-backend crate keeps the ones it receives to itself, so the frontend relay, which
/// sees every message, hands the device a copy of each.
#[derive(Debug, Default)]
pub struct VringErrors {
    fds: Mutex<BTreeMap<u8, File>>,
}

impl VringErrors {
    /// Ring `index`'s error eventfd is now `fd` (`None`: the frontend took it away).
    pub fn set(&self, index: u8, fd: Option<File>) {
        let mut fds = self.fds.lock().unwrap_or_else(|e| e.into_inner());
        match fd {
            Some(fd) => fds.insert(index, fd),
            None => fds.remove(&index),
        };
    }

    /// Tells the frontend that ring `index` is broken, if it gave an error eventfd for it;
    /// returns whether it did.
    pub fn signal(&self, index: u8) -> bool {
        let fds = self.fds.lock().unwrap_or_else(|e| e.into_inner());
        let Some(mut fd) = fds.get(&index) else {
            return false;
        };
        // An eventfd takes 8-byte native-endian counts.
        fd.write_all(&1u64.to_ne_bytes()).is_ok()
    }
}

/// The packet side of one queue pair. Called on that pair's worker thread only.
pub trait QueuePairHandler: Send + 'static {
    /// The driver acked its features.
    fn set_features(&mut self, negotiated: Negotiated);
    /// Device reset: the rings are gone; forget everything taken from them.
    fn reset(&mut self);
    /// The RX ring is stopping (GET_VRING_BASE): give every buffer taken from it back. The
    /// frontend sets it up again before it runs again, so a parked ring may be used again.
    fn stop_rx(&mut self);
    /// The TX ring is stopping (GET_VRING_BASE); as for RX, a parked ring may be used again
    /// once it is set up again.
    fn stop_tx(&mut self);
    /// Handles `event` with guest memory `view`, the pair's RX and TX vrings.
    fn handle(&mut self, event: PairEvent, view: GuestView<'_>, rx: &Vring, tx: &Vring);
    /// The rings that broke (and were parked) since the last call: the device tells the
    /// frontend.
    fn take_broken(&mut self) -> BrokenRings;
}

/// Called when the frontend acks its features (`VHOST_USER_SET_FEATURES`). QEMU sends that
/// from `vhost_dev_start`, which runs only while the VM runs: on a live-migration destination
/// it is the first message after the whole device state has loaded, i.e. the resume. The live
/// migration code relies on it to register a migrated VM's endpoint (see
/// `docs/architecture.md`, "Live migration").
pub type DeviceStartHook = std::sync::Arc<dyn Fn() + Send + Sync>;

/// The device's fixed properties.
#[derive(Debug, Clone, Copy)]
pub struct DeviceConfig {
    /// The guest NIC's MAC address.
    pub mac: [u8; 6],
    /// Guest MTU (config space `mtu`).
    pub mtu: u16,
    /// Largest virtqueue the device accepts.
    pub max_queue_size: u16,
    /// Offer the checksum and segmentation offloads (`features::OFFLOAD_FEATURES`).
    pub offloads: bool,
}

/// The device of one VM for one frontend connection.
pub struct NetBackend<H: QueuePairHandler> {
    mem: GuestMemoryAtomic<GuestMem>,
    handlers: Vec<Mutex<H>>,
    acked: AtomicU64,
    config: [u8; CONFIG_LEN],
    max_queue_size: usize,
    offloads: bool,
    errors: Arc<VringErrors>,
    on_start: Option<DeviceStartHook>,
    start_trace: super::start_trace::StartTrace,
    /// The interrupt each start owes the guest once its call eventfds are there.
    call_watch: super::call_watch::CallWatch,
    /// The exit-event consumers handed to the library, which registers each in its epoll with
    /// `into_raw_fd` and never closes it (vhost-user-backend 0.24, `VringEpollHandler::new`):
    /// closed when the device goes, or every frontend connection would leak one eventfd per
    /// queue pair (two per host and migration, seen in `migration_blackout`).
    exit_consumers: Mutex<Vec<RawFd>>,
}

impl<H: QueuePairHandler> std::fmt::Debug for NetBackend<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetBackend")
            .field("queue_pairs", &self.handlers.len())
            .field("acked", &self.acked.load(Ordering::Relaxed))
            .finish()
    }
}

fn lock<H>(h: &Mutex<H>) -> MutexGuard<'_, H> {
    // A handler that panicked mid-packet leaves only per-batch scratch state behind.
    h.lock().unwrap_or_else(|e| e.into_inner())
}

impl<H: QueuePairHandler> NetBackend<H> {
    /// A device with one queue pair per handler (at least one); `mem` must be the memory
    /// handed to the `VhostUserDaemon`.
    pub fn new(config: DeviceConfig, handlers: Vec<H>, mem: GuestMemoryAtomic<GuestMem>) -> Self {
        let pairs = handlers.len().max(1);
        Self {
            mem,
            handlers: handlers.into_iter().map(Mutex::new).collect(),
            acked: AtomicU64::new(0),
            config: config_space(config.mac, pairs as u16, config.mtu),
            max_queue_size: usize::from(config.max_queue_size),
            offloads: config.offloads,
            errors: Arc::default(),
            on_start: None,
            start_trace: Default::default(),
            call_watch: super::call_watch::CallWatch::new(pairs),
            exit_consumers: Mutex::new(Vec::new()),
        }
    }

    /// Calls `hook` each time the frontend acks its features (see [`DeviceStartHook`]).
    pub fn with_start_hook(mut self, hook: Option<DeviceStartHook>) -> Self {
        self.on_start = hook;
        self
    }

    /// Where the frontend relay puts the error eventfds the frontend gives.
    pub fn vring_errors(&self) -> Arc<VringErrors> {
        self.errors.clone()
    }

    /// Epoll data value under which a handler's own file descriptor number `n` is watched
    /// (above the range the library reserves for queues and the exit event).
    pub fn external_event_id(&self, n: u64) -> u64 {
        self.handlers.len() as u64 * 2 + 1 + n
    }
}

impl<H: QueuePairHandler> Drop for NetBackend<H> {
    fn drop(&mut self) {
        for fd in lock(&self.exit_consumers).drain(..) {
            // SAFETY: `fd` is an exit-event consumer this device created; the library took it
            // over with `into_raw_fd` and never closes it. The library's epoll handlers, the
            // only users of the descriptor, hold this device (an `Arc`), so they are gone
            // when it drops: nothing uses `fd` any more, and nothing else owns it.
            unsafe {
                libc::close(fd);
            }
        }
    }
}

impl<H: QueuePairHandler> VhostUserBackend for NetBackend<H> {
    type Bitmap = BitmapMmapRegion;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.handlers.len() * 2
    }

    fn max_queue_size(&self) -> usize {
        self.max_queue_size
    }

    fn features(&self) -> u64 {
        device_features(self.offloads)
    }

    fn acked_features(&self, features: u64) {
        self.acked.store(features, Ordering::Relaxed);
        // QEMU acks VHOST_F_LOG_ALL while it migrates the guest: from then on every write into
        // guest memory must reach the dirty log (vm-memory's accessors always log).
        let negotiated = Negotiated {
            vnet_hdr_len: vnet_header_len(features),
            mrg_rxbuf: has_feature(features, VIRTIO_NET_F_MRG_RXBUF),
            log_all: has_feature(features, VHOST_F_LOG_ALL),
            indirect_desc: has_feature(features, VIRTIO_RING_F_INDIRECT_DESC),
            event_idx: has_feature(features, VIRTIO_RING_F_EVENT_IDX),
            tx_offload: tx_allowed(features),
            guest_csum: has_feature(features, VIRTIO_NET_F_GUEST_CSUM),
            guest_tso4: has_feature(features, VIRTIO_NET_F_GUEST_TSO4),
            guest_ecn: has_feature(features, VIRTIO_NET_F_GUEST_ECN),
        };
        for h in &self.handlers {
            lock(h).set_features(negotiated);
        }
        self.start_trace.start();
        self.call_watch.start();
        if let Some(hook) = &self.on_start {
            hook();
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        protocol_features()
    }

    fn reset_device(&self) {
        for h in &self.handlers {
            lock(h).reset();
        }
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The library configures each vring; the handlers use the vrings' notification
        // helpers, which follow that setting.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        config_window(&self.config, offset, size)
    }

    fn update_memory(&self, _mem: GuestMemoryAtomic<GuestMem>) -> io::Result<()> {
        // `self.mem` is the same atomic the library just updated.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.handlers.len())
            .map(|i| 0b11u64 << (2 * i))
            .collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()?;
        lock(&self.exit_consumers).push(consumer.as_raw_fd());
        Some((consumer, notifier))
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let index = queue_index as usize;
        // A migration's source stops here (and so do a pause and a reset); the time is one of
        // the events a migration's blackout is measured between.
        log::info!("device: ring {index} stopped (GET_VRING_BASE)");
        if let Some(h) = self.handlers.get(index / 2) {
            if index % 2 == 0 {
                lock(h).stop_rx();
            } else {
                lock(h).stop_tx();
            }
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        let (Some(handler), [rx, tx, ..]) = (self.handlers.get(thread_id), vrings) else {
            return Ok(());
        };
        let event = match u64::from(device_event) {
            0 => PairEvent::RxKick,
            1 => PairEvent::TxKick,
            e if e >= self.external_event_id(0) => {
                PairEvent::External(e - self.external_event_id(0))
            }
            e => {
                log::debug!("unexpected device event {e}");
                return Ok(());
            }
        };
        self.start_trace.note(&event, thread_id);
        // One snapshot of guest memory for the whole pass.
        let snapshot = self.mem.memory().into_inner();
        let log_all = has_feature(self.acked.load(Ordering::Relaxed), VHOST_F_LOG_ALL);
        let broken = {
            let mut handler = lock(handler);
            handler.handle(event, GuestView::new(&snapshot, log_all), rx, tx);
            handler.take_broken()
        };
        self.call_watch.settle(thread_id, rx, tx);
        let pair = thread_id as u8;
        if broken.rx && !self.errors.signal(pair * 2) {
            log::debug!("pair {thread_id}: RX ring broken, no error eventfd to tell");
        }
        if broken.tx && !self.errors.signal(pair * 2 + 1) {
            log::debug!("pair {thread_id}: TX ring broken, no error eventfd to tell");
        }
        Ok(())
    }
}

/// A queue-pair handler that does nothing: for tests of the device's own message handling.
#[cfg(test)]
pub(crate) struct IdlePair;

#[cfg(test)]
impl QueuePairHandler for IdlePair {
    fn set_features(&mut self, _negotiated: Negotiated) {}
    fn reset(&mut self) {}
    fn stop_rx(&mut self) {}
    fn stop_tx(&mut self) {}
    fn handle(&mut self, _event: PairEvent, _view: GuestView<'_>, _rx: &Vring, _tx: &Vring) {}
    fn take_broken(&mut self) -> BrokenRings {
        BrokenRings::default()
    }
}

/// A one-pair device on empty guest memory whose handler does nothing: for tests of the
/// device's own message handling.
#[cfg(test)]
impl NetBackend<IdlePair> {
    pub(crate) fn idle() -> Self {
        let config = DeviceConfig {
            mac: [2, 0, 0, 0, 0, 1],
            mtu: 1500,
            max_queue_size: 256,
            offloads: true,
        };
        Self::new(
            config,
            vec![IdlePair],
            GuestMemoryAtomic::new(GuestMem::new()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `fd` is still the eventfd whose counter was set to `marker`.
    fn still_marked(fd: RawFd, marker: u64) -> bool {
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap_or_default();
        info.lines().any(|l| {
            l.split_whitespace().collect::<Vec<_>>() == ["eventfd-count:", &format!("{marker:x}")]
        })
    }

    #[test]
    fn exit_event_consumers_the_library_keeps_are_closed_with_the_device() {
        let device = NetBackend::idle();
        let (consumer, notifier) = device.exit_event(0).unwrap();
        // What vhost-user-backend 0.24 does with it: registers it and forgets it.
        let fd = consumer.into_raw_fd();
        let marker = 0x5eed_u64;
        for _ in 0..marker {
            notifier.notify().unwrap();
        }
        assert!(
            still_marked(fd, marker),
            "the marker is readable while the device lives"
        );
        drop(device);
        assert!(
            !still_marked(fd, marker),
            "fd {fd} still open after the device dropped"
        );
    }
}
