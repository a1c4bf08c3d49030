//! [`VmPort`]: one attached VM's data path, from start to stop.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vhost::vhost_user::Listener;
use vhost_user_backend::ShutdownHandle;
use vnp_protocol::token::{check_expiry, Expiry, TokenFields, TokenMinter};
use vnp_protocol::wire::ethernet;
use vnp_protocol::wire::options::ReturnToken;

use super::edge_link::{self, EdgeLink};
use super::frame::GuestNet;
use super::hairpin::{Hairpin, HairpinLifetime, HairpinTarget};
use super::handoff::{HandedOff, Handoff};
use super::moved_hint::{self, RateGate};
use super::peers::{Enqueued, PeerEntry, PeerTable, PendingLimits, WaitingPacket};
use super::rx_check::{ExpiryPolicy, RxContext};
use super::serve::serve;
use super::vhost_socket::{self, SocketAccess};
use super::{udp, ControlPlane, PeerToken, PortError, RefusalReason, VmAttachment};
use crate::bridge::counters::BridgeCounters;
use crate::bridge::{Bridge, BridgeLimits, BridgeSpec, Inbox, MetadataSource};
use crate::device::DeviceStartHook;
use crate::metrics::counters::{DropReason, VmCounters};

pub use super::peers::RETURN_TOKEN_TTL_SECS;

/// Knobs of the data path with sensible defaults.
#[derive(Debug, Clone, Copy)]
pub struct DataPathTuning {
    /// Receive-side expiry tolerance.
    pub expiry: ExpiryPolicy,
    /// Pending-queue limits.
    pub pending: PendingLimits,
    /// Largest virtqueue the device accepts.
    pub max_queue_size: u16,
    /// Owner, group and mode of the vhost-user socket.
    pub socket_access: SocketAccess,
    /// Offer the guest checksum and segmentation offloads (vnpd's `offloads` setting).
    pub offloads: bool,
    /// Send TSO segments with UDP GSO when the kernel has it (false: one datagram per segment,
    /// the path taken on kernels without it; for tests).
    pub udp_gso: bool,
}

