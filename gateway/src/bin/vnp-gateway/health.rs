//! Health checks (issue #10): every `interval` this gateway checks each member of each service
//! on its public address through the virtual network, feeds the result to the member's
//! `vnp_lb::Probe` (down after `fall` failures, up after `rise` successes) and rebuilds the
//! service tables when a member changes state.
//!
//! A check is an ordinary TCP connection of the host's kernel from this gateway's underlay
//! address to the VM (a route sends the network's CIDR into the TUN, see [`route_into_tun`]);
//! the data path carries its packets through VNP with the VM's token like any other
//! (`services::probe_out`), and the VM's answers come back to this kernel, either through this
//! gateway or through the other gateway of the address that the VM's host sends to, whose
//! kernel routes them here (`services::is_probe_answer`). So HTTP checks are real HTTP over the
//! kernel's TCP, with no TCP of our own.

use crate::Shared;
use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vnp_lb::{http_reply_ok, CheckKind, HealthConfig};
use vnp_registry_client::api::{HealthReport, MemberHealth};
use vnp_registry_client::RegistryClient;

/// How often the scheduler looks for due checks.
const TICK: Duration = Duration::from_millis(50);
/// Most bytes of an HTTP answer read (the status line is all that counts).
const HTTP_READ_LIMIT: usize = 1024;

/// Routes the network's `cidr` into `tun` with `src` as the source of the kernel's checks
/// (`ip route replace CIDR dev TUN src ADDR`).
pub fn route_into_tun(cidr: &str, tun: &str, src: Ipv4Addr) -> Result<(), String> {
    let out = std::process::Command::new("ip")
        .args([
            "route",
            "replace",
            cidr,
            "dev",
            tun,
            "src",
            &src.to_string(),
        ])
        .output()
        .map_err(|e| format!("ip route: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// One check: connect within the timeout; for HTTP, the answer's status line within what is
/// left of it.
fn check(ip: Ipv4Addr, cfg: &HealthConfig) -> bool {
    let timeout = Duration::from_millis(cfg.timeout_ms);
    let deadline = Instant::now() + timeout;
    let (port, request) = match &cfg.kind {
        CheckKind::TcpConnect { port } => (*port, None),
        CheckKind::Http { port, .. } => (*port, cfg.http_request(&ip.to_string())),
    };
    let Ok(mut stream) = TcpStream::connect_timeout(&SocketAddr::from((ip, port)), timeout) else {
        return false;
    };
    let Some(request) = request else {
        return true;
    };
    let CheckKind::Http { expect_status, .. } = cfg.kind else {
        return false;
    };
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero()
        || stream.set_write_timeout(Some(left)).is_err()
        || stream.set_read_timeout(Some(left)).is_err()
        || stream.write_all(&request).is_err()
    {
        return false;
    }
    let mut reply = Vec::new();
    let mut buf = [0u8; 256];
    while reply.len() < HTTP_READ_LIMIT && !reply.contains(&b'\n') {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => reply.extend_from_slice(&buf[..n]),
        }
    }
    http_reply_ok(&reply, expect_status)
}

/// (service, VM): what to check, from the current config.
type Target = ((String, String), Ipv4Addr, HealthConfig);

fn targets(shared: &Shared) -> Vec<Target> {
    let services = shared
        .state
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .services
        .clone();
    let nat = shared
        .state
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .table
        .clone();
    services
        .services
        .iter()
        .flat_map(|s| {
            s.pool.iter().map(|(vm, index, _)| {
                (
                    (s.id.clone(), vm.clone()),
                    nat.vms.get(*index).map_or(Ipv4Addr::UNSPECIFIED, |v| v.ip),
                    s.health.clone(),
                )
            })
        })
        .collect()
}

/// This gateway's view of `targets` for the registry (a member never checked is up).
fn report_of(shared: &Shared, targets: &[Target]) -> HealthReport {
    let health = shared.lb.health.lock().unwrap_or_else(|e| e.into_inner());
    HealthReport {
        members: targets
            .iter()
            .map(|(key, _, _)| MemberHealth {
                service: key.0.clone(),
                vm: key.1.clone(),
                up: health.get(key).is_none_or(|p| p.is_up()),
            })
            .collect(),
    }
}

/// Where the view goes: the registry, as gateway `id`.
pub struct Publisher {
    pub client: RegistryClient,
    pub id: String,
}

/// Runs forever on its own thread.
pub fn run(shared: Arc<Shared>, publisher: Publisher) {
    let (tx, rx) = mpsc::channel::<((String, String), bool, HealthConfig)>();
    let mut due: HashMap<(String, String), Instant> = HashMap::new();
    let mut in_flight: HashSet<(String, String)> = HashSet::new();
    // The view is published after the first round of checks of every new set of members (a
    // service or member added later too, not only at start), then after every change (a
    // failed publication is retried at most once a second).
    let mut unpublished = true;
    let mut published: HashSet<(String, String)> = HashSet::new();
    let mut last_try = Instant::now();
    loop {
        let now = Instant::now();
        let current = targets(&shared);
        let keys: HashSet<&(String, String)> = current.iter().map(|(k, _, _)| k).collect();
        if keys.len() != published.len() || keys.iter().any(|k| !published.contains(*k)) {
            unpublished = true;
        }
        due.retain(|k, _| keys.contains(k));
        shared
            .lb
            .health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|k, _| keys.contains(k));
        for (key, ip, cfg) in &current {
            let next = due.entry(key.clone()).or_insert(now);
            if *next > now || in_flight.contains(key) {
                continue;
            }
            *next = now + Duration::from_millis(cfg.interval_ms);
            in_flight.insert(key.clone());
            let (tx, key, ip, cfg) = (tx.clone(), key.clone(), *ip, cfg.clone());
            let spawned = std::thread::Builder::new()
                .name("health-check".into())
                .spawn(move || {
                    let ok = check(ip, &cfg);
                    let _ = tx.send((key, ok, cfg));
                });
            if let Err(e) = spawned {
                log::warn!("health: no thread for a check: {e}");
            }
        }
        let mut changed = false;
        while let Ok((key, ok, cfg)) = rx.recv_timeout(if changed { Duration::ZERO } else { TICK })
        {
            in_flight.remove(&key);
            let mut health = shared.lb.health.lock().unwrap_or_else(|e| e.into_inner());
            let probe = health.entry(key.clone()).or_default();
            if let Some(state) = probe.record(ok, &cfg) {
                log::info!("health: service {} member {} is {state:?}", key.0, key.1);
                changed = true;
            }
        }
        if changed {
            crate::lb::publish(&shared, None);
            unpublished = true;
        }
        let first_round_done = current.iter().all(|(k, _, _)| {
            shared
                .lb
                .health
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(k)
        });
        if unpublished && first_round_done && last_try.elapsed() >= Duration::from_secs(1) {
            last_try = Instant::now();
            let report = report_of(&shared, &current);
            match publisher.client.report_health(&publisher.id, &report) {
                Ok(_) => {
                    unpublished = false;
                    published = current.iter().map(|(k, _, _)| k.clone()).collect();
                }
                Err(e) => log::warn!("health: publishing the view: {e}"),
            }
        }
    }
}
