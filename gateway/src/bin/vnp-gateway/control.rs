//! The control thread: follows the registry (config + watch), keeps the lookup tables current
//! and the tokens towards VMs fresh. Never on the packet path: the data path only reads the
//! state it publishes and leaves the VMs it lacks a token for in `wants`.

use crate::Shared;
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;
use vnp_gateway::table::NatTable;
use vnp_gateway::tokens::Route;
use vnp_registry_client::{ClientError, RegistryClient};

/// Ask for a token again this long before it expires.
const REFRESH_MARGIN_S: u32 = 120;
/// A VM the registry refused a token for (policy) is asked again after this long, or at once
/// after a config change.
const REFUSED_RETRY_S: u32 = 30;
/// Longest wait of one watch: also how often expiring tokens and `wants` are looked at.
const WATCH: Duration = Duration::from_secs(2);

/// Runs forever: refetch the config whenever the watch reports a change.
pub fn run(client: RegistryClient, id: String, shared: Arc<Shared>, mut since: u64) {
    let mut refused = HashMap::new();
    loop {
        match client.watch(&[], since, WATCH) {
            Ok(w) => {
                if !w.changes.is_empty() || w.resync {
                    refused.clear();
                    match reload(&client, &id, &shared) {
                        Ok(generation) => since = generation.max(w.generation),
                        Err(e) => log::warn!("control: config: {e}"),
                    }
                } else {
                    since = w.generation;
                }
            }
            Err(e) => {
                log::warn!("control: watch: {e}");
                std::thread::sleep(Duration::from_millis(500));
            }
        }
        refresh_tokens(&client, &id, &shared, &mut refused);
    }
}

/// Fetches the config, publishes a new table, forgets tokens of VMs that left or moved.
/// Returns the config's generation.
pub fn reload(client: &RegistryClient, id: &str, shared: &Shared) -> Result<u64, ClientError> {
    let cfg = client.gateway_config(id)?;
    let table = Arc::new(NatTable::from_config(&cfg));
    let mut state = shared.state.write().unwrap_or_else(|e| e.into_inner());
    let keep = |ip: Ipv4Addr, r: &Route| {
        table
            .vm_by_ip(ip)
            .and_then(|i| table.vms[i].location)
            .is_some_and(|(h, p)| (h, p) == (*r.to.ip(), r.to.port()))
    };
    state.tokens.retain(keep);
    log::info!(
        "control: config generation {}: {} VMs, {} forwarding rules, {} services, public address {}",
        cfg.generation,
        table.vms.len(),
        table.forward_count(),
        cfg.services.len(),
        table.public_addr
    );
    drop(state);
    let generation = cfg.generation;
    crate::lb::publish(shared, Some((Arc::new(cfg), table)));
    Ok(generation)
}

/// Asks tokens for VMs without one (or with one about to expire), and for those the data
/// path wanted; `refused` holds when the registry last refused a VM (Unix seconds).
pub fn refresh_tokens(
    client: &RegistryClient,
    id: &str,
    shared: &Shared,
    refused: &mut HashMap<Ipv4Addr, u32>,
) {
    let now = vnp_gateway_now();
    let (table, mut wanted) = {
        let state = shared.state.read().unwrap_or_else(|e| e.into_inner());
        let table = state.table.clone();
        let missing: Vec<Ipv4Addr> = table
            .vms
            .iter()
            .filter(|v| v.location.is_some())
            .map(|v| v.ip)
            .filter(|ip| state.tokens.get(*ip, now + REFRESH_MARGIN_S).is_none())
            .collect();
        (table, missing)
    };
    wanted.extend(std::mem::take(
        &mut *shared.wants.lock().unwrap_or_else(|e| e.into_inner()),
    ));
    wanted.sort();
    wanted.dedup();
    for ip in wanted {
        let recently_refused = refused
            .get(&ip)
            .is_some_and(|at| at.saturating_add(REFUSED_RETRY_S) > now);
        if table.vm_by_ip(ip).is_none() || recently_refused {
            continue;
        }
        match client.request_gateway_token(id, ip) {
            Ok(g) => match Route::from_grant(&g) {
                Some(route) => shared
                    .state
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .tokens
                    .insert(ip, route),
                None => log::warn!("control: token for {ip}: not 16 hex digits"),
            },
            // Policy may deny a VM the outside altogether: nothing to send it then.
            Err(e) => {
                log::info!("control: no token for {ip}: {e}");
                refused.insert(ip, now);
            }
        }
    }
}

/// Unix seconds.
pub fn vnp_gateway_now() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs().min(u64::from(u32::MAX)) as u32)
}
