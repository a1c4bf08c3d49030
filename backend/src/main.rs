//! vnpd binary: thin wrapper over the `vnpd` library.
//!
//! Reads the configuration, starts the control thread, restores persisted attachments, serves
//! the admin socket and the Prometheus exporter, and on SIGTERM/SIGINT stops every port (the
//! attachments stay persisted for the next start).

use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vnp_registry_client::{ClientConfig, RegistryClient, Role};
use vnpd::admin::manager::{CounterBoard, Manager};
use vnpd::admin::server::AdminServer;
use vnpd::admin::state::StateStore;
use vnpd::config::{Overrides, VnpdConfig, DEFAULT_CONFIG_PATH, DEFAULT_CONFIG_TOML};
use vnpd::control::{ControlSettings, ControlThread};
use vnpd::metrics::prometheus::{render, render_bridge, Exporter, VmSample};
use vnpd_admin_api::AdminResponse;

/// How often attachments that could not be restored are retried.
const RESTORE_RETRY: Duration = Duration::from_secs(5);
/// How often vnpd asks the registry whether a VM it serves migrated away (live migration).
const DEPARTURE_CHECK: Duration = Duration::from_secs(1);

/// vnpd: vhost-user-net backend carrying guest traffic over VNP/UDP.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Configuration file (TOML). Default /etc/vnp/vnpd.toml if it exists.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the embedded default configuration and exit.
    #[arg(long)]
    print_default_config: bool,
    /// Validate the configuration, print it and exit.
    #[arg(long)]
    check_config: bool,
    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides.
    #[arg(long, default_value = "info")]
    log_level: String,
    /// This host's name in logs (the registry identity comes from the client certificate).
    #[arg(long)]
    host_id: Option<String>,
    /// This host's underlay address.
    #[arg(long)]
    underlay_addr: Option<std::net::Ipv4Addr>,
    /// Underlay MTU.
    #[arg(long)]
    underlay_mtu: Option<u16>,
    /// Directory of default vhost-user socket paths.
    #[arg(long)]
    socket_dir: Option<PathBuf>,
    /// Directory of persisted attachments.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Admin unix socket.
    #[arg(long)]
    admin_socket: Option<PathBuf>,
    /// Prometheus listen address (ADDRESS:PORT or "off").
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Registry URL (https://...).
    #[arg(long)]
    registry_url: Option<String>,
    /// Registry CA certificate (PEM).
    #[arg(long)]
    registry_ca_cert: Option<PathBuf>,
    /// This host's client certificate (PEM).
    #[arg(long)]
    registry_client_cert: Option<PathBuf>,
    /// This host's client key (PEM).
    #[arg(long)]
    registry_client_key: Option<PathBuf>,
}

impl Args {
    fn overrides(&self) -> Overrides {
        Overrides {
            host_id: self.host_id.clone(),
            underlay_addr: self.underlay_addr,
            underlay_mtu: self.underlay_mtu,
            socket_dir: self.socket_dir.clone(),
            state_dir: self.state_dir.clone(),
            admin_socket: self.admin_socket.clone(),
            metrics_listen: self.metrics_listen.clone(),
            registry_url: self.registry_url.clone(),
            registry_ca_cert: self.registry_ca_cert.clone(),
            registry_client_cert: self.registry_client_cert.clone(),
            registry_client_key: self.registry_client_key.clone(),
        }
    }
}

