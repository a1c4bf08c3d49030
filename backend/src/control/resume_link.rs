//! The sockets of the resume notice ([`super::resume_notice`]): the source's listener, one UDP
//! socket per vnpd on its underlay address (port [`NOTICE_PORT`], the number of the state
//! hand-off's TCP listener), and the destination's one datagram at the resume.

use std::collections::HashMap;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use vnp_protocol::token::VmSecret;

use super::resume_notice::{self, Refusal, ResumeNotice, Served, COUNTERS};
use crate::datapath::VmPort;

/// UDP port of the notice listener (the state hand-off uses TCP on the same number).
pub const NOTICE_PORT: u16 = crate::migrate_state::STATE_PORT;
/// How often the listener looks at its stop flag.
const POLL: Duration = Duration::from_millis(200);

struct Entry {
    secret: VmSecret,
    served: Served,
    port: Weak<VmPort>,
}

/// The VMs a listener acts for; cloneable, shared with the attach path.
#[derive(Clone, Default)]
pub struct NoticeBoard(Arc<Mutex<HashMap<String, Entry>>>);

impl std::fmt::Debug for NoticeBoard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NoticeBoard")
    }
}

impl NoticeBoard {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Acts on notices for `vm_id` (served here at `port` with `secret`) from now on;
    /// `generation` is its endpoint record's once this host registered it.
    pub fn offer(
        &self,
        vm_id: &str,
        secret: &VmSecret,
        port: &Arc<VmPort>,
        generation: Option<u64>,
    ) {
        let entry = Entry {
            secret: secret.clone(),
            served: Served {
                local: port.udp_addr(),
                generation,
            },
            port: Arc::downgrade(port),
        };
        self.lock().insert(vm_id.to_string(), entry);
    }

    /// This host registered `vm_id`'s endpoint with `generation`.
    pub fn registered(&self, vm_id: &str, generation: u64) {
        if let Some(e) = self.lock().get_mut(vm_id) {
            e.served.generation = Some(generation);
        }
    }

    /// No more notices for `vm_id` (detached).
    pub fn withdraw(&self, vm_id: &str) {
        self.lock().remove(vm_id);
    }

    /// Checks one datagram; on success the port and where it now forwards to.
    fn act(&self, bytes: &[u8], now_unix_ms: u64) -> Result<(Arc<VmPort>, ResumeNotice), Refusal> {
        let received = resume_notice::decode(bytes)?;
        let (port, target) = {
            let board = self.lock();
            let e = board
                .get(&received.notice.vm_id)
                .ok_or(Refusal::UnknownVm)?;
            let target =
                resume_notice::judge(&received, e.secret.as_bytes(), e.served, now_unix_ms)?;
            (e.port.upgrade().ok_or(Refusal::UnknownVm)?, target)
        };
        port.start_hairpin(target);
        Ok((port, received.notice))
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The running listener; stopped (thread joined) on drop.
#[derive(Debug)]
pub struct NoticeListener {
    board: NoticeBoard,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl NoticeListener {
    /// Listens on `addr`.
    pub fn start(addr: SocketAddrV4) -> std::io::Result<NoticeListener> {
        let socket = UdpSocket::bind(addr)?;
        socket.set_read_timeout(Some(POLL))?;
        let board = NoticeBoard::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (board, stop) = (board.clone(), Arc::clone(&stop));
            std::thread::Builder::new()
                .name("vnpd-resume-notice".into())
                .spawn(move || listen(&socket, &board, &stop))?
        };
        Ok(NoticeListener {
            board,
            stop,
            thread: Some(thread),
        })
    }

    /// The VMs it acts for.
    pub fn board(&self) -> NoticeBoard {
        self.board.clone()
    }
}

impl Drop for NoticeListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The listener on `underlay:`[`NOTICE_PORT`], or `None` (logged) when it cannot bind: this
/// vnpd's migrating VMs are then hairpinned from the registry's watch alone, later.
pub fn start_for(underlay: Ipv4Addr) -> Option<NoticeListener> {
    let addr = SocketAddrV4::new(underlay, NOTICE_PORT);
    match NoticeListener::start(addr) {
        Ok(l) => Some(l),
        Err(e) => {
            log::error!("resume notice listener on udp {addr}: {e}; sources of migrations wait for the registry's watch");
            None
        }
    }
}

fn listen(socket: &UdpSocket, board: &NoticeBoard, stop: &AtomicBool) {
    let mut buf = [0u8; resume_notice::MAX_LEN + 1];
    while !stop.load(Ordering::Acquire) {
        let (n, from) = match socket.recv_from(&mut buf) {
            Ok(got) => got,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => {
                log::warn!("resume notice listener: {e}");
                std::thread::sleep(POLL);
                continue;
            }
        };
        match board.act(&buf[..n], unix_ms()) {
            Ok((port, notice)) => {
                COUNTERS.accepted();
                log::info!(
                    "vm {}: resume notice from {from}: it runs at {} now; forwarding stragglers",
                    notice.vm_id,
                    notice.to
                );
                drop(port);
            }
            Err(why) => {
                COUNTERS.refused(why);
                log::warn!("resume notice from {from} dropped: {why:?}");
            }
        }
    }
}

/// What the destination sends when the migrated VM resumes: the source endpoint and its
/// record's generation as the registry named them at the incoming attach, and the VM's new
/// endpoint here.
#[derive(Clone)]
pub struct NoticeSender {
    /// The VM.
    pub vm_id: String,
    /// Its secret (the MAC's key).
    pub secret: VmSecret,
    /// The source endpoint.
    pub from: SocketAddrV4,
    /// Its record's generation.
    pub from_generation: u64,
    /// The VM's endpoint here.
    pub to: SocketAddrV4,
}

impl std::fmt::Debug for NoticeSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NoticeSender")
            .field("vm_id", &self.vm_id)
            .field("from", &self.from)
            .field("to", &self.to)
            .finish_non_exhaustive()
    }
}

impl NoticeSender {
    /// Sends the notice to the source's listener, from this host's underlay address. A lost
    /// notice costs only time: the source then follows the registry's watch.
    pub fn send(&self) -> std::io::Result<()> {
        let mut nonce = [0u8; resume_notice::NONCE_LEN];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut nonce)?;
        let notice = ResumeNotice {
            vm_id: self.vm_id.clone(),
            from: self.from,
            from_generation: self.from_generation,
            to: self.to,
            unix_ms: unix_ms(),
            nonce,
        };
        let bytes = notice
            .encode(self.secret.as_bytes())
            .ok_or_else(|| std::io::Error::other("vm id outside 1..=64 bytes"))?;
        let socket = UdpSocket::bind(SocketAddrV4::new(*self.to.ip(), 0))?;
        socket.send_to(&bytes, SocketAddrV4::new(*self.from.ip(), NOTICE_PORT))?;
        COUNTERS.sent();
        Ok(())
    }
}
