//! Following an etcd store: a watch from the revision the replica loaded, a probe that bounds
//! how stale the replica may be, and a full reload when the watch cannot continue.
//!
//! - The watch turns each etcd revision under the prefix into one [`FeedEvent::Batch`].
//! - Every `probe_interval` a linearizable read of the version key yields
//!   [`FeedEvent::Head`]: "the newest commit was R at instant T". A replica that has applied R
//!   was current at T; the registry refuses tokens once that instant is too long ago.
//! - If the watch is cancelled because its revision was compacted, or it has not delivered a
//!   revision the probe saw for `stall_after`, the follower reloads everything
//!   ([`FeedEvent::Snapshot`]) and watches on from there.

use super::etcd::{deadline, Ctx};
use super::{FeedEvent, StoreError};
use etcd_client::{EventType, WatchOptions, WatchResponse};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Why a watch ended.
enum WatchEnd {
    /// The feed's receiver is gone: the registry shut down.
    Closed,
    /// The connection broke; watching on from the last revision is fine.
    Broken(String),
    /// The revision to resume from is no longer in etcd, or the watch stalled: reload.
    Reload(String),
}

/// The follower task: runs until the registry drops the feed.
pub(super) async fn run(ctx: Ctx, from: u64, tx: Sender<FeedEvent>) {
    let applied = Arc::new(AtomicU64::new(from));
    let stalled = Arc::new(Notify::new());
    let probe = tokio::spawn(probe(
        ctx.clone(),
        applied.clone(),
        stalled.clone(),
        tx.clone(),
    ));
    loop {
        match watch(&ctx, &applied, &stalled, &tx).await {
            WatchEnd::Closed => break,
            WatchEnd::Broken(why) => {
                log::warn!(
                    "etcd watch broke ({why}); resuming after revision {}",
                    applied.load(Ordering::SeqCst)
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            WatchEnd::Reload(why) => {
                log::warn!("etcd watch cannot continue ({why}); reloading the whole state");
                if !reload(&ctx, &applied, &tx).await {
                    break;
                }
            }
        }
    }
    probe.abort();
}

/// Loads everything until it works; false if the registry is gone.
async fn reload(ctx: &Ctx, applied: &AtomicU64, tx: &Sender<FeedEvent>) -> bool {
    loop {
        match ctx.load().await {
            Ok(model) => {
                applied.store(model.revision, Ordering::SeqCst);
                return tx.send(FeedEvent::Snapshot(Box::new(model))).is_ok();
            }
            Err(e) => {
                log::warn!("reloading from etcd failed: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

async fn watch(
    ctx: &Ctx,
    applied: &AtomicU64,
    stalled: &Notify,
    tx: &Sender<FeedEvent>,
) -> WatchEnd {
    let start = applied.load(Ordering::SeqCst) + 1;
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(start as i64);
    let mut client = ctx.client.watch_client();
    let mut stream = match deadline(
        ctx.config.request_timeout,
        client.watch(ctx.layout.prefix(), Some(options)),
    )
    .await
    {
        Ok(s) => s,
        Err(e) => return WatchEnd::Broken(e.to_string()),
    };
    loop {
        let msg = tokio::select! {
            m = stream.message() => m,
            () = stalled.notified() => return WatchEnd::Reload("no progress while etcd moved on".into()),
        };
        let resp = match msg {
            Ok(Some(resp)) => resp,
            Ok(None) => return WatchEnd::Broken("stream ended".into()),
            Err(e) => return WatchEnd::Broken(e.to_string()),
        };
        if resp.compact_revision() > 0 {
            return WatchEnd::Reload(format!(
                "revision {start} was compacted (oldest kept: {})",
                resp.compact_revision()
            ));
        }
        if resp.canceled() {
            return WatchEnd::Broken(format!("cancelled: {}", resp.cancel_reason()));
        }
        match batches(ctx, &resp) {
            Ok(list) => {
                for (revision, ops) in list {
                    applied.store(revision, Ordering::SeqCst);
                    if tx.send(FeedEvent::Batch { revision, ops }).is_err() {
                        return WatchEnd::Closed;
                    }
                }
            }
            Err(e) => return WatchEnd::Reload(format!("undecodable event: {e}")),
        }
    }
}

/// The response's events grouped by revision, in order.
fn batches(
    ctx: &Ctx,
    resp: &WatchResponse,
) -> Result<Vec<(u64, Vec<crate::model::Op>)>, StoreError> {
    let mut out: Vec<(u64, Vec<crate::model::Op>)> = Vec::new();
    for event in resp.events() {
        let Some(kv) = event.kv() else { continue };
        let revision = kv.mod_revision().max(0) as u64;
        let key = kv.key_str().map_err(|e| StoreError::Io(e.to_string()))?;
        let op = match event.event_type() {
            EventType::Put => ctx.layout.decode_put(key, kv.value(), &ctx.ring)?,
            EventType::Delete => ctx.layout.decode_delete(key),
        };
        match out.last_mut() {
            Some((r, ops)) if *r == revision => ops.extend(op),
            _ => out.push((revision, op.into_iter().collect())),
        }
    }
    Ok(out)
}

/// Periodically reads the newest commit revision; flags a stall when the watch stays behind
/// a revision the probe saw for longer than `stall_after`.
async fn probe(ctx: Ctx, applied: Arc<AtomicU64>, stalled: Arc<Notify>, tx: Sender<FeedEvent>) {
    let mut behind_since: Option<(u64, Instant)> = None;
    let mut tick = tokio::time::interval(ctx.config.probe_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let probed_at = Instant::now();
        let revision = match ctx.head().await {
            Ok(r) => r,
            Err(e) => {
                log::debug!("etcd probe failed: {e}");
                continue;
            }
        };
        if tx
            .send(FeedEvent::Head {
                revision,
                probed_at,
            })
            .is_err()
        {
            return;
        }
        if applied.load(Ordering::SeqCst) >= revision {
            behind_since = None;
            continue;
        }
        let (_, since) = *behind_since.get_or_insert((revision, probed_at));
        if since.elapsed() > ctx.config.stall_after {
            behind_since = None;
            stalled.notify_one();
        }
    }
}
