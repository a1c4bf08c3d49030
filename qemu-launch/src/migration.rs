//! Live migration of a running guest to a new QEMU process (on this or another vnpd host).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::guest::Guest;
use crate::spec::GuestSpec;

#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// Migration stream address. `None`: a unix socket in the destination's work dir (both
    /// QEMUs on one machine; it also works across network namespaces).
    /// Otherwise e.g. `tcp:198.18.0.2:4444`.
    pub uri: Option<String>,
    /// Whole-migration limit, after which it is cancelled and the source keeps running.
    pub timeout: Duration,
    /// `max-bandwidth` in bytes/s; `None`: QEMU's default, 128 MiB/s. Set on every migration,
    /// since QEMU keeps the value of an earlier one from the same source.
    pub max_bandwidth: Option<u64>,
    /// `downtime-limit` in ms; `None`: QEMU's default, 300. Set on every migration likewise.
    pub downtime_limit_ms: Option<u64>,
    /// Set it (e.g. from a SIGINT handler) to cancel the migration: `migrate` sends QMP
    /// `migrate_cancel` to the source and fails with [`CANCELLED`] in the reason, unless
    /// QEMU completed first. The source keeps running either way.
    pub cancel: Option<Arc<AtomicBool>>,
}

/// QEMU's default `max-bandwidth`, bytes/s.
const QEMU_MAX_BANDWIDTH: u64 = 128 << 20;
/// QEMU's default `downtime-limit`, ms.
const QEMU_DOWNTIME_LIMIT_MS: u64 = 300;

/// What the reason of a migration error starts with when [`MigrateOptions::cancel`] stopped it.
pub const CANCELLED: &str = "cancelled on request";

impl Default for MigrateOptions {
    fn default() -> Self {
        Self {
            uri: None,
            timeout: Duration::from_secs(120),
            max_bandwidth: None,
            downtime_limit_ms: None,
            cancel: None,
        }
    }
}

/// What `query-migrate` said when the migration completed, plus the harness's own timing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MigrationReport {
    pub status: String,
    /// QEMU's `total-time`: from `migrate` to completion.
    pub total_ms: u64,
    /// QEMU's `downtime`: how long the guest was stopped.
    pub downtime_ms: u64,
    pub setup_ms: u64,
    pub ram_transferred_bytes: u64,
    pub ram_total_bytes: u64,
    pub dirty_sync_count: u64,
    /// Harness wall clock from issuing `migrate` to the destination reporting `running`.
    pub wall_ms_until_destination_running: u64,
}

/// One `query-migrate` answer, reduced to what the harness acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationProgress {
    InProgress(String),
    Completed(MigrationReport),
    Failed(String),
}

/// Interprets a `query-migrate` return value. Pure.
pub fn parse_query_migrate(v: &Value) -> MigrationProgress {
    let status = v
        .get("status")
        .and_then(Value::as_str)
        .unwrap_or("none")
        .to_string();
    let num = |ptr: &str| v.pointer(ptr).and_then(Value::as_u64).unwrap_or(0);
    match status.as_str() {
        "completed" => MigrationProgress::Completed(MigrationReport {
            status,
            total_ms: num("/total-time"),
            downtime_ms: num("/downtime"),
            setup_ms: num("/setup-time"),
            ram_transferred_bytes: num("/ram/transferred"),
            ram_total_bytes: num("/ram/total"),
            dirty_sync_count: num("/ram/dirty-sync-count"),
            wall_ms_until_destination_running: 0,
        }),
        "failed" | "cancelled" => {
            MigrationProgress::Failed(match v.get("error-desc").and_then(Value::as_str) {
                Some(why) => format!("{status}: {why}"),
                None => status,
            })
        }
        // "none" right after `migrate` is issued, then setup/active/device/...; "cancelling"
        // until the source has its state back.
        _ => MigrationProgress::InProgress(status),
    }
}

