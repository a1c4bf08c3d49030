//! vnpd's configuration: a TOML file over embedded defaults, then command-line overrides.
//!
//! Parsing and validation are pure ([`VnpdConfig::from_toml`], [`VnpdConfig::validate`]) so that
//! every bad value has a unit-tested, clear error. Unknown keys are refused: a typo in an
//! operator's file must not silently fall back to a default.

mod bridge;
mod sections;

use serde::Deserialize;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use crate::control::fair::RequestRate;
use crate::datapath::vhost_socket::SocketAccess;
pub use bridge::BridgeConfig;
use sections::{RawTokenRequests, RawVhostUser};

/// Default path of the configuration file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/vnp/vnpd.toml";

/// Smallest underlay MTU accepted: the guest still gets the IPv4 minimum of 576 bytes after
/// the VNP encapsulation overhead.
pub const MIN_UNDERLAY_MTU: u16 = 576 + vnp_protocol::wire::ENCAP_OVERHEAD as u16;
/// Largest underlay MTU accepted (jumbo frames).
pub const MAX_UNDERLAY_MTU: u16 = 9216;
/// Most queue pairs one VM may ask for.
pub const MAX_QUEUE_PAIRS: u16 = 16;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// File path.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The TOML did not parse or had unknown/mistyped keys.
    #[error("invalid config{}: {message}", origin.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default())]
    Parse {
        /// File path, if it came from a file.
        origin: Option<PathBuf>,
        /// What the parser said (includes line and column).
        message: String,
    },
    /// A required value is missing.
    #[error("config: {0} is required (set it in the config file or with --{1})")]
    Missing(&'static str, &'static str),
    /// A value is out of range or inconsistent.
    #[error("config: {key}: {reason}")]
    Invalid {
        /// Key name.
        key: &'static str,
        /// Why.
        reason: String,
    },
}

/// How vnpd reaches the registry (HTTPS with mutual TLS).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// Base URL, e.g. `https://198.18.0.1:7443`.
    pub url: Option<String>,
    /// CA certificate (PEM) that signed the registry's server certificate.
    pub ca_cert: Option<PathBuf>,
    /// This host's client certificate (PEM): the host's identity at the registry.
    pub client_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    pub client_key: Option<PathBuf>,
}

/// The raw file layout; every field optional so that defaults and flags can fill it in.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    host_id: Option<String>,
    underlay_addr: Option<Ipv4Addr>,
    underlay_mtu: Option<u16>,
    socket_dir: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    admin_socket: Option<PathBuf>,
    metrics_listen: Option<String>,
    default_queue_pairs: Option<u16>,
    token_refresh_margin_secs: Option<u32>,
    registry_timeout_secs: Option<u32>,
    token_clock_skew_secs: Option<u32>,
    token_max_ttl_secs: Option<u32>,
    accept_never_expiring_tokens: Option<bool>,
    offloads: Option<bool>,
    #[serde(default)]
    registry: RegistryConfig,
    #[serde(default)]
    vhost_user: RawVhostUser,
    #[serde(default)]
    token_requests: RawTokenRequests,
    #[serde(default)]
    bridge: bridge::RawBridge,
}

/// Embedded defaults, shown to operators by `vnpd --print-default-config`.
pub const DEFAULT_CONFIG_TOML: &str = r#"# vnpd configuration. The addresses, paths and registry keys may also be given on the command
# line (--key-with-dashes; see vnpd --help).

