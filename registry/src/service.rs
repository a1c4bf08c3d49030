//! The registry service object: one in-memory model, one store, serialised writers.
//!
//! With a private store (redb) the registry applies its own commits. With a shared store
//! (etcd) several replicas write, so each applies the model only from the store's feed
//! (`crate::follow`), its own commits included, and a write waits until its commit has come
//! back through the feed (read-your-writes).

use crate::error::{refuse, ApiError};
use crate::follow::Live;
use crate::model::{Model, Op, RememberedWrite, REMEMBER_WRITES_S};
use crate::store::{Store, StoreError};
use crate::tokens::{self, TokenPolicy};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::sync::{Arc, Mutex, RwLockReadGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use vnp_protocol::token::VmSecret;
use vnp_registry_client::api::{ErrorCode, Identity, TokenGrant, TokenRequest};

mod meta;
pub use meta::{GUEST_WRITES_PER_SEC, GUEST_WRITE_BURST};

/// How often a write planned on an outdated model is re-planned before giving up with 409.
const WRITE_ATTEMPTS: usize = 5;
/// How long a writer waits for the feed to catch up with a commit.
const CATCH_UP: Duration = Duration::from_secs(10);

/// Expired idempotency keys dropped per write.
const FORGET_PER_WRITE: usize = 16;

/// A write request's idempotency key plus what it was for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestKey {
    /// The `Idempotency-Key` header.
    pub id: String,
    /// `"<caller> <METHOD> <path>"`.
    pub request: String,
}

fn remembered<T: DeserializeOwned>(
    key: &RequestKey,
    prev: &RememberedWrite,
) -> Result<T, ApiError> {
    if prev.request != key.request {
        return refuse(
            ErrorCode::BadRequest,
            format!(
                "idempotency key {} was used for another request ({})",
                key.id, prev.request
            ),
        );
    }
    serde_json::from_str(&prev.response).map_err(|e| {
        ApiError::new(
            ErrorCode::Internal,
            format!("remembered answer unreadable: {e}"),
        )
    })
}

/// Options beyond the store and the token policy.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// With a shared store: refuse tokens once this replica has not been confirmed current for
    /// longer than this (its watch stalled or it lost etcd).
    pub max_staleness: Duration,
    /// Seals secrets in exports (`--secret-keys`); without it there is no export.
    pub backup_keys: Option<crate::store::sealing::KeyRing>,
    /// A host port a VM gave up goes to no other VM for this long (`--port-quarantine-secs`).
    pub port_quarantine: Duration,
    /// Issuer and lifetime of access and identity tokens.
    pub credentials: crate::credentials::CredentialPolicy,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            max_staleness: Duration::from_secs(5),
            backup_keys: None,
            port_quarantine: Duration::from_secs(crate::plan::DEFAULT_PORT_QUARANTINE_SECS),
            credentials: crate::credentials::CredentialPolicy::default(),
        }
    }
}

/// The registry. Reads (token requests, lookups) share a read lock on the model; writes are
/// serialised, committed to the store first and applied to memory only after the commit.
pub struct Registry {
    live: Arc<Live>,
    store: Box<dyn Store>,
    /// Whether the store is shared (the model follows the store's feed).
    shared: bool,
    writer: Mutex<()>,
    token_policy: TokenPolicy,
    options: RegistryOptions,
    metrics: crate::metrics::Metrics,
    /// Guest attribute writes per VM.
    guest_writes: crate::ratelimit::RateLimiter,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("token_policy", &self.token_policy)
            .field("shared", &self.shared)
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
    pub fn open(store: Box<dyn Store>, token_policy: TokenPolicy) -> Result<Registry, StoreError> {
        Self::open_with(store, token_policy, RegistryOptions::default())
    }

