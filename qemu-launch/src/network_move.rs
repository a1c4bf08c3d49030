//! The network side of `qemu-launch migrate` between two vnpd hosts: before QEMU migrates,
//! the registry is told where the VM goes (`vnpctl vm migrate VM --host H`) and the
//! destination vnpd attaches it as incoming (`vnpctl vnpd attach VM --incoming`); nothing
//! follows after QEMU's migrate (the destination vnpd registers the endpoint on resume, see
//! `docs/architecture.md`, "Live migration"). If the migration does not complete, both steps
//! are undone, so the source keeps serving.

use std::path::{Path, PathBuf};
use std::time::Instant;

use vnp_registry_client::client::RegistryClient;
use vnp_registry_client::StartMigration;
use vnpd_admin_api::VnpdAdminClient;

/// Why [`NetworkMove::prepare`] failed, and whether that left anything to undo.
#[derive(Debug)]
pub struct PrepareError {
    pub message: String,
    /// Nothing of the move is left: the registry refused it, or the destination vnpd refused
    /// the incoming attach and the registry's move was cancelled again.
    pub undone: bool,
}

/// A prepared move; undone on drop unless [`NetworkMove::complete`] was called.
#[derive(Debug)]
pub struct NetworkMove {
    client: RegistryClient,
    dst_admin: VnpdAdminClient,
    vm: String,
    dst_socket: PathBuf,
    prepare_ms: u64,
    completed: bool,
}

impl NetworkMove {
    /// Moves `vm` to `dst_host` in the registry and attaches it as incoming on the vnpd whose
    /// admin socket is `dst_admin`. A failed attach cancels the registry's move.
    pub fn prepare(
        client: RegistryClient,
        dst_admin: &Path,
        vm: &str,
        dst_host: &str,
    ) -> Result<NetworkMove, PrepareError> {
        let started = Instant::now();
        let req = StartMigration {
            host: dst_host.to_string(),
            host_port: None,
        };
        client.start_migration(vm, &req).map_err(|e| PrepareError {
            message: format!("registry: migrating {vm} to {dst_host}: {e}"),
            undone: true,
        })?;
        let admin = VnpdAdminClient::new(dst_admin);
        let attachment = match admin.attach_with(vm, None, None, true) {
            Ok(a) => a,
            Err(e) => {
                let refused = format!("incoming attach of {vm} at {}: {e}", dst_admin.display());
                return Err(match client.cancel_migration(vm) {
                    Ok(_) => PrepareError {
                        message: refused,
                        undone: true,
                    },
                    Err(c) => PrepareError {
                        message: format!(
                            "{refused}; registry: cancelling the migration of {vm}: {c}"
                        ),
                        undone: false,
                    },
                });
            }
        };
        Ok(NetworkMove {
            client,
            dst_admin: admin,
            vm: vm.to_string(),
            dst_socket: attachment.socket_path,
            prepare_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            completed: false,
        })
    }

    /// The destination vnpd's vhost-user socket for the VM.
    pub fn dst_socket(&self) -> &Path {
        &self.dst_socket
    }

    /// How long the two steps took, milliseconds.
    pub fn prepare_ms(&self) -> u64 {
        self.prepare_ms
    }

    /// QEMU migrated: the destination owns the VM now (its vnpd registered it on resume).
    pub fn complete(mut self) {
        self.completed = true;
    }

    /// The migration did not happen: detaches the incoming attachment on the destination
    /// vnpd and cancels the registry's migration (its `incoming` record, the port reserved
    /// on the destination host and that host's access to the VM's secret), so the source
    /// host stays the VM's only home. Both steps are tried; the error names each that failed.
    pub fn undo(mut self) -> Result<(), String> {
        self.completed = true;
        self.undo_steps()
    }

    fn undo_steps(&self) -> Result<(), String> {
        let vm = &self.vm;
        let mut failed = Vec::new();
        if let Err(e) = self.dst_admin.detach(vm) {
            failed.push(format!(
                "detaching the incoming {vm} on the destination vnpd: {e}"
            ));
        }
        if let Err(e) = self.client.cancel_migration(vm) {
            failed.push(format!("registry: cancelling the migration of {vm}: {e}"));
        }
        if failed.is_empty() {
            log::info!("{vm}: incoming attachment detached and the registry's migration cancelled");
            Ok(())
        } else {
            Err(failed.join("; "))
        }
    }
}

impl Drop for NetworkMove {
    /// The fallback when neither `complete` nor `undo` ran (an error on the way).
    fn drop(&mut self) {
        if self.completed {
            return;
        }
        log::warn!(
            "the migration of {} did not complete: undoing the incoming attach and the registry's move",
            self.vm
        );
        if let Err(e) = self.undo_steps() {
            log::error!("{e}");
        }
    }
}
