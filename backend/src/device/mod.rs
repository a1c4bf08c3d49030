//! The vhost-user-net device vnpd serves to each attached VM.
//!
//! - [`features`]: virtio and vhost-user features, config space, virtio-net header (pure).
//! - [`chain`]: safe walking of guest descriptor chains and guest-memory access helpers.
//! - [`frontend_relay`]: relays the frontend's control messages, absorbing QEMU's early
//!   `SET_VRING_ENABLE` that the `vhost` crate would otherwise drop the connection over.
//! - [`backend`]: the `VhostUserBackend` implementation driving the data path workers.

pub mod backend;
pub mod chain;
pub mod features;
pub mod frontend_relay;
