//! The embedded default store: [redb](https://docs.rs/redb), copy-on-write B-trees with a
//! checksummed commit, `fsync`ed before `commit` returns, so an acknowledged write survives a
//! crash or power loss. One process owns the file, so a conflict only arises from a caller
//! planning on an outdated model (the revision guard catches that too).

use super::{Store, StoreError};
use crate::model::{port_key, Model, Op, SecretEntry, SecretOwner};
use redb::{Database, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::Path;
use vnp_protocol::token::VmSecret;
use vnp_registry_client::api::VmChange;
use zeroize::Zeroize;

const NETWORKS: TableDefinition<&str, &[u8]> = TableDefinition::new("networks");
const HOSTS: TableDefinition<&str, &[u8]> = TableDefinition::new("hosts");
const GATEWAYS: TableDefinition<&str, &[u8]> = TableDefinition::new("gateways");
const VMS: TableDefinition<&str, &[u8]> = TableDefinition::new("vms");
const RULES: TableDefinition<&str, &[u8]> = TableDefinition::new("rules");
/// Port-forwarding rules by id (JSON).
const FORWARDS: TableDefinition<&str, &[u8]> = TableDefinition::new("forwards");
/// Load-balanced services by id (JSON).
const SERVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("services");
/// Gateways' health views by gateway id (JSON).
const HEALTH: TableDefinition<&str, &[u8]> = TableDefinition::new("health");
/// Key `vm/<id>` or `gw/<id>`; value: 32 secret bytes then the generation (u64 big endian).
const SECRETS: TableDefinition<&str, &[u8]> = TableDefinition::new("secrets");
const CHANGES: TableDefinition<u64, &[u8]> = TableDefinition::new("changes");
/// Idempotency key -> the remembered answer (JSON).
const REQUESTS: TableDefinition<&str, &[u8]> = TableDefinition::new("requests");
/// Key `<host>/<port>` -> the port's quarantine (JSON).
const QUARANTINE: TableDefinition<&str, &[u8]> = TableDefinition::new("quarantine");
/// Key `vm/<id>`, `project/<network>` or `signing-key/<kid>` -> the metadata record (JSON).
const METADATA: TableDefinition<&str, &[u8]> = TableDefinition::new("metadata");
/// Key `revision`: the number of commits so far (absent in files from before revisions).
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const REVISION: &str = "revision";

fn io<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Io(e.to_string())
}

/// The embedded default store: one redb file.
pub struct RedbStore {
    db: Database,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RedbStore")
    }
}

impl RedbStore {
    /// Opens (or creates) `dir/registry.redb`. The directory is created with mode 0700 because
    /// the file holds every VM secret.
    pub fn open(dir: &Path) -> Result<RedbStore, StoreError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| StoreError::Io(format!("{}: {e}", dir.display())))?;
        let path = dir.join("registry.redb");
        let file = open_private(&path)?;
        let db = redb::Builder::new()
            .create_file(file)
            .map_err(|e| StoreError::Io(format!("{}: {e}", path.display())))?;
        // Create every table once so that read transactions never meet a missing table.
        let txn = db.begin_write().map_err(io)?;
        {
            for t in [
                NETWORKS, HOSTS, GATEWAYS, VMS, RULES, FORWARDS, SERVICES, HEALTH, SECRETS,
                REQUESTS, QUARANTINE, METADATA,
            ] {
                txn.open_table(t).map_err(io)?;
            }
            txn.open_table(CHANGES).map_err(io)?;
            txn.open_table(META).map_err(io)?;
        }
        txn.commit().map_err(io)?;
        Ok(RedbStore { db })
    }
}

/// Opens (or creates) the database file readable by its owner only. A new file is created
/// with mode 0600 by `open(2)` itself, so there is no moment when another user could open it; a
/// file left by an older version with wider permissions is narrowed through the open handle.
fn open_private(path: &Path) -> Result<std::fs::File, StoreError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let at = |e: std::io::Error| StoreError::Io(format!("{}: {e}", path.display()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(at)?;
    let mode = file.metadata().map_err(at)?.permissions().mode();
    if mode & 0o077 != 0 {
        log::warn!(
            "{}: mode {:o} lets other users read VM secrets; narrowing it to 0600",
            path.display(),
            mode & 0o777
        );
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(at)?;
    }
    Ok(file)
}

fn json<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(io)
}

