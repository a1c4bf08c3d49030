//! Fuzz targets for vnp: one pure function per target, taking arbitrary bytes, doing no I/O.
//!
//! The same functions are driven by the AFL++ harness (`fuzz/afl`, built with `cargo afl`,
//! outside the workspace) and by this crate's corpus replay test (`tests/corpus.rs`), which CI
//! runs: every file in `fuzz/corpus/<target>/` goes through its target once. A target panics
//! only on a finding: a panic in the code under test or a broken invariant it asserts.
//! `docs/fuzzing.md` describes the targets, the campaigns and their coverage.

pub mod admin;
pub mod chain;
mod chain_model;
pub mod edge;
pub mod gateway;
mod gateway_lb;
pub mod metadata_http;
pub mod migrate_state;
pub mod nat;
pub mod registry;
pub mod seeds;
pub mod views;
pub mod vnp;

/// One fuzz target.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// Its name: the harness argument and the corpus folder `fuzz/corpus/<name>/`.
    pub name: &'static str,
    /// Runs one input.
    pub run: fn(&[u8]),
}

/// Every target.
pub const TARGETS: &[Target] = &[
    Target {
        name: "vnp_datagram",
        run: vnp::run,
    },
    Target {
        name: "packet_views",
        run: views::run,
    },
    Target {
        name: "edge",
        run: edge::run,
    },
    Target {
        name: "registry_requests",
        run: registry::run,
    },
    Target {
        name: "admin_protocol",
        run: admin::run,
    },
    Target {
        name: "metadata_http",
        run: metadata_http::run,
    },
    Target {
        name: "descriptor_chain",
        run: chain::run,
    },
    Target {
        name: "nat",
        run: nat::run,
    },
    Target {
        name: "gateway",
        run: gateway::run,
    },
    Target {
        name: "migrate_state",
        run: migrate_state::run,
    },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().copied().find(|t| t.name == name)
}

/// Splits off the first byte (the target's mode switches) from the rest.
pub(crate) fn split_mode(data: &[u8]) -> (u8, &[u8]) {
    match data.split_first() {
        Some((mode, rest)) => (*mode, rest),
        None => (0, data),
    }
}
