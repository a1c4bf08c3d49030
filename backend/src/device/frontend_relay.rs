//! A message relay between a vhost-user frontend (QEMU) and vnpd's `VhostUserDaemon`.
//!
//! Why it exists: QEMU's virtio-net enables and disables the vhost-user rings of each queue pair
//! (`peer_attach`/`peer_detach`, called when the guest driver writes its features) with
//! `VHOST_USER_SET_VRING_ENABLE` as soon as the backend *offers* `VHOST_USER_F_PROTOCOL_FEATURES`,
//! which is before QEMU sends `VHOST_USER_SET_FEATURES` (that comes with `vhost_net_start` at
//! DRIVER_OK). The `vhost` crate refuses `SET_VRING_ENABLE` until `PROTOCOL_FEATURES` has been
//! *acked* (`InactiveFeature`), and `vhost-user-backend` then drops the whole connection, so a
//! QEMU guest never gets a working network.
//!
//! The relay passes every message and its file descriptors through unchanged, except those early
//! `SET_VRING_ENABLE`s, which it holds back (answering them itself when the frontend asked for a
//! reply) and replays, last state per ring, right after the `SET_FEATURES` that acks
//! `PROTOCOL_FEATURES`, which is when the backend can take them. Nothing is lost: on a migration
//! destination those early enables are the only ones QEMU sends. Frontends that send nothing
//! early (DPDK's virtio-user, cloud-hypervisor) see no difference. Only the control channel goes through the relay: the data path lives in shared
//! memory and eventfds, which pass through as descriptors.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vhost::vhost_user::Listener;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Size of a vhost-user message header: request, flags, payload size (all u32, little-endian).
pub const HEADER_LEN: usize = 12;
/// Largest payload the `vhost` crate accepts; anything larger is a broken frontend.
pub const MAX_PAYLOAD: usize = 0x1000;
/// Most descriptors one message carries (the `vhost` crate's limit).
const MAX_FDS: usize = 32;

const REQ_SET_FEATURES: u32 = 2;
const REQ_SET_VRING_ENABLE: u32 = 18;
const FLAG_VERSION_1: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
const F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// A whole vhost-user message with an 8-byte payload (a ring state or an ack).
pub type SmallMessage = [u8; HEADER_LEN + 8];

/// What to do with one frontend message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Pass it to the backend unchanged.
    Forward,
    /// Pass it to the backend, then send it these held-back messages.
    ForwardThenReplay(Vec<SmallMessage>),
    /// Hold it back; send `reply` (if any) to the frontend.
    Absorb { reply: Option<SmallMessage> },
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
    pub fn on_frontend_message(&mut self, header: &[u8; HEADER_LEN], payload: &[u8]) -> Verdict {
        let request = le_u32(&header[0..4]);
        let flags = le_u32(&header[4..8]);
        match request {
            REQ_SET_FEATURES => {
                if let Some(bytes) = payload.get(..8) {
                    let mut features = [0u8; 8];
                    features.copy_from_slice(bytes);
                    self.protocol_features_acked =
                        u64::from_le_bytes(features) & F_PROTOCOL_FEATURES != 0;
                }
                if self.protocol_features_acked && !self.held.is_empty() {
                    let replay = std::mem::take(&mut self.held)
                        .into_iter()
                        .map(|(index, state)| vring_enable(index, state))
                        .collect();
                    return Verdict::ForwardThenReplay(replay);
                }
                Verdict::Forward
            }
            REQ_SET_VRING_ENABLE if !self.protocol_features_acked => {
                self.absorbed += 1;
                if let Some(state) = payload.get(..8) {
                    self.held.insert(le_u32(&state[0..4]), le_u32(&state[4..8]));
                }
                let reply = (flags & FLAG_NEED_REPLY != 0).then(|| ack(REQ_SET_VRING_ENABLE));
                Verdict::Absorb { reply }
            }
            _ => Verdict::Forward,
        }
    }

    /// How many messages were absorbed so far.
    pub fn absorbed(&self) -> u64 {
        self.absorbed
    }
}

/// A `REPLY_ACK` reply saying "success" for `request`.
fn ack(request: u32) -> SmallMessage {
    small_message(request, FLAG_VERSION_1 | FLAG_REPLY, [0; 8])
}

/// A `SET_VRING_ENABLE` request for the backend, asking for no reply.
fn vring_enable(index: u32, state: u32) -> SmallMessage {
    let mut payload = [0u8; 8];
    payload[0..4].copy_from_slice(&index.to_le_bytes());
    payload[4..8].copy_from_slice(&state.to_le_bytes());
    small_message(REQ_SET_VRING_ENABLE, FLAG_VERSION_1, payload)
}

