//! The steps of an attach: checks, the registry reads, the data-path port, the bookkeeping.

use super::*;
use crate::control::metadata::RegistrySource;
use vnp_protocol::token::VmSecret;
use vnp_registry_client::{Network, VmRecord};

impl Manager {
    /// Refuses a bad or conflicting attach; `Some` when exactly this attachment exists already
    /// (attach is idempotent).
    pub(super) fn check_attach(
        &self,
        vm_id: &str,
        socket_path: &Path,
        queue_pairs: u16,
    ) -> Result<Option<AttachmentInfo>, AdminFailure> {
        check_socket_path(socket_path)?;
        if !(1..=MAX_QUEUE_PAIRS).contains(&queue_pairs) {
            return Err(fail(
                AdminErrorCode::BadRequest,
                format!("queue_pairs {queue_pairs} is outside 1..={MAX_QUEUE_PAIRS}"),
            ));
        }
        if let Some(a) = self.attached.get(vm_id) {
            if a.info.socket_path == socket_path && a.info.queue_pairs == queue_pairs {
                return Ok(Some(a.info.clone()));
            }
            return Err(fail(
                AdminErrorCode::Conflict,
                format!(
                    "vm {vm_id} is already attached on {} with {} queue pair(s); detach it first",
                    a.info.socket_path.display(),
                    a.info.queue_pairs
                ),
            ));
        }
        if let Some(other) = self
            .attached
            .values()
            .find(|a| a.info.socket_path == socket_path)
        {
            return Err(fail(
                AdminErrorCode::Conflict,
                format!(
                    "socket {} is used by vm {}",
                    socket_path.display(),
                    other.info.vm_id
                ),
            ));
        }
        Ok(None)
    }

    /// The VM's record, network and secret from the registry. The VM must be assigned here or,
    /// for an `incoming` attach, be migrating here (`vnpctl vm migrate`): then its port is the
    /// one the registry reserved for the migration.
    pub(super) fn read_vm_for_attach(
        &self,
        vm_id: &str,
        incoming: bool,
    ) -> Result<VmFromRegistry, AdminFailure> {
        let record = self
            .client
            .get_vm(vm_id)
            .map_err(|e| registry_failure(&format!("reading vm {vm_id}"), &e))?;
        let udp_port = self.port_for_attach(&record, incoming)?;
        let network = self
            .client
            .get_network(&record.network)
            .map_err(|e| registry_failure(&format!("reading network {}", record.network), &e))?;
        let (secret, _generation) = self
            .client
            .get_vm_secret(vm_id)
            .map_err(|e| registry_failure(&format!("reading the secret of vm {vm_id}"), &e))?;
        Ok(VmFromRegistry {
            record,
            network,
            secret,
            udp_port,
        })
    }

    /// This host's UDP port for `record`, or why the VM cannot be attached here.
    fn port_for_attach(&self, record: &VmRecord, incoming: bool) -> Result<u16, AdminFailure> {
        let vm_id = &record.id;
        if let Some(arrival) = record.incoming.as_ref().filter(|i| i.host == self.host_id) {
            if incoming {
                return Ok(arrival.host_port);
            }
            return Err(fail(
                AdminErrorCode::Conflict,
                format!("vm {vm_id} is migrating to this host: attach it with --incoming"),
            ));
        }
        match record.host.as_deref() {
            Some(h) if h == self.host_id => record.host_port.ok_or_else(|| {
                fail(
                    AdminErrorCode::Registry,
                    format!("vm {vm_id} has no UDP port on this host in the registry"),
                )
            }),
            Some(h) => Err(fail(
                AdminErrorCode::Conflict,
                format!(
                    "vm {vm_id} is assigned to host {h}, not to this host ({}){}",
                    self.host_id,
                    if incoming {
                        "; announce the migration first: vnpctl vm migrate VM --host THIS-HOST"
                    } else {
                        ""
                    }
                ),
            )),
            None => Err(fail(
                AdminErrorCode::Conflict,
                format!(
                    "vm {vm_id} is not assigned to any host; assign it to {} first",
                    self.host_id
                ),
            )),
        }
    }

    /// What the admin API reports, and what the data path needs, for one attachment.
    pub(super) fn attachment(
        &self,
        vm_id: &str,
        vm: VmFromRegistry,
        socket_path: PathBuf,
        queue_pairs: u16,
    ) -> (AttachmentInfo, VmAttachment) {
        let VmFromRegistry {
            record,
            network,
            secret,
            udp_port,
        } = vm;
        let guest_mtu = self.cfg.guest_mtu().min(network.mtu);
        let info = AttachmentInfo {
            vm_id: vm_id.to_string(),
            network: record.network.clone(),
            network_id: record.vni,
            vm_ip: record.ip,
            prefix_len: network.cidr.prefix(),
            router_ip: network.router,
            mac: record.mac.to_string(),
            hostname: record.hostname.clone(),
            guest_mtu,
            host_addr: self.cfg.underlay_addr,
            udp_port,
            socket_path: socket_path.clone(),
            queue_pairs,
        };
        let att = VmAttachment {
            vm_id: vm_id.to_string(),
            network_vni: record.vni,
            vm_ip: record.ip,
            prefix_len: info.prefix_len,
            router_ip: info.router_ip,
            mac: record.mac.0,
            hostname: record.hostname,
            guest_mtu,
            secret,
            host_addr: self.cfg.underlay_addr,
            udp_port,
            socket_path,
            queue_pairs,
        };
        (info, att)
    }

