//! Live migration, vnpd's part (the flow is in `docs/architecture.md`, "Live migration").
//!
//! - Destination: an attach with `incoming` starts the VM's port (socket, UDP port, secret)
//!   but leaves the endpoint where the registry has it, so peers keep sending to the source
//!   during the pre-copy. [`ResumeRegistration`] registers the endpoint when the migrated VM's
//!   device starts here: QEMU sends `VHOST_USER_SET_FEATURES` from `vhost_dev_start`, which on
//!   a migration destination runs only once the whole state has loaded and the VM resumes (see
//!   [`crate::device::DeviceStartHook`]). A cancelled or failed migration never starts the
//!   device here, so nothing is registered and the source keeps serving.
//! - Source: [`departure`] tells from the registry's record whether the endpoint still points
//!   at this host; the manager detaches a VM whose endpoint moved away after a grace period.

use crate::control::resume_link::NoticeSender;
use crate::device::DeviceStartHook;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use vnp_registry_client::{ClientError, ErrorCode, RegistryClient, VmRecord};

/// How long the source keeps a VM whose endpoint moved to another host: datagrams senders
/// sent before they learned the new endpoint still arrive meanwhile, and an operator flow that
/// detaches the source by hand right after the migration finds it still attached.
pub const DEPARTURE_GRACE: Duration = Duration::from_secs(30);

/// First pause between registration attempts while the registry cannot be reached.
const RETRY_FIRST: Duration = Duration::from_millis(50);
/// Longest pause between registration attempts.
const RETRY_MAX: Duration = Duration::from_secs(2);

struct Inner {
    client: RegistryClient,
    vm_id: String,
    host_addr: Ipv4Addr,
    port: u16,
    /// A registration thread is running.
    running: AtomicBool,
    /// The registry accepted the endpoint.
    registered: AtomicBool,
    /// ... with this generation.
    generation: AtomicU64,
    /// The VM was detached: stop trying.
    cancelled: AtomicBool,
    /// Runs once the registry took the endpoint (with its generation).
    on_registered: OnceLock<Box<dyn Fn(u64) + Send + Sync>>,
    /// Runs when the device starts here, before the registration goes out.
    on_resume: OnceLock<Box<dyn Fn() + Send + Sync>>,
    /// Tells the source at the resume (`crate::control::resume_notice`).
    notice: OnceLock<NoticeSender>,
}

/// Registers an incoming VM's endpoint when its device starts on this host.
#[derive(Clone)]
pub struct ResumeRegistration {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ResumeRegistration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResumeRegistration")
            .field("vm_id", &self.inner.vm_id)
            .field("registered", &self.registered())
            .finish()
    }
}

impl ResumeRegistration {
    /// Registration of `vm_id` at (`host_addr`, `port`), armed by [`Self::hook`].
    pub fn new(client: RegistryClient, vm_id: &str, host_addr: Ipv4Addr, port: u16) -> Self {
        Self {
            inner: Arc::new(Inner {
                client,
                vm_id: vm_id.to_string(),
                host_addr,
                port,
                running: AtomicBool::new(false),
                registered: AtomicBool::new(false),
                generation: AtomicU64::new(0),
                cancelled: AtomicBool::new(false),
                on_registered: OnceLock::new(),
                on_resume: OnceLock::new(),
                notice: OnceLock::new(),
            }),
        }
    }

