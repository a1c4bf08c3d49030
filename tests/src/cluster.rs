//! A whole vnp deployment on one machine: a registry and N hosts, each host a network
//! namespace running its own `vnpd`, joined over veth to a core namespace where the registry
//! listens (underlay 198.18.0.0/24). Guests are real QEMU processes on the hosts' vhost-user
//! sockets.
//!
//! Everything is created under a fresh temp directory and in namespaces with unique names, and
//! torn down on drop in reverse order (vnpd, registry, namespaces, files), also when a test
//! panics.

use crate::bins::{bins, Bins};
use crate::registries::{spawn_registry_with, ReplicatedRegistry, Replication};
use anyhow::{anyhow, bail, Context, Result};
use qemu_launch::{Guest, GuestSpec, MacAddr as GuestMac, NetStatus};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use vnp_registry_client::{ClientConfig, RegistryClient, VmRecord, VmSpec};
use vnp_testkit::netns::{Fabric, Netns, CORE_ADDR};
use vnp_testkit::process::{ChildGuard, TempDir};
use vnp_testkit::tap_guest::{TapGuest, TapGuestSpec};
use vnpd_admin_api::{AttachmentInfo, VnpdAdminClient};

/// The registry's port on [`CORE_ADDR`].
pub const REGISTRY_PORT: u16 = 7443;
/// Prometheus port of every vnpd (on its host's underlay address).
pub const METRICS_PORT: u16 = 9464;
/// The virtual network all test VMs join.
pub const NETWORK: &str = "net1";
/// Its address range.
pub const NETWORK_CIDR: &str = "10.77.0.0/24";
/// Guest MTU: a 1500-byte underlay minus the 48 bytes of VNP encapsulation.
pub const GUEST_MTU: u16 = 1452;

/// How a cluster is built.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Prefix of namespace names (short: interface-name limits do not apply, but `ip netns`
    /// listings stay readable).
    pub prefix: String,
    /// Number of hosts.
    pub hosts: usize,
    /// Token lifetime the registry mints with.
    pub token_ttl_secs: u32,
    /// vnpd's log filter.
    pub vnpd_log: String,
    /// vnpd's `token_refresh_margin_secs` (its default when `None`).
    pub refresh_margin_secs: Option<u32>,
    /// TOML tables appended to every vnpd's config file (e.g. `[vhost_user]` settings).
    pub vnpd_config_tables: String,
    /// Registry replicas on etcd instead of the one redb registry (see [`crate::registries`]).
    pub replication: Option<Replication>,
    /// NAT block size of [`NETWORK`] (the registry's default when `None`).
    pub nat_block: Option<u16>,
    /// Extra arguments of the (single, redb) registry, e.g. `--credential-ttl-secs 60`.
    pub registry_args: Vec<String>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            prefix: "vnpe2e".into(),
            hosts: 2,
            token_ttl_secs: 600,
            vnpd_log: "info".into(),
            refresh_margin_secs: None,
            vnpd_config_tables: String::new(),
            replication: None,
            nat_block: None,
            registry_args: Vec::new(),
        }
    }
}

/// One host: a namespace with a vnpd.
#[derive(Debug)]
pub struct Host {
    /// Registry id (`h-a`, `h-b`, ...).
    pub id: String,
    /// Index in the fabric.
    pub index: usize,
    /// Underlay address.
    pub addr: Ipv4Addr,
    /// vnpd's admin socket.
    pub admin_socket: PathBuf,
    /// vnpd's config file.
    pub config: PathBuf,
    /// Directory of this host's files.
    pub dir: PathBuf,
    vnpd_log: PathBuf,
    log_filter: String,
    vnpd: Option<ChildGuard>,
}

impl Host {
    /// A client for this vnpd's admin socket.
    pub fn admin(&self) -> VnpdAdminClient {
        VnpdAdminClient::new(&self.admin_socket)
    }

