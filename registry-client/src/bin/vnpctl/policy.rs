//! `vnpctl policy add|list|delete`.

use crate::output::{json as to_json, table};
use vnp_registry_client::{PolicyAction, PolicyRuleSpec, RegistryClient, Selector};

/// `vnpctl policy` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum PolicyCmd {
    /// Add a rule about the unordered pair {A, B}: selectors are any, external, vm:ID, tag:TAG.
    /// A matching deny always wins over a matching allow.
    Add {
        id: String,
        #[arg(long)]
        network: String,
        #[arg(long, conflicts_with = "deny", required_unless_present = "deny")]
        allow: bool,
        #[arg(long)]
        deny: bool,
        a: Selector,
        b: Selector,
    },
    /// List rules.
    List {
        #[arg(long)]
        network: Option<String>,
    },
    /// Delete a rule.
    Delete { id: String },
}

/// Runs the subcommand.
pub fn run(c: &RegistryClient, cmd: &PolicyCmd, json: bool) -> Result<String, String> {
    let e = |e: vnp_registry_client::ClientError| e.to_string();
    match cmd {
        PolicyCmd::Add {
            id,
            network,
            allow,
            deny: _,
            a,
            b,
        } => {
            let action = if *allow {
                PolicyAction::Allow
            } else {
                PolicyAction::Deny
            };
            let spec = PolicyRuleSpec {
                id: id.clone(),
                network: network.clone(),
                action,
                a: a.clone(),
                b: b.clone(),
            };
            let r = c.create_rule(&spec).map_err(e)?;
            Ok(if json {
                to_json(&r)
            } else {
                format!(
                    "rule {}: {} {} <-> {} in {}\n",
                    r.id, r.action, r.a, r.b, r.network
                )
            })
        }
        PolicyCmd::List { network } => {
            let list = c.list_rules(network.as_deref()).map_err(e)?;
            if json {
                return Ok(to_json(&list));
            }
            let rows = list
                .iter()
                .map(|r| {
                    vec![
                        r.id.clone(),
                        r.network.clone(),
                        r.action.to_string(),
                        r.a.to_string(),
                        r.b.to_string(),
                    ]
                })
                .collect::<Vec<_>>();
            Ok(table(&["ID", "NETWORK", "ACTION", "A", "B"], &rows))
        }
        PolicyCmd::Delete { id } => {
            let d = c.delete_rule(id).map_err(e)?;
            Ok(if json {
                to_json(&d)
            } else {
                crate::deleted(&d)
            })
        }
    }
}