fn small_message(request: u32, flags: u32, payload: [u8; 8]) -> SmallMessage {
    let mut out = [0u8; HEADER_LEN + 8];
    out[0..4].copy_from_slice(&request.to_le_bytes());
    out[4..8].copy_from_slice(&flags.to_le_bytes());
    out[8..12].copy_from_slice(&8u32.to_le_bytes());
    out[12..].copy_from_slice(&payload);
    out
}

fn le_u32(bytes: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(bytes);
    u32::from_le_bytes(b)
}

/// One vhost-user message with the descriptors that came with it.
struct Message {
    header: [u8; HEADER_LEN],
    payload: Vec<u8>,
    fds: Vec<OwnedFd>,
}

/// Reads one message; `Ok(None)` at a clean end of stream.
fn read_message(stream: &UnixStream) -> io::Result<Option<Message>> {
    let mut header = [0u8; HEADER_LEN];
    let mut raw_fds = [-1 as RawFd; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: HEADER_LEN,
    }];
    // SAFETY: the iovec points at `header`, which outlives the call and is HEADER_LEN bytes
    // long; `raw_fds` has room for MAX_FDS descriptors, the most the call will write.
    let received = unsafe { stream.recv_with_fds(&mut iov, &mut raw_fds) };
    let (got, nfds) = received.map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    let fds = raw_fds[..nfds.min(MAX_FDS)]
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
    reader.read_exact(&mut header[got..])?;
    let size = le_u32(&header[8..12]) as usize;
    if size > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("vhost-user message payload of {size} bytes exceeds {MAX_PAYLOAD}"),
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

/// Writes one message, its descriptors travelling with the first bytes.
fn write_message(
    stream: &UnixStream,
    header: &[u8],
    payload: &[u8],
    fds: &[OwnedFd],
) -> io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let sent = if raw.is_empty() {
        0
    } else {
        stream
            .send_with_fds(&[header], &raw)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?
    };
    let mut writer = stream;
    writer.write_all(&header[sent..])?;
    writer.write_all(payload)
}

static RELAY_SEQ: AtomicU64 = AtomicU64::new(0);

/// A running relay for one frontend connection.
#[derive(Debug)]
pub struct FrontendRelay {
    threads: Vec<JoinHandle<()>>,
}

