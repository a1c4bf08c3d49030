//! The registry target: request bodies as the registry's HTTP handlers receive them,
//! deserialized into the API types of `vnp_registry_client::api` and run through the registry's
//! pure planners (`vnp_registry::plan`), the model they commit to, and the token decision
//! (`vnp_registry::tokens::grant`).
//!
//! Input: up to [`MAX_REQUESTS`] lines, each one request: an operation letter, then its path
//! arguments separated by tabs, then the JSON body (see [`request`]). The model starts with a
//! network, two hosts and two VMs, so that plans and token grants get past "unknown id".
//!
//! Invariant asserted after every committed write: the address index and the VM table agree.

use std::net::Ipv4Addr;
use std::sync::OnceLock;

use serde_json::from_str;
use vnp_protocol::token::VmSecret;
use vnp_registry::model::{Model, Op};
use vnp_registry::plan::{self, Planned};
use vnp_registry::tokens::{grant, TokenPolicy};
use vnp_registry_client::api::{Identity, Role};

/// Requests per input.
pub const MAX_REQUESTS: usize = 32;
/// "Now" for token expiry.
pub const NOW: u32 = 1_800_000_000;

fn secret() -> VmSecret {
    VmSecret::from_bytes([7; 32])
}

/// The starting model: network `n1` (10.1.0.0/24), hosts `h1` and `h2`, VMs `a` on `h1` and `b`
/// on `h2`.
pub fn base_model() -> Model {
    let mut model = Model::default();
    let setup = [
        "N\t{\"id\":\"n1\",\"cidr\":\"10.1.0.0/24\"}",
        "H\t{\"id\":\"h1\",\"underlay_addr\":\"198.18.0.1\"}",
        "H\t{\"id\":\"h2\",\"underlay_addr\":\"198.18.0.2\",\"port_range\":\"40000-40001\"}",
        "V\t{\"id\":\"a\",\"network\":\"n1\",\"host\":\"h1\"}",
        "V\t{\"id\":\"b\",\"network\":\"n1\",\"host\":\"h2\",\"tags\":[\"web\"]}",
    ];
    for line in setup {
        assert!(request(&mut model, line), "setup request {line} refused");
    }
    model
}

/// Runs one input.
pub fn run(data: &[u8]) {
    // Built once per process: the fuzzer runs millions of inputs, each from the same start.
    static BASE: OnceLock<Model> = OnceLock::new();
    let text = String::from_utf8_lossy(data);
    let mut model = BASE.get_or_init(base_model).clone();
    for line in text.lines().take(MAX_REQUESTS) {
        request(&mut model, line);
        check_index(&model);
    }
}

/// A fixed clock and the default quarantine: the planners' port-reuse rule is exercised the
/// same way on every run (a target must be deterministic).
const REUSE: plan::PortReuse = plan::PortReuse {
    now: 1_800_000_000,
    quarantine_secs: 600,
};

/// Applies one request line; returns whether it was accepted.
///
/// `N body` network, `H body` host, `G body` gateway, `V body` VM, `R body` policy rule,
/// `M id body` move VM, `E host vm body` endpoint, `S id` rotate secret, `n id cascade` /
/// `h id` / `g id` / `v id` / `r id` delete, `T role id body` token request (role `a`, `h`,
/// `g`). Fields are separated by tabs.
pub fn request(model: &mut Model, line: &str) -> bool {
    let mut fields = line.split('\t');
    let op = fields.next().unwrap_or_default();
    let args: Vec<&str> = fields.collect();
    let arg = |i: usize| args.get(i).copied().unwrap_or_default();
    let m = &*model;
    let ops = match op {
        "N" => parse(arg(0)).map(|s| ops(plan::create_network(m, &s))),
        "H" => parse(arg(0)).map(|s| ops(plan::create_host(m, &s))),
        "G" => parse(arg(0)).map(|s| ops(plan::create_gateway(m, &s, secret()))),
        "V" => parse(arg(0)).map(|s| ops(plan::create_vm(m, &s, secret(), REUSE))),
        "R" => parse(arg(0)).map(|s| ops(plan::create_rule(m, &s))),
        "M" => parse(arg(1)).map(|s| ops(plan::move_vm(m, arg(0), &s, REUSE))),
        "E" => parse(arg(2)).map(|s| ops(plan::register_endpoint(m, arg(0), arg(1), &s, REUSE))),
        "S" => Some(ops(plan::rotate_vm_secret(m, arg(0), secret()))),
        "n" => Some(ops(plan::delete_network(
            m,
            arg(0),
            arg(1) == "cascade",
            REUSE,
        ))),
        "h" => Some(ops(plan::delete_host(m, arg(0)))),
        "g" => Some(ops(plan::delete_gateway(m, arg(0)))),
        "v" => Some(ops(plan::delete_vm(m, arg(0), REUSE))),
        "r" => Some(ops(plan::delete_rule(m, arg(0)))),
        "T" => return token(m, arg(0), arg(1), arg(2)),
        _ => None,
    };
    match ops.flatten() {
        Some(ops) => {
            model.apply(&ops);
            true
        }
        None => false,
    }
}

fn parse<T: serde::de::DeserializeOwned>(body: &str) -> Option<T> {
    from_str(body).ok()
}

fn ops<T>(planned: Planned<T>) -> Option<Vec<Op>> {
    planned.ok().map(|(ops, _)| ops)
}

fn token(model: &Model, role: &str, id: &str, body: &str) -> bool {
    let role = match role {
        "a" => Role::Admin,
        "h" => Role::Host,
        "g" => Role::Gateway,
        _ => return false,
    };
    let caller = Identity {
        role,
        id: id.to_string(),
    };
    let Some(req) = parse(body) else {
        return false;
    };
    [0, 60, u32::MAX]
        .into_iter()
        .map(|ttl_s| grant(model, &caller, &req, NOW, TokenPolicy { ttl_s }))
        .all(|g| g.is_ok())
}

/// Every VM is indexed under its network and address, and nothing else is.
fn check_index(model: &Model) {
    assert_eq!(model.by_ip.len(), model.vms.len(), "index size");
    for vm in model.vms.values() {
        let indexed: Option<Ipv4Addr> = model.vm_by_ip(&vm.network, vm.ip).map(|v| v.ip);
        assert_eq!(indexed, Some(vm.ip), "VM {} not indexed", vm.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The starting model lets a host get a token for its VM, and the request language reaches
    /// the planners.
    #[test]
    fn seeded_model_grants_and_plans() {
        let mut model = base_model();
        assert!(request(
            &mut model,
            "T\th\th1\t{\"src_vm\":\"a\",\"dst_ip\":\"10.1.0.3\"}"
        ));
        assert!(!request(
            &mut model,
            "T\th\th2\t{\"src_vm\":\"a\",\"dst_ip\":\"10.1.0.3\"}"
        ));
        assert!(request(&mut model, "v\tb"));
        assert!(!model.vms.contains_key("b"));
        assert!(!request(
            &mut model,
            "V\t{\"id\":\"x\",\"network\":\"nope\"}"
        ));
        check_index(&model);
    }
}
