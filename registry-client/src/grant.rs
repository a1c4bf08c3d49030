//! Turning a token grant into the protocol's values.

use crate::api::TokenGrant;
use vnp_protocol::token::{Expiry, Token, TokenFields};

/// Why a grant could not be turned into protocol values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("registry sent a malformed token {0:?}")]
pub struct BadToken(pub String);

impl TokenGrant {
    /// The 64-bit token.
    pub fn token_value(&self) -> Result<Token, BadToken> {
        self.token.parse().map_err(|_| BadToken(self.token.clone()))
    }

    /// The exact fields the token was minted over (what the receiver will recompute).
    pub fn fields(&self) -> TokenFields {
        TokenFields {
            src_host: self.src_host,
            src_port: self.src_port,
            src_vm: self.src_ip,
            dst_host: self.dst_host,
            dst_port: self.dst_port,
            dst_vm: self.dst_ip,
            network_id: self.network_id,
            expiry: Expiry(self.expiry),
        }
    }
}
