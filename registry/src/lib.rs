//! The VM registry service: the authority of a vnp virtual network.
//!
//! It keeps VM identities, addresses and secrets, the pair policy and where each VM is served,
//! and mints tokens (patent FIG. 4) for hosts over mutual TLS. Layout:
//!
//! - [`model`]: the whole state in memory plus the [`model::Op`]s that change it;
//! - [`plan`]: pure validation and allocation for every write;
//! - [`policy`], [`tokens`]: pure pair policy and token decisions;
//! - [`store`]: the persistence trait, the redb default and the shared etcd store;
//! - [`follow`]: the live model, kept current from a shared store's feed;
//! - [`service`]: plan -> commit -> apply, and change notification for watchers;
//! - [`backup`]: export/import of the whole model;
//! - [`metastate`], [`credentials`]: metadata state (attributes, projects, signing keys), the
//!   metadata document and the ES256 credentials minted for VMs (issue #11);
//! - [`tls`], [`http`]: mutual TLS and the HTTPS+JSON API; [`metrics`]: counters.

pub mod backup;
pub mod credentials;
pub mod error;
pub mod follow;
pub mod http;
pub mod metastate;
pub mod metrics;
pub mod model;
pub mod plan;
pub mod policy;
pub mod ratelimit;
pub mod service;
pub mod store;
pub mod tls;
pub mod tokens;
