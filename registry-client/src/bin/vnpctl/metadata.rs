//! Metadata and credentials (issue #11): `vnpctl vm set-attr|unset-attr|set-scopes|metadata|
//! host-keys|access-token|identity-token`, `vnpctl project ...`, `vnpctl keys list|rotate`,
//! `vnpctl jwks` and `vnpctl verify-token`.

use crate::output::{fields, json as to_json, opt, table};
use base64::Engine;
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use vnp_registry_client::metadata::{Attributes, Jwks, ProjectUpdate, VmMetadata};
use vnp_registry_client::{jwt, ClientError, RegistryClient};

fn e(e: ClientError) -> String {
    e.to_string()
}

/// The metadata subcommands of `vnpctl vm`.
#[derive(Debug, clap::Subcommand)]
pub enum VmMetaCmd {
    /// Set an operator attribute the VM sees under instance/attributes/.
    SetAttr {
        id: String,
        // Not `key`: that is vnpctl's global `--key` (the client key file).
        #[arg(value_name = "KEY")]
        attr: String,
        value: String,
    },
    /// Remove an operator attribute.
    UnsetAttr {
        id: String,
        #[arg(value_name = "KEY")]
        attr: String,
    },
    /// Set the scopes of the VM's service account (none: back to the default).
    SetScopes { id: String, scopes: Vec<String> },
    /// Show what the VM's metadata server serves (the document and its etag).
    Metadata { id: String },
    /// The SSH host keys the guest published (guest-attributes/hostkeys/*), with their
    /// SHA256 fingerprints, to check a first SSH connection against.
    HostKeys {
        id: String,
        /// Print known_hosts lines (`<address> <type> <key>`) instead.
        #[arg(long)]
        known_hosts: bool,
    },
    /// Mint an access token for the VM's service account (admin; debugging).
    AccessToken { id: String },
    /// Mint an identity token of the VM (admin; debugging).
    IdentityToken {
        id: String,
        #[arg(long)]
        audience: String,
        /// With GCE's google.compute_engine claims.
        #[arg(long)]
        full: bool,
    },
}

fn attributes(a: &Attributes) -> String {
    let rows: Vec<Vec<String>> = a.iter().map(|(k, v)| vec![k.clone(), v.clone()]).collect();
    table(&["KEY", "VALUE"], &rows)
}

fn show_metadata(md: &VmMetadata) -> String {
    let i = &md.instance;
    let mut out = fields(&[
        ("etag", md.etag.clone()),
        ("instance", format!("{} (id {})", i.name, i.id)),
        ("hostname", i.hostname.clone()),
        ("zone", i.zone.clone()),
        (
            "network",
            format!(
                "{} ip {} mac {} gateway {} mtu {}",
                i.network, i.ip, i.mac, i.gateway, i.mtu
            ),
        ),
        ("service account", i.service_account.email.clone()),
        ("scopes", i.service_account.scopes.join(" ")),
        ("project", md.project.project_id.clone()),
    ]);
    for (title, attrs) in [
        ("instance attributes", &i.attributes),
        ("project attributes", &md.project.attributes),
        ("guest attributes", &md.guest_attributes),
    ] {
        out.push_str(&format!("\n{title}:\n{}", attributes(attrs)));
    }
    out
}

/// One published host key: type, SHA256 fingerprint (as `ssh-keygen -l` prints it) and the
/// key, from a `hostkeys/<type>` guest attribute whose value is `[<type> ]<base64>[ comment]`.
pub fn host_keys(guest: &Attributes) -> Vec<(String, String, String)> {
    guest
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("hostkeys/")?, v)))
        .map(|(kind, value)| {
            let words: Vec<&str> = value.split_whitespace().collect();
            let (kind, blob) = match words.as_slice() {
                [t, b, ..] => (t.to_string(), b.to_string()),
                [b] => (kind.to_string(), b.to_string()),
                [] => (kind.to_string(), String::new()),
            };
            let fingerprint = match base64::engine::general_purpose::STANDARD.decode(&blob) {
                Ok(raw) if !raw.is_empty() => format!(
                    "SHA256:{}",
                    base64::engine::general_purpose::STANDARD_NO_PAD.encode(Sha256::digest(&raw))
                ),
                _ => "(not base64: do not trust)".to_string(),
            };
            (kind, fingerprint, blob)
        })
        .collect()
}

