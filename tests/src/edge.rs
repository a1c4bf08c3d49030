//! A public edge for a [`Cluster`]: `vnp-gateway`s, each in its own namespace on the
//! cluster's underlay (a fabric namespace like a host's, 198.18.0.x) with a persistent TUN
//! device that the public address is routed into, and a "public" namespace (203.0.113.0/24)
//! with a bridge that every gateway's namespace joins by a veth, where the tests run real
//! servers and clients. Every gateway of the edge serves the same public address (one NAT
//! pool); the public side's route to it picks the gateway ([`PublicEdge::route_public_via`]).
//!
//! The gateway processes, the public namespace and the processes started in it are dropped
//! with this value (drop it before the cluster: declare it after); the gateways' namespaces
//! and their files belong to the cluster and go with it.

use crate::cluster::Cluster;
use anyhow::{anyhow, Context, Result};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;
use vnp_registry_client::GatewaySpec;
use vnp_testkit::netns::Netns;
use vnp_testkit::process::ChildGuard;

/// The gateway's public address (routed into its TUN; not a local address anywhere).
pub const PUBLIC_ADDR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// The first gateway namespace's own address on the public segment (the public side's next
/// hop); gateway `i` has 203.0.113.(2 + i).
pub const EDGE_ROUTER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
/// The public namespace's address (servers and clients there use it).
pub const PUBLIC_HOST: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// UDP port the gateway receives VNP on.
pub const GATEWAY_PORT: u16 = 6081;
/// The gateway's Prometheus port (on its underlay address).
pub const GATEWAY_METRICS_PORT: u16 = 9465;
const TUN: &str = "vnpgw0";

/// One gateway of the edge.
#[derive(Debug)]
struct Gw {
    child: Option<ChildGuard>,
    id: String,
    ns_index: usize,
    addr: Ipv4Addr,
    log: PathBuf,
}

/// Gateways of the cluster's network and the public namespace behind them.
#[derive(Debug)]
pub struct PublicEdge {
    gateways: Vec<Gw>,
    /// Processes in the public namespace (before it, so they die first).
    public_procs: Vec<ChildGuard>,
    public: Netns,
    network: String,
}

