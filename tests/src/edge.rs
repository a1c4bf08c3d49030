//! A public edge for a [`Cluster`]: a `vnp-gateway` in its own namespace on the cluster's
//! underlay (a fabric namespace like a host's, 198.18.0.x), with a persistent TUN device that
//! the public address is routed into, and a "public" namespace (203.0.113.0/24) joined to the
//! gateway's namespace by a veth, where the tests run real servers and clients.
//!
//! The gateway process, the public namespace and the processes started in it are dropped with
//! this value (drop it before the cluster: declare it after); the gateway's namespace and its
//! files belong to the cluster and go with it.

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
/// The gateway namespace's own address on the public segment (the public side's next hop).
pub const EDGE_ROUTER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
/// The public namespace's address (servers and clients there use it).
pub const PUBLIC_HOST: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// UDP port the gateway receives VNP on.
pub const GATEWAY_PORT: u16 = 6081;
/// The gateway's Prometheus port (on its underlay address).
pub const GATEWAY_METRICS_PORT: u16 = 9465;
const TUN: &str = "vnpgw0";

/// A gateway of the cluster's network and the public namespace behind it.
#[derive(Debug)]
pub struct PublicEdge {
    gateway: Option<ChildGuard>,
    /// Processes in the public namespace (before it, so they die first).
    public_procs: Vec<ChildGuard>,
    public: Netns,
    id: String,
    ns_index: usize,
    addr: Ipv4Addr,
    log: PathBuf,
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
    /// builds its namespace (TUN, public veth, forwarding) and the public namespace. The
    /// gateway itself is started by [`PublicEdge::start_gateway`].
    pub fn create(c: &mut Cluster, id: &str, network: &str) -> Result<Self> {
        run_tool(
            Command::new(&c.bins().vnpctl)
                .args(["cert", "gateway", "--dir"])
                .arg(c.tls_dir())
                .args(["--id", id]),
        )?;
        let (ns_index, addr) = c.add_namespace("vnpgw")?;
        let spec = GatewaySpec {
            id: id.to_string(),
            network: network.to_string(),
            underlay_addr: addr,
            port: GATEWAY_PORT,
            public_addr: Some(PUBLIC_ADDR),
        };
        c.registry(move |r| r.create_gateway(&spec))?;
        let public = Netns::create("vnppub").map_err(|e| anyhow!("public namespace: {e}"))?;
        let edge = Self {
            gateway: None,
            public_procs: Vec::new(),
            public,
            id: id.to_string(),
            ns_index,
            addr,
            log: c.dir().join(format!("gateway-{id}.log")),
        };
        edge.wire(c.host_ns(ns_index))?;
        Ok(edge)
    }

    /// The public segment and the TUN: the public address routed into the TUN on the
    /// gateway's side, and to the gateway's namespace on the public side.
    fn wire(&self, gw: &Netns) -> Result<()> {
        let e = |e| anyhow!("{e}");
        gw.veth_to("pub0", Some((EDGE_ROUTER, 24)), &self.public, "pub0")
            .map_err(e)?;
        let public = &self.public;
        public
            .ip(&["addr", "add", &format!("{PUBLIC_HOST}/24"), "dev", "pub0"])
            .map_err(e)?;
        let public_route = format!("{PUBLIC_ADDR}/32");
        public
            .ip(&[
                "route",
                "add",
                &public_route,
                "via",
                &EDGE_ROUTER.to_string(),
            ])
            .map_err(e)?;
        gw.ip(&["tuntap", "add", "dev", TUN, "mode", "tun"])
            .map_err(e)?;
        gw.ip(&["link", "set", TUN, "up"]).map_err(e)?;
        gw.ip(&["route", "add", &public_route, "dev", TUN])
            .map_err(e)?;
        gw.run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])
            .map_err(e)?;
        Ok(())
    }

    /// Starts (or restarts) the gateway and waits until it holds tokens for at least
    /// `vms` VMs (it fetches one per VM of its network at start).
    pub fn start_gateway(&mut self, c: &Cluster, vms: u64) -> Result<()> {
        let tls = c.tls_dir();
        let id = &self.id;
        let metrics = self.metrics_addr();
        let mut child = ChildGuard::spawn(
            &format!("vnp-gateway-{id}"),
            c.host_ns(self.ns_index)
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
            Some(&self.log),
        )?;
        child.wait_until("the gateway's tokens", Duration::from_secs(60), || {
            let text = self.scrape(c).ok()?;
            let tokens: u64 =
                vnpd::metrics::prometheus::sample_value(&text, "vnp_gateway_tokens", &[])?;
            (tokens >= vms).then_some(())
        })?;
        self.gateway = Some(child);
        Ok(())
    }

    /// Kills the gateway with SIGKILL (no chance to save anything).
    pub fn kill_gateway(&mut self) -> Result<()> {
        if let Some(mut g) = self.gateway.take() {
            g.kill()?;
        }
        Ok(())
    }

    /// The gateway's underlay address.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    fn metrics_addr(&self) -> SocketAddr {
        SocketAddr::from((self.addr, GATEWAY_METRICS_PORT))
    }

    /// The gateway's Prometheus text.
    pub fn scrape(&self, c: &Cluster) -> Result<String> {
        let addr = self.metrics_addr();
        let text = c
            .host_ns(self.ns_index)
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

    /// One sample of the gateway's metrics (0 when absent).
    pub fn metric(&self, c: &Cluster, name: &str, labels: &[(&str, &str)]) -> Result<u64> {
        let text = self.scrape(c)?;
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

    /// The gateway's stderr tail and its non-zero drop counters, for failure messages.
    pub fn logs(&self, c: &Cluster) -> String {
        let tail = self
            .gateway
            .as_ref()
            .map(ChildGuard::stderr_tail)
            .unwrap_or_else(|| "(not running)".into());
        let drops: String = self
            .scrape(c)
            .map(|text| {
                text.lines()
                    .filter(|l| l.starts_with("vnp_gateway_drops_total") && !l.ends_with(" 0"))
                    .map(|l| format!("  {l}\n"))
                    .collect()
            })
            .unwrap_or_else(|e| format!("  (no metrics: {e})\n"));
        format!("--- vnp-gateway {} ---\n{tail}\n{drops}", self.id)
    }

    /// Names of the namespaces this edge owns (the gateway's belongs to the cluster).
    pub fn namespace_names(&self) -> Vec<String> {
        vec![self.public.name().to_string()]
    }
}