    /// vnpd's metrics address.
    pub fn metrics_addr(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(self.addr, METRICS_PORT))
    }

    /// The last lines vnpd wrote to stderr.
    pub fn vnpd_stderr(&self) -> String {
        self.vnpd
            .as_ref()
            .map(ChildGuard::stderr_tail)
            .unwrap_or_default()
    }

    /// pid of the running vnpd.
    pub fn vnpd_pid(&self) -> Option<u32> {
        self.vnpd.as_ref().map(ChildGuard::pid)
    }
}

/// The running deployment. Field order is drop order.
#[derive(Debug)]
pub struct Cluster {
    hosts: Vec<Host>,
    registry: Option<ChildGuard>,
    replicated: Option<ReplicatedRegistry>,
    admin: RegistryClient,
    fabric: Fabric,
    bins: Bins,
    tls_dir: PathBuf,
    token_ttl_secs: u32,
    registry_args: Vec<String>,
    guest_serial: std::sync::atomic::AtomicU32,
    dir: TempDir,
}

fn run_tool(cmd: &mut Command) -> Result<String> {
    let line = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("running {line}"))?;
    if !out.status.success() {
        bail!(
            "{line} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Cluster {
    /// Builds the fabric, a CA and certificates, starts the registry and one vnpd per host,
    /// and creates the network and hosts in the registry.
    pub fn start(opts: &ClusterOptions) -> Result<Self> {
        let bins = bins()?;
        let dir = TempDir::new("vnp-e2e").context("creating the work directory")?;
        let tls_dir = dir.path().join("tls");
        std::fs::create_dir_all(&tls_dir)?;
        run_tool(
            Command::new(&bins.vnpctl)
                .args(["ca", "init", "--dir"])
                .arg(&tls_dir)
                .args(["--san", &CORE_ADDR.to_string()]),
        )?;
        let mut fabric = Fabric::new(&opts.prefix).context("creating the core namespace")?;
        let mut host_ids = Vec::new();
        for i in 0..opts.hosts {
            let id = format!("h-{}", (b'a' + i as u8) as char);
            run_tool(
                Command::new(&bins.vnpctl)
                    .args(["cert", "host", "--dir"])
                    .arg(&tls_dir)
                    .args(["--id", &id]),
            )?;
            fabric
                .add_host(&opts.prefix)
                .with_context(|| format!("creating host namespace {id}"))?;
            host_ids.push(id);
        }

        let replicated = match &opts.replication {
            Some(r) => Some(ReplicatedRegistry::start(
                fabric.core(),
                &bins,
                dir.path(),
                &tls_dir,
                opts.token_ttl_secs,
                r,
            )?),
            None => None,
        };
        let registry = match replicated {
            Some(_) => None,
            None => Some(spawn_registry_with(
                &fabric,
                &bins,
                dir.path(),
                &tls_dir,
                opts.token_ttl_secs,
                &opts.registry_args,
            )?),
        };
        let url = replicated.as_ref().map_or_else(
            || format!("https://{CORE_ADDR}:{REGISTRY_PORT}"),
            ReplicatedRegistry::urls,
        );

        let admin = RegistryClient::new(
            ClientConfig::from_files(
                &url,
                &tls_dir.join("ca.pem"),
                &tls_dir.join("admin.pem"),
                &tls_dir.join("admin.key"),
            )
            .map_err(|e| anyhow!("{e}"))?,
        )
        .map_err(|e| anyhow!("{e}"))?;

        let mut cluster = Cluster {
            hosts: Vec::new(),
            registry,
            replicated,
            admin,
            fabric,
            bins,
            tls_dir,
            token_ttl_secs: opts.token_ttl_secs,
            registry_args: opts.registry_args.clone(),
            guest_serial: std::sync::atomic::AtomicU32::new(0),
            dir,
        };
        let mut spec = serde_json::json!({
            "id": NETWORK, "cidr": NETWORK_CIDR, "mtu": GUEST_MTU,
        });
        if let Some(n) = opts.nat_block {
            spec["nat_block"] = n.into();
        }
        cluster.registry(move |c| {
            c.create_network(&serde_json::from_value(spec).expect("network spec"))
        })?;
        for (i, id) in host_ids.iter().enumerate() {
            let addr = Fabric::host_addr(i);
            let spec = serde_json::json!({ "id": id, "underlay_addr": addr });
            cluster.registry(move |c| {
                c.create_host(&serde_json::from_value(spec).expect("host spec"))
            })?;
            let host = cluster.make_host(i, id, &url, opts)?;
            cluster.hosts.push(host);
            cluster.start_vnpd(i)?;
        }
        Ok(cluster)
    }

    fn make_host(&self, index: usize, id: &str, url: &str, opts: &ClusterOptions) -> Result<Host> {
        let dir = self.dir.path().join(id);
        std::fs::create_dir_all(&dir)?;
        let addr = Fabric::host_addr(index);
        let admin_socket = dir.join("admin.sock");
        let config = dir.join("vnpd.toml");
        let tls = &self.tls_dir;
        let margin = opts
            .refresh_margin_secs
            .map(|m| format!("token_refresh_margin_secs = {m}\n"))
            .unwrap_or_default();
        let text = format!(
            "host_id = \"{id}\"\n\
             underlay_addr = \"{addr}\"\n\
             underlay_mtu = 1500\n\
             socket_dir = \"{sockets}\"\n\
             state_dir = \"{state}\"\n\
             admin_socket = \"{admin}\"\n\
             metrics_listen = \"{addr}:{METRICS_PORT}\"\n\
             {margin}\
             [registry]\n\
             url = \"{url}\"\n\
             ca_cert = \"{ca}\"\n\
             client_cert = \"{cert}\"\n\
             client_key = \"{key}\"\n",
            sockets = dir.join("sockets").display(),
            state = dir.join("state").display(),
            admin = admin_socket.display(),
            ca = tls.join("ca.pem").display(),
            cert = tls.join(format!("host-{id}.pem")).display(),
            key = tls.join(format!("host-{id}.key")).display(),
        );
        // After [registry]: only whole tables may follow it.
        let text = format!("{text}{}", opts.vnpd_config_tables);
        std::fs::write(&config, text)?;
        Ok(Host {
            id: id.to_string(),
            index,
            addr,
            admin_socket,
            config,
            vnpd_log: dir.join("vnpd.log"),
            log_filter: opts.vnpd_log.clone(),
            dir,
            vnpd: None,
        })
    }

    /// Starts (or restarts) host `i`'s vnpd and waits for its admin socket to answer.
    pub fn start_vnpd(&mut self, i: usize) -> Result<()> {
        let ns = self.fabric.host(i);
        let host = &mut self.hosts[i];
        let mut child = ChildGuard::spawn(
            &format!("vnpd-{}", host.id),
            ns.command(&self.bins.vnpd)
                .arg("--config")
                .arg(&host.config)
                .args(["--log-level", &host.log_filter])
                .stdout(std::process::Stdio::null()),
            Some(&host.vnpd_log),
        )?;
        let admin = host.admin().with_timeout(Duration::from_secs(2));
        child.wait_until("vnpd's admin socket", Duration::from_secs(30), || {
            admin.list().ok().map(|_| ())
        })?;
        host.vnpd = Some(child);
        Ok(())
    }

    /// Stops host `i`'s vnpd with SIGTERM (attachments stay persisted).
    pub fn stop_vnpd(&mut self, i: usize) -> Result<()> {
        if let Some(mut c) = self.hosts[i].vnpd.take() {
            let status = c.terminate(Duration::from_secs(10))?;
            if !status.success() {
                bail!(
                    "vnpd {} exited with {status}; stderr:\n{}",
                    self.hosts[i].id,
                    c.stderr_tail()
                );
            }
        }
        Ok(())
    }

    /// Stops the registry (a registry outage).
    pub fn stop_registry(&mut self) -> Result<()> {
        if let Some(mut r) = self.registry.take() {
            r.terminate(Duration::from_secs(10))?;
        }
        Ok(())
    }

    /// Starts the registry again on the same data.
    pub fn start_registry(&mut self) -> Result<()> {
        if self.registry.is_none() {
            self.registry = Some(spawn_registry_with(
                &self.fabric,
                &self.bins,
                self.dir.path(),
                &self.tls_dir,
                self.token_ttl_secs,
                &self.registry_args,
            )?);
        }
        Ok(())
    }

    /// The registry replicas, when the cluster was started with [`ClusterOptions::replication`].
    pub fn replicated(&mut self) -> Option<&mut ReplicatedRegistry> {
        self.replicated.as_mut()
    }

    /// Host `i`.
    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i]
    }

    /// Host `i`'s namespace.
    pub fn host_ns(&self, i: usize) -> &Netns {
        self.fabric.host(i)
    }

    /// The fabric (namespaces).
    pub fn fabric(&self) -> &Fabric {
        &self.fabric
    }

    /// Adds a namespace on the underlay for a daemon that is not a vnpd (e.g. a gateway):
    /// its fabric index and underlay address. It goes away with the cluster.
    pub fn add_namespace(&mut self, prefix: &str) -> Result<(usize, Ipv4Addr)> {
        self.fabric
            .add_host(prefix)
            .map_err(|e| anyhow!("adding namespace {prefix}: {e}"))
    }

    /// The directory of the CA and every certificate.
    pub fn tls_dir(&self) -> &Path {
        &self.tls_dir
    }

    /// The binaries the cluster runs.
    pub fn bins(&self) -> &Bins {
        &self.bins
    }

    /// The registry's URL (as the daemons are given it).
    pub fn registry_url(&self) -> String {
        self.replicated.as_ref().map_or_else(
            || format!("https://{CORE_ADDR}:{REGISTRY_PORT}"),
            ReplicatedRegistry::urls,
        )
    }

    /// The work directory (unique; appears in every daemon's command line).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs `f` with the admin registry client, inside the core namespace.
    pub fn registry<R: Send + 'static>(
        &self,
        f: impl FnOnce(&RegistryClient) -> Result<R, vnp_registry_client::ClientError> + Send + 'static,
    ) -> Result<R> {
        let c = self.admin.clone();
        self.fabric
            .core()
            .enter(move || f(&c))
            .map_err(|e| anyhow!("{e}"))?
            .map_err(|e| anyhow!("registry: {e}"))
    }

    /// Runs the real `vnpctl` as the admin, inside the core namespace; its standard output.
    pub fn vnpctl(&self, args: &[&str]) -> Result<String> {
        let out = self
            .fabric
            .core()
            .command(&self.bins().vnpctl)
            .args(["--registry", &self.registry_url()])
            .arg("--tls-dir")
            .arg(self.tls_dir())
            .args(args)
            .output()
            .context("run vnpctl")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "vnpctl {args:?}: {}{text}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(text)
    }

    /// Creates VM `id` on host `host` in [`NETWORK`] (address, MAC and UDP port allocated by
    /// the registry).
    pub fn create_vm(&self, id: &str, host: usize, tags: &[&str]) -> Result<VmRecord> {
        let spec = VmSpec {
            id: id.to_string(),
            network: NETWORK.to_string(),
            host: Some(self.hosts[host].id.clone()),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            ..VmSpec::default()
        };
        self.registry(move |c| c.create_vm(&spec))
    }

    /// Attaches VM `id` to host `host`'s vnpd.
    pub fn attach(&self, host: usize, id: &str) -> Result<AttachmentInfo> {
        self.hosts[host]
            .admin()
            .attach(id, None, None)
            .map_err(|e| anyhow!("attach {id} on {}: {e}", self.hosts[host].id))
    }

    /// Boots a QEMU guest on an attachment's socket and waits for its command channel.
    pub fn launch_guest(&self, att: &AttachmentInfo) -> Result<Guest> {
        let mac: GuestMac = att
            .mac
            .parse()
            .map_err(|e| anyhow!("registry MAC {}: {e:?}", att.mac))?;
        let mut spec = GuestSpec::new(att.vm_id.clone(), mac);
        spec.vhost_user_socket = Some(att.socket_path.clone());
        spec.queue_pairs = att.queue_pairs;
        let n = self
            .guest_serial
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let work = self.dir.path().join(format!("guest-{}-{n}", att.vm_id));
        std::fs::create_dir_all(&work)?;
        spec.work_dir = Some(work);
        let mut g = Guest::launch(spec).map_err(|e| anyhow!("launching {}: {e}", att.vm_id))?;
        g.wait_ready(Duration::from_secs(180))
            .map_err(|e| anyhow!("{} did not boot: {e}", att.vm_id))?;
        Ok(g)
    }

    /// Attaches each `(host, vm)` and boots its QEMU guest, then waits for every guest's DHCP
    /// lease (a failure carries the hosts' logs).
    pub fn boot_guests<const N: usize>(&self, vms: [(usize, &str); N]) -> Result<[Guest; N]> {
        let mut guests = Vec::with_capacity(N);
        for (host, vm) in vms {
            let att = self.attach(host, vm)?;
            guests.push(self.launch_guest(&att)?);
        }
        for g in &mut guests {
            wait_dhcp(g).map_err(|e| anyhow!("{e}\n{}", self.logs()))?;
        }
        guests.try_into().map_err(|_| anyhow!("not {N} guests"))
    }

    /// Starts a network-namespace guest on an attachment's socket with the VM's MAC
    /// (`vnp-tap-frontend`, offloads asked for unless `offloads` is false) and waits for its
    /// DHCP lease from vnpd. The guest's fixture log is kept in the cluster's directory.
    pub fn tap_guest(&self, att: &AttachmentInfo, offloads: bool) -> Result<TapGuest> {
        let mut spec = TapGuestSpec::new(&self.bins.tap_frontend, &att.socket_path, &att.mac);
        spec.offloads = offloads;
        spec.log = Some(self.dir.path().join(format!("tap-{}.log", att.vm_id)));
        let mut g =
            TapGuest::start(spec).map_err(|e| anyhow!("{}: {e}\n{}", att.vm_id, self.logs()))?;
        g.dhcp(Duration::from_secs(60))
            .map_err(|e| anyhow!("{}: {e}\n{}", att.vm_id, self.logs()))?;
        Ok(g)
    }

    /// Scrapes host `i`'s Prometheus endpoint (from inside its namespace).
    pub fn scrape(&self, i: usize) -> Result<String> {
        let addr = self.hosts[i].metrics_addr();
        self.fabric
            .host(i)
            .enter(move || -> std::io::Result<String> {
                let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                s.write_all(b"GET /metrics HTTP/1.1\r\nHost: vnpd\r\nConnection: close\r\n\r\n")?;
                let mut out = String::new();
                s.read_to_string(&mut out)?;
                Ok(out)
            })
            .map_err(|e| anyhow!("{e}"))?
            .context("scraping metrics")
            .and_then(|resp| {
                let (head, body) = resp
                    .split_once("\r\n\r\n")
                    .ok_or_else(|| anyhow!("malformed HTTP answer"))?;
                if !head.starts_with("HTTP/1.1 200") {
                    bail!("metrics answered {head}");
                }
                Ok(body.to_string())
            })
    }

    /// One counter of host `i`'s Prometheus export (0 when absent).
    pub fn metric(&self, i: usize, metric: &str, labels: &[(&str, &str)]) -> Result<u64> {
        let text = self.scrape(i)?;
        Ok(vnpd::metrics::prometheus::sample_value(&text, metric, labels).unwrap_or(0))
    }

    /// vnpd's stderr tails and non-zero counters of every host, for failure messages.
    pub fn logs(&self) -> String {
        self.hosts
            .iter()
            .map(|h| {
                let stats = h
                    .admin()
                    .with_timeout(Duration::from_secs(2))
                    .stats(None)
                    .map(|vms| {
                        vms.iter()
                            .map(|v| {
                                let nz = |m: &std::collections::BTreeMap<String, u64>| {
                                    m.iter()
                                        .filter(|(_, n)| **n > 0)
                                        .map(|(k, n)| format!("{k}={n}"))
                                        .collect::<Vec<_>>()
                                        .join(" ")
                                };
                                format!(
                                    "  {}: {} drops: {}\n",
                                    v.vm_id,
                                    nz(&v.counters),
                                    nz(&v.drops)
                                )
                            })
                            .collect::<String>()
                    })
                    .unwrap_or_else(|e| format!("  (no stats: {e})\n"));
                format!("--- vnpd {} ---\n{}\n{stats}", h.id, h.vnpd_stderr())
            })
            .chain(
                self.registry
                    .as_ref()
                    .map(|r| format!("--- registry ---\n{}\n", r.stderr_tail())),
            )
            .chain(self.replicated.as_ref().map(ReplicatedRegistry::logs))
            .collect()
    }

    /// Names of every namespace of this cluster (to check they are gone after drop).
    pub fn namespace_names(&self) -> Vec<String> {
        self.fabric.names()
    }
}

