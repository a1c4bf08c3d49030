//! [`VmPort`]: one attached VM's data path, from start to stop.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vnp_protocol::token::{check_expiry, Expiry, TokenMinter};
use vnp_protocol::wire::options::ReturnToken;
use vnp_protocol::wire::{VnpRepr, HEADER_LEN};

use crate::device::frontend_relay::FrontendRelay;

use super::edge_link::{self, EdgeLink};
use super::frame::GuestNet;
use super::peers::{Enqueued, PeerTable, PendingLimits, SendInfo};
use super::rx_check::{ExpiryPolicy, RxContext};
use super::worker::{return_token_fields, RETURN_TOKEN_TTL_SECS};
use super::{udp, ControlPlane, PeerToken, PortError, RefusalReason, VmAttachment};
use crate::device::backend::VnpNetBackend;
use crate::metrics::counters::{DropReason, VmCounters};

/// Knobs of the data path with sensible defaults.
#[derive(Debug, Clone, Copy)]
pub struct DataPathTuning {
    /// Receive-side expiry tolerance.
    pub expiry: ExpiryPolicy,
    /// Pending-queue limits.
    pub pending: PendingLimits,
    /// Largest virtqueue the device accepts.
    pub max_queue_size: u16,
}

impl Default for DataPathTuning {
    fn default() -> Self {
        Self {
            expiry: ExpiryPolicy::default(),
            pending: PendingLimits::default(),
            max_queue_size: 1024,
        }
    }
}

/// Current time in Unix seconds (saturating into u32, as VNP expiries are).
pub fn unix_now() -> u32 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs().min(u64::from(u32::MAX - 1)) as u32)
}

/// State shared by a port's workers, its control-plane entry points and its device instances.
pub struct PortCore {
    pub(crate) vm_id: String,
    pub(crate) network_id: u32,
    pub(crate) net: GuestNet,
    pub(crate) mac: [u8; 6],
    pub(crate) router_mac: [u8; 6],
    pub(crate) local: SocketAddrV4,
    pub(crate) minter: TokenMinter,
    pub(crate) peers: PeerTable,
    pub(crate) counters: Arc<VmCounters>,
    pub(crate) control: Arc<dyn ControlPlane>,
    pub(crate) sockets: Vec<UdpSocket>,
    pub(crate) rx_ctx: RxContext,
    pub(crate) queue_pairs: u16,
    pub(crate) max_queue_size: u16,
    edge: EdgeLink,
}

