//! `vnp-tap-frontend`: a vhost-user-net frontend that plays QEMU's tap backend for vnpd.
//!
//! It creates memfd "guest memory", connects to a VM's vhost-user socket on vnpd, negotiates
//! features (offloads when vnpd offers them), opens a TAP with `IFF_VNET_HDR` in a network
//! namespace and moves frames both ways, so that the namespace's kernel (its TCP, `iperf3`,
//! `udhcpc`) is the guest. See README.md.
//!
//! - [`features`]: what is asked for and acked, and the TAP offloads that follow (pure).
//! - [`layout`]: where rings and buffers sit in guest memory (pure).
//! - [`memory`]: the shared memfd mapping.
//! - [`ring`]: the driver side of a split virtqueue.
//! - [`vnet`]: the virtio-net header fields the fixture reads.
//! - [`tap`]: the TAP device and the namespace.
//! - [`device`]: the vhost-user control conversation.
//! - [`datapath`]: TAP to TX ring, RX ring to TAP.
//! - [`run`]: the event loop and reconnects.

pub mod datapath;
pub mod device;
pub mod features;
pub mod layout;
pub mod memory;
pub mod ring;
pub mod run;
pub mod tap;
pub mod vnet;

/// Exit status when vnpd hung up and the fixture did not (or could not) reconnect.
pub const EXIT_DISCONNECTED: u8 = 3;
/// Exit status for set-up and runtime errors.
pub const EXIT_ERROR: u8 = 1;
