//! Accepting mutual-TLS connections and serving the router on them.

use super::*;

// ---- serving

/// Accepts TLS connections on `listener` and serves the API until the process ends.
///
/// At most `max_connections` connections are open at once; further clients wait in the kernel's
/// accept queue instead of exhausting file descriptors. A client has 10 s to finish the TLS
/// handshake.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    reg: Shared,
    max_connections: usize,
) -> std::io::Result<()> {
    let acceptor = TlsAcceptor::from(tls);
    let app = router(reg);
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections.max(1)));
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
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
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
            let service = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(peer_identity.clone());
                    let mut app = app.clone();
                    async move { tower_service::Service::call(&mut app, req).await }
                },
            );
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(tls), service);
            if let Err(e) = conn.await {
                log::debug!("connection from {peer} ended: {e}");
            }
        });
    }
}