    /// Loads the state from `store`; a shared store is followed from the revision loaded.
    pub fn open_with(
        store: Box<dyn Store>,
        token_policy: TokenPolicy,
        options: RegistryOptions,
    ) -> Result<Registry, StoreError> {
        let model = store.load()?;
        let feed = store.follow(model.revision);
        let live = Arc::new(Live::new(model));
        let shared = feed.is_some();
        if let Some(feed) = feed {
            Live::follow(live.clone(), feed)
                .map_err(|e| StoreError::Io(format!("follower thread: {e}")))?;
        }
        Ok(Registry {
            live,
            store,
            shared,
            writer: Mutex::new(()),
            token_policy,
            options,
            metrics: crate::metrics::Metrics::default(),
            guest_writes: crate::ratelimit::RateLimiter::new(
                GUEST_WRITES_PER_SEC,
                GUEST_WRITE_BURST,
            ),
        })
    }

    /// The clock and quarantine rule for planners that hand out or give up host ports.
    pub fn port_reuse(&self) -> crate::plan::PortReuse {
        crate::plan::PortReuse {
            now: u64::from(unix_now()),
            quarantine_secs: self.options.port_quarantine.as_secs(),
        }
    }

    /// A consistent view of the state.
    pub fn read(&self) -> RwLockReadGuard<'_, Model> {
        self.live.read()
    }

    /// Subscribes to generation changes (for long-poll watchers).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.live.subscribe()
    }

    /// How long ago this replica was last confirmed current (zero for a private store, which
    /// is the truth itself).
    pub fn staleness(&self) -> Duration {
        if self.shared {
            self.live.staleness()
        } else {
            Duration::ZERO
        }
    }

    /// Plans a write against the current model, commits it durably, then applies it. A plan
    /// made on a model that another replica has since changed is re-planned on the newer
    /// model. Blocking (it waits for `fsync` or etcd): call from a blocking thread.
    pub fn write<T>(
        &self,
        planner: impl Fn(&Model) -> Result<(Vec<Op>, T), ApiError>,
    ) -> Result<T, ApiError> {
        let _serialised = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        for _ in 0..WRITE_ATTEMPTS {
            let (base, planned) = {
                let model = self.read();
                (model.revision, planner(&model))
            };
            let (ops, out) = planned.inspect_err(|e| self.metrics.write_refused(e.code))?;
            if ops.is_empty() {
                return Ok(out);
            }
            match self.store.commit(base, &ops) {
                Ok(revision) => {
                    self.committed(revision, &ops);
                    self.metrics.write_committed();
                    return Ok(out);
                }
                Err(StoreError::Conflict { latest }) if self.shared => {
                    log::info!(
                        "write planned on revision {base} lost to revision {latest}; re-planning"
                    );
                    self.live.wait_applied(latest, CATCH_UP);
                }
                Err(e) => return Err(self.storage_failed(&e)),
            }
        }
        self.metrics.write_refused(ErrorCode::Conflict);
        refuse(
            ErrorCode::Conflict,
            "concurrent writes through other replicas kept changing what this write depends on; nothing was changed, try again",
        )
    }

    /// [`Registry::write`] for a request that carries an idempotency key: a key already
    /// answered gets the remembered answer and writes nothing; otherwise the answer is
    /// remembered in the same commit as the write. Retries of one request on several replicas
    /// therefore write once (a concurrent retry loses the commit race, re-plans, and finds the
    /// remembered answer).
    pub fn write_once<T: Serialize + DeserializeOwned>(
        &self,
        key: Option<&RequestKey>,
        planner: impl Fn(&Model) -> Result<(Vec<Op>, T), ApiError>,
    ) -> Result<T, ApiError> {
        let Some(key) = key else {
            return self.write(planner);
        };
        self.write(|model| {
            if let Some(prev) = model.requests.get(&key.id) {
                return remembered(key, prev).map(|out| (vec![], out));
            }
            let (mut ops, out) = planner(model)?;
            if ops.is_empty() {
                return Ok((ops, out));
            }
            let response = serde_json::to_string(&out).map_err(|e| {
                ApiError::new(ErrorCode::Internal, format!("answer not serialisable: {e}"))
            })?;
            let now = u64::from(unix_now());
            ops.push(Op::RememberWrite(
                key.id.clone(),
                RememberedWrite {
                    request: key.request.clone(),
                    response,
                    at: now,
                },
            ));
            // Forget old keys a few at a time, so that no single commit grows large.
            let cutoff = now.saturating_sub(REMEMBER_WRITES_S);
            ops.extend(
                model
                    .requests
                    .iter()
                    .filter(|(_, w)| w.at < cutoff)
                    .take(FORGET_PER_WRITE)
                    .map(|(k, _)| Op::ForgetWrite(k.clone())),
            );
            Ok((ops, out))
        })
    }

    /// [`Registry::write_once`] for writes that need a fresh secret.
    pub fn write_once_with_secret<T: Serialize + DeserializeOwned>(
        &self,
        key: Option<&RequestKey>,
        planner: impl Fn(&Model, VmSecret) -> Result<(Vec<Op>, T), ApiError>,
    ) -> Result<T, ApiError> {
        let secret = fresh_secret()?;
        self.write_once(key, |m| planner(m, secret.clone()))
    }

    fn committed(&self, revision: u64, ops: &[Op]) {
        if !self.shared {
            self.live.apply(revision, ops);
        } else if !self.live.wait_applied(revision, CATCH_UP) {
            log::warn!("commit {revision} is durable but not yet back through the store's feed");
        }
    }

    fn storage_failed(&self, e: &StoreError) -> ApiError {
        log::error!("store commit failed: {e}");
        self.metrics.write_refused(ErrorCode::Storage);
        let message = match e {
            StoreError::Indeterminate(_) => {
                "the store did not confirm the change, which may or may not have been applied; read it back before retrying"
            }
            _ => "the registry could not store the change; nothing was changed",
        };
        ApiError::new(ErrorCode::Storage, message)
    }

    /// Decides and mints a token.
    pub fn token(&self, caller: &Identity, req: &TokenRequest) -> Result<TokenGrant, ApiError> {
        let result = self
            .check_current()
            .and_then(|()| tokens::grant(&self.read(), caller, req, unix_now(), self.token_policy));
        match &result {
            Ok(_) => self.metrics.token_granted(),
            Err(e) => self.metrics.token_refused(e.code),
        }
        result
    }

    /// The whole model, secrets sealed with the backup keys.
    pub fn export(&self) -> Result<vnp_registry_client::backup::Export, ApiError> {
        crate::backup::export(&self.read(), self.backup_keys()?)
    }

    /// Loads an export into this (empty) registry, in commits of bounded size; the first
    /// commit checks that the registry is empty. Blocking.
    pub fn import(
        &self,
        export: &vnp_registry_client::backup::Export,
    ) -> Result<vnp_registry_client::backup::ImportSummary, ApiError> {
        let (batches, summary) = crate::backup::import_batches(export, self.backup_keys()?)?;
        for (i, batch) in batches.iter().enumerate() {
            self.write(|m| {
                let mut ops = Vec::new();
                if i == 0 {
                    crate::backup::check_empty(m)?;
                    ops = crate::backup::replace_signing_keys_ops(m, export);
                }
                ops.extend(batch.iter().cloned());
                Ok((ops, ()))
            })?;
        }
        Ok(summary)
    }

    /// Writes every secret again, so that a shared store seals each with the current sealing
    /// key (after a key rotation, before the old key leaves the key file). In commits of
    /// bounded size, each re-planned if other replicas write meanwhile; returns how many.
    /// Blocking.
    pub fn reseal_secrets(&self) -> Result<usize, ApiError> {
        let mut owners: Vec<crate::model::SecretOwner> =
            self.read().secrets.keys().cloned().collect();
        owners.sort();
        let mut done = 0;
        for chunk in owners.chunks(crate::backup::IMPORT_BATCH) {
            done += self.write(|m| {
                let ops: Vec<Op> = chunk
                    .iter()
                    .filter_map(|o| {
                        m.secrets
                            .get(o)
                            .map(|e| Op::PutSecret(o.clone(), e.clone()))
                    })
                    .collect();
                let n = ops.len();
                Ok((ops, n))
            })?;
        }
        Ok(done)
    }

    fn backup_keys(&self) -> Result<&crate::store::sealing::KeyRing, ApiError> {
        self.options.backup_keys.as_ref().ok_or_else(|| {
            ApiError::new(
                ErrorCode::BadRequest,
                "export and import seal secrets with the registry's --secret-keys, which this registry was started without",
            )
        })
    }

    /// Refuses (503) when this replica may have missed changes for longer than the bound: a
    /// token minted from a stale model could carry a moved VM's old tuple or ignore a new deny.
    fn check_current(&self) -> Result<(), ApiError> {
        let age = self.staleness();
        if age <= self.options.max_staleness {
            return Ok(());
        }
        refuse(
            ErrorCode::Unavailable,
            format!(
                "this registry replica has not been confirmed current for {} ms (bound {} ms); ask another replica",
                age.as_millis(),
                self.options.max_staleness.as_millis()
            ),
        )
    }

    /// The process's counters.
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }

    /// The counters plus gauges of the current state, in Prometheus text format.
    pub fn render_metrics(&self) -> String {
        let (networks, hosts, vms, rules, generation, revision) = {
            let m = self.read();
            (
                m.networks.len(),
                m.hosts.len(),
                m.vms.len(),
                m.rules.len(),
                m.generation,
                m.revision,
            )
        };
        let staleness_ms = u64::try_from(self.staleness().as_millis()).unwrap_or(u64::MAX);
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
            (
                "vnp_registry_store_revision",
                "Store revision the in-memory model reflects.",
                revision,
            ),
            (
                "vnp_registry_staleness_ms",
                "Milliseconds since this replica was last confirmed current (0 with redb).",
                staleness_ms,
            ),
        ])
    }

    /// Convenience for writes that need a fresh secret.
    pub fn write_with_secret<T>(
        &self,
        planner: impl Fn(&Model, VmSecret) -> Result<(Vec<crate::model::Op>, T), ApiError>,
    ) -> Result<T, ApiError> {
        let secret = fresh_secret()?;
        self.write(|m| planner(m, secret.clone()))
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
        fn commit(&self, base: u64, _: &[Op]) -> Result<u64, StoreError> {
            if self.0.load(Ordering::SeqCst) {
                Err(StoreError::Io("No space left on device".into()))
            } else {
                Ok(base + 1)
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
            fn commit(&self, base: u64, ops: &[Op]) -> Result<u64, StoreError> {
                self.0.commit(base, ops)
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

    #[test]
    fn a_keyed_write_is_written_once_and_answered_again() {
        let dir = std::env::temp_dir().join(format!("vnp-once-{}", std::process::id()));
        let reg = Registry::open(
            Box::new(crate::store::RedbStore::open(&dir).unwrap()),
            TokenPolicy { ttl_s: 600 },
        )
        .unwrap();
        let spec = |id: &str, cidr: &str| NetworkSpec {
            id: id.into(),
            vni: None,
            cidr: cidr.parse().unwrap(),
            mtu: None,
            default_policy: None,
            nat_block: None,
        };
        let key = RequestKey {
            id: "0123456789abcdef".into(),
            request: "admin:a POST /v1/networks".into(),
        };
        let n1 = spec("n1", "10.1.0.0/24");
        let first = reg
            .write_once(Some(&key), |m| plan::create_network(m, &n1))
            .unwrap();
        let revision = reg.read().revision;
        // The retry (say, on another replica after a lost answer) gets the same answer.
        let again = reg
            .write_once(Some(&key), |m| plan::create_network(m, &n1))
            .unwrap();
        assert_eq!(again, first);
        assert_eq!(
            reg.read().revision,
            revision,
            "nothing written the second time"
        );
        // Without the key the same request is a second write, refused as a duplicate.
        let err = reg.write(|m| plan::create_network(m, &n1)).unwrap_err();
        assert_eq!(err.code, ErrorCode::Duplicate);
        // The key for another request is refused rather than answered with the wrong thing.
        let other = RequestKey {
            request: "admin:a DELETE /v1/networks/n1".into(),
            ..key.clone()
        };
        let n2 = spec("n2", "10.2.0.0/24");
        let err = reg
            .write_once(Some(&other), |m| plan::create_network(m, &n2))
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::BadRequest);
        assert!(!reg.read().networks.contains_key("n2"));
        drop(reg);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