impl std::fmt::Debug for PortCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PortCore")
            .field("vm_id", &self.vm_id)
            .field("vm_ip", &self.net.vm_ip)
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl PortCore {
    /// Acts on the outcome of queueing a packet that had no token.
    pub(crate) fn on_enqueued(&self, dst: Ipv4Addr, outcome: Enqueued) {
        match outcome {
            Enqueued::Queued { request } => {
                if request {
                    self.counters.token_request();
                    self.control.request_token(&self.vm_id, dst);
                }
            }
            Enqueued::Full => self.counters.drop_packet(DropReason::TxNoTokenQueueFull),
            Enqueued::Refused(reason) => self.counters.drop_packet(refusal_drop(reason)),
            // The TX path sends these itself; nothing to count here.
            Enqueued::Ready(_) => {}
        }
    }

    /// A return token for packets from `peer_vm` (behind `peer`) to our VM.
    pub(crate) fn return_token(
        &self,
        peer: SocketAddrV4,
        peer_vm: Ipv4Addr,
        now: u32,
    ) -> ReturnToken {
        let expiry = Expiry(now.saturating_add(RETURN_TOKEN_TTL_SECS));
        let fields = return_token_fields(
            peer,
            peer_vm,
            self.local,
            self.net.vm_ip,
            self.network_id,
            expiry,
        );
        ReturnToken {
            token: self.minter.mint(&fields),
            expiry,
        }
    }

    /// Stores a return token that arrived on an authenticated datagram from `src_vm` at `from`.
    pub(crate) fn learn_return_token(
        &self,
        src_vm: Ipv4Addr,
        from: SocketAddrV4,
        rt: ReturnToken,
        now: u32,
    ) {
        let p = self.rx_ctx.expiry;
        if check_expiry(rt.expiry, now, 0, p.max_ttl_secs, p.allow_never).is_err() {
            return;
        }
        let token = PeerToken {
            dst_host: *from.ip(),
            dst_port: from.port(),
            token: rt.token,
            expiry: rt.expiry,
        };
        if let Some((info, packets)) = self.peers.learn(src_vm, token) {
            self.counters.return_token_learned();
            self.flush(src_vm, info, packets, now);
        }
    }

    /// Sends packets that waited for a token (copied, off the hot path).
    fn flush(&self, dst: Ipv4Addr, info: SendInfo, packets: Vec<Vec<u8>>, now: u32) {
        for (i, packet) in packets.iter().enumerate() {
            let mut options = [0u8; ReturnToken::WIRE_LEN];
            let mut options_len = 0;
            if i == 0 && packet.len() + ReturnToken::WIRE_LEN <= usize::from(self.net.mtu) {
                let claimed = self
                    .peers
                    .view()
                    .get(dst, now)
                    .is_some_and(|e| e.claim_return_token(now));
                if claimed {
                    options_len = self
                        .return_token(info.endpoint, dst, now)
                        .emit(&mut options)
                        .unwrap_or(0);
                }
            }
            let header = VnpRepr {
                network_id: self.network_id,
                token: info.token,
                expiry: info.expiry,
                has_options: options_len > 0,
            }
            .to_bytes();
            let mut datagram = Vec::with_capacity(HEADER_LEN + packet.len() + options_len);
            datagram.extend_from_slice(&header);
            datagram.extend_from_slice(packet);
            datagram.extend_from_slice(&options[..options_len]);
            match self.sockets[0].send_to(&datagram, info.endpoint) {
                Ok(_) => self.counters.tx(packet.len()),
                Err(e) => {
                    log::debug!("vm {}: send to {}: {e}", self.vm_id, info.endpoint);
                    self.counters.drop_packet(DropReason::TxSendError);
                }
            }
        }
    }

    /// The edge's answer to an ARP or DHCP frame.
    pub(crate) fn edge_reply(&self, frame: &[u8]) -> Result<Option<Vec<u8>>, ()> {
        edge_link::reply(&self.edge, frame).map_err(|why| {
            log::debug!("vm {}: edge refused a frame: {why}", self.vm_id);
        })
    }
}

fn refusal_drop(reason: RefusalReason) -> DropReason {
    match reason {
        RefusalReason::PolicyDenied => DropReason::TxPolicyRefused,
        RefusalReason::UnknownDestination => DropReason::TxUnknownDestination,
        RefusalReason::RegistryUnavailable => DropReason::TxRegistryUnavailable,
    }
}

/// One attached VM's data path: its UDP sockets, its vhost-user socket and the device served on
/// it. Stopped (threads joined, socket file removed) by [`VmPort::stop`] or on drop.
pub struct VmPort {
    core: Arc<PortCore>,
    stop: Arc<AtomicBool>,
    active: Arc<Mutex<Option<ShutdownHandle>>>,
    thread: Option<JoinHandle<()>>,
    socket_path: PathBuf,
}

impl std::fmt::Debug for VmPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmPort")
            .field("core", &self.core)
            .field("socket_path", &self.socket_path)
            .finish_non_exhaustive()
    }
}

fn validate(att: &VmAttachment) -> Result<(), PortError> {
    let bad = |m: &str| Err(PortError::InvalidAttachment(format!("{}: {m}", att.vm_id)));
    if att.guest_mtu < 68 {
        return bad("guest MTU below 68");
    }
    if att.queue_pairs == 0 || att.queue_pairs > 16 {
        return bad("queue pairs must be 1..=16");
    }
    if att.vm_ip.is_unspecified() || att.prefix_len > 32 {
        return bad("bad VM address");
    }
    if att.mac[0] & 1 != 0 {
        return bad("multicast MAC");
    }
    if att.socket_path.as_os_str().is_empty() {
        return bad("empty socket path");
    }
    Ok(())
}

