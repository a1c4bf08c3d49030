//! The control plane of vnpd: everything that talks to the registry on behalf of the data path.
//!
//! - [`book`]: pure bookkeeping (request deduplication, refusal hold-down, refresh rate limit,
//!   peer address index).
//! - [`thread`]: the control thread and the registry watch thread.
//!
//! The data path is reached through [`TokenTarget`], which the VM's port implements; the data
//! path reaches the control thread through [`thread::ControlHandle`], a channel send.

pub mod book;
pub mod thread;

pub use book::Refusal;
pub use thread::{ControlHandle, ControlSettings, ControlThread};

use std::net::Ipv4Addr;
use vnp_protocol::token::{Expiry, Token};

/// A token the registry granted for (local VM -> destination address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// Underlay address of the destination VM's host.
    pub dst_host: Ipv4Addr,
    /// UDP port of the destination VM on that host.
    pub dst_port: u16,
    /// The token to put in the VNP header.
    pub token: Token,
    /// When it expires.
    pub expiry: Expiry,
}

/// What the control thread does to an attached VM's data path.
pub trait TokenTarget: Send + Sync {
    /// A token for `dst` arrived: packets waiting for it may go.
    fn install(&self, dst: Ipv4Addr, grant: &Grant);
    /// No token for `dst`: waiting packets are dropped and counted as `why`.
    fn refuse(&self, dst: Ipv4Addr, why: Refusal);
    /// Destinations whose tokens expire before `t` (to refresh them).
    fn expiring_before(&self, t: Expiry) -> Vec<Ipv4Addr>;
    /// `dst`'s endpoint or secret changed: drop its token, the next packet asks again.
    fn forget(&self, dst: Ipv4Addr);
}
