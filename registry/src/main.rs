//! `vnp-registry`: the VM registry service (HTTPS+JSON over mutual TLS).

use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use vnp_registry::service::{Registry, RegistryOptions};
use vnp_registry::store::sealing::KeyRing;
use vnp_registry::store::{EtcdConfig, EtcdStore, RedbStore, Store};
use vnp_registry::tokens::TokenPolicy;

/// The vnp VM registry: identities, secrets, pair policy, tokens and endpoints.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on (port 0 picks a free port; the bound address is printed).
    #[arg(long, default_value = "127.0.0.1:7443", env = "VNP_REGISTRY_LISTEN")]
    listen: SocketAddr,
    /// Where the state lives: `redb` (one embedded file, one process) or `etcd` (a cluster
    /// shared by several registry replicas).
    #[arg(long, value_enum, default_value_t = StoreKind::Redb, env = "VNP_REGISTRY_STORE")]
    store: StoreKind,
    /// Directory for the redb database (created 0700; it holds every VM secret).
    #[arg(long, env = "VNP_REGISTRY_DATA", required_if_eq("store", "redb"))]
    data: Option<PathBuf>,
    /// etcd client URLs, comma-separated (`--store etcd`).
    #[arg(
        long,
        value_delimiter = ',',
        env = "VNP_ETCD_ENDPOINTS",
        required_if_eq("store", "etcd")
    )]
    etcd_endpoints: Vec<String>,
    /// Key prefix of this registry in etcd.
    #[arg(long, default_value = "/vnp/")]
    etcd_prefix: String,
    /// Key file sealing secrets in etcd and in exports: `<id> <64 hex>` a line, the sealing
    /// key first (required with `--store etcd`; etcd never sees these keys).
    #[arg(
        long,
        env = "VNP_REGISTRY_SECRET_KEYS",
        required_if_eq("store", "etcd")
    )]
    secret_keys: Option<PathBuf>,
    /// Re-seal every secret in etcd with the first key of --secret-keys, then exit (key
    /// rotation; replicas may keep serving meanwhile).
    #[arg(long)]
    reseal_secrets: bool,
    /// With `--store etcd`: refuse tokens once this replica has not been confirmed current
    /// for this many milliseconds.
    #[arg(long, default_value_t = 5000)]
    max_staleness_ms: u64,
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
    /// Lifetime in seconds of the access and identity tokens (JWTs) minted for VMs (60-3600).
    #[arg(long, default_value_t = vnp_registry::credentials::DEFAULT_CREDENTIAL_TTL_S,
          value_parser = clap::value_parser!(u64).range(60..=3600))]
    credential_ttl_secs: u64,
    /// The `iss` claim of those tokens (the same on every replica).
    #[arg(long, default_value = "vnp-registry")]
    token_issuer: String,
    /// Seconds a VM's UDP port on a host stays out of reach of other VMs after the VM left it
    /// (deleted or moved), so traffic for the previous VM cannot land in the next one.
    #[arg(long, default_value_t = vnp_registry::plan::DEFAULT_PORT_QUARANTINE_SECS)]
    port_quarantine_secs: u64,
    /// Most client connections open at once.
    #[arg(long, default_value_t = 4096)]
    max_connections: usize,
    /// Most client connections open at once from one IP address; more are closed at once.
    #[arg(long, default_value_t = 64)]
    max_connections_per_ip: usize,
    /// Seconds a client has to complete the TLS handshake.
    #[arg(long, default_value_t = 5)]
    tls_handshake_timeout_secs: u64,
    /// Seconds a client has to send a request head. The clock runs from when the registry waits
    /// for a request, so it is also the idle timeout of kept-alive connections (keep it above
    /// the clients' pool idle time, 15 s for vnpd and vnpctl).
    #[arg(long, default_value_t = 20)]
    header_read_timeout_secs: u64,
    /// Worker threads (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum StoreKind {
    Redb,
    Etcd,
}

fn open_store(args: &Args, keys: Option<KeyRing>) -> Result<Box<dyn Store>, String> {
    Ok(match args.store {
        StoreKind::Redb => {
            let data = args.data.as_ref().ok_or("--store redb needs --data DIR")?;
            Box::new(RedbStore::open(data).map_err(|e| e.to_string())?)
        }
        StoreKind::Etcd => {
            let keys = keys.ok_or("--store etcd needs --secret-keys FILE")?;
            let mut config = EtcdConfig::new(args.etcd_endpoints.clone(), keys);
            config.prefix = args.etcd_prefix.clone();
            Box::new(EtcdStore::connect(config).map_err(|e| format!("etcd: {e}"))?)
        }
    })
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
    let keys = match &args.secret_keys {
        Some(file) => Some(KeyRing::from_file(file).map_err(|e| e.to_string())?),
        None => None,
    };
    let store = open_store(&args, keys.clone())?;
    let registry = Registry::open_with(
        store,
        TokenPolicy {
            ttl_s: args.token_ttl,
        },
        RegistryOptions {
            max_staleness: Duration::from_millis(args.max_staleness_ms),
            backup_keys: keys,
            port_quarantine: Duration::from_secs(args.port_quarantine_secs),
            credentials: vnp_registry::credentials::CredentialPolicy {
                issuer: args.token_issuer.clone(),
                ttl_s: args.credential_ttl_secs,
            },
        },
    )
    .map_err(|e| e.to_string())?;
    // The first start creates the signing key (replicas starting together create one).
    if registry
        .ensure_signing_key()
        .map_err(|e| format!("signing key: {}", e.message))?
    {
        log::info!("created the first signing key");
    }
    if args.reseal_secrets {
        if args.store != StoreKind::Etcd {
            return Err(
                "--reseal-secrets is for --store etcd (redb keeps secrets in its 0600 file)".into(),
            );
        }
        let n = registry.reseal_secrets().map_err(|e| e.message)?;
        println!("resealed {n} secrets");
        return Ok(());
    }
    let ca = pick(args.ca.clone(), &args.tls_dir, "ca.pem", "ca")?;
    let cert = pick(args.cert.clone(), &args.tls_dir, "server.pem", "cert")?;
    let key = pick(args.key.clone(), &args.tls_dir, "server.key", "key")?;
    let tls = vnp_registry::tls::server_config(&ca, &cert, &key).map_err(|e| e.to_string())?;
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
        log::info!("listening on {local}, store {:?}", args.store);
        let limits = vnp_registry::http::ConnectionLimits {
            max_connections: args.max_connections,
            per_ip: args.max_connections_per_ip,
            handshake_timeout: Duration::from_secs(args.tls_handshake_timeout_secs.max(1)),
            header_read_timeout: Duration::from_secs(args.header_read_timeout_secs.max(1)),
        };
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| format!("SIGTERM handler: {e}"))?;
        // Every acknowledged write is already durable, so stopping needs no flush.
        tokio::select! {
            r = vnp_registry::http::serve(listener, tls, registry, limits) => r.map_err(|e| e.to_string()),
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
