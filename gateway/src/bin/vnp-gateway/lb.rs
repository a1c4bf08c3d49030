//! The daemon's side of load balancing (issue #10): publishes the service tables built from the
//! registry's config and this gateway's health view, counts placements, renders their metrics.
//! The decisions themselves are `vnp_gateway::services` and `vnp_lb` (pure).

use crate::Shared;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use vnp_gateway::services::{Placed, ServiceTable};
use vnp_gateway::table::NatTable;
use vnp_lb::Probe;
use vnp_registry_client::api::GatewayConfig;

/// (service id, VM id).
pub type MemberKey = (String, String);

/// Load-balancing state shared by the threads.
#[derive(Debug, Default)]
pub struct Lb {
    /// The config the tables were last built from; held while building and publishing, so a
    /// health change and a config reload never publish out of order.
    config: Mutex<Option<Arc<GatewayConfig>>>,
    /// This gateway's view of each member's health.
    pub health: Mutex<HashMap<MemberKey, Probe>>,
    /// New flows placed, per member.
    placed: Mutex<HashMap<MemberKey, u64>>,
    unremembered: AtomicU64,
    flows: AtomicU64,
}

/// Milliseconds of the monotonic clock.
pub fn now_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

impl Lb {
    /// Counts a placement (the data path, after `services::inbound`).
    pub fn placed(&self, services: &ServiceTable, nat: &NatTable, p: &Placed) {
        if p.unremembered {
            self.unremembered.fetch_add(1, Relaxed);
        }
        if !p.new_flow {
            return;
        }
        let key = (
            services.services[p.service].id.clone(),
            nat.vms[p.vm].id.clone(),
        );
        *self
            .placed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_default() += 1;
    }

    pub fn set_flows(&self, n: usize) {
        self.flows.store(n as u64, Relaxed);
    }

    /// Whether this gateway's checks took `(service, vm)` out.
    fn is_down(&self, service: &str, vm: &str) -> bool {
        self.health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(service.to_string(), vm.to_string()))
            .is_some_and(|p| !p.is_up())
    }

    /// The config the tables are built from.
    pub fn config(&self) -> Option<Arc<GatewayConfig>> {
        self.config
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Builds the service tables from `cfg` (or the last config) and the health view, and
/// publishes them with `nat` (or the current NAT table).
pub fn publish(shared: &Shared, new: Option<(Arc<GatewayConfig>, Arc<NatTable>)>) {
    let mut config = shared.lb.config.lock().unwrap_or_else(|e| e.into_inner());
    let (cfg, nat) = match new {
        Some((cfg, nat)) => (cfg, nat),
        None => {
            let Some(cfg) = config.clone() else {
                return;
            };
            let nat = shared
                .state
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .table
                .clone();
            (cfg, nat)
        }
    };
    let (services, skipped) = ServiceTable::build(&cfg, &nat, |s, vm| shared.lb.is_down(s, vm));
    for s in skipped {
        log::warn!("lb: service {} left out: {}", s.service, s.why);
    }
    {
        let mut state = shared.state.write().unwrap_or_else(|e| e.into_inner());
        state.table = nat;
        state.services = Arc::new(services);
    }
    *config = Some(cfg);
}

/// Prometheus text of the services: members up in this gateway's view, new flows per member.
pub fn render(shared: &Shared) -> String {
    let services = shared
        .state
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .services
        .clone();
    let mut o = String::new();
    let _ = writeln!(
        o,
        "# HELP vnp_gateway_lb_member_up Whether the member is in the service's table (this gateway's health view).\n# TYPE vnp_gateway_lb_member_up gauge"
    );
    for s in &services.services {
        for (vm, _, _) in &s.pool {
            let up = u8::from(s.keeps_flows(vm));
            let _ = writeln!(
                o,
                "vnp_gateway_lb_member_up{{service=\"{}\",vm=\"{vm}\"}} {up}",
                s.id
            );
        }
    }
    let _ = writeln!(
        o,
        "# HELP vnp_gateway_lb_new_flows_total New flows placed on the member.\n# TYPE vnp_gateway_lb_new_flows_total counter"
    );
    let mut placed: Vec<(MemberKey, u64)> = shared
        .lb
        .placed
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    placed.sort();
    for ((s, vm), n) in placed {
        let _ = writeln!(
            o,
            "vnp_gateway_lb_new_flows_total{{service=\"{s}\",vm=\"{vm}\"}} {n}"
        );
    }
    for (name, kind, help, v) in [
        (
            "vnp_gateway_lb_flows",
            "gauge",
            "Load-balanced flows in the flow table.",
            &shared.lb.flows,
        ),
        (
            "vnp_gateway_lb_unremembered_total",
            "counter",
            "New flows placed by the table but not remembered: the flow table was full.",
            &shared.lb.unremembered,
        ),
    ] {
        let _ = writeln!(
            o,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
            v.load(Relaxed)
        );
    }
    o
}
