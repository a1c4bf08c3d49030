//! The `[bridge]` section of vnpd's configuration: the service bridge's upstream resolver
//! (`docs/metadata.md`).

use serde::Deserialize;
use std::net::SocketAddr;

use super::ConfigError;

/// `[bridge]` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBridge {
    dns_upstream: Option<String>,
}

/// The service bridge's settings, validated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BridgeConfig {
    /// Where guests' DNS queries for names the bridge does not serve go (`ip:port`, UDP);
    /// `None`: they are answered REFUSED.
    pub dns_upstream: Option<SocketAddr>,
}

impl RawBridge {
    /// `over`'s values win.
    pub(super) fn merge(self, over: Self) -> Self {
        Self {
            dns_upstream: over.dns_upstream.or(self.dns_upstream),
        }
    }

    pub(super) fn validate(self) -> Result<BridgeConfig, ConfigError> {
        let dns_upstream = match self.dns_upstream.as_deref() {
            None | Some("" | "off") => None,
            Some(text) => Some(
                text.parse::<SocketAddr>()
                    .map_err(|e| ConfigError::Invalid {
                        key: "bridge.dns_upstream",
                        reason: format!("{text:?} is not ip:port: {e}"),
                    })?,
            ),
        };
        if dns_upstream.is_some_and(|a| a.port() == 0 || a.ip().is_unspecified()) {
            return Err(ConfigError::Invalid {
                key: "bridge.dns_upstream",
                reason: "needs a real address and a port other than 0".into(),
            });
        }
        Ok(BridgeConfig { dns_upstream })
    }
}
