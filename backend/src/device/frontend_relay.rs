//! A message relay between a vhost-user frontend (QEMU) and vnpd's `VhostUserDaemon`.
//!
//! The crate behaviour it works around, exactly: in `vhost` 0.18,
//! `src/vhost_user/backend_req_handler.rs`, `BackendReqHandler::handle_request` answers
//! `FrontendReq::SET_VRING_ENABLE` with `self.check_feature(VhostUserVirtioFeatures::
//! PROTOCOL_FEATURES)?`, which looks at `acked_virtio_features`, and that field is written only
//! by `SET_FEATURES`. Before `SET_FEATURES` the message is refused with
//! `Error::InactiveFeature(PROTOCOL_FEATURES)`, and `vhost-user-backend` 0.24's
//! `VhostUserDaemon` (its request loop in `start_daemon`) ends the connection on that error.
//! The test `backend/tests/frontend_replay_crate_pin.rs` pins this: the day it fails, the crate
//! takes early enables and this relay can be deleted.
//!
//! Why that matters: QEMU's virtio-net enables and disables the rings of each queue pair
//! (`peer_attach`/`peer_detach`, when the guest driver writes its features) with
//! `SET_VRING_ENABLE` as soon as the backend *offers* `VHOST_USER_F_PROTOCOL_FEATURES`, which is
//! before QEMU sends `SET_FEATURES` (that comes with `vhost_net_start` at DRIVER_OK). The
//! vhost-user spec allows it; without the relay a QEMU guest never gets a working network.
//!
//! The relay passes every message and its file descriptors through unchanged, except those early
//! `SET_VRING_ENABLE`s, which it holds back (answering them itself when the frontend asked for a
//! reply) and replays, last state per ring, right after the `SET_FEATURES` that acks
//! `PROTOCOL_FEATURES`. Nothing is lost: on a migration destination those early enables are the
//! only ones QEMU sends. Frontends that send nothing early (DPDK's virtio-user, cloud-hypervisor)
//! see no difference. Only the control channel goes through the relay: the data path lives in
//! shared memory and eventfds, which pass through as descriptors. Every message is logged at
//! debug level (`RUST_LOG=vnpd::device::frontend_relay=debug`), which is how the frontends'
//! conversations in `docs/frontends.md` were captured.
//!
//! Its two ends: `vhost-user-backend` 0.24 starts a daemon only from a `Listener` or by
//! connecting to a path (`VhostUserDaemon::start_client`), so a connected socketpair cannot be
//! handed to it. The relay listens in a fresh 0700 directory of its own, lets the daemon
//! connect, unlinks the socket at once and accepts only a peer whose `SO_PEERCRED` is this
//! process; no name in the abstract namespace (which any local user can list, pre-bind or race).
//!
//! The message framing uses the `vhost` crate's request codes (`FrontendReq`), header flags,
//! payload types and size limits; its header struct is private to the crate in 0.18, so the
//! three-word header is declared here with the same layout.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vhost::vhost_user::message::{
    FrontendReq, VhostUserHeaderFlag, VhostUserU64, VhostUserVringState, MAX_ATTACHED_FD_ENTRIES,
    MAX_MSG_SIZE,
};
use vhost::vhost_user::VhostUserVirtioFeatures;
use vm_memory::ByteValued;

use super::backend::VringErrors;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// The vhost-user message header: request code, flags, payload size (native byte order, which
/// the spec fixes as little-endian on every host vnpd runs on).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MessageHeader {
    /// Request code (`FrontendReq` for both requests and their replies).
    pub request: u32,
    /// Version (bits 0-1), `REPLY`, `NEED_REPLY`.
    pub flags: u32,
    /// Payload size in bytes.
    pub size: u32,
}

// SAFETY: three u32 fields with no padding; every bit pattern is a valid value.
unsafe impl ByteValued for MessageHeader {}

/// Size of a [`MessageHeader`] on the wire.
pub const HEADER_LEN: usize = std::mem::size_of::<MessageHeader>();

