//! The token decision (patent FIG. 4): who may ask, what policy says, which tuple and secret.
//! Pure: the caller passes the model, the caller's identity and the clock.

use crate::error::{refuse, ApiError};
use crate::model::{Model, SecretOwner};
use crate::policy::{self, Peer};
use std::net::Ipv4Addr;
use vnp_protocol::token::{Expiry, TokenFields};
use vnp_protocol::OUTSIDE;
use vnp_registry_client::api::{
    ErrorCode, Identity, PolicyAction, Role, TokenGrant, TokenRequest, VmRecord,
};

/// Token lifetime policy.
#[derive(Debug, Clone, Copy)]
pub struct TokenPolicy {
    /// Seconds a token lives; 0 mints tokens that never expire (`Expiry::NEVER`).
    pub ttl_s: u32,
}

fn expiry(policy: TokenPolicy, now: u32) -> Expiry {
    if policy.ttl_s == 0 {
        Expiry::NEVER
    } else {
        // Never let a finite token collide with the NEVER marker.
        Expiry(now.saturating_add(policy.ttl_s).min(u32::MAX - 1))
    }
}

fn check_policy(model: &Model, vm: &VmRecord, other: Peer<'_>, what: &str) -> Result<(), ApiError> {
    let Some(net) = model.networks.get(&vm.network) else {
        return refuse(
            ErrorCode::UnknownNetwork,
            format!("VM {} refers to missing network {}", vm.id, vm.network),
        );
    };
    let rules = model.rules.values().filter(|r| r.network == net.id);
    let d = policy::evaluate(net.default_policy, rules, Peer::Vm(vm), other);
    if d.action == PolicyAction::Allow {
        return Ok(());
    }
    let why = match d.rule {
        Some(rule) => format!("rule {rule}"),
        None => format!("network {} default policy", net.id),
    };
    refuse(
        ErrorCode::PolicyDenied,
        format!("policy denies {what} ({why})"),
    )
}

/// Whether pair policy lets `vm` start connections to outside addresses.
pub fn egress_allowed(model: &Model, vm: &VmRecord) -> bool {
    check_policy(model, vm, Peer::External, "egress").is_ok()
}

/// Decides and mints a token for `req` from `caller` at time `now` (Unix seconds).
pub fn grant(
    model: &Model,
    caller: &Identity,
    req: &TokenRequest,
    now: u32,
    policy: TokenPolicy,
) -> Result<TokenGrant, ApiError> {
    match (&req.src_vm, &req.src_gateway) {
        (Some(src), None) => {
            if req.src_ip.is_some() {
                return refuse(
                    ErrorCode::BadRequest,
                    "src_ip is only for gateway requests (it is the VM's own address)",
                );
            }
            grant_from_vm(model, caller, src, req.dst_ip, now, policy)
        }
        (None, Some(gw)) => {
            grant_from_gateway(model, caller, gw, req.src_ip, req.dst_ip, now, policy)
        }
        _ => refuse(
            ErrorCode::BadRequest,
            "give exactly one of src_vm or src_gateway",
        ),
    }
}

