//! The virtual network protocol (VNP): what every part of vnp agrees on.
//!
//! - [`token`]: the per-pair token `T = first 64 bits of HMAC-SHA256(S_dst, fields)`, the VM
//!   secret that keys it, and the expiry check a receiving host runs without asking anyone.
//! - [`wire`]: zero-copy typed views over the bytes of a VNP datagram: the fixed header, the
//!   inner IPv4 packet and the trailing option TLVs.
//!
//! This crate does no I/O, so that the registry (which mints tokens), vnpd (which verifies them
//! and mints return tokens) and gateways share one definition, and so that it can be fuzzed.
//! `docs/protocol.md` specifies the same thing byte by byte, with test vectors that the unit tests
//! in [`vectors`] check.

pub mod hex;
pub mod token;
pub mod vectors;
pub mod wire;