/// Protocol version 1, the only one there is.
const VERSION_1: u32 = 0x1;

impl MessageHeader {
    /// A version-1 request header.
    pub fn request(request: FrontendReq, flags: VhostUserHeaderFlag, size: usize) -> Self {
        Self {
            request: request.into(),
            flags: VERSION_1 | flags.bits(),
            size: size as u32,
        }
    }

    /// The request code, if it is one the `vhost` crate knows.
    pub fn code(&self) -> Option<FrontendReq> {
        FrontendReq::try_from(self.request).ok()
    }

    /// Whether the sender asked for a `REPLY_ACK` answer.
    pub fn needs_reply(&self) -> bool {
        self.flags & VhostUserHeaderFlag::NEED_REPLY.bits() != 0
    }
}

/// A whole message with an 8-byte payload (a ring state or an ack), as sent on the wire.
pub type SmallMessage = [u8; HEADER_LEN + 8];

/// What to do with one frontend message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Pass it to the backend unchanged.
    Forward,
    /// Pass it to the backend, then send it these held-back messages.
    ForwardThenReplay(Vec<SmallMessage>),
    /// Hold it back; send `reply` (if any) to the frontend.
    Absorb {
        /// The `REPLY_ACK` answer the frontend asked for, if it did.
        reply: Option<SmallMessage>,
    },
}

/// The relay's decision logic, kept free of I/O so that it can be tested message by message.
#[derive(Debug, Default, Clone)]
pub struct EarlyEnableFilter {
    protocol_features_acked: bool,
    absorbed: u64,
    /// Ring index -> last enable state asked for while the backend could not take it.
    held: BTreeMap<u32, u32>,
}

impl EarlyEnableFilter {
    /// Judges a message from the frontend, given its header and payload.
    pub fn on_frontend_message(&mut self, header: &MessageHeader, payload: &[u8]) -> Verdict {
        match header.code() {
            Some(FrontendReq::SET_FEATURES) => self.on_set_features(payload),
            Some(FrontendReq::SET_VRING_ENABLE) if !self.protocol_features_acked => {
                self.absorbed += 1;
                if let Some(state) = read_payload::<VhostUserVringState>(payload) {
                    self.held.insert(state.index, state.num);
                }
                let reply = header
                    .needs_reply()
                    .then(|| ack(FrontendReq::SET_VRING_ENABLE));
                Verdict::Absorb { reply }
            }
            _ => Verdict::Forward,
        }
    }

    fn on_set_features(&mut self, payload: &[u8]) -> Verdict {
        // A truncated SET_FEATURES changes nothing here; the backend refuses it.
        if let Some(features) = read_payload::<VhostUserU64>(payload) {
            self.protocol_features_acked =
                features.value & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        }
        if !self.protocol_features_acked || self.held.is_empty() {
            return Verdict::Forward;
        }
        let replay = std::mem::take(&mut self.held)
            .into_iter()
            .map(|(index, state)| {
                small_message(
                    MessageHeader::request(
                        FrontendReq::SET_VRING_ENABLE,
                        VhostUserHeaderFlag::empty(),
                        8,
                    ),
                    VhostUserVringState::new(index, state).as_slice(),
                )
            })
            .collect();
        Verdict::ForwardThenReplay(replay)
    }

    /// How many messages were absorbed so far.
    pub fn absorbed(&self) -> u64 {
        self.absorbed
    }
}

/// Reads a payload of exactly `T`'s size; `None` for any other length.
fn read_payload<T: ByteValued>(payload: &[u8]) -> Option<T> {
    let mut value = T::zeroed();
    let bytes = value.as_mut_slice();
    if payload.len() != bytes.len() {
        return None;
    }
    bytes.copy_from_slice(payload);
    Some(value)
}

/// A `REPLY_ACK` reply saying "success" for `request`.
fn ack(request: FrontendReq) -> SmallMessage {
    let header = MessageHeader::request(request, VhostUserHeaderFlag::REPLY, 8);
    small_message(header, VhostUserU64::new(0).as_slice())
}

