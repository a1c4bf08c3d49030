//! The shared store: an etcd cluster that several registry replicas use at once.
//!
//! `commit` is one etcd transaction: `if mod_revision(P version) <= base then (the batch's
//! puts and deletes, put P version) else get P version`. Every commit bumps `P version`, so a
//! batch planned on a model older than the newest commit fails the compare and writes
//! nothing; the caller re-plans once it has caught up (see `Registry::write`). A single
//! version key is used rather than compares on every key a plan read, because plans read
//! whole indexes (free addresses, ports, MACs) and a range compare would miss deletes.
//!
//! The etcd client is async (tonic); the store owns a small runtime of its own so that the
//! blocking `Store` calls and the background watch work the same from any thread.

use super::keys::{Layout, Write};
use super::sealing::KeyRing;
use super::{Feed, Store, StoreError};
use crate::model::{Model, Op};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, KvClient, Txn, TxnOp,
    TxnOpResponse,
};
use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant};

/// How to reach etcd and how to follow it.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// Client URLs of the cluster members, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Key prefix of this registry's records (default `/vnp/`).
    pub prefix: String,
    /// Seals VM and gateway secrets; etcd only ever sees sealed values.
    pub keys: KeyRing,
    /// Deadline of each etcd request.
    pub request_timeout: Duration,
    /// Deadline of one attempt of a commit; a commit is sent again (safely, see
    /// `Ctx::commit`) until `2 * request_timeout` have passed. Short, because a proposal made
    /// while the etcd leader is being replaced is dropped and only times out.
    pub commit_attempt: Duration,
    /// How often a follower asks etcd for its newest revision (the staleness probe).
    pub probe_interval: Duration,
    /// A follower whose watch has not delivered a revision the probe saw for this long
    /// throws its watch away and reloads everything.
    pub stall_after: Duration,
}

impl EtcdConfig {
    /// Defaults for everything but the endpoints and keys.
    pub fn new(endpoints: Vec<String>, keys: KeyRing) -> EtcdConfig {
        EtcdConfig {
            endpoints,
            prefix: "/vnp/".into(),
            keys,
            request_timeout: Duration::from_secs(5),
            commit_attempt: Duration::from_millis(1500),
            probe_interval: Duration::from_millis(500),
            stall_after: Duration::from_secs(3),
        }
    }
}

/// The etcd backend.
pub struct EtcdStore {
    rt: Option<tokio::runtime::Runtime>,
    pub(super) ctx: Ctx,
}

/// What the commit path and the follower share.
#[derive(Clone)]
pub(super) struct Ctx {
    pub(super) client: Client,
    pub(super) layout: Layout,
    pub(super) ring: KeyRing,
    pub(super) config: EtcdConfig,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.ctx.config.endpoints)
            .field("prefix", &self.ctx.layout.prefix())
            .finish_non_exhaustive()
    }
}

fn io<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Io(e.to_string())
}

/// Runs `fut` with the request deadline; a timeout is reported as such.
pub(super) async fn deadline<T, E: std::fmt::Display>(
    limit: Duration,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r.map_err(io),
        Err(_) => Err(StoreError::Io(format!(
            "etcd did not answer within {limit:?}"
        ))),
    }
}