impl VmPort {
    /// Binds the VM's UDP socket(s) on `host_addr:udp_port`, listens on `socket_path` and serves
    /// the vhost-user-net device (a fresh `VhostUserDaemon` for each frontend connection) in
    /// threads.
    pub fn start(att: VmAttachment, control: Arc<dyn ControlPlane>) -> Result<VmPort, PortError> {
        Self::start_with(att, control, DataPathTuning::default())
    }

    /// [`VmPort::start`] with explicit tuning.
    pub fn start_with(
        att: VmAttachment,
        control: Arc<dyn ControlPlane>,
        tuning: DataPathTuning,
    ) -> Result<VmPort, PortError> {
        validate(&att)?;
        EdgeLink::new(&att)
            .map_err(|e| PortError::InvalidAttachment(format!("{}: {e}", att.vm_id)))?;
        let want = SocketAddrV4::new(att.host_addr, att.udp_port);
        let (sockets, local) = udp::bind_port_sockets(want, usize::from(att.queue_pairs))
            .map_err(|source| PortError::Udp { addr: want, source })?;
        let mut listener =
            Listener::new(&att.socket_path, true).map_err(|e| PortError::Listen {
                path: att.socket_path.clone(),
                reason: e.to_string(),
            })?;
        let net = GuestNet {
            vm_ip: att.vm_ip,
            prefix_len: att.prefix_len,
            router_ip: att.router_ip,
            mtu: att.guest_mtu,
        };
        let edge = EdgeLink::new(&att)
            .map_err(|e| PortError::InvalidAttachment(format!("{}: {e}", att.vm_id)))?;
        let core = Arc::new(PortCore {
            vm_id: att.vm_id.clone(),
            network_id: att.network_vni,
            net,
            mac: att.mac,
            router_mac: edge_link::ROUTER_MAC,
            local,
            minter: TokenMinter::new(&att.secret),
            peers: PeerTable::new(tuning.pending),
            counters: Arc::new(VmCounters::new()),
            control,
            sockets,
            rx_ctx: RxContext {
                vm_ip: att.vm_ip,
                network_id: att.network_vni,
                local,
                expiry: tuning.expiry,
            },
            queue_pairs: att.queue_pairs,
            max_queue_size: tuning.max_queue_size,
            edge,
        });
        let stop = Arc::new(AtomicBool::new(false));
        let active = Arc::new(Mutex::new(None));
        let thread = {
            let core = core.clone();
            let stop = stop.clone();
            let active = active.clone();
            std::thread::Builder::new()
                .name(format!("vnpd-{}", short(&att.vm_id)))
                .spawn(move || serve(core, &mut listener, &stop, &active))
                .map_err(PortError::Thread)?
        };
        log::info!(
            "vm {}: serving {} on {}, UDP {}",
            att.vm_id,
            att.vm_ip,
            att.socket_path.display(),
            local
        );
        Ok(VmPort {
            core,
            stop,
            active,
            thread: Some(thread),
            socket_path: att.socket_path,
        })
    }

    /// The UDP address the VM's traffic arrives on (the real port when 0 was asked for).
    pub fn udp_addr(&self) -> SocketAddrV4 {
        self.core.local
    }

    /// The registry id of the VM.
    pub fn vm_id(&self) -> &str {
        &self.core.vm_id
    }

    /// Installs the token for `dst` and sends the packets that waited for it.
    pub fn install_token(&self, dst: Ipv4Addr, token: PeerToken) {
        let (info, packets) = self.core.peers.install(dst, token);
        self.core.flush(dst, info, packets, unix_now());
    }