/// Runs a metadata subcommand of `vnpctl vm`.
pub fn run_vm(c: &RegistryClient, cmd: &VmMetaCmd, json: bool) -> Result<String, String> {
    let attrs = |a: Attributes| if json { to_json(&a) } else { attributes(&a) };
    match cmd {
        VmMetaCmd::SetAttr { id, attr, value } => {
            Ok(attrs(c.set_vm_attribute(id, attr, value).map_err(e)?))
        }
        VmMetaCmd::UnsetAttr { id, attr } => Ok(attrs(c.unset_vm_attribute(id, attr).map_err(e)?)),
        VmMetaCmd::SetScopes { id, scopes } => {
            let s = c.set_vm_scopes(id, scopes).map_err(e)?;
            Ok(if json {
                to_json(&s)
            } else {
                format!("{}\n", s.join(" "))
            })
        }
        VmMetaCmd::Metadata { id } => {
            let md = c.vm_metadata(id, None).map_err(e)?;
            Ok(if json {
                to_json(&md)
            } else {
                show_metadata(&md)
            })
        }
        VmMetaCmd::HostKeys { id, known_hosts } => {
            let md = c.vm_metadata(id, None).map_err(e)?;
            let keys = host_keys(&md.guest_attributes);
            if keys.is_empty() {
                return Err(format!(
                    "VM {id} has published no host keys (guest-attributes/hostkeys/)"
                ));
            }
            if *known_hosts {
                let at = format!("{},{}", md.instance.hostname, md.instance.ip);
                return Ok(keys
                    .iter()
                    .map(|(t, _, k)| format!("{at} {t} {k}\n"))
                    .collect());
            }
            if json {
                let v: Vec<serde_json::Value> = keys
                    .iter()
                    .map(|(t, f, k)| serde_json::json!({"type": t, "fingerprint": f, "key": k}))
                    .collect();
                return Ok(to_json(&v));
            }
            let rows: Vec<Vec<String>> = keys.into_iter().map(|(t, f, k)| vec![t, f, k]).collect();
            Ok(table(&["TYPE", "FINGERPRINT", "KEY"], &rows))
        }
        VmMetaCmd::AccessToken { id } => {
            let t = c.mint_access_token(id).map_err(e)?;
            Ok(if json {
                to_json(&t)
            } else {
                format!("{}\n", t.access_token)
            })
        }
        VmMetaCmd::IdentityToken { id, audience, full } => {
            let t = c.mint_identity_token(id, audience, *full).map_err(e)?;
            Ok(if json {
                to_json(&t)
            } else {
                format!("{}\n", t.token)
            })
        }
    }
}

/// `vnpctl project` subcommands: each network is one project.
#[derive(Debug, clap::Subcommand)]
pub enum ProjectCmd {
    /// Show a network's project.
    Show { network: String },
    /// Set a network's project id, zone and metadata session requirement.
    Set {
        network: String,
        #[arg(long)]
        project_id: Option<String>,
        #[arg(long)]
        zone: Option<String>,
        /// true: the network's VMs need an IMDSv2-style session token on every metadata
        /// request (PUT /computeMetadata/v1/token first); false: optional.
        #[arg(long, value_name = "BOOL")]
        require_session_token: Option<bool>,
    },
    /// Set a project attribute the network's VMs see under project/attributes/.
    SetAttr {
        network: String,
        #[arg(value_name = "KEY")]
        attr: String,
        value: String,
    },
    /// Remove a project attribute.
    UnsetAttr {
        network: String,
        #[arg(value_name = "KEY")]
        attr: String,
    },
}