impl EtcdStore {
    /// Connects to the cluster (any reachable member will do).
    pub fn connect(config: EtcdConfig) -> Result<EtcdStore, StoreError> {
        if config.endpoints.is_empty() {
            return Err(StoreError::Io("no etcd endpoints given".into()));
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("etcd-store")
            .enable_all()
            .build()
            .map_err(io)?;
        let options = ConnectOptions::new()
            .with_connect_timeout(config.request_timeout)
            .with_keep_alive(Duration::from_secs(2), config.request_timeout)
            // A member cut off from the quorum must not feed us a frozen view.
            .with_require_leader(true);
        let client = rt.block_on(deadline(
            config.request_timeout,
            Client::connect(config.endpoints.clone(), Some(options)),
        ))?;
        let ctx = Ctx {
            client,
            layout: Layout::new(&config.prefix),
            ring: config.keys.clone(),
            config,
        };
        Ok(EtcdStore { rt: Some(rt), ctx })
    }

    fn block_on<F: Future>(&self, fut: F) -> F::Output {
        // Invariant: `rt` is only taken in `drop`.
        self.rt
            .as_ref()
            .expect("runtime present until drop")
            .block_on(fut)
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        // The store may be dropped on an async thread, where a blocking shutdown would panic.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Ctx {
    fn kv(&self) -> KvClient {
        self.client.kv_client()
    }

    /// Everything under the prefix, read at one revision.
    pub(super) async fn load(&self) -> Result<Model, StoreError> {
        let resp = deadline(
            self.config.request_timeout,
            self.kv()
                .get(self.layout.prefix(), Some(GetOptions::new().with_prefix())),
        )
        .await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let mut ops = Vec::with_capacity(resp.kvs().len());
        for kv in resp.kvs() {
            let key = kv.key_str().map_err(io)?;
            if let Some(op) = self.layout.decode_put(key, kv.value(), &self.ring)? {
                ops.push(op);
            }
        }
        let mut model = Model::default();
        model.apply(&ops);
        model.revision = u64::try_from(revision).unwrap_or(0);
        Ok(model)
    }

    /// The revision of the newest commit (the `version` key's `mod_revision`; 0 if none).
    pub(super) async fn head(&self) -> Result<u64, StoreError> {
        let resp = deadline(
            self.config.request_timeout,
            self.kv().get(self.layout.version_key(), None),
        )
        .await?;
        Ok(resp
            .kvs()
            .first()
            .map_or(0, |kv| kv.mod_revision().max(0) as u64))
    }

    /// One guarded transaction. The version key's value is a fresh commit id, so that after
    /// an answer got lost (a leader died mid-request) the same transaction can be sent again:
    /// if the first one landed, the compare fails and the version key still names this commit,
    /// which is then reported as done; otherwise the retry applies it. Either way it is applied
    /// once.
    async fn commit(&self, base: u64, ops: &[Op]) -> Result<u64, StoreError> {
        let version = self.layout.version_key();
        let commit_id = commit_id()?;
        let mut then = txn_ops(&self.layout, &self.ring, ops)?;
        then.push(TxnOp::put(version.clone(), commit_id.clone(), None));
        let guard = i64::try_from(base).map_err(io)?.saturating_add(1);
        let txn = Txn::new()
            .when(vec![Compare::mod_revision(
                version.clone(),
                CompareOp::Less,
                guard,
            )])
            .and_then(then)
            .or_else(vec![TxnOp::get(version, None)]);
        let started = Instant::now();
        let mut kv = self.kv();
        let resp = loop {
            let attempt = tokio::time::timeout(self.config.commit_attempt, kv.txn(txn.clone()));
            let why = match attempt.await {
                Ok(Ok(resp)) => break resp,
                // Refused before it was applied (bad request, too many operations).
                Ok(Err(e)) if is_refusal(&e) => return Err(io(e)),
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!(
                    "etcd did not answer within {:?}",
                    self.config.commit_attempt
                ),
            };
            if started.elapsed() + self.config.commit_attempt > self.config.request_timeout * 2 {
                return Err(StoreError::Indeterminate(why));
            }
            log::warn!("commit on revision {base}: {why}; sending it again");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        if resp.succeeded() {
            return Ok(resp.header().map_or(0, |h| h.revision().max(0) as u64));
        }
        let current = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => g
                .kvs()
                .first()
                .map(|kv| (kv.mod_revision().max(0) as u64, kv.value().to_vec())),
            _ => None,
        });
        match current {
            // An earlier attempt of this very commit landed.
            Some((revision, id)) if id == commit_id.as_bytes() => Ok(revision),
            Some((latest, _)) => Err(StoreError::Conflict { latest }),
            None => Err(StoreError::Conflict { latest: base + 1 }),
        }
    }
}

/// 128 random bits in hex, naming one commit.
fn commit_id() -> Result<String, StoreError> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(io)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// gRPC statuses that mean etcd refused the request outright (it did not apply it).
fn is_refusal(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => matches!(
            s.code(),
            tonic::Code::InvalidArgument
                | tonic::Code::FailedPrecondition
                | tonic::Code::ResourceExhausted
                | tonic::Code::PermissionDenied
                | tonic::Code::Unauthenticated
        ),
        _ => false,
    }
}

/// The batch as etcd operations. etcd refuses a transaction that names a key twice, so a key
/// written more than once keeps only its last write (which is what applying in order gives).
fn txn_ops(layout: &Layout, ring: &KeyRing, ops: &[Op]) -> Result<Vec<TxnOp>, StoreError> {
    let mut writes: Vec<Option<Write>> = Vec::with_capacity(ops.len());
    let mut last: HashMap<String, usize> = HashMap::new();
    for op in ops {
        let w = layout.encode(op, ring)?;
        if let Write::Put(k, _) | Write::Delete(k) = &w {
            if let Some(i) = last.insert(k.clone(), writes.len()) {
                writes[i] = None;
            }
        }
        writes.push(Some(w));
    }
    Ok(writes
        .into_iter()
        .flatten()
        .map(|w| match w {
            Write::Put(k, v) => TxnOp::put(k, v, None),
            Write::Delete(k) => TxnOp::delete(k, None),
            Write::DeleteRange(from, to) => {
                TxnOp::delete(from, Some(DeleteOptions::new().with_range(to)))
            }
        })
        .collect())
}

impl Store for EtcdStore {
    fn load(&self) -> Result<Model, StoreError> {
        self.block_on(self.ctx.load())
    }

    fn commit(&self, base: u64, ops: &[Op]) -> Result<u64, StoreError> {
        self.block_on(self.ctx.commit(base, ops))
    }

    fn follow(&self, from: u64) -> Option<Feed> {
        let (tx, rx) = std::sync::mpsc::channel();
        let ctx = self.ctx.clone();
        self.rt.as_ref()?.spawn(super::follow::run(ctx, from, tx));
        Some(rx)
    }
}
