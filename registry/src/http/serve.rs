//! Accepting mutual-TLS connections and serving the router on them.
//!
//! A client that connects and then does nothing must not hold the registry's resources for
//! long, and one address must not take every connection slot:
//!
//! - the TLS handshake has [`ConnectionLimits::handshake_timeout`];
//! - hyper runs with a timer: a request head must arrive within
//!   [`ConnectionLimits::header_read_timeout`]. hyper starts that clock as soon as it waits for
//!   a request, so it also closes connections that stay silent after the handshake or after
//!   their last response (it is the keep-alive idle timeout); the same time is allowed for a
//!   request's body (`body`);
//! - each peer address may hold at most [`ConnectionLimits::per_ip`] connections; beyond that
//!   new ones are closed at once (and counted).

use super::*;
use hyper_util::rt::TokioTimer;
use std::net::IpAddr;
use std::sync::Mutex;

/// Limits on client connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Most connections open at once; further clients wait in the kernel's accept queue.
    pub max_connections: usize,
    /// Most connections open at once from one IP address.
    pub per_ip: usize,
    /// Time allowed for the TLS handshake.
    pub handshake_timeout: Duration,
    /// Time allowed for a request head to arrive, also between requests (idle timeout), and
    /// for a request body to arrive once its head has.
    pub header_read_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            per_ip: 64,
            handshake_timeout: Duration::from_secs(5),
            // Longer than the clients' pool keeps idle connections (ureq: 15 s), so that a
            // client never reuses a connection the registry is closing.
            header_read_timeout: Duration::from_secs(20),
        }
    }
}

/// Open connections per peer address.
#[derive(Debug, Default)]
struct PerIp(Mutex<HashMap<IpAddr, usize>>);

/// One counted connection; uncounted on drop.
struct IpSlot {
    table: Arc<PerIp>,
    ip: IpAddr,
}

impl PerIp {
    /// Counts a connection from `ip` unless it already has `cap`.
    fn admit(table: &Arc<PerIp>, ip: IpAddr, cap: usize) -> Option<IpSlot> {
        let mut map = table.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            table: Arc::clone(table),
            ip,
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut map = self.table.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

// ---- serving

/// Accepts TLS connections on `listener` and serves the API until the process ends, within
/// `limits`.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    reg: Shared,
    limits: ConnectionLimits,
) -> std::io::Result<()> {
    let acceptor = TlsAcceptor::from(tls);
    let body_timeout = limits.header_read_timeout;
    let app = router(reg.clone()).layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            super::body::read_first(req, next, body_timeout)
        },
    ));
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let per_ip = Arc::new(PerIp::default());
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return Ok(());
        };
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                log::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(ip_slot) = PerIp::admit(&per_ip, peer.ip(), limits.per_ip.max(1)) else {
            // Closed at once: the slot is free again for everyone else.
            reg.metrics().connection_refused_per_ip();
            log::debug!(
                "{peer}: more than {} connections from it; closed",
                limits.per_ip
            );
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let _slots = (slot, ip_slot);
            serve_connection(tcp, peer, acceptor, app, limits).await;
        });
    }
}

/// One connection: the handshake, then HTTP/1.1 until it closes or times out.
async fn serve_connection(
    tcp: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    acceptor: TlsAcceptor,
    app: Router,
    limits: ConnectionLimits,
) {
    let tls = match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            log::info!("TLS handshake with {peer} failed: {e}");
            return;
        }
        Err(_) => {
            log::info!("TLS handshake with {peer} timed out");
            return;
        }
    };
    let identity = {
        let (_, conn) = tls.get_ref();
        match conn.peer_certificates().and_then(|c| c.first()) {
            Some(cert) => identity_from_cert(cert.as_ref()),
            None => Err("no client certificate".to_string()),
        }
    };
    if let Err(why) = &identity {
        log::info!("connection from {peer} has no usable identity: {why}");
    }
    let peer_identity = PeerIdentity(identity);
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(peer_identity.clone());
            let mut app = app.clone();
            async move { tower_service::Service::call(&mut app, req).await }
        });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true)
        .serve_connection(TokioIo::new(tls), service);
    if let Err(e) = conn.await {
        log::debug!("connection from {peer} ended: {e}");
    }
}