fn read_json_table<T: DeserializeOwned>(
    txn: &redb::ReadTransaction,
    def: TableDefinition<&str, &[u8]>,
    name: &'static str,
) -> Result<Vec<T>, StoreError> {
    let table = txn.open_table(def).map_err(io)?;
    let mut out = Vec::new();
    for row in table.iter().map_err(io)? {
        let (k, v) = row.map_err(io)?;
        let rec = serde_json::from_slice(v.value()).map_err(|e| StoreError::Corrupt {
            table: name,
            key: k.value().to_string(),
            detail: e.to_string(),
        })?;
        out.push(rec);
    }
    Ok(out)
}

fn encode_secret(entry: &SecretEntry) -> [u8; 40] {
    let mut out = [0u8; 40];
    out[..32].copy_from_slice(entry.secret.as_bytes());
    out[32..].copy_from_slice(&entry.generation.to_be_bytes());
    out
}

impl Store for RedbStore {
    fn load(&self) -> Result<Model, StoreError> {
        let txn = self.db.begin_read().map_err(io)?;
        let mut ops = Vec::new();
        ops.extend(
            read_json_table(&txn, NETWORKS, "networks")?
                .into_iter()
                .map(Op::PutNetwork),
        );
        ops.extend(
            read_json_table(&txn, HOSTS, "hosts")?
                .into_iter()
                .map(Op::PutHost),
        );
        ops.extend(
            read_json_table(&txn, GATEWAYS, "gateways")?
                .into_iter()
                .map(Op::PutGateway),
        );
        ops.extend(
            read_json_table(&txn, VMS, "vms")?
                .into_iter()
                .map(Op::PutVm),
        );
        ops.extend(
            read_json_table(&txn, RULES, "rules")?
                .into_iter()
                .map(Op::PutRule),
        );
        ops.extend(
            read_json_table(&txn, FORWARDS, "forwards")?
                .into_iter()
                .map(Op::PutForward),
        );
        ops.extend(
            read_json_table(&txn, SERVICES, "services")?
                .into_iter()
                .map(Op::PutService),
        );
        ops.extend(
            read_json_table(&txn, HEALTH, "health")?
                .into_iter()
                .map(Op::PutHealthView),
        );
        {
            let table = txn.open_table(SECRETS).map_err(io)?;
            for row in table.iter().map_err(io)? {
                let (k, v) = row.map_err(io)?;
                let key = k.value().to_string();
                let bytes = v.value();
                let owner = SecretOwner::from_key(&key);
                let (Some(owner), 40) = (owner, bytes.len()) else {
                    return Err(StoreError::Corrupt {
                        table: "secrets",
                        key,
                        detail: "bad key or length".into(),
                    });
                };
                let mut raw = [0u8; 32];
                raw.copy_from_slice(&bytes[..32]);
                let mut gen = [0u8; 8];
                gen.copy_from_slice(&bytes[32..]);
                let entry = SecretEntry::new(VmSecret::from_bytes(raw), u64::from_be_bytes(gen));
                raw.zeroize();
                ops.push(Op::PutSecret(owner, entry));
            }
        }
        {
            let table = txn.open_table(CHANGES).map_err(io)?;
            for row in table.iter().map_err(io)? {
                let (k, v) = row.map_err(io)?;
                let change: VmChange =
                    serde_json::from_slice(v.value()).map_err(|e| StoreError::Corrupt {
                        table: "changes",
                        key: k.value().to_string(),
                        detail: e.to_string(),
                    })?;
                ops.push(Op::AppendChange(change));
            }
        }
        {
            let table = txn.open_table(REQUESTS).map_err(io)?;
            for row in table.iter().map_err(io)? {
                let (k, v) = row.map_err(io)?;
                let w = serde_json::from_slice(v.value()).map_err(|e| StoreError::Corrupt {
                    table: "requests",
                    key: k.value().to_string(),
                    detail: e.to_string(),
                })?;
                ops.push(Op::RememberWrite(k.value().to_string(), w));
            }
        }
        ops.extend(
            read_json_table(&txn, QUARANTINE, "quarantine")?
                .into_iter()
                .map(Op::QuarantinePort),
        );
        ops.extend(
            read_json_table(&txn, METADATA, "metadata")?
                .into_iter()
                .map(Op::PutMeta),
        );
        let mut model = Model::default();
        model.apply(&ops);
        model.revision = read_revision(&txn.open_table(META).map_err(io)?)?;
        Ok(model)
    }

