//! A vhost-user frontend that replays a real frontend's conversation message by message.
//!
//! Each conversation (`conversations.rs`) is a list of [`Msg`]: the request, in the order and
//! with the `NEED_REPLY` flag the real frontend uses. The messages are framed with the `vhost`
//! crate's request codes, flags and payload types. The crate's own `Frontend` cannot be used
//! for this: it refuses `SET_VRING_ENABLE` before `SET_FEATURES` (QEMU's order) and picks its own
//! flags. Once a conversation has set the rings up, the rings are driven by `dataplane_frontend`'s
//! `TestFrontend` (the guest driver's part), which adopts the memory and eventfds used here.
#![allow(dead_code)]

pub mod conversations;

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    FrontendReq, VhostUserHeaderFlag, VhostUserMemory, VhostUserMemoryRegion,
    VhostUserProtocolFeatures, VhostUserU64, VhostUserVringAddr, VhostUserVringState,
};
use vhost::vhost_user::Frontend;
use vm_memory::{ByteValued, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vnpd::device::frontend_relay::{read_message, write_message, MessageHeader};

use crate::dataplane_frontend::{memfd, ring_layout, TestFrontend, MEM_SIZE, QUEUE_SIZE};

/// One request of a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    SetOwner,
    GetFeatures,
    /// Acks `offered & Profile::features`.
    SetFeatures,
    GetProtocolFeatures,
    /// Acks `offered & Profile::protocol`.
    SetProtocolFeatures,
    GetQueueNum,
    /// The whole current memory table (after [`Guest::hotplug`], two regions).
    SetMemTable,
    SetVringNum(u32),
    /// The ring's next avail index, taken from guest memory per [`BaseFrom`].
    SetVringBase(u32),
    SetVringAddr(u32),
    SetVringKick(u32),
    SetVringCall(u32),
    SetVringErr(u32),
    SetVringEnable(u32, bool),
    GetVringBase(u32),
}

impl Step {
    /// The request code this step sends.
    pub fn request(self) -> FrontendReq {
        match self {
            Step::SetOwner => FrontendReq::SET_OWNER,
            Step::GetFeatures => FrontendReq::GET_FEATURES,
            Step::SetFeatures => FrontendReq::SET_FEATURES,
            Step::GetProtocolFeatures => FrontendReq::GET_PROTOCOL_FEATURES,
            Step::SetProtocolFeatures => FrontendReq::SET_PROTOCOL_FEATURES,
            Step::GetQueueNum => FrontendReq::GET_QUEUE_NUM,
            Step::SetMemTable => FrontendReq::SET_MEM_TABLE,
            Step::SetVringNum(_) => FrontendReq::SET_VRING_NUM,
            Step::SetVringBase(_) => FrontendReq::SET_VRING_BASE,
            Step::SetVringAddr(_) => FrontendReq::SET_VRING_ADDR,
            Step::SetVringKick(_) => FrontendReq::SET_VRING_KICK,
            Step::SetVringCall(_) => FrontendReq::SET_VRING_CALL,
            Step::SetVringErr(_) => FrontendReq::SET_VRING_ERR,
            Step::SetVringEnable(..) => FrontendReq::SET_VRING_ENABLE,
            Step::GetVringBase(_) => FrontendReq::GET_VRING_BASE,
        }
    }

    /// The ring a ring message is about.
    pub fn ring(self) -> Option<u32> {
        match self {
            Step::SetVringNum(q)
            | Step::SetVringBase(q)
            | Step::SetVringAddr(q)
            | Step::SetVringKick(q)
            | Step::SetVringCall(q)
            | Step::SetVringErr(q)
            | Step::SetVringEnable(q, _)
            | Step::GetVringBase(q) => Some(q),
            _ => None,
        }
    }
}

/// A request and whether the frontend asks for a `REPLY_ACK` answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Msg {
    pub step: Step,
    pub need_reply: bool,
}

