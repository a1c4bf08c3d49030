//! `vnp-gateway`: the boundary between a vnp virtual network and a public network.
//!
//! Identity from its gateway certificate (`vnp:gateway:<id>`); what it serves (its network's
//! VMs with their NAT port blocks and locations, the forwarding rules on its public address)
//! from `GET /v1/gateways/<id>/config`, followed with the watch. VNP on one UDP socket, the
//! public side on a TUN device, one epoll loop. See `gateway/README.md` and `docs/gateway.md`.

mod control;
mod dataplane;
mod health;
mod lb;
mod metrics_http;
mod tun;

use clap::Parser;
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use vnp_gateway::metrics::Metrics;
use vnp_gateway::rx::ExpiryPolicy;
use vnp_gateway::services::ServiceTable;
use vnp_gateway::table::NatTable;
use vnp_gateway::tokens::TokenCache;
use vnp_protocol::token::TokenMinter;
use vnp_registry_client::{ClientConfig, RegistryClient, Role};

/// Command line (see gateway/README.md).
#[derive(Debug, Parser)]
#[command(
    version,
    about = "vnp gateway: NAT and port forwarding to a public network"
)]
struct Args {
    /// Registry URL(s), comma-separated.
    #[arg(long, env = "VNP_REGISTRY")]
    registry: String,
    /// CA certificate of the registry.
    #[arg(long)]
    ca: PathBuf,
    /// This gateway's certificate (URI SAN vnp:gateway:<id>).
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
    /// The TUN device towards the public side (create it persistent with `ip tuntap add`).
    #[arg(long, default_value = "vnpgw0")]
    tun: String,
    /// Address to receive VNP on; default the registered `underlay_addr:port`.
    #[arg(long)]
    listen: Option<SocketAddrV4>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Clock difference tolerated on token expiries (as vnpd's token_clock_skew_secs).
    #[arg(long, default_value_t = 5)]
    token_skew_secs: u32,
    /// Longest token lifetime accepted (as vnpd's token_max_ttl_secs).
    #[arg(long, default_value_t = 3600)]
    token_max_ttl_secs: u32,
    /// Accept tokens that never expire (registry --token-ttl 0).
    #[arg(long)]
    accept_never_expiring_tokens: bool,
    /// Do not route the network's CIDR into the TUN at start (`ip route replace CIDR dev TUN
    /// src UNDERLAY`): the load-balancing health checks need that route (or an equivalent one).
    #[arg(long)]
    no_health_route: bool,
}

/// What the data path reads and the control thread replaces.
#[derive(Debug)]
pub struct State {
    pub table: Arc<NatTable>,
    pub tokens: TokenCache,
    /// Load-balanced services (`lb::publish` replaces them).
    pub services: Arc<ServiceTable>,
}

/// Shared between the threads.
#[derive(Debug)]
pub struct Shared {
    pub state: RwLock<State>,
    pub metrics: Metrics,
    /// VM addresses the data path had no token for.
    pub wants: Mutex<Vec<std::net::Ipv4Addr>>,
    pub lb: lb::Lb,
}

impl Shared {
    fn render_metrics(&self) -> String {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        let mut text = self.metrics.render(
            Some(&state.table),
            state.tokens.len(),
            control::vnp_gateway_now(),
        );
        drop(state);
        text.push_str(&lb::render(self));
        text
    }
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    if let Err(e) = run(Args::parse()) {
        eprintln!("vnp-gateway: {e}");
        std::process::exit(1);
    }
}

/// Retries a start-up request until the registry answers it (a gateway may start before its
/// registry is reachable, or while it fails over). Refusals are retried too: an operator may
/// register the gateway after starting it.
fn until_ok<T>(
    what: &str,
    mut f: impl FnMut() -> Result<T, vnp_registry_client::ClientError>,
) -> T {
    let mut pause = std::time::Duration::from_millis(200);
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) => log::warn!("start-up {what}: {e}; retrying in {pause:?}"),
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(std::time::Duration::from_secs(5));
    }
}

fn run(args: Args) -> Result<(), String> {
    let config = ClientConfig::from_files(&args.registry, &args.ca, &args.cert, &args.key)
        .map_err(|e| e.to_string())?;
    let client = RegistryClient::new(config).map_err(|e| e.to_string())?;
    let me = until_ok("whoami", || client.whoami());
    if me.role != Role::Gateway {
        return Err(format!("certificate is {me}, not a gateway's"));
    }
    let (secret, _) = until_ok("secret", || client.get_gateway_secret(&me.id));
    let minter = TokenMinter::new(&secret);
    drop(secret);
    let cfg = until_ok("config", || client.gateway_config(&me.id));
    let vnp_addr = SocketAddrV4::new(cfg.gateway.underlay_addr, cfg.gateway.port);
    let shared = Arc::new(Shared {
        state: RwLock::new(State {
            table: Arc::new(NatTable::from_config(&cfg)),
            tokens: TokenCache::default(),
            services: Arc::default(),
        }),
        metrics: Metrics::default(),
        wants: Mutex::new(Vec::new()),
        lb: lb::Lb::default(),
    });
    let table = shared
        .state
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .table
        .clone();
    lb::publish(&shared, Some((Arc::new(cfg.clone()), table)));
    let tun = tun::open(&args.tun).map_err(|e| format!("TUN {}: {e}", args.tun))?;
    let listen = args.listen.unwrap_or(vnp_addr);
    let socket = UdpSocket::bind(listen).map_err(|e| format!("bind {listen}: {e}"))?;
    socket.set_nonblocking(true).map_err(|e| e.to_string())?;
    if let Some(addr) = args.metrics {
        let bound = metrics_http::spawn(addr, shared.clone()).map_err(|e| e.to_string())?;
        println!("vnp-gateway metrics on http://{bound}/metrics");
    }
    if !args.no_health_route {
        let cidr = cfg.network.cidr.to_string();
        if let Err(e) = health::route_into_tun(&cidr, &args.tun, cfg.gateway.underlay_addr) {
            log::warn!("health checks: no route for {cidr} into {}: {e}", args.tun);
        }
    }
    {
        let shared = shared.clone();
        let publisher = health::Publisher {
            client: client.clone(),
            id: me.id.clone(),
        };
        std::thread::Builder::new()
            .name("health".into())
            .spawn(move || health::run(shared, publisher))
            .map_err(|e| e.to_string())?;
    }
    // Tokens first, so that the first replies find them.
    control::refresh_tokens(&client, &me.id, &shared, &mut Default::default());
    {
        let (client, id, shared) = (client.clone(), me.id.clone(), shared.clone());
        let since = cfg.generation;
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || control::run(client, id, shared, since))
            .map_err(|e| e.to_string())?;
    }
    println!(
        "vnp-gateway {} serving network {} on {listen} (tokens for {vnp_addr}), public address {} via {}",
        me.id, cfg.network.id, cfg.gateway.public_addr, args.tun
    );
    let expiry = ExpiryPolicy {
        skew_secs: args.token_skew_secs,
        max_ttl_secs: args.token_max_ttl_secs,
        allow_never: args.accept_never_expiring_tokens,
    };
    dataplane::run(
        dataplane::Io { socket, tun },
        &shared,
        &minter,
        vnp_addr,
        expiry,
    )
    .map_err(|e| format!("data path: {e}"))
}
