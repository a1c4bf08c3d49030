//! The source side of the hand-off: one TCP listener per vnpd on its underlay address. A
//! request names a VM served here and carries a MAC made with that VM's secret; the answer is
//! the VM's state, read from its port (nothing changes), with a MAC over the request's nonce.
//! One exchange at a time, each bounded by [`IO_TIMEOUT`] and by the request's fixed size.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use vnp_protocol::token::VmSecret;

use super::wire::{self, DecodeError};
use super::{bump, COUNTERS, IO_TIMEOUT};
use crate::datapath::VmPort;

/// Status byte of an answer: the state follows.
pub const STATUS_OK: u8 = 0;
/// Status byte of an answer: refused (nothing follows; the reason is only logged here, so an
/// unauthenticated caller learns nothing).
pub const STATUS_REFUSED: u8 = 1;

/// Reads a VM's state; `None` once its port is gone.
pub type Exporter = Box<dyn Fn() -> Option<wire::VmState> + Send + Sync>;

struct Offered {
    secret: VmSecret,
    export: Arc<Exporter>,
}

type Offers = Arc<Mutex<HashMap<String, Offered>>>;

/// The running listener; stopped on drop.
pub struct StateServer {
    offers: Offers,
    stop: Arc<AtomicBool>,
    addr: SocketAddr,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for StateServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl StateServer {
    /// Listens on `addr` (the host's underlay address, [`super::STATE_PORT`]).
    pub fn start(addr: SocketAddr) -> std::io::Result<StateServer> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let offers: Offers = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (offers, stop) = (offers.clone(), stop.clone());
            std::thread::Builder::new()
                .name("vnpd-migstate".into())
                .spawn(move || accept_loop(&listener, &offers, &stop))?
        };
        Ok(StateServer {
            offers,
            stop,
            addr,
            thread: Some(thread),
        })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves the state of `vm_id` (attached here with `secret`) from now on.
    pub fn offer(&self, vm_id: &str, secret: &VmSecret, port: &Arc<VmPort>) {
        let port: Weak<VmPort> = Arc::downgrade(port);
        self.offer_with(
            vm_id,
            secret,
            Box::new(move || port.upgrade().map(|p| p.export_state())),
        );
    }

    /// Serves what `export` reads as the state of `vm_id`.
    pub fn offer_with(&self, vm_id: &str, secret: &VmSecret, export: Exporter) {
        let mut offers = self.offers.lock().unwrap_or_else(|e| e.into_inner());
        offers.insert(
            vm_id.to_string(),
            Offered {
                secret: secret.clone(),
                export: Arc::new(export),
            },
        );
    }

    /// Stops serving `vm_id` (detached).
    pub fn withdraw(&self, vm_id: &str) {
        let mut offers = self.offers.lock().unwrap_or_else(|e| e.into_inner());
        offers.remove(vm_id);
    }
}

/// The listener on `underlay:`[`super::STATE_PORT`], or `None` (logged) when it cannot bind:
/// this vnpd then serves no migrating VM's state, and its destinations go on without it.
pub fn start_for(underlay: std::net::Ipv4Addr) -> Option<StateServer> {
    let addr = SocketAddr::from((underlay, super::STATE_PORT));
    match StateServer::start(addr) {
        Ok(s) => Some(s),
        Err(e) => {
            log::error!("migration state listener on {addr}: {e}; migrating VMs lose their NAT flows and sessions");
            None
        }
    }
}

impl Drop for StateServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept.
        drop(TcpStream::connect_timeout(&self.addr, IO_TIMEOUT));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, offers: &Offers, stop: &AtomicBool) {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(mut conn) = conn else { continue };
        let peer = conn.peer_addr().ok();
        if let Err(why) = serve_one(&mut conn, offers) {
            bump(&COUNTERS.refused, 1);
            log::warn!("migration state request from {peer:?} refused: {why}");
            let _ = conn.write_all(&[STATUS_REFUSED]);
        }
    }
}