fn grant_from_vm(
    model: &Model,
    caller: &Identity,
    src_id: &str,
    dst_ip: Ipv4Addr,
    now: u32,
    policy: TokenPolicy,
) -> Result<TokenGrant, ApiError> {
    let src = model
        .vms
        .get(src_id)
        .ok_or_else(|| ApiError::new(ErrorCode::UnknownVm, format!("no VM {src_id}")))?;
    // A live migration's destination host (which may already read the VM's secret) asks for
    // the VM's tokens before the resume, so that the first packet after it leaves at once; they
    // name its incoming endpoint, which the registration on resume makes the VM's.
    let incoming = src
        .incoming
        .as_ref()
        .filter(|i| caller.role == Role::Host && i.host == caller.id);
    match caller.role {
        Role::Admin => {}
        Role::Host if src.host.as_deref() == Some(caller.id.as_str()) => {}
        Role::Host if incoming.is_some() => {}
        Role::Host => {
            return refuse(
                ErrorCode::NotOwner,
                format!("host {} does not run VM {src_id}", caller.id),
            );
        }
        Role::Gateway => {
            return refuse(
                ErrorCode::Forbidden,
                "gateways ask with src_gateway, not src_vm",
            );
        }
    }
    let net = model.networks.get(&src.network).ok_or_else(|| {
        ApiError::new(
            ErrorCode::UnknownNetwork,
            format!("no network {}", src.network),
        )
    })?;
    let incoming_source = incoming.and_then(|i| {
        let host = model.hosts.get(&i.host)?;
        Some((host.underlay_addr, i.host_port))
    });
    let (src_host, src_port) = incoming_source
        .or_else(|| model.source_of(src))
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::NoEndpoint,
                format!("VM {src_id} is on no host; it cannot send"),
            )
        })?;

    let (dst_vm, dst_host, dst_port, owner) = if net.cidr.contains(dst_ip) {
        let dst = model.vm_by_ip(&net.id, dst_ip).ok_or_else(|| {
            ApiError::new(
                ErrorCode::NoSuchDestination,
                format!("no VM has address {dst_ip} in network {}", net.id),
            )
        })?;
        check_policy(
            model,
            src,
            Peer::Vm(dst),
            &format!("{} -> {}", src.id, dst.id),
        )?;
        let (h, p) = model.location_of(dst).ok_or_else(|| {
            ApiError::new(
                ErrorCode::NoEndpoint,
                format!("VM {} is on no host", dst.id),
            )
        })?;
        (Some(dst.id.clone()), h, p, SecretOwner::Vm(dst.id.clone()))
    } else {
        let gw = model.gateway_for(src).ok_or_else(|| {
            ApiError::new(
                ErrorCode::NoGateway,
                format!(
                    "{dst_ip} is outside network {} ({}) and it has no gateway",
                    net.id, net.cidr
                ),
            )
        })?;
        // Replies on port-forwarded connections need the pair even where egress is denied;
        // the gateway then passes only those replies (see `gateway_peer_egress`).
        if !model.forwards.values().any(|f| f.vm == src.id) {
            check_policy(
                model,
                src,
                Peer::External,
                &format!("{} -> external {dst_ip}", src.id),
            )?;
        }
        (
            None,
            gw.underlay_addr,
            gw.port,
            SecretOwner::Gateway(gw.id.clone()),
        )
    };
    // One token per (VM, gateway), whatever the outside address (docs/protocol.md).
    let dst_ip = if dst_vm.is_none() { OUTSIDE } else { dst_ip };
    let secret = model
        .secrets
        .get(&owner)
        .ok_or_else(|| ApiError::new(ErrorCode::Internal, "destination has no secret"))?;
    let fields = TokenFields {
        src_host,
        src_port,
        src_vm: src.ip,
        dst_host,
        dst_port,
        dst_vm: dst_ip,
        network_id: net.vni,
        expiry: expiry(policy, now),
    };
    Ok(to_grant(
        dst_vm,
        &fields,
        secret.minter.mint(&fields).to_string(),
    ))
}

fn grant_from_gateway(
    model: &Model,
    caller: &Identity,
    gw_id: &str,
    src_ip: Option<Ipv4Addr>,
    dst_ip: Ipv4Addr,
    now: u32,
    policy: TokenPolicy,
) -> Result<TokenGrant, ApiError> {
    let gw = model
        .gateways
        .get(gw_id)
        .ok_or_else(|| ApiError::new(ErrorCode::UnknownGateway, format!("no gateway {gw_id}")))?;
    match caller.role {
        Role::Admin => {}
        Role::Gateway if caller.id == gw_id => {}
        _ => {
            return refuse(
                ErrorCode::NotOwner,
                format!("{caller} is not gateway {gw_id}"),
            )
        }
    }
    let net = model.networks.get(&gw.network).ok_or_else(|| {
        ApiError::new(
            ErrorCode::UnknownNetwork,
            format!("no network {}", gw.network),
        )
    })?;
    if let Some(src_ip) = src_ip.filter(|ip| net.cidr.contains(*ip)) {
        return refuse(
            ErrorCode::BadRequest,
            format!(
                "src_ip {src_ip} is inside network {}; a gateway speaks only for outside addresses",
                net.id
            ),
        );
    }
    let dst = model.vm_by_ip(&net.id, dst_ip).ok_or_else(|| {
        ApiError::new(
            ErrorCode::NoSuchDestination,
            format!("no VM has address {dst_ip} in network {}", net.id),
        )
    })?;
    // Inbound traffic through a gateway is either a reply on a connection the VM started
    // (needs egress) or forwarded by a rule the admin made; the gateway tells them apart per
    // packet, the registry grants the pair if either can exist.
    if !model.forwards.values().any(|f| f.vm == dst.id) {
        check_policy(
            model,
            dst,
            Peer::External,
            &format!("external -> {}", dst.id),
        )?;
    }
    let (dst_host, dst_port) = model.location_of(dst).ok_or_else(|| {
        ApiError::new(
            ErrorCode::NoEndpoint,
            format!("VM {} is on no host", dst.id),
        )
    })?;
    let secret = model
        .secrets
        .get(&SecretOwner::Vm(dst.id.clone()))
        .ok_or_else(|| ApiError::new(ErrorCode::Internal, "destination has no secret"))?;
    let fields = TokenFields {
        src_host: gw.underlay_addr,
        src_port: gw.port,
        src_vm: OUTSIDE,
        dst_host,
        dst_port,
        dst_vm: dst_ip,
        network_id: net.vni,
        expiry: expiry(policy, now),
    };
    Ok(to_grant(
        Some(dst.id.clone()),
        &fields,
        secret.minter.mint(&fields).to_string(),
    ))
}

