//! The attachment manager: what `attach`, `detach`, `list` and `stats` do.
//!
//! An attach asks the registry for the VM's record, its network and its secret (only the
//! owning host may read it), starts the VM's port (vhost-user socket + UDP port), registers
//! the endpoint and persists the attachment. Any failure undoes the earlier steps, so an attach
//! either fully happens or leaves nothing behind.
//!
//! Attachments that could not be restored at start (registry down, say) stay persisted and are
//! retried by [`Manager::retry_restores`].

mod attach;

use super::migration::{departure, ResumeRegistration, Whereabouts, DEPARTURE_GRACE};
use super::state::{PersistedAttachment, StateStore};
use crate::bridge::counters::BridgeCounters;
use crate::config::{VnpdConfig, MAX_QUEUE_PAIRS};
use crate::control::resume_link::{NoticeBoard, NoticeListener};
use crate::control::ControlHandle;
use crate::datapath::hairpin::HairpinTarget;
use crate::datapath::rx_check::ExpiryPolicy;
use crate::datapath::{ControlPlane, DataPathTuning, VmAttachment, VmPort};
use crate::metrics::counters::{CounterSnapshot, VmCounters};
use attach::prepare_socket_dir;
use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use vnp_registry_client::{validate_id, ClientError, RegistryClient};
use vnpd_admin_api::{
    AdminErrorCode, AdminFailure, AdminReply, AdminRequest, AttachmentInfo, VmStats,
};

/// Longest vhost-user socket path (sun_path holds 108 bytes with the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// Counters of every attached VM, readable without the manager's lock (the exporter scrapes
/// while an attach may be waiting for the registry).
#[derive(Debug, Default)]
pub struct CounterBoard {
    vms: Mutex<BTreeMap<String, Arc<VmCounters>>>,
    /// The VMs' service-bridge counters (`crate::bridge`).
    bridges: Mutex<BTreeMap<String, Arc<BridgeCounters>>>,
}

impl CounterBoard {
    /// Snapshots of every VM, sorted by id.
    pub fn snapshot(&self) -> Vec<(String, CounterSnapshot)> {
        let vms = self.vms.lock().unwrap_or_else(|e| e.into_inner());
        vms.iter().map(|(k, v)| (k.clone(), v.snapshot())).collect()
    }

