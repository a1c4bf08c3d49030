//! The steps every live-migration test takes around the data plane: the registry's migration
//! to another host with that host's incoming attach, and waiting for the destination to
//! register the VM's endpoint after the resume (`migration_hairpin`; `live_migration` and
//! `libvirt` take the same steps).

use crate::cluster::Cluster;
use anyhow::{anyhow, bail, Result};
use std::time::{Duration, Instant};
use vnp_registry_client::{Endpoint, StartMigration};
use vnpd_admin_api::AttachmentInfo;

/// `vm` begins migrating to host `to` at the registry (the source stays the owner), and host
/// `to`'s vnpd attaches it as incoming: the socket the destination QEMU or frontend opens.
pub fn begin_migration(c: &Cluster, vm: &str, to: usize) -> Result<AttachmentInfo> {
    let host = c.host(to).id.clone();
    let id = vm.to_string();
    c.registry(move |r| {
        r.start_migration(
            &id,
            &StartMigration {
                host,
                host_port: None,
            },
        )
    })?;
    c.host(to)
        .admin()
        .attach_with(vm, None, None, true)
        .map_err(|e| anyhow!("incoming attach of {vm} on host {to}: {e}"))
}

/// `vm`'s endpoint as the registry has it.
pub fn endpoint_of(c: &Cluster, vm: &str) -> Result<Option<Endpoint>> {
    let id = vm.to_string();
    Ok(c.registry(move |r| r.get_vm(&id))?.endpoint)
}

/// Waits up to `timeout` for host `host` to register `vm`'s endpoint (its device start after
/// the resume); the endpoint.
pub fn wait_endpoint_on(c: &Cluster, vm: &str, host: usize, timeout: Duration) -> Result<Endpoint> {
    let addr = c.host(host).addr;
    let deadline = Instant::now() + timeout;
    loop {
        match endpoint_of(c, vm)? {
            Some(ep) if ep.host_addr == addr => return Ok(ep),
            ep if Instant::now() >= deadline => {
                bail!("host {host} did not register {vm} within {timeout:?} (endpoint {ep:?})")
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}
