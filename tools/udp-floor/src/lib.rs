//! The kernel floor for vnpd's benchmark: how much CPU the Linux UDP stack itself spends per
//! packet when a sender uses `sendmmsg` and a receiver `recvmmsg`, batch by batch, with nothing
//! else to do. vnpd moves every guest packet through exactly these two system calls (plus
//! encapsulation and the virtio rings), so its CPU time per packet divided by this one says how
//! much vnpd adds on top of the kernel.
//!
//! - [`mmsg`]: the sender and receiver loops.
//! - [`pace`]: the send schedule of a fixed-rate (`--rate`) sender (pure).
//! - [`gso`]: UDP GSO sends and GRO receives (the bulk floor).
//! - [`thread`]: per-thread CPU time (`getrusage(RUSAGE_THREAD)`), network namespace and CPU
//!   affinity of the calling thread.
//! - [`report`]: turns raw counts into rates and per-packet costs, as text and JSON (pure).

pub mod gso;
pub mod mmsg;
pub mod pace;
pub mod report;
pub mod thread;
