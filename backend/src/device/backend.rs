//! The vhost-user-net device: [`VhostUserBackend`] for one attached VM.
//!
//! A fresh instance serves each frontend connection. Worker thread `i` handles queue pair `i`
//! (RX queue `2i`, TX queue `2i+1`) and the pair's UDP socket, so a packet is handled start to end
//! on one thread without locks shared with other pairs.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::VhostUserBackend;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::features::{
    config_space, config_window, device_features, has_feature, protocol_features, vnet_header_len,
    CONFIG_LEN, VHOST_F_LOG_ALL,
};
use crate::datapath::port::PortCore;
use crate::datapath::worker::{GuestMem, PairWorker, Vring};

/// The device of one VM for one frontend connection.
pub struct VnpNetBackend {
    mem: GuestMemoryAtomic<GuestMem>,
    workers: Vec<Mutex<PairWorker>>,
    acked: AtomicU64,
    config: [u8; CONFIG_LEN],
    max_queue_size: usize,
}

impl std::fmt::Debug for VnpNetBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VnpNetBackend")
            .field("queue_pairs", &self.workers.len())
            .field("acked", &self.acked.load(Ordering::Relaxed))
            .finish()
    }
}

fn lock(w: &Mutex<PairWorker>) -> MutexGuard<'_, PairWorker> {
    // A worker that panicked mid-packet leaves only per-batch scratch state behind.
    w.lock().unwrap_or_else(|e| e.into_inner())
}

impl VnpNetBackend {
    /// A device for `core`'s VM; `mem` must be the memory handed to the `VhostUserDaemon`.
    pub fn new(core: Arc<PortCore>, mem: GuestMemoryAtomic<GuestMem>) -> Self {
        let pairs = usize::from(core.queue_pairs.max(1));
        let config = config_space(core.mac, pairs as u16, core.net.mtu);
        let max_queue_size = usize::from(core.max_queue_size);
        Self {
            mem,
            workers: (0..pairs)
                .map(|i| Mutex::new(PairWorker::new(core.clone(), i)))
                .collect(),
            acked: AtomicU64::new(0),
            config,
            max_queue_size,
        }
    }

    /// Epoll data value under which each worker watches its UDP socket (above the range the
    /// library reserves for queues and the exit event).
    pub fn socket_event_id(&self) -> u64 {
        self.workers.len() as u64 * 2 + 1
    }
}

impl VhostUserBackend for VnpNetBackend {
    type Bitmap = BitmapMmapRegion;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.workers.len() * 2
    }

    fn max_queue_size(&self) -> usize {
        self.max_queue_size
    }

    fn features(&self) -> u64 {
        device_features()
    }

    fn acked_features(&self, features: u64) {
        self.acked.store(features, Ordering::Relaxed);
        let hdr = vnet_header_len(features);
        let mrg = has_feature(features, VIRTIO_NET_F_MRG_RXBUF);
        // QEMU acks VHOST_F_LOG_ALL while it migrates the guest: from then on every write into
        // guest memory must reach the dirty log (vm-memory's accessors always log).
        let log = has_feature(features, VHOST_F_LOG_ALL);
        for w in &self.workers {
            lock(w).set_features(hdr, mrg, log);
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        protocol_features()
    }

    fn reset_device(&self) {
        for w in &self.workers {
            lock(w).reset();
        }
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The library configures each vring; the workers use the vrings' notification helpers,
        // which follow that setting.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        config_window(&self.config, offset, size)
    }

    fn update_memory(&self, _mem: GuestMemoryAtomic<GuestMem>) -> io::Result<()> {
        // `self.mem` is the same atomic the library just updated.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.workers.len())
            .map(|i| 0b11u64 << (2 * i))
            .collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let index = queue_index as usize;
        if index % 2 == 0 {
            if let Some(w) = self.workers.get(index / 2) {
                lock(w).release_held();
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
        let (Some(worker), [rx, tx, ..]) = (self.workers.get(thread_id), vrings) else {
            return Ok(());
        };
        let mut worker = lock(worker);
        let mem = self.mem.memory();
        worker.sync_memory(&mem);
        match u64::from(device_event) {
            0 => worker.run_rx(&mem, rx),
            1 => worker.run_tx(&mem, rx, tx),
            e if e == self.socket_event_id() => worker.run_rx(&mem, rx),
            e => log::debug!("unexpected device event {e}"),
        }
        Ok(())
    }
}