impl FrontendRelay {
    /// Starts relaying `frontend` and returns a listener holding the backend's end of the
    /// relay, ready for `VhostUserDaemon::start` to accept. The private socket lives in the
    /// abstract namespace, so nothing is left on the filesystem.
    pub fn start(frontend: UnixStream, label: &str) -> io::Result<(Self, Listener)> {
        let name = format!(
            "vnpd-relay-{}-{}-{}",
            std::process::id(),
            label,
            RELAY_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
        let listener = UnixListener::bind_addr(&addr)?;
        let backend = UnixStream::connect_addr(&addr)?;

        let frontend_writer = Arc::new(Mutex::new(frontend.try_clone()?));
        let backend_reader = backend.try_clone()?;
        let to_backend = {
            let frontend_writer = frontend_writer.clone();
            let label = label.to_owned();
            std::thread::Builder::new()
                .name(format!("relay-in-{label}"))
                .spawn(move || {
                    let mut filter = EarlyEnableFilter::default();
                    if let Err(e) =
                        pump_from_frontend(&frontend, &backend, &frontend_writer, &mut filter)
                    {
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
        let to_frontend = std::thread::Builder::new()
            .name(format!("relay-out-{label}"))
            .spawn(move || {
                while let Ok(Some(msg)) = read_message(&backend_reader) {
                    let frontend = frontend_writer.lock().unwrap_or_else(|e| e.into_inner());
                    if write_message(&frontend, &msg.header, &msg.payload, &msg.fds).is_err() {
                        break;
                    }
                }
                let frontend = frontend_writer.lock().unwrap_or_else(|e| e.into_inner());
                let _ = frontend.shutdown(std::net::Shutdown::Both);
                let _ = backend_reader.shutdown(std::net::Shutdown::Both);
            })?;
        Ok((
            Self {
                threads: vec![to_backend, to_frontend],
            },
            Listener::from(listener),
        ))
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
) -> io::Result<()> {
    while let Some(msg) = read_message(frontend)? {
        match filter.on_frontend_message(&msg.header, &msg.payload) {
            Verdict::Forward => write_message(backend, &msg.header, &msg.payload, &msg.fds)?,
            Verdict::ForwardThenReplay(held) => {
                write_message(backend, &msg.header, &msg.payload, &msg.fds)?;
                for replayed in held {
                    write_message(backend, &replayed, &[], &[])?;
                }
            }
            Verdict::Absorb { reply } => {
                if let Some(reply) = reply {
                    let w = frontend_writer.lock().unwrap_or_else(|e| e.into_inner());
                    write_message(&w, &reply, &[], &[])?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(request: u32, flags: u32, size: u32) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&request.to_le_bytes());
        h[4..8].copy_from_slice(&flags.to_le_bytes());
        h[8..12].copy_from_slice(&size.to_le_bytes());
        h
    }

    fn enable(index: u32, on: u32) -> Vec<u8> {
        let mut p = index.to_le_bytes().to_vec();
        p.extend_from_slice(&on.to_le_bytes());
        p
    }

    #[test]
    fn absorbs_enable_before_features_and_answers_when_asked() {
        let mut f = EarlyEnableFilter::default();
        let quiet = header(REQ_SET_VRING_ENABLE, FLAG_VERSION_1, 8);
        assert_eq!(
            f.on_frontend_message(&quiet, &enable(0, 1)),
            Verdict::Absorb { reply: None }
        );
        let asking = header(REQ_SET_VRING_ENABLE, FLAG_VERSION_1 | FLAG_NEED_REPLY, 8);
        let Verdict::Absorb { reply: Some(reply) } = f.on_frontend_message(&asking, &enable(1, 0))
        else {
            panic!("expected an absorbed message with a reply");
        };
        assert_eq!(le_u32(&reply[0..4]), REQ_SET_VRING_ENABLE);
        assert_eq!(le_u32(&reply[4..8]), FLAG_VERSION_1 | FLAG_REPLY);
        assert_eq!(le_u32(&reply[8..12]), 8);
        assert_eq!(&reply[12..], &[0u8; 8], "zero means success");
        assert_eq!(f.absorbed(), 2);
    }

    #[test]
    fn replays_held_enables_after_features_last_state_per_ring() {
        let mut f = EarlyEnableFilter::default();
        let msg = header(REQ_SET_VRING_ENABLE, FLAG_VERSION_1, 8);
        f.on_frontend_message(&msg, &enable(0, 1));
        f.on_frontend_message(&msg, &enable(1, 1));
        f.on_frontend_message(&msg, &enable(3, 1));
        f.on_frontend_message(&msg, &enable(3, 0));
        let features = (F_PROTOCOL_FEATURES | 1 << 32).to_le_bytes();
        let Verdict::ForwardThenReplay(replay) =
            f.on_frontend_message(&header(REQ_SET_FEATURES, FLAG_VERSION_1, 8), &features)
        else {
            panic!("expected the held enables to be replayed");
        };
        let states: Vec<(u32, u32)> = replay
            .iter()
            .map(|m| {
                assert_eq!(le_u32(&m[0..4]), REQ_SET_VRING_ENABLE);
                assert_eq!(le_u32(&m[4..8]), FLAG_VERSION_1, "no reply asked for");
                assert_eq!(le_u32(&m[8..12]), 8);
                (le_u32(&m[12..16]), le_u32(&m[16..20]))
            })
            .collect();
        assert_eq!(states, vec![(0, 1), (1, 1), (3, 0)]);
        // Replayed once: a later SET_FEATURES (e.g. toggling LOG_ALL) replays nothing.
        assert_eq!(
            f.on_frontend_message(&header(REQ_SET_FEATURES, FLAG_VERSION_1, 8), &features),
            Verdict::Forward
        );
    }

    #[test]
    fn forwards_enable_once_protocol_features_are_acked() {
        let mut f = EarlyEnableFilter::default();
        let features = (F_PROTOCOL_FEATURES | 1 << 32).to_le_bytes();
        assert_eq!(
            f.on_frontend_message(&header(REQ_SET_FEATURES, FLAG_VERSION_1, 8), &features),
            Verdict::Forward
        );
        let msg = header(REQ_SET_VRING_ENABLE, FLAG_VERSION_1, 8);
        assert_eq!(f.on_frontend_message(&msg, &enable(0, 1)), Verdict::Forward);
        assert_eq!(f.absorbed(), 0);
    }

    #[test]
    fn features_without_protocol_bit_keep_absorbing() {
        // Without PROTOCOL_FEATURES the backend enables rings itself at SET_FEATURES, and a
        // conforming frontend never sends SET_VRING_ENABLE; if one does, the crate would
        // refuse it, so it is absorbed.
        let mut f = EarlyEnableFilter::default();
        let features = (1u64 << 32).to_le_bytes();
        f.on_frontend_message(&header(REQ_SET_FEATURES, FLAG_VERSION_1, 8), &features);
        let msg = header(REQ_SET_VRING_ENABLE, FLAG_VERSION_1, 8);
        assert_eq!(
            f.on_frontend_message(&msg, &enable(0, 1)),
            Verdict::Absorb { reply: None }
        );
    }

    #[test]
    fn other_messages_pass() {
        let mut f = EarlyEnableFilter::default();
        for request in [1u32, 3, 5, 8, 9, 10, 11, 12, 15, 16, 17, 24, 25] {
            assert_eq!(
                f.on_frontend_message(&header(request, FLAG_VERSION_1, 0), &[]),
                Verdict::Forward
            );
        }
        // A truncated SET_FEATURES changes nothing and is left to the backend to refuse.
        assert_eq!(
            f.on_frontend_message(&header(REQ_SET_FEATURES, FLAG_VERSION_1, 4), &[0; 4]),
            Verdict::Forward
        );
    }

    #[test]
    fn relays_messages_with_descriptors_and_absorbs_early_enable() {
        let (frontend_side, relay_side) = UnixStream::pair().expect("socketpair");
        let (relay, listener) = FrontendRelay::start(relay_side, "test").expect("relay");
        let backend = listener.accept().expect("accept").expect("connection");

        // An early enable that asks for a reply: answered by the relay, never seen by the backend.
        let early = header(REQ_SET_VRING_ENABLE, FLAG_VERSION_1 | FLAG_NEED_REPLY, 8);
        write_message(&frontend_side, &early, &enable(0, 1), &[]).expect("send");
        let reply = read_message(&frontend_side).expect("read").expect("reply");
        assert_eq!(le_u32(&reply.header[4..8]), FLAG_VERSION_1 | FLAG_REPLY);

        // SET_FEATURES reaches the backend, followed by the held-back enable.
        let features = (F_PROTOCOL_FEATURES | 1 << 32).to_le_bytes();
        write_message(
            &frontend_side,
            &header(REQ_SET_FEATURES, FLAG_VERSION_1, 8),
            &features,
            &[],
        )
        .expect("send");
        let got = read_message(&backend).expect("read").expect("features");
        assert_eq!(le_u32(&got.header[0..4]), REQ_SET_FEATURES);
        let got = read_message(&backend)
            .expect("read")
            .expect("replayed enable");
        assert_eq!(le_u32(&got.header[0..4]), REQ_SET_VRING_ENABLE);
        assert_eq!(got.payload, enable(0, 1));

        // A message with a descriptor passes through, descriptor included.
        let (probe_a, probe_b) = UnixStream::pair().expect("socketpair");
        let set_call = header(13, FLAG_VERSION_1, 8);
        write_message(
            &frontend_side,
            &set_call,
            &0u64.to_le_bytes(),
            &[OwnedFd::from(probe_a)],
        )
        .expect("send");
        let got = read_message(&backend).expect("read").expect("message");
        assert_eq!(le_u32(&got.header[0..4]), 13);
        assert_eq!(got.fds.len(), 1);
        let mut passed = UnixStream::from(got.fds.into_iter().next().expect("fd"));
        passed.write_all(b"x").expect("write through passed fd");
        let mut byte = [0u8; 1];
        (&probe_b).read_exact(&mut byte).expect("read");
        assert_eq!(&byte, b"x");

        // Backend replies flow back.
        let backend_reply = header(1, FLAG_VERSION_1 | FLAG_REPLY, 8);
        write_message(&backend, &backend_reply, &7u64.to_le_bytes(), &[]).expect("send");
        let back = read_message(&frontend_side).expect("read").expect("reply");
        assert_eq!(back.payload, 7u64.to_le_bytes());

        // The frontend hanging up ends both directions.
        drop(frontend_side);
        assert!(read_message(&backend).expect("read").is_none());
        relay.join();
    }

    #[test]
    fn oversized_payload_ends_the_connection() {
        let (frontend_side, relay_side) = UnixStream::pair().expect("socketpair");
        let (relay, listener) = FrontendRelay::start(relay_side, "big").expect("relay");
        let backend = listener.accept().expect("accept").expect("connection");
        let h = header(1, FLAG_VERSION_1, (MAX_PAYLOAD + 1) as u32);
        (&frontend_side).write_all(&h).expect("send");
        assert!(read_message(&backend).expect("read").is_none());
        relay.join();
    }
}
