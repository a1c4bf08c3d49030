//! The destination side of the hand-off: when the migrated device starts here (the start
//! hook, `SET_FEATURES` on resume), hold new NAT mappings and metadata requests back, ask the
//! source for the VM's state, take it, and let go; past [`IMPORT_WAIT`] let go without it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vnp_protocol::token::VmSecret;

use super::serve::STATUS_OK;
use super::wire::{self, VmState};
use super::{bump, COUNTERS, IMPORT_WAIT, IO_TIMEOUT};
use crate::datapath::VmPort;
use crate::device::DeviceStartHook;

/// Pause between attempts while the source does not answer.
const RETRY: Duration = Duration::from_millis(100);

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Connecting, writing or reading failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The source refused (it does not serve the VM, or did not accept our MAC).
    #[error("refused by the source")]
    Refused,
    /// The answer is larger than any state.
    #[error("answer of {0} bytes is larger than any state")]
    TooLarge(usize),
    /// The answer's MAC is not the VM's.
    #[error("answer not authenticated: {0}")]
    Auth(#[from] wire::AuthError),
    /// The blob does not decode.
    #[error("bad state: {0}")]
    Decode(#[from] wire::DecodeError),
    /// The state is another VM's.
    #[error("state of vm {0}, not ours")]
    OtherVm(String),
    /// No randomness for the nonce.
    #[error("no randomness: {0}")]
    Random(String),
}

/// Asks `source` for `vm_id`'s state, authenticated with the VM's `secret`.
pub fn fetch(source: SocketAddr, vm_id: &str, secret: &VmSecret) -> Result<VmState, FetchError> {
    let mut nonce = [0u8; wire::NONCE_LEN];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut nonce))
        .map_err(|e| FetchError::Random(e.to_string()))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let request = wire::encode_request(secret.as_bytes(), vm_id, now, &nonce)
        .ok_or(FetchError::Decode(wire::DecodeError::VmId))?;
    let mut conn = TcpStream::connect_timeout(&source, IO_TIMEOUT)?;
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    conn.set_nodelay(true)?;
    conn.write_all(&request)?;
    let mut status = [0u8; 1];
    conn.read_exact(&mut status)?;
    if status[0] != STATUS_OK {
        return Err(FetchError::Refused);
    }
    let mut len = [0u8; 4];
    conn.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > wire::MAX_BLOB {
        return Err(FetchError::TooLarge(len));
    }
    let mut blob = vec![0u8; len];
    conn.read_exact(&mut blob)?;
    let mut mac = [0u8; wire::MAC_LEN];
    conn.read_exact(&mut mac)?;
    wire::verify_response(secret.as_bytes(), &nonce, &blob, &mac)?;
    let state = wire::decode(&blob)?;
    if state.vm_id != vm_id {
        return Err(FetchError::OtherVm(state.vm_id));
    }
    Ok(state)
}

struct Inner {
    vm_id: String,
    secret: VmSecret,
    source: SocketAddr,
    port: OnceLock<Weak<VmPort>>,
    started: AtomicBool,
}

/// An incoming VM's state, to be fetched from its source when its device starts here.
#[derive(Clone)]
pub struct Arrival {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Arrival {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Arrival")
            .field("vm_id", &self.inner.vm_id)
            .field("source", &self.inner.source)
            .finish_non_exhaustive()
    }
}

impl Arrival {
    /// `vm_id`, whose source vnpd listens at `source`.
    pub fn new(vm_id: &str, secret: &VmSecret, source: SocketAddr) -> Self {
        Self {
            inner: Arc::new(Inner {
                vm_id: vm_id.to_string(),
                secret: secret.clone(),
                source,
                port: OnceLock::new(),
                started: AtomicBool::new(false),
            }),
        }
    }

    /// The port the state goes into (set once it exists; the device cannot start before).
    pub fn bind(&self, port: &Arc<VmPort>) {
        let _ = self.inner.port.set(Arc::downgrade(port));
    }

    /// The start hook: the first start holds the port back and fetches on a thread of its
    /// own (the hook runs on the vhost-user request thread: QEMU waits for nothing).
    pub fn hook(&self) -> DeviceStartHook {
        let inner = Arc::clone(&self.inner);
        Arc::new(move || {
            if inner.started.swap(true, Ordering::AcqRel) {
                return;
            }
            let Some(port) = inner.port.get().and_then(Weak::upgrade) else {
                return;
            };
            port.hold_for_state(IMPORT_WAIT);
            drop(port);
            let worker = Arc::clone(&inner);
            let spawned = std::thread::Builder::new()
                .name("vnpd-migstate-in".into())
                .spawn(move || arrive(&worker));
            if let Err(e) = spawned {
                log::error!("vm {}: cannot fetch its migration state: {e}", inner.vm_id);
                if let Some(p) = inner.port.get().and_then(Weak::upgrade) {
                    p.release_state_hold();
                }
            }
        })
    }
}

/// Fetches until it works or [`IMPORT_WAIT`] is over, then imports or lets go.
fn arrive(inner: &Inner) {
    let started = Instant::now();
    let deadline = started + IMPORT_WAIT;
    let state = loop {
        match fetch(inner.source, &inner.vm_id, &inner.secret) {
            Ok(s) => break Some(s),
            Err(e) => {
                log::warn!(
                    "vm {}: migration state from {}: {e}",
                    inner.vm_id,
                    inner.source
                );
                if matches!(e, FetchError::Io(_)) && Instant::now() + RETRY < deadline {
                    std::thread::sleep(RETRY);
                    continue;
                }
                break None;
            }
        }
    };
    let Some(port) = inner.port.get().and_then(Weak::upgrade) else {
        return;
    };
    let Some(state) = state else {
        bump(&COUNTERS.import_failures, 1);
        port.release_state_hold();
        log::warn!("vm {}: going on without its migration state", inner.vm_id);
        return;
    };
    let report = port.import_state(&state);
    bump(&COUNTERS.imports, 1);
    bump(&COUNTERS.flows_imported, report.imported as u64);
    bump(
        &COUNTERS.flows_skipped,
        (report.conflicts + report.outside_blocks) as u64,
    );
    bump(&COUNTERS.sessions_imported, state.sessions.len() as u64);
    log::info!(
        "vm {}: migration state taken in {} ms: {} NAT flows ({} conflicts, {} outside the \
         blocks), {} sessions",
        inner.vm_id,
        started.elapsed().as_millis(),
        report.imported,
        report.conflicts,
        report.outside_blocks,
        state.sessions.len()
    );
}

/// Both hooks, `first` first.
pub fn chain(
    first: Option<DeviceStartHook>,
    second: Option<DeviceStartHook>,
) -> Option<DeviceStartHook> {
    match (first, second) {
        (Some(a), Some(b)) => Some(Arc::new(move || {
            a();
            b();
        })),
        (a, b) => a.or(b),
    }
}