    /// No token for `dst`: drops the packets waiting for it (counted by `reason`).
    pub fn refuse_token(&self, dst: Ipv4Addr, reason: RefusalReason) {
        let n = self.core.peers.refuse(dst, reason, Instant::now());
        self.core
            .counters
            .drop_packets(refusal_drop(reason), n as u64);
    }

    /// Destinations whose tokens expire before `t`; the control thread refreshes them.
    pub fn tokens_expiring_before(&self, t: Expiry) -> Vec<Ipv4Addr> {
        self.core.peers.expiring_before(t)
    }

    /// The endpoint of `dst` changed (migration): the next packet asks for a token again.
    pub fn forget_peer(&self, dst: Ipv4Addr) {
        let n = self.core.peers.forget(dst);
        self.core
            .counters
            .drop_packets(DropReason::TxPendingDiscarded, n as u64);
    }

    /// The VM's counters.
    pub fn counters(&self) -> Arc<VmCounters> {
        self.core.counters.clone()
    }

    /// Closes the sockets, stops the threads and removes the socket file.
    pub fn stop(self) {
        drop(self)
    }

    fn shutdown(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.stop.store(true, Ordering::SeqCst);
        for _ in 0..500 {
            if thread.is_finished() {
                break;
            }
            let handle = self
                .active
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            match handle {
                Some(h) => h.shutdown(),
                // Wake the accept() the serve thread may be blocked in.
                None => drop(UnixStream::connect(&self.socket_path)),
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if thread.is_finished() {
            let _ = thread.join();
        } else {
            log::error!("vm {}: data path thread did not stop", self.core.vm_id);
        }
        let _ = std::fs::remove_file(&self.socket_path);
        let n = self.core.peers.discard_pending();
        self.core
            .counters
            .drop_packets(DropReason::TxPendingDiscarded, n as u64);
        log::info!("vm {}: port stopped", self.core.vm_id);
    }
}

impl Drop for VmPort {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl crate::control::TokenTarget for VmPort {
    fn install(&self, dst: Ipv4Addr, grant: &crate::control::Grant) {
        self.install_token(dst, PeerToken::from(grant));
    }

    fn refuse(&self, dst: Ipv4Addr, why: RefusalReason) {
        self.refuse_token(dst, why);
    }

    fn expiring_before(&self, t: Expiry) -> Vec<Ipv4Addr> {
        self.tokens_expiring_before(t)
    }

    fn forget(&self, dst: Ipv4Addr) {
        self.forget_peer(dst);
    }
}

fn short(id: &str) -> String {
    id.chars().take(8).collect()
}

/// Serves one frontend connection after another until stopped.
fn serve(
    core: Arc<PortCore>,
    listener: &mut Listener,
    stop: &AtomicBool,
    active: &Mutex<Option<ShutdownHandle>>,
) {
    while !stop.load(Ordering::SeqCst) {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = Arc::new(VnpNetBackend::new(core.clone(), mem.clone()));
        let mut daemon = match VhostUserDaemon::new(
            format!("vhost-{}", short(&core.vm_id)),
            backend.clone(),
            mem,
        ) {
            Ok(d) => d,
            Err(e) => {
                log::error!("vm {}: cannot create vhost-user daemon: {e}", core.vm_id);
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        // The VM's UDP socket joins each pair's worker epoll, edge-triggered: the worker
        // drains it, and stops early only when the guest has no buffers (resumed by a kick).
        for (i, handler) in daemon.get_epoll_handlers().iter().enumerate() {
            let socket = &core.sockets[i % core.sockets.len()];
            if let Err(e) = handler.register_listener(
                socket.as_raw_fd(),
                EventSet::IN | EventSet::EDGE_TRIGGERED,
                backend.socket_event_id(),
            ) {
                log::error!("vm {}: cannot watch UDP socket: {e}", core.vm_id);
            }
        }
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
        let relay = match FrontendRelay::start(frontend, &label, |p| daemon.start_client(p)) {
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
