//! Blocking registry client over mutual TLS, usable from a plain (non-async) control thread.
//!
//! Built on `ureq`, whose agent keeps TLS connections alive and reuses them, so a control
//! thread asking for many tokens pays for one handshake.
//!
//! Given several registry replicas (`url` = a comma-separated list), the client sticks to one
//! and moves to the next on a connection failure or a 5xx answer, with backoff. Reads, token
//! requests and endpoint registrations are safe to repeat; other writes (creating, deleting,
//! moving, rotating) are repeated on another replica only because each carries an
//! `Idempotency-Key`, with which the registry answers a repeat from memory instead of
//! writing twice.

use crate::api::*;
use crate::error::ClientError;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use ureq::tls::{Certificate, ClientCert, PemItem, PrivateKey, RootCerts, TlsConfig};
use ureq::Agent;
use vnp_protocol::token::VmSecret;

mod failover;
mod metadata;
mod service;
use failover::{parse_bases, Repeat};

/// How to reach and authenticate to the registry. All PEM material is held in memory.
#[derive(Clone)]
pub struct ClientConfig {
    /// Base URL, e.g. `https://127.0.0.1:7443`, or several replicas' URLs separated by
    /// commas (`https://r1:7443,https://r2:7443`): the client fails over between them.
    pub url: String,
    /// The registry's CA certificate (PEM): the only root trusted for the server.
    pub ca_pem: Vec<u8>,
    /// This caller's certificate chain (PEM).
    pub cert_pem: Vec<u8>,
    /// This caller's private key (PEM).
    pub key_pem: Vec<u8>,
    /// Timeout for ordinary calls (a watch adds its own long-poll time). Default 10 s.
    pub timeout: Duration,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("url", &self.url)
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl ClientConfig {
    /// Reads CA, certificate and key from files.
    pub fn from_files(
        url: &str,
        ca: &Path,
        cert: &Path,
        key: &Path,
    ) -> Result<ClientConfig, ClientError> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|e| ClientError::Config(format!("{}: {e}", p.display())))
        };
        Ok(ClientConfig {
            url: url.to_string(),
            ca_pem: read(ca)?,
            cert_pem: read(cert)?,
            key_pem: read(key)?,
            timeout: Duration::from_secs(10),
        })
    }
}

fn parse_certs(pem: &[u8], what: &str) -> Result<Vec<Certificate<'static>>, ClientError> {
    let mut out = Vec::new();
    for item in ureq::tls::parse_pem(pem) {
        match item.map_err(|e| ClientError::Config(format!("{what}: {e}")))? {
            PemItem::Certificate(c) => out.push(c),
            _ => continue,
        }
    }
    if out.is_empty() {
        return Err(ClientError::Config(format!("{what}: no certificate found")));
    }
    Ok(out)
}

fn parse_key(pem: &[u8]) -> Result<PrivateKey<'static>, ClientError> {
    for item in ureq::tls::parse_pem(pem) {
        // Errors here would echo key material positions at most; keep the message generic.
        if let Ok(PemItem::PrivateKey(k)) = item {
            return Ok(k);
        }
    }
    Err(ClientError::Config(
        "client key: no private key found".into(),
    ))
}

/// A blocking client for a registry (one or several replicas). Cheap to clone; clones share
/// the connection pool and the replica they currently use.
#[derive(Debug, Clone)]
pub struct RegistryClient {
    agent: Agent,
    bases: Arc<[String]>,
    /// Index into `bases` of the replica that answered last.
    current: Arc<AtomicUsize>,
    timeout: Duration,
}

