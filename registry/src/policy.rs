//! Pair policy: which pairs of VMs (and VM/outside pairs) may communicate. Pure.
//!
//! Rules are about unordered pairs `{a, b}` inside one network. Among the rules that match a
//! pair, any `deny` wins; otherwise any `allow` allows; otherwise the network's default applies.

use vnp_registry_client::api::{PolicyAction, PolicyRule, Selector, VmRecord};

/// One side of a pair.
#[derive(Debug, Clone, Copy)]
pub enum Peer<'a> {
    Vm(&'a VmRecord),
    /// An address outside the network, reached through the gateway.
    External,
}

/// The verdict and the rule that decided it (`None` = network default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub action: PolicyAction,
    pub rule: Option<String>,
}

fn matches(selector: &Selector, peer: Peer<'_>) -> bool {
    match (selector, peer) {
        (Selector::Any, Peer::Vm(_)) => true,
        (Selector::Vm(id), Peer::Vm(vm)) => vm.id == *id,
        (Selector::Tag(tag), Peer::Vm(vm)) => vm.tags.iter().any(|t| t == tag),
        (Selector::External, Peer::External) => true,
        _ => false,
    }
}

/// Decides whether `x` and `y` may talk, given the network's rules and default.
pub fn evaluate<'r>(
    default: PolicyAction,
    rules: impl IntoIterator<Item = &'r PolicyRule>,
    x: Peer<'_>,
    y: Peer<'_>,
) -> Decision {
    let mut allow_rule = None;
    for rule in rules {
        let hit = (matches(&rule.a, x) && matches(&rule.b, y))
            || (matches(&rule.a, y) && matches(&rule.b, x));
        if !hit {
            continue;
        }
        match rule.action {
            PolicyAction::Deny => {
                return Decision {
                    action: PolicyAction::Deny,
                    rule: Some(rule.id.clone()),
                }
            }
            PolicyAction::Allow => {
                allow_rule.get_or_insert_with(|| rule.id.clone());
            }
        }
    }
    match allow_rule {
        Some(id) => Decision {
            action: PolicyAction::Allow,
            rule: Some(id),
        },
        None => Decision {
            action: default,
            rule: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use vnp_registry_client::net::{MacAddr, PortRange};

    fn vm(id: &str, tags: &[&str]) -> VmRecord {
        VmRecord {
            id: id.into(),
            network: "n".into(),
            vni: 1,
            ip: Ipv4Addr::new(10, 0, 0, 2),
            mac: MacAddr([2, 0, 0, 0, 0, 2]),
            hostname: id.into(),
            host: None,
            host_port: None,
            nat_ports: vec![PortRange {
                first: 1024,
                last: 2047,
            }],
            service_account: "default".into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            secret_generation: 1,
            endpoint: None,
            incoming: None,
        }
    }

    fn rule(id: &str, action: PolicyAction, a: Selector, b: Selector) -> PolicyRule {
        PolicyRule {
            id: id.into(),
            network: "n".into(),
            action,
            a,
            b,
        }
    }

    #[test]
    fn default_applies_without_rules() {
        let (a, b) = (vm("a", &[]), vm("b", &[]));
        let d = evaluate(PolicyAction::Deny, [], Peer::Vm(&a), Peer::Vm(&b));
        assert_eq!(
            d,
            Decision {
                action: PolicyAction::Deny,
                rule: None
            }
        );
    }

    #[test]
    fn allow_by_tag_is_symmetric() {
        let (a, b) = (vm("a", &["web"]), vm("b", &["db"]));
        let rules = [rule(
            "r1",
            PolicyAction::Allow,
            Selector::Tag("db".into()),
            Selector::Tag("web".into()),
        )];
        for (x, y) in [(&a, &b), (&b, &a)] {
            let d = evaluate(PolicyAction::Deny, &rules, Peer::Vm(x), Peer::Vm(y));
            assert_eq!(d.action, PolicyAction::Allow);
            assert_eq!(d.rule.as_deref(), Some("r1"));
        }
    }

    #[test]
    fn deny_beats_allow() {
        let (a, b) = (vm("a", &["web"]), vm("b", &[]));
        let rules = [
            rule(
                "allow-all",
                PolicyAction::Allow,
                Selector::Any,
                Selector::Any,
            ),
            rule(
                "no-b",
                PolicyAction::Deny,
                Selector::Vm("b".into()),
                Selector::Tag("web".into()),
            ),
        ];
        let d = evaluate(PolicyAction::Allow, &rules, Peer::Vm(&a), Peer::Vm(&b));
        assert_eq!(
            d,
            Decision {
                action: PolicyAction::Deny,
                rule: Some("no-b".into())
            }
        );
    }

    #[test]
    fn external_only_matches_external() {
        let a = vm("a", &[]);
        let rules = [rule(
            "out",
            PolicyAction::Deny,
            Selector::Any,
            Selector::External,
        )];
        assert_eq!(
            evaluate(PolicyAction::Allow, &rules, Peer::Vm(&a), Peer::External).action,
            PolicyAction::Deny
        );
        let b = vm("b", &[]);
        assert_eq!(
            evaluate(PolicyAction::Allow, &rules, Peer::Vm(&a), Peer::Vm(&b)).action,
            PolicyAction::Allow
        );
    }
}