fn run_tool(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        anyhow::bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl PublicEdge {
    /// Registers gateway `id` for `network` with [`PUBLIC_ADDR`], issues its certificate,
    /// builds the public namespace and the gateway's namespace (TUN, public veth,
    /// forwarding). The gateway itself is started by [`PublicEdge::start_gateway`].
    pub fn create(c: &mut Cluster, id: &str, network: &str) -> Result<Self> {
        let public = Netns::create("vnppub").map_err(|e| anyhow!("public namespace: {e}"))?;
        let e = |e| anyhow!("{e}");
        public
            .ip(&["link", "add", "br0", "type", "bridge"])
            .map_err(e)?;
        public
            .ip(&["addr", "add", &format!("{PUBLIC_HOST}/24"), "dev", "br0"])
            .map_err(e)?;
        public.ip(&["link", "set", "br0", "up"]).map_err(e)?;
        let mut edge = Self {
            gateways: Vec::new(),
            public_procs: Vec::new(),
            public,
            network: network.to_string(),
        };
        edge.add_gateway(c, id)?;
        edge.route_public_via(0)?;
        Ok(edge)
    }

    /// [`PublicEdge::create`], then [`PublicEdge::start_gateway`] for `vms` VMs (a failure
    /// carries the gateway's logs).
    pub fn create_started(c: &mut Cluster, id: &str, network: &str, vms: u64) -> Result<Self> {
        let mut edge = Self::create(c, id, network)?;
        edge.start_gateway(c, vms)
            .map_err(|e| anyhow!("{e}\n{}", edge.logs(c)))?;
        Ok(edge)
    }

    /// Registers one more gateway `id` on the same public address (the same NAT pool) with
    /// its namespace wired like the first; returns its index. The public route stays where it
    /// was.
    pub fn add_gateway(&mut self, c: &mut Cluster, id: &str) -> Result<usize> {
        run_tool(
            Command::new(&c.bins().vnpctl)
                .args(["cert", "gateway", "--dir"])
                .arg(c.tls_dir())
                .args(["--id", id]),
        )?;
        let (ns_index, addr) = c.add_namespace("vnpgw")?;
        let spec = GatewaySpec {
            id: id.to_string(),
            network: self.network.clone(),
            underlay_addr: addr,
            port: GATEWAY_PORT,
            public_addr: Some(PUBLIC_ADDR),
        };
        c.registry(move |r| r.create_gateway(&spec))?;
        let i = self.gateways.len();
        self.wire(c.host_ns(ns_index), i)?;
        self.gateways.push(Gw {
            child: None,
            id: id.to_string(),
            ns_index,
            addr,
            log: c.dir().join(format!("gateway-{id}.log")),
        });
        Ok(i)
    }

    /// Gateway `i`'s address on the public segment.
    fn edge_router(i: usize) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(EDGE_ROUTER) + i as u32)
    }

    /// Gateway `i`'s public segment and TUN: a veth into the public bridge, the public address
    /// routed into the TUN, forwarding on.
    fn wire(&self, gw: &Netns, i: usize) -> Result<()> {
        let e = |e| anyhow!("{e}");
        let far = format!("gw{i}");
        gw.veth_to("pub0", Some((Self::edge_router(i), 24)), &self.public, &far)
            .map_err(e)?;
        self.public
            .ip(&["link", "set", &far, "master", "br0"])
            .map_err(e)?;
        gw.ip(&["tuntap", "add", "dev", TUN, "mode", "tun"])
            .map_err(e)?;
        gw.ip(&["link", "set", TUN, "up"]).map_err(e)?;
        gw.ip(&["route", "add", &format!("{PUBLIC_ADDR}/32"), "dev", TUN])
            .map_err(e)?;
        gw.run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])
            .map_err(e)?;
        Ok(())
    }

    /// Routes the public side's traffic for the public address through gateway `i` (what an
    /// upstream router does when it moves or spreads traffic between gateways).
    pub fn route_public_via(&self, i: usize) -> Result<()> {
        let via = Self::edge_router(i).to_string();
        self.public
            .ip(&[
                "route",
                "replace",
                &format!("{PUBLIC_ADDR}/32"),
                "via",
                &via,
            ])
            .map_err(|e| anyhow!("{e}"))?;
        Ok(())
    }

    /// Starts (or restarts) the first gateway; see [`PublicEdge::start_gateway_n`].
    pub fn start_gateway(&mut self, c: &Cluster, vms: u64) -> Result<()> {
        self.start_gateway_n(0, c, vms)
    }

    /// Starts (or restarts) gateway `i` and waits until it holds tokens for at least `vms`
    /// VMs (it fetches one per VM of its network at start).
    pub fn start_gateway_n(&mut self, i: usize, c: &Cluster, vms: u64) -> Result<()> {
        let tls = c.tls_dir();
        let gw = &self.gateways[i];
        let id = &gw.id;
        let metrics = SocketAddr::from((gw.addr, GATEWAY_METRICS_PORT));
        let mut child = ChildGuard::spawn(
            &format!("vnp-gateway-{id}"),
            c.host_ns(gw.ns_index)
                .command(&c.bins().gateway)
                .args(["--registry", &c.registry_url()])
                .arg("--ca")
                .arg(tls.join("ca.pem"))
                .arg("--cert")
                .arg(tls.join(format!("gateway-{id}.pem")))
                .arg("--key")
                .arg(tls.join(format!("gateway-{id}.key")))
                .args(["--tun", TUN, "--metrics", &metrics.to_string()])
                .stdout(std::process::Stdio::null()),
            Some(&gw.log),
        )?;
        child.wait_until("the gateway's tokens", Duration::from_secs(60), || {
            let text = self.scrape_n(i, c).ok()?;
            let tokens: u64 =
                vnpd::metrics::prometheus::sample_value(&text, "vnp_gateway_tokens", &[])?;
            (tokens >= vms).then_some(())
        })?;
        self.gateways[i].child = Some(child);
        Ok(())
    }

    /// Kills the first gateway with SIGKILL (no chance to save anything).
    pub fn kill_gateway(&mut self) -> Result<()> {
        if let Some(mut g) = self.gateways[0].child.take() {
            g.kill()?;
        }
        Ok(())
    }

    /// Kills gateway `i` with SIGKILL.
    pub fn kill_gateway_n(&mut self, i: usize) -> Result<()> {
        if let Some(mut g) = self.gateways[i].child.take() {
            g.kill()?;
        }
        Ok(())
    }

    /// The cluster namespace index of gateway `i` (for `Cluster::host_ns`).
    pub fn gateway_ns(&self, i: usize) -> usize {
        self.gateways[i].ns_index
    }

    /// The first gateway's underlay address.
    pub fn addr(&self) -> Ipv4Addr {
        self.gateways[0].addr
    }

    /// The first gateway's Prometheus text.
    pub fn scrape(&self, c: &Cluster) -> Result<String> {
        self.scrape_n(0, c)
    }

    /// Gateway `i`'s Prometheus text.
    pub fn scrape_n(&self, i: usize, c: &Cluster) -> Result<String> {
        let gw = &self.gateways[i];
        let addr = SocketAddr::from((gw.addr, GATEWAY_METRICS_PORT));
        let text = c
            .host_ns(gw.ns_index)
            .enter(move || -> std::io::Result<String> {
                let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                s.write_all(b"GET /metrics HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")?;
                let mut out = String::new();
                s.read_to_string(&mut out)?;
                Ok(out)
            })
            .map_err(|e| anyhow!("{e}"))??;
        Ok(text)
    }

    /// One sample of the first gateway's metrics (0 when absent).
    pub fn metric(&self, c: &Cluster, name: &str, labels: &[(&str, &str)]) -> Result<u64> {
        self.metric_n(0, c, name, labels)
    }

    /// One sample of gateway `i`'s metrics (0 when absent).
    pub fn metric_n(
        &self,
        i: usize,
        c: &Cluster,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Result<u64> {
        let text = self.scrape_n(i, c)?;
        Ok(vnpd::metrics::prometheus::sample_value(&text, name, labels).unwrap_or(0))
    }

    /// The public namespace.
    pub fn public(&self) -> &Netns {
        &self.public
    }

    /// Starts a process in the public namespace, killed with this edge; returns its index
    /// for [`PublicEdge::public_stderr`].
    pub fn spawn_public(&mut self, name: &str, program: &str, args: &[&str]) -> Result<usize> {
        let child = ChildGuard::spawn(name, self.public.command(program).args(args), None)?;
        self.public_procs.push(child);
        Ok(self.public_procs.len() - 1)
    }

    /// The last stderr lines of public process `i`.
    pub fn public_stderr(&self, i: usize) -> String {
        self.public_procs[i].stderr_tail()
    }

    /// Every gateway's stderr tail and non-zero drop counters, for failure messages.
    pub fn logs(&self, c: &Cluster) -> String {
        (0..self.gateways.len())
            .map(|i| self.logs_n(i, c))
            .collect()
    }

    fn logs_n(&self, i: usize, c: &Cluster) -> String {
        let gw = &self.gateways[i];
        let tail = gw
            .child
            .as_ref()
            .map(ChildGuard::stderr_tail)
            .unwrap_or_else(|| "(not running)".into());
        let drops: String = self
            .scrape_n(i, c)
            .map(|text| {
                text.lines()
                    .filter(|l| l.starts_with("vnp_gateway_drops_total") && !l.ends_with(" 0"))
                    .map(|l| format!("  {l}\n"))
                    .collect()
            })
            .unwrap_or_else(|e| format!("  (no metrics: {e})\n"));
        format!("--- vnp-gateway {} ---\n{tail}\n{drops}", gw.id)
    }

    /// Waits until something accepts TCP connections on `addr` in the public namespace.
    pub fn wait_listening(&self, addr: SocketAddr, within: Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + within;
        loop {
            let up = self
                .public
                .enter(move || {
                    TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
                })
                .map_err(|e| anyhow!("{e}"))?;
            if up {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                anyhow::bail!("nothing listens on {addr} in the public namespace after {within:?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The namespaces that must be gone once the cluster and this edge are: the cluster's
    /// (the gateways' among them) and this edge's.
    pub fn all_namespace_names(&self, c: &Cluster) -> Vec<String> {
        let mut names = c.namespace_names();
        names.extend(self.namespace_names());
        names
    }

    /// Names of the namespaces this edge owns (the gateways' belong to the cluster).
    pub fn namespace_names(&self) -> Vec<String> {
        vec![self.public.name().to_string()]
    }
}