fn small_message(header: MessageHeader, payload: &[u8]) -> SmallMessage {
    let mut out = [0u8; HEADER_LEN + 8];
    out[..HEADER_LEN].copy_from_slice(header.as_slice());
    out[HEADER_LEN..].copy_from_slice(payload);
    out
}

/// One vhost-user message with the descriptors that came with it.
#[derive(Debug)]
pub struct Message {
    /// Its header.
    pub header: MessageHeader,
    /// Its payload, `header.size` bytes.
    pub payload: Vec<u8>,
    /// Descriptors that came with its first bytes.
    pub fds: Vec<OwnedFd>,
}

/// Reads one message; `Ok(None)` at a clean end of stream. A payload larger than the `vhost`
/// crate's `MAX_MSG_SIZE` is an error (a broken or hostile frontend), never an allocation.
pub fn read_message(stream: &UnixStream) -> io::Result<Option<Message>> {
    let mut header = MessageHeader::default();
    let mut raw_fds = [-1 as RawFd; MAX_ATTACHED_FD_ENTRIES];
    let bytes = header.as_mut_slice();
    let mut iov = [libc::iovec {
        iov_base: bytes.as_mut_ptr().cast(),
        iov_len: HEADER_LEN,
    }];
    // SAFETY: the iovec points at `header`, which outlives the call and is HEADER_LEN bytes
    // long; `raw_fds` has room for MAX_ATTACHED_FD_ENTRIES descriptors, the most it writes.
    let received = unsafe { stream.recv_with_fds(&mut iov, &mut raw_fds) };
    let (got, nfds) = received.map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    let fds = raw_fds[..nfds.min(MAX_ATTACHED_FD_ENTRIES)]
        .iter()
        .map(|&fd| {
            // SAFETY: the kernel just installed these descriptors for us in SCM_RIGHTS; nothing
            // else owns them, so the OwnedFd becomes their only owner and closes them.
            unsafe { OwnedFd::from_raw_fd(fd) }
        })
        .collect::<Vec<_>>();
    if got == 0 {
        return Ok(None);
    }
    let mut reader = stream;
    reader.read_exact(&mut header.as_mut_slice()[got..])?;
    let size = header.size as usize;
    if size > MAX_MSG_SIZE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("vhost-user message payload of {size} bytes exceeds {MAX_MSG_SIZE}"),
        ));
    }
    let mut payload = vec![0u8; size];
    reader.read_exact(&mut payload)?;
    Ok(Some(Message {
        header,
        payload,
        fds,
    }))
}

/// Writes one message (`bytes` = header, or header and payload), its descriptors travelling
/// with the first bytes.
pub fn write_message(
    stream: &UnixStream,
    bytes: &[u8],
    payload: &[u8],
    fds: &[OwnedFd],
) -> io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let sent = if raw.is_empty() {
        0
    } else {
        stream
            .send_with_fds(&[bytes], &raw)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?
    };
    let mut writer = stream;
    writer.write_all(&bytes[sent..])?;
    writer.write_all(payload)
}

/// One line of the debug log for a message: what a frontend's conversation looks like.
fn describe(direction: &str, msg: &Message) -> String {
    let name = match msg.header.code() {
        Some(code) => format!("{code:?}"),
        None => format!("request {}", msg.header.request),
    };
    let value = match msg.payload.len() {
        8 => format!(
            " value={:#x}",
            read_payload::<VhostUserU64>(&msg.payload).map_or(0, |v| v.value)
        ),
        _ => String::new(),
    };
    format!(
        "{direction} {name} flags={:#x} size={} fds={}{value}",
        msg.header.flags,
        msg.header.size,
        msg.fds.len()
    )
}

static RELAY_SEQ: AtomicU64 = AtomicU64::new(0);

/// A directory only this user can enter, for the relay's one-connection socket.
struct PrivateSocketDir {
    dir: PathBuf,
    socket: PathBuf,
}