fn to_grant(dst_vm: Option<String>, f: &TokenFields, token: String) -> TokenGrant {
    TokenGrant {
        dst_vm,
        dst_ip: f.dst_vm,
        dst_host: f.dst_host,
        dst_port: f.dst_port,
        token,
        expiry: f.expiry.0,
        network_id: f.network_id,
        src_host: f.src_host,
        src_port: f.src_port,
        src_ip: f.src_vm,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan;
    use vnp_protocol::token::{verify, Token, VmSecret};
    use vnp_registry_client::api::*;

    const P: TokenPolicy = TokenPolicy { ttl_s: 600 };
    const REUSE: plan::PortReuse = plan::PortReuse {
        now: 1000,
        quarantine_secs: 600,
    };

    fn host(id: &str) -> Identity {
        Identity {
            role: Role::Host,
            id: id.into(),
        }
    }

    fn setup() -> Model {
        let mut m = Model::default();
        let run = |m: &mut Model, ops: Vec<crate::model::Op>| m.apply(&ops);
        let n = NetworkSpec {
            id: "n1".into(),
            vni: Some(42),
            cidr: "10.1.0.0/24".parse().unwrap(),
            mtu: None,
            default_policy: None,
            nat_block: None,
        };
        let ops = plan::create_network(&m, &n).unwrap().0;
        run(&mut m, ops);
        for (h, last) in [("h1", 1), ("h2", 2)] {
            let s = HostSpec {
                id: h.into(),
                underlay_addr: Ipv4Addr::new(198, 18, 0, last),
                port_range: None,
            };
            let ops = plan::create_host(&m, &s).unwrap().0;
            run(&mut m, ops);
        }
        for (vm, h, b) in [("a", "h1", 1u8), ("b", "h2", 2u8)] {
            let s = VmSpec {
                id: vm.into(),
                network: "n1".into(),
                host: Some(h.into()),
                ..VmSpec::default()
            };
            let ops = plan::create_vm(&m, &s, VmSecret::from_bytes([b; 32]), REUSE)
                .unwrap()
                .0;
            run(&mut m, ops);
        }
        m
    }

    fn req(src: &str, dst: [u8; 4]) -> TokenRequest {
        TokenRequest {
            src_vm: Some(src.into()),
            src_gateway: None,
            src_ip: None,
            dst_ip: Ipv4Addr::from(dst),
        }
    }

    #[test]
    fn happy_path_token_verifies_with_destination_secret() {
        let m = setup();
        let g = grant(&m, &host("h1"), &req("a", [10, 1, 0, 3]), 1000, P).unwrap();
        assert_eq!(g.dst_vm.as_deref(), Some("b"));
        assert_eq!(
            (g.dst_host, g.dst_port),
            (Ipv4Addr::new(198, 18, 0, 2), 40000)
        );
        assert_eq!(
            (g.src_host, g.src_port, g.src_ip),
            (
                Ipv4Addr::new(198, 18, 0, 1),
                40000,
                Ipv4Addr::new(10, 1, 0, 2)
            )
        );
        assert_eq!((g.expiry, g.network_id), (1600, 42));
        let token: Token = g.token.parse().unwrap();
        assert!(verify(&VmSecret::from_bytes([2; 32]), &g.fields(), &token));
        assert!(!verify(&VmSecret::from_bytes([1; 32]), &g.fields(), &token));
    }

    #[test]
    fn a_migration_destination_gets_tokens_from_its_incoming_endpoint() {
        let mut m = setup();
        let c = |m: &Model, id: &str| grant(m, &host(id), &req("a", [10, 1, 0, 3]), 1000, P);
        assert_eq!(c(&m, "h2").unwrap_err().code, ErrorCode::NotOwner);
        m.vms.get_mut("a").unwrap().incoming = Some(IncomingMigration {
            host: "h2".into(),
            host_port: 40001,
        });
        let g = c(&m, "h2").unwrap();
        assert_eq!(
            (g.src_host, g.src_port),
            (Ipv4Addr::new(198, 18, 0, 2), 40001)
        );
        let token: Token = g.token.parse().unwrap();
        assert!(verify(&VmSecret::from_bytes([2; 32]), &g.fields(), &token));
        // The source keeps its own endpoint until the registration on resume.
        let g = c(&m, "h1").unwrap();
        assert_eq!(
            (g.src_host, g.src_port),
            (Ipv4Addr::new(198, 18, 0, 1), 40000)
        );
    }

    #[test]
    fn refusals() {
        let m = setup();
        let c = |id: &Identity, r: &TokenRequest| grant(&m, id, r, 1000, P).unwrap_err().code;
        assert_eq!(
            c(&host("h2"), &req("a", [10, 1, 0, 3])),
            ErrorCode::NotOwner
        );
        assert_eq!(
            c(&host("h1"), &req("zz", [10, 1, 0, 3])),
            ErrorCode::UnknownVm
        );
        assert_eq!(
            c(&host("h1"), &req("a", [10, 1, 0, 9])),
            ErrorCode::NoSuchDestination
        );
        assert_eq!(
            c(&host("h1"), &req("a", [8, 8, 8, 8])),
            ErrorCode::NoGateway
        );
        let gw = Identity {
            role: Role::Gateway,
            id: "g".into(),
        };
        assert_eq!(c(&gw, &req("a", [10, 1, 0, 3])), ErrorCode::Forbidden);
        let both = TokenRequest {
            src_gateway: Some("g".into()),
            ..req("a", [10, 1, 0, 3])
        };
        assert_eq!(c(&host("h1"), &both), ErrorCode::BadRequest);
    }

    #[test]
    fn policy_deny_names_the_rule() {
        let mut m = setup();
        let r = PolicyRuleSpec {
            id: "no-ab".into(),
            network: "n1".into(),
            action: PolicyAction::Deny,
            a: Selector::Vm("a".into()),
            b: Selector::Vm("b".into()),
        };
        let ops = plan::create_rule(&m, &r).unwrap().0;
        m.apply(&ops);
        let e = grant(&m, &host("h2"), &req("b", [10, 1, 0, 2]), 1000, P).unwrap_err();
        assert_eq!(e.code, ErrorCode::PolicyDenied);
        assert!(e.message.contains("no-ab"), "{}", e.message);
    }

    #[test]
    fn outside_goes_to_gateway_and_gateway_reaches_vms() {
        let mut m = setup();
        let spec = GatewaySpec {
            id: "g".into(),
            network: "n1".into(),
            underlay_addr: Ipv4Addr::new(198, 18, 0, 9),
            port: 6081,
            public_addr: None,
        };
        let ops = plan::create_gateway(&m, &spec, VmSecret::from_bytes([9; 32]))
            .unwrap()
            .0;
        m.apply(&ops);
        let g = grant(&m, &host("h1"), &req("a", [203, 0, 113, 7]), 1000, P).unwrap();
        assert_eq!(
            (g.dst_vm.clone(), g.dst_host, g.dst_port),
            (None, Ipv4Addr::new(198, 18, 0, 9), 6081)
        );
        assert!(verify(
            &VmSecret::from_bytes([9; 32]),
            &g.fields(),
            &g.token.parse().unwrap()
        ));

        let gw_id = Identity {
            role: Role::Gateway,
            id: "g".into(),
        };
        let r = TokenRequest {
            src_vm: None,
            src_gateway: Some("g".into()),
            src_ip: Some(Ipv4Addr::new(203, 0, 113, 7)),
            dst_ip: Ipv4Addr::new(10, 1, 0, 2),
        };
        let back = grant(&m, &gw_id, &r, 1000, P).unwrap();
        assert_eq!(
            back.fields(),
            g.fields().reversed().clone_with_expiry(back.expiry)
        );
        assert!(verify(
            &VmSecret::from_bytes([1; 32]),
            &back.fields(),
            &back.token.parse().unwrap()
        ));
        let inside = TokenRequest {
            src_ip: Some(Ipv4Addr::new(10, 1, 0, 3)),
            ..r.clone()
        };
        assert_eq!(
            grant(&m, &gw_id, &inside, 1000, P).unwrap_err().code,
            ErrorCode::BadRequest
        );
        assert_eq!(
            grant(&m, &host("h1"), &r, 1000, P).unwrap_err().code,
            ErrorCode::NotOwner
        );
    }

    trait WithExpiry {
        fn clone_with_expiry(&self, e: u32) -> TokenFields;
    }
    impl WithExpiry for TokenFields {
        fn clone_with_expiry(&self, e: u32) -> TokenFields {
            TokenFields {
                expiry: Expiry(e),
                ..*self
            }
        }
    }

    /// The registry's whole decision path, not just the MAC, reproduces the token vectors that
    /// `docs/protocol.md` publishes (vector 1: a -> b, vector 2: b -> a never expiring).
    #[test]
    fn registry_reproduces_published_vectors() {
        use vnp_protocol::vectors::TOKEN_VECTORS;
        let doc = include_str!("../../docs/protocol.md");
        let mut m = Model::default();
        let n = NetworkSpec {
            id: "n".into(),
            vni: Some(7),
            cidr: "10.1.0.0/24".parse().unwrap(),
            mtu: None,
            default_policy: None,
            nat_block: None,
        };
        let ops = plan::create_network(&m, &n).unwrap().0;
        m.apply(&ops);
        for (h, last) in [("ha", 1), ("hb", 2)] {
            let s = HostSpec {
                id: h.into(),
                underlay_addr: Ipv4Addr::new(198, 18, 0, last),
                port_range: None,
            };
            let ops = plan::create_host(&m, &s).unwrap().0;
            m.apply(&ops);
        }
        // VM a's secret is vector 2's (the destination of b -> a), b's is vector 1's.
        for (vm, h, port, v) in [("a", "ha", 40001, 1usize), ("b", "hb", 40002, 0usize)] {
            let s = VmSpec {
                id: vm.into(),
                network: "n".into(),
                host: Some(h.into()),
                host_port: Some(port),
                ..VmSpec::default()
            };
            let ops = plan::create_vm(&m, &s, VmSecret::from_bytes(TOKEN_VECTORS[v].secret), REUSE)
                .unwrap()
                .0;
            m.apply(&ops);
        }
        let v1 = &TOKEN_VECTORS[0];
        let g = grant(
            &m,
            &host("ha"),
            &req("a", [10, 1, 0, 3]),
            v1.fields.expiry.0 - 600,
            P,
        )
        .unwrap();
        assert_eq!(g.fields(), v1.fields);
        assert_eq!(g.token, v1.token_hex);
        assert!(
            doc.contains(v1.token_hex),
            "docs/protocol.md no longer lists vector 1"
        );
        let v2 = &TOKEN_VECTORS[1];
        let g = grant(
            &m,
            &host("hb"),
            &req("b", [10, 1, 0, 2]),
            1,
            TokenPolicy { ttl_s: 0 },
        )
        .unwrap();
        assert_eq!(g.fields(), v2.fields);
        assert_eq!(g.token, v2.token_hex);
        assert!(
            doc.contains(v2.token_hex),
            "docs/protocol.md no longer lists vector 2"
        );
    }

    #[test]
    fn source_tuple_follows_the_owner_during_migration() {
        let mut m = setup();
        // a is registered on h1, then handed to h2 which has not registered yet.
        let up = EndpointUpdate {
            host_addr: Ipv4Addr::new(198, 18, 0, 1),
            port: 40000,
        };
        let ops = plan::register_endpoint(&m, "h1", "a", &up, REUSE)
            .unwrap()
            .0;
        m.apply(&ops);
        let ops = plan::move_vm(
            &m,
            "a",
            &MoveVm {
                host: Some("h2".into()),
                host_port: None,
            },
            REUSE,
        )
        .unwrap()
        .0;
        m.apply(&ops);
        // The new owner sends from its own address; packets *to* a still go to h1.
        let g = grant(&m, &host("h2"), &req("a", [10, 1, 0, 3]), 1000, P).unwrap();
        assert_eq!(
            (g.src_host, g.src_port),
            (Ipv4Addr::new(198, 18, 0, 2), 40001)
        );
        let g = grant(&m, &host("h2"), &req("b", [10, 1, 0, 2]), 1000, P).unwrap();
        assert_eq!(
            (g.dst_host, g.dst_port),
            (Ipv4Addr::new(198, 18, 0, 1), 40000)
        );
        assert_eq!(
            grant(&m, &host("h1"), &req("a", [10, 1, 0, 3]), 1000, P)
                .unwrap_err()
                .code,
            ErrorCode::NotOwner
        );
    }

    #[test]
    fn ttl_zero_never_expires() {
        let m = setup();
        let g = grant(
            &m,
            &host("h1"),
            &req("a", [10, 1, 0, 3]),
            1000,
            TokenPolicy { ttl_s: 0 },
        )
        .unwrap();
        assert_eq!(g.expiry, u32::MAX);
        let g = grant(&m, &host("h1"), &req("a", [10, 1, 0, 3]), u32::MAX - 5, P).unwrap();
        assert_eq!(g.expiry, u32::MAX - 1);
    }
}
