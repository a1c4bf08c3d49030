//! The live model of one registry process and how it follows a shared store.
//!
//! [`Live`] holds the model, wakes long-poll watchers when it changes, lets writers wait until
//! a commit has come back through the store's feed, and tracks since when the model is known
//! to be current (for the bounded-staleness rule on tokens).

use crate::model::{Model, Op};
use crate::store::{Feed, FeedEvent};
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

/// Unanswered staleness probes kept (older ones are dropped: a newer probe supersedes them).
const PENDING_PROBES: usize = 64;

/// The model plus its notifications.
pub struct Live {
    model: RwLock<Model>,
    changed: tokio::sync::watch::Sender<u64>,
    /// The store revision applied, mirrored here so that writers can wait on it.
    applied: Mutex<u64>,
    applied_cv: Condvar,
    freshness: Mutex<Freshness>,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live").finish_non_exhaustive()
    }
}

/// "The model was current at `current_at`", plus probes (revision, instant) still waiting
/// for the model to reach their revision.
struct Freshness {
    current_at: Instant,
    pending: VecDeque<(u64, Instant)>,
}

impl Freshness {
    fn reached(&mut self, revision: u64) {
        while let Some(&(r, at)) = self.pending.front() {
            if r > revision {
                break;
            }
            self.current_at = self.current_at.max(at);
            self.pending.pop_front();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these small locks leaves plain numbers behind: carry on.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Live {
    /// A freshly loaded model: current now.
    pub fn new(model: Model) -> Live {
        let (changed, _) = tokio::sync::watch::channel(model.generation);
        Live {
            applied: Mutex::new(model.revision),
            applied_cv: Condvar::new(),
            model: RwLock::new(model),
            changed,
            freshness: Mutex::new(Freshness {
                current_at: Instant::now(),
                pending: VecDeque::new(),
            }),
        }
    }

    /// A consistent view of the state.
    pub fn read(&self) -> RwLockReadGuard<'_, Model> {
        // A poisoned lock means a panic while applying committed ops; the store is still the
        // truth, but in memory we can only carry on with what we have.
        self.model.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Subscribes to generation changes.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Applies one committed batch (skipped if the model already has it).
    pub fn apply(&self, revision: u64, ops: &[Op]) {
        let generation = {
            let mut model = self.model.write().unwrap_or_else(|p| p.into_inner());
            if revision <= model.revision {
                return;
            }
            model.apply(ops);
            model.revision = revision;
            model.generation
        };
        self.advanced(revision, generation);
    }

    /// Replaces the whole model (a reload after the feed lost its place).
    pub fn replace(&self, fresh: Model) {
        let (revision, generation) = (fresh.revision, fresh.generation);
        *self.model.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        self.advanced(revision, generation);
    }

    fn advanced(&self, revision: u64, generation: u64) {
        lock(&self.freshness).reached(revision);
        *lock(&self.applied) = revision;
        self.applied_cv.notify_all();
        self.changed.send_replace(generation);
    }

    /// The store's newest commit was `revision` at `probed_at`.
    pub fn head(&self, revision: u64, probed_at: Instant) {
        let applied = *lock(&self.applied);
        let mut f = lock(&self.freshness);
        if applied >= revision {
            f.current_at = f.current_at.max(probed_at);
            return;
        }
        if f.pending.len() >= PENDING_PROBES {
            f.pending.pop_front();
        }
        f.pending.push_back((revision, probed_at));
    }

    /// How long ago the model was last known to be current.
    pub fn staleness(&self) -> Duration {
        lock(&self.freshness).current_at.elapsed()
    }

    /// Waits until the model has applied `revision`; false on timeout.
    pub fn wait_applied(&self, revision: u64, timeout: Duration) -> bool {
        let guard = lock(&self.applied);
        let (guard, _) = self
            .applied_cv
            .wait_timeout_while(guard, timeout, |applied| *applied < revision)
            .unwrap_or_else(|p| p.into_inner());
        *guard >= revision
    }

    /// Applies `feed` on a thread of its own until the store closes it.
    pub fn follow(live: Arc<Live>, feed: Feed) -> std::io::Result<()> {
        std::thread::Builder::new()
            .name("registry-follow".into())
            .spawn(move || {
                while let Ok(event) = feed.recv() {
                    match event {
                        FeedEvent::Batch { revision, ops } => live.apply(revision, &ops),
                        FeedEvent::Snapshot(model) => live.replace(*model),
                        FeedEvent::Head {
                            revision,
                            probed_at,
                        } => live.head(revision, probed_at),
                    }
                }
            })
            .map(drop)
    }
}
