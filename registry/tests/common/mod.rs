//! Test harness: a throwaway PKI and the real `vnp-registry` binary on a free loopback port.
//! Everything is removed on drop (process killed, directory deleted), also when a test fails.

#![allow(dead_code)]

pub mod etcd;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use vnp_registry_client::api::{Identity, Role};
use vnp_registry_client::pki::{DevCa, OffsetDateTime};
use vnp_registry_client::{ClientConfig, RegistryClient};

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// A unique temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("vnp-reg-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The PKI the registry trusts: exactly what `vnpctl ca init` / `vnpctl cert` write.
pub struct Pki {
    pub ca: DevCa,
}

impl Pki {
    /// `vnpctl ca init --dir dir`: CA, server.pem (127.0.0.1) and admin.pem.
    pub fn new(dir: &Path) -> Pki {
        Pki {
            ca: DevCa::init(dir, &[], 1, false).expect("ca init"),
        }
    }

    /// `vnpctl cert <role> --id <id>`, written as `<stem>.pem/key`.
    pub fn client(&self, stem: &str, role: Role, id: &str) {
        self.ca
            .issue(
                &Identity {
                    role,
                    id: id.into(),
                },
                stem,
                1,
            )
            .expect("issue");
    }

    /// A certificate with any (or no) URI and validity window.
    pub fn client_with(
        &self,
        stem: &str,
        uri: Option<&str>,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) {
        self.ca.issue_custom(stem, uri, from, to).expect("issue");
    }
}

/// The real registry binary, killed on drop.
pub struct RegistryProc {
    pub child: Child,
    pub url: String,
    pub data: PathBuf,
    pub tls: PathBuf,
    pub log: PathBuf,
    pub extra: Vec<String>,
}

impl RegistryProc {
    /// Starts the registry with its data under `root/data` and TLS material from `tls`.
    pub fn start(root: &Path, tls: &Path, extra: &[&str]) -> RegistryProc {
        let mut p = RegistryProc {
            child: Command::new("true").spawn().unwrap(),
            url: String::new(),
            data: root.join("data"),
            tls: tls.to_path_buf(),
            log: root.join("registry.log"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        let _ = p.child.wait();
        p.spawn();
        p
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_vnp-registry"))
            .args(["--listen", "127.0.0.1:0", "--data"])
            .arg(&self.data)
            .arg("--tls-dir")
            .arg(&self.tls)
            .args(&self.extra)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn vnp-registry");
        let stdout = child.stdout.take().unwrap();
        self.child = child;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("vnp-registry listening on ")
            .unwrap_or_else(|| {
                panic!(
                    "registry did not start: {line:?}; log: {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                )
            });
        self.url = format!("https://{addr}");
    }

    /// Kills the process without warning (a crash), then starts it again on the same data.
    pub fn crash_and_restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.spawn();
    }

    /// A client using `tls/<stem>.pem/key`.
    pub fn client(&self, stem: &str) -> RegistryClient {
        RegistryClient::new(self.config(stem)).expect("client")
    }

    pub fn config(&self, stem: &str) -> ClientConfig {
        let mut c = ClientConfig::from_files(
            &self.url,
            &self.tls.join("ca.pem"),
            &self.tls.join(format!("{stem}.pem")),
            &self.tls.join(format!("{stem}.key")),
        )
        .unwrap();
        c.timeout = Duration::from_secs(10);
        c
    }
}

impl Drop for RegistryProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where a test registry keeps its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The embedded default.
    Redb,
    /// A one-member etcd cluster of the fixture's own.
    Etcd,
}

/// A registry with a PKI holding `admin`, hosts `h1` `h2`, gateway `g1`; dropped in order
/// (registry, etcd, files).
pub struct Fixture {
    pub reg: RegistryProc,
    pub etcd: Option<etcd::EtcdCluster>,
    pub pki: Pki,
    pub dir: TempDir,
}

impl Fixture {
    pub fn new(tag: &str) -> Fixture {
        Self::with_args(tag, &[])
    }

    pub fn with_args(tag: &str, extra: &[&str]) -> Fixture {
        Self::on_with_args(Backend::Redb, tag, extra)
    }

    pub fn on(backend: Backend, tag: &str) -> Fixture {
        Self::on_with_args(backend, tag, &[])
    }

    pub fn on_with_args(backend: Backend, tag: &str, extra: &[&str]) -> Fixture {
        let dir = TempDir::new(tag);
        let tls = dir.0.join("tls");
        let pki = Pki::new(&tls);
        pki.client("h1", Role::Host, "h1");
        pki.client("h2", Role::Host, "h2");
        pki.client("g1", Role::Gateway, "g1");
        let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let etcd = (backend == Backend::Etcd).then(|| {
            let cluster = etcd::EtcdCluster::start(1, tag);
            let keys = etcd::write_secret_keys(&dir.0);
            args.extend([
                "--store".into(),
                "etcd".into(),
                "--etcd-endpoints".into(),
                cluster.endpoints(),
                "--secret-keys".into(),
                keys.display().to_string(),
            ]);
            cluster
        });
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let reg = RegistryProc::start(&dir.0, &tls, &args);
        Fixture {
            reg,
            etcd,
            pki,
            dir,
        }
    }
}

/// Network `n1` (10.1.0.0/24, the given VNI) and hosts `h1` (198.18.0.1) and `h2`
/// (198.18.0.2): the state most registry tests start from.
pub fn network_and_two_hosts(admin: &vnp_registry_client::RegistryClient, vni: Option<u32>) {
    use vnp_registry_client::{HostSpec, NetworkSpec};
    admin
        .create_network(&NetworkSpec {
            id: "n1".into(),
            vni,
            cidr: "10.1.0.0/24".parse().unwrap(),
            mtu: None,
            default_policy: None,
            nat_block: None,
        })
        .unwrap();
    for (h, last) in [("h1", 1), ("h2", 2)] {
        admin
            .create_host(&HostSpec {
                id: h.into(),
                underlay_addr: std::net::Ipv4Addr::new(198, 18, 0, last),
                port_range: None,
            })
            .unwrap();
    }
}