    /// The hook for the VM's device. It runs on the vhost-user request thread, so the
    /// registry call goes to a thread of its own: QEMU waits for nothing.
    pub fn hook(&self) -> DeviceStartHook {
        let inner = Arc::clone(&self.inner);
        Arc::new(move || {
            if inner.registered.load(Ordering::Acquire)
                || inner.running.swap(true, Ordering::AcqRel)
            {
                return;
            }
            log::info!(
                "vm {}: device started on this host: registering its endpoint",
                inner.vm_id
            );
            // The source starts forwarding the VM's stragglers on this, without waiting for
            // the registration's commit and the registry's watch.
            if let Some(n) = inner.notice.get() {
                match n.send() {
                    Ok(()) => log::info!("vm {}: resume notice sent to {}", inner.vm_id, n.from),
                    Err(e) => log::warn!("vm {}: resume notice to {}: {e}", inner.vm_id, n.from),
                }
            }
            // Before the registration thread starts: its `on_registered` must come after.
            if let Some(f) = inner.on_resume.get() {
                f();
            }
            let worker = Arc::clone(&inner);
            let resumed = Instant::now();
            let spawned = std::thread::Builder::new()
                .name("vnpd-resume".into())
                .spawn(move || register_until_done(&worker, resumed));
            if let Err(e) = spawned {
                log::error!("vm {}: cannot start registration: {e}", inner.vm_id);
                inner.running.store(false, Ordering::Release);
            }
        })
    }

    /// Sets what runs once the registry took the endpoint (at once if it already did). The
    /// manager hands the port to the control thread only then: token requests before the
    /// move would be refused (this host is not the VM's host yet), and a refusal holds the
    /// pair back; the control thread keeps early requests and sends them when the port comes.
    pub fn on_registered(&self, f: impl Fn(u64) + Send + Sync + 'static) {
        if self.inner.on_registered.set(Box::new(f)).is_ok() && self.registered() {
            if let Some(f) = self.inner.on_registered.get() {
                f(self.inner.generation.load(Ordering::Acquire));
            }
        }
    }

    /// Sends `notice` to the source when the device starts here, before the registration.
    pub fn with_notice(self, notice: Option<NoticeSender>) -> Self {
        if let Some(n) = notice {
            let _ = self.inner.notice.set(n);
        }
        self
    }

    /// Sets what runs when the device starts here (the resume), while the registration goes
    /// out: the manager hands the port to the control thread then, so that the resumed VM's
    /// token requests run next to the registration instead of after it (the registry grants
    /// a migration's destination tokens from its incoming endpoint).
    pub fn on_resume(&self, f: impl Fn() + Send + Sync + 'static) {
        let _ = self.inner.on_resume.set(Box::new(f));
    }

    /// The registry took the endpoint: this host serves the VM now.
    pub fn registered(&self) -> bool {
        self.inner.registered.load(Ordering::Acquire)
    }

    /// The generation the registry gave the endpoint (meaningful once [`Self::registered`]).
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    /// The VM is detached: a running registration gives up at its next attempt.
    pub fn cancel(&self) {
        self.inner.cancelled.store(true, Ordering::Release);
    }
}

/// Registers with growing pauses while the registry is unreachable; a refusal ends the try
/// (the next device start tries again).
fn register_until_done(inner: &Inner, resumed: Instant) {
    let mut pause = RETRY_FIRST;
    while !inner.cancelled.load(Ordering::Acquire) {
        match inner
            .client
            .register_endpoint(&inner.vm_id, inner.host_addr, inner.port)
        {
            Ok(generation) => {
                inner.generation.store(generation, Ordering::Release);
                inner.registered.store(true, Ordering::Release);
                if let Some(f) = inner.on_registered.get() {
                    f(generation);
                }
                log::info!(
                    "vm {}: endpoint {}:{} registered {} ms after resume (generation {generation})",
                    inner.vm_id,
                    inner.host_addr,
                    inner.port,
                    resumed.elapsed().as_millis()
                );
                break;
            }
            Err(e @ ClientError::Api { .. }) => {
                log::error!("vm {}: registry refused the endpoint: {e}", inner.vm_id);
                break;
            }
            Err(e) => {
                log::warn!(
                    "vm {}: registering after resume: {e}; retrying",
                    inner.vm_id
                );
                std::thread::sleep(pause);
                pause = (pause * 2).min(RETRY_MAX);
            }
        }
    }
    inner.running.store(false, Ordering::Release);
}