/// Checks a destination spec can receive the source's state (same devices and sizes).
pub fn check_compatible(src: &GuestSpec, dst: &GuestSpec) -> Result<()> {
    let mismatch = |what: &str| {
        Err(Error::InvalidSpec(format!(
            "destination {what} differs from the source's"
        )))
    };
    if src.memory_mib != dst.memory_mib {
        return mismatch("memory_mib");
    }
    if src.cpus != dst.cpus {
        return mismatch("cpus");
    }
    if src.mac != dst.mac {
        return mismatch("mac");
    }
    if src.vhost_user_socket.is_some() != dst.vhost_user_socket.is_some()
        || src.test_netdev != dst.test_netdev
    {
        return mismatch("NIC type");
    }
    if src.vhost_user_socket.is_some() && src.queue_pairs != dst.queue_pairs {
        return mismatch("queue_pairs");
    }
    if src.accel != dst.accel {
        return mismatch("accelerator");
    }
    if src.name == dst.name && src.work_dir.is_some() && src.work_dir == dst.work_dir {
        return mismatch("work_dir (must not be the same)");
    }
    Ok(())
}

/// Migrates the running `src` guest into a new QEMU started from `dst_spec` (`-incoming defer`,
/// typically wired to the destination host's vnpd socket). On success the source QEMU has
/// exited and the returned destination guest is live with its command channel connected. On
/// failure the destination is stopped and the source keeps running.
pub fn migrate(
    src: &mut Guest,
    dst_spec: GuestSpec,
    opts: &MigrateOptions,
) -> Result<(Guest, MigrationReport)> {
    check_compatible(src.spec(), &dst_spec)?;
    let boot = src.boot_files().clone();
    let mut dst = Guest::launch_incoming(dst_spec, &boot)?;
    let uri = opts
        .uri
        .clone()
        .unwrap_or_else(|| format!("unix:{}", dst.work_dir().join("migrate.sock").display()));
    let fail = migration_error;

    dst.qmp_execute("migrate-incoming", Some(json!({ "uri": uri })))?;
    // QEMU keeps migration parameters across migrations of one source (a cancelled slow
    // migration would slow the next one down): both are set every time.
    let params = json!({
        "max-bandwidth": opts.max_bandwidth.unwrap_or(QEMU_MAX_BANDWIDTH),
        "downtime-limit": opts.downtime_limit_ms.unwrap_or(QEMU_DOWNTIME_LIMIT_MS),
    });
    src.qmp_execute("migrate-set-parameters", Some(params))?;
    let started = Instant::now();
    src.qmp_execute("migrate", Some(json!({ "uri": uri })))?;

    let mut report = wait_completed(src, &mut dst, opts, started)?;

    // The destination resumes on its own once it has the whole state.
    let running_deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = dst.status()?;
        if st.running {
            break;
        }
        if st.status == "inmigrate" || st.status == "paused" || st.status == "prelaunch" {
            if Instant::now() >= running_deadline {
                return Err(fail(
                    src,
                    &dst,
                    format!("destination still {} after completion", st.status),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        return Err(fail(
            src,
            &dst,
            format!("destination in state {} after completion", st.status),
        ));
    }
    report.wall_ms_until_destination_running = started.elapsed().as_millis() as u64;

    // The source is now a stopped copy ("postmigrate"): end it so the guest runs exactly once.
    if src.quit().is_err() {
        src.kill();
    }
    dst.reconnect_channel()?;
    Ok((dst, report))
}

fn migration_error(src: &Guest, dst: &Guest, reason: String) -> Error {
    Error::Migration {
        src: src.name().to_string(),
        dst: dst.name().to_string(),
        reason,
        src_diagnostics: Box::new(src.diagnostics()),
        dst_diagnostics: Box::new(dst.diagnostics()),
    }
}

/// Polls the source's `query-migrate` until QEMU completes; sends `migrate_cancel` when
/// `opts.cancel` is set, the destination exits, or the time is up.
fn wait_completed(
    src: &mut Guest,
    dst: &mut Guest,
    opts: &MigrateOptions,
    started: Instant,
) -> Result<MigrationReport> {
    let fail = migration_error;
    let deadline = started + opts.timeout;
    let mut cancel_sent = false;
    loop {
        if !cancel_sent
            && opts
                .cancel
                .as_ref()
                .is_some_and(|c| c.load(Ordering::Relaxed))
        {
            log::warn!("{}: cancelling the migration (migrate_cancel)", src.name());
            src.qmp_execute("migrate_cancel", None)?;
            cancel_sent = true;
        }
        if !dst.is_running() && !cancel_sent {
            let _ = src.qmp_execute("migrate_cancel", None);
            return Err(fail(
                src,
                dst,
                "destination QEMU exited during migration".into(),
            ));
        }
        let progress = parse_query_migrate(&src.qmp_execute("query-migrate", None)?);
        match progress {
            // Cancelled too late: QEMU finished first, and the guest runs on the destination.
            MigrationProgress::Completed(r) => return Ok(r),
            MigrationProgress::Failed(why) if cancel_sent => {
                return Err(fail(src, dst, format!("{CANCELLED} (QEMU: {why})")))
            }
            MigrationProgress::Failed(why) => return Err(fail(src, dst, why)),
            MigrationProgress::InProgress(status) => {
                if Instant::now() >= deadline {
                    let _ = src.qmp_execute("migrate_cancel", None);
                    return Err(fail(
                        src,
                        dst,
                        format!("not completed within {:?} (status {status})", opts.timeout),
                    ));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{MacAddr, TestNetdev};

    #[test]
    fn query_migrate_parsing() {
        let done = json!({
            "status": "completed", "total-time": 1234, "downtime": 56, "setup-time": 7,
            "ram": {"transferred": 1000, "total": 268435456, "dirty-sync-count": 3}
        });
        assert_eq!(
            parse_query_migrate(&done),
            MigrationProgress::Completed(MigrationReport {
                status: "completed".into(),
                total_ms: 1234,
                downtime_ms: 56,
                setup_ms: 7,
                ram_transferred_bytes: 1000,
                ram_total_bytes: 268435456,
                dirty_sync_count: 3,
                wall_ms_until_destination_running: 0,
            })
        );
        assert_eq!(
            parse_query_migrate(&json!({"status": "failed", "error-desc": "Unable to write"})),
            MigrationProgress::Failed("failed: Unable to write".into())
        );
        assert_eq!(
            parse_query_migrate(&json!({"status": "cancelled"})),
            MigrationProgress::Failed("cancelled".into())
        );
        assert_eq!(
            parse_query_migrate(&json!({"status": "cancelling"})),
            MigrationProgress::InProgress("cancelling".into())
        );
        assert_eq!(
            parse_query_migrate(&json!({"status": "active"})),
            MigrationProgress::InProgress("active".into())
        );
        assert_eq!(
            parse_query_migrate(&json!({})),
            MigrationProgress::InProgress("none".into())
        );
    }

    #[test]
    fn destination_must_match_source() {
        let mac = MacAddr::local_from_name("m");
        let mut src = GuestSpec::new("a", mac);
        src.test_netdev = Some(TestNetdev::UserIsolated);
        let mut dst = src.clone();
        dst.name = "b".into();
        check_compatible(&src, &dst).unwrap();
        let mut d = dst.clone();
        d.memory_mib = 512;
        assert!(check_compatible(&src, &d).is_err());
        let mut d = dst.clone();
        d.test_netdev = None;
        assert!(check_compatible(&src, &d)
            .unwrap_err()
            .to_string()
            .contains("NIC type"));
        let mut d = dst;
        d.mac = MacAddr::local_from_name("other");
        assert!(check_compatible(&src, &d).is_err());
    }
}
