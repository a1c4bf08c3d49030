//! The vhost-user control conversation with vnpd: connect, negotiate, share the memory, set up
//! both rings. The order is DPDK virtio-user's (docs/frontends.md), which vnpd is tested
//! against, with `REPLY_ACK` so that every refusal surfaces at the step that caused it.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

use crate::features::{self, NegotiationError};
use crate::memory::GuestRam;
use crate::ring::SplitRing;

/// The RX queue's index.
pub const RX_QUEUE: usize = 0;
/// The TX queue's index.
pub const TX_QUEUE: usize = 1;

/// Why the device could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// No connection within the timeout.
    #[error("cannot connect to {path} within {timeout:?}: {last}")]
    Connect {
        /// Socket path.
        path: String,
        /// How long it tried.
        timeout: Duration,
        /// The last error.
        last: String,
    },
    /// A vhost-user request failed or was refused.
    #[error("vhost-user {step} failed: {source}")]
    Request {
        /// The request.
        step: &'static str,
        /// What the crate reported.
        source: vhost::Error,
    },
    /// Feature negotiation failed.
    #[error(transparent)]
    Negotiation(#[from] NegotiationError),
    /// An eventfd could not be created.
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
}

fn request<T>(step: &'static str, r: vhost::Result<T>) -> Result<T, DeviceError> {
    r.map_err(|source| DeviceError::Request { step, source })
}

/// One queue's notification descriptors.
#[derive(Debug)]
pub struct QueueFds {
    /// vnpd signals used buffers here.
    pub call: EventFd,
    /// This program signals available buffers here.
    pub kick: EventFd,
}

/// A set-up device: the control connection and both queues' eventfds.
pub struct Session {
    frontend: Frontend,
    /// The features acked (offloads included when vnpd offered them).
    pub acked: u64,
    /// RX queue notifications.
    pub rx: QueueFds,
    /// TX queue notifications.
    pub tx: QueueFds,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("socket", &self.frontend.as_raw_fd())
            .field("acked", &format_args!("{:#x}", self.acked))
            .field("rx", &self.rx)
            .field("tx", &self.tx)
            .finish()
    }
}

impl Session {
    /// The control socket (readable only when vnpd hangs up: it sends nothing unasked).
    pub fn socket_fd(&self) -> std::os::fd::RawFd {
        self.frontend.as_raw_fd()
    }
}

/// Connects to `path`, retrying until `timeout` (vnpd may not be listening yet).
fn connect(path: &Path, timeout: Duration) -> Result<Frontend, DeviceError> {
    let deadline = Instant::now() + timeout;
    loop {
        match Frontend::connect(path, 2) {
            Ok(fe) => return Ok(fe),
            Err(e) if Instant::now() >= deadline => {
                return Err(DeviceError::Connect {
                    path: path.display().to_string(),
                    timeout,
                    last: e.to_string(),
                })
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn ring_config(ram: &GuestRam, ring: &SplitRing) -> VringConfigData {
    let (desc, avail, used) = ring.addresses();
    let host = ram.host_base();
    VringConfigData {
        queue_max_size: ring.size(),
        queue_size: ring.size(),
        flags: 0,
        desc_table_addr: host + desc,
        used_ring_addr: host + used,
        avail_ring_addr: host + avail,
        log_addr: None,
    }
}

fn queue_fds() -> Result<QueueFds, DeviceError> {
    let new = || EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(DeviceError::EventFd);
    Ok(QueueFds {
        call: new()?,
        kick: new()?,
    })
}

/// Brings the device up on `path`: features (offloads when `offloads` and vnpd offers them),
/// memory, and the two rings (which must already hold their descriptors and RX buffers).
pub fn start(
    path: &Path,
    timeout: Duration,
    ram: &GuestRam,
    rx: &SplitRing,
    tx: &SplitRing,
    offloads: bool,
) -> Result<Session, DeviceError> {
    let mut fe = connect(path, timeout)?;
    request("SET_OWNER", fe.set_owner())?;
    let offered = request("GET_FEATURES", fe.get_features())?;
    let acked = features::negotiate(offered, offloads)?;
    request("SET_FEATURES", fe.set_features(acked))?;
    let protocol = request("GET_PROTOCOL_FEATURES", fe.get_protocol_features())?;
    let wanted = VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK;
    request(
        "SET_PROTOCOL_FEATURES",
        fe.set_protocol_features(protocol & wanted),
    )?;
    request(
        "SET_MEM_TABLE",
        fe.set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: ram.len() as u64,
            userspace_addr: ram.host_base(),
            mmap_offset: 0,
            mmap_handle: ram.file().as_raw_fd(),
        }]),
    )?;
    let fds = [queue_fds()?, queue_fds()?];
    for (q, ring) in [(RX_QUEUE, rx), (TX_QUEUE, tx)] {
        request("SET_VRING_NUM", fe.set_vring_num(q, ring.size()))?;
        request("SET_VRING_BASE", fe.set_vring_base(q, 0))?;
        request(
            "SET_VRING_ADDR",
            fe.set_vring_addr(q, &ring_config(ram, ring)),
        )?;
        request("SET_VRING_KICK", fe.set_vring_kick(q, &fds[q].kick))?;
        request("SET_VRING_CALL", fe.set_vring_call(q, &fds[q].call))?;
    }
    for q in [RX_QUEUE, TX_QUEUE] {
        request("SET_VRING_ENABLE", fe.set_vring_enable(q, true))?;
    }
    let [rx_fds, tx_fds] = fds;
    Ok(Session {
        frontend: fe,
        acked,
        rx: rx_fds,
        tx: tx_fds,
    })
}
