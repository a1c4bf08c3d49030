//! The local admin API: attach/detach/list/stats over a unix socket, with attachments
//! persisted in the state directory and restored at start.
//!
//! - [`state`]: the persisted attachment list (atomic replace).
//! - [`manager`]: attach/detach/list/stats and restore.
//! - [`migration`]: live migration: registration on resume, departure of the source.
//! - [`server`]: the JSON-lines unix socket server.

pub mod manager;
pub mod migration;
pub mod server;
pub mod state;
