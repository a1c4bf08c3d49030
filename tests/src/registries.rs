//! How the cluster's registry runs, in the core namespace: one `vnp-registry` on a redb file
//! (the default), or several replicas on a real etcd cluster. With replicas, the etcd members
//! listen on the namespace's loopback (fixed ports: the namespace is ours alone) and the
//! replicas on [`CORE_ADDR`] at consecutive ports from [`REGISTRY_PORT`]. Every process is a
//! [`ChildGuard`], killed on drop.

use crate::bins::Bins;
use crate::cluster::REGISTRY_PORT;
use anyhow::{bail, Context, Result};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};
use vnp_testkit::netns::{Fabric, Netns, CORE_ADDR};
use vnp_testkit::process::ChildGuard;

/// Starts the registry in the core namespace (data in `<dir>/registry`, log in
/// `<dir>/registry.log`, appended across restarts) and waits until it accepts connections.
pub fn spawn_registry(
    fabric: &Fabric,
    bins: &Bins,
    dir: &Path,
    tls_dir: &Path,
    token_ttl_secs: u32,
) -> Result<ChildGuard> {
    spawn_registry_with(fabric, bins, dir, tls_dir, token_ttl_secs, &[])
}

/// [`spawn_registry`] with extra command-line arguments (e.g. `--credential-ttl-secs`).
pub fn spawn_registry_with(
    fabric: &Fabric,
    bins: &Bins,
    dir: &Path,
    tls_dir: &Path,
    token_ttl_secs: u32,
    extra_args: &[String],
) -> Result<ChildGuard> {
    let mut registry = ChildGuard::spawn(
        "vnp-registry",
        fabric
            .core()
            .command(&bins.registry)
            .arg("--listen")
            .arg(format!("{CORE_ADDR}:{REGISTRY_PORT}"))
            .arg("--data")
            .arg(dir.join("registry"))
            .arg("--tls-dir")
            .arg(tls_dir)
            .arg("--token-ttl")
            .arg(token_ttl_secs.to_string())
            .args(extra_args)
            .stdout(std::process::Stdio::null())
            .env("RUST_LOG", "info"),
        Some(&dir.join("registry.log")),
    )?;
    let core_addr = SocketAddr::from((CORE_ADDR, REGISTRY_PORT));
    registry.wait_until("the registry to listen", Duration::from_secs(30), || {
        fabric
            .core()
            .enter(move || TcpStream::connect_timeout(&core_addr, Duration::from_millis(200)))
            .ok()
            .and_then(Result::ok)
            .map(|_| ())
    })?;
    Ok(registry)
}

/// First client port of the etcd members (member `i` uses `+ i`); peers use `+ 100 + i`.
const ETCD_CLIENT_PORT: u16 = 23790;

/// How the registry is replicated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replication {
    /// etcd members (1 or 3 make sense).
    pub etcd_members: usize,
    /// `vnp-registry` replicas.
    pub replicas: usize,
    /// The replicas' `--max-staleness-ms`.
    pub max_staleness_ms: u64,
}

/// The running etcd members and registry replicas. Field order is drop order: replicas first.
#[derive(Debug)]
pub struct ReplicatedRegistry {
    replicas: Vec<Option<ChildGuard>>,
    etcd: Vec<ChildGuard>,
    ports: Vec<u16>,
}

/// What every replica is started with.
struct ReplicaSetup<'a> {
    core: &'a Netns,
    bins: &'a Bins,
    dir: &'a Path,
    tls_dir: &'a Path,
    token_ttl_secs: u32,
}

fn etcd_client_url(i: usize) -> String {
    format!("http://127.0.0.1:{}", ETCD_CLIENT_PORT + i as u16)
}

fn etcd_peer_url(i: usize) -> String {
    format!("http://127.0.0.1:{}", ETCD_CLIENT_PORT + 100 + i as u16)
}

fn spawn_etcd(setup: &ReplicaSetup, i: usize, members: usize) -> Result<ChildGuard> {
    let cluster: Vec<String> = (0..members)
        .map(|m| format!("m{m}={}", etcd_peer_url(m)))
        .collect();
    let (client, peer) = (etcd_client_url(i), etcd_peer_url(i));
    let child = ChildGuard::spawn(
        &format!("etcd-m{i}"),
        setup
            .core
            .command("etcd")
            .args(["--name", &format!("m{i}")])
            .arg("--data-dir")
            .arg(setup.dir.join(format!("etcd-m{i}")))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &cluster.join(",")])
            .args(["--initial-cluster-state", "new"])
            // Fast elections on loopback.
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .stdout(Stdio::null()),
        Some(&setup.dir.join(format!("etcd-m{i}.log"))),
    )?;
    Ok(child)
}