impl RegistryClient {
    /// Builds a client; fails early on unusable PEM material or URL.
    pub fn new(config: ClientConfig) -> Result<RegistryClient, ClientError> {
        let bases = parse_bases(&config.url)?;
        let roots = parse_certs(&config.ca_pem, "CA certificate")?;
        let chain = parse_certs(&config.cert_pem, "client certificate")?;
        let key = parse_key(&config.key_pem)?;
        let tls = TlsConfig::builder()
            .root_certs(RootCerts::new_with_certs(&roots))
            .client_cert(Some(ClientCert::new_with_certs(&chain, key)))
            .build();
        let agent_config = Agent::config_builder()
            .tls_config(tls)
            .http_status_as_error(false)
            // Per-phase timeouts rather than a global one: with a global timeout ureq resolves
            // the host on a fresh thread for every request (even on a pooled connection),
            // which costs more than the whole token request.
            .timeout_connect(Some(config.timeout))
            .timeout_send_request(Some(config.timeout))
            .timeout_send_body(Some(config.timeout))
            .timeout_recv_response(Some(config.timeout))
            .timeout_recv_body(Some(config.timeout))
            .max_idle_connections_per_host(16)
            .build();
        Ok(RegistryClient {
            agent: Agent::new_with_config(agent_config),
            bases: bases.into(),
            current: Arc::new(AtomicUsize::new(0)),
            timeout: config.timeout,
        })
    }

    /// The replicas' base URLs, in the order given.
    pub fn urls(&self) -> &[String] {
        &self.bases
    }

    /// The base URL of the replica the next request goes to first.
    pub fn current_url(&self) -> &str {
        &self.bases[self.current.load(Ordering::Relaxed) % self.bases.len()]
    }

