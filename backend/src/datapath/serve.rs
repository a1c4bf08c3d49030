//! The serve thread of a [`super::VmPort`]: one frontend connection after another, each with a
//! fresh device.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::port::{short, PortCore};
use super::worker::{PairWorker, HANDOFF_EVENT, RX_TIMER_EVENT, SOCKET_EVENT};
use crate::device::frontend_relay::FrontendRelay;
use crate::device::{DeviceConfig, NetBackend, VringErrors};

type Device = NetBackend<PairWorker>;

/// A fresh device for one connection, its daemon, and each pair's own file descriptors
/// registered in that pair's epoll.
fn new_daemon(core: &Arc<PortCore>) -> Option<(VhostUserDaemon<Arc<Device>>, Arc<VringErrors>)> {
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let config = DeviceConfig {
        mac: core.mac,
        mtu: core.net.mtu,
        max_queue_size: core.max_queue_size,
        offloads: core.offloads,
    };
    let workers: Vec<PairWorker> = match (0..usize::from(core.queue_pairs.max(1)))
        .map(|pair| PairWorker::new(core.clone(), pair))
        .collect()
    {
        Ok(w) => w,
        Err(e) => {
            log::error!("vm {}: cannot create a worker's RX timer: {e}", core.vm_id);
            return None;
        }
    };
    let timers: Vec<_> = workers.iter().map(PairWorker::rx_timer_fd).collect();
    let backend = Arc::new(
        NetBackend::new(config, workers, mem.clone()).with_start_hook(core.device_start.clone()),
    );
    let daemon = match VhostUserDaemon::new(
        format!("vhost-{}", short(&core.vm_id)),
        backend.clone(),
        mem,
    ) {
        Ok(d) => d,
        Err(e) => {
            log::error!("vm {}: cannot create vhost-user daemon: {e}", core.vm_id);
            return None;
        }
    };
    for (i, handler) in daemon.get_epoll_handlers().iter().enumerate() {
        // The pair's UDP socket, edge-triggered: the worker drains it, and stops early only
        // when the guest has no buffers (resumed by a kick).
        let socket = &core.sockets[i % core.sockets.len()];
        // Its hand-off eventfd, level-triggered: the worker consumes it when it takes the
        // packets.
        let handoff = &core.handoffs[i % core.handoffs.len()];
        let registered = handler
            .register_listener(
                socket.as_raw_fd(),
                EventSet::IN | EventSet::EDGE_TRIGGERED,
                backend.external_event_id(SOCKET_EVENT),
            )
            .and_then(|()| {
                handler.register_listener(
                    handoff.as_raw_fd(),
                    EventSet::IN,
                    backend.external_event_id(HANDOFF_EVENT),
                )
            })
            .and_then(|()| {
                // Its RX timer, level-triggered: the worker reads it when it fires.
                handler.register_listener(
                    timers[i],
                    EventSet::IN,
                    backend.external_event_id(RX_TIMER_EVENT),
                )
            });
        if let Err(e) = registered {
            log::error!(
                "vm {}: cannot watch pair {i}'s descriptors: {e}",
                core.vm_id
            );
        }
    }
    Some((daemon, backend.vring_errors()))
}

/// Serves one frontend connection after another until stopped.
pub(super) fn serve(
    core: Arc<PortCore>,
    listener: &mut Listener,
    stop: &AtomicBool,
    active: &Mutex<Option<ShutdownHandle>>,
) {
    while !stop.load(Ordering::SeqCst) {
        let Some((mut daemon, errors)) = new_daemon(&core) else {
            std::thread::sleep(Duration::from_secs(1));
            continue;
        };
        let frontend = match listener.accept() {
            Ok(Some(frontend)) => frontend,
            Ok(None) => continue,
            Err(e) => {
                if !stop.load(Ordering::SeqCst) {
                    log::warn!("vm {}: accept failed: {e}", core.vm_id);
                    std::thread::sleep(Duration::from_millis(100));
                }
                continue;
            }
        };
        // QEMU's virtio-net sends SET_VRING_ENABLE before SET_FEATURES, which the vhost crate
        // refuses by dropping the connection; the relay absorbs those (see frontend_relay).
        let label = short(&core.vm_id);
        // It also hands the device the frontend's error eventfds (told when a ring breaks).
        let started =
            FrontendRelay::start_with_errors(frontend, &label, errors, |p| daemon.start_client(p));
        let relay = match started {
            Ok(r) => r,
            Err(e) => {
                log::error!("vm {}: cannot start frontend relay: {e}", core.vm_id);
                continue;
            }
        };
        *active.lock().unwrap_or_else(|e| e.into_inner()) = daemon.shutdown_handle();
        if stop.load(Ordering::SeqCst) {
            daemon.request_shutdown();
        } else {
            log::info!("vm {}: frontend connected", core.vm_id);
        }
        match daemon.wait() {
            Ok(()) => log::info!("vm {}: frontend disconnected", core.vm_id),
            Err(e) => log::warn!("vm {}: frontend connection ended: {e}", core.vm_id),
        }
        *active.lock().unwrap_or_else(|e| e.into_inner()) = None;
        // Dropping the daemon stops and joins its worker threads.
        drop(daemon);
        relay.join();
    }
}
