//! The ring engine: guest memory, virtqueue descriptor chains, RX buffers and batches of
//! datagrams. It knows nothing of VNP; the data path (`crate::datapath`) builds on it and the
//! device (`crate::device`) hands it guest memory. Dependencies point one way:
//! `datapath -> device -> ring`.
//!
//! - [`memory`]: [`GuestView`], one pass's snapshot of guest memory (reads, writes, iovecs, dirty
//!   logging of kernel writes).
//! - [`chain`]: walking untrusted descriptor chains into checked segments ([`TxChain`],
//!   [`RxBuf`]).
//! - [`pool`]: [`RxPool`], guest RX buffers taken from the avail ring, assigned to frames, and
//!   published (or kept) after the caller's checks.
//! - [`batch`]: [`MsgBatch`], the `mmsghdr`s and iovecs of one `sendmmsg`/`recvmmsg`, reused
//!   from batch to batch.
//! - [`park`]: faults that break a whole ring (index jump, head out of range) and parking it.
//! - [`used`]: [`UsedRing`], used entries written by host address, one index store per batch.
//! - [`vring`]: notification decisions on a vring.

pub mod batch;
pub mod chain;
pub mod memory;
pub mod park;
pub mod pool;
pub mod used;
pub mod vring;

use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::VringRwLock;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

pub use batch::MsgBatch;
pub use chain::{ChainError, DescTable, GuestSeg, RxBuf, TxChain};
pub use memory::{GuestView, PlainMem, PlainShadow};
pub use park::{ParkedRing, RingFault};
pub use pool::RxPool;
pub use used::UsedRing;

/// Guest memory as vnpd maps it: every write through vm-memory lands in the dirty log once
/// the frontend sets one up (live migration).
pub type GuestMem = GuestMemoryMmap<BitmapMmapRegion>;
/// A vring of the device.
pub type Vring = VringRwLock<GuestMemoryAtomic<GuestMem>>;

/// Guest memory for unit tests: 1 MiB at guest address 0.
#[cfg(test)]
pub(crate) fn test_memory() -> std::sync::Arc<GuestMem> {
    std::sync::Arc::new(
        GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 0x10_0000)]).unwrap(),
    )
}