/// Waits until the guest has a DHCP lease; returns (address with prefix, router, mtu).
pub fn wait_dhcp(g: &mut Guest) -> Result<(String, String, u32)> {
    match g
        .wait_network(Duration::from_secs(90))
        .map_err(|e| anyhow!("{e}"))?
    {
        NetStatus::Bound {
            address,
            router,
            mtu,
        } => Ok((address, router, mtu)),
        other => {
            // udhcpc keeps trying in the background: give it another round.
            std::thread::sleep(Duration::from_secs(10));
            match g
                .wait_network(Duration::from_secs(30))
                .map_err(|e| anyhow!("{e}"))?
            {
                NetStatus::Bound {
                    address,
                    router,
                    mtu,
                } => Ok((address, router, mtu)),
                again => bail!(
                    "{}: no DHCP lease ({other:?}, then {again:?}); console:\n{}",
                    g.name(),
                    g.console()
                ),
            }
        }
    }
}

/// Asserts that nothing of a dropped cluster survives: no process mentioning its directory,
/// none of its namespaces, no guest QEMU.
pub fn assert_nothing_left(dir: &Path, namespaces: &[String]) {
    let needle = dir.to_string_lossy().to_string();
    let mut left = vnp_testkit::process::processes_matching(&needle);
    for _ in 0..50 {
        if left.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        left = vnp_testkit::process::processes_matching(&needle);
    }
    assert!(left.is_empty(), "processes left behind: {left:?}");
    for n in namespaces {
        assert!(
            !vnp_testkit::netns::namespace_exists(n),
            "namespace {n} left behind"
        );
    }
    assert!(!dir.exists(), "{} left behind", dir.display());
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // VNP_E2E_KEEP_LOGS=DIR keeps every daemon's full log for debugging (the work
        // directory itself is always removed).
        let Some(keep) = std::env::var_os("VNP_E2E_KEEP_LOGS") else {
            return;
        };
        let dest = PathBuf::from(keep).join(
            self.dir
                .path()
                .file_name()
                .unwrap_or_else(|| std::ffi::OsStr::new("cluster")),
        );
        let _ = std::fs::create_dir_all(&dest);
        for h in &self.hosts {
            let _ = std::fs::copy(&h.vnpd_log, dest.join(format!("vnpd-{}.log", h.id)));
        }
        // The registry's log, or (with `replication`) the replicas' and etcd members'.
        for entry in std::fs::read_dir(self.dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name();
            if name.to_string_lossy().ends_with(".log") {
                let _ = std::fs::copy(entry.path(), dest.join(name));
            }
        }
        eprintln!("cluster logs kept in {}", dest.display());
    }
}
