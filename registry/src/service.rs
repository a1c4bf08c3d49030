//! The registry service object: one in-memory model, one store, serialised writers.

use crate::error::{refuse, ApiError};
use crate::model::Model;

use crate::store::Store;
use crate::tokens::{self, TokenPolicy};
use std::sync::{Mutex, RwLock, RwLockReadGuard};
use std::time::{SystemTime, UNIX_EPOCH};
use vnp_protocol::token::VmSecret;
use vnp_registry_client::api::{ErrorCode, Identity, TokenGrant, TokenRequest};

/// The registry. Reads (token requests, lookups) share a read lock on the model; writes are
/// serialised, committed to the store first and applied to memory only after the commit.
pub struct Registry {
    model: RwLock<Model>,
    store: Box<dyn Store>,
    writer: Mutex<()>,
    changed: tokio::sync::watch::Sender<u64>,
    token_policy: TokenPolicy,
    metrics: crate::metrics::Metrics,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("token_policy", &self.token_policy)
            .finish_non_exhaustive()
    }
}

/// Seconds since the Unix epoch, saturated into the token's u32.
pub fn unix_now() -> u32 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    u32::try_from(secs).unwrap_or(u32::MAX - 1)
}

/// A fresh secret from the OS CSPRNG.
pub fn fresh_secret() -> Result<VmSecret, ApiError> {
    VmSecret::generate().map_err(|e| {
        log::error!("{e}");
        ApiError::new(
            ErrorCode::Internal,
            "could not draw a random secret; nothing was changed",
        )
    })
}

impl Registry {
    /// Loads the state from `store`.
    pub fn open(
        store: Box<dyn Store>,
        token_policy: TokenPolicy,
    ) -> Result<Registry, crate::store::StoreError> {
        let model = store.load()?;
        let (changed, _) = tokio::sync::watch::channel(model.generation);
        Ok(Registry {
            model: RwLock::new(model),
            store,
            writer: Mutex::new(()),
            changed,
            token_policy,
            metrics: crate::metrics::Metrics::default(),
        })
    }

    /// A consistent view of the state.
    pub fn read(&self) -> RwLockReadGuard<'_, Model> {
        // A poisoned lock means a panic while applying committed ops; the data on disk is
        // still the truth, but in memory we can only carry on with what we have.
        self.model.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Subscribes to generation changes (for long-poll watchers).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Plans a write against the current model, commits it durably, then applies it.
    /// Blocking (it waits for `fsync`): call from a blocking thread.
    pub fn write<T>(
        &self,
        planner: impl FnOnce(&Model) -> Result<(Vec<crate::model::Op>, T), ApiError>,
    ) -> Result<T, ApiError> {
        let _serialised = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let planned = planner(&self.read());
        let (ops, out) = planned.inspect_err(|e| self.metrics.write_refused(e.code))?;
        if ops.is_empty() {
            return Ok(out);
        }
        if let Err(e) = self.store.commit(&ops) {
            log::error!("store commit failed: {e}");
            self.metrics.write_refused(ErrorCode::Storage);
            return refuse(
                ErrorCode::Storage,
                "the registry could not store the change; nothing was changed",
            );
        }
        let generation = {
            let mut model = self.model.write().unwrap_or_else(|p| p.into_inner());
            model.apply(&ops);
            model.generation
        };
        self.changed.send_replace(generation);
        self.metrics.write_committed();
        Ok(out)
    }

    /// Decides and mints a token.
    pub fn token(&self, caller: &Identity, req: &TokenRequest) -> Result<TokenGrant, ApiError> {
        let result = tokens::grant(&self.read(), caller, req, unix_now(), self.token_policy);
        match &result {
            Ok(_) => self.metrics.token_granted(),
            Err(e) => self.metrics.token_refused(e.code),
        }
        result
    }

    /// The counters plus gauges of the current state, in Prometheus text format.
    pub fn render_metrics(&self) -> String {
        let (networks, hosts, vms, rules, generation) = {
            let m = self.read();
            (
                m.networks.len(),
                m.hosts.len(),
                m.vms.len(),
                m.rules.len(),
                m.generation,
            )
        };
        self.metrics.render(&[
            ("vnp_registry_networks", "Networks.", networks as u64),
            ("vnp_registry_hosts", "Hosts.", hosts as u64),
            ("vnp_registry_vms", "VMs.", vms as u64),
            (
                "vnp_registry_policy_rules",
                "Pair-policy rules.",
                rules as u64,
            ),
            (
                "vnp_registry_generation",
                "Generation of the newest VM change.",
                generation,
            ),
        ])
    }

    /// Convenience for writes that need a fresh secret.
    pub fn write_with_secret<T>(
        &self,
        planner: impl FnOnce(&Model, VmSecret) -> Result<(Vec<crate::model::Op>, T), ApiError>,
    ) -> Result<T, ApiError> {
        let secret = fresh_secret()?;
        self.write(|m| planner(m, secret))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Op;
    use crate::plan;
    use crate::store::StoreError;
    use std::sync::atomic::{AtomicBool, Ordering};
    use vnp_registry_client::api::NetworkSpec;

    /// A store whose disk "fills up" on demand: the commit fails before anything is written.
    struct DiskFull(AtomicBool);

    impl Store for DiskFull {
        fn load(&self) -> Result<Model, StoreError> {
            Ok(Model::default())
        }
        fn commit(&self, _: &[Op]) -> Result<(), StoreError> {
            if self.0.load(Ordering::SeqCst) {
                Err(StoreError::Io("No space left on device".into()))
            } else {
                Ok(())
            }
        }
    }

    #[test]
    fn failed_commit_changes_nothing_in_memory() {
        let store = std::sync::Arc::new(DiskFull(AtomicBool::new(true)));
        struct Shared(std::sync::Arc<DiskFull>);
        impl Store for Shared {
            fn load(&self) -> Result<Model, StoreError> {
                self.0.load()
            }
            fn commit(&self, ops: &[Op]) -> Result<(), StoreError> {
                self.0.commit(ops)
            }
        }
        let reg =
            Registry::open(Box::new(Shared(store.clone())), TokenPolicy { ttl_s: 600 }).unwrap();
        let rx = reg.subscribe();
        let spec = NetworkSpec {
            id: "n1".into(),
            vni: None,
            cidr: "10.1.0.0/24".parse().unwrap(),
            mtu: None,
            default_policy: None,
            nat_block: None,
        };
        let err = reg.write(|m| plan::create_network(m, &spec)).unwrap_err();
        assert_eq!(err.code, ErrorCode::Storage);
        assert!(
            !err.message.contains("No space"),
            "store internals stay in the log"
        );
        assert!(reg.read().networks.is_empty());
        assert!(
            !rx.has_changed().unwrap(),
            "watchers are not woken for nothing"
        );
        store.0.store(false, Ordering::SeqCst);
        reg.write(|m| plan::create_network(m, &spec)).unwrap();
        assert_eq!(reg.read().networks.len(), 1);
        assert!(rx.has_changed().unwrap());
    }
}