# This host's name in logs (the registry identifies the host by its client certificate).
# host_id = "host-a"
# This host's address on the underlay network: VNP datagrams leave from and arrive at it.
# underlay_addr = "198.18.0.10"
underlay_mtu = 1500
# vhost-user sockets of attached VMs (unless an attach names its own path).
socket_dir = "/run/vnp/sockets"
# Persisted attachments (restored at start).
state_dir = "/var/lib/vnp"
# The local admin API (JSON lines over a unix socket), used by `vnpctl vnpd`.
admin_socket = "/run/vnp/vnpd.sock"
# Prometheus text exporter; "off" disables it.
metrics_listen = "127.0.0.1:9464"
default_queue_pairs = 1
# Tokens are refreshed this long before they expire.
token_refresh_margin_secs = 60
registry_timeout_secs = 5
# Receive checks (docs/protocol.md): the clock difference allowed between hosts, and the longest
# token lifetime accepted, which must be at least the registry's --token-ttl (600 by default);
# an expiry further ahead than that is forged.
token_clock_skew_secs = 5
token_max_ttl_secs = 3600
# Accept tokens that never expire: only for a registry run with --token-ttl 0.
accept_never_expiring_tokens = false
# Offer guests checksum and TCP segmentation offloads (CSUM, GUEST_CSUM, HOST_TSO4, GUEST_TSO4,
# HOST_ECN, GUEST_ECN; IPv4 only). Off: guests hand over and receive complete packets of at most
# the MTU, one per ring entry. Takes effect for VMs attached (or frontends connecting) after.
offloads = true

[registry]
# url = "https://198.18.0.1:7443"
# ca_cert = "/etc/vnp/ca.pem"
# client_cert = "/etc/vnp/host.pem"
# client_key = "/etc/vnp/host-key.pem"

[vhost_user]
# Who may connect to the VMs' vhost-user sockets (connecting needs write permission), applied
# each time vnpd creates a socket. The VMM must run as the owner or in the group: libvirt on
# Debian runs QEMU as libvirt-qemu, so give it socket_group = "libvirt-qemu". Names or ids.
socket_owner = "root"
socket_group = "root"
socket_mode = 0o660

[token_requests]
# Registry requests for new destinations, per VM: a bucket of `burst` requests refilled at
# `per_sec`. A VM beyond it waits (its requests are counted as throttled); other VMs are served
# in turn, and refreshes of tokens in use go first (docs/operations.md).
per_sec = 20
burst = 100

[bridge]
# The service bridge's DNS (docs/metadata.md): it answers metadata.google.internal and each VM's
# own name; other names go to this resolver (ip:port, UDP, 2 s timeout) or, when it is "off",
# are answered REFUSED.
dns_upstream = "off"
# Metadata requests each VM may make (its HTTP requests to the bridge, all ports): a bucket of
# request_burst refilled at requests_per_sec; beyond it, 429.
requests_per_sec = 50
request_burst = 100
# External services on the host network that guests reach at 169.254.169.254:<port>; each
# request gets the VM's identity token (audience: `audience`, default the name) as
# "Authorization: Bearer ..." (US20140282510). For example:
# [[bridge.services]]
# name = "inventory"
# port = 8080
# upstream = "198.18.0.10:9000"
# audience = "https://inventory.internal"
"#;

/// Validated vnpd configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VnpdConfig {
    /// Name of this host in logs and metrics.
    pub host_id: String,
    /// This host's underlay address (`Phys_IP`).
    pub underlay_addr: Ipv4Addr,
    /// Underlay MTU; guests get this minus the VNP encapsulation overhead.
    pub underlay_mtu: u16,
    /// Directory of default vhost-user socket paths.
    pub socket_dir: PathBuf,
    /// Directory of persisted state.
    pub state_dir: PathBuf,
    /// Admin unix socket path.
    pub admin_socket: PathBuf,
    /// Prometheus listen address, `None` = disabled.
    pub metrics_listen: Option<SocketAddr>,
    /// Queue pairs when an attach does not say.
    pub default_queue_pairs: u16,
    /// Refresh tokens this many seconds before expiry.
    pub token_refresh_margin_secs: u32,
    /// Timeout of one registry request.
    pub registry_timeout_secs: u32,
    /// Clock difference allowed between hosts when checking a token's expiry.
    pub token_clock_skew_secs: u32,
    /// Longest token lifetime accepted on receive.
    pub token_max_ttl_secs: u32,
    /// Whether tokens that never expire are accepted.
    pub accept_never_expiring_tokens: bool,
    /// Offer guests checksum and segmentation offloads (`offloads`).
    pub offloads: bool,
    /// Registry URL.
    pub registry_url: String,
    /// Registry CA certificate.
    pub registry_ca_cert: PathBuf,
    /// Host client certificate.
    pub registry_client_cert: PathBuf,
    /// Host client key.
    pub registry_client_key: PathBuf,
    /// Owner, group and mode of every vhost-user socket.
    pub vhost_user_socket: SocketAccess,
    /// Per-VM rate of registry requests for new destinations.
    pub token_requests: RequestRate,
    /// The service bridge (`[bridge]`).
    pub bridge: BridgeConfig,
}