impl Default for DataPathTuning {
    fn default() -> Self {
        Self {
            expiry: ExpiryPolicy::default(),
            pending: PendingLimits::default(),
            max_queue_size: 1024,
            socket_access: SocketAccess::default(),
            offloads: true,
            udp_gso: true,
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
    /// Offer the guest checksum and segmentation offloads.
    pub(crate) offloads: bool,
    /// The kernel takes `UDP_SEGMENT` (UDP GSO) on this port's sockets.
    pub(crate) udp_gso: bool,
    /// One per queue pair: packets that waited for a token, for that pair's worker to send.
    pub(crate) handoffs: Vec<Handoff>,
    edge: EdgeLink,
    /// NAT for traffic through the gateway.
    pub(crate) nat: super::nat_hook::NatState,
    /// The VM's service bridge, once started ([`VmPort::start_bridge`]).
    bridge: OnceLock<Inbox>,
    /// Given to each connection's device (live migration: the resume on a destination).
    pub(crate) device_start: Option<DeviceStartHook>,
    /// Endpoint-moved hints acted on, per moved VM (`moved_hint`).
    pub(super) moved_hints: Mutex<RateGate<Ipv4Addr>>,
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
        // The reverse direction: from the peer's VM (behind `peer`) to ours (behind `local`).
        let fields = TokenFields {
            src_host: *peer.ip(),
            src_port: peer.port(),
            src_vm: peer_vm,
            dst_host: *self.local.ip(),
            dst_port: self.local.port(),
            dst_vm: self.net.vm_ip,
            network_id: self.network_id,
            expiry,
        };
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
        if src_vm == crate::nat::OUTSIDE {
            // A gateway's token: kept per gateway endpoint, for the replies of inbound flows
            // that came in through it; never the OUTSIDE grant (nat::gateways).
            if self.nat.learn_gateway_token(from, rt, now, p.max_ttl_secs) {
                self.counters.return_token_learned();
            }
            return;
        }
        let token = PeerToken {
            dst_host: *from.ip(),
            dst_port: from.port(),
            token: rt.token,
            expiry: rt.expiry,
        };
        if self.peers.learn(src_vm, token, now, |entry, packets| {
            self.hand_off(src_vm, entry, packets, now)
        }) {
            self.counters.return_token_learned();
        }
    }

    /// Installs the token for `dst`; the packets that waited for it go to their workers.
    pub(crate) fn install(&self, dst: Ipv4Addr, token: PeerToken) {
        let now = unix_now();
        self.peers.install(dst, token, |entry, packets| {
            self.hand_off(dst, entry, packets, now)
        });
    }

    /// Hands packets that waited for `dst` to the workers of the queue pairs that queued them
    /// (see `datapath::handoff`): each flow leaves from its own worker, in order. The first
    /// one that fits the MTU with the option carries a return token.
    fn hand_off(&self, dst: Ipv4Addr, entry: &PeerEntry, packets: Vec<WaitingPacket>, now: u32) {
        let n = self.handoffs.len().max(1);
        let info = entry.send_info();
        let mut per_pair: Vec<Vec<HandedOff>> = (0..n).map(|_| Vec::new()).collect();
        let mut return_due = true;
        for (pair, packet) in packets {
            let fits = packet.len() + ReturnToken::WIRE_LEN <= usize::from(self.net.mtu);
            let return_token = return_due && fits && entry.claim_return_token(now);
            return_due &= !return_token;
            per_pair[pair % n].push(HandedOff {
                dst,
                info,
                packet,
                return_token,
            });
        }
        for (handoff, packets) in self.handoffs.iter().zip(per_pair) {
            handoff.post(packets);
        }
    }

    /// Hands a packet for the metadata address to the service bridge; false when there is
    /// none or it is full.
    pub(crate) fn to_bridge(&self, packet: Vec<u8>) -> bool {
        self.bridge.get().is_some_and(|inbox| inbox.post(packet))
    }

    /// Wraps the bridge's IPv4 packets in Ethernet (router -> VM) and hands them to the first
    /// pair's worker, which owns an RX ring the guest always has.
    fn deliver_from_bridge(&self, packets: Vec<Vec<u8>>) {
        let head = ethernet::header(self.mac, self.router_mac, ethernet::ethertype::IPV4);
        let frames = packets
            .into_iter()
            .map(|p| [head.as_slice(), p.as_slice()].concat())
            .collect();
        let dropped = self.handoffs[0].post_frames(frames);
        self.counters
            .drop_packets(DropReason::RxNoBuffer, dropped as u64);
    }

    /// The edge's answer to an ARP, DHCP or ICMP frame.
    pub(crate) fn edge_reply(&self, frame: &[u8]) -> Result<Option<Vec<u8>>, ()> {
        edge_link::reply(&self.edge, frame, &self.counters).map_err(|why| {
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
    bridge: Mutex<Option<Bridge>>,
    /// Forwarding to the VM's new host after it migrated away.
    hairpin: Mutex<Option<Hairpin>>,
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
        Self::start_with_hook(att, control, tuning, None)
    }

    /// [`VmPort::start_with`], calling `device_start` whenever a frontend acks its features.
    pub fn start_with_hook(
        att: VmAttachment,
        control: Arc<dyn ControlPlane>,
        tuning: DataPathTuning,
        device_start: Option<DeviceStartHook>,
    ) -> Result<VmPort, PortError> {
        validate(&att)?;
        // Everything that can fail on bad input before anything is bound.
        let edge = EdgeLink::new(&att)
            .map_err(|e| PortError::InvalidAttachment(format!("{}: {e}", att.vm_id)))?;
        let handoffs = (0..att.queue_pairs)
            .map(|_| Handoff::new())
            .collect::<Result<Vec<_>, _>>()
            .map_err(PortError::EventFd)?;
        let want = SocketAddrV4::new(att.host_addr, att.udp_port);
        let (sockets, local) = udp::bind_port_sockets(want, usize::from(att.queue_pairs))
            .map_err(|source| PortError::Udp { addr: want, source })?;
        let udp_gso = tuning.offloads && tuning.udp_gso && udp::supports_gso(&sockets[0]);
        // Created with its configured access every time, whatever the umask.
        let mut listener = vhost_socket::bind(&att.socket_path, tuning.socket_access)
            .map(Listener::from)
            .map_err(|e| PortError::Listen {
                path: att.socket_path.clone(),
                reason: e.to_string(),
            })?;
        let core = Arc::new(PortCore {
            vm_id: att.vm_id.clone(),
            network_id: att.network_vni,
            net: GuestNet {
                vm_ip: att.vm_ip,
                prefix_len: att.prefix_len,
                router_ip: att.router_ip,
                mtu: att.guest_mtu,
            },
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
            offloads: tuning.offloads,
            udp_gso,
            handoffs,
            edge,
            nat: Default::default(),
            bridge: OnceLock::new(),
            device_start,
            moved_hints: Mutex::new(RateGate::new(
                moved_hint::RECHECK_INTERVAL,
                moved_hint::RECHECK_VMS,
            )),
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
            bridge: Mutex::new(None),
            hairpin: Mutex::new(None),
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

    /// Installs the token for `dst`; the packets that waited for it are handed to the workers
    /// that queued them, which send them in order before anything newer.
    pub fn install_token(&self, dst: Ipv4Addr, token: PeerToken) {
        self.core.install(dst, token);
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

    /// The registry says the VM now lives at `target` (it migrated away): datagrams still
    /// arriving here are forwarded there for a bounded time (`hairpin`). Once per target: a
    /// hairpin whose lifetime ended is not started again for the same move.
    pub fn start_hairpin(&self, target: HairpinTarget) {
        let mut slot = self.hairpin.lock().unwrap_or_else(|e| e.into_inner());
        // The same destination (a resume notice, then the registry's watch, whose generation
        // differs): the same move.
        if slot.as_ref().is_some_and(|h| h.target().to == target.to) {
            return;
        }
        drop(slot.take());
        match Hairpin::start(self.core.clone(), target, HairpinLifetime::default()) {
            Ok(h) => *slot = Some(h),
            Err(e) => log::error!("vm {}: cannot start forwarding: {e}", self.core.vm_id),
        }
    }

    /// The VM's endpoint is this port's again: no more forwarding.
    pub fn stop_hairpin(&self) {
        drop(
            self.hairpin
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
        );
    }

    /// Whether the VM migrated away from this port (a hairpin was started, running or not).
    pub fn has_departed(&self) -> bool {
        let slot = self.hairpin.lock().unwrap_or_else(|e| e.into_inner());
        slot.is_some()
    }

    /// Whether a hairpin runs now (started and its lifetime not over).
    pub fn hairpinning(&self) -> bool {
        let slot = self.hairpin.lock().unwrap_or_else(|e| e.into_inner());
        slot.as_ref().is_some_and(|h| !h.finished())
    }

    /// The VM's NAT port blocks (at attach, and whenever the registry grows them).
    pub fn set_nat_blocks(&self, blocks: &[crate::nat::PortBlock]) {
        self.core.nat.set_blocks(blocks, &self.core.counters);
    }

    /// A copy of the VM's NAT table and the NAT clock's now (admin view, metrics).
    pub fn nat_snapshot(&self) -> (crate::nat::NatTable, u64) {
        (self.core.nat.snapshot(), self.core.nat.now())
    }

    /// Starts the VM's service bridge (metadata, DNS, credentials; `crate::bridge`): from now
    /// on the guest's packets to the metadata address are answered with `source`'s data for
    /// this VM. Once per port.
    pub fn start_bridge(
        &self,
        source: Arc<dyn MetadataSource>,
        limits: BridgeLimits,
        config: &crate::config::BridgeConfig,
    ) -> Result<(), PortError> {
        let mut slot = self.bridge.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_some() {
            return Err(PortError::InvalidAttachment(format!(
                "{}: bridge already started",
                self.core.vm_id
            )));
        }
        let spec = BridgeSpec {
            vm_id: self.core.vm_id.clone(),
            vm_ip: self.core.net.vm_ip,
            hostname: self.core.edge.hostname().to_string(),
            mtu: self.core.net.mtu,
            limits,
            dns_upstream: config.dns_upstream,
            services: config.services.clone(),
        };
        let core = self.core.clone();
        let bridge = Bridge::start(
            spec,
            source,
            Box::new(move |packets| core.deliver_from_bridge(packets)),
        )
        .map_err(PortError::Thread)?;
        let _ = self.core.bridge.set(bridge.inbox());
        *slot = Some(bridge);
        Ok(())
    }

    /// The service bridge's counters, when it runs.
    pub fn bridge_counters(&self) -> Option<Arc<BridgeCounters>> {
        let slot = self.bridge.lock().unwrap_or_else(|e| e.into_inner());
        slot.as_ref().map(Bridge::counters)
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
        // The bridge and the hairpin first: their threads hold the port's core.
        drop(self.bridge.lock().unwrap_or_else(|e| e.into_inner()).take());
        self.stop_hairpin();
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
        let n = self.core.peers.discard_pending()
            + self
                .core
                .handoffs
                .iter()
                .map(Handoff::discard)
                .sum::<usize>();
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

mod migrate;

/// The first characters of a VM id, for thread names and logs.
pub(crate) fn short(id: &str) -> String {
    id.chars().take(8).collect()
}