impl PrivateSocketDir {
    /// Creates a fresh 0700 directory under the temp dir. `mkdir` fails on an existing name,
    /// so a directory someone else prepared is never used; the sticky temp dir keeps others
    /// from renaming or removing ours.
    fn create(label: &str) -> io::Result<Self> {
        let label: String = label
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        // A random part, so that nobody can take the name first and make the relay fail.
        let mut random = [0u8; 8];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut random)?;
        let dir = std::env::temp_dir().join(format!(
            "vnpd-relay-{}-{}-{:016x}-{label}",
            std::process::id(),
            RELAY_SEQ.fetch_add(1, Ordering::Relaxed),
            u64::from_ne_bytes(random)
        ));
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        let socket = dir.join("backend.sock");
        Ok(Self { dir, socket })
    }

    fn socket(&self) -> &Path {
        &self.socket
    }

    /// Removes the socket's name (an accepted or queued connection does not need it).
    fn remove(&self) {
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

impl Drop for PrivateSocketDir {
    fn drop(&mut self) {
        self.remove();
    }
}

/// The process id on the other end of a unix socket (`SO_PEERCRED`).
fn peer_pid(stream: &UnixStream) -> io::Result<libc::pid_t> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes and `len` holds the size of `cred`, as
    // SO_PEERCRED expects; the fd is a live socket borrowed from `stream`.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.pid)
}

/// Accepts the connection this process made to `listener`, dropping any other. The caller's
/// connect has already completed, so its connection is queued: no waiting.
fn accept_own_connection(listener: &UnixListener) -> io::Result<UnixStream> {
    listener.set_nonblocking(true)?;
    let own = std::process::id() as libc::pid_t;
    loop {
        let (stream, _) = listener.accept()?;
        let pid = peer_pid(&stream)?;
        if pid == own {
            stream.set_nonblocking(false)?;
            return Ok(stream);
        }
        log::warn!("frontend relay: refused a connection from pid {pid} on its private socket");
    }
}

/// A running relay for one frontend connection.
#[derive(Debug)]
pub struct FrontendRelay {
    threads: Vec<JoinHandle<()>>,
}

impl FrontendRelay {
    /// Starts relaying `frontend` to a backend that `connect_backend` connects to the given
    /// socket path (vnpd passes `|path| daemon.start_client(path)`).
    pub fn start<E: Display>(
        frontend: UnixStream,
        label: &str,
        connect_backend: impl FnOnce(&str) -> Result<(), E>,
    ) -> io::Result<Self> {
        Self::start_with_errors(frontend, label, Arc::default(), connect_backend)
    }

