//! `qemu-launch migrate` (the binary's subcommand): boot the source, do the network steps,
//! migrate, report; and when the migration is refused, fails or is cancelled, undo the network steps and
//! show that the source still has the guest.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use qemu_launch::network_move::NetworkMove;
use qemu_launch::probe::ProbeReport;
use qemu_launch::{migrate, Guest, GuestSpec, MigrateOptions, MigrationReport};
use serde_json::{json, Value};

use crate::{emit, GuestArgs, NetworkArgs};

/// The exit status of a migration that was refused, failed or was cancelled while everything was put back:
/// the network steps undone and the guest running on the source.
pub const EXIT_NOT_MIGRATED: u8 = 2;
/// The exit status after a second SIGINT/SIGTERM (nothing is undone then).
const EXIT_INTERRUPTED: i32 = 130;
/// How long a source may take to run again after a failed migration (QEMU restarts it when
/// the failure came after it stopped the guest).
const SOURCE_RUNNING_WITHIN: Duration = Duration::from_secs(10);

/// What `migrate` runs besides the network steps.
pub struct MigrationSteps {
    pub uri: Option<String>,
    pub before: Option<String>,
    pub after: Option<String>,
    pub boot_timeout: u64,
    pub downtime_limit_ms: Option<u64>,
    pub max_bandwidth: Option<u64>,
}

/// The first SIGINT or SIGTERM sets the flag (the migration is cancelled); a second one ends
/// the process at once with status 130.
fn cancel_on_signal() -> Result<Arc<AtomicBool>, String> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // Registered first, so it sees the flag as the previous signal left it.
        signal_hook::flag::register_conditional_shutdown(sig, EXIT_INTERRUPTED, Arc::clone(&flag))
            .and_then(|_| signal_hook::flag::register(sig, Arc::clone(&flag)))
            .map_err(|e| format!("installing signal handler: {e}"))?;
    }
    Ok(flag)
}

/// Runs `cmd` in `g`, failing on a non-zero status.
fn run_in(g: &mut Guest, cmd: &str) -> Result<String, String> {
    g.run_ok(cmd, Duration::from_secs(60))
        .map_err(|e| e.to_string())
}

/// Runs `cmd` (`--after`) in `g`: its status and output for the report.
fn run_after(g: &mut Guest, cmd: Option<&str>) -> Result<Option<Value>, String> {
    let Some(cmd) = cmd else {
        return Ok(None);
    };
    let out = g
        .run(cmd, Duration::from_secs(60))
        .map_err(|e| e.to_string())?;
    Ok(Some(
        json!({ "status": out.status, "stdout": out.stdout, "stderr": out.stderr }),
    ))
}

/// Boots the source guest, waits for its DHCP lease when the probe needs the network (init
/// answers on the command channel before DHCP is done), and runs `--before` in it.
fn boot_source(
    args: &GuestArgs,
    spec: GuestSpec,
    steps: &MigrationSteps,
    needs_lease: bool,
) -> Result<Guest, String> {
    let boot = args.image()?.boot_files();
    let mut src = Guest::launch_with(spec, &boot, false).map_err(|e| e.to_string())?;
    src.wait_ready(Duration::from_secs(steps.boot_timeout))
        .map_err(|e| e.to_string())?;
    if needs_lease {
        src.wait_lease(Duration::from_secs(steps.boot_timeout))
            .map_err(|e| e.to_string())?;
    }
    if let Some(cmd) = &steps.before {
        let out = src
            .run(cmd, Duration::from_secs(60))
            .map_err(|e| e.to_string())?;
        eprintln!(
            "qemu-launch: before (status {}): {}",
            out.status,
            out.stdout.trim_end()
        );
    }
    Ok(src)
}

/// Lets the probe run `--probe-settle-secs` on `g`, stops it and reads it.
fn stop_probe(g: &mut Guest, net: &NetworkArgs) -> Result<Option<ProbeReport>, String> {
    if net.probe.is_none() {
        return Ok(None);
    }
    std::thread::sleep(Duration::from_secs(net.probe_settle_secs));
    let out = run_in(g, &qemu_launch::probe::stop_command())?;
    qemu_launch::probe::parse(&out, net.probe_interval_ms)
        .map(Some)
        .ok_or_else(|| format!("the probe got no reply at all:\n{out}"))
}

/// The source and destination must both be vnpd sockets (or both QEMU's test NIC).
fn check_endpoints(
    src_spec: &GuestSpec,
    net: &NetworkArgs,
    dst_socket: Option<&PathBuf>,
) -> Result<(), String> {
    if src_spec.vhost_user_socket.is_none() && src_spec.test_netdev.is_none() {
        return Err(
            "give --socket and --dst-host/--dst-socket (two vnpd hosts) or --test-netdev user"
                .into(),
        );
    }
    if src_spec.vhost_user_socket.is_some() && dst_socket.is_none() && net.dst_host.is_none() {
        return Err(
            "--socket needs --dst-host with --dst-admin (qemu-launch prepares the destination) or --dst-socket (prepared by hand)".into(),
        );
    }
    Ok(())
}

