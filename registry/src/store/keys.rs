//! The etcd key layout: one key per record, so a write touches only the records it changes.
//!
//! Under the prefix `P` (default `/vnp/`):
//!
//! | key | value |
//! |---|---|
//! | `P networks/<id>`, `hosts/<id>`, `gateways/<id>`, `vms/<id>`, `rules/<id>`, `forwards/<id>`, `services/<id>`, `health/<gateway>` | the record's JSON (as the API shows it) |
//! | `P secrets/vm/<id>`, `secrets/gw/<id>` | secret + generation, sealed ([`super::sealing`]) |
//! | `P changes/<generation, 20 digits>` | a change-log entry's JSON (sorted by generation) |
//! | `P requests/<idempotency key>` | the answer to a write that carried that key |
//! | `P quarantine/<host>/<port>` | a host port's quarantine (JSON) |
//! | `P metadata/vm/<id>`, `metadata/project/<network>`, `metadata/signing-key/<kid>` | a metadata record (JSON) |
//! | `P secrets/sk/<kid>` | a signing key's private scalar, sealed like the VM secrets |
//! | `P version` | bumped by every commit; commits compare its `mod_revision` |

use super::sealing::KeyRing;
use super::StoreError;
use crate::model::{parse_port_key, port_key, MetaKey, Op, SecretEntry, SecretOwner};
use serde::Serialize;
use vnp_protocol::token::VmSecret;
use zeroize::Zeroize;

/// One etcd write.
#[derive(Debug)]
pub(super) enum Write {
    Put(String, Vec<u8>),
    Delete(String),
    /// Deletes `[from, to)`.
    DeleteRange(String, String),
}

fn parse_json<T: serde::de::DeserializeOwned>(key: &str, value: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(value).map_err(|e| StoreError::Corrupt {
        table: "etcd",
        key: key.to_string(),
        detail: e.to_string(),
    })
}

/// Maps [`Op`]s to keys and back.
#[derive(Debug, Clone)]
pub(super) struct Layout {
    prefix: String,
}

fn json<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Io(e.to_string()))
}

impl Layout {
    pub(super) fn new(prefix: &str) -> Layout {
        let mut prefix = prefix.to_string();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Layout { prefix }
    }

    pub(super) fn prefix(&self) -> &str {
        &self.prefix
    }

    pub(super) fn version_key(&self) -> String {
        format!("{}version", self.prefix)
    }

    fn record(&self, kind: &str, id: &str) -> String {
        format!("{}{kind}/{id}", self.prefix)
    }

    fn secret(&self, owner: &SecretOwner) -> String {
        format!("{}secrets/{}", self.prefix, owner.key())
    }

    fn change(&self, generation: u64) -> String {
        format!("{}changes/{generation:020}", self.prefix)
    }

    /// The etcd write for one op; secrets are sealed with `ring`.
    pub(super) fn encode(&self, op: &Op, ring: &KeyRing) -> Result<Write, StoreError> {
        use Write::*;
        Ok(match op {
            Op::PutNetwork(n) => Put(self.record("networks", &n.id), json(n)?),
            Op::DeleteNetwork(id) => Delete(self.record("networks", id)),
            Op::PutHost(h) => Put(self.record("hosts", &h.id), json(h)?),
            Op::DeleteHost(id) => Delete(self.record("hosts", id)),
            Op::PutGateway(g) => Put(self.record("gateways", &g.id), json(g)?),
            Op::DeleteGateway(id) => Delete(self.record("gateways", id)),
            Op::PutVm(v) => Put(self.record("vms", &v.id), json(v)?),
            Op::DeleteVm(id) => Delete(self.record("vms", id)),
            Op::PutRule(r) => Put(self.record("rules", &r.id), json(r)?),
            Op::DeleteRule(id) => Delete(self.record("rules", id)),
            Op::PutForward(f) => Put(self.record("forwards", &f.id), json(f)?),
            Op::DeleteForward(id) => Delete(self.record("forwards", id)),
            Op::PutService(s) => Put(self.record("services", &s.id), json(s)?),
            Op::DeleteService(id) => Delete(self.record("services", id)),
            Op::PutHealthView(v) => Put(self.record("health", &v.gateway), json(v)?),
            Op::DeleteHealthView(id) => Delete(self.record("health", id)),
            Op::PutSecret(owner, entry) => {
                let key = self.secret(owner);
                let mut plain = [0u8; 40];
                plain[..32].copy_from_slice(entry.secret.as_bytes());
                plain[32..].copy_from_slice(&entry.generation.to_be_bytes());
                let sealed = ring.seal(key.as_bytes(), &plain);
                plain.zeroize();
                Put(key, sealed.map_err(|e| StoreError::Io(e.to_string()))?)
            }
            Op::DeleteSecret(owner) => Delete(self.secret(owner)),
            Op::AppendChange(c) => Put(self.change(c.generation), json(c)?),
            Op::TrimChanges(below) => DeleteRange(self.change(0), self.change(*below)),
            Op::RememberWrite(key, w) => Put(self.record("requests", key), json(w)?),
            Op::ForgetWrite(key) => Delete(self.record("requests", key)),
            Op::QuarantinePort(q) => Put(self.record("quarantine", &q.key()), json(q)?),
            Op::ReleasePort(host, port) => {
                Delete(self.record("quarantine", &port_key(host, *port)))
            }
            Op::PutMeta(r) => Put(self.record("metadata", &r.key().key()), json(r)?),
            Op::DeleteMeta(k) => Delete(self.record("metadata", &k.key())),
        })
    }

