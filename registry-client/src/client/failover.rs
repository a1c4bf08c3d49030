//! Failing over between registry replicas: which replica, how often, with what pause.

use super::RegistryClient;
use crate::error::ClientError;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Whether a request may be sent again to another replica after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Repeat {
    /// Reads, token requests, endpoint registration: repeating changes nothing.
    Safe,
    /// A write that carries an idempotency key: the registry answers a repeat from memory.
    Keyed,
}

/// First pause before trying another replica; doubles per attempt up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Pause before attempt `n` (0 = the first try).
fn backoff(n: usize) -> Duration {
    if n == 0 {
        return Duration::ZERO;
    }
    FIRST_BACKOFF
        .saturating_mul(1u32 << (n - 1).min(10))
        .min(MAX_BACKOFF)
}

/// A fresh idempotency key: 128 random bits in hex.
fn idempotency_key() -> Result<String, ClientError> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|e| ClientError::Config(format!("OS random: {e}")))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// The base URLs in `url` (comma-separated), each checked to be `https://`.
pub(super) fn parse_bases(url: &str) -> Result<Vec<String>, ClientError> {
    let bases: Vec<String> = url
        .split(',')
        .map(|u| u.trim().trim_end_matches('/').to_string())
        .filter(|u| !u.is_empty())
        .collect();
    if bases.is_empty() {
        return Err(ClientError::Config("no registry URL given".into()));
    }
    for base in &bases {
        if !base.starts_with("https://") {
            return Err(ClientError::Config(format!(
                "registry URL {base:?} must start with https:// (the registry only speaks mTLS)"
            )));
        }
    }
    Ok(bases)
}

impl RegistryClient {
    /// Sends one request, failing over between replicas. Returns status and body.
    pub(super) fn exchange(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        repeat: Repeat,
        recv_timeout: Option<Duration>,
    ) -> Result<(u16, Vec<u8>), ClientError> {
        let n = self.bases.len();
        // Twice around the ring, so a replica that was restarting gets a second chance.
        let attempts = if n == 1 { 1 } else { 2 * n };
        let key = match (repeat, n) {
            (Repeat::Keyed, 2..) => Some(idempotency_key()?),
            _ => None,
        };
        let first = self.current.load(Ordering::Relaxed);
        let mut last_err = None;
        for attempt in 0..attempts {
            std::thread::sleep(backoff(attempt));
            let i = (first + attempt) % n;
            let url = format!("{}{}", self.bases[i], path);
            match self.send_once(method, &url, body, key.as_deref(), recv_timeout) {
                Ok((status, body)) if status < 500 || attempt + 1 == attempts => {
                    self.current.store(i, Ordering::Relaxed);
                    return Ok((status, body));
                }
                Ok((status, body)) => {
                    let detail = String::from_utf8_lossy(&body).chars().take(200).collect();
                    log::warn!(
                        "registry {} answered {status}; trying the next",
                        self.bases[i]
                    );
                    last_err = Some(ClientError::Protocol { status, detail });
                }
                Err(e) if attempt + 1 == attempts => return Err(e),
                Err(e) => {
                    log::warn!("registry {}: {e}; trying the next", self.bases[i]);
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or_else(|| ClientError::Transport("no attempt made".into())))
    }

    fn send_once(
        &self,
        method: &str,
        url: &str,
        body: Option<&[u8]>,
        key: Option<&str>,
        recv_timeout: Option<Duration>,
    ) -> Result<(u16, Vec<u8>), ClientError> {
        let transport = |e: ureq::Error| ClientError::Transport(e.to_string());
        let result = match method {
            "GET" | "DELETE" => {
                let req = if method == "GET" {
                    self.agent.get(url)
                } else {
                    self.agent.delete(url)
                };
                let req = match key {
                    Some(k) => req.header("idempotency-key", k),
                    None => req,
                };
                match recv_timeout {
                    Some(t) => req.config().timeout_recv_response(Some(t)).build().call(),
                    None => req.call(),
                }
            }
            "POST" | "PUT" => {
                let req = if method == "POST" {
                    self.agent.post(url)
                } else {
                    self.agent.put(url)
                };
                let req = match key {
                    Some(k) => req.header("idempotency-key", k),
                    None => req,
                };
                req.content_type("application/json")
                    .send(body.unwrap_or_default())
            }
            _ => return Err(ClientError::Config(format!("unsupported method {method}"))),
        };
        let mut resp = result.map_err(transport)?;
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .with_config()
            .limit(16 * 1024 * 1024)
            .read_to_vec()
            .map_err(transport)?;
        Ok((status, body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_a_second() {
        let pauses: Vec<u128> = (0..8).map(|n| backoff(n).as_millis()).collect();
        assert_eq!(pauses, [0, 50, 100, 200, 400, 800, 1000, 1000]);
        assert_eq!(backoff(usize::MAX), MAX_BACKOFF);
    }

    #[test]
    fn url_lists_are_split_and_checked() {
        assert_eq!(
            parse_bases("https://a:1/, https://b:2").unwrap(),
            ["https://a:1", "https://b:2"]
        );
        assert_eq!(parse_bases("https://a:1").unwrap(), ["https://a:1"]);
        assert!(matches!(
            parse_bases("https://a:1,http://b:2"),
            Err(ClientError::Config(m)) if m.contains("http://b:2")
        ));
        assert!(matches!(parse_bases(" , "), Err(ClientError::Config(_))));
    }

    #[test]
    fn idempotency_keys_are_fresh_and_well_formed() {
        let (a, b) = (idempotency_key().unwrap(), idempotency_key().unwrap());
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
    }
}