/// Command-line overrides (each `Some` replaces the file's value).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `--host-id`
    pub host_id: Option<String>,
    /// `--underlay-addr`
    pub underlay_addr: Option<Ipv4Addr>,
    /// `--underlay-mtu`
    pub underlay_mtu: Option<u16>,
    /// `--socket-dir`
    pub socket_dir: Option<PathBuf>,
    /// `--state-dir`
    pub state_dir: Option<PathBuf>,
    /// `--admin-socket`
    pub admin_socket: Option<PathBuf>,
    /// `--metrics-listen`
    pub metrics_listen: Option<String>,
    /// `--registry-url`
    pub registry_url: Option<String>,
    /// `--registry-ca-cert`
    pub registry_ca_cert: Option<PathBuf>,
    /// `--registry-client-cert`
    pub registry_client_cert: Option<PathBuf>,
    /// `--registry-client-key`
    pub registry_client_key: Option<PathBuf>,
}

fn parse_raw(text: &str, origin: Option<&Path>) -> Result<RawConfig, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        origin: origin.map(Path::to_path_buf),
        message: e.to_string().trim().to_string(),
    })
}

/// Later layers win: `over`'s `Some` values replace `base`'s.
fn merge(base: RawConfig, over: RawConfig) -> RawConfig {
    RawConfig {
        host_id: over.host_id.or(base.host_id),
        underlay_addr: over.underlay_addr.or(base.underlay_addr),
        underlay_mtu: over.underlay_mtu.or(base.underlay_mtu),
        socket_dir: over.socket_dir.or(base.socket_dir),
        state_dir: over.state_dir.or(base.state_dir),
        admin_socket: over.admin_socket.or(base.admin_socket),
        metrics_listen: over.metrics_listen.or(base.metrics_listen),
        default_queue_pairs: over.default_queue_pairs.or(base.default_queue_pairs),
        token_refresh_margin_secs: over
            .token_refresh_margin_secs
            .or(base.token_refresh_margin_secs),
        registry_timeout_secs: over.registry_timeout_secs.or(base.registry_timeout_secs),
        token_clock_skew_secs: over.token_clock_skew_secs.or(base.token_clock_skew_secs),
        token_max_ttl_secs: over.token_max_ttl_secs.or(base.token_max_ttl_secs),
        accept_never_expiring_tokens: over
            .accept_never_expiring_tokens
            .or(base.accept_never_expiring_tokens),
        offloads: over.offloads.or(base.offloads),
        registry: RegistryConfig {
            url: over.registry.url.or(base.registry.url),
            ca_cert: over.registry.ca_cert.or(base.registry.ca_cert),
            client_cert: over.registry.client_cert.or(base.registry.client_cert),
            client_key: over.registry.client_key.or(base.registry.client_key),
        },
        vhost_user: base.vhost_user.merge(over.vhost_user),
        token_requests: base.token_requests.merge(over.token_requests),
        bridge: base.bridge.merge(over.bridge),
    }
}

impl From<Overrides> for RawConfig {
    fn from(o: Overrides) -> Self {
        RawConfig {
            host_id: o.host_id,
            underlay_addr: o.underlay_addr,
            underlay_mtu: o.underlay_mtu,
            socket_dir: o.socket_dir,
            state_dir: o.state_dir,
            admin_socket: o.admin_socket,
            metrics_listen: o.metrics_listen,
            registry: RegistryConfig {
                url: o.registry_url,
                ca_cert: o.registry_ca_cert,
                client_cert: o.registry_client_cert,
                client_key: o.registry_client_key,
            },
            ..RawConfig::default()
        }
    }
}