/// Reads exactly one request: the fixed head, then the rest its VM id length implies.
fn read_request(conn: &mut TcpStream) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; 6];
    conn.read_exact(&mut buf)
        .map_err(|e| format!("reading: {e}"))?;
    let id_len = usize::from(buf[5]);
    if id_len == 0 || id_len > wire::MAX_VM_ID {
        return Err(DecodeError::VmId.to_string());
    }
    let rest = id_len + 8 + wire::NONCE_LEN + wire::MAC_LEN;
    buf.resize(6 + rest, 0);
    conn.read_exact(&mut buf[6..])
        .map_err(|e| format!("reading: {e}"))?;
    Ok(buf)
}

fn serve_one(conn: &mut TcpStream, offers: &Offers) -> Result<(), String> {
    conn.set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|()| conn.set_write_timeout(Some(IO_TIMEOUT)))
        .map_err(|e| e.to_string())?;
    let req = wire::decode_request(&read_request(conn)?).map_err(|e| e.to_string())?;
    let (secret, port) = {
        let offers = offers.lock().unwrap_or_else(|e| e.into_inner());
        let o = offers
            .get(&req.vm_id)
            .ok_or_else(|| format!("vm {} is not served here", req.vm_id))?;
        (o.secret.clone(), Arc::clone(&o.export))
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    req.verify(secret.as_bytes(), now)
        .map_err(|e| format!("vm {}: {e}", req.vm_id))?;
    let state = port().ok_or_else(|| format!("vm {}: port stopped", req.vm_id))?;
    let blob = wire::encode(&state);
    let mac = wire::response_mac(secret.as_bytes(), &req.nonce, &blob);
    let mut out = Vec::with_capacity(blob.len() + 37);
    out.push(STATUS_OK);
    out.extend_from_slice(&(blob.len() as u32).to_be_bytes());
    out.extend_from_slice(&blob);
    out.extend_from_slice(&mac);
    conn.write_all(&out)
        .map_err(|e| format!("vm {}: writing: {e}", req.vm_id))?;
    bump(&COUNTERS.exports, 1);
    log::info!(
        "vm {}: migration state sent ({} NAT flows, {} sessions, {} bytes)",
        req.vm_id,
        state.flows.len(),
        state.sessions.len(),
        blob.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate_state::fetch::{fetch, FetchError};
    use crate::migrate_state::wire::{SessionRecord, VmState};
    use std::net::Ipv4Addr;

    fn state(vm: &str) -> VmState {
        VmState {
            vm_id: vm.into(),
            flows: Vec::new(),
            sessions: vec![SessionRecord {
                digest: [3; 32],
                remaining_ms: 1000,
            }],
        }
    }

    #[test]
    fn only_the_vms_secret_gets_its_state_over_real_sockets() {
        let server = StateServer::start((Ipv4Addr::LOCALHOST, 0).into()).unwrap();
        let addr = server.local_addr();
        let secret = VmSecret::from_bytes([5; 32]);
        server.offer_with("vm-a", &secret, Box::new(|| Some(state("vm-a"))));
        // A server that answers with another VM's state under this VM's name.
        server.offer_with("vm-b", &secret, Box::new(|| Some(state("vm-a"))));
        assert_eq!(fetch(addr, "vm-a", &secret).unwrap(), state("vm-a"));
        let refused_before = COUNTERS.refused.load(Ordering::Relaxed);
        let wrong = VmSecret::from_bytes([6; 32]);
        assert!(matches!(
            fetch(addr, "vm-a", &wrong),
            Err(FetchError::Refused)
        ));
        assert!(matches!(
            fetch(addr, "vm-c", &secret),
            Err(FetchError::Refused)
        ));
        assert!(COUNTERS.refused.load(Ordering::Relaxed) >= refused_before + 2);
        assert!(matches!(
            fetch(addr, "vm-b", &secret),
            Err(FetchError::OtherVm(v)) if v == "vm-a"
        ));
        // Garbage and a client that hangs up get nothing; the server goes on.
        let mut junk = TcpStream::connect(addr).unwrap();
        junk.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        let mut answer = Vec::new();
        let _ = junk.read_to_end(&mut answer);
        assert_eq!(answer, [STATUS_REFUSED]);
        drop(TcpStream::connect(addr).unwrap());
        server.withdraw("vm-a");
        assert!(matches!(
            fetch(addr, "vm-a", &secret),
            Err(FetchError::Refused)
        ));
        drop(server);
        assert!(matches!(
            fetch(addr, "vm-a", &secret),
            Err(FetchError::Io(_))
        ));
    }
}
