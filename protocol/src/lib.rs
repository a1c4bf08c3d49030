//! The virtual network protocol (VNP): what every part of vnp agrees on.
//!
//! - [`token`]: the per-pair token `T = first 64 bits of HMAC-SHA256(S_dst, fields)`, the VM
//!   secret that keys it, and the expiry check a receiving host runs without asking anyone.
//! - [`wire`]: the packet layer: zero-copy typed views over Ethernet, ARP, IPv4, UDP, TCP,
//!   ICMP and the VNP datagram (fixed header, inner packet, option TLVs), and the one Internet
//!   checksum implementation with RFC 1624's incremental update.
//!
//! This crate does no I/O, so that the registry (which mints tokens), vnpd (which verifies them
//! and mints return tokens) and gateways share one definition, and so that it can be fuzzed.
//! `docs/protocol.md` specifies the same thing byte by byte, with test vectors that the unit tests
//! in [`vectors`] check.

/// The address that stands for "any address outside the network" in the token message of a
/// pair where one end is a gateway (`docs/protocol.md`, *Tokens with a gateway*): the outside
/// address is not part of such a token, so a new outside peer costs no registry request.
pub const OUTSIDE: std::net::Ipv4Addr = std::net::Ipv4Addr::UNSPECIFIED;

pub mod hex;
mod keyed_hmac;
pub mod token;
pub mod vectors;
pub mod wire;