    fn commit(&self, base: u64, ops: &[Op]) -> Result<u64, StoreError> {
        let txn = self.db.begin_write().map_err(io)?;
        let revision = {
            let mut meta = txn.open_table(META).map_err(io)?;
            let current = read_revision(&meta)?;
            if current != base {
                // Dropping the transaction aborts it: nothing is written.
                return Err(StoreError::Conflict { latest: current });
            }
            meta.insert(REVISION, current + 1).map_err(io)?;
            current + 1
        };
        {
            let mut networks = txn.open_table(NETWORKS).map_err(io)?;
            let mut hosts = txn.open_table(HOSTS).map_err(io)?;
            let mut gateways = txn.open_table(GATEWAYS).map_err(io)?;
            let mut vms = txn.open_table(VMS).map_err(io)?;
            let mut rules = txn.open_table(RULES).map_err(io)?;
            let mut forwards = txn.open_table(FORWARDS).map_err(io)?;
            let mut services = txn.open_table(SERVICES).map_err(io)?;
            let mut health = txn.open_table(HEALTH).map_err(io)?;
            let mut secrets = txn.open_table(SECRETS).map_err(io)?;
            let mut changes = txn.open_table(CHANGES).map_err(io)?;
            let mut requests = txn.open_table(REQUESTS).map_err(io)?;
            let mut quarantine = txn.open_table(QUARANTINE).map_err(io)?;
            let mut metadata = txn.open_table(METADATA).map_err(io)?;
            for op in ops {
                match op {
                    Op::PutNetwork(n) => drop(
                        networks
                            .insert(n.id.as_str(), json(n)?.as_slice())
                            .map_err(io)?,
                    ),
                    Op::DeleteNetwork(id) => drop(networks.remove(id.as_str()).map_err(io)?),
                    Op::PutHost(h) => drop(
                        hosts
                            .insert(h.id.as_str(), json(h)?.as_slice())
                            .map_err(io)?,
                    ),
                    Op::DeleteHost(id) => drop(hosts.remove(id.as_str()).map_err(io)?),
                    Op::PutGateway(g) => drop(
                        gateways
                            .insert(g.id.as_str(), json(g)?.as_slice())
                            .map_err(io)?,
                    ),
                    Op::DeleteGateway(id) => drop(gateways.remove(id.as_str()).map_err(io)?),
                    Op::PutVm(v) => {
                        drop(vms.insert(v.id.as_str(), json(v)?.as_slice()).map_err(io)?)
                    }
                    Op::DeleteVm(id) => drop(vms.remove(id.as_str()).map_err(io)?),
                    Op::PutRule(r) => drop(
                        rules
                            .insert(r.id.as_str(), json(r)?.as_slice())
                            .map_err(io)?,
                    ),
                    Op::DeleteRule(id) => drop(rules.remove(id.as_str()).map_err(io)?),
                    Op::PutForward(f) => drop(
                        forwards
                            .insert(f.id.as_str(), json(f)?.as_slice())
                            .map_err(io)?,
                    ),
                    Op::DeleteForward(id) => drop(forwards.remove(id.as_str()).map_err(io)?),
                    Op::PutService(s) => drop(
                        services
                            .insert(s.id.as_str(), json(s)?.as_slice())
                            .map_err(io)?,
                    ),
                    Op::DeleteService(id) => drop(services.remove(id.as_str()).map_err(io)?),
                    Op::PutHealthView(v) => drop(
                        health
                            .insert(v.gateway.as_str(), json(v)?.as_slice())
                            .map_err(io)?,
                    ),
                    Op::DeleteHealthView(id) => drop(health.remove(id.as_str()).map_err(io)?),
                    Op::PutSecret(owner, entry) => {
                        let mut bytes = encode_secret(entry);
                        let r = secrets
                            .insert(owner.key().as_str(), bytes.as_slice())
                            .map(drop);
                        bytes.zeroize();
                        r.map_err(io)?;
                    }
                    Op::DeleteSecret(owner) => {
                        drop(secrets.remove(owner.key().as_str()).map_err(io)?)
                    }
                    Op::AppendChange(c) => drop(
                        changes
                            .insert(c.generation, json(c)?.as_slice())
                            .map_err(io)?,
                    ),
                    Op::TrimChanges(below) => {
                        changes.retain_in(..*below, |_, _| false).map_err(io)?;
                    }
                    Op::RememberWrite(key, w) => drop(
                        requests
                            .insert(key.as_str(), json(w)?.as_slice())
                            .map_err(io)?,
                    ),
                    Op::ForgetWrite(key) => drop(requests.remove(key.as_str()).map_err(io)?),
                    Op::QuarantinePort(q) => drop(
                        quarantine
                            .insert(q.key().as_str(), json(q)?.as_slice())
                            .map_err(io)?,
                    ),
                    Op::ReleasePort(host, port) => drop(
                        quarantine
                            .remove(port_key(host, *port).as_str())
                            .map_err(io)?,
                    ),
                    Op::PutMeta(r) => drop(
                        metadata
                            .insert(r.key().key().as_str(), json(r)?.as_slice())
                            .map_err(io)?,
                    ),
                    Op::DeleteMeta(k) => drop(metadata.remove(k.key().as_str()).map_err(io)?),
                }
            }
        }
        // Durability::Immediate (the default): fsync before returning.
        txn.commit().map_err(io)?;
        Ok(revision)
    }
}

