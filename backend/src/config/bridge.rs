//! The `[bridge]` section of vnpd's configuration: the service bridge's upstream resolver and
//! the external services it bridges (`docs/metadata.md`).

use serde::Deserialize;
use std::net::SocketAddr;

use super::ConfigError;
use crate::bridge::service::{ServiceSpec, MAX_SERVICES};
use crate::bridge::BridgeLimits;

/// `[bridge]` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBridge {
    dns_upstream: Option<String>,
    requests_per_sec: Option<u32>,
    request_burst: Option<u32>,
    services: Option<Vec<RawService>>,
}

/// `[[bridge.services]]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: String,
    port: u16,
    upstream: String,
    audience: Option<String>,
}

/// The service bridge's settings, validated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BridgeConfig {
    /// Where guests' DNS queries for names the bridge does not serve go (`ip:port`, UDP);
    /// `None`: they are answered REFUSED.
    pub dns_upstream: Option<SocketAddr>,
    /// External services guests reach at the metadata address with their VM's identity.
    pub services: Vec<ServiceSpec>,
    /// Each VM's bridge's limits (the request rate from `requests_per_sec`, `request_burst`).
    pub limits: BridgeLimits,
}

fn invalid(key: &'static str, reason: String) -> ConfigError {
    ConfigError::Invalid { key, reason }
}

fn socket_addr(key: &'static str, text: &str) -> Result<SocketAddr, ConfigError> {
    let addr = text
        .parse::<SocketAddr>()
        .map_err(|e| invalid(key, format!("{text:?} is not ip:port: {e}")))?;
    if addr.port() == 0 || addr.ip().is_unspecified() {
        return Err(invalid(
            key,
            format!("{text:?}: needs a real address and a port other than 0"),
        ));
    }
    Ok(addr)
}

impl RawService {
    fn validate(self) -> Result<ServiceSpec, ConfigError> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 32
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !name_ok {
            return Err(invalid(
                "bridge.services.name",
                format!("{:?}: use 1-32 of [a-z0-9-]", self.name),
            ));
        }
        if matches!(self.port, 0 | 53 | 80) {
            return Err(invalid(
                "bridge.services.port",
                format!("{}: 0, 53 and 80 are not free", self.port),
            ));
        }
        let audience = self.audience.unwrap_or_else(|| self.name.clone());
        if audience.is_empty() || audience.len() > 512 {
            return Err(invalid(
                "bridge.services.audience",
                "1 to 512 characters".into(),
            ));
        }
        Ok(ServiceSpec {
            upstream: socket_addr("bridge.services.upstream", &self.upstream)?,
            name: self.name,
            port: self.port,
            audience,
        })
    }
}

impl RawBridge {
    /// `over`'s values win.
    pub(super) fn merge(self, over: Self) -> Self {
        Self {
            dns_upstream: over.dns_upstream.or(self.dns_upstream),
            requests_per_sec: over.requests_per_sec.or(self.requests_per_sec),
            request_burst: over.request_burst.or(self.request_burst),
            services: over.services.or(self.services),
        }
    }

    pub(super) fn validate(self) -> Result<BridgeConfig, ConfigError> {
        let dns_upstream = match self.dns_upstream.as_deref() {
            None | Some("" | "off") => None,
            Some(text) => Some(socket_addr("bridge.dns_upstream", text)?),
        };
        let raw = self.services.unwrap_or_default();
        if raw.len() > MAX_SERVICES {
            return Err(invalid(
                "bridge.services",
                format!("{} services, at most {MAX_SERVICES}", raw.len()),
            ));
        }
        let mut services: Vec<ServiceSpec> = Vec::new();
        for s in raw {
            let s = s.validate()?;
            if let Some(other) = services
                .iter()
                .find(|o| o.port == s.port || o.name == s.name)
            {
                return Err(invalid(
                    "bridge.services",
                    format!("{} and {} share a name or port", other.name, s.name),
                ));
            }
            services.push(s);
        }
        let mut limits = BridgeLimits::default();
        limits.rate_per_sec = self.requests_per_sec.unwrap_or(limits.rate_per_sec);
        limits.burst = self.request_burst.unwrap_or(limits.burst);
        for (key, value) in [
            ("bridge.requests_per_sec", limits.rate_per_sec),
            ("bridge.request_burst", limits.burst),
        ] {
            if !(1..=1_000_000).contains(&value) {
                return Err(invalid(key, format!("{value}: use 1..=1000000")));
            }
        }
        Ok(BridgeConfig {
            dns_upstream,
            services,
            limits,
        })
    }
}