/// Where a frontend takes `SET_VRING_BASE` from when it (re)starts a ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseFrom {
    /// The avail ring's index as the guest left it (cloud-hypervisor's
    /// `queue.avail_idx(mem)`): buffers posted before a reconnect are skipped.
    AvailIdx,
    /// The used ring's index (QEMU after losing the backend,
    /// `virtio_queue_restore_last_avail_idx`): posted buffers are processed again.
    UsedIdx,
}

/// What a frontend wants from the backend.
#[derive(Debug, Clone, Copy)]
pub struct Profile {
    pub name: &'static str,
    pub features: u64,
    pub protocol: VhostUserProtocolFeatures,
    pub base_from: BaseFrom,
}

/// The guest's side that outlives connections: memory, kick/call/err eventfds.
pub struct Guest {
    pub mem: GuestMemoryMmap<()>,
    file: File,
    hotplugged: Option<(GuestMemoryMmap<()>, File)>,
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
    errs: Vec<EventFd>,
}

/// Guest-physical address of the region [`Guest::hotplug`] adds.
pub const HOTPLUG_GPA: u64 = 0x100_0000;
const HOTPLUG_SIZE: usize = 1 << 20;

impl Guest {
    /// Memory laid out like `TestFrontend::connect`'s, and eventfds for `queues` rings.
    pub fn new(queues: usize) -> Guest {
        let file = memfd(MEM_SIZE).unwrap();
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            MEM_SIZE,
            Some(FileOffset::new(file.try_clone().unwrap(), 0)),
        )])
        .unwrap();
        let fds = |_| EventFd::new(libc::EFD_NONBLOCK).unwrap();
        Guest {
            mem,
            file,
            hotplugged: None,
            kicks: (0..queues).map(fds).collect(),
            calls: (0..queues).map(fds).collect(),
            errs: (0..queues).map(fds).collect(),
        }
    }

    /// Adds a second memory region (memory hotplug); the next `SET_MEM_TABLE` carries it.
    pub fn hotplug(&mut self) {
        let file = memfd(HOTPLUG_SIZE).unwrap();
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(HOTPLUG_GPA),
            HOTPLUG_SIZE,
            Some(FileOffset::new(file.try_clone().unwrap(), 0)),
        )])
        .unwrap();
        self.hotplugged = Some((mem, file));
    }

    /// Writes into the hotplugged region (which only the backend and this test can see).
    pub fn hotplugged_mem(&self) -> &GuestMemoryMmap<()> {
        &self.hotplugged.as_ref().expect("hotplugged").0
    }

    fn host(&self) -> u64 {
        self.mem.get_host_address(GuestAddress(0)).unwrap() as u64
    }

    fn ring_index(&self, q: u32, base_from: BaseFrom) -> u16 {
        let (_, avail, used, _) = ring_layout(q as usize);
        let at = match base_from {
            BaseFrom::AvailIdx => avail + 2,
            BaseFrom::UsedIdx => used + 2,
        };
        u16::from_le(self.mem.load(GuestAddress(at), Ordering::Acquire).unwrap())
    }

    /// `SET_MEM_TABLE`'s payload and descriptors.
    fn mem_table(&self) -> (Vec<u8>, Vec<OwnedFd>) {
        let mut regions = vec![(
            VhostUserMemoryRegion::new(0, MEM_SIZE as u64, self.host(), 0),
            &self.file,
        )];
        if let Some((mem, file)) = &self.hotplugged {
            let host = mem.get_host_address(GuestAddress(HOTPLUG_GPA)).unwrap() as u64;
            regions.push((
                VhostUserMemoryRegion::new(HOTPLUG_GPA, HOTPLUG_SIZE as u64, host, 0),
                file,
            ));
        }
        let mut payload = VhostUserMemory::new(regions.len() as u32)
            .as_slice()
            .to_vec();
        let mut fds = Vec::new();
        for (region, file) in regions {
            payload.extend_from_slice(region.as_slice());
            fds.push(OwnedFd::from(file.try_clone().unwrap()));
        }
        (payload, fds)
    }

    /// Hands the rings to a `TestFrontend` that drives them over `replay`'s connection.
    pub fn driver(&self, replay: &Replay) -> TestFrontend {
        let fe = Frontend::from_stream(replay.stream.try_clone().unwrap(), self.kicks.len() as u64);
        let dup = |v: &Vec<EventFd>| v.iter().map(|e| e.try_clone().unwrap()).collect();
        TestFrontend::adopt(
            fe,
            self.mem.clone(),
            self.file.try_clone().unwrap(),
            dup(&self.kicks),
            dup(&self.calls),
            replay.acked,
        )
    }
}