fn read_revision(meta: &impl ReadableTable<&'static str, u64>) -> Result<u64, StoreError> {
    Ok(meta.get(REVISION).map_err(io)?.map_or(0, |v| v.value()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan;
    use crate::plan::PortReuse;

    const REUSE: PortReuse = PortReuse {
        now: 1000,
        quarantine_secs: 600,
    };
    use std::net::Ipv4Addr;
    use vnp_registry_client::api::*;

    #[test]
    fn commit_then_reload_round_trips_everything() {
        let dir = std::env::temp_dir().join(format!("vnp-store-test-{}", std::process::id()));
        let _cleanup = Cleanup(dir.clone());
        let store = RedbStore::open(&dir).unwrap();
        let mut m = Model::default();
        let run = |m: &mut Model, ops: Vec<Op>| {
            m.revision = store.commit(m.revision, &ops).unwrap();
            m.apply(&ops);
        };
        let n = NetworkSpec {
            id: "n1".into(),
            vni: None,
            cidr: "10.1.0.0/24".parse().unwrap(),
            mtu: None,
            default_policy: None,
            nat_block: None,
        };
        let ops = plan::create_network(&m, &n).unwrap().0;
        run(&mut m, ops);
        let h = HostSpec {
            id: "h1".into(),
            underlay_addr: Ipv4Addr::new(198, 18, 0, 1),
            port_range: None,
        };
        let ops = plan::create_host(&m, &h).unwrap().0;
        run(&mut m, ops);
        let v = VmSpec {
            id: "a".into(),
            network: "n1".into(),
            host: Some("h1".into()),
            tags: vec!["web".into()],
            ..VmSpec::default()
        };
        let ops = plan::create_vm(&m, &v, VmSecret::from_bytes([5; 32]), REUSE)
            .unwrap()
            .0;
        run(&mut m, ops);
        let ops = plan::rotate_vm_secret(&m, "a", VmSecret::from_bytes([6; 32]))
            .unwrap()
            .0;
        run(&mut m, ops);
        drop(store);

        let loaded = RedbStore::open(&dir).unwrap().load().unwrap();
        assert_eq!(loaded.networks, m.networks);
        assert_eq!(loaded.hosts, m.hosts);
        assert_eq!(loaded.vms, m.vms);
        assert_eq!(loaded.generation, 2);
        assert_eq!(loaded.changes, m.changes);
        let s = &loaded.secrets[&SecretOwner::Vm("a".into())];
        assert_eq!((s.secret.as_bytes(), s.generation), (&[6u8; 32], 2));
        assert_eq!(
            loaded
                .vm_by_ip("n1", Ipv4Addr::new(10, 1, 0, 2))
                .unwrap()
                .id,
            "a"
        );
    }

    /// Watches `dir` for files created and attributes changed (inotify), to tell a file
    /// created 0600 from one created wider and narrowed afterwards: the end state is the same,
    /// but the chmod is an `IN_ATTRIB` event, and until it ran anyone could have opened it.
    struct AttribWatch(std::fs::File);

    impl AttribWatch {
        fn new(dir: &Path) -> Self {
            use std::os::fd::FromRawFd;
            use std::os::unix::ffi::OsStrExt;
            // SAFETY: inotify_init1 takes only flags; the result is checked.
            let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
            assert!(
                fd >= 0,
                "inotify_init1: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: fd is a fresh descriptor that nothing else owns.
            let file = unsafe { std::fs::File::from_raw_fd(fd) };
            let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
            // SAFETY: fd is an inotify descriptor, path a valid NUL-terminated string.
            let wd = unsafe {
                libc::inotify_add_watch(fd, path.as_ptr(), libc::IN_CREATE | libc::IN_ATTRIB)
            };
            assert!(
                wd >= 0,
                "inotify_add_watch: {}",
                std::io::Error::last_os_error()
            );
            Self(file)
        }

        /// (mask, name) of every event so far.
        fn events(&mut self) -> Vec<(u32, String)> {
            use std::io::Read;
            let mut buf = vec![0u8; 64 * 1024];
            let n = self.0.read(&mut buf).unwrap_or(0);
            let mut out = Vec::new();
            let mut at = 0;
            let header = std::mem::size_of::<libc::inotify_event>();
            while at + header <= n {
                let field =
                    |o: usize| u32::from_ne_bytes(buf[at + o..at + o + 4].try_into().unwrap());
                let (mask, len) = (field(4), field(12) as usize);
                let name = &buf[at + header..at + header + len];
                let name = String::from_utf8_lossy(name)
                    .trim_end_matches('\0')
                    .to_string();
                out.push((mask, name));
                at += header + len;
            }
            out
        }
    }

    #[test]
    fn database_file_is_created_owner_only_not_narrowed_afterwards() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("vnp-store-mode-{}", std::process::id()));
        let _cleanup = Cleanup(dir.clone());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let mut watch = AttribWatch::new(&dir);
        drop(RedbStore::open(&dir).unwrap());
        let file = dir.join("registry.redb");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&file), 0o600);
        let events = watch.events();
        assert!(
            events
                .iter()
                .any(|(m, n)| m & libc::IN_CREATE != 0 && n == "registry.redb"),
            "{events:?}"
        );
        assert!(
            !events
                .iter()
                .any(|(m, n)| m & libc::IN_ATTRIB != 0 && n == "registry.redb"),
            "the file was created wider and narrowed afterwards: {events:?}"
        );
        // A file an older version left world-readable is narrowed when opened.
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        drop(RedbStore::open(&dir).unwrap());
        assert_eq!(mode(&file), 0o600);
    }

    #[test]
    fn passes_the_storage_suite() {
        for (name, case) in crate::store::conformance::CASES {
            let dir =
                std::env::temp_dir().join(format!("vnp-store-suite-{}-{name}", std::process::id()));
            let _cleanup = Cleanup(dir.clone());
            eprintln!("redb: {name}");
            case(&RedbStore::open(&dir).unwrap());
        }
    }

    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