impl VnpdConfig {
    /// Builds the configuration from the text of a config file (or `None` for defaults only)
    /// and command-line overrides. `fallback_host_id` is used when none is configured (the
    /// machine's hostname in the binary).
    pub fn from_toml(
        file_text: Option<(&str, &Path)>,
        overrides: Overrides,
        fallback_host_id: &str,
    ) -> Result<Self, ConfigError> {
        let defaults = parse_raw(DEFAULT_CONFIG_TOML, None)?;
        let file = match file_text {
            Some((text, path)) => parse_raw(text, Some(path))?,
            None => RawConfig::default(),
        };
        let raw = merge(merge(defaults, file), overrides.into());
        Self::validate(raw, fallback_host_id)
    }

    /// Reads `path` (if it exists or was named explicitly) and builds the configuration.
    pub fn load(
        path: &Path,
        explicit: bool,
        overrides: Overrides,
        fallback_host_id: &str,
    ) -> Result<Self, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::from_toml(Some((&text, path)), overrides, fallback_host_id),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                Self::from_toml(None, overrides, fallback_host_id)
            }
            Err(source) => Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    fn validate(raw: RawConfig, fallback_host_id: &str) -> Result<Self, ConfigError> {
        let host_id = checked_host_id(raw.host_id, fallback_host_id)?;
        let (underlay_addr, underlay_mtu) = checked_underlay(raw.underlay_addr, raw.underlay_mtu)?;
        let default_queue_pairs = raw.default_queue_pairs.unwrap_or(1);
        if !(1..=MAX_QUEUE_PAIRS).contains(&default_queue_pairs) {
            return Err(invalid(
                "default_queue_pairs",
                format!("{default_queue_pairs} is outside 1..={MAX_QUEUE_PAIRS}"),
            ));
        }
        let registry_timeout_secs = raw.registry_timeout_secs.unwrap_or(5);
        if registry_timeout_secs == 0 {
            return Err(invalid(
                "registry_timeout_secs",
                "must be at least 1".into(),
            ));
        }
        let (token_clock_skew_secs, token_max_ttl_secs) =
            checked_expiry_window(raw.token_clock_skew_secs, raw.token_max_ttl_secs)?;
        let registry = checked_registry(raw.registry)?;
        Ok(Self {
            host_id,
            underlay_addr,
            underlay_mtu,
            socket_dir: path_or("socket_dir", raw.socket_dir, "/run/vnp/sockets")?,
            state_dir: path_or("state_dir", raw.state_dir, "/var/lib/vnp")?,
            admin_socket: path_or("admin_socket", raw.admin_socket, "/run/vnp/vnpd.sock")?,
            metrics_listen: checked_metrics_listen(raw.metrics_listen.as_deref())?,
            default_queue_pairs,
            token_refresh_margin_secs: raw.token_refresh_margin_secs.unwrap_or(60),
            registry_timeout_secs,
            token_clock_skew_secs,
            token_max_ttl_secs,
            accept_never_expiring_tokens: raw.accept_never_expiring_tokens.unwrap_or(false),
            offloads: raw.offloads.unwrap_or(true),
            registry_url: registry.url,
            registry_ca_cert: registry.ca_cert,
            registry_client_cert: registry.client_cert,
            registry_client_key: registry.client_key,
            vhost_user_socket: raw.vhost_user.validate()?,
            token_requests: raw.token_requests.validate()?,
            bridge: raw.bridge.validate()?,
        })
    }

    /// MTU offered to guests: the underlay MTU minus the VNP encapsulation overhead.
    pub fn guest_mtu(&self) -> u16 {
        // validate() guarantees underlay_mtu >= MIN_UNDERLAY_MTU > ENCAP_OVERHEAD.
        self.underlay_mtu - vnp_protocol::wire::ENCAP_OVERHEAD as u16
    }

    /// Default vhost-user socket path of `vm_id`.
    pub fn default_socket_path(&self, vm_id: &str) -> PathBuf {
        self.socket_dir.join(format!("{vm_id}.sock"))
    }
}

fn invalid(key: &'static str, reason: String) -> ConfigError {
    ConfigError::Invalid { key, reason }
}

fn checked_host_id(host_id: Option<String>, fallback: &str) -> Result<String, ConfigError> {
    let host_id = host_id.unwrap_or_else(|| fallback.to_string());
    if host_id.is_empty() || host_id.len() > 64 || host_id.chars().any(char::is_control) {
        return Err(invalid(
            "host_id",
            "must be 1..=64 printable characters".into(),
        ));
    }
    Ok(host_id)
}