/// Runs a `vnpctl project` subcommand.
pub fn run_project(c: &RegistryClient, cmd: &ProjectCmd, json: bool) -> Result<String, String> {
    let p = match cmd {
        ProjectCmd::Show { network } => c.get_project(network),
        ProjectCmd::Set {
            network,
            project_id,
            zone,
            require_session_token,
        } => c.update_project(
            network,
            &ProjectUpdate {
                project_id: project_id.clone(),
                zone: zone.clone(),
                require_session_token: *require_session_token,
            },
        ),
        ProjectCmd::SetAttr {
            network,
            attr,
            value,
        } => c.set_project_attribute(network, attr, value),
        ProjectCmd::UnsetAttr { network, attr } => c.unset_project_attribute(network, attr),
    }
    .map_err(e)?;
    if json {
        return Ok(to_json(&p));
    }
    let mut out = fields(&[
        ("network", p.network.clone()),
        ("project id", p.project_id.clone()),
        ("zone", p.zone.clone()),
        (
            "metadata session token",
            if p.require_session_token {
                "required"
            } else {
                "optional"
            }
            .to_string(),
        ),
    ]);
    out.push_str(&format!("\nattributes:\n{}", attributes(&p.attributes)));
    Ok(out)
}

/// `vnpctl keys` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum KeysCmd {
    /// The registry's signing keys (never their private halves).
    List,
    /// A new key signs from now on; the old one stays published until its tokens expire.
    Rotate,
}

/// Runs a `vnpctl keys` subcommand.
pub fn run_keys(c: &RegistryClient, cmd: &KeysCmd, json: bool) -> Result<String, String> {
    let keys = match cmd {
        KeysCmd::List => c.list_signing_keys(),
        KeysCmd::Rotate => c.rotate_signing_key(),
    }
    .map_err(e)?;
    if json {
        return Ok(to_json(&keys));
    }
    let rows: Vec<Vec<String>> = keys
        .iter()
        .map(|k| {
            vec![
                k.kid.clone(),
                if k.active { "signing" } else { "retired" }.to_string(),
                k.created_at.to_string(),
                opt(&k.published_until),
            ]
        })
        .collect();
    Ok(table(
        &["KID", "STATE", "CREATED", "PUBLISHED UNTIL"],
        &rows,
    ))
}

/// Arguments of `vnpctl verify-token`.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// The JWT.
    pub token: String,
    /// Require this `aud`.
    #[arg(long)]
    pub audience: Option<String>,
    /// Verify against this JWKS file (from `vnpctl jwks --out`) instead of the registry's.
    #[arg(long)]
    pub jwks: Option<PathBuf>,
}

/// Reads a JWKS file.
pub fn read_jwks(path: &std::path::Path) -> Result<Jwks, String> {
    let text = std::fs::read(path).map_err(|err| format!("{}: {err}", path.display()))?;
    serde_json::from_slice(&text).map_err(|err| format!("{}: not a JWKS: {err}", path.display()))
}

/// Verifies a token against `jwks` now: the claims, or why not.
pub fn verify(args: &VerifyArgs, jwks: &Jwks, json: bool) -> Result<String, String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let v = jwt::verify(&args.token, jwks, args.audience.as_deref(), now)
        .map_err(|err| format!("token refused: {err}"))?;
    if json {
        return Ok(to_json(&v.claims));
    }
    let claims = serde_json::to_string_pretty(&v.claims).unwrap_or_default();
    Ok(format!("valid (key {}); claims:\n{claims}\n", v.kid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_key_fingerprints() {
        let mut g = Attributes::new();
        // A key from `ssh-keygen -t ed25519`; `ssh-keygen -lf` printed the fingerprint below.
        g.insert(
            "hostkeys/ssh-ed25519".into(),
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBJ9rai/pB9SD5mkGSKwxVequTRRNv/zce3O4i5RU8oJ root@a".into(),
        );
        g.insert("hostkeys/ssh-rsa".into(), "!!!".into());
        g.insert("other/x".into(), "y".into());
        let rows = host_keys(&g);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].0, "ssh-ed25519");
        assert_eq!(
            rows[0].1,
            "SHA256:yFeY4zEehFtI0nzA1vvAHIr8GGo6YSM6LiyCt564Yv4"
        );
        assert_eq!(rows[1].0, "ssh-rsa");
        assert!(rows[1].1.contains("do not trust"));
    }
}
