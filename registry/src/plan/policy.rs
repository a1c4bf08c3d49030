//! Pair-policy rules.

use super::*;

/// Adds a rule.
pub fn create_rule(model: &Model, spec: &PolicyRuleSpec) -> Planned<PolicyRule> {
    check_id(&spec.id)?;
    if model.rules.contains_key(&spec.id) {
        return refuse(
            ErrorCode::Duplicate,
            format!("rule {} already exists", spec.id),
        );
    }
    if !model.networks.contains_key(&spec.network) {
        return refuse(
            ErrorCode::UnknownNetwork,
            format!("no network {}", spec.network),
        );
    }
    for sel in [&spec.a, &spec.b] {
        match sel {
            Selector::Vm(v) | Selector::Tag(v) => check_name("selector", v)?,
            Selector::Any | Selector::External => {}
        }
    }
    if spec.a == Selector::External && spec.b == Selector::External {
        return refuse(
            ErrorCode::BadRequest,
            "a rule between external and external never matches",
        );
    }
    Ok((vec![Op::PutRule(spec.clone())], spec.clone()))
}

/// Removes a rule.
pub fn delete_rule(model: &Model, id: &str) -> Planned<Deleted> {
    if !model.rules.contains_key(id) {
        return refuse(ErrorCode::UnknownRule, format!("no rule {id}"));
    }
    Ok((
        vec![Op::DeleteRule(id.to_string())],
        Deleted {
            deleted: format!("rule/{id}"),
            cascaded: vec![],
        },
    ))
}