fn checked_underlay(
    addr: Option<Ipv4Addr>,
    mtu: Option<u16>,
) -> Result<(Ipv4Addr, u16), ConfigError> {
    let addr = addr.ok_or(ConfigError::Missing("underlay_addr", "underlay-addr"))?;
    if addr.is_unspecified() || addr.is_multicast() || addr.is_broadcast() {
        return Err(invalid(
            "underlay_addr",
            format!("{addr} is not a unicast host address"),
        ));
    }
    let mtu = mtu.unwrap_or(1500);
    if !(MIN_UNDERLAY_MTU..=MAX_UNDERLAY_MTU).contains(&mtu) {
        return Err(invalid(
            "underlay_mtu",
            format!("{mtu} is outside {MIN_UNDERLAY_MTU}..={MAX_UNDERLAY_MTU}"),
        ));
    }
    Ok((addr, mtu))
}

fn checked_metrics_listen(value: Option<&str>) -> Result<Option<SocketAddr>, ConfigError> {
    match value {
        None | Some("off") | Some("") => Ok(None),
        Some(s) => s.parse::<SocketAddr>().map(Some).map_err(|_| {
            invalid(
                "metrics_listen",
                format!("{s:?} is not ADDRESS:PORT (or \"off\")"),
            )
        }),
    }
}

/// The receive checks' expiry window: clock skew allowed, and the longest TTL accepted.
fn checked_expiry_window(
    skew: Option<u32>,
    max_ttl: Option<u32>,
) -> Result<(u32, u32), ConfigError> {
    let skew = skew.unwrap_or(5);
    let max_ttl = max_ttl.unwrap_or(3600);
    if max_ttl == 0 {
        return Err(invalid(
            "token_max_ttl_secs",
            "must be at least 1 (never-expiring tokens: accept_never_expiring_tokens)".into(),
        ));
    }
    if skew > max_ttl {
        return Err(invalid(
            "token_clock_skew_secs",
            format!(
                "{skew} is more than token_max_ttl_secs ({max_ttl}): expiry would check nothing"
            ),
        ));
    }
    Ok((skew, max_ttl))
}