fn machine_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "vnpd".to_string())
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.print_default_config {
        print!("{DEFAULT_CONFIG_TOML}");
        return ExitCode::SUCCESS;
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(&args.log_level))
        .format_timestamp_millis()
        .init();
    let (path, explicit) = match &args.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
    };
    let cfg = match VnpdConfig::load(&path, explicit, args.overrides(), &machine_hostname()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vnpd: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check_config {
        println!("{cfg:#?}");
        return ExitCode::SUCCESS;
    }
    match run(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            eprintln!("vnpd: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cfg: VnpdConfig) -> Result<(), String> {
    let (client, host_id) = connect_registry(&cfg)?;
    let store = StateStore::open(&cfg.state_dir).map_err(|e| e.to_string())?;
    let control = ControlThread::start(
        client.clone(),
        ControlSettings {
            refresh_margin_secs: cfg.token_refresh_margin_secs,
            watch: true,
            token_requests: cfg.token_requests,
        },
    )
    .map_err(|e| format!("cannot start the control thread: {e}"))?;
    let mut manager = Manager::new(
        cfg.clone(),
        host_id.clone(),
        client,
        control.handle(),
        store,
    );
    manager.restore().map_err(|e| e.to_string())?;
    let board = manager.board();
    let manager = Arc::new(Mutex::new(manager));
    let exporter = match cfg.metrics_listen {
        Some(addr) => Some(start_exporter(addr, board, host_id.clone())?),
        None => None,
    };
    let m = Arc::clone(&manager);
    let admin = AdminServer::start(
        &cfg.admin_socket,
        Arc::new(move |req| {
            let mut m = m.lock().unwrap_or_else(|e| e.into_inner());
            AdminResponse::from(m.handle(req))
        }),
    )
    .map_err(|e| e.to_string())?;
    log::info!(
        "vnpd ready: host {host_id}, underlay {} (mtu {}), admin {}",
        cfg.underlay_addr,
        cfg.underlay_mtu,
        cfg.admin_socket.display()
    );
    serve_until_signalled(&manager)?;
    drop(admin);
    manager.lock().unwrap_or_else(|e| e.into_inner()).shutdown();
    drop(exporter);
    drop(control);
    log::info!("vnpd stopped");
    Ok(())
}

/// The registry client, and this host's id as the registry knows it (its client certificate);
/// the configured id is only a fallback for when the registry cannot be reached at start.
fn connect_registry(cfg: &VnpdConfig) -> Result<(RegistryClient, String), String> {
    let mut client_cfg = ClientConfig::from_files(
        &cfg.registry_url,
        &cfg.registry_ca_cert,
        &cfg.registry_client_cert,
        &cfg.registry_client_key,
    )
    .map_err(|e| e.to_string())?;
    client_cfg.timeout = Duration::from_secs(u64::from(cfg.registry_timeout_secs));
    let client = RegistryClient::new(client_cfg).map_err(|e| e.to_string())?;
    let host_id = match client.whoami() {
        Ok(id) if id.role == Role::Host => {
            if id.id != cfg.host_id {
                log::info!(
                    "registry knows this host as {} (configured host_id {})",
                    id.id,
                    cfg.host_id
                );
            }
            id.id
        }
        Ok(id) => {
            return Err(format!(
                "the client certificate is a {} certificate ({}), vnpd needs a host certificate",
                id.role, id.id
            ))
        }
        Err(e) => {
            log::warn!(
                "registry not reachable at start ({e}); assuming host id {}",
                cfg.host_id
            );
            cfg.host_id.clone()
        }
    };
    Ok((client, host_id))
}

/// The Prometheus exporter, reading the counters without the manager's lock.
fn start_exporter(
    addr: std::net::SocketAddr,
    board: Arc<CounterBoard>,
    host: String,
) -> Result<Exporter, String> {
    Exporter::start(addr, move || {
        let samples: Vec<VmSample> = board
            .snapshot()
            .into_iter()
            .map(|(vm_id, counters)| VmSample { vm_id, counters })
            .collect();
        render(&host, &samples)
            + &render_bridge(&board.bridge_snapshot())
            + &vnpd::migrate_state::COUNTERS.render()
            + &vnpd::control::resume_notice::COUNTERS.render()
    })
    .map_err(|e| e.to_string())
}

/// Runs the periodic duties (departed VMs, attachments not yet restored) until SIGTERM/SIGINT.
fn serve_until_signalled(manager: &Mutex<Manager>) -> Result<(), String> {
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let mut next_retry = Instant::now() + RESTORE_RETRY;
    let mut next_departure_check = Instant::now() + DEPARTURE_CHECK;
    loop {
        if let Some(sig) = signals.pending().next() {
            log::info!("signal {sig}: shutting down");
            return Ok(());
        }
        if Instant::now() >= next_departure_check {
            let mut m = manager.lock().unwrap_or_else(|e| e.into_inner());
            m.check_departures();
            next_departure_check = Instant::now() + DEPARTURE_CHECK;
        }
        if Instant::now() >= next_retry {
            let mut m = manager.lock().unwrap_or_else(|e| e.into_inner());
            m.retry_restores();
            next_retry = Instant::now() + RESTORE_RETRY;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
