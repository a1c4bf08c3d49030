//! The data path of vnpd: VNP encapsulation of guest traffic over UDP.
//!
//! One [`VmPort`] per attached VM owns the VM's UDP sockets (`host_addr:udp_port`), listens on its
//! vhost-user socket and serves the virtio-net device to whichever frontend connects (QEMU,
//! cloud-hypervisor, DPDK virtio-user). See `docs/vnpd-datapath.md` for how TX and RX work.
//!
//! Built on the ring engine (`crate::ring`) and the device (`crate::device`), which know nothing
//! of VNP; the control thread (`crate::control`) sits above: it calls [`VmPort`]'s methods, and
//! the data path reaches it only through [`ControlPlane`].
//!
//! - [`frame`]: what a guest frame is (pure).
//! - [`rx_check`]: the receive checks of the patent's FIG. 6 (pure).
//! - [`peers`]: tokens per destination and the bounded pending queues.
//! - [`nat_hook`]: off-network traffic: NAT on TX and RX, to and from the gateway.
//! - [`hairpin`]: live migration, source side: stragglers forwarded to the VM's new host;
//!   [`moved_hint`]: the endpoint-moved hint their senders get (a registry lookup, nothing more).
//! - [`handoff`]: packets that waited for a token, on their way to the worker that queued them.
//! - [`udp`]: sockets and the batched system calls.
//! - [`worker`]: [`worker::PairWorker`], the device's handler of one queue pair: dispatch, edge
//!   replies, handed-off packets; its TX half is in [`tx`], its RX half in [`rx`].
//! - [`port`]: [`VmPort`]: start, stop, token installation from the control plane; [`serve`]:
//!   the loop serving one frontend connection after another; [`vhost_socket`]: the vhost-user
//!   socket, created with its configured owner, group and mode.

pub mod edge_link;
pub mod frame;
pub mod hairpin;
pub mod handoff;
pub mod moved_hint;
pub mod nat_hook;
pub mod offload_batch;
pub mod peers;
pub mod port;
pub mod rx;
pub mod rx_check;
pub mod rx_coalesce;
pub mod rx_gro;
mod rx_stall;
mod rx_timer;
pub mod serve;
pub mod tso;
pub mod tx;
pub mod tx_offload;
pub mod udp;
pub mod vhost_socket;
pub mod worker;

use std::net::Ipv4Addr;
use std::path::PathBuf;

use thiserror::Error;
use vnp_protocol::token::{Expiry, Token, VmSecret};

pub use port::{DataPathTuning, VmPort};

/// Everything the data path needs to serve one VM. Built by the control plane from the
/// registry's VM record (never from what the guest claims).
#[derive(Debug)]
pub struct VmAttachment {
    /// Registry id of the VM.
    pub vm_id: String,
    /// Numeric network id used in tokens.
    pub network_vni: u32,
    /// The VM's address on the virtual network.
    pub vm_ip: Ipv4Addr,
    /// Its prefix length.
    pub prefix_len: u8,
    /// The virtual router (gateway) address the guest is given by DHCP.
    pub router_ip: Ipv4Addr,
    /// The guest NIC's MAC address.
    pub mac: [u8; 6],
    /// Hostname offered by DHCP.
    pub hostname: String,
    /// Guest MTU: underlay MTU minus `vnp_protocol::wire::ENCAP_OVERHEAD`.
    pub guest_mtu: u16,
    /// This VM's secret: verifies received tokens, mints return tokens.
    pub secret: VmSecret,
    /// This host's underlay address (`Phys_IP`).
    pub host_addr: Ipv4Addr,
    /// This VM's UDP port on the host (`Phys_Port`); 0 picks a free one (see
    /// [`VmPort::udp_addr`]).
    pub udp_port: u16,
    /// The vhost-user socket vnpd listens on.
    pub socket_path: PathBuf,
    /// Virtqueue pairs (one worker thread each).
    pub queue_pairs: u16,
}

/// The one contract between the data path and the control thread, in the data path's
/// direction: asking for a token. Implemented by the control thread's handle (and by test
/// doubles). The answer comes back through [`VmPort::install_token`] or
/// [`VmPort::refuse_token`], which the control thread calls directly.
pub trait ControlPlane: Send + Sync + 'static {
    /// Never blocks: asks the control thread for a token `src_vm -> dst`.
    fn request_token(&self, src_vm: &str, dst: Ipv4Addr);

    /// Never blocks: `dst` may have moved (an endpoint-moved hint): asks the registry for the
    /// pair's token again, rate-limited, while the current token stays in use. By default an
    /// ordinary request.
    fn recheck_token(&self, src_vm: &str, dst: Ipv4Addr) {
        self.request_token(src_vm, dst)
    }
}

/// A token for one (local VM -> destination address) pair, as the registry grants it or as a
/// peer's return token teaches it: where the destination VM lives and what to put in the VNP
/// header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerToken {
    /// Underlay address of the destination VM's host.
    pub dst_host: Ipv4Addr,
    /// UDP port of the destination VM on that host.
    pub dst_port: u16,
    /// `T_src_dst`.
    pub token: Token,
    /// Its expiry.
    pub expiry: Expiry,
}

/// Why no token came for a destination (what the dropped packets are counted as).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalReason {
    /// Pair policy denies the pair.
    PolicyDenied,
    /// No VM (or gateway) has the destination address, or it has no endpoint yet.
    UnknownDestination,
    /// The registry could not be reached or failed.
    RegistryUnavailable,
}

/// Why a port could not start.
#[derive(Debug, Error)]
pub enum PortError {
    /// The attachment is not usable.
    #[error("invalid attachment: {0}")]
    InvalidAttachment(String),
    /// Binding the VM's UDP port failed.
    #[error("cannot bind UDP {addr}: {source}")]
    Udp {
        /// Address we tried.
        addr: std::net::SocketAddrV4,
        /// Cause.
        source: std::io::Error,
    },
    /// Creating the vhost-user socket failed.
    #[error("cannot listen on vhost-user socket {path}: {reason}")]
    Listen {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        reason: String,
    },
    /// Starting a thread failed.
    #[error("cannot start thread: {0}")]
    Thread(std::io::Error),
    /// Creating a worker's wake-up eventfd failed.
    #[error("cannot create eventfd: {0}")]
    EventFd(std::io::Error),
}
