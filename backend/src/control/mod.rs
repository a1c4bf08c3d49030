//! The control plane of vnpd: everything that talks to the registry on behalf of the data path.
//!
//! - [`book`]: pure bookkeeping (request deduplication, refusal hold-down, refresh rate limit,
//!   peer address index); [`fair`]: the order requests are asked in (VMs take turns, refreshes
//!   first, a request rate per VM).
//! - [`thread`]: the control thread and the registry watch thread.
//! - [`resume_notice`]: the destination's authenticated "the VM resumed here" datagram to the
//!   source (pure); [`resume_link`]: its listener and sender.
//!
//! Dependencies point one way: the control thread drives the VMs' ports through
//! [`crate::datapath::VmPort`]'s methods (install, refuse, refresh, forget); the data path
//! reaches the control thread only through the one trait [`crate::datapath::ControlPlane`],
//! which [`thread::ControlHandle`] implements as a channel send. Tokens travel as
//! [`crate::datapath::PeerToken`], refusals as [`crate::datapath::RefusalReason`].

pub mod book;
pub mod fair;
pub mod metadata;
pub mod resume_link;
pub mod resume_notice;
pub mod thread;

pub use thread::{nat_blocks, ControlHandle, ControlSettings, ControlThread};