/// One connection replaying a conversation, and what the backend answered.
pub struct Replay {
    stream: UnixStream,
    profile: Profile,
    pub offered: u64,
    pub acked: u64,
    pub offered_protocol: u64,
    pub acked_protocol: u64,
    pub queue_num: Option<u64>,
    /// Protocol features acked on an earlier connection, which a reconnect resends.
    remembered_protocol: Option<u64>,
    /// `GET_VRING_BASE` answers: (ring, index).
    pub vring_bases: Vec<(u32, u32)>,
    /// Every `REPLY_ACK` answer, with the request it answered.
    pub acks: Vec<(FrontendReq, u64)>,
}

impl Replay {
    /// Connects to `socket` (retrying for a while, as frontends do while the backend starts).
    pub fn connect(socket: &Path, profile: Profile) -> Replay {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(e) if start.elapsed() < Duration::from_secs(10) => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("connect {}: {e}", socket.display()),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Replay {
            stream,
            profile,
            offered: 0,
            acked: 0,
            offered_protocol: 0,
            acked_protocol: 0,
            queue_num: None,
            remembered_protocol: None,
            vring_bases: Vec::new(),
            acks: Vec::new(),
        }
    }

    /// Connects again after `previous`'s backend went away, remembering what was negotiated.
    pub fn reconnect(socket: &Path, previous: &Replay) -> Replay {
        let mut r = Replay::connect(socket, previous.profile);
        r.remembered_protocol = Some(previous.acked_protocol);
        r
    }

    /// Sends every message of `conversation` in order, reading each answer it expects.
    pub fn run(&mut self, guest: &Guest, conversation: &[Msg]) {
        for (i, msg) in conversation.iter().enumerate() {
            let (request, payload, fds) = self.encode(guest, msg.step);
            let flags = if msg.need_reply {
                VhostUserHeaderFlag::NEED_REPLY
            } else {
                VhostUserHeaderFlag::empty()
            };
            let header = MessageHeader::request(request, flags, payload.len());
            write_message(&self.stream, header.as_slice(), &payload, &fds)
                .unwrap_or_else(|e| panic!("message {i} ({:?}): {e}", msg.step));
            if is_get(request) {
                let value = self.answer(request, msg);
                self.record(msg.step, value);
            } else if msg.need_reply {
                let value = self.answer(request, msg);
                assert_eq!(value, 0, "message {i} ({:?}) failed", msg.step);
                self.acks.push((request, value));
            }
        }
    }

    fn answer(&self, request: FrontendReq, msg: &Msg) -> u64 {
        let reply = read_message(&self.stream)
            .unwrap_or_else(|e| panic!("{:?}: no answer: {e}", msg.step))
            .unwrap_or_else(|| panic!("{:?}: the backend hung up", msg.step));
        assert_eq!(reply.header.code(), Some(request), "{:?}", msg.step);
        assert_ne!(
            reply.header.flags & VhostUserHeaderFlag::REPLY.bits(),
            0,
            "{:?}: not a reply",
            msg.step
        );
        let mut value = VhostUserU64::default();
        value.as_mut_slice()[..8.min(reply.payload.len())]
            .copy_from_slice(&reply.payload[..8.min(reply.payload.len())]);
        value.value
    }

