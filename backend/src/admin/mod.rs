//! The local admin API: attach/detach/list/stats over a unix socket, with attachments
//! persisted in the state directory and restored at start.
//!
//! - [`state`]: the persisted attachment list (atomic replace).

pub mod state;