/// The registry's URL(s) and the mutual-TLS files, all required.
struct RegistrySettings {
    url: String,
    ca_cert: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn checked_registry(raw: RegistryConfig) -> Result<RegistrySettings, ConfigError> {
    let url = raw
        .url
        .ok_or(ConfigError::Missing("registry.url", "registry-url"))?;
    if !url.starts_with("https://") {
        return Err(invalid(
            "registry.url",
            format!("{url:?} must be an https:// URL (mutual TLS)"),
        ));
    }
    Ok(RegistrySettings {
        url,
        ca_cert: raw
            .ca_cert
            .ok_or(ConfigError::Missing("registry.ca_cert", "registry-ca-cert"))?,
        client_cert: raw.client_cert.ok_or(ConfigError::Missing(
            "registry.client_cert",
            "registry-client-cert",
        ))?,
        client_key: raw.client_key.ok_or(ConfigError::Missing(
            "registry.client_key",
            "registry-client-key",
        ))?,
    })
}

fn path_or(
    key: &'static str,
    path: Option<PathBuf>,
    default: &str,
) -> Result<PathBuf, ConfigError> {
    let path = path.unwrap_or_else(|| PathBuf::from(default));
    if path.as_os_str().is_empty() {
        return Err(invalid(key, "must not be empty".into()));
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
underlay_addr = "198.18.0.10"
[registry]
url = "https://198.18.0.1:7443"
ca_cert = "/etc/vnp/ca.pem"
client_cert = "/etc/vnp/host.pem"
client_key = "/etc/vnp/host-key.pem"
"#;

    fn load(text: &str) -> Result<VnpdConfig, ConfigError> {
        VnpdConfig::from_toml(
            Some((text, Path::new("/t/vnpd.toml"))),
            Overrides::default(),
            "fallback",
        )
    }

    #[test]
    fn minimal_file_gets_embedded_defaults() {
        let c = load(MINIMAL).unwrap();
        assert_eq!(c.host_id, "fallback");
        assert_eq!(c.underlay_addr, Ipv4Addr::new(198, 18, 0, 10));
        assert_eq!(c.underlay_mtu, 1500);
        assert_eq!(c.guest_mtu(), 1452);
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9464".parse().unwrap()));
        assert_eq!(c.admin_socket, PathBuf::from("/run/vnp/vnpd.sock"));
        assert_eq!(
            c.default_socket_path("vm1"),
            PathBuf::from("/run/vnp/sockets/vm1.sock")
        );
        assert!(c.offloads, "offloads are on by default");
        let off = load(&format!("offloads = false\n{MINIMAL}")).unwrap();
        assert!(!off.offloads);
    }

    #[test]
    fn overrides_win_over_the_file() {
        let o = Overrides {
            host_id: Some("hb".into()),
            underlay_addr: Some(Ipv4Addr::new(198, 18, 0, 11)),
            metrics_listen: Some("off".into()),
            state_dir: Some("/tmp/s".into()),
            ..Overrides::default()
        };
        let c = VnpdConfig::from_toml(Some((MINIMAL, Path::new("f"))), o, "x").unwrap();
        assert_eq!(c.host_id, "hb");
        assert_eq!(c.underlay_addr, Ipv4Addr::new(198, 18, 0, 11));
        assert_eq!(c.metrics_listen, None);
        assert_eq!(c.state_dir, PathBuf::from("/tmp/s"));
    }

    #[test]
    fn unknown_key_is_refused_with_its_name() {
        let e = load(&format!("{MINIMAL}\nunderlay_mut = 9000\n")).unwrap_err();
        let m = e.to_string();
        // The key went under [registry], which denies unknown fields as well.
        assert!(m.contains("underlay_mut"), "{m}");
        let e = load(&format!("underlay_mut = 9000\n{MINIMAL}")).unwrap_err();
        assert!(e.to_string().contains("underlay_mut"), "{e}");
    }

    #[test]
    fn missing_required_values_name_the_flag() {
        let e = VnpdConfig::from_toml(None, Overrides::default(), "h").unwrap_err();
        assert!(e.to_string().contains("--underlay-addr"), "{e}");
        let e = load("underlay_addr = \"198.18.0.10\"").unwrap_err();
        assert!(e.to_string().contains("registry.url"), "{e}");
    }

    #[test]
    fn bad_values_are_refused() {
        for (extra, key) in [
            ("underlay_mtu = 100", "underlay_mtu"),
            ("underlay_mtu = 65000", "underlay_mtu"),
            ("default_queue_pairs = 0", "default_queue_pairs"),
            ("metrics_listen = \"localhost\"", "metrics_listen"),
            ("registry_timeout_secs = 0", "registry_timeout_secs"),
            ("token_max_ttl_secs = 0", "token_max_ttl_secs"),
            ("token_clock_skew_secs = 7200", "token_clock_skew_secs"),
            ("host_id = \"\"", "host_id"),
        ] {
            let text = format!("{extra}\n{MINIMAL}");
            let e = load(&text).unwrap_err();
            assert!(e.to_string().contains(key), "{extra}: {e}");
        }
        let e = load(&MINIMAL.replace("https://", "http://")).unwrap_err();
        assert!(e.to_string().contains("https"), "{e}");
        let e = load(&MINIMAL.replace("198.18.0.10", "0.0.0.0")).unwrap_err();
        assert!(e.to_string().contains("underlay_addr"), "{e}");
    }

    #[test]
    fn wrong_type_reports_position() {
        let e = load(&format!("underlay_mtu = \"big\"\n{MINIMAL}")).unwrap_err();
        let m = e.to_string();
        assert!(m.contains("/t/vnpd.toml") && m.contains("line 1"), "{m}");
    }

    #[test]
    fn bridge_dns_upstream() {
        assert_eq!(load(MINIMAL).unwrap().bridge.dns_upstream, None, "off");
        let c = load(&format!(
            "{MINIMAL}\n[bridge]\ndns_upstream = \"10.0.0.53:53\"\n"
        ))
        .unwrap();
        assert_eq!(c.bridge.dns_upstream, Some("10.0.0.53:53".parse().unwrap()));
        for bad in ["10.0.0.53", "0.0.0.0:53", "10.0.0.53:0", "dns.example:53"] {
            let e = load(&format!("{MINIMAL}\n[bridge]\ndns_upstream = \"{bad}\"\n")).unwrap_err();
            assert!(e.to_string().contains("bridge.dns_upstream"), "{bad}: {e}");
        }
        let e = load(&format!("{MINIMAL}\n[bridge]\ndns = \"x\"\n")).unwrap_err();
        assert!(e.to_string().contains("dns"), "{e}");
        let c = load(MINIMAL).unwrap();
        assert_eq!(c.bridge.limits, crate::bridge::BridgeLimits::default());
        let c = load(&format!(
            "{MINIMAL}\n[bridge]\nrequests_per_sec = 5000\nrequest_burst = 9\n"
        ))
        .unwrap();
        assert_eq!(
            (c.bridge.limits.rate_per_sec, c.bridge.limits.burst),
            (5000, 9)
        );
        let e = load(&format!("{MINIMAL}\n[bridge]\nrequest_burst = 0\n")).unwrap_err();
        assert!(e.to_string().contains("bridge.request_burst"), "{e}");
    }

    #[test]
    fn bridge_services() {
        let svc = |name: &str, port: u16| {
            format!("[[bridge.services]]\nname = \"{name}\"\nport = {port}\nupstream = \"198.18.0.10:9000\"\n")
        };
        let c = load(&format!(
            "{MINIMAL}\n{}{}",
            svc("inv", 8080),
            svc("logs", 8081)
        ))
        .unwrap();
        assert_eq!(c.bridge.services.len(), 2);
        assert_eq!(c.bridge.services[0].audience, "inv", "the name by default");
        assert_eq!(
            c.bridge.services[1].upstream,
            "198.18.0.10:9000".parse().unwrap()
        );
        for (bad, key) in [
            (svc("inv", 80), "port"),
            (svc("inv", 53), "port"),
            (svc("Inv!", 8080), "name"),
            (svc("a", 8080) + &svc("b", 8080), "share"),
            (
                svc("a", 8080).replace("198.18.0.10:9000", "nowhere"),
                "upstream",
            ),
        ] {
            let e = load(&format!("{MINIMAL}\n{bad}")).unwrap_err();
            assert!(e.to_string().contains(key), "{bad}: {e}");
        }
    }

    #[test]
    fn vhost_user_socket_access_and_token_rate() {
        let c = load(MINIMAL).unwrap();
        assert_eq!(
            c.vhost_user_socket,
            SocketAccess {
                owner: Some(0),
                group: Some(0),
                mode: 0o660
            }
        );
        assert_eq!(c.token_requests, RequestRate::default());
        let text = format!(
            "{MINIMAL}\n[vhost_user]\nsocket_group = \"65534\"\nsocket_mode = 0o600\n\
             [token_requests]\nper_sec = 5\nburst = 7\n"
        );
        let c = load(&text).unwrap();
        assert_eq!(
            c.vhost_user_socket,
            SocketAccess {
                owner: Some(0),
                group: Some(65534),
                mode: 0o600
            }
        );
        assert_eq!(
            c.token_requests,
            RequestRate {
                per_sec: 5,
                burst: 7
            }
        );
        for (extra, key) in [
            ("[vhost_user]\nsocket_mode = 0o4660", "socket_mode"),
            (
                "[vhost_user]\nsocket_group = \"no-such-group-vnp\"",
                "socket_group",
            ),
            (
                "[vhost_user]\nsocket_owner = \"no-such-user-vnp\"",
                "socket_owner",
            ),
            ("[vhost_user]\nsocket_perms = 1", "socket_perms"),
            ("[token_requests]\nper_sec = 0", "per_sec"),
            ("[token_requests]\nburst = 0", "burst"),
        ] {
            let e = load(&format!("{MINIMAL}\n{extra}\n")).unwrap_err();
            assert!(e.to_string().contains(key), "{extra}: {e}");
        }
    }

    #[test]
    fn default_config_text_parses() {
        parse_raw(DEFAULT_CONFIG_TOML, None).unwrap();
    }
}