    fn finish<T: DeserializeOwned>(
        result: Result<(u16, Vec<u8>), ClientError>,
    ) -> Result<T, ClientError> {
        let (status, body) = result?;
        if (200..300).contains(&status) {
            // The body may be a secret response: wipe the raw bytes once parsed. (serde_json's
            // error messages quote no input, so the Protocol error cannot leak it either.)
            let body = zeroize::Zeroizing::new(body);
            return serde_json::from_slice(&body[..]).map_err(|e| ClientError::Protocol {
                status,
                detail: e.to_string(),
            });
        }
        match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(err) => Err(ClientError::Api {
                status,
                code: err.error.code,
                message: err.error.message,
            }),
            Err(_) => Err(ClientError::Protocol {
                status,
                detail: String::from_utf8_lossy(&body).chars().take(200).collect(),
            }),
        }
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        Self::finish(self.exchange("GET", path, None, Repeat::Safe, None))
    }

    fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        Self::finish(self.exchange("DELETE", path, None, Repeat::Keyed, None))
    }

    /// POST of a write (repeated on another replica only with an idempotency key).
    fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let body = Self::json(body)?;
        Self::finish(self.exchange("POST", path, Some(&body), Repeat::Keyed, None))
    }

    /// POST of something safe to repeat (token requests).
    fn post_safe<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let body = Self::json(body)?;
        Self::finish(self.exchange("POST", path, Some(&body), Repeat::Safe, None))
    }

    fn put<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let body = Self::json(body)?;
        Self::finish(self.exchange("PUT", path, Some(&body), Repeat::Safe, None))
    }

    fn json<B: Serialize>(body: &B) -> Result<zeroize::Zeroizing<Vec<u8>>, ClientError> {
        serde_json::to_vec(body)
            .map(zeroize::Zeroizing::new)
            .map_err(|e| ClientError::Config(format!("request body: {e}")))
    }

    /// Sends an arbitrary request and returns the status and body unparsed (debugging, tests
    /// of malformed input). `method` is GET, POST, PUT or DELETE.
    pub fn send_raw(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<(u16, Vec<u8>), ClientError> {
        let repeat = match method {
            "GET" | "PUT" => Repeat::Safe,
            _ => Repeat::Keyed,
        };
        self.exchange(method, path, body, repeat, None)
    }

    /// The registry's counters in Prometheus text format (admin).
    pub fn metrics_text(&self) -> Result<String, ClientError> {
        let (status, body) = self.send_raw("GET", "/v1/metrics", None)?;
        if status == 200 {
            return Ok(String::from_utf8_lossy(&body).into_owned());
        }
        match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(err) => Err(ClientError::Api {
                status,
                code: err.error.code,
                message: err.error.message,
            }),
            Err(e) => Err(ClientError::Protocol {
                status,
                detail: e.to_string(),
            }),
        }
    }

    /// Who the registry thinks we are (from our certificate).
    pub fn whoami(&self) -> Result<Identity, ClientError> {
        self.get("/v1/whoami")
    }

    // ---- networks ----

    /// Creates a network (admin).
    pub fn create_network(&self, spec: &NetworkSpec) -> Result<Network, ClientError> {
        self.post("/v1/networks", spec)
    }
    /// Lists networks.
    pub fn list_networks(&self) -> Result<Vec<Network>, ClientError> {
        self.get("/v1/networks")
    }
    /// Reads one network.
    pub fn get_network(&self, id: &str) -> Result<Network, ClientError> {
        self.get(&format!("/v1/networks/{}", path_seg(id)))
    }
    /// Deletes a network (admin); with `cascade` also its VMs, gateway and rules.
    pub fn delete_network(&self, id: &str, cascade: bool) -> Result<Deleted, ClientError> {
        self.delete(&format!("/v1/networks/{}?cascade={cascade}", path_seg(id)))
    }

    // ---- hosts ----

    /// Creates a host (admin).
    pub fn create_host(&self, spec: &HostSpec) -> Result<Host, ClientError> {
        self.post("/v1/hosts", spec)
    }
    /// Lists hosts.
    pub fn list_hosts(&self) -> Result<Vec<Host>, ClientError> {
        self.get("/v1/hosts")
    }
    /// Reads one host.
    pub fn get_host(&self, id: &str) -> Result<Host, ClientError> {
        self.get(&format!("/v1/hosts/{}", path_seg(id)))
    }
    /// Deletes a host (admin); refuses while VMs are assigned to it.
    pub fn delete_host(&self, id: &str) -> Result<Deleted, ClientError> {
        self.delete(&format!("/v1/hosts/{}", path_seg(id)))
    }

    // ---- gateways ----

    /// Registers a network's gateway (admin).
    pub fn create_gateway(&self, spec: &GatewaySpec) -> Result<Gateway, ClientError> {
        self.post("/v1/gateways", spec)
    }
    /// Lists gateways.
    pub fn list_gateways(&self) -> Result<Vec<Gateway>, ClientError> {
        self.get("/v1/gateways")
    }
    /// Removes a gateway (admin).
    pub fn delete_gateway(&self, id: &str) -> Result<Deleted, ClientError> {
        self.delete(&format!("/v1/gateways/{}", path_seg(id)))
    }
    /// A gateway's own secret (only that gateway may ask).
    pub fn get_gateway_secret(&self, id: &str) -> Result<(VmSecret, u64), ClientError> {
        let resp: SecretResponse = self.get(&format!("/v1/gateways/{}/secret", path_seg(id)))?;
        decode_secret(resp)
    }

    /// What gateway `id` runs on: its network's VMs (NAT blocks, locations, egress) and the
    /// forwarding rules on its public address (that gateway, or admin).
    pub fn gateway_config(&self, id: &str) -> Result<GatewayConfig, ClientError> {
        self.get(&format!("/v1/gateways/{}/config", path_seg(id)))
    }

    // ---- port forwarding and NAT ports ----

    /// Adds a port-forwarding rule (admin).
    pub fn create_forward(&self, spec: &ForwardSpec) -> Result<ForwardRule, ClientError> {
        self.post("/v1/forwards", spec)
    }
    /// Lists forwarding rules, optionally of one network (admin).
    pub fn list_forwards(&self, network: Option<&str>) -> Result<Vec<ForwardRule>, ClientError> {
        match network {
            Some(n) => self.get(&format!("/v1/forwards?network={}", path_seg(n))),
            None => self.get("/v1/forwards"),
        }
    }
    /// Removes a forwarding rule (admin).
    pub fn delete_forward(&self, id: &str) -> Result<Deleted, ClientError> {
        self.delete(&format!("/v1/forwards/{}", path_seg(id)))
    }
    /// Gives VM `id` `blocks` more NAT port blocks (admin); returns the record.
    pub fn grow_nat_ports(&self, id: &str, blocks: u16) -> Result<VmRecord, ClientError> {
        self.post(
            &format!("/v1/vms/{}/nat-ports", path_seg(id)),
            &NatGrow { blocks },
        )
    }

    // ---- VMs ----

    /// Creates a VM (admin); unset fields are allocated.
    pub fn create_vm(&self, spec: &VmSpec) -> Result<VmRecord, ClientError> {
        self.post("/v1/vms", spec)
    }
    /// Lists VMs, optionally of one network.
    pub fn list_vms(&self, network: Option<&str>) -> Result<Vec<VmRecord>, ClientError> {
        match network {
            Some(n) => self.get(&format!("/v1/vms?network={}", path_seg(n))),
            None => self.get("/v1/vms"),
        }
    }
    /// VMs whose owning host is the caller (host certificates).
    pub fn list_host_vms(&self) -> Result<Vec<VmRecord>, ClientError> {
        self.get("/v1/host/vms")
    }
    /// Reads one VM (never its secret).
    pub fn get_vm(&self, id: &str) -> Result<VmRecord, ClientError> {
        self.get(&format!("/v1/vms/{}", path_seg(id)))
    }
    /// Deletes a VM (admin).
    pub fn delete_vm(&self, id: &str) -> Result<Deleted, ClientError> {
        self.delete(&format!("/v1/vms/{}", path_seg(id)))
    }
    /// Sets the VM's owning host (admin): the first step of a migration.
    pub fn move_vm(&self, id: &str, req: &MoveVm) -> Result<VmRecord, ClientError> {
        self.post(&format!("/v1/vms/{}/move", path_seg(id)), req)
    }
    /// Announces a live migration of the VM to another host (admin): see [`StartMigration`].
    pub fn start_migration(&self, id: &str, req: &StartMigration) -> Result<VmRecord, ClientError> {
        self.post(&format!("/v1/vms/{}/migration", path_seg(id)), req)
    }
    /// Forgets a migration under way (admin): the VM stays on its host.
    pub fn cancel_migration(&self, id: &str) -> Result<VmRecord, ClientError> {
        self.delete(&format!("/v1/vms/{}/migration", path_seg(id)))
    }
    /// Replaces the VM's secret with a fresh one (admin); returns the new record.
    pub fn rotate_vm_secret(&self, id: &str) -> Result<VmRecord, ClientError> {
        self.post(
            &format!("/v1/vms/{}/secret/rotate", path_seg(id)),
            &serde_json::json!({}),
        )
    }
    /// The VM's secret and its generation (only the owning host may ask).
    pub fn get_vm_secret(&self, id: &str) -> Result<(VmSecret, u64), ClientError> {
        let resp: SecretResponse = self.get(&format!("/v1/vms/{}/secret", path_seg(id)))?;
        decode_secret(resp)
    }
    /// "VM `id` is now served at (`host_addr`, `port`)" (the owning host); returns the generation.
    pub fn register_endpoint(
        &self,
        id: &str,
        host_addr: Ipv4Addr,
        port: u16,
    ) -> Result<u64, ClientError> {
        let ack: EndpointAck = self.put(
            &format!("/v1/vms/{}/endpoint", path_seg(id)),
            &EndpointUpdate { host_addr, port },
        )?;
        Ok(ack.generation)
    }

    // ---- policy ----

    /// Adds a pair-policy rule (admin).
    pub fn create_rule(&self, spec: &PolicyRuleSpec) -> Result<PolicyRule, ClientError> {
        self.post("/v1/policy", spec)
    }
    /// Lists rules, optionally of one network.
    pub fn list_rules(&self, network: Option<&str>) -> Result<Vec<PolicyRule>, ClientError> {
        match network {
            Some(n) => self.get(&format!("/v1/policy?network={}", path_seg(n))),
            None => self.get("/v1/policy"),
        }
    }
    /// Removes a rule (admin).
    pub fn delete_rule(&self, id: &str) -> Result<Deleted, ClientError> {
        self.delete(&format!("/v1/policy/{}", path_seg(id)))
    }

    // ---- backup ----

    /// The whole registry, secrets sealed (admin; the registry needs `--secret-keys`).
    pub fn export(&self) -> Result<crate::backup::Export, ClientError> {
        self.get("/v1/export")
    }

    /// Loads an export into an empty registry (admin).
    pub fn import(
        &self,
        export: &crate::backup::Export,
    ) -> Result<crate::backup::ImportSummary, ClientError> {
        self.post("/v1/import", export)
    }

    // ---- tokens and watch ----

    /// Asks for a token from `src_vm` (which the calling host runs) to `dst_ip`.
    pub fn request_token(&self, src_vm: &str, dst_ip: Ipv4Addr) -> Result<TokenGrant, ClientError> {
        self.post_safe(
            "/v1/tokens",
            &TokenRequest {
                src_vm: Some(src_vm.to_string()),
                src_gateway: None,
                src_ip: None,
                dst_ip,
            },
        )
    }

    /// A gateway's token towards the VM with address `dst_ip` in its network (the outside end
    /// is [`vnp_protocol::OUTSIDE`] in the token, whatever the outside address).
    pub fn request_gateway_token(
        &self,
        gateway: &str,
        dst_ip: Ipv4Addr,
    ) -> Result<TokenGrant, ClientError> {
        self.post_safe(
            "/v1/tokens",
            &TokenRequest {
                src_vm: None,
                src_gateway: Some(gateway.to_string()),
                src_ip: None,
                dst_ip,
            },
        )
    }

    /// Any token request (gateways use `src_gateway`; admins may debug any pair).
    pub fn request_token_raw(&self, req: &TokenRequest) -> Result<TokenGrant, ClientError> {
        self.post_safe("/v1/tokens", req)
    }

    /// Long-polls for changes to `vms` (all VMs if empty) after generation `since`.
    ///
    /// Returns as soon as there is at least one change, or after `timeout` with none.
    pub fn watch(
        &self,
        vms: &[&str],
        since: u64,
        timeout: Duration,
    ) -> Result<WatchResponse, ClientError> {
        let list: Vec<String> = vms.iter().map(|v| path_seg(v)).collect();
        let path = format!(
            "/v1/watch?vms={}&since={since}&timeout_ms={}",
            list.join(","),
            timeout.as_millis()
        );
        Self::finish(self.exchange(
            "GET",
            &path,
            None,
            Repeat::Safe,
            Some(timeout + self.timeout),
        ))
    }
}