    /// Service-bridge counters of every VM that has a bridge, sorted by id.
    pub fn bridge_snapshot(&self) -> Vec<(String, Vec<(&'static str, u64)>)> {
        let b = self.bridges.lock().unwrap_or_else(|e| e.into_inner());
        b.iter().map(|(k, v)| (k.clone(), v.snapshot())).collect()
    }

    fn insert_bridge(&self, vm: &str, c: Arc<BridgeCounters>) {
        let mut b = self.bridges.lock().unwrap_or_else(|e| e.into_inner());
        b.insert(vm.to_string(), c);
    }

    fn insert(&self, vm: &str, c: Arc<VmCounters>) {
        let mut vms = self.vms.lock().unwrap_or_else(|e| e.into_inner());
        vms.insert(vm.to_string(), c);
    }

    fn remove(&self, vm: &str) {
        let mut vms = self.vms.lock().unwrap_or_else(|e| e.into_inner());
        vms.remove(vm);
        let mut b = self.bridges.lock().unwrap_or_else(|e| e.into_inner());
        b.remove(vm);
    }
}

/// A VM's NAT table in the admin API's shape.
pub fn to_nat_info(vm_id: &str, table: &crate::nat::NatTable, now: u64) -> vnpd_admin_api::NatInfo {
    vnpd_admin_api::NatInfo {
        vm_id: vm_id.to_string(),
        blocks: table.blocks().iter().map(|b| (b.first, b.last)).collect(),
        ports: table.stats().ports_total as u64,
        flows: table
            .flows(now)
            .into_iter()
            .map(|f| vnpd_admin_api::NatFlowInfo {
                proto: f.key.proto.as_str().to_string(),
                local_port: f.key.local_port,
                remote: f.key.remote,
                remote_port: f.key.remote_port,
                mapped: f.mapped,
                state: f.state.as_str().to_string(),
                expires_in: f.expires_in,
            })
            .collect(),
    }
}

/// Converts a counter snapshot to the admin API's stats shape.
pub fn to_vm_stats(vm_id: &str, s: &CounterSnapshot) -> VmStats {
    let counters = [
        ("tx_packets", s.tx_packets),
        ("tx_bytes", s.tx_bytes),
        ("rx_packets", s.rx_packets),
        ("rx_bytes", s.rx_bytes),
        ("edge_replies", s.edge_replies),
        ("token_requests", s.token_requests),
        ("token_requests_throttled", s.token_requests_throttled),
        ("return_tokens_learned", s.return_tokens_learned),
        ("tx_csum_frames", s.tx_csum_frames),
        ("tx_tso_frames", s.tx_tso_frames),
        ("hairpin_forwarded", s.hairpin_forwarded),
        ("moved_hints_sent", s.moved_hints_sent),
        ("moved_hint_rechecks", s.moved_hint_rechecks),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let drops = s
        .drops
        .iter()
        .map(|(r, n)| (r.as_str().to_string(), *n))
        .collect();
    VmStats {
        vm_id: vm_id.to_string(),
        counters,
        drops,
    }
}

struct Attached {
    info: AttachmentInfo,
    port: Arc<VmPort>,
    /// Attached as a live-migration destination: registers the endpoint on resume.
    resume: Option<ResumeRegistration>,
}

impl Attached {
    /// The registry's endpoint is (or was) this host's: not an incoming VM still waiting.
    fn serving(&self) -> bool {
        self.resume
            .as_ref()
            .is_none_or(ResumeRegistration::registered)
    }
}

/// Owns every attachment of this vnpd.
pub struct Manager {
    cfg: VnpdConfig,
    host_id: String,
    client: RegistryClient,
    control: ControlHandle,
    store: StateStore,
    board: Arc<CounterBoard>,
    attached: BTreeMap<String, Attached>,
    unrestored: BTreeMap<String, PersistedAttachment>,
    /// VMs whose endpoint moved to another host, since when (detached after a grace period).
    departing: BTreeMap<String, Instant>,
    /// Serves attached VMs' state to the host they migrate to (`crate::migrate_state`).
    state_server: Option<crate::migrate_state::StateServer>,
    /// Hears the destination's resume notice for VMs migrating away from here.
    _notice_listener: Option<NoticeListener>,
    /// The VMs the listener acts for.
    notices: NoticeBoard,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("host_id", &self.host_id)
            .field("attached", &self.attached.keys().collect::<Vec<_>>())
            .field("unrestored", &self.unrestored.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn fail(code: AdminErrorCode, msg: impl Into<String>) -> AdminFailure {
    AdminFailure::new(code, msg)
}

fn registry_failure(what: &str, e: &ClientError) -> AdminFailure {
    fail(AdminErrorCode::Registry, format!("{what}: {e}"))
}

impl Manager {
    /// A manager with nothing attached. `host_id` is this host's registry identity.
    pub fn new(
        cfg: VnpdConfig,
        host_id: String,
        client: RegistryClient,
        control: ControlHandle,
        store: StateStore,
    ) -> Self {
        let cfg_addr = cfg.underlay_addr;
        let notice_listener = crate::control::resume_link::start_for(cfg_addr);
        let notices = notice_listener
            .as_ref()
            .map_or_else(NoticeBoard::default, NoticeListener::board);
        Self {
            cfg,
            host_id,
            client,
            control,
            store,
            board: Arc::new(CounterBoard::default()),
            attached: BTreeMap::new(),
            unrestored: BTreeMap::new(),
            departing: BTreeMap::new(),
            state_server: crate::migrate_state::serve::start_for(cfg_addr),
            _notice_listener: notice_listener,
            notices,
        }
    }

    /// The counters of every attached VM.
    pub fn board(&self) -> Arc<CounterBoard> {
        Arc::clone(&self.board)
    }

    /// Serves one admin request.
    pub fn handle(&mut self, req: AdminRequest) -> Result<AdminReply, AdminFailure> {
        match req {
            AdminRequest::Attach {
                vm_id,
                socket_path,
                queue_pairs,
                incoming,
            } => self
                .attach(&vm_id, socket_path, queue_pairs, incoming, true)
                .map(|attachment| AdminReply::Attached { attachment }),
            AdminRequest::Detach { vm_id } => {
                self.detach(&vm_id).map(|()| AdminReply::Detached { vm_id })
            }
            AdminRequest::List => Ok(AdminReply::List {
                attachments: self.attached.values().map(|a| a.info.clone()).collect(),
            }),
            AdminRequest::Stats { vm_id } => {
                if let Some(id) = &vm_id {
                    if !self.attached.contains_key(id) {
                        return Err(fail(
                            AdminErrorCode::NotAttached,
                            format!("vm {id} is not attached"),
                        ));
                    }
                }
                let vms = self
                    .board
                    .snapshot()
                    .iter()
                    .filter(|(id, _)| vm_id.as_ref().is_none_or(|want| want == id))
                    .map(|(id, s)| to_vm_stats(id, s))
                    .collect();
                Ok(AdminReply::Stats { vms })
            }
            AdminRequest::Nat { vm_id } => {
                let a = self.attached.get(&vm_id).ok_or_else(|| {
                    fail(
                        AdminErrorCode::NotAttached,
                        format!("vm {vm_id} is not attached"),
                    )
                })?;
                let (table, now) = a.port.nat_snapshot();
                Ok(AdminReply::Nat {
                    nat: to_nat_info(&vm_id, &table, now),
                })
            }
        }
    }

    fn persisted(&self) -> Vec<PersistedAttachment> {
        self.attached
            .values()
            .map(|a| PersistedAttachment {
                vm_id: a.info.vm_id.clone(),
                socket_path: a.info.socket_path.clone(),
                queue_pairs: a.info.queue_pairs,
                incoming: a.resume.is_some(),
            })
            .chain(self.unrestored.values().cloned())
            .collect()
    }

    /// Attaches `vm_id`; `persist` is false while restoring (the entry is already stored).
    /// `incoming`: as a live-migration destination, registering the endpoint only when the
    /// device starts (see [`super::migration`]).
    pub fn attach(
        &mut self,
        vm_id: &str,
        socket_path: Option<PathBuf>,
        queue_pairs: Option<u16>,
        incoming: bool,
        persist: bool,
    ) -> Result<AttachmentInfo, AdminFailure> {
        validate_id(vm_id).map_err(|e| fail(AdminErrorCode::BadRequest, e))?;
        let socket_path = socket_path.unwrap_or_else(|| self.cfg.default_socket_path(vm_id));
        let queue_pairs = queue_pairs.unwrap_or(self.cfg.default_queue_pairs);
        // A VM migrating back before its departed port's grace period ended: the old port
        // (which forwards to where the VM went) gives way to the incoming one.
        if incoming
            && self
                .attached
                .get(vm_id)
                .is_some_and(|a| a.port.has_departed())
        {
            log::info!("vm {vm_id} comes back: replacing its departed port");
            self.detach(vm_id)?;
        }
        if let Some(same) = self.check_attach(vm_id, &socket_path, queue_pairs)? {
            return Ok(same);
        }
        let vm = self.read_vm_for_attach(vm_id, incoming)?;
        let nat_blocks = vm.nat_blocks();
        let arrival = incoming.then(|| vm.arrival()).flatten();
        let notice = incoming
            .then(|| vm.resume_notice(self.cfg.underlay_addr))
            .flatten();
        let (info, att) = self.attachment(vm_id, vm, socket_path, queue_pairs);
        prepare_socket_dir(&info.socket_path)?;
        let resume = incoming.then(|| {
            ResumeRegistration::new(
                self.client.clone(),
                vm_id,
                self.cfg.underlay_addr,
                info.udp_port,
            )
            .with_notice(notice)
        });
        let port = self.start_port(vm_id, att, resume.as_ref(), arrival.as_ref())?;
        port.set_nat_blocks(&nat_blocks);
        // An incoming VM's endpoint is registered when its device starts (after the
        // migration), not now: the source still serves it.
        if !incoming {
            let registered =
                self.client
                    .register_endpoint(vm_id, self.cfg.underlay_addr, info.udp_port);
            match registered {
                Ok(generation) => self.notices.registered(vm_id, generation),
                Err(e) => {
                    self.notices.withdraw(vm_id);
                    self.stop_port(vm_id, port);
                    return Err(registry_failure(
                        &format!("registering the endpoint of vm {vm_id}"),
                        &e,
                    ));
                }
            }
        }
        self.keep_attachment(vm_id, &info, port, resume, persist)?;
        log::info!(
            "attached vm {vm_id}{} ({} on network {} vni {}) at {} udp {}:{}",
            if incoming { " (incoming)" } else { "" },
            info.vm_ip,
            info.network,
            info.network_id,
            info.socket_path.display(),
            info.host_addr,
            info.udp_port
        );
        Ok(info)
    }

    /// Detaches `vm_id`: stops its port and forgets the attachment.
    pub fn detach(&mut self, vm_id: &str) -> Result<(), AdminFailure> {
        if let Some(p) = self.unrestored.remove(vm_id) {
            if let Err(e) = self.store.save(&self.persisted()) {
                self.unrestored.insert(vm_id.to_string(), p);
                return Err(fail(AdminErrorCode::Persist, e.to_string()));
            }
            log::info!("forgot unrestored attachment of vm {vm_id}");
            return Ok(());
        }
        let Some(a) = self.attached.remove(vm_id) else {
            return Err(fail(
                AdminErrorCode::NotAttached,
                format!("vm {vm_id} is not attached"),
            ));
        };
        if let Err(e) = self.store.save(&self.persisted()) {
            self.attached.insert(vm_id.to_string(), a);
            return Err(fail(AdminErrorCode::Persist, e.to_string()));
        }
        self.board.remove(vm_id);
        self.departing.remove(vm_id);
        if let Some(s) = &self.state_server {
            s.withdraw(vm_id);
        }
        self.notices.withdraw(vm_id);
        if let Some(r) = &a.resume {
            r.cancel();
        }
        self.stop_port(vm_id, a.port);
        log::info!("detached vm {vm_id}");
        Ok(())
    }

    fn stop_port(&self, vm_id: &str, port: Arc<VmPort>) {
        self.control.remove_port(vm_id);
        match Arc::try_unwrap(port) {
            Ok(p) => p.stop(),
            // Only the control thread holds another reference, and remove_port waited for it
            // to drop it; if it did not answer in time, the port stops when it lets go.
            Err(_) => log::error!("vm {vm_id}: port still referenced; it stops when released"),
        }
    }

    /// Restores persisted attachments (at start). Failures keep the entry for a retry.
    pub fn restore(&mut self) -> Result<(), super::state::StateError> {
        for p in self.store.load()? {
            self.unrestored.insert(p.vm_id.clone(), p);
        }
        self.retry_restores();
        Ok(())
    }

    /// Attaches whatever is persisted but not running. Returns how many are still waiting.
    pub fn retry_restores(&mut self) -> usize {
        let waiting: Vec<_> = self.unrestored.values().cloned().collect();
        for p in waiting {
            match self.attach(
                &p.vm_id,
                Some(p.socket_path.clone()),
                Some(p.queue_pairs),
                p.incoming,
                false,
            ) {
                Ok(_) => log::info!("restored attachment of vm {}", p.vm_id),
                Err(e) => log::warn!(
                    "cannot restore vm {} yet (will retry): {}",
                    p.vm_id,
                    e.message
                ),
            }
        }
        self.unrestored.len()
    }

    /// Source side of a live migration: asks the registry where each VM served here is, and
    /// detaches one whose endpoint moved to another host [`DEPARTURE_GRACE`] after first
    /// seeing it (the registry down: keeps serving). Returns the VMs detached.
    pub fn check_departures(&mut self) -> Vec<String> {
        let serving: Vec<(String, u16)> = self
            .attached
            .values()
            .filter(|a| a.serving())
            .map(|a| (a.info.vm_id.clone(), a.info.udp_port))
            .collect();
        let mut gone = Vec::new();
        for (vm_id, port) in serving {
            let answer = self.client.get_vm(&vm_id);
            match departure(&answer, self.cfg.underlay_addr, port) {
                Whereabouts::Here => {
                    self.departing.remove(&vm_id);
                    // The generation a resume notice must name (also after a restart).
                    if let Some(ep) = answer.as_ref().ok().and_then(|r| r.endpoint) {
                        self.notices.registered(&vm_id, ep.generation);
                    }
                }
                Whereabouts::Unknown => {}
                Whereabouts::Moved => {
                    let since = *self.departing.entry(vm_id.clone()).or_insert_with(|| {
                        log::info!("vm {vm_id}: its endpoint moved to another host");
                        Instant::now()
                    });
                    // Normally started by the control thread on the watch change already.
                    if let (Ok(rec), Some(a)) = (&answer, self.attached.get(&vm_id)) {
                        if let Some(ep) = rec.endpoint {
                            a.port.start_hairpin(HairpinTarget {
                                to: std::net::SocketAddrV4::new(ep.host_addr, ep.port),
                                generation: ep.generation,
                            });
                        }
                    }
                    if since.elapsed() >= DEPARTURE_GRACE && self.detach(&vm_id).is_ok() {
                        log::info!("vm {vm_id}: migrated away; detached after the grace period");
                        gone.push(vm_id);
                    }
                }
            }
        }
        gone
    }

    /// Stops every port without forgetting the attachments (vnpd is shutting down).
    pub fn shutdown(&mut self) {
        let ids: Vec<String> = self.attached.keys().cloned().collect();
        for id in ids {
            if let Some(a) = self.attached.remove(&id) {
                self.board.remove(&id);
                self.stop_port(&id, a.port);
            }
        }
    }
}

fn check_socket_path(p: &Path) -> Result<(), AdminFailure> {
    if !p.is_absolute() {
        return Err(fail(
            AdminErrorCode::BadRequest,
            format!("socket path {} must be absolute", p.display()),
        ));
    }
    if p.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(fail(
            AdminErrorCode::BadRequest,
            format!(
                "socket path {} is longer than {MAX_SOCKET_PATH} bytes",
                p.display()
            ),
        ));
    }
    Ok(())
}

/// A socket file left by a crashed vnpd would make the bind fail; one something still listens
/// on belongs to someone else and is refused.
fn remove_stale_socket(p: &Path) -> Result<(), AdminFailure> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(p) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(fail(
            AdminErrorCode::Conflict,
            format!("{} exists and is not a socket", p.display()),
        ));
    }
    if UnixStream::connect(p).is_ok() {
        return Err(fail(
            AdminErrorCode::Conflict,
            format!("{} is in use by another process", p.display()),
        ));
    }
    std::fs::remove_file(p).map_err(|e| {
        fail(
            AdminErrorCode::Port,
            format!("removing stale {}: {e}", p.display()),
        )
    })
}