/// Where the registry says a VM this host serves at (`host_addr`, `port`) is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whereabouts {
    /// The endpoint still points here.
    Here,
    /// The endpoint points elsewhere, or the VM is gone or no longer readable by this host.
    Moved,
    /// The registry did not answer: keep serving.
    Unknown,
}

/// Interprets the registry's answer to `GET /v1/vms/ID` for a VM served here. Pure.
pub fn departure(
    answer: &Result<VmRecord, ClientError>,
    host_addr: Ipv4Addr,
    port: u16,
) -> Whereabouts {
    match answer {
        Ok(rec) => match rec.endpoint {
            Some(ep) if ep.host_addr == host_addr && ep.port == port => Whereabouts::Here,
            // Not registered anywhere yet (an attach in progress): nothing moved.
            None if rec.host.is_some() => Whereabouts::Here,
            _ => Whereabouts::Moved,
        },
        Err(e) => match e.code() {
            Some(ErrorCode::NotOwner | ErrorCode::UnknownVm) => Whereabouts::Moved,
            _ => Whereabouts::Unknown,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::NetBackend;
    use std::sync::atomic::AtomicUsize;
    use vhost_user_backend::VhostUserBackend;
    use vnp_registry_client::{Endpoint, MacAddr, PortRange};

    fn record(endpoint: Option<(Ipv4Addr, u16)>) -> VmRecord {
        VmRecord {
            id: "vm-a".into(),
            network: "n".into(),
            vni: 7,
            ip: Ipv4Addr::new(10, 0, 0, 2),
            mac: MacAddr([2, 0, 0, 0, 0, 1]),
            hostname: "vm-a".into(),
            host: Some("h1".into()),
            host_port: Some(7000),
            nat_ports: vec![PortRange {
                first: 20000,
                last: 20063,
            }],
            service_account: "default".into(),
            tags: vec![],
            secret_generation: 1,
            endpoint: endpoint.map(|(host_addr, port)| Endpoint {
                host_addr,
                port,
                generation: 3,
            }),
            incoming: None,
        }
    }

    fn refusal(code: ErrorCode) -> ClientError {
        ClientError::Api {
            status: 403,
            code,
            message: "no".into(),
        }
    }

    #[test]
    fn endpoint_here_elsewhere_or_unknown() {
        let me = Ipv4Addr::new(198, 18, 0, 1);
        let other = Ipv4Addr::new(198, 18, 0, 2);
        assert_eq!(
            departure(&Ok(record(Some((me, 7000)))), me, 7000),
            Whereabouts::Here
        );
        assert_eq!(
            departure(&Ok(record(Some((other, 7000)))), me, 7000),
            Whereabouts::Moved
        );
        assert_eq!(
            departure(&Ok(record(Some((me, 7001)))), me, 7000),
            Whereabouts::Moved
        );
        assert_eq!(departure(&Ok(record(None)), me, 7000), Whereabouts::Here);
        assert_eq!(
            departure(&Err(refusal(ErrorCode::NotOwner)), me, 7000),
            Whereabouts::Moved
        );
        assert_eq!(
            departure(&Err(refusal(ErrorCode::UnknownVm)), me, 7000),
            Whereabouts::Moved
        );
        assert_eq!(
            departure(&Err(ClientError::Transport("down".into())), me, 7000),
            Whereabouts::Unknown
        );
        assert_eq!(
            departure(&Err(refusal(ErrorCode::Internal)), me, 7000),
            Whereabouts::Unknown
        );
    }

    #[test]
    fn the_device_calls_its_start_hook_on_set_features() {
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = Arc::clone(&calls);
        let device = NetBackend::idle().with_start_hook(Some(Arc::new(move || {
            seen.fetch_add(1, Ordering::SeqCst);
        })));
        assert_eq!(calls.load(Ordering::SeqCst), 0, "not before SET_FEATURES");
        device.acked_features(1 << 32);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