fn decode_secret(resp: SecretResponse) -> Result<(VmSecret, u64), ClientError> {
    let secret = resp
        .secret
        .to_secret()
        .ok_or_else(|| ClientError::Protocol {
            status: 200,
            detail: "registry sent a malformed secret".into(),
        })?;
    Ok((secret, resp.generation))
}

/// Percent-encodes anything outside the id alphabet so a hostile id cannot change the path.
fn path_seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_are_escaped() {
        assert_eq!(path_seg("vm-a"), "vm-a");
        assert_eq!(path_seg("../x?y"), "%2E%2E%2Fx%3Fy");
    }

    #[test]
    fn config_refuses_plain_http_and_garbage_pem() {
        let cfg = ClientConfig {
            url: "http://127.0.0.1:1".into(),
            ca_pem: vec![],
            cert_pem: vec![],
            key_pem: vec![],
            timeout: Duration::from_secs(1),
        };
        assert!(matches!(
            RegistryClient::new(cfg.clone()),
            Err(ClientError::Config(_))
        ));
        let cfg = ClientConfig {
            url: "https://127.0.0.1:1".into(),
            ca_pem: b"junk".to_vec(),
            ..cfg
        };
        assert!(matches!(
            RegistryClient::new(cfg),
            Err(ClientError::Config(_))
        ));
    }
}
