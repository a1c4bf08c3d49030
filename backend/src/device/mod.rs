//! The vhost-user-net device vnpd serves to each attached VM. It knows the virtio side only:
//! the packets themselves are the business of a [`QueuePairHandler`] the data path supplies.
//!
//! - [`features`]: virtio and vhost-user features, config space, virtio-net header (pure).
//! - [`frontend_relay`]: relays the frontend's control messages, absorbing QEMU's early
//!   `SET_VRING_ENABLE` that the `vhost` crate would otherwise drop the connection over.
//! - [`backend`]: the `VhostUserBackend` implementation: one [`QueuePairHandler`] per queue
//!   pair, each driven on that pair's worker thread with one guest-memory snapshot per event.
//! - `start_trace`: logs the first TX, RX and socket events after each device start.

pub mod backend;
mod call_watch;
pub mod features;
pub mod frontend_relay;
mod start_trace;

pub use backend::{
    BrokenRings, DeviceConfig, DeviceStartHook, Negotiated, NetBackend, PairEvent,
    QueuePairHandler, VringErrors,
};