fn wait_etcd_healthy(core: &Netns, members: usize) -> Result<()> {
    let endpoints: Vec<String> = (0..members).map(etcd_client_url).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = core
            .command("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", endpoints.join(",")))
            .args(["--command-timeout", "3s", "endpoint", "health"])
            .output()
            .context("running etcdctl (Debian package etcd-client)")?;
        if out.status.success() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "etcd not healthy after 60 s: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn spawn_replica(setup: &ReplicaSetup, i: usize, r: &Replication) -> Result<ChildGuard> {
    let endpoints: Vec<String> = (0..r.etcd_members).map(etcd_client_url).collect();
    let port = REGISTRY_PORT + i as u16;
    let mut child = ChildGuard::spawn(
        &format!("vnp-registry-r{i}"),
        setup
            .core
            .command(&setup.bins.registry)
            .arg("--listen")
            .arg(format!("{CORE_ADDR}:{port}"))
            .args(["--store", "etcd", "--etcd-endpoints", &endpoints.join(",")])
            .arg("--secret-keys")
            .arg(setup.dir.join("registry.keys"))
            .arg("--max-staleness-ms")
            .arg(r.max_staleness_ms.to_string())
            .arg("--tls-dir")
            .arg(setup.tls_dir)
            .arg("--token-ttl")
            .arg(setup.token_ttl_secs.to_string())
            .stdout(Stdio::null())
            .env("RUST_LOG", "info"),
        Some(&setup.dir.join(format!("registry-r{i}.log"))),
    )?;
    let addr = SocketAddr::from((CORE_ADDR, port));
    let core = setup.core;
    child.wait_until(
        "the registry replica to listen",
        Duration::from_secs(60),
        || {
            core.enter(move || TcpStream::connect_timeout(&addr, Duration::from_millis(200)))
                .ok()
                .and_then(Result::ok)
                .map(|_| ())
        },
    )?;
    Ok(child)
}

impl ReplicatedRegistry {
    /// Starts the etcd members, waits until they form a cluster, then starts the replicas
    /// (state in `dir`, certificates from `tls_dir`).
    pub(crate) fn start(
        core: &Netns,
        bins: &Bins,
        dir: &Path,
        tls_dir: &Path,
        token_ttl_secs: u32,
        r: &Replication,
    ) -> Result<Self> {
        let setup = &ReplicaSetup {
            core,
            bins,
            dir,
            tls_dir,
            token_ttl_secs,
        };
        // The key-encryption key sealing secrets in etcd (etcd never sees it).
        let keys = setup.dir.join("registry.keys");
        std::fs::write(&keys, format!("e2e-k1 {}\n", "3c".repeat(32)))?;
        let etcd = (0..r.etcd_members)
            .map(|i| spawn_etcd(setup, i, r.etcd_members))
            .collect::<Result<Vec<_>>>()?;
        wait_etcd_healthy(setup.core, r.etcd_members)?;
        let mut this = ReplicatedRegistry {
            replicas: Vec::new(),
            etcd,
            ports: (0..r.replicas).map(|i| REGISTRY_PORT + i as u16).collect(),
        };
        for i in 0..r.replicas {
            let child = spawn_replica(setup, i, r)?;
            this.replicas.push(Some(child));
        }
        Ok(this)
    }

    /// Every replica's URL, comma-separated (what clients and vnpd are configured with).
    pub fn urls(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("https://{CORE_ADDR}:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Replica `i`'s URL.
    pub fn url(&self, i: usize) -> String {
        format!("https://{CORE_ADDR}:{}", self.ports[i])
    }

    /// Kills replica `i` without warning (SIGKILL: a crashed machine).
    pub fn kill_replica(&mut self, i: usize) -> Result<()> {
        if let Some(mut r) = self.replicas[i].take() {
            r.kill()?;
        }
        Ok(())
    }

    /// Whether replica `i` still runs.
    pub fn replica_running(&self, i: usize) -> bool {
        self.replicas[i].is_some()
    }

    /// The replicas' and etcd members' stderr tails, for failure messages.
    pub fn logs(&self) -> String {
        let replicas = self.replicas.iter().enumerate().filter_map(|(i, r)| {
            r.as_ref()
                .map(|r| format!("--- registry replica {i} ---\n{}\n", r.stderr_tail()))
        });
        let members = self
            .etcd
            .iter()
            .map(|m| format!("--- {} ---\n{}\n", m.name(), m.stderr_tail()));
        replicas.chain(members).collect()
    }
}