    /// As [`FrontendRelay::start`], and puts a copy of each error eventfd the frontend gives
    /// (`SET_VRING_ERR`) in `errors`, for the device to tell the frontend when a ring breaks.
    pub fn start_with_errors<E: Display>(
        frontend: UnixStream,
        label: &str,
        errors: Arc<VringErrors>,
        connect_backend: impl FnOnce(&str) -> Result<(), E>,
    ) -> io::Result<Self> {
        let private = PrivateSocketDir::create(label)?;
        let listener = UnixListener::bind(private.socket())?;
        let path = private
            .socket()
            .to_str()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "temp dir is not UTF-8"))?;
        connect_backend(path).map_err(|e| io::Error::other(format!("backend connect: {e}")))?;
        private.remove();
        let backend = accept_own_connection(&listener)?;
        drop(listener);
        Self::spawn_pumps(frontend, backend, label, errors)
    }

    fn spawn_pumps(
        frontend: UnixStream,
        backend: UnixStream,
        label: &str,
        errors: Arc<VringErrors>,
    ) -> io::Result<Self> {
        let frontend_writer = Arc::new(Mutex::new(frontend.try_clone()?));
        let backend_reader = backend.try_clone()?;
        let to_backend = {
            let frontend_writer = frontend_writer.clone();
            let label = label.to_owned();
            std::thread::Builder::new()
                .name(format!("relay-in-{label}"))
                .spawn(move || {
                    let mut filter = EarlyEnableFilter::default();
                    let pumped = pump_from_frontend(
                        &frontend,
                        &backend,
                        &frontend_writer,
                        &mut filter,
                        (&label, &errors),
                    );
                    if let Err(e) = pumped {
                        log::debug!("vm {label}: frontend relay ended: {e}");
                    }
                    if filter.absorbed() > 0 {
                        log::debug!(
                            "vm {label}: absorbed {} early SET_VRING_ENABLE",
                            filter.absorbed()
                        );
                    }
                    let _ = frontend.shutdown(std::net::Shutdown::Both);
                    let _ = backend.shutdown(std::net::Shutdown::Both);
                })?
        };
        let label = label.to_owned();
        let to_frontend = std::thread::Builder::new()
            .name(format!("relay-out-{label}"))
            .spawn(move || {
                while let Ok(Some(msg)) = read_message(&backend_reader) {
                    log::debug!("vm {label}: {}", describe("backend ->", &msg));
                    let frontend = frontend_writer.lock().unwrap_or_else(|e| e.into_inner());
                    let header = msg.header.as_slice();
                    if write_message(&frontend, header, &msg.payload, &msg.fds).is_err() {
                        break;
                    }
                }
                let frontend = frontend_writer.lock().unwrap_or_else(|e| e.into_inner());
                let _ = frontend.shutdown(std::net::Shutdown::Both);
                let _ = backend_reader.shutdown(std::net::Shutdown::Both);
            })?;
        Ok(Self {
            threads: vec![to_backend, to_frontend],
        })
    }

    /// Waits for both directions to finish (after either side hung up).
    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn pump_from_frontend(
    frontend: &UnixStream,
    backend: &UnixStream,
    frontend_writer: &Mutex<UnixStream>,
    filter: &mut EarlyEnableFilter,
    (label, errors): (&str, &VringErrors),
) -> io::Result<()> {
    while let Some(msg) = read_message(frontend)? {
        log::debug!("vm {label}: {}", describe("frontend ->", &msg));
        if msg.header.code() == Some(FrontendReq::SET_VRING_ERR) {
            keep_error_fd(&msg, errors);
        }
        let header = msg.header.as_slice();
        match filter.on_frontend_message(&msg.header, &msg.payload) {
            Verdict::Forward => write_message(backend, header, &msg.payload, &msg.fds)?,
            Verdict::ForwardThenReplay(held) => {
                write_message(backend, header, &msg.payload, &msg.fds)?;
                for replayed in held {
                    log::debug!("vm {label}: relay -> backend: held SET_VRING_ENABLE {replayed:?}");
                    write_message(backend, &replayed, &[], &[])?;
                }
            }
            Verdict::Absorb { reply } => {
                log::debug!("vm {label}: held back (before SET_FEATURES)");
                if let Some(reply) = reply {
                    let w = frontend_writer.lock().unwrap_or_else(|e| e.into_inner());
                    write_message(&w, &reply, &[], &[])?;
                }
            }
        }
    }
    Ok(())
}

/// `SET_VRING_ERR` payload bit saying the message carries no descriptor (the ring's error
/// eventfd is taken away).
const VRING_NOFD: u64 = 0x100;

/// Keeps a copy of the error eventfd a `SET_VRING_ERR` carries (the message itself goes on to
/// the backend unchanged).
fn keep_error_fd(msg: &Message, errors: &VringErrors) {
    let Some(value) = read_payload::<VhostUserU64>(&msg.payload).map(|v| v.value) else {
        return;
    };
    let index = (value & 0xff) as u8;
    let fd = match msg.fds.first() {
        Some(fd) if value & VRING_NOFD == 0 => fd.try_clone().ok().map(std::fs::File::from),
        _ => None,
    };
    errors.set(index, fd);
}

#[cfg(test)]
mod tests;