    /// The op a stored `(key, value)` stands for; `None` for bookkeeping keys (`version`).
    pub(super) fn decode_put(
        &self,
        key: &str,
        value: &[u8],
        ring: &KeyRing,
    ) -> Result<Option<Op>, StoreError> {
        let Some(rest) = key.strip_prefix(&self.prefix) else {
            return Ok(None);
        };
        let corrupt = |detail: String| StoreError::Corrupt {
            table: "etcd",
            key: key.to_string(),
            detail,
        };
        let (kind, id) = rest.split_once('/').unwrap_or((rest, ""));
        Ok(Some(match kind {
            "networks" => Op::PutNetwork(parse_json(key, value)?),
            "hosts" => Op::PutHost(parse_json(key, value)?),
            "gateways" => Op::PutGateway(parse_json(key, value)?),
            "vms" => Op::PutVm(parse_json(key, value)?),
            "rules" => Op::PutRule(parse_json(key, value)?),
            "forwards" => Op::PutForward(parse_json(key, value)?),
            "services" => Op::PutService(parse_json(key, value)?),
            "health" => Op::PutHealthView(parse_json(key, value)?),
            "changes" => Op::AppendChange(parse_json(key, value)?),
            "requests" => Op::RememberWrite(id.to_string(), parse_json(key, value)?),
            "quarantine" => Op::QuarantinePort(parse_json(key, value)?),
            "metadata" => Op::PutMeta(parse_json(key, value)?),
            "secrets" => {
                let owner =
                    SecretOwner::from_key(id).ok_or_else(|| corrupt("secret owner".into()))?;
                let plain = ring
                    .open(key.as_bytes(), value)
                    .map_err(|e| corrupt(e.to_string()))?;
                let bytes: &[u8; 40] = plain[..]
                    .try_into()
                    .map_err(|_| corrupt("secret length".into()))?;
                let mut raw = [0u8; 32];
                raw.copy_from_slice(&bytes[..32]);
                let mut generation = [0u8; 8];
                generation.copy_from_slice(&bytes[32..]);
                let entry =
                    SecretEntry::new(VmSecret::from_bytes(raw), u64::from_be_bytes(generation));
                raw.zeroize();
                Op::PutSecret(owner, entry)
            }
            _ => return Ok(None),
        }))
    }

    /// The op a deleted key stands for.
    pub(super) fn decode_delete(&self, key: &str) -> Option<Op> {
        let rest = key.strip_prefix(&self.prefix)?;
        let (kind, id) = rest.split_once('/')?;
        let id = id.to_string();
        Some(match kind {
            "networks" => Op::DeleteNetwork(id),
            "hosts" => Op::DeleteHost(id),
            "gateways" => Op::DeleteGateway(id),
            "vms" => Op::DeleteVm(id),
            "rules" => Op::DeleteRule(id),
            "forwards" => Op::DeleteForward(id),
            "services" => Op::DeleteService(id),
            "health" => Op::DeleteHealthView(id),
            "requests" => Op::ForgetWrite(id),
            "quarantine" => {
                let (host, port) = parse_port_key(&id)?;
                Op::ReleasePort(host, port)
            }
            "secrets" => Op::DeleteSecret(SecretOwner::from_key(&id)?),
            "metadata" => Op::DeleteMeta(MetaKey::from_key(&id)?),
            // The log is trimmed from its oldest end: forgetting generation g forgets all
            // before it as well.
            "changes" => Op::TrimChanges(id.parse::<u64>().ok()?.checked_add(1)?),
            _ => return None,
        })
    }
}
