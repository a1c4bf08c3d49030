//! `vnp-registry`: the VM registry service (HTTPS+JSON over mutual TLS).

use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use vnp_registry::service::Registry;
use vnp_registry::store::RedbStore;
use vnp_registry::tokens::TokenPolicy;

/// The vnp VM registry: identities, secrets, pair policy, tokens and endpoints.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on (port 0 picks a free port; the bound address is printed).
    #[arg(long, default_value = "127.0.0.1:7443", env = "VNP_REGISTRY_LISTEN")]
    listen: SocketAddr,
    /// Directory for the database (created 0700; it holds every VM secret).
    #[arg(long, env = "VNP_REGISTRY_DATA")]
    data: PathBuf,
    /// Directory laid out by `vnpctl ca init` (ca.pem, server.pem, server.key).
    #[arg(long, env = "VNP_TLS_DIR")]
    tls_dir: Option<PathBuf>,
    /// CA certificate that client certificates must chain to (overrides --tls-dir).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Server certificate chain (overrides --tls-dir).
    #[arg(long)]
    cert: Option<PathBuf>,
    /// Server private key (overrides --tls-dir).
    #[arg(long)]
    key: Option<PathBuf>,
    /// Token lifetime in seconds; 0 mints tokens that never expire.
    #[arg(long, default_value_t = 600)]
    token_ttl: u32,
    /// Most client connections open at once.
    #[arg(long, default_value_t = 4096)]
    max_connections: usize,
    /// Worker threads (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
}

fn pick(
    explicit: Option<PathBuf>,
    dir: &Option<PathBuf>,
    name: &str,
    flag: &str,
) -> Result<PathBuf, String> {
    explicit
        .or_else(|| dir.as_ref().map(|d| d.join(name)))
        .ok_or_else(|| format!("give --{flag} or --tls-dir"))
}

fn run(args: Args) -> Result<(), String> {
    let ca = pick(args.ca, &args.tls_dir, "ca.pem", "ca")?;
    let cert = pick(args.cert, &args.tls_dir, "server.pem", "cert")?;
    let key = pick(args.key, &args.tls_dir, "server.key", "key")?;
    let tls = vnp_registry::tls::server_config(&ca, &cert, &key).map_err(|e| e.to_string())?;
    let store = RedbStore::open(&args.data).map_err(|e| e.to_string())?;
    let registry = Registry::open(
        Box::new(store),
        TokenPolicy {
            ttl_s: args.token_ttl,
        },
    )
    .map_err(|e| e.to_string())?;
    let registry = Arc::new(registry);

    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(n) = args.workers {
        rt.worker_threads(n.max(1));
    }
    let rt = rt.build().map_err(|e| format!("runtime: {e}"))?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .map_err(|e| format!("bind {}: {e}", args.listen))?;
        let local = listener.local_addr().map_err(|e| e.to_string())?;
        // Tests and scripts wait for this exact line.
        println!("vnp-registry listening on {local}");
        log::info!("listening on {local}, data in {}", args.data.display());
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| format!("SIGTERM handler: {e}"))?;
        // Every acknowledged write is already durable, so stopping needs no flush.
        tokio::select! {
            r = vnp_registry::http::serve(listener, tls, registry, args.max_connections) => r.map_err(|e| e.to_string()),
            _ = tokio::signal::ctrl_c() => { log::info!("SIGINT; exiting"); Ok(()) }
            _ = term.recv() => { log::info!("SIGTERM; exiting"); Ok(()) }
        }
    })
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    if let Err(e) = run(Args::parse()) {
        eprintln!("vnp-registry: {e}");
        std::process::exit(1);
    }
}