    fn record(&mut self, step: Step, value: u64) {
        match step {
            Step::GetFeatures => self.offered = value,
            Step::GetProtocolFeatures => self.offered_protocol = value,
            Step::GetQueueNum => self.queue_num = Some(value),
            Step::GetVringBase(q) => {
                let state = VhostUserVringState::from_slice(&value.to_ne_bytes()[..])
                    .copied()
                    .unwrap_or_default();
                assert_eq!({ state.index }, q);
                self.vring_bases.push((q, state.num));
            }
            _ => unreachable!("{step:?} has no reply"),
        }
    }

    fn encode(&mut self, guest: &Guest, step: Step) -> (FrontendReq, Vec<u8>, Vec<OwnedFd>) {
        let (payload, fds) = self.payload(guest, step);
        (step.request(), payload, fds)
    }

    fn payload(&mut self, guest: &Guest, step: Step) -> (Vec<u8>, Vec<OwnedFd>) {
        let u64_payload = |v: u64| VhostUserU64::new(v).as_slice().to_vec();
        let state = |q: u32, n: u32| VhostUserVringState::new(q, n).as_slice().to_vec();
        let fd = |e: &EventFd| {
            // SAFETY: the eventfd is open for as long as `guest` lives, which spans this call;
            // the borrow is only used to duplicate it.
            let borrowed = unsafe { BorrowedFd::borrow_raw(e.as_raw_fd()) };
            vec![borrowed.try_clone_to_owned().unwrap()]
        };
        match step {
            Step::SetOwner => (vec![], vec![]),
            Step::GetFeatures => (vec![], vec![]),
            Step::SetFeatures => {
                self.acked = self.offered & self.profile.features;
                (u64_payload(self.acked), vec![])
            }
            Step::GetProtocolFeatures => (vec![], vec![]),
            Step::SetProtocolFeatures => {
                self.acked_protocol = match (self.offered_protocol, self.remembered_protocol) {
                    // A reconnect may skip GET_PROTOCOL_FEATURES and resend what was acked.
                    (0, Some(remembered)) => remembered,
                    (offered, _) => offered & self.profile.protocol.bits(),
                };
                let payload = u64_payload(self.acked_protocol);
                (payload, vec![])
            }
            Step::GetQueueNum => (vec![], vec![]),
            Step::SetMemTable => guest.mem_table(),
            Step::SetVringNum(q) => (state(q, u32::from(QUEUE_SIZE)), vec![]),
            Step::SetVringBase(q) => {
                let base = guest.ring_index(q, self.profile.base_from);
                (state(q, u32::from(base)), vec![])
            }
            Step::SetVringAddr(q) => {
                let (desc, avail, used, _) = ring_layout(q as usize);
                let host = guest.host();
                let addr = VhostUserVringAddr {
                    index: q,
                    flags: 0,
                    descriptor: host + desc,
                    used: host + used,
                    available: host + avail,
                    log: 0,
                };
                (addr.as_slice().to_vec(), vec![])
            }
            Step::SetVringKick(q) => (u64_payload(q.into()), fd(&guest.kicks[q as usize])),
            Step::SetVringCall(q) => (u64_payload(q.into()), fd(&guest.calls[q as usize])),
            Step::SetVringErr(q) => (u64_payload(q.into()), fd(&guest.errs[q as usize])),
            Step::SetVringEnable(q, on) => (state(q, u32::from(on)), vec![]),
            Step::GetVringBase(q) => (state(q, 0), vec![]),
        }
    }

    /// Closes the connection (the frontend going away).
    pub fn hang_up(self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    /// Waits until the backend closes the connection (a vnpd that stopped).
    pub fn wait_for_hang_up(&self, timeout: Duration) {
        self.stream.set_read_timeout(Some(timeout)).unwrap();
        let mut byte = [0u8; 1];
        use std::io::Read;
        match (&self.stream).read(&mut byte) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("expected the backend to hang up, got {other:?}"),
        }
    }
}

fn is_get(request: FrontendReq) -> bool {
    matches!(
        request,
        FrontendReq::GET_FEATURES
            | FrontendReq::GET_PROTOCOL_FEATURES
            | FrontendReq::GET_QUEUE_NUM
            | FrontendReq::GET_VRING_BASE
    )
}