/// Waits until the source runs the guest again after a failed migration.
fn wait_source_running(src: &mut Guest) -> Result<(), String> {
    let deadline = Instant::now() + SOURCE_RUNNING_WITHIN;
    loop {
        let st = src.status().map_err(|e| e.to_string())?;
        if st.running {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the source is {} {SOURCE_RUNNING_WITHIN:?} after the failed migration",
                st.status
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn run_migration(
    args: &GuestArgs,
    net: &NetworkArgs,
    dst_socket: Option<PathBuf>,
    steps: MigrationSteps,
) -> Result<ExitCode, String> {
    let cancel = cancel_on_signal()?;
    let src_spec = args.spec()?;
    check_endpoints(&src_spec, net, dst_socket.as_ref())?;
    let mut src = boot_source(args, src_spec.clone(), &steps, net.probe.is_some())?;
    if cancel.load(Ordering::Relaxed) {
        return Err(format!(
            "{} while {} booted: no migration began, nothing was moved",
            qemu_launch::migration::CANCELLED,
            src.name()
        ));
    }
    if let Some(peer) = &net.probe {
        run_in(
            &mut src,
            &qemu_launch::probe::start_command(peer, net.probe_interval_ms),
        )?;
        std::thread::sleep(Duration::from_secs(net.probe_settle_secs));
    }
    // The network steps come before QEMU migrates; nothing follows after it.
    let moved = match (&net.dst_host, &net.dst_admin, &args.vm) {
        (Some(host), Some(admin), Some(vm)) => {
            match NetworkMove::prepare(args.registry_client()?, admin, vm, host) {
                Ok(m) => Some(m),
                Err(e) if e.undone => {
                    // Refused (or the registry unreachable) before QEMU was asked: nothing
                    // moved, the source serves.
                    let error = format!("the migration could not be prepared: {}", e.message);
                    return not_migrated(src, &error, Ok(Some(())), net, &steps);
                }
                Err(e) => {
                    return Err(format!(
                        "{} (the VM may be left half-moved: check `vnpctl vm get` and the \
                         destination's `vnpctl vnpd list`)",
                        e.message
                    ))
                }
            }
        }
        _ => None,
    };
    let mut dst_spec = src_spec.clone();
    dst_spec.name = format!("{}-dst", src_spec.name);
    dst_spec.vhost_user_socket = moved
        .as_ref()
        .map(|m| m.dst_socket().to_path_buf())
        .or(dst_socket);
    dst_spec.work_dir = src_spec.work_dir.as_ref().map(|d| Path::new(d).join("dst"));
    let opts = MigrateOptions {
        uri: steps.uri.clone(),
        downtime_limit_ms: steps.downtime_limit_ms,
        max_bandwidth: steps.max_bandwidth,
        cancel: Some(Arc::clone(&cancel)),
        ..MigrateOptions::default()
    };
    let outcome = if cancel.load(Ordering::Relaxed) {
        Err(format!(
            "{} before QEMU's migrate",
            qemu_launch::migration::CANCELLED
        ))
    } else {
        migrate(&mut src, dst_spec, &opts).map_err(|e| e.to_string())
    };
    match outcome {
        Ok((dst, report)) => {
            drop(src);
            migrated(dst, report, moved, net, &steps)
        }
        Err(error) => {
            let undone = moved.map(NetworkMove::undo).transpose();
            not_migrated(src, &error, undone, net, &steps)
        }
    }
}

/// QEMU migrated: the report, with the probe and `--after` read on the destination.
fn migrated(
    mut dst: Guest,
    report: MigrationReport,
    moved: Option<NetworkMove>,
    net: &NetworkArgs,
    steps: &MigrationSteps,
) -> Result<ExitCode, String> {
    let prepare_ms = moved.map(|m| {
        let ms = m.prepare_ms();
        m.complete();
        ms
    });
    let probe = stop_probe(&mut dst, net)?;
    let after = run_after(&mut dst, steps.after.as_deref())?;
    let json = json!({
        "migration": report,
        "network_prepare_ms": prepare_ms,
        "probe": probe,
        "after": after,
    });
    emit_json(&json)?;
    dst.shutdown(Duration::from_secs(30))
        .map_err(|e| e.to_string())?;
    Ok(ExitCode::SUCCESS)
}

/// The migration was refused, failed or was cancelled, and the network steps were undone
/// (`undone`: `Ok(None)` when there were none): check that the source runs the guest, read
/// the probe and run `--after` there, report, and exit with [`EXIT_NOT_MIGRATED`] (or fail if
/// something could not be put back).
fn not_migrated(
    mut src: Guest,
    error: &str,
    undone: Result<Option<()>, String>,
    net: &NetworkArgs,
    steps: &MigrationSteps,
) -> Result<ExitCode, String> {
    let summary = error.lines().next().unwrap_or(error).to_string();
    eprintln!("qemu-launch: error: {error}");
    if let Err(e) = &undone {
        return Err(format!(
            "{summary}; undoing the network steps failed: {e} (the VM may be left half-moved: \
             check `vnpctl vm get` and the destination's `vnpctl vnpd list`)"
        ));
    }
    wait_source_running(&mut src)?;
    let probe = stop_probe(&mut src, net)?;
    let after = run_after(&mut src, steps.after.as_deref())?;
    let json = json!({
        "migration": null,
        "error": summary,
        "cancelled": error.contains(qemu_launch::migration::CANCELLED),
        "network_undone": matches!(undone, Ok(Some(()))),
        "source_running": true,
        "probe": probe,
        "after": after,
    });
    emit_json(&json)?;
    eprintln!(
        "qemu-launch: {summary}; the source kept the guest{} (exit status {EXIT_NOT_MIGRATED})",
        if net.dst_host.is_some() {
            " and the network steps were undone"
        } else {
            ""
        }
    );
    src.shutdown(Duration::from_secs(30))
        .map_err(|e| e.to_string())?;
    Ok(ExitCode::from(EXIT_NOT_MIGRATED))
}

fn emit_json(json: &Value) -> Result<(), String> {
    emit(&format!(
        "{}\n",
        serde_json::to_string_pretty(json).map_err(|e| e.to_string())?
    ));
    Ok(())
}
