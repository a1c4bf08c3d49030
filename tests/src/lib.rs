//! End-to-end harness for vnp: a real registry (mutual TLS), one `vnpd` per host in its own
//! network namespace, real QEMU guests, and helpers to forge VNP datagrams and read vnpd's
//! Prometheus counters. Used by the tests in `tests/tests/` and by the `vnp-demo` program.
//!
//! Needs root (network namespaces), QEMU 10 and the test guest image (`scripts/setup`).

pub mod bins;
pub mod cluster;
pub mod edge;
pub mod forge;
pub mod migration;
pub mod registries;