    /// Starts the VM's port and hands it to the control thread.
    pub(super) fn start_port(
        &mut self,
        vm_id: &str,
        att: VmAttachment,
        resume: Option<&ResumeRegistration>,
        arrival: Option<&crate::migrate_state::Arrival>,
    ) -> Result<Arc<VmPort>, AdminFailure> {
        let control: Arc<dyn ControlPlane> = Arc::new(self.control.clone());
        let tuning = DataPathTuning {
            expiry: ExpiryPolicy {
                skew_secs: self.cfg.token_clock_skew_secs,
                max_ttl_secs: self.cfg.token_max_ttl_secs,
                allow_never: self.cfg.accept_never_expiring_tokens,
            },
            socket_access: self.cfg.vhost_user_socket,
            offloads: self.cfg.offloads,
            ..DataPathTuning::default()
        };
        let hook = crate::migrate_state::fetch::chain(
            resume.map(ResumeRegistration::hook),
            arrival.map(crate::migrate_state::Arrival::hook),
        );
        let secret = att.secret.clone();
        let port = VmPort::start_with_hook(att, control, tuning, hook).map_err(|e| {
            fail(
                AdminErrorCode::Port,
                format!("starting the port of vm {vm_id}: {e}"),
            )
        })?;
        let port = Arc::new(port);
        if let Some(a) = arrival {
            a.bind(&port);
        }
        if let Some(s) = &self.state_server {
            s.offer(vm_id, &secret, &port);
        }
        // A resume notice is acted on once this host registered the endpoint (generation).
        let registered = resume.and_then(|r| r.registered().then(|| r.generation()));
        self.notices.offer(vm_id, &secret, &port, registered);
        // The service bridge (metadata, DNS, credentials) for this VM, on the host's client.
        let source = Arc::new(RegistrySource(self.client.clone()));
        if let Err(e) = port.start_bridge(source, self.cfg.bridge.limits, &self.cfg.bridge) {
            log::warn!("vm {vm_id}: no metadata service: {e}");
        }
        match resume {
            Some(r) if !r.registered() => {
                let (control, id, weak) = (
                    self.control.clone(),
                    vm_id.to_string(),
                    Arc::downgrade(&port),
                );
                let (early, early_id, early_weak) = (control.clone(), id.clone(), weak.clone());
                let notices = self.notices.clone();
                r.on_resume(move || {
                    if let Some(port) = early_weak.upgrade() {
                        early.add_incoming_port(&early_id, port);
                    }
                });
                r.on_registered(move |generation| {
                    notices.registered(&id, generation);
                    if let Some(port) = weak.upgrade() {
                        control.add_port(&id, port);
                    }
                });
            }
            _ => self.control.add_port(vm_id, Arc::clone(&port)),
        }
        Ok(port)
    }

    /// Records a started attachment and persists it; a failed save undoes the attach.
    pub(super) fn keep_attachment(
        &mut self,
        vm_id: &str,
        info: &AttachmentInfo,
        port: Arc<VmPort>,
        resume: Option<ResumeRegistration>,
        persist: bool,
    ) -> Result<(), AdminFailure> {
        self.board.insert(vm_id, port.counters());
        if let Some(bridge) = port.bridge_counters() {
            self.board.insert_bridge(vm_id, bridge);
        }
        self.attached.insert(
            vm_id.to_string(),
            Attached {
                info: info.clone(),
                port,
                resume,
            },
        );
        self.unrestored.remove(vm_id);
        if persist {
            if let Err(e) = self.store.save(&self.persisted()) {
                if let Some(a) = self.attached.remove(vm_id) {
                    self.board.remove(vm_id);
                    self.stop_port(vm_id, a.port);
                }
                return Err(fail(AdminErrorCode::Persist, e.to_string()));
            }
        }
        Ok(())
    }
}

/// A VM's registry state that an attach needs.
pub(super) struct VmFromRegistry {
    record: VmRecord,
    network: Network,
    secret: VmSecret,
    udp_port: u16,
}

impl VmFromRegistry {
    /// For an incoming VM: where its state is fetched from on resume (the source's state
    /// listener, on the host its endpoint still names); `None` when it has no endpoint.
    pub(super) fn arrival(&self) -> Option<crate::migrate_state::Arrival> {
        let source = self.record.endpoint.as_ref()?;
        let addr = std::net::SocketAddr::from((source.host_addr, crate::migrate_state::STATE_PORT));
        Some(crate::migrate_state::Arrival::new(
            &self.record.id,
            &self.secret,
            addr,
        ))
    }

    /// For an incoming VM: the notice its resume sends to the source, naming the source's
    /// endpoint record as the registry has it now; `None` when it has no endpoint.
    pub(super) fn resume_notice(
        &self,
        host_addr: std::net::Ipv4Addr,
    ) -> Option<crate::control::resume_link::NoticeSender> {
        let source = self.record.endpoint.as_ref()?;
        Some(crate::control::resume_link::NoticeSender {
            vm_id: self.record.id.clone(),
            secret: self.secret.clone(),
            from: std::net::SocketAddrV4::new(source.host_addr, source.port),
            from_generation: source.generation,
            to: std::net::SocketAddrV4::new(host_addr, self.udp_port),
        })
    }

    /// The VM's NAT port blocks (the ports its flows to the outside leave from).
    pub(super) fn nat_blocks(&self) -> Vec<crate::nat::PortBlock> {
        crate::control::nat_blocks(&self.record.nat_ports)
    }
}

/// Removes a stale socket file and creates the socket's directory.
pub(super) fn prepare_socket_dir(socket_path: &Path) -> Result<(), AdminFailure> {
    remove_stale_socket(socket_path)?;
    if let Some(dir) = socket_path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| {
            fail(
                AdminErrorCode::Port,
                format!("creating {}: {e}", dir.display()),
            )
        })?;
    }
    Ok(())
}
