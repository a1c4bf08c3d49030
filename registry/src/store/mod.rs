//! Persistence behind a narrow trait: load everything at start, commit one batch of [`Op`]s
//! atomically per write request, guarded by the revision the batch was planned on.
//!
//! Two backends:
//! - [`RedbStore`] (the default): one embedded [redb](https://docs.rs/redb) file, one process;
//! - [`EtcdStore`]: an etcd cluster shared by several registry replicas. Every commit is one
//!   etcd transaction guarded by a compare on a version key that every commit bumps, so a
//!   batch planned on an outdated model is refused ([`StoreError::Conflict`]) instead of
//!   half-applied. Replicas follow the store through a [`Feed`].
//!
//! [`conformance`] is the one test suite both backends pass.

use crate::model::{Model, Op};
use std::sync::mpsc::Receiver;
use std::time::Instant;

pub mod conformance;
mod etcd;
mod follow;
mod keys;
mod redb;
pub mod sealing;

pub use etcd::{EtcdConfig, EtcdStore};
pub use redb::RedbStore;

/// Storage failures. Messages never contain secret bytes.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage I/O: {0}")]
    Io(String),
    #[error("stored record {table}/{key} is corrupt: {detail}")]
    Corrupt {
        table: &'static str,
        key: String,
        detail: String,
    },
    /// Another writer committed since the revision the batch was planned on; nothing was
    /// written. `latest` is the revision of that newer commit: re-plan once the model has
    /// caught up with it.
    #[error("a concurrent write (revision {latest}) got in first; nothing was written")]
    Conflict { latest: u64 },
    /// The store did not confirm the commit (timeout, lost connection after sending): it may
    /// or may not have been applied.
    #[error("storage outcome unknown: {0}")]
    Indeterminate(String),
}

/// What the registry needs from a store.
pub trait Store: Send + Sync {
    /// Reads the complete state. [`Model::revision`] says which store revision it reflects.
    fn load(&self) -> Result<Model, StoreError>;

    /// Persists `ops` all-or-nothing, provided nothing was committed after revision `base`
    /// (the [`Model::revision`] the ops were planned on); returns the new revision once the
    /// batch is durable. Refuses with [`StoreError::Conflict`] otherwise.
    fn commit(&self, base: u64, ops: &[Op]) -> Result<u64, StoreError>;

    /// A store that other processes write to as well returns the stream of everything
    /// committed after `from` (its own commits included): the registry applies the model
    /// from that stream only. A private store returns `None`, and the registry applies its
    /// own commits directly.
    fn follow(&self, _from: u64) -> Option<Feed> {
        None
    }
}

/// What a shared store tells its followers.
#[derive(Debug)]
pub enum FeedEvent {
    /// One committed batch, in commit order.
    Batch { revision: u64, ops: Vec<Op> },
    /// The follower fell behind what the store still remembers (compaction) or its stream
    /// stalled: here is the whole state again.
    Snapshot(Box<Model>),
    /// The newest commit in the store was `revision` when asked at `probed_at`; a follower
    /// that has applied `revision` was current at that instant.
    Head { revision: u64, probed_at: Instant },
}

/// The receiving end of a shared store's stream of [`FeedEvent`]s.
pub type Feed = Receiver<FeedEvent>;
